"""The adaptation-time benchmark: how fast does each starting point fine-tune on a new domain?

Arms (DESIGN.md §6), all fine-tuned with the same :class:`FinetuneRecipe` (Adam, same steps, same
batches in the same order, same evaluation windows):

==================  ===========================================================  ==============
key                 starting point                                               trains
==================  ===========================================================  ==============
``direct``          the pretrained base                                          all weights
``tarp``            the pretrained base + fresh TARP factors (no preparation)    TARP factors
``multitask``       the base after multitask continued training on the           all weights
                    preparation domains (the DAPT-style control)
``mltd_tarp``       the base + TARP after MLtD preparation (:func:`prepare`)     TARP factors
``mltd_tarp_tams``  as ``mltd_tarp`` with TAMS (controller + searched cells);    TARP + cells
                    the held-out domain's architecture is deployed from its
                    support windows
``tarp_tams``       opt-in control (not in the default arms): the base + fresh   TARP + cells
                    TARP factors + fresh TAMS, no preparation; separates the
                    searched cells' added capacity from what preparation adds
==================  ===========================================================  ==============

Full-weight arms use ``full_lr``, adapter arms ``adapter_lr`` (adapters are zero-initialized
low-rank factors and need a larger step; both are settings, reported in the JSON). The multitask
control gets the same preparation budget as MLtD in windows processed: ``meta_steps × T ×
(inner_steps × B + Bq)`` windows, in batches of ``T × B``.

Per held-out domain: the curve ``[[step, loss, seconds]]`` at log-spaced and evenly spaced steps,
the target (the ``direct`` arm's final loss), each arm's final loss and its steps to the target
(the first evaluated step whose loss is at most the target, ``None`` if never). With several
seeds the curves are averaged step by step; per-seed figures are kept under ``per_seed``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .. import mark_only_tarp_trainable, patch_model, tarp_parameters
from .._io import atomic_write_bytes
from ..data.corpus import Corpus
from ..data.sampling import DomainSplits, TaskSampler, random_windows, step_generator
from .finetune import FinetuneRecipe, finetune, train_lm
from .models import check_vocab, count_parameters, small_gpt2
from .prepare import PrepConfig, prepare

__all__ = ["ARMS", "OPTIONAL_ARMS", "BenchConfig", "run_benchmark", "format_table", "plot_curves", "steps_to_target",
           "tams_available", "pretrained_base"]

ARMS = ("direct", "tarp", "multitask", "mltd_tarp", "mltd_tarp_tams")
#: Arms that run only when asked for (``--arms``); see the table above.
OPTIONAL_ARMS = ("tarp_tams",)
_TAMS_ARMS = ("mltd_tarp_tams", "tarp_tams")


def tams_available() -> Optional[str]:
    """``None`` when ``tarp_fast.tams.add_tams`` can be imported, else the reason it cannot."""
    try:
        from ..tams import add_tams  # noqa: F401, PLC0415
    except Exception as exc:  # ImportError, or a partially written package raising at import
        return f"tarp_fast.tams.add_tams is not importable ({type(exc).__name__}: {exc})"
    return None


@dataclass
class BenchConfig:
    """Everything a benchmark run depends on (saved in the JSON output)."""

    n_embd: int = 96
    n_layer: int = 3
    n_head: int = 4
    rank: int = 4
    variant: str = "dynamic"
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 16
    base_seed: int = 0
    prep: PrepConfig = field(default_factory=PrepConfig)
    finetune: FinetuneRecipe = field(default_factory=FinetuneRecipe)
    full_lr: float = 1e-3
    adapter_lr: float = 3e-3
    multitask_lr: Optional[float] = None  # default: prep.outer_lr
    seeds: tuple = (0,)
    arms: tuple = ARMS
    tams_cell_width: int = 32
    #: what the adapter arms fine-tune: "all" (default: every weight, the adapter at
    #: ``adapter_lr`` and the rest at ``full_lr``, so every arm trains the same parameters with
    #: the same recipe) or "adapter" (TARP factors and TAMS cells only: parameter-efficient).
    #: Measured on the demo (seed 0, 80 meta-steps): with "adapter" neither MLtD arm reached the
    #: direct arm's final loss in 100 steps; with "all" mltd_tarp reached it in 40-45 steps.
    finetune_scope: str = "all"

    def __post_init__(self):
        if isinstance(self.prep, dict):
            self.prep = PrepConfig(**self.prep)
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneRecipe(**self.finetune)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.arms = tuple(self.arms)
        bad = [a for a in self.arms if a not in ARMS + OPTIONAL_ARMS]
        if bad:
            raise ValueError(f"BenchConfig: argument 'arms' has unknown keys {bad}; known: {ARMS + OPTIONAL_ARMS}")
        if "direct" not in self.arms:
            raise ValueError("BenchConfig: argument 'arms' must include 'direct' (its final loss is the target)")
        if not self.seeds:
            raise ValueError("BenchConfig: argument 'seeds' must name at least one seed")
        if self.finetune_scope not in ("adapter", "all"):
            raise ValueError(f"BenchConfig: argument 'finetune_scope' must be 'adapter' or 'all', got {self.finetune_scope!r}")
        if self.prep.seq_len != self.finetune.seq_len:
            raise ValueError(f"BenchConfig: prep.seq_len ({self.prep.seq_len}) must equal finetune.seq_len "
                             f"({self.finetune.seq_len})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prep"] = self.prep.to_dict()
        d["seeds"], d["arms"] = list(self.seeds), list(self.arms)
        return d


def steps_to_target(curve: Sequence[Sequence[float]], target: float) -> Optional[int]:
    """First evaluated step whose loss is ``<= target`` (with a 1e-9 slack), or ``None``."""
    for step, loss, _ in curve:
        if loss <= target + 1e-9:
            return int(step)
    return None


def _model_kw(cfg: BenchConfig, vocab: int) -> dict:
    return dict(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_positions=max(64, cfg.finetune.seq_len), vocab_size=vocab)


def pretrained_base(corpus: Corpus, cfg: BenchConfig, *, cache_dir: Optional[str] = None, progress: bool = False,
                    log: Optional[Callable[[dict], None]] = None) -> tuple:
    """``(model, seconds, cached)``: a small GPT-2 pretrained on ``corpus`` (the preparation domains).

    Cached in ``cache_dir`` under a key made of the corpus fingerprint and the settings, so the
    same data and settings give the same base without training again.
    """
    kw = _model_kw(cfg, corpus.vocab_size)
    key_src = json.dumps({"corpus": corpus.fingerprint(), "model": kw, "steps": cfg.pretrain_steps,
                          "lr": cfg.pretrain_lr, "batch": cfg.pretrain_batch, "seed": cfg.base_seed,
                          "seq_len": cfg.finetune.seq_len, "v": 1}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    vocab = kw.pop("vocab_size")
    model = small_gpt2(vocab, seed=cfg.base_seed, **kw)
    path = os.path.join(cache_dir, f"base-{key}", "model.safetensors") if cache_dir else None
    if path and os.path.isfile(path):
        from safetensors.torch import load_model  # noqa: PLC0415

        load_model(model, path)
        return model, 0.0, True
    sampler = TaskSampler(corpus, seq_len=cfg.finetune.seq_len, seed=cfg.base_seed + 99_991)
    t0 = time.perf_counter()
    train_lm(model, lambda s: sampler.mixed_batch_at(s, cfg.pretrain_batch)[0], cfg.pretrain_steps,
             lr=cfg.pretrain_lr, warmup=max(1, cfg.pretrain_steps // 20), progress=progress, desc="pretrain base",
             log=log)
    seconds = time.perf_counter() - t0
    if path:
        from .models import save_base_model  # noqa: PLC0415

        save_base_model(model, os.path.dirname(path))
    return model, seconds, False


def _adapter_model(base: nn.Module, cfg: BenchConfig) -> nn.Module:
    m = copy.deepcopy(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.base_seed + 1)  # same fresh TARP factors for every arm that adds them
        patch_model(m, rank=cfg.rank, variant=cfg.variant)
    return m


def _add_tams(model: nn.Module, cfg: BenchConfig) -> None:
    from ..tams import add_tams  # noqa: PLC0415

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.base_seed + 2)
        # gates=False: sublayer skipping saves compute but a 3-layer model has little to skip,
        # and the benchmark measures adaptation speed, not inference cost.
        add_tams(model, cell=True, gates=False, cell_width=cfg.tams_cell_width)


def _active_cell_parameters(model: nn.Module, arch) -> int:
    """Parameters of the searched cells that the deployed ``arch`` runs (its capacity added to
    the model): the input and output projections plus the chosen op of each edge."""
    from ..tams import EDGES, OPS, tams_record  # noqa: PLC0415

    ops = arch.ops[0].tolist()
    # as SearchedCell.forward runs it: an edge runs when it is not `zero` and its source node is
    # computed (inputs always can be; an intermediate node only when some running edge feeds it)
    computed, live = {0, 1}, []
    for k, (source, target) in enumerate(EDGES):  # in topological order
        if OPS[ops[k]] != "zero" and source in computed:
            live.append(k)
            computed.add(target)
    if not live:  # every intermediate node is 0: only the output bias is added
        return 0
    read_inputs = {EDGES[k][0] for k in live if EDGES[k][0] < 2}  # input nodes are projected only when read
    total = 0
    for cell in tams_record(model).cells or ():
        total += count_parameters(cell.out_proj.parameters())
        total += sum(count_parameters(cell.in_proj[i].parameters()) for i in read_inputs)
        total += sum(count_parameters(m.parameters()) for k in live for m in cell.edges[k].modules_of(ops[k]))
    return total


def _tams_context(model: nn.Module, support: torch.Tensor):
    """Deploy one architecture for a held-out domain from its support windows ``[n, L]``."""
    from ..tams import task_embedding, use_architecture  # noqa: PLC0415

    with torch.no_grad():
        emb = task_embedding(model, support)
    arch = model.tams_controller.deploy(emb.unsqueeze(0))
    return (lambda: use_architecture(model, arch)), arch


def run_benchmark(
    corpus: Corpus,
    heldout: Sequence[str],
    cfg: BenchConfig,
    *,
    cache_dir: Optional[str] = None,
    progress: bool = False,
    log: Optional[Callable[[dict], None]] = None,
    work_dir: Optional[str] = None,
    base_model: Optional[nn.Module] = None,
) -> dict:
    """Run every arm of ``cfg.arms`` on every held-out domain for every seed; return the JSON dict.

    ``corpus`` holds the preparation domains and the held-out ones (``heldout`` names); the
    held-out domains are never seen before their fine-tuning. ``work_dir`` keeps the JSONL logs
    and checkpoints of the preparation runs. ``base_model``: start every arm from this model (a
    local checkpoint, see :func:`tarp_fast.meta.models.load_base_model`; it is not modified)
    instead of pretraining the small GPT-2 of ``cfg``.
    """
    log = log or (lambda rec: None)
    prep_corpus, held_corpus = corpus.split_heldout(heldout)
    unavailable: dict[str, str] = {}
    arms = list(cfg.arms)
    for arm in _TAMS_ARMS:
        if arm in arms:
            reason = tams_available()
            if reason is not None:
                unavailable[arm] = reason
                arms.remove(arm)
    t_all = time.perf_counter()
    if base_model is not None:
        check_vocab(base_model, corpus.vocab_size, what="run_benchmark: argument 'base_model'")
        base, pre_seconds = base_model, 0.0
        log({"phase": "pretrain", "seconds": 0.0, "given": True})
    else:
        base, pre_seconds, cached = pretrained_base(prep_corpus, cfg, cache_dir=cache_dir, progress=progress,
                                                    log=log)
        log({"phase": "pretrain", "seconds": pre_seconds, "cached": cached})
    pc = cfg.prep
    per_seed: dict[str, dict] = {}
    prep_cost: dict[str, list[float]] = {}
    arch_reports: dict[str, dict] = {}
    sizes = {"model_parameters": count_parameters(base.parameters())}
    for seed in cfg.seeds:
        starts: dict[str, nn.Module] = {}
        starts["direct"] = base
        if "tarp" in arms:
            starts["tarp"] = _adapter_model(base, cfg)
            sizes["adapter_parameters"] = count_parameters(tarp_parameters(starts["tarp"]))
        if "tarp_tams" in arms:
            starts["tarp_tams"] = _adapter_model(base, cfg)
            _add_tams(starts["tarp_tams"], cfg)
        if "multitask" in arms:
            mt = copy.deepcopy(base)
            sampler = TaskSampler(prep_corpus, seq_len=pc.seq_len, seed=pc.seed + seed)
            windows = pc.tasks_per_batch * (pc.inner_steps * pc.batch_size + pc.query_batch_size)
            batch = pc.tasks_per_batch * pc.batch_size
            steps = max(1, round(pc.meta_steps * windows / batch))
            t0 = time.perf_counter()
            train_lm(mt, lambda s, sampler=sampler, batch=batch: sampler.mixed_batch_at(s, batch)[0], steps, lr=cfg.multitask_lr or pc.outer_lr,
                     progress=progress, desc=f"multitask (seed {seed})", log=log)
            prep_cost.setdefault("multitask", []).append(time.perf_counter() - t0)
            starts["multitask"] = mt
        for arm, with_tams in (("mltd_tarp", False), ("mltd_tarp_tams", True)):
            if arm not in arms:
                continue
            m = _adapter_model(base, cfg)
            if with_tams:
                _add_tams(m, cfg)
            seed_cfg = PrepConfig(**{**pc.to_dict(), "seed": pc.seed + seed})
            sampler = TaskSampler(prep_corpus, tasks_per_batch=pc.tasks_per_batch, inner_steps=max(pc.inner_steps, 1),
                                  batch_size=pc.batch_size, query_batch_size=pc.query_batch_size, seq_len=pc.seq_len,
                                  seed=seed_cfg.seed)
            log_path = os.path.join(work_dir, f"prepare-{arm}-seed{seed}.jsonl") if work_dir else None
            res = prepare(m, sampler, seed_cfg, tams=with_tams, log_path=log_path, progress=progress,
                          on_step=lambda rec, arm=arm: log({"phase": f"prepare:{arm}", **rec}))
            prep_cost.setdefault(arm, []).append(res["seconds"])
            starts[arm] = m
        seed_out: dict[str, dict] = {}
        for name in held_corpus.names:
            splits = DomainSplits.of(held_corpus[name].tokens, eval_fraction=cfg.finetune.eval_fraction)
            curves: dict[str, list] = {}
            for arm in arms:
                model = copy.deepcopy(starts[arm])
                ctx = None
                if arm in ("direct", "multitask"):
                    params, lr = list(model.parameters()), cfg.full_lr
                else:
                    mark_only_tarp_trainable(model)
                    params, lr = tarp_parameters(model), cfg.adapter_lr
                    if cfg.finetune_scope == "all":
                        adapter_ids = {id(p) for p in params}
                        rest = [p for p in model.parameters() if id(p) not in adapter_ids]
                        params = [{"params": params, "lr": cfg.adapter_lr}, {"params": rest, "lr": cfg.full_lr}]
                    if arm in _TAMS_ARMS:
                        support = random_windows(splits.train, 16, cfg.finetune.seq_len, step_generator(seed, 0, 77))
                        ctx, arch = _tams_context(model, support)
                        from ..tams import architecture_report  # noqa: PLC0415

                        key = f"{name}/seed{seed}" if arm == "mltd_tarp_tams" else f"{arm}:{name}/seed{seed}"
                        arch_reports[key] = architecture_report(arch, log=False)
                        sizes.setdefault("tams_active_cell_parameters", {})[key] = _active_cell_parameters(model, arch)
                curves[arm] = finetune(model, params, splits.train, splits.eval, cfg.finetune, seed=seed, lr=lr,
                                       progress=progress, desc=f"{arm} on {name} (seed {seed})", context=ctx)
                log({"phase": "finetune", "arm": arm, "domain": name, "seed": seed, "curve": curves[arm]})
            target = curves["direct"][-1][1]
            seed_out[name] = {"target_loss": target, "methods": {
                arm: {"curve": c, "final_loss": c[-1][1], "steps_to_target": steps_to_target(c, target)}
                for arm, c in curves.items()}}
        per_seed[str(seed)] = seed_out
    out = {"domains": _average(per_seed, held_corpus.names, arms)}
    out["per_seed"] = per_seed
    out["unavailable"] = unavailable
    out["preparation_seconds"] = {k: sum(v) / len(v) for k, v in prep_cost.items()}
    out["pretrain_seconds"] = pre_seconds
    out["base_model"] = ("given: " + type(base).__name__) if base_model is not None else "small GPT-2 pretrained here"
    out["total_seconds"] = time.perf_counter() - t_all
    out["sizes"] = sizes
    out["settings"] = cfg.to_dict()
    out["heldout"] = list(held_corpus.names)
    out["preparation_domains"] = list(prep_corpus.names)
    out["corpus"] = {"source": corpus.source, "fingerprint": corpus.fingerprint()}
    if arch_reports:
        out["tams_architectures"] = arch_reports
    out["goal"] = goal_summary(out)
    return out


def _average(per_seed: dict[str, dict], names: Sequence[str], arms: Sequence[str]) -> dict:
    seeds = list(per_seed)
    domains = {}
    for name in names:
        target = sum(per_seed[s][name]["target_loss"] for s in seeds) / len(seeds)
        methods = {}
        for arm in arms:
            cs = [per_seed[s][name]["methods"][arm]["curve"] for s in seeds]
            curve = [[int(cs[0][i][0]), sum(c[i][1] for c in cs) / len(cs), sum(c[i][2] for c in cs) / len(cs)]
                     for i in range(len(cs[0]))]
            methods[arm] = {"curve": curve, "final_loss": curve[-1][1], "steps_to_target": steps_to_target(curve, target)}
        domains[name] = {"target_loss": target, "methods": methods}
    return domains


def goal_summary(result: dict) -> dict:
    """Per domain: does ``mltd_*`` reach the target in <= 1/3 of direct's steps and beat multitask?"""
    out = {}
    for name, d in result["domains"].items():
        m = d["methods"]
        direct_steps = m["direct"]["steps_to_target"]
        total = m["direct"]["curve"][-1][0]
        row = {"direct_steps_to_target": direct_steps, "budget_steps": total}
        for arm in ("mltd_tarp", "mltd_tarp_tams"):
            if arm not in m:
                continue
            s = m[arm]["steps_to_target"]
            third = s is not None and direct_steps is not None and 3 * s <= direct_steps
            beats = "multitask" in m and m[arm]["final_loss"] < m["multitask"]["final_loss"] and (
                m["multitask"]["steps_to_target"] is None or (s is not None and s <= m["multitask"]["steps_to_target"]))
            row[arm] = {"steps_to_target": s, "within_third_of_direct": bool(third), "beats_multitask": bool(beats)}
        out[name] = row
    return out


