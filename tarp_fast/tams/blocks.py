"""Where the sublayers of GPT-2, BART and Llama-style blocks are, by model family.

A *gated layer* is one transformer block with two sublayers, attention (index 0) and FFN
(index 1). For each sublayer we need:

* ``entry``: the linear layers that read the sublayer's input (their rows are gated off when
  the sublayer is skipped, so they are not computed);
* ``exit``: the linear layer whose output is the sublayer's output (gated off too, then
  multiplied by the gate ``z``); the FFN exit is also where the searched cell is added;
* ``module``: the submodule whose whole call can be skipped when every sequence of the batch
  skips it (``None`` when the sublayer is inline code of the block, as BART's FFN).

=========  ===================  =======================  ========================  =========
family     attention entry      attention exit / module  FFN entry / exit / module causal
=========  ===================  =======================  ========================  =========
gpt2       ``attn.c_attn``      ``attn.c_proj`` / attn   c_fc / c_proj / ``mlp``   yes
bart enc   ``self_attn.q/k/v``  ``out_proj`` / self_attn fc1 / fc2 / -             no
bart dec   ``self_attn.q/k/v``  ``out_proj`` / self_attn fc1 / fc2 / -             yes
llama      ``self_attn.q/k/v``  ``o_proj`` / self_attn   gate,up / down / ``mlp``  yes
=========  ===================  =======================  ========================  =========

BART's cross-attention is never gated (its keys come from the encoder, and the decoder needs it
to read the source). Layers are numbered in module order: BART's encoder layers come first.

:func:`find_blocks` also gives each causal block a forward pre-hook and hook (once; they do
nothing while the block has no ``tams_cell``): during a call that carries a transformers KV
cache, the block's cell knows that cache and how many past tokens it held for this layer before
the call, which its convolutions need to continue a sequence across incremental decoding steps
(see :mod:`tarp_fast.tams.cell`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from .cell import CELL_NAME

__all__ = ["SublayerSpec", "BlockSpec", "find_blocks", "FAMILIES", "model_family"]


@dataclass(frozen=True)
class SublayerSpec:
    entry: tuple[str, ...]
    exit: str
    module: Optional[str]


@dataclass(frozen=True)
class BlockSpec:
    """One gated layer: its index, qualified name, block module and two sublayers."""

    index: int
    name: str
    block: nn.Module
    attention: SublayerSpec
    ffn: SublayerSpec
    causal: bool

    def sublayer(self, i: int) -> SublayerSpec:
        return self.attention if i == 0 else self.ffn


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# family -> [(block class-name suffix, attention, ffn, causal)]
FAMILIES: dict[str, list[tuple]] = {
    "gpt2": [("GPT2Block", SublayerSpec(("attn.c_attn",), "attn.c_proj", "attn"),
              SublayerSpec(("mlp.c_fc",), "mlp.c_proj", "mlp"), True)],
    "bart": [("EncoderLayer", SublayerSpec(_QKV, "self_attn.out_proj", "self_attn"),
              SublayerSpec(("fc1",), "fc2", None), False),
             ("DecoderLayer", SublayerSpec(_QKV, "self_attn.out_proj", "self_attn"),
              SublayerSpec(("fc1",), "fc2", None), True)],
    "llama": [("DecoderLayer", SublayerSpec(_QKV, "self_attn.o_proj", "self_attn"),
               SublayerSpec(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp"), True)],
}
_ALIASES = {"mbart": "bart", "mistral": "llama", "qwen2": "llama"}


def model_family(model: nn.Module) -> str:
    """``"gpt2" | "bart" | "llama"`` from ``model.config.model_type``; ``ValueError`` otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = _ALIASES.get(model_type, model_type)
    if family not in FAMILIES:
        raise ValueError(
            f"add_tams: argument 'model' must be a GPT-2, BART or Llama-style transformers model "
            f"(config.model_type in {sorted(set(FAMILIES) | set(_ALIASES))}), got model_type={model_type!r}"
        )
    return family


def find_blocks(model: nn.Module) -> tuple[str, list[BlockSpec]]:
    """The family and the gated layers of ``model``, in module order."""
    family = model_family(model)
    blocks: list[BlockSpec] = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        for suffix, attn, ffn, causal in FAMILIES[family]:
            if cls.endswith(suffix) and not cls.endswith("Model"):
                for path in attn.entry + (attn.exit,) + ffn.entry + (ffn.exit,):
                    try:
                        module.get_submodule(path)
                    except AttributeError as exc:
                        raise ValueError(f"add_tams: block {name!r} ({cls}) has no submodule {path!r}; "
                                         f"this {family} layout is not supported") from exc
                blocks.append(BlockSpec(len(blocks), name, module, attn, ffn, causal))
                if causal:
                    _track_cache(module, attn.module)
                break
    if not blocks:
        raise ValueError(f"add_tams: found no {family} blocks in {type(model).__name__}")
    return family, blocks


# ---- the KV cache a block runs with, for its cell ---------------------------------------------
_HOOKED = "_tarp_fast_cache_hooks"
_CACHE_TYPES: list = []


def _cache_types() -> tuple:
    if not _CACHE_TYPES:
        try:
            from transformers.cache_utils import Cache  # noqa: PLC0415
        except ImportError:  # no transformers: no KV cache objects to find
            _CACHE_TYPES.append(())
        else:
            _CACHE_TYPES.append((Cache,))
    return _CACHE_TYPES[0]


def _layer_index(block: nn.Module, attention: Optional[str]) -> int:
    for path in (attention, "self_attn", "attn"):
        if path:
            try:
                idx = getattr(block.get_submodule(path), "layer_idx", None)
            except AttributeError:
                continue
            if isinstance(idx, int):
                return idx
    return 0


def _before_block(attention: Optional[str], block: nn.Module, args: tuple, kwargs: dict):
    cell = block._modules.get(CELL_NAME)
    if cell is None:
        return None
    types = _cache_types()
    cache = None
    if types:
        cache = next((v for v in list(args[1:]) + list(kwargs.values()) if isinstance(v, types)), None)
    # the past length is read now, before the block's attention appends this call's tokens
    cell.__dict__["_decoding"] = None if cache is None else (cache, int(cache.get_seq_length(
        _layer_index(block, attention))))
    return None


def _after_block(block: nn.Module, args: tuple, kwargs: dict, output):
    cell = block._modules.get(CELL_NAME)
    if cell is not None:
        cell.__dict__["_decoding"] = None
    return None


def _track_cache(block: nn.Module, attention: Optional[str]) -> None:
    """Hook ``block`` (once) so that its cell sees the KV cache of each call (see the module doc)."""
    if block.__dict__.get(_HOOKED):
        return
    block.register_forward_pre_hook(functools.partial(_before_block, attention), with_kwargs=True)
    block.register_forward_hook(_after_block, with_kwargs=True, always_call=True)
    block.__dict__[_HOOKED] = True
