"""Row schedule of the Triton kernels: group rows by task and drop gated-off rows, on the device.

``hard_skip`` and ``task_index`` are served by one mechanism. Each row gets a key: its task
(``0`` without ``task_index``), or ``T`` when ``hard_skip`` drops it (``gate == 0``). A stable sort
of the keys gives ``perm`` (rows in key order) and the segment offsets ``seg_off [T + 2]``
(segment ``s`` is ``perm[seg_off[s]:seg_off[s+1]]``; ``s = T`` are the dropped rows). Row tiles
are then cut per segment (the tile table), so a tile holds one task (the factors are a pointer
offset) and the tiles of the dropped segment do no matmul: the matmul work is proportional to the
number of kept rows, up to one partially filled tile per segment.

Everything runs on the device with sizes known on the host (``M``, ``T``, the tile height), so
there is no host synchronization and the schedule can be captured in a CUDA graph.
The number of row tiles launched is the bound ``cdiv(M, BM) + T`` (``T + 1`` segments each add at
most one partial tile); surplus programs find an empty tile and exit.

Three implementations of ``(perm, seg_off)``, all with the same output:

* :func:`row_groups_triton` (the default where :func:`triton_schedule_fits`: up to 1022 tasks
  and 64K histogram entries): four small Triton kernels
  (:mod:`._schedule_kernels`: histogram, scan, scatter, and the tile table), in place of the ~30
  launches the torch-ops version takes; the schedule is on the critical path of every grouped
  call, and at the goal shape those launches cost more than the hard-skip goal's 5% margin.
* :func:`row_groups` (torch's sort and searchsorted, any device): the calls too large for the
  Triton kernels, and the oracle of the tests.
* :func:`row_groups_cuda` (the extension's CUDA helpers ``tarp_fast::group_by_task`` /
  ``tarp_fast::compact_rows``). :func:`use_cuda_helpers` picks it only with
  ``TARP_FAST_CUDA_HELPERS=1`` (which also sums a per-task gate's gradient with
  ``tarp_fast::segmented_sum``, ``_custom_ops.py``); the GPU tier checks them against the others
  (``tests/test_cuda_helpers.py``).

Task indices outside ``[0, T)`` go to the dropped segment in all three (their rows get the
dropped rows' output: no base product and no delta), since reporting them would need a sync.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from . import _schedule_kernels as SK
from ._plan import Launch, alloc

__all__ = ["row_groups", "row_groups_cuda", "row_groups_triton", "triton_schedule_fits", "use_cuda_helpers",
           "tile_table", "tile_table_triton", "max_row_tiles"]

#: rows per chunk of the Triton counting sort (one program sorts one chunk): SORT_CHUNK, or
#: SMALL_SORT_CHUNK for a decode-sized batch (M <= 128). Two sizes only: the chunk is a constexpr
#: of the sort kernels, so every size is a compile of its own (the scatter kernel takes up to 14 s
#: to compile), and one chunk sorting up to 1024 keys costs microseconds whatever its padding.
SORT_CHUNK = 1024
SMALL_SORT_CHUNK = 128


def sort_chunk(M: int) -> int:
    return SMALL_SORT_CHUNK if M <= SMALL_SORT_CHUNK else SORT_CHUNK


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
    Task indices outside ``[0, T)`` count as dropped (:func:`tarp_fast.kernels.tarp_linear_triton`
    range-checks them where that is free).
    """
    if task_index is None:
        key = torch.zeros(M, dtype=torch.int64, device=device)
    else:
        key = torch.where((task_index < 0) | (task_index >= T), T, task_index)
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


#: the scan of the counting sort runs in one program, SCAN_BLOCK histogram entries a step
SCAN_BLOCK = 1024
#: above this many histogram entries ((T + 1) * chunks) that single program would take longer
#: than torch's multi-block sort, which serves instead (T = 8: up to 7.3M rows; T = 1000: 67K)
MAX_SCAN = 64 * SCAN_BLOCK


def triton_schedule_fits(T: int, M: int = 0) -> bool:
    """Whether the Triton sort takes ``T`` tasks and ``M`` rows (its key bins hold ``T + 2``, its
    one-program scan ``(T + 1) * chunks`` entries); the tile-table kernel needs only the first."""
    return T + 2 <= SK.MAX_BINS and (T + 1) * triton.cdiv(M, sort_chunk(M)) <= MAX_SCAN


