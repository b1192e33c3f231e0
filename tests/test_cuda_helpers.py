"""GPU tier of the extension's CUDA helpers (``csrc/tarp_cuda.cu``) and of the Triton path's row
schedule built from them.

``tarp_fast::compact_rows``, ``tarp_fast::group_by_task`` (a stable counting sort of the rows by
key: the task, or the dropped bucket for gated-off rows and out-of-range tasks) and
``tarp_fast::segmented_sum`` (deterministic per-segment column sums) against CPU references,
``torch.library.opcheck``, bitwise determinism, no host synchronization
(``torch.cuda.set_sync_debug_mode("error")``) and CUDA-graph capture; then
:func:`tarp_fast.kernels._schedule.row_groups_cuda` against the torch-ops schedule and a whole
Triton call with ``TARP_FAST_CUDA_HELPERS=1`` against one without. Skipped without a CUDA GPU or
without a CUDA build of ``tarp_fast._C`` (``pip install --no-build-isolation .`` with nvcc).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from tarp_fast.testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.native]


@pytest.fixture(scope="module")
def dev():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: the GPU tier needs a GPU")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from tarp_fast import _native
    from tarp_fast._ext import ext_info

    info = ext_info()
    if not info["cuda"]["built"]:
        pytest.skip(f"tarp_fast._C has no CUDA part: {info['cuda']['reason'] or info['reason']}")
    assert _native.unavailable_reason() is None  # also registers the helpers' fake kernels
    return torch.device("cuda")


def _ops():
    return torch.ops.tarp_fast


@contextlib.contextmanager
def _no_host_sync():
    """Any host synchronization inside the block raises (the ops must be CUDA-graph safe)."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def _stable_sort_ref(keys: torch.Tensor, nbuckets: int):
    """(perm, counts, offsets) of a stable sort of integer keys in [0, nbuckets), on CPU."""
    keys = keys.cpu()
    perm = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys, minlength=nbuckets)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return perm, counts, offsets


def _gate(M, dtype, dev, seed, zero_every=3):
    g = torch.Generator().manual_seed(seed)
    gate = torch.rand(M, generator=g) + 0.1
    gate[::zero_every] = 0.0
    return gate.to(dtype).to(dev)


# ---- compact_rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [0, 1, 37, 1024, 1025, 5000])
def test_compact_rows_against_a_stable_sort(dev, M, dtype):
    gate = _gate(M, dtype, dev, seed=M)
    with _no_host_sync():
        rows, count = _ops().compact_rows(gate)
    keys = (gate.float() == 0).long()
    perm, counts, _ = _stable_sort_ref(keys, 2)
    assert rows.dtype == torch.int64 and count.dtype == torch.int64 and count.shape == (1,)
    assert torch.equal(rows.cpu(), perm), "kept rows in order, then the dropped rows in order"
    assert int(count.item()) == int(counts[0])


def test_compact_rows_all_kept_and_all_dropped(dev):
    for gate, kept in ((torch.ones(3000, device=dev), 3000), (torch.zeros(3000, device=dev), 0)):
        rows, count = _ops().compact_rows(gate)
        assert torch.equal(rows.cpu(), torch.arange(3000)) and int(count.item()) == kept


# ---- group_by_task ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_gate", [False, True])
@pytest.mark.parametrize("T", [1, 3, 17, 1000])
@pytest.mark.parametrize("M", [0, 1, 1000, 4099])
def test_group_by_task_against_a_stable_sort(dev, M, T, with_gate):
    g = torch.Generator().manual_seed(M * 7 + T)
    task = torch.randint(0, T, (M,), generator=g)
    if M > 10:  # out-of-range indices go to the dropped bucket T (no sync to report them)
        task[3], task[7] = -1, T + 2
    gate = _gate(M, torch.float32, dev, seed=T) if with_gate else None
    task_d = task.to(dev)  # a pageable host-to-device copy syncs: outside the checked block
    with _no_host_sync():
        perm, counts, offsets = _ops().group_by_task(task_d, T, gate)
    keys = task.clone()
    keys[(keys < 0) | (keys >= T)] = T
    if gate is not None:
        keys[gate.cpu() == 0] = T
    ref_perm, ref_counts, ref_offsets = _stable_sort_ref(keys, T + 1)
    assert perm.shape == (M,) and counts.shape == (T + 1,) and offsets.shape == (T + 2,)
    assert torch.equal(perm.cpu(), ref_perm)
    assert torch.equal(counts.cpu(), ref_counts) and torch.equal(offsets.cpu(), ref_offsets)


