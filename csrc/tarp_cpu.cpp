// CPU kernels of tarp_linear (DESIGN §2): forward and backward, float32 and float64.
//
// Structure of one call (rows of x [M, K]; T tasks; r = rank; R = r + r*r, or r when bilinear):
//
//   plan      which rows are computed and in which order: rows with gate == 0 under hard_skip
//             are dropped (they cost nothing but their epilogue), and with task_index the kept
//             rows are grouped per task by a stable counting sort, so every per-task product is
//             one GEMM on a contiguous block of rows. When nothing is dropped and the tasks are
//             already grouped, the plan is the identity and no row is copied.
//   base      pre = xs W_tᵀ + bias: one GEMM (per task only when P makes W task-dependent)
//   proj      [h | vec S] = xs [V_t; G_t]ᵀ: two GEMMs into the column blocks of one [M, R] buffer
//   z = S h   per row, in a parallel row loop (r*r multiply-adds per row)
//   delta     pre += scaling · z U_tᵀ, accumulated in place into the base output (addmm_)
//   epilogue  out[m] = gate · act(pre) + skip_gate · x[m] + residual[m], one row loop that also
//             scatters the compact rows back to their place (gelu itself through ATen's
//             vectorized kernel on the block of computed rows)
//
// Backward (per row, DESIGN §2): dpre = gate · act'(pre) ⊙ dy, e = scaling · U_tᵀ dpre,
// dS = e hᵀ, dh = Sᵀ e, dx = W_tᵀ dpre + V_tᵀ dh + G_tᵀ vec(dS) + skip_gate · dy; the sums over
// rows (dU, dV, dG, db, D = Σ dpre xᵀ) are GEMMs over each task's block of rows, which is the
// segmented per-task sum. Only the requested gradients are computed.
//
// Threads: the row loops use at::parallel_for, which in this (OpenMP) build of ATen is an
// `omp parallel` region compiled into this file; the GEMMs go to ATen (MKL/OpenBLAS).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "tarp_checks.h"
#include "tarp_common.h"

namespace tarp_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- small helpers ------------------------------------------------------------------------

inline bool has(const OptTensor& t) {
  return t.has_value() && t->defined();
}

inline Tensor contig(const OptTensor& t) {
  return has(t) ? t->contiguous() : Tensor();
}

// Rows per parallel chunk so that a chunk has at least ~16K element operations: below that the
// cost of waking a thread exceeds the work (small adaptation shapes run single-threaded).
inline int64_t grain_for(int64_t per_row) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(per_row, 1));
}

// ---- row kernels of the epilogues ----------------------------------------------------------
// One flag-free loop each, so that the compiler vectorizes them: a single loop testing the
// activation and every flag per element did not vectorize (the relu epilogue cost 0.7 ms at
// M = 512, N = 768, more than the op saves). gelu (tanh form) never reaches these: it runs through
// ATen's vectorized at::gelu / at::gelu_backward on whole blocks of rows. `o` may alias `p`.

// o = act(p) for act in {none, relu}.
template <typename scalar_t>
inline void row_act(int64_t act, const scalar_t* p, scalar_t* o, int64_t N) {
  if (act == kActRelu) {
    for (int64_t n = 0; n < N; ++n) o[n] = p[n] > scalar_t(0) ? p[n] : scalar_t(0);
  } else if (o != p) {
    std::copy(p, p + N, o);
  }
}

// o = act'(p) ⊙ d for act in {none, relu}.
template <typename scalar_t>
inline void row_act_grad(int64_t act, const scalar_t* p, const scalar_t* d, scalar_t* o, int64_t N) {
  if (act == kActRelu) {
    for (int64_t n = 0; n < N; ++n) o[n] = p[n] > scalar_t(0) ? d[n] : scalar_t(0);
  } else {
    std::copy(d, d + N, o);
  }
}

template <typename scalar_t>
inline void row_scale(scalar_t* o, scalar_t s, int64_t N) {
  for (int64_t n = 0; n < N; ++n) o[n] *= s;
}

// o += s · v
template <typename scalar_t>
inline void row_axpy(scalar_t* o, const scalar_t* v, scalar_t s, int64_t N) {
  for (int64_t n = 0; n < N; ++n) o[n] += s * v[n];
}

template <typename scalar_t>
inline void row_add(scalar_t* o, const scalar_t* v, int64_t N) {
  for (int64_t n = 0; n < N; ++n) o[n] += v[n];
}

// Σ a · b in double (the gate gradients), or Σ a · relu(b) with relu_b.
template <typename scalar_t>
inline double row_dot(const scalar_t* a, const scalar_t* b, int64_t N, bool relu_b = false) {
  double acc = 0.0;
  if (relu_b) {
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) acc += b[n] > scalar_t(0) ? double(a[n]) * double(b[n]) : 0.0;
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) acc += double(a[n]) * double(b[n]);
  }
  return acc;
}

// A gate or skip gate read per row (see GateKind in tarp_common.h).
template <typename scalar_t>
struct GateView {
  int64_t kind = kGateNone;
  const scalar_t* p = nullptr;  // row or task values
  scalar_t value = scalar_t(1);  // scalar kind
  const int64_t* task = nullptr;

