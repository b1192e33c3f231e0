"""tarp_fast.meta: MAML-family preparation with batched tasks, checkpoints, NaN detection."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from models import patched_small_gpt2

import tarp_fast
from tarp_fast.data import TaskSampler, markov_corpus
from tarp_fast.meta import NonFiniteLossError, sequence_losses, small_gpt2
from tarp_fast.meta.checkpoint import Checkpointer
from tarp_fast.meta.prepare import MetaLearner, PrepConfig, fast_parameter_names, prepare, stacked_tasks

L = 16


def _model(dtype=torch.float32, seed=0):
    return patched_small_gpt2(seed, dtype=dtype)


@pytest.fixture(scope="module")
def corpus():
    return markov_corpus(4, num_tokens=3000, num_symbols=6)


def _cfg(**kw):
    base = dict(meta_steps=2, tasks_per_batch=3, inner_steps=2, inner_lr=0.05, inner_optimizer="sgd", batch_size=2,
                query_batch_size=2, seq_len=L, outer_lr=1e-3)
    base.update(kw)
    return PrepConfig(**base)


def _sampler(corpus, cfg, seed=0):
    return TaskSampler(corpus, tasks_per_batch=cfg.tasks_per_batch, inner_steps=max(cfg.inner_steps, 1),
                       batch_size=cfg.batch_size, query_batch_size=cfg.query_batch_size, seq_len=cfg.seq_len, seed=seed)


def _grads(model, cfg, batch):
    """The meta-gradient of one meta-batch (before the outer step), by parameter name."""
    learner = MetaLearner(model, cfg)
    for p in learner.outer_params:
        p.grad = torch.zeros_like(p)
    if cfg.algorithm == "maml":
        from tarp_fast.meta.prepare import reference_backend

        with reference_backend(model):
            learner._meta_grad(batch, len(batch.domains))
    else:
        learner._meta_grad(batch, len(batch.domains))
    return {n: p.grad.clone() for n, p in model.named_parameters()}, learner


def test_fast_parameters_are_the_tarp_factors():
    m = _model()
    names = fast_parameter_names(m)
    assert names and all(n.rsplit(".", 1)[-1].startswith("tarp_") for n in names)
    with pytest.raises(ValueError, match="patch_model"):
        fast_parameter_names(small_gpt2(256, n_embd=16, n_layer=1, n_head=2))


@pytest.mark.parametrize("algorithm,inner_opt", [("fomaml", "sgd"), ("fomaml", "adam"), ("reptile", "sgd"),
                                                  ("maml", "sgd")])
def test_batched_tasks_equal_sequential_loop(corpus, algorithm, inner_opt):
    cfg_b = _cfg(algorithm=algorithm, inner_optimizer=inner_opt, batched=True)
    cfg_s = _cfg(algorithm=algorithm, inner_optimizer=inner_opt, batched=False)
    batch = _sampler(corpus, cfg_b).batch_at(0)
    m = _model()
    g_b, _ = _grads(copy.deepcopy(m), cfg_b, batch)
    # sequential: one task at a time (T = 1 per call), the plain single-task layers
    ms = copy.deepcopy(m)
    learner = MetaLearner(ms, cfg_s)
    for p in learner.outer_params:
        p.grad = torch.zeros_like(p)
    ctx = tarp_fast.meta.prepare.reference_backend(ms) if algorithm == "maml" else _null()
    with ctx:
        for t in range(3):
            learner._meta_grad(batch.select([t]), 3)
    for n, p in ms.named_parameters():
        torch.testing.assert_close(g_b[n], p.grad, rtol=2e-4, atol=2e-6, msg=n)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_fomaml_gradient_matches_manual_computation(corpus):
    """One task, one SGD inner step: ∇_φ = ∇_{φ'} L_q(φ'), φ' = φ − α ∇_φ L_s(φ)."""
    cfg = _cfg(tasks_per_batch=1, inner_steps=1, algorithm="fomaml")
    batch = _sampler(corpus, cfg).batch_at(3)
    m = _model()
    g, _ = _grads(copy.deepcopy(m), cfg, batch)
    names = fast_parameter_names(m)
    params = dict(m.named_parameters())
    fast = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    ls = sequence_losses(m, batch.support[0, 0], params=fast).mean()
    gs = torch.autograd.grad(ls, list(fast.values()))
    adapted = {n: (fast[n] - cfg.inner_lr * gi).detach().requires_grad_(True) for n, gi in zip(names, gs)}
    lq = sequence_losses(m, batch.query[0], params=adapted).mean()
    gq = torch.autograd.grad(lq, list(adapted.values()))
    for n, gi in zip(names, gq):
        torch.testing.assert_close(g[n], gi, rtol=1e-4, atol=1e-7)


