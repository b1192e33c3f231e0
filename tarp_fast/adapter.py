"""Save and load adapters (``adapter_model.safetensors`` + ``adapter_config.json``); never pickle.

One adapter format for tarp-fast and Hugging Face PEFT: :func:`save_adapter` /
:func:`load_adapter` and the PEFT method :mod:`tarp_fast.peft` (``PeftModel.save_pretrained`` /
``PeftModel.from_pretrained``, ``Trainer`` checkpoints) write and read the same files, with PEFT's
file names and key layout, so an adapter saved next to a model (``model.save_pretrained(d)``)
lets ``AutoModelForCausalLM.from_pretrained(d)`` load both once ``tarp_fast`` is imported (which
registers TARP with PEFT; see :func:`tarp_fast.peft.register`).

A load either succeeds whole, with exactly the saved values, or raises and leaves the model as
it was. Files that were edited, truncated, swapped or torn by a crash are refused, never
"repaired" by picking one of two disagreeing copies.

Format (``format_version`` 3)
-----------------------------
``adapter_config.json`` is at once a PEFT config (``TarpConfig``; PEFT reads ``peft_type``) and
the tarp-fast record::

    {"peft_type": "TARP", "task_type": null, "r": 8, "variant": "dynamic", "target_modules": [...],
     ... (the other TarpConfig fields, see PEFT_FIELDS),
     "format": "tarp-fast-adapter", "format_version": 3, "tarp_fast_version": "0.1.0",
     "model": {"model_type": "gpt2", "class": "GPT2LMHeadModel"},   # model_type may be null
     "layers": {"<module name>": {<TARPLinear.tarp_config()>}, ...},
     "tensors": {"base_model.model.<parameter name>": {"shape": [...], "dtype": "float32", "sha256": "<hex>"}, ...},
     "extra": {...},                      # e.g. TAMS settings, free-form JSON
     "safetensors_sha256": "<hex>"}       # of the whole adapter_model.safetensors file

``layers`` is what loading builds (module names and each layer's settings); the PEFT fields
``r``, ``variant``, ... repeat the first layer's settings for PEFT's own display. Tensor names are
PEFT's: ``"base_model.model." + <module name> + ".tarp_U"`` (the name of the
:class:`~tarp_fast.TARPLinear` parameter behind the prefix).

``adapter_model.safetensors`` holds the tensors and, in its metadata, ``tarp_fast_config`` (the
same config as JSON text, without ``safetensors_sha256``) and ``tarp_fast_config_sha256`` (the
sha256 of that text), so the tensor file validates itself. A tensor's ``sha256`` is that of its
raw bytes as safetensors stores them (C order, little-endian).

Versions 1 and 2 (``adapter.safetensors``, no PEFT fields, tensor names without the prefix)
still load with :func:`load_adapter`; saving again writes version 3 (and removes the old
``adapter.safetensors``, which the new config no longer names).

Load checks, all before the model is touched; each failure is a ``ValueError`` that names the
file and the field (``load_adapter: <path>: field 'x' ...``):

1. ``adapter_config.json`` is a JSON object with this format and a readable version (a PEFT
   adapter of another method, e.g. ``peft_type`` ``"LORA"``, is refused naming ``peft_type``).
2. The tensor file's sha256 equals ``safetensors_sha256`` (else see "Saving": a pending file
   with that hash is read instead; anything else is "replaced or corrupted").
3. The embedded config matches its own hash, and ``adapter_config.json`` (apart from
   ``safetensors_sha256``) equals it field by field; the first differing field is reported.
4. Every field has its type and range; each layer's settings imply the listed tensor shapes. A
   ``kronecker`` layer saved in the former form ``Σ_i A_i ⊗ B_i`` (tensors ``tarp_A``/``tarp_B``)
   is refused with a message saying the form changed and what to do (never loaded into the
   current ``tarp_H``/``tarp_KU``/``tarp_KV``).
5. The tensors are the listed ones, with the listed shapes, dtypes and sha256, all finite.
6. The model: the same ``model_type``; every adapter layer names an ``nn.Linear``/``Conv1D``
   with the saved in/out features and bias (or, in a patched model, a TARP layer with the saved
   settings); the adapter tensors match the model's adapter parameters one to one (``strict``).

Only then is the model changed: patched if it has no TARP layers, then the values copied. If
that still fails, the patching is undone and overwritten values are put back, so the model is
bitwise as before and ``patch_model`` works on it again.

Why ``ValueError`` everywhere (missing files too: :class:`AdapterFileNotFoundError` is both a
``ValueError`` and a ``FileNotFoundError``): a bad adapter is bad input, which the CLI maps to
exit status 2, and the message must say which file and field to look at. The one exception is a
dtype that differs between file and model: a ``TypeError``, since the model is what needs
``model.to(dtype)``. ``model_type`` decides whether the adapter belongs to the model; the class
name is recorded for the message (an adapter moves between heads of one model type when the
module names match). :func:`read_adapter_config` runs checks 1-5. Loading reads the tensor file
whole into memory (it is hashed before it is parsed).

Saving: a commit protocol whose commit point is ``adapter_config.json``
-----------------------------------------------------------------------
1. write the tensor file atomically to ``.adapter_model.safetensors.<sha256>.pending``;
2. write ``adapter_config.json`` atomically (the commit);
3. rename the pending file over ``adapter_model.safetensors``.

A save never replaces a folder's PEFT adapter of another method (``adapter_config.json`` with
another ``peft_type``): it raises ``ValueError`` instead. Model files (``config.json``,
``model.safetensors``, ...) have other names and are never touched.

A crash before 2 leaves the previous adapter (after a first save: none, and loading says that
an interrupted save left a pending file). A crash after 2 leaves a config whose hash names the
pending file: loading reads that file (rolls forward in memory) and the next save cleans up.
Each save first deletes what interrupted saves left in the folder (this module's temporaries
and pending files, except the one the committed config still needs), and again after its
commit. That is safe with **one writer per folder**: two processes saving into the same folder
at once may delete each other's files.

Version 1 adapters (no model record, no per-tensor or embedded-config hashes) still load, with
the checks that version has: the whole-file hash, the cross-check of the two configs and the
rest of 3-6. A hash mismatch is an error; nothing falls back to the embedded config.

:func:`write_adapter` and :func:`read_adapter` are the two halves shared with
:mod:`tarp_fast.peft` (which adds the model checks of 6 for PEFT's injection).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors.torch import load as _load_safetensors
from safetensors.torch import save as _save_safetensors

from . import __version__, _io
from .nn.linear import INITS, OLD_KRONECKER_FACTORS, VARIANTS, TARPLinear, old_kronecker_form_message
from .patch import _is_dense, patch_modules, tarp_layers, tarp_named_parameters, unpatch_modules

__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "AdapterFileNotFoundError",
           "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "LEGACY_ADAPTER_WEIGHTS", "FORMAT_VERSION", "PEFT_TYPE",
           "TENSOR_PREFIX", "PEFT_FIELDS"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's name (format 3)
ADAPTER_CONFIG = "adapter_config.json"
LEGACY_ADAPTER_WEIGHTS = "adapter.safetensors"  # formats 1 and 2
FORMAT = "tarp-fast-adapter"
FORMAT_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
#: ``peft_type`` of a TARP adapter (PEFT reads it to pick :class:`tarp_fast.peft.TarpConfig`)
PEFT_TYPE = "TARP"
#: tensor names in the file: PEFT's ``base_model.model.`` + the model's parameter name (format 3)
TENSOR_PREFIX = "base_model.model."
#: The PEFT fields of ``adapter_config.json`` with the values :func:`save_adapter` writes when the
#: layers do not say otherwise: every field of :class:`tarp_fast.peft.TarpConfig` but the tarp-fast
#: record (a test keeps the two in step, so PEFT reads the file without "unexpected key" warnings).
PEFT_FIELDS = {
    "peft_type": PEFT_TYPE, "task_type": None, "peft_version": None, "auto_mapping": None,
    "base_model_name_or_path": None, "revision": None, "inference_mode": True,
    "r": 8, "variant": "dynamic", "scale_weight": False, "scale_rank": None, "scaling": 1.0,
    "init": "zero_delta", "target_modules": "auto", "exclude_modules": None, "modules_to_save": None,
}
_META_KEY = "tarp_fast_config"
_META_HASH_KEY = "tarp_fast_config_sha256"
_FILE_HASH_KEY = "safetensors_sha256"
_LAYER_KEYS = ("in_features", "out_features", "bias", "rank", "variant", "scale_weight", "scale_rank",
               "scaling", "num_tasks", "init", "scale_offset")
#: layer settings a patched model may differ in from the adapter it loads
_LOAD_IGNORES = ("init",)
_PENDING_RE = re.escape("." + ADAPTER_WEIGHTS) + r"\.([0-9a-f]{64})\.pending"
_LEGACY_PENDING_RE = re.escape("." + LEGACY_ADAPTER_WEIGHTS) + r"\.([0-9a-f]{64})\.pending"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: bound on sizes read from a file: real layers are far smaller, and the bound keeps a hostile
#: config from making the shape arithmetic (e.g. the Kronecker factor search) run for hours
_MAX_FEATURES = 2**31 - 1


class AdapterFileNotFoundError(FileNotFoundError, ValueError):
    """An adapter file is missing. A ``ValueError`` like every other bad-adapter error (the CLI
    maps those to exit status 2), and a ``FileNotFoundError`` for callers that catch that."""


# ---- errors ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _File:
    """Who reports, about which file: every error reads ``<func>: <path>: field '<f>' ...``."""

    func: str
    path: str

    def error(self, field: str, msg: str) -> ValueError:
        return ValueError(f"{self.func}: {self.path}: field {field!r} {msg}")

    def plain(self, msg: str) -> ValueError:
        return ValueError(f"{self.func}: {self.path}: {msg}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- hashes and names --------------------------------------------------------------------------
def _tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the tensor's raw bytes in C order (what safetensors stores)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def _weights_name(version: int) -> str:
    """The tensor file of a format version: PEFT's name from version 3 on."""
    return ADAPTER_WEIGHTS if version >= 3 else LEGACY_ADAPTER_WEIGHTS


