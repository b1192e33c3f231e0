"""Adapter files: validation on save and on load, atomic writes, no pickle.

``resign`` rewrites an adapter folder consistently (every hash recomputed, independently of
tarp_fast's code) so that a test reaches the checks behind the hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import pytest
import torch
from models import tiny_model
from safetensors.torch import load_file, save_file

import tarp_fast
from tarp_fast import load_adapter, patch_model, save_adapter
from tarp_fast.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    LEGACY_ADAPTER_WEIGHTS,
    TENSOR_PREFIX,
)


def _patched(rank=2, seed=0, **kw):
    model = tiny_model("gpt2", seed=0)
    patch_model(model, rank=rank, init="paper", **kw)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in tarp_fast.tarp_parameters(model):
            p.normal_()
    return model


def _first_param(model):
    return tarp_fast.patch.tarp_named_parameters(model)[0]


def test_save_rejects_non_finite_and_unpatched(tmp_path):
    model = _patched()
    with torch.no_grad():
        _first_param(model)[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_adapter(model, str(tmp_path / "a"))
    assert not (tmp_path / "a" / ADAPTER_CONFIG).exists()
    with pytest.raises(ValueError, match="no adapter parameters"):
        save_adapter(tiny_model("gpt2"), str(tmp_path / "b"))


def test_save_copies_no_cpu_tensor_and_names_the_non_finite_one(tmp_path, monkeypatch):
    """Before: save_adapter cloned every tensor and checked it, then write_adapter did both again."""
    model = _patched()
    clones = []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: (clones.append(tuple(t.shape)),
                                                                  real_clone(t, *a, **k))[1])
    save_adapter(model, str(tmp_path / "a"))
    monkeypatch.undo()
    assert not clones  # the CPU parameters are hashed and written as they are
    saved = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    assert all(torch.equal(saved[TENSOR_PREFIX + n], p) for n, p in tarp_fast.patch.tarp_named_parameters(model))
    name, param = _first_param(model)
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=rf"save_adapter: adapter tensor '{TENSOR_PREFIX}{name}' holds non-finite"):
        save_adapter(model, str(tmp_path / "b"))
    assert not (tmp_path / "b" / ADAPTER_CONFIG).exists()


def test_save_adapter_parameters_sharing_memory(tmp_path):
    """Two adapter parameters on one memory (safetensors refuses shared tensors): still saved, as
    when save_adapter cloned every tensor."""
    model = _patched()
    a, b = model.transformer.h[0].attn.c_attn, model.transformer.h[1].attn.c_attn
    b.tarp_V = torch.nn.Parameter(a.tarp_V.data)  # another Parameter, the same memory
    save_adapter(model, str(tmp_path))
    fresh = load_adapter(tiny_model("gpt2", seed=0), str(tmp_path))
    assert torch.equal(fresh.transformer.h[1].attn.c_attn.tarp_V, a.tarp_V)


def test_load_rejects_mismatched_model(tmp_path):
    save_adapter(_patched(rank=2), str(tmp_path))
    other = tiny_model("gpt2")
    patch_model(other, rank=3, init="paper")
    with pytest.raises(ValueError, match=r"differs from the adapter config.*'rank': \(2, 3\)"):
        load_adapter(other, str(tmp_path))
    fewer = tiny_model("gpt2")
    patch_model(fewer, targets=["c_attn"], rank=2, init="paper")
    with pytest.raises(ValueError, match="not a TARP layer of the model"):
        load_adapter(fewer, str(tmp_path))
    same = tiny_model("gpt2")
    patch_model(same, targets="auto", rank=2, init="paper")
    load_adapter(same, str(tmp_path))  # the same layers: loads


def test_load_rejects_dtype_mismatch(tmp_path):
    save_adapter(_patched(), str(tmp_path))
    model = tiny_model("gpt2").double()
    patch_model(model, rank=2, init="paper")
    with pytest.raises(TypeError, match="is float32, the model parameter is float64"):
        load_adapter(model, str(tmp_path))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """The format's per-tensor hash: sha256 of the raw C-order bytes."""
    return _sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def resign(folder, mutate_tensors=None, mutate_config=None, *, version=FORMAT_VERSION):
    """Rewrite both files as save_adapter would after ``mutate_tensors(dict)`` / ``mutate_config(cfg)``.

    The tensor listing is recomputed from the tensors before ``mutate_config`` runs, so that an
    edit of the listing (a shape, a hash) survives; every other hash is recomputed after it.
    ``version`` < 3 writes the old layout (``adapter.safetensors``, names without PEFT's prefix).
    """
    folder = pathlib.Path(folder)
    source = folder / ADAPTER_WEIGHTS if (folder / ADAPTER_WEIGHTS).exists() else folder / LEGACY_ADAPTER_WEIGHTS
    tensors = load_file(str(source))
    weights = folder / (ADAPTER_WEIGHTS if version >= 3 else LEGACY_ADAPTER_WEIGHTS)
    if version < 3:
        tensors = {k.removeprefix(TENSOR_PREFIX): v for k, v in tensors.items()}
        source.unlink()
    if mutate_tensors:
        mutate_tensors(tensors)
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    cfg.pop("safetensors_sha256", None)
    cfg["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                          **({"sha256": tensor_sha256(v)} if version >= 2 else {})} for k, v in tensors.items()}
    if mutate_config:
        mutate_config(cfg)
    text = json.dumps(cfg)
    meta = {"tarp_fast_config": text}
    if version >= 2:
        meta["tarp_fast_config_sha256"] = _sha256(text.encode())
    save_file(tensors, str(weights), metadata=meta)
    cfg["safetensors_sha256"] = _sha256(weights.read_bytes())
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg))


