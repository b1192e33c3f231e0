"""Compile tier: compile every Triton kernel and config for sm_90 and sm_80 on a machine without GPU.

Run ``python -m tarp_fast.kernels.compile_check`` (``--arch 90`` to restrict, ``-j N`` workers,
``--quick`` for the default configs only). For every kernel, every config it can be launched with
(the shape-class defaults and the autotuning candidates of :mod:`._configs`) and representative
flag variants, it builds the launch exactly as the launchers do (:mod:`._launch` ``plan_*``, on
``meta`` tensors), takes the signature, specialization and options the JIT computes for that
launch (:func:`tarp_fast.kernels.precompile.capture`: Triton's own binder, so the batch-dependent
integers the kernels exempt from specialization are compiled unspecialized, as on the GPU),
compiles it with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``, runs Triton's own ``ptxas -v`` on the PTX and prints registers, spill bytes, shared
memory and the MMA instructions used (``wgmma`` = Hopper HGMMA, ``mma`` = Ampere mma.sync; ``+tma``:
the kernel loads through TMA bulk tensor copies).

Exit status: 0 when everything compiled without spills; 1 on any compile error or spill.
The interpreter tier cannot see these failures: it accepts programs (e.g. ``tl.dot`` with a
dimension < 16) that the GPU compiler rejects.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

ARCHS = (90, 80)


@dataclass
class Job:
    kernel: str  # attribute name in tarp_fast.kernels._kernels
    variant: str
    config: str
    signature: dict[str, str]
    constexprs: dict
    attrs: dict[tuple, list]
    num_warps: int
    num_stages: int
    arch: int
    options: dict  # the compile options the JIT would pass (warps, stages, arch, ...)


def _cfg_name(c) -> str:
    return f"{c.BM}x{c.BN}x{c.BK}/w{c.num_warps}/s{c.num_stages}" + ("/tma" if c.tma else "")


def build_plans(arch: int, quick: bool = False):
    """Every (variant, config name, Launch) the launchers can produce on ``sm_<arch>``."""
    import torch

    from . import _launch as L
    from . import _schedule as S
    from ._configs import candidates, class_name, default_config

    meta = torch.device("meta")

    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device=meta)

    class MetaRows(L.Rows):
        def tiles(self, BM):
            if not self.grouped:
                return None, None, None, (self.M + BM - 1) // BM
            n = (self.M + BM - 1) // BM + self.T
            return t(n, dtype=torch.int32), t(n, dtype=torch.int32), t(n, dtype=torch.int32), n

    M, Kd, N, T = 8192, 4096, 4096, 8
    f32 = torch.float32

    def rows(grouped):
        return MetaRows(M, T if grouped else 1, grouped, t(M if grouped else 0, dtype=torch.int32),
                        t((T if grouped else 1) + 2, dtype=torch.int32))

    def bits(dt):
        return "32" if dt == f32 else "16"

    def configs(name, dt):
        """Shape-class defaults and (16-bit, unless ``quick``) the autotuning candidates."""
        defaults = [default_config(name, class_name(rows, dt.itemsize), arch=arch) for rows in ("many", "few")]
        extra = candidates(name, arch) if (bits(dt) == "16" and not quick) else []
        return list(dict.fromkeys(defaults + extra))

    def tag(dt):
        return str(dt).replace("torch.", "")

    plans = []

    # forward main kernel: every config with all flags on and with none; rank 32 on the config the
    # launcher picks for it (the "-rank>16" default where the table has one)
    for dt in (torch.bfloat16, torch.float16, f32):
        large = default_config("fwd", class_name("many", dt.itemsize), arch=arch)
        wide = default_config("fwd", class_name("many", dt.itemsize), rank=32, arch=arch)
        cfgs = configs("fwd", dt) if dt != torch.float16 else [large]
        for cfg in list(dict.fromkeys(cfgs + ([wide] if dt != f32 else []))):
            variants = (("full-r16", "plain") if cfg in cfgs else ()) + (
                ("full-r32",) if cfg == wide and dt != f32 else ())
            for variant in variants:
                full = variant.startswith("full")
                r = 32 if variant == "full-r32" else 16
                p = L.plan_main(
                    x=t(M, Kd, dtype=dt), weight=t(T, N, Kd, dtype=dt) if full else t(N, Kd, dtype=dt),
                    bias=t(N, dtype=dt) if full else None, U=t(T, N, r, dtype=dt) if full else None,
                    z=t(M, r, dtype=f32) if full else None, gate=t(M, dtype=f32) if full else None,
                    skip=t(M, dtype=f32) if full else None, residual=t(M, N, dtype=dt) if full else None,
                    out=t(M, N, dtype=dt), rows=rows(full), cfg=cfg, scaling=0.5, act=2 if full else 0)
                plans.append((f"{tag(dt)}-{variant}", _cfg_name(cfg), p))
        if dt != torch.float16:  # backward recompute mode (dpre + gate partials)
            for cfg in (default_config("recompute", class_name("many", dt.itemsize), arch=arch),
                        default_config("recompute", class_name("few", dt.itemsize), arch=arch)):
                p = L.plan_main(x=t(M, Kd, dtype=dt), weight=t(N, Kd, dtype=dt), bias=t(N, dtype=dt),
                                U=t(T, N, 16, dtype=dt), z=t(M, 16, dtype=f32), gate=t(M, dtype=f32), skip=None,
                                residual=None, out=t(M, N, dtype=dt), rows=rows(True), cfg=cfg, scaling=0.5,
                                act=2, dy=t(M, N, dtype=dt), dgate_part=t(N // cfg.BN, M, dtype=f32))
                plans.append((f"{tag(dt)}-bwd-recompute", _cfg_name(cfg), p))

    # proj pre-pass and z
    for dt in (torch.bfloat16, f32):
        for cfg in configs("proj", dt):
            for r in ((16, 32) if dt == torch.bfloat16 else (16,)):
                for grouped in (True, False) if cfg.tma else (True,):  # ungrouped: x through TMA
                    lead = (T,) if grouped else ()
                    p = L.plan_proj(x=t(M, Kd, dtype=dt), V=t(*lead, r, Kd, dtype=dt),
                                    G=t(*lead, r * r, Kd, dtype=dt), proj=t(M, r + r * r, dtype=f32),
                                    rows=rows(grouped), cfg=cfg)
                    plans.append((f"{tag(dt)}-r{r}" + ("" if grouped else "-plain"), _cfg_name(cfg), p))
    for r in (1, 4, 16, 32):
        p = L.plan_z(proj=t(M, r + r * r, dtype=f32), z=t(M, r, dtype=f32), rows=rows(True), R=r)
        plans.append((f"r{r}", f"BMZ{p.constexprs['BMZ']}", p))

    # dx (one pass over dpre), with and without the dx GEMM; ranks > 16 get the "-rank>16" default
    def dx_plan(dt, cfg, variant):
        r = 32 if variant == "full-r32" else 16
        dyn = variant != "bilinear-rowscale"
        C = r + r * r if dyn else r
        need_dx = variant != "rterms-only"
        grouped = variant != "plain"  # plain: one task, rows in order (dpre through TMA with tma=True)
        lead = (T,) if grouped else ()
        p = L.plan_dx(
            dp=t(M, N, dtype=dt), rowscale=t(M, dtype=f32) if variant == "bilinear-rowscale" else None,
            weight=t(*lead, N, Kd, dtype=dt), U=t(*lead, N, r, dtype=dt), V=t(*lead, r, Kd, dtype=dt),
            G=t(*lead, r * r, Kd, dtype=dt) if dyn else None, proj=t(M, C, dtype=f32),
            dy=t(M, N, dtype=dt), skip=t(M, dtype=f32), x=t(M, Kd, dtype=dt), dx=t(M, Kd, dtype=dt),
            dproj=t(M, C, dtype=f32), dskip_part=t(Kd // cfg.BK, M, dtype=f32) if need_dx else None,
            rows=rows(grouped), cfg=cfg, scaling=0.5, need_dx=need_dx)
        plans.append((f"{tag(dt)}-{variant}", _cfg_name(cfg), p))

    for dt in (torch.bfloat16, f32):
        for cfg in configs("dx", dt):
            for variant in ("full-r16", "bilinear-rowscale", "rterms-only") + (("plain",) if cfg.tma else ()):
                dx_plan(dt, cfg, variant)
        dx_plan(dt, default_config("dx", class_name("many", dt.itemsize), rank=32, arch=arch), "full-r32")

    # dx, "concat" design (TARP_FAST_DX=concat): the pre-pass (the dx kernel without its GEMM, on
    # the dx_pre tiles) for every rank class, then the dx GEMM over [dpre | dproj]
    for dt in (torch.bfloat16, f32):
        for cfg in dict.fromkeys(default_config("dx_pre", class_name(rows, dt.itemsize), arch=arch)
                                 for rows in ("many", "few")):
            for variant in ("full-r16", "bilinear-rowscale", "full-r32"):
                r = 32 if variant == "full-r32" else 16
                dyn = variant != "bilinear-rowscale"
                C = r + r * r if dyn else r
                p = L.plan_dx(
                    dp=t(M, N, dtype=dt), rowscale=t(M, dtype=f32) if not dyn else None,
                    weight=t(T, N, Kd, dtype=dt), U=t(T, N, r, dtype=dt), V=t(T, r, Kd, dtype=dt),
                    G=t(T, r * r, Kd, dtype=dt) if dyn else None, proj=t(M, C, dtype=f32), dy=t(M, N, dtype=dt),
                    skip=t(M, dtype=f32), x=t(M, Kd, dtype=dt), dx=t(M, Kd, dtype=dt), dproj=t(M, C, dtype=f32),
                    dskip_part=None, rows=rows(True), cfg=cfg, scaling=0.5, need_dx=False)
                plans.append((f"{tag(dt)}-pre-{variant}", _cfg_name(cfg), p))
        for cfg in configs("dx_concat", dt):
            for variant in ("full-r16", "full-r32", "bilinear-rowscale") + (("plain",) if cfg.tma else ()):
                r = 32 if variant == "full-r32" else 16
                dyn = variant != "bilinear-rowscale"
                C = r + r * r if dyn else r
                grouped = variant != "plain"
                lead = (T,) if grouped else ()
                p = L.plan_dx_concat(
                    dp=t(M, N, dtype=dt), rowscale=t(M, dtype=f32) if not dyn else None,
                    weight=t(*lead, N, Kd, dtype=dt), V=t(*lead, r, Kd, dtype=dt),
                    G=t(*lead, r * r, Kd, dtype=dt) if dyn else None, dproj=t(M, C, dtype=f32),
                    dy=t(M, N, dtype=dt), skip=t(M, dtype=f32), x=t(M, Kd, dtype=dt), dx=t(M, Kd, dtype=dt),
                    dskip_part=t(Kd // cfg.BK, M, dtype=f32), rows=rows(grouped), cfg=cfg)
                plans.append((f"{tag(dt)}-concat-{variant}", _cfg_name(cfg), p))

    # segmented weight gradients: dW (+db), dU (fp32 z operand), [dV; dG] (fp32 dproj operand)
    for dt in (torch.bfloat16, f32):
        for cfg in configs("wgrad", dt):
            r = 16
            C = r + r * r
            specs = [
                ("dW-lsum-rowscale", t(M, N, dtype=dt), t(M, Kd, dtype=dt), t(M, dtype=f32),
                 t(T, N, Kd, dtype=dt), t(T, N, dtype=f32), N, Kd, True),
                ("dU", t(M, N, dtype=dt), t(M, r, dtype=f32), None, t(T, N, r, dtype=dt), None, N, r, True),
                ("dVG", t(M, C, dtype=f32), t(M, Kd, dtype=dt), None, t(T, C, Kd, dtype=f32), None, C, Kd, True),
                ("dW-ungrouped", t(M, N, dtype=dt), t(M, Kd, dtype=dt), None, t(N, Kd, dtype=dt), None, N, Kd,
                 False),
            ]
            for variant, Lm, Rm, rs, out, ls, A, B, grouped in specs:
                p = L.plan_wgrad(L=Lm, Rm=Rm, rowscale=rs, out=out, lsum=ls, rows=rows(grouped), cfg=cfg, A=A, B=B,
                                 per_task=grouped, r_scale=0.5)
                plans.append((f"{tag(dt)}-{variant}", _cfg_name(cfg), p))

    # multiplicative term
    for dt in (torch.bfloat16, f32):
        cfg = default_config("scale", class_name("many", dt.itemsize), arch=arch)
        cfg_b = default_config("scale_bwd", class_name("many", dt.itemsize), arch=arch)
        for q in (4, 32):
            p = L.plan_scale(weight=t(N, Kd, dtype=dt), P=t(T, N, q, dtype=dt), Q=t(T, q, Kd, dtype=dt),
                             out=t(T, N, Kd, dtype=dt), offset=0.54, cfg=cfg)
            plans.append((f"{tag(dt)}-q{q}", _cfg_name(cfg), p))
            p = L.plan_scale_bwd(dwe=t(T, N, Kd, dtype=dt), weight=t(N, Kd, dtype=dt), P=t(T, N, q, dtype=dt),
                                 Q=t(T, q, Kd, dtype=dt), dw=t(N, Kd, dtype=dt), y=t(T, N, Kd, dtype=f32),
                                 offset=0.54, cfg=cfg_b, need_w=True, need_pq=True)
            plans.append((f"{tag(dt)}-q{q}", _cfg_name(cfg_b), p))

    # row schedule (sort and tile table): a full chunk and the smallest, few and many tasks
    i32, i64 = torch.int32, torch.int64
    for Ms, Ts in ((M, T), (100, T), (M, 1000)):
        chunks = (Ms + S.sort_chunk(Ms) - 1) // S.sort_chunk(Ms)
        for task, gate in ((t(Ms, dtype=i64), t(Ms, dtype=f32)), (None, t(Ms, dtype=f32)), (t(Ms, dtype=i64), None)):
            variant = f"M{Ms}-T{Ts}" + ("-task" if task is not None else "") + ("-drop" if gate is not None else "")
            for p in S.plan_row_groups(Ms, Ts, task, gate, t(Ms, dtype=i32), t(Ts + 2, dtype=i32),
                                       t((Ts + 1) * chunks, dtype=i32)):
                if p.name != "sched_scan" or task is not None and gate is not None:
                    plans.append((variant, f"CH{p.constexprs.get('CH', '-')}", p))
        num = S.max_row_tiles(Ms, Ts, 128)
        p = S.plan_tile_table(t(Ts + 2, dtype=i32), Ts, 128, t(num, dtype=i32), t(num, dtype=i32), t(num, dtype=i32))
        plans.append((f"M{Ms}-T{Ts}", f"BM128/BP{p.constexprs['BP']}", p))

    # fp32 with TF32 allowed (torch.backends.cuda.matmul.allow_tf32): the same launches with
    # tensor-core dots
    tf32 = []
    for variant, cname, p in plans:
        if variant.startswith("float32") and p.constexprs.get("DOT_PREC") == "ieee" and "-plain" not in variant:
            q = L.Launch(p.kernel, p.grid, p.args, dict(p.constexprs, DOT_PREC="tf32"), p.num_warps,
                         p.num_stages, p.name)
            tf32.append((variant.replace("float32", "float32-tf32"), cname, q))
    return plans + tf32


def build_jobs(archs=ARCHS, quick: bool = False) -> list[Job]:
    """Every (kernel, variant, config) the launchers can produce, as compile jobs per arch.

    Each launch goes through Triton's own launch path up to the compile
    (:func:`tarp_fast.kernels.precompile.capture`), so the job has exactly the signature,
    specialization (pointer alignment, integers equal to 1 or divisible by 16, except the
    batch-dependent ones the kernels exempt) and options the JIT would compile on the GPU."""
    from . import precompile

    jobs = []
    for arch in archs:
        for variant, cname, p in build_plans(arch, quick):
            with precompile.capture(arch) as cap:
                p.run()
            (spec,) = cap.specs.values()
            jobs.append(Job(spec.name, variant, cname, spec.signature, spec.constexprs, spec.attrs, p.num_warps,
                            p.num_stages, arch, spec.options))
    return jobs


_PTXAS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_job(job: Job) -> dict:
    """Compile one job; returns a result dict (never raises)."""
    t0 = time.time()
    res = dict(kernel=job.kernel, variant=job.variant, config=job.config, arch=job.arch, ok=False,
               regs=None, spill_stores=None, spill_loads=None, shared=None, mma="-", error=None)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
        from triton.compiler import ASTSource

        from . import _kernels, _schedule_kernels

        fn = getattr(_kernels, job.kernel, None) or getattr(_schedule_kernels, job.kernel)
        src = ASTSource(fn=fn, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
        ptx = ck.asm["ptx"]
        res["shared"] = int(ck.metadata.shared)
        res["mma"] = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else "fma")
        if "cp.async.bulk.tensor" in ptx:  # TMA loads (Hopper tensor descriptors)
            res["mma"] += "+tma"
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            out = subprocess.run(
                [get_ptxas(job.arch).path, "-v", "--regAllocOptLevel=2",
                 f"--gpu-name={sm_arch_from_capability(job.arch)}", path, "-o", os.path.join(d, "k.cubin")],
                capture_output=True, text=True, check=True)
        log = out.stderr + out.stdout
        regs = [int(m) for m in _PTXAS_RE.findall(log)]
        spills = [(int(a), int(b)) for a, b in _SPILL_RE.findall(log)]
        res["regs"] = max(regs) if regs else None
        res["spill_stores"] = sum(a for a, _ in spills)
        res["spill_loads"] = sum(b for _, b in spills)
        res["ok"] = True
    except Exception as exc:  # report every failure, keep compiling the others
        msg = f"{type(exc).__name__}: {exc}"
        res["error"] = msg.strip().splitlines()[0][:300] if msg.strip() else type(exc).__name__
    res["seconds"] = round(time.time() - t0, 2)
    return res


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", choices=ARCHS, help="compute capability (repeatable)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="default configs only (no autotune candidates)")
    ap.add_argument("--kernel", action="append", help="only these kernels (name substring, repeatable)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU even when run from the interpreter tier
    t0 = time.time()
    jobs = build_jobs(tuple(args.arch or ARCHS), quick=args.quick)
    if args.kernel:
        jobs = [j for j in jobs if any(k in j.kernel for k in args.kernel)]
    print(f"compile_check: {len(jobs)} compiles (sm_{', sm_'.join(str(a) for a in sorted(set(j.arch for j in jobs)))}), "
          f"{args.jobs} workers", flush=True)
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as ex:
            results = list(ex.map(compile_job, jobs))
    else:
        results = [compile_job(j) for j in jobs]
    header = f"{'kernel':<26} {'variant':<24} {'config':<22} {'sm':>3} {'regs':>4} {'spill':>9} {'smem':>7} {'mma':>9} {'s':>5}"
    print(header)
    print("-" * len(header))
    bad = 0
    for r in results:
        spill = f"{r['spill_stores']}/{r['spill_loads']}" if r["ok"] else "-"
        line = (f"{r['kernel']:<26} {r['variant']:<24} {r['config']:<22} {r['arch']:>3} "
                f"{r['regs'] if r['regs'] is not None else '-':>4} {spill:>9} "
                f"{r['shared'] if r['shared'] is not None else '-':>7} {r['mma']:>9} {r['seconds']:>5}")
        problem = None
        if not r["ok"]:
            problem = f"COMPILE ERROR: {r['error']}"
        elif r["spill_stores"] or r["spill_loads"]:
            problem = "SPILLS"
        if problem:
            bad += 1
            line += f"  <-- {problem}"
        print(line)
    print(f"compile_check: {len(results) - bad}/{len(results)} ok, {bad} failed, {time.time() - t0:.1f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
