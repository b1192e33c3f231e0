"""GPU report of the Triton backend: ``python benchmarks/gpu_report.py [--quick] [--out DIR]``.

Times with ``triton.testing.do_bench`` (median of repeated device-timed runs), at bf16,
M = 8192, K = N = 4096, r in {4, 16, 32}:

* ``fwd`` and ``fwd+bwd`` (frozen base: ``x`` and the adapter factors require grad) of
  ``triton`` (the fused kernels), ``F.linear`` (cuBLAS, the floor), ``reference`` (the eager
  composition ``tarp_fast.reference.tarp_linear`` in bf16) and ``peft_lora`` (PEFT's LoRA layer
  at the same rank: a cheaper op, the bar the issue sets for fwd+bwd);
* ``hard_skip`` keeping a fraction f of the rows (forward), against the unskipped time;
* 8 tasks in one batch through ``task_index`` against one task with the same rows;
* the row schedule alone (sort + tile table), Triton kernels vs torch ops, as a fraction of the
  unskipped forward (what grouping costs before any matmul).

Every provider's output is checked against float64 before it is timed (kernel error <= 2x the
eager bf16 error + a floor). Results go to ``benchmarks/results/gpu_report_<date>.json`` and
``.md`` with the device, the versions and the date, and every issue goal is printed as met or
missed. Without a CUDA GPU it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import tarp_fast  # noqa: F401  (installed: use it)
except ImportError:  # run from a checkout without `pip install`: import the tree beside this file
    sys.path.insert(0, os.path.dirname(HERE))


def _flop_floor(M, K, N, r):
    """FLOPs of the op / FLOPs of the plain GEMM (``2 M N K``): ``[V; G]`` projection
    ``2 M K (r + r^2)``, ``S h`` ``2 M r^2``, ``U z`` ``2 M N r``."""
    base = 2 * M * N * K
    return (base + 2 * M * K * (r + r * r) + 2 * M * r * r + 2 * M * N * r) / base


def _inputs(M, K, N, r, dtype, dev, T=None, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    lead = (T,) if T else ()
    return dict(
        x=torch.randn(M, K, device=dev, generator=g).to(dtype),
        weight=(torch.randn(N, K, device=dev, generator=g) / math.sqrt(K)).to(dtype),
        bias=(torch.randn(N, device=dev, generator=g) * 0.1).to(dtype),
        U=(torch.randn(*lead, N, r, device=dev, generator=g) * 0.1).to(dtype),
        V=(torch.randn(*lead, r, K, device=dev, generator=g) / math.sqrt(K)).to(dtype),
        G=(torch.randn(*lead, r * r, K, device=dev, generator=g) / math.sqrt(K * r)).to(dtype),
    )


def _peft_layer(inp, r):
    import peft

    K, N = inp["x"].shape[1], inp["weight"].shape[0]
    holder = nn.Module()
    holder.proj = nn.Linear(K, N, device=inp["x"].device, dtype=inp["x"].dtype)
    with torch.no_grad():
        holder.proj.weight.copy_(inp["weight"])
        holder.proj.bias.copy_(inp["bias"])
    model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(inp["V"])
        layer.lora_B["default"].weight.copy_(inp["U"])
    return layer


def _make(provider, inp, mode, **kw):
    """``run()`` for one provider: forward (``fwd``) or forward + backward (``fwd+bwd``)."""
    from tarp_fast.kernels import tarp_linear_triton

    from tarp_fast import reference

    train = mode == "fwd+bwd"
    x = inp["x"].detach().requires_grad_(train)
    U, V, G = (inp[k].detach().requires_grad_(train) for k in ("U", "V", "G"))
    W, b = inp["weight"], inp["bias"]
    if provider == "triton":
        fwd = lambda: tarp_linear_triton(x, W, b, U, V, G, **kw)  # noqa: E731
        params = [x, U, V, G]
    elif provider == "reference":
        fwd = lambda: reference.tarp_linear(x, W, b, U, V, G, **kw)  # noqa: E731
        params = [x, U, V, G]
    elif provider == "F.linear":
        fwd = lambda: F.linear(x, W, b)  # noqa: E731
        params = [x]
    elif provider == "peft_lora":
        layer = _peft_layer(inp, U.shape[-1])
        fwd = lambda: layer(x)  # noqa: E731
        params = [x] + [p for p in layer.parameters() if p.requires_grad]
        if not train:
            for p in params:
                p.requires_grad_(False)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    if not train:
        return lambda: fwd()
    return lambda: torch.autograd.grad(fwd().float().sum(), params)


def _check(inp, **kw):
    """Triton vs float64 with the tests' rule (2x the eager error in the same dtype + a floor); raises on failure."""
    from tarp_fast.kernels import tarp_linear_triton

    from tarp_fast import reference

    sl = {k: (v[:1024] if k == "x" else v) for k, v in inp.items()}
    kw1 = dict(kw)
    for k in ("task_index", "gate"):
        if isinstance(kw1.get(k), torch.Tensor) and kw1[k].dim() == 1 and kw1[k].shape[0] == inp["x"].shape[0]:
            kw1[k] = kw1[k][:1024]
    args = [sl[k] for k in ("x", "weight", "bias", "U", "V", "G")]
    y = tarp_linear_triton(*args, **kw1).double()
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw1.items()}
    y64 = reference.tarp_linear(*[a.double() for a in args], **kw64)
    ye = reference.tarp_linear(*args, **kw1).double()
    ek, ee = (y - y64).abs().max().item(), (ye - y64).abs().max().item()
    floor = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}.get(inp["x"].dtype, 1e-4)
    tol = 2 * ee + floor * max(1.0, y64.abs().max().item())
    if not ek <= tol:
        raise AssertionError(f"triton disagrees with float64: error {ek:.3g} > {tol:.3g} (eager {ee:.3g})")
    return ek, ee


