"""The entry points of the Triton backend, re-exported by ``tarp_fast.kernels``: ``run(call)`` for
:mod:`tarp_fast.ops`, ``tarp_linear_triton`` for a direct call, and the config and debug switches."""

from __future__ import annotations

import torch
import triton  # noqa: F401  (a missing Triton is reported by tarp_fast.ops with the fix)

from .._contract import check_tarp_args
from ._configs import CANDIDATES, DX_DESIGNS, KernelConfig, dx_design, use_config, use_dx_design
from ._custom_ops import _interpreter_on, run
from ._launch import poison_outputs

__all__ = ["tarp_linear_triton", "run", "unavailable_reason", "KernelConfig", "use_config", "poison_outputs",
           "CANDIDATES", "DX_DESIGNS", "dx_design", "use_dx_design"]


def unavailable_reason():
    """``None`` when the kernels can run here, else why not (checked without touching CUDA)."""
    if _interpreter_on():
        return None
    if not torch.version.cuda and not getattr(torch.version, "hip", None):
        return ("this torch build has no CUDA (and TRITON_INTERPRET=1 is not set): "
                "the Triton kernels need CUDA tensors")
    return None


def tarp_linear_triton(*args, **kwargs):
    """`tarp_linear` (the signature of :func:`tarp_fast.reference.tarp_linear`) on the fused
    Triton kernels, without the dispatch of :mod:`tarp_fast.ops`: ``run(check_tarp_args(...))``.

    Shapes: ``x [..., K]``, ``weight [N, K]``, ``bias [N]``, ``U [N, r]``, ``V [r, K]``,
    ``G [r*r, K]``, ``P [N, q]``, ``Q [q, K]`` (with a leading ``T`` and ``task_index [M]``
    for several tasks), gates None / float / 0-d / ``[M]`` / ``[T]``, ``residual [..., N]``.
    Returns ``[..., N]`` in x's dtype; accumulation is fp32 throughout.

    Under the interpreter (CPU tensors, ``TRITON_INTERPRET=1``) float16 and float32 run;
    bfloat16 raises ``RuntimeError`` (numpy has no bfloat16), it runs on CUDA only. Rank 0
    (``U [N, 0]``) runs as no delta (the delta is exactly 0) and the factors get their empty
    gradients; ``K = 0`` gives ``act(bias)`` and ``bias.grad = sum of dpre``.
    """
    return run(check_tarp_args(*args, **kwargs))
