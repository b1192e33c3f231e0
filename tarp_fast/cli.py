"""The ``tarp-fast`` command (also ``python -m tarp_fast.cli``).

Subcommands (settings from a TOML file with ``[model] [pretrain] [prep] [finetune] [bench]``
tables, then flags, over the defaults :data:`DEMO_DEFAULTS`; ``tarp-fast config`` prints every
valid key with its default):

* ``prepare``: pretrain (or load) a base, patch TARP (and TAMS with ``--tams``), run the MLtD
  preparation with checkpoints, resume and a JSONL log; ``torchrun --nproc_per_node=N`` splits
  each meta-batch's tasks over ranks (gloo on CPU, NCCL on GPU); ``--fsdp`` also shards the base
  with FSDP2 for a model that does not fit one device.
* ``adapt``: fine-tune the adapter of a prepared model on one domain.
* ``generate`` / ``eval``: run a prepared or adapted model (its base plus its adapter): text
  from a prompt, or the loss on a domain's held-out text.
* ``bench-adapt``: the adaptation benchmark (table, JSON, PNG): MLtD arms against their matched
  multitask controls and the baselines, under two fine-tuning protocols, with median speed-ups
  and bootstrap intervals over seeds; the JSON schema is in :mod:`tarp_fast.meta.bench`. Optional:
  ``[bench] lr_grid`` (each arm's learning rate chosen from a grid on a validation domain,
  ``[bench] validation_domain``), ``[bench] base_budgets`` (the whole benchmark per pretraining
  budget of the base, and a table of the effect per budget), ``[bench] corpus`` / ``heldout``
  (the data, when the flags are not given); ``benchmarks/configs/study.toml`` is the full study.
* ``demo``: the benchmark on text found on this machine (or ``--corpus DIR``), with held-out
  domains chosen here (or ``--heldout``).
* ``config``: the reference TOML file (every key, its default and meaning).

Pretrained bases are cached by their settings and data under ``$TARP_FAST_CACHE_DIR`` (default
``$XDG_CACHE_HOME/tarp-fast``, i.e. ``~/.cache/tarp-fast``), so a new ``--out`` folder does not
pretrain the same base again.

Exit status: 0 ok, 2 bad arguments or data, 3 a NaN/inf loss (reported with where it happened),
130 interrupted (Ctrl-C; ``prepare`` says which checkpoint a rerun resumes from).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["main", "build_parser", "DEMO_DEFAULTS", "config_reference", "default_cache_dir"]

#: Default settings, sized so that the demo's whole comparison takes minutes on 2 CPU cores.
DEMO_DEFAULTS = {
    "model": {"n_embd": 64, "n_layer": 2, "n_head": 4, "rank": 4, "variant": "dynamic", "scale_weight": False},
    "pretrain": {"steps": 300, "lr": 3e-3, "batch": 16, "seed": 0},
    "prep": {"algorithm": "fomaml", "meta_steps": 80, "tasks_per_batch": 4, "inner_steps": 1, "inner_lr": 3e-3,
             "inner_optimizer": "adam", "learn_inner_lr": False, "outer_lr": 1e-3, "batch_size": 16,
             "query_batch_size": 16, "seq_len": 64, "seed": 0, "checkpoint_every": 10},
    "finetune": {"steps": 100, "batch_size": 16, "seq_len": 64, "eval_windows": 32},
    "bench": {"full_lr": 1e-3, "adapter_lr": 3e-3, "seeds": [0, 1],
              "protocols": ["adapter", "all"], "vary_base": True},
    "ablate": {"seeds": [0, 1, 2, 3, 4], "rows": ["bilinear", "bilinear+hadamard", "kronecker", "kronecker+hadamard",
                                                  "dynamic", "dynamic+hadamard", "full_finetune", "peft_lora"],
               "budget": None},
}
#: The demo's held-out domains, by preference (the first two present on the machine are used).
#: ``licenses`` comes last: its evaluation text is mostly verbatim in its own training split (GPL
#: variants), so deduplication leaves only a handful of its evaluation windows (5 of 277 here).
DEMO_HELDOUT = ("perl", "info", "config", "changelogs", "manpages", "licenses")
_SECTIONS = ("model", "pretrain", "prep", "finetune", "bench", "ablate")
_ALL_ARMS = "direct,tarp,multitask,mltd_tarp,multitask_tarp,mltd_tarp_tams,multitask_tarp_tams"
_VARIANTS = ("dynamic", "bilinear", "kronecker")

#: What each key of the TOML file means (``tarp-fast config`` prints them; keys of [prep] and
#: [finetune] not listed here are documented in PrepConfig / FinetuneRecipe).
_KEY_DOCS = {
    ("model", "n_embd"): "width of the small GPT-2 pretrained when --model is not given",
    ("model", "n_layer"): "its layers",
    ("model", "n_head"): "its attention heads (must divide n_embd)",
    ("model", "rank"): "TARP rank r of every patched layer",
    ("model", "variant"): "TARP variant: dynamic, bilinear or kronecker (bilinear and kronecker can be merged)",
    ("model", "scale_weight"): "TARP layers with the Hadamard term W * softplus(P Q + c) (TARPLinear scale_weight)",
    ("pretrain", "steps"): "pretraining steps of the small GPT-2",
    ("pretrain", "lr"): "its learning rate (AdamW, warm-up then cosine decay)",
    ("pretrain", "batch"): "its batch size (windows of [prep] seq_len tokens)",
    ("pretrain", "seed"): "its seed (also seeds the fresh TARP factors)",
    ("prep", "algorithm"): "fomaml (first-order MAML), maml (second order) or reptile",
    ("prep", "meta_steps"): "meta-steps of the preparation",
    ("prep", "tasks_per_batch"): "tasks (domains) per meta-batch",
    ("prep", "inner_steps"): "inner-loop steps per task",
    ("prep", "inner_lr"): "inner-loop learning rate",
    ("prep", "inner_optimizer"): "inner-loop optimizer: sgd or adam",
    ("prep", "learn_inner_lr"): "learn one inner learning rate per fast tensor",
    ("prep", "outer_lr"): "outer (meta) learning rate",
    ("prep", "batch_size"): "support windows per task and inner step",
    ("prep", "query_batch_size"): "query windows per task",
    ("prep", "seq_len"): "tokens per window (set together with [finetune] seq_len)",
    ("prep", "seed"): "seed of the task sampler and of the preparation",
    ("prep", "checkpoint_every"): "checkpoint every N meta-steps (0: at the end only); prepare resumes from them",
    ("prep", "grad_clip"): "gradient-norm clip of the outer step",
    ("finetune", "steps"): "fine-tuning steps (adapt and every benchmark arm)",
    ("finetune", "lr"): "learning rate when no arm-specific one applies",
    ("finetune", "batch_size"): "windows per fine-tuning step",
    ("finetune", "seq_len"): "tokens per window",
    ("finetune", "eval_windows"): "held-out windows the loss is measured on",
    ("finetune", "eval_fraction"): "fraction of each domain's text held out for evaluation",
    ("finetune", "weight_decay"): "AdamW weight decay",
    ("finetune", "grad_clip"): "gradient-norm clip",
    ("bench", "full_lr"): "learning rate of the full-weight arms (direct, multitask)",
    ("bench", "adapter_lr"): "learning rate of the adapter arms (also adapt's default --lr)",
    ("bench", "multitask_lr"): "learning rate of the multitask control's training (default: [prep] outer_lr)",
    ("bench", "seeds"): "seeds (each varies the base's pretraining, the adapter init and the data order); curves are "
                        "averaged over them, speed-ups are medians with paired bootstrap 95 percent intervals",
    ("bench", "arms"): f"arms to run (default: all seven: {_ALL_ARMS}; multitask_tarp* are the MLtD arms' matched "
                       "controls; tarp_tams is opt-in)",
    ("bench", "tams_cell_width"): "width C of the TAMS searched cells",
    ("bench", "finetune_scope"): "the protocol of the main table and the JSON's legacy keys: all or adapter",
    ("bench", "protocols"): "fine-tuning protocols run and reported separately: adapter (only the adapter arms' "
                            "adapters train: the paper's meta-test) and/or all (every weight)",
    ("ablate", "seeds"): "seeds of `tarp-fast ablate` (each varies the base, the adapter init and the data order)",
    ("ablate", "rows"): "ablation rows: TARP variants with and without the Hadamard term, full_finetune, peft_lora",
    ("ablate", "budget"): "trainable adapter parameters every adapter row is matched to",
    ("bench", "vary_base"): "every seed pretrains its own base (seed [pretrain] seed + s); false: one base",
    ("bench", "lr_grid"): "multipliers of each arm's configured learning rate tried on the validation domain, e.g. "
                          "[0.3, 1, 3]; each arm and protocol uses the one with the lowest final validation loss "
                          "(chosen with the first seed only); empty: off",
    ("bench", "validation_domain"): "the domain the learning rates are chosen on, taken out of the preparation: "
                                    "neither a preparation nor a held-out domain",
    ("bench", "base_budgets"): "pretraining steps of the base, the whole benchmark once per value, e.g. [300, 2000], "
                               "and a table of the effect per budget; empty: one budget, [pretrain] steps",
    ("bench", "corpus"): "the --corpus of bench-adapt and demo when the flag is not given (a folder, a .jsonl, "
                         "'machine', 'generated[:N]', 'planted[:N]', ...)",
    ("bench", "heldout"): "the held-out domains of bench-adapt and demo when --heldout is not given (a list of names)",
}


# ---- settings: flags <-> TOML keys -----------------------------------------------------------

@dataclass(frozen=True)
class _Flag:
    flag: str
    section: str
    key: str
    type: Any = int
    choices: Optional[tuple] = None
    metavar: Optional[str] = None


_MODEL_FLAGS = (_Flag("--n-embd", "model", "n_embd"), _Flag("--n-layer", "model", "n_layer"),
                _Flag("--n-head", "model", "n_head"), _Flag("--rank", "model", "rank"),
                _Flag("--variant", "model", "variant", str, _VARIANTS), _Flag("--pretrain-steps", "pretrain", "steps"))
_PREP_FLAGS = (_Flag("--algorithm", "prep", "algorithm", str, ("fomaml", "maml", "reptile")),
               _Flag("--meta-steps", "prep", "meta_steps"), _Flag("--tasks-per-batch", "prep", "tasks_per_batch"),
               _Flag("--inner-steps", "prep", "inner_steps"), _Flag("--inner-lr", "prep", "inner_lr", float),
               _Flag("--inner-optimizer", "prep", "inner_optimizer", str, ("sgd", "adam")),
               _Flag("--outer-lr", "prep", "outer_lr", float), _Flag("--learn-inner-lr", "prep", "learn_inner_lr", bool),
               _Flag("--prep-seed", "prep", "seed"))
_CHECKPOINT_FLAGS = (_Flag("--checkpoint-every", "prep", "checkpoint_every"),)
_FT_FLAGS = (_Flag("--steps", "finetune", "steps"), _Flag("--seq-len", "finetune", "seq_len"),
             _Flag("--batch-size", "finetune", "batch_size"))
_BENCH_FLAGS = (_Flag("--full-lr", "bench", "full_lr", float), _Flag("--adapter-lr", "bench", "adapter_lr", float),
                _Flag("--seeds", "bench", "seeds", "list_int", metavar="S,S"),
                _Flag("--arms", "bench", "arms", "list_str", metavar="ARM,ARM"),
                _Flag("--protocols", "bench", "protocols", "list_str", metavar="P,P"),
                _Flag("--lr-grid", "bench", "lr_grid", "list_float", metavar="M,M"),
                _Flag("--validation-domain", "bench", "validation_domain", str, metavar="NAME"),
                _Flag("--base-budgets", "bench", "base_budgets", "list_int", metavar="STEPS,STEPS"))
_ABLATE_FLAGS = (_Flag("--full-lr", "bench", "full_lr", float), _Flag("--adapter-lr", "bench", "adapter_lr", float),
                 _Flag("--seeds", "ablate", "seeds", "list_int", metavar="S,S"),
                 _Flag("--rows", "ablate", "rows", "list_str", metavar="ROW,ROW"),
                 _Flag("--budget", "ablate", "budget", int, metavar="N"))


def _default_text(section: str, key: str) -> str:
    if (section, key) == ("bench", "arms"):
        return _ALL_ARMS
    if (section, key) == ("ablate", "budget"):
        return "the bilinear row's at [model] rank"
    if (section, key) == ("bench", "lr_grid"):
        return "off"
    if (section, key) == ("bench", "validation_domain"):
        return "with a grid, the last preparation domain"
    if (section, key) == ("bench", "base_budgets"):
        return "one budget, [pretrain] steps"
    v = DEMO_DEFAULTS.get(section, {}).get(key)
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return str(v)


def _add_setting_flags(p: argparse.ArgumentParser, flags, title: str, *, default_from: Optional[str] = None) -> None:
    g = p.add_argument_group(title)
    for f in flags:
        doc = _KEY_DOCS.get((f.section, f.key), f.key)
        where = f"[{f.section}] {f.key}"
        default = f"{default_from} {where}" if default_from else f"{_default_text(f.section, f.key)}; {where}"
        help_ = f"{doc} (default: {default})"
        dest = f.flag[2:].replace("-", "_")
        if f.type is bool:
            g.add_argument(f.flag, dest=dest, action="store_const", const=True, default=None, help=help_)
        elif f.type in ("list_int", "list_str", "list_float"):
            g.add_argument(f.flag, dest=dest, default=None, metavar=f.metavar, help=help_)
        else:
            g.add_argument(f.flag, dest=dest, type=f.type, choices=f.choices, default=None,
                           metavar=None if f.choices else f.key.upper(), help=help_)


def _flag_overrides(args: argparse.Namespace, flags) -> dict:
    """The flags that were given, as a config tree (flags beat the TOML file)."""
    out: dict = {}
    for f in flags:
        v = getattr(args, f.flag[2:].replace("-", "_"), None)
        if v is None:
            continue
        if f.type == "list_int":
            try:
                v = [int(s) for s in str(v).split(",") if s.strip()]
            except ValueError as exc:
                raise ValueError(f"{f.flag} must be comma-separated integers, got {v!r}") from exc
        elif f.type == "list_float":
            try:
                v = [float(s) for s in str(v).split(",") if s.strip()]
            except ValueError as exc:
                raise ValueError(f"{f.flag} must be comma-separated numbers, got {v!r}") from exc
        elif f.type == "list_str":
            v = [a.strip() for a in str(v).split(",") if a.strip()]
        out.setdefault(f.section, {})[f.key] = v
    if out.get("finetune", {}).get("seq_len") is not None:
        out.setdefault("prep", {})["seq_len"] = out["finetune"]["seq_len"]
    if out.get("finetune", {}).get("batch_size") is not None:
        out.setdefault("prep", {}).setdefault("batch_size", out["finetune"]["batch_size"])
        out["prep"].setdefault("query_batch_size", out["finetune"]["batch_size"])
    return out


def _read_toml(path: Optional[str]) -> dict:
    if not path:
        return {}
    import tomllib  # noqa: PLC0415  (Python >= 3.11)

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r} does not exist")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: not valid TOML: {exc}") from None


def _merge(base: dict, over: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


def _known_keys() -> dict[str, list[str]]:
    """Every valid key of each TOML section."""
    from dataclasses import fields  # noqa: PLC0415

    from .meta.finetune import FinetuneRecipe  # noqa: PLC0415
    from .meta.prepare import PrepConfig  # noqa: PLC0415

    return {"model": ["n_embd", "n_layer", "n_head", "rank", "variant", "scale_weight"],
            "pretrain": ["steps", "lr", "batch", "seed"],
            "prep": [f.name for f in fields(PrepConfig) if f.name not in ("extra", "batched")],
            "finetune": [f.name for f in fields(FinetuneRecipe)],
            "bench": ["full_lr", "adapter_lr", "multitask_lr", "seeds", "arms", "tams_cell_width", "finetune_scope",
                      "protocols", "vary_base", "lr_grid", "validation_domain", "base_budgets", "corpus", "heldout"],
            "ablate": ["seeds", "rows", "budget"]}


def _check_sections(tree: dict, allowed: dict[str, list[str]], where: str) -> None:
    for section, value in tree.items():
        if section not in allowed:
            raise ValueError(f"{where}: unknown config section [{section}]; known: {', '.join(allowed)}")
        if not isinstance(value, dict):
            raise ValueError(f"{where}: config section [{section}] must be a table")
        bad = sorted(set(value) - set(allowed[section]))
        if bad:
            raise ValueError(f"{where}: unknown keys {bad} in [{section}]; valid keys: {', '.join(allowed[section])} "
                             "(`tarp-fast config` prints them all with their defaults)")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_bench_lists(bench: dict) -> None:
    """The [bench] keys of the data, which only the command line reads (errors name the key); the
    keys of :class:`~tarp_fast.meta.bench.BenchConfig` (lr_grid, validation_domain, base_budgets,
    protocols) are checked by the dataclass itself."""
    corpus = bench.get("corpus")
    if corpus is not None and (not isinstance(corpus, str) or not corpus):
        raise ValueError(f"[bench] corpus must be a corpus spec string (like --corpus), got {corpus!r}")
    held = bench.get("heldout")
    if held is not None and (not isinstance(held, list) or not held or
                             any(not isinstance(h, str) or not h for h in held)):
        raise ValueError(f"[bench] heldout must be a non-empty list of domain names, got {held!r}")


def _bench_config(tree: dict):
    """A :class:`~tarp_fast.meta.bench.BenchConfig` from a config tree; every value is checked
    here, before anything runs (errors name the TOML key), by the dataclasses where they hold the
    rule. The sections and keys are not checked here: :func:`_settings` checks them on the file as
    written, naming it, before merging it with the defaults and flags (a caller with a tree of its
    own calls :func:`_check_sections` first)."""
    from .meta.bench import ARMS, BenchConfig  # noqa: PLC0415
    from .meta.finetune import FinetuneRecipe  # noqa: PLC0415
    from .meta.prepare import PrepConfig  # noqa: PLC0415

    model, pre, bench = tree.get("model", {}), tree.get("pretrain", {}), tree.get("bench", {})
    for key in ("n_embd", "n_layer", "n_head", "rank"):
        if key in model and not _positive_int(model[key]):
            raise ValueError(f"[model] {key} must be a positive integer, got {model[key]!r}")
    variant = model.get("variant", "dynamic")
    if variant not in _VARIANTS:
        raise ValueError(f"[model] variant must be one of {', '.join(_VARIANTS)}, got {variant!r} "
                         "(TARP variants; LoRA-style adapters are variant 'bilinear')")
    for section, key, value in (("model", "scale_weight", model.get("scale_weight", False)),
                                ("bench", "vary_base", bench.get("vary_base", True))):
        if not isinstance(value, bool):
            raise ValueError(f"[{section}] {key} must be true or false, got {value!r}")
    protocols = bench.get("protocols", ["adapter", "all"])
    # the default scope; BenchConfig refuses bad protocols (before it looks at the scope)
    scope = "all" if not isinstance(protocols, (list, tuple)) or not protocols or "all" in protocols else protocols[0]
    _check_bench_lists(bench)
    n_embd, n_head = model.get("n_embd", 96), model.get("n_head", 4)
    if n_embd % n_head:
        raise ValueError(f"[model] n_embd ({n_embd}) must be divisible by [model] n_head ({n_head})")
    prep, ft = dict(tree.get("prep", {})), dict(tree.get("finetune", {}))
    prep.setdefault("seq_len", ft.get("seq_len", 96))
    ft.setdefault("seq_len", prep["seq_len"])
    built = {}
    for section, cls, values in (("prep", PrepConfig, prep), ("finetune", FinetuneRecipe, ft)):
        try:
            built[section] = cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"[{section}]: {exc}") from None
    try:
        cfg = BenchConfig(
            n_embd=n_embd, n_layer=model.get("n_layer", 3), n_head=n_head,
            rank=model.get("rank", 4), variant=variant,
            pretrain_steps=pre.get("steps", 300), pretrain_lr=pre.get("lr", 3e-3), pretrain_batch=pre.get("batch", 16),
            base_seed=pre.get("seed", 0), prep=built["prep"], finetune=built["finetune"],
            full_lr=bench.get("full_lr", 1e-3), adapter_lr=bench.get("adapter_lr", 3e-3),
            multitask_lr=bench.get("multitask_lr"), seeds=tuple(bench.get("seeds", (0,))),
            arms=tuple(bench.get("arms", ARMS)), tams_cell_width=bench.get("tams_cell_width", 32),
            finetune_scope=bench.get("finetune_scope", scope), protocols=protocols,
            vary_base=bench.get("vary_base", True), scale_weight=model.get("scale_weight", False),
            lr_grid=bench.get("lr_grid", ()), validation_domain=bench.get("validation_domain"),
            base_budgets=bench.get("base_budgets", ()),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"[bench] or [pretrain]: {exc}") from None
    # the TARP layer settings, on the meta device (no memory): a bad rank fails now, not after pretraining
    import torch  # noqa: PLC0415

    from .nn.linear import TARPLinear  # noqa: PLC0415

    try:
        with torch.device("meta"):
            TARPLinear(cfg.n_embd, cfg.n_embd, rank=cfg.rank, variant=cfg.variant, scale_weight=cfg.scale_weight)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"[model] rank={cfg.rank} variant={cfg.variant!r}: {exc}") from None
    return cfg


def _settings(args: argparse.Namespace, flags, override: Optional[dict] = None):
    tree = _read_toml(args.config)
    where = f"--config {args.config}" if args.config else "settings"
    _check_sections(tree, _known_keys(), where)
    ft_len = tree.get("finetune", {}).get("seq_len")
    if ft_len is not None and "seq_len" not in tree.get("prep", {}):
        tree.setdefault("prep", {})["seq_len"] = ft_len  # one window length for both stages
    return _bench_config(_merge(_merge(_merge(DEMO_DEFAULTS, tree), _flag_overrides(args, flags)), override or {}))


def config_reference() -> str:
    """The reference TOML file: every section and key with its default and meaning."""
    from dataclasses import MISSING, fields  # noqa: PLC0415

    from .meta.finetune import FinetuneRecipe  # noqa: PLC0415
    from .meta.prepare import PrepConfig  # noqa: PLC0415

    dataclass_defaults = {"prep": {f.name: f.default for f in fields(PrepConfig) if f.default is not MISSING},
                          "finetune": {f.name: f.default for f in fields(FinetuneRecipe) if f.default is not MISSING}}
    extra = {"bench": {"multitask_lr": None, "arms": _ALL_ARMS.split(","), "tams_cell_width": 32,
                       "finetune_scope": "all", "lr_grid": [], "base_budgets": []}}
    titles = {"model": "the small GPT-2 pretrained when --model is not given, and the TARP layers",
              "pretrain": "its pretraining (cached by these settings and the data)",
              "prep": "the MLtD preparation (meta-training), `tarp-fast prepare`",
              "finetune": "fine-tuning: `tarp-fast adapt` and every benchmark arm",
              "bench": "the benchmark, `tarp-fast bench-adapt` and `demo`",
              "ablate": "the adapter ablation, `tarp-fast ablate` (with [model] [pretrain] [prep] [finetune])"}
    lines = ["# tarp-fast settings: `--config FILE.toml`; a flag given on the command line wins over the file.",
             "# The values below are the defaults."]
    known = _known_keys()
    for section in _SECTIONS:
        lines += ["", f"[{section}]  # {titles[section]}"]
        for key in known[section]:
            if key in DEMO_DEFAULTS.get(section, {}):
                v = DEMO_DEFAULTS[section][key]
            elif key in extra.get(section, {}):
                v = extra[section][key]
            else:
                v = dataclass_defaults.get(section, {}).get(key)
            doc = _KEY_DOCS.get((section, key), "")
            if v is None:
                default = _default_text(section, key)
                lines.append(f"# {key} =  # {doc}" + ("" if default == "None" else f" (default: {default})"))
                continue
            if isinstance(v, tuple):
                v = list(v)
            lines.append(f"{key} = {json.dumps(v)}{'  # ' + doc if doc else ''}")
    return "\n".join(lines) + "\n"


# ---- helpers ---------------------------------------------------------------------------------

def default_cache_dir() -> str:
    """``$TARP_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/tarp-fast``, else ``~/.cache/tarp-fast``."""
    env = os.environ.get("TARP_FAST_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "tarp-fast")


def _bases_dir(args: argparse.Namespace) -> Optional[str]:
    if getattr(args, "no_cache", False):
        return None
    return os.path.join(args.cache_dir or default_cache_dir(), "bases")


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


def _tokenizer(spec: Optional[str]):
    from .data import load_tokenizer  # noqa: PLC0415

    if spec not in (None, "", "bytes", "byte") and not os.path.isdir(spec):
        raise FileNotFoundError(f"--tokenizer {spec!r} does not exist: give 'bytes' or a local transformers "
                                "tokenizer folder")
    return load_tokenizer(spec or "bytes")


def _load_corpus(spec: str, tokenizer: Optional[str]):
    from .data import load_corpus  # noqa: PLC0415

    what = ("give a folder with one subfolder of text files per domain, a .jsonl file of "
            "{\"domain\", \"text\"} records, a corpus manifest .json, 'machine', 'generated[:N]' or 'planted[:N]'")
    special = spec == "machine" or any(spec == f or spec.startswith(f + ":") for f in ("generated", "planted"))
    if not special and not os.path.exists(spec):
        raise FileNotFoundError(f"--corpus {spec!r} does not exist; {what}")
    if not special and os.path.isfile(spec) and not spec.endswith((".jsonl", ".json")):
        raise ValueError(f"--corpus {spec!r} is a file but neither .jsonl nor .json; {what}")
    try:
        if spec.startswith(("generated", "planted")):
            return load_corpus(spec)
        return load_corpus(spec, tokenizer=_tokenizer(tokenizer))
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"--corpus {spec!r}: {exc}") from None


def _data_spec(args: argparse.Namespace) -> tuple[str, Optional[str]]:
    """``(corpus spec, held-out names)`` of bench-adapt and demo: the flags, else ``[bench] corpus``
    and ``[bench] heldout`` of ``--config`` (checked by :func:`_check_bench_lists`), else
    ``machine`` and none."""
    bench = _read_toml(args.config).get("bench", {}) if getattr(args, "config", None) else {}
    corpus = args.corpus or bench.get("corpus") or "machine"
    heldout = args.heldout or (",".join(bench["heldout"]) if bench.get("heldout") else None)
    return corpus, heldout


def _check_validation(corpus, heldout: list[str], cfg) -> None:
    """The learning-rate grid's validation domain against the data, before anything runs."""
    from .meta.bench import validation_split  # noqa: PLC0415

    name, source = validation_split(corpus, heldout, cfg)
    if name:
        print(f"learning rates: grid {list(cfg.lr_grid)} x each arm's configured rate, chosen on the validation domain "
              f"{name} ({source}) with seed {cfg.seeds[0]} only", flush=True)


