"""Everything a GPU machine should run, in one call of at most 8 minutes:
``python3 benchmarks/gpu_run.py OUT`` (from the repository root; ``--budget`` seconds, default 470).

Steps, most valuable first, each with its own time limit, so that whatever a later step does the
earlier results are already in ``OUT``:

1. ``env``: GPU, driver, versions, what is installed (pytest-xdist, peft, nvcc, ninja); makes
   ``tarp_fast`` importable if it is not (``pip install --no-deps --no-build-isolation -e .`` with
   ``TARP_FAST_NO_EXT=1``: seconds, nothing downloaded).
2. ``ext_build``, in the background with the GPU hidden (``CUDA_VISIBLE_DEVICES=``, niced):
   ``TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 python setup.py build_ext --inplace`` (the CUDA
   extension, for the CUDA helper tests at the end).
3. ``precompile``: the report's kernels, recorded on CPU tensors and compiled in parallel
   processes into the Triton cache (``gpu_report.py --precompile``), GPU hidden; then, in the
   background while the report runs, the same for the GPU test tier (``TARP_FAST_GPU_TESTS=capture``;
   stopped once the GPU tests have run, status ``stopped`` if it was still compiling).
4. ``report``: the headline report (``gpu_report.py``), alone on the GPU -> ``OUT/report.json``,
   ``OUT/report.md`` (rewritten after every row).
5. ``gpu_tests``: ``tests/test_triton_gpu.py`` in parallel workers (pytest-xdist when importable,
   else serially), the dtype checks against float64 and TF32 first.
6. ``cuda_helpers``: ``tests/test_cuda_helpers.py`` once the extension is built.
7. ``autotune``: ``gpu_report.py --autotune --quick`` with the time that is left ->
   ``OUT/autotune.json`` / ``.md``.

``OUT`` receives at most 7 files: ``run.log`` (every step's output, unbuffered, with headers),
``summary.txt`` (also the last lines printed), ``summary.json`` (steps, every test by name with its
outcome, the Triton cache counts), ``report.json`` / ``.md``, ``autotune.json`` / ``.md``.

Triton cache: ``TRITON_CACHE_DIR`` is a scratch folder, pre-seeded from ``--triton-cache-seed``
(default ``.tarp_fast_cache/triton-<version>-sm<arch>`` when present: a cache built on a CPU
machine, see ``python -m tarp_fast.kernels.precompile``); every lookup of every process is logged
(a Triton cache manager set through ``TRITON_CACHE_MANAGER``), and the summary counts the hits of
the seed, the hits of kernels compiled earlier in the run, and the compiles. A seed that misses
costs nothing.

``--dry-run`` (CPU, ``make test``): the same steps on CPU with tiny shapes under the Triton
interpreter (the report with ``--dry-run``, the GPU tests with ``TARP_FAST_GPU_TESTS=dry``), the
kernels recorded and counted but only a few compiled, the extension not built (its build
command only parsed), nothing installed or written outside ``OUT`` and a scratch folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS_MODULE = "tarp_gpu_run_hooks"

# A pytest plugin (one JSON line per test phase, written as it happens, by the controlling
# process only) and a Triton cache manager that logs every lookup. Written into the scratch
# folder, which goes on PYTHONPATH of every step, so nothing of it lives in the checkout's path.
HOOKS = textwrap.dedent('''
    """Written by benchmarks/gpu_run.py: a pytest plugin and a logging Triton cache manager."""
    import json
    import os

    def _append(path, line):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def pytest_runtest_logreport(report):
        path = os.environ.get("TARP_GPU_RUN_TESTS_JSONL")
        if not path or os.environ.get("PYTEST_XDIST_WORKER"):
            return  # (under xdist the controller sees every worker's reports)
        if report.when != "call" and report.outcome == "passed":
            return
        text = ""
        if report.outcome == "failed":
            text = (report.longreprtext or "")[-1500:]
        elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            text = str(report.longrepr[2])[:300]
        _append(path, json.dumps(dict(test=report.nodeid, when=report.when, outcome=report.outcome,
                                      seconds=round(report.duration, 2), text=text)) + "\\n")

    try:
        from triton.runtime.cache import FileCacheManager as _Base
    except Exception:  # pragma: no cover - no Triton: nothing will use the manager
        _Base = object

    class LoggingCacheManager(_Base):
        """Triton's file cache, logging each kernel lookup: hit or miss, cache key, kernel, pid."""

        def get_group(self, filename):
            group = super().get_group(filename)
            path = os.environ.get("TARP_GPU_RUN_CACHE_LOG")
            if path and filename.endswith(".json") and not filename.startswith("__"):
                hit = bool(group) and filename in group
                step = os.environ.get("TARP_GPU_RUN_STEP", "-")
                _append(path, f"{'hit' if hit else 'miss'} {self.key} {filename[:-5]} {os.getpid()} {step}\\n")
            return group