def _pending_path(directory: str, sha: str, weights: str = ADAPTER_WEIGHTS) -> str:
    return os.path.join(directory, f".{weights}.{sha}.pending")


def _pending_files(directory: str, pattern: str = _PENDING_RE) -> list[str]:
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(os.path.join(directory, n) for n in names if re.fullmatch(pattern, n))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _model_identity(model: nn.Module) -> dict:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return {"model_type": model_type if isinstance(model_type, str) else None, "class": type(model).__name__}


def _adapter_state(model: nn.Module) -> dict:
    return {n: p for n, p in tarp_named_parameters(model)}


# ---- save --------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: str, *, extra: Optional[dict] = None) -> str:
    """Write the model's adapter parameters and config to ``directory``; return its path.

    Writes format 3 (module docstring): PEFT's file names and key layout, so
    ``peft.PeftModel.from_pretrained`` reads what this writes (single-task TARP layers; TAMS and
    ``num_tasks > 1`` adapters load with tarp-fast only). ``extra`` is free-form JSON stored with
    the config (TAMS uses it). Raises ``ValueError`` when the model has no adapter parameters, an
    adapter tensor is not finite, ``extra`` is not JSON, or ``directory`` holds a PEFT adapter of
    another method (never overwritten). The files are committed as the module docstring says (one
    writer per folder): an interrupted save leaves the previous adapter loadable, or the new one,
    never a mix.
    """
    layers = tarp_layers(model)
    state = _adapter_state(model)
    if not state:
        raise ValueError(
            "save_adapter: the model has no adapter parameters (no TARP layers, no TAMS modules); "
            "call patch_model(model) first"
        )
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"save_adapter: argument 'extra' must be a dict or None, got {type(extra).__name__}")
    layer_configs = {n: layer.tarp_config() for n, layer in layers.items()}
    # write_adapter copies them to the CPU and refuses non-finite values (naming the tensor)
    return write_adapter(directory, {TENSOR_PREFIX + n: t for n, t in state.items()}, layers=layer_configs,
                         model=_model_identity(model), extra=extra or {}, header=peft_header(layer_configs, model),
                         func="save_adapter")


