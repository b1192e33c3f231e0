"""A plain ``pip install`` of the sdist gives a working native op: the extension builds on first use.

One session fixture does what a user does, once (the CPU build takes 20-40 s on 2 cores):

1. ``python -m build --sdist`` of this checkout (``setup.py sdist`` if ``build`` is missing);
2. a fresh venv (``python -m venv --without-pip``) whose only extra is a ``.pth`` line naming this
   Python's site-packages, so torch and the other dependencies are found without copying a 1 GB
   torch into it: pip sees them installed and resolves the package's requirements against them.
   The editable install of tarp-fast there is invisible (a ``.pth`` path is not a site folder, so
   its finder hook does not run), and the fresh venv's own site-packages come first;
3. ``pip install --no-cache-dir SDIST`` there, with build isolation (pip's build environment hides
   both site-packages, so the build has no torch, as for a user: a pure-Python wheel);
4. two processes started together, outside the checkout, each calling the native op
   (``TORCH_EXTENSIONS_DIR`` in tmp, ``MAX_JOBS=2``, ``TARP_FAST_NO_CUDA=1``).

The tests then read what happened, and run a third process against the cache.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROBE = r'''
import json, os, sys, time
t0 = time.time()
import torch
import tarp_fast
from tarp_fast import reference

torch.manual_seed(0)
d = dict(dtype=torch.float64)
x = torch.randn(6, 16, **d, requires_grad=True)
w, b = torch.randn(12, 16, **d), torch.randn(12, **d)
U, V = torch.randn(12, 4, **d, requires_grad=True), torch.randn(4, 16, **d, requires_grad=True)
kw = dict(activation="gelu_tanh", gate=torch.rand(6, **d), scaling=0.5)
y = tarp_fast.tarp_linear(x, w, b, U, V, backend="native", **kw)
g = torch.autograd.grad(y.square().sum(), (x, U, V))
y_ref = reference.tarp_linear(x, w, b, U, V, **kw)
g_ref = torch.autograd.grad(y_ref.square().sum(), (x, U, V))
torch.testing.assert_close(y, y_ref)
for a, e in zip(g, g_ref):
    torch.testing.assert_close(a, e)
info = tarp_fast.ext_info()
print(json.dumps({"package": tarp_fast.__file__, "version": tarp_fast.__version__, "info": info,
                  "seconds": time.time() - t0}))
'''


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def _probe_result(proc_out: str) -> dict:
    return json.loads(proc_out.strip().splitlines()[-1])


class Env:
    """The fresh venv, its cache folder, and what the first two processes printed."""

    def __init__(self, base: pathlib.Path):
        self.base = base
        self.venv = base / "venv"
        self.python = self.venv / "bin" / "python"
        self.ext_dir = base / "torch_extensions"
        self.work = base / "work"  # cwd of the probes: outside the checkout
        self.probe = self.work / "probe.py"
        self.sdist: pathlib.Path
        self.site: pathlib.Path  # the fresh venv's site-packages
        self.sdist_names: list[str] = []
        self.timings: dict[str, float] = {}
        self.first: list[tuple[dict, str]] = []  # (probe result, stderr) of the concurrent pair

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TORCH_EXTENSIONS_DIR", "CXX")}
        env.update(TORCH_EXTENSIONS_DIR=str(self.ext_dir), MAX_JOBS="2", TARP_FAST_NO_CUDA="1",
                   TARP_FAST_NO_EXT="0", PYTHONNOUSERSITE="1")
        env.update(extra)
        return env

    def start_probe(self, **extra):
        return subprocess.Popen([str(self.python), str(self.probe)], cwd=self.work, env=self.env(**extra),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def jit_env(tmp_path_factory):
    if sys.platform == "win32":
        pytest.skip("the fresh-venv layout here is POSIX")
    if shutil.which("c++") is None and shutil.which("g++") is None and not os.environ.get("CXX"):
        pytest.skip("no C++ compiler")
    e = Env(tmp_path_factory.mktemp("jit"))
    e.work.mkdir()
    e.probe.write_text(PROBE)

    t0 = time.perf_counter()
    dist = e.base / "dist"
    try:
        import build  # noqa: F401

        cmd = [sys.executable, "-m", "build", "--sdist", "--outdir", str(dist), str(ROOT)]
    except ImportError:
        cmd = [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)]
    _run(cmd, cwd=ROOT, timeout=300)
    (e.sdist,) = dist.glob("tarp_fast-*.tar.gz")
    with tarfile.open(e.sdist) as tf:
        e.sdist_names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    e.timings["sdist"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _run([sys.executable, "-m", "venv", "--without-pip", str(e.venv)], timeout=120)
    purelib = _run([str(e.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   timeout=60).stdout.strip()
    pathlib.Path(purelib, "_tarp_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(e.python), "-m", "pip", "install", "-q", "--no-cache-dir", str(e.sdist)], cwd=e.work,
         env=e.env(), timeout=600)
    e.site = pathlib.Path(purelib)
    e.timings["venv+install"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    procs = [e.start_probe(), e.start_probe()]  # started together: one builds, the other waits
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"probe failed:\n{out[-4000:]}\n{err[-6000:]}"
        e.first.append((_probe_result(out), err))
    e.timings["first use, 2 processes"] = time.perf_counter() - t0
    return e


def test_sdist_carries_sources_and_installs_a_pure_wheel(jit_env):
    names = set(jit_env.sdist_names)
    for need in ("setup.py", "pyproject.toml", "csrc_build.py", "README.md", "tarp_fast/_build_config.py",
                 "tarp_fast/_jit.py", "tarp_fast/build.py", "kernels/__init__.py", "csrc/tarp_ops.cpp",
                 "csrc/tarp_cpu.cpp", "csrc/tarp_autograd.cpp", "csrc/tarp_cuda.cu", "csrc/tarp_common.h"):
        assert need in names, f"{need} missing from the sdist"
    assert not any(n.endswith((".so", ".o")) or n.startswith("tests/") for n in names)
    pkg = jit_env.site / "tarp_fast"
    assert (pkg / "_csrc" / "tarp_ops.cpp").is_file() and (pkg / "kernels" / "__init__.py").is_file()
    assert not list(pkg.glob("_C*.so")), "the isolated build had torch: it should have been pure Python"
    # The version comes from one place.
    result, _ = jit_env.first[0]
    assert jit_env.sdist.name == f"tarp_fast-{result['version']}.tar.gz"
    assert pathlib.Path(result["package"]).parent == pkg


def test_concurrent_first_use_builds_once(jit_env):
    """Two processes start together: exactly one compiles, both get the op and agree with the reference."""
    results = [r for r, _ in jit_env.first]
    errs = [err for _, err in jit_env.first]
    compiling = [err for err in errs if "compiling" in err]
    assert len(compiling) == 1, errs
    assert "built tarp_fast._C in" in compiling[0]
    assert sorted(r["info"]["source"] for r in results) == ["jit-built", "jit-cache"], errs
    builds = [p for p in jit_env.ext_dir.iterdir() if p.is_dir()]
    assert len(builds) == 1, builds
    for r in results:
        info = r["info"]
        assert info["available"] is True and info["reason"] is None
        assert "tarp_fast::native_tarp_fwd" in info["ops"]
        assert pathlib.Path(info["path"]).parent == builds[0]
        assert pathlib.Path(info["cache_dir"]) == builds[0] and pathlib.Path(info["log"]).is_file()
        assert info["build"]["torch"] == info["torch"] and info["cuda"]["built"] is False
        # Compiled from the sources installed with the package, not from the checkout.
        assert pathlib.Path(info["build"]["source_dir"]) == jit_env.site / "tarp_fast" / "_csrc"
    print("timings (s):", {k: round(v, 1) for k, v in jit_env.timings.items()},
          "build:", results[0]["info"]["build"]["build_seconds"])


def test_second_process_reuses_the_cache(jit_env):
    (build,) = [p for p in jit_env.ext_dir.iterdir() if p.is_dir()]
    so = build / "_C.so"
    mtime = so.stat().st_mtime_ns
    t0 = time.perf_counter()
    p = jit_env.start_probe()
    out, err = p.communicate(timeout=300)
    seconds = time.perf_counter() - t0
    assert p.returncode == 0, err[-4000:]
    r = _probe_result(out)
    assert r["info"]["source"] == "jit-cache" and r["info"]["available"] is True
    assert "compiling" not in err and "waiting" not in err, err
    assert so.stat().st_mtime_ns == mtime
    assert seconds < 60, seconds  # an import, no build


def test_prebuild_command_reports_the_cache(jit_env):
    """`python -m tarp_fast.build` finds the build done (a prebuild is the same build)."""
    (build,) = [p for p in jit_env.ext_dir.iterdir() if p.is_dir()]
    out = _run([str(jit_env.python), "-m", "tarp_fast.build", "--json"], cwd=jit_env.work, env=jit_env.env(),
               timeout=300).stdout
    assert "already built" in out and str(build) in out, out
    data = json.loads(out[out.index("{"):])
    assert data["source"] == "jit-cache" and data["cache_dir"] == str(build)
    where = _run([str(jit_env.python), "-m", "tarp_fast.build", "--print-dir"], cwd=jit_env.work,
                 env=jit_env.env(), timeout=300).stdout.strip()
    assert where == str(build)


def test_failed_build_falls_back_with_one_warning(jit_env, tmp_path):
    """A broken compiler: auto falls back to the reference, one warning names the reason and the log."""
    code = (
        "import warnings, torch, tarp_fast\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    for _ in range(3):\n"
        "        y = tarp_fast.tarp_linear(torch.randn(3, 4), torch.randn(5, 4))\n"
        "msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(msgs[0])\n"
        "print(tarp_fast.ext_info()['log'])\n"
    )
    cxx = tmp_path / "broken-cxx"
    cxx.write_text("#!/bin/sh\necho 'broken-cxx: error: this compiler is broken on purpose' >&2\nexit 1\n")
    cxx.chmod(0o755)
    env = jit_env.env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX=str(cxx))
    out = _run([str(jit_env.python), "-c", code], cwd=jit_env.work, env=env, timeout=300).stdout
    msg, log = out.strip().splitlines()[-2:]
    assert "building it on first use failed" in msg and log in msg and "TARP_FAST_NO_EXT=1" in msg, msg
    assert pathlib.Path(log).is_file()


def test_no_ext_never_builds(jit_env, tmp_path):
    code = "import tarp_fast; i = tarp_fast.ext_info(); print(i['available'], i['source']); print(i['reason'])"
    env = jit_env.env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), TARP_FAST_NO_EXT="1")
    proc = _run([str(jit_env.python), "-c", code], cwd=jit_env.work, env=env, timeout=300)
    first, reason = proc.stdout.strip().splitlines()[-2:]
    assert first == "False None" and "TARP_FAST_NO_EXT" in reason and "not built" in reason
    assert "compiling" not in proc.stderr and not (tmp_path / "ext").exists()


def test_wheel_from_an_isolated_build_ships_the_sources(jit_env, tmp_path):
    """The wheel pip built from the sdist (isolated, no torch) is pure Python and carries csrc."""
    _run([str(jit_env.python), "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "-w", str(tmp_path),
          str(jit_env.sdist)], cwd=jit_env.work, env=jit_env.env(), timeout=600)
    (wheel,) = tmp_path.glob("tarp_fast-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"tarp_fast/_csrc/tarp_ops.cpp", "tarp_fast/_csrc/tarp_common.h", "tarp_fast/_build_config.py"} <= names
    assert not any(n.endswith(".so") for n in names)