  bool on() const {
    return kind != kGateNone;
  }
  scalar_t at(int64_t m) const {
    if (kind == kGateRow) return p[m];
    if (kind == kGateTask) return p[task ? task[m] : 0];
    return value;  // scalar, or none (1, unused)
  }
};

template <typename scalar_t>
GateView<scalar_t> make_gate(const Tensor& g, int64_t kind, double value, const int64_t* task) {
  GateView<scalar_t> v;
  // The kind, the tensor's shape, dtype and device were checked by checks::check_gate.
  v.kind = kind;
  v.task = task;
  if (kind == kGateNone) return v;
  if (kind == kGateScalar) {
    v.value = g.defined() ? g.data_ptr<scalar_t>()[0] : static_cast<scalar_t>(value);
    return v;
  }
  v.p = g.data_ptr<scalar_t>();
  return v;
}

// Which rows are computed, in which order (see the file comment).
struct RowPlan {
  int64_t M = 0;
  int64_t Mk = 0;  // computed ("kept") rows
  bool identity = true;  // compact row i is row i, for all i < M
  std::vector<int64_t> rows;  // compact row -> original row (when !identity)
  std::vector<int64_t> dropped;  // rows not computed (hard_skip with gate 0)
  std::vector<int64_t> offsets;  // T + 1 task segment offsets into the compact rows

  int64_t row(int64_t i) const {
    return identity ? i : rows[i];
  }
  Tensor rows_tensor() const {
    // Borrowed: valid while the plan lives (index_select copies what it reads).
    return at::from_blob(const_cast<int64_t*>(rows.data()), {Mk}, at::kLong);
  }
};

template <typename scalar_t>
RowPlan make_plan(const char* op, int64_t M, int64_t T, const int64_t* task, const GateView<scalar_t>& g,
                  bool hard_skip) {
  RowPlan plan;
  plan.M = M;
  const bool drop = hard_skip && g.on();
  std::vector<char> keep;
  int64_t kept = M;
  if (drop) {
    keep.resize(M);
    kept = 0;
    for (int64_t m = 0; m < M; ++m) {
      keep[m] = g.at(m) != scalar_t(0);
      kept += keep[m];
    }
  }
  plan.Mk = kept;
  if (task == nullptr) {
    plan.offsets = {0, kept};
    if (kept == M) return plan;
    plan.identity = false;
    plan.rows.reserve(kept);
    plan.dropped.reserve(M - kept);
    for (int64_t m = 0; m < M; ++m) (keep[m] ? plan.rows : plan.dropped).push_back(m);
    return plan;
  }
  // Several tasks: range check (cheap on CPU, and an out-of-range index would read out of
  // bounds), then a stable counting sort of the kept rows by task.
  std::vector<int64_t> counts(T + 1, 0);
  bool sorted = true;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t t = task[m];
    TORCH_CHECK_VALUE(t >= 0 && t < T, op, ": argument 'task_index' must hold values in [0, ", T,
                      ") (T=num_tasks, the factors' task dimension), got ", t, " at row ", m);
    if (m > 0 && t < task[m - 1]) sorted = false;
    if (!drop || keep[m]) counts[t + 1] += 1;
  }
  for (int64_t t = 0; t < T; ++t) counts[t + 1] += counts[t];
  plan.offsets = counts;
  if (sorted && kept == M) return plan;  // already grouped: no copy
  plan.identity = false;
  plan.rows.resize(kept);
  std::vector<int64_t> next(counts.begin(), counts.end() - 1);
  for (int64_t m = 0; m < M; ++m) {
    if (drop && !keep[m]) {
      plan.dropped.push_back(m);
    } else {
      plan.rows[next[task[m]]++] = m;
    }
  }
  return plan;
}

// Calls f(t, offset, count) for every task segment with rows.
template <typename F>
inline void for_segments(const RowPlan& plan, F&& f) {
  const int64_t T = static_cast<int64_t>(plan.offsets.size()) - 1;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = plan.offsets[t], n = plan.offsets[t + 1] - o;
    if (n > 0) f(t, o, n);
  }
}

inline Tensor task_slice(const Tensor& f, bool multi, int64_t t) {
  return multi ? f.select(0, t) : f;
}

// What the CPU kernels support beyond the shared checks (tarp_checks.h): CPU tensors (the others
// are checked to be on x's device), float32 or float64 (the others have x's dtype).
void check_cpu(const char* op, const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": the CPU kernel needs CPU tensors, got argument 'x' on ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": argument 'x' must be float32 or float64 on CPU (the Python wrapper upcasts "
                   "float16/bfloat16), got ",
                   x.scalar_type());
}

