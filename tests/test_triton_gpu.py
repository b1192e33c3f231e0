"""GPU tier of the Triton backend: runs wherever a CUDA GPU is present (``pytest -m gpu``).

bf16 / fp16 / fp32 (with and without TF32) against the float64 reference by the rule of
``tarp_fast.testing`` (error at most 2x eager's at the same precision, NaN-poisoned outputs), both designs
of the backward's dx pass, LLM shapes, ``torch.library.opcheck``, bitwise determinism over
repeated runs, ``torch.compile(fullgraph=True)`` of a ``TARPLinear`` forward and backward, and
CUDA-graph capture (the op never syncs with the host). The cheap, most telling checks come first
(the GPU run, ``benchmarks/gpu_run.py``, may be cut short). Nothing here touches ``torch.cuda``
at import: the skip is decided in a fixture.

``TARP_FAST_GPU_TESTS`` selects how the file runs:

* ``gpu`` (default): on a CUDA GPU, skipped without one;
* ``dry``: the same test bodies on CPU tensors under ``TRITON_INTERPRET=1`` with small shapes
  (bf16 runs as fp16: the interpreter has no bf16; CUDA-only steps such as graph capture are
  left out), so that a bug in a test costs no GPU time (``benchmarks/gpu_run.py --dry-run``);
* ``capture``: CPU tensors, the GPU shapes (the LLM shape with 256 rows: rows are not
  specialized), launches recorded by :func:`tarp_fast.kernels.precompile.capture` instead of run:
  counts the kernel specializations this tier compiles on a GPU (results are garbage, so no
  result is checked). ``TARP_FAST_CAPTURE_OUT=file.json`` receives the count and the specs.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from tarp_fast.testing import ARG_NAMES, Problem, compare, make_problem, tf32

pytestmark = pytest.mark.gpu

MODE = os.environ.get("TARP_FAST_GPU_TESTS", "gpu").strip().lower() or "gpu"
if MODE not in ("gpu", "dry", "capture"):
    raise ValueError(f"TARP_FAST_GPU_TESTS={MODE!r}: expected gpu, dry or capture")
ON_GPU, DRY, CAPTURE = MODE == "gpu", MODE == "dry", MODE == "capture"



def _sz(full, dry):
    """A size: ``full`` on the GPU (and when capturing), ``dry`` under the interpreter."""
    return dry if DRY else full


def _dt(dtype):
    """The dtype a test runs: bf16 becomes fp16 in the dry run (the interpreter has no bf16)."""
    return torch.float16 if DRY and dtype == torch.bfloat16 else dtype


def _check(cond, msg=""):
    """``assert`` on results, except when capturing (the results are garbage there)."""
    if not CAPTURE:
        assert cond, msg


@pytest.fixture(scope="module")
def dev():
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    pytest.importorskip("triton")
    if DRY:
        if not interp:
            pytest.skip("TARP_FAST_GPU_TESTS=dry needs TRITON_INTERPRET=1 set before Python starts")
        return torch.device("cpu")
    if interp:
        pytest.skip("TRITON_INTERPRET is set: the GPU tier needs the compiled kernels")
    if CAPTURE:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return torch.device("cuda")


@pytest.fixture(scope="session", autouse=True)
def _capture_launches():
    """Under ``TARP_FAST_GPU_TESTS=capture``: record every launch of the session (sm_90 unless
    ``TARP_FAST_CAPTURE_ARCH``; ``TARP_FAST_CAPTURE_SPECIALIZE_ALL=1`` counts as if no argument
    were exempt from specialization) and write the count to ``TARP_FAST_CAPTURE_OUT``."""
    if not CAPTURE or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        yield
        return
    from tarp_fast.kernels import precompile

    arch = int(os.environ.get("TARP_FAST_CAPTURE_ARCH", "90"))
    every = os.environ.get("TARP_FAST_CAPTURE_SPECIALIZE_ALL", "0") not in ("", "0")
    with precompile.capture(arch, specialize_all=every) as cap:
        yield
    print("\ncapture:", cap.summary())
    out = os.environ.get("TARP_FAST_CAPTURE_OUT")
    if out:
        with open(out, "w") as fh:
            json.dump(dict(cap.to_json(), specialize_all=every), fh, indent=1)
        precompile.save_specs(cap.specs.values(), out + ".specs")


@pytest.fixture
def tf32_off():
    with tf32(False):
        yield


def _case(dev, M, K, N, r, T, q, *, seed=0, gate=True, skip=True, hard_skip=False, activation="gelu_tanh"):
    """``(args, keywords)`` of one call in float64 on ``dev`` from :func:`tarp_fast.testing.make_problem`
    (residual always; a per-row gate with zero rows and a per-row skip gate unless turned off)."""
    p = make_problem(M, K, N, r, q, T, scale=bool(q), gate="zero_rows" if gate else None,
                     skip_gate="row" if skip else None, residual=True, activation=activation,
                     hard_skip=hard_skip, scaling=0.5, seed=seed, device=dev)
    kw = dict(p.kw)
    return dict(zip(ARG_NAMES, p.args()), residual=kw.pop("residual")), kw


def _compare(a, kw, dtype, grads=True):
    """The kernels against the float64 reference by the oracle's rule (tarp_fast.testing)."""
    from tarp_fast.kernels import poison_outputs, tarp_linear_triton

    p = Problem(*(a[n] for n in ARG_NAMES), kw=dict(kw, residual=a["residual"]))
    compare(tarp_linear_triton, p, _dt(dtype), grads=grads, poison=poison_outputs, check=not CAPTURE)


