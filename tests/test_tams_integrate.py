"""TAMS inside GPT-2, BART and Llama: per-task architectures in one batch, skipped sublayers not
computed, every parameter in the graph, save/load, embeddings, reports and errors."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from models import VOCAB, tiny_model

import tarp_fast
from tarp_fast import reference
from tarp_fast.tams import (
    NUM_EDGES,
    NUM_OPS,
    OPS,
    Architecture,
    add_tams,
    architecture_report,
    load_tams,
    remove_tams,
    save_tams,
    tams_record,
    task_embedding,
    task_embeddings,
    use_architecture,
)

FAMS = ("gpt2", "bart", "llama")
B, S = 6, 5
TASKS = torch.tensor([0, 1, 2, 2, 0, 1])


def _model(family, patched, seed=0):
    model = tiny_model(family, seed).double()
    if patched:
        tarp_fast.patch_model(model, rank=2)
        with torch.no_grad():  # a non-zero delta, so the TARP path matters
            for n, p in model.named_parameters():
                if n.endswith("tarp_U"):
                    p.normal_(0, 0.1)
    return model


def _ids(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, S), generator=g), torch.randint(3, VOCAB, (n, S), generator=g)


def _logits(model, ids, dec, family, **kw):
    if family == "bart":
        return model(input_ids=ids, decoder_input_ids=dec, use_cache=kw.get("use_cache", False)).logits
    return model(input_ids=ids, **kw).logits


def _arch(L, seed=0, T=3, cell=True):
    """T distinct architectures: task 0 keeps everything (z = 1), task 1 skips layer 0's attention
    and scales the rest, task 2 skips every FFN; random ops per task (task 2 all zero edges)."""
    g = torch.Generator().manual_seed(seed)
    ops = torch.randint(0, NUM_OPS, (T, NUM_EDGES), generator=g)
    if T > 2:
        ops[2] = OPS.index("zero")
    w = F.one_hot(ops, NUM_OPS).double().requires_grad_(True) if cell else None
    z = torch.ones(T, L, 2, dtype=torch.float64)
    if T > 1:
        z[1] = 0.3 + 0.6 * torch.rand(L, 2, generator=g, dtype=torch.float64)
        z[1, 0, 0] = 0.0
    if T > 2:
        z[2, :, 1] = 0.0
    return Architecture(w, z.requires_grad_(True))


def _with_tams(family, patched, cell=True, gates=True):
    model = _model(family, patched)
    add_tams(model, cell=cell, gates=gates, cell_width=8, cell_init="normal")
    return model


# ---- one batch of several tasks == each task alone -----------------------------------------------
@pytest.mark.parametrize("patched", [False, True], ids=["plain", "tarp"])
@pytest.mark.parametrize("family", FAMS)
def test_mixed_batch_equals_each_task_alone(family, patched):
    model = _with_tams(family, patched)
    L = len(tams_record(model).blocks)
    arch = _arch(L)
    ids, dec = _ids()
    probe = torch.randn(B, S, VOCAB, dtype=torch.float64)
    leaves = [arch.op_weights, arch.gates] + [p for p in model.parameters() if p.requires_grad]

    with use_architecture(model, arch, TASKS):
        mixed = _logits(model, ids, dec, family)
    g_mixed = torch.autograd.grad((mixed * probe).sum(), leaves, allow_unused=True)

    total = 0
    for t in range(3):
        rows = torch.nonzero(TASKS == t).squeeze(-1)
        with use_architecture(model, arch.select(t)):
            alone = _logits(model, ids[rows], dec[rows], family)
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-10, atol=1e-10)
        total = total + (alone * probe[rows]).sum()
    g_alone = torch.autograd.grad(total, leaves, allow_unused=True)
    for a, b in zip(g_mixed, g_alone):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert float(g_mixed[0].abs().sum()) > 0 and float(g_mixed[1].abs().sum()) > 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mixed_batch_with_multi_task_tarp_factors(family):
    """Per-task TARP factors (num_tasks=3, routed by tarp_context) and per-task architectures in
    one batch: the compacted FFN call must route the kept sequences' own factors."""
    model = tiny_model(family).double()
    tarp_fast.patch_model(model, rank=2, num_tasks=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("tarp_U"):
                p.normal_(0, 0.1)  # different per task
    add_tams(model, cell_width=8, cell_init="normal")
    arch = _arch(len(tams_record(model).blocks))
    ids, dec = _ids()
    with tarp_fast.tarp_context(task_index=TASKS), use_architecture(model, arch, TASKS):
        mixed = _logits(model, ids, dec, family)
    for t in range(3):
        rows = torch.nonzero(TASKS == t).squeeze(-1)
        with tarp_fast.tarp_context(task_index=TASKS[rows]), use_architecture(model, arch.select(t)):
            alone = _logits(model, ids[rows], dec[rows], family)
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-10, atol=1e-10)


