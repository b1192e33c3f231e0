"""Count, list and precompile the Triton kernels a program compiles, on a machine without a GPU.

Triton compiles one kernel per *specialization*: per kernel, per distinct tuple of constexpr
values, argument types (``*bf16``, ``i32``...), integer and pointer properties the JIT specializes
on (an integer equal to 1 or divisible by 16, a pointer aligned to 16 bytes) and launch options
(warps, stages). Each costs 1-7 s of compile (14 s for the row schedule's scatter kernel) the
first time a process launches it, unless Triton's on-disk cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``) has it.

:func:`capture` makes every launch of a ``@triton.jit`` kernel go through Triton's own launch path
up to the point where it would compile -- the same binder, specialization and cache key as a
real launch on the target (``GPUTarget("cuda", arch, 32)``), with a stand-in driver instead of
a GPU -- and records the compile instead of doing it: nothing runs and nothing compiles, so a
program driven on CPU tensors (outputs are garbage) shows exactly which specializations it
would compile on the GPU. :func:`compile_specs` then compiles recorded specializations in
parallel processes, into the Triton cache, exactly as the JIT would (same ``ASTSource``, target
and options, hence the same cache key): a later process that launches them loads them from
the cache instead of compiling.

Used by ``benchmarks/gpu_report.py --precompile`` (the GPU run compiles the report's kernels in
parallel before the report starts), by ``tests/test_triton_gpu.py`` under
``TARP_FAST_GPU_TESTS=capture`` (the count of the GPU test tier), and to build a Triton cache for
sm_90 on a CPU machine (``python -m tarp_fast.kernels.precompile --help``).
``specialize_all=True`` counts as if no argument were exempt from specialization
(``do_not_specialize``), i.e. as the kernels were before the batch-dependent integers were exempted.

Needs ``TRITON_INTERPRET`` unset (interpreted kernels do not compile).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import json
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Spec", "Capture", "capture", "capturing", "capture_arch", "compile_specs", "save_specs", "load_specs"]

_active: list = [None]


def capturing() -> bool:
    """Whether launches are being recorded (:func:`capture`) instead of run."""
    return _active[0] is not None


def capture_arch():
    """The compute capability being captured for (``major * 10 + minor``), or None."""
    cap = _active[0]
    return None if cap is None else cap.target[1]


@dataclass
class Spec:
    """One specialization of one kernel: what ``triton.compile`` needs to build it."""

    kernel: str  # "module:qualname" of the @triton.jit function
    key: str  # the JIT's in-memory cache key (distinct per specialization of a kernel)
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    target: tuple  # (backend, arch, warp_size)

    @property
    def name(self) -> str:
        return self.kernel.split(":")[-1]


@dataclass
class Capture:
    """What :func:`capture` recorded: ``specs`` (one per distinct specialization) and ``launches``
    (every recorded launch, including repeats)."""

    target: tuple
    specs: dict = field(default_factory=dict)  # (kernel, key) -> Spec
    launches: int = 0

    def counts(self) -> dict[str, int]:
        """Specializations per kernel name."""
        out: dict[str, int] = {}
        for spec in self.specs.values():
            out[spec.name] = out.get(spec.name, 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> str:
        per = ", ".join(f"{k} {v}" for k, v in self.counts().items())
        return (f"{len(self.specs)} specializations (sm_{self.target[1]}) from {self.launches} launches: "
                f"{per or 'none'}")

    def to_json(self) -> dict:
        return dict(target=list(self.target), launches=self.launches, total=len(self.specs), per_kernel=self.counts())

    def merge(self, other: Capture) -> None:
        self.specs.update(other.specs)
        self.launches += other.launches


class _StubDriver:
    """Stands in for Triton's CUDA driver: a device id, a stream, the target. Nothing launches
    (the recorder returns before), so nothing else is needed."""

    def __init__(self, target, tag: str):
        self.target = target
        self.device = f"tarp-fast-capture-{tag}"

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):  # pragma: no cover - not reached before the recorder
        import torch

        return torch.device("cpu")


def _our_kernels():
    from triton.runtime.jit import JITFunction

    from . import _kernels, _schedule_kernels

    return [obj for mod in (_kernels, _schedule_kernels) for obj in vars(mod).values()
            if isinstance(obj, JITFunction)]


@contextlib.contextmanager
def capture(arch: int = 90, *, specialize_all: bool = False, compile: bool = False) -> Iterator[Capture]:
    """Record (do not run, do not compile) every Triton kernel launch in the block.

    ``compile=True``: also compile each new specialization through the JIT's own compile path
    (``JITFunction._do_compile``: the Triton cache is read and filled as by a real launch), still
    without launching anything.

    Yields a :class:`Capture`. The launchers of this package also "autotune" under it (when
    ``TARP_FAST_AUTOTUNE=1``) by recording every candidate, as the GPU would compile them all.
    Arguments may be CPU tensors (outputs are left as allocated): the launchers then treat the
    CPU as the captured GPU (its arch picks the configs; fp32 dots follow torch's TF32 setting).
    Nested captures are refused.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("precompile.capture: TRITON_INTERPRET is set; interpreted kernels do not compile, "
                           "so there is nothing to capture (unset it before starting Python)")
    if _active[0] is not None:
        raise RuntimeError("precompile.capture: already capturing")
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", arch, 32)
    tag = f"sm{arch}" + ("-all" if specialize_all else "")
    stub = _StubDriver(target, tag)
    cap = Capture(target=("cuda", arch, 32))
    saved_driver = driver._active
    saved_compile = JITFunction._do_compile
    saved_flags = []
    if specialize_all:
        for k in _our_kernels():
            for p in k.params:
                saved_flags.append((p, p.do_not_specialize))
                p.do_not_specialize = False

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        if device != stub.device:  # a real device (not ours): compile as usual
            return saved_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        cap.launches += 1
        name = f"{self.fn.__module__}:{self.fn.__qualname__}"
        if (name, key) not in cap.specs:
            cap.specs[(name, key)] = Spec(name, key, dict(signature), dict(constexprs), dict(attrs),
                                          dict(options.__dict__), cap.target)
            if compile:
                saved_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        return None  # the JIT returns before launching

    driver.set_active(stub)
    JITFunction._do_compile = record
    _active[0] = cap
    try:
        yield cap
    finally:
        _active[0] = None
        JITFunction._do_compile = saved_compile
        driver._active = saved_driver
        for p, flag in saved_flags:
            p.do_not_specialize = flag
        for k in _our_kernels():
            k.device_caches.pop(stub.device, None)


# ----------------------------------------------------------------------------------------------
# compiling recorded specializations
# ----------------------------------------------------------------------------------------------
def _compile_one(spec: Spec) -> dict:
    t0 = time.time()
    res = dict(kernel=spec.name, ok=False, error=None, cache_hit=None)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = _kernel_fn(spec.kernel)
        options = dict(spec.options)
        libs = options.get("extern_libs") or ()
        if any(not os.path.exists(path) for _, path in libs):
            # recorded with another Triton install: its own libdevice (hashed by content) is used
            options.pop("extern_libs")
        hits = []
        listener_saved = triton.knobs.compilation.listener
        triton.knobs.compilation.listener = lambda **kw: hits.append(kw.get("cache_hit"))
        try:
            triton.compile(ASTSource(fn, spec.signature, spec.constexprs, spec.attrs),
                           target=GPUTarget(*spec.target), options=options)
        finally:
            triton.knobs.compilation.listener = listener_saved
        res["cache_hit"] = bool(hits and hits[0])
        res["ok"] = True
    except Exception as exc:  # report, keep going
        res["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    res["seconds"] = round(time.time() - t0, 2)
    return res


def _kernel_fn(kernel: str):
    """The ``@triton.jit`` function ``"module:qualname"``; this package's kernel modules load from
    the files beside this one when the package cannot be imported (a Python with Triton only,
    building a cache for another machine: the kernels' cache keys depend on their source only)."""
    module, qual = kernel.split(":")
    try:
        return getattr(importlib.import_module(module), qual)
    except ImportError:
        if not module.startswith("tarp_fast.kernels."):
            raise
    import importlib.util as iu
    import sys

    if module not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), module.rsplit(".", 1)[1] + ".py")
        spec = iu.spec_from_file_location(module, path)
        mod = iu.module_from_spec(spec)
        sys.modules[module] = mod
        spec.loader.exec_module(mod)
    return getattr(sys.modules[module], qual)


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