def _tuned_choices():
    """The configs autotuning picked, per key (empty with the defaults): which tiles won."""
    from tarp_fast.kernels import _configs

    return [dict(kernel=k[0], rows_bucket=k[1], itemsize=k[2], arch=k[3], key=list(k[4:]), config=repr(c))
            for k, c in sorted(_configs._tuned.items(), key=lambda kv: repr(kv[0]))]


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv=None, *, device=None, timer=None) -> int:
    """Run the report. ``device`` / ``timer`` are for the smoke test only (CPU tensors under
    ``TRITON_INTERPRET=1`` and a wall-clock median): the figures are meaningful on a GPU only."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="r = 16 only, fewer hard-skip fractions")
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--autotune", action="store_true",
                    help="time every candidate config once per shape key and use the fastest "
                         "(TARP_FAST_AUTOTUNE=1); default: the deterministic default configs")
    args = ap.parse_args(argv)
    if args.autotune:
        os.environ["TARP_FAST_AUTOTUNE"] = "1"  # read at every launch by kernels._configs
    from tarp_fast.kernels._configs import autotune_enabled
    if device is None and not torch.cuda.is_available():
        print("gpu_report: no CUDA GPU found; this report times the Triton kernels on a GPU and cannot "
              "run here. Run it on a machine with an NVIDIA GPU (see README, GPU install).", file=sys.stderr)
        return 2
    import triton

    dev = torch.device(device or "cuda")
    M, K = args.M, args.K
    N = K
    ranks = [16] if args.quick else [4, 16, 32]
    dtype = DTYPES[args.dtype]
    try:
        import peft  # noqa: F401

        providers = ["F.linear", "triton", "reference", "peft_lora"]
    except ImportError:
        providers = ["F.linear", "triton", "reference"]
        print("gpu_report: peft is not installed, skipping the peft_lora provider", file=sys.stderr)

    if timer is None:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=25, rep=200, return_mode="median")
    else:
        bench = timer

    class _Printed(list):
        """A list of result rows that also prints each one as it is added, so a run cut short
        (a time limit) still leaves every figure measured so far in its log."""

        def append(self, item):
            super().append(item)
            print(json.dumps(item, default=str), flush=True)

    rows, goals = _Printed(), _Printed()
    for r in ranks:
        inp = _inputs(M, K, N, r, dtype, dev)
        ek, ee = _check(inp)
        floor = _flop_floor(M, K, N, r)
        t = {}
        for mode in ("fwd", "fwd+bwd"):
            for prov in providers:
                ms = bench(_make(prov, inp, mode))
                t[(prov, mode)] = ms
                rows.append(dict(section="providers", r=r, mode=mode, provider=prov, ms=ms,
                                 ratio_to_F_linear=None))
        for row in rows:
            if row["section"] == "providers" and row["r"] == r:
                row["ratio_to_F_linear"] = row["ms"] / t[("F.linear", row["mode"])]
        fwd_ratio = t[("triton", "fwd")] / t[("F.linear", "fwd")]
        goals.append(dict(goal=f"r={r}: fwd time / F.linear <= 1.03 x FLOP floor {floor:.3f}",
                          value=round(fwd_ratio, 4), target=round(1.03 * floor, 4), met=fwd_ratio <= 1.03 * floor,
                          check_error=ek, eager_error=ee))
        sp = t[("reference", "fwd+bwd")] / t[("triton", "fwd+bwd")]
        goals.append(dict(goal=f"r={r}: fwd+bwd speed-up over the eager reference >= 1.5", value=round(sp, 3),
                          target=1.5, met=sp >= 1.5))
        if ("peft_lora", "fwd+bwd") in t:
            rel = t[("triton", "fwd+bwd")] / t[("peft_lora", "fwd+bwd")]
            goals.append(dict(goal=f"r={r}: fwd+bwd time / PEFT LoRA <= 1.0", value=round(rel, 3), target=1.0,
                              met=rel <= 1.0))

    # hard skip: forward with a fraction f of rows kept (gate 1), the rest gate 0
    r = 16
    inp = _inputs(M, K, N, r, dtype, dev)
    full = bench(_make("triton", inp, "fwd"))
    for f in ([0.5, 0.1] if args.quick else [1.0, 0.75, 0.5, 0.25, 0.1]):
        gate = (torch.rand(M, device=dev, generator=torch.Generator(device=dev).manual_seed(1)) < f).float()
        kw = dict(gate=gate, hard_skip=True)
        _check(inp, **kw)
        ms = bench(_make("triton", inp, "fwd", **kw))
        rows.append(dict(section="hard_skip", r=r, mode="fwd", provider="triton", kept=f, ms=ms,
                         ratio_to_unskipped=ms / full))
        goals.append(dict(goal=f"hard skip f={f}: time / unskipped <= f + 0.05", value=round(ms / full, 3),
                          target=round(f + 0.05, 3), met=ms / full <= f + 0.05))

    # 8 tasks vs 1 task, same rows
    one = bench(_make("triton", inp, "fwd"))
    inp8 = _inputs(M, K, N, r, dtype, dev, T=8)
    ti = torch.randint(0, 8, (M,), device=dev, generator=torch.Generator(device=dev).manual_seed(2))
    _check(inp8, task_index=ti)
    eight = bench(_make("triton", inp8, "fwd", task_index=ti))
    rows.append(dict(section="tasks", r=r, mode="fwd", provider="triton", tasks=8, ms=eight, ratio_to_one_task=eight / one))
    goals.append(dict(goal="8 tasks / 1 task (same rows) <= 1.15", value=round(eight / one, 3), target=1.15,
                      met=eight / one <= 1.15))

    # the row schedule alone (sort + tile table of one tile height), as a fraction of the
    # unskipped forward: the Triton kernels (default) against the torch-ops version and, where
    # the extension has them, the CUDA helpers
    from tarp_fast.kernels import _schedule as S

    drop_gate = (torch.rand(M, device=dev, generator=torch.Generator(device=dev).manual_seed(3)) < 0.5).float()

    def schedule(row_groups, tile_table):
        def build(task, g):
            perm, seg_off = row_groups(task, g)
            return perm, seg_off, tile_table(seg_off, M, 8, 128)

        return build

    builders = {
        "triton": schedule(lambda task, g: S.row_groups_triton(M, 8, task, g), S.tile_table_triton),
        "torch": schedule(lambda task, g: S.row_groups(M, 8, task, None if g is None else g == 0, dev), S.tile_table),
    }
    if dev.type == "cuda" and S.cuda_helpers_built():  # the extension's counting sort (TARP_FAST_CUDA_HELPERS=1)
        builders["cuda_helpers"] = schedule(lambda task, g: S.row_groups_cuda(M, 8, task, g), S.tile_table_triton)
    for label, task, g in (("8 tasks", ti, None), ("8 tasks + hard skip", ti, drop_gate)):
        want = builders["torch"](task, g)
        for prov, build in builders.items():
            perm, seg_off, table = build(task, g)  # the same schedule, element for element, before timing
            if not (torch.equal(perm, want[0]) and torch.equal(seg_off, want[1])
                    and all(torch.equal(a, b) for a, b in zip(table[:3], want[2][:3]))):
                raise AssertionError(f"gpu_report: the {prov} row schedule differs from torch's ({label})")
            ms = bench(lambda build=build, task=task, g=g: build(task, g))
            rows.append(dict(section=f"schedule ({label})", r=r, mode="fwd", provider=prov, ms=ms,
                             ratio_to_unskipped=ms / full))

    on_gpu = dev.type == "cuda"
    meta = dict(device=torch.cuda.get_device_name(dev) if on_gpu else f"{dev.type} (smoke run, not a measurement)",
                capability=".".join(map(str, torch.cuda.get_device_capability(dev))) if on_gpu else "none",
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), M=M, K=K, N=N, dtype=args.dtype,
                timer="triton.testing.do_bench median (ms)" if timer is None else "caller's timer (ms)",
                configs="autotuned (TARP_FAST_AUTOTUNE=1)" if autotune_enabled() else "deterministic defaults",
                tuned=_tuned_choices())
    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"gpu_report_{stamp}" + ("_autotuned" if autotune_enabled() else ""))
    with open(base + ".json", "w") as fh:
        json.dump(dict(meta=meta, rows=rows, goals=goals), fh, indent=2)
    md = [f"# tarp-fast Triton GPU report ({meta['date']})", "",
          f"Device: {meta['device']} (sm_{meta['capability'].replace('.', '')}), torch {meta['torch']}, "
          f"Triton {meta['triton']}, CUDA {meta['cuda']}. {args.dtype}, M={M}, K=N={K}; {meta['timer']}; "
          f"kernel configs: {meta['configs']}.", "",
          "| section | r | mode | provider | ms | ratio |", "|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row.get("ratio_to_F_linear") or row.get("ratio_to_unskipped") or row.get("ratio_to_one_task")
        extra = f" (kept {row['kept']})" if "kept" in row else (f" (T={row['tasks']})" if "tasks" in row else "")
        md.append(f"| {row['section']}{extra} | {row['r']} | {row['mode']} | {row['provider']} | {row['ms']:.3f} | "
                  f"{ratio:.3f} |")
    md += ["", "| goal | value | target | met |", "|---|---|---|---|"]
    md += [f"| {g['goal']} | {g['value']} | {g['target']} | {'yes' if g['met'] else 'NO'} |" for g in goals]
    with open(base + ".md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