# ---- first: the dtype matrix against float64 (what every later figure rests on) -------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hard_skip", [False, True])
def test_dtypes_against_float64(dev, dtype, hard_skip, tf32_off):
    a, kw = _case(dev, M=_sz(777, 45), K=_sz(384, 40), N=_sz(384, 40), r=16, T=4, q=4, hard_skip=hard_skip)
    _compare(a, kw, dtype)


def test_fp32_with_tf32(dev):
    """TF32 on (through torch's new ``fp32_precision`` API where it exists, which the launchers
    read): fp32 ``tl.dot`` in TF32, against float64 with eager (also TF32) setting the bar."""
    with tf32(True):
        a, kw = _case(dev, M=_sz(513, 33), K=_sz(256, 32), N=_sz(256, 32), r=4, T=None, q=0)
        _compare(a, kw, torch.float32)  # eager uses TF32 too: same rule


@pytest.mark.parametrize("design", ["fused", "concat"])
@pytest.mark.parametrize("r", [16, 32])
def test_dx_designs_against_float64(dev, design, r, tf32_off):
    """Both designs of the backward's dx pass (``TARP_FAST_DX``), bf16 and fp32, with tasks and
    hard skip (rows regrouped) and without (rows in order)."""
    from tarp_fast.kernels import use_dx_design

    with use_dx_design(design):
        for T, hard in ((3, True), (None, False)):
            # K != N: no skip gate (it needs N == K)
            a, kw = _case(dev, M=_sz(700, 37), K=_sz(320, 32), N=_sz(384, 40), r=r, T=T, q=0, hard_skip=hard,
                          skip=False)
            _compare(a, kw, torch.bfloat16)
        _compare(a, kw, torch.float32)


@pytest.mark.parametrize("r", [4, 16, 32])
def test_llm_shape_bf16(dev, r):
    """K = N = 4096 (M = 8192 on the GPU): forward and a frozen-base backward (x and the adapter)
    against float64."""
    from tarp_fast.kernels import tarp_linear_triton

    M, K = _sz(256 if CAPTURE else 8192, 40), _sz(4096, 48)
    p = make_problem(M, K, K, r, bias=False, scale=False, dtype=torch.float32, seed=r, device=dev)
    compare(tarp_linear_triton, p, _dt(torch.bfloat16), wrt=("x", "U", "V", "G"), check=not CAPTURE,
            what=f"K=N={K}, r={r}")


@pytest.mark.parametrize("tasks", [False, True])
def test_tma_configs_against_float64(dev, tasks, tf32_off):
    """The tma=True forward and dx candidates (TMA descriptors for x / dpre and the weight; the
    weight only with tasks) in bf16 and fp32, against float64 like every other config."""
    from tarp_fast.kernels import KernelConfig, use_config

    a, kw = _case(dev, M=_sz(777, 45), K=_sz(384, 48), N=_sz(384, 48), r=16, T=4 if tasks else None, q=0)
    if DRY:  # interpreter: small tiles (the same code paths)
        big = dict(fwd=KernelConfig(16, 16, 16, num_warps=1, num_stages=1, tma=True),
                   dx=KernelConfig(16, 16, 32, num_warps=1, num_stages=1, tma=True))
        small = big
    else:
        big = dict(fwd=KernelConfig(128, 128, 64, num_warps=8, num_stages=3, tma=True),
                   dx=KernelConfig(128, 64, 128, num_warps=8, num_stages=3, tma=True))
        small = dict(fwd=KernelConfig(64, 64, 32, num_warps=8, num_stages=3, tma=True),
                     dx=KernelConfig(64, 32, 32, num_warps=8, num_stages=3, tma=True))
    with use_config(**big):
        _compare(a, kw, torch.bfloat16)
    with use_config(**small):
        _compare(a, kw, torch.float32)


