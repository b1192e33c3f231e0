// Autograd of tarp_fast::native_tarp_fwd, in C++ (registered for the Autograd dispatch key).
//
// Why C++ and not torch.library.register_autograd: at the small adaptation shapes the whole
// fwd+bwd of the op takes ~100-300 us, and the Python autograd wrapper of register_autograd
// (argument normalisation of the 22-argument schema, a Python backward) cost ~150 us per step
// when measured (benchmarks/test_bench_native.py), more than the kernels themselves. This node
// costs a few microseconds. It still composes with torch.compile: AOTAutograd runs this kernel
// under fake tensors and records the backward op, whose fake kernel is registered in Python.
//
// The backward formulas are in tarp_cpu.cpp (native_tarp_bwd); this file only decides which
// gradients are needed, saves what the backward reads, and routes dresidual = dy.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "tarp_common.h"

namespace tarp_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using FwdSig = FwdOut(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, const OptTensor&, double, double, int64_t, int64_t, int64_t, double, int64_t,
                      double, bool, bool);
using BwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using BwdSig = BwdOut(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, const Tensor&, const Tensor&, const Tensor&, double, int64_t, int64_t, int64_t,
                      double, int64_t, double, bool, int64_t);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("tarp_fast::native_tarp_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("tarp_fast::native_tarp_bwd", "").typed<BwdSig>();
  return op;
}

inline bool has(const OptTensor& t) {
  return t.has_value() && t->defined();
}

