"""The searched cell: every op's shape and causality, sparse == dense mixture, only chosen ops run."""

import pytest
import torch
import torch.nn.functional as F

from tarp_fast.tams import EDGES, NUM_EDGES, NUM_OPS, OPS, SearchedCell, make_plan
from tarp_fast.tams.cell import EdgeOps, cell_flops_per_token

B, S, D, C = 3, 7, 12, 8


def _cell(causal, seed=0):
    torch.manual_seed(seed)
    return SearchedCell(D, C, causal=causal, init="normal").double()


def _inputs(seed=1, b=B):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, S, D, generator=g, dtype=torch.float64),
            torch.randn(b, S, D, generator=g, dtype=torch.float64))


def _sparse(cell, x, f, ops_seq, w_full=None):
    """Run the sparse path from per-sequence op indices ``[B, 9]`` (weights one-hot, or w_full)."""
    ops_seq = torch.as_tensor(ops_seq)
    if w_full is None:
        w_full = F.one_hot(ops_seq, NUM_OPS).double()
    w = w_full.gather(-1, ops_seq.unsqueeze(-1)).squeeze(-1)
    return cell(x, f, w, make_plan(ops_seq.tolist()))


def test_topology():
    assert len(EDGES) == NUM_EDGES == 9 and NUM_OPS == 6
    assert OPS == ("linear", "conv3", "conv5", "glu", "zero", "skip")
    # every intermediate node reads every earlier node once
    assert [sum(1 for _, t in EDGES if t == n) for n in (2, 3, 4)] == [2, 3, 4]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("op", range(NUM_OPS))
def test_op_shape_and_causality(op, causal):
    torch.manual_seed(0)
    edge = EdgeOps(C, causal).double()
    x = torch.randn(B, S, C, dtype=torch.float64)
    y = edge.apply_op(op, x)
    assert y.shape == (B, S, C)
    # Perturb position s: with causal ops, outputs before s must not move.
    for s in range(S):
        x2 = x.clone()
        x2[:, s] += 1.0
        y2 = edge.apply_op(op, x2)
        if causal:
            torch.testing.assert_close(y2[:, :s], y[:, :s], rtol=0, atol=0)
        if OPS[op] in ("linear", "glu", "zero", "skip"):  # position-wise ops never mix positions
            torch.testing.assert_close(y2[:, s + 1:], y[:, s + 1:], rtol=0, atol=0)
            torch.testing.assert_close(y2[:, :s], y[:, :s], rtol=0, atol=0)


