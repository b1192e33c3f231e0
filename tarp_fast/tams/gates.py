"""Sublayer keep/skip and the searched cell, wired into a Hugging Face model we do not control.

:func:`install` replaces the ``forward`` of a few modules of each gated layer (as instance
attributes: the state dict and the module tree do not change; :func:`uninstall` deletes them):

* the *entry* linears of a sublayer (see :mod:`tarp_fast.tams.blocks`) compute only the rows
  of kept sequences; the others output exactly 0 and are not computed;
* the *exit* linear does the same, then (FFN only) adds the searched cell on the kept
  sequences, then multiplies by the gate ``z`` of each sequence::

      sublayer_b(x) = z_b · exit(... entry(x_b) ...)                  (attention)
      ffn_b(x)      = z_b · (f_b + O · mean(n2, n3, n4) + o),  f_b = exit(act(entry(x_b)))

  with ``z_b = gates[task_b, layer, sublayer]``: a skipped sequence (``z_b = 0``) adds nothing
  to the residual stream, exactly as if its sublayer had been removed.
* the sublayer *module* (GPT-2 ``attn``/``mlp``, Llama ``self_attn``/``mlp``, BART
  ``self_attn``) is not called at all when every sequence of the batch skips it and no KV
  cache is passed (a skipped call would leave the cache short); it returns zeros.
* a position-wise FFN *module* (GPT-2 and Llama ``mlp``) whose batch is partly skipped runs on
  the kept sequences only (gathered, then scattered back into zeros), so its activation is not
  computed for skipped rows either; its linears then see a batch that is all kept. BART's FFN
  is inline code of the block: there the linears skip rows (``hard_skip``) and the activation
  runs on the zero rows.

How rows are not computed: a :class:`~tarp_fast.TARPLinear` gets a per-row 0/1 gate through
:func:`tarp_fast.tarp_context` with ``hard_skip=True`` (the op's contract: rows whose gate is 0
are not computed); a plain ``nn.Linear`` or GPT-2 ``Conv1D`` goes through
:func:`tarp_fast.ops.tarp_linear` with the same gate and no delta. The attention core (softmax
over keys) of a partially skipped batch still runs on the zero rows: its cost is the
``O(S²)`` part only.

Every parameter stays in the autograd graph whatever is skipped (``0 · p[0]`` anchors), so
``DistributedDataParallel`` needs no ``find_unused_parameters``.

Outside :func:`activate` (no architecture), the wrappers call the original forward: the model
is exactly its base (the cells are not applied).

Activation checkpointing (``torch.utils.checkpoint``, transformers'
``activation_checkpointing_enable()``): every wrapper reads the active architecture through
:func:`tarp_fast.nn.context.replay_routing`, so a block recomputed in backward runs with the
architecture of the forward it replays, also when backward runs after :func:`activate` exited.

One host sync per forward and batch size: the per-sequence decisions (which op, which
sublayer) are read on the host once, then shared by every layer.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .. import ops
from ..nn.context import current_context, replay_routing, tarp_context
from ..nn.linear import TARPLinear, _is_conv1d, expand_task_index
from .cell import CellPlan, make_plan

__all__ = ["ActiveArchitecture", "activate", "deactivated", "install", "uninstall", "active"]

ATTENTION, FFN = 0, 1
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class _GateInfo:
    """Host-side summary of one sublayer's decisions over the batch."""

    status: str  # "all" (every sequence kept), "none" (every sequence skipped), "mixed"
    ones: bool  # every z of a kept sequence is exactly 1 (no scaling needed without gradient)
    kept: Optional[torch.Tensor]  # [B_kept] int64 sequence indices (mixed only)
    kept_list: tuple[int, ...]
    seq_mask: Optional[torch.Tensor]  # [B] 0/1 (mixed only)


@dataclass
class _BatchInfo:
    ti: torch.Tensor  # [B] int64, device
    plan: Optional[CellPlan]
    ops_seq: Optional[torch.Tensor]  # [B, 9] int64, device
    gates: Optional[list[list[_GateInfo]]]  # [L][2]
    subplans: dict[tuple[int, ...], CellPlan] = field(default_factory=dict)