def compile_specs(specs, jobs: int = 1, *, log=None) -> list[dict]:
    """Compile ``specs`` (``Spec`` objects) into the Triton cache (``TRITON_CACHE_DIR``), ``jobs``
    processes at a time, slowest kernels first. Returns one result dict per spec (``ok``,
    ``error``, ``cache_hit``: it was in the cache already, ``seconds``); never raises."""
    specs = sorted(specs, key=lambda s: (s.name != "_sched_scatter_kernel", s.name))
    if not specs:
        return []
    if jobs <= 1:
        out = []
        for s in specs:
            out.append(_compile_one(s))
            if log:
                log(out[-1])
        return out
    results = []
    with cf.ProcessPoolExecutor(min(jobs, len(specs)), mp_context=mp.get_context("spawn"),
                                initializer=_worker_init) as ex:
        for r in ex.map(_compile_one, specs):
            results.append(r)
            if log:
                log(r)
    return results


def compile_summary(results: list[dict]) -> str:
    ok = sum(r["ok"] for r in results)
    hit = sum(bool(r.get("cache_hit")) for r in results)
    secs = sum(r["seconds"] for r in results)
    bad = [f"{r['kernel']}: {r['error']}" for r in results if not r["ok"]]
    return (f"precompiled {ok}/{len(results)} ({hit} already in the cache, {secs:.0f} s of compile)"
            + ("; failed: " + "; ".join(bad[:5]) if bad else ""))


