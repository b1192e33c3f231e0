"""TARP as a PEFT method (issue 14): registration, PEFT's machinery, one adapter format, export to
LoRA, bad inputs, and the README section "Using tarp-fast from PEFT".

Mixed-adapter batches are in test_peft_mixed.py. Every test runs against the installed PEFT; the
newest PEFT release was checked once in a throwaway venv (see the issue report).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch
from models import VOCAB, batch, tiny_model
from safetensors.torch import load_file

import tarp_fast
from tarp_fast.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    LEGACY_ADAPTER_WEIGHTS,
    PEFT_FIELDS,
    TENSOR_PREFIX,
)

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model  # noqa: E402

from tarp_fast.peft import TarpConfig, TarpLayer, set_backend  # noqa: E402
from tarp_fast.peft._tuner import register  # noqa: E402

FAMILIES = ("gpt2", "llama", "bart")
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "gpt2_format2_adapter"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _randomize(model, seed=0, std=0.2):
    """Move every TARP factor off its zero-delta init (seeded), so outputs depend on it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".tarp_" in n or n.startswith("tarp_"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _peft(family, seed=0, name="default", **kw):
    model = get_peft_model(tiny_model(family), TarpConfig(**{"r": 2, **kw}), adapter_name=name)
    return _randomize(model, seed).eval()


def _logits(model, data):
    with torch.no_grad():
        return model(**data).logits


def _files(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in pathlib.Path(folder).iterdir() if p.is_file()}


# ---- registration ----------------------------------------------------------------------------------
def test_importing_tarp_fast_imports_no_peft_and_registers_when_peft_comes():
    code = ("import sys, tarp_fast; assert 'peft' not in sys.modules, 'import tarp_fast imported peft'\n"
            "import peft.mapping as m; assert m.PEFT_TYPE_TO_CONFIG_MAPPING['TARP'].__name__ == 'TarpConfig'\n"
            "assert m.PEFT_TYPE_TO_PREFIX_MAPPING['TARP'] == 'tarp_'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]


def test_registration_tables_and_loud_failure_when_peft_changes(monkeypatch):
    """register() writes PEFT's three tables (register_peft_method refuses names outside PeftType).
    If a PEFT release moves them, this test and register() fail with what to do."""
    import peft.mapping as mapping
    from peft.utils.peft_types import PeftType

    register()  # idempotent
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["TARP"] is TarpConfig, (
        "PEFT's config table no longer maps 'TARP' to TarpConfig: this PEFT changed how methods register; "
        "update tarp_fast.peft._tuner.register")
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["TARP"].__name__ == "TarpModel"
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["TARP"] == "tarp_"
    assert "TARP" not in PeftType.__members__, "PEFT now ships its own TARP: register with register_peft_method"
    with pytest.raises(ValueError, match="add an entry to peft.utils.peft_types.PeftType"):
        peft.utils.register_peft_method(name="tarp", config_cls=TarpConfig, model_cls=type(None))
    monkeypatch.setattr(mapping, "PEFT_TYPE_TO_PREFIX_MAPPING", None)
    with pytest.raises(RuntimeError, match=r"cannot register TARP with this PEFT \(.*\): peft.mapping.PEFT_TYPE_TO_"
                                            r"PREFIX_MAPPING is NoneType.*Use the PEFT version pinned"):
        register()


# ---- PEFT's machinery ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_get_peft_model_save_and_reload_bitwise(family, backend, tmp_path, capsys):
    if tarp_fast.available_backends()[backend] is not None:
        pytest.skip(f"backend {backend} unavailable")
    model = set_backend(_peft(family), backend)
    data = batch(family)
    model.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out
    layers = [m for m in model.modules() if isinstance(m, TarpLayer)]
    assert len(layers) == {"gpt2": 8, "bart": 16, "llama": 14}[family]  # patch_model's "auto" targets
    expected = _logits(model, data)
    with model.disable_adapter():
        assert torch.equal(_logits(model, data), _logits(tiny_model(family), data))
    model.save_pretrained(str(tmp_path))
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= set(os.listdir(tmp_path))
    assert type(PeftConfig.from_pretrained(str(tmp_path))) is TarpConfig
    again = set_backend(PeftModel.from_pretrained(tiny_model(family), str(tmp_path)), backend)
    assert torch.equal(_logits(again, data), expected)
    # the same files through tarp-fast's own loader: the format is one
    plain = tiny_model(family)
    tarp_fast.load_adapter(plain, str(tmp_path))
    torch.testing.assert_close(_logits(plain, data), expected, rtol=1e-5, atol=1e-5)


def test_backends_agree():
    if tarp_fast.available_backends()["native"] is not None:
        pytest.skip("native backend unavailable")
    model, data = _peft("llama", scale_weight=True), batch("llama")
    ref = _logits(set_backend(model, "reference"), data)
    torch.testing.assert_close(_logits(set_backend(model, "native"), data), ref, rtol=1e-4, atol=1e-5)


def test_save_adapter_files_load_in_peft_and_transformers(tmp_path):
    """tarp_fast.save_adapter writes PEFT's files, even beside a model: from_pretrained loads both."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("gpt2")
    model.save_pretrained(str(tmp_path))
    model_files = _files(tmp_path)
    tarp_fast.patch_model(model, rank=2, variant="dynamic", scale_weight=True)
    _randomize(model)
    data = batch("gpt2")
    expected = _logits(model, data)
    tarp_fast.save_adapter(model, str(tmp_path))
    now = _files(tmp_path)
    assert {k: now[k] for k in model_files} == model_files  # model files untouched
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "TARP" and cfg["format_version"] == FORMAT_VERSION
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every key of the file is a TarpConfig field
        assert type(PeftConfig.from_pretrained(str(tmp_path))) is TarpConfig
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_model("gpt2"), str(tmp_path)), data), expected)
    auto = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()  # the model and its TARP adapter
    assert torch.equal(_logits(auto, data), expected)


def test_peft_fields_are_the_config_fields():
    from dataclasses import fields

    from tarp_fast.peft._tuner import _RECORD_FIELDS

    assert {f.name for f in fields(TarpConfig)} == set(PEFT_FIELDS) | set(_RECORD_FIELDS)


def test_named_adapters_set_disable_delete(tmp_path):
    data = batch("gpt2")
    math_model = _peft("gpt2", seed=1, name="math")
    math_model.save_pretrained(str(tmp_path))  # a non-default name: saved in tmp_path/math
    code = _peft("gpt2", seed=2, name="code", variant="bilinear")
    code_logits, base_logits = _logits(code, data), _logits(tiny_model("gpt2"), data)
    code.load_adapter(str(tmp_path / "math"), adapter_name="math")
    assert code.active_adapter == "code" and torch.equal(_logits(code, data), code_logits)
    code.set_adapter("math")
    assert torch.equal(_logits(code, data), _logits(math_model, data))
    with code.disable_adapter():
        assert torch.equal(_logits(code, data), base_logits)
    code.delete_adapter("math")
    assert not any(".math" in n for n, _ in code.named_parameters())
    assert code.active_adapters == ["code"] and torch.equal(_logits(code, data), code_logits)


@pytest.mark.parametrize("variant", ["bilinear", "kronecker"])
def test_merge_and_unload_static_variants(variant):
    model, data = _peft("llama", variant=variant, scale_weight=True), batch("llama")
    expected = _logits(model, data)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, TarpLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, data), expected, rtol=1e-5, atol=1e-5)
    unloaded = _peft("llama", variant=variant).unload()
    assert torch.equal(_logits(unloaded, data), _logits(tiny_model("llama"), data))


def test_kronecker_peft_layer_is_the_papers_form_and_matches_tarplinear():
    """The PEFT layer holds H/KU/KV (not U/V), initializes them as TARPLinear does, and its output
    and merge are TARPLinear's for the same factors."""
    from tarp_fast import TARPLinear

    torch.manual_seed(0)
    zero = get_peft_model(tiny_model("llama"), TarpConfig(r=2, variant="kronecker", scale_weight=True)).eval()
    data = batch("llama")
    torch.testing.assert_close(_logits(zero, data), _logits(tiny_model("llama"), data), rtol=1e-6, atol=1e-6)
    model = _peft("llama", variant="kronecker", scale_weight=True, scaling=0.5)
    layer = next(m for m in model.modules() if isinstance(m, TarpLayer))
    f = layer._factors("default")
    K, N = layer.in_features, layer.out_features
    assert {k: tuple(v.shape) for k, v in f.items()} == {
        "tarp_H": (4, 4, 4), "tarp_KU": (4, N // 4, 2), "tarp_KV": (4, 2, K // 4), "tarp_P": (N, 2), "tarp_Q": (2, K)}
    ref = TARPLinear.from_module(layer.get_base_layer(), rank=2, variant="kronecker", scale_weight=True, scaling=0.5)
    with torch.no_grad():
        for n, v in f.items():
            getattr(ref, n).copy_(v)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-6, atol=1e-6)
        y = layer(x)
        layer.merge()
        torch.testing.assert_close(layer.get_base_layer()(x), y, rtol=1e-5, atol=1e-5)
        layer.unmerge()


def test_kronecker_needs_sizes_divisible_by_n():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 10)  # 10 is not a multiple of 4

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match="TarpLayer: variant='kronecker' needs argument 'out_features' to be a "
                                         "multiple of n=4 .* got out_features=10"):
        get_peft_model(Net(), TarpConfig(r=2, variant="kronecker", target_modules=["proj"]))


def test_old_kronecker_adapter_is_refused_by_peft(tmp_path):
    """A PEFT-saved kronecker adapter of the former form (tarp_A/tarp_B) fails with the reason."""
    from test_adapter import _to_old_kronecker_form, resign

    _peft("llama", variant="kronecker").save_pretrained(str(tmp_path))
    resign(tmp_path, _to_old_kronecker_form)
    with pytest.raises(ValueError, match="tarp_A, .*tarp_B: factors of the former kronecker form"):
        PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))


