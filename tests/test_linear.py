"""TARPLinear: drop-in behaviour, variants, initialization, wrapping, merge, compile."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from tarp_fast import TARPLinear, reference, tarp_context


def test_is_a_linear_with_same_state_dict_keys_and_layout():
    base = nn.Linear(12, 7)
    layer = TARPLinear(12, 7, rank=3)
    assert isinstance(layer, nn.Linear)
    assert layer.weight.shape == (7, 12) and layer.bias.shape == (7,)
    keys = set(layer.state_dict())
    assert set(base.state_dict()) <= keys
    assert keys - set(base.state_dict()) == {"tarp_U", "tarp_V", "tarp_G"}


@pytest.mark.parametrize("variant", ["dynamic", "bilinear", "kronecker"])
@pytest.mark.parametrize("scale_weight", [False, True])
def test_zero_delta_init_equals_base(variant, scale_weight):
    layer = TARPLinear(12, 8, rank=3, variant=variant, scale_weight=scale_weight, dtype=torch.float64)
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    expected = F.linear(x, layer.weight, layer.bias)
    out = layer(x)
    if scale_weight:  # softplus(log(e-1)) is 1 up to one rounding
        torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    else:
        assert torch.equal(out, expected)


def test_zero_delta_float32_bitwise_equal_to_linear():
    base = nn.Linear(16, 9)
    layer = TARPLinear.from_module(base, rank=4)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("variant", ["dynamic", "bilinear"])
def test_forward_matches_reference_formula(variant):
    layer = TARPLinear(10, 6, rank=2, variant=variant, scale_weight=True, scale_rank=3, scaling=0.5,
                       init="paper", dtype=torch.float64)
    assert layer.tarp_P.shape == (6, 3) and layer.tarp_Q.shape == (3, 10)
    x = torch.randn(5, 10, dtype=torch.float64)
    expected = reference.tarp_linear(
        x, layer.weight, layer.bias, layer.tarp_U, layer.tarp_V, getattr(layer, "tarp_G", None),
        layer.tarp_P, layer.tarp_Q, scaling=0.5, scale_offset=0.0,
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-13, atol=1e-13)
    assert float((layer(x) - F.linear(x, layer.weight, layer.bias)).detach().abs().max()) > 1e-6  # paper init: a real delta


def _kron_direct(layer: TARPLinear) -> torch.Tensor:
    """float64 ``W ⊙ softplus(P Q + c) + scaling Σ_i H_i ⊗ (U_i V_i)`` with torch.kron, term by term."""
    H, U, V = (t.detach().double() for t in (layer.tarp_H, layer.tarp_KU, layer.tarp_KV))
    w = layer.weight.detach().double()
    if layer.scale_weight:
        w = w * F.softplus(layer.tarp_P.detach().double() @ layer.tarp_Q.detach().double() + layer.scale_offset)
    return w + layer.scaling * sum(torch.kron(H[i], U[i] @ V[i]) for i in range(H.shape[0]))


@pytest.mark.parametrize("scale_weight", [False, True])
def test_kronecker_matches_direct_float64_computation(scale_weight):
    # N/n = 3 and K/n = 5 (odd block sizes): a wrong block layout or transposition cannot pass
    torch.manual_seed(0)
    layer = TARPLinear(20, 12, rank=2, variant="kronecker", init="paper", scaling=2.0, scale_weight=scale_weight,
                       dtype=torch.float64)
    shapes = {n: tuple(p.shape) for n, p in layer.tarp_named_parameters()}
    assert shapes["tarp_H"] == (4, 4, 4) and shapes["tarp_KU"] == (4, 3, 2) and shapes["tarp_KV"] == (4, 2, 5)
    with torch.no_grad():  # paper init (std 0.02) makes a delta near rounding: scale the factors up
        for p in (layer.tarp_H, layer.tarp_KU, layer.tarp_KV):
            p.normal_(0.0, 1.0)
    x = torch.randn(3, 7, 20, dtype=torch.float64)
    want = F.linear(x, _kron_direct(layer), layer.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    assert float((want - F.linear(x, layer.weight, layer.bias)).detach().abs().max()) > 1.0  # a real delta


@pytest.mark.parametrize("scale_weight", [False, True])
def test_kronecker_gradcheck_float64(scale_weight):
    torch.manual_seed(1)
    layer = TARPLinear(8, 12, rank=2, variant="kronecker", init="paper", scaling=0.5, scale_weight=scale_weight,
                       dtype=torch.float64)
    names = [n for n, _ in layer.tarp_named_parameters()]
    assert names == ["tarp_H", "tarp_KU", "tarp_KV"] + (["tarp_P", "tarp_Q"] if scale_weight else [])
    leaves = [torch.randn_like(p).requires_grad_(True) for _, p in layer.tarp_named_parameters()]
    x = torch.randn(3, 8, dtype=torch.float64)

    def f(*factors):
        return torch.func.functional_call(layer, dict(zip(names, factors)), (x,))

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_kronecker_zero_delta_is_the_base_and_every_factor_learns():
    torch.manual_seed(2)
    layer = TARPLinear(16, 12, rank=2, variant="kronecker", scale_weight=True, dtype=torch.float64)
    assert torch.equal(layer.tarp_KU, torch.zeros_like(layer.tarp_KU))  # the zero factor (LoRA's zero B)
    assert float(layer.tarp_H.detach().abs().min()) > 0 and float(layer.tarp_KV.detach().abs().sum()) > 0
    x = torch.randn(6, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-14, atol=1e-14)
    opt = torch.optim.SGD([p for _, p in layer.tarp_named_parameters()], lr=0.1)
    grads = []
    for _ in range(2):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        grads.append({n: float(p.grad.abs().sum()) for n, p in layer.tarp_named_parameters()})
        opt.step()
    assert grads[0]["tarp_KU"] > 0 and grads[0]["tarp_P"] > 0  # the zero factors learn at once
    assert grads[0]["tarp_H"] == 0 and grads[0]["tarp_KV"] == 0  # U_i = 0 hides them at the first step ...
    assert all(g > 0 for g in grads[1].values()), grads[1]  # ... and from the second step on all learn


def test_kronecker_parameter_count():
    for (k, n, r, sw) in [(20, 12, 2, False), (20, 12, 3, True), (64, 16, 1, False)]:
        layer = TARPLinear(k, n, rank=r, variant="kronecker", scale_weight=sw)
        got = sum(p.numel() for _, p in layer.tarp_named_parameters())
        assert got == 4**3 + r * (n + k) + (r * (n + k) if sw else 0), (k, n, r, sw)


@pytest.mark.parametrize("in_f,out_f,arg", [(10, 12, "in_features=10"), (12, 6, "out_features=6"),
                                            (3, 8, "in_features=3")])
def test_kronecker_sizes_must_be_multiples_of_n(in_f, out_f, arg):
    with pytest.raises(ValueError, match=rf"variant='kronecker' needs argument '{arg.split('=')[0]}' to be a multiple "
                                         rf"of n=4 .* got {arg}"):
        TARPLinear(in_f, out_f, variant="kronecker")
    with pytest.raises(ValueError, match=rf"patch_model: module 'lin': .*got {arg}"):
        from tarp_fast import patch_model

        patch_model(nn.Sequential(OrderedDict(lin=nn.Linear(in_f, out_f))), targets=["lin"], variant="kronecker")


def test_old_kronecker_state_dict_is_refused():
    layer = TARPLinear(8, 8, rank=2, variant="kronecker")
    old = {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone(),
           "tarp_A": torch.zeros(2, 2, 2), "tarp_B": torch.zeros(2, 4, 4)}
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    for strict in (True, False):
        with pytest.raises(ValueError, match="tarp_A, tarp_B: factors of the former kronecker form .* tarp_H"):
            layer.load_state_dict(old, strict=strict)
    assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters())


def test_gradients_reach_every_factor_from_zero_delta():
    layer = TARPLinear(8, 8, rank=2, scale_weight=True)
    layer(torch.randn(6, 8)).pow(2).sum().backward()
    assert float(layer.tarp_U.grad.abs().sum()) > 0  # U=0, but its gradient is not
    assert float(layer.tarp_P.grad.abs().sum()) > 0
    # V, G and Q get gradient once U and P move off zero
    with torch.no_grad():
        layer.tarp_U.add_(0.1)
        layer.tarp_P.add_(0.1)
    layer.zero_grad()
    layer(torch.randn(6, 8)).pow(2).sum().backward()
    for p in (layer.tarp_V, layer.tarp_G, layer.tarp_Q):
        assert float(p.grad.abs().sum()) > 0


def test_from_linear_shares_parameters():
    base = nn.Linear(8, 5)
    layer = TARPLinear.from_module(base, rank=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.tarp_U.device == base.weight.device


def test_from_conv1d_shares_storage_and_keeps_checkpoint_layout():
    conv = Conv1D(7, 5)  # nf=7 out, nx=5 in, weight [5, 7]
    layer = TARPLinear.from_module(conv, rank=2)
    assert layer.in_features == 5 and layer.out_features == 7
    # the Conv1D's own contiguous parameter, read through a transposed view at call time (FSDP2)
    assert layer.weight is conv.weight and layer.weight.is_contiguous()
    assert layer.linear_weight.shape == (7, 5)
    assert layer.linear_weight.data_ptr() == conv.weight.data_ptr()  # no copy
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-6, atol=1e-6)
    sd = layer.state_dict()
    assert sd["weight"].shape == (5, 7) and torch.equal(sd["weight"], conv.weight)
    # Loading a Conv1D-layout checkpoint works too.
    new = torch.randn(5, 7)
    layer.load_state_dict({**sd, "weight": new})
    assert torch.equal(conv.weight, new)


def test_from_module_rejects_other_modules():
    with pytest.raises(TypeError, match="'module' must be an nn.Linear or a transformers Conv1D, got Conv2d"):
        TARPLinear.from_module(nn.Conv2d(2, 2, 1))


@pytest.mark.parametrize("variant", ["bilinear", "kronecker"])
def test_merge_unmerge_bitwise(variant):
    torch.manual_seed(3)
    in_f, out_f = (9, 6) if variant == "bilinear" else (20, 12)  # kronecker: multiples of n = 4
    layer = TARPLinear(in_f, out_f, rank=3, variant=variant, scale_weight=True, init="paper")
    if variant == "kronecker":
        with torch.no_grad():
            for p in (layer.tarp_H, layer.tarp_KU, layer.tarp_KV):
                p.normal_(0.0, 0.5)  # a delta well above float32 rounding
    x = torch.randn(4, in_f)
    before_w = layer.weight.detach().clone()
    want_w = _kron_direct(layer) if variant == "kronecker" else None
    y = layer(x)
    layer.merge()
    assert layer.merged
    if want_w is not None:  # the merged weight is W ⊙ scale + Σ_i H_i ⊗ (U_i V_i), computed independently
        torch.testing.assert_close(layer.weight.double(), want_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(F.linear(x, layer.weight, layer.bias), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, before_w)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_dynamic_is_a_clear_error():
    with pytest.raises(RuntimeError, match="variant='dynamic' cannot be merged"):
        TARPLinear(4, 4, rank=2).merge()


def test_extra_repr():
    text = repr(TARPLinear(4, 3, rank=2, scale_weight=True, num_tasks=2, scaling=0.5))
    for part in ("in_features=4", "out_features=3", "rank=2", "variant='dynamic'", "scale_weight=True",
                 "num_tasks=2", "scaling=0.5"):
        assert part in text


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(rank=0), "'rank' must be a positive int"),
        (dict(variant="lora"), "'variant' must be one of"),
        (dict(init="xavier"), "'init' must be one of"),
        (dict(num_tasks=0), "'num_tasks' must be a positive int"),
        (dict(scaling=float("inf")), "'scaling' must be a finite float"),
        (dict(variant="kronecker", num_tasks=2), "kronecker' supports num_tasks=1"),
        (dict(scale_rank=-1), "'scale_rank' must be a positive int"),
    ],
)
def test_constructor_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TARPLinear(4, 4, **kw)


def test_multi_task_factors_and_routing():
    layer = TARPLinear(6, 4, rank=2, num_tasks=3, scale_weight=True, init="paper", dtype=torch.float64)
    assert layer.tarp_U.shape == (3, 4, 2) and layer.tarp_G.shape == (3, 4, 6) and layer.tarp_P.shape == (3, 4, 2)
    # every task starts from the same factors
    assert torch.equal(layer.tarp_U[0], layer.tarp_U[2])
    with torch.no_grad():
        layer.tarp_U[1].mul_(3.0)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    per_seq = torch.tensor([1, 0])
    y = layer(x, task_index=per_seq)
    rows = per_seq.repeat_interleave(5)
    torch.testing.assert_close(y, layer(x, task_index=rows))
    with tarp_context(task_index=per_seq):
        torch.testing.assert_close(layer(x), y)
    for b in range(2):
        t = int(per_seq[b])
        alone = reference.tarp_linear(
            x[b], layer.weight, layer.bias, layer.tarp_U[t], layer.tarp_V[t], layer.tarp_G[t],
            layer.tarp_P[t], layer.tarp_Q[t], scale_offset=0.0,
        )
        torch.testing.assert_close(y[b], alone)
    with pytest.raises(ValueError, match="'task_index' is required"):
        layer(x)
    with pytest.raises(ValueError, match="'task_index' must be"):
        layer(x, task_index=torch.tensor([0, 1, 2]))


def test_context_gates_with_hard_skip():
    layer = TARPLinear(6, 6, rank=2, init="paper")
    x = torch.randn(4, 6)
    gate = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with tarp_context(gates={layer: gate}, hard_skip=True):
        y = layer(x)
    assert torch.equal(y[1], torch.zeros(6)) and torch.equal(y[3], torch.zeros(6))
    torch.testing.assert_close(y[0], layer(x)[0])


def test_torch_compile_fullgraph_no_graph_break():
    layer = TARPLinear(16, 16, rank=4, scale_weight=True, init="paper")
    x = torch.randn(8, 16, requires_grad=True)
    expected = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert layer.tarp_G.grad is not None and x.grad is not None


def test_layer_counts_as_linear_for_isinstance_and_dtype_moves():
    layer = TARPLinear(4, 4, rank=2)
    layer = layer.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert math.isclose(layer.scale_offset, math.log(math.e - 1))


def test_torch_compile_fullgraph_of_a_patched_gpt2_layer():
    """A layer produced by patch_model (wrapping a transformers Conv1D) compiles without a break."""
    from models import tiny_model

    from tarp_fast import patch_model

    model = patch_model(tiny_model("gpt2"), rank=4, scale_weight=True, init="paper")
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, TARPLinear)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    expected = layer(x)
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert layer.tarp_U.grad is not None and layer.weight.grad is not None


# ---- the Kronecker layer with stacked per-task factors (batched preparation) ----------------------
def _kronecker_rows_reference(layer, fast, x, rows, gate, skip_gate, residual):
    """Each row alone, with the dense weight of its own task (the formula, not the layer)."""
    M, K = rows.numel(), x.shape[-1]
    xf, out = x.reshape(M, K), []
    for m in range(M):
        t = int(rows[m])
        H, U, V = fast["tarp_H"][t], fast["tarp_KU"][t], fast["tarp_KV"][t]
        w = layer.weight
        if layer.scale_weight:
            w = w * F.softplus(fast["tarp_P"][t] @ fast["tarp_Q"][t] + layer.scale_offset)
        w = w + layer.scaling * sum(torch.kron(H[i], U[i] @ V[i]) for i in range(4))
        y = F.linear(xf[m], w, layer.bias)
        if gate is not None:
            y = y * (gate[t] if gate.shape[0] != M else gate[m])
        if skip_gate is not None:
            y = y + skip_gate[m] * xf[m]
        out.append(y + residual.reshape(M, -1)[m])
    return torch.stack(out).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("gates", ["none", "per_task", "per_row"])
def test_kronecker_per_task_rows_use_their_own_task_once(gates, monkeypatch):
    """Before: every task's weight ran on every row (T x the work), then one row per task was kept."""
    from torch.func import functional_call

    from tarp_fast import ops
    from tarp_fast.meta.prepare import stacked_tasks

    torch.manual_seed(11)
    T, B, S = 4, 6, 5
    layer = TARPLinear(12, 12, rank=2, variant="kronecker", scale_weight=True, scaling=0.7, dtype=torch.float64)
    fast = {n: torch.randn(T, *p.shape, dtype=torch.float64, requires_grad=True)
            for n, p in layer.tarp_named_parameters()}
    per_seq = torch.tensor([2, 0, 2, 1, 0, 2])  # interleaved, and task 3 has no rows
    rows = per_seq.repeat_interleave(S)
    M = rows.numel()
    x = torch.randn(B, S, 12, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(B, S, 12, dtype=torch.float64, requires_grad=True)
    gate = {"none": None, "per_task": torch.rand(T, dtype=torch.float64) + 0.5,
            "per_row": torch.rand(M, dtype=torch.float64) + 0.5}[gates]
    skip_gate = torch.rand(M, dtype=torch.float64, requires_grad=True) if gates == "per_row" else None
    if gate is not None:
        gate.requires_grad_(True)
    computed = []
    real = ops.tarp_linear

    def counting(inp, *args, **kwargs):
        computed.append(math.prod(inp.shape[:-1]))
        return real(inp, *args, **kwargs)

    monkeypatch.setattr(ops, "tarp_linear", counting)
    with stacked_tasks(layer, T):
        y = functional_call(layer, fast, (x,),
                            {"task_index": per_seq, "gate": gate, "skip_gate": skip_gate, "residual": residual})
    assert sum(computed) == M and len(computed) == 3  # each row once, one call per task that has rows
    want = _kronecker_rows_reference(layer, fast, x, rows, gate, skip_gate, residual)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    inputs = [x, residual, *fast.values()] + [t for t in (gate, skip_gate) if t is not None]
    cot = torch.randn_like(y)
    got = torch.autograd.grad((y * cot).sum(), inputs)
    ref = torch.autograd.grad((want * cot).sum(), inputs)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    for n, g in zip(fast, got[2:]):
        assert float(g[3].abs().max()) == 0 and float(g[:3].abs().max()) > 0, n  # task 3 had no rows
    # every row on one task: a single call on the whole input, equal to the single-task layer
    computed.clear()
    with stacked_tasks(layer, T):
        y1 = functional_call(layer, fast, (x,), {"task_index": torch.full((B,), 1)})
    assert computed == [M]
    alone = functional_call(layer, {n: v[1] for n, v in fast.items()}, (x,))
    torch.testing.assert_close(y1, alone, rtol=0, atol=0)


def test_kronecker_per_task_bad_arguments_name_the_whole_input():
    from torch.func import functional_call

    from tarp_fast.meta.prepare import stacked_tasks

    layer = TARPLinear(8, 8, rank=2, variant="kronecker", dtype=torch.float64)
    fast = {n: torch.randn(2, *p.shape, dtype=torch.float64) for n, p in layer.tarp_named_parameters()}
    x, ti = torch.randn(4, 3, 8, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    with stacked_tasks(layer, 2):
        with pytest.raises(ValueError, match=r"'residual' must have shape \[4, 3, 8\] \(x's rows \[4, 3\]"):
            functional_call(layer, fast, (x,), {"task_index": ti, "residual": torch.zeros(4, 8, dtype=torch.float64)})
        with pytest.raises(ValueError, match=r"'gate' must be a scalar or \[M\]=\[12\]"):
            functional_call(layer, fast, (x,), {"task_index": ti, "gate": torch.ones(5, dtype=torch.float64)})
        with pytest.raises(ValueError, match=r"'x' must have last dimension K=8 .* got \[4, 3, 6\]"):
            functional_call(layer, fast, (x[..., :6],), {"task_index": ti})


# ---- shared with the PEFT layer; merging without keeping the base ---------------------------------
@pytest.mark.parametrize("variant", ["dynamic", "bilinear", "kronecker"])
def test_factor_shapes_helper_is_the_layers(variant):
    from tarp_fast.nn.linear import tarp_factor_shapes

    for T in (1, 3) if variant != "kronecker" else (1,):
        layer = TARPLinear(12, 8, rank=3, variant=variant, scale_weight=True, scale_rank=2, num_tasks=T)
        got = tarp_factor_shapes(12, 8, 3, variant, True, 2, T)
        assert list(got.items()) == [(n, tuple(p.shape)) for n, p in layer.tarp_named_parameters()]


def test_static_effective_weight_refuses_dynamic():
    from tarp_fast.nn.linear import static_effective_weight

    with pytest.raises(ValueError, match="'variant' must be 'bilinear' or 'kronecker'"):
        static_effective_weight(torch.zeros(2, 2), {}, variant="dynamic", scaling=1.0, scale_offset=0.0,
                                scale_weight=False)


@pytest.mark.parametrize("variant", ["bilinear", "kronecker"])
def test_merge_without_keeping_the_original(variant):
    import copy

    torch.manual_seed(4)
    layers = [TARPLinear(8, 12, rank=2, variant=variant, scale_weight=True, init="paper") for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    layers[0].merge()
    layers[1].merge(keep_original=False)
    assert torch.equal(layers[0].weight, layers[1].weight)  # the same merged weight, bitwise
    assert layers[1].merged and not isinstance(layers[1]._merged_from, torch.Tensor)  # no copy of the base
    x = torch.randn(3, 8)
    assert torch.equal(layers[1](x), layers[0](x))
    for layer in (layers[1], copy.deepcopy(layers[1])):
        assert layer.merged
        with pytest.raises(RuntimeError, match="keep_original=False"):
            layer.unmerge()
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge()