def test_second_order_maml_matches_finite_differences(corpus):
    """Exact MAML: the meta-gradient along a random direction equals a central difference (float64)."""
    cfg = _cfg(tasks_per_batch=2, inner_steps=2, algorithm="maml", inner_lr=0.5)
    batch = _sampler(corpus, cfg).batch_at(1)
    m = _model(torch.float64)
    g, _ = _grads(copy.deepcopy(m), cfg, batch)
    names = fast_parameter_names(m)
    torch.manual_seed(0)
    direction = {n: torch.randn_like(p) for n, p in m.named_parameters() if n in names}

    def meta_loss(eps):
        mm = copy.deepcopy(m)
        with torch.no_grad():
            for n, p in mm.named_parameters():
                if n in direction:
                    p.add_(eps * direction[n])
        learner = MetaLearner(mm, cfg)
        with tarp_fast.meta.prepare.reference_backend(mm), torch.enable_grad():
            fast, _, _ = learner._adapt(batch.support, lambda ti: _null())
            return float(learner._task_losses(fast, batch.query, 2, lambda ti: _null()).detach().sum() / 2)

    eps = 1e-5
    fd = (meta_loss(eps) - meta_loss(-eps)) / (2 * eps)
    analytic = sum(float((g[n] * direction[n]).sum()) for n in direction)
    assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-8)
    # and it is not the first-order gradient
    g_fo, _ = _grads(copy.deepcopy(m), _cfg(tasks_per_batch=2, inner_steps=2, algorithm="fomaml", inner_lr=0.5), batch)
    fo = sum(float((g_fo[n] * direction[n]).sum()) for n in direction)
    assert abs(fo - fd) > 1e-6


def test_reptile_moves_init_toward_adapted_factors(corpus):
    cfg = _cfg(algorithm="reptile", tasks_per_batch=2, inner_steps=2)
    batch = _sampler(corpus, cfg).batch_at(0)
    m = _model()
    g, learner = _grads(copy.deepcopy(m), cfg, batch)
    fast, _, _ = learner._adapt(batch.support, lambda ti: _null())
    params = dict(m.named_parameters())
    for n in fast_parameter_names(m):
        expect = (params[n].detach().unsqueeze(0) - fast[n].detach()).sum(0) / 2
        torch.testing.assert_close(g[n], expect, rtol=1e-4, atol=1e-7)


def test_learned_inner_lr_gradient_matches_finite_differences(corpus):
    """FO with one SGD step: φ' = φ − α g (g fixed), so dL/dlog α is exact; compare to a difference."""
    cfg = _cfg(tasks_per_batch=2, inner_steps=1, learn_inner_lr=True, inner_lr=0.3)
    batch = _sampler(corpus, cfg).batch_at(2)
    m = _model(torch.float64)
    _, learner = _grads(m, cfg, batch)
    key = next(iter(learner.log_lr))
    analytic = float(learner.log_lr[key].grad)

    def loss_at(delta):
        with torch.no_grad():
            learner.log_lr[key].add_(delta)
        fast, _, _ = learner._adapt(batch.support, lambda ti: _null())
        out = float(learner._task_losses(fast, batch.query, 2, lambda ti: _null()).detach().sum() / 2)
        with torch.no_grad():
            learner.log_lr[key].sub_(delta)
        return out

    eps = 1e-5
    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_prepare_lowers_query_loss_and_changes_base_and_init(corpus):
    cfg = _cfg(meta_steps=6, inner_optimizer="adam", inner_lr=1e-2, outer_lr=3e-3)
    m = _model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    res = prepare(m, _sampler(corpus, cfg), cfg)
    assert res["steps"] == 6 and len(res["losses"]) == 6
    assert res["losses"][-1] < res["losses"][0]
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert any("tarp_" in n for n in changed) and any("tarp_" not in n for n in changed)
    # the layers are single-task again after the batched steps
    assert all(layer.num_tasks == 1 for layer in tarp_fast.patch.tarp_layers(m).values())


def test_stacked_tasks_restores_and_rejects_multitask_layers():
    m = _model()
    with stacked_tasks(m, 4):
        assert all(layer.num_tasks == 4 for layer in tarp_fast.patch.tarp_layers(m).values())
    assert all(layer.num_tasks == 1 for layer in tarp_fast.patch.tarp_layers(m).values())
    m2 = small_gpt2(256, n_embd=16, n_layer=1, n_head=2)
    tarp_fast.patch_model(m2, rank=2, num_tasks=2)
    with pytest.raises(ValueError, match="single-task"):
        with stacked_tasks(m2, 4):
            pass


