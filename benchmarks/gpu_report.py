"""GPU report of the Triton backend: ``python benchmarks/gpu_report.py [--out DIR] [--name NAME]``.

At bf16, M = 8192, K = N = 4096 (``--M``, ``--K``, ``--dtype``), timed with
``triton.testing.do_bench`` (median of device-timed runs), against ``F.linear`` in the same
run. Sections, most valuable first (``--sections`` picks some):

1. ``providers`` (r = 16, then 4 and 32): forward and forward + backward with a frozen base
   (``torch.autograd.grad(y, [x, U, V, G], dy)``) of ``triton`` (the fused kernels), ``F.linear``
   (cuBLAS, the floor), ``reference`` (the eager composition ``tarp_fast.reference.tarp_linear``
   in the same dtype) and ``peft_lora`` (PEFT's LoRA layer at the same rank; without peft
   installed, ``lora_eager``: PEFT's formula ``x W^T + b + s (x A^T) B^T`` in plain torch);
2. ``dx``: the backward op alone under both designs of its dx pass (``TARP_FAST_DX=fused`` /
   ``concat``) at r = 4, 16, 32, for dx only and for the frozen-base gradients; the faster
   design is named (it becomes the default);
3. ``hard_skip``: the forward keeping a fraction 1.0 / 0.5 / 0.1 of the rows, against the
   unskipped forward;
4. ``tasks``: 8 tasks in one batch (``task_index``) against one task, same rows;
5. ``precision``: bf16, fp16, fp32 with TF32 and exact fp32: the max error of ``y`` and of every
   gradient against float64 (relative to ``max(|ref|, 1)``), next to eager PyTorch's in the same dtype;
6. ``schedule``: the row schedule alone (sort + tile table), Triton kernels vs torch ops (and the
   extension's CUDA helpers where built), as a fraction of the unskipped forward.

Every timed configuration is first checked against float64 at ``--check-M`` rows (256) of the
same K, N, r (the float64 reference of the full M would take longer than the run): the rule of
the tests, from :mod:`tarp_fast.testing` (kernel error <= 2x eager's in the same dtype + a floor). A failed check, or an error
(out of memory, a compile failure), marks that row failed and the report goes on. The JSON and
the Markdown file (``<out>/<name>.json`` / ``.md``) are rewritten after every row, so a run cut
short keeps every figure measured so far; each goal of the issue is printed met or missed.

``--precompile -j N`` runs the same sections with launches recorded instead of run
(:func:`tarp_fast.kernels.precompile.capture`, CPU tensors, nothing timed) and compiles what it
recorded in N processes into the Triton cache, so the report itself then loads its kernels
instead of compiling them one after another. ``--dry-run``: the whole report on CPU tensors
under ``TRITON_INTERPRET=1`` with tiny shapes and a wall-clock timer (its figures mean nothing;
it checks the script). Without a CUDA GPU (and without those two) it exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import tarp_fast  # noqa: F401  (installed: use it)
except ImportError:  # run from a checkout without `pip install`: import the tree beside this file
    sys.path.insert(0, os.path.dirname(HERE))
from tarp_fast._io import atomic_write_bytes  # noqa: E402
from tarp_fast.testing import ARG_NAMES, Problem, against_float64, closeness, make_problem  # noqa: E402
from tarp_fast.testing import tf32 as tf32_matmuls  # noqa: E402

SECTIONS = ("providers", "dx", "hard_skip", "tasks", "precision", "schedule")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _flop_floor(M, K, N, r):
    """FLOPs of the op / FLOPs of the plain GEMM (``2 M N K``): ``[V; G]`` projection
    ``2 M K (r + r^2)``, ``S h`` ``2 M r^2``, ``U z`` ``2 M N r``."""
    base = 2 * M * N * K
    return (base + 2 * M * K * (r + r * r) + 2 * M * r * r + 2 * M * N * r) / base


# ----------------------------------------------------------------------------------------------
# output: rows and goals, rewritten to JSON and Markdown after every change
# ----------------------------------------------------------------------------------------------
class Report:
    def __init__(self, base: str, meta: dict, echo=print):
        self.base, self.meta, self.echo = base, meta, echo
        self.rows: list[dict] = []
        self.goals: list[dict] = []
        self.notes: list[str] = []
        self.status = "running"

    def row(self, **row) -> dict:
        row.setdefault("ok", True)
        self.rows.append(row)
        self.echo(json.dumps(row, default=str), flush=True)
        self.write()
        return row

    def goal(self, goal: str, value, target, met: bool, **extra) -> None:
        g = dict(goal=goal, value=None if value is None else round(float(value), 4), target=target, met=bool(met),
                 **extra)
        self.goals.append(g)
        self.echo(f"GOAL {'met   ' if met else 'MISSED'} {goal}: {g['value']} (target {target})", flush=True)
        self.write()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.echo(f"NOTE {text}", flush=True)
        self.write()

    def write(self) -> None:
        data = dict(meta=self.meta, status=self.status, rows=self.rows, goals=self.goals, notes=self.notes)
        atomic_write_bytes(self.base + ".json", json.dumps(data, indent=1, default=str).encode())
        atomic_write_bytes(self.base + ".md", self.markdown().encode())

    def markdown(self) -> str:
        m = self.meta
        out = [f"# tarp-fast Triton GPU report ({m['date']})", "",
               f"Device: {m['device']} (sm_{m['capability'].replace('.', '')}), torch {m['torch']}, Triton "
               f"{m['triton']}, CUDA {m['cuda']}. {m['dtype']}, M={m['M']}, K=N={m['K']} (checks at "
               f"{m['check_M']} rows); {m['timer']}; kernel configs: {m['configs']}; dx design default: "
               f"{m['dx_default']}. Status: **{self.status}**.", ""]
        out += ["| section | case | provider | mode | ms | ratio | check | note |", "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            ms = f"{r['ms']:.4f}" if isinstance(r.get("ms"), float) else "-"
            ratio = r.get("ratio")
            ratio = f"{ratio:.3f}" if isinstance(ratio, float) else "-"
            check = "FAILED" if not r.get("ok", True) else ("ok" if r.get("checked") else "-")
            note = (r.get("error") or r.get("note") or "").replace("|", "/")[:120]
            out.append(f"| {r.get('section')} | {r.get('case', '')} | {r.get('provider', '')} | {r.get('mode', '')} | "
                       f"{ms} | {ratio} | {check} | {note} |")
        out += ["", "| goal | value | target | met |", "|---|---|---|---|"]
        out += [f"| {g['goal']} | {g['value']} | {g['target']} | {'met' if g['met'] else 'MISSED'} |"
                for g in self.goals]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# inputs, providers, checks
# ----------------------------------------------------------------------------------------------
def _inputs(M, K, N, r, dtype, dev, T=None, seed=0, empty=False):
    """The tensors of one plain call by name (``x``, ``weight``, ``bias``, ``U``, ``V``, ``G``; the
    factors with a leading ``T`` when ``T``), drawn by the tests' case builder
    (:func:`tarp_fast.testing.make_problem`)."""
    if empty:  # --precompile: values are never read (launches are recorded, not run)
        lead = (T,) if T else ()
        e = lambda *s: torch.empty(*s, dtype=dtype, device=dev)  # noqa: E731
        return dict(x=e(M, K), weight=e(N, K), bias=e(N), U=e(*lead, N, r), V=e(*lead, r, K), G=e(*lead, r * r, K))
    p = make_problem(M, K, N, r, T=T or 1, scale=False, dtype=dtype, seed=seed, device=dev)
    return {name: t for name, t in zip(ARG_NAMES, p.args()) if t is not None}


def _lora(inp):
    """PEFT's LoRA layer at the factors' rank (A = V, B = U, scale 1), or the same formula in plain
    torch when peft is not installed: ``(provider name, forward, trainable params)``."""
    x, W, b, U, V = inp["x"], inp["weight"], inp["bias"], inp["U"], inp["V"]
    r = U.shape[-1]
    try:
        import peft
    except ImportError:
        A = V.detach().clone().requires_grad_()
        B = U.detach().clone().requires_grad_()
        return "lora_eager", (lambda xx: F.linear(xx, W, b) + F.linear(F.linear(xx, A), B)), [A, B]
    holder = nn.Module()
    holder.proj = nn.Linear(x.shape[1], W.shape[0], device=x.device, dtype=x.dtype)
    with torch.no_grad():
        holder.proj.weight.copy_(W)
        holder.proj.bias.copy_(b)
    model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(V)
        layer.lora_B["default"].weight.copy_(U)
    return "peft_lora", layer, [p for p in layer.parameters() if p.requires_grad]


def _step(provider, inp, mode, kw=None, dy=None):
    """``(name, run)`` for one provider: the forward (``fwd``) or forward + backward with a frozen
    base (``fwd+bwd``: ``torch.autograd.grad(y, inputs, dy)``, inputs x and the adapter)."""
    from tarp_fast.kernels import tarp_linear_triton

    from tarp_fast import reference

    kw = kw or {}
    train = mode == "fwd+bwd"
    x = inp["x"].detach().requires_grad_(train)
    U, V, G = (inp[k].detach().requires_grad_(train) for k in ("U", "V", "G"))
    W, b = inp["weight"], inp["bias"]
    name = provider
    if provider == "triton":
        fwd = lambda: tarp_linear_triton(x, W, b, U, V, G, **kw)  # noqa: E731
        params = [x, U, V, G]
    elif provider == "reference":
        fwd = lambda: reference.tarp_linear(x, W, b, U, V, G, **kw)  # noqa: E731
        params = [x, U, V, G]
    elif provider == "F.linear":
        fwd = lambda: F.linear(x, W, b)  # noqa: E731
        params = [x]
    elif provider == "lora":
        name, layer, lp = _lora(inp)
        fwd = lambda: layer(x)  # noqa: E731
        params = [x] + lp
        if not train:
            for p in lp:
                p.requires_grad_(False)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    if not train:
        return name, fwd
    if dy is None:
        dy = torch.randn(x.shape[0], W.shape[0], device=x.device, dtype=x.dtype)
    return name, (lambda: torch.autograd.grad(fwd(), params, dy))


def _check(ctx, inp, kw=None, grads=True):
    """Triton against float64 at the first ``ctx.check_M`` rows by the tests' rule
    (:func:`tarp_fast.testing.against_float64`: kernel error <= 2x eager's in the same dtype + a
    floor, errors relative to ``max(|ref|, 1)``), gradients of the adapted inputs (x, U, V, G):
    ``{"ok", "worst", "errors": {name: [kernel, eager, tol]}}``. Under --precompile the triton call
    only (its launches are what is recorded)."""
    from tarp_fast.kernels import poison_outputs, tarp_linear_triton

    p = Problem(*(inp.get(name) for name in ARG_NAMES), kw=dict(kw or {})).rows(ctx.check_M)
    dtype = p.x.dtype
    results = against_float64(tarp_linear_triton, p, dtype, grads=grads, wrt=("x", "U", "V", "G"),
                              poison=poison_outputs, fn_only=ctx.plan_only)
    errors, ok, worst = {}, True, 0.0
    for name, (got, ref, eager) in results.items():
        if ref is None:  # no gradient is due (x, U, V and G always get one)
            continue
        if got is None:  # a missing gradient fails
            errors[name], ok, worst = [math.inf, None, None], False, math.inf
            continue
        ek, ee, tol = closeness(got, ref, eager, dtype)
        errors[name] = [ek, ee, tol]
        ok &= ek <= tol
        worst = max(worst, ek / tol)
    return dict(ok=bool(ok), worst=worst if results else None, errors=errors)


def _tuned_choices():
    """The configs autotuning picked, per key (empty with the defaults): which tiles won."""
    from tarp_fast.kernels import _configs

    return [dict(kernel=k[0], rows_bucket=k[1], itemsize=k[2], arch=k[3], key=list(k[4:]), config=repr(c))
            for k, c in sorted(_configs._tuned.items(), key=lambda kv: repr(kv[0]))]


class Ctx:
    """What every section needs: device, sizes, the timer, the report, the time budget."""

    def __init__(self, args, dev, bench, report, plan_only, t0):
        self.args, self.dev, self.bench, self.report, self.plan_only, self.t0 = args, dev, bench, report, \
            plan_only, t0
        self.M, self.K, self.N, self.check_M = args.M, args.K, args.K, args.check_M
        self.dtype = DTYPES[args.dtype]
        self.ranks = [16] if args.quick else [16, 4, 32]
        self.full_fwd = {}  # r -> unskipped triton forward (ms)
        self._inputs = {}  # (r, T) -> inputs

    def left(self) -> float:
        return self.args.budget - (time.time() - self.t0) if self.args.budget else math.inf

    def inputs(self, r, T=None):
        """The inputs at rank ``r`` (``T`` tasks), drawn once per run: every section times the same
        tensors, and none is drawn twice (read-only: the providers detach what they differentiate)."""
        if (r, T) not in self._inputs:
            self._inputs[(r, T)] = _inputs(self.M, self.K, self.N, r, self.dtype, self.dev, T=T, empty=self.plan_only)
        return self._inputs[(r, T)]

    def unskipped_fwd(self, section, r=16):
        """``(inputs, ms)`` of the plain one-task triton forward at rank ``r``: the providers
        section's time, or timed here (and reported as a row of ``section``) when that section did
        not run; ``ms`` is None if it failed."""
        inp = self.inputs(r)
        ms = self.full_fwd.get(r)
        if ms is None:
            ms = self.guarded(section, "unskipped", lambda: self.bench(_step("triton", inp, "fwd")[1]),
                              provider="triton", mode="fwd")
            if ms is not None:
                self.full_fwd[r] = ms
                self.report.row(section=section, case="unskipped", provider="triton", mode="fwd", ms=ms, ratio=1.0)
        return inp, ms

    def checked_fwd(self, section, case, inp, kw, *, base, grads=True):
        """Check the triton call ``(inp, kw)`` against float64, time its forward and report the row
        (ratio to ``base`` ms): ``(ms, check passed)``, or None when the timing failed."""
        chk = self.guarded(section, case, _check, self, inp, kw, grads, provider="triton", mode="check")
        ms = self.guarded(section, case, lambda: self.bench(_step("triton", inp, "fwd", kw)[1]), provider="triton",
                          mode="fwd")
        if ms is None:
            return None
        ok = bool(chk and chk["ok"])
        self.report.row(section=section, case=case, provider="triton", mode="fwd", ms=ms, ratio=ms / base, ok=ok,
                        checked=True, errors=chk and chk["errors"])
        return ms, ok

    def guarded(self, section, case, fn, *fargs, **row):
        """Run ``fn(*fargs)`` (one row's work); an exception becomes a failed row, and the report goes on."""
        try:
            return fn(*fargs)
        except Exception as exc:  # noqa: BLE001 - every failure is a row
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            if self.args.verbose_errors:
                traceback.print_exc()
            self.report.row(section=section, case=case, ok=False, error=msg, **row)
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
            return None


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------
def section_providers(ctx: Ctx):
    rep = ctx.report
    providers = ["F.linear", "triton", "reference", "lora"]
    if ctx.plan_only:
        providers = ["triton"]
    for r in ctx.ranks:
        inp = ctx.inputs(r)
        chk = ctx.guarded("providers", f"r={r}", _check, ctx, inp, provider="triton", mode="check")
        ok = bool(chk and chk["ok"])
        if chk is not None:
            rep.row(section="providers", case=f"r={r}", provider="triton", mode="check (float64)", ok=ok,
                    checked=True, errors=chk["errors"], worst=chk["worst"])
        dy = (torch.empty if ctx.plan_only else torch.randn)(ctx.M, ctx.N, device=ctx.dev, dtype=ctx.dtype)
        t = {}
        for mode in ("fwd", "fwd+bwd"):
            for prov in providers:
                def timed(prov=prov, mode=mode, inp=inp, dy=dy):
                    name, fn = _step(prov, inp, mode, dy=dy)
                    return name, ctx.bench(fn)

                res = ctx.guarded("providers", f"r={r}", timed, provider=prov, mode=mode)
                if res is None:
                    continue
                name, ms = res
                t[(prov, mode)] = ms
                base = t.get(("F.linear", mode))
                rep.row(section="providers", case=f"r={r}", provider=name, mode=mode, ms=ms,
                        ratio=ms / base if base else None, ok=ok if prov == "triton" else True,
                        checked=prov == "triton")
        if ("triton", "fwd") in t:
            ctx.full_fwd[r] = t[("triton", "fwd")]
        if ctx.plan_only:
            continue
        floor = _flop_floor(ctx.M, ctx.K, ctx.N, r)
        if ("triton", "fwd") in t and ("F.linear", "fwd") in t:
            v = t[("triton", "fwd")] / t[("F.linear", "fwd")]
            if r == 16:
                rep.goal("r=16: fwd time / F.linear <= 1.10", v, 1.10, ok and v <= 1.10, flop_floor=round(floor, 3))
            else:
                rep.note(f"r={r}: fwd time / F.linear = {v:.3f} (FLOP floor {floor:.3f})")
        if ("triton", "fwd+bwd") in t and ("F.linear", "fwd+bwd") in t:
            v = t[("triton", "fwd+bwd")] / t[("F.linear", "fwd+bwd")]
            if r == 16:
                rep.goal("r=16: fwd+bwd time / F.linear fwd+bwd <= 1.25", v, 1.25, ok and v <= 1.25)
            else:
                rep.note(f"r={r}: fwd+bwd time / F.linear = {v:.3f}")
        if ("triton", "fwd+bwd") in t and ("reference", "fwd+bwd") in t:
            sp = t[("reference", "fwd+bwd")] / t[("triton", "fwd+bwd")]
            rep.goal(f"r={r}: fwd+bwd speed-up over the eager reference >= 1.5", sp, 1.5, ok and sp >= 1.5)
        if ("triton", "fwd+bwd") in t and ("lora", "fwd+bwd") in t:
            rep.note(f"r={r}: fwd+bwd time / LoRA fwd+bwd = {t[('triton', 'fwd+bwd')] / t[('lora', 'fwd+bwd')]:.3f}")


def section_dx(ctx: Ctx):
    """The backward op alone, both dx designs; the first call of each also checks its gradients."""
    from tarp_fast.kernels import use_dx_design
    from tarp_fast.kernels._custom_ops import triton_tarp_bwd, triton_tarp_fwd

    from tarp_fast._contract import Needs

    rep = ctx.report
    wins = {}
    for r in ctx.ranks:
        inp = ctx.inputs(r)
        x, W, U, V, G = (inp[k] for k in ("x", "weight", "U", "V", "G"))
        dy = (torch.empty if ctx.plan_only else torch.randn)(ctx.M, ctx.N, device=ctx.dev, dtype=ctx.dtype)
        saved = ctx.guarded("dx", f"r={r}", triton_tarp_fwd, x, W, None, U, V, G, None, None, None, None, 1.0, "none",
                            False, mode="forward")
        if saved is None:
            continue
        _, proj, z, perm, seg = saved
        bwd_args = (dy, x, W, None, U, V, G, None, None, None, proj, z, perm, seg, 1.0, "none", False)
        t = {}
        for design in ("fused", "concat"):
            with use_dx_design(design):
                chk = ctx.guarded("dx", f"r={r}", _check, ctx, inp, provider=design, mode="check")
                ok = bool(chk and chk["ok"])
                if chk is not None:
                    rep.row(section="dx", case=f"r={r}", provider=design, mode="check (float64)", ok=ok, checked=True,
                            errors=chk["errors"], worst=chk["worst"])
                for what, needs in (("dx only", list(Needs(x=True))),
                                    ("bwd x,U,V,G", list(Needs(x=True, U=True, V=True, G=True)))):
                    def timed(needs=needs, a=bwd_args):
                        return ctx.bench(lambda: triton_tarp_bwd(*a, needs))

                    ms = ctx.guarded("dx", f"r={r}", timed, provider=design, mode=what)
                    if ms is None:
                        continue
                    t[(design, what)] = ms
                    base = t.get(("fused", what))
                    rep.row(section="dx", case=f"r={r}", provider=design, mode=what, ms=ms,
                            ratio=ms / base if base else None, ok=ok, checked=True)
        if ("fused", "dx only") in t and ("concat", "dx only") in t and not ctx.plan_only:
            v = t[("concat", "dx only")] / t[("fused", "dx only")]
            wins[r] = "concat" if v < 1 else "fused"
            rep.note(f"r={r}: dx concat / fused = {v:.3f} (dx only), "
                     f"{t.get(('concat', 'bwd x,U,V,G'), math.nan) / t.get(('fused', 'bwd x,U,V,G'), math.nan):.3f} "
                     "(frozen-base backward)")
    if wins and not ctx.plan_only:
        choice = "concat" if list(wins.values()).count("concat") > len(wins) / 2 else "fused"
        rep.meta["dx_decision"] = dict(per_rank=wins, faster=choice)
        rep.note(f"dx design: {choice} is faster at {sum(v == choice for v in wins.values())} of {len(wins)} ranks "
                 f"({wins}); the default should be {choice!r} (kernels/_configs.py dx_design)")


def section_hard_skip(ctx: Ctx):
    rep = ctx.report
    inp, full = ctx.unskipped_fwd("hard_skip")
    if full is None:
        return
    fracs = [0.5, 0.1] if ctx.args.quick else [1.0, 0.5, 0.1]
    for f in fracs:
        gate = (torch.rand(ctx.M, device=ctx.dev, generator=torch.Generator(device=ctx.dev).manual_seed(1)) < f).float()
        kw = dict(gate=gate, hard_skip=True)
        res = ctx.checked_fwd("hard_skip", f"kept {f}", inp, kw, base=full, grads=False)
        if res is None:
            continue
        ms, ok = res
        if not ctx.plan_only:
            rep.goal(f"hard skip kept {f}: time <= {f} x unskipped + 5% of unskipped", ms / full, round(f + 0.05, 3),
                     ok and ms / full <= f + 0.05)


def section_tasks(ctx: Ctx):
    rep = ctx.report
    _, one = ctx.unskipped_fwd("tasks")
    if one is None:
        return
    inp8 = ctx.inputs(16, T=8)
    ti = torch.randint(0, 8, (ctx.M,), device=ctx.dev, generator=torch.Generator(device=ctx.dev).manual_seed(2))
    kw = dict(task_index=ti)
    res = ctx.checked_fwd("tasks", "8 tasks", inp8, kw, base=one)
    if res is None:
        return
    ms, ok = res
    if not ctx.plan_only:
        rep.goal("8 tasks in one batch / 1 task (same rows) <= 1.15", ms / one, 1.15, ok and ms / one <= 1.15)


def section_precision(ctx: Ctx):
    """Errors against float64 at check_M rows, K = N as timed, r = 16, each dtype."""
    rep = ctx.report
    cases = [("bfloat16", torch.bfloat16, None), ("float16", torch.float16, None),
             ("float32 (TF32)", torch.float32, True), ("float32 (exact)", torch.float32, False)]
    for label, dt, tf32 in cases:
        if dt == torch.bfloat16 and ctx.dev.type != "cuda" and not ctx.plan_only:
            rep.row(section="precision", case=label, note="skipped: the interpreter has no bf16")
            continue
        inp = _inputs(ctx.check_M, ctx.K, ctx.N, 16, dt, ctx.dev, seed=5, empty=ctx.plan_only)
        tf = tf32_matmuls(tf32) if tf32 is not None else contextlib.nullcontext()

        def run(tf=tf, inp=inp):
            with tf:
                return _check(ctx, inp)

        chk = ctx.guarded("precision", label, run, provider="triton", mode="check")
        if chk is None:
            continue
        rep.row(section="precision", case=label, provider="triton vs eager", mode="max rel err vs float64",
                ok=chk["ok"], checked=True, errors=chk["errors"], worst=chk["worst"],
                note="; ".join(f"{n}: {e[0]:.2e}" + (f" (eager {e[1]:.2e})" if e[1] is not None else "")
                              for n, e in chk["errors"].items()))
        if not ctx.plan_only:
            rep.goal(f"precision {label}: every output within 2x eager's float64 error + floor",
                     chk["worst"], 1.0, chk["ok"])


def section_schedule(ctx: Ctx):
    from tarp_fast.kernels import _schedule as S

    rep = ctx.report
    M, dev = ctx.M, ctx.dev
    full = ctx.full_fwd.get(16)
    ti = torch.randint(0, 8, (M,), device=dev, generator=torch.Generator(device=dev).manual_seed(2))
    drop = (torch.rand(M, device=dev, generator=torch.Generator(device=dev).manual_seed(3)) < 0.5).float()

    def schedule(row_groups, tile_table):
        def build(task, g):
            perm, seg_off = row_groups(task, g)
            return perm, seg_off, tile_table(seg_off, M, 8, 128)

        return build

    builders = {
        "triton": schedule(lambda task, g: S.row_groups_triton(M, 8, task, g), S.tile_table_triton),
        "torch": schedule(lambda task, g: S.row_groups(M, 8, task, None if g is None else g == 0, dev), S.tile_table),
    }
    if ctx.plan_only:
        builders = {"triton": builders["triton"]}
    elif dev.type == "cuda" and S.cuda_helpers_built():  # the extension's counting sort (TARP_FAST_CUDA_HELPERS=1)
        builders["cuda_helpers"] = schedule(lambda task, g: S.row_groups_cuda(M, 8, task, g), S.tile_table_triton)
    for label, task, g in (("8 tasks", ti, None), ("8 tasks + hard skip", ti, drop)):
        want = None if ctx.plan_only else builders["torch"](task, g)
        for prov, build in builders.items():
            def run(build=build, task=task, g=g, want=want):
                perm, seg_off, table = build(task, g)  # the same schedule, element for element, before timing
                same = ctx.plan_only or (torch.equal(perm, want[0]) and torch.equal(seg_off, want[1])
                                         and all(torch.equal(a, b) for a, b in zip(table[:3], want[2][:3])))
                return same, ctx.bench(lambda: build(task, g))

            res = ctx.guarded("schedule", label, run, provider=prov, mode="build")
            if res is None:
                continue
            same, ms = res
            rep.row(section="schedule", case=label, provider=prov, mode="build", ms=ms,
                    ratio=ms / full if full else None, ok=bool(same), checked=True,
                    note=None if same else "differs from the torch-ops schedule")


SECTION_FNS = dict(providers=section_providers, dx=section_dx, hard_skip=section_hard_skip, tasks=section_tasks,
                   precision=section_precision, schedule=section_schedule)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def _wall_timer(fn, reps=2):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default=None, help="file name stem (default gpu_report_<date>[_autotuned])")
    ap.add_argument("--quick", action="store_true", help="r = 16 only, fewer hard-skip fractions")
    ap.add_argument("--M", type=int, default=None, help="rows (default 8192; --dry-run: 40)")
    ap.add_argument("--K", type=int, default=None, help="K = N (default 4096; --dry-run: 32)")
    ap.add_argument("--check-M", type=int, default=None,
                    help="rows of the float64 checks, same K, N, r (default 256; --dry-run: 24)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds; sections not started by then are skipped")
    ap.add_argument("--rep", type=int, default=100, help="do_bench's rep (ms of timed runs per figure)")
    ap.add_argument("--autotune", action="store_true",
                    help="time every candidate config once per shape key and use the fastest "
                         "(TARP_FAST_AUTOTUNE=1); default: the deterministic default configs")
    ap.add_argument("--precompile", action="store_true",
                    help="record the report's kernel launches on CPU tensors (nothing runs) and compile them "
                         "into the Triton cache, -j processes at a time; no report")
    ap.add_argument("-j", "--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                    help="--precompile: compile processes (0: record and count only)")
    ap.add_argument("--arch", type=int, default=None, help="--precompile: compute capability (default: the GPU's, "
                                                           "else 90)")
    ap.add_argument("--specs-out", default=None, help="--precompile: also write the recorded specs (JSON)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU tensors under TRITON_INTERPRET=1, tiny shapes, a wall-clock timer (checks the script)")
    ap.add_argument("--verbose-errors", action="store_true", help="print the traceback of a failed row")
    args = ap.parse_args(argv)
    bad = set(args.sections.split(",")) - set(SECTIONS)
    if bad:
        ap.error(f"--sections: unknown {sorted(bad)}; choose from {', '.join(SECTIONS)}")
    small = args.dry_run
    args.M = args.M or (40 if small else 8192)
    args.K = args.K or (32 if small else 4096)
    args.check_M = min(args.check_M or (24 if small else 256), args.M)
    return args


def main(argv=None, *, device=None, timer=None) -> int:
    """Run the report. ``device`` / ``timer`` are for smoke tests only (CPU tensors under
    ``TRITON_INTERPRET=1`` and a wall-clock median; ``--dry-run`` sets both)."""
    t0 = time.time()
    args = parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("gpu_report --dry-run: set TRITON_INTERPRET=1 before starting Python", file=sys.stderr)
            return 2
        device, timer = device or "cpu", timer or _wall_timer
        if args.dtype == "bfloat16":
            args.dtype = "float16"  # the interpreter has no bf16
    if args.autotune:
        os.environ["TARP_FAST_AUTOTUNE"] = "1"  # read at every launch by kernels._configs
    if args.precompile:
        return _precompile(args)
    if device is None and not torch.cuda.is_available():
        print("gpu_report: no CUDA GPU found; this report times the Triton kernels on a GPU and cannot "
              "run here (--dry-run checks the script on CPU). Run it on a machine with an NVIDIA GPU "
              "(see README, GPU install).", file=sys.stderr)
        return 2
    dev = torch.device(device or "cuda")
    if timer is None:
        from triton.testing import do_bench

        def timer(fn):
            return do_bench(fn, warmup=25, rep=args.rep, return_mode="median")

    report = _make_report(args, dev, timer is not None and device is not None)
    print(f"gpu_report: writing {report.base}.json / .md", flush=True)
    return _run(args, dev, timer, report, plan_only=False, t0=t0)


def _make_report(args, dev, smoke):
    import triton
    from tarp_fast.kernels import dx_design
    from tarp_fast.kernels._configs import autotune_enabled

    on_gpu = dev.type == "cuda"
    meta = dict(device=torch.cuda.get_device_name(dev) if on_gpu else f"{dev.type} (smoke run, not a measurement)",
                capability=".".join(map(str, torch.cuda.get_device_capability(dev))) if on_gpu else "none",
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                M=args.M, K=args.K, N=args.K, check_M=args.check_M, dtype=args.dtype, sections=args.sections,
                timer="caller's timer (ms)" if smoke else f"triton.testing.do_bench median, rep={args.rep} ms",
                configs="autotuned (TARP_FAST_AUTOTUNE=1)" if autotune_enabled() else "deterministic defaults",
                dx_default=dx_design(), tuned=[])
    os.makedirs(args.out, exist_ok=True)
    name = args.name or ("gpu_report_" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
                         + ("_autotuned" if autotune_enabled() else ""))
    return Report(os.path.join(args.out, name), meta)


def _run(args, dev, timer, report, *, plan_only, t0) -> int:
    ctx = Ctx(args, dev, timer, report, plan_only, t0)
    wanted = args.sections.split(",")
    for name in SECTIONS:
        if name not in wanted:
            continue
        if ctx.left() <= 0:
            report.note(f"section {name} skipped: the time budget ({args.budget:.0f} s) is spent")
            continue
        print(f"== section {name} ({time.time() - t0:.0f} s)", flush=True)
        try:
            SECTION_FNS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - a section that fails outside a row: note it, go on
            traceback.print_exc()
            report.row(section=name, ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    report.meta["tuned"] = _tuned_choices()
    report.meta["seconds"] = round(time.time() - t0, 1)
    failed = [r for r in report.rows if not r.get("ok", True)]
    report.status = "complete" + (f", {len(failed)} failed rows" if failed else "")
    report.write()
    if not plan_only:
        print(report.markdown())
        print(f"wrote {report.base}.json and {report.base}.md")
    return 0


def _precompile(args) -> int:
    """--precompile: capture the report's launches on CPU tensors and compile them in parallel."""
    from tarp_fast.kernels import precompile

    t0 = time.time()
    arch = args.arch
    if arch is None:
        arch = 90
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            arch = major * 10 + minor
    sink = open(os.devnull, "w")

    class Quiet(Report):
        def write(self):
            pass

    report = Quiet("", dict(date="-"), echo=lambda *a, **k: print(*a, file=sink))
    # TARP_FAST_CAPTURE_SPECIALIZE_ALL=1: count as if no argument were exempt from specialization
    every = os.environ.get("TARP_FAST_CAPTURE_SPECIALIZE_ALL", "0") not in ("", "0")
    with precompile.capture(arch, specialize_all=every) as cap:
        _run(args, torch.device("cpu"), lambda fn: (fn(), 1.0)[1], report, plan_only=True, t0=t0)
    failed = [r for r in report.rows if not r.get("ok", True)]
    print(f"gpu_report --precompile: {cap.summary()} in {time.time() - t0:.1f} s"
          + (f"; {len(failed)} rows failed while recording: {failed[:3]}" if failed else ""), flush=True)
    if args.specs_out:
        precompile.save_specs(cap.specs.values(), args.specs_out)
    if args.jobs <= 0:  # -j 0: count only
        return 0
    res = precompile.compile_specs(list(cap.specs.values()), args.jobs)
    print(f"gpu_report --precompile: {precompile.compile_summary(res)} in {time.time() - t0:.1f} s "
          f"({args.jobs} processes)", flush=True)
    return 0 if all(r["ok"] for r in res) else 1


if __name__ == "__main__":
    sys.exit(main())