// ---- forward --------------------------------------------------------------------------------

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> fwd_impl(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                    const Tensor& U, const Tensor& V, const Tensor& G,
                                                    const Tensor& P, const Tensor& Q, const Tensor& task_index,
                                                    const Tensor& gate, const Tensor& skip_gate,
                                                    const Tensor& residual, double scaling, double scale_offset,
                                                    int64_t num_tasks, int64_t activation, int64_t gate_kind,
                                                    double gate_value, int64_t skip_kind, double skip_value,
                                                    bool hard_skip, bool save_pre) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const bool multi = task_index.defined();
  const int64_t T = multi ? num_tasks : 1;
  const int64_t* task = multi ? task_index.data_ptr<int64_t>() : nullptr;
  const auto g = make_gate<scalar_t>(gate, gate_kind, gate_value, task);
  const auto sg = make_gate<scalar_t>(skip_gate, skip_kind, skip_value, task);
  const RowPlan plan = make_plan<scalar_t>("tarp_fast::native_tarp_fwd", M, T, task, g, hard_skip);
  const int64_t Mk = plan.Mk;
  const auto opts = x.options();

  const Tensor xs = plan.identity ? x : x.index_select(0, plan.rows_tensor());

  // ---- base: pre = xs W_tᵀ + bias ---------------------------------------------------------
  Tensor scale = at::empty({0}, opts);
  Tensor weff = weight;
  if (P.defined()) {
    // W_t = weight ⊙ softplus(P_t Q_t + scale_offset): [N, K] or [T, N, K].
    scale = at::softplus(at::matmul(P, Q).add_(scale_offset)).contiguous();
    weff = weight * scale;
  }
  Tensor pre_s = at::empty({Mk, N}, opts);
  if (!multi || !P.defined()) {
    if (bias.defined()) {
      // bias rows written by a plain row loop, then the GEMM accumulates onto them (beta = 1):
      // 1-4% faster end to end than addmm's own broadcast copy at the adaptation shapes; threads
      // only from 64K elements per chunk (a memory-bound copy)
      const scalar_t* bp = bias.data_ptr<scalar_t>();
      scalar_t* pp = pre_s.data_ptr<scalar_t>();
      at::parallel_for(0, Mk, std::max<int64_t>(1, 65536 / std::max<int64_t>(N, 1)), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) std::copy(bp, bp + N, pp + i * N);
      });
      at::addmm_out(pre_s, pre_s, xs, weff.t());
    } else
      at::mm_out(pre_s, xs, weff.t());
  } else {
    for_segments(plan, [&](int64_t t, int64_t o, int64_t n) {
      Tensor dst = pre_s.narrow(0, o, n);
      if (bias.defined())
        at::addmm_out(dst, bias, xs.narrow(0, o, n), weff.select(0, t).t());
      else
        at::mm_out(dst, xs.narrow(0, o, n), weff.select(0, t).t());
    });
  }

  // ---- delta: pre += scaling · U_t (S h) ----------------------------------------------------
  Tensor proj_s = at::empty({0}, opts);
  const bool dynamic = G.defined();
  const int64_t r = U.defined() ? U.size(-1) : 0;
  const int64_t R = U.defined() ? (dynamic ? r + r * r : r) : 0;
  if (U.defined()) {
    // [h | vec S] = xs [V_t; G_t]ᵀ as two GEMMs writing the two column blocks of proj in place
    // (BLAS takes the row stride R). Stacking [V; G] for one GEMM needs a copy of G on every call
    // and the two-GEMM form measured as fast or faster end to end (README, "The native extension").
    proj_s = at::empty({Mk, R}, opts);
    for_segments(plan, [&](int64_t t, int64_t o, int64_t n) {
      Tensor dst = proj_s.narrow(0, o, n);
      const Tensor xs_t = xs.narrow(0, o, n);
      Tensor h = dst.narrow(1, 0, r);
      at::mm_out(h, xs_t, task_slice(V, multi, t).t());
      if (dynamic) {
        Tensor S = dst.narrow(1, r, r * r);
        at::mm_out(S, xs_t, task_slice(G, multi, t).t());
      }
    });
    Tensor z_s = proj_s;  // bilinear: z = h
    if (dynamic) {
      z_s = at::empty({Mk, r}, opts);
      const scalar_t* pp = proj_s.data_ptr<scalar_t>();
      scalar_t* zp = z_s.data_ptr<scalar_t>();
      at::parallel_for(0, Mk, grain_for(r * r), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const scalar_t* h = pp + i * R;
          const scalar_t* S = h + r;  // row-major r x r
          scalar_t* z = zp + i * r;
          for (int64_t a = 0; a < r; ++a) {
            scalar_t acc = 0;
            // a reduction: without the simd pragma the compiler keeps the sum in order, one
            // dependent add per step (latency-bound, ~3x slower at r = 16)
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < r; ++c) acc += S[a * r + c] * h[c];
            z[a] = acc;
          }
        }
      });
    }
    for_segments(plan, [&](int64_t t, int64_t o, int64_t n) {
      pre_s.narrow(0, o, n).addmm_(z_s.narrow(0, o, n), task_slice(U, multi, t).t(), 1.0, scaling);
    });
  }

  // ---- epilogue ------------------------------------------------------------------------------
  const bool has_res = residual.defined();
  // gelu through ATen's kernel (vectorized, dispatched at run time to the CPU's widest SIMD): a
  // scalar tanh per element in the row loop below made the op 1.5-2.2x slower than the reference
  const Tensor act_s = activation == kActGeluTanh ? at::gelu(pre_s, "tanh") : Tensor();
  const bool act_only = act_s.defined() && !g.on() && !sg.on() && !has_res && plan.identity;
  const bool epi = (activation != kActNone || g.on() || sg.on() || has_res) && !act_only;
  Tensor out, pre_full, proj_full;
  if (act_only) {  // out = gelu(pre): nothing left for the row loop
    proj_full = proj_s;
    out = act_s;
    pre_full = save_pre ? pre_s : at::empty({0}, opts);
  } else if (plan.identity) {
    proj_full = proj_s;
    if (save_pre) {
      pre_full = pre_s;
      out = epi ? at::empty({M, N}, opts) : pre_s.clone();
    } else {
      pre_full = at::empty({0}, opts);
      out = pre_s;  // the epilogue runs in place
    }
  } else {
    out = at::empty({M, N}, opts);
    pre_full = save_pre ? at::zeros({M, N}, opts) : at::empty({0}, opts);
    proj_full = U.defined() ? at::zeros({M, R}, opts) : proj_s;
  }
  if (!act_only && (epi || !plan.identity)) {
    const scalar_t* ps = pre_s.data_ptr<scalar_t>();
    const scalar_t* as = act_s.defined() ? act_s.data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? residual.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* pf = (save_pre && !plan.identity) ? pre_full.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pjs = (U.defined() && !plan.identity) ? proj_s.data_ptr<scalar_t>() : nullptr;
    scalar_t* pjf = pjs ? proj_full.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, Mk, grain_for(N), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t m = plan.row(i);
        const scalar_t* p = ps + i * N;
        scalar_t* o = op + m * N;
        const scalar_t gm = g.at(m), sm = sg.at(m);
        const scalar_t* xm = xp + m * K;
        const scalar_t* res = rp ? rp + m * N : nullptr;
        if (pf) std::copy(p, p + N, pf + m * N);
        if (pjs) std::copy(pjs + i * R, pjs + (i + 1) * R, pjf + m * R);
        // out = gate · act(pre) + skip_gate · x + residual, one vectorized pass per term
        if (as) {
          std::copy(as + i * N, as + (i + 1) * N, o);
        } else {
          row_act(activation, p, o, N);
        }
        if (g.on()) row_scale(o, gm, N);
        if (sg.on()) row_axpy(o, xm, sm, N);
        if (res) row_add(o, res, N);
      }
    });
    // Rows dropped by hard_skip: y = skip_gate · x + residual (no matmul work at all).
    const int64_t nd = static_cast<int64_t>(plan.dropped.size());
    at::parallel_for(0, nd, grain_for(N), [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const int64_t m = plan.dropped[j];
        scalar_t* o = op + m * N;
        const scalar_t sm = sg.at(m);
        const scalar_t* xm = xp + m * K;
        const scalar_t* res = rp ? rp + m * N : nullptr;
        std::fill(o, o + N, scalar_t(0));
        if (sg.on()) row_axpy(o, xm, sm, N);
        if (res) row_add(o, res, N);
      }
    });
  }
  return {out, pre_full, proj_full, scale};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> native_tarp_fwd_cpu(
    const Tensor& x_in, const Tensor& weight_in, const OptTensor& bias, const OptTensor& U, const OptTensor& V,
    const OptTensor& G, const OptTensor& P, const OptTensor& Q, const OptTensor& task_index,
    const OptTensor& gate, const OptTensor& skip_gate, const OptTensor& residual, double scaling,
    double scale_offset, int64_t num_tasks, int64_t activation, int64_t gate_kind, double gate_value,
    int64_t skip_kind, double skip_value, bool hard_skip, bool save_pre) {
  // Every argument is checked before a pointer is read (the op can be called directly).
  constexpr const char* op = "tarp_fast::native_tarp_fwd";
  checks::check_tarp_args(op, x_in, weight_in, bias, U, V, G, P, Q, task_index, gate, skip_gate, residual,
                          num_tasks, activation, gate_kind, skip_kind);
  check_cpu(op, x_in);
  const Tensor x = x_in.contiguous();
  // The weight is read only through ATen ops (mm with a transpose flag, elementwise): a transposed
  // view, as a GPT-2 Conv1D layer passes, needs no [N, K] copy per call.
  const Tensor& weight = weight_in;
  const Tensor res = contig(residual);
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "native_tarp_fwd", [&] {
    out = fwd_impl<scalar_t>(x, weight, contig(bias), contig(U), contig(V), contig(G), contig(P), contig(Q),
                             contig(task_index), contig(gate), contig(skip_gate), res, scaling, scale_offset,
                             num_tasks, activation, gate_kind, gate_value, skip_kind, skip_value, hard_skip,
                             save_pre);
  });
  return out;
}

