"""Row schedule of the Triton kernels: group rows by task and drop gated-off rows, on the device.

``hard_skip`` and ``task_index`` are served by one mechanism. Each row gets a key: its task
(``0`` without ``task_index``), or ``T`` when ``hard_skip`` drops it (``gate == 0``). A stable sort
of the keys gives ``perm`` (rows in key order) and ``torch.searchsorted`` gives the segment offsets
``seg_off [T + 2]`` (segment ``s`` is ``perm[seg_off[s]:seg_off[s+1]]``; ``s = T`` are the dropped
rows). Row tiles are then cut per segment, so a tile holds one task (the factors are a pointer
offset) and the tiles of the dropped segment do no matmul: the matmul work is proportional to the
number of kept rows, up to one partially filled tile per segment.

Everything is built from device-side torch ops with sizes known on the host (``M``, ``T``, the tile
height), so there is no host synchronization and the schedule can be captured in a CUDA graph.
The number of row tiles launched is the bound ``cdiv(M, BM) + T`` (``T + 1`` segments each add at
most one partial tile); surplus programs find an empty tile and exit.

Two implementations of ``(perm, seg_off)``: :func:`row_groups` (torch's sort and searchsorted, any
device) and :func:`row_groups_cuda` (the extension's CUDA helpers ``tarp_fast::group_by_task`` /
``tarp_fast::compact_rows``: one stable counting sort, three small kernels, for CUDA builds of
``tarp_fast._C``). :func:`use_cuda_helpers` picks the second only with ``TARP_FAST_CUDA_HELPERS=1``
(which also sums a per-task gate's gradient with ``tarp_fast::segmented_sum``, ``_ops.py``):
the helpers compile with nvcc in ``make test`` but have not yet run on a GPU in this project (no GPU
was lent so far); the GPU tier checks both against each other (``tests/test_cuda_helpers.py``), and
the default flips once it has passed on a GPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["row_groups", "row_groups_cuda", "use_cuda_helpers", "tile_table", "max_row_tiles"]

_helpers_built: Optional[bool] = None


def cuda_helpers_built() -> bool:
    """Whether ``torch.ops.tarp_fast`` has the CUDA helpers (the extension built with CUDA)."""
    global _helpers_built
    if _helpers_built is None:
        from .. import _native

        # loads the extension and registers the helpers' fake kernels (torch.compile traces the
        # per-task gate's backward, which calls them)
        _helpers_built = _native.unavailable_reason() is None and hasattr(torch.ops.tarp_fast, "group_by_task")
    return _helpers_built


def _flag_on() -> bool:
    return os.environ.get("TARP_FAST_CUDA_HELPERS", "0") not in ("", "0")


def use_cuda_helpers(device) -> bool:
    """Whether a Triton call on ``device`` uses the CUDA helpers: its row schedule from
    :func:`row_groups_cuda` and a per-task gate's gradient from ``segmented_sum``.

    While torch.compile traces (the per-task gate's gather is traced), the extension is not
    loaded: an unresolved availability counts as False there (both paths compute the same sums).
    """
    if not _flag_on() or torch.device(device).type != "cuda":
        return False
    if _helpers_built is None and torch.compiler.is_compiling():
        return False
    return cuda_helpers_built()


if _flag_on():  # resolve now, outside any trace
    cuda_helpers_built()


def row_groups(
    M: int, T: int, task_index: Optional[torch.Tensor], drop: Optional[torch.Tensor], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm [M] int32, seg_off [T + 2] int32)`` for rows keyed by task, dropped rows last.

    ``task_index`` ``[M]`` int64 or None (every row task 0); ``drop`` ``[M]`` bool or None.
    Task indices outside ``[0, T)`` fall outside every task segment (their rows are not
    computed); :func:`tarp_fast.kernels.tarp_linear_triton` range-checks them where that is free.
    """
    if task_index is None:
        key = torch.zeros(M, dtype=torch.int64, device=device)
    else:
        key = task_index
    if drop is not None:
        key = torch.where(drop, torch.full_like(key, T), key)
    sorted_key, perm = torch.sort(key, stable=True)
    bounds = torch.arange(T + 2, dtype=torch.int64, device=device)
    seg_off = torch.searchsorted(sorted_key, bounds)
    return perm.to(torch.int32), seg_off.to(torch.int32)


def row_groups_cuda(
    M: int, T: int, task_index: Optional[torch.Tensor], gate: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`row_groups` through the extension's CUDA helpers (same outputs).

    ``gate`` ``[M]``: the row gate under ``hard_skip`` (rows with ``gate == 0`` are dropped), else
    None. Without ``task_index`` a gate is required (an ungrouped call needs no schedule):
    ``compact_rows`` gives the kept rows then the dropped ones and the kept count, so
    ``seg_off = [0, kept, M]``. Task indices outside ``[0, T)`` go to the dropped segment.
    """
    ops = torch.ops.tarp_fast
    if task_index is None:
        if gate is None:
            raise ValueError("row_groups_cuda: needs task_index or a gate (nothing to group otherwise)")
        perm, kept = ops.compact_rows(gate)
        seg_off = torch.cat([kept.new_zeros(1), kept, kept.new_full((1,), M)])
    else:
        perm, _, seg_off = ops.group_by_task(task_index, T, gate)
    return perm.to(torch.int32), seg_off.to(torch.int32)


def max_row_tiles(M: int, T: int, BM: int) -> int:
    """Upper bound on the row tiles of a schedule with ``T + 1`` segments (host arithmetic)."""
    return (M + BM - 1) // BM + T


def tile_table(seg_off: torch.Tensor, M: int, T: int, BM: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(tile_seg, tile_start, tile_end, num_tiles)``: for each row tile its segment and its
    position range in ``perm``; tiles beyond the real count get an empty range."""
    device = seg_off.device
    off = seg_off.to(torch.int64)
    counts = off[1:] - off[:-1]  # [T + 1]
    ntiles = (counts + BM - 1) // BM
    tiles_end = torch.cumsum(ntiles, 0)  # exclusive end (in tiles) of each segment
    num = max_row_tiles(M, T, BM)
    pid = torch.arange(num, dtype=torch.int64, device=device)
    seg = torch.searchsorted(tiles_end, pid, right=True)  # T + 1 for surplus tiles
    valid = seg <= T
    seg_c = seg.clamp(max=T)
    first = tiles_end[seg_c] - ntiles[seg_c]
    start = off[seg_c] + (pid - first) * BM
    end = torch.minimum(start + BM, off[seg_c + 1])
    zero = torch.zeros_like(start)
    start = torch.where(valid, start, zero)
    end = torch.where(valid, end, zero)
    return seg_c.to(torch.int32), start.to(torch.int32), end.to(torch.int32), num
