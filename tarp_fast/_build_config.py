"""How the native extension ``tarp_fast._C`` is built: its sources, flags and build info.

One source of truth for both builds:

* **ahead of time** (``pip install --no-build-isolation .``): ``setup.py`` → ``csrc_build.py``
  (setuptools' ``CppExtension``/``CUDAExtension``), module installed as ``tarp_fast/_C*.so``;
* **just in time** (first use, or ``python -m tarp_fast.build``): ``tarp_fast/_jit.py`` runs
  :func:`jit_child` in a child process, which calls ``torch.utils.cpp_extension.load`` on the
  sources shipped in the package (``tarp_fast/_csrc/``) and caches the module in torch's
  extensions folder.

Both take the source lists (:data:`CPU_SOURCES`, :data:`CUDA_SOURCES`), the compiler flags
(:func:`compile_flags`), the CUDA decision (:func:`cuda_plan`) and the contents of
``_C.build.json`` (:func:`build_info`) from here.

This file imports only the standard library at module level (torch inside functions), and it is
loaded **by path** (``importlib.util.spec_from_file_location``) by ``csrc_build.py`` and by the
JIT build's child process: an isolated build has no torch, and ``import tarp_fast`` imports torch.

What is built, and when:

* **CPU part** (``tarp_ops.cpp``, ``tarp_cpu.cpp``, ``tarp_autograd.cpp``): whenever a C++
  compiler is found (``$CXX``, else ``c++``/``g++``/``clang++``). With ``-fopenmp`` when the
  compiler accepts it, because ATen's ``at::parallel_for`` used by the row loops is an inline
  ``omp parallel`` region that runs serially when compiled without OpenMP. The OpenMP runtime is
  the one torch already loaded (same soname ``libgomp.so.1``), so there is one thread pool.
* **CUDA part** (``tarp_cuda.cu``): only when torch is a CUDA build *and* nvcc is found, for the
  architectures of ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs, else ``8.0;9.0``).
  ``TARP_FAST_NO_CUDA=1`` skips it. Its ops are registered only when it is built.
* Nothing at all with ``TARP_FAST_NO_EXT=1`` (``setup.py`` and ``tarp_fast._jit``).

Build flags (environment): ``MAX_JOBS`` (parallel compile jobs, ninja), ``CXX``,
``TORCH_CUDA_ARCH_LIST``, ``TARP_FAST_NO_CUDA``, ``TARP_FAST_DEBUG=1`` (``-O0 -g``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any, Optional

EXT_NAME = "tarp_fast._C"
# Compiled translation units, by name inside the sources folder (csrc/ in a checkout,
# tarp_fast/_csrc/ in an installed package).
CPU_SOURCES = ("tarp_ops.cpp", "tarp_cpu.cpp", "tarp_autograd.cpp")
CUDA_SOURCES = ("tarp_cuda.cu",)
# Everything of the sources folder that ships with the package and keys the JIT cache.
SOURCE_PATTERNS = ("*.cpp", "*.cu", "*.h", "*.cuh")
PACKAGED_SOURCES = "_csrc"  # tarp_fast/_csrc in an installed package
DEFAULT_CUDA_ARCHS = "8.0;9.0"
BUILD_INFO_NAME = "_C.build.json"

_HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _run(cmd: list[str], timeout: float = 120) -> tuple[int, str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return 1, str(exc)


# ---- sources -----------------------------------------------------------------------------------


def source_dir() -> Optional[str]:
    """The folder holding the C++/CUDA sources, or None.

    ``tarp_fast/_csrc`` in an installed package (copied there by ``setup.py``), else ``csrc/``
    beside the package folder (a checkout, e.g. an editable install).
    """
    for folder in (os.path.join(_HERE, PACKAGED_SOURCES), os.path.join(os.path.dirname(_HERE), "csrc")):
        if all(os.path.isfile(os.path.join(folder, s)) for s in CPU_SOURCES):
            return folder
    return None


def source_files(folder: str) -> list[str]:
    """Names of the files of ``folder`` that belong to the extension (sources and headers)."""
    return sorted(
        n for n in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, n)) and any(fnmatch.fnmatch(n, p) for p in SOURCE_PATTERNS)
    )


def sources_digest(folder: str) -> str:
    """sha256 of every source and header of ``folder`` and of this build configuration."""
    h = hashlib.sha256()
    for name in source_files(folder):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(b"_build_config.py\0" + f.read())
    return h.hexdigest()


# ---- tools -------------------------------------------------------------------------------------


def find_cxx() -> Optional[str]:
    """The C++ compiler setuptools and torch will use: ``$CXX`` or the first of c++, g++, clang++."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx.split()[0])
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def first_line(cmd: list[str]) -> str:
    rc, out = _run(cmd)
    return out.splitlines()[0] if rc == 0 and out else "unknown"


