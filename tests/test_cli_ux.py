"""A user's first hour with the `tarp-fast` command (issue 19): flags, config errors, messages,
progress and logs, the base cache, generate/eval on a prepared and adapted model.

Each test reproduced one finding of the issue before the fix (named in its docstring).
"""

from __future__ import annotations

import argparse
import io
import json
import os

import pytest
import tomllib
import torch
from models import write_letter_corpus

import tarp_fast
from tarp_fast.cli import build_parser, config_reference, main
from tarp_fast.meta.finetune import RunProgress

TINY = ["--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--rank", "2", "--pretrain-steps", "3",
        "--meta-steps", "2", "--tasks-per-batch", "2", "--steps", "3", "--seq-len", "16", "--batch-size", "2",
        "--threads", "1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Every test's pretrained bases go to one temporary cache (never the user's ~/.cache)."""
    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tarp-fast-cache"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_letter_corpus(tmp_path_factory.mktemp("corpus"), chars=4000)


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
    """One prepared folder (TARP only) and one adapted from it, shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("TARP_FAST_CACHE_DIR", str(root / "cache"))
    try:
        assert main(["prepare", "--corpus", corpus_dir, "--heldout", "delta", "--out", str(root / "prep"),
                     "--no-progress", *TINY]) == 0
        assert main(["adapt", "--prepared", str(root / "prep"), "--corpus", corpus_dir, "--domain", "delta",
                     "--out", str(root / "ad"), "--steps", "2", "--threads", "1", "--no-progress"]) == 0
    finally:
        mp.undo()
    return root


# ---- flags ----------------------------------------------------------------------------------------

def test_adapt_refuses_flags_and_config_it_does_not_use(prepared, corpus_dir, tmp_path, capsys):
    """Before: `adapt --config typo.toml --rank 16 --meta-steps 999` and `--config nope.toml` exited 0."""
    base = ["adapt", "--prepared", str(prepared / "prep"), "--corpus", corpus_dir, "--domain", "delta",
            "--out", str(tmp_path / "o"), "--steps", "1", "--threads", "1", "--no-progress"]
    assert main([*base, "--rank", "16"]) == 2
    assert "unrecognized arguments: --rank 16" in capsys.readouterr().err
    assert main([*base, "--meta-steps", "999"]) == 2
    capsys.readouterr()
    assert main([*base, "--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert f"--config {str(tmp_path / 'nope.toml')!r} does not exist" in err
    typo = tmp_path / "typo.toml"
    typo.write_text("[finetune]\nstep = 5\n")
    assert main([*base, "--config", str(typo)]) == 2
    err = capsys.readouterr().err
    assert "unknown keys ['step'] in [finetune]" in err and "steps" in err
    model = tmp_path / "model.toml"
    model.write_text("[model]\nrank = 16\n")
    assert main([*base, "--config", str(model)]) == 2
    assert "[model] does not apply to adapt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    ok = tmp_path / "ok.toml"
    ok.write_text("[finetune]\nsteps = 1\neval_windows = 2\n")
    assert main([*base, "--config", str(ok)]) == 0
    assert json.loads((tmp_path / "o" / "adapt_config.json").read_text())["recipe"]["eval_windows"] == 2


def test_missing_config_file_is_an_error(capsys, tmp_path):
    assert main(["adapt", "--prepared", str(tmp_path), "--domain", "x", "--out", str(tmp_path / "o"),
                 "--config", str(tmp_path / "nope.toml")]) == 2
    assert "--config" in capsys.readouterr().err


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_each_subcommand_lists_only_its_flags_each_with_help_and_default(capsys):
    """Before: every subcommand listed the same ~25 flags, most without help or default."""
    parser = build_parser()
    subs = _options(parser)
    assert set(subs) >= {"prepare", "adapt", "generate", "eval", "bench-adapt", "demo", "config"}
    for name, p in subs.items():
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            assert action.help, (name, action.option_strings)
            assert "default" in action.help or "required" in action.help, (name, action.option_strings, action.help)
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in subs.items()}
    for name in ("prepare", "adapt", "generate", "eval", "config"):
        assert not flags[name] & {"--seeds", "--arms", "--full-lr"}, name
    assert not flags["adapt"] & {"--rank", "--meta-steps", "--n-embd", "--pretrain-steps", "--algorithm"}
    assert {"--steps", "--lr", "--config"} <= flags["adapt"]
    assert {"--seeds", "--arms", "--meta-steps"} <= flags["bench-adapt"]
    assert "--checkpoint-every" in flags["prepare"] and "--checkpoint-every" not in flags["bench-adapt"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tarp-fast {tarp_fast.__version__}"
    assert main(["adapt", "--help"]) == 0
    assert "--rank" not in capsys.readouterr().out


def test_config_reference_lists_every_valid_key_and_round_trips(tmp_path, capsys, corpus_dir):
    """Before: the valid TOML keys were found only in DEMO_DEFAULTS in cli.py."""
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert text == config_reference()
    tree = tomllib.loads(text)
    assert set(tree) == {"model", "pretrain", "prep", "finetune", "bench", "ablate"}
    assert {"meta_steps", "inner_lr", "checkpoint_every", "seed"} <= set(tree["prep"])
    assert {"steps", "eval_windows", "eval_fraction"} <= set(tree["finetune"])
    (tmp_path / "all.toml").write_text(text)
    from tarp_fast.cli import _settings  # every key the reference prints is accepted

    args = argparse.Namespace(config=str(tmp_path / "all.toml"))
    cfg = _settings(args, ())
    assert cfg.prep.meta_steps == tree["prep"]["meta_steps"] and cfg.finetune.steps == tree["finetune"]["steps"]


# ---- config errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("toml,expected", [
    ("[prep]\nmeta_step = 3\n", ["unknown keys ['meta_step'] in [prep]", "meta_steps", "inner_lr"]),
    ("[finetune]\nbatchsize = 3\n", ["unknown keys ['batchsize'] in [finetune]", "batch_size"]),
    ("[prep\nmeta_steps = 3\n", ["bad.toml", "not valid TOML"]),
    ('[model]\nvariant = "lora"\n', ["[model] variant must be one of dynamic, bilinear, kronecker", "'lora'"]),
    ("[model]\nrank = 0\n", ["[model] rank must be a positive integer"]),
    ("[model]\nn_embd = 10\nn_head = 4\n", ["[model] n_embd (10) must be divisible by [model] n_head (4)"]),
    ("[prep]\ninner_optimizer = 'rmsprop'\n", ["[prep]", "inner_optimizer"]),
])
def test_config_errors_name_the_key_and_file_before_anything_runs(toml, expected, corpus_dir, tmp_path, capsys):
    """Before: "PrepConfig.__init__() got an unexpected keyword argument" with no valid keys, a TOML
    syntax error without the file, and `variant = "lora"` refused after pretraining, naming TARPLinear."""
    bad = tmp_path / "bad.toml"
    bad.write_text(toml)
    # no setting flags: they would win over the file
    rc = main(["prepare", "--corpus", corpus_dir, "--out", str(tmp_path / "out"), "--config", str(bad),
               "--no-progress", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    for text in expected:
        assert text in err, (text, err)
    assert "TARPLinear" not in err and "__init__()" not in err
    assert not (tmp_path / "out").exists()  # refused before --out was created or anything trained


def test_missing_corpus_folder_says_so_and_creates_nothing(tmp_path, capsys):
    """Before: "argument 'spec' must be 'machine', ..." for a folder that does not exist, and the
    failed run created its --out folder."""
    rc = main(["prepare", "--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--corpus {str(tmp_path / 'nowhere')!r} does not exist" in err and "'spec'" not in err
    assert not (tmp_path / "out").exists()
    assert main(["prepare", "--corpus", str(tmp_path), "--heldout", "zeta", "--out", str(tmp_path / "out2"),
                 *TINY]) == 2
    assert not (tmp_path / "out2").exists()


def test_bench_without_multitask_does_not_claim_it_lost(corpus_dir, tmp_path, capsys):
    """Before: `--arms direct,mltd_tarp` printed "does NOT beat the multitask control"."""
    assert main(["bench-adapt", "--corpus", corpus_dir, "--heldout", "delta", "--arms", "direct,mltd_tarp",
                 "--seeds", "0", "--no-progress", *TINY]) == 0
    out = capsys.readouterr().out
    assert "goal [delta] mltd_tarp" in out
    assert "multitask control not run" in out and "does NOT beat" not in out


# ---- progress and logs -------------------------------------------------------------------------------

def test_redirected_progress_is_plain_lines_with_phase_numbers(corpus_dir, tmp_path, capsys):
    """Before: a redirected log was carriage-return bars, erased when done, without "phase k of N"
    or an estimate of the whole run."""
    assert main(["bench-adapt", "--corpus", corpus_dir, "--heldout", "delta", "--arms", "direct,tarp,mltd_tarp",
                 "--seeds", "0", "--no-cache", *TINY]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    done = [line for line in err.splitlines() if ": done, " in line]
    # pretrain, prepare, five fine-tuning runs (direct once; tarp and mltd_tarp under both
    # protocols, adapter-only and every weight): numbered against the whole run, all of them
    assert [line.split("]")[0] + "]" for line in done] == [f"[{k}/7]" for k in range(1, 8)]
    assert "pretrain" in done[0] and "prepare mltd_tarp" in done[1] and "left (estimate)" in done[1]
    starts = [line for line in err.splitlines() if line.startswith("[") and " steps; run " in line]
    assert len(starts) == 7  # every phase is announced when it starts


def test_no_progress_still_reports_each_phase(prepared, corpus_dir, tmp_path, capsys):
    """Before: `--no-progress` printed nothing until the end."""
    assert main(["adapt", "--prepared", str(prepared / "prep"), "--corpus", corpus_dir, "--domain", "delta",
                 "--out", str(tmp_path / "o"), "--steps", "2", "--threads", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "[1/1] adapt to delta: done, 2 steps" in err and "\r" not in err


def test_run_progress_lines_bars_and_estimate():
    now = [0.0]
    out = io.StringIO()
    run = RunProgress([("a", 10, 1.0), ("b", 10, 2.0)], mode="lines", stream=out, interval=5.0,
                      clock=lambda: now[0])
    ph = run.phase("first", 10)
    for _ in range(10):
        now[0] += 1.0
        ph.update(1, loss=0.5)
    ph.close()
    assert run.estimate_left() == pytest.approx(20.0)  # 10 steps x cost 2 at 1 s per unit
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/2] first: 10 steps")
    assert any(line.startswith("[1/2] first: step 5/10, loss 0.5000") for line in lines)
    assert lines[-1].startswith("[1/2] first: done, 10 steps in 10.0 s, loss 0.5000; run 0:10 elapsed, ~0:20 left")
    # bars: kept on screen when finished (tqdm leave=True ends the bar with a newline)
    tty = io.StringIO()
    tty.isatty = lambda: True
    bars = RunProgress([("a", 3, 1.0)], stream=tty)
    assert bars.mode == "bars"
    with bars.phase("only", 3) as ph:
        for _ in range(3):
            ph.update(1, loss=1.0)
    assert "[1/1] only" in tty.getvalue() and tty.getvalue().endswith("\n")


def test_ctrl_c_says_where_the_checkpoint_is_and_the_rerun_resumes(corpus_dir, tmp_path, capsys, monkeypatch):
    """Before: Ctrl-C printed a raw traceback, and a resume did not say it resumed."""
    from tarp_fast.meta import prepare as prep_mod

    real = prep_mod.MetaLearner.meta_step
    calls = []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(prep_mod.MetaLearner, "meta_step", interrupted)
    cmd = ["prepare", "--corpus", corpus_dir, "--heldout", "delta", "--out", str(tmp_path / "p"), *TINY,
           "--meta-steps", "4", "--checkpoint-every", "1", "--no-progress"]
    assert main(cmd) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    ckdir = os.path.join(str(tmp_path / "p"), "checkpoints")
    assert f"interrupted at meta-step 2; checkpoint saved at meta-step 2 in {ckdir}; rerun the same command " \
           "to resume" in err
    monkeypatch.setattr(prep_mod.MetaLearner, "meta_step", real)
    assert main(cmd) == 0
    captured = capsys.readouterr()
    assert f"resuming from the checkpoint at meta-step 2 in {ckdir}" in captured.err
    assert "prepared: 4 meta-steps" in captured.out and "resumed from meta-step 2" in captured.out


# ---- the base cache ------------------------------------------------------------------------------

def test_a_new_out_folder_reuses_the_cached_base(corpus_dir, tmp_path, capsys, monkeypatch):
    """Before: every new --out folder pretrained the base again."""
    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path / "cache"))
    common = ["prepare", "--corpus", corpus_dir, "--heldout", "delta", *TINY, "--pretrain-steps", "4"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert "pretrain base: done" in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "bases").glob("base-*/model.safetensors"))) == 1
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "pretrain base" not in err and "cached pretrained GPT-2" in err
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "base" / "model.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # XDG_CACHE_HOME when TARP_FAST_CACHE_DIR is not set; --no-cache trains again
    monkeypatch.delenv("TARP_FAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main([*common, "--out", str(tmp_path / "c")]) == 0
    assert list((tmp_path / "xdg" / "tarp-fast" / "bases").glob("base-*/model.safetensors"))
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "d"), "--no-cache"]) == 0
    assert "pretrain base: done" in capsys.readouterr().err


# ---- using the result: generate, eval, what adapt says -----------------------------------------------

def test_adapt_says_how_to_use_its_adapter_and_generate_eval_run_it(prepared, corpus_dir, capsys):
    """Before: no command used a prepared and adapted model, and adapt did not say its adapter
    needs prep/base or how to load the pair."""
    conf = json.loads((prepared / "ad" / "adapt_config.json").read_text())
    assert conf["base"] == str(prepared / "prep" / "base") and conf["domain"] == "delta"
    assert main(["generate", str(prepared / "ad"), "--prompt", "abc", "--max-new-tokens", "5",
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith("abc") and len(text.encode()) >= 5
    assert main(["generate", str(prepared / "ad"), "--prompt", "abc", "--max-new-tokens", "5", "--threads", "1",
                 "--no-kv-cache"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == text
    assert main(["eval", str(prepared / "ad"), "--corpus", corpus_dir, "--domain", "delta", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "delta: held-out loss" in out and "with the adapter" in out and "for the base alone" in out
    assert main(["generate", str(prepared / "nowhere"), "--prompt", "a"]) == 2


def test_adapt_prints_the_pairing(prepared, corpus_dir, tmp_path, capsys):
    assert main(["adapt", "--prepared", str(prepared / "prep"), "--corpus", corpus_dir, "--domain", "gamma",
                 "--out", str(tmp_path / "g"), "--steps", "1", "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"applies to the base model in {prepared / 'prep' / 'base'}" in out
    assert f"tarp-fast generate {tmp_path / 'g'}" in out and "load_adapter" in out


def test_tams_adapt_prints_its_architecture_and_generate_uses_it(corpus_dir, tmp_path, capsys):
    """Before: a TAMS adapt did not print the architecture it chose."""
    assert main(["prepare", "--corpus", corpus_dir, "--heldout", "delta", "--out", str(tmp_path / "p"), "--tams",
                 "--no-progress", *TINY]) == 0
    assert main(["adapt", "--prepared", str(tmp_path / "p"), "--corpus", corpus_dir, "--domain", "delta",
                 "--out", str(tmp_path / "a"), "--steps", "1", "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "TAMS architecture chosen for delta: cell edges n0->n2:" in out
    assert json.loads((tmp_path / "a" / "adapt_config.json").read_text())["architecture"]["ops"]
    assert main(["generate", str(tmp_path / "a"), "--prompt", "ab", "--max-new-tokens", "4", "--threads", "1"]) == 0
    cached = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "a"), "--prompt", "ab", "--max-new-tokens", "4", "--threads", "1",
                 "--no-kv-cache"]) == 0
    assert capsys.readouterr().out == cached
    assert main(["generate", str(tmp_path / "p"), "--prompt", "ab"]) == 2  # no architecture chosen yet
    assert "run `tarp-fast adapt`" in capsys.readouterr().err


# ---- the demo's plot -----------------------------------------------------------------------------------

def test_plot_says_seed_means_shows_spread_and_marks_steps_to_target():
    """Before: the plot did not say the curves are seed means, showed no spread, marked no steps."""
    from matplotlib.collections import PolyCollection

    from tarp_fast.meta.bench import curves_figure

    def curve(offset):
        return [[s, 3.0 - 0.1 * s + offset, 0.0] for s in range(0, 6)]

    per_seed = {str(s): {"d": {"target_loss": 2.6, "methods": {
        "direct": {"curve": curve(0.1 * s), "final_loss": 2.5, "steps_to_target": 5},
        "tarp": {"curve": curve(-0.2 + 0.1 * s), "final_loss": 2.3, "steps_to_target": 2}}}} for s in (0, 1)}
    result = {"per_seed": per_seed, "domains": {"d": {"target_loss": 2.55, "methods": {
        "direct": {"curve": curve(0.05), "final_loss": 2.55, "steps_to_target": 5},
        "tarp": {"curve": curve(-0.15), "final_loss": 2.35, "steps_to_target": 2}}}}}
    fig = curves_figure(result)
    ax = fig.axes[0]
    assert "mean of 2 seeds" in ax.get_title() and "steps to target" in ax.get_title()
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # one spread band per arm
    vertical = [ln for ln in ax.lines if len(set(ln.get_xdata())) == 1]
    assert sorted(ln.get_xdata()[0] for ln in vertical) == [2, 5]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "tarp (target at 2)" in labels