def peft_header(layers: dict, model: Optional[nn.Module] = None) -> dict:
    """The PEFT fields (:data:`PEFT_FIELDS`) for an adapter with these layers (settings of the first)."""
    header = dict(PEFT_FIELDS)
    first = next(iter(layers.values()), None)
    if first is not None:
        header.update(r=first["rank"], variant=first["variant"], scale_weight=first["scale_weight"],
                      scale_rank=first["scale_rank"], scaling=first["scaling"], init=first["init"])
    header["target_modules"] = sorted(layers)
    if model is not None:
        header["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
        name = getattr(model, "name_or_path", None)
        header["base_model_name_or_path"] = name if isinstance(name, str) and name else None
    return header


def _cpu_tensors(tensors: dict) -> dict:
    """Detached, contiguous CPU tensors, each owning its memory: a tensor is copied only when
    its memory is not its own already (on another device, a view into a larger buffer, or
    memory another tensor of ``tensors`` uses too): safetensors refuses tensors sharing memory."""
    out, seen = {}, set()
    for name, t in tensors.items():
        c = t.detach().to("cpu").contiguous()
        storage = c.untyped_storage()
        if storage.nbytes() and (storage.data_ptr() in seen or storage.nbytes() != c.numel() * c.element_size()):
            c = c.clone()
        seen.add(c.untyped_storage().data_ptr())
        out[name] = c
    return out


def write_adapter(directory: str, tensors: dict, *, layers: dict, model: dict, extra: dict, header: dict,
                  func: str) -> str:
    """Write a format-3 adapter: ``tensors`` (named as in the file; on any device, copied to the
    CPU here), the tarp-fast record and the PEFT fields ``header``; validated as the loader will
    read it, then committed.

    The one writer of adapters: :func:`save_adapter` and ``TarpConfig.save_pretrained`` (the PEFT
    path) both end here. Raises ``ValueError`` (prefixed ``func``) for a non-finite tensor,
    non-JSON content or a folder holding a PEFT adapter of another method.
    """
    tensors = _cpu_tensors(tensors)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{func}: adapter tensor {name!r} holds non-finite values (NaN or inf)")
    config = {
        **header,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tarp_fast_version": __version__,
        "model": model,
        "layers": layers,
        "tensors": {n: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "sha256": _tensor_sha256(t)}
                    for n, t in tensors.items()},
        "extra": extra,
    }
    try:
        embedded = json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{func}: argument 'extra' must be JSON (finite numbers, no objects): {exc}") from exc
    # What the loader sees is the JSON round trip (tuples become lists, keys strings): validate
    # that, so a save never writes an adapter its own loader refuses.
    _validate_config(json.loads(embedded), FORMAT_VERSION, _File(func, directory))
    _refuse_foreign_adapter(directory, func)
    data = _save_safetensors(tensors, metadata={_META_KEY: embedded, _META_HASH_KEY: _io.sha256_bytes(embedded.encode())})
    file_sha = _io.sha256_bytes(data)
    config_text = json.dumps({**json.loads(embedded), _FILE_HASH_KEY: file_sha}, indent=2) + "\n"
    _commit(directory, data, file_sha, config_text.encode())
    return directory


