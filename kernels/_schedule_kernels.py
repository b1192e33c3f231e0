"""Triton kernels that build the row schedule on the device (private; launched by :mod:`._schedule`).

The schedule (see :mod:`._schedule`) is a stable counting sort of the rows by key -- the task,
or ``T`` ("dropped") when ``hard_skip`` drops the row or its task index is outside ``[0, T)`` --
plus a table of row tiles cut per segment. Built from torch ops it took about 30 small launches
(a radix sort over 64-bit keys, searchsorted, a dozen elementwise ops for the tile table), which
at the goal shape (a ~0.4 ms forward at M = 8192, K = N = 4096 in bf16) is ~10-20% of the call,
more than the hard-skip and multi-task goals allow. These four kernels do it in four launches:

1. ``_sched_hist_kernel``    grid ``(chunks,)``: per chunk of ``CH`` rows, the key histogram
   ``hist[key * chunks + chunk]`` (key-major: an exclusive scan then gives every (key, chunk)
   its first output slot -- all rows of smaller keys, then the same key in earlier chunks).
2. ``_sched_scan_kernel``    one program: that exclusive scan in place, and ``seg_off [T + 2]``
   (the slot of (key, chunk 0) for every key, then ``M``).
3. ``_sched_scatter_kernel`` grid ``(chunks,)``: each row's rank among the earlier rows of its
   chunk with the same key (a sort of ``key * CH + position`` and a segmented count over equal
   keys), then ``perm[slot + rank] = row``: rows of one key keep their order (stable).
4. ``_sched_tiles_kernel``   grid ``(cdiv(tiles, BP),)``: per row tile of height ``BM`` its
   segment and ``[start, end)`` in ``perm``; tiles past the real count get an empty range.

Sizes: keys live in ``NBP = next_pow2(T + 2)`` bins (the extra bin holds the padding rows of the
last chunk); the launcher takes this path for ``T + 2 <= MAX_BINS`` and at most 64K histogram
entries (``_schedule.triton_schedule_fits``), the torch-ops schedule above that. Everything is
int32.
"""

import triton
import triton.language as tl

#: batch-dependent integers (rows, tasks, chunk and tile counts) are not specialized: a new batch
#: size must not recompile the schedule (see ``_kernels._BATCH_ARGS``)
_BATCH_ARGS = ["M", "T", "n", "num_chunks", "num_tiles"]

#: largest key-bin count of the Triton schedule (tasks + dropped + padding, a power of two)
MAX_BINS = 1024


@triton.jit
def _row_keys(task_ptr, gate_ptr, c, M, T, HAS_TASK: tl.constexpr, HAS_DROP: tl.constexpr, CH: tl.constexpr):
    """Keys of chunk ``c``: task (0 without tasks), ``T`` when dropped or out of range, ``T + 1``
    for the padding past ``M``. Returns ``(keys int32 [CH], positions int32 [CH])``."""
    pos = tl.arange(0, CH)
    rows = c * CH + pos
    valid = rows < M
    key = tl.zeros((CH,), dtype=tl.int32)
    if HAS_TASK:
        t = tl.load(task_ptr + rows, mask=valid, other=0)
        key = tl.where((t < 0) | (t >= T), T, t.to(tl.int32))
    if HAS_DROP:
        g = tl.load(gate_ptr + rows, mask=valid, other=1.0)
        key = tl.where(g == 0.0, T, key)
    key = tl.where(valid, key, T + 1)
    return key, pos


@triton.jit(do_not_specialize=_BATCH_ARGS)
def _sched_hist_kernel(task_ptr, gate_ptr, hist_ptr, M, T, num_chunks,
                       HAS_TASK: tl.constexpr, HAS_DROP: tl.constexpr, CH: tl.constexpr, NBP: tl.constexpr):
    """``hist[k * num_chunks + c]`` = rows of chunk ``c`` with key ``k``, for keys ``0..T``."""
    c = tl.program_id(0)
    key, _ = _row_keys(task_ptr, gate_ptr, c, M, T, HAS_TASK, HAS_DROP, CH)
    counts = tl.histogram(key, NBP)
    k = tl.arange(0, NBP)
    tl.store(hist_ptr + k * num_chunks + c, counts, mask=k <= T)


