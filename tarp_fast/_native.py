"""The ``native`` backend: ``tarp_linear`` on CPU through the compiled ops of ``tarp_fast._C``.

Imported lazily by :mod:`tarp_fast.ops` (``backend="native"`` or ``"auto"`` on CPU). Importing
this module never fails for a missing extension: :func:`unavailable_reason` says why it cannot
run, and the fake kernels are registered only once the ops exist. The autograd node of
``native_tarp_fwd`` is C++ (``csrc/tarp_autograd.cpp``, registered for the Autograd key), because
the Python wrapper of ``register_autograd`` cost more than the kernels at small shapes.

Ops (schemas in ``csrc/tarp_ops.cpp``, kernels in ``csrc/tarp_cpu.cpp``)::

    tarp_fast::native_tarp_fwd(x [M, K], weight, bias?, U?, V?, G?, P?, Q?, task_index?, gate?,
        skip_gate?, residual? [M, N], scaling, scale_offset, num_tasks, activation, gate_kind,
        gate_value, skip_kind, skip_value, hard_skip, save_pre)
        -> out [M, N], pre [M, N] | [0], proj [M, r + r*r] | [M, r] | [0], scale [(T,) N, K] | [0]
    tarp_fast::native_tarp_bwd(dy, x, weight, U?, V?, G?, P?, Q?, task_index?, gate?, skip_gate?,
        pre, proj, scale, scaling, num_tasks, activation, gate_kind, gate_value, skip_kind,
        skip_value, hard_skip, needs) -> dx, dweight, dbias, dU, dV, dG, dP, dQ, dgate, dskip_gate

Autograd (DESIGN §2), per row with task t: ``dpre = gate · act'(pre) ⊙ dy``,
``e = scaling · U_tᵀ dpre``, ``dS = e hᵀ``, ``dh = Sᵀ e``,
``dx = W_tᵀ dpre + V_tᵀ dh + G_tᵀ vec(dS) + skip_gate · dy``; per task (segmented) sums
``dU = scaling Σ dpre zᵀ``, ``dV = Σ dh xᵀ``, ``dG = Σ vec(dS) xᵀ``, ``db = Σ dpre``,
``D = Σ dpre xᵀ``, ``dW0 = Φ1 ⊙ D``, ``dA = (W0 ⊙ D) ⊙ sigmoid(A)`` with ``A = P Q + offset``,
``dP = dA Qᵀ``, ``dQ = Pᵀ dA``; ``dgate = <dy, act(pre)>``, ``dskip_gate = <dy, x>``,
``dresidual = dy``. Forward saves ``pre`` only when the backward needs it (an activation or a
gate that requires grad) and the small ``proj = [h; vec S]`` rows; only the gradients of inputs
that require grad are computed (a frozen base weight costs no ``D`` GEMM).

Precision: float32 and float64 run natively; float16/bfloat16 inputs are computed in float32 and
the output is cast back (the CPU has no fast half GEMM to gain from).
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from ._contract import ACTIVATION_CODES, Needs, TarpCall, check_tarp_args
from ._ext import load_extension

__all__ = ["run", "tarp_linear_native", "unavailable_reason", "preferred_for", "ACTIVATION_CODES", "GATE_CODES"]

# Codes shared with csrc/tarp_common.h (ACTIVATION_CODES too, from the contract; the bits of
# native_tarp_bwd's ``needs`` are the fields of Needs in order: csrc/tarp_common.h NeedBit).
GATE_CODES = {"none": 0, "scalar": 1, "row": 2, "task": 3}

_ready_lock = threading.Lock()
_ready = False


def unavailable_reason() -> Optional[str]:
    """None when the native CPU ops can run here, else the reason (and how to fix it)."""
    if _ready:  # fast path, also the only path torch.compile traces (no lock, no import)
        return None
    _, reason = load_extension()
    if reason is None:
        _register_python_side()
    return reason


def _ensure_ready() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"tarp_linear: backend='native' is unavailable: {reason}")


# ---- fake kernels and autograd ------------------------------------------------------------------


def _register_python_side() -> None:
    """Register the fake kernels of the ops of ``tarp_fast._C`` (once).

    Autograd of ``native_tarp_fwd`` is registered in C++ (``csrc/tarp_autograd.cpp``): the
    Python wrapper of ``torch.library.register_autograd`` cost more than the kernels at the small
    adaptation shapes (measured ~150 us per fwd+bwd step of 2 cores).
    """
    global _ready
    with _ready_lock:
        if _ready:
            return
        torch.library.register_fake("tarp_fast::native_tarp_fwd")(_fwd_fake)
        torch.library.register_fake("tarp_fast::native_tarp_bwd")(_bwd_fake)
        if hasattr(torch.ops.tarp_fast, "compact_rows"):  # CUDA helpers: only in CUDA builds
            torch.library.register_fake("tarp_fast::compact_rows")(_compact_rows_fake)
            torch.library.register_fake("tarp_fast::group_by_task")(_group_by_task_fake)
            torch.library.register_fake("tarp_fast::segmented_sum")(_segmented_sum_fake)
        _ready = True


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


def _fwd_fake(x, weight, bias, U, V, G, P, Q, task_index, gate, skip_gate, residual, scaling, scale_offset,
              num_tasks, activation, gate_kind, gate_value, skip_kind, skip_value, hard_skip, save_pre):
    M, N = x.shape[0], weight.shape[0]
    out = x.new_empty((M, N))
    pre = x.new_empty((M, N)) if save_pre else _empty(x)
    if U is None:
        proj = _empty(x)
    else:
        r = U.shape[-1]
        proj = x.new_empty((M, r + r * r if G is not None else r))
    scale = x.new_empty(tuple(P.shape[:-1]) + (Q.shape[-1],)) if P is not None else _empty(x)
    return out, pre, proj, scale


def _bwd_fake(dy, x, weight, U, V, G, P, Q, task_index, gate, skip_gate, pre, proj, scale, scaling, num_tasks,
              activation, gate_kind, gate_value, skip_kind, skip_value, hard_skip, needs):
    need = Needs.from_bits(needs)

    def like(flag, t):
        return t.new_empty(t.shape) if flag and t is not None else _empty(x)

    def gate_grad(flag, kind):
        if not flag or kind == GATE_CODES["none"]:
            return _empty(x)
        if kind == GATE_CODES["row"]:
            return x.new_empty((x.shape[0],))
        if kind == GATE_CODES["task"]:
            return x.new_empty((num_tasks,))
        return x.new_empty(())

    db = x.new_empty((weight.shape[0],)) if need.bias else _empty(x)
    return (like(need.x, x), like(need.weight, weight), db, like(need.U, U), like(need.V, V), like(need.G, G),
            like(need.P, P), like(need.Q, Q), gate_grad(need.gate, gate_kind), gate_grad(need.skip_gate, skip_kind))


def _compact_rows_fake(gate):
    M = gate.shape[0]
    return gate.new_empty((M,), dtype=torch.int64), gate.new_empty((1,), dtype=torch.int64)


def _group_by_task_fake(task_index, num_tasks, gate):
    M = task_index.shape[0]
    return (task_index.new_empty((M,)), task_index.new_empty((num_tasks + 1,)),
            task_index.new_empty((num_tasks + 2,)))


def _segmented_sum_fake(values, perm, offsets):
    return values.new_empty((offsets.shape[0] - 1, values.shape[1]))


# ---- the backend -------------------------------------------------------------------------------


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype != dtype else t


def _gate_args(g, kind: str, dtype):
    """``(tensor or None, float value, code)`` for a gate as the op takes it."""
    code = GATE_CODES[kind]
    if g is None:
        return None, 1.0, code
    if isinstance(g, torch.Tensor):
        return _cast(g, dtype), 1.0, code
    return None, float(g), code  # a Python number: no tensor, no gradient


def tarp_linear_native(*args, **kwargs):
    """`tarp_linear` (the signature of :func:`tarp_fast.reference.tarp_linear`) on the native CPU
    ops, without the dispatch of :mod:`tarp_fast.ops`: ``run(check_tarp_args(...))``.

    ``x [..., K]`` is flattened to ``[M, K]``; returns ``[..., N]`` in ``x``'s dtype. Rows dropped by
    ``hard_skip`` (gate == 0) cost only their epilogue; with ``task_index`` the rows are grouped per
    task inside the op so each per-task product is one GEMM. ``task_index`` values are
    range-checked (``ValueError``), like the reference.
    """
    return run(check_tarp_args(*args, **kwargs))


def run(call: TarpCall) -> torch.Tensor:
    """The native backend's entry: one validated call (``tarp_fast.ops`` checks it once, CPU tensors
    included, and calls this; the check is ~9 us of a ~60 us small call). Returns ``out_shape``."""
    if not _ready:
        _ensure_ready()
    spec = call.spec
    # Kept lean: at the small adaptation shapes this wrapper's Python time is a visible share of
    # the step (every avoidable reshape/cast/lookup was measured at 1-3 us).
    x, weight, bias, U, V, G, P, Q, res = (call.x, call.weight, call.bias, call.U, call.V, call.G, call.P,
                                           call.Q, call.residual)
    dtype = out_dtype = x.dtype
    if dtype not in _NATIVE_DTYPES:
        dtype = torch.float32
        x, weight, bias, U, V, G, P, Q, res = (_cast(t, dtype) for t in (x, weight, bias, U, V, G, P, Q, res))
    g, g_val, g_kind = _gate_args(call.gate, spec.gate_kind, dtype)
    s, s_val, s_kind = _gate_args(call.skip_gate, spec.skip_kind, dtype)
    # pre [M, N] is kept for the backward only when it reads it: act'(pre), or <dy, act(pre)>.
    save_pre = False
    if call.act != 0 or isinstance(call.gate, torch.Tensor):
        needs = call.needs
        save_pre = (call.act != 0 or needs.gate) and (
            any(needs) or (res is not None and res.requires_grad and torch.is_grad_enabled()))
    out = _FWD_OP()(
        x, weight, bias, U, V, G, P, Q, call.task_index, g, s, res, call.scaling, call.scale_offset,
        spec.num_tasks if spec.multi_task else 1, call.act, g_kind, g_val, s_kind, s_val,
        call.hard_skip, save_pre,
    )[0]
    if out.dim() != len(spec.out_shape):
        out = out.reshape(spec.out_shape)
    return out if out.dtype == out_dtype else out.to(out_dtype)


_NATIVE_DTYPES = (torch.float32, torch.float64)
_fwd_overload = []


def _FWD_OP():
    """``torch.ops.tarp_fast.native_tarp_fwd.default``, looked up once (the packet costs ~5 us).

    Under ``torch.compile`` the lookup is traced directly: appending to the cache inside a trace
    would change a guarded global and recompile the graph on its next call.
    """
    if torch.compiler.is_compiling():
        return torch.ops.tarp_fast.native_tarp_fwd.default
    if not _fwd_overload:
        _fwd_overload.append(torch.ops.tarp_fast.native_tarp_fwd.default)
    return _fwd_overload[0]


# ---- when backend="auto" picks native on CPU ----------------------------------------------------


def preferred_for(call: TarpCall) -> bool:
    """Whether ``backend="auto"`` runs this CPU call natively rather than with the reference.

    Native for float32 and float64 on CPU, any shape: both run the same GEMMs (the op is GEMM-bound
    on CPU) and native saves the per-op dispatch, the autograd bookkeeping and the intermediates,
    so it was at least as fast as the reference in every cell measured
    (``benchmarks/test_bench_native.py``; figures in ``benchmarks/results/``). float16/bfloat16
    are not preferred: native computes them in float32 through upcast copies, a trade not measured.
    """
    return call.spec.device.type == "cpu" and call.spec.dtype in _NATIVE_DTYPES
