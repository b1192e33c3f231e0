"""The GPU run script (``benchmarks/gpu_run.py``) end to end on CPU: ``--dry-run``.

The GPU machine gives one call of a few minutes: a bug in the script, the report or the GPU tests
must cost none of it. The dry run takes the same steps with tiny shapes under the Triton
interpreter (the report with ``--dry-run``, ``tests/test_triton_gpu.py`` with
``TARP_FAST_GPU_TESTS=dry``, the kernels recorded and a sample compiled, the extension's build
command parsed, the CUDA helper tests collected), within its own time limits. About 1.5 minutes
on 2 cores. Marked ``interpreter``: ``make test`` runs it with the pinned toolchain and again with
the oldest supported one (``make test-compat``: Triton 3.6, as on the GPU machines).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gpu_run")
    env = {k: v for k, v in os.environ.items() if k not in ("TARP_FAST_DX", "TARP_FAST_AUTOTUNE")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_run.py"), str(out), "--dry-run",
                           "--budget", "240"], capture_output=True, text=True, env=env, timeout=420)
    return proc, out


def test_every_step_runs_and_the_summary_comes_last(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s["status"] for s in summary["steps"]}
    assert steps == {"precompile": "ok", "precompile_sample": "ok", "report": "ok", "gpu_tests": "ok",
                     "ext_build": "ok", "cuda_helpers": "ok", "autotune": "ok", "tests_precompile": "ok"}, steps
    text = (out / "summary.txt").read_text()
    assert proc.stdout.rstrip().endswith(text.rstrip())  # the one-screen summary is the last output
    assert len(text.splitlines()) < 60


def test_at_most_eight_files_come_back(dry_run):
    _, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert files == ["autotune.json", "autotune.md", "report.json", "report.md", "run.log", "summary.json",
                     "summary.txt"], files
    assert all(p.is_file() and p.stat().st_size < 16 * 2**20 for p in out.iterdir())


def test_the_gpu_tests_ran_their_bodies_and_are_named(dry_run):
    _, out = dry_run
    tests = json.loads((out / "summary.json").read_text())["tests"]
    triton = {k: v for k, v in tests.items() if k.startswith("tests/test_triton_gpu.py::")}
    assert len(triton) >= 25 and all(v["outcome"] == "passed" for v in triton.values()), \
        {k: v for k, v in triton.items() if v["outcome"] != "passed"}
    helpers = {k: v for k, v in tests.items() if k.startswith("tests/test_cuda_helpers.py::")}
    assert helpers and all(v["outcome"] == "skipped" for v in helpers.values())  # no GPU here


def test_the_report_has_every_section_and_goal(dry_run):
    _, out = dry_run
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "complete"
    assert not [r for r in rep["rows"] if not r.get("ok", True)]
    assert {r["section"] for r in rep["rows"]} == {"providers", "dx", "hard_skip", "tasks", "precision", "schedule"}
    goals = " / ".join(g["goal"] for g in rep["goals"])
    for part in ("r=16: fwd time / F.linear <= 1.10", "r=16: fwd+bwd time / F.linear fwd+bwd <= 1.25",
                 "speed-up over the eager reference >= 1.5", "hard skip kept 0.1", "8 tasks"):
        assert part in goals, goals
    assert rep["meta"]["dx_decision"]["faster"] in ("fused", "concat")
    assert {r["provider"] for r in rep["rows"] if r["section"] == "dx"} == {"fused", "concat"}
    md = (out / "report.md").read_text()
    assert md.startswith("# tarp-fast Triton GPU report") and "| goal |" in md
    assert json.loads((out / "autotune.json").read_text())["meta"]["configs"].startswith("autotuned")


def test_kernels_were_recorded_compiled_and_counted(dry_run):
    proc, out = dry_run
    summary = json.loads((out / "summary.json").read_text())
    cache = summary["triton_cache"]
    assert cache["compiles"] >= 1 and cache["lookups"] >= 1, cache  # the sample compile went through the logger
    log = (out / "run.log").read_text()
    assert "gpu_report --precompile:" in log and "specializations (sm_90)" in log
    assert "capture: " in log  # the GPU tests' launches were recorded (TARP_FAST_GPU_TESTS=capture)