def test_resume_after_interruption_is_bitwise_identical(corpus, tmp_path):
    cfg = _cfg(meta_steps=4, checkpoint_every=1, inner_optimizer="adam", learn_inner_lr=True)
    full = _model()
    res_full = prepare(full, _sampler(corpus, cfg), cfg, checkpoint_dir=str(tmp_path / "a"))
    part = _model()
    prepare(part, _sampler(corpus, cfg), cfg, checkpoint_dir=str(tmp_path / "b"), stop_after=2)
    resumed = _model()  # a fresh process would start from scratch and load the checkpoint
    log = tmp_path / "log.jsonl"
    res = prepare(resumed, _sampler(corpus, cfg), cfg, checkpoint_dir=str(tmp_path / "b"), log_path=str(log))
    assert res["losses"] == res_full["losses"]
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert len(log.read_text().splitlines()) == 4
    assert sorted(Checkpointer(str(tmp_path / "b")).steps()) == [3, 4]  # keep=2


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    ck = Checkpointer(str(tmp_path))
    ck.save(1, {"w": torch.ones(3)}, {"note": "one"})
    import tarp_fast.meta.checkpoint as mod

    def torn_write(tensors, path, *a, **k):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(mod, "save_file", torn_write)
    with pytest.raises(OSError, match="simulated"):
        ck.save(2, {"w": torch.zeros(3)}, {"note": "two"})
    step, tensors, meta = Checkpointer(str(tmp_path)).load()
    assert step == 1 and torch.equal(tensors["w"], torch.ones(3)) and meta["note"] == "one"
    # a checkpoint whose tensors do not match the recorded hash is refused
    monkeypatch.undo()
    ck.save(3, {"w": torch.zeros(3)}, {})
    with open(tmp_path / "ckpt-00000003.safetensors", "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x01")
    with pytest.raises(ValueError, match="sha256"):
        ck.load()


def test_nan_loss_is_detected(corpus):
    cfg = _cfg()
    m = _model()
    with torch.no_grad():
        m.transformer.wte.weight[:] = math.nan
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        prepare(m, _sampler(corpus, cfg), cfg)


def test_config_validation():
    with pytest.raises(ValueError, match="'algorithm'"):
        PrepConfig(algorithm="sgd")
    with pytest.raises(ValueError, match="'inner_optimizer'"):
        PrepConfig(inner_optimizer="lbfgs")
    with pytest.raises(ValueError, match="'tasks_per_batch'"):
        PrepConfig(tasks_per_batch=0)
    with pytest.raises(ValueError, match="'inner_lr'"):
        PrepConfig(inner_lr=-1.0)
    with pytest.raises(ValueError, match="reptile"):
        PrepConfig(algorithm="reptile", inner_steps=0)


def test_tams_preparation_runs_batched(corpus):
    pytest.importorskip("tarp_fast.tams")
    from tarp_fast.tams import add_tams

    cfg = _cfg(meta_steps=2, tasks_per_batch=2, inner_steps=1)
    m = _model()
    add_tams(m, cell=True, gates=False, cell_width=8)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if "tams_" in n}
    res = prepare(m, _sampler(corpus, cfg), cfg, tams=True)
    assert len(res["losses"]) == 2 and all(math.isfinite(x) for x in res["losses"])
    assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters() if n in before)