# ---- TAMS == an independent dense reference (hooks: z · sublayer, dense cell mixture) --------------
def _reference_hooks(model, arch, task_index):
    """Forward hooks computing every sublayer and every candidate op (no skipping)."""
    record = tams_record(model)
    z = arch.gates[task_index] if arch.gates is not None else None  # [B, L, 2]
    w = arch.op_weights[task_index] if arch.op_weights is not None else None  # [B, 9, 6]
    handles, stash = [], {}

    def scale(t, layer, sub):
        return t * z[:, layer, sub].view(-1, 1, 1)

    for spec in record.blocks:
        i = spec.index
        attn = spec.block.get_submodule(spec.attention.module)
        if z is not None:
            handles.append(attn.register_forward_hook(lambda m, a, out, i=i: (scale(out[0], i, 0),) + tuple(out[1:])))
        entry = spec.block.get_submodule(spec.ffn.entry[0])
        exit_ = spec.block.get_submodule(spec.ffn.exit)
        handles.append(entry.register_forward_pre_hook(lambda m, a, i=i: stash.__setitem__(i, a[0])))

        def ffn_hook(m, a, out, i=i):
            if w is not None:
                out = record.cells[i].forward_dense(stash[i], out, w)
            return scale(out, i, 1) if z is not None else out

        handles.append(exit_.register_forward_hook(ffn_hook))
    return handles


@pytest.mark.parametrize("cell,gates", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("patched", [False, True], ids=["plain", "tarp"])
@pytest.mark.parametrize("family", FAMS)
def test_matches_dense_reference(family, patched, cell, gates):
    model = _with_tams(family, patched, cell=cell, gates=gates)
    L = len(tams_record(model).blocks)
    arch = _arch(L, seed=3, cell=cell)
    if not gates:
        arch = Architecture(arch.op_weights, None)
    ids, dec = _ids()
    with use_architecture(model, arch, TASKS):
        got = _logits(model, ids, dec, family)
    handles = _reference_hooks(model, arch, TASKS)
    try:
        ref = _logits(model, ids, dec, family)  # outside use_architecture: the base path + hooks
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["bart", "gpt2"])
def test_with_kv_cache_the_skip_happens_in_the_linears(family):
    """With a cache the sublayer call is not skipped (the cache must grow); the result is the same."""
    model = _with_tams(family, True, cell=False)
    arch = _arch(len(tams_record(model).blocks), cell=False)
    ids, dec = _ids()
    with use_architecture(model, arch, TASKS):
        a = _logits(model, ids, dec, family, use_cache=True)
        b = _logits(model, ids, dec, family, use_cache=False)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- what is computed ---------------------------------------------------------------------------
def test_skipped_rows_and_sublayers_are_not_computed(monkeypatch):
    model = _with_tams("gpt2", True, cell=False)
    names = {}
    for n, m in model.named_modules():
        if isinstance(m, tarp_fast.TARPLinear):
            m.backend = "reference"  # the backend we can watch
            names[m.weight.data_ptr()] = n  # a Conv1D layer passes its weight as a transposed view
    rows = {}
    real = reference._activated

    def spy(spec, x, weight, *a, **k):
        rows.setdefault(names[weight.data_ptr()], []).append(x.shape[0])
        return real(spec, x, weight, *a, **k)

    monkeypatch.setattr(reference, "_activated", spy)
    z = torch.ones(2, 2, 2, dtype=torch.float64)
    z[1, 0, 1] = 0.0  # task 1: no FFN in layer 0
    z[:, 1, 0] = 0.0  # nobody: attention of layer 1
    arch = Architecture(None, z)
    ti = torch.tensor([0, 1, 0, 1])
    ids, _ = _ids(4)
    with use_architecture(model, arch, ti):
        model(ids)
    full, half = 4 * S, 2 * S
    assert rows["transformer.h.0.attn.c_attn"] == [full] and rows["transformer.h.0.attn.c_proj"] == [full]
    assert rows["transformer.h.0.mlp.c_fc"] == [half] and rows["transformer.h.0.mlp.c_proj"] == [half]
    assert "transformer.h.1.attn.c_attn" not in rows and "transformer.h.1.attn.c_proj" not in rows
    assert rows["transformer.h.1.mlp.c_fc"] == [full]


