"""tarp_fast.data: corpora from the machine, generated and user data, tokenization, sampling."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch

from tarp_fast.data import (
    ByteTokenizer,
    Corpus,
    Domain,
    DomainSplits,
    TaskSampler,
    corpus_from_manifest,
    entropy_rate,
    eval_windows,
    folder_corpus,
    jsonl_corpus,
    load_corpus,
    load_tokenizer,
    machine_corpus,
    markov_corpus,
    markov_domain,
    random_windows,
    step_generator,
)


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "héllo\n\tworld ✓"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.max() < 256
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode(b"\x00\xff").tolist() == [0, 255]
    with pytest.raises(TypeError, match="'text'"):
        tok.encode(3)
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="'path'"):
        load_tokenizer("/nonexistent/tokenizer")


def test_machine_corpus_manifest_is_reproducible():
    try:
        corpus = machine_corpus(max_bytes=60_000, max_file_bytes=8_000, min_bytes=20_000)
    except RuntimeError:
        pytest.skip("no text domains on this machine")
    assert len(corpus) >= 1
    man = corpus.manifest()
    for name, entry in man["domains"].items():
        assert entry["num_tokens"] == len(corpus[name])
        assert entry["files"], name
        f = entry["files"][0]
        with open(f["path"], "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == f["sha256"]
    again = corpus_from_manifest(json.loads(json.dumps(man)))
    for d in corpus:
        assert torch.equal(again[d.name].tokens, d.tokens)
    assert again.fingerprint() == corpus.fingerprint()


def test_machine_corpus_errors():
    with pytest.raises(ValueError, match="'names'"):
        machine_corpus(["no_such_kind"])
    with pytest.raises(ValueError, match="'max_bytes'"):
        machine_corpus(max_bytes=10, min_bytes=100)


def test_manifest_detects_changed_file(tmp_path):
    root = tmp_path / "c"
    for dom in ("a", "b"):
        (root / dom).mkdir(parents=True)
        (root / dom / "x.txt").write_text(f"text of {dom} " * 50)
    corpus = folder_corpus(str(root))
    man = corpus.manifest()
    (root / "a" / "x.txt").write_text("changed " * 50)
    with pytest.raises(ValueError, match="changed"):
        corpus_from_manifest(man)


def test_entropy_rate_known_chains():
    k = 5
    assert entropy_rate(torch.full((k, k), 1.0 / k, dtype=torch.float64)) == pytest.approx(math.log(k), abs=1e-9)
    cycle = torch.roll(torch.eye(k), 1, dims=1)  # deterministic cycle: no uncertainty
    assert entropy_rate(cycle) == pytest.approx(0.0, abs=1e-9)


def test_markov_domain_optimal_loss_matches_empirical_entropy():
    d = markov_domain("m", seed=3, num_tokens=60_000, num_symbols=6)
    assert d.optimal_loss is not None and 0 < d.optimal_loss < math.log(6)
    # plug-in conditional entropy of the sample approaches the entropy rate
    x = d.tokens
    pairs = torch.stack([x[:-1], x[1:]], 1)
    _, counts = torch.unique(pairs, dim=0, return_counts=True)
    first, fcounts = torch.unique(x[:-1], return_counts=True)
    n = x.numel() - 1
    h_joint = -(counts / n * torch.log(counts / n)).sum()
    h_first = -(fcounts / n * torch.log(fcounts / n)).sum()
    assert float(h_joint - h_first) == pytest.approx(d.optimal_loss, abs=0.03)
    # deterministic in the seed, different across seeds
    assert torch.equal(markov_domain("m", seed=3, num_tokens=1000, num_symbols=6).tokens,
                       markov_domain("m", seed=3, num_tokens=1000, num_symbols=6).tokens)
    c = markov_corpus(3, num_tokens=2000)
    assert c.names == ["markov0", "markov1", "markov2"]
    assert not torch.equal(c["markov0"].tokens, c["markov1"].tokens)
    with pytest.raises(ValueError, match="'num_symbols'"):
        markov_domain("m", seed=0, num_symbols=1)


def test_folder_and_jsonl_corpus(tmp_path):
    root = tmp_path / "user"
    (root / "recipes").mkdir(parents=True)
    (root / "recipes" / "a.txt").write_text("flour sugar eggs\n" * 20)
    (root / "recipes" / "sub").mkdir()
    (root / "recipes" / "sub" / "b.txt").write_text("bake at 180\n" * 20)
    (root / "poems").mkdir()
    (root / "poems" / "p.txt").write_text("roses are red\n" * 20)
    c = folder_corpus(str(root))
    assert c.names == ["poems", "recipes"]
    assert len(c["recipes"].files) == 2
    assert ByteTokenizer().decode(c["poems"].tokens[:5]) == "roses"
    with pytest.raises(FileNotFoundError, match="'path'"):
        folder_corpus(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="subfolder"):
        folder_corpus(str(empty))

    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"domain": d, "text": t}) for d, t in
                            [("a", "alpha one"), ("b", "beta"), ("a", "alpha two")]) + "\n")
    c2 = jsonl_corpus(str(jl))
    assert c2.names == ["a", "b"]
    assert ByteTokenizer().decode(c2["a"].tokens) == "alpha one\n\nalpha two"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"domain": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        jsonl_corpus(str(bad))
    assert load_corpus(str(jl)).names == ["a", "b"]
    assert load_corpus(str(root)).names == ["poems", "recipes"]
    with pytest.raises(FileNotFoundError, match="'spec'"):
        load_corpus(str(tmp_path / "nope.txt"))


def test_heldout_split_never_in_preparation():
    c = markov_corpus(4, num_tokens=2000)
    prep, held = c.split_heldout(["markov1", "markov3"])
    assert prep.names == ["markov0", "markov2"] and held.names == ["markov1", "markov3"]
    with pytest.raises(ValueError, match="'heldout'"):
        c.split_heldout(["nope"])
    with pytest.raises(ValueError, match="every domain"):
        c.split_heldout(c.names)
    sampler = TaskSampler(prep, tasks_per_batch=2, seq_len=16)
    for s in range(5):
        assert set(sampler.batch_at(s).domains) <= {"markov0", "markov2"}


def test_support_query_eval_are_disjoint_and_sampling_is_deterministic():
    n, L = 4000, 16
    tokens = torch.arange(n)  # every position is identifiable by its value
    c = Corpus([Domain("d0", "test", tokens), Domain("d1", "test", tokens + n)], tokenizer=ByteTokenizer())
    sp = DomainSplits.of(tokens, eval_fraction=0.1, support_fraction=0.7)
    assert sp.support.numel() + sp.query.numel() + sp.eval.numel() == n
    sampler = TaskSampler(c, tasks_per_batch=2, inner_steps=2, batch_size=3, query_batch_size=4, seq_len=L, seed=5)
    b = sampler.batch_at(7)
    assert b.support.shape == (2, 2, 3, L) and b.query.shape == (2, 4, L)
    for t, name in enumerate(b.domains):
        off = 0 if name == "d0" else n
        sup, qry = b.support[t] - off, b.query[t] - off
        assert int(sup.max()) < sp.support.numel()
        assert int(qry.min()) >= sp.support.numel() and int(qry.max()) < sp.support.numel() + sp.query.numel()
    assert torch.equal(b.support, sampler.batch_at(7).support)
    assert not torch.equal(b.support, sampler.batch_at(8).support)
    st = sampler.state_dict()
    sampler.next()
    sampler.load_state_dict(st)
    assert sampler.step == st["step"]
    with pytest.raises(ValueError, match="domains"):
        sampler.load_state_dict({**st, "names": ["x"]})


def test_windows():
    t = torch.arange(100)
    w = random_windows(t, 5, 10, step_generator(0, 1))
    assert w.shape == (5, 10) and bool(((w[:, 1:] - w[:, :-1]) == 1).all())
    e = eval_windows(t, 4, 10)
    assert e[0, 0] == 0 and e[-1, -1] == 99
    with pytest.raises(ValueError, match="window length"):
        random_windows(t, 1, 200, step_generator(0, 0))


def test_machine_domain_files_exist_on_disk():
    try:
        corpus = machine_corpus(["python"], max_bytes=30_000, min_bytes=10_000)
    except (RuntimeError, ValueError):
        pytest.skip("no Python sources found")
    assert all(os.path.isfile(f["path"]) for f in corpus["python"].files)


def test_train_split_is_concatenated_once_and_is_support_then_query():
    """Before: every read of ``DomainSplits.train`` concatenated the splits again (once per window
    of a mixed batch)."""
    tokens = torch.arange(1000)
    sp = DomainSplits.of(tokens, eval_fraction=0.1, support_fraction=0.7)
    assert sp.train is sp.train
    assert torch.equal(sp.train, torch.cat([sp.support, sp.query])) and torch.equal(sp.train, tokens[:900])
    c = Corpus([Domain("d0", "test", tokens), Domain("d1", "test", tokens + 1000)], tokenizer=ByteTokenizer())
    sampler = TaskSampler(c, seq_len=16, seed=3)
    ids, names = sampler.mixed_batch_at(4, 8)
    assert ids.shape == (8, 16) and torch.equal(ids, sampler.mixed_batch_at(4, 8)[0])
    for row, name in zip(ids, names):  # every window lies in its domain's training text
        off = 0 if name == "d0" else 1000
        assert int(row.min()) >= off and int(row.max()) < off + 900
