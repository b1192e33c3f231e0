"""Per-call routing for TARP layers buried inside a model whose forward we do not control.

A Hugging Face model calls its linear layers with one argument. To run several tasks in one
batch (meta-learning, TAMS), the caller sets the row -> task map once around the model call::

    with tarp_fast.tarp_context(task_index=task_of_each_sequence):   # [B] or [B, S]
        logits = model(input_ids).logits

Every :class:`~tarp_fast.TARPLinear` without an explicit ``task_index`` reads it and expands a
per-sequence ``[B]`` map to its ``[B, S]`` rows. Gates can be routed the same way, keyed by the
layer (a ``dict`` from layer object to gate) so each sublayer gets its own.

**Activation checkpointing.** ``torch.utils.checkpoint`` (reentrant or not, and so
transformers' ``gradient_checkpointing_enable()`` / ``activation_checkpointing_enable()``)
runs a block's forward again during backward, typically after the ``with tarp_context(...)``
block has closed (``Trainer`` calls ``backward`` outside it) or inside another one. The routing
travels with the recomputation: :func:`replay_routing`, called by every TARP layer (and by the
TAMS wrappers for the active architecture) on each forward call, records the routing it used in
the checkpoint region's own bookkeeping object (the region's autograd node for reentrant
checkpointing, its ``_CheckpointFrame`` otherwise), and the recomputation of that region reads
it back, call by call, whatever context is active then. The records live as long as the
region's autograd graph. Under ``torch.compile`` the routing is a traced graph input and this
bookkeeping is not needed (it is skipped).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = ["tarp_context", "current_context", "TarpContext", "replay_routing", "routed_context"]


@dataclass(frozen=True)
class TarpContext:
    task_index: Optional[torch.Tensor] = None
    gates: dict[int, object] = field(default_factory=dict)  # id(layer) -> gate
    hard_skip: bool = False


# A plain list rather than a ContextVar: torch.compile traces list reads (guarding on them) but
# not ContextVar.get. The stack belongs to the process; one model is driven by one thread.
_STACK: list[TarpContext] = []


def current_context() -> Optional[TarpContext]:
    """The innermost active :func:`tarp_context`, or ``None``."""
    return _STACK[-1] if _STACK else None


@contextlib.contextmanager
def tarp_context(
    task_index: Optional[torch.Tensor] = None,
    gates: Optional[dict] = None,
    hard_skip: bool = False,
    *,
    inherit: bool = False,
):
    """Route ``task_index`` (``[B]``, ``[B, S]`` or ``[M]`` int64) and per-layer gates to TARP layers.

    ``gates`` maps a TARP layer (the module object) to its ``gate`` argument. With
    ``inherit=True`` a nested context keeps what the enclosing one routes: its ``task_index``
    when none is given, its gates (overridden per layer by ``gates``) and its ``hard_skip``.
    """
    outer = current_context() if inherit else None
    merged = dict(outer.gates) if outer is not None else {}
    merged.update({id(k): v for k, v in (gates or {}).items()})
    ctx = TarpContext(
        task_index=task_index if task_index is not None or outer is None else outer.task_index,
        gates=merged,
        hard_skip=hard_skip or (outer.hard_skip if outer is not None else False),
    )
    _STACK.append(ctx)
    try:
        yield ctx
    finally:
        _STACK.pop()


# ---- activation checkpointing: the routing travels with the recomputation ----------------------

_RECORDS = "_tarp_fast_routing"  # attribute set on a checkpoint region's bookkeeping object
_CURSORS = "_tarp_fast_replay"


class _CheckpointCodes:
    """Code objects of ``torch.utils.checkpoint`` that identify where a call runs (read once).

    * ``reentrant_fwd`` / ``reentrant_bwd``: ``CheckpointFunction.forward`` / ``.backward``;
      their ``ctx`` local is the region's autograd node, the same object in both.
    * ``pack`` / ``recompute_pack``: the saved-tensor pack hooks of a non-reentrant region's
      forward (closure ``frame``) and of its recomputation (closure ``target_frame_ref``).
    * ``unpack``: the non-reentrant unpack hook that runs the recomputation (local ``frame``).
    """

    def __init__(self) -> None:
        self.ok = False
        try:
            from torch.utils import checkpoint as ckpt  # noqa: PLC0415

            def inner(cls, name):
                return next(c for c in cls.__init__.__code__.co_consts
                            if hasattr(c, "co_name") and c.co_name == name)

            self.reentrant_fwd = ckpt.CheckpointFunction.forward.__code__
            self.reentrant_bwd = ckpt.CheckpointFunction.backward.__code__
            self.pack = inner(ckpt._checkpoint_hook, "pack_hook")
            self.unpack = inner(ckpt._checkpoint_hook, "unpack_hook")
            self.recompute_pack = inner(ckpt._recomputation_hook, "pack_hook")
            self.ok = True
        except Exception:  # another torch: checkpointed recomputation falls back to the live context
            pass


_codes: Optional[_CheckpointCodes] = None


def _closure_value(fn, name: str):
    while hasattr(fn, "__wrapped__"):  # torch._dynamo.disable wraps the recomputation's pack hook
        fn = fn.__wrapped__
    code = getattr(fn, "__code__", None)
    if code is None or name not in code.co_freevars:
        return None, None
    return code, fn.__closure__[code.co_freevars.index(name)].cell_contents


def _regions(codes: _CheckpointCodes):
    """``(forward_region, recompute_region)``: the innermost checkpoint region whose original
    forward this call is part of, and the innermost one being recomputed; either may be None."""
    fwd = rec = None
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None:
        pack = hooks[0]
        code, frame = _closure_value(pack, "frame")
        if code is codes.pack:
            fwd = frame
        else:
            code, ref = _closure_value(pack, "target_frame_ref")
            if code is codes.recompute_pack and ref is not None:
                rec = ref()
    in_backward = torch._C._current_graph_task_id() != -1
    # Reentrant regions run their forward under no_grad and recompute inside backward: find
    # them on the Python stack (only then: the walk costs about a microsecond).
    if (fwd is None and not torch.is_grad_enabled()) or (rec is None and in_backward):
        f = sys._getframe(2)
        want_fwd, want_rec = fwd is None and rec is None, rec is None
        while f is not None and (want_fwd or want_rec):
            code = f.f_code
            if want_fwd and code is codes.reentrant_fwd:
                fwd, want_fwd = f.f_locals.get("ctx"), False
            elif want_rec and code is codes.reentrant_bwd:
                rec, want_rec, want_fwd = f.f_locals.get("ctx"), False, False
            elif want_rec and code is codes.unpack:
                rec, want_rec, want_fwd = f.f_locals.get("frame"), False, False
            f = f.f_back
    return fwd, rec


def _attr_dict(obj: object, name: str) -> dict:
    d = getattr(obj, name, None)
    if d is None:
        d = {}
        setattr(obj, name, d)
    return d


def replay_routing(owner: object, live: Any) -> Any:
    """The routing ``owner`` (a layer, or a TAMS wrapper) uses for this forward call.

    ``live`` is what is active now (``current_context()``, or the active TAMS architecture).
    In the original forward of a ``torch.utils.checkpoint`` region the call records ``live`` in
    that region and returns it; in the region's recomputation it returns what the original
    forward recorded for ``owner`` (the n-th recomputed call gets the n-th recorded one), so the
    recomputation sees the routing of the forward it replays even when backward runs after the
    ``with`` block closed or inside another one. Outside checkpointing: ``live``.
    """
    global _codes
    if torch.compiler.is_compiling():
        return live
    if _codes is None:
        _codes = _CheckpointCodes()
    if not _codes.ok or torch.is_inference_mode_enabled():
        return live
    fwd, rec = _regions(_codes)
    routing = live
    if rec is not None:
        records = getattr(rec, _RECORDS, {}).get(id(owner))
        if records is not None:
            cursors = _attr_dict(rec, _CURSORS)
            key = (id(owner), torch._C._current_graph_task_id())
            n = cursors.get(key, 0)
            if n < len(records):
                routing = records[n]
                cursors[key] = n + 1
    if fwd is not None:
        _attr_dict(fwd, _RECORDS).setdefault(id(owner), []).append(routing)
    return routing


def routed_context(owner: object) -> Optional[TarpContext]:
    """:func:`current_context` as ``owner`` must see it (see :func:`replay_routing`)."""
    return replay_routing(owner, current_context())
