"""The functional API and backend dispatch of tarp-fast.

``tarp_linear`` is the one op of the library (DESIGN.md §2). It validates its arguments once into
a :class:`~tarp_fast._contract.TarpCall`, picks a backend and calls its ``run(call)``:

* ``reference``: plain PyTorch (:mod:`tarp_fast.reference`), always available, any device.
* ``triton``: fused Triton kernels (:mod:`tarp_fast.kernels`), on CUDA tensors, or on CPU tensors
  when ``TRITON_INTERPRET=1`` was set before Python started.
* ``native``: the compiled extension ``tarp_fast._C`` (CPU ops).

``backend="auto"`` picks triton on CUDA tensors when it can be imported, native on CPU where it is
built and measured faster for the shape, and the reference otherwise.

Inside ``torch.func`` transforms (``grad``, ``vmap``, ``functional_call`` under them, ...) every
backend, ``auto`` or named, runs the reference: the fused backends are opaque to functorch (a C++
autograd node, Triton launches without a vmap rule), the reference is plain PyTorch. Under
autocast (``torch.autocast``) the call runs in the autocast dtype like ``F.linear``: float32
tensors (the base weight, fp32 factors, x) are cast to it and the gradients flow back to them in
their own dtype.

A backend is imported only when it is first asked for, so ``import tarp_fast`` needs neither
Triton nor the extension, and nothing here touches ``torch.cuda`` at import time; under
``torch.compile`` in a cold process that first ask happens at trace time (:func:`_load`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable
from typing import Optional

import torch

from . import reference
from ._contract import DEFAULT_SCALE_OFFSET, TarpCall, check_tarp_args

__all__ = ["tarp_linear", "available_backends", "BACKENDS", "DEFAULT_SCALE_OFFSET"]

BACKENDS = ("auto", "reference", "triton", "native")

# name -> (module, attribute, how to fix it when it is missing)
_BACKEND_SOURCES: dict[str, tuple[str, str, str]] = {
    "triton": (
        "tarp_fast.kernels",
        "run",
        "install Triton >= 3.6 (`pip install triton`, Linux x86-64) and pass CUDA tensors, "
        "or set TRITON_INTERPRET=1 before starting Python to run the kernels on CPU",
    ),
    "native": (
        "tarp_fast._native",
        "run",
        "build the extension: `pip install .` without TARP_FAST_NO_EXT=1, with a C++ compiler; "
        "see tarp_fast.ext_info() for why it is missing",
    ),
}
_loaded: dict[str, tuple[Optional[Callable], Optional[str]]] = {}
_modules: dict[str, object] = {}


def _load(name: str) -> tuple[Optional[Callable], Optional[str]]:
    """Import a backend once; return ``(fn, None)`` or ``(None, reason)``.

    After the first call this is a dict lookup. Under ``torch.compile`` the first call (a cold
    process: nothing ran eagerly before) imports through :func:`_load_outside_trace`, which
    Dynamo runs as plain Python at trace time instead of tracing ``importlib``.
    """
    if name == "reference":
        return reference.run, None
    if torch.compiler.is_compiling():
        _load_outside_trace(name)
    elif name not in _loaded:
        _import_backend(name)
    return _loaded[name]


def _import_backend(name: str) -> None:
    module, attr, _ = _BACKEND_SOURCES[name]
    try:
        mod = importlib.import_module(module)
        fn = getattr(mod, attr)
        reason = getattr(mod, "unavailable_reason", lambda: None)()
        _loaded[name] = (None, reason) if reason else (fn, None)
        _modules[name] = mod
    except Exception as exc:  # ImportError, or a broken build raising at import
        _loaded[name] = (None, f"{type(exc).__name__}: {exc}")


@torch.compiler.assume_constant_result
def _load_outside_trace(name: str) -> bool:
    """:func:`_import_backend` once; Dynamo calls it at trace time and keeps the result as a constant."""
    if name not in _loaded:
        _import_backend(name)
    return True


def available_backends() -> dict[str, Optional[str]]:
    """Map each backend name to ``None`` when it can run here, else the reason it cannot."""
    return {name: _load(name)[1] for name in ("reference", "triton", "native")}


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unavailable(name: str, reason: str) -> RuntimeError:
    fix = _BACKEND_SOURCES[name][2]
    return RuntimeError(f"tarp_linear: backend='{name}' is unavailable: {reason}. Fix: {fix}")


def _native_preferred(call: TarpCall) -> bool:
    """Whether ``auto`` takes the native CPU backend for this call (the extension decides)."""
    prefer = getattr(_modules.get("native"), "preferred_for", None)
    return bool(prefer(call)) if prefer is not None else False


def _functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) is running this call.

    Not asked inside a ``torch.compile`` trace (Dynamo runs functorch transforms as its own
    higher-order ops; a compiled graph calls the fused ops as usual).
    """
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _resolve(backend: str, call: TarpCall) -> Callable:
    """The ``run(call)`` of the backend that runs ``call`` (see the module docstring)."""
    spec = call.spec
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"tarp_linear: argument 'backend' must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference" or _functorch_active():
        # Inside torch.func transforms every backend runs the reference: the native op's autograd
        # node is C++ (functorch cannot transform it) and the Triton launches have no vmap rule;
        # the reference is plain differentiable PyTorch, so grad, vmap, jacrev, hessian and
        # second-order MAML all see the exact formula.
        return reference.run
    if backend == "auto":
        if spec.device.type == "cuda":
            fn, _ = _load("triton")
            return fn if fn is not None else reference.run
        if spec.device.type == "cpu" and _load("native")[0] is not None and _native_preferred(call):
            return _load("native")[0]
        return reference.run
    if backend == "triton" and spec.device.type != "cuda" and not _interpreter_on():
        raise RuntimeError(
            f"tarp_linear: backend='triton' needs CUDA tensors, got tensors on {spec.device}; "
            "set TRITON_INTERPRET=1 before starting Python to run the Triton kernels on CPU"
        )
    if backend == "native" and spec.device.type != "cpu":
        raise RuntimeError(
            f"tarp_linear: backend='native' runs on CPU tensors, got tensors on {spec.device}; "
            "use backend='triton' or 'auto' on GPU"
        )
    fn, reason = _load(backend)
    if fn is None:
        raise _unavailable(backend, reason)
    return fn


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (``meta`` and the like have none)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast(t, dtype: torch.dtype):
    """``t`` in the autocast dtype when autocast would cast it (a float32/16 tensor), else as is."""
    if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE and t.dtype != dtype:
        return t.to(dtype)
    return t


