"""One kernel launch as data (:class:`Launch`) and the allocation of kernel outputs.

Launchers build :class:`Launch` objects instead of calling kernels directly, so the compile tier
(:mod:`tarp_fast.kernels.compile_check`) compiles exactly what they launch.

Debugging aid: with ``TARP_FAST_POISON=1`` in the environment (or inside :func:`poison_outputs`)
every output buffer is allocated filled with NaN (integer buffers with -1) instead of
uninitialized, so an element a kernel forgets to write shows up in the tests.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch

__all__ = ["Launch", "poison_outputs", "alloc"]

_poison = [os.environ.get("TARP_FAST_POISON", "0") not in ("", "0")]


@contextlib.contextmanager
def poison_outputs(on: bool = True):
    """Allocate every output buffer poisoned within the block (NaN, or -1 for integers)."""
    saved = _poison[0]
    _poison[0] = on
    try:
        yield
    finally:
        _poison[0] = saved


def alloc(shape, dtype, device) -> torch.Tensor:
    """An output buffer: uninitialized, or poisoned under :func:`poison_outputs`."""
    if _poison[0]:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](**args, **constexprs, num_warps=..., num_stages=...)``."""

    kernel: object
    grid: tuple[int, ...]
    args: dict[str, object]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    name: str = ""
    tags: dict[str, object] = field(default_factory=dict)

    def run(self) -> None:
        if any(g == 0 for g in self.grid):
            return
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)
