"""Issue 16: the generated family with planted shared structure (``planted_corpus``, ``--corpus planted[:N]``)."""

from __future__ import annotations

import math

import pytest
import torch

from tarp_fast.data.corpus import load_corpus
from tarp_fast.data.generated import markov_domain, planted_corpus, planted_domain, planted_parameters


def _states(domain, par) -> torch.Tensor:
    """The hidden states of a planted domain's tokens: token ``alphabet[σ(s)]`` -> state ``s``."""
    emitted = par["alphabet"][par["permutation"]]  # [k]: the byte state s is emitted as
    lookup = torch.full((256,), -1, dtype=torch.int64)
    lookup[emitted] = torch.arange(emitted.numel())
    s = lookup[domain.tokens]
    assert (s >= 0).all()  # every token is a symbol of the shared alphabet
    return s


def _transitions(s: torch.Tensor, k: int) -> torch.Tensor:
    """Empirical transition matrix ``[k, k]`` (float64) of the state sequence ``s``."""
    counts = torch.zeros(k * k, dtype=torch.float64)
    counts.index_add_(0, s[:-1] * k + s[1:], torch.ones(s.numel() - 1, dtype=torch.float64))
    counts = counts.view(k, k)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def _weighted_tv(P: torch.Tensor, R: torch.Tensor, weights: torch.Tensor) -> float:
    """Row total variation between ``P`` and ``R`` averaged with ``weights`` (the state frequencies)."""
    return float((weights * 0.5 * (P - R).abs().sum(-1)).sum())


def test_optimal_loss_is_the_true_chains_cross_entropy_on_a_long_sample():
    d = planted_domain("p", 2, seed=1, num_tokens=120_000)
    par = planted_parameters(2, seed=1)
    assert d.optimal_loss == pytest.approx(par["optimal_loss"])
    assert 0.3 < d.optimal_loss < math.log(12)
    s = _states(d, par)
    # cross-entropy of the true (relabeled) chain on its own sample: the entropy rate, up to
    # sampling noise (~ std(-log p) / sqrt(n) < 0.01 here)
    ce = -torch.log(par["mixed"][s[:-1], s[1:]]).mean()
    assert float(ce) == pytest.approx(d.optimal_loss, abs=0.02)
    # and a wrong predictor (the shared base alone) is measurably worse than the optimum
    ce_base = -torch.log(par["base"][s[:-1], s[1:]].clamp_min(1e-12)).mean()
    assert float(ce_base) > d.optimal_loss + 0.05