def _split_names(text: Optional[str], flag: str) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        raise ValueError(f"{flag} must name at least one domain")
    return names


def _progress(args: argparse.Namespace, plan=None, *, enabled: bool = True):
    from .meta.finetune import RunProgress  # noqa: PLC0415

    mode = "off" if not enabled else ("quiet" if args.no_progress else "auto")
    return RunProgress(plan, mode=mode)


def _load_base(path: str):
    """:func:`~tarp_fast.meta.models.load_base_model` without transformers' loading bar (a
    carriage-return bar in redirected logs; our own progress reports the phases)."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    from .meta.models import load_base_model  # noqa: PLC0415

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_base_model(path)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _set_threads(args: argparse.Namespace) -> None:
    import torch  # noqa: PLC0415  (keep `tarp-fast --help` fast)

    torch.set_num_threads(max(1, args.threads))


# ---- subcommands -----------------------------------------------------------------------------

def _report(result: dict, json_path: Optional[str], png_path: Optional[str]) -> None:
    from .meta.bench import format_table, plot_curves, write_json  # noqa: PLC0415

    print(format_table(result))
    for name, row in result.get("goal", {}).items():
        methods = result["domains"][name]["methods"]
        for arm in ("mltd_tarp", "mltd_tarp_tams"):
            if arm in row:
                r = row[arm]
                if "multitask" in methods:
                    vs = f"{'beats' if r['beats_multitask'] else 'does NOT beat'} the multitask control"
                else:
                    vs = "multitask control not run (add it to --arms to compare)"
                print(f"goal [{name}] {arm}: {r['steps_to_target']} steps to the target vs direct "
                      f"{row['direct_steps_to_target']} (budget {row['budget_steps']}): "
                      f"{'within' if r['within_third_of_direct'] else 'NOT within'} 1/3 of direct; {vs}")
    for c in result.get("comparisons", []):
        if not c.get("matched"):
            continue
        lo, hi = c["speedup_ci95"]
        cens = ""
        if c["censored_arm"] or c["censored_control"]:
            cens = (f"; never reached the target within {c['budget_steps']} steps (counted as budget + 1): "
                    f"arm {c['censored_arm']}, control {c['censored_control']} of {c['seeds_n']} seeds")
        print(f"headline [{c['domain']}, fine-tuning {c['protocol']}] {c['arm']} vs matched control {c['control']}: "
              f"speed-up {c['speedup_median']:.2f}x (median of {c['seeds_n']} seeds, 95% interval "
              f"[{lo:.2f}, {hi:.2f}]); final loss {c['final_loss_arm']:.4f} vs {c['final_loss_control']:.4f}{cens}")
    opt = result.get("optimizers")
    if opt:
        print(f"optimizers: inner loop {opt['inner_loop']}; meta-test {opt['meta_test']}")
    if json_path:
        write_json(result, json_path)
        print(f"JSON: {json_path}")
    if png_path:
        plot_curves(result, png_path)
        print(f"plot: {png_path} (curves: mean over the seeds, band: their spread; dotted: steps to the target)")


_BENCH_SETTINGS = _MODEL_FLAGS + _PREP_FLAGS + _FT_FLAGS + _BENCH_FLAGS


def _bench_adapt(args: argparse.Namespace) -> int:
    _set_threads(args)
    cfg = _settings(args, _BENCH_SETTINGS)
    spec, held_text = _data_spec(args)
    corpus = _load_corpus(spec, args.tokenizer)
    heldout = _split_names(held_text, "--heldout (or [bench] heldout)")
    missing = [h for h in heldout if h not in corpus]
    if missing:
        raise ValueError(f"--heldout {missing} not in the corpus (domains: {', '.join(corpus.names)})")
    _check_validation(corpus, heldout, cfg)
    base = None
    if args.model:
        base = _load_base(args.model)
    from .meta.bench import run_benchmark  # noqa: PLC0415

    result = run_benchmark(corpus, heldout, cfg, cache_dir=_bases_dir(args), progress=_progress(args),
                           log=_JsonlLog(args.log), work_dir=args.work_dir, base_model=base)
    _report(result, args.json, args.png)
    return 0


_ABLATE_SETTINGS = _MODEL_FLAGS + _PREP_FLAGS + _FT_FLAGS + _ABLATE_FLAGS


def _ablate(args: argparse.Namespace) -> int:
    _set_threads(args)
    from .meta.ablate import ROWS, format_ablation, plot_ablation, run_ablation  # noqa: PLC0415
    from .meta.bench import write_json  # noqa: PLC0415

    tree = _read_toml(args.config)
    ab = _merge(_merge(DEMO_DEFAULTS, tree), _flag_overrides(args, _ABLATE_SETTINGS)).get("ablate", {})
    seeds, rows, budget = ab.get("seeds"), ab.get("rows"), ab.get("budget")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ValueError(f"[ablate] seeds must be a non-empty list of integers, got {seeds!r}")
    known = [r[0] for r in ROWS]
    if not isinstance(rows, list) or not rows or any(r not in known for r in rows):
        raise ValueError(f"[ablate] rows must be a non-empty list of {', '.join(known)}, got {rows!r}")
    if budget is not None and not _positive_int(budget):
        raise ValueError(f"[ablate] budget must be a positive integer, got {budget!r}")
    cfg = _settings(args, _ABLATE_SETTINGS, {"bench": {"seeds": seeds}})
    corpus = _load_corpus(args.corpus, args.tokenizer)
    heldout = _split_names(args.heldout, "--heldout")
    missing = [h for h in heldout if h not in corpus]
    if missing:
        raise ValueError(f"--heldout {missing} not in the corpus (domains: {', '.join(corpus.names)})")
    result = run_ablation(corpus, heldout, cfg, rows=rows, budget=budget, cache_dir=_bases_dir(args),
                          progress=_progress(args), log=_JsonlLog(args.log))
    print("ranks matched to the parameter budget: " + ", ".join(
        f"{k} r={v['rank']} ({v['parameters']:,} parameters)" for k, v in result["ranks"].items()
        if v.get("rank") is not None and v.get("parameters") is not None))
    print(format_ablation(result))
    if args.json:
        write_json(result, args.json)
        print(f"JSON: {args.json}")
    if args.png:
        plot_ablation(result, args.png)
        print(f"plot: {args.png}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    _set_threads(args)
    from .data import machine_corpus  # noqa: PLC0415
    from .meta.bench import run_benchmark  # noqa: PLC0415

    t0 = time.perf_counter()
    cfg = _settings(args, _BENCH_SETTINGS)
    spec, held_text = _data_spec(args)
    if spec == "machine":
        corpus = machine_corpus(max_bytes=args.max_bytes)
        where = "found on this machine"
    else:
        corpus = _load_corpus(spec, args.tokenizer)
        where = f"in {spec}"
    if held_text:
        heldout = _split_names(held_text, "--heldout")
        missing = [h for h in heldout if h not in corpus]
        if missing:
            raise ValueError(f"--heldout {missing} not in the corpus (domains: {', '.join(corpus.names)})")
    else:
        heldout = [n for n in DEMO_HELDOUT if n in corpus.names][:2]
    if not heldout or len(corpus.names) - len(heldout) < 2:
        raise ValueError(f"too few text domains {where} ({corpus.names}) for the demo (it needs held-out domains and "
                         "at least 2 others); pass --corpus DIR (one subfolder of text files per domain) and "
                         "--heldout NAME,NAME")
    _check_validation(corpus, heldout, cfg)
    if cfg.base_budgets:
        print(f"base budgets: the whole benchmark for each of {list(cfg.base_budgets)} pretraining steps", flush=True)
    os.makedirs(args.out, exist_ok=True)
    corpus.write_manifest(os.path.join(args.out, "corpus_manifest.json"))
    print(f"domains {where}: {', '.join(corpus.names)}")
    print(f"held out (never seen before their fine-tuning): {', '.join(heldout)}")
    print(f"model: GPT-2 n_embd={cfg.n_embd} n_layer={cfg.n_layer}, byte tokens; TARP {cfg.variant} rank {cfg.rank}; "
          f"preparation: {cfg.prep.algorithm}, {cfg.prep.meta_steps} meta-steps x {cfg.prep.tasks_per_batch} tasks "
          f"x {cfg.prep.inner_steps} inner step(s); fine-tuning: {cfg.finetune.steps} steps; seeds {list(cfg.seeds)}",
          flush=True)
    result = run_benchmark(corpus, heldout, cfg, cache_dir=_bases_dir(args), progress=_progress(args),
                           log=_JsonlLog(os.path.join(args.out, "log.jsonl")), work_dir=args.out)
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


_PREPARE_SETTINGS = _MODEL_FLAGS + _PREP_FLAGS + _CHECKPOINT_FLAGS + _FT_FLAGS


def _prepare_cmd(args: argparse.Namespace) -> int:
    import copy  # noqa: PLC0415
    import random  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from . import patch_model, save_adapter, unpatch_model  # noqa: PLC0415
    from .data import TaskSampler  # noqa: PLC0415
    from .meta.bench import _add_tams, base_cache_path, pretrained_base  # noqa: PLC0415
    from .meta.checkpoint import Checkpointer  # noqa: PLC0415
    from .meta.models import save_base_model  # noqa: PLC0415
    from .meta.prepare import prepare  # noqa: PLC0415

    _set_threads(args)
    # everything is checked before anything is written or trained (and --out is created)
    cfg = _settings(args, _PREPARE_SETTINGS)
    corpus = _load_corpus(args.corpus, args.tokenizer)
    heldout = _split_names(args.heldout, "--heldout") if args.heldout else []
    if heldout:
        missing = [h for h in heldout if h not in corpus]
        if missing:
            raise ValueError(f"--heldout {missing} not in the corpus (domains: {', '.join(corpus.names)})")
        corpus, _ = corpus.split_heldout(heldout)
    model = None
    if args.model:
        from .meta.models import check_vocab  # noqa: PLC0415

        model = _load_base(args.model)
        check_vocab(model, corpus.vocab_size)
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise ValueError("--fsdp shards the model over the ranks of a torchrun job: launch with "
                         "`torchrun --nproc-per-node N -m tarp_fast.cli prepare --fsdp ...` (this process is alone)")
    dist = _init_distributed()
    rank = dist.get_rank() if dist else 0
    # Before anything random: the run is a function of its settings (prepare() also draws from
    # its own RNG seeded from the same seed, or restored from the checkpoint when resuming).
    torch.manual_seed(cfg.prep.seed)
    random.seed(cfg.prep.seed)
    cache = _bases_dir(args)
    pc = cfg.prep
    plan = []
    if model is None and not (cache and os.path.isfile(base_cache_path(corpus, cfg, cache))):
        plan.append(("pretrain", cfg.pretrain_steps, cfg.pretrain_batch))
    plan.append(("prepare", pc.meta_steps, pc.tasks_per_batch * (max(pc.inner_steps, 1) * pc.batch_size
                                                                  + pc.query_batch_size)))
    progress = _progress(args, plan, enabled=rank == 0)
    os.makedirs(args.out, exist_ok=True)
    ckdir = os.path.join(args.out, "checkpoints")
    state = {"step": None, "resumed_from": None}
    args.on_interrupt = lambda: _prepare_interrupted(ckdir, state["step"], pc.checkpoint_every)
    if model is None:
        # every rank trains the same base from the same seed: deterministic, no broadcast needed
        model, _, cached = pretrained_base(corpus, cfg, cache_dir=cache, progress=progress)
        if cached and rank == 0:
            print(f"base: the cached pretrained GPT-2 in {os.path.dirname(base_cache_path(corpus, cfg, cache))}",
                  file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.base_seed + 1)
        patch_model(model, rank=cfg.rank, variant=cfg.variant)
    if args.tams:
        _add_tams(model, cfg)
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
    resume = not args.no_resume
    if resume and rank == 0 and Checkpointer(ckdir).exists():
        steps = Checkpointer(ckdir).steps()
        print(f"resuming from the checkpoint at meta-step {steps[-1] if steps else '?'} in {ckdir} "
              "(--no-resume starts over)", file=sys.stderr, flush=True)
    phase = progress.phase(f"prepare ({pc.algorithm}{', TAMS' if args.tams else ''})", pc.meta_steps, kind="prepare")

    def on_step(rec: dict) -> None:
        if state["step"] is None and rec["step"] > 0:
            state["resumed_from"] = rec["step"]
            phase.update(rec["step"])  # resumed: the bar starts where the checkpoint was
        state["step"] = rec["step"] + 1
        phase.update(1, query_loss=float(rec["query_loss"]))

    # FSDP shards the model in place: rank 0 keeps an unsharded skeleton to load the result into
    skeleton = copy.deepcopy(model) if args.fsdp and rank == 0 else None
    res = prepare(model, sampler, pc, tams=args.tams, checkpoint_dir=ckdir, resume=resume,
                  log_path=os.path.join(args.out, "prepare.jsonl"), progress=False, stop_after=args.stop_after,
                  run_settings=run_settings, on_step=on_step, fsdp=args.fsdp)
    phase.close()
    if args.fsdp:
        import gc  # noqa: PLC0415

        from .meta.prepare import gather_full_state_dict  # noqa: PLC0415

        state_dict = gather_full_state_dict(model)  # every rank joins the all-gather; rank 0 gets it
        res.pop("learner", None)
        model = None
        gc.collect()  # FSDP's last gloo work goes before the process group does
        if rank == 0:
            skeleton.load_state_dict(state_dict)
            model = skeleton
        del state_dict
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
             "tokenizer": args.tokenizer, "steps": res["steps"], "losses": res["losses"],
             "resumes": res["resumes"]}, indent=1).encode())
        last = res["losses"][-1] if res["losses"] else float("nan")
        resumed = state["resumed_from"]
        resumed_text = f", resumed from meta-step {resumed}" if resumed is not None else ""
        print(f"prepared: {res['steps']} meta-steps ({res['seconds']:.1f} s in this run{resumed_text}), "
              f"last query loss {last:.4f}; written to {args.out} (base/: the base model, adapter/: the prepared "
              f"adapter); next: `tarp-fast adapt --prepared {args.out} --domain NAME --out DIR`")
    if dist:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _prepare_interrupted(ckdir: str, step: Optional[int], every: int) -> str:
    from .meta.checkpoint import Checkpointer  # noqa: PLC0415

    steps = Checkpointer(ckdir).steps() if os.path.isdir(ckdir) else []
    at = f" at meta-step {step}" if step is not None else ""
    if steps:
        return (f"interrupted{at}; checkpoint saved at meta-step {steps[-1]} in {ckdir}; "
                "rerun the same command to resume")
    return (f"interrupted{at}, before the first checkpoint (every {every or 'meta_steps'} meta-steps: "
            "--checkpoint-every); rerun the same command to start over")


def _read_prepared(prepared: str) -> dict:
    conf_path = os.path.join(prepared, "prepare_config.json")
    if not os.path.isfile(conf_path):
        raise FileNotFoundError(f"{prepared!r} has no prepare_config.json: not a folder written by `tarp-fast prepare`")
    with open(conf_path, encoding="utf-8") as fh:
        return json.load(fh)


def _architecture_json(arch) -> dict:
    return {"ops": arch.ops.tolist() if arch.op_weights is not None else None,
            "gates": arch.gates.detach().tolist() if arch.gates is not None else None}


def _architecture_from_json(d: dict):
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from .tams import NUM_OPS, Architecture  # noqa: PLC0415

    w = F.one_hot(torch.tensor(d["ops"]), NUM_OPS).float() if d.get("ops") is not None else None
    z = torch.tensor(d["gates"], dtype=torch.float32) if d.get("gates") is not None else None
    return Architecture(w, z)


def _describe_architecture(arch) -> str:
    from .tams import EDGES  # noqa: PLC0415

    task = arch.describe()[0]
    parts = []
    if "edges" in task:
        parts.append("cell edges " + ", ".join(f"n{s}->n{t}: {op}" for (s, t), op in zip(EDGES, task["edges"])))
    if "kept" in task:
        parts.append(f"kept sublayers {task['kept']}")
    return "; ".join(parts)


def _adapt_cmd(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from . import load_adapter, mark_only_tarp_trainable, save_adapter, tarp_parameters  # noqa: PLC0415
    from .data.sampling import DomainSplits, random_windows, step_generator  # noqa: PLC0415
    from .meta.bench import write_json  # noqa: PLC0415
    from .meta.finetune import FinetuneRecipe, finetune  # noqa: PLC0415
    from .meta.models import check_vocab  # noqa: PLC0415

    _set_threads(args)
    tree = _read_toml(args.config)
    pconf = _read_prepared(args.prepared)
    settings = pconf["settings"]
    where = f"--config {args.config}" if args.config else "settings"
    for section in tree:
        if section not in ("finetune", "bench"):
            raise ValueError(f"{where}: section [{section}] does not apply to adapt: the prepared model in "
                             f"{args.prepared} fixes it; adapt reads [finetune] and [bench] adapter_lr")
    _check_sections(tree, {"finetune": _known_keys()["finetune"], "bench": ["adapter_lr"]}, where)
    ft = {**settings["finetune"], **tree.get("finetune", {}), **_flag_overrides(args, _FT_FLAGS).get("finetune", {})}
    try:
        recipe = FinetuneRecipe(**ft)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"[finetune]: {exc}") from None
    lr = args.lr or tree.get("bench", {}).get("adapter_lr") or settings["adapter_lr"]
    corpus = _load_corpus(args.corpus, args.tokenizer or pconf.get("tokenizer"))
    if args.domain not in corpus:
        raise ValueError(f"--domain {args.domain!r} is not in the corpus (domains: {', '.join(corpus.names)})")
    base_dir = os.path.join(args.prepared, "base")
    model = _load_base(base_dir)
    check_vocab(model, corpus.vocab_size, what="--prepared")
    splits = DomainSplits.of(corpus[args.domain].tokens, eval_fraction=recipe.eval_fraction)
    ctx = arch = None
    tams = bool(pconf.get("tams"))
    if tams:
        from .meta.bench import _tams_context  # noqa: PLC0415
        from .tams import load_tams  # noqa: PLC0415

        load_tams(model, os.path.join(args.prepared, "adapter"))
        with torch.random.fork_rng(devices=[]):
            ctx, arch = _tams_context(model, random_windows(splits.train, 16, recipe.seq_len,
                                                            step_generator(args.seed, 0, 77)))
        print(f"TAMS architecture chosen for {args.domain}: {_describe_architecture(arch)}", flush=True)
    else:
        load_adapter(model, os.path.join(args.prepared, "adapter"))
    mark_only_tarp_trainable(model)
    os.makedirs(args.out, exist_ok=True)
    log = _JsonlLog(os.path.join(args.out, "adapt.jsonl"))
    progress = _progress(args, [("finetune", recipe.steps, recipe.batch_size)])
    curve = finetune(model, tarp_parameters(model), splits.train, splits.eval, recipe, seed=args.seed,
                     lr=lr, progress=progress, desc=f"adapt to {args.domain}", context=ctx,
                     on_eval=lambda s, loss, t: log({"step": s, "loss": loss, "seconds": t}))
    adapter_dir = os.path.join(args.out, "adapter")
    if tams:
        from .tams import save_tams  # noqa: PLC0415

        save_tams(model, adapter_dir, architectures=arch)
    else:
        save_adapter(model, adapter_dir)
    write_json({
        "prepared": os.path.abspath(args.prepared), "base": os.path.abspath(base_dir),
        "adapter": os.path.abspath(adapter_dir), "domain": args.domain, "tams": tams,
        "architecture": _architecture_json(arch) if arch is not None else None,
        "tokenizer": args.tokenizer or pconf.get("tokenizer"), "recipe": recipe.to_dict(), "lr": lr,
        "seed": args.seed, "curve": curve}, os.path.join(args.out, "adapt_config.json"))
    print(f"{'step':>6} {'loss':>8} {'seconds':>8}")
    for step, loss, secs in curve:
        print(f"{step:>6d} {loss:>8.4f} {secs:>8.2f}")
    load = ("m = load_base_model(base); tams.load_tams(m, adapter) and the architecture in adapt_config.json"
            if tams else "m = load_base_model(base); tarp_fast.load_adapter(m, adapter)")
    print(f"adapter written to {adapter_dir}. It applies to the base model in {base_dir} (keep both): "
          f"`tarp-fast generate {args.out} --prompt TEXT` or `tarp-fast eval {args.out} --corpus ... --domain "
          f"{args.domain}`; in Python: {load} (load_base_model: tarp_fast.meta.models)")
    return 0


def _load_run(folder: str):
    """``(model, info)`` for a folder of `adapt` (its adapter on its prepared base) or `prepare`;
    ``info["context"]`` runs the model's TAMS architecture (``None`` without TAMS)."""
    from . import load_adapter  # noqa: PLC0415

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder written by `tarp-fast adapt` or `tarp-fast prepare`")
    adapt_path = os.path.join(folder, "adapt_config.json")
    if os.path.isfile(adapt_path):
        with open(adapt_path, encoding="utf-8") as fh:
            aconf = json.load(fh)
        prepared, adapter = aconf["prepared"], os.path.join(folder, "adapter")
    else:
        aconf, prepared, adapter = None, folder, os.path.join(folder, "adapter")
    pconf = _read_prepared(prepared)
    model = _load_base(os.path.join(prepared, "base"))
    context = None
    if pconf.get("tams"):
        from .tams import load_tams, use_architecture  # noqa: PLC0415

        if aconf is None or aconf.get("architecture") is None:
            raise ValueError(f"{folder} holds a TAMS model without a chosen architecture: run `tarp-fast adapt` "
                             "(it picks the domain's architecture) and pass its --out folder")
        load_tams(model, adapter)
        arch = _architecture_from_json(aconf["architecture"])
        context = lambda: use_architecture(model, arch)  # noqa: E731
    else:
        load_adapter(model, adapter)
    model.eval()
    return model, {"prepared": prepared, "adapter": adapter, "pconf": pconf, "aconf": aconf, "context": context,
                   "tokenizer": (aconf or {}).get("tokenizer") or pconf.get("tokenizer")}


