// Argument checks of the registered tarp_fast ops, shared by every kernel translation unit.
//
// A registered op can be called directly (torch.ops.tarp_fast.*), bypassing the Python validator
// (tarp_fast/_contract.py check_tarp_args), so each op checks its own arguments here before any
// data pointer is read. The messages mirror the Python validator's: they name the op and the
// argument, say what was expected (the symbolic shape, its values and their meaning) and what
// was given. The exception types follow it too:
//   wrong shape or value  -> TORCH_CHECK_VALUE (Python ValueError)
//   wrong dtype           -> TORCH_CHECK_TYPE  (Python TypeError)
//   wrong device          -> TORCH_CHECK       (Python RuntimeError)
//
// Contiguity is not required of any argument: the kernels call .contiguous() on what they read.
// Task indices are range-checked by the CPU kernels where they read them (free there; the CUDA
// helpers cannot check values without a host sync and drop out-of-range rows instead).
//
// Only <ATen/core/Tensor.h> and c10 are used, so nvcc can include this header too.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tarp_common.h"

namespace tarp_fast {
namespace checks {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline bool present(const OptTensor& t) {
  return t.has_value() && t->defined();
}

// ---- generic checks --------------------------------------------------------------------------

inline void check_device(const char* op, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": argument '", name, "' must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void check_same_dtype(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": argument '", name, "' must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_floating(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": argument '", name,
                   "' must be a floating tensor, got ", t.scalar_type());
}

inline void check_int64(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": argument '", name, "' must be int64, got ",
                   t.scalar_type());
}

// Same device and dtype as `ref` (x of the tarp ops).
inline void check_like(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  check_device(op, name, t, ref, "x");
  check_same_dtype(op, name, t, ref, "x");
}

// t.sizes() == want, else "argument 'V' must have shape [r, K]=[4, 8] (meaning), got [5, 8]".
inline void expect_shape(const char* op, const char* name, const Tensor& t, const std::vector<int64_t>& want,
                         const std::string& symbolic, const char* meaning) {
  TORCH_CHECK_VALUE(t.sizes() == c10::IntArrayRef(want), op, ": argument '", name, "' must have shape ", symbolic,
                    "=", c10::IntArrayRef(want), " (", meaning, "), got ", t.sizes());
}

// ---- tarp_linear (DESIGN §2) ----------------------------------------------------------------

// Sizes of a checked tarp_linear call.
struct TarpSizes {
  int64_t M = 0, K = 0, N = 0;
  int64_t r = 0;  // rank of the additive delta (0 without U)
  int64_t q = 0;  // rank of the multiplicative term (0 without P)
  int64_t T = 1;  // tasks (num_tasks with task_index, else 1)
  bool multi = false;  // task_index given
  bool delta = false;  // U and V given
  bool dynamic = false;  // G given
  bool scaled = false;  // P and Q given
  int64_t R = 0;  // columns of proj: r + r*r (dynamic), r (bilinear), 0 (no delta)
};

// A gate or skip gate (argument `name`) and its kind code (argument `kind_name`): for the row
// and task kinds a tensor [M] / [T], for the scalar kind an optional one-element tensor.
inline void check_gate(const char* op, const char* name, const char* kind_name, const OptTensor& g, int64_t kind,
                       const Tensor& x, const TarpSizes& s) {
  TORCH_CHECK_VALUE(kind >= kGateNone && kind <= kGateTask, op, ": argument '", kind_name,
                    "' must be 0 (none), 1 (scalar), 2 (row) or 3 (task), got ", kind);
  if (kind == kGateNone) {
    TORCH_CHECK_VALUE(!present(g), op, ": argument '", name, "' is given but ", kind_name,
                      " is 0 (none); pass None or the tensor's kind");
    return;
  }
  if (kind == kGateScalar) {
    if (!present(g)) return;  // the float value argument is used
    check_like(op, name, *g, x);
    TORCH_CHECK_VALUE(g->numel() == 1, op, ": argument '", name, "' of kind scalar must have one element, got ",
                      g->sizes());
    return;
  }
  if (kind == kGateTask)
    TORCH_CHECK_VALUE(s.multi, op, ": argument '", name, "' of kind task ([T]) needs task_index, got None");
  TORCH_CHECK_VALUE(present(g), op, ": argument '", name, "' is None but ", kind_name, " is ", kind,
                    kind == kGateRow ? " (row: a tensor [M])" : " (task: a tensor [T])");
  check_like(op, name, *g, x);
  if (kind == kGateRow)
    expect_shape(op, name, *g, {s.M}, "[M]", "one value per row of x");
  else
    expect_shape(op, name, *g, {s.T}, "[T]", "one value per task, T = num_tasks");
}

// Every argument that native_tarp_fwd and native_tarp_bwd share (bwd passes no bias / residual).
// x [M, K], weight [N, K], bias [N], U [(T,) N, r], V [(T,) r, K], G [(T,) r*r, K],
// P [(T,) N, q], Q [(T,) q, K], task_index [M] int64 (T = num_tasks), gate / skip_gate by kind,
// residual [M, N]; every float tensor has x's dtype and every tensor x's device.
inline TarpSizes check_tarp_args(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                 const OptTensor& U, const OptTensor& V, const OptTensor& G, const OptTensor& P,
                                 const OptTensor& Q, const OptTensor& task_index, const OptTensor& gate,
                                 const OptTensor& skip_gate, const OptTensor& residual, int64_t num_tasks,
                                 int64_t activation, int64_t gate_kind, int64_t skip_kind) {
  TarpSizes s;
  TORCH_CHECK_VALUE(x.defined(), op, ": argument 'x' must be a tensor [M, K], got None");
  check_floating(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": argument 'x' must be 2-D [M, K] (the caller flattens x [..., K]), got ",
                    x.sizes());
  TORCH_CHECK_VALUE(weight.defined(), op, ": argument 'weight' must be a tensor [N, K], got None");
  check_like(op, "weight", weight, x);
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": argument 'weight' must be 2-D [N, K], got ", weight.sizes());
  s.M = x.size(0);
  s.K = x.size(1);
  s.N = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == s.K, op, ": argument 'weight' must have shape [N, K] with K=", s.K,
                    " (x is ", x.sizes(), "), got ", weight.sizes());
  if (present(bias)) {
    check_like(op, "bias", *bias, x);
    expect_shape(op, "bias", *bias, {s.N}, "[N]", "N=out_features");
  }
  TORCH_CHECK_VALUE(activation >= kActNone && activation <= kActGeluTanh, op,
                    ": argument 'activation' must be 0 (none), 1 (relu) or 2 (gelu_tanh), got ", activation);

  // ---- tasks --------------------------------------------------------------------------------
  s.multi = present(task_index);
  if (s.multi) {
    const Tensor& ti = *task_index;
    check_device(op, "task_index", ti, x, "x");
    check_int64(op, "task_index", ti);
    expect_shape(op, "task_index", ti, {s.M}, "[M]", "one task per row of x");
    TORCH_CHECK_VALUE(num_tasks >= 1, op, ": argument 'num_tasks' must be at least 1 with task_index, got ",
                      num_tasks);
    s.T = num_tasks;
  }
  std::vector<int64_t> lead;
  std::string sym_lead;
  if (s.multi) {
    lead.push_back(s.T);
    sym_lead = "T, ";
  }
  auto shape = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> v = lead;
    v.insert(v.end(), tail);
    return v;
  };
  auto check_factor_dim = [&](const char* name, const Tensor& t, const char* sym) {
    check_like(op, name, t, x);
    TORCH_CHECK_VALUE(t.dim() == static_cast<int64_t>(lead.size()) + 2, op, ": argument '", name, "' must be ",
                      s.multi ? "3-D [T, " : "2-D [", sym, "]",
                      s.multi ? " (task_index is given: one factor per task, T = num_tasks)"
                              : " (no task_index: a single task)",
                      ", got ", t.sizes());
  };

  // ---- additive delta -------------------------------------------------------------------------
  TORCH_CHECK_VALUE(present(U) == present(V), op, ": arguments 'U' and 'V' must be given together, got ",
                    present(U) ? "U without V" : "V without U");
  TORCH_CHECK_VALUE(!present(G) || present(U), op, ": argument 'G' needs 'U' and 'V', got G alone");
  if (present(U)) {
    s.delta = true;
    check_factor_dim("U", *U, "N, r");
    s.r = U->size(-1);
    expect_shape(op, "U", *U, shape({s.N, s.r}), "[" + sym_lead + "N, r]",
                 s.multi ? "T=num_tasks, N=out_features, r=rank" : "N=out_features, r=rank");
    check_factor_dim("V", *V, "r, K");
    expect_shape(op, "V", *V, shape({s.r, s.K}), "[" + sym_lead + "r, K]", "r=rank from U, K=in_features");
    if (present(G)) {
      s.dynamic = true;
      check_factor_dim("G", *G, "r*r, K");
      expect_shape(op, "G", *G, shape({s.r * s.r, s.K}), "[" + sym_lead + "r*r, K]",
                   "r*r rows with r=rank from U, K=in_features");
    }
    s.R = s.dynamic ? s.r + s.r * s.r : s.r;
  }

  // ---- multiplicative term --------------------------------------------------------------------
  TORCH_CHECK_VALUE(present(P) == present(Q), op, ": arguments 'P' and 'Q' must be given together, got ",
                    present(P) ? "P without Q" : "Q without P");
  if (present(P)) {
    s.scaled = true;
    check_factor_dim("P", *P, "N, q");
    s.q = P->size(-1);
    expect_shape(op, "P", *P, shape({s.N, s.q}), "[" + sym_lead + "N, q]",
                 s.multi ? "T=num_tasks, N=out_features, q=scale rank" : "N=out_features, q=scale rank");
    check_factor_dim("Q", *Q, "q, K");
    expect_shape(op, "Q", *Q, shape({s.q, s.K}), "[" + sym_lead + "q, K]", "q=scale rank from P, K=in_features");
  }

  // ---- epilogue -------------------------------------------------------------------------------
  check_gate(op, "gate", "gate_kind", gate, gate_kind, x, s);
  check_gate(op, "skip_gate", "skip_kind", skip_gate, skip_kind, x, s);
  TORCH_CHECK_VALUE(skip_kind == kGateNone || s.N == s.K, op,
                    ": argument 'skip_gate' needs out_features == in_features, got N=", s.N, ", K=", s.K);
  if (present(residual)) {
    check_like(op, "residual", *residual, x);
    expect_shape(op, "residual", *residual, {s.M, s.N}, "[M, N]", "x's rows, N=out_features");
  }
  return s;
}

