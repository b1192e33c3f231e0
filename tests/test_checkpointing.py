"""Activation checkpointing: the task routing travels with the recomputation.

``torch.utils.checkpoint`` (reentrant and not) and transformers' activation checkpointing give
the gradients of the run without checkpointing, with several tasks, gates, hard skip and TAMS
architectures, whether backward runs inside the ``tarp_context`` / ``use_architecture`` block,
after it (as ``Trainer`` does: this raised "'task_index' is required") or inside another one.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import VOCAB, tiny_model
from torch.utils.checkpoint import checkpoint

import tarp_fast
from tarp_fast import TARPLinear, tarp_context

WHERE = ("inside", "after", "other")  # backward inside the block, after it, inside another block


def _run(forward, leaves, where, enter, other):
    """Gradients of ``forward()`` w.r.t. ``leaves`` with backward ``where`` relative to ``enter()``."""
    for p in leaves:
        p.grad = None
    with enter():
        loss = forward()
        if where == "inside":
            loss.backward()
    if where == "after":
        loss.backward()
    elif where == "other":
        with other():
            loss.backward()
    return [p.grad.clone() if p.grad is not None else None for p in leaves]


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# ---- torch.utils.checkpoint on TARP layers with tasks, gates and hard skip ------------------------
class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = TARPLinear(6, 8, rank=2, num_tasks=2, init="paper", scale_weight=True, dtype=torch.float64)
        self.b = TARPLinear(8, 8, rank=2, num_tasks=2, init="paper", dtype=torch.float64)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_torch_checkpoint_replays_tasks_gates_and_hard_skip(reentrant, where):
    stack = _Stack()
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    ti = torch.tensor([0, 1, 1])
    gate = (torch.rand(12, dtype=torch.float64) + 0.5).requires_grad_(True)
    with torch.no_grad():
        gate[::3] = 0.0  # hard-skipped rows
    leaves = [x, gate, *stack.parameters()]

    def enter():
        return tarp_context(task_index=ti, gates={stack.b: gate}, hard_skip=True)

    def other():  # another routing entirely: the recomputation must not see it
        return tarp_context(task_index=torch.tensor([1, 0, 0]), gates={stack.b: torch.ones(12, dtype=torch.float64)})

    want = _run(lambda: stack(x).pow(2).sum(), leaves, "inside", enter, other)
    got = _run(lambda: checkpoint(stack, x, use_reentrant=reentrant).pow(2).sum(), leaves, where, enter, other)
    _same(got, want)
    assert float(gate.grad[::3].abs().sum()) == 0.0 and float(gate.grad.abs().sum()) > 0


def test_a_layer_called_twice_in_a_region_replays_each_call():
    """Two calls of one layer with different routing inside one checkpointed region."""
    layer = TARPLinear(5, 5, rank=2, num_tasks=3, init="paper", dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)

    def region(x):
        with tarp_context(task_index=torch.tensor([0, 1, 2, 0])):
            h = layer(x)
        with tarp_context(task_index=torch.tensor([2, 2, 1, 1])):
            return layer(torch.tanh(h))

    leaves = [x, *layer.parameters()]
    want = _run(lambda: region(x).pow(2).sum(), leaves, "inside", contextlib.nullcontext, contextlib.nullcontext)
    for reentrant in (False, True):
        got = _run(lambda r=reentrant: checkpoint(region, x, use_reentrant=r).pow(2).sum(), leaves, "after",
                   contextlib.nullcontext, contextlib.nullcontext)
        _same(got, want)


# ---- transformers' activation checkpointing ----------------------------------------------------
def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model.train()


def _enable(model, reentrant):
    # transformers renamed gradient_checkpointing_* to activation_checkpointing_* (old names warn)
    enable = getattr(model, "activation_checkpointing_enable", None)
    kwargs = {"use_reentrant": reentrant}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _disable(model):
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def _ids(n=3, length=7, seed=1):
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_checkpointing_with_several_tasks(family, reentrant, where):
    model = _no_dropout(tiny_model(family).double())
    tarp_fast.patch_model(model, rank=2, num_tasks=2, init="paper")
    ids = _ids()
    ti = torch.tensor([1, 0, 1])
    leaves = [p for p in model.parameters() if p.requires_grad]

    def enter():
        return tarp_context(task_index=ti)

    def other():
        return tarp_context(task_index=torch.tensor([0, 0, 0]))

    def forward():
        return model(input_ids=ids).logits.pow(2).mean()

    want = _run(forward, leaves, "inside", enter, other)
    _enable(model, reentrant)
    try:
        got = _run(forward, leaves, where, enter, other)
    finally:
        _disable(model)
    _same(got, want)


# ---- TAMS: the architecture travels with the recomputation too ------------------------------------
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_checkpointing_with_tams_architectures(family, reentrant):
    from tarp_fast.tams import NUM_EDGES, NUM_OPS, Architecture, add_tams, tams_record, use_architecture

    model = _no_dropout(tiny_model(family).double())
    tarp_fast.patch_model(model, rank=2, num_tasks=3, init="paper")
    add_tams(model, cell_width=8, cell_init="normal")
    L = len(tams_record(model).blocks)
    g = torch.Generator().manual_seed(0)
    ops = torch.randint(0, NUM_OPS, (3, NUM_EDGES), generator=g)
    w = F.one_hot(ops, NUM_OPS).double().requires_grad_(True)
    z = torch.ones(3, L, 2, dtype=torch.float64)
    z[1] = 0.3 + 0.6 * torch.rand(L, 2, generator=g, dtype=torch.float64)
    z[1, 0, 0] = 0.0  # task 1 skips layer 0's attention
    z[2, :, 1] = 0.0  # task 2 skips every FFN
    z.requires_grad_(True)
    arch = Architecture(w, z)
    ids = _ids(4)
    ti = torch.tensor([0, 1, 2, 1])
    leaves = [w, z, *(p for p in model.parameters() if p.requires_grad)]

    @contextlib.contextmanager
    def enter():
        with tarp_context(task_index=ti), use_architecture(model, arch, ti):
            yield

    def forward():
        return model(input_ids=ids).logits.pow(2).mean()

    want = _run(forward, leaves, "inside", enter, contextlib.nullcontext)
    _enable(model, reentrant)
    try:
        for where in ("inside", "after"):
            _same(_run(forward, leaves, where, enter, contextlib.nullcontext), want)
    finally:
        _disable(model)
    assert float(w.grad.abs().sum()) > 0 and float(z.grad.abs().sum()) > 0
