"""The adapter ablation (the paper's Table 6 at a small scale): which TARP form adapts best?

Rows (:data:`ROWS`), each fine-tuned on the held-out domains with the same recipe and budget:

=======================  =====================================================================
``bilinear``             ``W + U V`` (LoRA's form), TARP layers
``bilinear+hadamard``    ``W ⊙ softplus(P Q + c) + U V`` (``scale_weight=True``)
``kronecker``            ``W + Σ_{i=1..4} H_i ⊗ (U_i V_i)`` (the paper's form, rank-r blocks)
``kronecker+hadamard``   with the Hadamard term
``dynamic``              ``W + U S(x) V`` (the input-dependent core)
``dynamic+hadamard``     with the Hadamard term
``full_finetune``        every weight of the base, no adapter (``full_lr``)
``peft_lora``            the PEFT library's LoRA on the same modules (``fan_in_fan_out``)
=======================  =====================================================================

The TARP rows are prepared with MLtD first (``prep.meta_steps`` meta-steps, 0: none), then only
their adapter is fine-tuned (the paper's meta-test, at ``adapter_lr``); ``peft_lora`` starts from
the base (PEFT has no preparation) and trains its LoRA factors at ``adapter_lr``;
``full_finetune`` trains every weight at ``full_lr``. The dynamic variant with a matrix product
in place of the Hadamard product is not a form :class:`~tarp_fast.TARPLinear` has: it is listed
under ``not_run``.

**Parameter budgets.** Each adapter row gets the rank whose trainable adapter parameters are
closest to the budget (default: the ``bilinear`` row at ``cfg.rank``; the Hadamard term's
``scale_rank`` equals the rank); the ranks and counts are in the output (``ranks``,
``parameters``) and printed. Per ``[N, K]`` layer at rank ``r`` (:func:`layer_parameter_count`):
``bilinear`` ``r (N + K)``, ``kronecker`` ``n³ + r (N + K)`` (``n = 4``: ``H`` is ``[n, n, n]``,
the ``U_i``/``V_i`` together ``[N, r]``/``[r, K]``), ``dynamic`` ``r (N + K) + r² K``, and the
Hadamard term adds ``r (N + K)``. So at equal budget the ``kronecker`` row's rank is the
``bilinear`` one's or a little lower (its ``n³`` per layer are taken from ``U``/``V``).

**Seeds** vary the base's pretraining, the adapter initialization, the preparation's task
batches and the fine-tuning batches' order (as in :mod:`tarp_fast.meta.bench`). Per row: the
mean final loss and area under the curve with a bootstrap 95% interval of the mean over seeds,
and the median steps to the target (the ``full_finetune`` row's final loss of each seed;
never reached = budget + 1) with its interval.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn as nn

from .. import mark_only_tarp_trainable, patch_model, tarp_parameters
from ..data.corpus import Corpus
from ..data.sampling import DomainSplits, TaskSampler
from ..nn.linear import KRONECKER_N, TARPLinear, kronecker_factor_shapes
from ..patch import tarp_layers
from .bench import BenchConfig, _dedup_eval, _seed_init, pretrained_base, save_figure
from .finetune import finetune
from .models import count_parameters
from .prepare import PrepConfig, prepare
from .stats import bootstrap_ci, censored_steps, curve_auc, median

__all__ = ["ROWS", "NOT_RUN", "adapter_parameter_count", "layer_parameter_count", "matched_ranks", "run_ablation",
           "format_ablation", "plot_ablation"]

#: ``(key, kind, variant, scale_weight)``
ROWS = (("bilinear", "tarp", "bilinear", False), ("bilinear+hadamard", "tarp", "bilinear", True),
        ("kronecker", "tarp", "kronecker", False), ("kronecker+hadamard", "tarp", "kronecker", True),
        ("dynamic", "tarp", "dynamic", False), ("dynamic+hadamard", "tarp", "dynamic", True),
        ("full_finetune", "full", None, False), ("peft_lora", "lora", None, False))
NOT_RUN = {"dynamic+matmul": "a matrix product in place of the Hadamard product is not a TARPLinear form "
                             "(it needs a new variant in tarp_fast.nn / tarp_fast.ops)"}


def _layer_shapes(base: nn.Module) -> list[tuple[int, int]]:
    """``(in, out)`` of every layer :func:`patch_model` targets in ``base``."""
    m = copy.deepcopy(base)
    patch_model(m, rank=1, variant="bilinear")
    return [(layer.in_features, layer.out_features) for layer in tarp_layers(m).values()]


def layer_parameter_count(in_features: int, out_features: int, variant: str, rank: int, scale_weight: bool) -> int:
    """Trainable TARP parameters of one ``[N, K] = [out_features, in_features]`` layer at rank ``r``
    (``scale_rank = r``), in closed form::

        bilinear   r (N + K)                U [N, r], V [r, K]
        dynamic    r (N + K) + r² K         and G [r², K]
        kronecker  n³ + r (N + K)           H [n, n, n], U_i [N/n, r] and V_i [r, K/n] for i = 1..n
        + hadamard r (N + K)                P [N, r], Q [r, K]

    ``n = KRONECKER_N = 4``. :func:`adapter_parameter_count` counts the real layers' parameters;
    the tests hold the two equal.
    """
    N, K, r = out_features, in_features, rank
    if variant == "kronecker":
        kronecker_factor_shapes(K, N, r, who="layer_parameter_count")  # the divisibility ValueError
        n = KRONECKER_N
        count = n**3 + r * (N + K)
    elif variant == "bilinear":
        count = r * (N + K)
    elif variant == "dynamic":
        count = r * (N + K) + r * r * K
    else:
        raise ValueError(f"layer_parameter_count: argument 'variant' must be one of dynamic, bilinear, kronecker, "
                         f"got {variant!r}")
    return count + (r * (N + K) if scale_weight else 0)


def adapter_parameter_count(shapes: Sequence[tuple[int, int]], variant: str, rank: int, scale_weight: bool) -> int:
    """Trainable TARP parameters of layers of ``shapes`` (``(in, out)`` pairs), counted on real
    layers built on the meta device (no memory); :func:`layer_parameter_count` is the formula."""
    total = 0
    with torch.device("meta"):
        for k, n in shapes:
            layer = TARPLinear(k, n, rank=rank, variant=variant, scale_weight=scale_weight)
            total += sum(p.numel() for _, p in layer.tarp_named_parameters())
    return total


def matched_ranks(shapes: Sequence[tuple[int, int]], budget: int, *, max_rank: int = 256) -> dict[str, dict]:
    """Per TARP row: the rank whose adapter parameters are closest to ``budget`` (ties: the smaller)."""
    out = {}
    for key, kind, variant, sw in ROWS:
        if kind != "tarp":
            continue
        best = None
        for r in range(1, max_rank + 1):
            n = adapter_parameter_count(shapes, variant, r, sw)
            if best is None or abs(n - budget) < abs(best[1] - budget):
                best = (r, n)
            if n > budget:
                break
        out[key] = {"rank": best[0], "parameters": best[1]}
    return out


def _lora_model(base: nn.Module, rank: int, targets: Sequence[str], seed: int) -> tuple[nn.Module, list]:
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    m = copy.deepcopy(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = get_peft_model(m, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(targets),
                                         fan_in_fan_out=True, bias="none"))
    params = [p for n, p in m.named_parameters() if "lora_" in n]
    return m, params


def run_ablation(corpus: Corpus, heldout: Sequence[str], cfg: BenchConfig, *, rows: Optional[Sequence[str]] = None,
                 budget: Optional[int] = None, cache_dir: Optional[str] = None, progress=False,
                 log: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the rows (default: all of :data:`ROWS`) for every seed of ``cfg`` on every held-out
    domain; return the JSON dict (``rows``, ``ranks``, ``parameters``, ``per_seed``, ...)."""
    log = log or (lambda rec: None)
    keys = [r[0] for r in ROWS]
    rows = list(rows or keys)
    bad = [r for r in rows if r not in keys]
    if bad:
        raise ValueError(f"run_ablation: unknown rows {bad}; known: {keys}")
    if "full_finetune" not in rows:
        rows.append("full_finetune")  # its final loss is the target
    spec = {r[0]: r for r in ROWS}
    unavailable = {}
    if "peft_lora" in rows:
        try:
            import peft  # noqa: F401, PLC0415
        except Exception as exc:  # noqa: BLE001
            unavailable["peft_lora"] = f"the peft library is not importable ({type(exc).__name__}: {exc})"
            rows.remove("peft_lora")
    prep_corpus, held_corpus = corpus.split_heldout(heldout)
    pc = cfg.prep
    t_all = time.perf_counter()
    per_seed: dict[str, dict] = {}
    eval_dedup: dict[str, dict] = {}
    ranks = None
    for seed in cfg.seeds:
        base, _, _ = pretrained_base(prep_corpus, cfg, cache_dir=cache_dir, progress=progress, log=log, seed=seed)
        if ranks is None:
            shapes = _layer_shapes(base)
            budget = budget or adapter_parameter_count(shapes, "bilinear", cfg.rank, False)
            ranks = matched_ranks(shapes, budget)
            ranks["peft_lora"] = {"rank": ranks["bilinear"]["rank"], "parameters": None}
            patched = copy.deepcopy(base)
            patch_model(patched, rank=1, variant="bilinear")
            targets = sorted({n.rsplit(".", 1)[-1] for n in tarp_layers(patched)})
        starts: dict[str, tuple] = {}
        for key in rows:
            _, kind, variant, sw = spec[key]
            if kind == "full":
                m = copy.deepcopy(base)
                starts[key] = (m, list(m.parameters()), cfg.full_lr)
            elif kind == "lora":
                m, ps = _lora_model(base, ranks["peft_lora"]["rank"], targets, _seed_init(cfg, seed, 1))
                ranks["peft_lora"]["parameters"] = count_parameters(ps)
                starts[key] = (m, ps, cfg.adapter_lr)
            else:
                m = copy.deepcopy(base)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed_init(cfg, seed, 1))
                    patch_model(m, rank=ranks[key]["rank"], variant=variant, scale_weight=sw)
                if pc.meta_steps:
                    seed_cfg = PrepConfig(**{**pc.to_dict(), "seed": pc.seed + seed})
                    sampler = TaskSampler(prep_corpus, tasks_per_batch=pc.tasks_per_batch,
                                          inner_steps=max(pc.inner_steps, 1), batch_size=pc.batch_size,
                                          query_batch_size=pc.query_batch_size, seq_len=pc.seq_len, seed=seed_cfg.seed)
                    prepare(m, sampler, seed_cfg, progress=bool(progress),
                            on_step=lambda rec, key=key: log({"phase": f"prepare:{key}", **rec}))
                starts[key] = (m, None, cfg.adapter_lr)
        seed_out = {}
        for name in held_corpus.names:
            splits = DomainSplits.of(held_corpus[name].tokens, eval_fraction=cfg.finetune.eval_fraction)
            eval_stream = _dedup_eval(splits, cfg, name, eval_dedup)
            curves = {}
            for key in rows:
                m, ps, lr = starts[key]
                m = copy.deepcopy(m)
                if ps is None:  # TARP: adapter only
                    mark_only_tarp_trainable(m)
                    ps = tarp_parameters(m)
                elif spec[key][1] == "lora":
                    ps = [p for n, p in m.named_parameters() if "lora_" in n]
                else:
                    ps = list(m.parameters())
                curves[key] = finetune(m, ps, splits.train, eval_stream, cfg.finetune, seed=seed, lr=lr,
                                       progress=progress, desc=f"ablate {key} on {name} (seed {seed})")
                log({"phase": "finetune", "row": key, "domain": name, "seed": seed, "curve": curves[key]})
            seed_out[name] = {"target_loss": curves["full_finetune"][-1][1], "curves": curves}
        per_seed[str(seed)] = seed_out
    if ranks is not None:
        ranks["full_finetune"] = {"rank": None, "parameters": count_parameters(base.parameters())}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    table = {}
    for name in held_corpus.names:
        runs = [per_seed[str(s)][name] for s in cfg.seeds]
        budget_steps = cfg.finetune.steps
        for key in rows:
            finals = [r["curves"][key][-1][1] for r in runs]
            aucs = [curve_auc(r["curves"][key]) for r in runs]
            steps = []
            for r in runs:
                reached = next((int(s) for s, loss, _ in r["curves"][key] if loss <= r["target_loss"] + 1e-9), None)
                steps.append(censored_steps(reached, budget_steps))
            table.setdefault(name, {})[key] = {
                "rank": ranks.get(key, {}).get("rank"), "parameters": ranks.get(key, {}).get("parameters"),
                "final_loss": mean(finals), "final_loss_ci95": bootstrap_ci(finals, mean),
                "auc": mean(aucs), "auc_ci95": bootstrap_ci(aucs, mean),
                "steps_to_target_median": median(steps), "steps_to_target_ci95": bootstrap_ci(steps),
                "censored": sum(s == budget_steps + 1 for s in steps)}
    return {"rows": table, "ranks": ranks, "budget_parameters": budget, "per_seed": per_seed,
            "seeds": list(cfg.seeds), "heldout": list(held_corpus.names), "preparation_domains": list(prep_corpus.names),
            "not_run": dict(NOT_RUN), "eval_dedup": eval_dedup, "unavailable": unavailable, "settings": cfg.to_dict(),
            "protocol": "TARP rows: MLtD preparation, then adapter-only fine-tuning; peft_lora: LoRA factors from the "
                        "base; full_finetune: every weight",
            "target": "the full_finetune row's final loss (per seed); never reached = budget + 1 steps",
            "total_seconds": time.perf_counter() - t_all}


