"""Export a bilinear TARP adapter as a PEFT LoRA adapter, for servers that load LoRA only.

A ``bilinear`` TARP layer adds ``scaling · U V x``; LoRA adds ``(lora_alpha / r) · B A x``. So
``lora_B = U``, ``lora_A = V`` and ``lora_alpha = scaling · r``, per layer (``rank_pattern`` /
``alpha_pattern`` where layers differ). The other variants have no LoRA form, and say why.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch.nn as nn

from .. import _io
from .. import adapter as _adapter
from ..nn.linear import TARPLinear

__all__ = ["export_lora"]

_WHY = {
    "dynamic": "its delta U·S(x)·V·x depends on the input x through S(x) = reshape(G·x, (r, r)), computed per "
               "token, which LoRA's fixed delta B·A cannot express",
    "kronecker": "its delta Σ_i H_i ⊗ (U_i V_i) is a sum of Kronecker products (an n×n grid of blocks, each a "
                 "different mix of the n low-rank terms), not one rank-r product B·A",
    "scale_weight": "its multiplicative term W ⊙ softplus(P·Q + offset) rescales the base weight, which LoRA's "
                    "additive delta cannot express",
    "num_tasks": "it holds one delta per task (num_tasks > 1); export one task's adapter",
}


def export_lora(model_or_dir: Union[nn.Module, str, os.PathLike], out_dir: Union[str, os.PathLike], *,
                adapter_name: Optional[str] = None, overwrite: bool = False) -> str:
    """Write a ``bilinear`` TARP adapter to ``out_dir`` as a PEFT LoRA adapter; return ``out_dir``.

    ``model_or_dir``: a TARP adapter folder (:func:`tarp_fast.save_adapter` /
    ``PeftModel.save_pretrained``, any format version), a ``PeftModel`` with TARP adapters
    (``adapter_name``, default the active one), or a model patched by :func:`tarp_fast.patch_model`.
    The result loads with ``peft.PeftModel.from_pretrained(base, out_dir)`` (a ``LoraConfig``)
    and gives the TARP adapter's outputs up to float rounding.

    Raises ``ValueError`` naming the layer and why for adapters LoRA cannot express (``dynamic``,
    ``kronecker``, ``scale_weight``, ``num_tasks > 1``), and when ``out_dir`` already holds an
    adapter (``overwrite=True`` replaces it). Needs PEFT (for ``LoraConfig``).
    """
    from peft import LoraConfig  # noqa: PLC0415

    layers, factors, info = _collect(model_or_dir, adapter_name)
    for name, cfg in layers.items():
        why = None
        if cfg.get("num_tasks", 1) != 1:
            why = _WHY["num_tasks"]
        elif cfg["variant"] != "bilinear":
            why = _WHY[cfg["variant"]]
        elif cfg["scale_weight"]:
            why = _WHY["scale_weight"]
        if why:
            raise ValueError(f"export_lora: layer {name!r} (variant={cfg['variant']!r}, "
                             f"scale_weight={cfg['scale_weight']}) cannot be exported to LoRA: {why}. Only "
                             "variant='bilinear' adapters without scale_weight export")
    if not layers:
        raise ValueError("export_lora: argument 'model_or_dir' has no TARP layers to export")
    out_dir = os.fspath(out_dir)
    config_path = os.path.join(out_dir, _adapter.ADAPTER_CONFIG)
    if os.path.exists(config_path) and not overwrite:
        raise ValueError(f"export_lora: {config_path} exists: argument 'out_dir' already holds an adapter; pass "
                         "overwrite=True to replace it, or choose another folder")
    ranks = {n: c["rank"] for n, c in layers.items()}
    alphas = {n: float(c["scaling"]) * c["rank"] for n, c in layers.items()}
    first = next(iter(layers))
    r, alpha = ranks[first], alphas[first]
    exact = {n: f"^{re.escape(n)}" for n in layers}  # PEFT matches pattern keys as (.*\.)?(key)$
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=sorted(layers),
        rank_pattern={exact[n][1:]: v for n, v in ranks.items() if v != r},
        alpha_pattern={exact[n][1:]: v for n, v in alphas.items() if v != alpha},
        fan_in_fan_out=info["conv1d"], task_type=info["task_type"],
        base_model_name_or_path=info["base_model_name_or_path"], inference_mode=True,
    )
    tensors = {}
    for name in layers:
        U, V = factors[name]
        tensors[f"{_adapter.TENSOR_PREFIX}{name}.lora_A.weight"] = V.detach().to("cpu").contiguous().clone()
        tensors[f"{_adapter.TENSOR_PREFIX}{name}.lora_B.weight"] = U.detach().to("cpu").contiguous().clone()
    from safetensors.torch import save as _save  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    _io.atomic_write_bytes(os.path.join(out_dir, _adapter.ADAPTER_WEIGHTS), _save(tensors, metadata={"format": "pt"}))
    config.save_pretrained(out_dir)  # PEFT's own writer: what LoraConfig.from_pretrained reads
    return out_dir


def _collect(source, adapter_name: Optional[str]) -> tuple:
    """``(layers: name -> settings, factors: name -> (U, V), info)`` of the adapter to export."""
    if isinstance(source, (str, os.PathLike)):
        read = _adapter.read_adapter(os.fspath(source), "export_lora")
        layers = read.config["layers"]
        factors = {n: (read.tensors.get(f"{n}.tarp_U"), read.tensors.get(f"{n}.tarp_V")) for n in layers}
        model_type = (read.config.get("model") or {}).get("model_type")
        return layers, factors, {"conv1d": model_type == "gpt2", "task_type": read.config.get("task_type"),
                                 "base_model_name_or_path": read.config.get("base_model_name_or_path")}
    if not isinstance(source, nn.Module):
        raise TypeError(f"export_lora: argument 'model_or_dir' must be a model or an adapter folder, "
                        f"got {type(source).__name__}")
    from ._tuner import TarpLayer, TarpModel  # noqa: PLC0415

    peft_config = getattr(source, "peft_config", None)
    if hasattr(source, "get_base_model"):  # a PeftModel: module names relative to the base model
        source = source.get_base_model()
    elif isinstance(source, TarpModel):
        source = source.model
    tarp_layers = [(n, m) for n, m in source.named_modules() if isinstance(m, TarpLayer)]
    if tarp_layers:
        name = adapter_name
        if name is None:
            active = getattr(source, "active_adapter", None)
            name = active if isinstance(active, str) else tarp_layers[0][1].active_adapters[0]
        layers, factors, conv = {}, {}, False
        for full, m in tarp_layers:
            if name not in m.tarp_settings:
                continue
            key = full
            layers[key] = m.tarp_config(name)
            f = m._factors(name)
            factors[key] = (f.get("tarp_U"), f.get("tarp_V"))
            conv = conv or m.conv1d
        if not layers:
            raise ValueError(f"export_lora: argument 'adapter_name' {name!r} is not an adapter of this model")
        cfg = peft_config.get(name) if isinstance(peft_config, dict) else None
        task = getattr(cfg, "task_type", None)
        return layers, factors, {"conv1d": conv, "task_type": getattr(task, "value", task),
                                 "base_model_name_or_path": getattr(cfg, "base_model_name_or_path", None)}
    layers, factors, conv = {}, {}, False
    for full, m in source.named_modules():
        if isinstance(m, TARPLinear):
            layers[full] = m.tarp_config()
            factors[full] = (getattr(m, "tarp_U", None), getattr(m, "tarp_V", None))
            conv = conv or m._conv1d_layout
    name_or_path = getattr(source, "name_or_path", None)
    return layers, factors, {"conv1d": conv, "task_type": None,
                             "base_model_name_or_path": name_or_path if isinstance(name_or_path, str) and name_or_path
                             else None}