def test_domains_differ_and_are_deterministic_in_the_seed():
    a = planted_corpus(4, seed=0, num_tokens=3000)
    b = planted_corpus(4, seed=0, num_tokens=3000)
    assert a.names == ["planted0", "planted1", "planted2", "planted3"]
    assert all(torch.equal(a[n].tokens, b[n].tokens) for n in a.names)
    assert a.fingerprint() == b.fingerprint()
    # domain i does not depend on how many domains are drawn
    assert torch.equal(planted_corpus(2, seed=0, num_tokens=3000)["planted1"].tokens, a["planted1"].tokens)
    pars = [planted_parameters(i, seed=0) for i in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(a.names and a[f"planted{i}"].tokens, a[f"planted{j}"].tokens)
            assert not torch.allclose(pars[i]["mixed"], pars[j]["mixed"])
        assert sum(int(p) != k for k, p in enumerate(pars[i]["permutation"])) == 4  # 4 symbols relabeled
    assert len({round(p["optimal_loss"], 9) for p in pars}) == 4  # each its own optimum
    other = planted_parameters(0, seed=1)
    assert not torch.allclose(other["base"], pars[0]["base"])


def test_the_shared_structure_is_there():
    """Property tested: every domain's empirical transition matrix, with its recorded relabeling
    undone, is within ``mix`` (plus sampling noise) of the ONE shared base chain P0 in
    state-weighted row total variation; the same matrix without undoing the relabeling, and an
    independent generated chain, are far from P0. So what preparation can learn (P0 and the
    alphabet) is shared, and each domain's difference is small and structured."""
    mix = 0.2
    c = planted_corpus(3, seed=4, num_tokens=60_000, mix=mix)
    base = planted_parameters(0, seed=4)["base"]
    alphabets = {d.info["alphabet"] for d in c}
    assert len(alphabets) == 1  # one shared alphabet
    for i, d in enumerate(c):
        par = planted_parameters(i, seed=4, mix=mix)
        assert torch.equal(par["base"], base)
        # exactly: every row of P_d is within total variation `mix` of P0's row
        assert float((0.5 * (par["mixed"] - base).abs().sum(-1)).max()) <= mix + 1e-12
        s = _states(d, par)
        k = base.shape[0]
        freq = torch.bincount(s, minlength=k).double() / s.numel()
        undone = _weighted_tv(_transitions(s, k), base, freq)
        assert undone <= mix + 0.03, (d.name, undone)
        # read with the alphabet's own order (relabeling not undone): the moved symbols are far off
        emitted = par["alphabet"][par["permutation"]]
        lookup = torch.full((256,), -1, dtype=torch.int64)
        lookup[par["alphabet"]] = torch.arange(k)
        raw = lookup[emitted][s]
        freq_raw = torch.bincount(raw, minlength=k).double() / raw.numel()
        assert _weighted_tv(_transitions(raw, k), base, freq_raw) > undone + 0.1
    # an independent chain (markov_corpus's generator) is far from the shared base
    ind = markov_domain("m", seed=9, num_tokens=60_000, num_symbols=12)
    alph = ind.info["alphabet"].encode()
    lookup = torch.full((256,), -1, dtype=torch.int64)
    lookup[torch.tensor(list(alph))] = torch.arange(12)
    si = lookup[ind.tokens]
    fi = torch.bincount(si, minlength=12).double() / si.numel()
    assert _weighted_tv(_transitions(si, 12), base, fi) > 0.4


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="'num_permuted'"):
        planted_parameters(0, num_permuted=1)
    with pytest.raises(ValueError, match="'mix'"):
        planted_domain("p", 0, mix=1.5)
    with pytest.raises(ValueError, match="'num_domains'"):
        planted_corpus(0)
    unmoved = planted_parameters(0, num_permuted=0, mix=0.0)
    assert torch.equal(unmoved["permutation"], torch.arange(12)) and torch.equal(unmoved["mixed"], unmoved["base"])


def test_corpus_spec_planted_and_bad_specs(tmp_path, capsys, monkeypatch):
    assert load_corpus("planted:3").names == ["planted0", "planted1", "planted2"]
    assert len(load_corpus("planted")) == 8
    for bad in ("planted:x", "planted:1", "planted:"):
        with pytest.raises(ValueError, match="planted:N"):
            load_corpus(bad)
    from tarp_fast.cli import main

    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path / "cache"))
    tiny = ["--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--rank", "2", "--pretrain-steps", "2",
            "--meta-steps", "1", "--tasks-per-batch", "2", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
            "--threads", "1", "--no-progress", "--seeds", "0", "--protocols", "all"]
    out = tmp_path / "b.json"
    rc = main(["bench-adapt", "--corpus", "planted:3", "--heldout", "planted2", "--arms", "direct,tarp",
               "--json", str(out), *tiny])
    assert rc == 0, capsys.readouterr().err
    import json

    res = json.loads(out.read_text())
    assert res["preparation_domains"] == ["planted0", "planted1"] and res["heldout"] == ["planted2"]
    assert res["corpus"]["source"].startswith("generated:planted")
    assert res["optimal_loss"] == {"planted2": pytest.approx(planted_parameters(2)["optimal_loss"])}
    assert "optimal loss (the entropy rate" in capsys.readouterr().out
    capsys.readouterr()
    for bad in ("planted:x", "planted:1"):
        rc = main(["bench-adapt", "--corpus", bad, "--heldout", "planted0", "--arms", "direct", *tiny])
        err = capsys.readouterr().err
        assert rc == 2 and "--corpus" in err and "planted:N" in err and repr(bad) in err, err
    assert main(["bench-adapt", "--help"]) == 0
    assert "planted[:N]" in capsys.readouterr().out