// ---- backward -------------------------------------------------------------------------------

// Reduces per-row gate gradients [M] to the gate's own shape.
template <typename scalar_t>
Tensor reduce_gate_grad(const std::vector<double>& per_row, int64_t kind, const int64_t* task, int64_t T,
                        const at::TensorOptions& opts) {
  const int64_t M = static_cast<int64_t>(per_row.size());
  if (kind == kGateRow) {
    Tensor out = at::empty({M}, opts);
    scalar_t* p = out.data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m) p[m] = static_cast<scalar_t>(per_row[m]);
    return out;
  }
  if (kind == kGateTask) {
    // Segmented per-task sum, in row order (deterministic).
    std::vector<double> acc(T, 0.0);
    for (int64_t m = 0; m < M; ++m) acc[task[m]] += per_row[m];
    Tensor out = at::empty({T}, opts);
    scalar_t* p = out.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) p[t] = static_cast<scalar_t>(acc[t]);
    return out;
  }
  double s = 0.0;
  for (double v : per_row) s += v;
  return at::full({}, s, opts);
}

// Which gradients a backward produces: the NeedBit mask of native_tarp_bwd, decoded once.
struct Needs {
  bool x, weight, bias, U, V, G, P, Q, gate, skip;

  static Needs from_mask(int64_t m) {
    auto on = [m](int64_t bit) { return (m & bit) != 0; };
    return {on(kNeedX), on(kNeedWeight), on(kNeedBias), on(kNeedU), on(kNeedV),
            on(kNeedG), on(kNeedP),      on(kNeedQ),     on(kNeedGate), on(kNeedSkip)};
  }
};