def _existing_config(directory: str) -> Optional[dict]:
    """The folder's ``adapter_config.json`` as a JSON object, or ``None`` (absent or unreadable)."""
    raw = _read_bytes(os.path.join(directory, ADAPTER_CONFIG))
    if raw is None:
        return None
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _refuse_foreign_adapter(directory: str, func: str) -> None:
    """Never overwrite a PEFT adapter of another method (a LoRA saved in the same folder, say)."""
    existing = _existing_config(directory)
    if existing is not None and "peft_type" in existing and existing["peft_type"] != PEFT_TYPE:
        raise ValueError(
            f"{func}: {os.path.join(directory, ADAPTER_CONFIG)} holds a PEFT {existing['peft_type']!r} adapter "
            "(field 'peft_type'); saving a TARP adapter here would overwrite it. Save into another folder, or "
            "delete that adapter first"
        )


def _commit(directory: str, data: bytes, file_sha: str, config_bytes: bytes) -> None:
    """The three steps of the commit protocol (module docstring), with cleanup around them."""
    os.makedirs(directory, exist_ok=True)
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    previous = _existing_config(directory)
    legacy = previous is not None and previous.get("format") == FORMAT and previous.get("format_version") in (1, 2)
    _remove_leftovers(directory, keep=_pending_of_committed(config_path, directory))
    pending = _pending_path(directory, file_sha)
    _io.atomic_write_bytes(pending, data)  # 1: the new tensors, not yet visible
    _io.atomic_write_bytes(config_path, config_bytes)  # 2: the commit
    _io.replace_durably(pending, os.path.join(directory, ADAPTER_WEIGHTS))  # 3
    _remove_leftovers(directory, keep=None)
    if legacy:  # the replaced version-1/2 adapter's tensor file: the new config no longer names it
        _remove_leftovers(directory, keep=None, legacy=True)


def _pending_of_committed(config_path: str, directory: str) -> Optional[str]:
    """The pending file the committed config may still need (a crash between steps 2 and 3)."""
    try:
        with open(config_path, "rb") as fh:
            recorded = json.loads(fh.read().decode("utf-8")).get(_FILE_HASH_KEY)
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return _pending_path(directory, recorded) if isinstance(recorded, str) and _SHA256_RE.fullmatch(recorded) else None


def _remove_leftovers(directory: str, keep: Optional[str], legacy: bool = False) -> None:
    """Delete this module's temporaries and pending files in ``directory`` (one writer per folder).

    ``legacy``: those of a version-1/2 adapter instead, and its ``adapter.safetensors`` (called
    only after a version-3 commit replaced that adapter). Failing to delete is not an error: a
    leftover never changes what loads, it only takes space.
    """
    if legacy:
        targets = (re.escape(LEGACY_ADAPTER_WEIGHTS), _LEGACY_PENDING_RE)
        leftovers = [p for t in targets for p in _io.stale_temporaries(directory, t)]
        leftovers += _pending_files(directory, _LEGACY_PENDING_RE) + [os.path.join(directory, LEGACY_ADAPTER_WEIGHTS)]
    else:
        targets = (re.escape(ADAPTER_WEIGHTS), re.escape(ADAPTER_CONFIG), _PENDING_RE)
        leftovers = [p for t in targets for p in _io.stale_temporaries(directory, t)] + _pending_files(directory)
    for path in leftovers:
        if path != keep:
            try:
                _io.remove_quietly(path)
            except OSError:
                pass


# ---- read and validate the files ---------------------------------------------------------------
@dataclass
class _Adapter:
    config: dict  # adapter_config.json, validated (equal to the embedded config but for the file hash)
    tensors: dict  # model parameter name (file name less TENSOR_PREFIX) -> CPU tensor, validated
    version: int
    config_path: str
    weights_path: str  # the tensor file read: a pending file after a save torn between steps 2 and 3


def read_adapter_config(directory: str) -> dict:
    """The config of the adapter in ``directory``, after every file check of :func:`load_adapter`.

    Raises ``ValueError`` (naming the file and field) when the folder does not hold a complete,
    consistent adapter, exactly when :func:`load_adapter` would for the files alone.
    """
    return _read_adapter(directory, "read_adapter_config").config


def read_adapter(directory: str, func: str) -> _Adapter:
    """Checks 1-5 of the module docstring; errors read ``<func>: <path>: ...`` (for :mod:`tarp_fast.peft`)."""
    return _read_adapter(directory, func)


def _read_adapter(directory: str, func: str) -> _Adapter:
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    cfile = _File(func, config_path)
    config, version = _read_config_file(directory, cfile)
    recorded = config.get(_FILE_HASH_KEY)
    if not isinstance(recorded, str) or not _SHA256_RE.fullmatch(recorded):
        raise cfile.error(_FILE_HASH_KEY, f"must be a sha256 (64 lowercase hex digits), got {_short(recorded)}")
    path, data = _tensor_file_for(directory, recorded, version, func, config_path)
    wfile = _File(func, path)
    entries, metadata = _parse_header(data, wfile)
    embedded = _embedded_config(metadata, version, wfile)
    _cross_check(config, embedded, cfile, path)
    _validate_config(embedded, version, cfile)
    tensors = _load_tensors(data, entries, embedded["tensors"], version, wfile)
    if version >= 3:  # validated: every name starts with the prefix
        tensors = {n[len(TENSOR_PREFIX):]: t for n, t in tensors.items()}
    return _Adapter(config, tensors, version, config_path, path)


