"""Tiny transformers models built from their config classes (no download), for the tests."""

from __future__ import annotations

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

VOCAB = 64


def tiny_model(family: str, seed: int = 0):
    """A small model in eval mode (dropout off) with float32 weights."""
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                         bos_token_id=0, eos_token_id=1)
        model = GPT2LMHeadModel(cfg)
    elif family == "bart":
        cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
        model = BartForConditionalGeneration(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          bos_token_id=0, eos_token_id=1, pad_token_id=None)
        model = LlamaForCausalLM(cfg)
    elif family == "roberta":
        cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=70, pad_token_id=1,
                            bos_token_id=0, eos_token_id=2)
        model = RobertaForMaskedLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


#: how many dense layers targets="auto" must find in each tiny model
EXPECTED_TARGETS = {"gpt2": 8, "bart": 16, "llama": 14, "roberta": 12}
FAMILIES = tuple(EXPECTED_TARGETS)


def batch(family: str, n: int = 2, length: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    if family == "bart":
        return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (n, length), generator=g)}
    return {"input_ids": ids, "labels": ids.clone()}


def write_letter_corpus(root, names=("alpha", "beta", "gamma", "delta"), files=("a.txt",), chars: int = 3000) -> str:
    """A corpus folder for the CLI (no network): one subfolder of text files per domain in ``names``.

    Domain ``i`` draws ``chars`` characters per file uniformly from its own 5 letters
    (``"abcdefghij"[i:i + 5]``) plus space and newline, so neighbouring domains share 4 letters and
    each has its own statistics. Seeded (the same files in every run). Returns ``str(root)``.
    """
    import pathlib

    root = pathlib.Path(root)
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        letters = "abcdefghij"[i:i + 5] + " \n"
        for file in files:
            idx = torch.randint(0, len(letters), (chars,), generator=g).tolist()
            (root / name / file).write_text("".join(letters[k] for k in idx))
    return str(root)


def patched_small_gpt2(seed: int = 0, dropout: float = 0.0, dtype=torch.float32):
    """The meta-learning tests' model: a 1-layer GPT-2 (vocab 256, width 16) patched with rank-2 TARP
    layers whose ``U`` is drawn non-zero (``N(0, 0.05)``), so the factors matter in the forward and in
    the inner-loop gradient from the first step. Seeded by ``seed``; the global RNG is left as it was
    for the patch."""
    import tarp_fast
    from tarp_fast.meta import small_gpt2

    m = small_gpt2(256, n_embd=16, n_layer=1, n_head=2, n_positions=32, seed=seed, dropout=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        tarp_fast.patch_model(m, rank=2)
        for n, p in m.named_parameters():
            if n.endswith("tarp_U"):
                p.data.normal_(0, 0.05)
    return m.to(dtype)