def test_load_rejects_non_finite_missing_and_unexpected(tmp_path):
    save_adapter(_patched(), str(tmp_path))
    key = sorted(load_file(str(tmp_path / ADAPTER_WEIGHTS)))[0]

    def poison(t):
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("inf")

    resign(tmp_path, poison)
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="non-finite"):
        load_adapter(model, str(tmp_path))

    save_adapter(_patched(), str(tmp_path))
    resign(tmp_path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match="implies tensor .* which is missing"):
        load_adapter(tiny_model("gpt2"), str(tmp_path))

    save_adapter(_patched(), str(tmp_path))
    resign(tmp_path, lambda t: t.__setitem__(TENSOR_PREFIX + "transformer.h.0.attn.c_attn.tarp_X", torch.zeros(2)))
    with pytest.raises(ValueError, match="unexpected keys .*tarp_X"):
        load_adapter(tiny_model("gpt2"), str(tmp_path))


def test_load_rejects_config_that_disagrees_with_tensors(tmp_path):
    save_adapter(_patched(rank=2), str(tmp_path))
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    name = sorted(cfg["layers"])[0]
    cfg["layers"][name]["rank"] = 5
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    # caught by the cross-check with the config embedded in the tensor file ...
    with pytest.raises(ValueError, match=rf"field 'layers.{name}.rank' is 5 here but 2 in the config embedded"):
        load_adapter(tiny_model("gpt2"), str(tmp_path))
    # ... and, were both configs edited alike, by the shapes the layer settings imply
    save_adapter(_patched(rank=2), str(tmp_path))
    resign(tmp_path, mutate_config=lambda c: c["layers"][name].__setitem__("rank", 5))
    with pytest.raises(ValueError, match=r"is \[.*\], but the config of layer .*rank=5"):
        load_adapter(tiny_model("gpt2"), str(tmp_path))


@pytest.mark.parametrize("content,msg", [("{not json", "not valid UTF-8 JSON"),
                                         ('{"format": "other"}', "not a tarp-fast adapter"),
                                         ('{"format": "tarp-fast-adapter", "format_version": 99}',
                                          r"field 'format_version' must be one of \[1, 2, 3\], got 99")])
def test_load_rejects_bad_config_files(tmp_path, content, msg):
    save_adapter(_patched(), str(tmp_path))
    (tmp_path / ADAPTER_CONFIG).write_text(content)
    with pytest.raises(ValueError, match=msg):
        load_adapter(tiny_model("gpt2"), str(tmp_path))


