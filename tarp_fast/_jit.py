"""Just-in-time build of the native extension ``tarp_fast._C`` on first use, and its cache.

``tarp_fast._ext`` comes here when no ahead-of-time module matching the running torch is
installed (a plain ``pip install``, whose isolated build has no torch to compile against):

1. **Where**: ``<root>/tarp_fast_<torch version>_<key hash>``, ``root`` being
   ``TORCH_EXTENSIONS_DIR`` if set, else torch's extensions folder
   (``~/.cache/torch_extensions/py311_cpu``, ``..._cu130``). The key hash covers the torch
   version and CUDA version, the Python ABI, a sha256 of every source and header and of
   ``_build_config.py`` (flags), the compiler, ``TARP_FAST_DEBUG``, whether the CUDA part is
   built and for which archs: any change builds into a new folder, never over a module in use.
2. **Cache hit** (``_C.build.json`` there with the same key, written last by a build that
   loaded its module): the module is imported as ``tarp_fast._C`` → ``source="jit-cache"``.
3. **Build** (never with ``TARP_FAST_NO_EXT=1``): under an exclusive ``fcntl.flock`` on
   ``<folder>.lock`` (released by the OS if the builder dies), so of N processes starting
   together (a torchrun job) one builds and the others wait, then load its result. The build runs
   ``tarp_fast/_build_config.py:jit_child`` in a child process (``torch.utils.cpp_extension.load``
   with ninja, ``MAX_JOBS`` parallel jobs, against the torch of ``sys.executable``), its output
   going to ``<folder>/build.log``; two lines on stderr say that it compiles (and where the log
   is), then how long it took → ``source="jit-built"``. A failed build leaves
   ``<folder>/build.failed.json``: processes that were waiting on it take its reason instead of
   building again; a later process retries.

The CPU part is always built, the CUDA part when torch is a CUDA build and nvcc is found (archs:
``TORCH_CUDA_ARCH_LIST``, else the GPUs ``nvidia-smi`` lists, else ``8.0;9.0``: the user's
process does not initialize CUDA for this). ``python -m tarp_fast.build`` runs the same build
ahead of time (a Docker layer, a cluster job's first step).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import time
from typing import Any, NamedTuple, Optional

import torch

from . import _build_config as cfg

__all__ = ["JitResult", "cache_root", "plan", "ensure"]

LIB_NAME = "_C" + (".pyd" if sys.platform == "win32" else ".so")
LOG_NAME = "build.log"
FAILED_NAME = "build.failed.json"
BUILD_TIMEOUT_S = 3600
STDERR: Any = object()  # default of ``out``: the sys.stderr of the moment
# Runs jit_child of _build_config.py loaded by path: the child imports torch, not tarp_fast.
_CHILD = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('tarp_fast_build_config', sys.argv[1])\n"
    "cfg = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = cfg\n"
    "spec.loader.exec_module(cfg)\n"
    "sys.exit(cfg.jit_child(sys.argv[2]))\n"
)


class JitResult(NamedTuple):
    module: Optional[Any]
    reason: Optional[str]  # why there is no module (None when there is one)
    source: Optional[str]  # "jit-cache" | "jit-built" | None
    info: Optional[dict[str, Any]]  # the build's _C.build.json
    log: Optional[str]  # the build log, when a build ran (here or in an earlier process)
    build_dir: Optional[str]
    warn: bool = False  # a build was wanted and failed or could not run: tell the user once


class Plan(NamedTuple):
    src_dir: str
    build_dir: str
    key: dict[str, Any]
    digest: str
    cxx: Optional[str]
    with_cuda: bool
    cuda_reason: Optional[str]
    cuda: dict[str, Any]


def cache_root() -> str:
    """``TORCH_EXTENSIONS_DIR``, else torch's default extensions folder (as torch computes it)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    try:
        import torch._appdirs  # noqa: PLC0415

        base = os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions"))
    except Exception:
        base = os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    if torch.version.hip is not None:
        accel = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accel = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accel = "cpu"
    return os.path.join(base, f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}")