// One backward call: the (contiguous) inputs, the forward's saved outputs, sizes, gates, the row
// plan and the gradients asked for. Absent optional tensors are undefined.
template <typename scalar_t>
struct Bwd {
  Tensor dy, x, weight, U, V, G, P, Q;
  Tensor pre, proj, scale;  // saved by the forward
  double scaling;
  int64_t activation;
  bool multi, dynamic;
  int64_t M, K, N, T, r, R;  // R = r + r*r (r when bilinear): the columns of proj
  const int64_t* task;
  GateView<scalar_t> g, sg;
  RowPlan plan;
  Needs need;
  at::TensorOptions opts;

  // dpre is needed by every gradient but the gates'; the delta pass by dx and the factors'.
  bool need_w() const {
    return need.weight || need.P || need.Q;
  }
  bool need_delta() const {
    return U.defined() && (need.x || need.U || need.V || need.G);
  }
  bool need_dpre() const {
    return need.x || need_w() || need.bias || need_delta();
  }
  Tensor none() const {
    return at::empty({0}, opts);
  }
};

// Pass 1: dpre = gate · act'(pre) ⊙ dy on the compact rows (undefined when no gradient reads it)
// and dgate = <dy, act(pre)> (per row, reduced to the gate's shape; 0 for dropped rows).
template <typename scalar_t>
std::pair<Tensor, Tensor> bwd_dpre(const Bwd<scalar_t>& c) {
  const RowPlan& plan = c.plan;
  const int64_t M = c.M, N = c.N, Mk = plan.Mk;
  const bool need_dpre = c.need_dpre();
  const bool need_gate = c.need.gate && c.g.on();
  const scalar_t* dyp = c.dy.template data_ptr<scalar_t>();
  const scalar_t* prp = c.pre.numel() ? c.pre.template data_ptr<scalar_t>() : nullptr;
  Tensor dpre_s;
  std::vector<double> dg_row;
  if (need_gate) dg_row.assign(M, 0.0);  // dropped rows keep 0 (hard_skip: no gate gradient)
  // gelu: act'(pre) ⊙ dy and act(pre) of the computed rows through ATen's vectorized kernels (a
  // scalar tanh per element dominated the whole backward), the gate applied in the row loop
  Tensor gelu_dy, gelu_act;
  if (c.activation == kActGeluTanh && (need_dpre || need_gate)) {
    const Tensor dy_k = plan.identity ? c.dy : c.dy.index_select(0, plan.rows_tensor());
    const Tensor pre_k = plan.identity ? c.pre : c.pre.index_select(0, plan.rows_tensor());
    if (need_dpre) gelu_dy = at::gelu_backward(dy_k, pre_k, "tanh");
    if (need_gate) gelu_act = at::gelu(pre_k, "tanh");
  }
  if (need_dpre && plan.identity && c.activation == kActNone && !c.g.on()) {
    dpre_s = c.dy;  // dpre = dy: no copy
  } else if (need_dpre && gelu_dy.defined() && !c.g.on()) {
    dpre_s = gelu_dy;  // dpre = gelu'(pre) ⊙ dy, already compact
  } else if (need_dpre) {
    dpre_s = at::empty({Mk, N}, c.opts);
  }
  const bool write_dpre = dpre_s.defined() && !dpre_s.is_same(c.dy) && !dpre_s.is_same(gelu_dy);
  if (need_gate || write_dpre) {
    scalar_t* dpp = write_dpre ? dpre_s.template data_ptr<scalar_t>() : nullptr;
    const scalar_t* gdp = gelu_dy.defined() ? gelu_dy.template data_ptr<scalar_t>() : nullptr;
    const scalar_t* gap = gelu_act.defined() ? gelu_act.template data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, Mk, grain_for(N), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t m = plan.row(i);
        const scalar_t* d = dyp + m * N;
        const scalar_t* p = prp ? prp + m * N : nullptr;
        const scalar_t gm = c.g.at(m);
        if (dpp) {
          scalar_t* o = dpp + i * N;
          if (gdp) {
            std::copy(gdp + i * N, gdp + (i + 1) * N, o);
          } else {
            row_act_grad(c.activation, p, d, o, N);
          }
          if (c.g.on()) row_scale(o, gm, N);
        }
        if (need_gate)
          dg_row[m] = gap ? row_dot(d, gap + i * N, N) : row_dot(d, p, N, c.activation == kActRelu);
      }
    });
  }
  Tensor dgate = need_gate ? reduce_gate_grad<scalar_t>(dg_row, c.g.kind, c.task, c.T, c.opts) : c.none();
  return {dpre_s, dgate};
}