class ActiveArchitecture:
    """The architecture in force for the current forward pass (see :func:`activate`)."""

    def __init__(self, record, arch, task_index: Optional[torch.Tensor]):
        self.record = record
        self.arch = arch
        self.task_index = task_index
        self._batches: dict[int, _BatchInfo] = {}
        self.stash: dict[int, torch.Tensor] = {}
        # (layer, sublayer) -> (batch info, gate info) while a compacted FFN call runs
        self.inside: dict[tuple[int, int], tuple] = {}

    def batch(self, B: int, device) -> _BatchInfo:
        info = self._batches.get(B)
        if info is not None:
            return info
        if self.task_index is not None:
            n = self.task_index.shape[0]
            if n != B and not (0 < n < B and B % n == 0):
                raise RuntimeError(
                    f"TAMS: the architecture was activated with task_index for {n} sequences, but a layer got a "
                    f"batch of {B}, not a multiple of {n} (generate's num_beams/num_return_sequences repeat each "
                    "sequence in a row; any other reshaped batch needs its own task_index)"
                )
            # generate(num_beams=k) repeats each sequence k times in a row: each copy keeps its task
            ti = expand_task_index(self.task_index, B).to(device)
        else:
            ti = torch.zeros(B, dtype=torch.int64, device=device)
        ti_host = ti.tolist()  # the one host sync of this batch
        arch = self.arch
        plan = ops_seq = None
        if arch.op_weights is not None:
            ops_host = arch.ops.cpu()
            plan = make_plan(ops_host[ti_host].tolist(), device=device)
            ops_seq = ops_host[ti_host].to(device)
        gates = None
        if arch.gates is not None:
            zh = arch.gates.detach().cpu()[ti_host]  # [B, L, 2]
            gates = []
            for layer in range(zh.shape[1]):
                row = []
                for sub in (ATTENTION, FFN):
                    z = zh[:, layer, sub]
                    keep = z != 0
                    n_keep = int(keep.sum())
                    if n_keep == B:
                        row.append(_GateInfo("all", bool((z == 1).all()), None, tuple(range(B)), None))
                    elif n_keep == 0:
                        row.append(_GateInfo("none", False, None, (), None))
                    else:
                        kept_list = tuple(int(i) for i in torch.nonzero(keep).squeeze(-1).tolist())
                        row.append(_GateInfo("mixed", bool((z[keep] == 1).all()),
                                             torch.tensor(kept_list, dtype=torch.int64, device=device),
                                             kept_list, keep.to(device)))
                gates.append(row)
        info = _BatchInfo(ti, plan, ops_seq, gates)
        self._batches[B] = info
        return info

    def z_seq(self, info: _BatchInfo, layer: int, sub: int) -> torch.Tensor:
        """``[B]`` gate of each sequence (differentiable in the controller's output)."""
        return self.arch.gates.index_select(0, info.ti)[:, layer, sub]

    def edge_weight_seq(self, info: _BatchInfo) -> torch.Tensor:
        """``[B, 9]`` value of each sequence's chosen one-hot weight (carries the ST gradient)."""
        w = self.arch.op_weights.index_select(0, info.ti)  # [B, 9, 6]
        return w.gather(-1, info.ops_seq.unsqueeze(-1)).squeeze(-1)

    def subplan(self, info: _BatchInfo, g: _GateInfo) -> CellPlan:
        key = g.kept_list
        if key not in info.subplans:
            info.subplans[key] = info.plan.subset(g.kept, list(key))
        return info.subplans[key]


_ACTIVE: contextvars.ContextVar[Optional[ActiveArchitecture]] = contextvars.ContextVar("tams_active", default=None)


