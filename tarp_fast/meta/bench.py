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
``multitask_tarp``  matched control of ``mltd_tarp``: the same modules, trained   TARP factors
                    parameters, data, optimizer and compute, trained multitask
                    instead of meta-learned (:func:`multitask_prepare`)
``multitask_tarp_   matched control of ``mltd_tarp_tams`` (its own controller     TARP + cells
tams``              samples the architectures during training and deploys one)
``tarp_tams``       opt-in control (not in the default arms): the base + fresh   TARP + cells
                    TARP factors + fresh TAMS, no preparation, deploying the
                    architecture MLtD's controller chose for the domain and seed
                    (its own fresh controller's when ``mltd_tarp_tams`` is not
                    run); separates the searched cells' capacity from what
                    preparation adds
==================  ===========================================================  ==============

**Matched controls.** ``multitask_prepare`` sees exactly the task batches MLtD's preparation
draws (the same :class:`TaskSampler`, seed and meta-steps), and takes one outer step per
meta-batch on the mean loss of all its support and query windows, with the same optimizer
(AdamW, ``prep.outer_lr``, no schedule, ``prep.grad_clip``) over the same parameters (every
weight: base, TARP factors, TAMS controller and cells); with TAMS the architectures are sampled
per task from the controller exactly as in the preparation. The only difference is the inner
loop: multitask instead of meta-learned. The headline compares each MLtD arm with its matched
control (``comparisons``, ``"matched": true``).

**Protocols** (``protocols``, each reported separately): ``"adapter"`` fine-tunes only the
adapter (TARP factors, TAMS modules) of the adapter arms (the paper's meta-test); ``"all"``
fine-tunes every weight (adapter at ``adapter_lr``, the rest at ``full_lr``). The full-weight
arms (``direct``, ``multitask``) train every weight under both. The legacy keys ``domains`` and
``per_seed`` hold the protocol ``finetune_scope``; ``protocols[p]`` holds each protocol's.
The meta-test optimizer is Adam (AdamW, no weight decay unless set) with a constant learning
rate; the preparation's inner optimizer is ``prep.inner_optimizer`` (both stated in the JSON
under ``optimizers``).

**Seeds.** Seed ``s`` varies the base's pretraining (seed ``base_seed + s``, cached per seed;
not when a ``base_model`` is given, see ``seed_varies``), the fresh adapter and TAMS
initialization, the preparation's task batches and the fine-tuning batches' order. The
evaluation windows of a domain are the same for every seed.

**Comparisons** (top-level ``comparisons``, :mod:`tarp_fast.meta.stats`): one entry per
(domain, protocol, MLtD arm, control) with the median speed-up in steps to the target over
seeds, its paired bootstrap 95% interval (runs that never reach the target are censored at
budget + 1 steps and counted), losses after 1/5/10/20 steps, the area under the curve and the
final losses.

Full-weight arms use ``full_lr``, adapter arms ``adapter_lr`` (adapters are zero-initialized
low-rank factors and need a larger step; both are settings, reported in the JSON). The multitask
control gets the same preparation budget as MLtD in windows processed: ``meta_steps × T ×
(inner_steps × B + Bq)`` windows, in batches of ``T × B``.

