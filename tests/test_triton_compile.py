"""Compile tier: every Triton kernel and config compiles for sm_90 and sm_80 without spills.

No GPU needed: ``python -m tarp_fast.kernels.compile_check`` compiles with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` and Triton's own ptxas.
The interpreter tier cannot catch these failures (it accepts e.g. ``tl.dot`` with a dimension
below 16), so this tier is required. It takes about 3 minutes on 2 cores with a cold Triton cache.
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
                                        "_tarp_wgrad_kernel") and r[1].startswith(("bfloat16", "float16"))]
    assert gemm, compile_report.stdout[-2000:]
    for r in gemm:
        arch, mma = r[3], r[7]
        assert mma.split("+")[0] == ("wgmma" if arch == "90" else "mma"), " ".join(r)
    # tma=True configs really issue TMA bulk tensor copies on sm_90 (and only they do)
    # (the dx variant without the dx GEMM reads no weight, and grouped rows of the pre-pass, its
    # only TMA operand being x, take no TMA)
    tma = [r for r in rows if r[3] == "90" and r[2].endswith("/tma") and not r[1].endswith("rterms-only")
           and not (r[0] == "_tarp_proj_kernel" and not r[1].endswith("-plain"))]
    assert {r[0] for r in tma} == {"_tarp_fwd_kernel", "_tarp_bwd_dx_kernel", "_tarp_proj_kernel"}, tma
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
        for kernel, launch_name in (("fwd", "fwd"), ("dx", "dx"), ("wgrad", "wgrad"), ("proj", "proj")):
            assert launch_name in names
            for cfg in candidates(kernel, arch) + all_defaults(kernel, "16", arch):
                assert (launch_name, _cfg_name(cfg)) in compiled, (arch, kernel, cfg)


def test_rank_above_16_takes_the_wide_tiles_where_a_table_has_them():
    from tarp_fast.kernels._configs import KernelConfig, default_config

    # sm_80: the forward and dx have their own r > 16 tiles (the r <= 16 ones spill there)
    assert default_config("fwd", "large16", rank=32, arch=80) == KernelConfig(64, 64, 64, num_warps=4)
    assert default_config("fwd", "large16", rank=16, arch=80) == KernelConfig(128, 64, 64, num_warps=8)
    assert default_config("dx", "large16", rank=32, arch=80) == KernelConfig(64, 64, 32, num_warps=4)
    # sm_90: the forward has one tile for every rank, dx halves its K tile
    assert default_config("fwd", "large16", rank=32, arch=90) == default_config("fwd", "large16", arch=90)
    assert default_config("dx", "large16", rank=32, arch=90) == KernelConfig(128, 64, 64, num_warps=8)
