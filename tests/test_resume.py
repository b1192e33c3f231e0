"""Resuming `tarp-fast prepare` (issue 18): settings checked against the checkpoint, integrity of
the checkpoint record, fallback to an older intact checkpoint, latest.json only a hint, complete
log records after a resume, seeded runs with a dropout model, no pickle loading.

Each test reproduced one finding of the issue before the fix (named in its docstring).
"""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from models import patched_small_gpt2, write_letter_corpus

from tarp_fast.cli import main
from tarp_fast.data import TaskSampler, markov_corpus
from tarp_fast.meta.checkpoint import Checkpointer
from tarp_fast.meta.models import load_base_model
from tarp_fast.meta.prepare import RESUME_MAY_CHANGE, PrepConfig, prepare

L = 16
CLI = ["--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--rank", "2", "--pretrain-steps", "2",
       "--tasks-per-batch", "2", "--seq-len", "16", "--batch-size", "2", "--threads", "1", "--no-progress",
       "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def corpus():
    return markov_corpus(4, num_tokens=3000, num_symbols=6)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_letter_corpus(tmp_path_factory.mktemp("corpus"), chars=4000)


def _model(seed=0, dropout=0.0):
    return patched_small_gpt2(seed, dropout)


def _cfg(**kw):
    base = dict(meta_steps=4, tasks_per_batch=2, inner_steps=1, inner_lr=0.05, inner_optimizer="sgd", batch_size=2,
                query_batch_size=2, seq_len=L, outer_lr=1e-3, checkpoint_every=1)
    base.update(kw)
    return PrepConfig(**base)


def _run(corpus, cfg, ckdir=None, model=None, **kw):
    sampler = TaskSampler(corpus, tasks_per_batch=cfg.tasks_per_batch, inner_steps=max(cfg.inner_steps, 1),
                          batch_size=cfg.batch_size, query_batch_size=cfg.query_batch_size, seq_len=cfg.seq_len,
                          seed=cfg.seed)
    m = model if model is not None else _model()
    res = prepare(m, sampler, cfg, checkpoint_dir=str(ckdir) if ckdir else None, **kw)
    return res, m


def _same_params(a, b):
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), n


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- finding 1: changed settings on resume ----------------------------------------------------

@pytest.mark.parametrize("change,shown", [
    ({"outer_lr": 1e-2}, "outer_lr 0.001 -> 0.01"),
    ({"seed": 7}, "seed 0 -> 7"),
    ({"algorithm": "reptile"}, "algorithm 'fomaml' -> 'reptile'"),
    ({"inner_optimizer": "adam"}, "inner_optimizer 'sgd' -> 'adam'"),
    ({"tasks_per_batch": 3}, "tasks_per_batch 2 -> 3"),
])
def test_resume_refuses_changed_settings(corpus, tmp_path, change, shown):
    """Finding 1: --outer-lr/--prep-seed were ignored and --algorithm/--inner-optimizer/--tasks-per-batch
    switched mid-run without a word; now every change is a ValueError naming old and new values."""
    _run(corpus, _cfg(), tmp_path / "ck", stop_after=2)
    log = tmp_path / "log.jsonl"
    log.write_text("untouched\n")
    with pytest.raises(ValueError) as info:
        _run(corpus, _cfg(**change), tmp_path / "ck", log_path=str(log))
    msg = str(info.value)
    assert f"cannot resume from {tmp_path / 'ck'}" in msg and shown in msg
    assert "--no-resume" in msg and "--out" in msg
    assert "sampler_seed" not in msg  # the sampler's seed is the run's: reported once
    assert log.read_text() == "untouched\n"  # refused before anything was written
    assert Checkpointer(str(tmp_path / "ck")).steps() == [1, 2]
    # the same settings still resume
    res, _ = _run(corpus, _cfg(), tmp_path / "ck")
    assert res["steps"] == 4 and res["resumes"] == [{"step": 2, "changed": {}}]


def test_resume_lists_every_changed_setting_and_tams(corpus, tmp_path):
    _run(corpus, _cfg(), tmp_path / "ck", stop_after=1)
    with pytest.raises(ValueError, match=r"inner_lr 0.05 -> 0.1, outer_lr 0.001 -> 0.02, grad_clip 1.0 -> 0.5\. "):
        _run(corpus, _cfg(outer_lr=2e-2, inner_lr=0.1, grad_clip=0.5), tmp_path / "ck")
    tams = pytest.importorskip("tarp_fast.tams")
    m = _model()
    tams.add_tams(m, cell=True, gates=False, cell_width=8)
    with pytest.raises(ValueError, match="tams False -> True"):
        _run(corpus, _cfg(), tmp_path / "ck", model=m, tams=True)
    _run(corpus, _cfg(), tmp_path / "ck2", stop_after=1, run_settings={"corpus": "a", "base": {"n_embd": 16}})
    with pytest.raises(ValueError, match=r"corpus 'a' -> 'b', base.n_embd 16 -> 32\. "):
        _run(corpus, _cfg(), tmp_path / "ck2", run_settings={"corpus": "b", "base": {"n_embd": 32}})