def test_group_by_task_bucket_limit_is_a_clear_error(dev):
    task = torch.zeros(10, dtype=torch.int64, device=dev)
    with pytest.raises(ValueError, match="at most 8191 tasks"):
        _ops().group_by_task(task, 8192, None)
    perm, counts, offsets = _ops().group_by_task(task, 8191, None)  # the largest allowed
    assert torch.equal(perm.cpu(), torch.arange(10)) and int(counts[0].item()) == 10


def test_helpers_validate_their_arguments(dev):
    with pytest.raises(RuntimeError, match="'gate' must be a CUDA tensor"):
        _ops().group_by_task(torch.zeros(4, dtype=torch.int64, device=dev), 2, torch.ones(4))
    with pytest.raises(TypeError, match="'task_index' must be int64"):
        _ops().group_by_task(torch.zeros(4, dtype=torch.int32, device=dev), 2, None)
    with pytest.raises(ValueError, match="'gate' must be \\[M\\]"):
        _ops().group_by_task(torch.zeros(4, dtype=torch.int64, device=dev), 2, torch.ones(5, device=dev))
    with pytest.raises(ValueError, match="'gate' must be \\[M\\]"):
        _ops().compact_rows(torch.ones(2, 2, device=dev))
    with pytest.raises(TypeError, match="'offsets' must be int64"):
        _ops().segmented_sum(torch.ones(4, 2, device=dev), None, torch.zeros(2, dtype=torch.int32, device=dev))


# ---- segmented_sum ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_perm", [False, True])
@pytest.mark.parametrize("D", [1, 33, 300])
def test_segmented_sum_against_float64(dev, D, with_perm, dtype):
    M, T = 3000, 6
    g = torch.Generator().manual_seed(D)
    values = torch.randn(M, D, generator=g).to(dtype)
    task = torch.randint(0, T, (M,), generator=g)
    task[task == 4] = 2  # segment 4 is empty
    keys = task if with_perm else torch.sort(task).values
    perm, counts, offsets = _stable_sort_ref(keys, T)
    values_d, perm_d, offsets_d = values.to(dev), perm.to(dev) if with_perm else None, offsets.to(dev)
    with _no_host_sync():
        out = _ops().segmented_sum(values_d, perm_d, offsets_d)
    assert out.shape == (T, D) and out.dtype == dtype
    rows = perm if with_perm else torch.arange(M)
    v64 = values.double()[rows]
    ref = torch.stack([v64[offsets[s]:offsets[s + 1]].sum(0) for s in range(T)])
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    err = rel_err(out, ref)
    assert err <= tol, f"segmented_sum {dtype}: rel err {err:.2e} > {tol:.0e}"
    assert torch.equal(out[4].cpu(), torch.zeros(D, dtype=dtype)), "an empty segment sums to 0"
    again = _ops().segmented_sum(values_d, perm_d, offsets_d)
    assert torch.equal(out, again), "deterministic: no atomics"


# ---- registration, capture ----------------------------------------------------------------------


def test_opcheck(dev):
    M, T = 2500, 5
    task = torch.randint(0, T, (M,), device=dev)
    gate = _gate(M, torch.float32, dev, seed=1)
    torch.library.opcheck(torch.ops.tarp_fast.compact_rows.default, (gate,))
    torch.library.opcheck(torch.ops.tarp_fast.group_by_task.default, (task, T, gate))
    torch.library.opcheck(torch.ops.tarp_fast.group_by_task.default, (task, T, None))
    perm, _, offsets = _ops().group_by_task(task, T, None)
    values = torch.randn(M, 40, device=dev)
    torch.library.opcheck(torch.ops.tarp_fast.segmented_sum.default, (values, perm, offsets))
    torch.library.opcheck(torch.ops.tarp_fast.segmented_sum.default, (values, None, offsets))