def tarp_linear(
    x,
    weight,
    bias=None,
    U=None,
    V=None,
    G=None,
    P=None,
    Q=None,
    *,
    scaling=1.0,
    scale_offset=DEFAULT_SCALE_OFFSET,
    task_index=None,
    gate=None,
    skip_gate=None,
    residual=None,
    activation="none",
    hard_skip=False,
    backend="auto",
):
    """Dense layer with a dynamic low-rank delta, gates, skip path and residual, in one op.

    For row ``m`` of ``x`` (flattened to ``[M, K]``) with task ``t`` (``t = 0`` without
    ``task_index``)::

        W_t   = weight ⊙ softplus(P_t Q_t + scale_offset)      if P is given, else weight
        h     = V_t x_m ;  S = reshape(G_t x_m, (r, r)) if G is given, else I
        pre_m = W_t x_m + bias + scaling · U_t (S h)
        y_m   = gate_m · act(pre_m) + skip_gate_m · x_m + residual_m

    Shapes: ``x [..., K]``, ``weight [N, K]``, ``bias [N]``, ``U [N, r]``, ``V [r, K]``,
    ``G [r*r, K]``, ``P [N, q]``, ``Q [q, K]`` (each factor with a leading ``T`` and
    ``task_index [M]`` int64 for several tasks), ``gate``/``skip_gate`` None, scalar, ``[M]`` or
    ``[T]``, ``residual [..., N]``. Returns ``[..., N]`` in ``x``'s dtype.

    ``hard_skip=True`` declares that rows with ``gate == 0`` are not computed: their output is
    ``skip_gate · x + residual`` and their gate gradient is 0.

    Under ``torch.autocast`` for x's device the call computes in the autocast dtype (float32
    tensors are cast to it, as ``F.linear`` does) and returns that dtype.

    ``backend``: ``"auto" | "reference" | "triton" | "native"`` (see the module docstring).
    """
    scope = contextlib.nullcontext()
    if isinstance(x, torch.Tensor) and _autocast_on(x.device.type):
        # Autocast: run in its dtype, like F.linear (float32 tensors cast, float64 left alone),
        # then without autocast, so every backend computes exactly as with those inputs.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, U, V, G, P, Q, gate, skip_gate, residual = (
            _autocast(t, dtype) for t in (x, weight, bias, U, V, G, P, Q, gate, skip_gate, residual))
        scope = torch.autocast(x.device.type, enabled=False)
    with scope:
        call = check_tarp_args(
            x, weight, bias, U, V, G, P, Q, scaling=scaling, scale_offset=scale_offset,
            task_index=task_index, gate=gate, skip_gate=skip_gate, residual=residual,
            activation=activation, hard_skip=hard_skip,
        )
        return _resolve(backend, call)(call)
