"""``pytest benchmarks/ --benchmark``: run the benchmarks for real and end with their figures.

``--benchmark`` is this project's short form of pytest-benchmark's ``--benchmark-only`` (the
user's brief names it); the summary ends with the table of ``tarp_linear`` times over
``F.linear`` (CPU shapes on CPU, every shape on a GPU), then every other benchmark's figures.
"""

from __future__ import annotations

import os

import pytest
import torch
from harness import ratio_table


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark", action="store_true", default=False,
        help="tarp-fast: run the benchmarks for real (as --benchmark-only) and print the table of "
             "time over F.linear at the end",
    )


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own configure reads its options
def pytest_configure(config):
    if config.getoption("benchmark", default=False):
        config.option.benchmark_only = True
        config.option.benchmark_disable = False


@pytest.fixture(autouse=True)
def bench_threads(request):
    """CPU intra-op threads of every benchmark: ``TARP_BENCH_THREADS`` (default: torch's), recorded
    with the row as ``cpu_threads``.

    Why: on a shared machine OpenMP threads that spin while other processes hold the cores make
    small ops erratic (seen: one cell 1 ms in one row, 160 ms in the next); ``=1`` is stable.
    """
    before = torch.get_num_threads()
    want = int(os.environ.get("TARP_BENCH_THREADS", "0") or 0) or before
    torch.set_num_threads(want)
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info["cpu_threads"] = want
    yield
    torch.set_num_threads(before)


def _tarp_linear_rows(benchmarks) -> list[dict]:
    rows = []
    for b in benchmarks:
        info, params = b.extra_info, getattr(b, "params", None) or {}
        if "ratio_to_F.linear" not in info or "provider" not in params:
            continue
        rows.append({"shape_name": params["shape_name"], "mode": params["mode"], "provider": params["provider"],
                     "ratio": info["ratio_to_F.linear"], "flinear_ms": info["flinear_median_ms"],
                     "floor": info["flop_floor_ratio"]})
    return rows


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the figures end the output
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) or [] if b.extra_info]
    if not benchmarks:
        return
    figures = [b for b in benchmarks if "ratio_to_F.linear" not in b.extra_info]
    if figures:
        terminalreporter.write_sep("-", "tarp-fast benchmark figures (measured in this run)")
        for b in figures:
            keys = sorted(k for k in b.extra_info if "ratio" in k or k.endswith("_ms"))
            terminalreporter.write_line(f"{b.name}: " + ", ".join(_figure(k, b.extra_info[k]) for k in keys))
    table = ratio_table(_tarp_linear_rows(benchmarks))
    if table:
        device = next((b.extra_info.get("device") for b in benchmarks if "device" in b.extra_info), "?")
        dtype = next((b.extra_info.get("dtype") for b in benchmarks if "dtype" in b.extra_info), "?")
        terminalreporter.write_sep("-", f"tarp_linear: median time over F.linear, this run ({device}, {dtype})")
        for line in table:
            terminalreporter.write_line(line)


def _figure(key: str, value) -> str:
    return f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
