"""The user's own benchmark command, ``pytest benchmarks/ --benchmark``, runs and ends with the table."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pytest_benchmarks_with_benchmark_flag_prints_the_ratio_table():
    # The console script, not `python -m pytest`: -m would put the root (and its `kernels/`) on sys.path.
    pytest_exe = os.path.join(os.path.dirname(sys.executable), "pytest")
    out = subprocess.run(
        [pytest_exe, "benchmarks/test_bench_tarp_linear.py", "--benchmark", "-p", "no:cacheprovider",
         "-k", "cpu_small and fwd and not bwd and (F.linear or reference)"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "unrecognized arguments" not in text
    lines = text.splitlines()
    title = next(i for i, line in enumerate(lines) if "median time over F.linear" in line)
    header, row = lines[title + 1].split(), lines[title + 2].split()
    assert header[:5] == ["shape", "mode", "F.linear", "ms", "reference"], lines[title:title + 3]
    assert row[:2] == ["cpu_small", "fwd"]
    ratio = float(row[3].rstrip("x"))  # timed for real: a positive, finite ratio, not a placeholder
    assert 0.05 < ratio < 100.0
    assert float(row[2]) > 0.0