def _key_bins(T: int) -> int:
    return triton.next_power_of_2(T + 2)


def plan_row_groups(M: int, T: int, task_index: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                    perm: torch.Tensor, seg_off: torch.Tensor, hist: torch.Tensor) -> list[Launch]:
    """The three sort launches of :func:`row_groups_triton` (``hist``: ``[(T + 1) * chunks]`` int32,
    ``chunks = cdiv(M, sort_chunk(M))``)."""
    ch = sort_chunk(M)
    chunks = triton.cdiv(M, ch)
    keys = dict(task_ptr=task_index, gate_ptr=gate, M=M, T=T, num_chunks=chunks)
    flags = dict(HAS_TASK=task_index is not None, HAS_DROP=gate is not None, CH=ch)
    return [
        Launch(SK._sched_hist_kernel, (chunks,), dict(keys, hist_ptr=hist), dict(flags, NBP=_key_bins(T)),
               num_warps=4, num_stages=1, name="sched_hist"),
        Launch(SK._sched_scan_kernel, (1,), dict(hist_ptr=hist, seg_off_ptr=seg_off, n=(T + 1) * chunks,
                                                 num_chunks=chunks, M=M, T=T), dict(BLOCK=SCAN_BLOCK),
               num_warps=4, num_stages=1, name="sched_scan"),
        Launch(SK._sched_scatter_kernel, (chunks,), dict(keys, hist_ptr=hist, perm_ptr=perm), flags,
               num_warps=4, num_stages=1, name="sched_scatter"),
    ]


def row_groups_triton(
    M: int, T: int, task_index: Optional[torch.Tensor], gate: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`row_groups` by the Triton counting sort (same outputs, where :func:`triton_schedule_fits`).

    ``task_index`` ``[M]`` int64 or None; ``gate`` ``[M]`` (the row gate under ``hard_skip``: rows
    with ``gate == 0`` are dropped) or None. No host sync: every size is known on the host.
    """
    if not triton_schedule_fits(T, M):
        raise ValueError(f"row_groups_triton: at most {SK.MAX_BINS - 2} tasks and (T + 1) * cdiv(M, 1024) <= "
                         f"{MAX_SCAN}, got T={T}, M={M}")
    if task_index is None and gate is None:
        raise ValueError("row_groups_triton: needs task_index or a gate (nothing to group otherwise)")
    device = (task_index if task_index is not None else gate).device
    perm = alloc((M,), torch.int32, device)
    seg_off = alloc((T + 2,), torch.int32, device)
    hist = alloc(((T + 1) * triton.cdiv(M, sort_chunk(M)),), torch.int32, device)  # chunks as in the plan
    for launch in plan_row_groups(M, T, task_index, None if gate is None else gate.contiguous(), perm, seg_off,
                                  hist):
        launch.run()
    return perm, seg_off


def plan_tile_table(seg_off: torch.Tensor, T: int, BM: int, tile_seg: torch.Tensor, tile_start: torch.Tensor,
                    tile_end: torch.Tensor) -> Launch:
    """The launch of :func:`tile_table_triton` (outputs ``[num]`` int32 each)."""
    num = tile_seg.shape[0]
    nbp = _key_bins(T)
    bp = max(1, min(256, 4096 // nbp))  # [BP, NBP] int32 temporaries per program
    return Launch(SK._sched_tiles_kernel, (triton.cdiv(num, bp),),
                  dict(seg_off_ptr=seg_off, tile_seg_ptr=tile_seg, tile_start_ptr=tile_start, tile_end_ptr=tile_end,
                       T=T, num_tiles=num),
                  dict(BM=BM, NBP=nbp, BP=bp), num_warps=4, num_stages=1, name="sched_tiles")


def tile_table_triton(seg_off: torch.Tensor, M: int, T: int, BM: int):
    """:func:`tile_table` in one Triton launch (same outputs; ``T + 2 <= 1024``, any ``M``)."""
    num = max_row_tiles(M, T, BM)
    out = [alloc((num,), torch.int32, seg_off.device) for _ in range(3)]
    plan_tile_table(seg_off, T, BM, *out).run()
    return (*out, num)


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