@pytest.mark.parametrize("family", FAMS)
def test_every_parameter_stays_in_the_graph(family):
    """DDP without find_unused_parameters: every trainable parameter gets a gradient tensor."""
    model = _with_tams(family, True)
    model.train()
    L = len(tams_record(model).blocks)
    ctrl = model.tams_controller
    emb = torch.randn(2, ctrl.embed_dim, dtype=torch.float64)
    cl, gl = ctrl.logits(emb)
    ops = torch.full((2, NUM_EDGES), OPS.index("zero"))
    ops[1, 0] = OPS.index("linear")
    w = F.one_hot(ops, NUM_OPS).double() + (torch.softmax(cl, -1) - torch.softmax(cl, -1).detach())
    z = torch.ones(2, L, 2, dtype=torch.float64)
    z[:, 0, :] = 0.0  # layer 0 skipped entirely for everyone
    z = z + (gl - gl.detach())
    ids, dec = _ids(2)
    with use_architecture(model, Architecture(w, z), torch.tensor([0, 1])):
        _logits(model, ids, dec, family).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("family", FAMS)
def test_deepcopy_runs_its_own_weights(family):
    """A deep copy of a TAMS model (the benchmark copies its starting points) computes with its
    own cells and linears, and its gradients land on its own parameters; the original is intact."""
    model = _with_tams(family, True)
    L = len(tams_record(model).blocks)
    arch, ti = _arch(L), TASKS
    ids, dec = _ids()
    with torch.no_grad(), use_architecture(model, arch, ti):
        want = _logits(model, ids, dec, family)
    clone = copy.deepcopy(model)
    with torch.no_grad(), use_architecture(clone, arch, ti):
        torch.testing.assert_close(_logits(clone, ids, dec, family), want, rtol=0, atol=0)
    with torch.no_grad():  # change the copy's cells and FFN exits: only the copy's output moves
        for n, p in clone.named_parameters():
            if "tams_cell" in n or n.endswith(("c_proj.weight", "fc2.weight", "down_proj.weight")):
                p.mul_(1.5)
    with use_architecture(clone, arch, ti):
        got = _logits(clone, ids, dec, family)
    assert not torch.allclose(got, want)
    got.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for n, p in clone.named_parameters() if "tams_cell" in n)
    with torch.no_grad(), use_architecture(model, arch, ti):
        torch.testing.assert_close(_logits(model, ids, dec, family), want, rtol=0, atol=0)
    remove_tams(clone)  # the copy's wiring is its own: removing it leaves the original's in place
    with torch.no_grad(), use_architecture(model, arch, ti):
        torch.testing.assert_close(_logits(model, ids, dec, family), want, rtol=0, atol=0)