def test_resume_may_extend_meta_steps_and_records_it(corpus, tmp_path):
    """Allowed changes (meta_steps up, checkpoint_every) are recorded with the step they applied from;
    extending a finished run equals the longer uninterrupted run bitwise."""
    assert set(RESUME_MAY_CHANGE) == {"meta_steps", "checkpoint_every", "world_size"}
    full, m_full = _run(corpus, _cfg(meta_steps=4), tmp_path / "full")
    _run(corpus, _cfg(meta_steps=2), tmp_path / "ext")
    log = tmp_path / "ext.jsonl"
    res, m_ext = _run(corpus, _cfg(meta_steps=4, checkpoint_every=2), tmp_path / "ext", log_path=str(log))
    assert res["losses"] == full["losses"]
    _same_params(m_full, m_ext)
    change = {"meta_steps": [2, 4], "checkpoint_every": [1, 2]}
    assert res["resumes"] == [{"step": 2, "changed": change}]
    recs = _records(log)
    assert [r.get("settings_changed") for r in recs] == [None, None, change, None]
    _, _, meta = Checkpointer(str(tmp_path / "ext")).load()
    assert meta["resumes"] == res["resumes"] and meta["config"]["meta_steps"] == 4
    # not below the checkpoint's step
    with pytest.raises(ValueError, match="at meta-step 4, past meta_steps=3"):
        _run(corpus, _cfg(meta_steps=3), tmp_path / "ext")