def openmp_flags(cxx: str) -> list[str]:
    """``["-fopenmp"]`` when ``cxx`` compiles and links an OpenMP program, else ``[]``."""
    src = "#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel\n{ n = omp_get_num_threads(); }\nreturn n > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "omp_check.cpp")
        with open(path, "w") as f:
            f.write(src)
        rc, _ = _run([cxx, "-fopenmp", path, "-o", os.path.join(tmp, "omp_check")])
    return ["-fopenmp"] if rc == 0 else []


def find_nvcc() -> Optional[str]:
    """nvcc from ``$CUDA_HOME``/``$CUDA_PATH``, the ``PATH`` or ``/usr/local/cuda``; None if absent.

    The same search as torch's ``CUDA_HOME``; the builds pass ``CUDA_HOME`` on so both agree.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    path = shutil.which("nvcc")
    if path:
        return path
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def nvcc_version(nvcc: str) -> str:
    rc, out = _run([nvcc, "--version"])
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[0].strip() if rc == 0 and lines else "unknown"


def ninja_dirs() -> list[str]:
    """Folders that may hold a ``ninja`` executable beside ``PATH``: the running Python's bin
    folder (a venv that is not activated) and the ``ninja`` wheel's own."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # noqa: PLC0415

        dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    return dirs


def find_ninja() -> Optional[str]:
    return shutil.which("ninja") or shutil.which("ninja", path=os.pathsep.join(ninja_dirs()))


# ---- CUDA --------------------------------------------------------------------------------------


def _visible_gpu_archs(init_cuda: bool) -> Optional[str]:
    """``"8.0;9.0"``-style list of the visible GPUs, or None.

    Through torch when ``init_cuda`` (a build process) or when this process already initialized
    CUDA; else through ``nvidia-smi``, so that a CPU call that builds the extension on first use
    does not initialize CUDA in the user's process.
    """
    try:
        import torch  # noqa: PLC0415

        if init_cuda or torch.cuda.is_initialized():
            if not torch.cuda.is_available():
                return None
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{a}.{b}" for a, b in caps) or None
    except Exception:  # a broken driver must not break the CPU build
        return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    rc, out = _run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], timeout=30)
    caps = sorted({ln.strip() for ln in out.splitlines() if ln.strip()}) if rc == 0 else []
    if not caps or not all(c.replace(".", "").isdigit() for c in caps):
        return None
    return ";".join(caps)


def cuda_archs(init_cuda: bool = True) -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs, else ``8.0;9.0``."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or _visible_gpu_archs(init_cuda) or DEFAULT_CUDA_ARCHS


def cuda_arch_flags(archs: str) -> list[str]:
    """nvcc ``-gencode`` flags for an arch list such as ``"8.0;9.0+PTX"`` (also space-separated)."""
    flags = []
    for item in archs.replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cuda_plan(init_cuda: bool = True) -> tuple[bool, Optional[str], dict[str, Any]]:
    """Whether to build the CUDA part: ``(build, reason_if_not, {"nvcc", "archs"})``."""
    import torch  # noqa: PLC0415

    if _flag("TARP_FAST_NO_CUDA"):
        return False, "TARP_FAST_NO_CUDA is set", {}
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)", {}
    nvcc = find_nvcc()
    if not nvcc:
        return False, "nvcc not found (set CUDA_HOME to the CUDA toolkit matching torch.version.cuda)", {}
    return True, None, {"nvcc": nvcc, "archs": cuda_archs(init_cuda)}


# ---- flags and build info ----------------------------------------------------------------------


def compile_flags(cxx: str, with_cuda: bool) -> dict[str, Any]:
    """``{"cxx": [...], "nvcc": [...], "ldflags": [...], "openmp": bool}`` for both builds."""
    omp = openmp_flags(cxx)
    # -g0: Python's CFLAGS carry -g; debug info triples the .so (12 MB) and slows the build.
    opt = ["-O0", "-g"] if _flag("TARP_FAST_DEBUG") else ["-O3", "-g0"]
    cxx_flags = opt + omp + ["-Wno-unused-parameter"]
    nvcc_flags: list[str] = []
    if with_cuda:
        cxx_flags.append("-DTARP_FAST_WITH_CUDA")
        nvcc_flags = opt + ["-DTARP_FAST_WITH_CUDA", "-lineinfo"]
    return {"cxx": cxx_flags, "nvcc": nvcc_flags, "ldflags": list(omp), "openmp": bool(omp)}