def test_dynamic_merge_is_refused_and_changes_nothing():
    model, data = _peft("gpt2"), batch("gpt2")
    expected = _logits(model, data)
    for call in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="variant='dynamic': its delta .* depends on each input x"):
            call()
    assert torch.equal(_logits(model, data), expected)
    assert sum(isinstance(m, TarpLayer) for m in model.modules()) == 8


def test_trainer_saves_adapter_only_checkpoints_and_resumes(tmp_path):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(3, VOCAB, (8, 12), generator=g)]

    def run(init_seed, resume=None):
        torch.manual_seed(init_seed)
        model = get_peft_model(tiny_model("gpt2"), TarpConfig(r=2, task_type="CAUSAL_LM"))
        args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2,
                                 per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                                 seed=0, data_seed=0, disable_tqdm=True, logging_steps=100)
        Trainer(model=model, args=args, train_dataset=rows).train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".tarp_" in n}

    full = run(0)
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= set(os.listdir(ckpt)) and "model.safetensors" not in os.listdir(ckpt)
    assert tarp_fast.adapter.read_adapter_config(str(ckpt))["format_version"] == FORMAT_VERSION
    resumed = run(1, resume=str(ckpt))  # another init: only loading the checkpoint makes it equal
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


# ---- one format: the committed format-2 fixture --------------------------------------------------
def test_format_2_fixture_still_loads_and_converts(tmp_path):
    """``tests/fixtures/gpt2_format2_adapter`` was written by save_adapter as of commit c75e064
    (format 2): ``patch_model(tiny_model("gpt2", seed=0), rank=2)``, every factor
    ``randn(generator=manual_seed(1234)) * 0.05`` in ``tarp_parameters`` order."""
    before = _files(FIXTURE)
    saved = load_file(str(FIXTURE / LEGACY_ADAPTER_WEIGHTS))
    model = tarp_fast.load_adapter(tiny_model("gpt2"), str(FIXTURE))
    params = dict(tarp_fast.patch.tarp_named_parameters(model))
    assert params.keys() == saved.keys() and all(torch.equal(params[k], saved[k]) for k in saved)
    data = batch("gpt2")
    expected = _logits(model, data)
    assert not torch.equal(expected, _logits(tiny_model("gpt2"), data))
    with pytest.raises(ValueError, match="field 'format_version' is 2: .*save it again with tarp_fast.save_adapter"):
        TarpConfig.from_pretrained(str(FIXTURE))
    tarp_fast.save_adapter(model, str(tmp_path))  # the conversion: load, save
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_model("gpt2"), str(tmp_path)), data), expected)
    assert _files(FIXTURE) == before  # reading never writes


