"""Compile tier: every Triton kernel and config compiles for sm_90 and sm_80 without spills.

No GPU needed: ``python -m tarp_fast.kernels.compile_check`` compiles with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` and Triton's own ptxas.
The interpreter tier cannot catch these failures (it accepts e.g. ``tl.dot`` with a dimension
below 16), so this tier is required. It takes about 4 minutes on 2 cores with a cold Triton cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.compile

triton = pytest.importorskip("triton")


def _nvidia_backend_missing():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the Triton build
        return f"Triton has no NVIDIA backend here: {exc}"
    return None


@pytest.fixture(scope="module")
def compile_report():
    reason = _nvidia_backend_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    proc = subprocess.run([sys.executable, "-m", "tarp_fast.kernels.compile_check", "-j", jobs],
                          capture_output=True, text=True, env=env, timeout=1200)
    return proc


def test_every_kernel_and_config_compiles_without_spills(compile_report):
    out = compile_report.stdout + compile_report.stderr
    assert compile_report.returncode == 0, out[-6000:]
    summary = re.search(r"compile_check: (\d+)/(\d+) ok, 0 failed", out)
    assert summary and summary.group(1) == summary.group(2), out[-3000:]
    rows = [line for line in out.splitlines() if line.startswith("_")]
    assert len(rows) == int(summary.group(2))
    for arch in ("90", "80"):
        assert any(re.search(rf"\s{arch}\s", line) for line in rows), f"no sm_{arch} compiles"


def test_hopper_uses_wgmma_and_ampere_mma(compile_report):
    """16-bit GEMM kernels must reach the tensor cores: HGMMA (wgmma) on sm_90, mma.sync on sm_80."""
    rows = [line.split() for line in compile_report.stdout.splitlines() if line.startswith("_tarp_")]
    gemm = [r for r in rows if r[0] in ("_tarp_fwd_kernel", "_tarp_proj_kernel", "_tarp_bwd_dx_kernel",
                                        "_tarp_bwd_dx_concat_kernel", "_tarp_wgrad_kernel")
            and r[1].startswith(("bfloat16", "float16"))]
    assert gemm, compile_report.stdout[-2000:]
    for r in gemm:
        arch, mma = r[3], r[7]
        assert mma.split("+")[0] == ("wgmma" if arch == "90" else "mma"), " ".join(r)
    # tma=True configs really issue TMA bulk tensor copies on sm_90 (and only they do)
    # (the dx variant without the dx GEMM reads no weight, and grouped rows of the pre-pass, its
    # only TMA operand being x, take no TMA)
    tma = [r for r in rows if r[3] == "90" and r[2].endswith("/tma") and not r[1].endswith("rterms-only")
           and not (r[0] == "_tarp_proj_kernel" and not r[1].endswith("-plain"))]
    assert {r[0] for r in tma} == {"_tarp_fwd_kernel", "_tarp_bwd_dx_kernel", "_tarp_bwd_dx_concat_kernel",
                                   "_tarp_proj_kernel"}, tma
    assert tma and all(r[7] == "wgmma+tma" for r in tma), tma
    assert not any(r[7].endswith("+tma") for r in rows if not r[2].endswith("/tma"))


def test_every_kernel_is_in_the_compile_set():
    """A kernel added to _kernels.py or _schedule_kernels.py without a compile job would escape
    this tier."""
    import triton as _triton
    from tarp_fast.kernels import _kernels, _schedule_kernels
    from tarp_fast.kernels.compile_check import build_jobs

    kernels = {name for module in (_kernels, _schedule_kernels) for name, obj in vars(module).items()
               if isinstance(obj, _triton.runtime.jit.JITFunction) and name.endswith("_kernel")}
    assert {"_sched_hist_kernel", "_sched_scan_kernel", "_sched_scatter_kernel", "_sched_tiles_kernel"} <= kernels
    covered = {j.kernel for j in build_jobs(quick=True)}
    assert kernels == covered, f"not compiled: {sorted(kernels - covered)}"


def test_every_candidate_and_default_config_is_compiled():
    from tarp_fast.kernels._configs import all_defaults, candidates
    from tarp_fast.kernels.compile_check import _cfg_name, build_plans

    for arch in (90, 80):
        compiled = {(p.name, cname) for _, cname, p in build_plans(arch)}
        names = {p.name for _, _, p in build_plans(arch, quick=True)}
        for kernel, launch_name in (("fwd", "fwd"), ("dx", "dx"), ("dx_concat", "dx_concat"), ("wgrad", "wgrad"),
                                    ("proj", "proj")):
            assert launch_name in names
            for cfg in candidates(kernel, arch) + all_defaults(kernel, "16", arch):
                assert (launch_name, _cfg_name(cfg)) in compiled, (arch, kernel, cfg)


def test_rank_above_16_takes_the_wide_tiles_where_a_table_has_them():
    from tarp_fast.kernels._configs import KernelConfig, default_config

    # sm_80: the forward and dx have their own r > 16 tiles (the r <= 16 ones spill there)
    assert default_config("fwd", "many-rows-16bit", rank=32, arch=80) == KernelConfig(64, 64, 64, num_warps=4)
    assert default_config("fwd", "many-rows-16bit", rank=16, arch=80) == KernelConfig(128, 64, 64, num_warps=8)
    assert default_config("dx", "many-rows-16bit", rank=32, arch=80) == KernelConfig(64, 64, 32, num_warps=4)
    # sm_90: the forward has one tile for every rank, dx halves its K tile
    assert default_config("fwd", "many-rows-16bit", rank=32, arch=90) == default_config("fwd", "many-rows-16bit", arch=90)
    assert default_config("dx", "many-rows-16bit", rank=32, arch=90) == KernelConfig(128, 64, 64, num_warps=8)


def test_compile_jobs_carry_the_jits_specialization():
    """The compile tier compiles what the JIT would (its own binder, through
    ``precompile.capture``): the batch-dependent integers (rows, tasks, tile counts) are not
    specialized, the model dimensions are (divisibility by 16), and the options are the JIT's."""
    from tarp_fast.kernels.compile_check import build_jobs

    jobs = [j for j in build_jobs(archs=(90,), quick=True) if j.kernel == "_tarp_fwd_kernel"]
    assert jobs
    for j in jobs:
        names = list(j.signature)
        attrs = {names[k[0]]: v for k, v in j.attrs.items()}
        for batch in ("M", "num_m", "num_n"):
            assert j.signature[batch] == "i32" and not attrs.get(batch), (batch, j.signature, attrs)
        assert ["tt.divisibility", 16] in attrs["K"] and ["tt.divisibility", 16] in attrs["N"]
        assert j.options["num_warps"] == j.num_warps and j.options["arch"] == "sm90"


