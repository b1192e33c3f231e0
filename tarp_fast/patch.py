"""Swap the dense layers of an existing model for :class:`~tarp_fast.TARPLinear`, and back.

``patch_model`` replaces the targeted ``nn.Linear`` / transformers ``Conv1D`` modules in place
(the base weights are shared, never copied) and remembers the originals, so ``unpatch_model``
puts the very same module objects back: the state dict is restored bitwise.

``targets``:

* ``"auto"``: by ``model.config.model_type``; GPT-2 (``c_attn``, ``c_proj``, ``c_fc``), BART-style
  (``q/k/v_proj``, ``out_proj``, ``fc1``, ``fc2``), Llama-style (``q/k/v/o_proj``,
  ``gate/up/down_proj``) and BERT/RoBERTa (``query``, ``key``, ``value`` and the ``dense`` layers of
  the encoder blocks). Any other model: every ``nn.Linear``/``Conv1D`` except output heads
  (``lm_head``, ``classifier``, ``score``, ``pooler``, ``qa_outputs``).
* a list of names: a module is targeted when its qualified name equals an entry or ends with
  ``"." + entry``.
* a callable ``(name, module) -> bool``.

Shipping a patched model: :func:`tarp_fast.save_adapter` writes the adapter (the TARP factors)
and ``unpatch_model(model).save_pretrained(dir)`` the base; or :func:`merge_and_unload` folds a
static adapter (``bilinear``, ``kronecker``) into the base weights and leaves a plain model that
``save_pretrained`` writes and the plain class (``AutoModelForCausalLM.from_pretrained``) loads.
``save_pretrained`` on a patched model warns (:class:`PatchedSaveWarning`): it writes the
``tarp_*`` tensors into ``model.safetensors``, which the plain class lists as UNEXPECTED and
drops (it suits only checkpoints reloaded into the same patched model, as ``Trainer`` does).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Union

import torch
import torch.nn as nn

from .nn.linear import TARP_PARAM_PREFIX, TARPLinear, _is_conv1d, kronecker_factor_shapes

__all__ = [
    "patch_model",
    "unpatch_model",
    "tarp_parameters",
    "tarp_named_parameters",
    "mark_only_tarp_trainable",
    "tarp_layers",
    "is_adapter_parameter",
    "AUTO_TARGETS",
    "merge_and_unload",
    "PatchedSaveWarning",
]

#: Name suffixes targeted by ``targets="auto"``, by ``config.model_type``.
AUTO_TARGETS: dict[str, Sequence[str]] = {
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "crossattention.c_attn", "crossattention.q_attn"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"),
}
for _alias, _family in (("mbart", "bart"), ("mistral", "llama"), ("qwen2", "llama"), ("roberta", "bert"),
                        ("xlm-roberta", "bert")):
    AUTO_TARGETS[_alias] = AUTO_TARGETS[_family]
_HEADS = ("lm_head", "classifier", "score", "pooler", "qa_outputs", "cls", "classification_head")
_ORIGINALS = "_tarp_original_modules"
#: Parameters whose qualified name has a component starting with this prefix are adapter
#: parameters too (the TAMS controller and cells).
ADAPTER_MODULE_PREFIX = "tams_"

Targets = Union[str, Iterable[str], Callable[[str, nn.Module], bool]]


def _is_dense(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and not isinstance(module, TARPLinear)) or _is_conv1d(module)


def _target_predicate(model: nn.Module, targets: Targets) -> Callable[[str, nn.Module], bool]:
    if callable(targets):
        return targets
    if isinstance(targets, str):
        if targets != "auto":
            raise ValueError(f"patch_model: argument 'targets' must be 'auto', a list of names or a callable, got {targets!r}")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        suffixes = AUTO_TARGETS.get(model_type)
        if suffixes is None:
            return lambda name, mod: not any(part in _HEADS for part in name.split("."))
        if model_type in ("bert", "roberta", "xlm-roberta"):
            # 'output.dense' also names heads' layers: keep the encoder blocks' own.
            return lambda name, mod: ".layer." in f".{name}" and _matches(name, suffixes)
        return lambda name, mod: _matches(name, suffixes)
    names = list(targets)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"patch_model: argument 'targets' must be a non-empty list of module names, got {targets!r}")
    return lambda name, mod: _matches(name, names)


def _matches(name: str, suffixes: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def patch_modules(model: nn.Module, layer_kw_by_name: dict[str, dict]) -> list[str]:
    """Replace each named dense module with a TARPLinear built with its own keyword arguments.

    All or nothing: if one module cannot be patched, the ones this call already replaced are put
    back (the same module objects), so a failed call leaves ``model`` as it was.
    """
    originals = model.__dict__.setdefault(_ORIGINALS, {})
    done: list[str] = []
    try:
        for name, kw in layer_kw_by_name.items():
            try:
                module = model.get_submodule(name)
            except AttributeError as exc:
                raise ValueError(f"patch_model: the model has no module named {name!r}") from exc
            if isinstance(module, TARPLinear):
                raise RuntimeError(f"patch_model: module {name!r} is already patched; call unpatch_model first")
            if not _is_dense(module):
                raise TypeError(f"patch_model: module {name!r} must be an nn.Linear or Conv1D, got {type(module).__name__}")
            if kw.get("variant") == "kronecker":  # the divisibility error, naming the module that fails it
                conv = _is_conv1d(module)
                kronecker_factor_shapes(module.nx if conv else module.in_features,
                                        module.nf if conv else module.out_features,
                                        1, who=f"patch_model: module {name!r}")  # the rank plays no part
            _set_submodule(model, name, TARPLinear.from_module(module, **kw))
            originals[name] = module
            done.append(name)
    except BaseException:
        unpatch_modules(model, done)
        raise
    _guard_save_pretrained(model)
    return list(layer_kw_by_name)


def unpatch_modules(model: nn.Module, names: Iterable[str]) -> None:
    """Put back the original modules of the named TARP layers (a rollback of :func:`patch_modules`).

    Names this model has no original for are skipped, so a rollback can pass every name it meant
    to patch. Merged layers are unmerged first, as in :func:`unpatch_model`. The record of
    originals is dropped once empty, so an unpatched model carries nothing left over.
    """
    originals = model.__dict__.get(_ORIGINALS, {})
    for name in reversed(list(names)):
        original = originals.pop(name, None)
        if original is None:
            continue
        layer = model.get_submodule(name)
        if isinstance(layer, TARPLinear) and layer.merged:
            layer.unmerge()
        _set_submodule(model, name, original)
    if not originals:
        model.__dict__.pop(_ORIGINALS, None)
        _drop_save_guard(model)


def _peft_wrapped(model: nn.Module) -> list[str]:
    """Where PEFT has wrapped ``model``: the model itself and every module of a ``peft`` class."""
    found = []
    for name, module in model.named_modules():
        if type(module).__module__.split(".")[0] == "peft":
            found.append(name or type(module).__name__)
    if not found and hasattr(model, "peft_config"):
        found.append(type(model).__name__)
    return found


def patch_model(model: nn.Module, *, targets: Targets = "auto", **layer_kw) -> nn.Module:
    """Replace the targeted dense layers of ``model`` by TARPLinear layers, in place.

    ``layer_kw`` goes to :class:`~tarp_fast.TARPLinear` (``rank``, ``variant``, ``scale_weight``,
    ``num_tasks``, ...). Returns ``model``. Raises ``ValueError`` when nothing matches, and for a
    model wrapped by PEFT (patch the base model before wrapping it, or merge PEFT's adapter into it
    first: PEFT's layers are not ``nn.Linear``, so only the layers PEFT left alone would be
    patched). ``model.save_pretrained`` then warns (:class:`PatchedSaveWarning`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if tarp_layers(model):
        raise RuntimeError("patch_model: the model is already patched; call unpatch_model(model) first")
    peft = _peft_wrapped(model)
    if peft:
        raise ValueError(
            f"patch_model: the model is wrapped by PEFT ({', '.join(peft[:3])}{', ...' if len(peft) > 3 else ''}): "
            "its adapter layers are not nn.Linear, so TARP would patch only the layers PEFT left alone and skip "
            "the rest. Patch the base model before PEFT wraps it, or fold PEFT's adapter in first "
            "(model = model.merge_and_unload())")
    wanted = _target_predicate(model, targets)
    seen, names = set(), []
    for name, module in model.named_modules():
        if name and _is_dense(module) and id(module) not in seen and wanted(name, module):
            seen.add(id(module))  # a module shared by two parents is patched once
            names.append(name)
    if not names:
        raise ValueError(
            f"patch_model: argument 'targets' matched no nn.Linear/Conv1D module in {type(model).__name__} "
            f"(targets={targets!r})"
        )
    patch_modules(model, {n: dict(layer_kw) for n in names})
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put the original modules back (merged layers are unmerged first). Returns ``model``."""
    originals = model.__dict__.get(_ORIGINALS, {})
    if not originals:
        raise RuntimeError("unpatch_model: the model is not patched (no TARP layers recorded)")
    unpatch_modules(model, list(originals))
    return model


# ---- shipping: save_pretrained guard, merge_and_unload ----------------------------------------------

class PatchedSaveWarning(UserWarning):
    """``save_pretrained`` of a model with TARP layers (see :mod:`tarp_fast.patch`)."""


_SAVE_GUARD = "save_pretrained"


class _GuardedSavePretrained:
    """``model.save_pretrained`` while the model is patched: warns, then saves as usual.

    An instance attribute (not a class change): ``unpatch_model``/``merge_and_unload`` remove it,
    and deep copies and pickles of the model carry it along with the model it belongs to.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        model = self.model
        if tarp_layers(model):
            warnings.warn(
                f"save_pretrained of a model with TARP layers writes their tarp_* factors into model.safetensors; "
                f"{type(model).__name__}.from_pretrained of the plain class lists them as UNEXPECTED and drops "
                "them (only this patched model can reload that checkpoint). To ship the result: "
                "tarp_fast.save_adapter(model, dir) for the adapter and unpatch_model(model).save_pretrained(dir) "
                "for the base; or tarp_fast.merge_and_unload(model).save_pretrained(dir) for one plain model "
                "(bilinear and kronecker adapters)", PatchedSaveWarning, stacklevel=2)
        return type(model).save_pretrained(model, *args, **kwargs)


def _guard_save_pretrained(model: nn.Module) -> None:
    if callable(getattr(type(model), _SAVE_GUARD, None)) and _SAVE_GUARD not in model.__dict__:
        model.__dict__[_SAVE_GUARD] = _GuardedSavePretrained(model)


def _drop_save_guard(model: nn.Module) -> None:
    if isinstance(model.__dict__.get(_SAVE_GUARD), _GuardedSavePretrained):
        del model.__dict__[_SAVE_GUARD]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every TARP layer's delta into its base weight and put the plain modules back; in place.

    Returns ``model``, now with the original ``nn.Linear``/``Conv1D`` modules (the same objects
    ``patch_model`` replaced) holding the merged weights ``W' = W ⊙ scale + scaling U V``
    (``bilinear``) or ``W ⊙ scale + scaling Σ_i H_i ⊗ (U_i V_i)`` (``kronecker``): its outputs match the
    patched model's up to rounding, and ``save_pretrained`` writes a checkpoint that the plain
    class loads. Only static adapters merge: a ``dynamic`` layer's delta depends on its input and
    a multi-task layer has one delta per task, so either is a ``ValueError`` naming the layers,
    raised before anything changes. A model with TAMS cells is refused too (``remove_tams`` first:
    the cells are extra modules the plain class does not have).
    """
    layers = tarp_layers(model)
    if not layers:
        raise ValueError("merge_and_unload: the model has no TARP layers (patch_model was not called, or it was "
                         "already merged and unloaded)")
    dynamic = [n for n, m in layers.items() if m.variant == "dynamic"]
    if dynamic:
        raise ValueError(
            f"merge_and_unload: {len(dynamic)} TARP layer(s) are variant='dynamic' ({', '.join(dynamic[:3])}"
            f"{', ...' if len(dynamic) > 3 else ''}): their delta U S(x) V depends on the input, so no weight "
            "equals it. Ship the base and the adapter (save_adapter; load_adapter on the base), or use "
            "variant='bilinear' or 'kronecker' for a mergeable adapter")
    multi = [n for n, m in layers.items() if m.num_tasks > 1]
    if multi:
        raise ValueError(f"merge_and_unload: TARP layer(s) {', '.join(multi[:3])} hold one delta per task "
                         f"(num_tasks > 1); a plain model has one weight: merge a single-task adapter")
    tams = [n for n, _ in model.named_modules() if n.split(".")[-1].startswith(ADAPTER_MODULE_PREFIX)]
    if tams:
        raise ValueError(f"merge_and_unload: the model has TAMS modules ({', '.join(tams[:3])}), which a plain "
                         "model does not have; ship it with tams.save_tams, or tams.remove_tams(model) first")
    originals = model.__dict__.get(_ORIGINALS, {})
    missing = [n for n in layers if n not in originals]
    if missing:
        raise ValueError(f"merge_and_unload: TARP layer(s) {', '.join(missing[:3])} were not made by patch_model "
                         "(no original module to put back)")
    with torch.no_grad():
        for layer in layers.values():
            if not layer.merged:
                # writes into the base weight, which the original module shares; no copy of the
                # base is kept (the layer is dropped right below)
                layer.merge(keep_original=False)
            layer._merged_from = None  # keep the merged weight: unpatching must not restore the base
    unpatch_modules(model, list(layers))
    return model


def tarp_layers(model: nn.Module) -> dict[str, TARPLinear]:
    """``{qualified name: layer}`` of every TARPLinear in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TARPLinear)}


def is_adapter_parameter(name: str) -> bool:
    """A TARP factor (``...tarp_U``) or a parameter of a TAMS module (``tams_...`` component)."""
    parts = name.split(".")
    return parts[-1].startswith(TARP_PARAM_PREFIX) or any(p.startswith(ADAPTER_MODULE_PREFIX) for p in parts[:-1])


def tarp_named_parameters(model: nn.Module) -> list[tuple]:
    """``[(name, parameter)]`` of the adapter parameters, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if is_adapter_parameter(n)]


def tarp_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters of ``model`` (TARP factors, TAMS modules), for an optimizer."""
    return [p for _, p in tarp_named_parameters(model)]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


def mark_only_tarp_trainable(model: nn.Module, train_layernorm: bool = False) -> nn.Module:
    """Freeze everything but the adapter parameters (and normalization layers if asked)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in tarp_parameters(model):
        p.requires_grad_(True)
    if train_layernorm:
        for module in model.modules():
            if _is_norm(module):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
    return model
