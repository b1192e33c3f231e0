"""Ahead-of-time build of the native extension ``tarp_fast._C`` (called by ``setup.py``).

The sources, flags, CUDA decision and build info come from ``tarp_fast/_build_config.py``,
shared with the just-in-time build of ``tarp_fast._jit`` (first use, ``python -m
tarp_fast.build``); it is loaded here by path, so neither this file nor ``setup.py`` imports the
``tarp_fast`` package (an isolated build has no torch). Read that file's docstring for what is
built and when, and the build flags.

This file adds what only the setuptools build needs: the ``Extension`` object and a
``build_ext`` that times the build and writes ``tarp_fast/_C.build.json`` next to the compiled
module. ``tarp_fast._ext`` refuses to load a module built against another torch (a readable reason
instead of an undefined-symbol crash) and then falls back to the JIT build.

Build time (2 cores, ``MAX_JOBS=2``, gcc 12, CPU only): see README ("The native extension").
The translation units avoid ``<torch/extension.h>`` (pybind11 and the C++ frontend) and heavy
template instantiation; there are three small CPU files, compiled in parallel.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_config():
    name = "tarp_fast_build_config"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tarp_fast", "_build_config.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


config = _load_config()
EXT_NAME = config.EXT_NAME
# Paths relative to the repository root (setuptools wants them relative to setup.py).
CPU_SOURCES = [f"csrc/{s}" for s in config.CPU_SOURCES]
CUDA_SOURCES = [f"csrc/{s}" for s in config.CUDA_SOURCES]
DEFAULT_CUDA_ARCHS = config.DEFAULT_CUDA_ARCHS
BUILD_INFO_NAME = config.BUILD_INFO_NAME
find_cxx = config.find_cxx
find_nvcc = config.find_nvcc
cuda_arch_flags = config.cuda_arch_flags
torch_include_dirs = config.torch_include_dirs
cuda_header_shims = config.cuda_header_shims


def nvcc_compile_command(src, obj, archs=DEFAULT_CUDA_ARCHS, nvcc=None, extra_includes=None):
    """``tarp_fast._build_config.nvcc_compile_command`` with this checkout's ``csrc/``."""
    return config.nvcc_compile_command(src, obj, archs=archs, nvcc=nvcc, extra_includes=extra_includes,
                                       csrc=os.path.join(ROOT, "csrc"))


__all__ = [
    "config",
    "extension_modules",
    "find_nvcc",
    "find_cxx",
    "cuda_arch_flags",
    "nvcc_compile_command",
    "cuda_header_shims",
    "torch_include_dirs",
    "CPU_SOURCES",
    "CUDA_SOURCES",
    "DEFAULT_CUDA_ARCHS",
    "BUILD_INFO_NAME",
]


class _BuildInfoWriter:
    """Mixin for torch's BuildExtension: time the build and write ``_C.build.json`` beside ``_C``."""

    build_info: dict[str, object] = {}

    def build_extensions(self):  # noqa: D401
        t0 = time.perf_counter()
        super().build_extensions()
        info = dict(self.build_info)
        info["build_seconds"] = round(time.perf_counter() - t0, 1)
        for ext in self.extensions:
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_INFO_NAME)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            config.write_json(path, info)
            print(f"tarp-fast: built {ext.name} in {info['build_seconds']} s, build info in {path}")

    def _info_paths(self):
        for ext in self.extensions:
            yield os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_INFO_NAME)

    def get_outputs(self):
        return list(super().get_outputs()) + list(self._info_paths())

    def copy_extensions_to_source(self):
        # Editable installs copy the module from the build folder into the source tree; the
        # build info goes with it. get_ext_fullpath() gives the in-place path while inplace is
        # set, so the build folder's path is taken with inplace off.
        super().copy_extensions_to_source()
        for ext in self.extensions:
            inplace_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
            old, self.inplace = self.inplace, False
            try:
                regular_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
            finally:
                self.inplace = old
            src = os.path.join(regular_dir, BUILD_INFO_NAME)
            if os.path.exists(src) and os.path.abspath(regular_dir) != os.path.abspath(inplace_dir):
                self.copy_file(src, os.path.join(inplace_dir, BUILD_INFO_NAME), level=self.verbose)


def extension_modules():
    """``(ext_modules, cmdclass)`` for ``tarp_fast._C``; ``([], {})`` when nothing can be built."""
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        print(f"tarp-fast: not building tarp_fast._C now: torch is not importable ({exc}); it builds on "
              "first use instead (or build it here with `pip install --no-build-isolation .`)")
        return [], {}
    cxx = find_cxx()
    if cxx is None:
        print("tarp-fast: not building tarp_fast._C: no C++ compiler found (set CXX); "
              "the reference backend still works")
        return [], {}
    build_cuda, cuda_reason, cuda = config.cuda_plan(init_cuda=True)
    flags = config.compile_flags(cxx, build_cuda)
    if build_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = str(cuda["archs"])  # read by torch's nvcc flag logic
        ext = CUDAExtension(
            EXT_NAME,
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": flags["cxx"], "nvcc": flags["nvcc"]},
            extra_link_args=flags["ldflags"],
        )
    else:
        ext = CppExtension(EXT_NAME, CPU_SOURCES, extra_compile_args={"cxx": flags["cxx"]},
                           extra_link_args=flags["ldflags"])
        print(f"tarp-fast: building the CPU part of tarp_fast._C only: {cuda_reason}")
    info = config.build_info(cxx, flags, build_cuda, cuda_reason, cuda)

    class TarpBuildExt(_BuildInfoWriter, BuildExtension):
        build_info = info

    # ninja when present (a dependency of the package); a plain setuptools build otherwise.
    use_ninja = config.find_ninja() is not None
    if use_ninja and shutil.which("ninja") is None:  # torch runs `ninja` from PATH
        os.environ["PATH"] = os.pathsep.join(config.ninja_dirs() + [os.environ.get("PATH", "")])
    return [ext], {"build_ext": TarpBuildExt.with_options(use_ninja=use_ninja)}