def test_a_new_batch_size_compiles_nothing_new():
    """Rows are not specialized: after one call, calls with other batch sizes (odd, even, a
    multiple of 16, one row; decode-sized ones take the small tiles of their own shape class)
    record no new specialization; with every argument specialized (as before) they did."""
    import torch
    from tarp_fast.kernels import precompile, tarp_linear_triton

    def call(M):
        x = torch.empty(M, 256, dtype=torch.bfloat16, requires_grad=True)
        W = torch.empty(256, 256, dtype=torch.bfloat16)
        U, V, G = (torch.empty(*s, dtype=torch.bfloat16, requires_grad=True) for s in ((256, 8), (8, 256),
                                                                                          (64, 256)))
        y = tarp_linear_triton(x, W, None, U, V, G)
        torch.autograd.grad(y, [x, U, V, G], torch.empty_like(y))

    counts = {}
    for every in (False, True):
        with precompile.capture(90, specialize_all=every) as cap:
            call(8192)
            first = len(cap.specs)
            for M in (8191, 1000, 777, 4096 + 16):
                call(M)
            counts[every] = (first, len(cap.specs))
    assert counts[False][0] == counts[False][1], counts
    assert counts[True][1] > counts[True][0], counts


def test_precompiled_kernels_are_what_the_jit_loads(tmp_path, monkeypatch):
    """``precompile.compile_specs`` (the GPU run's parallel precompile, and a cache built on a CPU
    machine) writes the cache entries the JIT's own compile path then finds: the same key, a hit."""
    import torch
    import triton
    from tarp_fast.kernels import precompile, tarp_linear_triton

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))

    def call():
        x = torch.empty(100, 64, dtype=torch.float16)
        tarp_linear_triton(x, torch.empty(48, 64, dtype=torch.float16))  # the forward kernel alone

    with precompile.capture(90) as cap:
        call()
    assert len(cap.specs) == 1
    (res,) = precompile.compile_specs(list(cap.specs.values()), 1)
    assert res["ok"] and not res["cache_hit"], res
    hits = []
    monkeypatch.setattr(triton.knobs.compilation, "listener", lambda **kw: hits.append(kw["cache_hit"]))
    with precompile.capture(90, compile=True):
        call()
    assert hits == [True]