def test_tams_cells_are_fast_and_batched_equals_sequential(corpus):
    """With TAMS the searched cells are adapted per task in the inner loop, stacked [T, ...] in
    one batched call: the meta-gradient equals the one-task-at-a-time loop (deterministic
    architectures: the straight-through argmax estimator)."""
    pytest.importorskip("tarp_fast.tams")
    from tarp_fast.tams import add_tams

    m = _model(torch.float64)
    add_tams(m, cell=True, gates=False, cell_width=8, cell_init="normal", estimator="argmax")
    m = m.double()
    names = fast_parameter_names(m, cells=True)
    assert any(".tams_cell." in n for n in names) and not any("controller" in n for n in names)
    assert not any(".tams_cell." in n for n in fast_parameter_names(m))
    cfg = _cfg(inner_steps=2, inner_optimizer="adam")
    batch = _sampler(corpus, cfg).batch_at(1)
    mb = copy.deepcopy(m)
    lb = MetaLearner(mb, PrepConfig(**{**cfg.to_dict(), "batched": True}), tams=True)
    assert lb.fast_names == names
    for p in lb.outer_params:
        p.grad = torch.zeros_like(p)
    lb._meta_grad(batch, 3)
    ms = copy.deepcopy(m)
    ls = MetaLearner(ms, PrepConfig(**{**cfg.to_dict(), "batched": False}), tams=True)
    for p in ls.outer_params:
        p.grad = torch.zeros_like(p)
    for t in range(3):
        ls._meta_grad(batch.select([t]), 3)
    gb, gs = dict(mb.named_parameters()), dict(ms.named_parameters())
    for n in gb:
        torch.testing.assert_close(gb[n].grad, gs[n].grad, rtol=1e-8, atol=1e-11, msg=n)
    cell_grads = [gb[n].grad for n in names if ".tams_cell." in n]
    assert any(bool(g.abs().sum() > 0) for g in cell_grads)  # the cells' query gradients arrive


@pytest.mark.parametrize("scope", ["adapter", "all"])
def test_finetune_scope_of_the_adapter_arms(corpus, scope):
    """'all' trains the base too (adapter and base at their own learning rates); 'adapter' only the factors."""
    from tarp_fast.meta.bench import BenchConfig
    from tarp_fast.meta.finetune import FinetuneRecipe, finetune

    with pytest.raises(ValueError, match="'finetune_scope' must be 'adapter' or 'all'"):
        BenchConfig(finetune_scope="most", prep=_cfg(), finetune=FinetuneRecipe(steps=1, seq_len=L))
    model = _model()
    adapter = tarp_fast.tarp_parameters(model)
    ids = {id(p) for p in adapter}
    base = [p for p in model.parameters() if id(p) not in ids]
    params = adapter if scope == "adapter" else [{"params": adapter, "lr": 1e-2}, {"params": base, "lr": 1e-3}]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = corpus[corpus.names[0]].tokens
    recipe = FinetuneRecipe(steps=2, batch_size=2, seq_len=L, eval_windows=2)
    curve = finetune(model, params, tokens[:2000], tokens[2000:], recipe, seed=0)
    assert len(curve) >= 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.endswith("tarp_U") for n in changed)
    base_changed = {n for n in changed if "tarp_" not in n}
    assert bool(base_changed) == (scope == "all")


@pytest.mark.parametrize("ops", [
    ["conv3", "conv3", "conv5", "conv5", "conv3", "conv3", "conv5", "skip", "conv3"],  # the demo's
    ["zero", "zero", "zero", "zero", "linear", "zero", "zero", "zero", "zero"],  # reads node 2 only: 0
    ["zero", "glu", "zero", "zero", "linear", "zero", "zero", "zero", "zero"],  # input 1 only
    ["zero"] * 9,
])
def test_active_cell_parameters_count_what_the_cell_runs(ops):
    """The benchmark's capacity report equals the parameters that get a non-zero gradient."""
    pytest.importorskip("tarp_fast.tams")
    import torch.nn.functional as F

    from tarp_fast.meta.bench import _active_cell_parameters
    from tarp_fast.tams import NUM_OPS, OPS, Architecture, add_tams, use_architecture

    m = _model()
    torch.manual_seed(0)
    add_tams(m, cell=True, gates=False, cell_width=8, cell_init="normal")
    # Positive biases keep every ReLU of the cell alive: with random biases a whole node could be
    # dead for all 32 tokens (all 8 channels negative; about 1 init in 130 here), its parameters
    # would get an exact-zero gradient and the test would fail by chance, not by a wrong count.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".tams_cell." in n and n.endswith(".bias"):
                p.fill_(0.5)
    op_idx = torch.tensor([[OPS.index(o) for o in ops]])
    arch = Architecture(F.one_hot(op_idx, NUM_OPS).float(), None)
    ids = torch.randint(0, 256, (2, L), generator=torch.Generator().manual_seed(0))
    with use_architecture(m, arch, torch.tensor([0, 0])):
        sequence_losses(m, ids).sum().backward()
    used = sum(p.numel() for n, p in m.named_parameters() if ".tams_cell." in n and bool(p.grad.abs().sum() > 0))
    # the output bias is always added (it is `o` in f + O·mean + o), so it counts only with a live cell
    expected = _active_cell_parameters(m, arch)
    bias_only = sum(p.numel() for n, p in m.named_parameters() if n.endswith("tams_cell.out_proj.bias"))
    assert used == (expected if expected else bias_only)
