"""torch.func: ``grad``, ``vmap(grad(...))`` and ``functional_call`` with every backend.

The native op's autograd node is C++, which functorch cannot transform ("cannot use C++
torch::autograd::Function with functorch transforms"); inside a ``torch.func`` transform every
backend runs the reference (plain PyTorch), outside it ``auto`` still picks native on CPU.
Second-order MAML (``tests/test_meta.py``) differentiates the reference the same way.
"""

from __future__ import annotations

import pytest
import torch
from models import VOCAB, tiny_model
from torch.func import functional_call, grad, vmap

import tarp_fast
from tarp_fast import TARPLinear, ops, reference
from tarp_fast._contract import check_tarp_args

BACKENDS = ["auto", "reference"] + (["native"] if ops.available_backends()["native"] is None else [])


def _patched(backend, num_tasks=1):
    model = tarp_fast.patch_model(tiny_model("gpt2"), rank=2, num_tasks=num_tasks, init="paper")
    for layer in tarp_fast.patch.tarp_layers(model).values():
        layer.backend = backend
    return model


def _ids(n=3, length=6):
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def _seq_loss(model, params, ids, task_index=None):
    """Causal-LM loss of one sequence ``ids [S]`` with the adapter ``params`` swapped in."""
    def run():
        return functional_call(model, params, (ids.unsqueeze(0),)).logits[0]

    if task_index is not None:
        with tarp_fast.tarp_context(task_index=task_index):
            logits = run()
    else:
        logits = run()
    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_grad_of_functional_call_gives_per_sample_gradients(backend):
    """The reported failure: ``vmap(grad(functional_call(...)))`` on a patched GPT-2, CPU float32."""
    model = _patched(backend)
    params = {n: p.detach() for n, p in model.named_parameters() if "tarp_" in n}
    ids = _ids()
    per_sample = vmap(grad(lambda p, x: _seq_loss(model, p, x)), in_dims=(None, 0))(params, ids)
    for i in range(ids.shape[0]):  # plain autograd, one sequence at a time, on the layers' backend
        model.zero_grad()
        _seq_loss(model, dict(model.named_parameters()), ids[i]).backward()
        for n, p in model.named_parameters():
            if "tarp_" in n:
                torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_with_several_tasks(backend):
    model = _patched(backend, num_tasks=2)
    params = {n: p.detach() for n, p in model.named_parameters() if "tarp_" in n}
    ids = _ids(1)[0]
    g = grad(lambda p: _seq_loss(model, p, ids, torch.tensor([1])))(params)
    model.zero_grad()
    _seq_loss(model, dict(model.named_parameters()), ids, torch.tensor([1])).backward()
    for n, p in model.named_parameters():
        if "tarp_" in n:
            torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
            assert float(g[n][0].detach().abs().sum()) == 0.0  # task 0 unused: zero gradient


def test_functorch_runs_the_reference_and_eager_still_picks_native():
    x = torch.randn(4, 6)
    w = torch.randn(5, 6)
    U, V, G = torch.randn(5, 2), torch.randn(2, 6), torch.randn(4, 6)
    call = check_tarp_args(x, w, None, U, V, G)
    seen = []

    def probe(x):
        seen.append(ops._resolve("auto", call))
        seen.append(ops._resolve("native", call) if "native" in BACKENDS else reference.run)
        return ops.tarp_linear(x, w, None, U, V, G).sum()

    grad(probe)(x)
    assert seen == [reference.run, reference.run]
    if "native" in BACKENDS:  # outside a transform: unchanged
        assert ops._resolve("auto", call) is ops._load("native")[0]


def test_hessian_vector_products_through_a_layer():
    """Second order through a TARP layer (the MAML meta-gradient's building block)."""
    layer = TARPLinear(6, 4, rank=2, init="paper", dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def loss(p):
        return functional_call(layer, p, (x,)).pow(2).sum()

    v = {n: torch.randn_like(p) for n, p in params.items()}
    _, hvp = torch.func.jvp(grad(loss), (params,), (v,))
    eps = 1e-6
    plus = grad(loss)({n: p + eps * v[n] for n, p in params.items()})
    minus = grad(loss)({n: p - eps * v[n] for n, p in params.items()})
    for n in params:
        torch.testing.assert_close(hvp[n], (plus[n] - minus[n]) / (2 * eps), rtol=1e-5, atol=1e-7)