def _fmt_steps(s) -> str:
    return "never" if s is None else str(s)


def format_table(result: dict) -> str:
    """A plain-text table: one row per held-out domain and arm."""
    lines = []
    prep = result.get("preparation_seconds", {})
    head = f"{'domain':<12} {'arm':<15} {'loss@0':>8} {'final':>8} {'target':>8} {'steps→target':>13} {'ft s':>7} {'prep s':>7}"
    lines.append(head)
    lines.append("-" * len(head))
    for name, d in result["domains"].items():
        for arm, m in d["methods"].items():
            c = m["curve"]
            lines.append(f"{name:<12} {arm:<15} {c[0][1]:>8.4f} {m['final_loss']:>8.4f} {d['target_loss']:>8.4f} "
                         f"{_fmt_steps(m['steps_to_target']):>13} {c[-1][2]:>7.1f} {prep.get(arm, 0.0):>7.1f}")
        for arm, why in result.get("unavailable", {}).items():
            lines.append(f"{name:<12} {arm:<15} unavailable: {why}")
    return "\n".join(lines)


def plot_curves(result: dict, path: str) -> str:
    """PNG of loss against fine-tuning steps, one panel per held-out domain (matplotlib, Agg)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(result["domains"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = result["domains"][name]
        for arm, m in d["methods"].items():
            xs = [p[0] for p in m["curve"]]
            ys = [p[1] for p in m["curve"]]
            ax.plot(xs, ys, marker=".", label=arm)
        ax.axhline(d["target_loss"], color="gray", linestyle=":", linewidth=1, label="target (direct final)")
        ax.set_title(f"held-out: {name}")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("eval loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_json(result: dict, path: str) -> str:
    """Write ``result`` as JSON atomically (NaN is not valid JSON: refuse it)."""
    text = json.dumps(result, indent=1, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())
    return path
