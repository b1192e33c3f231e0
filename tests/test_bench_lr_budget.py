"""Issue 16: learning rates per arm from a grid on a validation domain, and several base budgets."""

from __future__ import annotations

import json

import pytest
import torch
from models import write_letter_corpus

from tarp_fast.data.generated import markov_corpus
from tarp_fast.meta import bench as bench_mod
from tarp_fast.meta.stats import median


def _cfg(**kw):
    from tarp_fast.meta.bench import BenchConfig
    from tarp_fast.meta.finetune import FinetuneRecipe
    from tarp_fast.meta.prepare import PrepConfig

    base = dict(n_embd=16, n_layer=1, n_head=2, rank=2, pretrain_steps=2, pretrain_batch=4,
                prep=PrepConfig(meta_steps=1, tasks_per_batch=2, batch_size=2, query_batch_size=2, seq_len=16),
                finetune=FinetuneRecipe(steps=3, batch_size=2, seq_len=16, eval_windows=2), seeds=(0, 1),
                arms=("direct", "tarp"))
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus():
    torch.manual_seed(0)
    return markov_corpus(5, seed=0, num_tokens=4000)


def test_grid_chooses_each_arms_rate_on_the_validation_domain_and_uses_it(corpus, monkeypatch):
    calls = []
    real = bench_mod.finetune

    def spy(model, params, train, ev, recipe, **kw):
        params = list(params)
        groups = [g["lr"] for g in params] if params and isinstance(params[0], dict) else [kw["lr"]]
        calls.append((kw["desc"], groups))
        return real(model, params, train, ev, recipe, **kw)

    monkeypatch.setattr(bench_mod, "finetune", spy)
    cfg = _cfg(lr_grid=(0.5, 2.0), full_lr=1e-3, adapter_lr=3e-3)
    held = corpus.names[-1]
    res = bench_mod.run_benchmark(corpus, [held], cfg)
    sel = res["lr_selection"]
    val = corpus.names[-2]  # default: the last preparation domain, taken out of the preparation
    assert sel["validation_domain"] == val and "taken out of the preparation" in sel["validation_domain_source"]
    assert val not in res["preparation_domains"] and val not in res["heldout"]
    assert sel["grid"] == [0.5, 2.0] and sel["seed"] == 0
    for protocol in ("adapter", "all"):
        for arm in ("direct", "tarp"):
            r = sel["protocols"][protocol][arm]
            assert len(r["final_loss"]) == 2
            assert r["chosen_multiplier"] == cfg.lr_grid[min(range(2), key=lambda i: r["final_loss"][i])]
    # the grid ran on the validation domain with seed 0 only: direct once per value (shared by the
    # protocols), tarp once per value and protocol
    grid_calls = [c for c in calls if c[0].startswith("lr grid")]
    assert len(grid_calls) == 2 + 2 * 2 and all(f"on {val} (seed 0)" in c[0] for c in grid_calls)
    # every held-out run used its arm's chosen multiplier
    for desc, lrs in calls:
        if desc.startswith("lr grid"):
            continue
        protocol = "adapter" if "[adapter]" in desc else "all"
        arm = desc.split(" on ")[0]
        m = sel["protocols"][protocol][arm]["chosen_multiplier"]
        want = [1e-3 * m] if arm == "direct" else ([3e-3 * m] if protocol == "adapter" else [3e-3 * m, 1e-3 * m])
        assert lrs == pytest.approx(want), (desc, lrs, want)
    assert "learning rates chosen on the validation domain" in bench_mod.format_table(res)
    json.dumps(res, allow_nan=False)


def test_a_diverging_grid_value_is_never_chosen(corpus):
    cfg = _cfg(arms=("direct",), seeds=(0,), protocols=("all",), lr_grid=(1.0, 1e30))
    res = bench_mod.run_benchmark(corpus, corpus.names[-1:], cfg)
    r = res["lr_selection"]["protocols"]["all"]["direct"]
    assert r["final_loss"][1] is None and r["final_loss"][0] is not None and r["chosen_multiplier"] == 1.0
    assert "-" in bench_mod.format_table(res).split("learning rates chosen")[1]