def test_opcheck(dev):
    from tarp_fast.kernels._custom_ops import triton_tarp_fwd

    a, kw = _case(dev, M=96, K=64, N=64, r=4, T=2, q=0)
    gate = kw["gate"].float()
    args = (a["x"].float().requires_grad_(), a["weight"].float().requires_grad_(), a["bias"].float(),
            a["U"].float().requires_grad_(), a["V"].float(), a["G"].float(), kw["task_index"],
            gate.requires_grad_(), kw["skip_gate"].float(), a["residual"].float(), 0.5, "gelu_tanh", True)
    if CAPTURE:
        triton_tarp_fwd(*args)  # opcheck compares runs: garbage here; one call records the launches
        return
    torch.library.opcheck(triton_tarp_fwd, args)


def test_deterministic_over_runs(dev):
    from tarp_fast.kernels import tarp_linear_triton

    a, kw = _case(dev, M=_sz(1000, 50), K=_sz(512, 32), N=_sz(512, 32), r=16, T=3, q=2, hard_skip=True)
    outs = []
    for _ in range(3):
        args = {k: v.to(_dt(torch.bfloat16)).detach().requires_grad_() if v is not None else None
                for k, v in a.items()}
        res = args.pop("residual")
        y = tarp_linear_triton(*[args[k] for k in ("x", "weight", "bias", "U", "V", "G", "P", "Q")],
                               residual=res, **kw)
        y.float().sum().backward()
        outs.append([y.detach()] + [t.grad for t in args.values() if t is not None])
    for run in outs[1:]:
        for u, v in zip(outs[0], run):
            _check(torch.equal(u, v))


def test_torch_compile_fullgraph_tarplinear(dev, monkeypatch):
    """Inductor on the GPU; the dry and capture runs trace with ``aot_eager`` (the same custom ops
    and launches, without compiling inductor's own CPU code)."""
    from tarp_fast import TARPLinear

    if CAPTURE:  # the module path accepts CPU tensors for backend="triton" only under the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # (the kernels are compiled ones: launches are recorded)

    D = _sz(256, 32)
    dt = _dt(torch.bfloat16)
    layer = TARPLinear(D, D, rank=8, device=dev, dtype=dt)
    torch.nn.init.normal_(layer.tarp_U, std=0.02)
    layer.backend = "triton"
    layer.weight.requires_grad_(False)
    x = torch.randn(4, _sz(100, 5), D, device=dev, dtype=dt, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    y = compiled(x)
    y.float().square().mean().backward()
    got = [x.grad.clone(), layer.tarp_U.grad.clone(), layer.tarp_G.grad.clone()]
    x.grad = None
    layer.zero_grad()
    layer(x).float().square().mean().backward()
    for g1, g2 in zip(got, [x.grad, layer.tarp_U.grad, layer.tarp_G.grad]):
        if not CAPTURE:
            torch.testing.assert_close(g1, g2, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("configs", ["default", "tma", "autotuned"])
def test_cuda_graph_capture(dev, configs, monkeypatch):
    """Forward and backward replay from a CUDA graph equal eager: no host sync in the op (also
    with TMA descriptors, which travel as kernel parameters, and with autotuning on: the eager
    warm-up tunes, the capture runs what it chose). Off the GPU: the eager steps only."""
    from tarp_fast.kernels import KernelConfig, _configs, tarp_linear_triton, use_config

    ctx = contextlib.nullcontext()
    if configs == "tma":
        cfg = KernelConfig(16, 16, 16, num_warps=1, num_stages=1, tma=True) if DRY else \
            KernelConfig(128, 128, 64, num_warps=8, num_stages=3, tma=True)
        ctx = use_config(fwd=cfg)
    if configs == "autotuned":
        monkeypatch.setenv("TARP_FAST_AUTOTUNE", "1")
        monkeypatch.setattr(_configs, "_tuned", {})
    with ctx:
        _graph_equals_eager(dev, tarp_linear_triton)
    if configs == "autotuned" and not DRY:  # (the interpreter never tunes: no CUDA timer)
        assert _configs._tuned


def _graph_equals_eager(dev, tarp_linear_triton):
    a, kw = _case(dev, M=_sz(512, 40), K=_sz(256, 32), N=_sz(256, 32), r=8, T=2, q=0, hard_skip=True)
    args = {k: v.to(_dt(torch.bfloat16)).detach() if v is not None else None for k, v in a.items()}
    U = args["U"].requires_grad_()
    static_x = args["x"].clone()

    def step():
        y = tarp_linear_triton(static_x, args["weight"], args["bias"], U, args["V"], args["G"],
                               residual=args["residual"], **kw)
        (gu,) = torch.autograd.grad(y.float().sum(), [U])
        return y, gu

    if not ON_GPU:
        y1, g1 = step()
        y2, g2 = step()
        _check(torch.equal(y1, y2) and torch.equal(g1, g2))
        return
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_s, gu_s = step()
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    y_e, gu_e = step()
    assert torch.equal(y_s, y_e) and torch.equal(gu_s, gu_e)


@pytest.mark.parametrize("M,T", [(1, 1), (5000, 8), (300_000, 8), (20_000, 1000)])
def test_triton_row_schedule_equals_the_torch_one(dev, M, T):
    """The Triton counting sort and tile table (the default schedule) against the torch-ops one,
    at sizes the interpreter cannot reach (300 chunks of 1024 rows; 1000 tasks), without a host
    sync (``set_sync_debug_mode("error")``). Dry run: the same steps at small sizes."""
    from tarp_fast.kernels import _schedule as S

    M, T = (_sz(M, min(M, 300)), _sz(T, min(T, 5)))
    g = torch.Generator(device=dev).manual_seed(M + T)
    task = torch.randint(-1, T + 1, (M,), device=dev, generator=g)  # a few out of range: dropped
    gate = (torch.rand(M, device=dev, generator=g) < 0.6).float()
    for ti, gt in ((task, None), (task, gate), (None, gate)):
        if ON_GPU:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            perm, seg_off = S.row_groups_triton(M, T, ti, gt)
            tables = [S.tile_table_triton(seg_off, M, T, BM) for BM in (64, 128)]
        finally:
            if ON_GPU:
                torch.cuda.set_sync_debug_mode(0)
        if CAPTURE:
            continue
        want_perm, want_off = S.row_groups(M, T, ti, None if gt is None else gt == 0, dev)
        assert torch.equal(perm, want_perm) and torch.equal(seg_off, want_off)
        for BM, got in zip((64, 128), tables):
            want = S.tile_table(want_off, M, T, BM)
            assert got[3] == want[3] and all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))


