"""Markdown table of a native-vs-reference run (issue 4's figures) from pytest-benchmark's JSON.

    pytest benchmarks/test_bench_native.py --benchmark-only --benchmark-json=RUN.json
    python benchmarks/native_table.py RUN.json            # writes RUN.md beside it

One row per benchmark: shape, mode, flags, the interleaved medians of native and reference, their
ratio, and for plain calls the GEMM floor (the op's matrix products alone) with
``reference / floor``, the largest speedup any implementation on the same BLAS could show.
"""

from __future__ import annotations

import argparse
import json
import os

GOAL = 1.3  # issue 4: native fwd+bwd at least 1.3x faster at the small adaptation shapes


def _row(bench: dict) -> str:
    info = bench["extra_info"]
    s = info["shape"]
    flags = ", ".join(v for v in (info.get("epilogue"), info.get("factors")) if v not in (None, "none", "one task"))
    ratio = info.get("speedup_vs_reference_ratio")
    floor = info.get("reference_over_gemm_floor_ratio")
    cells = [
        f"M={s['M']} K={s['K']} N={s['N']} r={s['r']}", info["mode"], flags or "-",
        f"{info.get('native_ms', float('nan')):.3f}", f"{info.get('reference_ms', float('nan')):.3f}",
        f"{ratio:.2f}" if ratio is not None else "-",
        f"{info['gemm_floor_ms']:.3f}" if "gemm_floor_ms" in info else "-",
        f"{floor:.2f}" if floor is not None else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(run: dict) -> str:
    """The table of one pytest-benchmark JSON document, with the machine and versions above it."""
    machine = run.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", "unknown CPU")
    benches = [b for b in run.get("benchmarks", []) if "speedup_vs_reference_ratio" in b.get("extra_info", {})]
    threads = sorted({b["extra_info"].get("threads") for b in benches} - {None})
    header = [
        f"# native vs reference on CPU ({run.get('datetime', '')[:10]})", "",
        f"{cpu}; {', '.join(map(str, threads)) or '?'} thread(s); Python {machine.get('python_version', '?')}; "
        f"commit {run.get('commit_info', {}).get('id', '?')[:10]}.", "",
        "Times are medians of native and reference timed interleaved in one run (float32, ms). "
        f"Goal: fwd+bwd >= {GOAL}x at the small adaptation shapes. `reference / floor` bounds what any "
        "implementation on the same BLAS could reach.", "",
        "| shape | mode | flags | native ms | reference ms | speedup | GEMM floor ms | reference / floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(header + [_row(b) for b in benches]) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_path", help="pytest-benchmark --benchmark-json output")
    ap.add_argument("--out", help="Markdown path (default: the JSON path with .md)")
    args = ap.parse_args(argv)
    with open(args.json_path) as f:
        run = json.load(f)
    text = markdown(run)
    out = args.out or os.path.splitext(args.json_path)[0] + ".md"
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    print(text, end="")
    return out


if __name__ == "__main__":
    main()