def plan() -> tuple[Optional[Plan], Optional[str]]:
    """Where the module for this torch and these sources lives: ``(plan, None)`` or ``(None, why)``."""
    src = cfg.source_dir()
    if src is None:
        return None, ("its C++ sources are not installed (tarp_fast/_csrc is missing): reinstall tarp-fast from "
                      "its sdist or a wheel built by its setup.py")
    cxx = cfg.find_cxx()
    with_cuda, cuda_reason, cuda = cfg.cuda_plan(init_cuda=False)
    digest = cfg.sources_digest(src)
    key = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.implementation.cache_tag + getattr(sys, "abiflags", ""),
        "platform": sysconfig.get_platform(),
        "sources": digest,
        "cxx": cxx,
        "debug": cfg._flag("TARP_FAST_DEBUG"),
        "cuda": with_cuda,
        "cuda_archs": cuda.get("archs"),
        "nvcc": cuda.get("nvcc"),
    }
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    tag = "".join(c if c.isalnum() or c == "." else "_" for c in torch.__version__)
    build_dir = os.path.join(cache_root(), f"tarp_fast_{tag}_{h}")
    return Plan(src, build_dir, key, digest, cxx, with_cuda, cuda_reason, cuda), None


def _read_json(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _ready(p: Plan) -> Optional[dict[str, Any]]:
    """The build info of a complete build for ``p`` in its folder, or None."""
    info = _read_json(os.path.join(p.build_dir, cfg.BUILD_INFO_NAME))
    if info is None or info.get("key") != p.key or not os.path.isfile(os.path.join(p.build_dir, LIB_NAME)):
        return None
    return info


def _import(p: Plan, info: dict[str, Any], source: str) -> JitResult:
    """Import the cached module as ``tarp_fast._C`` (its ``PyInit__C`` registers the ops)."""
    path = os.path.join(p.build_dir, LIB_NAME)
    log = os.path.join(p.build_dir, LOG_NAME)
    log = log if os.path.exists(log) else None
    try:
        spec = importlib.util.spec_from_file_location("tarp_fast._C", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except Exception as exc:  # ImportError (undefined symbol), OSError
        return JitResult(None, f"importing the cached build {path} failed ({type(exc).__name__}: {exc}); "
                         f"delete {p.build_dir} to rebuild it", None, info, log, p.build_dir, warn=True)
    sys.modules["tarp_fast._C"] = mod
    pkg = sys.modules.get("tarp_fast")
    if pkg is not None:
        pkg._C = mod
    return JitResult(mod, None, source, info, log, p.build_dir)


@contextlib.contextmanager
def _exclusive(path: str, out: Any):
    """An exclusive lock on ``path`` (``fcntl.flock``; the OS drops it when its holder dies)."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # Windows: no lock here (torch's own lock file still guards the build folder)
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(out, f"tarp-fast: waiting for another process that builds tarp_fast._C (lock {path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _say(out: Any, line: str) -> None:
    if out is STDERR:
        out = sys.stderr  # looked up now: sys.stderr may have been replaced since import
    if out is not None:
        print(line, file=out, flush=True)


def _log_summary(log: str, limit: int = 300) -> Optional[str]:
    """The first line of the build log that names an error (compiler or Python), shortened."""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f]
    except OSError:
        return None
    for pred in (lambda s: "error:" in s.lower(), lambda s: "error" in s.lower() or "failed" in s.lower()):
        for ln in lines:
            if ln and pred(ln):
                return ln if len(ln) <= limit else ln[: limit - 3] + "..."
    return None


def _parts(p: Plan) -> str:
    if p.with_cuda:
        return f"CPU and CUDA parts, archs {p.cuda.get('archs')}; about 2 min on 2 cores"
    return "CPU part; about 40 s on 2 cores"


def _build(p: Plan, out: Any, source: str) -> JitResult:
    """Compile into ``p.build_dir`` in a child process (the caller holds the lock)."""
    d = p.build_dir
    log = os.path.join(d, LOG_NAME)
    for name in (cfg.BUILD_INFO_NAME, FAILED_NAME, "lock"):  # "lock": torch's, stale if a build was killed
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(d, name))
    request = os.path.join(d, "build.request.json")
    cfg.write_json(request, {"src_dir": p.src_dir, "build_dir": d, "key": p.key, "digest": p.digest,
                             "with_cuda": p.with_cuda, "cuda_reason": p.cuda_reason, "cuda": p.cuda})
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([*cfg.ninja_dirs(), env.get("PATH", "")])  # torch runs `ninja` from PATH
    if p.with_cuda:
        env["TORCH_CUDA_ARCH_LIST"] = str(p.cuda["archs"])
        env["CUDA_HOME"] = os.path.dirname(os.path.dirname(p.cuda["nvcc"]))
    _say(out, f"tarp-fast: compiling the native extension tarp_fast._C for torch {torch.__version__} "
              f"({_parts(p)}) into {d}; log: {log}")
    t0 = time.perf_counter()
    try:
        with open(log, "w", encoding="utf-8") as lf:
            rc = subprocess.run(
                [sys.executable, "-c", _CHILD, os.path.abspath(cfg.__file__), request],
                cwd=d, env=env, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT_S,
            ).returncode
        why = None if rc == 0 else (_log_summary(log) or f"the build exited with status {rc}")
    except subprocess.TimeoutExpired:
        why = f"the build took more than {BUILD_TIMEOUT_S} s and was stopped"
    except OSError as exc:
        why = f"could not start the build ({exc})"
    seconds = time.perf_counter() - t0
    info = _ready(p) if why is None else None
    if info is None:
        why = why or f"the build finished but left no complete module in {d}"
        reason = f"building it on first use failed: {why}; compiler output in {log}"
        cfg.write_json(os.path.join(d, FAILED_NAME), {"reason": reason, "log": log, "time": time.time()})
        _say(out, f"tarp-fast: the build of tarp_fast._C failed after {seconds:.1f} s; log: {log}")
        return JitResult(None, reason, None, None, log, d, warn=True)
    _say(out, f"tarp-fast: built tarp_fast._C in {seconds:.1f} s (cached for later runs)")
    return _import(p, info, source)


def ensure(allow_build: bool = True, force: bool = False, out: Any = STDERR) -> JitResult:
    """The JIT-built module: from the cache, else built now (once across processes).

    ``allow_build=False`` only looks in the cache; ``force=True`` rebuilds even a ready cache
    (``python -m tarp_fast.build --force``). ``out`` receives the progress lines (None: silent).
    """
    p, why = plan()
    if p is None:
        return JitResult(None, why, None, None, None, None, warn=True)
    if not force:
        info = _ready(p)
        if info is not None:
            return _import(p, info, "jit-cache")
    if not allow_build:
        return JitResult(None, "TARP_FAST_NO_EXT is set, so it is not built on first use (unset it, or prebuild it "
                         "with `python -m tarp_fast.build` without it)", None, None, None, p.build_dir)
    if p.cxx is None:
        return JitResult(None, "no C++ compiler found to build it (install g++ or clang++, or set CXX)",
                         None, None, None, p.build_dir, warn=True)
    if cfg.find_ninja() is None:
        return JitResult(None, "ninja not found to build it (`pip install ninja`)", None, None, None, p.build_dir,
                         warn=True)
    try:
        os.makedirs(p.build_dir, exist_ok=True)
    except OSError as exc:
        return JitResult(None, f"cannot create the build folder {p.build_dir} ({exc}); set TORCH_EXTENSIONS_DIR",
                         None, None, None, p.build_dir, warn=True)
    waited_since = time.time()
    with _exclusive(p.build_dir + ".lock", out):
        info = _ready(p)
        if info is not None and not force:
            return _import(p, info, "jit-cache")  # built by the process we waited for
        failed = _read_json(os.path.join(p.build_dir, FAILED_NAME))
        if failed and not force and float(failed.get("time", 0)) >= waited_since:
            # The process we waited for failed just now: same sources, same tools, same error.
            return JitResult(None, str(failed.get("reason")), None, None, failed.get("log"), p.build_dir, warn=True)
        return _build(p, out, "jit-built")
