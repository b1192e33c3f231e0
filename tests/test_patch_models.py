"""patch_model / unpatch_model / adapters on tiny GPT-2, BART, Llama and RoBERTa models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from models import EXPECTED_TARGETS, FAMILIES, batch, tiny_model

import tarp_fast
from tarp_fast import (
    TARPLinear,
    load_adapter,
    mark_only_tarp_trainable,
    patch_model,
    save_adapter,
    tarp_parameters,
    unpatch_model,
)
from tarp_fast.patch import tarp_layers


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_delta_patch_keeps_logits_and_state_dict(family):
    model = tiny_model(family)
    data = batch(family)
    before = _snapshot(model)
    with torch.no_grad():
        logits = model(**data).logits
    patch_model(model, rank=4)
    layers = tarp_layers(model)
    assert len(layers) == EXPECTED_TARGETS[family]
    assert not any("lm_head" in n or "classifier" in n for n in layers)
    with torch.no_grad():
        patched = model(**data).logits
    assert torch.equal(patched, logits)
    # base keys, shapes and values unchanged in the patched state dict (Conv1D layout kept)
    sd = model.state_dict()
    for k, v in before.items():
        assert k in sd and sd[k].shape == v.shape and torch.equal(sd[k], v), k


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_training_lowers_loss_and_unpatch_restores_bitwise(family):
    model = tiny_model(family)
    data = batch(family)
    before = _snapshot(model)
    original_types = {n: type(m) for n, m in model.named_modules()}
    patch_model(model, rank=4, scale_weight=True)
    mark_only_tarp_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in tarp_parameters(model)}
    opt = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    unpatch_model(model)
    assert {n: type(m) for n, m in model.named_modules()} == original_types
    _assert_state_equal(model.state_dict(), before)
    assert not tarp_layers(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapter_round_trip_is_bitwise(family, tmp_path):
    model = tiny_model(family)
    fresh = copy.deepcopy(model)
    data = batch(family)
    patch_model(model, rank=3, variant="dynamic", scale_weight=True, init="paper")
    with torch.no_grad():
        expected = model(**data).logits
    save_adapter(model, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    load_adapter(fresh, str(tmp_path))  # patches the fresh model from the config, then loads
    for (n1, p1), (n2, p2) in zip(tarp_fast.patch.tarp_named_parameters(model),
                                  tarp_fast.patch.tarp_named_parameters(fresh)):
        assert n1 == n2 and torch.equal(p1, p2)
    with torch.no_grad():
        assert torch.equal(fresh(**data).logits, expected)


def test_targets_list_and_callable_and_errors():
    model = tiny_model("llama")
    patch_model(model, targets=["q_proj", "v_proj"], rank=2)
    assert len(tarp_layers(model)) == 4
    with pytest.raises(RuntimeError, match="already patched"):
        patch_model(model)
    unpatch_model(model)
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch_model(model)
    patch_model(model, targets=lambda name, mod: name.endswith("down_proj"), rank=2)
    assert len(tarp_layers(model)) == 2
    unpatch_model(model)
    with pytest.raises(ValueError, match="'targets' matched no"):
        patch_model(model, targets=["nothing_here"])
    with pytest.raises(ValueError, match="'targets' must be"):
        patch_model(model, targets="all")
    with pytest.raises(TypeError, match="'model' must be an nn.Module"):
        patch_model("gpt2")


def test_auto_targets_on_unknown_model_skip_heads():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("lm_head", nn.Linear(4, 3))
    patch_model(model, rank=2)
    assert list(tarp_layers(model)) == ["body"]


def test_bilinear_from_peft_lora_gives_peft_output():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(12, 10))
    reference_copy = copy.deepcopy(base)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    lora_layer = lora.base_model.model.proj
    with torch.no_grad():
        lora_layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, 12)
    expected = lora(x)
    layer = TARPLinear.from_module(reference_copy.proj, rank=4, variant="bilinear", scaling=8 / 4)
    with torch.no_grad():
        layer.tarp_U.copy_(lora_layer.lora_B["default"].weight)
        layer.tarp_V.copy_(lora_layer.lora_A["default"].weight)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_patched_model_trains_under_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("gpt2")
    patch_model(model, rank=4)
    mark_only_tarp_trainable(model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tarp_before = [p.detach().clone() for p in tarp_parameters(model)]
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (8, 10), generator=g)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    assert any(not torch.equal(a, p) for a, p in zip(tarp_before, tarp_parameters(model)))
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