def _read_config_file(directory: str, cfile: _File) -> tuple:
    """``adapter_config.json`` parsed, with its format and version checked."""
    if not os.path.isfile(cfile.path):
        pending = _pending_files(directory) or _pending_files(directory, _LEGACY_PENDING_RE)
        if pending:
            raise AdapterFileNotFoundError(
                f"{cfile.func}: {cfile.path} does not exist: an interrupted save left the pending file "
                f"{os.path.basename(pending[0])} and the save never completed (writing {ADAPTER_CONFIG} is its "
                "commit); save the adapter again"
            )
        raise AdapterFileNotFoundError(
            f"{cfile.func}: {cfile.path} does not exist (an adapter folder holds {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS}, written by save_adapter)"
        )
    with open(cfile.path, "rb") as fh:
        raw = fh.read()
    config = _parse_json(raw, cfile, "(document)")
    peft_type = config.get("peft_type")
    if peft_type is not None and peft_type != PEFT_TYPE:
        raise cfile.error("peft_type", f"is {_short(peft_type)}: this is a PEFT {_short(peft_type)} adapter, not a "
                                       f"TARP adapter (peft_type {PEFT_TYPE!r}); load it with "
                                       "peft.PeftModel.from_pretrained")
    if config.get("format") != FORMAT:
        raise cfile.error("format", f"must be {FORMAT!r}, got {_short(config.get('format'))}: "
                                    "this is not a tarp-fast adapter config")
    version = config.get("format_version")
    if type(version) is not int or version not in _READABLE_VERSIONS:
        raise cfile.error("format_version", f"must be one of {list(_READABLE_VERSIONS)}, got {_short(version)} "
                                            f"(this tarp-fast reads versions up to {FORMAT_VERSION})")
    return config, version


def _parse_json(raw: bytes, file: _File, field: str) -> dict:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise file.error(field, f"is not valid UTF-8 JSON ({str(exc)[:120]})") from exc
    if not isinstance(value, dict):
        raise file.error(field, f"must be a JSON object, got {type(value).__name__}")
    return value


