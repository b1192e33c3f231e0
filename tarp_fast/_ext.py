"""Loading of the native extension ``tarp_fast._C`` and :func:`ext_info`.

Nothing here runs at ``import tarp_fast``: the module is loaded on the first call of
:func:`load_extension` / :func:`ext_info` (or by ``backend="native"``, or ``"auto"`` on CPU).
Where it comes from, first match wins:

1. ``"aot"``: the module built at install time (``pip install --no-build-isolation .``) beside
   the package, when it was built against the running torch. Before it is imported, the torch
   version it was built against (``_C.build.json``, written by ``csrc_build.py``) is compared with
   the running torch: a module built against another torch would fail with an undefined symbol
   at best, or crash, so it is not imported at all.
2. ``"jit-cache"``: a module built earlier on first use (or by ``python -m tarp_fast.build``) for
   this torch and these sources, in torch's extensions folder (``tarp_fast._jit``).
3. ``"jit-built"``: built now, from the sources shipped in the package (about 40 s for the CPU
   part on 2 cores; one process builds, concurrent ones wait). Never with ``TARP_FAST_NO_EXT=1``
   ("never compile": what is already built still loads).

With ``sys.modules["tarp_fast._C"] = None`` (the import blocked on purpose) neither 2 nor 3 runs.

Loading never raises: a missing or unusable extension becomes a readable reason, and a build
that failed or could not run warns once (``RuntimeWarning``) with the reason and the log file;
the other backends keep working. Nothing here touches ``torch.cuda``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import threading
import warnings
from typing import Any, NamedTuple, Optional

import torch

__all__ = ["ext_info", "load_extension", "BUILD_INFO_NAME"]

BUILD_INFO_NAME = "_C.build.json"
_REBUILD = (
    "rebuild it against this torch: `pip install --no-build-isolation --no-deps --force-reinstall "
    "--no-cache-dir .` (or `-e .` for a checkout), or let it build on first use (unset TARP_FAST_NO_EXT; "
    "`python -m tarp_fast.build` prebuilds it)"
)
_lock = threading.Lock()


class _Loaded(NamedTuple):
    module: Optional[Any]
    reason: Optional[str]
    source: Optional[str] = None  # "aot" | "jit-cache" | "jit-built"
    info: Optional[dict[str, Any]] = None  # the build info of the loaded (or attempted) module
    log: Optional[str] = None  # the JIT build log
    build_dir: Optional[str] = None  # the JIT cache folder
    warn: bool = False  # a JIT build was wanted and failed or could not run


_state: Optional[_Loaded] = None


def _build_info() -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """``(info, None)`` from ``_C.build.json`` beside the package, or ``(None, why_not)``."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), BUILD_INFO_NAME)
    if not os.path.exists(path):
        return None, f"no build info ({path} is missing)"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except (OSError, ValueError) as exc:
        return None, f"unreadable build info {path}: {exc}"


def _same_torch(built: str, running: str) -> bool:
    """Same release and same local build tag (``2.13.0+cpu`` vs ``2.13.0+cu130`` differ)."""
    return built.split("+")[0] == running.split("+")[0] and (
        built.partition("+")[2] == running.partition("+")[2]
    )


def _no_ext() -> bool:
    return os.environ.get("TARP_FAST_NO_EXT", "0") not in ("", "0")


def load_extension() -> tuple[Optional[Any], Optional[str]]:
    """Load ``tarp_fast._C`` once (AOT, else JIT cache, else JIT build); ``(module, None)`` or ``(None, reason)``."""
    global _state
    with _lock:
        if _state is None:
            _state = _load_any()
            if _state.warn:  # once per process: the state is kept
                warnings.warn(f"tarp-fast: the native backend is unavailable, the other backends run instead: "
                              f"{_state.reason}", RuntimeWarning, stacklevel=3)
        return _state.module, _state.reason


def _load_any() -> _Loaded:
    blocked = "tarp_fast._C" in sys.modules and sys.modules["tarp_fast._C"] is None
    mod, aot_reason = _load()
    if mod is not None:
        return _Loaded(mod, None, "aot", _build_info()[0])
    if blocked or sys.modules.get("tarp_fast._C") is not None:
        # Blocked on purpose, or an AOT module was imported but registered no ops: a second
        # library registering the same op namespace would fail, so no JIT build either.
        why = " (its import is blocked: sys.modules['tarp_fast._C'] is None)" if blocked else ""
        return _Loaded(None, aot_reason + why)
    # An installed module that cannot be used (another torch, an import error) is worth naming.
    aot_note = "" if importlib.util.find_spec("tarp_fast._C") is None else f" (the installed one is unusable: {aot_reason})"
    no_ext = _no_ext()
    try:
        from . import _jit  # noqa: PLC0415

        jit = _jit.ensure(allow_build=not no_ext)
    except Exception as exc:  # an unwritable cache folder, a lock that cannot be taken, ...
        return _Loaded(None, f"tarp_fast._C is not built: the build on first use could not run "
                             f"({type(exc).__name__}: {exc}); set TORCH_EXTENSIONS_DIR to a writable folder, or "
                             f"TARP_FAST_NO_EXT=1 to skip it{aot_note}", warn=True)
    if jit.module is None:
        hint = "" if no_ext else "; set TARP_FAST_NO_EXT=1 to skip it"
        return _Loaded(None, f"tarp_fast._C is not built: {jit.reason}{hint}{aot_note}",
                       None, jit.info, jit.log, jit.build_dir, warn=jit.warn)
    try:
        torch.ops.tarp_fast.native_tarp_fwd.default  # noqa: B018  (registered by the import)
    except (AttributeError, RuntimeError) as exc:
        return _Loaded(None, f"the JIT-built tarp_fast._C in {jit.build_dir} registered no ops ({exc})",
                       None, jit.info, jit.log, jit.build_dir)
    return _Loaded(jit.module, None, jit.source, jit.info, jit.log, jit.build_dir)


