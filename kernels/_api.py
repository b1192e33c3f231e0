"""The public entry points of the Triton backend, re-exported by ``tarp_fast.kernels``."""


from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (a missing Triton is reported by tarp_fast.ops with the fix)

from .._contract import DEFAULT_SCALE_OFFSET, check_tarp_args, check_task_range
from ._configs import CANDIDATES, DX_DESIGNS, KernelConfig, dx_design, use_config, use_dx_design
from ._launch import poison_outputs
from ._ops import triton_tarp

__all__ = ["tarp_linear_triton", "run_validated", "unavailable_reason", "KernelConfig", "use_config", "poison_outputs",
           "CANDIDATES", "DX_DESIGNS", "dx_design", "use_dx_design"]


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason():
    """``None`` when the kernels can run here, else why not (checked without touching CUDA)."""
    if _interpreter_on():
        return None
    if not torch.version.cuda and not getattr(torch.version, "hip", None):
        return ("this torch build has no CUDA (and TRITON_INTERPRET=1 is not set): "
                "the Triton kernels need CUDA tensors")
    return None


def tarp_linear_triton(
    x, weight, bias=None, U=None, V=None, G=None, P=None, Q=None, *,
    scaling=1.0, scale_offset=DEFAULT_SCALE_OFFSET, task_index=None, gate=None, skip_gate=None,
    residual=None, activation="none", hard_skip=False,
):
    """`tarp_linear` on the fused Triton kernels; same contract as the reference.

    Shapes: ``x [..., K]``, ``weight [N, K]``, ``bias [N]``, ``U [N, r]``, ``V [r, K]``,
    ``G [r*r, K]``, ``P [N, q]``, ``Q [q, K]`` (with a leading ``T`` and ``task_index [M]``
    for several tasks), gates None / float / 0-d / ``[M]`` / ``[T]``, ``residual [..., N]``.
    Returns ``[..., N]`` in x's dtype; accumulation is fp32 throughout.

    Under the interpreter (CPU tensors, ``TRITON_INTERPRET=1``) float16 and float32 run;
    bfloat16 raises ``RuntimeError`` (numpy has no bfloat16), it runs on CUDA only. Rank 0
    (``U [N, 0]``) runs as no delta (the delta is exactly 0) and the factors get their empty
    gradients; ``K = 0`` gives ``act(bias)`` and ``bias.grad = sum of dpre``.
    """
    spec = check_tarp_args(
        x, weight, bias, U, V, G, P, Q, scaling=scaling, scale_offset=scale_offset,
        task_index=task_index, gate=gate, skip_gate=skip_gate, residual=residual,
        activation=activation, hard_skip=hard_skip,
    )
    return run_validated(
        spec, x, weight, bias, U, V, G, P, Q, scaling=scaling, scale_offset=scale_offset,
        task_index=task_index, gate=gate, skip_gate=skip_gate, residual=residual,
        activation=activation, hard_skip=hard_skip,
    )


def run_validated(spec, x, weight, bias, U, V, G, P, Q, *, scaling, scale_offset, task_index, gate, skip_gate,
                  residual, activation, hard_skip):
    """The body of :func:`tarp_linear_triton` for arguments already checked into ``spec``
    (``tarp_fast.ops`` validates once and calls this)."""
    # (under precompile.capture launches are recorded, not run: CPU tensors stand in for CUDA ones)
    from . import precompile

    capturing = precompile.capturing()
    if spec.device.type != "cuda" and not _interpreter_on() and not capturing:
        raise RuntimeError(
            f"tarp_linear_triton: needs CUDA tensors, got tensors on {spec.device}; "
            "set TRITON_INTERPRET=1 before starting Python to run the kernels on CPU"
        )
    if spec.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"tarp_linear_triton: argument 'x' must be float16, bfloat16 or float32, got {spec.dtype}")
    if spec.dtype == torch.bfloat16 and spec.device.type != "cuda" and not capturing:
        # numpy, which the interpreter computes with, has no bfloat16: results were garbage (errors
        # of 1e10), so refuse rather than return them
        raise RuntimeError(
            f"tarp_linear_triton: the Triton interpreter (TRITON_INTERPRET=1, tensors on {spec.device}) cannot run "
            f"{spec.dtype}: numpy has no bfloat16. Use float16 or float32 inputs under the interpreter, or run "
            "bfloat16 on a CUDA GPU"
        )
    if spec.multi_task and spec.device.type == "cpu":
        check_task_range(task_index, spec.num_tasks)
    return triton_tarp(
        spec, x, weight, bias, U, V, G, P, Q, scaling=scaling, scale_offset=scale_offset,
        task_index=task_index, gate=gate, skip_gate=skip_gate, residual=residual,
        activation=activation, hard_skip=hard_skip,
    )