def format_ablation(result: dict) -> str:
    """A plain-text table: one row per held-out domain and ablation row, with 95% intervals."""
    lines = [f"adapter ablation: mean over seeds {result['seeds']} [bootstrap 95% interval]; parameter budget "
             f"{result['budget_parameters']:,} trainable adapter parameters"]
    head = (f"{'domain':<12} {'row':<19} {'rank':>4} {'params':>8} {'final loss':>10} {'95% interval':>17} "
            f"{'AUC':>7} {'steps→target':>12} {'never':>5}")
    lines += [head, "-" * len(head)]
    for name, rows in result["rows"].items():
        for key, r in rows.items():
            lo, hi = r["final_loss_ci95"]
            rank = "-" if r["rank"] is None else str(r["rank"])
            n = "-" if r["parameters"] is None else f"{r['parameters']:,}"
            lines.append(f"{name:<12} {key:<19} {rank:>4} {n:>8} {r['final_loss']:>10.4f} {f'[{lo:.4f}, {hi:.4f}]':>17} "
                         f"{r['auc']:>7.4f} {r['steps_to_target_median']:>12g} {r['censored']:>5}")
    for key, why in {**result.get("not_run", {}), **result.get("unavailable", {})}.items():
        lines.append(f"not run: {key}: {why}")
    lines.append(f"target: {result['target']}")
    return "\n".join(lines)


def plot_ablation(result: dict, path: str) -> str:
    """PNG: final loss per row with its 95% interval, one panel per held-out domain."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(result["rows"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = result["rows"][name]
        keys = list(rows)
        ys = [rows[k]["final_loss"] for k in keys]
        err = [[y - rows[k]["final_loss_ci95"][0] for k, y in zip(keys, ys)],
               [rows[k]["final_loss_ci95"][1] - y for k, y in zip(keys, ys)]]
        ax.bar(range(len(keys)), ys, yerr=err, capsize=3, color="tab:blue", alpha=0.7)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{k}\nr={rows[k]['rank']}" if rows[k]["rank"] else k for k in keys], rotation=45,
                           ha="right", fontsize=7)
        lo = min(rows[k]["final_loss_ci95"][0] for k in keys)
        hi = max(rows[k]["final_loss_ci95"][1] for k in keys)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        ax.set_ylabel("final eval loss (nats/token)")
        ax.set_title(f"held-out: {name}; mean of {len(result['seeds'])} seeds, 95% bootstrap interval", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)
