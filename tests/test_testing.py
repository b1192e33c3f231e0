"""The oracle itself (``tarp_fast.testing``): it must fail a wrong backend, an unwritten element and
a missing gradient, and its case helpers must keep a problem's meaning."""

from __future__ import annotations

import math

import pytest
import torch

from tarp_fast import reference
from tarp_fast.testing import Problem, against_float64, compare, make_problem, rel_err, tolerance


def test_rel_err_is_inf_for_an_unwritten_element_and_zero_when_empty():
    ref = torch.ones(3, 4, dtype=torch.float64)
    got = ref.clone()
    got[1, 2] = float("nan")
    assert rel_err(got, ref) == math.inf
    assert rel_err(torch.empty(0, 4), torch.empty(0, 4, dtype=torch.float64)) == 0.0
    assert tolerance(None, ref, torch.float32) == pytest.approx(2e-5)


def test_compare_passes_the_reference_and_fails_a_perturbed_one():
    p = make_problem(M=9, K=16, N=16, r=3, T=2, gate="row", skip_gate="task", residual=True, seed=1)
    compare(reference.tarp_linear, p, torch.float32)

    def off_by_a_little(*args, **kw):
        return reference.tarp_linear(*args, **dict(kw, scaling=kw["scaling"] * 1.01))

    with pytest.raises(AssertionError, match="y: rel err"):
        compare(off_by_a_little, p, torch.float32)

    def forgets_U(x, weight, bias, U, V, G, P, Q, **kw):  # the output is right, U gets no gradient
        return reference.tarp_linear(x, weight, bias, U.detach(), V, G, P, Q, **kw)

    with pytest.raises(AssertionError, match="grad U: missing"):
        compare(forgets_U, p, torch.float32)


def test_against_float64_differentiates_only_wrt():
    p = make_problem(M=5, K=8, N=8, r=2, seed=2)
    results = against_float64(reference.tarp_linear, p, torch.float32, wrt=("x", "U"))
    assert sorted(results) == ["grad U", "grad x", "y"]
    got, ref, eager = results["grad U"]
    assert got.dtype == torch.float32 and ref.dtype == torch.float64 and eager.dtype == torch.float32
    assert against_float64(reference.tarp_linear, p, torch.float32, grads=False).keys() == {"y"}


def test_rows_slices_per_row_inputs_and_keeps_per_task_ones():
    p = make_problem(M=6, K=4, N=4, r=2, T=3, gate="task", skip_gate="row", residual=True, seed=3)
    head = p.rows(2)
    assert head.x.shape == (2, 4) and head.kw["task_index"].shape == (2,)
    assert head.kw["residual"].shape == (2, 4) and head.kw["skip_gate"].shape == (2,)
    assert head.kw["gate"] is p.kw["gate"]  # [T]: per task, not per row
    same_length = make_problem(M=3, K=4, N=4, r=2, T=3, skip_gate="row", seed=3)
    assert same_length.rows(2).kw["skip_gate"].shape == (3,)  # [M] with M == T reads per task
    assert head.U is p.U
    full = reference.tarp_linear(*p.args(), **p.kw)
    torch.testing.assert_close(reference.tarp_linear(*head.args(), **head.kw), full[:2])


def test_to_sets_requires_grad_by_name():
    p = make_problem(M=3, K=4, N=4, r=1, gate="row", seed=4)
    q = p.to(torch.float32, requires_grad=("x", "gate"))
    assert isinstance(q, Problem)
    assert {k for k, t in q.tensors().items() if t.requires_grad} == {"x", "gate"}
    assert all(t.dtype == torch.float32 for t in q.tensors().values())


def test_tf32_sets_and_restores_the_matmul_precision():
    from tarp_fast.testing import tf32

    m = torch.backends.cuda.matmul
    attr, on, off = ("fp32_precision", "tf32", "ieee") if hasattr(m, "fp32_precision") else ("allow_tf32", True, False)
    before = getattr(m, attr)
    with tf32(True):
        assert getattr(m, attr) == on
        with tf32(False):
            assert getattr(m, attr) == off
        assert getattr(m, attr) == on
    assert getattr(m, attr) == before