def test_cuda_graph_capture_equals_eager(dev):
    M, T = 3000, 7
    task = torch.randint(0, T, (M,), device=dev)
    gate = _gate(M, torch.float32, dev, seed=2)
    values = torch.randn(M, 64, device=dev)

    def step():
        perm, _, offsets = _ops().group_by_task(task, T, gate)
        rows, kept = _ops().compact_rows(gate)
        return perm, offsets, rows, kept, _ops().segmented_sum(values, perm, offsets)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    task.copy_(torch.randint(0, T, (M,), device=dev))
    gate.copy_(_gate(M, torch.float32, dev, seed=3, zero_every=5))
    values.copy_(torch.randn(M, 64, device=dev))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)


# ---- the Triton path's schedule -----------------------------------------------------------------


@pytest.mark.parametrize("case", ["tasks", "tasks-hard-skip", "hard-skip-only"])
def test_triton_schedule_from_the_helpers_equals_the_torch_one(dev, case):
    pytest.importorskip("triton")
    from tarp_fast.kernels import _schedule

    M, T = 4099, 5 if case != "hard-skip-only" else 1
    task = torch.randint(0, T, (M,), device=dev) if case != "hard-skip-only" else None
    gate = _gate(M, torch.float32, dev, seed=4) if case != "tasks" else None
    with _no_host_sync():
        perm_c, off_c = _schedule.row_groups_cuda(M, T, task, gate)
    perm_t, off_t = _schedule.row_groups(M, T, task, None if gate is None else gate == 0, dev)
    assert perm_c.dtype == perm_t.dtype == torch.int32
    assert torch.equal(off_c, off_t) and torch.equal(perm_c, perm_t)


def test_triton_call_with_the_helpers_equals_without(dev, monkeypatch):
    pytest.importorskip("triton")
    from tarp_fast.kernels import _schedule, tarp_linear_triton

    g = torch.Generator().manual_seed(5)
    M, K, N, r, T = 777, 128, 96, 8, 3
    rn = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dev, torch.bfloat16)  # noqa: E731
    args = dict(x=rn(M, K), weight=rn(N, K), bias=rn(N), U=rn(T, N, r), V=rn(T, r, K), G=rn(T, r * r, K))
    gate = (torch.rand(M, generator=g) + 0.1).to(dev)
    gate[::4] = 0
    kw = dict(task_index=torch.randint(0, T, (M,), generator=g).to(dev), gate=gate, hard_skip=True,
              activation="gelu_tanh", scaling=0.5)
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("TARP_FAST_CUDA_HELPERS", flag)
        assert _schedule.use_cuda_helpers(dev) == (flag == "1")
        leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()}
        y = tarp_linear_triton(*leaves.values(), **kw)
        y.float().square().sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves.values()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_per_task_gate_gradient_through_segmented_sum(dev, monkeypatch):
    """With the helpers on, a per-task gate's gradient is summed per task by ``segmented_sum``:
    equal to torch's indexing backward up to summation order, and bitwise the same every run."""
    pytest.importorskip("triton")
    from tarp_fast.kernels import tarp_linear_triton

    g = torch.Generator().manual_seed(6)
    M, K, N, r, T = 3001, 64, 64, 4, 4
    rn = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dev)  # noqa: E731
    x, w, U, V, G = rn(M, K), rn(N, K), rn(T, N, r), rn(T, r, K), rn(T, r * r, K)
    task = torch.randint(0, T, (M,), generator=g).to(dev)
    grads = {}
    for flag in ("0", "1", "1"):
        monkeypatch.setenv("TARP_FAST_CUDA_HELPERS", flag)
        gate = torch.linspace(0.5, 1.5, T, device=dev).requires_grad_()
        y = tarp_linear_triton(x, w, None, U, V, G, task_index=task, gate=gate, scaling=0.5)
        y.square().sum().backward()
        grads.setdefault(flag, []).append(gate.grad)
    torch.testing.assert_close(grads["1"][0], grads["0"][0], rtol=1e-4, atol=1e-3)  # summation order
    assert torch.equal(grads["1"][0], grads["1"][1])