''')


class Run:
    """Steps, logs and the summary of one GPU run."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.scratch = tempfile.mkdtemp(prefix="tarp-gpu-run-")
        self.log = open(os.path.join(self.out, "run.log"), "a", buffering=1)
        self.steps: list[dict] = []
        self.bg: dict[str, dict] = {}
        self.info: dict = {}
        self.py = sys.executable
        hooks = os.path.join(self.scratch, "hooks")
        os.makedirs(hooks)
        with open(os.path.join(hooks, HOOKS_MODULE + ".py"), "w") as fh:
            fh.write(HOOKS)
        self.tests_jsonl = os.path.join(self.scratch, "tests.jsonl")
        self.cache_log = os.path.join(self.scratch, "triton_cache.log")
        self.cache_dir = os.path.join(self.scratch, "triton-cache")
        self.seed_keys: set[str] = set()
        self.env = dict(os.environ)
        self.env.update(
            PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([hooks] + ([os.environ["PYTHONPATH"]] if
                                                                       os.environ.get("PYTHONPATH") else [])),
            TRITON_CACHE_DIR=self.cache_dir, TRITON_CACHE_MANAGER=f"{HOOKS_MODULE}:LoggingCacheManager",
            TARP_GPU_RUN_CACHE_LOG=self.cache_log, TOKENIZERS_PARALLELISM="false",
            # nothing may start a build of the extension on first use (minutes) in a timed step:
            # the module built in place by the ext_build step still loads
            TARP_FAST_NO_EXT="1",
            # torch.compile in the tests compiles inductor's kernels in-process (no worker pool
            # competing for the cores, and no pool process that might not see PYTHONPATH)
            TORCHINDUCTOR_COMPILE_THREADS="1")
        self.env.pop("TRITON_INTERPRET", None)
        self.env.pop("TARP_FAST_AUTOTUNE", None)
        self.env.pop("TARP_FAST_DX", None)  # the report times both designs itself

    # ---- time ------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    # ---- output ----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A progress line: stdout and run.log."""
        line = f"[gpu_run {self.elapsed():5.0f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def _header(self, name, cmd, limit):
        self.log.write(f"\n{'=' * 100}\n== step {name} at {self.elapsed():.0f}s, limit {limit:.0f}s\n== "
                       f"{' '.join(cmd)}\n{'=' * 100}\n")

    def _popen(self, cmd, env, log, cwd=None, nice=0):
        def pre():
            os.setsid()  # its own process group: a time limit kills the whole tree
            if nice:
                os.nice(nice)

        return subprocess.Popen(cmd, cwd=cwd or ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=pre)

    @staticmethod
    def _kill(proc):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        except ProcessLookupError:
            pass

    def step(self, name, cmd, limit, env=None, echo=None) -> dict:
        """Run ``cmd`` in the foreground with a time limit, its output streamed into run.log (and
        the lines matching ``echo`` to stdout)."""
        limit = max(1.0, min(limit, self.left()))
        rec = dict(name=name, cmd=" ".join(cmd), limit=round(limit), start=round(self.elapsed(), 1))
        self._header(name, cmd, limit)
        self.say(f"{name}: start (limit {limit:.0f}s)")
        t = time.time()
        env = dict(env or self.env, TARP_GPU_RUN_STEP=name)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", preexec_fn=os.setsid)

        def pump():
            for line in proc.stdout:
                self.log.write(line)
                if echo and any(e in line for e in echo):
                    print(f"    {line.rstrip()[:200]}", flush=True)

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        try:
            rc = proc.wait(limit)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            rc = "timeout"
        th.join(5)
        rec.update(rc=rc, seconds=round(time.time() - t, 1))
        rec["status"] = "ok" if rc == 0 else ("timeout" if rc == "timeout" else "failed")
        self.steps.append(rec)
        self.say(f"{name}: {rec['status']} (rc {rc}) in {rec['seconds']}s")
        self.write_summary(final=False)
        return rec

    def background(self, name, cmd, env, nice=10):
        path = os.path.join(self.scratch, f"{name}.log")
        fh = open(path, "w", buffering=1)
        env = dict(env, TARP_GPU_RUN_STEP=name)
        self.bg[name] = dict(proc=self._popen(cmd, env, fh, nice=nice), log=path, fh=fh, start=self.elapsed(),
                             cmd=" ".join(cmd))
        self.say(f"{name}: started in the background")

    def join(self, name, limit, *, stop: bool = False) -> dict:
        """Wait for a background step (up to ``limit`` s, then kill it); its log goes into run.log.
        ``stop``: its work is no longer needed, so a kill is status ``stopped``, not a timeout."""
        b = self.bg.pop(name)
        limit = max(0.0, min(limit, self.left()))
        try:
            rc = b["proc"].wait(limit)
        except subprocess.TimeoutExpired:
            self._kill(b["proc"])
            rc = "stopped" if stop else "timeout"
        b["fh"].close()
        self._header(name + " (background)", b["cmd"].split(), 0)
        with open(b["log"], errors="replace") as fh:
            self.log.write(fh.read())
        rec = dict(name=name, cmd=b["cmd"], rc=rc, start=round(b["start"], 1),
                   seconds=round(self.elapsed() - b["start"], 1), background=True,
                   status="ok" if rc == 0 else (rc if rc in ("timeout", "stopped") else "failed"))
        self.steps.append(rec)
        self.say(f"{name}: {rec['status']} (rc {rc}), {rec['seconds']}s since its start")
        return rec

    # ---- steps -----------------------------------------------------------------------------
    def probe(self) -> None:
        code = textwrap.dedent('''
            import importlib.util, json, os, platform, shutil, subprocess, sys
            info = dict(python=platform.python_version(), executable=sys.executable)
            try:
                import torch
                info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                            cuda_available=torch.cuda.is_available())
                if torch.cuda.is_available():
                    p = torch.cuda.get_device_properties(0)
                    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gb=round(p.total_memory / 2**30, 1),
                                sms=p.multi_processor_count, gpus=torch.cuda.device_count())
            except Exception as exc:
                info["torch_error"] = repr(exc)
            for mod in ("triton", "transformers", "peft", "xdist", "pytest", "ninja"):
                spec = importlib.util.find_spec(mod)
                info[mod] = None
                if spec is not None:
                    try:
                        info[mod] = getattr(__import__(mod), "__version__", "installed")
                    except Exception as exc:
                        info[mod] = f"broken: {exc!r}"[:100]
            try:
                import tarp_fast.kernels  # noqa: F401
                info["tarp_fast"] = "importable"
            except Exception as exc:
                info["tarp_fast"] = f"not importable: {exc!r}"[:200]
            for tool in ("nvcc", "nvidia-smi", "ninja"):
                info[tool + "_path"] = shutil.which(tool)
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20)
                info["nvidia_smi"] = out.stdout.strip()
            except Exception:
                pass
            try:
                out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
                info["nvcc"] = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else None
            except Exception:
                pass
            info["cpus"] = os.cpu_count()
            print("PROBE " + json.dumps(info))
        ''')
        # from a scratch folder: the checkout's root on sys.path would import tarp_fast from the
        # tree without its kernels mapping and hide whether the package is really installed
        try:
            out = subprocess.run([self.py, "-c", code], cwd=self.scratch, env=self.env, capture_output=True,
                                 text=True, timeout=max(10, min(60, self.left())))
        except subprocess.TimeoutExpired as exc:
            self.say(f"env: the probe timed out ({exc.timeout:.0f}s)")
            return
        self.log.write(out.stdout + out.stderr)
        for line in out.stdout.splitlines():
            if line.startswith("PROBE "):
                self.info = json.loads(line[6:])
        self.say("env: " + ", ".join(f"{k}={self.info.get(k)}" for k in (
            "gpu", "capability", "torch", "triton", "python", "xdist", "peft", "nvcc", "cpus", "tarp_fast")))

    def ensure_installed(self) -> None:
        if self.info.get("tarp_fast") == "importable":
            return
        if self.args.dry_run:
            self.say("tarp_fast is not importable and a dry run installs nothing: install it first")
            return
        env = dict(self.env, TARP_FAST_NO_EXT="1")
        rec = self.step("install", [self.py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                                    "-e", "."], 120, env=env)
        if rec["status"] == "ok":
            return
        # fallback: import tarp_fast from the checkout with the kernels mapped in (what the
        # editable install's finder does), through a sitecustomize on PYTHONPATH
        alias = os.path.join(self.scratch, "alias")
        os.makedirs(alias)
        os.symlink(os.path.join(ROOT, "tarp_fast"), os.path.join(alias, "tarp_fast"))
        with open(os.path.join(alias, "sitecustomize.py"), "w") as fh:
            fh.write(textwrap.dedent(f'''
                import importlib.abc, importlib.util, sys
                class _KernelsFinder(importlib.abc.MetaPathFinder):
                    def find_spec(self, name, path, target=None):
                        if name == "tarp_fast.kernels":
                            return importlib.util.spec_from_file_location(
                                name, {os.path.join(ROOT, "kernels", "__init__.py")!r},
                                submodule_search_locations=[{os.path.join(ROOT, "kernels")!r}])
                        return None
                sys.meta_path.insert(0, _KernelsFinder())
            '''))
        self.env["PYTHONPATH"] = alias + os.pathsep + self.env["PYTHONPATH"]
        self.say("install failed: importing tarp_fast from the checkout through " + alias)

    def seed_cache(self) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        seed = self.args.triton_cache_seed
        if seed is None:
            ver = self.info.get("triton")
            cap = (self.info.get("capability") or "9.0").replace(".", "")
            cand = os.path.join(ROOT, ".tarp_fast_cache", f"triton-{ver}-sm{cap}")
            seed = cand if os.path.isdir(cand) else None
        if not seed or not os.path.isdir(seed):
            self.say(f"triton cache: no seed ({seed or 'none found'}), starting empty at {self.cache_dir}")
            return
        t = time.time()
        shutil.copytree(seed, self.cache_dir, dirs_exist_ok=True)
        self.seed_keys = {d for d in os.listdir(self.cache_dir) if os.path.isdir(os.path.join(self.cache_dir, d))}
        self.info["triton_cache_seed"] = dict(path=seed, entries=len(self.seed_keys))
        self.say(f"triton cache: seeded {len(self.seed_keys)} entries from {seed} in {time.time() - t:.1f}s")

    def pytest_cmd(self, files, extra=(), workers=0):
        cmd = [self.py, "-m", "pytest", *files, "-v", "-rfE", "-p", "no:cacheprovider", "-p", HOOKS_MODULE,
               "--tb=short", *extra]
        if workers > 1:
            cmd += ["-n", str(workers)]
        return cmd

    def run(self) -> int:
        a = self.args
        dry = a.dry_run
        self.say(f"{'DRY RUN (CPU, interpreter)' if dry else 'GPU run'}: budget {a.budget:.0f}s, out {self.out}, "
                 f"scratch {self.scratch}")
        self.probe()
        self.ensure_installed()
        self.seed_cache()
        arch = (self.info.get("capability") or "9.0").replace(".", "")
        cpus = self.info.get("cpus") or os.cpu_count() or 2
        hidden = dict(self.env, CUDA_VISIBLE_DEVICES="")

        # 2. the extension, in the background (a dry run only parses its build command)
        if dry:
            build = [self.py, "setup.py", "build_ext", "--help"]
        else:
            build = [self.py, "setup.py", "build_ext", "--inplace"]
        env = dict(hidden, TORCH_CUDA_ARCH_LIST=f"{arch[:-1]}.{arch[-1]}", MAX_JOBS=str(a.ext_jobs))
        env.pop("TARP_FAST_NO_EXT")  # (setup.py would skip the build)
        self.background("ext_build", build, env, nice=10)

        # 3. the report's kernels, compiled in parallel (GPU hidden: recording needs none)
        rep = [self.py, "benchmarks/gpu_report.py"]
        shapes = ["--M", "40", "--K", "32", "--check-M", "24", "--dtype", "float16"] if dry else []
        jobs = 0 if dry else max(2, cpus - 2)
        pre = rep + ["--precompile", "-j", str(jobs), "--arch", arch] + shapes
        if dry:
            pre += ["--specs-out", os.path.join(self.scratch, "report_specs.json")]
        self.step("precompile", pre, a.precompile_limit, env=hidden, echo=("gpu_report --precompile",))
        if dry:  # compile a couple of them for real (the compile and the cache log are exercised)
            self.step("precompile_sample", [self.py, "-m", "tarp_fast.kernels.precompile",
                                            os.path.join(self.scratch, "report_specs.json"), "--compile", "-j", "1",
                                            "--only", "_tarp_z_kernel", "--max", "1"], 60, env=hidden,
                      echo=("precompiled",))
        # ... and the test tier's, in the background while the report runs
        cap_out = os.path.join(self.scratch, "tests_capture.json")
        tjobs = 0 if dry else max(2, min(8, cpus // 2 - 1))
        script = (f"{self.py} -m pytest tests/test_triton_gpu.py -q -p no:cacheprovider -s "
                  f"> {self.scratch}/tests_capture.out 2>&1; grep -E '^capture:|passed|failed|rror' "
                  f"{self.scratch}/tests_capture.out | tail -n 8; "
                  f"{self.py} -m tarp_fast.kernels.precompile {cap_out}.specs" + (" --compile" if tjobs else "")
                  + f" -j {max(1, tjobs)}")
        self.background("tests_precompile", ["bash", "-c", script],
                        dict(hidden, TARP_FAST_GPU_TESTS="capture", TARP_FAST_CAPTURE_OUT=cap_out,
                             TARP_FAST_CAPTURE_ARCH=arch), nice=15)

        # 4. the headline report, alone on the GPU
        reserve = 20 if dry else 200  # what the tests and the summary need after it
        limit = max(30.0, min(a.report_limit, self.left() - reserve))
        cmd = rep + ["--out", self.out, "--name", "report", "--budget", str(int(limit - 15))]
        if dry:
            cmd += ["--dry-run"] + shapes
        env = dict(self.env, TRITON_INTERPRET="1") if dry else self.env
        self.step("report", cmd, limit, env=env, echo=("GOAL", "NOTE dx design", "== section"))

        # 5. the Triton GPU tests (their kernels precompiled meanwhile; what is not yet compiled,
        # the workers compile, while the background compile goes on)
        workers = 0
        if self.info.get("xdist") and not dry:
            workers = min(8, max(2, cpus // 2))
        env = dict(self.env, TARP_GPU_RUN_TESTS_JSONL=self.tests_jsonl)
        if dry:
            env.update(TARP_FAST_GPU_TESTS="dry", TRITON_INTERPRET="1")
        limit = max(30.0, min(a.tests_limit, self.left() - (15 if dry else 60)))
        self.step("gpu_tests", self.pytest_cmd(["tests/test_triton_gpu.py"], workers=workers), limit, env=env,
                  echo=(" FAILED", " ERROR", " passed", " failed", " skipped"))
        # the test tier's kernels are compiled now: a background compile still going would only take
        # CPU from autotuning
        self.join("tests_precompile", 0, stop=True)

        # 6. the CUDA helpers, once the extension is built
        self.join("ext_build", max(0.0, min(120.0, self.left() - 45)))
        env = dict(self.env, TARP_GPU_RUN_TESTS_JSONL=self.tests_jsonl)
        self.step("cuda_helpers", self.pytest_cmd(["tests/test_cuda_helpers.py"]), min(90.0, self.left() - 10),
                  env=env, echo=(" FAILED", " ERROR", " passed", " failed", " skipped"))

        # 7. autotuning with what is left
        left = self.left() - 10
        if left >= (10 if dry else 60):
            cmd = rep + ["--autotune", "--quick", "--sections", "providers,dx", "--out", self.out, "--name",
                         "autotune", "--budget", str(int(left - 10))]
            if dry:
                cmd += ["--dry-run"] + shapes
            env = dict(self.env, TRITON_INTERPRET="1") if dry else self.env
            self.step("autotune", cmd, left, env=env, echo=("GOAL",))
        else:
            self.say(f"autotune: skipped ({left:.0f}s left)")
            self.steps.append(dict(name="autotune", status="skipped", seconds=0, rc=None))
        for name in list(self.bg):
            self.join(name, 0)
        self.write_summary(final=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
        ok = all(s["status"] in ("ok", "skipped", "stopped") for s in self.steps)
        return 0 if ok else 1

    # ---- summary ---------------------------------------------------------------------------
    def tests(self) -> dict:
        res: dict[str, dict] = {}
        if os.path.exists(self.tests_jsonl):
            with open(self.tests_jsonl) as fh:
                for line in fh:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    t = res.setdefault(r["test"], dict(outcome="passed", seconds=0.0, text=""))
                    t["seconds"] += r["seconds"]
                    if r["outcome"] == "failed":
                        t["outcome"] = "failed" if r["when"] == "call" else "error"
                        t["text"] = r["text"]
                    elif r["outcome"] == "skipped" and t["outcome"] == "passed":
                        t["outcome"] = "skipped"
                        t["text"] = r["text"]
        return res

    def cache_counts(self) -> dict:
        """Kernel loads from the Triton cache log: hits of the seed, hits of kernels compiled
        earlier in this run, compiles (misses); in all and per step."""
        hits = seed = misses = 0
        steps: dict[str, dict[str, int]] = {}
        if os.path.exists(self.cache_log):
            with open(self.cache_log) as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) < 3:
                        continue
                    st = steps.setdefault(parts[4] if len(parts) > 4 else "-", dict(seed_hits=0, run_hits=0, compiles=0))
                    if parts[0] == "hit":
                        hits += 1
                        from_seed = parts[1] in self.seed_keys
                        seed += from_seed
                        st["seed_hits" if from_seed else "run_hits"] += 1
                    else:
                        misses += 1
                        st["compiles"] += 1
        return dict(lookups=hits + misses, hits=hits, seed_hits=seed, run_hits=hits - seed, compiles=misses,
                    seed_entries=len(self.seed_keys), per_step=steps)

    def _report(self, name):
        path = os.path.join(self.out, name + ".json")
        try:
            with open(path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def write_summary(self, final: bool) -> None:
        tests = self.tests()
        cache = self.cache_counts()
        report, tuned = self._report("report"), self._report("autotune")
        data = dict(final=final, seconds=round(self.elapsed(), 1), budget=self.args.budget, dry_run=self.args.dry_run,
                    env=self.info, steps=self.steps, tests=tests, triton_cache=cache,
                    report_status=report and report.get("status"), autotune_status=tuned and tuned.get("status"))
        lines = [f"==== tarp-fast GPU run summary{' (DRY RUN: CPU, interpreter, figures meaningless)' if self.args.dry_run else ''}"
                 f" ({'final' if final else 'so far'}, {self.elapsed():.0f}s of {self.args.budget:.0f}s) ===="]
        i = self.info
        lines.append(f"machine: {i.get('gpu', 'no GPU')} sm_{(i.get('capability') or '-').replace('.', '')}, "
                     f"torch {i.get('torch')}, triton {i.get('triton')}, python {i.get('python')}, "
                     f"xdist {i.get('xdist')}, peft {i.get('peft')}, {i.get('nvcc') or 'no nvcc'}")
        lines.append("steps: " + " | ".join(f"{s['name']} {s['status']} {s.get('seconds', 0):.0f}s" for s in self.steps))
        counts: dict[str, int] = {}
        for t in tests.values():
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        lines.append(f"tests: {len(tests)} ran: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        for name, t in tests.items():
            if t["outcome"] in ("failed", "error"):
                last = [ln for ln in t["text"].strip().splitlines() if ln.strip()][-1:] or [""]
                lines.append(f"  {t['outcome'].upper()} {name}: {last[0][:150]}")
        lines.append(f"triton cache: {cache['lookups']} kernel loads: {cache['seed_hits']} hits of the seed "
                     f"({cache['seed_entries']} entries), {cache['run_hits']} hits of kernels compiled earlier in this "
                     f"run, {cache['compiles']} compiles; per step (seed hits/run hits/compiles): "
                     + ", ".join(f"{k} {v['seed_hits']}/{v['run_hits']}/{v['compiles']}"
                                 for k, v in cache["per_step"].items()))
        for label, rep in (("report", report), ("autotune", tuned)):
            if rep is None:
                lines.append(f"{label}: no file")
                continue
            failed = [r for r in rep.get("rows", []) if not r.get("ok", True)]
            lines.append(f"{label}: {rep.get('status')}, {len(rep.get('rows', []))} rows, {len(failed)} failed")
            for r in failed[:6]:
                lines.append(f"  FAILED {r.get('section')} {r.get('case', '')} {r.get('provider', '')} "
                             f"{r.get('mode', '')}: {(r.get('error') or 'check failed')[:120]}")
            for g in rep.get("goals", []):
                lines.append(f"  {'met   ' if g['met'] else 'MISSED'} {g['goal']}: {g['value']} (target {g['target']})")
            dec = rep.get("meta", {}).get("dx_decision")
            if dec:
                lines.append(f"  dx design: faster {dec['faster']!r} per rank {dec['per_rank']}")
        lines.append("files: " + ", ".join(sorted(os.listdir(self.out))))
        text = "\n".join(lines) + "\n"
        data["summary"] = lines
        for name, content in (("summary.json", json.dumps(data, indent=1, default=str)), ("summary.txt", text)):
            tmp = os.path.join(self.out, f".{name}.tmp")
            with open(tmp, "w") as fh:
                fh.write(content)
            os.replace(tmp, os.path.join(self.out, name))
        if final:
            self.log.write("\n" + text)
            self.log.flush()
            print("\n" + text, end="", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output folder (at most 7 files are written there)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 470; --dry-run: 150)")
    ap.add_argument("--dry-run", action="store_true", help="CPU and the Triton interpreter, tiny shapes (make test)")
    ap.add_argument("--triton-cache-seed", default=None,
                    help="a Triton cache folder to copy in first (default .tarp_fast_cache/triton-<ver>-sm<arch>)")
    ap.add_argument("--ext-jobs", type=int, default=8, help="MAX_JOBS of the extension build")
    ap.add_argument("--precompile-limit", type=float, default=100)
    ap.add_argument("--report-limit", type=float, default=210)
    ap.add_argument("--tests-limit", type=float, default=170)
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 150.0 if args.dry_run else 470.0
    run = Run(args)
    try:
        return run.run()
    except BaseException:
        for b in run.bg.values():
            Run._kill(b["proc"])
        run.write_summary(final=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
