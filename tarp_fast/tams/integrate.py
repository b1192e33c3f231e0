"""Put TAMS into a model, run it with per-task architectures, save it, report what it chose.

Typical use (the TARP layers first, then TAMS)::

    patch_model(model, rank=8)
    controller = add_tams(model)                          # model.tams_controller, blocks' tams_cell
    emb = task_embeddings(model, [support_a, support_b])  # [T, E]
    arch = controller.sample(emb, step=step)              # hard samples, straight-through grads
    with use_architecture(model, arch, task_index=task_of_each_sequence):   # [B]
        loss = model(input_ids, labels=labels).loss
    save_tams(model, "adapter/")                          # TARP factors + cells + controller
    load_tams(fresh_model, "adapter/")                    # re-creates TAMS, then load_adapter

Added modules: ``model.tams_controller`` (:class:`TAMSController`) and one
``<block>.tams_cell`` (:class:`SearchedCell`) per gated layer; their names start with
``tams_`` so :func:`tarp_fast.tarp_parameters` and :func:`tarp_fast.save_adapter` include them.
The TAMS settings go in the adapter config's ``extra["tams"]``.

Activation (gradient) checkpointing of the blocks works: a block recomputed in backward runs with
the architecture (and the ``tarp_context`` routing) of the forward it replays, also when backward
runs after the ``with use_architecture(...)`` block (see :mod:`tarp_fast.tams.gates`).
KV-cached generation works with every op, conv ops included: the cells keep their windows in the
cache (see :mod:`tarp_fast.tams.cell`), and ``generate(num_beams=k)`` keeps each beam on its task.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..adapter import ADAPTER_CONFIG, load_adapter, read_adapter_config, save_adapter
from ..patch import patch_modules, tarp_layers, unpatch_modules
from . import gates as _gates
from .blocks import BlockSpec, find_blocks
from .cell import CELL_NAME, NUM_EDGES, OPS, SearchedCell
from .controller import Architecture, TAMSController, TemperatureSchedule
from .embedding import task_embedding_dim

__all__ = ["add_tams", "remove_tams", "use_architecture", "save_tams", "load_tams", "architecture_report",
           "sublayer_flops", "tams_record", "TAMS_FORMAT_VERSION"]

logger = logging.getLogger("tarp_fast.tams")
TAMS_FORMAT_VERSION = 1
_RECORD = "_tams_record"
_LAYER_KEYS = ("rank", "variant", "scale_weight", "scale_rank", "scaling", "num_tasks", "init")


@dataclass
class TAMSRecord:
    """What :func:`add_tams` did to a model (kept in ``model.__dict__``, not in its state)."""

    family: str
    blocks: list[BlockSpec]
    controller: TAMSController
    cells: Optional[list[SearchedCell]]
    gates: bool
    settings: dict
    wrapped: list
    watched: list  # (block, path, module): the wrapped layers must still be the model's


def tams_record(model: nn.Module) -> Optional[TAMSRecord]:
    """The :class:`TAMSRecord` of ``model``, or ``None`` without TAMS."""
    return model.__dict__.get(_RECORD)


def _check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"add_tams: argument '{name}' must be a bool, got {type(v).__name__}")


def add_tams(model: nn.Module, *, cell: bool = True, gates: bool = True, cell_width: int = 64,
             cell_init: str = "zero", hidden: int = 128, estimator: str = "gumbel",
             schedule: Optional[TemperatureSchedule] = None, gate_init: float = 3.0,
             threshold: float = 0.5, hidden_stats: bool = False) -> TAMSController:
    """Add the controller, one searched cell per FFN block and the sublayer gates; in place.

    Args:
        model: a GPT-2, BART or Llama-style transformers model (patched with
            :func:`tarp_fast.patch_model` or not; patch *before* adding TAMS).
        cell: add the searched cell. gates: add the sublayer keep/skip gates.
        cell_width: ``C``, the cell width (64). cell_init: ``"zero"`` (the cell adds 0 at
            first) or ``"normal"``.
        hidden, estimator, schedule, gate_init, threshold: see :class:`TAMSController`.
        hidden_stats: the controller reads ``[3D]`` embeddings (mean and std of a middle hidden
            state too) instead of ``[D]``; pass the same flag to :func:`task_embedding`.

    Returns the controller (also ``model.tams_controller``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_tams: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if tams_record(model) is not None:
        raise RuntimeError("add_tams: the model already has TAMS; call remove_tams(model) first")
    for name, v in (("cell", cell), ("gates", gates), ("hidden_stats", hidden_stats)):
        _check_bool(name, v)
    if not cell and not gates:
        raise ValueError("add_tams: arguments 'cell' and 'gates' are both False: nothing to add")
    family, blocks = find_blocks(model)
    param = next(model.parameters())
    kw = dict(device=param.device, dtype=param.dtype)
    d_model = task_embedding_dim(model)
    cells = None
    if cell:
        cells = [SearchedCell(d_model, cell_width, causal=spec.causal, init=cell_init, **kw) for spec in blocks]
    controller = TAMSController(task_embedding_dim(model, hidden_stats), len(blocks) if gates else 0, cell=cell,
                                hidden=hidden, estimator=estimator, schedule=schedule, gate_init=gate_init,
                                threshold=threshold, **kw)
    # Everything is validated: now change the model.
    if cells is not None:
        for spec, c in zip(blocks, cells):
            spec.block.add_module(CELL_NAME, c)
    model.add_module("tams_controller", controller)
    settings = {"format_version": TAMS_FORMAT_VERSION, "family": family, "num_layers": len(blocks),
                "cell": cell, "gates": gates, "cell_width": cell_width, "cell_init": cell_init,
                "hidden_stats": hidden_stats, **{k: v for k, v in controller.config().items()
                                                 if k in ("hidden", "estimator", "schedule", "gate_init", "threshold")}}
    record = TAMSRecord(family, blocks, controller, cells, gates, settings, [], [])
    record.wrapped = _gates.install(record)
    record.watched = [(spec.block, path, spec.block.get_submodule(path)) for spec in blocks
                      for s in (spec.attention, spec.ffn) for path in s.entry + (s.exit,)]
    model.__dict__[_RECORD] = record
    return controller


def remove_tams(model: nn.Module) -> nn.Module:
    """Undo :func:`add_tams`: unwrap the layers, delete the cells and the controller."""
    record = tams_record(model)
    if record is None:
        raise RuntimeError("remove_tams: the model has no TAMS (add_tams was not called)")
    _gates.uninstall(record.wrapped)
    for spec in record.blocks:
        if CELL_NAME in spec.block._modules:
            del spec.block._modules[CELL_NAME]
    model._modules.pop("tams_controller", None)
    del model.__dict__[_RECORD]
    return model


def _require(model: nn.Module, where: str) -> TAMSRecord:
    record = tams_record(model)
    if record is None:
        raise RuntimeError(f"{where}: the model has no TAMS; call tarp_fast.tams.add_tams(model) first")
    for block, path, module in record.watched:
        if block.get_submodule(path) is not module:
            raise RuntimeError(
                f"{where}: layer {path!r} of a TAMS block was replaced after add_tams (patch_model after "
                "add_tams?); call remove_tams(model), patch, then add_tams again"
            )
    return record


@contextlib.contextmanager
def use_architecture(model: nn.Module, arch: Architecture, task_index: Optional[torch.Tensor] = None):
    """Run ``model`` with the per-task architectures of ``arch`` inside the ``with`` block.

    ``task_index [B]`` (int64, in ``[0, T)``) gives the task of each sequence of the batch; it
    may be omitted when ``arch`` holds one task. Several tasks with different architectures
    share one forward pass: each sequence runs its own task's ops and sublayers only.

    Nest :func:`tarp_fast.tarp_context` (inside or outside) to route ``task_index`` to
    multi-task TARP layers as well.
    """
    record = _require(model, "use_architecture")
    if not isinstance(arch, Architecture):
        raise TypeError(f"use_architecture: argument 'arch' must be an Architecture, got {type(arch).__name__}")
    if record.cells is not None and arch.op_weights is None:
        raise ValueError("use_architecture: the model has searched cells but 'arch' has no op_weights")
    if record.cells is None and arch.op_weights is not None:
        raise ValueError("use_architecture: 'arch' has op_weights but the model has no searched cells (add_tams(cell=False))")
    L = len(record.blocks)
    if record.gates:
        if arch.gates is None or arch.gates.shape[1] != L:
            got = None if arch.gates is None else list(arch.gates.shape)
            raise ValueError(f"use_architecture: 'arch.gates' must be [T, {L}, 2] for this model, got {got}")
    elif arch.gates is not None:
        raise ValueError("use_architecture: 'arch' has gates but the model has none (add_tams(gates=False))")
    T = arch.num_tasks
    if task_index is None:
        if T != 1:
            raise ValueError(f"use_architecture: 'arch' has {T} tasks, so 'task_index' [batch] is required")
    else:
        if not isinstance(task_index, torch.Tensor) or task_index.dtype not in (torch.int64, torch.int32):
            raise TypeError("use_architecture: argument 'task_index' must be an int64 tensor [batch]")
        if task_index.dim() != 1 or task_index.numel() == 0:
            raise ValueError(f"use_architecture: argument 'task_index' must be 1-D [batch], got {list(task_index.shape)}")
        lo, hi = int(task_index.min()), int(task_index.max())
        if lo < 0 or hi >= T:
            raise ValueError(f"use_architecture: 'task_index' values must be in [0, {T}), got min {lo}, max {hi}")
        task_index = task_index.to(torch.int64)
    with _gates.activate(_gates.ActiveArchitecture(record, arch, task_index)) as state:
        yield state


# ---- save / load --------------------------------------------------------------------------------
def save_tams(model: nn.Module, directory: str, *, architectures: Optional[Architecture] = None) -> str:
    """:func:`tarp_fast.save_adapter` with the TAMS settings in ``extra["tams"]``.

    ``architectures`` (e.g. ``controller.deploy(embeddings)``) adds their report under
    ``extra["tams_architectures"]`` for inspection (not needed to load).
    """
    record = _require(model, "save_tams")
    extra = {"tams": dict(record.settings)}
    if architectures is not None:
        extra["tams_architectures"] = architecture_report(architectures, log=False)
    return save_adapter(model, directory, extra=extra)


def _settings_to_kwargs(settings: dict) -> dict:
    s = settings.get("schedule")
    return {"cell": settings["cell"], "gates": settings["gates"], "cell_width": settings["cell_width"],
            "cell_init": settings["cell_init"], "hidden": settings["hidden"], "estimator": settings["estimator"],
            "schedule": TemperatureSchedule(**s) if s is not None else None, "gate_init": settings["gate_init"],
            "threshold": settings["threshold"], "hidden_stats": settings["hidden_stats"]}


def load_tams(model: nn.Module, directory: str) -> TAMSController:
    """Re-create TAMS as saved by :func:`save_tams`, then :func:`tarp_fast.load_adapter`.

    An unpatched model is patched first as the adapter config says (so that TAMS wraps the TARP
    layers); a model that already has TAMS must have the same settings. Returns the controller.
    A failed load takes back the patching and TAMS it added, leaving ``model`` as it was.
    """
    path = os.path.join(directory, ADAPTER_CONFIG)
    config = read_adapter_config(directory)
    settings = (config.get("extra") or {}).get("tams") if isinstance(config, dict) else None
    if not isinstance(settings, dict):
        raise ValueError(f"load_tams: {path} has no TAMS settings (extra['tams']); it was not saved by save_tams")
    if settings.get("format_version") != TAMS_FORMAT_VERSION:
        raise ValueError(f"load_tams: TAMS format_version {settings.get('format_version')!r}, this tarp-fast reads "
                         f"{TAMS_FORMAT_VERSION}")
    try:
        kwargs = _settings_to_kwargs(settings)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"load_tams: {path} extra['tams'] is incomplete or malformed ({exc!r})") from exc
    record = tams_record(model)
    patched: list = []
    added = False
    try:
        if record is None:
            if not tarp_layers(model) and config.get("layers"):
                layers = config["layers"]
                patch_modules(model, {n: {k: cfg[k] for k in _LAYER_KEYS} for n, cfg in layers.items()})
                patched = list(layers)
            add_tams(model, **kwargs)
            added = True
            record = tams_record(model)
        else:
            mine = {k: v for k, v in record.settings.items()}
            diff = {k: (settings.get(k), mine.get(k)) for k in mine if settings.get(k) != mine.get(k)}
            if diff:
                raise ValueError(f"load_tams: the model's TAMS differs from the saved one (saved, model): {diff}")
        if record.settings["num_layers"] != settings.get("num_layers") or record.family != settings.get("family"):
            raise ValueError(f"load_tams: saved for a {settings.get('family')} model with {settings.get('num_layers')} "
                             f"layers, got a {record.family} model with {record.settings['num_layers']}")
        load_adapter(model, directory)
    except BaseException:
        # All or nothing, like load_adapter: take back what this call added, newest first.
        if added:
            remove_tams(model)
        unpatch_modules(model, patched)
        raise
    return record.controller


