"""The ``tarp-fast`` command (also ``python -m tarp_fast.cli``).

Subcommands (settings from a TOML file with ``[model] [pretrain] [prep] [finetune] [bench]``
tables, then flags, over the defaults :data:`DEMO_DEFAULTS`):

* ``prepare``: pretrain (or load) a base, patch TARP (and TAMS with ``--tams``), run the MLtD
  preparation with checkpoints, resume and a JSONL log; ``torchrun --nproc_per_node=N`` splits
  each meta-batch's tasks over ranks (gloo on CPU, NCCL on GPU).
* ``adapt``: fine-tune the adapter of a prepared model on one domain.
* ``bench-adapt``: the five-arm adaptation benchmark (table, JSON, PNG); the JSON schema is in
  :mod:`tarp_fast.meta.bench`.
* ``demo``: the benchmark on text found on this machine, with held-out domains chosen here.

Exit status: 0 ok, 2 bad arguments or data, 3 a NaN/inf loss (reported with where it happened).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

__all__ = ["main", "build_parser", "DEMO_DEFAULTS"]

#: Default settings, sized so that the demo's whole comparison takes minutes on 2 CPU cores.
DEMO_DEFAULTS = {
    "model": {"n_embd": 64, "n_layer": 2, "n_head": 4, "rank": 4, "variant": "dynamic"},
    "pretrain": {"steps": 300, "lr": 3e-3, "batch": 16},
    "prep": {"algorithm": "fomaml", "meta_steps": 80, "tasks_per_batch": 4, "inner_steps": 1, "inner_lr": 3e-3,
             "inner_optimizer": "adam", "outer_lr": 1e-3, "batch_size": 16, "query_batch_size": 16, "seq_len": 64},
    "finetune": {"steps": 100, "batch_size": 16, "seq_len": 64, "eval_windows": 32},
    "bench": {"full_lr": 1e-3, "adapter_lr": 3e-3, "seeds": [0, 1], "finetune_scope": "all"},
}
#: The demo's held-out domains, by preference (the first two present on the machine are used).
DEMO_HELDOUT = ("licenses", "perl", "info", "config", "changelogs", "manpages")


# ---- configuration ---------------------------------------------------------------------------

def _read_toml(path: Optional[str]) -> dict:
    if not path:
        return {}
    import tomllib  # noqa: PLC0415  (Python >= 3.11)

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r} does not exist")
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def _merge(base: dict, over: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


_FLAGS = {
    "meta_steps": ("prep", "meta_steps"), "tasks_per_batch": ("prep", "tasks_per_batch"),
    "inner_steps": ("prep", "inner_steps"), "inner_lr": ("prep", "inner_lr"),
    "inner_optimizer": ("prep", "inner_optimizer"), "outer_lr": ("prep", "outer_lr"),
    "algorithm": ("prep", "algorithm"), "checkpoint_every": ("prep", "checkpoint_every"),
    "learn_inner_lr": ("prep", "learn_inner_lr"), "prep_seed": ("prep", "seed"),
    "steps": ("finetune", "steps"), "seq_len": ("finetune", "seq_len"), "batch_size": ("finetune", "batch_size"),
    "pretrain_steps": ("pretrain", "steps"), "rank": ("model", "rank"), "n_embd": ("model", "n_embd"),
    "n_layer": ("model", "n_layer"), "n_head": ("model", "n_head"),
    "full_lr": ("bench", "full_lr"), "adapter_lr": ("bench", "adapter_lr"),
}


def _flag_overrides(args: argparse.Namespace) -> dict:
    """The flags that were given, as a config tree (flags beat the TOML file)."""
    out: dict = {}
    for attr, (section, key) in _FLAGS.items():
        v = getattr(args, attr, None)
        if v is not None:
            out.setdefault(section, {})[key] = v
    if getattr(args, "seeds", None):
        try:
            out.setdefault("bench", {})["seeds"] = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        except ValueError as exc:
            raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from exc
    if getattr(args, "arms", None):
        out.setdefault("bench", {})["arms"] = [a.strip() for a in args.arms.split(",") if a.strip()]
    if out.get("finetune", {}).get("seq_len") is not None:
        out.setdefault("prep", {})["seq_len"] = out["finetune"]["seq_len"]
    if out.get("finetune", {}).get("batch_size") is not None:
        out.setdefault("prep", {}).setdefault("batch_size", out["finetune"]["batch_size"])
        out["prep"].setdefault("query_batch_size", out["finetune"]["batch_size"])
    return out


def _bench_config(tree: dict):
    """A :class:`~tarp_fast.meta.bench.BenchConfig` from a config tree (unknown keys are errors)."""
    from .meta.bench import ARMS, BenchConfig  # noqa: PLC0415
    from .meta.finetune import FinetuneRecipe  # noqa: PLC0415
    from .meta.prepare import PrepConfig  # noqa: PLC0415

    known = {"model": {"n_embd", "n_layer", "n_head", "rank", "variant"}, "pretrain": {"steps", "lr", "batch", "seed"},
             "bench": {"full_lr", "adapter_lr", "multitask_lr", "seeds", "arms", "tams_cell_width", "finetune_scope"}}
    for section, value in tree.items():
        if section not in ("model", "pretrain", "prep", "finetune", "bench"):
            raise ValueError(f"unknown config section [{section}]; known: model, pretrain, prep, finetune, bench")
        if not isinstance(value, dict):
            raise ValueError(f"config section [{section}] must be a table")
        if section in known and set(value) - known[section]:
            raise ValueError(f"unknown keys {sorted(set(value) - known[section])} in [{section}]; "
                             f"known: {sorted(known[section])}")
    model, pre, bench = tree.get("model", {}), tree.get("pretrain", {}), tree.get("bench", {})
    prep, ft = dict(tree.get("prep", {})), dict(tree.get("finetune", {}))
    prep.setdefault("seq_len", ft.get("seq_len", 96))
    ft.setdefault("seq_len", prep["seq_len"])
    try:
        prep_cfg, ft_cfg = PrepConfig(**prep), FinetuneRecipe(**ft)
    except TypeError as exc:
        raise ValueError(f"bad key in [prep] or [finetune] ({exc})") from exc
    return BenchConfig(
        n_embd=model.get("n_embd", 96), n_layer=model.get("n_layer", 3), n_head=model.get("n_head", 4),
        rank=model.get("rank", 4), variant=model.get("variant", "dynamic"),
        pretrain_steps=pre.get("steps", 300), pretrain_lr=pre.get("lr", 3e-3), pretrain_batch=pre.get("batch", 16),
        base_seed=pre.get("seed", 0), prep=prep_cfg, finetune=ft_cfg,
        full_lr=bench.get("full_lr", 1e-3), adapter_lr=bench.get("adapter_lr", 3e-3),
        multitask_lr=bench.get("multitask_lr"), seeds=tuple(bench.get("seeds", (0,))),
        arms=tuple(bench.get("arms", ARMS)), tams_cell_width=bench.get("tams_cell_width", 32),
        finetune_scope=bench.get("finetune_scope", "all"),
    )


def _settings(args: argparse.Namespace):
    return _bench_config(_merge(_merge(DEMO_DEFAULTS, _read_toml(args.config)), _flag_overrides(args)))


class _JsonlLog:
    """JSONL log: one JSON object per line, each with a wall-clock ``time``, flushed per record."""

    def __init__(self, path: Optional[str]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path, "w", encoding="utf-8").close()

    def __call__(self, rec: dict) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"time": time.time(), **rec}) + "\n")


def _load_corpus(spec: str, tokenizer: Optional[str]):
    from .data import load_corpus, load_tokenizer  # noqa: PLC0415

    if spec.startswith("generated"):
        return load_corpus(spec)
    return load_corpus(spec, tokenizer=load_tokenizer(tokenizer or "bytes"))


def _split_names(text: Optional[str], flag: str) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        raise ValueError(f"{flag} must name at least one domain")
    return names


# ---- subcommands -----------------------------------------------------------------------------

def _report(result: dict, json_path: Optional[str], png_path: Optional[str]) -> None:
    from .meta.bench import format_table, plot_curves, write_json  # noqa: PLC0415

    print(format_table(result))
    for name, row in result.get("goal", {}).items():
        for arm in ("mltd_tarp", "mltd_tarp_tams"):
            if arm in row:
                r = row[arm]
                print(f"goal [{name}] {arm}: {r['steps_to_target']} steps to the target vs direct "
                      f"{row['direct_steps_to_target']} (budget {row['budget_steps']}): "
                      f"{'within' if r['within_third_of_direct'] else 'NOT within'} 1/3 of direct; "
                      f"{'beats' if r['beats_multitask'] else 'does NOT beat'} the multitask control")
    if json_path:
        write_json(result, json_path)
        print(f"JSON: {json_path}")
    if png_path:
        plot_curves(result, png_path)
        print(f"plot: {png_path}")


def _bench_adapt(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415  (keep `tarp-fast --help` fast)

    from .meta.bench import run_benchmark  # noqa: PLC0415

    torch.set_num_threads(max(1, args.threads))
    cfg = _settings(args)
    corpus = _load_corpus(args.corpus, args.tokenizer)
    heldout = _split_names(args.heldout, "--heldout")
    base = None
    if args.model:
        from .meta.models import load_base_model  # noqa: PLC0415

        base = load_base_model(args.model)
    result = run_benchmark(corpus, heldout, cfg, cache_dir=args.cache_dir, progress=not args.no_progress,
                           log=_JsonlLog(args.log), work_dir=args.work_dir, base_model=base)
    _report(result, args.json, args.png)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from .data import machine_corpus  # noqa: PLC0415
    from .meta.bench import run_benchmark  # noqa: PLC0415

    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    cfg = _settings(args)
    corpus = machine_corpus(max_bytes=args.max_bytes)
    heldout = [n for n in DEMO_HELDOUT if n in corpus.names][:2]
    if not heldout or len(corpus.names) - len(heldout) < 2:
        raise ValueError(f"this machine has too few text domains ({corpus.names}) for the demo; "
                         "run `tarp-fast bench-adapt --corpus DIR --heldout NAME` on a folder of your own")
    os.makedirs(args.out, exist_ok=True)
    corpus.write_manifest(os.path.join(args.out, "corpus_manifest.json"))
    print(f"domains found on this machine: {', '.join(corpus.names)}")
    print(f"held out (never seen before their fine-tuning): {', '.join(heldout)}")
    print(f"model: GPT-2 n_embd={cfg.n_embd} n_layer={cfg.n_layer}, byte tokens; TARP {cfg.variant} rank {cfg.rank}; "
          f"preparation: {cfg.prep.algorithm}, {cfg.prep.meta_steps} meta-steps x {cfg.prep.tasks_per_batch} tasks "
          f"x {cfg.prep.inner_steps} inner step(s); fine-tuning: {cfg.finetune.steps} steps; seeds {list(cfg.seeds)}")
    result = run_benchmark(corpus, heldout, cfg, cache_dir=os.path.join(args.out, "cache"),
                           progress=not args.no_progress, log=_JsonlLog(os.path.join(args.out, "log.jsonl")),
                           work_dir=args.out)
    print()
    _report(result, os.path.join(args.out, "bench.json"), os.path.join(args.out, "bench.png"))
    sizes = result["sizes"]
    if "adapter_parameters" in sizes:
        print(f"model parameters: {sizes['model_parameters']:,}; adapter (TARP factors): "
              f"{sizes['adapter_parameters']:,} ({100.0 * sizes['adapter_parameters'] / sizes['model_parameters']:.1f}% "
              "of the model)")
    active = sizes.get("tams_active_cell_parameters")
    if active:
        lo, hi = min(active.values()), max(active.values())
        print(f"TAMS cells as deployed per domain and seed: {lo:,}-{hi:,} active parameters "
              f"({100.0 * lo / sizes['model_parameters']:.0f}-{100.0 * hi / sizes['model_parameters']:.0f}% "
              "of the model; compare with the opt-in control arm tarp_tams)")
    print(f"demo wall time: {time.perf_counter() - t0:.0f} s")
    return 0


def _init_distributed():
    """Initialize torch.distributed under torchrun (gloo on CPU, NCCL on GPU); ``None`` otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist


