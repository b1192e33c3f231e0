"""The native CPU backend (``tarp_fast._C``) against the float64 reference: every flag, every gradient.

Skipped when the extension is not built; ``make test`` builds it, so these run there. Unwritten
output elements are caught by running under ``torch.use_deterministic_algorithms(True)``, which
makes every ``empty`` tensor (including those the C++ ops allocate) start as NaN.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_problem, max_rel_err, native_or_skip

import tarp_fast
from tarp_fast import ops, reference
from tarp_fast.testing import compare

pytestmark = pytest.mark.native

_native = native_or_skip()

native = _native.tarp_linear_native
GATES = (None, "scalar", "row", "task", "zero_rows")
SKIPS = (None, "row", "task", "scalar")
VARIANTS = ("dynamic", "bilinear", "none")


@pytest.fixture(autouse=True)
def _nan_poison_uninitialized():
    """NaN in every freshly allocated tensor: an element the kernels forget to write fails."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev)


def _problem(T=1, variant="dynamic", **kw):
    return make_problem(T=T, delta=variant != "none", dynamic=variant == "dynamic", **kw)


def _out_and_grads(fn, p, dy=None):
    """Output and the gradient of every tensor input (all set to require grad)."""
    named = p.tensors()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in named.items()}
    args = [leaves.get(n) for n in ("x", "weight", "bias", "U", "V", "G", "P", "Q")]
    kw = dict(p.kw)
    for k in ("gate", "skip_gate", "residual"):
        if k in leaves:
            kw[k] = leaves[k]
    out = fn(*args, **kw)
    if dy is None:
        dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), dy, allow_unused=True)
    return out, dict(zip(leaves, grads)), dy


def _describe(**flags):
    return ", ".join(f"{k}={v}" for k, v in flags.items())


def _compare(p, *, what):
    """Native vs the float64 reference on problem p, by the oracle's rule (tarp_fast.testing)."""
    compare(native, p, p.x.dtype, what=what)


@pytest.mark.parametrize("hard_skip", [False, True])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu_tanh"])
@pytest.mark.parametrize("T", [1, 3])
def test_every_flag_float64(T, activation, hard_skip):
    """All combinations of delta variant, multiplicative term, gates, skip gate and residual."""
    for variant, scale, gate, skip, residual in itertools.product(VARIANTS, (False, True), GATES, SKIPS,
                                                                  (False, True)):
        if T == 1 and "task" in (gate, skip):
            continue
        if variant == "none" and not scale and T > 1:
            continue  # task_index needs per-task factors
        what = _describe(T=T, variant=variant, scale=scale, gate=gate, skip=skip, residual=residual,
                         activation=activation, hard_skip=hard_skip)
        p = _problem(T=T, variant=variant, M=11, K=9, N=9, r=3, q=2, scale=scale, gate=gate, skip_gate=skip,
                     residual=residual, activation=activation, hard_skip=hard_skip)
        _compare(p, what=what)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_float32_error_at_most_twice_eager(T, activation):
    for variant, gate, skip in itertools.product(VARIANTS, (None, "row", "zero_rows"), (None, "row")):
        if variant == "none" and T > 1:
            continue
        what = _describe(T=T, variant=variant, gate=gate, skip=skip, activation=activation)
        p = _problem(T=T, variant=variant, M=70, K=48, N=48, r=5, q=3, scale=True, gate=gate, skip_gate=skip,
                     residual=True, activation=activation, hard_skip=gate == "zero_rows", dtype=torch.float32)
        _compare(p, what=what)


@pytest.mark.parametrize(
    "M,K,N,r,T",
    [(0, 8, 8, 3, 1), (0, 8, 8, 3, 2), (5, 0, 0, 2, 1), (5, 0, 7, 2, 2), (5, 6, 0, 2, 1), (5, 6, 7, 0, 1),
     (1, 1, 1, 1, 1), (1, 1, 1, 1, 3), (33, 17, 17, 5, 4), (13, 31, 7, 1, 2), (3, 5, 5, 16, 1)],
)
@pytest.mark.parametrize("gate", [None, "row", "zero_rows"])
def test_zero_size_and_odd_shapes(M, K, N, r, T, gate):
    skip = "row" if K == N else None
    p = _problem(T=T, M=M, K=K, N=N, r=r, gate=gate, skip_gate=skip, residual=True, activation="gelu_tanh",
                 hard_skip=True)
    _compare(p, what=_describe(M=M, K=K, N=N, r=r, T=T, gate=gate))