def test_grid_off_by_default_and_validation_errors_name_the_key(corpus):
    res = bench_mod.run_benchmark(corpus, corpus.names[-1:], _cfg(seeds=(0,), protocols=("all",), arms=("direct",)))
    assert res["lr_selection"] is None and "by_base_budget" not in res
    assert res["preparation_domains"] == corpus.names[:-1]
    named = bench_mod.run_benchmark(corpus, corpus.names[-1:], _cfg(seeds=(0,), protocols=("all",), arms=("direct",),
                                                                  lr_grid=(1.0,), validation_domain=corpus.names[0]))
    assert named["lr_selection"]["validation_domain"] == corpus.names[0]
    assert named["lr_selection"]["validation_domain_source"].startswith("[bench] validation_domain")
    assert named["preparation_domains"] == corpus.names[1:-1]
    with pytest.raises(ValueError, match=r"\[bench\] validation_domain 'nope' is not a domain"):
        bench_mod.run_benchmark(corpus, corpus.names[-1:], _cfg(lr_grid=(1.0,), validation_domain="nope"))
    with pytest.raises(ValueError, match=r"\[bench\] validation_domain .* is also held out"):
        bench_mod.run_benchmark(corpus, corpus.names[-2:], _cfg(lr_grid=(1.0,), validation_domain=corpus.names[-1]))
    with pytest.raises(ValueError, match=r"leaves 1 preparation domain"):
        bench_mod.run_benchmark(corpus, corpus.names[-3:], _cfg(lr_grid=(1.0,)))
    with pytest.raises(ValueError, match="'lr_grid'"):
        _cfg(lr_grid=(0.0, 1.0))
    with pytest.raises(ValueError, match="'validation_domain'"):
        _cfg(validation_domain="x")
    with pytest.raises(ValueError, match="'base_budgets'"):
        _cfg(base_budgets=(300, 300))


