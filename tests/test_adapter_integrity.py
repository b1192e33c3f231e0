"""Adapters that cannot load wrong (issue 18): corrupted, edited, swapped or torn files are refused
with a ValueError naming the file and field; a failed load leaves the model bitwise as it was;
an interrupted save leaves the old or the new adapter, never a mix."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
import warnings

import pytest
import torch
from models import tiny_model
from safetensors.torch import load_file, save_file
from test_adapter import _patched, resign
from test_cli import TINY, corpus_dir  # noqa: F401  (corpus_dir: a fixture of generated text domains)
from transformers import GPT2Config, GPT2LMHeadModel

import tarp_fast
from tarp_fast import load_adapter, patch_model, save_adapter, unpatch_model
from tarp_fast.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    LEGACY_ADAPTER_WEIGHTS,
    TENSOR_PREFIX,
    AdapterFileNotFoundError,
    read_adapter_config,
)
from tarp_fast.patch import tarp_named_parameters

LAYER = "transformer.h.0.attn.c_attn"
KEY = TENSOR_PREFIX + LAYER  # its tensors' names in the file (PEFT's layout)


def _values(model) -> dict:
    return {n: p.detach().clone() for n, p in tarp_named_parameters(model)}


def _snapshot(model):
    """What "bitwise as before" means: the same module objects, values and bookkeeping."""
    return ([(n, id(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()}, sorted(model.__dict__))


def _assert_unchanged(model, snap):
    modules, state, keys = snap
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert sorted(model.__dict__) == keys


def _load_fails(folder, model=None, match=None):
    """load_adapter must raise a ValueError whose message names a file in ``folder``: a plain one, or
    the missing-file one, never a subclass that names no file (JSONDecodeError, UnicodeDecodeError)."""
    model = model if model is not None else tiny_model("gpt2")
    with pytest.raises(Exception) as info:
        load_adapter(model, str(folder))
    assert type(info.value) in (ValueError, AdapterFileNotFoundError), f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    assert str(folder) in msg, msg
    if match:
        assert match in msg, msg
    return msg


def _saved(folder, seed=1, **kw):
    model = _patched(seed=seed, **kw)
    save_adapter(model, str(folder))
    return _values(model)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _data_offset(path) -> int:
    return 8 + int.from_bytes(open(path, "rb").read(8), "little")


# ---- finding 1: corrupted or swapped tensor files --------------------------------------------------
def test_flipped_byte_in_tensor_data_is_refused(tmp_path):
    _saved(tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    data = bytearray(path.read_bytes())
    data[_data_offset(path) + 5] ^= 0x01
    path.write_bytes(bytes(data))
    _load_fails(tmp_path, match="replaced or corrupted")


def test_ten_overwritten_bytes_never_load_nan_and_leave_the_model_alone(tmp_path):
    _saved(tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    data = bytearray(path.read_bytes())
    start = _data_offset(path) + 40
    data[start:start + 10] = b"\xff" * 10  # float32 NaN patterns
    path.write_bytes(bytes(data))
    model = _patched(seed=3)
    snap = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "loaded anyway" warning either
        _load_fails(tmp_path, model, match="replaced or corrupted")
    _assert_unchanged(model, snap)


def test_another_adapters_tensor_file_is_refused(tmp_path):
    _saved(tmp_path / "a", seed=1)
    _saved(tmp_path / "b", seed=2)  # same architecture, other values
    (tmp_path / "a" / ADAPTER_WEIGHTS).write_bytes((tmp_path / "b" / ADAPTER_WEIGHTS).read_bytes())
    _load_fails(tmp_path / "a", match="replaced or corrupted")


def test_per_tensor_sha256_catches_corrupt_data_behind_a_matching_file_hash(tmp_path):
    _saved(tmp_path)
    path, cfg_path = tmp_path / ADAPTER_WEIGHTS, tmp_path / ADAPTER_CONFIG
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # the last tensor's bytes
    path.write_bytes(bytes(data))
    cfg = json.loads(cfg_path.read_text())
    cfg["safetensors_sha256"] = _sha(bytes(data))
    cfg_path.write_text(json.dumps(cfg))
    msg = _load_fails(tmp_path, match=".sha256' does not match the tensor's bytes")
    assert str(path) in msg


# ---- finding 2: edited scaling ------------------------------------------------------------------
def test_scaling_edited_in_adapter_config_is_refused(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    cfg["layers"][LAYER]["scaling"] = 2.0
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    msg = _load_fails(tmp_path, match=f"field 'layers.{LAYER}.scaling' is 2.0 here but 1.0 in the config embedded")
    assert msg.startswith(f"load_adapter: {tmp_path / ADAPTER_CONFIG}: ")


def test_scaling_edited_in_embedded_metadata_is_refused(tmp_path):
    _saved(tmp_path)
    path, cfg_path = tmp_path / ADAPTER_WEIGHTS, tmp_path / ADAPTER_CONFIG
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    embedded = json.loads(meta["tarp_fast_config"])
    embedded["layers"][LAYER]["scaling"] = 2.0
    meta["tarp_fast_config"] = json.dumps(embedded)
    save_file(tensors, str(path), metadata=meta)
    # the file no longer has the hash adapter_config.json records
    _load_fails(tmp_path, match="replaced or corrupted")
    # with that hash updated too, the embedded config no longer has its own hash
    cfg = json.loads(cfg_path.read_text())
    cfg["safetensors_sha256"] = _sha(path.read_bytes())
    cfg_path.write_text(json.dumps(cfg))
    _load_fails(tmp_path, match="field '__metadata__.tarp_fast_config_sha256' does not match the embedded config")
    # and with every hash consistent, the two configs still disagree
    meta["tarp_fast_config_sha256"] = _sha(meta["tarp_fast_config"].encode())
    save_file(tensors, str(path), metadata=meta)
    cfg["safetensors_sha256"] = _sha(path.read_bytes())
    cfg_path.write_text(json.dumps(cfg))
    _load_fails(tmp_path, match=f"field 'layers.{LAYER}.scaling' is 1.0 here but 2.0 in the config embedded")


# ---- corruption sweeps: every damaged file is a ValueError naming it -------------------------------
def test_corruption_sweep_of_the_tensor_file(tmp_path):
    _saved(tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    good = path.read_bytes()
    positions = [round(i * (len(good) - 1) / 15) for i in range(16)]  # header, metadata and data alike
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 0x5A
        path.write_bytes(bytes(bad))
        _load_fails(tmp_path, match=str(path))
    for size in (0, 7, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:size])
        _load_fails(tmp_path, match=str(path))
    path.write_bytes(good)
    load_adapter(tiny_model("gpt2"), str(tmp_path))  # the sweep restored it: loads


DROP = object()
U = ("tensors", f"{KEY}.tarp_U")
L = ("layers", LAYER)


def _edit(keys, value):
    """A config edit: set (or, with DROP, delete) the entry at the path ``keys``."""
    def edit(cfg):
        obj = cfg
        for k in keys[:-1]:
            obj = obj[k]
        if value is DROP:
            del obj[keys[-1]]
        else:
            obj[keys[-1]] = value

    return edit


CONFIG_EDITS = {  # edits of adapter_config.json alone: (path, new value, expected message)
    "scaling": ((*L, "scaling"), 3.0, f"field 'layers.{LAYER}.scaling'"),
    "rank": ((*L, "rank"), 3, f"field 'layers.{LAYER}.rank'"),
    "shape": ((*U, "shape"), [96, 3], f"field 'tensors.{KEY}.tarp_U.shape[1]'"),
    "file hash": (("safetensors_sha256",), "0" * 64, "replaced or corrupted"),
    "hash type": (("safetensors_sha256",), 7, "field 'safetensors_sha256' must be a sha256"),
    "missing key": (("tensors",), DROP, "field 'tensors' is '<missing>' here"),
    "model type": (("model", "model_type"), "llama", "field 'model.model_type'"),
    "version": (("format_version",), True, "field 'format_version' must be one of"),
}


def test_corruption_sweep_of_adapter_config(tmp_path):
    _saved(tmp_path)
    cfg_path = tmp_path / ADAPTER_CONFIG
    good = cfg_path.read_text()
    for name, (keys, value, expect) in CONFIG_EDITS.items():
        cfg = json.loads(good)
        _edit(keys, value)(cfg)
        cfg_path.write_text(json.dumps(cfg))
        msg = _load_fails(tmp_path, match=expect)
        assert str(tmp_path / ADAPTER_CONFIG) in msg or str(tmp_path / ADAPTER_WEIGHTS) in msg, (name, msg)
    for raw in (good[: len(good) // 2].encode(), b"\xff\xfe{}", b"[1, 2]", b"[" * 100_000, b""):
        cfg_path.write_bytes(raw)  # truncated, not UTF-8, not an object, nested past the recursion limit, empty
        _load_fails(tmp_path, match=str(cfg_path))


# Edits made consistently in both configs, with every hash recomputed (a buggy writer, or a
# deliberate forgery): what the checks behind the hashes see. Each was a raw KeyError, TypeError,
# SafetensorError or a silent load before.
RESIGNED_EDITS = [  # (path, new value, expected message)
    ((*U, "shape"), DROP, f"field 'tensors.{KEY}.tarp_U.shape' is missing"),
    ((*U, "shape"), "96x2", "must be a list of sizes"),
    ((*U, "shape"), [96, -2], "must be a list of sizes"),
    ((*U, "dtype"), "float99", "must name a torch dtype"),
    ((*U, "dtype"), "float16", "the config lists float16"),
    ((*U, "sha256"), "f" * 64, "does not match the tensor's bytes"),
    ((*U, "sha256"), "F" * 64, "must be 64 lowercase hex digits"),
    ((*L, "rank"), "2", f"field 'layers.{LAYER}.rank' must be an integer"),
    ((*L, "rank"), True, f"field 'layers.{LAYER}.rank' must be an integer"),
    ((*L, "in_features"), 10**18, "in_features' must be an integer"),
    ((*L, "scaling"), float("nan"), "must be a finite number"),
    ((*L, "scale_offset"), 0.5, "other settings imply 0.0"),
    ((*L, "variant"), "lora", "must be one of ['dynamic'"),
    ((*L, "bias"), DROP, f"field 'layers.{LAYER}.bias' is missing"),
    (L, [1], f"field 'layers.{LAYER}' must be"),
    (("model",), DROP, "field 'model' is missing"),
    (("extra",), [], "field 'extra' must be an object"),
    (("tensors",), [], "field 'tensors' must be an object"),
    (("tensors", TENSOR_PREFIX + "x.tarp_Z"), {"shape": [1], "dtype": "float32", "sha256": "0" * 64},
     f"only in the config ['{TENSOR_PREFIX}x.tarp_Z']"),
]


def test_resigned_edits_are_value_errors_naming_file_and_field(tmp_path):
    for keys, value, expect in RESIGNED_EDITS:
        _saved(tmp_path)
        resign(tmp_path, mutate_config=_edit(keys, value))
        _load_fails(tmp_path, match=expect)
    _saved(tmp_path)
    resign(tmp_path, mutate_tensors=lambda t: t.__setitem__(f"{KEY}.tarp_U", t[f"{KEY}.tarp_U"].double()))
    # file and config agree on float64, the model is float32: a TypeError (the model's dtype)
    with pytest.raises(TypeError, match="is float64, the model parameter is float32"):
        load_adapter(tiny_model("gpt2"), str(tmp_path))


def test_tensor_file_without_metadata_or_header_is_a_value_error(tmp_path):
    _saved(tmp_path)
    path, cfg_path = tmp_path / ADAPTER_WEIGHTS, tmp_path / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text())
    for content, expect in ((b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]", "field 'header' must be a JSON object"),
                            (b"\xff" * 8 + b"{}", "field 'header' claims"),
                            (b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "field '__metadata__' must be an object")):
        path.write_bytes(content)
        cfg["safetensors_sha256"] = _sha(content)
        cfg_path.write_text(json.dumps(cfg))
        _load_fails(tmp_path, match=expect)


# ---- finding 3: failed loads leave the model as it was ------------------------------------------
def _llama(layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def test_two_layer_adapter_into_one_layer_llama_touches_nothing(tmp_path):
    model = tiny_model("llama")  # 2 layers
    patch_model(model, rank=2)
    save_adapter(model, str(tmp_path))
    small = _llama(1)
    snap = _snapshot(small)
    _load_fails(tmp_path, small, match="field 'layers.model.layers.1.self_attn.q_proj' names a module this "
                                       "LlamaForCausalLM lacks")
    _assert_unchanged(small, snap)
    patch_model(small, rank=2)  # not "already patched"


def test_adapter_of_another_model_type_names_both(tmp_path):
    model = tiny_model("llama")
    patch_model(model, rank=2)
    save_adapter(model, str(tmp_path))
    gpt2 = tiny_model("gpt2")
    snap = _snapshot(gpt2)
    _load_fails(tmp_path, gpt2, match="the adapter was saved from a 'llama' model (LlamaForCausalLM); this model "
                                      "is 'gpt2' (GPT2LMHeadModel)")
    _assert_unchanged(gpt2, snap)


def test_other_features_and_module_types_are_refused_before_patching(tmp_path):
    _saved(tmp_path)
    torch.manual_seed(0)
    wide = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64)).eval()
    snap = _snapshot(wide)
    _load_fails(tmp_path, wide, match=f"field 'layers.{LAYER}.in_features' is 32, module {LAYER!r} of this model has 16")
    _assert_unchanged(wide, snap)
    model = tiny_model("gpt2")
    model.transformer.h[1].mlp.c_fc = torch.nn.Identity()
    snap = _snapshot(model)
    _load_fails(tmp_path, model, match="names a Identity in this model; the adapter expects an nn.Linear or Conv1D")
    _assert_unchanged(model, snap)


def test_failure_mid_patching_is_rolled_back(tmp_path, monkeypatch):
    _saved(tmp_path)
    model = tiny_model("gpt2")
    snap = _snapshot(model)
    real, calls = tarp_fast.nn.linear.TARPLinear.from_module.__func__, []

    def flaky(cls, module, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure while patching layer 4 of 8")
        return real(cls, module, **kw)

    monkeypatch.setattr(tarp_fast.nn.linear.TARPLinear, "from_module", classmethod(flaky))
    with pytest.raises(RuntimeError, match="injected"):
        load_adapter(model, str(tmp_path))
    monkeypatch.undo()
    _assert_unchanged(model, snap)
    patch_model(model, rank=2, init="paper")
    unpatch_model(model)
    load_adapter(model, str(tmp_path))  # and a clean load still works


@pytest.mark.parametrize("patched_first", [False, True])
def test_failure_mid_copy_is_rolled_back(tmp_path, monkeypatch, patched_first):
    saved = _saved(tmp_path, seed=1)
    model = _patched(seed=2) if patched_first else tiny_model("gpt2")
    snap = _snapshot(model)
    calls = []

    def flaky(param, value):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure while copying tensor 3")
        param.copy_(value)

    monkeypatch.setattr(tarp_fast.adapter, "_copy_tensor", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        load_adapter(model, str(tmp_path))
    monkeypatch.undo()
    _assert_unchanged(model, snap)  # copied values restored, patching undone
    load_adapter(model, str(tmp_path))
    assert all(torch.equal(v, saved[k]) for k, v in _values(model).items())


def test_failed_load_tams_is_rolled_back(tmp_path, monkeypatch):
    from tarp_fast.tams import add_tams, load_tams, save_tams

    model = tiny_model("gpt2")
    patch_model(model, rank=2)
    add_tams(model, cell_width=8)
    save_tams(model, str(tmp_path))
    fresh = tiny_model("gpt2")
    snap = _snapshot(fresh)
    def fail(param, value):
        raise RuntimeError("injected")

    monkeypatch.setattr(tarp_fast.adapter, "_copy_tensor", fail)
    with pytest.raises(RuntimeError, match="injected"):
        load_tams(fresh, str(tmp_path))
    monkeypatch.undo()
    _assert_unchanged(fresh, snap)
    load_tams(fresh, str(tmp_path))


# ---- findings 5 and 6: torn and interrupted saves --------------------------------------------------
def _listing(folder):
    return sorted(os.listdir(folder))


def _crash_at(monkeypatch, step):
    """Make the ``step``-th rename of a save raise (1: temp -> pending, 2: the commit, 3: pending ->
    adapter_model.safetensors), as if the process died just before it."""
    real, calls = tarp_fast._io.replace_durably, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == step:
            raise KeyboardInterrupt(f"crash before rename {step}")
        real(src, dst)

    monkeypatch.setattr(tarp_fast._io, "replace_durably", replace)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_crash_at_each_step_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, step):
    old = _saved(tmp_path, seed=1)
    new_model = _patched(seed=2)
    new = _values(new_model)
    _crash_at(monkeypatch, step)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(new_model, str(tmp_path))
    monkeypatch.undo()
    got = _values(load_adapter(tiny_model("gpt2"), str(tmp_path)))
    want = new if step == 3 else old  # step 3 comes after the commit: rolled forward from the pending file
    assert all(torch.equal(got[k], want[k]) for k in want)
    save_adapter(_patched(seed=3), str(tmp_path))  # the next save cleans up
    assert _listing(tmp_path) == sorted([ADAPTER_WEIGHTS, ADAPTER_CONFIG])


@pytest.mark.parametrize("step", [1, 2, 3])
def test_crash_during_a_first_save(tmp_path, monkeypatch, step):
    model = _patched(seed=2)
    _crash_at(monkeypatch, step)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, str(tmp_path))
    monkeypatch.undo()
    if step == 1:
        _load_fails(tmp_path, match="adapter_config.json does not exist (an adapter folder holds")
    elif step == 2:
        _load_fails(tmp_path, match="an interrupted save left the pending file .adapter_model.safetensors.")
        _load_fails(tmp_path, match="the save never completed")
    else:
        got = _values(load_adapter(tiny_model("gpt2"), str(tmp_path)))
        assert all(torch.equal(v, got[k]) for k, v in _values(model).items())
        assert read_adapter_config(str(tmp_path))["format_version"] == FORMAT_VERSION


def test_save_removes_stale_temporaries_and_nothing_else(tmp_path):
    _saved(tmp_path)
    stale = [".adapter_model.safetensors.k3j_9xq0.tmp",  # what a save killed mid-write left (31 MB in the report)
             ".adapter_config.json.abcdefgh.tmp", "." + ".adapter_model.safetensors." + "1" * 64 + ".pending.zzzzzzzz.tmp",
             ".adapter_model.safetensors." + "2" * 64 + ".pending"]
    mine = ["notes.tmp", ".adapter_model.safetensors.tmp", "adapter_model.safetensors.bak",
            ".adapter_model.safetensors.TOOLONG99.tmp"]
    for name in stale + mine:
        (tmp_path / name).write_bytes(b"x" * 100)
    load_adapter(tiny_model("gpt2"), str(tmp_path))  # leftovers never change what loads
    save_adapter(_patched(seed=4), str(tmp_path))
    assert _listing(tmp_path) == sorted([ADAPTER_WEIGHTS, ADAPTER_CONFIG, *mine])


def _fork_save(folder, models, kill_at_rename=None):
    """Run save_adapter in a forked child that is SIGKILLed: at the given rename, or, saving the
    models in turn forever, whenever the parent kills it. Returns the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: never returns into pytest
        real, calls = tarp_fast._io.replace_durably, []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == kill_at_rename:
                if kill_at_rename == 1:
                    os.truncate(src, os.path.getsize(src) // 2)  # as if killed mid-write
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.005)  # widen the windows between the steps, so that timed kills land in them
            real(src, dst)

        tarp_fast._io.replace_durably = replace
        for i in range(1 if kill_at_rename else 10**6):
            save_adapter(models[i % len(models)], str(folder))
    finally:
        os._exit(0)