@pytest.mark.parametrize("name,k", [("conv3", 3), ("conv5", 5)])
@pytest.mark.parametrize("causal", [False, True])
def test_conv_padding_matches_definition(name, k, causal):
    torch.manual_seed(0)
    edge = EdgeOps(C, causal).double()
    conv = getattr(edge, name)
    x = torch.randn(B, S, C, dtype=torch.float64)
    y = edge.apply_op(OPS.index(name), x)
    xt = x.transpose(1, 2)
    if causal:  # y_s = Σ_j w_j x_{s-k+1+j}: sees the past only
        ref = F.conv1d(F.pad(xt, (k - 1, 0)), conv.weight, conv.bias)
    else:  # "same": centered window
        ref = F.conv1d(xt, conv.weight, conv.bias, padding=k // 2)
    torch.testing.assert_close(y, ref.transpose(1, 2), rtol=1e-12, atol=1e-12)
    if not causal:  # the centered window does see the next position
        x2 = x.clone()
        x2[:, 3] += 1.0
        assert not torch.equal(edge.apply_op(OPS.index(name), x2)[:, 2], y[:, 2])


def test_whole_causal_cell_is_causal():
    cell = _cell(True)
    x, f = _inputs()
    ops_seq = [[1, 2, 1, 2, 3, 0, 5, 2, 1]] * B
    y = _sparse(cell, x, f, ops_seq)
    for s in range(S):
        x2, f2 = x.clone(), f.clone()
        x2[:, s] += 1.0
        f2[:, s] -= 1.0
        y2 = _sparse(cell, x2, f2, ops_seq)
        torch.testing.assert_close(y2[:, :s], y[:, :s], rtol=0, atol=0)


def _random_ops(seed, b=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_OPS, (b, NUM_EDGES), generator=g)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_sparse_equals_dense_mixture_with_one_hot_weights(seed, causal):
    """Forward and every gradient (parameters, inputs, the one-hot weights' chosen entries)."""
    cell = _cell(causal, seed)
    x, f = _inputs(seed)
    x.requires_grad_(True)
    f.requires_grad_(True)
    ops_seq = _random_ops(seed)  # each sequence its own architecture
    if seed == 0:
        ops_seq[0] = OPS.index("zero")  # one sequence whose cell is all zero
    w_full = F.one_hot(ops_seq, NUM_OPS).double().requires_grad_(True)
    probe = torch.randn(B, S, D, dtype=torch.float64)

    y_dense = cell.forward_dense(x, f, w_full)
    g_dense = torch.autograd.grad((y_dense * probe).sum(), [x, f, w_full, *cell.parameters()])
    y_sparse = _sparse(cell, x, f, ops_seq, w_full)
    g_sparse = torch.autograd.grad((y_sparse * probe).sum(), [x, f, w_full, *cell.parameters()])

    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_sparse[:2] + g_sparse[3:], g_dense[:2] + g_dense[3:]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The sparse path's weight gradient lives on the chosen entries only, and equals the dense one there.
    chosen = F.one_hot(ops_seq, NUM_OPS).bool()
    torch.testing.assert_close(g_sparse[2][chosen], g_dense[2][chosen], rtol=1e-10, atol=1e-12)
    assert bool((g_sparse[2][~chosen] == 0).all())


def test_chosen_weight_gradient_matches_finite_differences():
    """∂y/∂w for the chosen op's weight (the route of the straight-through gradient)."""
    cell = _cell(True, 3)
    x, f = _inputs(3)
    ops_seq = _random_ops(5)
    ops_seq[:, 4] = OPS.index("conv5")
    probe = torch.randn(B, S, D, dtype=torch.float64)
    w = torch.ones(B, NUM_EDGES, dtype=torch.float64, requires_grad=True)
    plan = make_plan(ops_seq.tolist())
    (grad,) = torch.autograd.grad((cell(x, f, w, plan) * probe).sum(), w)
    eps = 1e-6
    for b, k in [(0, 4), (1, 0), (2, 8)]:
        wp, wm = w.detach().clone(), w.detach().clone()
        wp[b, k] += eps
        wm[b, k] -= eps
        fd = ((cell(x, f, wp, plan) - cell(x, f, wm, plan)) * probe).sum() / (2 * eps)
        torch.testing.assert_close(grad[b, k], fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_weights_stacked_per_task_equal_each_task_alone(dense, causal):
    """Cell weights stacked ``[T, ...]`` (as the batched inner loop passes them through
    ``functional_call``) with ``seq_task``: each sequence equals the cell run with its own task's
    weights; the gradient of every stacked weight equals the sum of the per-task ones."""
    T, b = 3, 5
    cells = [_cell(causal, seed) for seed in range(T)]
    names = [n for n, _ in cells[0].named_parameters()]
    stacked = {n: torch.stack([dict(c.named_parameters())[n].detach() for c in cells]).requires_grad_(True)
               for n in names}
    x, f = _inputs(b=b)
    seq_task = torch.tensor([2, 0, 2, 1, 0])
    ops_seq = _random_ops(7, b=b)
    ops_seq[:, 4] = OPS.index("conv3")  # every parametric op appears
    ops_seq[0, 5] = OPS.index("conv5")
    ops_seq[1, 6] = OPS.index("glu")
    ops_seq[2, 7] = OPS.index("linear")
    w_full = F.one_hot(ops_seq, NUM_OPS).double()
    probe = torch.randn(b, S, D, dtype=torch.float64)

    class Dense(torch.nn.Module):  # functional_call runs forward(): route it to the mixture
        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, *args):
            return self.cell.forward_dense(*args)

    def run(cell, params, rows, task):
        w = w_full[rows]
        if dense:
            args = (x[rows], f[rows], w, task)
            if params is None:
                return cell.forward_dense(*args)
            return torch.func.functional_call(Dense(cell), {f"cell.{n}": p for n, p in params.items()}, args)
        ws = w.gather(-1, ops_seq[rows].unsqueeze(-1)).squeeze(-1)
        args = (x[rows], f[rows], ws, make_plan(ops_seq[rows].tolist()), task)
        return torch.func.functional_call(cell, params, args) if params is not None else cell(*args)

    y = run(cells[0], stacked, torch.arange(b), seq_task)
    grads = torch.autograd.grad((y * probe).sum(), list(stacked.values()))
    for t in range(T):
        rows = (seq_task == t).nonzero().squeeze(-1)
        own = cells[t]
        y_t = run(own, None, rows, None)
        torch.testing.assert_close(y[rows], y_t, rtol=1e-12, atol=1e-12)
        g_t = torch.autograd.grad((y_t * probe[rows]).sum(), list(own.parameters()), allow_unused=True)
        for n, g_all, g_own in zip(names, grads, g_t):
            want = torch.zeros_like(g_all[t]) if g_own is None else g_own
            torch.testing.assert_close(g_all[t], want, rtol=1e-10, atol=1e-12, msg=n)
    with pytest.raises(ValueError, match="stacked per task.*seq_task"):
        run(cells[0], stacked, torch.arange(b), None)


def _called(cell, ops_seq, grad=True):
    calls = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: calls.append(n))
             for n, m in cell.named_modules() if n and not list(m.children())]
    x, f = _inputs()
    with torch.set_grad_enabled(grad):
        y = _sparse(cell, x, f, ops_seq)
    for h in hooks:
        h.remove()
    return calls, y, f