// dskip_gate = <dy, x> over every row (the skip path also runs on dropped rows).
template <typename scalar_t>
Tensor bwd_dskip(const Bwd<scalar_t>& c) {
  if (!(c.need.skip && c.sg.on())) return c.none();
  const scalar_t* dyp = c.dy.template data_ptr<scalar_t>();
  const scalar_t* xp = c.x.template data_ptr<scalar_t>();
  std::vector<double> ds_row(c.M, 0.0);
  at::parallel_for(0, c.M, grain_for(c.N), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) ds_row[m] = row_dot(dyp + m * c.N, xp + m * c.K, c.N);
  });
  return reduce_gate_grad<scalar_t>(ds_row, c.sg.kind, c.task, c.T, c.opts);
}

// Pass 2: dx on the compact rows, base term dpre W_t (the delta pass adds its terms).
template <typename scalar_t>
Tensor bwd_dx_base(const Bwd<scalar_t>& c, const Tensor& dpre_s) {
  if (!c.need.x) return Tensor();
  const Tensor weff = c.P.defined() ? c.weight * c.scale : c.weight;
  if (!c.P.defined() || !c.multi) return at::mm(dpre_s, weff);
  Tensor dx_s = at::empty({c.plan.Mk, c.K}, c.opts);
  for_segments(c.plan, [&](int64_t t, int64_t o, int64_t n) {
    Tensor dst = dx_s.narrow(0, o, n);
    at::mm_out(dst, dpre_s.narrow(0, o, n), weff.select(0, t));
  });
  return dx_s;
}

// Pass 3, delta: e = scaling · U_tᵀ dpre, then dS = e hᵀ, dh = Sᵀ e per row; dU, dV, dG and
// dx += V_tᵀ dh + G_tᵀ vec(dS), per task segment of n rows. The r-wide products are computed in
// the transposed layout (eᵀ = U_tᵀ dpreᵀ: [r, n], and dU_tᵀ = zᵀ dpre: [r, N]): with r of 4..16,
// BLAS runs the short-and-wide form 1.5-3x faster than the tall-and-skinny one (measured at
// M=64, N=128). Returns (dU, dV, dG).
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> bwd_delta(const Bwd<scalar_t>& c, const Tensor& dpre_s, const Tensor& xs,
                                             Tensor& dx_s) {
  Tensor dU = c.none(), dV = c.none(), dG = c.none();
  if (!c.need_delta()) return {dU, dV, dG};
  const RowPlan& plan = c.plan;
  const bool multi = c.multi, dynamic = c.dynamic;
  const int64_t r = c.r, R = c.R, N = c.N, Mk = plan.Mk;
  if (c.need.U) dU = multi ? at::zeros_like(c.U) : at::empty_like(c.U);
  if (c.need.V) dV = multi ? at::zeros_like(c.V) : at::empty_like(c.V);
  if (c.need.G) dG = multi ? at::zeros_like(c.G) : at::empty_like(c.G);
  if (!multi && Mk == 0) {  // sums over no rows
    for (Tensor* t : {&dU, &dV, &dG})
      if (t->numel()) t->zero_();
  }
  const scalar_t* pj = c.proj.template data_ptr<scalar_t>();
  const bool need_z = c.need.U;
  const scalar_t sc = static_cast<scalar_t>(c.scaling);
  for_segments(plan, [&](int64_t t, int64_t o, int64_t n) {
    const bool whole = (o == 0 && n == Mk);
    const Tensor dpre_t = whole ? dpre_s : dpre_s.narrow(0, o, n);
    const Tensor xs_t = !xs.defined() ? xs : (whole ? xs : xs.narrow(0, o, n));
    const Tensor ET = at::mm(task_slice(c.U, multi, t).t(), dpre_t.t());  // [r, n], before scaling
    const scalar_t* etp = ET.template data_ptr<scalar_t>();
    Tensor dproj = at::empty({n, R}, c.opts);  // [dh | vec dS] per row (dh = e when bilinear)
    Tensor zT = need_z ? at::empty({r, n}, c.opts) : Tensor();  // z = S h (or h), transposed
    scalar_t* dpj = dproj.template data_ptr<scalar_t>();
    scalar_t* zp = need_z ? zT.template data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, grain_for(r * r + r), [&](int64_t b, int64_t e_) {
      std::vector<scalar_t> ev(r);
      for (int64_t i = b; i < e_; ++i) {
        const scalar_t* h = pj + plan.row(o + i) * R;
        for (int64_t a = 0; a < r; ++a) ev[a] = sc * etp[a * n + i];
        scalar_t* dh = dpj + i * R;
        if (!dynamic) {
          for (int64_t a = 0; a < r; ++a) dh[a] = ev[a];
          if (zp)
            for (int64_t a = 0; a < r; ++a) zp[a * n + i] = h[a];
          continue;
        }
        const scalar_t* S = h + r;
        scalar_t* dS = dh + r;
        for (int64_t cc = 0; cc < r; ++cc) dh[cc] = 0;
        for (int64_t a = 0; a < r; ++a) {
          const scalar_t ea = ev[a];
          const scalar_t* Sa = S + a * r;
          scalar_t* dSa = dS + a * r;
          scalar_t za = 0;
#pragma omp simd reduction(+ : za)
          for (int64_t cc = 0; cc < r; ++cc) {
            dSa[cc] = ea * h[cc];  // dS = e hᵀ
            dh[cc] += Sa[cc] * ea;  // dh = Sᵀ e
            za += Sa[cc] * h[cc];  // z = S h
          }
          if (zp) zp[a * n + i] = za;
        }
      }
    });
    if (c.need.U) {  // dU_t = scaling · Σ dpre zᵀ = (scaling · zᵀ dpre)ᵀ
      // scaling · zᵀ dpre into a contiguous [r, N] block, then transposed into dU_t: BLAS writing
      // the transposed view of dU_t in place was 6x slower at M=512 (149 vs 24 us, N=256, r=8)
      Tensor dUT = at::empty({r, N}, c.opts);
      at::addmm_out(dUT, dUT, zT, dpre_t, /*beta=*/0, /*alpha=*/c.scaling);
      task_slice(dU, multi, t).copy_(dUT.t());
    }
    // dh and vec dS sit side by side in dproj [n, R]; each factor's products read its column
    // block in place (the row stride R goes to BLAS), so no [V; G] stack is built.
    const Tensor dh_t = dproj.narrow(1, 0, r);
    const Tensor dS_t = dynamic ? dproj.narrow(1, r, r * r) : Tensor();
    if (c.need.V) {  // dV_t = Σ dh xᵀ
      Tensor dst = task_slice(dV, multi, t);
      at::mm_out(dst, dh_t.t(), xs_t);
    }
    if (c.need.G) {  // dG_t = Σ vec(dS) xᵀ
      Tensor dst = task_slice(dG, multi, t);
      at::mm_out(dst, dS_t.t(), xs_t);
    }
    if (c.need.x) {  // dx += V_tᵀ dh + G_tᵀ vec(dS)
      Tensor dst = whole ? dx_s : dx_s.narrow(0, o, n);
      dst.addmm_(dh_t, task_slice(c.V, multi, t));
      if (dynamic) dst.addmm_(dS_t, task_slice(c.G, multi, t));
    }
  });
  return {dU, dV, dG};
}