def _generate_cmd(args: argparse.Namespace) -> int:
    import contextlib  # noqa: PLC0415

    import torch  # noqa: PLC0415

    _set_threads(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, info = _load_run(args.folder)
    tok = _tokenizer(args.tokenizer or info["tokenizer"])
    ids = tok.encode(args.prompt).unsqueeze(0)
    if ids.shape[1] == 0:
        raise ValueError("--prompt is empty")
    ctx = info["context"] or contextlib.nullcontext
    gen_kw = dict(max_new_tokens=args.max_new_tokens, use_cache=not args.no_kv_cache,
                  pad_token_id=model.config.eos_token_id if model.config.eos_token_id is not None else 0)
    if args.temperature > 0:
        gen_kw.update(do_sample=True, temperature=args.temperature, top_k=0)
    else:
        gen_kw.update(do_sample=False)
    torch.manual_seed(args.seed)
    with torch.no_grad(), ctx():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen_kw)
    print(args.prompt + tok.decode(out[0, ids.shape[1]:]))
    return 0


def _eval_cmd(args: argparse.Namespace) -> int:
    from .data.sampling import DomainSplits, eval_windows  # noqa: PLC0415
    from .meta.finetune import FinetuneRecipe, evaluate  # noqa: PLC0415
    from .meta.models import check_vocab  # noqa: PLC0415

    _set_threads(args)
    model, info = _load_run(args.folder)
    corpus = _load_corpus(args.corpus, args.tokenizer or info["tokenizer"])
    if args.domain not in corpus:
        raise ValueError(f"--domain {args.domain!r} is not in the corpus (domains: {', '.join(corpus.names)})")
    check_vocab(model, corpus.vocab_size, what=args.folder)
    recipe = FinetuneRecipe(**(info["aconf"] or {}).get("recipe", info["pconf"]["settings"]["finetune"]))
    splits = DomainSplits.of(corpus[args.domain].tokens, eval_fraction=recipe.eval_fraction)
    ev = eval_windows(splits.eval, args.eval_windows or recipe.eval_windows, recipe.seq_len)
    with_adapter = evaluate(model, ev, context=info["context"])
    base = evaluate(_load_base(os.path.join(info["prepared"], "base")), ev)
    print(f"{args.domain}: held-out loss {with_adapter:.4f} nats/token with the adapter ({info['adapter']}), "
          f"{base:.4f} for the base alone ({ev.shape[0]} windows of {recipe.seq_len} tokens)")
    return 0