**Learning rates per arm** (``lr_grid``, off by default): each arm's configured learning rate
(``full_lr`` for the full-weight arms; ``adapter_lr`` and, under protocol ``"all"``, ``full_lr``
for the rest of the weights of the adapter arms) is multiplied by each value of the grid, the arm
fine-tuned once per value on a *validation domain* that is neither a preparation nor a held-out
domain (``validation_domain``, default: the last preparation domain, taken out of the
preparation), protocol by protocol, with the first seed only (its base, preparation and batch
order; one seed is enough to pick the order of magnitude, and it keeps the grid's cost at one
seed's fine-tuning); the value with the lowest final validation loss is used for that arm and
protocol on every held-out domain and seed. JSON ``lr_selection``: the grid, the validation
domain and where it came from, the seed, and per protocol and arm the grid's final losses
(``None``: diverged) and the chosen multiplier and learning rates (``null`` when off).

**Base budgets** (``base_budgets``, pretraining steps; empty: one budget, ``pretrain_steps``):
the whole benchmark runs once per budget; the top-level keys are those of the first budget, and
``by_base_budget`` holds ``budgets``, a ``summary`` (per budget, protocol and MLtD arm: the
median over held-out domains and seeds of the speed-up over the matched control, with a
bootstrap interval over those pairs, and each domain's median) and the complete ``results`` of
the other budgets.

``optimal_loss`` (generated corpora only): each held-out domain's lowest achievable loss, the
entropy rate of its chain (:mod:`tarp_fast.data.generated`).

Per held-out domain: the curve ``[[step, loss, seconds]]`` at log-spaced and evenly spaced steps,
the target (the ``direct`` arm's final loss), each arm's final loss and its steps to the target
(the first evaluated step whose loss is at most the target, ``None`` if never). With several
seeds the curves are averaged step by step; per-seed figures are kept under ``per_seed``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn

from .. import mark_only_tarp_trainable, patch_model, tarp_parameters
from .._io import atomic_write, atomic_write_bytes
from ..data.corpus import Corpus
from ..data.sampling import DomainSplits, TaskSampler, dedup_eval_windows, random_windows, step_generator
from .finetune import FinetuneRecipe, NonFiniteLossError, RunProgress, finetune, train_lm
from .models import check_vocab, count_parameters, small_gpt2
from .prepare import PrepConfig, prepare

__all__ = ["ARMS", "OPTIONAL_ARMS", "MATCHED_CONTROLS", "PROTOCOLS", "BenchConfig", "multitask_prepare", "comparisons", "run_benchmark", "format_table", "plot_curves", "curves_figure",
           "steps_to_target", "tams_available", "pretrained_base", "base_cache_path", "validation_split", "budget_summary"]

ARMS = ("direct", "tarp", "multitask", "mltd_tarp", "multitask_tarp", "mltd_tarp_tams", "multitask_tarp_tams")
#: Arms that run only when asked for (``--arms``); see the table above.
OPTIONAL_ARMS = ("tarp_tams",)
_TAMS_ARMS = ("mltd_tarp_tams", "multitask_tarp_tams", "tarp_tams")
_FULL_ARMS = ("direct", "multitask")
#: each MLtD arm's matched control (the headline comparison)
MATCHED_CONTROLS = {"mltd_tarp": "multitask_tarp", "mltd_tarp_tams": "multitask_tarp_tams"}
#: fine-tuning protocols: adapter-only (the paper's meta-test) and every weight
PROTOCOLS = ("adapter", "all")


def tams_available() -> Optional[str]:
    """``None`` when ``tarp_fast.tams.add_tams`` can be imported, else the reason it cannot."""
    try:
        from ..tams import add_tams  # noqa: F401, PLC0415
    except Exception as exc:  # ImportError, or a partially written package raising at import
        return f"tarp_fast.tams.add_tams is not importable ({type(exc).__name__}: {exc})"
    return None


def _real(x) -> bool:
    """An int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _shown(v):
    """``v`` for an error message: a tuple as the list it was most likely written as."""
    return list(v) if isinstance(v, tuple) else v


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
    #: the fine-tuning protocols run and reported (each separately): "adapter" and/or "all"
    protocols: tuple = PROTOCOLS
    #: every seed pretrains its own base (seed ``base_seed + s``); False: one base for all seeds
    vary_base: bool = True
    #: TARP layers with the Hadamard term (``W ⊙ softplus(P Q + c)``; TARPLinear ``scale_weight``)
    scale_weight: bool = False
    #: multipliers of each arm's configured learning rate tried on the validation domain (module
    #: docstring); empty: off, every arm uses its configured learning rate
    lr_grid: tuple = ()
    #: the domain the learning rates are chosen on (neither preparation nor held out); ``None``
    #: with a grid: the last preparation domain, taken out of the preparation
    validation_domain: Optional[str] = None
    #: pretraining steps of the base, one whole benchmark per value; empty: ``pretrain_steps``
    base_budgets: tuple = ()

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
        # protocols first: the command line derives the default finetune_scope from them
        if not isinstance(self.protocols, (list, tuple)) or not self.protocols or \
                any(p not in PROTOCOLS for p in self.protocols) or len(set(self.protocols)) != len(self.protocols):
            raise ValueError(f"BenchConfig: argument 'protocols' ([bench] protocols) must be a non-empty list of "
                             f"distinct protocols of {PROTOCOLS}, got {_shown(self.protocols)!r}")
        self.protocols = tuple(self.protocols)
        if self.finetune_scope not in PROTOCOLS:
            raise ValueError(f"BenchConfig: argument 'finetune_scope' must be 'adapter' or 'all', got {self.finetune_scope!r}")
        if self.finetune_scope not in self.protocols:
            raise ValueError(f"BenchConfig: 'finetune_scope' ({self.finetune_scope!r}) must be one of 'protocols' "
                             f"{list(self.protocols)} (it fills the legacy keys 'domains' and 'per_seed')")
        grid = self.lr_grid
        if not isinstance(grid, (list, tuple)) or any(not _real(x) or not (math.isfinite(x) and x > 0) for x in grid) \
                or len(set(grid)) != len(grid):
            raise ValueError(f"BenchConfig: argument 'lr_grid' ([bench] lr_grid) must be a list of distinct positive "
                             f"numbers (multipliers of each arm's learning rate, e.g. [0.3, 1, 3]; empty: off), "
                             f"got {_shown(grid)!r}")
        self.lr_grid = tuple(float(x) for x in grid)
        val = self.validation_domain
        if val is not None and (not isinstance(val, str) or not val):
            raise ValueError(f"BenchConfig: argument 'validation_domain' ([bench] validation_domain) must be a domain "
                             f"name, got {val!r}")
        if val is not None and not self.lr_grid:
            raise ValueError(f"BenchConfig: argument 'validation_domain' ([bench] validation_domain) is {val!r} but "
                             "[bench] lr_grid is empty (argument 'lr_grid'): the validation domain only serves the "
                             "learning-rate grid; set [bench] lr_grid (e.g. [0.3, 1, 3]) or drop it")
        budgets = self.base_budgets
        if not isinstance(budgets, (list, tuple)) or \
                any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in budgets) or \
                len(set(budgets)) != len(budgets):
            raise ValueError(f"BenchConfig: argument 'base_budgets' ([bench] base_budgets) must be a list of distinct "
                             f"positive integers (pretraining steps, e.g. [300, 2000]; empty: one budget, "
                             f"'pretrain_steps' ([pretrain] steps)), got {_shown(budgets)!r}")
        self.base_budgets = tuple(budgets)
        if self.prep.seq_len != self.finetune.seq_len:
            raise ValueError(f"BenchConfig: prep.seq_len ({self.prep.seq_len}) must equal finetune.seq_len "
                             f"({self.finetune.seq_len})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prep"] = self.prep.to_dict()
        d["seeds"], d["arms"], d["protocols"] = list(self.seeds), list(self.arms), list(self.protocols)
        d["lr_grid"], d["base_budgets"] = list(self.lr_grid), list(self.base_budgets)
        return d


def _seed_base(cfg: BenchConfig, seed: int) -> int:
    """The seed of seed ``seed``'s base pretraining (``base_seed`` for seed 0)."""
    return cfg.base_seed + (int(seed) if cfg.vary_base else 0)


def _seed_init(cfg: BenchConfig, seed: int, slot: int) -> int:
    """The seed of seed ``seed``'s fresh adapter (slot 1) or TAMS (slot 2) initialization."""
    return cfg.base_seed + slot + 7919 * int(seed)


def steps_to_target(curve: Sequence[Sequence[float]], target: float) -> Optional[int]:
    """First evaluated step whose loss is ``<= target`` (with a 1e-9 slack), or ``None``."""
    for step, loss, _ in curve:
        if loss <= target + 1e-9:
            return int(step)
    return None


def _model_kw(cfg: BenchConfig, vocab: int) -> dict:
    return dict(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_positions=max(64, cfg.finetune.seq_len), vocab_size=vocab)


def base_cache_path(corpus: Corpus, cfg: BenchConfig, cache_dir: Optional[str], seed: int = 0) -> Optional[str]:
    """Where :func:`pretrained_base` caches the base of ``cfg`` (and benchmark seed ``seed``) on
    ``corpus`` (``None``: no cache).

    The key is a hash of the corpus fingerprint and every setting the base depends on.
    """
    if not cache_dir:
        return None
    key_src = json.dumps({"corpus": corpus.fingerprint(), "model": _model_kw(cfg, corpus.vocab_size),
                          "steps": cfg.pretrain_steps, "lr": cfg.pretrain_lr, "batch": cfg.pretrain_batch,
                          "seed": _seed_base(cfg, seed), "seq_len": cfg.finetune.seq_len, "v": 1}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"base-{key}", "model.safetensors")


def pretrained_base(corpus: Corpus, cfg: BenchConfig, *, cache_dir: Optional[str] = None, progress=False,
                    log: Optional[Callable[[dict], None]] = None, seed: int = 0) -> tuple:
    """``(model, seconds, cached)``: a small GPT-2 pretrained on ``corpus`` (the preparation domains).

    ``seed``: the benchmark seed; with ``cfg.vary_base`` the base is initialized and its batches
    drawn from ``cfg.base_seed + seed`` (seed 0: ``cfg.base_seed``).

    Cached in ``cache_dir`` under a key made of the corpus fingerprint and the settings, so the
    same data and settings give the same base without training again.
    """
    kw = _model_kw(cfg, corpus.vocab_size)
    vocab = kw.pop("vocab_size")
    bseed = _seed_base(cfg, seed)
    model = small_gpt2(vocab, seed=bseed, **kw)
    path = base_cache_path(corpus, cfg, cache_dir, seed)
    if path and os.path.isfile(path):
        from safetensors.torch import load_model  # noqa: PLC0415

        load_model(model, path)
        return model, 0.0, True
    sampler = TaskSampler(corpus, seq_len=cfg.finetune.seq_len, seed=bseed + 99_991)
    t0 = time.perf_counter()
    train_lm(model, lambda s: sampler.mixed_batch_at(s, cfg.pretrain_batch)[0], cfg.pretrain_steps,
             lr=cfg.pretrain_lr, warmup=max(1, cfg.pretrain_steps // 20), progress=progress,
             desc="pretrain base" + (f" (seed {seed})" if cfg.vary_base and seed else ""),
             log=log)
    seconds = time.perf_counter() - t0
    if path:
        from .models import save_base_model  # noqa: PLC0415

        save_base_model(model, os.path.dirname(path))
    return model, seconds, False


def _adapter_model(base: nn.Module, cfg: BenchConfig, seed: int = 0) -> nn.Module:
    m = copy.deepcopy(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_init(cfg, seed, 1))  # same fresh TARP factors for every arm of a seed
        kw = {"scale_weight": True} if cfg.scale_weight else {}
        patch_model(m, rank=cfg.rank, variant=cfg.variant, **kw)
    return m


def _add_tams(model: nn.Module, cfg: BenchConfig, seed: int = 0) -> None:
    from ..tams import add_tams  # noqa: PLC0415

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_init(cfg, seed, 2))
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


def _dedup_eval(splits: DomainSplits, cfg: BenchConfig, name: str, reports: dict) -> torch.Tensor:
    """The evaluation stream of a held-out domain: its evaluation windows that share no 32-token
    shingle with its training split (:func:`~tarp_fast.data.sampling.dedup_eval_windows`),
    concatenated, so that ``finetune``'s evenly spaced windows are exactly those windows."""
    windows, report = dedup_eval_windows(splits.train, splits.eval, cfg.finetune.eval_windows, cfg.finetune.seq_len)
    reports[name] = report
    return windows.reshape(-1)


def multitask_prepare(model: nn.Module, sampler: TaskSampler, config: PrepConfig, *, tams: bool = False,
                      progress=None, on_step: Optional[Callable[[dict], None]] = None) -> dict:
    """The matched control of MLtD's :func:`prepare`: the same task batches, trained multitask.

    For each of ``config.meta_steps`` meta-batches ``sampler.batch_at(step)`` (the very batches
    :func:`prepare` draws from the same sampler), one AdamW step (``config.outer_lr``, no
    schedule, ``config.grad_clip``) on the mean loss over every support and query window of its
    ``T`` tasks, for every parameter of ``model`` (the parameters MLtD's outer step trains). With
    ``tams`` each task's architecture is sampled from the controller as in the preparation
    (same generator slot) and applied per sequence. Returns ``{"steps", "seconds", "losses"}``.
    """
    from .models import sequence_losses  # noqa: PLC0415

    params = [p for _, p in model.named_parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.outer_lr, weight_decay=0.0, foreach=False)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(config.meta_steps):
        batch = sampler.batch_at(step)
        T, L = batch.support.shape[0], batch.support.shape[-1]
        support = batch.support.reshape(T, -1, L)
        ids = torch.cat([support, batch.query], dim=1)  # [T, k*B + Bq, L]
        per_task = ids.shape[1]
        ctx = contextlib.nullcontext()
        if tams:
            from ..tams import task_embeddings, use_architecture  # noqa: PLC0415

            with torch.no_grad():
                emb = task_embeddings(model, [x for x in support])
            arch = model.tams_controller.sample(emb, step=step, generator=step_generator(config.seed, step, 31))
            ctx = use_architecture(model, arch, task_index=torch.arange(T).repeat_interleave(per_task))
        with ctx:
            loss = sequence_losses(model, ids.reshape(T * per_task, L)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"multitask_prepare: non-finite loss at step {step}")
        if on_step is not None:
            on_step({"step": step, "loss": losses[-1]})
    return {"steps": config.meta_steps, "seconds": time.perf_counter() - t0, "losses": losses}


def validation_split(corpus: Corpus, heldout: Sequence[str], cfg: BenchConfig) -> tuple[Optional[str], str]:
    """``(name, source)`` of the validation domain the learning rates are chosen on (``None``
    when ``cfg.lr_grid`` is empty); ``source`` says where it came from. Errors name the key."""
    if not cfg.lr_grid:
        return None, ""
    heldout = list(heldout)
    if cfg.validation_domain is not None:
        name = cfg.validation_domain
        if name not in corpus:
            raise ValueError(f"[bench] validation_domain {name!r} is not a domain of the corpus "
                             f"(domains: {', '.join(corpus.names)})")
        if name in heldout:
            raise ValueError(f"[bench] validation_domain {name!r} is also held out (held out: {', '.join(heldout)}); "
                             "it must be neither a preparation nor a held-out domain")
        source = "[bench] validation_domain (left out of the preparation)"
    else:
        rest = [n for n in corpus.names if n not in heldout]
        if not rest:
            raise ValueError("[bench] lr_grid: no domain is left for validation (every domain is held out)")
        name = rest[-1]
        source = ("the last preparation domain, taken out of the preparation: the default; [bench] "
                  "validation_domain chooses another")
    left = [n for n in corpus.names if n not in heldout and n != name]
    if len(left) < 2:
        raise ValueError(f"[bench] lr_grid: taking the validation domain {name!r} out leaves {len(left)} preparation "
                         f"domain(s) ({', '.join(left) or 'none'}); the benchmark needs at least 2 (add domains or "
                         "hold out fewer)")
    return name, source


def run_benchmark(
    corpus: Corpus,
    heldout: Sequence[str],
    cfg: BenchConfig,
    *,
    cache_dir: Optional[str] = None,
    progress=False,
    log: Optional[Callable[[dict], None]] = None,
    work_dir: Optional[str] = None,
    base_model: Optional[nn.Module] = None,
) -> dict:
    """Run every arm of ``cfg.arms`` on every held-out domain for every seed; return the JSON dict.

    ``corpus`` holds the preparation domains and the held-out ones (``heldout`` names); the
    held-out domains are never seen before their fine-tuning. ``work_dir`` keeps the JSONL logs
    and checkpoints of the preparation runs. ``base_model``: start every arm from this model (a
    local checkpoint, see :func:`tarp_fast.meta.models.load_base_model`; it is not modified)
    instead of pretraining the small GPT-2 of ``cfg``. ``progress``: ``True`` (bars on a
    terminal, plain lines otherwise) or a :class:`~tarp_fast.meta.finetune.RunProgress`; every
    phase is announced as "[k/N] ..." with an estimate of the time left in the whole run.

    With ``cfg.lr_grid`` the learning rates are first chosen per arm on the validation domain
    (:func:`validation_split`); with ``cfg.base_budgets`` the whole benchmark runs once per
    pretraining budget (module docstring: ``lr_selection``, ``by_base_budget``).
    """
    log = log or (lambda rec: None)
    validation, _ = validation_split(corpus, heldout, cfg)  # checked before anything runs
    budgets = list(cfg.base_budgets) or [cfg.pretrain_steps]
    if cfg.base_budgets and base_model is not None:
        raise ValueError("run_benchmark: 'base_budgets' ([bench] base_budgets) are pretraining budgets of the small "
                         "GPT-2; with a given 'base_model' (--model) there is nothing to pretrain: drop one of them")
    subs = [replace(cfg, pretrain_steps=b, base_budgets=()) for b in budgets]
    if progress is True:
        progress = RunProgress()
    if isinstance(progress, RunProgress):
        prep_corpus = corpus.split_heldout([*heldout, *([validation] if validation else [])])[0]
        arms = [a for a in cfg.arms if not (a in _TAMS_ARMS and tams_available() is not None)]
        for sub in subs:
            pretrain_seeds = [] if base_model is not None else [
                s for s in (sub.seeds if sub.vary_base else sub.seeds[:1])
                if not (cache_dir and os.path.isfile(base_cache_path(prep_corpus, sub, cache_dir, s)))]
            for phase in _phase_plan(sub, arms, list(heldout), pretrain_seeds=pretrain_seeds):
                progress.add(*phase)
    t_all = time.perf_counter()
    results = []
    for b, sub in zip(budgets, subs):
        sub_dir = work_dir
        if len(subs) > 1:
            log({"phase": "base_budget", "pretrain_steps": b})
            if work_dir:  # each budget's preparation logs apart
                sub_dir = os.path.join(work_dir, f"budget{b}")
                os.makedirs(sub_dir, exist_ok=True)
        results.append(_run_budget(corpus, heldout, sub, cache_dir=cache_dir, progress=progress, log=log,
                                   work_dir=sub_dir, base_model=base_model))
    out = results[0]
    if cfg.base_budgets:
        out["settings"] = replace(cfg, pretrain_steps=budgets[0]).to_dict()
        out["by_base_budget"] = {
            "budgets": budgets,
            "what": "the whole benchmark once per pretraining budget of the base; the top-level keys are the first "
                    "budget's",
            "summary": budget_summary(results, budgets),
            "seconds": {str(b): r["total_seconds"] for b, r in zip(budgets, results)},
            "total_seconds": time.perf_counter() - t_all,
            "results": {str(b): r for b, r in zip(budgets[1:], results[1:])},
        }
    return out


def budget_summary(results: Sequence[dict], budgets: Sequence[int], *, seed: int = 0) -> list[dict]:
    """How the headline effect changes with the base's pretraining budget: one entry per budget,
    protocol and MLtD arm with the median, over every (held-out domain, seed) pair of its matched
    comparisons, of the per-seed speed-up over the matched control (control steps / arm steps,
    censored at budget + 1), a bootstrap 95% interval resampling those pairs (seeded with
    ``seed``), each domain's median, and the censored counts."""
    from .stats import bootstrap_ci, median  # noqa: PLC0415

    out = []
    for b, res in zip(budgets, results):
        groups: dict[tuple, list[dict]] = {}
        for c in res.get("comparisons", []):
            if c.get("matched"):
                groups.setdefault((c["protocol"], c["arm"], c["control"]), []).append(c)
        for (protocol, arm, control), comps in groups.items():
            pairs = [x for c in comps for x in c["speedup_per_seed"]]
            out.append({"pretrain_steps": int(b), "protocol": protocol, "arm": arm, "control": control,
                        "speedup_median": median(pairs), "speedup_ci95": bootstrap_ci(pairs, seed=seed),
                        "pairs": len(pairs), "per_domain": {c["domain"]: c["speedup_median"] for c in comps},
                        "censored_arm": sum(c["censored_arm"] for c in comps),
                        "censored_control": sum(c["censored_control"] for c in comps),
                        "final_loss_arm": sum(c["final_loss_arm"] for c in comps) / len(comps),
                        "final_loss_control": sum(c["final_loss_control"] for c in comps) / len(comps)})
    return out


def _finetune_arm(starts: dict, arm: str, protocol: str, train: torch.Tensor, eval_stream: torch.Tensor,
                  archs: dict, cfg: BenchConfig, seed: int, *, mult: float = 1.0, progress=False,
                  desc: str = "") -> list:
    """The curve of ``arm`` fine-tuned under ``protocol`` from a copy of ``starts[arm]``, with
    its configured learning rates times ``mult``."""
    model = copy.deepcopy(starts[arm])
    ctx = None
    if arm in _FULL_ARMS:
        params, lr = list(model.parameters()), cfg.full_lr * mult
    else:
        mark_only_tarp_trainable(model)
        params, lr = tarp_parameters(model), cfg.adapter_lr * mult
        if protocol == "all":
            adapter_ids = {id(p) for p in params}
            rest = [p for p in model.parameters() if id(p) not in adapter_ids]
            params = [{"params": params, "lr": cfg.adapter_lr * mult}, {"params": rest, "lr": cfg.full_lr * mult}]
        if arm in archs:
            from ..tams import use_architecture  # noqa: PLC0415

            ctx = (lambda model=model, arch=archs[arm]: use_architecture(model, arch))
    return finetune(model, params, train, eval_stream, cfg.finetune, seed=seed, lr=lr, progress=progress, desc=desc,
                    context=ctx)


def _deploy(starts: dict, arms: Sequence[str], train: torch.Tensor, cfg: BenchConfig, seed: int) -> dict:
    """The TAMS architectures of the TAMS arms for one domain and seed, deployed from the same
    16 support windows of ``train``."""
    archs: dict[str, object] = {}
    support = random_windows(train, 16, cfg.finetune.seq_len, step_generator(seed, 0, 77))
    for arm in ("mltd_tarp_tams", "multitask_tarp_tams", "tarp_tams"):
        if arm not in arms:
            continue
        if arm == "tarp_tams" and "mltd_tarp_tams" in archs:
            archs[arm] = archs["mltd_tarp_tams"]  # only the preparation differs
        else:
            archs[arm] = _tams_context(starts[arm], support)[1]
    return archs


def _lr_configured(cfg: BenchConfig, arm: str, protocol: str, mult: float) -> dict:
    if arm in _FULL_ARMS:
        return {"full": cfg.full_lr * mult}
    out = {"adapter": cfg.adapter_lr * mult}
    if protocol == "all":
        out["rest"] = cfg.full_lr * mult
    return out


def _select_lrs(starts: dict, arms: Sequence[str], domain, cfg: BenchConfig, seed: int, *, progress, log) -> dict:
    """Per protocol and arm: fine-tune once per value of ``cfg.lr_grid`` on the validation
    ``domain`` and keep the multiplier with the lowest final validation loss (ties: the first in
    the grid). A run whose loss turns non-finite counts as diverged (loss ``None``, never chosen).
    Returns ``{protocol: {arm: {"final_loss", "chosen_multiplier", "chosen_lr"}}}``."""
    splits = DomainSplits.of(domain.tokens, eval_fraction=cfg.finetune.eval_fraction)
    eval_stream = _dedup_eval(splits, cfg, domain.name, {})
    archs = _deploy(starts, arms, splits.train, cfg, seed)
    out: dict[str, dict] = {}
    shared: dict[str, dict] = {}
    for protocol in cfg.protocols:
        out[protocol] = {}
        for arm in arms:
            if arm in _FULL_ARMS and arm in shared:
                out[protocol][arm] = shared[arm]
                continue
            losses: list[Optional[float]] = []
            for mult in cfg.lr_grid:
                desc = (f"lr grid x{mult:g}: {arm} on {domain.name} (seed {seed})"
                        + ("" if arm in _FULL_ARMS else f" [{protocol}]"))
                try:
                    curve = _finetune_arm(starts, arm, protocol, splits.train, eval_stream, archs, cfg, seed, mult=mult,
                                          progress=progress, desc=desc)
                    losses.append(curve[-1][1])
                except NonFiniteLossError:
                    losses.append(None)
                log({"phase": "lr_grid", "arm": arm, "protocol": protocol, "domain": domain.name, "seed": seed,
                     "multiplier": mult, "final_loss": losses[-1]})
            finite = [(loss, i) for i, loss in enumerate(losses) if loss is not None]
            # every value diverged: keep the configured rate (x1), so the held-out runs say so themselves
            best = cfg.lr_grid[min(finite)[1]] if finite else 1.0
            out[protocol][arm] = {"final_loss": losses, "chosen_multiplier": best,
                                  "chosen_lr": _lr_configured(cfg, arm, protocol, best)}
            if arm in _FULL_ARMS:
                shared[arm] = out[protocol][arm]
    return out


def _run_budget(
    corpus: Corpus,
    heldout: Sequence[str],
    cfg: BenchConfig,
    *,
    cache_dir: Optional[str],
    progress,
    log: Callable[[dict], None],
    work_dir: Optional[str],
    base_model: Optional[nn.Module],
) -> dict:
    """:func:`run_benchmark` for one pretraining budget (``cfg.pretrain_steps``); ``progress``
    already holds the plan of the whole run."""
    validation, validation_source = validation_split(corpus, heldout, cfg)
    prep_corpus, _ = corpus.split_heldout([*heldout, *([validation] if validation else [])])
    _, held_corpus = corpus.split_heldout(heldout)
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
        log({"phase": "pretrain", "seconds": 0.0, "given": True})
    pc = cfg.prep
    protocols = list(cfg.protocols)
    per_seed: dict[str, dict[str, dict]] = {p: {} for p in protocols}
    prep_cost: dict[str, list[float]] = {}
    pre_cost: list[float] = []
    arch_reports: dict[str, dict] = {}
    eval_dedup: dict[str, dict] = {}
    sizes: dict = {}
    lr_choice: Optional[dict] = None
    base = None
    for seed in cfg.seeds:
        if base_model is not None:
            base = base_model
        elif base is None or cfg.vary_base:
            base, seconds, cached = pretrained_base(prep_corpus, cfg, cache_dir=cache_dir, progress=progress, log=log,
                                                    seed=seed)
            pre_cost.append(seconds)
            log({"phase": "pretrain", "seed": seed, "seconds": seconds, "cached": cached})
        sizes["model_parameters"] = count_parameters(base.parameters())
        starts: dict[str, nn.Module] = {}
        starts["direct"] = base
        if "tarp" in arms:
            starts["tarp"] = _adapter_model(base, cfg, seed)
            sizes["adapter_parameters"] = count_parameters(tarp_parameters(starts["tarp"]))
        if "tarp_tams" in arms:
            starts["tarp_tams"] = _adapter_model(base, cfg, seed)
            _add_tams(starts["tarp_tams"], cfg, seed)
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
        for arm, with_tams, meta in (("mltd_tarp", False, True), ("multitask_tarp", False, False),
                                     ("mltd_tarp_tams", True, True), ("multitask_tarp_tams", True, False)):
            if arm not in arms:
                continue
            m = _adapter_model(base, cfg, seed)
            if with_tams:
                _add_tams(m, cfg, seed)
            seed_cfg = PrepConfig(**{**pc.to_dict(), "seed": pc.seed + seed})
            # the matched control draws the very task batches of its MLtD arm (same sampler and seed)
            sampler = TaskSampler(prep_corpus, tasks_per_batch=pc.tasks_per_batch, inner_steps=max(pc.inner_steps, 1),
                                  batch_size=pc.batch_size, query_batch_size=pc.query_batch_size, seq_len=pc.seq_len,
                                  seed=seed_cfg.seed)
            log_path = os.path.join(work_dir, f"prepare-{arm}-seed{seed}.jsonl") if work_dir and meta else None
            phase = (progress.phase(f"{'prepare' if meta else 'matched control'} {arm} (seed {seed})", pc.meta_steps,
                                    kind="prepare") if isinstance(progress, RunProgress) else None)

            def on_step(rec, arm=arm, phase=phase):
                log({"phase": f"prepare:{arm}", **rec})
                if phase is not None:
                    phase.update(1, loss=float(rec.get("query_loss", rec.get("loss", float("nan")))))

            if meta:
                res = prepare(m, sampler, seed_cfg, tams=with_tams, log_path=log_path,
                              progress=bool(progress) and phase is None, on_step=on_step)
            else:
                res = multitask_prepare(m, sampler, seed_cfg, tams=with_tams, on_step=on_step)
            if phase is not None:
                phase.close()
            prep_cost.setdefault(arm, []).append(res["seconds"])
            starts[arm] = m
        if cfg.lr_grid and lr_choice is None:
            # chosen once, with the first seed's starting points, and used for every seed
            lr_choice = _select_lrs(starts, arms, corpus[validation], cfg, seed, progress=progress, log=log)
        for name in held_corpus.names:
            splits = DomainSplits.of(held_corpus[name].tokens, eval_fraction=cfg.finetune.eval_fraction)
            eval_stream = _dedup_eval(splits, cfg, name, eval_dedup)
            # architectures, deployed once per domain and seed from the same support windows
            archs = _deploy(starts, arms, splits.train, cfg, seed)
            for arm, arch in archs.items():
                from ..tams import architecture_report  # noqa: PLC0415

                key = f"{name}/seed{seed}" if arm == "mltd_tarp_tams" else f"{arm}:{name}/seed{seed}"
                arch_reports[key] = architecture_report(arch, log=False)
                sizes.setdefault("tams_active_cell_parameters", {})[key] = _active_cell_parameters(starts[arm], arch)
            shared: dict[str, list] = {}  # full-weight arms: the same run under every protocol
            for protocol in protocols:
                curves: dict[str, list] = {}
                for arm in arms:
                    if arm in _FULL_ARMS and arm in shared:
                        curves[arm] = shared[arm]
                        continue
                    mult = lr_choice[protocol][arm]["chosen_multiplier"] if lr_choice else 1.0
                    desc = f"{arm} on {name} (seed {seed})" + ("" if arm in _FULL_ARMS else f" [{protocol}]")
                    curves[arm] = _finetune_arm(starts, arm, protocol, splits.train, eval_stream, archs, cfg, seed,
                                                mult=mult, progress=progress, desc=desc)
                    if arm in _FULL_ARMS:
                        shared[arm] = curves[arm]
                    log({"phase": "finetune", "arm": arm, "domain": name, "seed": seed, "protocol": protocol,
                         "curve": curves[arm]})
                target = curves["direct"][-1][1]
                per_seed[protocol].setdefault(str(seed), {})[name] = {"target_loss": target, "methods": {
                    arm: {"curve": c, "final_loss": c[-1][1], "steps_to_target": steps_to_target(c, target)}
                    for arm, c in curves.items()}}
    legacy = cfg.finetune_scope
    out = {"domains": _average(per_seed[legacy], held_corpus.names, arms)}
    out["per_seed"] = per_seed[legacy]
    out["protocol"] = legacy
    out["protocols"] = {p: {"domains": _average(per_seed[p], held_corpus.names, arms), "per_seed": per_seed[p]}
                        for p in protocols}
    out["comparisons"] = comparisons(out)
    out["eval_dedup"] = eval_dedup
    out["unavailable"] = unavailable
    out["preparation_seconds"] = {k: sum(v) / len(v) for k, v in prep_cost.items()}
    out["pretrain_seconds"] = sum(pre_cost) / len(pre_cost) if pre_cost else 0.0
    out["base_model"] = ("given: " + type(base).__name__) if base_model is not None else "small GPT-2 pretrained here"
    out["seed_varies"] = {"base_pretraining": base_model is None and cfg.vary_base, "adapter_init": True,
                          "tams_init": True, "preparation_batches": True, "finetune_batch_order": True,
                          "eval_windows": False}
    out["optimizers"] = {
        "inner_loop": f"{pc.inner_optimizer} (lr {pc.inner_lr}, {pc.inner_steps} step(s), {pc.algorithm})",
        "outer_loop": f"AdamW (lr {pc.outer_lr}, no schedule, grad clip {pc.grad_clip})",
        "matched_controls": f"AdamW (lr {pc.outer_lr}, no schedule, grad clip {pc.grad_clip}), one step per meta-batch",
        "meta_test": (f"AdamW, constant lr (adapter {cfg.adapter_lr}, full weights {cfg.full_lr}), "
                      f"weight decay {cfg.finetune.weight_decay}, grad clip {cfg.finetune.grad_clip}, "
                      f"{cfg.finetune.steps} steps of {cfg.finetune.batch_size} windows"
                      + (", each arm's rates times its multiplier chosen in lr_selection" if lr_choice else ""))}
    out["lr_selection"] = None if not lr_choice else {
        "grid": list(cfg.lr_grid), "validation_domain": validation, "validation_domain_source": validation_source,
        "seed": int(cfg.seeds[0]),
        "how": ("each arm fine-tuned once per multiplier of its configured learning rate(s) on the validation domain, "
                "protocol by protocol, with the first seed only (its base, preparation and batch order); the "
                "multiplier with the lowest final validation loss is used for every held-out domain and seed; "
                "final_loss None: diverged"),
        "configured_lr": {"adapter_lr": cfg.adapter_lr, "full_lr": cfg.full_lr},
        "protocols": lr_choice}
    out["total_seconds"] = time.perf_counter() - t_all
    out["sizes"] = sizes
    out["settings"] = cfg.to_dict()
    out["heldout"] = list(held_corpus.names)
    out["preparation_domains"] = list(prep_corpus.names)
    out["corpus"] = {"source": corpus.source, "fingerprint": corpus.fingerprint()}
    known = {n: held_corpus[n].optimal_loss for n in held_corpus.names if held_corpus[n].optimal_loss is not None}
    if known:  # generated domains: the lowest achievable loss (entropy rate), to read the losses against
        out["optimal_loss"] = known
    if arch_reports:
        out["tams_architectures"] = arch_reports
    out["goal"] = goal_summary(out)
    return out


def _phase_plan(cfg: BenchConfig, arms: Sequence[str], heldout: Sequence[str], *,
                pretrain_seeds: Sequence[int]) -> list[tuple]:
    """``(kind, steps, windows per step)`` of every phase :func:`run_benchmark` will run, in order
    (the cost of a step: the windows it processes; TAMS steps count double). ``pretrain_seeds``:
    the seeds whose base is pretrained here (not cached, not given), in the order of ``cfg.seeds``;
    each is pretrained at the start of its seed's phases, as :func:`_run_budget` runs them."""
    pc, ft = cfg.prep, cfg.finetune
    plan: list[tuple] = []
    pending = list(pretrain_seeds)
    for seed in cfg.seeds:
        if pending and pending[0] == seed:
            pending.pop(0)
            plan.append(("pretrain", cfg.pretrain_steps, cfg.pretrain_batch))
        if "multitask" in arms:
            windows = pc.tasks_per_batch * (pc.inner_steps * pc.batch_size + pc.query_batch_size)
            batch = pc.tasks_per_batch * pc.batch_size
            plan.append(("train", max(1, round(pc.meta_steps * windows / batch)), batch))
        for arm in ("mltd_tarp", "multitask_tarp", "mltd_tarp_tams", "multitask_tarp_tams"):
            if arm in arms:
                windows = pc.tasks_per_batch * (max(pc.inner_steps, 1) * pc.batch_size + pc.query_batch_size)
                plan.append(("prepare", pc.meta_steps, windows * (2 if arm in _TAMS_ARMS else 1)))
        for _name in ([None] if cfg.lr_grid and seed == cfg.seeds[0] else []):  # the grid, on the validation domain
            for protocol in cfg.protocols:
                for arm in arms:
                    if arm in _FULL_ARMS and protocol != cfg.protocols[0]:
                        continue
                    plan += [("finetune", ft.steps, ft.batch_size * (2 if arm in _TAMS_ARMS else 1))] * len(cfg.lr_grid)
        for _name in heldout:
            for protocol in cfg.protocols:
                for arm in arms:
                    if arm in _FULL_ARMS and protocol != cfg.protocols[0]:
                        continue  # run once, shared by the protocols
                    plan.append(("finetune", ft.steps, ft.batch_size * (2 if arm in _TAMS_ARMS else 1)))
    return plan


def comparisons(result: dict, *, seed: int = 0) -> list[dict]:
    """The paired comparisons of ``result`` (:mod:`tarp_fast.meta.stats`): one entry per
    (domain, protocol, MLtD arm, control), for every control run among its matched control,
    ``multitask``, ``tarp`` and ``direct`` (``"matched": true`` marks the headline one). Every
    seed's target is the ``direct`` arm's final loss of that seed; the bootstrap is seeded with
    ``seed``."""
    from .stats import compare_pair  # noqa: PLC0415

    out = []
    for protocol, pres in result["protocols"].items():
        per_seed = pres["per_seed"]
        seeds = list(per_seed)
        for name in pres["domains"]:
            methods = pres["domains"][name]["methods"]
            for arm in ("mltd_tarp", "mltd_tarp_tams"):
                if arm not in methods:
                    continue
                for control in (MATCHED_CONTROLS[arm], "multitask", "tarp", "direct"):
                    if control not in methods:
                        continue
                    runs = [per_seed[s][name] for s in seeds]
                    stats = compare_pair([r["methods"][arm]["curve"] for r in runs],
                                         [r["methods"][control]["curve"] for r in runs],
                                         [r["target_loss"] for r in runs], seed=seed)
                    entry = {"domain": name, "protocol": protocol, "arm": arm, "control": control,
                             "matched": control == MATCHED_CONTROLS[arm], "seeds": [int(s) for s in seeds],
                             "control_protocol": "all" if control in _FULL_ARMS else protocol,
                             "target": "direct arm's final loss (per seed)",
                             "censoring": "a run that never reaches the target counts as budget + 1 steps",
                             **stats}
                    out.append(entry)
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
    if result.get("protocol"):
        lines.append(f"fine-tuning protocol of this table: {result['protocol']} "
                     "(adapter: only the adapter arms' adapters train; all: every weight)")
    prep = result.get("preparation_seconds", {})
    head = f"{'domain':<12} {'arm':<20} {'loss@0':>8} {'final':>8} {'target':>8} {'steps→target':>13} {'ft s':>7} {'prep s':>7}"
    lines.append(head)
    lines.append("-" * len(head))
    for name, d in result["domains"].items():
        for arm, m in d["methods"].items():
            c = m["curve"]
            lines.append(f"{name:<12} {arm:<20} {c[0][1]:>8.4f} {m['final_loss']:>8.4f} {d['target_loss']:>8.4f} "
                         f"{_fmt_steps(m['steps_to_target']):>13} {c[-1][2]:>7.1f} {prep.get(arm, 0.0):>7.1f}")
        for arm, why in result.get("unavailable", {}).items():
            lines.append(f"{name:<12} {arm:<20} unavailable: {why}")
    comps = result.get("comparisons") or []
    if comps:
        lines.append("")
        lines.append("speed-up in steps to the target (control steps / arm steps): median over seeds "
                     "[paired bootstrap 95% interval]; a run that never reaches the target counts as budget + 1 steps "
                     "(cens a/c: seeds censored for the arm / the control); AUC: mean loss over the run")
        head = (f"{'domain':<12} {'protocol':<8} {'arm':<15} {'control':<21} {'speed-up':>8} {'95% interval':>16} "
                f"{'cens a/c':>8} {'AUC arm':>8} {'AUC ctl':>8} {'final arm':>9} {'final ctl':>9}")
        lines.append(head)
        lines.append("-" * len(head))
        for c in comps:
            lo, hi = c["speedup_ci95"]
            mark = "*" if c.get("matched") else " "
            lines.append(f"{c['domain']:<12} {c['protocol']:<8} {c['arm']:<15} {mark}{c['control']:<20} "
                         f"{c['speedup_median']:>7.2f}x {f'[{lo:.2f}, {hi:.2f}]':>16} "
                         f"{c['censored_arm']:>3}/{c['censored_control']:<4} {c['auc_arm']:>8.4f} {c['auc_control']:>8.4f} "
                         f"{c['final_loss_arm']:>9.4f} {c['final_loss_control']:>9.4f}")
        lines.append("* matched control (same modules, trainable parameters, data and compute, trained multitask): "
                     "the headline comparison")
    if result.get("optimal_loss"):
        lines += ["", "optimal loss (the entropy rate of each generated held-out domain: no model can go lower): "
                  + ", ".join(f"{n} {v:.4f}" for n, v in result["optimal_loss"].items())]
    lines += _lr_selection_lines(result.get("lr_selection"))
    lines += _budget_lines(result.get("by_base_budget"))
    return "\n".join(lines)


def _lr_selection_lines(sel: Optional[dict]) -> list[str]:
    """The table's lines about the learning-rate grid (none when it was off)."""
    if not sel:
        return []
    grid = "/".join(f"x{m:g}" for m in sel["grid"])
    lines = ["", f"learning rates chosen on the validation domain {sel['validation_domain']} "
                 f"({sel['validation_domain_source']}); grid {grid} of each arm's configured rate, seed "
                 f"{sel['seed']} only, lowest final validation loss (final losses in grid order; -: diverged):"]
    for protocol, by_arm in sel["protocols"].items():
        parts = []
        for arm, r in by_arm.items():
            losses = "/".join("-" if x is None else f"{x:.3f}" for x in r["final_loss"])
            parts.append(f"{arm} x{r['chosen_multiplier']:g} ({losses})")
        lines.append(f"  [{protocol}] " + ", ".join(parts))
    return lines


def _budget_lines(by: Optional[dict]) -> list[str]:
    """The short table of the effect against the base's pretraining budget (none with one budget)."""
    if not by:
        return []
    budgets = by["budgets"]
    rows: dict[tuple, dict] = {}
    for e in by["summary"]:
        rows.setdefault((e["protocol"], e["arm"], e["control"]), {})[e["pretrain_steps"]] = e
    lines = ["", "effect against the base's pretraining budget: median speed-up of each MLtD arm over its matched "
                 "control, over every (held-out domain, seed) pair [bootstrap 95% interval over the pairs]"]
    head = f"{'protocol':<8} {'arm':<15} {'matched control':<20}" + "".join(
        f" {f'{b} pretrain steps':>26}" for b in budgets)
    lines += [head, "-" * len(head)]
    for (protocol, arm, control), by_b in rows.items():
        cells = []
        for b in budgets:
            e = by_b.get(b)
            cells.append(f" {'-':>26}" if e is None else
                         f" {e['speedup_median']:>6.2f}x [{e['speedup_ci95'][0]:.2f}, {e['speedup_ci95'][1]:.2f}]".rjust(27))
        lines.append(f"{protocol:<8} {arm:<15} {control:<20}" + "".join(cells))
    return lines


def curves_figure(result: dict):
    """The matplotlib figure of :func:`plot_curves`: one panel per held-out domain, one row per
    fine-tuning protocol (``result["protocols"]``).

    Each line is the mean over the seeds of that protocol's ``per_seed`` (said in the title), with the
    band between the seeds' lowest and highest loss at each step when there are several; a
    dotted vertical line marks each arm's steps to the target (the legend gives the number).
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(result["domains"])
    views = [(p, v["domains"], v["per_seed"]) for p, v in result.get("protocols", {}).items()] or [
        (result.get("protocol"), result["domains"], result.get("per_seed", {}))]
    fig, axes = plt.subplots(len(views), len(names), figsize=(5.5 * len(names), 4.2 * len(views)), squeeze=False)
    panels = [(ax, name, protocol, domains, per_seed) for row, (protocol, domains, per_seed) in zip(axes, views)
              for ax, name in zip(row, names)]
    for ax, name, protocol, domains, per_seed in panels:
        seeds = list(per_seed)
        d = domains[name]
        for arm, m in d["methods"].items():
            xs = [p[0] for p in m["curve"]]
            ys = [p[1] for p in m["curve"]]
            s = m["steps_to_target"]
            (line,) = ax.plot(xs, ys, marker=".", label=f"{arm} (target at {'never' if s is None else s})")
            runs = [per_seed[k][name]["methods"][arm]["curve"] for k in seeds
                    if arm in per_seed[k].get(name, {}).get("methods", {})]
            if len(runs) > 1 and all(len(r) == len(xs) for r in runs):
                lo = [min(r[i][1] for r in runs) for i in range(len(xs))]
                hi = [max(r[i][1] for r in runs) for i in range(len(xs))]
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            if s is not None:
                ax.axvline(s, color=line.get_color(), linestyle=":", linewidth=1)
        ax.axhline(d["target_loss"], color="gray", linestyle="--", linewidth=1, label="target (direct final loss)")
        what = (f"mean of {len(seeds)} seeds (band: min-max over seeds)" if len(seeds) > 1
                else f"seed {seeds[0]}" if seeds else "")
        proto = f", fine-tuning: {protocol}" if protocol else ""
        ax.set_title(f"held-out: {name}{proto}\n{what}; dotted: steps to target", fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("eval loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(result: dict, path: str) -> str:
    """PNG of loss against fine-tuning steps (:func:`curves_figure`; matplotlib, Agg)."""
    return save_figure(curves_figure(result), path)


def save_figure(fig, path: str) -> str:
    """Write ``fig`` to the PNG ``path`` atomically (:func:`tarp_fast._io.atomic_write`) and close it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415  (after the figure's module chose the Agg backend)

    # format given: the temporary's name ends in .tmp, from which matplotlib cannot tell the format
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_json(result: dict, path: str) -> str:
    """Write ``result`` as JSON atomically (NaN is not valid JSON: refuse it)."""
    text = json.dumps(result, indent=1, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())
    return path