def _read_bytes(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _tensor_file_for(directory: str, recorded: str, version: int, func: str, config_path: str) -> tuple:
    """``(path, bytes)`` of the tensor file whose sha256 is ``recorded``.

    ``adapter.safetensors`` when it matches; else the pending file of a save interrupted after
    its commit (version 2). Anything else was replaced or corrupted, or the folder is torn.
    """
    weights_name = _weights_name(version)
    weights_path = os.path.join(directory, weights_name)
    data = _read_bytes(weights_path)
    if data is not None and _io.sha256_bytes(data) == recorded:
        return weights_path, data
    if version >= 2:
        pending = _pending_path(directory, recorded, weights_name)
        pdata = _read_bytes(pending)
        if pdata is not None and _io.sha256_bytes(pdata) == recorded:
            return pending, pdata
    if data is None:
        raise AdapterFileNotFoundError(
            f"{func}: {weights_path} does not exist (an adapter folder holds {ADAPTER_CONFIG} and "
            f"{weights_name}, written by save_adapter)"
        )
    raise ValueError(
        f"{func}: {weights_path}: its sha256 {_io.sha256_bytes(data)[:16]}... differs from field "
        f"{_FILE_HASH_KEY!r} = {recorded[:16]}... of {config_path}: the tensor file (or that field) was "
        "replaced or corrupted, and no pending file of an interrupted save matches; save the adapter again"
    )


def _parse_header(data: bytes, wfile: _File) -> tuple:
    """``(tensor entries, metadata)`` from a safetensors header: 8-byte length, then JSON."""
    if len(data) < 8:
        raise wfile.error("header", f"is missing: the file has {len(data)} bytes, a safetensors file at least 8")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise wfile.error("header", f"claims {size} bytes, the file has {len(data) - 8} after the length")
    header = _parse_json(data[8:8 + size], wfile, "header")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise wfile.error("__metadata__", "must be an object of strings (the file was not written by save_adapter)")
    return header, metadata


def _embedded_config(metadata: dict, version: int, wfile: _File) -> dict:
    text = metadata.get(_META_KEY)
    if text is None:
        raise wfile.error(f"__metadata__.{_META_KEY}", "is missing (the file was not written by save_adapter)")
    if version >= 2 and metadata.get(_META_HASH_KEY) != _io.sha256_bytes(text.encode()):
        raise wfile.error(f"__metadata__.{_META_HASH_KEY}", "does not match the embedded config: the config in "
                                                            "the tensor file was edited after it was saved")
    return _parse_json(text.encode(), wfile, f"__metadata__.{_META_KEY}")


def _first_difference(a: Any, b: Any, path: str) -> Optional[tuple]:
    """``(field path, value in a, value in b)`` of the first difference, or ``None``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return sub, a.get(key, "<missing>"), b.get(key, "<missing>")
            found = _first_difference(a[key], b[key], sub)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    same = type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))
    return None if same else (path, a, b)


def _cross_check(config: dict, embedded: dict, cfile: _File, weights_path: str) -> None:
    """adapter_config.json (but its file hash) must equal the config embedded in the tensor file."""
    mine = {k: v for k, v in config.items() if k != _FILE_HASH_KEY}
    found = _first_difference(mine, embedded, "")
    if found:
        field, here, there = found
        raise cfile.error(field, f"is {_short(here)} here but {_short(there)} in the config embedded in "
                                 f"{weights_path}: one of the two files was edited")


# ---- the schema ----------------------------------------------------------------------------------
def _get(obj: dict, key: str, field: str, file: _File) -> Any:
    if key not in obj:
        raise file.error(field, "is missing")
    return obj[key]


def _get_int(obj: dict, key: str, field: str, file: _File, lo: int = 1) -> int:
    v = _get(obj, key, field, file)
    if type(v) is not int or not lo <= v <= _MAX_FEATURES:
        raise file.error(field, f"must be an integer in [{lo}, {_MAX_FEATURES}], got {_short(v)}")
    return v


def _get_typed(obj: dict, key: str, field: str, file: _File, kind: type, what: str) -> Any:
    v = _get(obj, key, field, file)
    if type(v) is not kind:
        raise file.error(field, f"must be {what}, got {_short(v)}")
    return v


def _get_number(obj: dict, key: str, field: str, file: _File) -> float:
    v = _get(obj, key, field, file)
    if type(v) not in (int, float) or not math.isfinite(v):
        raise file.error(field, f"must be a finite number, got {_short(v)}")
    return v


def _get_choice(obj: dict, key: str, field: str, file: _File, choices: tuple) -> str:
    v = _get(obj, key, field, file)
    if not isinstance(v, str) or v not in choices:
        raise file.error(field, f"must be one of {list(choices)}, got {_short(v)}")
    return v


def _validate_config(config: dict, version: int, file: _File) -> None:
    """Every field the loader uses has its type and range; the layers imply the listed shapes."""
    _get_typed(config, "tarp_fast_version", "tarp_fast_version", file, str, "a string")
    if version >= 2:
        model = _get_typed(config, "model", "model", file, dict, "an object")
        mt = _get(model, "model_type", "model.model_type", file)
        if mt is not None and not isinstance(mt, str):
            raise file.error("model.model_type", f"must be a string or null, got {_short(mt)}")
        _get_typed(model, "class", "model.class", file, str, "a string")
    _get_typed(config, "extra", "extra", file, dict, "an object")
    if version >= 3:
        peft_type = _get(config, "peft_type", "peft_type", file)
        if peft_type != PEFT_TYPE:
            raise file.error("peft_type", f"must be {PEFT_TYPE!r}, got {_short(peft_type)}")
    tensors = _get_typed(config, "tensors", "tensors", file, dict, "an object")
    for name, entry in tensors.items():
        _validate_tensor_entry(name, entry, version, file)
        if version >= 3 and not name.startswith(TENSOR_PREFIX):
            raise file.error(f"tensors.{name}", f"must be named {TENSOR_PREFIX!r} + a parameter name (PEFT's layout)")
    layers = _get_typed(config, "layers", "layers", file, dict, "an object")
    for lname, cfg in layers.items():
        _validate_layer(lname, cfg, tensors, file, TENSOR_PREFIX if version >= 3 else "")


def _validate_tensor_entry(name: str, entry: Any, version: int, file: _File) -> None:
    field = f"tensors.{name}"
    if not isinstance(entry, dict):
        raise file.error(field, f"must be an object, got {_short(entry)}")
    shape = _get_typed(entry, "shape", f"{field}.shape", file, list, "a list of sizes")
    if not all(type(d) is int and 0 <= d <= _MAX_FEATURES for d in shape):
        raise file.error(f"{field}.shape", f"must be a list of sizes in [0, {_MAX_FEATURES}], got {_short(shape)}")
    dtype = _get_typed(entry, "dtype", f"{field}.dtype", file, str, "a dtype name")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise file.error(f"{field}.dtype", f"must name a torch dtype, got {_short(dtype)}")
    if version >= 2:
        sha = _get_typed(entry, "sha256", f"{field}.sha256", file, str, "a sha256")
        if not _SHA256_RE.fullmatch(sha):
            raise file.error(f"{field}.sha256", f"must be 64 lowercase hex digits, got {_short(sha)}")


def _validate_layer(lname: str, cfg: Any, tensors: dict, file: _File, prefix: str = "") -> None:
    field = f"layers.{lname}"
    if not lname or not isinstance(cfg, dict):
        raise file.error(field, f"must be a non-empty module name with an object, got {_short(cfg)}")
    for key in ("in_features", "out_features", "rank", "scale_rank", "num_tasks"):
        _get_int(cfg, key, f"{field}.{key}", file)
    for key in ("bias", "scale_weight"):
        _get_typed(cfg, key, f"{field}.{key}", file, bool, "true or false")
    _get_choice(cfg, "variant", f"{field}.variant", file, VARIANTS)
    _get_choice(cfg, "init", f"{field}.init", file, INITS)
    for key in ("scaling", "scale_offset"):
        _get_number(cfg, key, f"{field}.{key}", file)
    # Before the probe: an old-form layer's shapes may not even be valid for the new form, and
    # the error must say why (the form changed), not just that tensors are missing.
    old = [f"{prefix}{lname}.{n}" for n in OLD_KRONECKER_FACTORS if f"{prefix}{lname}.{n}" in tensors]
    if cfg["variant"] == "kronecker" and old:
        raise file.error(field, "is not loadable: " + old_kronecker_form_message("the adapter", old))
    try:
        probe = _probe_layer(cfg)
    except (ValueError, TypeError) as exc:
        raise file.error(field, f"is not a valid TARPLinear configuration: {exc}") from exc
    derived = probe.tarp_config()
    for key in _LAYER_KEYS:
        if derived[key] != cfg[key]:
            raise file.error(f"{field}.{key}", f"is {_short(cfg[key])}, but the layer's other settings imply "
                                               f"{_short(derived[key])}")
    for pname, p in probe.tarp_named_parameters():
        key = f"{prefix}{lname}.{pname}"
        if key not in tensors:
            raise file.error(field, f"implies tensor {key!r}, which is missing from field 'tensors'")
        if tensors[key]["shape"] != list(p.shape):
            raise file.error(f"tensors.{key}.shape", f"is {tensors[key]['shape']}, but the config of layer {lname!r} "
                                                     f"(rank={cfg['rank']}, variant={cfg['variant']!r}) implies "
                                                     f"{list(p.shape)}")


def _probe_layer(cfg: dict) -> TARPLinear:
    """A meta-device TARPLinear with the config's shapes (no memory)."""
    with torch.device("meta"):
        return TARPLinear(cfg["in_features"], cfg["out_features"], cfg["bias"], **_layer_kwargs(cfg))


def _layer_kwargs(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("rank", "variant", "scale_weight", "scale_rank", "scaling", "num_tasks", "init")}


def _load_tensors(data: bytes, entries: dict, listing: dict, version: int, wfile: _File) -> dict:
    """The file's tensors, checked against the config's listing: names, shapes, dtypes, hashes."""
    only_file, only_cfg = sorted(set(entries) - set(listing)), sorted(set(listing) - set(entries))
    if only_file or only_cfg:
        raise wfile.error("tensors", f"differ from the config's listing: only in the file {only_file[:5]}, "
                                     f"only in the config {only_cfg[:5]}")
    try:
        tensors = _load_safetensors(data)
    except Exception as exc:  # the library's own error type; the file content is at fault
        raise wfile.error("tensors", f"cannot be read as safetensors ({str(exc)[:160]})") from exc
    for name, t in tensors.items():
        entry = listing[name]
        if list(t.shape) != entry["shape"] or _dtype_name(t.dtype) != entry["dtype"]:
            raise wfile.error(f"tensors.{name}", f"is {_dtype_name(t.dtype)} {list(t.shape)}, the config lists "
                                                 f"{entry['dtype']} {entry['shape']}")
        if version >= 2 and _tensor_sha256(t) != entry["sha256"]:
            raise wfile.error(f"tensors.{name}.sha256", "does not match the tensor's bytes: the tensor data was "
                                                        "corrupted or replaced")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise wfile.error(f"tensors.{name}", "holds non-finite values (NaN or inf)")
    return tensors


# ---- the model -----------------------------------------------------------------------------------
@dataclass
class _Plan:
    to_patch: dict  # layer name -> TARPLinear keyword arguments (empty: the model is patched already)
    created: set  # adapter parameter names the patching creates (nothing to restore on rollback)


def load_adapter(model: nn.Module, directory: str, *, strict: bool = True) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``; return ``model``.

    An unpatched model is patched first, layer by layer, as the config says. A patched model must
    have the same TARP layers with the same settings. With ``strict=True`` (default) the adapter
    tensors and the model's adapter parameters must match one to one (without it the model may
    have adapter parameters the file lacks); the shapes must always match.

    Raises ``ValueError`` naming the file and field for anything wrong with the files or for an
    adapter of another model (model type, module names, types, in/out features, bias), and
    ``AdapterFileNotFoundError`` (a ``ValueError``) for a missing file. A dtype mismatch between
    the file and the model raises ``TypeError``: the file is fine, the model needs
    ``model.to(dtype)``. Nothing is changed before every check passed, and a failure after that
    undoes the patching and the copies, so a failed load leaves ``model`` bitwise as it was.
    """
    adapter = _read_adapter(directory, "load_adapter")
    plan = _plan_load(model, adapter, strict)
    _apply(model, adapter, plan)
    return model


def _plan_load(model: nn.Module, adapter: _Adapter, strict: bool) -> _Plan:
    """Check the adapter against the model, touching nothing; say what loading will change."""
    cfile = _File("load_adapter", adapter.config_path)
    config = adapter.config
    _check_model_identity(model, config, cfile)
    layers = tarp_layers(model)
    if not layers and config["layers"]:
        base = _check_base_modules(model, config["layers"], cfile)
        to_patch = {n: _layer_kwargs(cfg) for n, cfg in config["layers"].items()}
        expected = {n: (tuple(p.shape), p.dtype) for n, p in _adapter_state(model).items()}
        created = set()
        for lname, cfg in config["layers"].items():
            for pname, p in _probe_layer(cfg).tarp_named_parameters():
                key = f"{lname}.{pname}"
                expected[key] = (tuple(p.shape), base[lname].weight.dtype)
                created.add(key)
    else:
        _check_tarp_layers(model, layers, config["layers"], strict, cfile)
        to_patch, created = {}, set()
        expected = {n: (tuple(p.shape), p.dtype) for n, p in _adapter_state(model).items()}
    _check_parameters(expected, adapter, strict)
    return _Plan(to_patch, created)


def _check_model_identity(model: nn.Module, config: dict, cfile: _File) -> None:
    """The recorded model type must be this model's (also checked for PEFT's ``TarpModel``)."""
    saved = config.get("model")  # version 1 records no model
    if not isinstance(saved, dict) or "model_type" not in saved:
        return
    mine = _model_identity(model)
    if saved["model_type"] != mine["model_type"]:
        raise cfile.error("model.model_type", f"says the adapter was saved from a {saved['model_type']!r} model "
                                              f"({saved.get('class')}); this model is {mine['model_type']!r} "
                                              f"({mine['class']})")


def _check_base_modules(model: nn.Module, layers: dict, cfile: _File, *,
                        resolve: Optional[Callable[[nn.Module], nn.Module]] = None) -> dict:
    """Each adapter layer must name a distinct dense module with the saved features and bias.

    ``resolve`` maps the module found under a layer's name to the one checked (PEFT's
    ``TarpModel`` passes its layer's ``base_layer``); returns ``{layer name: checked module}``.
    """
    found, seen = {}, {}
    for lname, cfg in layers.items():
        field = f"layers.{lname}"
        try:
            module = model.get_submodule(lname)
        except AttributeError:
            raise cfile.error(field, f"names a module this {type(model).__name__} lacks") from None
        if resolve is not None:
            module = resolve(module)
        if not _is_dense(module):
            raise cfile.error(field, f"names a {type(module).__name__} in this model; the adapter expects an "
                                     "nn.Linear or Conv1D")
        if id(module) in seen:
            raise cfile.error(field, f"names the same module as layer {seen[id(module)]!r}")
        seen[id(module)] = lname
        is_linear = isinstance(module, nn.Linear)
        mine = {"in_features": module.in_features if is_linear else module.nx,
                "out_features": module.out_features if is_linear else module.nf,
                "bias": module.bias is not None}
        for key, value in mine.items():
            if cfg[key] != value:
                raise cfile.error(f"{field}.{key}", f"is {cfg[key]!r}, module {lname!r} of this model has {value!r}")
        found[lname] = module
    return found


def _check_tarp_layers(model: nn.Module, layers: dict, saved: dict, strict: bool, cfile: _File) -> None:
    for lname, cfg in saved.items():
        layer = layers.get(lname)
        if layer is None:
            raise cfile.error(f"layers.{lname}", "names a module that is not a TARP layer of the model (the model "
                                                 "is patched, so its TARP layers must be the adapter's)")
        mine = layer.tarp_config()
        # `init` only says how the factors were first drawn: once loaded they are the adapter's.
        # The scale_offset it implies matters only with the multiplicative term (scale_weight).
        ignored = _LOAD_IGNORES + (() if cfg["scale_weight"] or mine["scale_weight"] else ("scale_offset",))
        diff = {k: (cfg[k], mine[k]) for k in _LAYER_KEYS if k not in ignored and cfg[k] != mine[k]}
        if diff:
            raise cfile.error(f"layers.{lname}", f"differs from the adapter config (adapter, model): {diff}")
    if strict:
        extra_layers = sorted(set(layers) - set(saved))
        if extra_layers:
            raise cfile.error("layers", f"lacks TARP layers the model has: {extra_layers[:5]}")


def _check_parameters(expected: dict, adapter: _Adapter, strict: bool) -> None:
    """The file's tensors against the model's adapter parameters (as they will be after patching)."""
    wfile = _File("load_adapter", adapter.weights_path)
    keys = set(adapter.tensors)
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if unexpected or (strict and missing):
        raise wfile.error("tensors", f"do not match the model's adapter parameters: missing keys {missing[:5]}, "
                                     f"unexpected keys {unexpected[:5]}")
    for key, t in adapter.tensors.items():
        shape, dtype = expected[key]
        if tuple(t.shape) != shape:
            raise wfile.error(f"tensors.{key}", f"has shape {list(t.shape)}, the model expects {list(shape)}")
        if t.dtype != dtype:
            raise TypeError(
                f"load_adapter: tensor {key!r} is {_dtype_name(t.dtype)}, the model parameter is "
                f"{_dtype_name(dtype)}; convert the model (model.to(dtype)) before loading"
            )


def _copy_tensor(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value)


def _apply(model: nn.Module, adapter: _Adapter, plan: _Plan) -> None:
    """Patch and copy; on any failure put the model back as it was (module objects and values)."""
    patched: list = []
    backup: dict = {}
    params: dict = {}
    try:
        if plan.to_patch:
            patch_modules(model, plan.to_patch)
            patched = list(plan.to_patch)
        params = _adapter_state(model)
        with torch.no_grad():
            for key, value in adapter.tensors.items():
                if key not in plan.created:
                    backup[key] = params[key].detach().clone()
                _copy_tensor(params[key], value)
    except BaseException:
        with torch.no_grad():
            for key, old in backup.items():
                params[key].copy_(old)
        unpatch_modules(model, patched)
        raise
