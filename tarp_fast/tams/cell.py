"""The searched cell that TAMS adds to a transformer's FFN block (DESIGN.md §5).

Topology (DARTS-style, fixed): two input nodes, three intermediate nodes, nine edges::

    n0 = relu(P0 x_in)        x_in  [B, S, D]: the FFN sublayer's input
    n1 = relu(P1 f)           f     [B, S, D]: the FFN sublayer's output
    n2 = e0(n0) + e1(n1)
    n3 = e2(n0) + e3(n1) + e4(n2)
    n4 = e5(n0) + e6(n1) + e7(n2) + e8(n3)
    cell(x_in, f) = f + O · mean(n2, n3, n4) + o        # P0, P1: D -> C; O: C -> D

``C`` is the cell width (default 64). Every edge ``e_k`` holds one instance of each candidate
operation (:data:`OPS`), acting on ``[B, S, C]``:

=============  ====================================================================
``linear``     ``relu(W x + b)``  (``C -> C``)
``conv3``      1-D convolution over the sequence, kernel 3, ``C -> C``
``conv5``      1-D convolution over the sequence, kernel 5, ``C -> C``
``glu``        ``a ⊙ sigmoid(g)`` with ``[a, g] = W x + b`` (``C -> 2C``)
``zero``       ``0``
``skip``       ``x``
=============  ====================================================================

Convolutions use "same" padding (``k // 2`` zeros on each side) in bidirectional models and
causal padding (``k - 1`` zeros on the left, none on the right) in autoregressive ones, so that
position ``s`` only sees positions ``<= s``.

**KV-cached generation.** With a cache, each forward sees only the new tokens, so a causal
convolution needs the inputs of the last ``k - 1`` positions before them. The cell keeps them: a
rolling window of the last 4 values (the longest kernel minus 1) of every node that feeds a conv
edge, per sequence, stored on the cache object itself (the block tells the cell which cache and
layer it runs with; see :mod:`tarp_fast.tams.blocks`). A forward whose cache holds no past tokens
starts a new window (zeros before position 0, as the padding); a later one must continue the
window exactly where the cache is (same past length and batch), else it is refused with a
``RuntimeError`` rather than computed wrongly. The cache's beam-search and batch methods
(``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``) move the windows with
the keys and values, and ``copy.deepcopy`` of the cache copies them. So greedy, sampled and beam
generation give the same tokens with and without the cache.

Architecture weights: for each sequence ``b`` and edge ``k`` the caller gives the index
``o_bk`` of the chosen op and the value ``w_bk`` of the (straight-through) one-hot weight at
that index (1 in the forward pass, carrying the estimator's gradient). The edge computes
``w_bk · op_{o_bk}(x_b)`` and *only* that op: sequences are grouped by their chosen op, each
op runs once on its group, and the controller's gradient arrives through ``w_bk``
(``∂L/∂w_bk = <∂L/∂y_b, op(x_b)>``). ``zero`` edges compute nothing; an input or intermediate
node that only feeds ``zero`` edges is never computed, so a cell whose edges are all ``zero``
costs only the residual add. :meth:`SearchedCell.forward_dense` is the DARTS mixture
``Σ_o w_bko · op_o(x_b)`` over every op, used to test the sparse path.

The output projection starts at zero (``O = 0``, ``o = 0``) so a freshly added cell leaves the
model's output unchanged.

**Per-task weights.** The preparation stage adapts the cell's weights per task inside its
inner loop, for all tasks of a meta-batch at once: it passes every cell weight stacked
``[T, ...]`` through ``torch.func.functional_call`` and the cell reads each sequence's task
from ``seq_task [B]``. A stacked linear is a batched matmul over per-sequence weights
(``W[seq_task]``), a stacked convolution a grouped convolution with one group per sequence.
With ordinary (unstacked) weights ``seq_task`` is ignored and the modules are called as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OPS", "EDGES", "NUM_EDGES", "NUM_OPS", "EdgeOps", "SearchedCell", "CellPlan", "make_plan",
           "cell_flops_per_token", "linear_op", "conv_op", "CELL_NAME"]

#: Attribute name of the cell on each transformer block (``block.tams_cell``).
CELL_NAME = "tams_cell"

#: Candidate operations of every edge, in logit order.
OPS: tuple[str, ...] = ("linear", "conv3", "conv5", "glu", "zero", "skip")
NUM_OPS = len(OPS)
ZERO = OPS.index("zero")
SKIP = OPS.index("skip")


def _edges() -> tuple[tuple[int, int], ...]:
    """``(source node, target node)`` of the 9 edges, in logit order (see the module doc)."""
    out = []
    for target in (2, 3, 4):
        out.extend((source, target) for source in range(target))
    return tuple(out)


#: ``(source, target)`` node of each edge; nodes 0, 1 are inputs, 2, 3, 4 intermediate.
EDGES: tuple[tuple[int, int], ...] = _edges()
NUM_EDGES = len(EDGES)


@dataclass(frozen=True)
class CellPlan:
    """Which op each edge runs on which sequences, known on the host (one sync per forward).

    ``groups[k]`` lists ``(op, rows)`` for edge ``k``: ``rows`` is ``None`` when every
    sequence of the batch chose ``op`` (no gather needed), else an int64 tensor of sequence
    indices. ``zero`` groups are omitted. ``batch`` is ``B``, kept for checks.
    """

    batch: int
    groups: tuple[tuple[tuple[int, Optional[torch.Tensor]], ...], ...]

    def subset(self, rows: torch.Tensor, rows_list: Sequence[int]) -> CellPlan:
        """The plan restricted to the sequences ``rows_list`` (renumbered 0..len-1)."""
        pos = {b: i for i, b in enumerate(rows_list)}
        device = rows.device
        groups = []
        for edge_groups in self.groups:
            new = []
            for op, r in edge_groups:
                members = range(self.batch) if r is None else r.tolist()
                kept = [pos[b] for b in members if b in pos]
                if not kept:
                    continue
                new.append((op, None if len(kept) == len(rows_list) else torch.tensor(kept, device=device)))
            groups.append(tuple(new))
        return CellPlan(batch=len(rows_list), groups=tuple(groups))


def make_plan(ops_per_seq: Sequence[Sequence[int]], device=None) -> CellPlan:
    """Group the sequences of a batch by the op each edge chose.

    ``ops_per_seq``: ``B`` lists of ``NUM_EDGES`` op indices (host ints, e.g.
    ``ops[task_index].tolist()``).
    """
    B = len(ops_per_seq)
    groups = []
    for k in range(NUM_EDGES):
        by_op: dict[int, list[int]] = {}
        for b in range(B):
            op = int(ops_per_seq[b][k])
            if not 0 <= op < NUM_OPS:
                raise ValueError(f"make_plan: op index {op} of edge {k} is outside [0, {NUM_OPS})")
            by_op.setdefault(op, []).append(b)
        edge = []
        for op in sorted(by_op):
            if op == ZERO:
                continue
            rows = by_op[op]
            edge.append((op, None if len(rows) == B else torch.tensor(rows, dtype=torch.int64, device=device)))
        groups.append(tuple(edge))
    return CellPlan(batch=B, groups=tuple(groups))


def _per_seq(t: torch.Tensor, task: Optional[torch.Tensor], name: str) -> torch.Tensor:
    """``t[task]``: the per-sequence slice of a task-stacked weight ``[T, ...]``."""
    if task is None:
        raise ValueError(f"SearchedCell: weight {name!r} is stacked per task {list(t.shape)} but no 'seq_task' "
                         "was given (which task each sequence belongs to)")
    return t.index_select(0, task)


def linear_op(x: torch.Tensor, mod: nn.Linear, task: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b`` for ``x [n, S, in]``; ``W [out, in]``, or ``[T, out, in]`` read per sequence."""
    w, b = mod.weight, mod.bias
    if w.dim() == 2:
        return mod(x)  # the module call: forward hooks (profilers, tests) see it
    wt = _per_seq(w, task, "linear.weight").transpose(1, 2)  # [n, in, out]
    if b is None:
        return torch.bmm(x, wt)
    return torch.baddbmm(_per_seq(b, task, "linear.bias").unsqueeze(1), x, wt)