def _config_cmd(args: argparse.Namespace) -> int:
    print(config_reference(), end="")
    return 0


# ---- parser ----------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, *, config: Optional[str] = "all", progress: bool = True) -> None:
    g = p.add_argument_group("run")
    if config == "all":
        g.add_argument("--config", metavar="FILE.toml", default=None,
                       help="TOML file with [model] [pretrain] [prep] [finetune] [bench] tables; flags win over it; "
                            "`tarp-fast config` lists every key (default: none)")
    elif config == "finetune":
        g.add_argument("--config", metavar="FILE.toml", default=None,
                       help="TOML file with a [finetune] table (and [bench] adapter_lr); the prepared model fixes "
                            "the rest (default: the prepared settings)")
    g.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    if progress:
        g.add_argument("--no-progress", action="store_true",
                       help="no bars or periodic lines: one line per finished phase (default: off; bars on a "
                            "terminal, plain lines when stderr is redirected)")


def _corpus_flags(p: argparse.ArgumentParser, *, required: bool = False, default: Optional[str] = "machine",
                  recorded: bool = False, from_config: bool = False) -> None:
    g = p.add_argument_group("data")
    shown = "none, required" if required else ("[bench] corpus of --config, else machine" if from_config else default)
    g.add_argument("--corpus", default=None if required or from_config else default, required=required,
                   help="'machine' (text files found here), 'generated[:N]' (N independent generated Markov domains, "
                        "default 6), 'planted[:N]' (N generated domains with planted shared structure: one shared "
                        "Markov chain that each domain relabels and mixes in its own way, each with its known "
                        "optimal loss; default 8), a folder with one subfolder of text files per domain, a .jsonl "
                        "file of {\"domain\", \"text\"} records, or a corpus manifest "
                        f".json (default: {shown})")
    g.add_argument("--tokenizer", default=None,
                   help="'bytes' or a local transformers tokenizer folder (default: "
                        f"{'the one the model was prepared with' if recorded else 'bytes'})")