def test_cli_resume_with_changed_flags_exits_2_and_records_extension(corpus_dir, tmp_path, capsys):
    common = ["prepare", "--corpus", corpus_dir, "--heldout", "delta", *CLI, "--out", str(tmp_path / "p")]
    assert main([*common, "--meta-steps", "3", "--stop-after", "2"]) == 0
    capsys.readouterr()
    assert main([*common, "--meta-steps", "3", "--outer-lr", "0.01", "--algorithm", "reptile"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "outer_lr 0.001 -> 0.01" in err and "algorithm 'fomaml' -> 'reptile'" in err
    assert main([*common, "--meta-steps", "3", "--heldout", "gamma"]) == 2
    assert "heldout ['delta'] -> ['gamma']" in capsys.readouterr().err
    assert main([*common, "--meta-steps", "4"]) == 0
    rec = json.loads((tmp_path / "p" / "prepare_config.json").read_text())
    assert rec["settings"]["prep"]["meta_steps"] == 4 and len(rec["losses"]) == 4
    assert rec["resumes"] == [{"step": 2, "changed": {"meta_steps": [3, 4]}}]


def test_no_resume_replaces_the_old_runs_checkpoints(corpus, tmp_path):
    _run(corpus, _cfg(), tmp_path / "ck")  # checkpoints 3 and 4
    _run(corpus, _cfg(outer_lr=2e-3), tmp_path / "ck", resume=False, stop_after=1)
    assert Checkpointer(str(tmp_path / "ck")).steps() == [1]  # the old run's newer ones are gone
    res, m = _run(corpus, _cfg(outer_lr=2e-3), tmp_path / "ck")  # resumes the new run
    full, m_full = _run(corpus, _cfg(outer_lr=2e-3))
    assert res["resumes"][0]["step"] == 1 and res["losses"] == full["losses"]
    _same_params(m, m_full)


# ---- finding 2: the checkpoint record is integrity-checked ------------------------------------

def _edit(path, fn):
    rec = json.loads(path.read_text())
    fn(rec)
    path.write_text(json.dumps(rec) + "\n")


def test_edited_checkpoint_record_is_refused(corpus, tmp_path):
    """Finding 2: editing meta.learner.step in the checkpoint JSON skipped steps silently."""
    _run(corpus, _cfg(checkpoint_every=2), tmp_path / "ck", stop_after=2)  # one checkpoint: step 2
    path = tmp_path / "ck" / "ckpt-00000002.json"
    original = path.read_text()
    _edit(path, lambda r: r["meta"]["learner"].update(step=3))
    ck = Checkpointer(str(tmp_path / "ck"))
    with pytest.raises(ValueError, match=rf"{path}: field 'meta.learner.step' does not match the sha256"):
        ck.load(2)
    with pytest.raises(ValueError, match=rf"no intact checkpoint in {tmp_path / 'ck'}.*meta.learner.step"), \
            pytest.warns(RuntimeWarning, match="ckpt-00000002"):
        _run(corpus, _cfg(checkpoint_every=2), tmp_path / "ck")
    # the record's own step against the file name, and the tensor file's metadata
    path.write_text(original)
    _edit(path, lambda r: r.update(step=3))
    with pytest.raises(ValueError, match=rf"{path}: field 'step' is 3 but the file name says 2"):
        ck.load(2)
    # a record without its digests (edited, or written by an older version) is refused too
    path.write_text(original)
    _edit(path, lambda r: r.pop("sha256"))
    with pytest.raises(ValueError, match="field 'sha256'.*is missing"):
        ck.load(2)
    path.write_text(original)
    assert ck.load(2)[0] == 2
    # a checkpoint renamed to another step: caught by the step fields
    for ext in (".json", ".safetensors"):
        (tmp_path / "ck" / f"ckpt-00000002{ext}").rename(tmp_path / "ck" / f"ckpt-00000005{ext}")
    with pytest.raises(ValueError, match="field 'step' is 2 but the file name says 5"):
        ck.load(5)


# ---- finding 3: fallback to the newest intact older checkpoint --------------------------------

@pytest.mark.parametrize("damage", ["flip_tensor_byte", "edit_json", "truncate_json", "drop_json", "drop_tensors"])
def test_damaged_latest_checkpoint_falls_back_to_older(corpus, tmp_path, damage):
    """Finding 3: a corrupted latest checkpoint had no fallback to the intact older one (keep=2)."""
    full, m_full = _run(corpus, _cfg())
    _run(corpus, _cfg(), tmp_path / "ck", stop_after=3)  # checkpoints 2 and 3
    j, t = tmp_path / "ck" / "ckpt-00000003.json", tmp_path / "ck" / "ckpt-00000003.safetensors"
    if damage == "flip_tensor_byte":
        with open(t, "r+b") as fh:
            fh.seek(-1, 2)
            last = fh.read(1)
            fh.seek(-1, 2)
            fh.write(bytes([last[0] ^ 1]))
        what = "tensors_sha256"
    elif damage == "edit_json":
        _edit(j, lambda r: r["meta"]["history"][0].update(query_loss=0.0))
        what = "meta.history"
    elif damage == "truncate_json":
        j.write_text(j.read_text()[:100])
        what = "not valid JSON"
    elif damage == "drop_json":
        j.unlink()
        what = "missing"
    else:
        t.unlink()
        what = "missing"
    log = tmp_path / "log.jsonl"
    with pytest.warns(RuntimeWarning, match=rf"ckpt-00000003.*{what}.*trying the older ckpt-00000002"):
        res, m = _run(corpus, _cfg(), tmp_path / "ck", log_path=str(log))
    assert res["resumes"][0]["step"] == 2 and res["losses"] == full["losses"]
    _same_params(m, m_full)
    assert [r["step"] for r in _records(log)] == [0, 1, 2, 3]
    assert Checkpointer(str(tmp_path / "ck")).steps() == [3, 4]  # the damaged one was rewritten


def test_no_intact_checkpoint_is_an_error_naming_the_folder(corpus, tmp_path):
    _run(corpus, _cfg(), tmp_path / "ck", stop_after=2)
    for s in (1, 2):
        (tmp_path / "ck" / f"ckpt-0000000{s}.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"no intact checkpoint in {tmp_path / 'ck'}: .*ckpt-00000002.*ckpt-00000001"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(corpus, _cfg(), tmp_path / "ck")


# ---- finding 4: latest.json is a hint ---------------------------------------------------------

@pytest.mark.parametrize("pointer", ["missing", "garbage", "wrong_step"])
def test_latest_json_is_only_a_hint(corpus, tmp_path, pointer):
    """Finding 4: a missing latest.json silently restarted from step 0; a garbage one failed with
    "Expecting value: line 1 column 1" naming no file."""
    full, m_full = _run(corpus, _cfg())
    _run(corpus, _cfg(), tmp_path / "ck", stop_after=3)
    latest = tmp_path / "ck" / "latest.json"
    ctx = warnings.catch_warnings()
    if pointer == "missing":
        latest.unlink()
    elif pointer == "garbage":
        latest.write_text("")
        with pytest.raises(ValueError, match=rf"{latest} is not a valid checkpoint pointer \(.*Expecting value"):
            Checkpointer(str(tmp_path / "ck")).latest_step()
        ctx = pytest.warns(RuntimeWarning, match=rf"ignoring {latest} is not a valid checkpoint pointer")
    else:
        latest.write_text(json.dumps({"step": 9, "name": "ckpt-00000009"}))
        ctx = pytest.warns(RuntimeWarning, match="names ckpt-00000009, which is not in the folder")
    ran = []
    with ctx:
        res, m = _run(corpus, _cfg(), tmp_path / "ck", on_step=lambda rec: ran.append(rec["step"]))
    assert ran == [3], "started over although checkpoints exist"
    assert res["losses"] == full["losses"]
    _same_params(m, m_full)
    # a pointer without any checkpoint is not a fresh start either
    for f in (tmp_path / "ck").glob("ckpt-*"):
        f.unlink()
    latest.write_text(json.dumps({"step": 4, "name": "ckpt-00000004"}))
    with pytest.raises(ValueError, match=rf"no intact checkpoint in {tmp_path / 'ck'}"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(corpus, _cfg(), tmp_path / "ck")


# ---- finding 5: the log keeps every field after a resume --------------------------------------

def test_resumed_log_records_keep_every_field(corpus, tmp_path):
    """Finding 5: after a resume the records up to the checkpoint lost `domains` and `seconds`."""
    cfg = _cfg(learn_inner_lr=True)
    _run(corpus, cfg, tmp_path / "a", log_path=str(tmp_path / "a.jsonl"))
    _run(corpus, cfg, tmp_path / "b", log_path=str(tmp_path / "b.jsonl"), stop_after=2)
    _run(corpus, cfg, tmp_path / "b", log_path=str(tmp_path / "b.jsonl"))
    a, b = _records(tmp_path / "a.jsonl"), _records(tmp_path / "b.jsonl")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb) == {"step", "query_loss", "support_loss", "inner_lr", "domains", "seconds"}
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    seconds = [r["seconds"] for r in b]
    assert seconds == sorted(seconds) and seconds[0] > 0  # run time summed over the resumed parts


# ---- finding 6: determinism with a model that draws random numbers (dropout) ------------------

def test_prepare_is_seeded_and_leaves_the_callers_rng_alone(corpus, tmp_path):
    cfg = _cfg(meta_steps=3)
    runs, untouched = [], []
    for noise in (1, 2):
        torch.manual_seed(noise)  # a different global RNG state before each run
        random.seed(noise)
        before = torch.get_rng_state()
        runs.append(_run(corpus, cfg, model=_model(dropout=0.1))[0]["losses"])
        untouched.append(torch.equal(torch.get_rng_state(), before) and random.random() == random.Random(noise).random())
    assert runs[0] == runs[1]
    assert untouched == [True, True]  # the caller's torch and python RNG states are restored
    other = _run(corpus, _cfg(meta_steps=3, seed=1), model=_model(dropout=0.1))[0]["losses"]
    assert other != runs[0]
    # with dropout drawing from the run's RNG, kill and resume is still bitwise
    _run(corpus, cfg, tmp_path / "ck", model=_model(dropout=0.1), stop_after=1)
    torch.manual_seed(99)
    res, _ = _run(corpus, cfg, tmp_path / "ck", model=_model(dropout=0.1))
    assert res["losses"] == runs[0]


def test_cli_prepare_with_a_dropout_model_is_deterministic(corpus_dir, tmp_path):
    """Finding 6: `prepare --model DIR` twice with the same seed gave different losses from step 0
    (the loaded GPT-2 is in train mode with dropout 0.1 and the global RNG was never seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.1,
                               embd_pdrop=0.1, attn_pdrop=0.1)).save_pretrained(str(tmp_path / "gpt2"))
    loaded = load_base_model(str(tmp_path / "gpt2"))
    assert loaded.training and any(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in loaded.modules())
    losses = []
    for noise, out in ((1, "a"), (2, "b")):
        torch.manual_seed(noise)
        random.seed(noise)
        assert main(["prepare", "--corpus", corpus_dir, "--model", str(tmp_path / "gpt2"), *CLI, "--meta-steps", "3",
                     "--out", str(tmp_path / out)]) == 0
        losses.append(json.loads((tmp_path / out / "prepare_config.json").read_text())["losses"])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


# ---- finding 7: no pickle loading -------------------------------------------------------------

def test_model_folder_with_only_pickle_weights_is_refused(corpus_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    # the pickle layout transformers' older save_pretrained(safe_serialization=False) wrote
    model.config.save_pretrained(str(tmp_path / "pkl"))
    torch.save(model.state_dict(), str(tmp_path / "pkl" / "pytorch_model.bin"))
    assert (tmp_path / "pkl" / "pytorch_model.bin").is_file()
    assert not list((tmp_path / "pkl").glob("*.safetensors"))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'pkl'} has no safetensors weights.*pytorch_model.bin"):
        load_base_model(str(tmp_path / "pkl"))
    assert main(["prepare", "--corpus", corpus_dir, "--model", str(tmp_path / "pkl"), *CLI, "--meta-steps", "1",
                 "--out", str(tmp_path / "out")]) == 2
    assert "pytorch_model.bin" in capsys.readouterr().err
    # both formats present: the safetensors file is what is read
    model.save_pretrained(str(tmp_path / "pkl"))
    assert type(load_base_model(str(tmp_path / "pkl"))) is GPT2LMHeadModel