// Pass 4, base weight and multiplicative term: D_t = Σ dpre xᵀ per task, dW0 = Φ1 ⊙ D,
// dA = (W0 ⊙ D) ⊙ sigmoid(A), dP_t = dA Q_tᵀ, dQ_t = P_tᵀ dA. Returns (dW, dP, dQ).
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> bwd_weight(const Bwd<scalar_t>& c, const Tensor& dpre_s, const Tensor& xs) {
  Tensor dW = c.none(), dP = c.none(), dQ = c.none();
  if (!c.need_w()) return {dW, dP, dQ};
  if (!c.P.defined()) {
    if (c.need.weight) dW = at::mm(dpre_s.t(), xs);
    return {dW, dP, dQ};
  }
  const bool multi = c.multi;
  const bool need_a = c.need.P || c.need.Q;
  // contiguous [N, K] whatever the weight's strides (a Conv1D layer's transposed view): the op's fake
  // kernel promises that layout
  if (c.need.weight) dW = at::zeros({c.N, c.K}, c.opts);
  if (c.need.P) dP = at::zeros_like(c.P);
  if (c.need.Q) dQ = at::zeros_like(c.Q);
  Tensor D = at::empty({c.N, c.K}, c.opts);
  Tensor dA = need_a ? at::empty({c.N, c.K}, c.opts) : Tensor();
  for_segments(c.plan, [&](int64_t t, int64_t o, int64_t n) {
    at::mm_out(D, dpre_s.narrow(0, o, n).t(), xs.narrow(0, o, n));
    const Tensor sc = task_slice(c.scale, multi, t);  // Φ1 = softplus(A)
    // ATen's vectorized elementwise kernels: a scalar expm1 per weight element made the
    // backward 0.8-0.9x of the reference's at M = 64..512, K = N = 256..768
    if (c.need.weight) dW.addcmul_(sc, D);  // dW0 += Φ1 ⊙ D
    if (need_a) {  // dA = (W0 ⊙ D) ⊙ softplus'(A), softplus'(A) = sigmoid(A) = -expm1(-Φ1)
      at::mul_out(dA, c.weight, D);
      dA.mul_(at::expm1(sc.neg()).neg_());
    }
    if (c.need.P) {  // dP_t = dA Q_tᵀ
      Tensor dst = task_slice(dP, multi, t);
      at::mm_out(dst, dA, task_slice(c.Q, multi, t).t());
    }
    if (c.need.Q) {  // dQ_t = P_tᵀ dA
      Tensor dst = task_slice(dQ, multi, t);
      at::mm_out(dst, task_slice(c.P, multi, t).t(), dA);
    }
  });
  return {dW, dP, dQ};
}

