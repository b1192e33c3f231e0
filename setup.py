"""Build and install tarp-fast.

* ``tarp_fast`` (the package) and the top-level ``kernels/`` folder, installed as
  ``tarp_fast.kernels``. Packages are listed explicitly; ``package_dir`` maps the kernels.
* ``tarp_fast/_csrc/``: a copy of the C++/CUDA sources of ``csrc/`` (the files
  ``tarp_fast/_build_config.py`` lists), so an installed package can build its extension on
  first use (``tarp_fast._jit``) when the install could not.
* ``tarp_fast._C``: the native extension, built here only when torch is importable at build
  time (``pip install --no-build-isolation .``; see ``csrc_build.py``). A default (isolated)
  ``pip install`` has no torch in its build environment: the wheel is pure Python and the
  extension compiles on first use instead, against the torch actually imported.
  ``TARP_FAST_NO_EXT=1`` skips it here (and at run time, the build on first use).

The version is ``__version__`` in ``tarp_fast/__init__.py``, read here as text.
"""

import os
import re
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PACKAGES = [
    "tarp_fast",
    "tarp_fast.nn",
    "tarp_fast.tams",
    "tarp_fast.meta",
    "tarp_fast.data",
    "tarp_fast.peft",
    "tarp_fast.kernels",
]


def _version():
    with open(os.path.join(HERE, "tarp_fast", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if match is None:
        raise RuntimeError("tarp_fast/__init__.py has no __version__ = \"...\" line")
    return match.group(1)


def _existing(packages):
    """Keep the packages whose folder exists (later issues add tams/meta/data)."""
    out = []
    for pkg in packages:
        folder = "kernels" if pkg == "tarp_fast.kernels" else pkg.replace(".", os.sep)
        if os.path.isfile(os.path.join(HERE, folder, "__init__.py")):
            out.append(pkg)
    return out


def _extensions():
    """Return ``(ext_modules, cmdclass)`` for ``tarp_fast._C``; empty when it is not built."""
    if os.environ.get("TARP_FAST_NO_EXT", "0") not in ("", "0"):
        print("tarp-fast: TARP_FAST_NO_EXT is set, not building tarp_fast._C")
        return [], {}
    try:
        from csrc_build import extension_modules  # noqa: PLC0415  (build logic lives beside csrc/)
    except ImportError as exc:
        print(f"tarp-fast: not building tarp_fast._C ({exc})")
        return [], {}
    return extension_modules()


class BuildPyWithSources(build_py):
    """build_py that also copies the extension's sources into ``tarp_fast/_csrc`` of the build."""

    def _csrc_files(self):
        from csrc_build import config  # noqa: PLC0415

        src = os.path.join(HERE, "csrc")
        dst = os.path.join(self.build_lib, "tarp_fast", config.PACKAGED_SOURCES)
        return [(os.path.join(src, n), os.path.join(dst, n)) for n in config.source_files(src)]

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install builds from the checkout's csrc/ (tarp_fast._build_config.source_dir)
        for src, dst in self._csrc_files():
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs += [dst for _, dst in self._csrc_files()]
        return outputs


ext_modules, cmdclass = _extensions()
cmdclass = {**cmdclass, "build_py": BuildPyWithSources}

setup(
    name="tarp-fast",
    version=_version(),
    description="Fused Triton/CUDA kernels for dynamic low-rank reparameterization (MLtD: TARP, TAMS, preparation)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=_existing(PACKAGES),
    package_dir={"tarp_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        'triton>=3.6; platform_system == "Linux" and platform_machine == "x86_64"',
        "transformers>=5.17",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
        # Runs the native extension's build on first use (torch.utils.cpp_extension.load).
        "ninja",
    ],
    extras_require={
        "peft": ["peft>=0.21"],
        "test": ["pytest", "pytest-benchmark", "peft", "pybind11", "build"],
    },
    entry_points={"console_scripts": ["tarp-fast=tarp_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