# ---- reports ------------------------------------------------------------------------------------
def architecture_report(arch: Architecture, *, log: bool = True) -> dict[str, object]:
    """Per-task architectures and their diversity across tasks (JSON-ready).

    ``{"tasks": [{"edges": [op per edge], "kept": {"attention": [...], "ffn": [...]}}, ...],
    "diversity": {"distinct": n, "edge_disagreement": d_e, "gate_disagreement": d_g,
    "op_counts": {op: count}, "kept_fraction": k}}`` where ``d_e`` (``d_g``) is the mean over
    task pairs of the fraction of edges (gates) that differ, and ``kept_fraction`` the mean
    fraction of kept sublayers. Logged at INFO on ``tarp_fast.tams`` when ``log``.
    """
    if not isinstance(arch, Architecture):
        raise TypeError(f"architecture_report: argument 'arch' must be an Architecture, got {type(arch).__name__}")
    tasks = arch.describe()
    T = len(tasks)
    ops = arch.ops.tolist() if arch.op_weights is not None else None
    kept = arch.kept.reshape(T, -1).tolist() if arch.gates is not None else None
    pairs = list(itertools.combinations(range(T), 2))

    def disagreement(rows):
        if rows is None or not pairs:
            return 0.0 if rows is not None else None
        return sum(sum(a != b for a, b in zip(rows[i], rows[j])) / max(len(rows[i]), 1) for i, j in pairs) / len(pairs)

    keys = {json.dumps(t, sort_keys=True) for t in tasks}
    div = {"distinct": len(keys), "edge_disagreement": disagreement(ops), "gate_disagreement": disagreement(kept)}
    if ops is not None:
        div["op_counts"] = {name: sum(row.count(i) for row in ops) for i, name in enumerate(OPS)}
    if kept is not None:
        div["kept_fraction"] = sum(map(sum, kept)) / max(sum(map(len, kept)), 1)
    report = {"tasks": tasks, "diversity": div}
    if log:
        for t, d in enumerate(tasks):
            logger.info("TAMS task %d: %s", t, json.dumps(d))
        logger.info("TAMS diversity over %d tasks: %s", T, json.dumps(div))
    return report


def sublayer_flops(model: nn.Module) -> torch.Tensor:
    """``[L, 2]`` multiply-adds per token of each gated sublayer's linear layers (and FFN cell).

    The attention core (``O(S)`` per token) is left out: it depends on the sequence length.
    Use it as ``flops`` of :func:`tarp_fast.tams.flop_budget_loss`.
    """
    record = _require(model, "sublayer_flops")
    out = torch.zeros(len(record.blocks), 2, dtype=torch.float64)
    for spec in record.blocks:
        for i, s in enumerate((spec.attention, spec.ffn)):
            for path in s.entry + (s.exit,):
                m = spec.block.get_submodule(path)
                out[spec.index, i] += m.weight.numel()
            if i == 1 and record.cells is not None:
                c = record.cells[spec.index]
                # mid-size estimate: projections plus one linear-sized op per edge
                out[spec.index, i] += 3 * c.d_model * c.width + NUM_EDGES * c.width * c.width
    return out