def test_out_of_range_tasks_get_the_dropped_rows_output(dev):
    """On CUDA task indices are not range-checked (a sync); a row whose task is out of range is
    scheduled like a row hard_skip drops: its output is the skip and residual part only (here 0),
    written (outputs are NaN-poisoned), and the other rows are unaffected. (On CPU, where the
    check is free, such indices are refused: the dry run checks that instead.)"""
    from tarp_fast.kernels import poison_outputs, tarp_linear_triton

    from tarp_fast import reference

    a, kw = _case(dev, M=200, K=64, N=64, r=4, T=3, q=0, gate=False, skip=False, activation="relu")
    ti = kw["task_index"].clone()
    bad = torch.zeros(200, dtype=torch.bool, device=dev)
    bad[::9] = True
    ti[::9] = torch.tensor([3, -1, 7], device=dev).repeat(23)[: int(bad.sum())]
    args = [a[k].float() for k in ("x", "weight", "bias", "U", "V", "G")]
    if DRY:
        with pytest.raises((ValueError, IndexError)):
            tarp_linear_triton(*args, task_index=ti, activation="relu", scaling=0.5)
        return
    if CAPTURE:  # CPU tensors: the range check refuses them before any launch; count valid ones
        ti = ti.clamp(0, 2)
    with poison_outputs():
        y = tarp_linear_triton(*args, task_index=ti, activation="relu", scaling=0.5)
    if CAPTURE:
        return
    assert torch.equal(y[bad], torch.zeros_like(y[bad]))
    ok = ~bad
    want = reference.tarp_linear(args[0][ok].double(), *[t.double() for t in args[1:]], task_index=ti[ok],
                                 activation="relu", scaling=0.5)
    torch.testing.assert_close(y[ok].double(), want, rtol=1e-3, atol=1e-3)


def test_autotuned_configs_against_float64(dev, monkeypatch):
    """TARP_FAST_AUTOTUNE=1: the forward, pre-pass, dx and weight-gradient kernels time their
    candidates (TMA ones among them on Hopper) on the first call of a key, and the configs they
    keep are correct (both dx designs)."""
    from tarp_fast.kernels import _configs, use_dx_design

    monkeypatch.setenv("TARP_FAST_AUTOTUNE", "1")
    saved = dict(_configs._tuned)
    _configs._tuned.clear()
    try:
        for T in (None, 3):
            a, kw = _case(dev, M=_sz(1000, 40), K=_sz(512, 32), N=_sz(512, 32), r=16, T=T, q=0)
            _compare(a, kw, torch.bfloat16)
        with use_dx_design("concat"):
            _compare(a, kw, torch.bfloat16)
        if not DRY:  # the interpreter never tunes (no CUDA timer)
            assert {k[0] for k in _configs._tuned} == {"fwd", "dx", "dx_concat", "proj", "wgrad"}, _configs._tuned
    finally:
        _configs._tuned.clear()
        _configs._tuned.update(saved)