// The backward's own arguments, after check_tarp_args: dy [M, N]; the forward's saved outputs
// pre [M, N] (or [0] when the backward does not read it), proj [M, R] (with U), scale
// [(T,) N, K] (with P); needs a mask of the NeedBit bits.
inline void check_tarp_bwd_args(const char* op, const TarpSizes& s, const Tensor& x, const Tensor& dy,
                                const Tensor& pre, const Tensor& proj, const Tensor& scale, int64_t activation,
                                int64_t gate_kind, int64_t needs) {
  TORCH_CHECK_VALUE(needs >= 0 && needs < (int64_t(1) << 10), op,
                    ": argument 'needs' must be a mask of the bits 0..9 (x, weight, bias, U, V, G, P, Q, gate, "
                    "skip_gate), got ",
                    needs);
  TORCH_CHECK_VALUE(dy.defined(), op, ": argument 'dy' must be a tensor [M, N], got None");
  check_like(op, "dy", dy, x);
  expect_shape(op, "dy", dy, {s.M, s.N}, "[M, N]", "the gradient of the output");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"pre", &pre}, {"proj", &proj},
                                {"scale", &scale}}) {
    TORCH_CHECK_VALUE(t->defined(), op, ": argument '", name, "' must be a tensor (the forward's output), got None");
    check_device(op, name, *t, x, "x");
  }
  const bool reads_pre = activation != kActNone || ((needs & kNeedGate) != 0 && gate_kind != kGateNone);
  if (reads_pre) {
    check_same_dtype(op, "pre", pre, x, "x");
    expect_shape(op, "pre", pre, {s.M, s.N}, "[M, N]",
                 "the forward's pre-activation, saved with save_pre=True when there is an activation or a gate "
                 "gradient");
  }
  if (s.delta) {
    check_same_dtype(op, "proj", proj, x, "x");
    expect_shape(op, "proj", proj, {s.M, s.R}, s.dynamic ? "[M, r + r*r]" : "[M, r]",
                 "the forward's [h; vec S] rows (h alone when bilinear), r=rank from U");
  }
  if (s.scaled) {
    check_same_dtype(op, "scale", scale, x, "x");
    std::vector<int64_t> want;
    if (s.multi) want.push_back(s.T);
    want.push_back(s.N);
    want.push_back(s.K);
    expect_shape(op, "scale", scale, want, s.multi ? "[T, N, K]" : "[N, K]",
                 "the forward's softplus(P Q + scale_offset)");
  }
}

}  // namespace checks
}  // namespace tarp_fast
