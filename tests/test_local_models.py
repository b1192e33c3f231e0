"""The driver on local transformers checkpoints and tokenizers (no hub: everything is built here).

A tokenizer folder is made with the ``tokenizers`` library (a BPE trained on the test corpus,
wrapped in ``PreTrainedTokenizerFast`` and saved), a checkpoint folder with ``save_pretrained``
of a tiny model built from its config class.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tarp_fast.cli import main
from tarp_fast.data import load_corpus, load_tokenizer
from tarp_fast.meta.models import check_vocab, load_base_model

TINY = ["--rank", "2", "--meta-steps", "2", "--tasks-per-batch", "2", "--steps", "3", "--seq-len", "16",
        "--batch-size", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Four domains of word-like text (so a BPE has something to merge)."""
    root = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"]
    for i, name in enumerate(("one", "two", "three", "four")):
        (root / name).mkdir()
        vocab = words[i:i + 6]
        idx = torch.randint(0, len(vocab), (1500,), generator=g).tolist()
        (root / name / "a.txt").write_text(" ".join(vocab[k] for k in idx) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in sorted(corpus_dir.glob("*/*.txt"))], trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(out))
    return out


def _tiny_llama(vocab):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def test_local_tokenizer_folder_tokenizes_a_corpus(tokenizer_dir, corpus_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    assert tok.describe()["kind"] == "hf" and 256 < tok.vocab_size <= 300
    ids = tok.encode("alpha beta gamma")
    assert ids.dtype == torch.int64 and tok.decode(ids) == "alpha beta gamma"
    assert len(ids) < len("alpha beta gamma")  # merges happened: fewer tokens than bytes
    corpus = load_corpus(str(corpus_dir), tokenizer=tok)
    assert corpus.vocab_size == tok.vocab_size
    for name in corpus.names:
        t = corpus[name].tokens
        assert t.numel() > 100 and int(t.min()) >= 0 and int(t.max()) < tok.vocab_size
    with pytest.raises(FileNotFoundError, match="path"):
        load_tokenizer(str(corpus_dir / "missing"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_load_base_model_reads_a_save_pretrained_checkpoint(tmp_path, family):
    if family == "gpt2":
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    else:
        model = _tiny_llama(300)
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = load_base_model(str(tmp_path / "ckpt"))
    assert type(loaded) is type(model) and loaded.training
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)
    check_vocab(loaded, 300)
    with pytest.raises(ValueError, match="vocabulary has 300 entries.*tokenizer"):
        check_vocab(loaded, 301)
    with pytest.raises(FileNotFoundError, match="'path'"):
        load_base_model(str(tmp_path / "nope"))


def test_prepare_adapt_and_bench_from_a_local_llama_and_tokenizer(tmp_path, corpus_dir, tokenizer_dir):
    """The CLI end to end on a Llama checkpoint with its own BPE tokenizer (not the defaults)."""
    vocab = load_tokenizer(str(tokenizer_dir)).vocab_size
    _tiny_llama(vocab).save_pretrained(str(tmp_path / "llama"))
    src = ["--corpus", str(corpus_dir), "--tokenizer", str(tokenizer_dir)]
    rc = main(["prepare", *src, "--heldout", "four", "--model", str(tmp_path / "llama"), "--out",
               str(tmp_path / "prep"), *TINY])
    assert rc == 0
    assert json.loads((tmp_path / "prep" / "base" / "config.json").read_text())["model_type"] == "llama"
    rc = main(["adapt", "--prepared", str(tmp_path / "prep"), *src, "--domain", "four", "--out",
               str(tmp_path / "ad"), "--steps", "2", "--threads", "1", "--no-progress"])
    assert rc == 0 and (tmp_path / "ad" / "adapter" / "adapter_model.safetensors").is_file()

    out = tmp_path / "bench.json"
    rc = main(["bench-adapt", *src, "--heldout", "four", "--model", str(tmp_path / "llama"),
               "--arms", "direct,tarp,mltd_tarp", "--json", str(out), *TINY])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["base_model"] == "given: LlamaForCausalLM" and res["pretrain_seconds"] == 0.0
    methods = res["domains"]["four"]["methods"]
    assert set(methods) == {"direct", "tarp", "mltd_tarp"}
    assert all(m["curve"][-1][0] == 3 for m in methods.values())

    # a model whose vocabulary is smaller than the tokenizer's is refused before any training
    _tiny_llama(256).save_pretrained(str(tmp_path / "small"))
    assert main(["bench-adapt", *src, "--heldout", "four", "--model", str(tmp_path / "small"), *TINY]) == 2