def test_all_rows_dropped_and_no_rows_dropped():
    for fill in (0.0, 1.5):
        p = _problem(T=2, M=10, K=6, N=6, gate="row", skip_gate="row", residual=True, hard_skip=True,
                     activation="relu")
        p.kw["gate"] = torch.full((10,), fill, dtype=torch.float64)
        _compare(p, what=f"gate={fill}")
    p = _problem(M=10, K=6, N=6, gate="scalar", hard_skip=True)
    p.kw["gate"] = torch.tensor(0.0, dtype=torch.float64)
    _compare(p, what="scalar gate 0")


def test_python_number_gates_and_leading_dims_and_noncontiguous():
    p = _problem(T=1, lead=(2, 3), K=8, N=8, r=2, residual=True, activation="relu")
    p.kw.update(gate=0.5, skip_gate=-1.25)
    _compare(p, what="python gates, lead dims")
    # Non-contiguous x, weight and factors (transposed storage).
    p = _problem(T=3, M=9, K=7, N=7, r=3, gate="task", skip_gate="row", residual=True)
    p.x = p.x.t().contiguous().t()
    p.weight = p.weight.t().contiguous().t()
    p.G = p.G.transpose(-1, -2).contiguous().transpose(-1, -2)
    p.kw["residual"] = p.kw["residual"].t().contiguous().t()
    assert not p.x.is_contiguous() and not p.weight.is_contiguous()
    _compare(p, what="non-contiguous")


def test_hard_skip_rows_exact_and_gate_grad_zero():
    p = _problem(T=2, M=12, K=5, N=5, r=2, gate="zero_rows", skip_gate="row", residual=True, hard_skip=True,
                 activation="gelu_tanh")
    out, g, _ = _out_and_grads(native, p)
    dropped = p.kw["gate"] == 0
    x2 = p.x.reshape(12, 5)
    expected = x2 * p.kw["skip_gate"].unsqueeze(-1) + p.kw["residual"]
    assert torch.equal(out[dropped], expected[dropped])
    assert torch.equal(g["gate"][dropped], torch.zeros_like(g["gate"][dropped]))


