"""The registered native ops check their own arguments (issue 18).

``torch.ops.tarp_fast.native_tarp_fwd`` / ``native_tarp_bwd`` can be called directly, past the
Python validator (``tarp_fast/_contract.py``), so the C++ ops validate every argument before a
pointer is read (``csrc/tarp_checks.h``): each wrong input below raises, and the message names the
op and the argument. The exception types mirror the Python validator's: ``ValueError`` for shapes
and values, ``TypeError`` for dtypes, ``RuntimeError`` for devices. Valid calls, also with
non-contiguous arguments, still match the float64 reference.

Skipped when the extension is not built.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import native_or_skip

from tarp_fast import reference

pytestmark = pytest.mark.native

_native = native_or_skip()

ACT = _native.ACTIVATION_CODES
GK = _native.GATE_CODES
NEED_ALL = (1 << 10) - 1
FWD_NAMES = ("x", "weight", "bias", "U", "V", "G", "P", "Q", "task_index", "gate", "skip_gate", "residual",
             "scaling", "scale_offset", "num_tasks", "activation", "gate_kind", "gate_value", "skip_kind",
             "skip_value", "hard_skip", "save_pre")
BWD_NAMES = ("dy", "x", "weight", "U", "V", "G", "P", "Q", "task_index", "gate", "skip_gate", "pre", "proj",
             "scale", "scaling", "num_tasks", "activation", "gate_kind", "gate_value", "skip_kind", "skip_value",
             "hard_skip", "needs")
F64 = torch.float64


def _fwd_op():
    return torch.ops.tarp_fast.native_tarp_fwd.default


def _bwd_op():
    return torch.ops.tarp_fast.native_tarp_bwd.default


def _randn(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _fwd_args(seed=0, *, M=6, K=5, N=5, r=2, q=2, T=3, dynamic=True, scale=True, gate="row", skip="task",
              residual=True, activation="relu"):
    """Valid keyword arguments of native_tarp_fwd (T > 1: stacked factors and task_index)."""
    gen = torch.Generator().manual_seed(seed)
    lead = (T,) if T > 1 else ()
    a = dict(x=_randn(gen, M, K), weight=_randn(gen, N, K) / math.sqrt(K), bias=_randn(gen, N),
             U=_randn(gen, *lead, N, r) / math.sqrt(r), V=_randn(gen, *lead, r, K) / math.sqrt(K),
             G=_randn(gen, *lead, r * r, K) / math.sqrt(K) if dynamic else None,
             P=_randn(gen, *lead, N, q) * 0.5 if scale else None,
             Q=_randn(gen, *lead, q, K) * 0.5 if scale else None,
             task_index=torch.randint(0, T, (M,), generator=gen) if T > 1 else None)
    for name, kind in (("gate", gate), ("skip_gate", skip)):
        if kind is None:
            a[name] = None
        elif kind == "scalar":
            a[name] = torch.tensor(0.8, dtype=F64)
        else:
            a[name] = torch.rand(M if kind == "row" else T, generator=gen, dtype=F64) + 0.1
    a["residual"] = _randn(gen, M, N) if residual else None
    a.update(scaling=0.7, scale_offset=0.5, num_tasks=T, activation=ACT[activation],
             gate_kind=GK[gate or "none"], gate_value=1.0, skip_kind=GK[skip or "none"], skip_value=1.0,
             hard_skip=False, save_pre=True)
    return a


def _bwd_args(fa, seed=1, needs=NEED_ALL):
    """Valid keyword arguments of native_tarp_bwd, from the forward's arguments and outputs."""
    out, pre, proj, scale = _fwd_op()(*(fa[n] for n in FWD_NAMES))
    gen = torch.Generator().manual_seed(seed)
    b = {n: fa[n] for n in BWD_NAMES if n in fa}
    b.update(dy=_randn(gen, *out.shape), pre=pre, proj=proj, scale=scale, needs=needs)
    return b


def _call(op, names, args):
    return op(*(args[n] for n in names))


# ---- every wrong input raises, naming the argument -----------------------------------------------
# Each case: (op, override of the valid arguments, exception type, words the message must contain).
# An override is a dict of replacements, or a function of the valid argument dict returning one.