def _load() -> tuple[Optional[Any], Optional[str]]:
    """The ahead-of-time step: import the installed ``tarp_fast._C`` if built against this torch."""
    if importlib.util.find_spec("tarp_fast._C") is None:
        return None, (
            "tarp_fast._C is not built (installed with TARP_FAST_NO_EXT=1, without a C++ compiler, "
            "or the build failed); " + _REBUILD.replace("rebuild it against this torch", "build it")
        )
    info, why = _build_info()
    if info is not None:
        built = str(info.get("torch", "?"))
        if not _same_torch(built, torch.__version__):
            return None, (
                f"tarp_fast._C was built against torch {built} but torch {torch.__version__} is running; "
                + _REBUILD
            )
    try:
        mod = importlib.import_module("tarp_fast._C")
    except Exception as exc:  # ImportError (undefined symbol, wrong ABI), OSError
        return None, f"importing tarp_fast._C failed ({type(exc).__name__}: {exc}); " + _REBUILD
    try:
        torch.ops.tarp_fast.native_tarp_fwd.default  # noqa: B018  (registered by the import)
    except (AttributeError, RuntimeError) as exc:
        return None, f"tarp_fast._C loaded but registered no ops ({exc}); " + _REBUILD
    return mod, None


def ext_info() -> dict[str, Any]:
    """What of the native extension is built and usable here, and why a part is not.

    Returns a dict with:

    * ``available`` (bool) and ``reason`` (None or why ``backend="native"`` cannot run),
    * ``path`` of the compiled module, ``ops`` registered under ``torch.ops.tarp_fast``,
    * ``cpu``: ``{"built": bool, "openmp": bool, "threads": torch.get_num_threads()}``,
    * ``cuda``: ``{"built": bool, "reason": str or None, "archs": "8.0;9.0", "nvcc": ...}``,
    * ``build``: the recorded build info (torch and CUDA versions, compiler, flags, seconds), or
      None, and ``torch`` (the running version),
    * ``source``: ``"aot"`` (built at install), ``"jit-cache"`` (built earlier on first use or by
      ``python -m tarp_fast.build``), ``"jit-built"`` (built by this process), or None,
    * ``log``: the JIT build's compiler output (None for an AOT module), ``cache_dir``: the JIT
      cache folder (None when the JIT path was not taken).
    """
    mod, reason = load_extension()
    state = _state
    jit = state is not None and (state.build_dir is not None or (state.source or "").startswith("jit"))
    if jit and state.info is not None:
        info, why = state.info, None
    else:
        info, why = _build_info()
    ops = []
    if mod is not None:
        for name in ("native_tarp_fwd", "native_tarp_bwd", "build_info", "compact_rows", "group_by_task",
                     "segmented_sum"):
            try:
                getattr(torch.ops.tarp_fast, name)
                ops.append(f"tarp_fast::{name}")
            except (AttributeError, RuntimeError):
                pass
    cuda_built = bool(info and info.get("cuda_built")) and "tarp_fast::compact_rows" in ops
    if info is None:
        cuda_reason = "not built: " + (reason or why or "unknown")
    elif info.get("cuda_built"):
        cuda_reason = None if mod is not None else reason
    else:
        cuda_reason = info.get("cuda_reason")
    spec = importlib.util.find_spec("tarp_fast._C")
    return {
        "available": mod is not None,
        "reason": reason,
        "path": getattr(mod, "__file__", None) or (spec.origin if spec else None),
        "ops": ops,
        "torch": torch.__version__,
        "cpu": {
            "built": mod is not None,
            "openmp": bool(info and info.get("openmp")),
            "threads": torch.get_num_threads(),
        },
        "cuda": {
            "built": cuda_built,
            "reason": cuda_reason,
            "archs": info.get("cuda_archs") if info else None,
            "nvcc": info.get("nvcc_version") if info else None,
        },
        "build": info,
        "source": state.source if state is not None and mod is not None else None,
        "log": state.log if state is not None else None,
        "cache_dir": state.build_dir if state is not None else None,
    }