def test_hard_skip_compacts_rows_before_the_gemms():
    """With hard_skip the GEMMs see only the kept rows: compute falls with the kept fraction."""
    M, K, N = 40, 16, 24
    p = _problem(M=M, K=K, N=N, r=4, gate="zero_rows", hard_skip=True, scale=False)
    kept = int((p.kw["gate"] != 0).sum())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        native(*p.args(), **p.kw)
    shapes = [e.input_shapes for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
    assert shapes, "no GEMM recorded"
    rows = {s[0][0] if e == 2 else s[1][0] for s in shapes for e in [len(s)] if s and s[0]}
    assert M not in rows and kept in rows, (kept, shapes)


def test_frozen_base_costs_no_weight_gemm():
    p = _problem(M=16, K=8, N=12, r=2, scale=False)
    x, weight, bias, U, V, G = (t.detach().clone() for t in (p.x, p.weight, p.bias, p.U, p.V, p.G))
    for t in (x, U, V, G):
        t.requires_grad_(True)
    out = native(x, weight, bias, U, V, G, **p.kw)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out.sum().backward()
    assert weight.grad is None and bias.grad is None
    # No [N, M] x [M, K] product (the dW GEMM) ran.
    for e in prof.events():
        if e.name == "aten::mm" and e.input_shapes and len(e.input_shapes[0]) == 2:
            a, b = e.input_shapes[0], e.input_shapes[1]
            assert not (a == [12, 16] and b == [16, 8]), "dW GEMM ran for a frozen weight"
    # And the op itself returns an empty dweight when weight does not need grad.
    fwd = torch.ops.tarp_fast.native_tarp_fwd(x.detach(), weight, bias, U.detach(), V.detach(), G.detach(), None,
                                              None, None, None, None, None, 0.7, 0.5, 1, 0, 0, 1.0, 0, 1.0, False,
                                              False)
    grads = torch.ops.tarp_fast.native_tarp_bwd(torch.ones(16, 12, dtype=x.dtype), x.detach(), weight, U.detach(),
                                                V.detach(), G.detach(), None, None, None, None, None, fwd[1], fwd[2],
                                                fwd[3], 0.7, 1, 0, 0, 1.0, 0, 1.0, False, 1 | (1 << 3))
    assert grads[0].shape == (16, 8) and grads[1].numel() == 0 and grads[3].shape == U.shape
    assert all(grads[i].numel() == 0 for i in (2, 4, 5, 6, 7, 8, 9))


_SUBSETS = [("x",), ("U",), ("V",), ("G",), ("V", "G"), ("x", "G"), ("U", "V", "G")]


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize(
    "wanted, variant",
    [(w, v) for v in ("dynamic", "bilinear") for w in _SUBSETS if not (v == "bilinear" and "G" in w)],
)
def test_each_subset_of_gradients(wanted, variant, T):
    """Only the inputs in ``wanted`` require grad: each backward branch alone, and per-task
    gradients of a task with no rows are zero (task 1 gets none here)."""
    p = _problem(T=T, variant=variant, M=29, K=24, N=20, r=4, scale=False)
    if T > 1:
        p.kw["task_index"] = torch.tensor([0, 2] * 14 + [0])
    dy = torch.randn(29, 20, dtype=torch.float64)
    got = {}
    for name, fn in (("native", native), ("reference", reference.tarp_linear)):
        leaves = {k: getattr(p, k).detach().clone().requires_grad_(k in wanted) for k in ("x", "U", "V")}
        leaves["G"] = p.G.detach().clone().requires_grad_("G" in wanted) if p.G is not None else None
        out = fn(leaves["x"], p.weight, p.bias, leaves["U"], leaves["V"], leaves["G"], **p.kw)
        got[name] = dict(zip(wanted, torch.autograd.grad(out, [leaves[k] for k in wanted], dy)))
    for k in wanted:
        err = max_rel_err(got["native"][k], got["reference"][k])
        assert err <= 1e-12, f"grad {k} with only {wanted} requiring grad, T={T}: rel err {err:.1e}"
        if T > 1 and k != "x":
            assert float(got["native"][k][1].abs().max()) == 0.0, f"grad {k} of a task with no rows"


@pytest.mark.parametrize(
    "cfg",
    [
        dict(T=1, variant="dynamic", scale=True, gate="row", skip_gate="row", residual=True, activation="gelu_tanh"),
        dict(T=3, variant="dynamic", scale=True, gate="task", skip_gate="task", residual=True, activation="relu"),
        dict(T=2, variant="bilinear", scale=True, gate="zero_rows", skip_gate="scalar", hard_skip=True),
        dict(T=1, variant="dynamic", scale=False, gate="scalar", activation="gelu_tanh"),
    ],
    ids=["single-all", "tasks-all", "bilinear-hard-skip", "scalar-gate"],
)
def test_gradcheck_float64(cfg):
    cfg = dict(cfg)
    p = _problem(M=6, K=4, N=4, r=2, q=2, **cfg)
    named = p.tensors()
    names = list(named)
    leaves = [named[n].detach().clone().requires_grad_(True) for n in names]

    def f(*ts):
        d = dict(zip(names, ts))
        kw = dict(p.kw)
        for k in ("gate", "skip_gate", "residual"):
            if k in d:
                kw[k] = d[k]
        args = [d.get(n) for n in ("x", "weight", "bias", "U", "V", "G", "P", "Q")]
        return native(*args, **kw)

    # The numerical Jacobian perturbs gates; under hard_skip a zero gate must stay exactly zero
    # to be a dropped row, so gates are not differentiated numerically there (the analytic
    # rule "no gate gradient for dropped rows" is tested above).
    if cfg.get("hard_skip"):
        gi = names.index("gate")
        leaves[gi].requires_grad_(False)
    with torch.random.fork_rng():
        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_args(p, save_pre=True):
    ti = p.kw.get("task_index")
    T = p.U.shape[0] if (ti is not None and p.U is not None) else 1
    gk = _native.GATE_CODES

    def kind(v):
        if v is None:
            return gk["none"]
        if v.dim() == 0:
            return gk["scalar"]
        return gk["task"] if (ti is not None and v.shape[0] == T) else gk["row"]

    g, s = p.kw.get("gate"), p.kw.get("skip_gate")
    return (p.x, p.weight, p.bias, p.U, p.V, p.G, p.P, p.Q, ti, g, s, p.kw.get("residual"), 0.7, 0.5, T,
            _native.ACTIVATION_CODES[p.kw["activation"]], kind(g), 1.0, kind(s), 1.0, p.kw["hard_skip"], save_pre)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(T=1, gate="row", skip_gate="row", residual=True, activation="gelu_tanh"),
        dict(T=3, gate="task", skip_gate="task", residual=True, activation="relu", hard_skip=False),
        dict(T=2, gate="zero_rows", skip_gate="scalar", activation="none", hard_skip=True),
        dict(T=1, variant="bilinear", scale=False),
        dict(T=1, variant="none", scale=True),
    ],
    ids=["single", "tasks", "hard-skip", "bilinear", "scale-only"],
)
def test_opcheck(cfg):
    cfg = dict(cfg)
    p = _problem(M=7, K=5, N=5, r=2, q=2, **cfg)
    for t in p.tensors().values():
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.tarp_fast.native_tarp_fwd.default, _op_args(p))
    # Without grad: pre is not saved.
    p2 = p.to(torch.float64)
    torch.library.opcheck(torch.ops.tarp_fast.native_tarp_fwd.default, _op_args(p2, save_pre=False))


