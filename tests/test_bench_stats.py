"""The benchmark's statistics, matched controls, protocols and seeds (issue 16 A-C), at tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch
from models import write_letter_corpus

from tarp_fast.data.generated import markov_corpus
from tarp_fast.meta.stats import bootstrap_ci, censored_steps, compare_pair, curve_auc, loss_at, median


def _curve(losses, steps=None):
    steps = steps or list(range(len(losses)))
    return [[s, float(v), 0.0] for s, v in zip(steps, losses)]


def test_censoring_median_and_auc():
    assert censored_steps(None, 10) == 11 and censored_steps(0, 10) == 1 and censored_steps(4, 10) == 4
    assert median([3, 1, 2]) == 2 and median([1, 2, 3, 4]) == 2.5
    c = _curve([4.0, 2.0, 2.0], [0, 1, 3])
    assert curve_auc(c) == pytest.approx((1 * 3.0 + 2 * 2.0) / 3)
    assert loss_at(c, 3) == 2.0 and loss_at(c, 2) is None


def test_bootstrap_is_seeded_and_brackets_the_median():
    vals = [1.0, 1.5, 2.0, 4.0, 0.5]
    a, b = bootstrap_ci(vals, seed=3), bootstrap_ci(vals, seed=3)
    assert a == b and a[0] <= median(vals) <= a[1]
    assert bootstrap_ci([2.0]) == [2.0, 2.0]


def test_compare_pair_speedup_and_censoring():
    # seed 0: arm reaches the target (1.0) at step 2, control at step 4; seed 1: the arm never does
    arm = [_curve([3, 2, 1, 1, 1]), _curve([3, 3, 3, 3, 3])]
    ctl = [_curve([3, 2, 2, 2, 1]), _curve([3, 2, 2, 1, 1])]
    r = compare_pair(arm, ctl, [1.0, 1.0], seed=0, resamples=200)
    assert r["steps_arm"] == [2, 5] and r["steps_control"] == [4, 3]  # never reached -> budget 4 + 1
    assert r["censored_arm"] == 1 and r["censored_control"] == 0
    assert r["speedup_per_seed"] == [2.0, 0.6]
    assert r["speedup_median"] == pytest.approx(1.3)
    lo, hi = r["speedup_ci95"]
    assert 0.6 <= lo <= r["speedup_median"] <= hi <= 2.0
    assert r["final_loss_arm"] == pytest.approx(2.0) and r["final_loss_control"] == pytest.approx(1.0)
    assert set(r["loss_at"]) == {"1"}  # only evaluated steps within the budget


def _cfg(**kw):
    from tarp_fast.meta.bench import BenchConfig
    from tarp_fast.meta.finetune import FinetuneRecipe
    from tarp_fast.meta.prepare import PrepConfig

    base = dict(n_embd=16, n_layer=1, n_head=2, rank=2, pretrain_steps=2, pretrain_batch=4,
                prep=PrepConfig(meta_steps=2, tasks_per_batch=2, batch_size=2, query_batch_size=2, seq_len=16),
                finetune=FinetuneRecipe(steps=4, batch_size=2, seq_len=16, eval_windows=2), seeds=(0, 1))
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus():
    return markov_corpus(4, seed=0, num_tokens=5000)


def test_seeds_vary_the_base_and_the_adapter_init(corpus):
    from tarp_fast.meta.bench import _adapter_model, pretrained_base

    cfg = _cfg()
    b0, _, _ = pretrained_base(corpus, cfg, seed=0)
    b1, _, _ = pretrained_base(corpus, cfg, seed=1)
    b0_again, _, _ = pretrained_base(corpus, cfg, seed=0)
    w = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert torch.equal(w(b0), w(b0_again)) and not torch.equal(w(b0), w(b1))
    fixed = _cfg(vary_base=False)
    assert torch.equal(w(pretrained_base(corpus, fixed, seed=1)[0]), w(b0))
    g = lambda m: torch.cat([p.detach().flatten() for n, p in m.named_parameters() if n.endswith("tarp_G")])  # noqa: E731
    assert not torch.equal(g(_adapter_model(b0, cfg, 0)), g(_adapter_model(b0, cfg, 1)))
    assert torch.equal(g(_adapter_model(b0, cfg, 0)), g(_adapter_model(b0, cfg, 0)))


def test_matched_control_trains_every_weight_on_the_same_batches(corpus):
    from tarp_fast.data.sampling import TaskSampler
    from tarp_fast.meta.bench import _adapter_model, multitask_prepare, pretrained_base

    cfg = _cfg()
    base, _, _ = pretrained_base(corpus, cfg)
    m = _adapter_model(base, cfg)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    pc = cfg.prep
    sampler = TaskSampler(corpus, tasks_per_batch=2, inner_steps=1, batch_size=2, query_batch_size=2, seq_len=16, seed=5)
    seen = []
    real = sampler.batch_at
    sampler.batch_at = lambda step: seen.append(step) or real(step)
    res = multitask_prepare(m, sampler, pc)
    assert seen == list(range(pc.meta_steps)) and len(res["losses"]) == pc.meta_steps
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert any("tarp_U" in n for n in changed) and any("tarp_" not in n for n in changed)


def test_benchmark_reports_matched_comparisons_under_both_protocols(corpus, tmp_path):
    from tarp_fast.meta.bench import format_table, plot_curves, run_benchmark, write_json

    cfg = _cfg(arms=("direct", "tarp", "mltd_tarp", "multitask_tarp"))
    res = run_benchmark(corpus, corpus.names[-1:], cfg)
    name = corpus.names[-1]
    # today's keys stay, for the protocol finetune_scope
    assert set(res["domains"][name]["methods"]) == {"direct", "tarp", "mltd_tarp", "multitask_tarp"}
    assert res["protocol"] == "all" and set(res["protocols"]) == {"adapter", "all"}
    comps = res["comparisons"]
    keys = {(c["domain"], c["protocol"], c["arm"], c["control"]) for c in comps}
    assert keys == {(name, p, "mltd_tarp", ctl) for p in ("adapter", "all") for ctl in ("multitask_tarp", "tarp", "direct")}
    for c in comps:
        assert {"seeds", "speedup_median", "speedup_ci95", "final_loss_arm", "final_loss_control"} <= set(c)
        assert c["seeds"] == [0, 1] and c["speedup_ci95"][0] <= c["speedup_median"] <= c["speedup_ci95"][1]
        assert c["matched"] == (c["control"] == "multitask_tarp")
    # adapter-only: the adapter arms differ between protocols, the direct arm (full weights) is shared
    pa, pl = res["protocols"]["adapter"]["per_seed"]["0"][name], res["protocols"]["all"]["per_seed"]["0"][name]
    assert pa["methods"]["direct"]["curve"] == pl["methods"]["direct"]["curve"]
    assert pa["methods"]["mltd_tarp"]["curve"] != pl["methods"]["mltd_tarp"]["curve"]
    assert "meta_test" in res["optimizers"] and "inner_loop" in res["optimizers"]
    assert res["seed_varies"]["base_pretraining"] is True
    table = format_table(res)
    assert "95% interval" in table and "*multitask_tarp" in table
    write_json(res, str(tmp_path / "b.json"))
    assert json.loads((tmp_path / "b.json").read_text())["comparisons"]
    assert plot_curves(res, str(tmp_path / "b.png"))


def test_config_keys_for_protocols_and_scale_weight_are_checked():
    from tarp_fast.cli import DEMO_DEFAULTS, _bench_config, _merge

    cfg = _bench_config(_merge(DEMO_DEFAULTS, {"bench": {"protocols": ["adapter"]}, "model": {"scale_weight": True}}))
    assert cfg.protocols == ("adapter",) and cfg.finetune_scope == "adapter" and cfg.scale_weight
    for bad in ({"bench": {"protocols": ["most"]}}, {"bench": {"protocols": []}}, {"model": {"scale_weight": 1}},
                {"bench": {"vary_base": "yes"}}):
        with pytest.raises(ValueError):
            _bench_config(_merge(DEMO_DEFAULTS, bad))


def test_demo_runs_on_a_corpus_folder_with_named_heldout(tmp_path, capsys, monkeypatch):
    from tarp_fast.cli import main

    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path / "cache"))
    write_letter_corpus(tmp_path / "c", names=("alpha", "beta", "gamma"), files=("f.txt",))
    rc = main(["demo", "--corpus", str(tmp_path / "c"), "--heldout", "gamma", "--out", str(tmp_path / "o"),
               "--arms", "direct,mltd_tarp,multitask_tarp", "--seeds", "0", "--n-embd", "16", "--n-layer", "1",
               "--n-head", "2", "--rank", "2", "--pretrain-steps", "2", "--meta-steps", "1", "--tasks-per-batch", "2",
               "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--threads", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "headline [gamma, fine-tuning adapter] mltd_tarp vs matched control multitask_tarp" in out
    res = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert res["heldout"] == ["gamma"] and res["comparisons"]


def test_eval_windows_sharing_a_shingle_with_training_text_are_dropped():
    """Issue 16 F: an evaluation window copied (even in part) from the training split is not measured."""
    from tarp_fast.data.sampling import dedup_eval_windows, eval_windows

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (20_000,), generator=g)
    ev = torch.randint(0, 256, (64 * 20,), generator=g)
    ev[64 * 3:64 * 4] = train[500:564]            # window 3: a verbatim copy
    ev[64 * 7 + 10:64 * 7 + 42] = train[900:932]  # window 7: one shared 32-token run
    ev[64 * 9 + 10:64 * 9 + 41] = train[900:931]  # window 9: only 31 shared tokens: kept
    w, rep = dedup_eval_windows(train, ev, 32, 64)
    assert rep == {"candidates": 20, "dropped": 2, "kept": 18, "shingle": 32, "fallback": False}
    kept = {tuple(x.tolist()) for x in w}
    assert tuple(ev[64 * 3:64 * 4].tolist()) not in kept and tuple(ev[64 * 7:64 * 8].tolist()) not in kept
    assert tuple(ev[64 * 9:64 * 10].tolist()) in kept
    # the concatenated stream gives finetune's evenly spaced windows back exactly
    w8, _ = dedup_eval_windows(train, ev, 8, 64)
    assert torch.equal(eval_windows(w8.reshape(-1), 8, 64), w8)
    # everything duplicated: the plain windows, flagged
    w2, rep2 = dedup_eval_windows(train, train[:640].clone(), 4, 64)
    assert rep2["fallback"] and w2.shape == (4, 64)


def test_progress_plan_lists_the_phases_in_the_order_they_run(corpus, tmp_path):
    """Before: the plan listed every seed's pretraining first while each seed's base is pretrained
    at the start of that seed's phases, so the phases took their kind and cost from the wrong entry."""
    from tarp_fast.meta import bench as bench_mod
    from tarp_fast.meta.finetune import RunProgress

    class Recorder(RunProgress):
        def __init__(self):
            super().__init__(mode="off")
            self.started = []

        def phase(self, desc, total, *, kind="train", cost=None):
            self.started.append((kind, int(total), desc))
            return super().phase(desc, total, kind=kind, cost=cost)

    heldout = corpus.names[-1:]
    cfg = _cfg(arms=("direct", "tarp", "multitask", "mltd_tarp", "multitask_tarp"), lr_grid=(1.0,))
    val, _ = bench_mod.validation_split(corpus, heldout, cfg)
    prep_corpus = corpus.split_heldout([*heldout, val])[0]
    bench_mod.pretrained_base(prep_corpus, cfg, cache_dir=str(tmp_path), seed=0)  # seed 0's base is cached
    for cache in (None, str(tmp_path)):
        run = Recorder()
        bench_mod.run_benchmark(corpus, heldout, cfg, cache_dir=cache, progress=run)
        assert [(kind, steps) for kind, steps, _ in run.plan] == [(kind, steps) for kind, steps, _ in run.started]
        assert run.done == len(run.plan)
        pretrain = [i for i, (kind, _, _) in enumerate(run.started) if kind == "pretrain"]
        seed1 = next(i for i, (_, _, desc) in enumerate(run.started) if "seed 1" in desc)
        if cache is None:  # both bases pretrained, each at the head of its seed's phases
            assert pretrain == [0, seed1]
        else:  # seed 0's base is cached: no phase for it
            assert pretrain == [seed1] and seed1 > 0
        assert {kind for kind, _, _ in run.started} == {"pretrain", "train", "prepare", "finetune"}