def test_missing_files_are_reported(tmp_path):
    # a ValueError (bad input, CLI exit status 2) that is still a FileNotFoundError for old callers
    with pytest.raises(ValueError, match=r"adapter_config.json does not exist \(an adapter folder holds") as info:
        load_adapter(tiny_model("gpt2"), str(tmp_path))
    assert isinstance(info.value, FileNotFoundError) and str(tmp_path) in str(info.value)
    save_adapter(_patched(), str(tmp_path))
    (tmp_path / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(ValueError, match=f"{tmp_path / ADAPTER_WEIGHTS} does not exist"):
        load_adapter(tiny_model("gpt2"), str(tmp_path))


def test_crash_during_save_leaves_previous_adapter_loadable(tmp_path, monkeypatch):
    first = _patched(seed=1)
    save_adapter(first, str(tmp_path))
    second = _patched(seed=2)

    def crash(src, dst):
        raise KeyboardInterrupt("killed before the first rename")

    monkeypatch.setattr(tarp_fast._io, "replace_durably", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(second, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([ADAPTER_WEIGHTS, ADAPTER_CONFIG])  # no temp file left
    restored = load_adapter(tiny_model("gpt2"), str(tmp_path))
    assert torch.equal(_first_param(restored)[1], _first_param(first)[1])


def test_swapped_tensor_file_is_refused_not_loaded_through_the_embedded_config(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_adapter(_patched(seed=1), str(a))
    save_adapter(_patched(seed=2), str(b))
    # another adapter's tensors beside this config: version 1 loaded them (with a warning)
    (a / ADAPTER_WEIGHTS).write_bytes((b / ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match=f"{a / ADAPTER_WEIGHTS}: .*replaced or corrupted"):
        load_adapter(tiny_model("gpt2"), str(a))


def test_package_never_pickles():
    root = pathlib.Path(tarp_fast.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for banned in ("import pickle", "torch.load(", "torch.save("):
            assert banned not in text, (path, banned)


# ---- the kronecker form (issue 16, item 5) ---------------------------------------------------------
def test_kronecker_adapter_round_trip(tmp_path):
    model = _patched(variant="kronecker", scale_weight=True)
    names = {n.rsplit(".", 1)[-1] for n, _ in tarp_fast.patch.tarp_named_parameters(model)}
    assert names == {"tarp_H", "tarp_KU", "tarp_KV", "tarp_P", "tarp_Q"}
    save_adapter(model, str(tmp_path))
    loaded = load_adapter(tiny_model("gpt2"), str(tmp_path))
    want = dict(tarp_fast.patch.tarp_named_parameters(model))
    got = dict(tarp_fast.patch.tarp_named_parameters(loaded))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def _to_old_kronecker_form(tensors: dict) -> None:
    """Rewrite each kronecker layer's tensors as the former form wrote them: ``tarp_A [r, n1, k1]``,
    ``tarp_B [r, n2, k2]`` with ``N = n1 n2``, ``K = k1 k2`` split as evenly as the divisors allow."""

    def split(n):
        a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
        return a, n // a

    g = torch.Generator().manual_seed(0)
    for key in [k for k in tensors if k.endswith(".tarp_H")]:
        layer = key[: -len(".tarp_H")]
        KU, KV = tensors.pop(f"{layer}.tarp_KU"), tensors.pop(f"{layer}.tarp_KV")
        del tensors[key]
        r, N, K = KU.shape[-1], KU.shape[0] * KU.shape[1], KV.shape[0] * KV.shape[2]
        (n1, n2), (k1, k2) = split(N), split(K)
        tensors[f"{layer}.tarp_A"] = torch.randn(r, n1, k1, generator=g)
        tensors[f"{layer}.tarp_B"] = torch.randn(r, n2, k2, generator=g)


def test_old_kronecker_adapter_is_refused_and_changes_nothing(tmp_path):
    """Before the paper's form, kronecker adapters held tarp_A/tarp_B: such a file must never load
    into (or silently skip) the new H/KU/KV factors."""
    save_adapter(_patched(variant="kronecker"), str(tmp_path))
    resign(tmp_path, _to_old_kronecker_form)
    assert any(k.endswith(".tarp_A") for k in load_file(str(tmp_path / ADAPTER_WEIGHTS)))
    msg = (r"field 'layers\.transformer\.h\.\d\.\w+\.\w+' is not loadable: the adapter holds "
           r"\S+\.tarp_A, \S+\.tarp_B: factors of the former kronecker form .* tarp_H, tarp_KU, tarp_KV.*"
           r"tarp_fast_version.*merge_and_unload")
    plain = tiny_model("gpt2")
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match=msg):
        load_adapter(plain, str(tmp_path))
    assert not tarp_fast.patch.tarp_layers(plain)
    after = plain.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())
    patched = _patched(variant="kronecker", seed=3)
    before = {k: v.clone() for k, v in patched.state_dict().items()}
    with pytest.raises(ValueError, match=msg):
        load_adapter(patched, str(tmp_path), strict=False)
    assert all(torch.equal(v, before[k]) for k, v in patched.state_dict().items())
