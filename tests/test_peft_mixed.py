"""Mixed-adapter batches through PEFT (issue 14, item 3): ``adapter_names=[...]``, one name per
sequence, ``"__base__"`` for none, in forward, backward (training mode, where PEFT's LoRA refuses)
and generation with the KV cache; one ``tarp_linear`` call per layer for all rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import batch, tiny_model

import tarp_fast

peft = pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402

from tarp_fast.peft import TarpConfig, TarpLayer, set_backend  # noqa: E402

FAMILIES = ("gpt2", "llama", "bart")
NAMES = ["math", "code", "__base__", "math"]


def _no_dropout(model):
    """Training mode without randomness: dropout modules and BART's functional dropout rates off."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "activation_dropout", "attention_dropout", "layerdrop"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model


def _model(family, *, code=None, math=None, seed=0, checkpointing=False):
    """Two adapters of other settings (rank, multiplicative term), factors seeded off zero."""
    base = _no_dropout(tiny_model(family))
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, TarpConfig(**(math or {"r": 2})), adapter_name="math")
    model.add_adapter("code", TarpConfig(**(code or {"r": 3, "scale_weight": True, "scaling": 0.5})))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".tarp_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                p.requires_grad_(True)
    return model.eval()


def _rows(data, idx):
    return {k: v[idx] for k, v in data.items()}


def _separately(model, data, names, fn):
    """``fn(model, rows)`` per distinct name on its rows, with that adapter active (or none)."""
    out = {}
    for name in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == name]
        if name == "__base__":
            with model.disable_adapter():
                out[name] = (idx, fn(model, _rows(data, idx)))
        else:
            model.set_adapter(name)
            out[name] = (idx, fn(model, _rows(data, idx)))
    model.set_adapter("math")
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_mixed_forward_equals_each_adapter_alone(family, backend):
    if tarp_fast.available_backends()[backend] is not None:
        pytest.skip(f"backend {backend} unavailable")
    model, data = set_backend(_model(family), backend), batch(family, n=len(NAMES))
    with torch.no_grad():
        mixed = model(**data, adapter_names=NAMES).logits
        alone = _separately(model, data, NAMES, lambda m, d: m(**d).logits)
    for name, (idx, logits) in alone.items():
        torch.testing.assert_close(mixed[idx], logits, rtol=1e-5, atol=1e-5, msg=name)


def _seq_losses(logits, labels, family):
    if family != "bart":  # causal LM: predict the next token
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.stack([F.cross_entropy(lo, la) for lo, la in zip(logits, labels)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_training_gradients_equal_training_each_adapter_alone(family, backend):
    if tarp_fast.available_backends()[backend] is not None:
        pytest.skip(f"backend {backend} unavailable")
    model, data = set_backend(_model(family), backend), batch(family, n=len(NAMES))
    model.train()  # PEFT's LoRA refuses adapter_names here; TARP trains a mixed batch
    out = model(**data, adapter_names=NAMES)
    _seq_losses(out.logits, data["labels"], family).sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert mixed and all(".math" in n or ".code" in n for n in mixed)
    model.zero_grad()

    def step(m, d):
        _seq_losses(m(**d).logits, d["labels"], family).sum().backward()

    for name in ("math", "code"):
        idx = [i for i, n in enumerate(NAMES) if n == name]
        model.zero_grad()
        model.set_adapter(name)
        step(model, _rows(data, idx))
        alone = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and f".{name}" in n}
        assert alone.keys() == {n for n in mixed if f".{name}" in n}
        for n, g in alone.items():
            torch.testing.assert_close(mixed[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_one_tarp_linear_call_per_layer(monkeypatch):
    model, data = _model("gpt2"), batch("gpt2", n=len(NAMES))
    from tarp_fast.peft import _tuner

    calls = []
    real = _tuner.ops.tarp_linear

    def counting(*args, **kw):
        calls.append(kw.get("task_index") is not None)
        return real(*args, **kw)

    monkeypatch.setattr(_tuner.ops, "tarp_linear", counting)
    with torch.no_grad():
        model(**data, adapter_names=NAMES)
    layers = sum(isinstance(m, TarpLayer) for m in model.modules())
    assert len(calls) == layers and all(calls)  # every layer: one multi-task call for all rows


@pytest.mark.parametrize("code", [{"r": 2, "variant": "kronecker"}, {"r": 2, "variant": "bilinear"},
                                  {"r": 2, "scale_weight": True, "init": "paper"}])
def test_adapters_that_cannot_share_a_call_run_per_adapter(code):
    model, data = _model("llama", code=code), batch("llama", n=len(NAMES))
    with torch.no_grad():
        mixed = model(**data, adapter_names=NAMES).logits
        alone = _separately(model, data, NAMES, lambda m, d: m(**d).logits)
    for name, (idx, logits) in alone.items():
        torch.testing.assert_close(mixed[idx], logits, rtol=1e-5, atol=1e-5, msg=name)


def test_gradient_checkpointing_replays_the_routing():
    grads = []
    for checkpointing in (False, True):
        model, data = _model("llama", checkpointing=checkpointing), batch("llama", n=len(NAMES))
        model.train()
        model(**data, adapter_names=NAMES).loss.backward()  # backward runs after the routing context closed
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_adapter_names_and_kv_cache(family):
    model = _model(family, code={"r": 2})
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (3, 5), generator=g)
    names = ["math", "code", "__base__"]
    common = dict(max_new_tokens=5, min_new_tokens=5, pad_token_id=0, use_cache=True)
    for kw in ({}, {"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}):
        mixed = model.generate(input_ids=ids, adapter_names=names, **common, **kw)
        alone = _separately(model, {"input_ids": ids}, names, lambda m, d, kw=kw: m.generate(**d, **common, **kw))
        per = kw.get("num_return_sequences", 1)
        for name, (idx, out) in alone.items():
            rows = [i * per + j for i in idx for j in range(per)]  # generate expands each sequence in place
            assert torch.equal(mixed[rows], out), (name, kw)


def test_bad_adapter_names_are_clear_errors():
    model, data = _model("gpt2"), batch("gpt2", n=2)
    with pytest.raises(ValueError, match=r"argument 'adapter_names' names adapter\(s\) \['nope'\] that are not loaded"):
        model(**data, adapter_names=["math", "nope"])
    with pytest.raises(ValueError, match="argument 'adapter_names' has 3 names, but the batch has 2 sequences"):
        model(**data, adapter_names=["math", "code", "math"])
    with pytest.raises(TypeError, match="argument 'adapter_names' must be a non-empty list"):
        model(**data, adapter_names="math")
    with pytest.raises(ValueError, match="argument 'adapter_names' names adapter"):
        model.generate(input_ids=data["input_ids"], adapter_names=["math", "typo"], max_new_tokens=2, pad_token_id=0)