def test_opcheck_backward_op():
    p = _problem(T=2, M=7, K=5, N=5, r=2, q=2, gate="row", skip_gate="task", residual=True, activation="relu")
    a = _op_args(p)
    out, pre, proj, scale = torch.ops.tarp_fast.native_tarp_fwd(*a)
    dy = torch.randn_like(out)
    bwd_args = (dy, a[0], a[1], *a[3:11], pre, proj, scale, a[12], a[14], a[15], a[16], a[17], a[18], a[19], a[20], (1 << 10) - 1)
    torch.library.opcheck(torch.ops.tarp_fast.native_tarp_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_forward_backward():
    p = _problem(T=2, M=8, K=6, N=6, r=2, gate="row", skip_gate="row", residual=True, activation="gelu_tanh",
                 dtype=torch.float32)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.tensors().items()}
    kw = dict(p.kw, gate=leaves["gate"], skip_gate=leaves["skip_gate"], residual=leaves["residual"])

    def f(x, w, b, U, V, G, P, Q):
        return native(x, w, b, U, V, G, P, Q, **kw).square().sum()

    def g(x, w, b, U, V, G, P, Q):  # through the dispatcher (warmed up: backends are imported once)
        return ops.tarp_linear(x, w, b, U, V, G, P, Q, backend="native", **kw).square().sum()

    args = [leaves[n] for n in ("x", "weight", "bias", "U", "V", "G", "P", "Q")]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*args)
    got = torch.autograd.grad(loss, args)
    want = torch.autograd.grad(f(*args), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    g(*args)
    got = torch.autograd.grad(torch.compile(g, fullgraph=True, backend="aot_eager")(*args), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_half_and_bfloat16_inputs_keep_their_dtype():
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        p = _problem(M=20, K=16, N=16, r=4, gate="row", skip_gate="row", residual=True, activation="relu",
                     dtype=dtype)
        out = native(*p.args(), **p.kw)
        ref = reference.tarp_linear(*p.to(torch.float64).args(), **p.to(torch.float64).kw)
        assert out.dtype == dtype
        assert max_rel_err(out, ref) < tol


def test_deterministic_bitwise():
    p = _problem(T=3, M=300, K=64, N=64, r=4, gate="zero_rows", skip_gate="task", residual=True, hard_skip=True,
                 activation="gelu_tanh", dtype=torch.float32)
    a, ga, dy = _out_and_grads(native, p)
    b, gb, _ = _out_and_grads(native, p, dy)
    assert torch.equal(a, b)
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k


def test_task_index_out_of_range_is_a_value_error():
    p = _problem(T=3, M=6, K=4, N=4, r=2)
    p.kw["task_index"] = torch.tensor([0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match="task_index"):
        native(*p.args(), **p.kw)
    p.kw["task_index"] = torch.tensor([0, 1, 2, -1, 0, 1])
    with pytest.raises(ValueError, match="task_index"):
        ops.tarp_linear(*p.args(), **p.kw, backend="native")


def test_validation_errors_name_the_argument():
    p = _problem(M=6, K=4, N=4, r=2)
    with pytest.raises(ValueError, match="'V'"):
        native(p.x, p.weight, p.bias, p.U, p.V[:, :3], p.G)
    with pytest.raises(TypeError, match="'weight'"):
        native(p.x, p.weight.float(), p.bias)


def test_dispatch_native_and_auto():
    p = _problem(T=2, M=9, K=6, N=6, r=2, gate="row", skip_gate="row", residual=True, activation="relu")
    ref = reference.tarp_linear(*p.args(), **p.kw)
    got = ops.tarp_linear(*p.args(), **p.kw, backend="native")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert tarp_fast.available_backends()["native"] is None
    auto = ops.tarp_linear(*p.args(), **p.kw)
    torch.testing.assert_close(auto, ref, rtol=1e-12, atol=1e-12)


def test_preferred_for_is_a_cpu_float_decision():
    from tarp_fast._contract import check_tarp_args

    p = _problem(M=64, K=128, N=128, r=8, dtype=torch.float32)
    spec = check_tarp_args(*p.args(), **p.kw)
    assert isinstance(_native.preferred_for(spec), bool)
    p16 = _problem(M=64, K=128, N=128, r=8, dtype=torch.bfloat16)
    assert _native.preferred_for(check_tarp_args(*p16.args(), **p16.kw)) is False


def test_ext_info_reports_build():
    info = tarp_fast.ext_info()
    assert info["available"] is True and info["reason"] is None
    assert "tarp_fast::native_tarp_fwd" in info["ops"] and "tarp_fast::native_tarp_bwd" in info["ops"]
    assert info["build"] is not None and info["build"]["torch"] == torch.__version__
    assert isinstance(info["cpu"]["openmp"], bool)
    if torch.version.cuda is None:
        assert info["cuda"]["built"] is False and "CPU build" in info["cuda"]["reason"]
        assert not hasattr(torch.ops.tarp_fast, "compact_rows")
    json.dumps(info)  # plain data


def test_torch_version_mismatch_is_a_readable_reason(monkeypatch):
    from tarp_fast import _ext

    monkeypatch.setattr(_ext, "_build_info", lambda: ({"torch": "1.0.0+cpu"}, None))
    mod, reason = _ext._load()
    assert mod is None and "built against torch 1.0.0+cpu" in reason and "rebuild" in reason
    assert _ext._same_torch("2.13.0+cpu", "2.13.0+cpu")
    assert not _ext._same_torch("2.13.0+cpu", "2.13.0+cu130")


def test_missing_extension_gives_reason_not_crash():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tarp_fast._C"] = None
        import torch, tarp_fast
        info = tarp_fast.ext_info()
        assert info["available"] is False, info
        print(info["reason"])
        try:
            tarp_fast.tarp_linear(torch.randn(2, 3), torch.randn(4, 3), backend="native")
        except RuntimeError as exc:
            print("ERR", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "not built" in out.stdout and "ERR tarp_linear: backend='native' is unavailable" in out.stdout


def test_tarplinear_module_on_native_backend_trains():
    """TARPLinear layers dispatch through ops.tarp_linear: native gives the reference's gradients."""
    layer = tarp_fast.TARPLinear(12, 12, rank=3, dtype=torch.float64)
    with torch.no_grad():
        for prm in layer.parameters():
            prm.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    factors = (layer.weight, layer.bias, layer.tarp_U, layer.tarp_V, layer.tarp_G)
    y_n = ops.tarp_linear(x, *factors, scaling=layer.scaling, backend="native")
    y_r = ops.tarp_linear(x, *factors, scaling=layer.scaling, backend="reference")
    gn = torch.autograd.grad(y_n.square().sum(), factors)
    gr = torch.autograd.grad(y_r.square().sum(), factors)
    torch.testing.assert_close(y_n, y_r)
    for a, b in zip(gn, gr):
        torch.testing.assert_close(a, b)
    assert math.isfinite(float(y_n.detach().sum()))


def test_benchmark_table_from_a_real_run(tmp_path):
    """``benchmarks/native_table.py`` on the JSON of a real (one-shape) benchmark run: every figure
    the README's table quotes is in it (ratio, GEMM floor, reference / floor), and finite."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={out}", os.path.join(root, "benchmarks", "test_bench_native.py"),
           "-k", "test_native_small and M64-K128-N128-r4"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import native_table
    finally:
        sys.path.pop(0)
    md = tmp_path / "run.md"
    assert native_table.main([str(out)]) == str(md)
    rows = [line for line in md.read_text().splitlines() if line.startswith("| M=64 K=128")]
    assert len(rows) == 2, md.read_text()  # fwd and fwd+bwd
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        figures = [float(c) for c in cells[3:]]  # native, reference, speedup, floor, reference / floor
        assert len(figures) == 5 and all(math.isfinite(f) and f > 0 for f in figures), row