// Pass 5: dx in row order: the compact rows scattered back, + skip_gate · dy (dropped rows get
// only that term).
template <typename scalar_t>
Tensor bwd_dx_rows(const Bwd<scalar_t>& c, const Tensor& dx_s) {
  if (!c.need.x) return c.none();
  const RowPlan& plan = c.plan;
  if (plan.identity && !c.sg.on()) return dx_s;
  const int64_t K = c.K, N = c.N;
  const scalar_t* dyp = c.dy.template data_ptr<scalar_t>();
  Tensor dx = plan.identity ? dx_s : at::empty({c.M, K}, c.opts);
  scalar_t* dxp = dx.template data_ptr<scalar_t>();
  const scalar_t* dxs = dx_s.template data_ptr<scalar_t>();
  at::parallel_for(0, plan.Mk, grain_for(K), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t m = plan.row(i);
      scalar_t* o = dxp + m * K;
      const scalar_t* s = dxs + i * K;
      const scalar_t sm = c.sg.at(m);
      if (o != s) std::copy(s, s + K, o);
      if (c.sg.on())
        for (int64_t k = 0; k < K; ++k) o[k] += sm * dyp[m * N + k];
    }
  });
  const int64_t nd = static_cast<int64_t>(plan.dropped.size());
  at::parallel_for(0, nd, grain_for(K), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t m = plan.dropped[j];
      scalar_t* o = dxp + m * K;
      const scalar_t sm = c.sg.at(m);
      for (int64_t k = 0; k < K; ++k) o[k] = c.sg.on() ? sm * dyp[m * N + k] : scalar_t(0);
    }
  });
  return dx;
}

// The backward as its named passes; returns (dx, dW, db, dU, dV, dG, dP, dQ, dgate, dskip).
template <typename scalar_t>
std::vector<Tensor> bwd_impl(const Bwd<scalar_t>& c) {
  const auto [dpre_s, dgate] = bwd_dpre(c);
  const Tensor dskip = bwd_dskip(c);
  // x's compact rows, read by the weight and the [V; G] gradients
  const bool need_xs = c.need_w() || (c.U.defined() && (c.need.V || c.need.G));
  const Tensor xs = !need_xs ? Tensor() : (c.plan.identity ? c.x : c.x.index_select(0, c.plan.rows_tensor()));
  Tensor dx_s = bwd_dx_base(c, dpre_s);
  const auto [dU, dV, dG] = bwd_delta(c, dpre_s, xs, dx_s);
  const auto [dW, dP, dQ] = bwd_weight(c, dpre_s, xs);
  const Tensor db = c.need.bias ? dpre_s.sum(0) : c.none();
  return {bwd_dx_rows(c, dx_s), dW, db, dU, dV, dG, dP, dQ, dgate, dskip};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> native_tarp_bwd_cpu(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& weight_in, const OptTensor& U, const OptTensor& V,
    const OptTensor& G, const OptTensor& P, const OptTensor& Q, const OptTensor& task_index,
    const OptTensor& gate, const OptTensor& skip_gate, const Tensor& pre, const Tensor& proj, const Tensor& scale,
    double scaling, int64_t num_tasks, int64_t activation, int64_t gate_kind, double gate_value, int64_t skip_kind,
    double skip_value, bool hard_skip, int64_t needs) {
  // Every argument is checked before a pointer is read (the op can be called directly): the
  // forward's (without bias and residual), then dy and the forward's saved outputs.
  constexpr const char* op = "tarp_fast::native_tarp_bwd";
  const auto sizes = checks::check_tarp_args(op, x_in, weight_in, std::nullopt, U, V, G, P, Q, task_index, gate,
                                             skip_gate, std::nullopt, num_tasks, activation, gate_kind, skip_kind);
  checks::check_tarp_bwd_args(op, sizes, x_in, dy_in, pre, proj, scale, activation, gate_kind, needs);
  check_cpu(op, x_in);
  // The gradient of an absent factor is not computed: its bit is ignored (like a gate of kind none).
  for (const auto& [t, bit] : {std::pair<const OptTensor*, int64_t>{&U, kNeedU}, {&V, kNeedV}, {&G, kNeedG},
                               {&P, kNeedP}, {&Q, kNeedQ}})
    if (!has(*t)) needs &= ~bit;
  const Tensor x = x_in.contiguous();
  const Tensor ti = contig(task_index), g = contig(gate), sg = contig(skip_gate);
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "native_tarp_bwd", [&] {
    Bwd<scalar_t> c{dy_in.contiguous(), x, weight_in, contig(U), contig(V), contig(G), contig(P),
                    contig(Q), pre.contiguous(), proj.contiguous(), scale.contiguous(), scaling, activation};
    c.multi = ti.defined();
    c.dynamic = c.G.defined();
    c.M = x.size(0);
    c.K = x.size(1);
    c.N = c.weight.size(0);
    c.T = c.multi ? num_tasks : 1;
    c.r = c.U.defined() ? c.U.size(-1) : 0;
    c.R = c.U.defined() ? (c.dynamic ? c.r + c.r * c.r : c.r) : 0;
    c.task = c.multi ? ti.data_ptr<int64_t>() : nullptr;
    c.g = make_gate<scalar_t>(g, gate_kind, gate_value, c.task);
    c.sg = make_gate<scalar_t>(sg, skip_kind, skip_value, c.task);
    c.plan = make_plan<scalar_t>(op, c.M, c.T, c.task, c.g, hard_skip);
    c.need = Needs::from_mask(needs);
    c.opts = x.options();
    out = bwd_impl<scalar_t>(c);
  });
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8], out[9]};
}

}  // namespace

TORCH_LIBRARY_IMPL(tarp_fast, CPU, m) {
  m.impl("native_tarp_fwd", &native_tarp_fwd_cpu);
  m.impl("native_tarp_bwd", &native_tarp_bwd_cpu);
}

}  // namespace tarp_fast
