"""The tarp-fast command: bench-adapt JSON schema, prepare/resume/adapt, configs, errors, distributed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from models import write_letter_corpus
from safetensors import safe_open

from tarp_fast.cli import main

TINY = ["--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--rank", "2", "--pretrain-steps", "3",
        "--meta-steps", "2", "--tasks-per-batch", "2", "--steps", "3", "--seq-len", "16", "--batch-size", "2",
        "--threads", "1", "--no-progress"]
from tarp_fast.meta.bench import ARMS  # noqa: E402  (the default arms)


@pytest.fixture(autouse=True)
def _base_cache(tmp_path_factory, monkeypatch):
    """Pretrained bases go to a temporary cache (never the user's ~/.cache/tarp-fast)."""
    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tarp-fast-cache"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A folder with one subfolder of text files per domain (generated text, no network)."""
    return write_letter_corpus(tmp_path_factory.mktemp("corpus"), files=("f0.txt", "f1.txt"))


def _weights(folder) -> str:
    """The adapter's tensor file in ``folder`` (``adapter_model.safetensors``; older format: ``adapter.safetensors``)."""
    for name in ("adapter_model.safetensors", "adapter.safetensors"):
        if os.path.isfile(os.path.join(str(folder), name)):
            return os.path.join(str(folder), name)
    raise FileNotFoundError(f"no adapter tensor file in {folder}")


def _read_tensors(path):
    if os.path.isdir(path):
        path = _weights(path)
    with safe_open(path, framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def test_bench_adapt_json_schema(corpus_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    rc = main(["bench-adapt", "--corpus", corpus_dir, "--heldout", "gamma,delta", "--json", str(out), "--png", str(png),
               "--log", str(tmp_path / "log.jsonl"), *TINY])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "steps→target" in printed and "direct" in printed
    res = json.loads(out.read_text())
    assert set(res["domains"]) == {"gamma", "delta"}
    for d in res["domains"].values():
        assert set(d) == {"target_loss", "methods"} and isinstance(d["target_loss"], float)
        expected = set(ARMS) - set(res["unavailable"])
        assert set(d["methods"]) == expected
        for m in d["methods"].values():
            assert set(m) == {"curve", "final_loss", "steps_to_target"}
            assert isinstance(m["final_loss"], float)
            assert m["steps_to_target"] is None or isinstance(m["steps_to_target"], int)
            assert [p[0] for p in m["curve"]][:2] == [0, 1] and m["curve"][-1][0] == 3
            assert all(len(p) == 3 and p[2] >= 0 for p in m["curve"])
        assert d["target_loss"] == d["methods"]["direct"]["final_loss"]
    assert set(res["preparation_domains"]) == {"alpha", "beta"}
    assert png.stat().st_size > 1000
    assert all(json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines())


def test_optional_tarp_tams_control_arm(corpus_dir, tmp_path):
    """The opt-in control: TARP + TAMS without preparation; the deployed cells' sizes are reported."""
    pytest.importorskip("tarp_fast.tams")
    out = tmp_path / "bench.json"
    rc = main(["bench-adapt", "--corpus", corpus_dir, "--heldout", "delta", "--arms", "direct,tarp_tams,mltd_tarp_tams",
               "--json", str(out), *TINY])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["domains"]["delta"]["methods"]) == {"direct", "tarp_tams", "mltd_tarp_tams"}
    active = res["sizes"]["tams_active_cell_parameters"]
    want = {f"{prefix}delta/seed{seed}" for prefix in ("", "tarp_tams:") for seed in res["per_seed"]}
    assert set(active) == want and all(v >= 0 for v in active.values())
    assert set(res["tams_architectures"]) == set(active)
    assert main(["bench-adapt", "--corpus", corpus_dir, "--heldout", "delta", "--arms", "direct,bogus", *TINY]) == 2


def test_demo_end_to_end_at_a_tiny_size(tmp_path, capsys):
    """`tarp-fast demo` (what `make demo` runs) on this machine's text, every arm, tiny settings."""
    from tarp_fast.cli import DEMO_HELDOUT
    from tarp_fast.data import machine_corpus

    names = machine_corpus(max_bytes=50_000).names
    if not any(n in names for n in DEMO_HELDOUT) or len(names) < 4:
        pytest.skip(f"this machine has too few text domains for the demo: {names}")
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--max-bytes", "50000", *TINY])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "steps→target" in printed and "demo wall time" in printed and "goal [" in printed
    res = json.loads((tmp_path / "demo" / "bench.json").read_text())
    assert set(res["domains"][res["heldout"][0]]["methods"]) == set(ARMS) - set(res["unavailable"])
    assert (tmp_path / "demo" / "bench.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "corpus_manifest.json").is_file()


def test_prepare_resume_after_kill_is_bitwise_and_adapt_works(corpus_dir, tmp_path):
    common = ["prepare", "--corpus", corpus_dir, "--heldout", "delta", *TINY, "--meta-steps", "4",
              "--checkpoint-every", "1", "--inner-optimizer", "adam"]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    # "kill" after 2 meta-steps (the process ends there), then a new run resumes from the checkpoint
    assert main([*common, "--out", str(tmp_path / "cut"), "--stop-after", "2"]) == 0
    assert main([*common, "--out", str(tmp_path / "cut")]) == 0
    for sub in ("adapter", "base/model.safetensors"):
        a, b = _read_tensors(str(tmp_path / "full" / sub)), _read_tensors(str(tmp_path / "cut" / sub))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    la = json.loads((tmp_path / "full" / "prepare_config.json").read_text())["losses"]
    lb = json.loads((tmp_path / "cut" / "prepare_config.json").read_text())["losses"]
    assert la == lb and len(la) == 4
    assert len((tmp_path / "cut" / "prepare.jsonl").read_text().splitlines()) == 4
    rc = main(["adapt", "--prepared", str(tmp_path / "full"), "--corpus", corpus_dir, "--domain", "delta",
               "--out", str(tmp_path / "ad"), "--steps", "2", "--threads", "1", "--no-progress"])
    assert rc == 0
    assert os.path.isfile(_weights(tmp_path / "ad" / "adapter"))
    assert len((tmp_path / "ad" / "adapt.jsonl").read_text().splitlines()) == 3


def test_toml_config_and_flags(corpus_dir, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[bench]\narms = ["direct", "tarp"]\nseeds = [0, 1]\n[finetune]\neval_windows = 2\n')
    out = tmp_path / "b.json"
    rc = main(["bench-adapt", "--config", str(cfg), "--corpus", corpus_dir, "--heldout", "delta", "--json", str(out), *TINY])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["domains"]["delta"]["methods"]) == {"direct", "tarp"}
    assert set(res["per_seed"]) == {"0", "1"} and res["settings"]["finetune"]["eval_windows"] == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[bench]\nbogus = 1\n")
    assert main(["bench-adapt", "--config", str(bad), "--corpus", corpus_dir, "--heldout", "delta", *TINY]) == 2
    assert main(["bench-adapt", "--corpus", corpus_dir, "--heldout", "nope", *TINY]) == 2


def test_nan_loss_is_reported(corpus_dir, tmp_path, capsys):
    rc = main(["bench-adapt", "--corpus", corpus_dir, "--heldout", "delta", "--arms", "direct", "--full-lr", "1e30",
               *TINY])
    assert rc == 3
    assert "non-finite" in capsys.readouterr().err


def test_python_m_cli_help():
    r = subprocess.run([sys.executable, "-m", "tarp_fast.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("prepare", "adapt", "bench-adapt", "demo"):
        assert cmd in r.stdout


def _rank_main(rank, world, init_file, corpus_dir, out, q, extra=()):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rc = main(["prepare", "--corpus", corpus_dir, "--heldout", "delta", *TINY, "--tasks-per-batch", "2",
                   "--meta-steps", "2", "--out", out, *extra])
        q.put((rank, rc))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("extra", [(), ("--fsdp",)], ids=["ddp", "fsdp"])
def test_two_gloo_processes_equal_one(corpus_dir, tmp_path, extra):
    """Tasks split over 2 ranks with all-reduced gradients give the 1-process parameters; with
    ``--fsdp`` the base is sharded over the ranks and gathered on rank 0 to be written."""
    import torch.multiprocessing as mp

    assert main(["prepare", "--corpus", corpus_dir, "--heldout", "delta", *TINY, "--tasks-per-batch", "2",
                 "--meta-steps", "2", "--out", str(tmp_path / "one")]) == 0
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, str(tmp_path / "init"), corpus_dir, str(tmp_path / "two"), q, extra))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    results = sorted(q.get(timeout=5) for _ in range(2))
    assert results == [(0, 0), (1, 0)]
    for sub in ("adapter", "base/model.safetensors"):
        a, b = _read_tensors(str(tmp_path / "one" / sub)), _read_tensors(str(tmp_path / "two" / sub))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{sub}:{k}")


def test_fsdp_needs_torchrun(corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc = main(["prepare", "--corpus", corpus_dir, "--heldout", "delta", *TINY, "--out", str(tmp_path / "o"), "--fsdp"])
    err = capsys.readouterr().err
    assert rc == 2 and "--fsdp" in err and "torchrun" in err
    assert not (tmp_path / "o").exists()  # refused before anything was written