def _prepare_cmd(args: argparse.Namespace) -> int:
    import copy  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from . import patch_model, save_adapter, unpatch_model  # noqa: PLC0415
    from .data import TaskSampler  # noqa: PLC0415
    from .meta.bench import _add_tams, pretrained_base  # noqa: PLC0415
    from .meta.models import load_base_model, save_base_model  # noqa: PLC0415
    from .meta.prepare import prepare  # noqa: PLC0415

    torch.set_num_threads(max(1, args.threads))
    dist = _init_distributed()
    rank = dist.get_rank() if dist else 0
    cfg = _settings(args)
    # Before anything random: the run is a function of its settings (prepare() also draws from
    # its own RNG seeded from the same seed, or restored from the checkpoint when resuming).
    import random  # noqa: PLC0415

    torch.manual_seed(cfg.prep.seed)
    random.seed(cfg.prep.seed)
    corpus = _load_corpus(args.corpus, args.tokenizer)
    heldout = _split_names(args.heldout, "--heldout") if args.heldout else []
    if heldout:
        corpus, _ = corpus.split_heldout(heldout)
    os.makedirs(args.out, exist_ok=True)
    if args.model:
        from .meta.models import check_vocab  # noqa: PLC0415

        model = load_base_model(args.model)
        check_vocab(model, corpus.vocab_size)
    else:
        # every rank trains the same base from the same seed: deterministic, no broadcast needed
        model, _, _ = pretrained_base(corpus, cfg, cache_dir=os.path.join(args.out, "cache"),
                                      progress=rank == 0 and not args.no_progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.base_seed + 1)
        patch_model(model, rank=cfg.rank, variant=cfg.variant)
    if args.tams:
        _add_tams(model, cfg)
    pc = cfg.prep
    sampler = TaskSampler(corpus, tasks_per_batch=pc.tasks_per_batch, inner_steps=max(pc.inner_steps, 1),
                          batch_size=pc.batch_size, query_batch_size=pc.query_batch_size, seq_len=pc.seq_len,
                          seed=pc.seed)
    model_dir = os.path.abspath(args.model) if args.model else None
    # what the run depends on besides [prep]: compared with the checkpoint's on resume
    run_settings = {"model_dir": model_dir, "corpus": "sha256:" + corpus.fingerprint()[:16], "heldout": heldout,
                    "tarp": {"rank": cfg.rank, "variant": cfg.variant, "init_seed": cfg.base_seed}}
    if not args.model:
        run_settings["base"] = {"n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                                "pretrain_steps": cfg.pretrain_steps, "pretrain_lr": cfg.pretrain_lr,
                                "pretrain_batch": cfg.pretrain_batch, "seed": cfg.base_seed}
    if args.tams:
        run_settings["tams_cell_width"] = cfg.tams_cell_width
    res = prepare(model, sampler, pc, tams=args.tams, checkpoint_dir=os.path.join(args.out, "checkpoints"),
                  resume=not args.no_resume, log_path=os.path.join(args.out, "prepare.jsonl"),
                  progress=rank == 0 and not args.no_progress, stop_after=args.stop_after, run_settings=run_settings)
    if rank == 0:
        plain = copy.deepcopy(model)
        if args.tams:
            from .tams import remove_tams, save_tams  # noqa: PLC0415

            save_tams(model, os.path.join(args.out, "adapter"))
            remove_tams(plain)
        else:
            save_adapter(model, os.path.join(args.out, "adapter"))
        save_base_model(unpatch_model(plain), os.path.join(args.out, "base"))
        corpus.write_manifest(os.path.join(args.out, "corpus_manifest.json"))
        from ._io import atomic_write_bytes  # noqa: PLC0415

        atomic_write_bytes(os.path.join(args.out, "prepare_config.json"), json.dumps(
            {"settings": cfg.to_dict(), "tams": bool(args.tams), "model_dir": model_dir, "run": run_settings,
             "steps": res["steps"], "losses": res["losses"], "resumes": res["resumes"]}, indent=1).encode())
        last = res["losses"][-1] if res["losses"] else float("nan")
        print(f"prepared: {res['steps']} meta-steps ({res['seconds']:.1f} s in this run), last query loss "
              f"{last:.4f}; written to {args.out}")
    if dist:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _adapt_cmd(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from . import load_adapter, mark_only_tarp_trainable, save_adapter, tarp_parameters  # noqa: PLC0415
    from .data.sampling import DomainSplits, random_windows, step_generator  # noqa: PLC0415
    from .meta.finetune import FinetuneRecipe, finetune  # noqa: PLC0415
    from .meta.models import check_vocab, load_base_model  # noqa: PLC0415

    torch.set_num_threads(max(1, args.threads))
    conf_path = os.path.join(args.prepared, "prepare_config.json")
    if not os.path.isfile(conf_path):
        raise FileNotFoundError(f"--prepared {args.prepared!r} has no prepare_config.json (run `tarp-fast prepare`)")
    with open(conf_path, encoding="utf-8") as fh:
        pconf = json.load(fh)
    settings = pconf["settings"]
    model = load_base_model(os.path.join(args.prepared, "base"))
    corpus = _load_corpus(args.corpus, args.tokenizer)
    if args.domain not in corpus:
        raise ValueError(f"--domain {args.domain!r} is not in the corpus (domains: {corpus.names})")
    check_vocab(model, corpus.vocab_size, what="--prepared")
    ft = dict(settings["finetune"])
    if args.steps is not None:
        ft["steps"] = args.steps
    recipe = FinetuneRecipe(**ft)
    splits = DomainSplits.of(corpus[args.domain].tokens, eval_fraction=recipe.eval_fraction)
    ctx = None
    tams = bool(pconf.get("tams"))
    if tams:
        from .meta.bench import _tams_context  # noqa: PLC0415
        from .tams import load_tams, save_tams  # noqa: PLC0415

        load_tams(model, os.path.join(args.prepared, "adapter"))
        ctx, _ = _tams_context(model, random_windows(splits.train, 16, recipe.seq_len, step_generator(args.seed, 0, 77)))
    else:
        load_adapter(model, os.path.join(args.prepared, "adapter"))
    mark_only_tarp_trainable(model)
    log = _JsonlLog(os.path.join(args.out, "adapt.jsonl"))
    curve = finetune(model, tarp_parameters(model), splits.train, splits.eval, recipe, seed=args.seed,
                     lr=args.lr or settings["adapter_lr"], progress=not args.no_progress,
                     desc=f"adapt to {args.domain}", context=ctx,
                     on_eval=lambda s, loss, t: log({"step": s, "loss": loss, "seconds": t}))
    (save_tams if tams else save_adapter)(model, os.path.join(args.out, "adapter"))
    print(f"{'step':>6} {'loss':>8} {'seconds':>8}")
    for step, loss, secs in curve:
        print(f"{step:>6d} {loss:>8.4f} {secs:>8.2f}")
    print(f"adapter written to {os.path.join(args.out, 'adapter')}")
    return 0


# ---- parser ----------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, *, corpus: bool = True) -> None:
    if corpus:
        p.add_argument("--corpus", default="machine",
                       help="'machine', 'generated[:N]', a folder with one subfolder of text files per domain, "
                            "a .jsonl file of {\"domain\", \"text\"} records, or a corpus manifest .json")
        p.add_argument("--tokenizer", default="bytes", help="'bytes' (default) or a local transformers tokenizer folder")
    p.add_argument("--config", help="TOML file with [model] [pretrain] [prep] [finetune] [bench] tables")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1")
    p.add_argument("--arms", help="comma-separated benchmark arms (default: all five)")
    for flag, typ in (("--meta-steps", int), ("--tasks-per-batch", int), ("--inner-steps", int), ("--inner-lr", float),
                      ("--outer-lr", float), ("--steps", int), ("--seq-len", int), ("--batch-size", int),
                      ("--pretrain-steps", int), ("--rank", int), ("--n-embd", int), ("--n-layer", int),
                      ("--n-head", int), ("--full-lr", float), ("--adapter-lr", float), ("--checkpoint-every", int),
                      ("--prep-seed", int)):
        p.add_argument(flag, type=typ, default=None)
    p.add_argument("--algorithm", choices=("fomaml", "maml", "reptile"), default=None)
    p.add_argument("--inner-optimizer", choices=("sgd", "adam"), default=None)
    p.add_argument("--learn-inner-lr", action="store_const", const=True, default=None,
                   help="learn one inner learning rate per fast tensor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tarp-fast", description="TARP / MLtD: preparation, adaptation, benchmark")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="MLtD preparation (meta-training) of a base model; torchrun-ready")
    _common(p)
    p.add_argument("--heldout", help="comma-separated domains to leave out of preparation")
    p.add_argument("--out", required=True, help="output folder (base/, adapter/, checkpoints/, prepare.jsonl)")
    p.add_argument("--model", help="local transformers causal-LM folder to start from (default: pretrain a small GPT-2)")
    p.add_argument("--tams", action="store_true", help="add TAMS (controller and searched cells)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out has checkpoints")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    p.set_defaults(func=_prepare_cmd)

    a = sub.add_parser("adapt", help="fine-tune the adapter of a prepared model on one domain")
    _common(a)
    a.add_argument("--prepared", required=True, help="folder written by `tarp-fast prepare`")
    a.add_argument("--domain", required=True, help="the domain to adapt to")
    a.add_argument("--out", required=True, help="output folder (adapter/, adapt.jsonl)")
    a.add_argument("--lr", type=float, default=None, help="default: the prepared settings' adapter_lr")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=_adapt_cmd)

    b = sub.add_parser("bench-adapt", help="adaptation-time benchmark of the five arms on held-out domains")
    _common(b)
    b.add_argument("--heldout", required=True, help="comma-separated held-out domains")
    b.add_argument("--json", help="write the results here")
    b.add_argument("--png", help="write the loss curves here")
    b.add_argument("--log", help="JSONL log of every phase")
    b.add_argument("--model", help="local transformers causal-LM folder every arm starts from "
                                   "(default: pretrain a small GPT-2 on the preparation domains)")
    b.add_argument("--cache-dir", help="cache of pretrained bases")
    b.add_argument("--work-dir", help="keep the preparation logs here")
    b.set_defaults(func=_bench_adapt)

    d = sub.add_parser("demo", help="the whole comparison on text found on this machine (minutes on CPU)")
    _common(d, corpus=False)
    d.add_argument("--out", default="tarp-fast-demo", help="output folder (default ./tarp-fast-demo)")
    d.add_argument("--max-bytes", type=int, default=300_000, help="text per domain, in bytes")
    d.set_defaults(func=_demo)
    return parser


def _drop_source_root_from_path() -> None:
    """Keep the source tree's top-level ``kernels/`` folder from posing as a package.

    ``python -m tarp_fast.cli`` from the repository root puts the root on ``sys.path``; the
    folder ``kernels/`` there (installed as ``tarp_fast.kernels``) then shadows the unrelated
    ``kernels`` distribution that transformers probes for at import, and the probe fails.
    ``tarp_fast`` itself is already imported, so the entry is not needed.
    """
    here = os.path.abspath(os.getcwd())
    for entry in list(sys.path):
        root = os.path.abspath(entry or here)
        if os.path.isfile(os.path.join(root, "kernels", "__init__.py")) and os.path.isdir(os.path.join(root, "tarp_fast")):
            sys.path.remove(entry)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; returns the exit status (2: bad arguments or data, 3: a NaN/inf loss)."""
    _drop_source_root_from_path()
    args = build_parser().parse_args(argv)
    from .meta.finetune import NonFiniteLossError  # noqa: PLC0415

    try:
        return int(args.func(args) or 0)
    except NonFiniteLossError as exc:
        print(f"tarp-fast {args.command}: {exc}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as exc:
        print(f"tarp-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