def _cache_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cache of pretrained bases")
    g.add_argument("--cache-dir", default=None,
                   help="folder of the cache (default: $TARP_FAST_CACHE_DIR, else $XDG_CACHE_HOME/tarp-fast, "
                        "else ~/.cache/tarp-fast)")
    g.add_argument("--no-cache", action="store_true", help="pretrain the base even if cached, and do not cache it "
                                                           "(default: off)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=110)


def _comparison_flags(p: argparse.ArgumentParser, own_flags, own_title: str, *, corpus_from_config: bool = False) -> None:
    """The flags of a command that trains every arm from scratch (``bench-adapt``, ``demo``,
    ``ablate``): corpus, common, cache, model, preparation and fine-tuning settings, then its own."""
    _corpus_flags(p, from_config=corpus_from_config)
    _common(p)
    _cache_flags(p)
    _add_setting_flags(p, _MODEL_FLAGS, "model")
    _add_setting_flags(p, _PREP_FLAGS, "preparation")
    _add_setting_flags(p, _FT_FLAGS, "fine-tuning")
    _add_setting_flags(p, own_flags, own_title)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="tarp-fast", formatter_class=_Formatter,
        description="TARP / MLtD: prepare a model (meta-training), adapt it to a domain, run it, benchmark it.",
        epilog="Typical run:\n"
               "  tarp-fast prepare --corpus DIR --heldout news --out prep\n"
               "  tarp-fast adapt --prepared prep --corpus DIR --domain news --out news\n"
               "  tarp-fast generate news --prompt 'Once'\n"
               "Exit status: 0 ok, 2 bad arguments or data, 3 a NaN/inf loss, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"tarp-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_, **kw):
        return sub.add_parser(name, help=help_, description=help_, formatter_class=_Formatter, **kw)

    p = add("prepare", "MLtD preparation (meta-training) of a base model; torchrun-ready")
    g = p.add_argument_group("what")
    g.add_argument("--out", required=True, help="output folder: base/, adapter/, checkpoints/, prepare.jsonl "
                                                "(required; a rerun with the same --out resumes)")
    g.add_argument("--heldout", default=None, help="comma-separated domains to leave out of preparation "
                                                   "(default: none)")
    g.add_argument("--model", default=None, help="local transformers causal-LM folder to start from "
                                                 "(default: pretrain a small GPT-2, see [model])")
    g.add_argument("--tams", action="store_true", help="add TAMS: controller and searched cells (default: off)")
    g.add_argument("--no-resume", action="store_true", help="start over even if --out has checkpoints "
                                                            "(default: off, resume)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the base with FSDP2 over the torchrun ranks, for a model that does not fit one "
                        "device; the TARP factors stay whole on every rank (default: off, a whole model per rank)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    _corpus_flags(p)
    _common(p)
    _cache_flags(p)
    _add_setting_flags(p, _MODEL_FLAGS, "model (when --model is not given; the TARP rank and variant always)")
    _add_setting_flags(p, _PREP_FLAGS + _CHECKPOINT_FLAGS, "preparation")
    _add_setting_flags(p, _FT_FLAGS, "fine-tuning (recorded for `adapt`; --seq-len and --batch-size also set "
                                     "the preparation's)")
    p.set_defaults(func=_prepare_cmd)

    a = add("adapt", "fine-tune the adapter of a prepared model on one domain")
    g = a.add_argument_group("what")
    g.add_argument("--prepared", required=True, help="folder written by `tarp-fast prepare` (required)")
    g.add_argument("--domain", required=True, help="the domain of --corpus to adapt to (required)")
    g.add_argument("--out", required=True, help="output folder: adapter/, adapt_config.json, adapt.jsonl "
                                                "(required)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: the prepared settings' "
                                                          "[bench] adapter_lr)")
    g.add_argument("--seed", type=int, default=0, help="seed of the batches (default: 0)")
    _corpus_flags(a, recorded=True)
    _common(a, config="finetune")
    _add_setting_flags(a, _FT_FLAGS, "fine-tuning", default_from="the prepared settings'")
    a.set_defaults(func=_adapt_cmd)

    gen = add("generate", "generate text with a prepared or adapted model (its base plus its adapter)")
    gen.add_argument("folder", help="a folder written by `tarp-fast adapt` (or `prepare`)")
    gen.add_argument("--prompt", required=True, help="the text to continue (required)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy "
                                                                    "(default: 0)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    gen.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence at every token "
                                                                "(default: off, use the KV cache)")
    gen.add_argument("--tokenizer", default=None, help="'bytes' or a tokenizer folder (default: the one the "
                                                       "model was prepared with)")
    _common(gen, config=None, progress=False)
    gen.set_defaults(func=_generate_cmd)

    ev = add("eval", "held-out loss of a prepared or adapted model on one domain, and of its base alone")
    ev.add_argument("folder", help="a folder written by `tarp-fast adapt` (or `prepare`)")
    ev.add_argument("--domain", required=True, help="the domain of --corpus to evaluate on (required)")
    ev.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: the recipe's "
                                                                   "[finetune] eval_windows)")
    _corpus_flags(ev, recorded=True)
    _common(ev, config=None, progress=False)
    ev.set_defaults(func=_eval_cmd)

    b = add("bench-adapt", "adaptation-time benchmark of the arms on held-out domains (MLtD vs matched controls)")
    g = b.add_argument_group("what")
    g.add_argument("--heldout", default=None, help="comma-separated held-out domains (required, here or as [bench] "
                                                   "heldout of --config; default: [bench] heldout)")
    g.add_argument("--json", default=None, help="write the results here (default: not written)")
    g.add_argument("--png", default=None, help="write the loss curves here (default: not written)")
    g.add_argument("--log", default=None, help="JSONL log of every phase (default: none)")
    g.add_argument("--model", default=None, help="local transformers causal-LM folder every arm starts from "
                                                 "(default: pretrain a small GPT-2 on the preparation domains)")
    g.add_argument("--work-dir", default=None, help="keep the preparation logs here (default: not kept)")
    _comparison_flags(b, _BENCH_FLAGS, "benchmark", corpus_from_config=True)
    b.set_defaults(func=_bench_adapt)

    d = add("demo", "the whole comparison on text found on this machine (minutes on CPU)")
    g = d.add_argument_group("what")
    g.add_argument("--out", default="tarp-fast-demo", help="output folder (default: ./tarp-fast-demo)")
    g.add_argument("--max-bytes", type=int, default=300_000, help="text per domain found on this machine, in bytes "
                                                                  "(default: 300000)")
    g.add_argument("--heldout", default=None, help="comma-separated held-out domains (default: [bench] heldout of "
                                                   f"--config, else the first two of {', '.join(DEMO_HELDOUT)} "
                                                   "present)")
    _comparison_flags(d, _BENCH_FLAGS, "benchmark", corpus_from_config=True)
    d.set_defaults(func=_demo)

    a = add("ablate", "adapter ablation (the paper's Table 6, small): TARP variants with and without the Hadamard "
                      "term at matched parameter budgets, full fine-tuning and PEFT LoRA, over seeds")
    g = a.add_argument_group("what")
    g.add_argument("--heldout", required=True, help="comma-separated held-out domains (required)")
    g.add_argument("--json", default=None, help="write the results here (default: not written)")
    g.add_argument("--png", default=None, help="write the plot of final losses here (default: not written)")
    g.add_argument("--log", default=None, help="JSONL log of every phase (default: none)")
    _comparison_flags(a, _ABLATE_FLAGS, "ablation")
    a.set_defaults(func=_ablate)

    c = add("config", "print the reference TOML file: every setting, its default and meaning")
    c.set_defaults(func=_config_cmd)
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
    """Entry point; returns the exit status (2: bad arguments or data, 3: a NaN/inf loss, 130: Ctrl-C)."""
    _drop_source_root_from_path()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2): a status, not an exception
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    from .meta.finetune import NonFiniteLossError  # noqa: PLC0415

    try:
        return int(args.func(args) or 0)
    except NonFiniteLossError as exc:
        print(f"tarp-fast {args.command}: {exc}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as exc:
        print(f"tarp-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)
        print(f"\ntarp-fast {args.command}: {hint() if hint else 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