def test_cli_refuses_bad_grid_and_budget_keys_naming_them(tmp_path, capsys, monkeypatch):
    from tarp_fast.cli import main

    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_letter_corpus(tmp_path / "c", names=("alpha", "beta", "gamma", "delta"))
    cases = [("[bench]\nlr_grid = [0.3, -1]\n", "[bench] lr_grid"),
             ("[bench]\nlr_grid = 3\n", "[bench] lr_grid"),
             ("[bench]\nvalidation_domain = 'alpha'\n", "[bench] lr_grid is empty"),
             ("[bench]\nlr_grid = [1]\nvalidation_domain = 'zeta'\n", "[bench] validation_domain 'zeta' is not a domain"),
             ("[bench]\nlr_grid = [1]\nvalidation_domain = 'delta'\n", "[bench] validation_domain 'delta' is also held out"),
             ("[bench]\nbase_budgets = [300, 0]\n", "[bench] base_budgets"),
             ("[bench]\nheldout = 'delta'\n", "[bench] heldout")]
    for toml, expected in cases:
        (tmp_path / "bad.toml").write_text(toml)
        rc = main(["bench-adapt", "--config", str(tmp_path / "bad.toml"), "--corpus", folder, "--heldout", "delta",
                   "--threads", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err, (toml, err)
    assert main(["bench-adapt", "--corpus", folder, "--heldout", "delta", "--lr-grid", "1,x", "--no-progress"]) == 2
    assert "--lr-grid" in capsys.readouterr().err
    # `tarp-fast config` documents the new keys (empty lists: off; no default: commented out)
    assert main(["config"]) == 0
    ref = capsys.readouterr().out
    for line in ("lr_grid = []", "base_budgets = []", "# validation_domain =", "# corpus =", "# heldout ="):
        assert line in ref, line


def test_base_budgets_run_the_whole_benchmark_per_budget(corpus):
    arms = ("direct", "tarp", "mltd_tarp", "multitask_tarp")
    one = bench_mod.run_benchmark(corpus, corpus.names[-1:], _cfg(arms=arms, pretrain_steps=2))
    res = bench_mod.run_benchmark(corpus, corpus.names[-1:], _cfg(arms=arms, base_budgets=(2, 6)))
    name = corpus.names[-1]
    # the top level is the first budget's benchmark, as a one-budget run gives it
    losses = lambda r: {a: [p[1] for p in m["curve"]] for a, m in r["domains"][name]["methods"].items()}  # noqa: E731
    assert losses(res) == losses(one)
    assert res["settings"]["pretrain_steps"] == 2 and res["settings"]["base_budgets"] == [2, 6]
    by = res["by_base_budget"]
    assert by["budgets"] == [2, 6] and set(by["results"]) == {"6"}
    other = by["results"]["6"]
    assert other["settings"]["pretrain_steps"] == 6 and losses(other) != losses(res)
    rows = {(e["pretrain_steps"], e["protocol"], e["arm"]): e for e in by["summary"]}
    assert set(rows) == {(b, p, "mltd_tarp") for b in (2, 6) for p in ("adapter", "all")}
    for (b, p, _), e in rows.items():
        r = res if b == 2 else other
        comp = next(c for c in r["comparisons"] if c["matched"] and c["protocol"] == p)
        assert e["control"] == "multitask_tarp" and e["pairs"] == 2
        assert e["speedup_median"] == pytest.approx(median(comp["speedup_per_seed"]))
        assert e["speedup_ci95"][0] <= e["speedup_median"] <= e["speedup_ci95"][1]
    table = bench_mod.format_table(res)
    assert "effect against the base's pretraining budget" in table and "6 pretrain steps" in table
    json.dumps(res, allow_nan=False)


def test_bench_config_holds_the_list_rules_the_command_line_used_to_repeat(tmp_path, capsys, monkeypatch):
    """The rules of lr_grid, validation_domain, base_budgets and protocols live in BenchConfig (the
    stricter of the two former copies); the command line's errors still name the [bench] key."""
    for kw, key in (({"lr_grid": 3}, "'lr_grid'"), ({"lr_grid": (True,)}, "'lr_grid'"),
                    ({"lr_grid": ("1",)}, "'lr_grid'"), ({"lr_grid": (float("nan"),)}, "'lr_grid'"),
                    ({"lr_grid": (float("inf"),)}, "'lr_grid'"), ({"lr_grid": (1, 1.0)}, "'lr_grid'"),
                    ({"lr_grid": (1.0,), "validation_domain": ""}, "'validation_domain'"),
                    ({"lr_grid": (1.0,), "validation_domain": 3}, "'validation_domain'"),
                    ({"base_budgets": 300}, "'base_budgets'"), ({"base_budgets": (True,)}, "'base_budgets'"),
                    ({"base_budgets": (2.0,)}, "'base_budgets'"), ({"protocols": "all"}, "'protocols'"),
                    ({"protocols": ()}, "'protocols'"), ({"protocols": ("all", "all")}, "'protocols'")):
        with pytest.raises(ValueError, match=key):
            _cfg(**kw)
    cfg = _cfg(lr_grid=[0.5, 2], base_budgets=[2, 3], protocols=["all"], finetune_scope="all")
    assert cfg.lr_grid == (0.5, 2.0) and cfg.base_budgets == (2, 3) and cfg.protocols == ("all",)
    from tarp_fast.cli import main

    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_letter_corpus(tmp_path / "c", names=("alpha", "beta", "gamma", "delta"))
    for toml, expected in (("[bench]\nprotocols = 'all'\n", "[bench] protocols"),
                           ("[bench]\nprotocols = []\n", "[bench] protocols"),
                           ("[bench]\nprotocols = ['most']\n", "[bench] protocols"),
                           ("[bench]\nlr_grid = [1, true]\n", "[bench] lr_grid"),
                           ("[bench]\nlr_grid = [[1]]\n", "[bench] lr_grid"),
                           ("[bench]\nlr_grid = [1]\nvalidation_domain = ''\n", "[bench] validation_domain"),
                           ("[bench]\nbase_budgets = 300\n", "[bench] base_budgets"),
                           ("[bench]\nbase_budgets = [[300]]\n", "[bench] base_budgets")):
        (tmp_path / "bad.toml").write_text(toml)
        rc = main(["bench-adapt", "--config", str(tmp_path / "bad.toml"), "--corpus", folder, "--heldout", "delta",
                   "--threads", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err, (toml, err)