def build_info(cxx: str, flags: dict[str, Any], with_cuda: bool, cuda_reason: Optional[str],
               cuda: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The contents of ``_C.build.json`` (read by ``tarp_fast.ext_info()``)."""
    import torch  # noqa: PLC0415

    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": sys.platform,
        "compiler": f"{cxx}: {first_line([cxx, '--version'])}",
        "openmp": flags["openmp"],
        "openmp_reason": None if flags["openmp"] else f"{cxx} does not accept -fopenmp: row loops run on one thread",
        "cxx_flags": flags["cxx"],
        "cuda_built": with_cuda,
        "cuda_reason": cuda_reason,
        "cuda_archs": cuda.get("archs"),
        "nvcc": cuda.get("nvcc"),
        "nvcc_version": nvcc_version(cuda["nvcc"]) if cuda.get("nvcc") else None,
        "max_jobs": os.environ.get("MAX_JOBS"),
        "debug": _flag("TARP_FAST_DEBUG"),
    }
    info.update(extra)
    return info


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ---- compile checks without a build (tests/test_native_nvcc.py) ----------------------------------


def torch_include_dirs() -> list[str]:
    import torch.utils.cpp_extension as ce  # noqa: PLC0415

    return list(ce.include_paths()) + [sysconfig.get_paths()["include"]]


def cuda_header_shims(folder: str) -> list[str]:
    """Write the CUDA headers a CPU build of torch lacks into ``folder``; return ``-I`` dirs.

    A CPU wheel of torch ships ``c10/cuda/*.h`` but not the CMake-generated
    ``c10/cuda/impl/cuda_cmake_macros.h``; a CUDA wheel has it with ``C10_CUDA_BUILD_SHARED_LIBS``
    defined (shared libraries), which is what this shim says. Only for compile checks.
    """
    gen = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if any(os.path.exists(os.path.join(d, gen)) for d in torch_include_dirs()):
        return []
    path = os.path.join(folder, gen)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("#pragma once\n// shim written by cuda_header_shims (torch is a CPU build)\n"
                "#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [folder]


def nvcc_compile_command(src: str, obj: str, archs: str = DEFAULT_CUDA_ARCHS, nvcc: Optional[str] = None,
                         extra_includes: Optional[list[str]] = None, csrc: Optional[str] = None) -> list[str]:
    """The nvcc command that compiles one ``.cu`` of the sources to an object, as the real build does.

    Used by ``tests/test_native_nvcc.py`` to check the CUDA sources on machines whose torch is a
    CPU build (torch's CUDA headers ship with every build; nothing is linked or loaded); pass
    ``extra_includes=cuda_header_shims(tmpdir)`` there.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    cmd = [nvcc, "-c", src, "-o", obj, "-std=c++20", "-O3", "--expt-relaxed-constexpr",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "-DTARP_FAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           "-Xcompiler", "-fPIC", "-Xcudafe", "--diag_suppress=20012", "--threads", "2"]
    cmd += cuda_arch_flags(archs)
    cmd += [f"-I{d}" for d in list(extra_includes or []) + torch_include_dirs()]
    cmd.append(f"-I{csrc or source_dir() or os.path.dirname(os.path.abspath(src))}")
    return cmd


# ---- the JIT build's child process ---------------------------------------------------------------


def jit_child(request_path: str) -> int:
    """Build the extension into a cache folder (run by ``tarp_fast._jit`` in a child process).

    ``request_path``: JSON with ``src_dir``, ``build_dir``, ``with_cuda``, ``cuda_reason``,
    ``cuda`` (``nvcc``, ``archs``), ``key``, ``digest``. stdout and stderr are the build log.
    Compiles and links with ``torch.utils.cpp_extension.load`` (ninja), loads the library to check
    that its ops register, and writes ``_C.build.json`` into ``build_dir`` last: its presence
    marks a complete build. Returns the exit status.
    """
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with open(request_path, encoding="utf-8") as f:
        req = json.load(f)
    src, out = req["src_dir"], req["build_dir"]
    t0 = time.perf_counter()
    import torch  # noqa: PLC0415
    from torch.utils.cpp_extension import load  # noqa: PLC0415

    cxx = find_cxx()
    if cxx is None:
        print("error: no C++ compiler found (set CXX)", flush=True)
        return 3
    with_cuda = bool(req["with_cuda"])
    flags = compile_flags(cxx, with_cuda)
    sources = [os.path.join(src, s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    print(f"tarp-fast: building {EXT_NAME} from {src} into {out}\n  torch {torch.__version__}, "
          f"compiler {cxx}, flags {flags}, CUDA part: {with_cuda} ({req.get('cuda_reason')})", flush=True)
    load(name="_C", sources=sources, extra_cflags=flags["cxx"], extra_cuda_cflags=flags["nvcc"] or None,
         extra_ldflags=flags["ldflags"], extra_include_paths=[src], build_directory=out, verbose=True,
         with_cuda=with_cuda, is_python_module=False)
    torch.ops.tarp_fast.native_tarp_fwd.default  # noqa: B018  (registered by loading the library)
    seconds = round(time.perf_counter() - t0, 1)
    info = build_info(cxx, flags, with_cuda, req.get("cuda_reason"), req.get("cuda") or {},
                      build_seconds=seconds, key=req["key"], digest=req["digest"], source_dir=src)
    write_json(os.path.join(out, BUILD_INFO_NAME), info)
    print(f"tarp-fast: built {EXT_NAME} in {seconds} s", flush=True)
    return 0
