"""Shipping a patched model (issue 19): merge_and_unload, save_pretrained of a patched model, PEFT,
and load_adapter across ``init`` settings. Each test failed before the fix (see its docstring)."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from models import VOCAB, tiny_model

import tarp_fast
from tarp_fast.patch import PatchedSaveWarning, tarp_layers


def _trained(family: str, **kw):
    model = tiny_model(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        tarp_fast.patch_model(model, rank=2, **kw)
        for p in tarp_fast.tarp_parameters(model):
            with torch.no_grad():
                p.normal_(0, 0.2)  # an adapter that changes the outputs
    return model


def _ids(n=2, length=7):
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kw", [dict(variant="bilinear"), dict(variant="kronecker"),
                                dict(variant="bilinear", scale_weight=True)])
def test_merge_and_unload_loads_with_the_plain_class(family, kw, tmp_path):
    """Before: no model-level merge; the only way to ship was base + adapter."""
    from transformers import AutoModelForCausalLM

    model = _trained(family, **kw)
    base_before = {n: p.detach().clone() for n, p in tiny_model(family).named_parameters()}
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    out = tarp_fast.merge_and_unload(model)
    assert out is model and not tarp_layers(model)
    assert not any("tarp_" in k for k in model.state_dict())
    assert any(not torch.equal(p, base_before[n]) for n, p in model.named_parameters())  # the delta is in
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchedSaveWarning)
        model.save_pretrained(str(tmp_path / "merged"))
    plain, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), output_loading_info=True)
    assert type(plain) is type(model)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merge_and_unload_folds_the_kronecker_delta_exactly(family):
    """The merged weight of every layer is W ⊙ softplus(P Q + c) + Σ_i H_i ⊗ (U_i V_i), computed in
    float64 with torch.kron (GPT-2: written through the Conv1D's transposed [in, out] layout)."""
    import torch.nn.functional as F

    model = _trained(family, variant="kronecker", scale_weight=True)
    want = {}
    for name, layer in tarp_layers(model).items():
        names = ("tarp_H", "tarp_KU", "tarp_KV", "tarp_P", "tarp_Q")
        H, U, V, P, Q = (getattr(layer, n).detach().double() for n in names)
        w = layer.linear_weight.detach().double() * F.softplus(P @ Q + layer.scale_offset)
        want[name] = w + layer.scaling * sum(torch.kron(H[i], U[i] @ V[i]) for i in range(4))
    tarp_fast.merge_and_unload(model)
    for name, w in want.items():
        module = model.get_submodule(name)
        got = module.weight.t() if family == "gpt2" else module.weight  # Conv1D stores [in, out]
        torch.testing.assert_close(got.detach().double(), w, rtol=1e-5, atol=1e-6, msg=name)


def test_merge_and_unload_refuses_dynamic_multitask_and_leaves_the_model_alone():
    model = _trained("gpt2")  # dynamic (the default)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="variant='dynamic'.*depends on the input"):
        tarp_fast.merge_and_unload(model)
    assert tarp_layers(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="one delta per task"):
        tarp_fast.merge_and_unload(_trained("gpt2", variant="bilinear", num_tasks=2))
    with pytest.raises(ValueError, match="no TARP layers"):
        tarp_fast.merge_and_unload(tiny_model("gpt2"))


def test_merge_and_unload_refuses_tams():
    from tarp_fast.tams import add_tams

    model = _trained("gpt2", variant="bilinear")
    add_tams(model, gates=False, cell_width=8)
    with pytest.raises(ValueError, match="TAMS modules"):
        tarp_fast.merge_and_unload(model)


def test_save_pretrained_of_a_patched_model_warns_and_says_how_to_ship(tmp_path):
    """Before: save_pretrained wrote the tarp_* tensors silently; the plain class then printed a
    21-row UNEXPECTED table when loading them."""
    model = _trained("gpt2", variant="bilinear")
    with pytest.warns(PatchedSaveWarning, match="save_adapter.*unpatch_model.*merge_and_unload"):
        model.save_pretrained(str(tmp_path / "patched"))
    # the checkpoint still round-trips into the same patched model (what Trainer checkpoints need)
    assert (tmp_path / "patched" / "model.safetensors").is_file()
    # the guard goes with the model through deepcopy and pickle, and away with unpatching
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with pytest.warns(PatchedSaveWarning):
            clone.save_pretrained(str(tmp_path / "clone"))
    tarp_fast.save_adapter(model, str(tmp_path / "adapter"))
    tarp_fast.unpatch_model(model)
    assert "save_pretrained" not in model.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchedSaveWarning)
        model.save_pretrained(str(tmp_path / "base"))
    # the README's way to ship: base + adapter, loaded back with the plain class
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    tarp_fast.load_adapter(fresh, str(tmp_path / "adapter"))
    assert tarp_layers(fresh)


def test_patch_model_refuses_a_peft_wrapped_model():
    """Before: the layers PEFT had wrapped were skipped silently, the others patched."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0))
    with pytest.raises(ValueError, match="wrapped by PEFT.*merge_and_unload"):
        tarp_fast.patch_model(wrapped, rank=2)
    with pytest.raises(ValueError, match="wrapped by PEFT"):
        tarp_fast.patch_model(wrapped.base_model.model, rank=2)  # the inner model holds LoRA layers too
    assert not tarp_layers(wrapped)
    # merged back into plain layers, the model can be patched
    plain = wrapped.merge_and_unload()
    tarp_fast.patch_model(plain, rank=2)
    assert tarp_layers(plain)


def test_load_adapter_ignores_init(tmp_path):
    """Before: an adapter saved with init="zero_delta" was refused by a model patched with
    init="paper" (a setting that no longer matters once the weights are loaded)."""
    model = _trained("gpt2", variant="bilinear")
    tarp_fast.save_adapter(model, str(tmp_path / "a"))
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    other = tiny_model("gpt2")
    tarp_fast.patch_model(other, rank=2, variant="bilinear", init="paper")
    tarp_fast.load_adapter(other, str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, expected)
    # with the multiplicative term the offset that init implies changes the outputs: still refused
    scaled = _trained("gpt2", variant="bilinear", scale_weight=True)
    tarp_fast.save_adapter(scaled, str(tmp_path / "s"))
    paper = tiny_model("gpt2")
    tarp_fast.patch_model(paper, rank=2, variant="bilinear", scale_weight=True, init="paper")
    with pytest.raises(ValueError, match="scale_offset"):
        tarp_fast.load_adapter(paper, str(tmp_path / "s"))


def test_merge_and_unload_keeps_no_copy_of_the_base_weights(monkeypatch):
    """Before: every layer's merge() cloned its base weight into _merged_from, only to drop it."""
    from tarp_fast.nn.linear import TARPLinear

    model = _trained("gpt2", variant="bilinear", scale_weight=True)
    reference = copy.deepcopy(model)
    calls, clones = [], []
    real_merge, real_clone = TARPLinear.merge, torch.Tensor.clone

    def spy(self, **kw):
        calls.append(kw)
        return real_merge(self, **kw)

    monkeypatch.setattr(TARPLinear, "merge", spy)
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: (clones.append(tuple(t.shape)),
                                                                  real_clone(t, *a, **k))[1])
    n = len(tarp_layers(model))
    tarp_fast.merge_and_unload(model)
    monkeypatch.undo()
    assert calls == [{"keep_original": False}] * n and not clones, (calls, clones)
    # the weights are those of merge() (which keeps the original), bitwise
    for name, layer in tarp_layers(reference).items():
        layer.merge()
        assert torch.equal(model.get_submodule(name).weight, layer.weight), name