def test_ddp_without_find_unused_parameters(tmp_path):
    """Real DDP (gloo, one process) with ``find_unused_parameters=False``: with a whole layer and
    every cell edge skipped, a parameter left out of the graph makes DDP's reducer raise on the
    next iteration; three iterations pass."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = _with_tams("gpt2", True).float()
        L = len(tams_record(model).blocks)
        ctrl = model.tams_controller
        emb = torch.randn(1, ctrl.embed_dim)
        ops = torch.full((1, NUM_EDGES), OPS.index("zero"))
        z_hard = torch.ones(1, L, 2)
        z_hard[0, 0, :] = 0.0  # layer 0: attention and FFN skipped by the whole batch (modules not called)
        ddp = DDP(model, find_unused_parameters=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
        ids, _ = _ids(2)
        for _ in range(3):
            opt.zero_grad()
            cl, gl = ctrl.logits(emb)  # straight-through: hard values, the controller's gradient
            w = F.one_hot(ops, NUM_OPS).float() + (torch.softmax(cl, -1) - torch.softmax(cl, -1).detach())
            z = z_hard + (gl.sigmoid() - gl.sigmoid().detach())
            with use_architecture(model, Architecture(w, z), torch.tensor([0, 0])):
                loss = ddp(input_ids=ids).logits.float().pow(2).mean()
            loss.backward()
            opt.step()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", FAMS)
def test_fresh_tams_leaves_the_model_unchanged(family):
    base = _model(family, True)
    model = copy.deepcopy(base)
    ctrl = add_tams(model)  # zero-init cells, gates start kept
    ids, dec = _ids()
    want = _logits(base, ids, dec, family)
    torch.testing.assert_close(_logits(model, ids, dec, family), want, rtol=0, atol=0)
    emb = task_embeddings(model, [ids[:3], ids[3:]])
    with use_architecture(model, ctrl.deploy(emb), torch.tensor([0, 0, 0, 1, 1, 1])):
        torch.testing.assert_close(_logits(model, ids, dec, family), want, rtol=1e-12, atol=1e-12)
    keys = set(model.state_dict())
    assert any(".tams_cell." in k for k in keys) and any(k.startswith("tams_controller.") for k in keys)
    n_tams = sum(p.numel() for n, p in model.named_parameters() if "tams_" in n)
    assert n_tams == sum(p.numel() for p in tarp_fast.tarp_parameters(model)) - sum(
        p.numel() for p in tarp_fast.tarp_parameters(base))
    remove_tams(model)
    assert set(model.state_dict()) == set(base.state_dict())
    assert all("forward" not in m.__dict__ for m in model.modules())
    torch.testing.assert_close(_logits(model, ids, dec, family), want, rtol=0, atol=0)


# ---- save / load ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_save_load_round_trip(family, tmp_path):
    model = _model(family, True)
    ctrl = add_tams(model, cell_width=8, estimator="argmax", hidden_stats=True)
    with torch.no_grad():
        for p in tarp_fast.tarp_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    ids, dec = _ids()
    emb = task_embeddings(model, [ids[:3], ids[3:]], hidden_stats=True)
    arch = ctrl.deploy(emb)
    ti = torch.tensor([0, 0, 0, 1, 1, 1])
    with use_architecture(model, arch, ti):
        want = _logits(model, ids, dec, family)
    save_tams(model, str(tmp_path), architectures=arch)

    fresh = _model(family, False)  # unpatched: load_tams patches it as saved
    ctrl2 = load_tams(fresh, str(tmp_path))
    assert ctrl2 is fresh.tams_controller and ctrl2.estimator == "argmax" and ctrl2.embed_dim == 3 * 32
    a, b = dict(tarp_fast.patch.tarp_named_parameters(model)), dict(tarp_fast.patch.tarp_named_parameters(fresh))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    arch2 = ctrl2.deploy(task_embeddings(fresh, [ids[:3], ids[3:]], hidden_stats=True))
    assert torch.equal(arch2.ops, arch.ops) and torch.equal(arch2.gates, arch.gates)
    with use_architecture(fresh, arch2, ti):
        torch.testing.assert_close(_logits(fresh, ids, dec, family), want, rtol=0, atol=0)

    # loading into a model whose TAMS differs is refused; a plain adapter has no TAMS settings
    other = _model(family, True)
    add_tams(other, cell_width=16)
    with pytest.raises(ValueError, match="differs from the saved one"):
        load_tams(other, str(tmp_path))
    plain = _model(family, True)
    tarp_fast.save_adapter(plain, str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no TAMS settings"):
        load_tams(_model(family, True), str(tmp_path / "plain"))


# ---- task embeddings ------------------------------------------------------------------------------
def test_task_embedding_decoder_only():
    model = _model("gpt2", False)
    model.train()
    ids, _ = _ids()
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    e = task_embedding(model, ids, mask, batch_size=4)
    tok = model.get_input_embeddings()(ids)
    want = (tok * mask.unsqueeze(-1)).sum((0, 1)) / mask.sum()
    torch.testing.assert_close(e, want.detach())
    assert not e.requires_grad and model.training  # mode restored
    torch.testing.assert_close(task_embedding(model, {"input_ids": ids, "attention_mask": mask}, batch_size=1), e)
    e3 = task_embedding(model, ids, mask, hidden_stats=True, batch_size=4)
    assert e3.shape == (96,)
    model.eval()
    hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    h = hs[len(hs) // 2]
    m = mask.unsqueeze(-1).double()
    mean = (h * m).sum((0, 1)) / m.sum()
    std = (((h - mean) ** 2) * m).sum((0, 1)).div(m.sum()).sqrt()
    torch.testing.assert_close(e3, torch.cat([want, mean, std]).detach(), rtol=1e-9, atol=1e-10)


def test_task_embedding_encoder_decoder_and_inside_an_architecture():
    model = _with_tams("bart", True)
    ids, _ = _ids()
    e = task_embedding(model, ids)
    want = model.get_encoder()(input_ids=ids).last_hidden_state.mean((0, 1))
    torch.testing.assert_close(e, want.detach())
    with use_architecture(model, _arch(2), TASKS):  # the embedding always reads the base model
        torch.testing.assert_close(task_embedding(model, ids), e, rtol=0, atol=0)
    assert task_embeddings(model, [ids, ids[:2]]).shape == (2, 32)


# ---- reports --------------------------------------------------------------------------------------
def test_architecture_report_and_diversity_log(caplog):
    arch = _arch(2)
    with caplog.at_level(logging.INFO, logger="tarp_fast.tams"):
        rep = architecture_report(arch)
    assert len(rep["tasks"]) == 3 and rep["tasks"][2]["edges"] == ["zero"] * 9
    assert rep["tasks"][1]["kept"] == {"attention": [False, True], "ffn": [True, True]}
    assert rep["tasks"][2]["kept"]["ffn"] == [False, False]
    div = rep["diversity"]
    assert div["distinct"] == 3 and 0 < div["edge_disagreement"] <= 1 and 0 < div["gate_disagreement"] <= 1
    assert sum(div["op_counts"].values()) == 27
    assert "TAMS diversity over 3 tasks" in caplog.text
    same = architecture_report(arch.select([0, 0]), log=False)["diversity"]
    assert same["distinct"] == 1 and same["edge_disagreement"] == 0 and same["gate_disagreement"] == 0


# ---- errors ---------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="GPT-2, BART or Llama"):
        add_tams(tiny_model("roberta"))
    with pytest.raises(TypeError, match="'model' must be an nn.Module"):
        add_tams("gpt2")
    model = _model("gpt2", False)
    with pytest.raises(RuntimeError, match="add_tams"):
        with use_architecture(model, _arch(2), TASKS):
            pass
    with pytest.raises(ValueError, match="both False"):
        add_tams(model, cell=False, gates=False)
    with pytest.raises(TypeError, match="'cell' must be a bool"):
        add_tams(model, cell=1)
    add_tams(model)
    with pytest.raises(RuntimeError, match="already has TAMS"):
        add_tams(model)
    arch = _arch(2)
    for bad, exc, msg in [
        (torch.tensor([0, 1, 3]), ValueError, r"in \[0, 3\)"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
        (torch.tensor([0.0, 1.0]), TypeError, "int64"),
        (None, ValueError, "'task_index' \\[batch\\] is required"),
    ]:
        with pytest.raises(exc, match=msg):
            with use_architecture(model, arch, bad):
                pass
    with pytest.raises(ValueError, match=r"\[T, 2, 2\]"):
        with use_architecture(model, _arch(3), TASKS):
            pass
    with pytest.raises(TypeError, match="'arch' must be an Architecture"):
        with use_architecture(model, {"ops": 1}):
            pass
    with pytest.raises(ValueError, match="no op_weights"):
        with use_architecture(model, Architecture(None, arch.gates)):
            pass
    ids, _ = _ids(4)
    with pytest.raises(RuntimeError, match="batch of 4"):
        with use_architecture(model, arch, TASKS):
            model(ids)
    with pytest.raises(ValueError, match="'support' is empty"):
        task_embedding(model, ids[:0])
    with pytest.raises(TypeError, match="integer token ids"):
        task_embedding(model, ids.double())
    with pytest.raises(ValueError, match="no unmasked token"):
        task_embedding(model, ids, torch.zeros_like(ids))
    # gradient checkpointing is no longer refused: tests/test_checkpointing.py checks it gives the same gradients
    # patching after add_tams would silently bypass the gates: refused
    tarp_fast.patch_model(model, rank=2)
    with pytest.raises(RuntimeError, match="replaced after add_tams"):
        with use_architecture(model, arch, TASKS):
            pass
    remove_tams(model)
    with pytest.raises(RuntimeError, match="has no TAMS"):
        remove_tams(model)