def _wait(pid, timeout=30.0):
    """The child's wait status; a child still alive after ``timeout`` s (a fork deadlock) is killed
    and fails the test instead of hanging it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked saver did not finish in {timeout} s")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_real_process_killed_mid_save_leaves_a_whole_adapter(tmp_path):
    a_model, b_model = _patched(seed=1), _patched(seed=2)
    a, b = _values(a_model), _values(b_model)
    which = []

    def check():
        got = _values(load_adapter(tiny_model("gpt2"), str(tmp_path)))
        is_a, is_b = (all(torch.equal(got[k], v[k]) for k in v) for v in (a, b))
        assert is_a or is_b, "a mix of two adapters loaded"
        which.append("a" if is_a else "b")

    save_adapter(a_model, str(tmp_path))
    for step in (1, 2, 3):  # deterministic kill points
        pid = _fork_save(tmp_path, [b_model], kill_at_rename=step)
        status = _wait(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        check()
        save_adapter(a_model, str(tmp_path))
    assert which == ["a", "a", "b"]
    rng = random.Random(18)
    for _ in range(4):  # kills at seeded random times while saving a and b in turn
        pid = _fork_save(tmp_path, [b_model, a_model])
        time.sleep(rng.uniform(0.02, 0.15))
        os.kill(pid, signal.SIGKILL)
        _wait(pid)
        check()
    save_adapter(a_model, str(tmp_path))
    assert _listing(tmp_path) == sorted([ADAPTER_WEIGHTS, ADAPTER_CONFIG])


# ---- version 1 ------------------------------------------------------------------------------------
def _as_version_1(folder):
    """Rewrite a saved adapter as the version-1 code wrote it: no model record, no per-tensor or
    embedded-config hash; the embedded config is the JSON config without the file hash."""
    def to_v1(cfg):
        cfg["format_version"] = 1
        cfg.pop("model")

    resign(folder, mutate_config=to_v1, version=1)


def test_version_1_adapter_still_loads(tmp_path):
    saved = _saved(tmp_path)
    _as_version_1(tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["format_version"] == 1 and "sha256" not in cfg["tensors"][f"{LAYER}.tarp_U"]
    got = _values(load_adapter(tiny_model("gpt2"), str(tmp_path)))
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    save_adapter(load_adapter(tiny_model("gpt2"), str(tmp_path)), str(tmp_path))  # re-saved as the current version
    assert read_adapter_config(str(tmp_path))["format_version"] == FORMAT_VERSION
    assert _listing(tmp_path) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]  # the old adapter.safetensors is gone


def test_version_1_mismatch_is_an_error_not_a_fallback(tmp_path):
    _saved(tmp_path / "a", seed=1)
    _saved(tmp_path / "b", seed=2)
    for sub in ("a", "b"):
        _as_version_1(tmp_path / sub)
    # the torn pair version 1 "repaired" with the embedded config, with only a warning
    (tmp_path / "a" / LEGACY_ADAPTER_WEIGHTS).write_bytes((tmp_path / "b" / LEGACY_ADAPTER_WEIGHTS).read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load_fails(tmp_path / "a", match="replaced or corrupted")
    cfg = json.loads((tmp_path / "b" / ADAPTER_CONFIG).read_text())
    cfg["layers"][LAYER]["scaling"] = 2.0
    (tmp_path / "b" / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    _load_fails(tmp_path / "b", match=f"field 'layers.{LAYER}.scaling' is 2.0 here but 1.0")


# ---- the command line: a corrupted adapter is exit status 2, with the file named ------------------
def test_cli_adapt_refuses_a_corrupted_prepared_adapter(corpus_dir, tmp_path, capsys):  # noqa: F811
    from tarp_fast.cli import main

    prepared = tmp_path / "prepared"
    assert main(["prepare", "--corpus", corpus_dir, "--heldout", "delta", *TINY, "--out", str(prepared)]) == 0
    path = prepared / "adapter" / ADAPTER_WEIGHTS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    capsys.readouterr()
    rc = main(["adapt", "--prepared", str(prepared), "--corpus", corpus_dir, "--domain", "delta",
               "--out", str(tmp_path / "ad"), "--steps", "2", "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}: its sha256" in err and "replaced or corrupted" in err, err
    assert not (tmp_path / "ad" / "adapter").exists()


def test_written_files_get_the_usual_mode(tmp_path):
    """Atomic writes give the mode a plain open() would (0666 & ~umask), not mkstemp's 0600."""
    from tarp_fast._io import _umask, atomic_write_bytes

    path = tmp_path / "f.json"
    atomic_write_bytes(str(path), b"{}")
    assert (path.stat().st_mode & 0o777) == (0o666 & ~_umask())