def test_save_figure_writes_a_png_atomically_and_leaves_no_temporary(tmp_path):
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tarp_fast._io import stale_temporaries
    from tarp_fast.meta.bench import save_figure

    path = tmp_path / "sub" / "fig.png"
    for _ in range(2):  # a second write replaces the first
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        assert save_figure(fig, str(path)) == str(path)
        assert not plt.fignum_exists(fig.number)  # closed
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(path.parent) == ["fig.png"] and not stale_temporaries(str(path.parent), r"fig\.png")


def test_finetune_reports_each_steps_training_loss_to_its_phase(corpus):
    from tarp_fast.data.sampling import DomainSplits
    from tarp_fast.meta.bench import pretrained_base
    from tarp_fast.meta.finetune import FinetuneRecipe, RunProgress, finetune

    cfg = _cfg()
    base, _, _ = pretrained_base(corpus, cfg)
    sp = DomainSplits.of(corpus[corpus.names[0]].tokens)
    run = RunProgress(mode="off")
    seen = []
    real = run.phase

    def phase(*a, **kw):
        ph = real(*a, **kw)
        update = ph.update
        ph.update = lambda n=1, **info: seen.append(info) or update(n, **info)
        return ph

    run.phase = phase
    finetune(base, list(base.parameters()), sp.train, sp.eval, FinetuneRecipe(steps=3, batch_size=2, seq_len=16,
                                                                               eval_windows=2), progress=run)
    assert len(seen) == 3 and all(isinstance(i["loss"], float) and i["loss"] > 0 for i in seen)