def active() -> Optional[ActiveArchitecture]:
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(state: ActiveArchitecture):
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def deactivated():
    """Run the model as its base inside an active architecture (task embeddings use it)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# ---- helpers ------------------------------------------------------------------------------------
def anchor(out: torch.Tensor, params) -> torch.Tensor:
    """``out + 0 · Σ p[0]`` over ``params`` that require grad (keeps them in the graph)."""
    if not torch.is_grad_enabled():
        return out
    firsts = [p.reshape(-1)[:1].to(out.dtype) for p in params if p.requires_grad]
    if not firsts:
        return out
    return out + 0.0 * torch.cat(firsts).sum()


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if _is_conv1d(module):
        return module.nf
    raise TypeError(f"TAMS: cannot gate {type(module).__name__}: expected nn.Linear, TARPLinear or Conv1D")


def _row_mask(x: torch.Tensor, seq_mask: torch.Tensor) -> torch.Tensor:
    """Expand a per-sequence ``[B]`` mask to the ``[M]`` rows of ``x [B, ..., K]``."""
    B = x.shape[0]
    per = x[..., 0].numel() // B if B else 0
    return seq_mask.to(x.dtype).repeat_interleave(per)


def _masked_linear(module: nn.Module, orig, x: torch.Tensor, seq_mask: torch.Tensor) -> torch.Tensor:
    """``mask_m · module(x_m)`` with rows of mask 0 not computed (hard_skip)."""
    mask = _row_mask(x, seq_mask)
    if isinstance(module, TARPLinear):
        outer = current_context()
        if outer is not None and id(module) in outer.gates:
            raise RuntimeError(
                "TAMS: a tarp_context gate is set for a layer that TAMS gates; pass gates only for layers TAMS "
                "does not control"
            )
        # Keep the caller's task routing (multi-task TARP factors) inside our context.
        with tarp_context(task_index=outer.task_index if outer is not None else None,
                          gates={module: mask}, hard_skip=True):
            return orig(x)
    if isinstance(module, nn.Linear):
        return ops.tarp_linear(x, module.weight, module.bias, gate=mask, hard_skip=True)
    if _is_conv1d(module):
        return ops.tarp_linear(x, module.weight.t(), module.bias, gate=mask, hard_skip=True)
    return orig(x) * mask.view(*x.shape[:-1], 1)


# ---- wrappers -----------------------------------------------------------------------------------
class _InstalledForward:
    """A forward installed on a module of a gated layer.

    A callable object rather than a closure, so that ``copy.deepcopy`` (and pickling) of the
    model re-points it at the copy's record and modules: a closure would be shared by the copy
    and keep computing with the original model's weights. ``orig`` is a forward that was
    installed before ours, or ``None`` for the module's own class forward.
    """

    def __init__(self, record, layer: int, sub: int, module: nn.Module, orig):
        self.record, self.layer, self.sub, self.module, self.orig = record, layer, sub, module, orig

    def call_orig(self, *args, **kwargs):
        if self.orig is not None:
            return self.orig(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


class _LinearForward(_InstalledForward):
    """Entry/exit linear of a sublayer: gated rows, and the cell on the FFN exit."""

    def __init__(self, record, layer: int, sub: int, role: str, module: nn.Module, orig):
        super().__init__(record, layer, sub, module, orig)
        self.role = role

    def __call__(self, x, *args, **kwargs):
        record, layer, sub, role, module, orig = (self.record, self.layer, self.sub, self.role, self.module,
                                                  self.call_orig)
        st = replay_routing(self, _ACTIVE.get())  # a checkpointed recomputation: the original's
        if st is None or st.record is not record or args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 2:
            return orig(x, *args, **kwargs)
        inner = st.inside.get((layer, sub))
        if inner is not None:
            # Inside a compacted sublayer call: x holds the kept sequences only.
            info, g = inner
            rows, status = g.kept, "all"
        else:
            info = st.batch(x.shape[0], x.device)
            g = info.gates[layer][sub] if info.gates is not None else None
            rows, status = None, (g.status if g is not None else "all")
        cell = record.cells[layer] if (record.cells is not None and sub == FFN) else None
        if role == "entry" and cell is not None:
            st.stash[layer] = x
        if status == "all":
            y = orig(x)
        elif status == "none":
            # Anchor the input too: an exit that ignores its input would cut the entry layers
            # (and the norm before them) out of the graph.
            y = anchor(x.new_zeros(*x.shape[:-1], _out_features(module)), [*module.parameters(), x])
        else:
            y = _masked_linear(module, orig, x, g.seq_mask)
        if role != "exit":
            return y
        if cell is not None:
            y = _apply_cell(st, info, layer, cell, y, g, rows)
        if g is not None:
            z = st.z_seq(info, layer, sub)
            if rows is not None:
                z = z.index_select(0, rows)
            # Skipped rows are already exact zeros; kept rows need z unless it is exactly 1.
            if z.requires_grad or not g.ones:
                y = y * z.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
        return y


def _apply_cell(st: ActiveArchitecture, info: _BatchInfo, layer: int, cell, f: torch.Tensor, g,
                rows: Optional[torch.Tensor]) -> torch.Tensor:
    """Add the cell to the FFN output ``f`` of the kept sequences (``rows``: f is compacted)."""
    x_in = st.stash.pop(layer, None)
    if x_in is None or x_in.shape[:-1] != f.shape[:-1]:
        raise RuntimeError(f"TAMS: the FFN exit of layer {layer} ran without its entry's input (unexpected call order)")
    if f.dim() != 3:
        raise RuntimeError(f"TAMS: the searched cell needs [batch, seq, width] FFN outputs, got {list(f.shape)}")
    if info.plan is None:
        return f
    if g is not None and g.status == "none":
        return anchor(f, cell.parameters())
    w = st.edge_weight_seq(info)
    # info.ti: each sequence's task, read by the cell when its weights are stacked per task
    # (the preparation stage's batched inner loop)
    if g is None or g.status == "all":
        return cell(x_in, f, w, info.plan, info.ti)
    kept = g.kept
    plan = st.subplan(info, g)
    ti = info.ti.index_select(0, kept)
    if rows is not None:
        return cell(x_in, f, w.index_select(0, kept), plan, ti)
    c = cell(x_in.index_select(0, kept), f.index_select(0, kept), w.index_select(0, kept), plan, ti)
    return f.index_copy(0, kept, c)


class _ModuleForward(_InstalledForward):
    """A whole sublayer module: not called when every sequence skips it, compacted when some do."""

    def __call__(self, *args, **kwargs):
        record, layer, sub, module, orig = self.record, self.layer, self.sub, self.module, self.call_orig
        st = replay_routing(self, _ACTIVE.get())  # a checkpointed recomputation: the original's
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if st is None or st.record is not record or not isinstance(hs, torch.Tensor) or hs.dim() < 2:
            return orig(*args, **kwargs)
        info = st.batch(hs.shape[0], hs.device)
        g = info.gates[layer][sub] if info.gates is not None else None
        if g is not None and g.status == "mixed" and sub == FFN and len(args) + len(kwargs) == 1:
            # A position-wise FFN module: run it on the kept sequences only (activation included),
            # then scatter back; skipped sequences get exactly 0.
            st.inside[(layer, sub)] = (info, g)
            try:
                with _compacted_tarp_context(hs, g.kept):
                    y = orig(hs.index_select(0, g.kept))
            finally:
                del st.inside[(layer, sub)]
            return y.new_zeros((hs.shape[0],) + y.shape[1:]).index_copy(0, g.kept, y)
        if g is None or g.status != "none" or any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
            return orig(*args, **kwargs)
        # Every sequence skips this sublayer: do not call it. Output 0 (= z · sublayer with z = 0).
        params = list(module.parameters())
        if sub == FFN and record.cells is not None:
            params += list(record.cells[layer].parameters())
        out = anchor(hs.new_zeros(hs.shape), params + [hs])
        z = st.z_seq(info, layer, sub)
        if z.requires_grad:
            out = out + 0.0 * z.sum().to(out.dtype)
        return (out, None) if sub == ATTENTION else out


@contextlib.contextmanager
def _compacted_tarp_context(hs: torch.Tensor, kept: torch.Tensor):
    """Restrict an enclosing ``tarp_context``'s task routing to the kept sequences.

    Multi-task TARP layers read ``task_index`` (``[B]``, ``[B, S]`` or ``[B·S]``) from the context;
    inside a compacted call they see only the kept sequences, so their ids must be compacted too.
    """
    outer = current_context()
    if outer is None or outer.task_index is None:
        yield
        return
    ti = outer.task_index
    B = hs.shape[0]
    if not isinstance(ti, torch.Tensor):
        ti = torch.as_tensor(ti)
    ti = ti.to(kept.device)
    if ti.dim() == 1 and 0 < ti.shape[0] < B and B % ti.shape[0] == 0:
        ti = expand_task_index(ti, B)  # per-sequence ids of a batch generate expanded for beams
    elif ti.dim() == 1 and ti.shape[0] != B and ti.numel() % B == 0:
        ti = ti.reshape(B, -1)  # flattened rows of [B, S]
    if ti.shape[0] != B:
        raise RuntimeError(f"TAMS: the tarp_context task_index {list(ti.shape)} does not match the batch of {B} sequences")
    # inherit: gates the caller routed to other layers still apply
    with tarp_context(task_index=ti.index_select(0, kept), inherit=True):
        yield


def _wrap(module: nn.Module, make) -> tuple:
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    # None: the class forward (looked up at call time, so a copy calls its own); else a forward
    # someone else installed on the instance, called as it is
    module.forward = make(old if had else None)
    return (module, had, old)


def install(record) -> list[tuple]:
    """Wrap the modules of every gated layer of ``record``; return what :func:`uninstall` needs."""
    wrapped = []
    for spec in record.blocks:
        for sub in (ATTENTION, FFN):
            if not record.gates and not (sub == FFN and record.cells is not None):
                continue
            s = spec.sublayer(sub)
            for role, paths in (("entry", s.entry), ("exit", (s.exit,))):
                for path in paths:
                    m = spec.block.get_submodule(path)
                    _out_features(m)  # a clear error for an unexpected layer type
                    wrapped.append(_wrap(m, lambda orig, m=m, role=role, sub=sub, i=spec.index:
                                         _LinearForward(record, i, sub, role, m, orig)))
            if record.gates and s.module is not None:
                m = spec.block.get_submodule(s.module)
                wrapped.append(_wrap(m, lambda orig, m=m, sub=sub, i=spec.index:
                                     _ModuleForward(record, i, sub, m, orig)))
    return wrapped


def uninstall(wrapped: list[tuple]) -> None:
    for module, had, old in reversed(wrapped):
        if had:
            module.forward = old
        else:
            module.__dict__.pop("forward", None)
