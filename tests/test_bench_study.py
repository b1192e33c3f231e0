"""Issue 16: the full study's configuration (benchmarks/configs/study.toml) is valid and runs."""

from __future__ import annotations

import json
import os
import re

import pytest
import tomllib
from models import write_letter_corpus

STUDY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "configs", "study.toml")


def test_study_config_parses_every_key_is_valid_and_it_is_a_study():
    from tarp_fast.cli import DEMO_DEFAULTS, _bench_config, _check_sections, _known_keys, _merge
    from tarp_fast.data.generated import planted_corpus
    from tarp_fast.meta.bench import validation_split

    with open(STUDY, "rb") as fh:
        tree = tomllib.load(fh)
    _check_sections(tree, _known_keys(), STUDY)  # unknown sections or keys raise
    cfg = _bench_config(_merge(DEMO_DEFAULTS, tree))
    bench = tree["bench"]
    assert len(cfg.seeds) >= 4 and len(bench["heldout"]) >= 3
    assert len(cfg.lr_grid) >= 2 and 1.0 in cfg.lr_grid
    assert len(cfg.base_budgets) == 2 and cfg.base_budgets[0] < cfg.base_budgets[1]
    assert set(cfg.protocols) == {"adapter", "all"}
    # the data and held-out domains it names exist, and leave a validation domain and a preparation
    m = re.fullmatch(r"planted:(\d+)", bench["corpus"])
    assert m, bench["corpus"]
    corpus = planted_corpus(int(m.group(1)), num_tokens=500)
    assert set(bench["heldout"]) <= set(corpus.names)
    val, _ = validation_split(corpus, bench["heldout"], cfg)
    assert val not in bench["heldout"]
    # the header states the time estimate and how it was obtained
    with open(STUDY, encoding="utf-8") as fh:
        head = fh.read().split("\n[", 1)[0]
    est = re.search(r"TIME ESTIMATE: about (\d+) min", head)
    assert est and int(est.group(1)) < 60, head
    assert "measured" in head.lower()


def test_study_config_runs_end_to_end_at_a_tiny_size(tmp_path, capsys, monkeypatch):
    from tarp_fast.cli import main

    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_letter_corpus(tmp_path / "c", names=("alpha", "beta", "gamma", "delta", "epsilon", "zeta"),
                                 chars=2000)
    tiny = ["--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--rank", "2", "--meta-steps", "1",
            "--tasks-per-batch", "2", "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--threads", "1",
            "--no-progress", "--seeds", "0,1", "--base-budgets", "2,3"]
    rc = main(["demo", "--config", STUDY, "--corpus", folder, "--heldout", "delta,epsilon,zeta",
               "--out", str(tmp_path / "o"), *tiny])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert res["heldout"] == ["delta", "epsilon", "zeta"] and res["preparation_domains"] == ["alpha", "beta"]
    sel = res["lr_selection"]
    assert sel["validation_domain"] == "gamma" and sel["grid"] == [0.3, 1.0, 3.0]
    assert set(sel["protocols"]) == {"adapter", "all"}
    assert res["by_base_budget"]["budgets"] == [2, 3] and res["settings"]["pretrain_steps"] == 2
    assert {e["pretrain_steps"] for e in res["by_base_budget"]["summary"]} == {2, 3}
    assert "learning rates chosen on the validation domain gamma" in out
    assert "effect against the base's pretraining budget" in out and "3 pretrain steps" in out
    assert (tmp_path / "o" / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("flag,value,expected", [("--heldout", "gamma,nope", "--heldout ['nope'] not in the corpus"),
                                                 ("--validation-domain", "delta", "is also held out")])
def test_study_config_with_bad_overrides_is_refused_before_running(flag, value, expected, tmp_path, capsys, monkeypatch):
    from tarp_fast.cli import main

    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_letter_corpus(tmp_path / "c", names=("alpha", "beta", "gamma", "delta"), chars=500)
    args = ["demo", "--config", STUDY, "--corpus", folder, "--out", str(tmp_path / "o"), "--no-progress"]
    args += [flag, value] + (["--heldout", "delta"] if flag != "--heldout" else [])
    assert main(args) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