def conv_op(xt: torch.Tensor, mod: nn.Conv1d, task: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1-D convolution (no padding) of ``xt [n, C_in, L]``; a ``[T, C_out, C_in, k]`` weight is read
    per sequence as a grouped convolution (one group per sequence)."""
    w, b = mod.weight, mod.bias
    if w.dim() == 3:
        return mod(xt)
    n, c_in, length = xt.shape
    wn = _per_seq(w, task, "conv.weight")  # [n, C_out, C_in, k]
    c_out = wn.shape[1]
    bn = _per_seq(b, task, "conv.bias").reshape(n * c_out) if b is not None else None
    y = F.conv1d(xt.reshape(1, n * c_in, length), wn.reshape(n * c_out, c_in, wn.shape[-1]), bn, groups=n)
    return y.view(n, c_out, -1)


class EdgeOps(nn.Module):
    """The parametric candidates of one edge (``zero`` and ``skip`` have no parameters).

    Every op maps ``[B, S, C] -> [B, S, C]``.
    """

    def __init__(self, width: int, causal: bool, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.causal = bool(causal)
        self.linear = nn.Linear(width, width, **kw)
        self.conv3 = nn.Conv1d(width, width, 3, **kw)
        self.conv5 = nn.Conv1d(width, width, 5, **kw)
        self.glu = nn.Linear(width, 2 * width, **kw)

    def modules_of(self, op: int) -> tuple[nn.Module, ...]:
        """The modules holding op ``op``'s parameters (for keeping unused ones in the graph)."""
        name = OPS[op]
        return (getattr(self, name),) if hasattr(self, name) and name not in ("zero", "skip") else ()

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor, task: Optional[torch.Tensor],
              past: Optional[torch.Tensor] = None) -> torch.Tensor:
        k = conv.kernel_size[0]
        if past is not None:
            # incremental decoding: the inputs of the k-1 positions before x take the padding's place
            if not self.causal or past.shape[1] < k - 1:
                raise ValueError(f"EdgeOps: 'past' needs a causal cell and >= {k - 1} positions, got {list(past.shape)}")
            xt = torch.cat([past[:, past.shape[1] - (k - 1):].to(x.dtype), x], dim=1).transpose(1, 2)
            return conv_op(xt, conv, task).transpose(1, 2)
        # Why padding by hand: causal needs k-1 zeros on the left only, which Conv1d's
        # symmetric `padding` cannot express.
        left, right = (k - 1, 0) if self.causal else (k // 2, k // 2)
        xt = F.pad(x.transpose(1, 2), (left, right))  # [B, C, S + k - 1]
        return conv_op(xt, conv, task).transpose(1, 2)

    def apply_op(self, op: int, x: torch.Tensor, task: Optional[torch.Tensor] = None,
                 past: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``op_{op}(x)`` for ``x [B, S, C]`` (``zero`` returns zeros: only the dense path asks).

        ``task [B]``: each sequence's task, read only when the weights are stacked per task.
        ``past [B, P, C]``: the op's input at the ``P >= k - 1`` positions before ``x`` (KV-cached
        decoding of a causal cell); read by the conv ops only, which then use it instead of padding.
        """
        name = OPS[op]
        if name == "linear":
            return torch.relu(linear_op(x, self.linear, task))
        if name == "conv3":
            return self._conv(self.conv3, x, task, past)
        if name == "conv5":
            return self._conv(self.conv5, x, task, past)
        if name == "glu":
            return F.glu(linear_op(x, self.glu, task), dim=-1)
        if name == "zero":
            return torch.zeros_like(x)
        return x  # skip


class SearchedCell(nn.Module):
    """The FFN-block cell; see the module docstring for the math and cost.

    Args:
        d_model: ``D``, the model width. width: ``C``, the cell width (default 64).
        causal: causal convolutions (autoregressive stacks).
        init: ``"zero"`` (default; output projection 0, so the cell adds exactly 0) or
            ``"normal"`` (``N(0, 0.02²)`` output projection, for tests and ablations).
    """

    def __init__(self, d_model: int, width: int = 64, *, causal: bool = False, init: str = "zero",
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("d_model", d_model), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SearchedCell: argument '{name}' must be a positive int, got {v!r}")
        if init not in ("zero", "normal"):
            raise ValueError(f"SearchedCell: argument 'init' must be 'zero' or 'normal', got {init!r}")
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.width, self.causal, self.init = d_model, width, bool(causal), init
        self.in_proj = nn.ModuleList([nn.Linear(d_model, width, **kw) for _ in range(2)])
        self.edges = nn.ModuleList([EdgeOps(width, causal, **kw) for _ in range(NUM_EDGES)])
        self.out_proj = nn.Linear(width, d_model, **kw)
        self.reset_output()

    @torch.no_grad()
    def reset_output(self) -> None:
        if self.init == "zero":
            self.out_proj.weight.zero_()
        else:
            self.out_proj.weight.normal_(0.0, 0.02)
        self.out_proj.bias.zero_()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, width={self.width}, causal={self.causal}, ops={list(OPS)}"

    def _check(self, x_in: torch.Tensor, f: torch.Tensor) -> None:
        for name, t in (("x_in", x_in), ("f", f)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.d_model:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"SearchedCell: argument '{name}' must be [B, S, {self.d_model}], got {got}")
        if x_in.shape != f.shape:
            raise ValueError(f"SearchedCell: 'x_in' {list(x_in.shape)} and 'f' {list(f.shape)} must have the same shape")

    # ---- sparse path: only the chosen ops run ------------------------------------------------
    def forward(self, x_in: torch.Tensor, f: torch.Tensor, edge_weight: torch.Tensor,
                plan: CellPlan, seq_task: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``f + O · mean(n2, n3, n4) + o`` computing only the chosen op of each edge.

        Args:
            x_in, f: ``[B, S, D]`` FFN input and output.
            edge_weight: ``[B, E]`` value of each sequence's chosen one-hot weight per edge
                (1 in value; the controller's gradient flows through it).
            plan: :class:`CellPlan` for these ``B`` sequences (:func:`make_plan`).
            seq_task: ``[B]`` int64 task of each sequence; needed only when the weights are
                stacked per task (see the module docstring), ignored otherwise.

        Returns ``[B, S, D]``. Parameters that this call does not use are added as ``0 · p`` so
        every parameter stays in the autograd graph (DDP without ``find_unused_parameters``).
        """
        self._check(x_in, f)
        B = x_in.shape[0]
        if plan.batch != B or edge_weight.shape != (B, NUM_EDGES):
            raise ValueError(
                f"SearchedCell: plan for {plan.batch} sequences and edge_weight {list(edge_weight.shape)} "
                f"do not match the batch [B={B}, E={NUM_EDGES}]"
            )
        if seq_task is not None and seq_task.shape != (B,):
            raise ValueError(f"SearchedCell: argument 'seq_task' must be [B={B}], got {list(seq_task.shape)}")
        used: set = set()
        inputs = {0: x_in, 1: f}
        nodes: dict[int, Optional[torch.Tensor]] = {}
        window = self._conv_window(plan, B, x_in.shape[1])
        past = window.past if window is not None else {}

        def node(i: int) -> Optional[torch.Tensor]:
            # Lazily: an input node is projected only when a non-zero edge reads it.
            if i not in nodes:
                proj = self.in_proj[i]
                used.add(proj)
                nodes[i] = torch.relu(linear_op(inputs[i], proj, seq_task))
            return nodes[i]

        for target in (2, 3, 4):
            acc = None
            for k, (source, tgt) in enumerate(EDGES):
                if tgt != target:
                    continue
                for op, rows in plan.groups[k]:
                    src = node(source) if source < 2 else nodes[source]
                    if src is None:
                        continue  # the source node is exactly 0 for every sequence
                    xs = src if rows is None else src.index_select(0, rows)
                    task = seq_task if (rows is None or seq_task is None) else seq_task.index_select(0, rows)
                    hist = past.get(source) if op in _CONV_OPS else None
                    if hist is not None and rows is not None:
                        hist = hist.index_select(0, rows)
                    y = self.edges[k].apply_op(op, xs, task, hist)
                    used.update(self.edges[k].modules_of(op))
                    w = edge_weight[:, k] if rows is None else edge_weight.index_select(0, rows)[:, k]
                    y = y * w.to(y.dtype).view(-1, 1, 1)
                    if rows is not None:
                        y = y.new_zeros((B,) + y.shape[1:]).index_add(0, rows, y)
                    acc = y if acc is None else acc + y
            nodes[target] = acc
        if window is not None:
            window.advance(nodes)
        mids = [nodes[t] for t in (2, 3, 4) if nodes[t] is not None]
        if mids:
            used.add(self.out_proj)
            out = f + linear_op(sum(mids) / 3.0, self.out_proj, seq_task)
        else:  # every intermediate node is 0: O · 0 + o
            bias = self.out_proj.bias
            out = f + (bias if bias.dim() == 1 else _per_seq(bias, seq_task, "out_proj.bias").unsqueeze(1))
        return _anchor_unused(out, self, used)

    # ---- KV-cached decoding -------------------------------------------------------------------
    def _conv_window(self, plan: CellPlan, batch: int, seq: int) -> Optional[_ConvWindow]:
        """The window of past conv inputs for this call, when the block runs with a KV cache and
        the plan has a conv op; ``None`` otherwise (no cache: the padding is the past)."""
        decoding = self.__dict__.get("_decoding")
        if decoding is None or not self.causal:
            return None
        sources = sorted({EDGES[k][0] for k, groups in enumerate(plan.groups) for op, _ in groups if op in _CONV_OPS})
        if not sources:
            return None
        cache, past_len = decoding  # the past length as the block saw it before its attention ran
        store = _window_store(cache)
        key = id(self)
        if past_len == 0:  # a new sequence starts: the padding's zeros are its past
            window = _ConvWindow(sources, batch, 0, {})
        else:
            window = store.get(key)
            if window is None or window.position != past_len or window.batch != batch:
                seen = "no tokens" if window is None else f"{window.position} tokens of {window.batch} sequences"
                raise RuntimeError(
                    f"TAMS: a conv op of the searched cell runs with a KV cache holding {past_len} past tokens of "
                    f"{batch} sequences, but the cell's window of past inputs on that cache has {seen} (a cache "
                    "filled or cropped outside this model, or an architecture that changed mid-sequence); "
                    "start from an empty cache, or generate with use_cache=False")
            window = _ConvWindow(sources, batch, past_len, window.past)
        window.store, window.key, window.seq = store, key, seq
        return window

    # ---- dense mixture (reference) -----------------------------------------------------------
    def forward_dense(self, x_in: torch.Tensor, f: torch.Tensor, weights: torch.Tensor,
                      seq_task: Optional[torch.Tensor] = None) -> torch.Tensor:
        """DARTS mixture ``Σ_o w_bko · op_o``: every op of every edge runs (the oracle).

        ``weights [B, E, NUM_OPS]`` per sequence. With one-hot weights this equals
        :meth:`forward` with the corresponding plan. ``seq_task`` as in :meth:`forward`.
        """
        self._check(x_in, f)
        B = x_in.shape[0]
        if weights.shape != (B, NUM_EDGES, NUM_OPS):
            raise ValueError(f"SearchedCell.forward_dense: 'weights' must be [{B}, {NUM_EDGES}, {NUM_OPS}], got {list(weights.shape)}")
        nodes = [torch.relu(linear_op(x_in, self.in_proj[0], seq_task)),
                 torch.relu(linear_op(f, self.in_proj[1], seq_task))]
        for target in (2, 3, 4):
            acc = 0
            for k, (source, tgt) in enumerate(EDGES):
                if tgt != target:
                    continue
                for op in range(NUM_OPS):
                    y = self.edges[k].apply_op(op, nodes[source], seq_task)
                    acc = acc + y * weights[:, k, op].to(f.dtype).view(-1, 1, 1)
            nodes.append(acc)
        return f + linear_op((nodes[2] + nodes[3] + nodes[4]) / 3.0, self.out_proj, seq_task)


#: op indices of the convolutions (the ops that read past positions)
_CONV_OPS = frozenset(i for i, name in enumerate(OPS) if name.startswith("conv"))
#: positions a window keeps: the longest kernel minus 1
_HISTORY = 4
_WINDOWS_ATTR = "_tarp_fast_conv_windows"


class _ConvWindow:
    """The last :data:`_HISTORY` values of the nodes feeding conv edges, ``{node: [B, H, C]}``."""

    def __init__(self, sources, batch: int, position: int, past: dict):
        self.sources, self.batch, self.position, self.past = list(sources), batch, position, past
        self.store: Optional[dict] = None
        self.key = 0
        self.seq = 0

    def advance(self, nodes: dict) -> None:
        """Append this call's node values and keep the last positions (detached: inference state)."""
        new = {}
        for i in self.sources:
            value = nodes.get(i)
            old = self.past.get(i)
            if value is None:  # the node is exactly 0 for every sequence
                ref = old if old is not None else next((v for v in nodes.values() if v is not None), None)
                if ref is None:
                    continue
                value = ref.new_zeros(self.batch, self.seq, ref.shape[-1])
            value = value.detach()
            if old is None:
                old = value.new_zeros(self.batch, _HISTORY, value.shape[-1])
            new[i] = torch.cat([old.to(value.dtype), value], dim=1)[:, -_HISTORY:]
        self.store[self.key] = _ConvWindow(self.sources, self.batch, self.position + self.seq, new)


def _window_store(cache) -> dict:
    """``{id(cell): _ConvWindow}`` kept on the cache object, whose class is extended once so that its
    beam-search and batch methods reorder the windows with the cached keys and values."""
    cls = type(cache)
    if not getattr(cls, "_tarp_fast_conv_windows_class", False):
        sub = _WINDOWED_CLASSES.get(cls)
        if sub is None:
            sub = type(cls.__name__, (cls,), {
                "_tarp_fast_conv_windows_class": True, "__module__": cls.__module__,
                "__doc__": cls.__doc__,
                "reorder_cache": _rows_method(cls, "reorder_cache", lambda t, idx: t.index_select(0, idx)),
                "batch_select_indices": _rows_method(cls, "batch_select_indices", lambda t, idx: t[idx]),
                "batch_repeat_interleave": _rows_method(cls, "batch_repeat_interleave",
                                                        lambda t, n: t.repeat_interleave(n, dim=0)),
            })
            _WINDOWED_CLASSES[cls] = sub
        cache.__class__ = sub
    return cache.__dict__.setdefault(_WINDOWS_ATTR, {})


_WINDOWED_CLASSES: dict[type, type] = {}


def _rows_method(cls: type, name: str, apply):
    base = getattr(cls, name, None)

    def method(self, arg):
        out = base(self, arg) if base is not None else None
        for key, w in list(self.__dict__.get(_WINDOWS_ATTR, {}).items()):
            past = {}
            for i, t in w.past.items():
                a = arg.to(t.device) if isinstance(arg, torch.Tensor) else arg
                past[i] = apply(t, a)
            batch = next(iter(past.values())).shape[0] if past else w.batch
            self.__dict__[_WINDOWS_ATTR][key] = _ConvWindow(w.sources, batch, w.position, past)
        return out

    method.__name__ = name
    method.__doc__ = f"{getattr(base, '__doc__', '') or ''} (also moves tarp-fast's TAMS conv windows)"
    return method


def _anchor_unused(out: torch.Tensor, root: nn.Module, used: set) -> torch.Tensor:
    """Add ``0 · p[0]`` for each parameter of ``root`` outside ``used`` modules, when training.

    Why the first element only: it puts the parameter in the graph (its gradient is an
    all-zero tensor, as DDP expects) at no forward cost.
    """
    if not torch.is_grad_enabled():
        return out
    used_params = {id(p) for m in used for p in m.parameters()}
    anchors = [p.reshape(-1)[:1] for p in root.parameters() if p.requires_grad and id(p) not in used_params]
    if not anchors:
        return out
    return out + 0.0 * torch.cat(anchors).sum().to(out.dtype)


def cell_flops_per_token(d_model: int, width: int, ops: Sequence[int]) -> int:
    """Multiply-adds per token of a cell with the given op per edge (used by the reports)."""
    per_op = {"linear": width * width, "conv3": 3 * width * width, "conv5": 5 * width * width,
              "glu": 2 * width * width, "zero": 0, "skip": 0}
    reads = set()
    total = 0
    for k, op in enumerate(ops):
        if OPS[op] != "zero":
            reads.add(EDGES[k][0])
        total += per_op[OPS[op]]
    total += sum(d_model * width for i in (0, 1) if i in reads)
    if any(OPS[op] != "zero" for op in ops):
        total += width * d_model
    return total