@triton.jit(do_not_specialize=_BATCH_ARGS)
def _sched_scan_kernel(hist_ptr, seg_off_ptr, n, num_chunks, M, T, BLOCK: tl.constexpr):
    """Exclusive scan of ``hist [n = (T + 1) * num_chunks]`` in place (one program, blocks with a
    running carry); ``seg_off[k]`` = the scanned value at ``(k, chunk 0)``, ``seg_off[T + 1] = M``."""
    offs = tl.arange(0, BLOCK)
    carry = tl.zeros((), dtype=tl.int32)
    for base in range(0, n, BLOCK):
        i = base + offs
        m = i < n
        v = tl.load(hist_ptr + i, mask=m, other=0)
        incl = tl.cumsum(v, axis=0)
        excl = carry + incl - v
        tl.store(hist_ptr + i, excl, mask=m)
        tl.store(seg_off_ptr + i // num_chunks, excl, mask=m & (i % num_chunks == 0))
        carry += tl.sum(v, axis=0)
    if num_chunks == 0:  # no rows: every segment is empty
        k = tl.arange(0, BLOCK)
        for k0 in range(0, T + 1, BLOCK):
            tl.store(seg_off_ptr + k0 + k, tl.zeros((BLOCK,), dtype=tl.int32), mask=k0 + k <= T)
    tl.store(seg_off_ptr + T + 1, M)


@triton.jit
def _count_equal_run(k_a, n_a, k_b, n_b):
    """Combine of a scan over a *sorted* key sequence: ``n`` = elements so far equal to the
    current key (associative because equal keys are contiguous)."""
    return k_b, n_b + tl.where(k_a == k_b, n_a, 0)


@triton.jit(do_not_specialize=_BATCH_ARGS)
def _sched_scatter_kernel(task_ptr, gate_ptr, hist_ptr, perm_ptr, M, T, num_chunks,
                          HAS_TASK: tl.constexpr, HAS_DROP: tl.constexpr, CH: tl.constexpr):
    """``perm[hist[key, c] + rank] = row`` for the rows of chunk ``c`` (``hist`` scanned)."""
    c = tl.program_id(0)
    key, pos = _row_keys(task_ptr, gate_ptr, c, M, T, HAS_TASK, HAS_DROP, CH)
    order = tl.sort(key * CH + pos)  # by key, then by position: stable
    skey = order // CH
    spos = order % CH
    _, run = tl.associative_scan((skey, tl.full((CH,), 1, tl.int32)), 0, _count_equal_run)
    keep = skey <= T
    slot = tl.load(hist_ptr + skey * num_chunks + c, mask=keep, other=0) + run - 1
    tl.store(perm_ptr + slot, c * CH + spos, mask=keep)


@triton.jit(do_not_specialize=_BATCH_ARGS)
def _sched_tiles_kernel(seg_off_ptr, tile_seg_ptr, tile_start_ptr, tile_end_ptr, T, num_tiles,
                        BM: tl.constexpr, NBP: tl.constexpr, BP: tl.constexpr):
    """For tiles ``pid*BP ..``: segment ``s`` (the one whose tile range holds the tile), and
    ``[start, end)`` = ``seg_off[s] + [i BM, min((i + 1) BM, count_s))`` for its ``i``-th tile.
    Tiles past the last segment's get ``(T, 0, 0)``."""
    s = tl.arange(0, NBP)
    smask = s <= T
    lo = tl.load(seg_off_ptr + s, mask=smask, other=0)
    hi = tl.load(seg_off_ptr + s + 1, mask=smask, other=0)
    ntiles = (hi - lo + BM - 1) // BM
    tiles_end = tl.cumsum(ntiles, axis=0)  # exclusive end of each segment's tiles
    first = tiles_end - ntiles
    tile = tl.program_id(0) * BP + tl.arange(0, BP)
    inside = (tile[:, None] >= first[None, :]) & (tile[:, None] < tiles_end[None, :]) & smask[None, :]
    seg = tl.sum(tl.where(inside, s[None, :], 0), axis=1)
    found = tl.sum(inside.to(tl.int32), axis=1) > 0
    start = tl.sum(tl.where(inside, lo[None, :] + (tile[:, None] - first[None, :]) * BM, 0), axis=1)
    end = tl.minimum(start + BM, tl.sum(tl.where(inside, hi[None, :], 0), axis=1))
    tmask = tile < num_tiles
    tl.store(tile_seg_ptr + tile, tl.where(found, seg, T), mask=tmask)
    tl.store(tile_start_ptr + tile, tl.where(found, start, 0), mask=tmask)
    tl.store(tile_end_ptr + tile, tl.where(found, end, 0), mask=tmask)