def _big_n_bias(a):
    # finding 1: a [1] bias with N = 65536 read 65535 values past its buffer
    gen = torch.Generator().manual_seed(7)
    return dict(weight=_randn(gen, 65536, a["x"].shape[1]), bias=torch.zeros(1, dtype=F64), U=None, V=None, G=None,
                P=None, Q=None, task_index=None, gate=None, skip_gate=None, residual=None, num_tasks=1,
                gate_kind=GK["none"], skip_kind=GK["none"])


def _skip_needs_square(a):
    gen = torch.Generator().manual_seed(8)
    return dict(weight=_randn(gen, 4, 5), bias=None, U=None, V=None, G=None, P=None, Q=None, task_index=None,
                gate=None, residual=None, num_tasks=1, gate_kind=GK["none"],
                skip_gate=torch.ones(6, dtype=F64), skip_kind=GK["row"])


def _shape(a, name, *shape, dtype=F64):
    return {name: torch.zeros(*shape, dtype=dtype)}


FWD_CASES = {
    # the three findings of the issue
    "bias_1_with_N_65536": (_big_n_bias, ValueError, ["'bias'", "[N]=[65536]", "got [1]"]),
    "task_index_short": (lambda a: dict(task_index=torch.zeros(4, dtype=torch.int64)), ValueError,
                         ["'task_index'", "[M]=[6]", "got [4]"]),
    "V_with_r_plus_1_rows": (lambda a: _shape(a, "V", 3, 3, 5), ValueError, ["'V'", "[T, r, K]=[3, 2, 5]",
                                                                          "got [3, 3, 5]"]),
    # dtypes
    "weight_dtype": (lambda a: dict(weight=a["weight"].float()), TypeError, ["'weight'", "dtype of x", "Float"]),
    "bias_dtype": (lambda a: dict(bias=a["bias"].float()), TypeError, ["'bias'", "dtype of x"]),
    "G_dtype": (lambda a: dict(G=a["G"].float()), TypeError, ["'G'", "dtype of x"]),
    "gate_dtype": (lambda a: dict(gate=a["gate"].float()), TypeError, ["'gate'", "dtype of x"]),
    "residual_dtype": (lambda a: dict(residual=a["residual"].float()), TypeError, ["'residual'", "dtype of x"]),
    "x_int": (lambda a: dict(x=torch.ones(6, 5, dtype=torch.int64)), TypeError, ["'x'", "floating", "Long"]),
    "x_half_on_cpu": (lambda a: {k: (v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                                 for k, v in a.items()}, TypeError, ["'x'", "float32 or float64", "Half"]),
    "task_index_int32": (lambda a: dict(task_index=a["task_index"].int()), TypeError, ["'task_index'", "int64",
                                                                                     "Int"]),
    # shapes of x and weight
    "x_3d": (lambda a: dict(x=a["x"].reshape(2, 3, 5)), ValueError, ["'x'", "2-D [M, K]", "[2, 3, 5]"]),
    "weight_wrong_K": (lambda a: _shape(a, "weight", 5, 4), ValueError, ["'weight'", "K=5", "[5, 4]"]),
    "weight_1d": (lambda a: _shape(a, "weight", 5), ValueError, ["'weight'", "2-D [N, K]", "[5]"]),
    # factors and T
    "T_mismatch_V": (lambda a: _shape(a, "V", 2, 2, 5), ValueError, ["'V'", "[T, r, K]=[3, 2, 5]", "[2, 2, 5]"]),
    "T_mismatch_num_tasks": (lambda a: dict(num_tasks=2), ValueError, ["'U'", "[T, N, r]=[2, 5, 2]", "[3, 5, 2]"]),
    "T_mismatch_Q": (lambda a: _shape(a, "Q", 4, 2, 5), ValueError, ["'Q'", "[T, q, K]=[3, 2, 5]", "[4, 2, 5]"]),
    "num_tasks_0": (lambda a: dict(num_tasks=0), ValueError, ["'num_tasks'", "at least 1", "got 0"]),
    "U_wrong_N": (lambda a: _shape(a, "U", 3, 4, 2), ValueError, ["'U'", "[T, N, r]=[3, 5, 2]", "[3, 4, 2]"]),
    "U_2d_with_task_index": (lambda a: _shape(a, "U", 5, 2), ValueError, ["'U'", "3-D [T, N, r]", "[5, 2]"]),
    "U_3d_without_task_index": (lambda a: dict(task_index=None, num_tasks=1, skip_kind=GK["row"],
                                               skip_gate=torch.ones(6, dtype=F64)),
                                ValueError, ["'U'", "2-D [N, r]", "[3, 5, 2]"]),
    "G_wrong_rows": (lambda a: _shape(a, "G", 3, 3, 5), ValueError, ["'G'", "[T, r*r, K]=[3, 4, 5]", "[3, 3, 5]"]),
    "G_wrong_K": (lambda a: _shape(a, "G", 3, 4, 6), ValueError, ["'G'", "[3, 4, 5]", "[3, 4, 6]"]),
    "G_alone": (lambda a: dict(U=None, V=None), ValueError, ["'G'", "G alone"]),
    "U_without_V": (lambda a: dict(V=None, G=None), ValueError, ["'U'", "'V'", "U without V"]),
    "P_without_Q": (lambda a: dict(Q=None), ValueError, ["'P'", "'Q'", "P without Q"]),
    "P_wrong_N": (lambda a: _shape(a, "P", 3, 6, 2), ValueError, ["'P'", "[T, N, q]=[3, 5, 2]", "[3, 6, 2]"]),
    # epilogue
    "residual_shape": (lambda a: _shape(a, "residual", 6, 4), ValueError, ["'residual'", "[M, N]=[6, 5]", "[6, 4]"]),
    "gate_row_length": (lambda a: _shape(a, "gate", 7), ValueError, ["'gate'", "[M]=[6]", "got [7]"]),
    "skip_gate_task_length": (lambda a: _shape(a, "skip_gate", 4), ValueError, ["'skip_gate'", "[T]=[3]", "[4]"]),
    "gate_scalar_two_elements": (lambda a: dict(gate=torch.ones(2, dtype=F64), gate_kind=GK["scalar"]), ValueError,
                                 ["'gate'", "one element", "[2]"]),
    "gate_kind_invalid": (lambda a: dict(gate_kind=5), ValueError, ["'gate_kind'", "got 5"]),
    "skip_kind_negative": (lambda a: dict(skip_kind=-1), ValueError, ["'skip_kind'", "got -1"]),
    "gate_tensor_with_kind_none": (lambda a: dict(gate_kind=GK["none"]), ValueError, ["'gate'", "none"]),
    "gate_kind_row_without_tensor": (lambda a: dict(gate=None), ValueError, ["'gate'", "None", "[M]"]),
    "skip_gate_task_without_task_index": (lambda a: dict(U=a["U"][0], V=a["V"][0], G=a["G"][0], P=a["P"][0],
                                                         Q=a["Q"][0], task_index=None, num_tasks=1),
                                          ValueError, ["'skip_gate'", "kind task", "needs task_index"]),
    "skip_gate_needs_N_eq_K": (_skip_needs_square, ValueError, ["'skip_gate'", "N=4", "K=5"]),
    "activation_code": (lambda a: dict(activation=7), ValueError, ["'activation'", "gelu_tanh", "got 7"]),
    # values
    "task_id_out_of_range": (lambda a: dict(task_index=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError,
                             ["'task_index'", "[0, 3)", "got 3"]),
    "task_id_negative": (lambda a: dict(task_index=torch.tensor([0, 1, -1, 2, 0, 1])), ValueError,
                         ["'task_index'", "[0, 3)", "got -1"]),
}

BWD_CASES = {
    # the backward shares the forward's checks
    "task_index_short": (lambda a: dict(task_index=torch.zeros(4, dtype=torch.int64)), ValueError,
                         ["'task_index'", "[M]=[6]", "[4]"]),
    "V_with_r_plus_1_rows": (lambda a: _shape(a, "V", 3, 3, 5), ValueError, ["'V'", "[T, r, K]=[3, 2, 5]"]),
    "U_dtype": (lambda a: dict(U=a["U"].float()), TypeError, ["'U'", "dtype of x"]),
    "gate_row_length": (lambda a: _shape(a, "gate", 5), ValueError, ["'gate'", "[M]=[6]", "[5]"]),
    "task_id_out_of_range": (lambda a: dict(task_index=torch.tensor([0, 1, 2, 5, 0, 1])), ValueError,
                             ["'task_index'", "[0, 3)", "got 5"]),
    # and checks its own arguments
    "dy_shape": (lambda a: _shape(a, "dy", 6, 4), ValueError, ["'dy'", "[M, N]=[6, 5]", "[6, 4]"]),
    "dy_dtype": (lambda a: dict(dy=a["dy"].float()), TypeError, ["'dy'", "dtype of x"]),
    "pre_missing_with_relu": (lambda a: dict(pre=torch.empty(0, dtype=F64)), ValueError,
                              ["'pre'", "[M, N]=[6, 5]", "save_pre=True", "got [0]"]),
    "pre_wrong_shape": (lambda a: _shape(a, "pre", 5, 5), ValueError, ["'pre'", "[M, N]=[6, 5]", "[5, 5]"]),
    "proj_short_rows": (lambda a: _shape(a, "proj", 5, 6), ValueError, ["'proj'", "[M, r + r*r]=[6, 6]", "[5, 6]"]),
    "proj_bilinear_width": (lambda a: dict(G=None), ValueError, ["'proj'", "[M, r]=[6, 2]", "[6, 6]"]),
    "scale_shape": (lambda a: _shape(a, "scale", 5, 5), ValueError, ["'scale'", "[T, N, K]=[3, 5, 5]", "[5, 5]"]),
    "needs_mask": (lambda a: dict(needs=1 << 10), ValueError, ["'needs'", "bits 0..9", "1024"]),
}


def _expect(call, exc, words, op_name):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert f"tarp_fast::{op_name}" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("case", list(FWD_CASES))
def test_fwd_rejects_wrong_input(case):
    over, exc, words = FWD_CASES[case]
    a = _fwd_args()
    a.update(over(a))
    _expect(lambda: _call(_fwd_op(), FWD_NAMES, a), exc, words, "native_tarp_fwd")
    # The autograd kernel (inputs that require grad) runs the same checks.
    leaves = {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in a.items()}
    _expect(lambda: _call(_fwd_op(), FWD_NAMES, leaves), exc, words, "native_tarp_fwd")


@pytest.mark.parametrize("case", list(BWD_CASES))
def test_bwd_rejects_wrong_input(case):
    over, exc, words = BWD_CASES[case]
    b = _bwd_args(_fwd_args())
    b.update(over(b))
    _expect(lambda: _call(_bwd_op(), BWD_NAMES, b), exc, words, "native_tarp_bwd")


def _cpu_kernel(op, names, args):
    """The CPU kernel itself (a tensor on another device would otherwise route the call elsewhere)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return op.redispatch(keys, *(args[n] for n in names))


@pytest.mark.parametrize("name", ["weight", "bias", "V", "task_index", "gate", "residual"])
def test_fwd_rejects_another_device(name):
    a = _fwd_args()
    a[name] = a[name].to("meta")
    _expect(lambda: _cpu_kernel(_fwd_op(), FWD_NAMES, a), RuntimeError,
            [f"'{name}'", "same device as x (cpu)", "meta"], "native_tarp_fwd")


@pytest.mark.parametrize("name", ["dy", "pre", "proj", "scale", "Q"])
def test_bwd_rejects_another_device(name):
    b = _bwd_args(_fwd_args())
    b[name] = b[name].to("meta")
    _expect(lambda: _cpu_kernel(_bwd_op(), BWD_NAMES, b), RuntimeError,
            [f"'{name}'", "same device as x (cpu)", "meta"], "native_tarp_bwd")


def test_pre_may_be_empty_when_the_backward_does_not_read_it():
    """No activation and no gate gradient: pre is not read, [0] is accepted (save_pre=False)."""
    fa = _fwd_args(activation="none", gate="row")
    fa["save_pre"] = False
    b = _bwd_args(fa, needs=NEED_ALL & ~(1 << 8))  # every gradient but the gate's
    assert b["pre"].numel() == 0
    grads = _call(_bwd_op(), BWD_NAMES, b)
    assert grads[0].shape == fa["x"].shape and grads[8].numel() == 0
    b["needs"] = NEED_ALL
    _expect(lambda: _call(_bwd_op(), BWD_NAMES, b), ValueError, ["'pre'", "got [0]"], "native_tarp_bwd")


# ---- valid calls still match the reference -------------------------------------------------------

def _reference(a):
    """The reference's tarp_linear for the op's arguments."""
    kw = dict(scaling=a["scaling"], scale_offset=a["scale_offset"], task_index=a["task_index"],
              gate=a["gate"] if a["gate_kind"] != GK["none"] else None,
              skip_gate=a["skip_gate"] if a["skip_kind"] != GK["none"] else None, residual=a["residual"],
              activation={v: k for k, v in ACT.items()}[a["activation"]], hard_skip=a["hard_skip"])
    return reference.tarp_linear(a["x"], a["weight"], a["bias"], a["U"], a["V"], a["G"], a["P"], a["Q"], **kw)


def _noncontiguous(t):
    """The same values in a non-contiguous layout (a strided view of a larger buffer)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    view = big[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() <= 1
    return view


CONFIGS = {
    "tasks-all": dict(T=3, gate="row", skip="task", activation="relu"),
    "tasks-task-gate-gelu": dict(T=3, gate="task", skip="row", activation="gelu_tanh"),
    "single-dynamic": dict(T=1, gate="scalar", skip="row", activation="gelu_tanh"),
    "single-bilinear": dict(T=1, dynamic=False, scale=False, gate=None, skip=None, residual=False,
                            activation="none"),
}


@pytest.mark.parametrize("noncontig", [False, True], ids=["contiguous", "non-contiguous"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_valid_calls_match_the_reference(cfg, noncontig):
    a = _fwd_args(seed=3, **CONFIGS[cfg])
    # Gradients of the reference for every float tensor input.
    names = [n for n in ("x", "weight", "bias", "U", "V", "G", "P", "Q", "gate", "skip_gate", "residual")
             if isinstance(a[n], torch.Tensor)]
    leaves = {n: a[n].detach().clone().requires_grad_(True) for n in names}
    ref_out = _reference({**a, **leaves})
    dy = _randn(torch.Generator().manual_seed(11), *ref_out.shape)
    ref_grads = dict(zip(names, torch.autograd.grad(ref_out, [leaves[n] for n in names], dy)))

    if noncontig:
        a = {k: _noncontiguous(v) if k in names or k == "task_index" else v for k, v in a.items()}
    out, pre, proj, scale = _call(_fwd_op(), FWD_NAMES, a)
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-12, atol=1e-12)

    b = {n: a[n] for n in BWD_NAMES if n in a}
    b.update(dy=_noncontiguous(dy) if noncontig else dy, pre=pre, proj=proj, scale=scale, needs=NEED_ALL)
    grads = dict(zip(("x", "weight", "bias", "U", "V", "G", "P", "Q", "gate", "skip_gate"),
                     _call(_bwd_op(), BWD_NAMES, b)))
    for n in names:
        if n == "residual":
            continue  # d residual = dy, not computed by the op
        torch.testing.assert_close(grads[n].reshape(ref_grads[n].shape), ref_grads[n], rtol=1e-10, atol=1e-12,
                                   msg=lambda m, n=n: f"{cfg}: grad {n}: {m}")


# ---- the CUDA helpers (CUDA builds with a GPU only) ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not hasattr(torch.ops.tarp_fast, "compact_rows"),
                    reason="needs a CUDA build of tarp_fast._C and a GPU")
def test_cuda_helpers_check_dtypes_and_devices():
    ops, dev = torch.ops.tarp_fast, "cuda"
    with pytest.raises(TypeError, match="compact_rows: argument 'gate' must be a floating tensor"):
        ops.compact_rows(torch.ones(4, dtype=torch.int32, device=dev))
    with pytest.raises(TypeError, match="group_by_task: argument 'gate' must be a floating tensor"):
        ops.group_by_task(torch.zeros(4, dtype=torch.int64, device=dev), 2, torch.ones(4, dtype=torch.int32,
                                                                                        device=dev))
    with pytest.raises(TypeError, match="segmented_sum: argument 'values' must be a floating tensor"):
        ops.segmented_sum(torch.ones(4, 2, dtype=torch.int64, device=dev), None,
                          torch.zeros(2, dtype=torch.int64, device=dev))
    with pytest.raises(TypeError, match="segmented_sum: argument 'perm' must be int64"):
        ops.segmented_sum(torch.ones(4, 2, device=dev), torch.zeros(4, dtype=torch.int32, device=dev),
                          torch.zeros(2, dtype=torch.int64, device=dev))
    with pytest.raises(ValueError, match="segmented_sum: argument 'perm' must be \\[M\\]"):
        ops.segmented_sum(torch.ones(4, 2, device=dev), torch.zeros(3, dtype=torch.int64, device=dev),
                          torch.zeros(2, dtype=torch.int64, device=dev))
    with pytest.raises(RuntimeError, match="segmented_sum: argument 'offsets' must be a CUDA tensor"):
        ops.segmented_sum(torch.ones(4, 2, device=dev), None, torch.zeros(2, dtype=torch.int64))
