"""FSDP2 (``torch.distributed.fsdp.fully_shard``) of patched models: 2 gloo processes == 1 process.

One spawn of 2 CPU processes runs every scenario (module fixture; the imports cost more than the
runs) and writes its results; each test compares one scenario with the same training on one
process. Per block then the root, the base frozen and the adapter trained:

* GPT-2 (``Conv1D`` weights, kept contiguous: the old transposed-view parameter made
  ``fully_shard`` raise "FSDP does not support non-contiguous parameters"), 2 tasks in a batch;
  its checkpoints, sharded (``torch.distributed.checkpoint``) and gathered full (safetensors),
  load on one process;
* Llama, 2 tasks;
* TAMS cells and gates inside the sharded blocks (the controller, which runs before the forward,
  replicated and all-reduced);
* mixed precision: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, fp32 factors;
* ``prepare(..., fsdp=True)`` against the unsharded 1-process preparation, and its gathered
  checkpoint loaded on one process.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

# separate processes: the order of the other tests cannot change them (`make test-order` skips slow)
pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 3
TASKS = torch.tensor([0, 1, 1, 0])


# ---- the training both sides run ------------------------------------------------------------------
def _model(family):
    from models import tiny_model

    import tarp_fast

    model = tiny_model(family)
    tarp_fast.patch_model(model, rank=4, num_tasks=2, init="paper")
    tarp_fast.mark_only_tarp_trainable(model)
    return model


def _tams_model():
    from tarp_fast.tams import add_tams

    model = _model("gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        add_tams(model, cell_width=8, cell_init="normal")
    for n, p in model.named_parameters():  # the base stays frozen; the adapter and TAMS train
        p.requires_grad_(n.rsplit(".", 1)[-1].startswith("tarp_") or "tams_" in n)
    model.tams_controller.train()  # sample() with straight-through gradients
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 64, (4, 12), generator=g)


def _train(model, ids, task_index, *, tams=False, controller_sync=None, sgd=False):
    """``STEPS`` AdamW (or SGD) steps on the trainable parameters; returns the losses (of this rank's rows)."""
    import tarp_fast
    from tarp_fast.tams import use_architecture

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5) if sgd else torch.optim.AdamW(params, lr=1e-2)
    emb = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    losses = []
    for step in range(STEPS):
        with tarp_fast.tarp_context(task_index=task_index):
            if tams:
                arch = model.tams_controller(emb, step=step, generator=torch.Generator().manual_seed(10 + step))
                with use_architecture(model, arch, task_index):
                    logits = model(input_ids=ids).logits
            else:
                logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        if controller_sync is not None:
            controller_sync()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _trainable(state: dict, model) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().float().clone() for k, v in state.items() if k in names}


def _prep_config():
    from tarp_fast.meta.prepare import PrepConfig

    return PrepConfig(meta_steps=2, tasks_per_batch=2, inner_steps=2, inner_lr=0.05, inner_optimizer="sgd",
                      batch_size=2, query_batch_size=2, seq_len=16, outer_lr=1e-3)