inline OptTensor opt(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// The 12 tensor arguments of the forward, in schema order.
constexpr int kNumTensorArgs = 12;
enum TensorArg { aX, aW, aBias, aU, aV, aG, aP, aQ, aTask, aGate, aSkip, aRes };

class TarpFwdFunction : public torch::autograd::Function<TarpFwdFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& U, const OptTensor& V, const OptTensor& G, const OptTensor& P,
                               const OptTensor& Q, const OptTensor& task_index, const OptTensor& gate,
                               const OptTensor& skip_gate, const OptTensor& residual, double scaling,
                               double scale_offset, int64_t num_tasks, int64_t activation, int64_t gate_kind,
                               double gate_value, int64_t skip_kind, double skip_value, bool hard_skip,
                               bool save_pre) {
    // Autograd edges exist only for defined tensors: remember each argument's edge index.
    const std::array<bool, kNumTensorArgs> present = {true,    true,     has(bias),       has(U),
                                                      has(V),  has(G),   has(P),          has(Q),
                                                      has(task_index), has(gate), has(skip_gate), has(residual)};
    std::vector<int64_t> edges(kNumTensorArgs, -1);
    int64_t edge = 0;
    for (int i = 0; i < kNumTensorArgs; ++i)
      if (present[i]) edges[i] = edge++;
    ctx->saved_data["edges"] = edges;
    FwdOut out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;  // run the CPU (or fake) kernel below autograd
      out = fwd_op().call(x, weight, bias, U, V, G, P, Q, task_index, gate, skip_gate, residual, scaling,
                          scale_offset, num_tasks, activation, gate_kind, gate_value, skip_kind, skip_value,
                          hard_skip, save_pre);
    }
    const auto& [y, pre, proj, scale] = out;
    ctx->mark_non_differentiable({pre, proj, scale});
    // The engine would otherwise allocate zero gradients for the three non-differentiable
    // outputs on every backward (3 zero-filled tensors; backward reads only dy, and handles an
    // undefined one): a measurable share of a small adaptation step.
    ctx->set_materialize_grads(false);
    auto val = [](const OptTensor& t) { return has(t) ? *t : Tensor(); };
    ctx->save_for_backward({x, weight, val(U), val(V), val(G), val(P), val(Q), val(task_index), val(gate),
                            val(skip_gate), pre, proj, scale});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["num_tasks"] = num_tasks;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["gate_kind"] = gate_kind;
    ctx->saved_data["gate_value"] = gate_value;
    ctx->saved_data["skip_kind"] = skip_kind;
    ctx->saved_data["skip_value"] = skip_value;
    ctx->saved_data["hard_skip"] = hard_skip;
    return {y, pre, proj, scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto edges = ctx->saved_data["edges"].toIntVector();
    auto needs = [&](int arg) { return edges[arg] >= 0 && ctx->needs_input_grad(static_cast<size_t>(edges[arg])); };
    const std::array<std::pair<int, int64_t>, 10> bits = {{{aX, kNeedX},
                                                           {aW, kNeedWeight},
                                                           {aBias, kNeedBias},
                                                           {aU, kNeedU},
                                                           {aV, kNeedV},
                                                           {aG, kNeedG},
                                                           {aP, kNeedP},
                                                           {aQ, kNeedQ},
                                                           {aGate, kNeedGate},
                                                           {aSkip, kNeedSkip}}};
    int64_t mask = 0;
    for (const auto& [arg, bit] : bits)
      if (needs(arg)) mask |= bit;
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& weight = saved[1];
    Tensor dy = grad_outputs[0];
    if (!dy.defined()) dy = at::zeros({x.size(0), weight.size(0)}, x.options());

    BwdOut g;
    if (mask != 0) {
      g = bwd_op().call(dy, x, weight, opt(saved[2]), opt(saved[3]), opt(saved[4]), opt(saved[5]), opt(saved[6]),
                        opt(saved[7]), opt(saved[8]), opt(saved[9]), saved[10], saved[11], saved[12],
                        ctx->saved_data["scaling"].toDouble(), ctx->saved_data["num_tasks"].toInt(),
                        ctx->saved_data["activation"].toInt(), ctx->saved_data["gate_kind"].toInt(),
                        ctx->saved_data["gate_value"].toDouble(), ctx->saved_data["skip_kind"].toInt(),
                        ctx->saved_data["skip_value"].toDouble(), ctx->saved_data["hard_skip"].toBool(), mask);
    }
    auto pick = [&](int arg, const Tensor& t) { return needs(arg) ? t : Tensor(); };
    auto& [dx, dw, db, dU, dV, dG, dP, dQ, dgate, dskip] = g;
    // One entry per forward argument (22), undefined for the non-tensor ones.
    variable_list grads(22);
    grads[aX] = pick(aX, dx);
    grads[aW] = pick(aW, dw);
    grads[aBias] = pick(aBias, db);
    grads[aU] = pick(aU, dU);
    grads[aV] = pick(aV, dV);
    grads[aG] = pick(aG, dG);
    grads[aP] = pick(aP, dP);
    grads[aQ] = pick(aQ, dQ);
    grads[aGate] = pick(aGate, dgate);
    grads[aSkip] = pick(aSkip, dskip);
    grads[aRes] = needs(aRes) ? dy : Tensor();  // d residual = dy
    return grads;
  }
};

FwdOut native_tarp_fwd_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& U,
                                const OptTensor& V, const OptTensor& G, const OptTensor& P, const OptTensor& Q,
                                const OptTensor& task_index, const OptTensor& gate, const OptTensor& skip_gate,
                                const OptTensor& residual, double scaling, double scale_offset, int64_t num_tasks,
                                int64_t activation, int64_t gate_kind, double gate_value, int64_t skip_kind,
                                double skip_value, bool hard_skip, bool save_pre) {
  auto out = TarpFwdFunction::apply(x, weight, bias, U, V, G, P, Q, task_index, gate, skip_gate, residual, scaling,
                                    scale_offset, num_tasks, activation, gate_kind, gate_value, skip_kind, skip_value,
                                    hard_skip, save_pre);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(tarp_fast, Autograd, m) {
  m.impl("native_tarp_fwd", &native_tarp_fwd_autograd);
}

}  // namespace tarp_fast