# ---- export to LoRA -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_export_lora_loads_with_loraconfig_and_matches(family, tmp_path):
    model, data = _peft(family, variant="bilinear", scaling=0.5), batch(family)
    expected = _logits(model, data)
    tarp_fast.export_lora(model, str(tmp_path / "lora"))
    lora = PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "lora")).eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    torch.testing.assert_close(_logits(lora, data), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(str(tmp_path / "tarp"))  # from a folder too
    tarp_fast.export_lora(str(tmp_path / "tarp"), str(tmp_path / "lora2"))
    lora2 = PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "lora2")).eval()
    torch.testing.assert_close(_logits(lora2, data), expected, rtol=1e-5, atol=1e-5)


def test_export_lora_refuses_what_lora_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="variant='dynamic'.*depends on the input x"):
        tarp_fast.export_lora(_peft("gpt2"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="scale_weight=True.*multiplicative term"):
        tarp_fast.export_lora(_peft("gpt2", variant="bilinear", scale_weight=True), str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    tarp_fast.export_lora(_peft("gpt2", variant="bilinear"), str(tmp_path / "b"))
    before = _files(tmp_path / "b")
    with pytest.raises(ValueError, match="already holds an adapter; pass overwrite=True"):
        tarp_fast.export_lora(_peft("gpt2", seed=3, variant="bilinear"), str(tmp_path / "b"))
    assert _files(tmp_path / "b") == before


# ---- bad inputs: clear errors that name the argument; nothing saved is lost ----------------------------
@pytest.mark.parametrize("kw,match", [({"variant": "lora"}, "argument 'variant' must be one of"),
                                      ({"r": 0}, r"argument 'r' \(the rank\) must be a positive int, got 0"),
                                      ({"init": "xavier"}, "argument 'init'"),
                                      ({"scaling": float("nan")}, "argument 'scaling'"),
                                      ({"target_modules": []}, "argument 'target_modules'")])
def test_bad_config_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        TarpConfig(**kw)


def test_lora_adapter_is_not_read_as_tarp_nor_overwritten(tmp_path):
    lora = get_peft_model(tiny_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    lora.save_pretrained(str(tmp_path))
    before = _files(tmp_path)
    for call in (lambda: tarp_fast.load_adapter(tiny_model("gpt2"), str(tmp_path)),
                 lambda: TarpConfig.from_pretrained(str(tmp_path))):
        with pytest.raises(ValueError, match="field 'peft_type' is 'LORA': this is a PEFT 'LORA' adapter, not a TARP"):
            call()
    patched = tarp_fast.patch_model(tiny_model("gpt2"), rank=2)
    with pytest.raises(ValueError, match="holds a PEFT 'LORA' adapter .* would overwrite it"):
        tarp_fast.save_adapter(patched, str(tmp_path))
    assert _files(tmp_path) == before
    # through PEFT, which writes the tensor file before the config: never silent either, and the
    # LoRA config stays (the folder no longer loads as either adapter, rather than as the wrong one)
    with pytest.raises(ValueError, match="holds a PEFT 'LORA' adapter"):
        _peft("gpt2").save_pretrained(str(tmp_path))
    assert _files(tmp_path)[ADAPTER_CONFIG] == before[ADAPTER_CONFIG]


def test_adapter_of_another_model_is_refused_before_anything_changes(tmp_path):
    _peft("gpt2").save_pretrained(str(tmp_path))
    llama = tiny_model("llama")
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ValueError, match="field 'model.model_type' says the adapter was saved from a 'gpt2' model"):
        PeftModel.from_pretrained(llama, str(tmp_path))
    with pytest.raises(ValueError, match="field 'model.model_type'"):
        tarp_fast.load_adapter(llama, str(tmp_path))
    assert not any(isinstance(m, TarpLayer) for m in llama.modules())
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in state.items())
    # same model type, other sizes: the layer named in the file does not fit
    from transformers import GPT2Config, GPT2LMHeadModel

    wide = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=2, n_positions=64))
    with pytest.raises(ValueError, match=r"field 'layers.transformer.h.0.attn.c_attn.in_features' is 32"):
        PeftModel.from_pretrained(wide, str(tmp_path))