def test_only_chosen_ops_run():
    cell = _cell(False)
    calls, _, _ = _called(cell, [[OPS.index("linear")] * NUM_EDGES] * B)
    assert sorted(set(calls)) == sorted({"in_proj.0", "in_proj.1", "out_proj"} | {f"edges.{k}.linear" for k in range(9)})
    ops_seq = [[0, 1, 2, 3, 4, 5, 0, 1, 2]] * 2 + [[4] * 9]
    calls, _, _ = _called(cell, ops_seq)
    want = {f"edges.{k}.{OPS[o]}" for k, o in enumerate(ops_seq[0]) if OPS[o] not in ("zero", "skip")}
    assert set(c for c in calls if c.startswith("edges")) == want
    assert len(calls) == len(set(calls))  # every op ran once, on its group of sequences


def test_all_zero_cell_computes_nothing_and_keeps_params_in_graph():
    cell = _cell(False)
    calls, y, f = _called(cell, [[OPS.index("zero")] * NUM_EDGES] * B)
    assert calls == []
    torch.testing.assert_close(y, f + cell.out_proj.bias)
    y.sum().backward()
    assert all(p.grad is not None for p in cell.parameters())  # DDP needs no find_unused_parameters
    # skip-only edges need the input projections, but no edge op
    calls, _, _ = _called(cell, [[OPS.index("skip")] * NUM_EDGES] * B)
    assert sorted(set(calls)) == ["in_proj.0", "in_proj.1", "out_proj"]


def test_unused_input_node_is_not_projected():
    cell = _cell(False)
    ops_seq = [[OPS.index("zero") if EDGES[k][0] == 0 else OPS.index("linear") for k in range(9)]] * B
    calls, _, _ = _called(cell, ops_seq)
    assert "in_proj.0" not in calls and "in_proj.1" in calls


def test_zero_init_cell_adds_nothing():
    cell = SearchedCell(D, C).double()
    x, f = _inputs()
    y = _sparse(cell, x, f, _random_ops(0))
    torch.testing.assert_close(y, f, rtol=0, atol=0)


def test_cell_flops_per_token():
    assert cell_flops_per_token(D, C, [OPS.index("zero")] * 9) == 0
    lin = cell_flops_per_token(D, C, [0] * 9)
    assert lin == 9 * C * C + 3 * D * C


def test_bad_inputs():
    cell = _cell(False)
    x, f = _inputs()
    w = torch.ones(B, NUM_EDGES, dtype=torch.float64)
    plan = make_plan(_random_ops(0).tolist())
    with pytest.raises(ValueError, match="'x_in' must be"):
        cell(x[..., :5], f, w, plan)
    with pytest.raises(ValueError, match="same shape"):
        cell(x, f[:, :3], w, plan)
    with pytest.raises(ValueError, match="do not match the batch"):
        cell(x, f, w[:2], plan)
    with pytest.raises(ValueError, match="do not match the batch"):
        cell(x[:2], f[:2], w[:2], plan)
    with pytest.raises(ValueError, match="'weights' must be"):
        cell.forward_dense(x, f, torch.ones(B, 9, 5))
    with pytest.raises(ValueError, match="outside"):
        make_plan([[7] * 9])
    with pytest.raises(ValueError, match="'width'"):
        SearchedCell(D, 0)
    with pytest.raises(ValueError, match="'init'"):
        SearchedCell(D, C, init="xavier")
