"""Install layout: `kernels/` ships as `tarp_fast.kernels` in regular and editable installs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBE = (
    "import tarp_fast, tarp_fast.kernels, tarp_fast.reference; "
    "print(tarp_fast.__file__); print(tarp_fast.kernels.__file__)"
)


def _probe(cwd, env=None):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return [pathlib.Path(p) for p in out.stdout.split()]


@pytest.mark.slow
def test_regular_install_from_wheel_imports_kernels_outside_the_tree(tmp_path):
    env = {**os.environ, "TARP_FAST_NO_EXT": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("tarp_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tarp_fast/kernels/__init__.py" in names
    assert "tarp_fast/reference.py" in names and "tarp_fast/nn/linear.py" in names
    assert not any(n.startswith("kernels/") or n.startswith("tests/") for n in names)
    # The extension's sources ship for the build on first use (tests/test_jit_build.py).
    assert "tarp_fast/_csrc/tarp_ops.cpp" in names and "tarp_fast/_build_config.py" in names
    assert not any(n.endswith(".so") for n in names)  # TARP_FAST_NO_EXT=1: nothing compiled
    site = tmp_path / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert inst.returncode == 0, inst.stdout + inst.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pkg, kernels = _probe(elsewhere, env={**os.environ, "PYTHONPATH": str(site)})
    assert site in pkg.parents and site in kernels.parents


def test_installed_package_imports_kernels_from_outside_the_tree(tmp_path):
    pkg, kernels = _probe(tmp_path)
    if ROOT in pkg.parents:  # editable install: kernels come from the top-level folder
        assert kernels == ROOT / "kernels" / "__init__.py"
    else:
        assert kernels.parent == pkg.parent / "kernels"
