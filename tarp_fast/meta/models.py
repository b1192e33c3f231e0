"""Models for the driver: a small GPT-2 built from its config class, or a local checkpoint.

The language-model loss is computed here rather than by the model (``labels=``) because the
preparation stage needs one loss *per sequence* (each sequence belongs to a task)::

    loss_b = mean_{i < L-1}  −log softmax(logits[b, i])[ids[b, i+1]]        (nats / token)

Saving uses safetensors' ``save_model`` (it handles GPT-2's tied embedding and head) plus the
model's JSON config; nothing is pickled.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._io import atomic_write, atomic_write_bytes

__all__ = ["small_gpt2", "sequence_losses", "save_base_model", "load_base_model", "check_vocab", "count_parameters"]


def small_gpt2(vocab_size: int = 256, *, n_embd: int = 96, n_layer: int = 3, n_head: int = 4,
               n_positions: int = 256, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """A GPT-2 language model built from ``GPT2Config`` (no download), float32, in train mode.

    Dropout is off by default: the benchmark compares optimizers' trajectories, and dropout noise
    would only add variance (and make resume checks depend on the dropout RNG).
    """
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415  (heavy import)

    for name, v in (("vocab_size", vocab_size), ("n_embd", n_embd), ("n_layer", n_layer), ("n_head", n_head),
                    ("n_positions", n_positions)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"small_gpt2: argument {name!r} must be a positive int, got {v!r}")
    if n_embd % n_head:
        raise ValueError(f"small_gpt2: argument 'n_embd' ({n_embd}) must be divisible by 'n_head' ({n_head})")
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    return model.train()


def sequence_losses(model: nn.Module, ids: torch.Tensor, *, params: Optional[dict] = None) -> torch.Tensor:
    """Next-token cross-entropy per sequence: ``ids [B, L] -> [B]`` (nats per predicted token).

    ``params`` (optional) is a ``{name: tensor}`` mapping used through
    ``torch.func.functional_call`` in place of the model's own parameters of those names.
    """
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"sequence_losses: argument 'ids' must be [batch, length >= 2], got {list(ids.shape)}")
    if params is None:
        logits = model(input_ids=ids).logits
    else:
        logits = torch.func.functional_call(model, params, (), {"input_ids": ids}, strict=False)
        logits = logits.logits
    B, L, V = logits.shape
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # half-precision logits: take the log-softmax in float32
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(B, L - 1).mean(-1)


def count_parameters(params) -> int:
    return int(sum(p.numel() for p in params))


def save_base_model(model: nn.Module, directory: str) -> str:
    """Write ``model.safetensors`` and ``config.json`` (a transformers model) atomically."""
    from safetensors.torch import save_model  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, "model.safetensors"), lambda tmp: save_model(model, tmp))
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    atomic_write_bytes(os.path.join(directory, "config.json"), (json.dumps(cfg, indent=1) + "\n").encode())
    return directory


def load_base_model(path: str) -> nn.Module:
    """A causal LM from a local folder: ours (:func:`save_base_model`) or any transformers checkpoint.

    Only safetensors weights are read (``use_safetensors=True``): a folder with nothing but
    pickle files (``pytorch_model.bin``, ``*.pt``, ...) is refused with a ``ValueError``, since
    unpickling can run arbitrary code. The model is returned in train mode, so dropout stays as
    its config sets it (see :func:`tarp_fast.meta.prepare.prepare` on seeding).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_base_model: argument 'path' must be a local model folder, {path!r} is not one")
    files = sorted(os.listdir(path))
    if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) or f.endswith(".bin.index.json")]
        what = (f"only pickle weights ({', '.join(pickles)}), which tarp-fast does not load (unpickling can run code)"
                if pickles else "no weights")
        raise ValueError(f"load_base_model: {path} has no safetensors weights (model.safetensors), {what}; "
                         "convert them to safetensors with a tool you trust (e.g. transformers' "
                         "save_pretrained(..., safe_serialization=True)) and pass that folder")
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, use_safetensors=True)
    return model.train()


def check_vocab(model: nn.Module, vocab_size: int, *, what: str = "--model") -> None:
    """``ValueError`` unless every token id of a ``vocab_size`` tokenizer has a row in ``model``'s embedding.

    Checked before training: an id past the embedding is an index error deep inside the model.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = int(emb.num_embeddings) if emb is not None else int(getattr(model.config, "vocab_size", 0))
    if rows < vocab_size:
        raise ValueError(f"{what}: the model's vocabulary has {rows} entries but the tokenizer produces ids up to "
                         f"{vocab_size - 1}; pass the tokenizer the model was trained with (--tokenizer DIR)")
