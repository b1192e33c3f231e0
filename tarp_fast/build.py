"""``python -m tarp_fast.build``: build the native extension's JIT cache now, not on first use.

For a Docker layer, or a cluster job's first step before ``torchrun`` starts its ranks: the same
build that the first call of a native op would run (``tarp_fast._jit``), into the same cache
folder (``TORCH_EXTENSIONS_DIR``, else torch's extensions folder), for the torch of this Python
and, when torch has CUDA and nvcc is found, the archs of ``TORCH_CUDA_ARCH_LIST`` (else the
visible GPUs, else 8.0 and 9.0). Prints where the module is and how long the build took; exits 1
when it cannot build (the reason and the log file are printed).

    python -m tarp_fast.build            # build unless the cache already holds this build
    python -m tarp_fast.build --force    # rebuild
    python -m tarp_fast.build --print-dir  # only print the cache folder this torch would use
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tarp_fast.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when the cache holds this build")
    ap.add_argument("--print-dir", action="store_true", help="print the cache folder and exit")
    ap.add_argument("--json", action="store_true", help="print the build info as JSON at the end")
    args = ap.parse_args(argv)

    from . import _jit  # noqa: PLC0415  (imports torch)

    plan, why = _jit.plan()
    if plan is None:
        print(f"tarp-fast: cannot build tarp_fast._C: {why}", file=sys.stderr)
        return 1
    if args.print_dir:
        print(plan.build_dir)
        return 0
    if os.environ.get("TARP_FAST_NO_EXT", "0") not in ("", "0"):
        print("tarp-fast: TARP_FAST_NO_EXT is set: not building tarp_fast._C", file=sys.stderr)
        return 1
    res = _jit.ensure(allow_build=True, force=args.force, out=sys.stdout)
    if res.module is None:
        print(f"tarp-fast: cannot build tarp_fast._C: {res.reason}", file=sys.stderr)
        return 1
    info = res.info or {}
    cuda = "with its CUDA part, archs " + str(info.get("cuda_archs")) if info.get("cuda_built") else (
        f"CPU part only ({info.get('cuda_reason')})")
    if res.source == "jit-cache":
        print(f"tarp-fast: tarp_fast._C for torch {info.get('torch')} is already built in {res.build_dir} "
              f"({cuda}; it took {info.get('build_seconds')} s); --force rebuilds it")
    else:
        print(f"tarp-fast: tarp_fast._C for torch {info.get('torch')} ready in {res.build_dir} ({cuda}); "
              f"built in {info.get('build_seconds')} s; log: {res.log}")
    if args.json:
        print(json.dumps({"source": res.source, "cache_dir": res.build_dir, "log": res.log, "build": info},
                         indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