def _prep_model(tams=False):
    import tarp_fast
    from tarp_fast.meta import small_gpt2

    model = small_gpt2(256, n_embd=16, n_layer=2, n_head=2, n_positions=32, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        tarp_fast.patch_model(model, rank=2)
        for n, p in model.named_parameters():
            if n.endswith("tarp_U"):
                p.data.normal_(0, 0.05)
        if tams:
            from tarp_fast.tams import add_tams

            add_tams(model, cell=True, gates=True, cell_width=8, cell_init="normal")
    return model


def _prep_sampler(cfg):
    from tarp_fast.data import TaskSampler, markov_corpus

    corpus = markov_corpus(4, num_tokens=3000, num_symbols=6)
    return TaskSampler(corpus, tasks_per_batch=cfg.tasks_per_batch, inner_steps=cfg.inner_steps,
                       batch_size=cfg.batch_size, query_batch_size=cfg.query_batch_size, seq_len=cfg.seq_len, seed=0)


# ---- the 2-process side -------------------------------------------------------------------------
def _full_state(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _shard(model, *, mp_policy=None, ignored=None):
    from torch.distributed.fsdp import fully_shard

    from tarp_fast.meta.prepare import transformer_blocks

    kw = {"mp_policy": mp_policy} if mp_policy is not None else {}
    if ignored:
        kw["ignored_params"] = ignored
    for block in transformer_blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def _rank_main(rank, world, init_file, out):
    import faulthandler

    log = open(os.path.join(out, f"rank{rank}.log"), "w")  # noqa: SIM115  (read by the fixture on failure)
    faulthandler.enable(file=log, all_threads=True)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _scenarios(rank, world, out)
        # the sharded models are gone with _scenarios' frame: FSDP's last gloo work objects (and
        # the tensors they hold) are released now, not during interpreter teardown (a SIGABRT)
        gc.collect()
        dist.barrier()  # leave together
    finally:
        dist.destroy_process_group()


def _scenarios(rank, world, out):
    """Every scenario on this rank; rank 0 writes the results."""
    import safetensors.torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from tarp_fast.meta.prepare import gather_full_state_dict, prepare

    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)  # this rank's half of the batch
    ids, ti = _data()[rows], TASKS[rows]
    results = {}
    for name in ("gpt2", "llama"):
        model = _shard(_model(name))
        results[name] = _train(model, ids, ti)
        full = _full_state(model)
        if rank == 0:
            results[f"{name}_state"] = _trainable(full, _model(name))
        if name == "gpt2":  # checkpoints: sharded (DCP, every rank writes its shards), gathered full
            dcp.save(get_model_state_dict(model), checkpoint_id=os.path.join(out, "dcp"))
            if rank == 0:
                safetensors.torch.save_file({k: v.contiguous() for k, v in full.items()},
                                            os.path.join(out, "full.safetensors"))

    # TAMS: the cells and gates live in the sharded blocks; the controller runs before the
    # forward (it makes the architecture), so it stays whole on every rank and its gradient
    # is all-reduced here
    model = _tams_model()
    controller = list(model.tams_controller.parameters())
    _shard(model, ignored=set(controller))

    def sync():
        for p in controller:
            dist.all_reduce(p.grad)
            p.grad.div_(world)

    results["tams"] = _train(model, ids, ti, tams=True, controller_sync=sync)
    full = _full_state(model)
    if rank == 0:
        results["tams_state"] = _trainable(full, _tams_model())

    # mixed precision: bf16 compute, fp32 sharded parameters (the factors) and reductions
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = _shard(_model("gpt2"), mp_policy=policy)
    results["mixed"] = _train(model, ids, ti, sgd=True)
    full = _full_state(model)
    if rank == 0:
        results["mixed_dtypes"] = sorted({str(v.dtype) for v in full.values()})
        results["mixed_state"] = _trainable(full, _model("gpt2"))

    # the preparation driver's FSDP mode, with TARP and with TAMS; a checkpoint after every step,
    # so a step runs after a mid-run checkpoint gathered the sharded optimizer state
    cfg = dataclasses.replace(_prep_config(), checkpoint_every=1)
    model = _prep_model()
    run = prepare(model, _prep_sampler(cfg), cfg, fsdp=True, checkpoint_dir=os.path.join(out, "prep"))
    results["prep_losses"] = run["losses"]
    full = gather_full_state_dict(model)
    # TAMS: sharded against the unsharded distributed run (each rank samples its own tasks'
    # architectures, so a 2-process TAMS preparation is its own reference)
    tams = {}
    for fsdp in (False, True):
        model = _prep_model(tams=True)
        run = prepare(model, _prep_sampler(cfg), cfg, tams=True, fsdp=fsdp)
        tams[fsdp] = (run["losses"], gather_full_state_dict(model))
    if rank == 0:
        results["prep_state"] = {k: v.clone() for k, v in full.items()}
        results["prep_tams"] = tams
        torch.save(results, os.path.join(out, "results.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("fsdp")
    try:
        mp.start_processes(_rank_main, args=(WORLD, str(out / "rendezvous"), str(out)), nprocs=WORLD,
                           start_method="spawn")
    except Exception as exc:
        logs = "\n".join(f"rank{r}: " + (out / f"rank{r}.log").read_text()[-3000:] for r in range(WORLD)
                         if (out / f"rank{r}.log").exists())
        raise RuntimeError(f"the 2-process run failed: {exc}\n{logs}") from exc
    return out, torch.load(out / "results.pt", weights_only=False)


# ---- the tests ----------------------------------------------------------------------------------
def _assert_states(got: dict, want: dict, **tol):
    assert set(got) == set(want) and got
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


def test_conv1d_weights_stay_contiguous_for_fsdp():
    """The failure FSDP2 reported ("non-contiguous parameters ... stride (1, 96)")."""
    from transformers.pytorch_utils import Conv1D

    from tarp_fast import TARPLinear, unpatch_model

    model = _model("gpt2")
    assert all(p.is_contiguous() for p in model.parameters())
    conv = Conv1D(6, 4)
    layer = TARPLinear.from_module(conv, rank=2)
    assert layer.weight is conv.weight and layer.linear_weight.shape == (6, 4)
    assert dict(layer.state_dict())["weight"].shape == (4, 6)
    unpatch_model(model)
    assert all(type(m).__name__ != "TARPLinear" for m in model.modules())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_two_processes_equal_one(two_ranks, family):
    _, res = two_ranks
    model = _model(family)
    ids = _data()
    _train(model, ids, TASKS)
    _assert_states(res[f"{family}_state"], _trainable(model.state_dict(), model), rtol=1e-4, atol=1e-5)


def test_two_processes_equal_one_with_tams_cells(two_ranks):
    _, res = two_ranks
    model = _tams_model()
    _train(model, _data(), TASKS, tams=True)
    want = _trainable(model.state_dict(), model)
    assert any(".tams_cell." in k for k in want) and any(k.startswith("tams_controller.") for k in want)
    _assert_states(res["tams_state"], want, rtol=1e-4, atol=1e-5)


def _update_error(got: dict, want: dict, before: dict) -> float:
    """``|Δgot - Δwant| / |Δwant|`` over every tensor: the relative error of the training's update."""
    num = sum(float((got[k] - want[k]).double().pow(2).sum()) for k in want)
    den = sum(float((want[k] - before[k]).double().pow(2).sum()) for k in want)
    return (num / den) ** 0.5


def test_mixed_precision_policy_with_fp32_factors(two_ranks):
    """FSDP2 bf16 compute with fp32 sharded factors and fp32 reductions agrees with the fp32 run
    within bf16 tolerance (SGD: the update is proportional to the gradient)."""
    _, res = two_ranks
    assert res["mixed_dtypes"] == ["torch.float32"]  # the sharded parameters (the factors) stay fp32
    model = _model("gpt2")
    _train(model, _data(), TASKS, sgd=True)
    want = _trainable(model.state_dict(), model)
    before = _trainable(_model("gpt2").state_dict(), model)
    err = _update_error(res["mixed_state"], want, before)
    print(f"FSDP2 bf16 relative update error {err:.4f}")
    assert err < 0.05


def test_cpu_bf16_autocast_with_fp32_factors_and_bf16_base():
    """bf16 autocast on CPU, a bf16 base and fp32 factors (tarp_linear runs in the autocast dtype
    and the factors' gradients arrive in fp32): the fp32 run's update within bf16 tolerance."""
    ids = _data()
    ref = _model("gpt2")
    before = _trainable(ref.state_dict(), ref)
    _train(ref, ids, TASKS, sgd=True)
    want = _trainable(ref.state_dict(), ref)

    model = _model("gpt2")
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)  # the frozen base in bf16, the factors stay fp32
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _train(model, ids, TASKS, sgd=True)
    got = _trainable(model.state_dict(), model)
    err = _update_error(got, want, before)
    print(f"autocast bf16 relative update error {err:.4f}")
    assert err < 0.05


def test_checkpoints_load_on_one_process(two_ranks):
    import safetensors.torch
    import torch.distributed.checkpoint as dcp

    out, res = two_ranks
    want = res["gpt2_state"]
    # gathered full state dict -> safetensors -> a plain model
    model = _model("gpt2")
    model.load_state_dict(safetensors.torch.load_file(str(out / "full.safetensors")))
    _assert_states(_trainable(model.state_dict(), model), want, rtol=0, atol=0)
    # sharded torch.distributed.checkpoint -> one process (no process group)
    fresh = _model("gpt2")
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(out / "dcp"))
    fresh.load_state_dict(state)
    _assert_states(_trainable(fresh.state_dict(), fresh), want, rtol=0, atol=0)


def test_prepare_fsdp_equals_one_process_and_its_checkpoint_loads(two_ranks):
    from tarp_fast.meta.checkpoint import Checkpointer
    from tarp_fast.meta.prepare import MetaLearner, prepare

    out, res = two_ranks
    cfg = _prep_config()
    model = _prep_model()
    run = prepare(model, _prep_sampler(cfg), cfg)
    want = dict(model.state_dict())
    for k, v in want.items():
        torch.testing.assert_close(res["prep_state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert res["prep_losses"] == pytest.approx(run["losses"], rel=1e-5)
    # the checkpoint rank 0 wrote holds full tensors: it loads into an unsharded learner
    step, tensors, meta = Checkpointer(str(out / "prep")).load()
    assert step == cfg.meta_steps
    fresh = _prep_model()
    MetaLearner(fresh, cfg).load_state_tensors(tensors, meta["learner"])
    for k, v in want.items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_prepare_fsdp_with_tams_equals_the_unsharded_distributed_run(two_ranks):
    _, res = two_ranks
    (losses, want), (fsdp_losses, got) = res["prep_tams"][False], res["prep_tams"][True]
    assert any("tams_cell" in k for k in want) and any(k.startswith("tams_controller.") for k in want)
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert fsdp_losses == pytest.approx(losses, rel=1e-5)
    before = dict(_prep_model(tams=True).state_dict())
    assert any(not torch.equal(before[k], v) for k, v in want.items() if ".tams_cell." in k)  # it trained


def test_prepare_fsdp_refuses_what_it_cannot_do():
    from tarp_fast.meta.prepare import prepare, shard_for_preparation

    cfg = _prep_config()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        shard_for_preparation(_prep_model())
    with pytest.raises(TypeError, match="'fsdp' must be a bool"):
        prepare(_prep_model(), _prep_sampler(cfg), cfg, fsdp="yes")


# ---- the README's FSDP2 script ----------------------------------------------------------------
def readme_script(name: str) -> tuple[str, str]:
    """``(script, bash block)``: the heredoc ``cat > NAME <<'PY'`` of the README's "Use" section."""
    import re

    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
                encoding="utf-8").read()
    use = text[text.index("\n## Use\n"):]
    use = use[:use.index("\n## ", 1)]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", use, flags=re.S) if f"cat > {name} <<'PY'" in b)
    return block.split(f"cat > {name} <<'PY'\n", 1)[1].split("\nPY\n", 1)[0] + "\n", block


def test_readme_fsdp_script_runs_under_torchrun(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    script, block = readme_script("fsdp.py")
    assert "torchrun --nnodes 2" in block and "--rdzv-endpoint HOST:29500" in block  # several machines
    (tmp_path / "fsdp.py").write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "fsdp.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    factors = load_file(str(tmp_path / "factors.safetensors"))
    # it loads on one process, into the same patched model
    from transformers import GPT2Config, GPT2LMHeadModel

    import tarp_fast

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, bos_token_id=0, eos_token_id=0)
    model = tarp_fast.patch_model(GPT2LMHeadModel(config), rank=4)
    missing, unexpected = model.load_state_dict(factors, strict=False)
    assert not unexpected and factors and all("tarp_" not in k for k in missing)
    assert any(float(v.abs().max()) > 0 for k, v in factors.items() if k.endswith("tarp_U"))  # trained