_SEED_HOWTO = """\
A Triton cache for the GPU machine, built on a CPU machine (it hits only with the same Triton
wheel -- version and Python version -- and the same kernel sources; a miss costs nothing):

  # 1. record with Triton 3.6 (.venv-compat, `make test-compat` creates it), sm_90:
  .venv-compat/bin/python benchmarks/gpu_report.py --precompile -j 0 --specs-out /tmp/s_report.json
  .venv-compat/bin/python benchmarks/gpu_report.py --precompile -j 0 --autotune --quick \\
      --sections providers,dx --specs-out /tmp/s_autotune.json
  TARP_FAST_GPU_TESTS=capture TARP_FAST_CAPTURE_OUT=/tmp/s_tests.json \\
      .venv-compat/bin/pytest -q -p no:cacheprovider tests/test_triton_gpu.py
  # 2. compile with the GPU machine's Python (3.12) and Triton (3.6.0) only, binaries only:
  python3.12 -m venv /tmp/py312 && /tmp/py312/bin/pip install triton==3.6.0
  TRITON_STORE_BINARY_ONLY=1 TRITON_CACHE_DIR=$PWD/.tarp_fast_cache/triton-3.6.0-sm90 \\
      /tmp/py312/bin/python kernels/precompile.py /tmp/s_report.json /tmp/s_autotune.json \\
      /tmp/s_tests.json.specs --compile -j 2

benchmarks/gpu_run.py seeds its Triton cache from .tarp_fast_cache/triton-<version>-sm<arch>.
"""


def _main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Count or precompile the specializations of JSON spec files "
                                             "(written by gpu_report.py --precompile --specs-out or the GPU tests "
                                             "under TARP_FAST_GPU_TESTS=capture).", epilog=_SEED_HOWTO,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="JSON files of recorded specializations (merged)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", action="store_true", help="compile them into TRITON_CACHE_DIR")
    ap.add_argument("--only", action="append", help="only kernels whose name contains this (repeatable)")
    ap.add_argument("--max", type=int, default=0, help="at most this many (0: all)")
    args = ap.parse_args(argv)
    missing = [p for p in args.specs if not os.path.exists(p)]
    if missing:
        print(f"precompile: {', '.join(missing)} does not exist (nothing was recorded)")
        return 1
    merged = {}
    for path in args.specs:
        for spec in load_specs(path):
            merged[(spec.kernel, spec.key)] = spec
    specs = list(merged.values())
    counts: dict[str, int] = {}
    for s in specs:
        counts[s.name] = counts.get(s.name, 0) + 1
    print(f"{len(specs)} specializations in {' '.join(args.specs)}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if args.only:
        specs = [s for s in specs if any(o in s.name for o in args.only)]
    if args.max:
        specs = specs[:args.max]
    if args.compile:
        res = compile_specs(specs, args.jobs)
        print(compile_summary(res))
        return 0 if all(r["ok"] for r in res) else 1
    return 0


# ----------------------------------------------------------------------------------------------
# spec files (JSON): tuple keys and values survive the round trip
# ----------------------------------------------------------------------------------------------
def _enc(v):
    if isinstance(v, tuple):
        return {"__tuple__": [_enc(x) for x in v]}
    if isinstance(v, list):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {"__dict__": [[_enc(k), _enc(x)] for k, x in v.items()]}
    if isinstance(v, (frozenset, set)):
        return {"__set__": sorted(_enc(x) for x in v)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"precompile: cannot write {type(v).__name__} {v!r}")


def _dec(v):
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if isinstance(v, dict):
        if "__tuple__" in v:
            return tuple(_dec(x) for x in v["__tuple__"])
        if "__dict__" in v:
            return {_dec(k): _dec(x) for k, x in v["__dict__"]}
        if "__set__" in v:
            return frozenset(_dec(x) for x in v["__set__"])
    return v


def save_specs(specs, path: str) -> None:
    data = [_enc(dict(kernel=s.kernel, key=s.key, signature=s.signature, constexprs=s.constexprs,
                      attrs=s.attrs, options=s.options, target=tuple(s.target))) for s in specs]
    # imported here: the Triton-only compile mode (no torch, no package) never saves
    from tarp_fast._io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(data).encode())


def load_specs(path: str) -> list[Spec]:
    with open(path) as fh:
        return [Spec(**_dec(d)) for d in json.load(fh)]


if __name__ == "__main__":
    import sys

    try:  # the package's copy of this module (one capture state), where the package imports
        from tarp_fast.kernels.precompile import _main as _package_main
    except ImportError:  # a Python with Triton only (building a cache for another machine)
        _package_main = _main
    sys.exit(_package_main())