def test_adapter_layers_naming_one_module_twice_are_refused(tmp_path):
    """Before: TarpModel's copy of load_adapter's model checks lacked the check that two saved
    layers name two modules (one module reachable under two names got both deltas' checks passed)."""
    _peft("gpt2").save_pretrained(str(tmp_path))
    model = tiny_model("gpt2")
    model.transformer.h[1].attn.c_attn = model.transformer.h[0].attn.c_attn  # one module, two names
    state = {k: v.clone() for k, v in model.state_dict().items()}
    same = r"field 'layers.transformer.h.[01].attn.c_attn' names the same module as layer 'transformer.h.[01].attn.c_attn'"
    with pytest.raises(ValueError, match=f"TarpModel.inject_adapter: .*{same}"):
        PeftModel.from_pretrained(model, str(tmp_path))
    assert not any(isinstance(m, TarpLayer) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match=f"load_adapter: .*{same}"):
        tarp_fast.load_adapter(model, str(tmp_path))


def test_corrupted_peft_adapter_is_refused_by_peft_too(tmp_path):
    _peft("gpt2").save_pretrained(str(tmp_path))
    path = tmp_path / ADAPTER_WEIGHTS
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*replaced or corrupted"):
        PeftModel.from_pretrained(tiny_model("gpt2"), str(tmp_path))


def test_tensor_names_follow_peft_layout(tmp_path):
    _peft("gpt2").save_pretrained(str(tmp_path))
    names = load_file(str(tmp_path / ADAPTER_WEIGHTS)).keys()
    assert all(n.startswith(TENSOR_PREFIX) and ".tarp_" in n for n in names)
    assert f"{TENSOR_PREFIX}transformer.h.0.attn.c_attn.tarp_U" in names


# ---- README ----------------------------------------------------------------------------------------
def _readme_section_code() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Using tarp-fast from PEFT")
    end = text.find("\n## ", start + 5)
    section = text[start:end if end != -1 else None]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_peft_section_runs(tmp_path, monkeypatch):
    blocks = _readme_section_code()
    assert blocks, "the README section has no python code"
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "__readme__"}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102


def test_pickled_save_through_peft_is_refused(tmp_path):
    with pytest.raises(ValueError, match="TARP adapters are saved as safetensors only"):
        _peft("gpt2").save_pretrained(str(tmp_path), safe_serialization=False)
