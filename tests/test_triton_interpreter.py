"""Interpreter tier: the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``.

Run with ``TRITON_INTERPRET=1 pytest -m interpreter tests/test_triton_interpreter.py`` (the
variable must be set before Python starts). Cases and the comparison with the float64 reference
come from ``tarp_fast.testing`` (error at most 2x eager's at the same precision, outputs allocated
NaN-filled by ``poison_outputs``). Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="set TRITON_INTERPRET=1 before starting Python to run the interpreter tier"),
]

pytest.importorskip("triton")  # the kernels need Triton (Linux x86-64); importing them runs nothing

from tarp_fast.kernels import (  # noqa: E402
    CANDIDATES,
    KernelConfig,
    _launch,
    _schedule,
    poison_outputs,
    tarp_linear_triton,
    use_config,
    use_dx_design,
)
from tarp_fast.kernels._custom_ops import triton_tarp_fwd  # noqa: E402

from tarp_fast import ops, reference  # noqa: E402
from tarp_fast.testing import ARG_NAMES, Problem, compare, make_problem  # noqa: E402


# ----------------------------------------------------------------------------------------------
# cases (tarp_fast.testing builds them; here as dicts of arguments and keywords)
# ----------------------------------------------------------------------------------------------
def make_case(*, M, K, N, r=4, q=0, T=None, variant="dynamic", bias=True, gate=None, skip=None,
              residual=False, activation="none", hard_skip=False, scaling=1.0, scale_offset=None, seed=0):
    """Inputs of one call in float64 (cast per test), from :func:`tarp_fast.testing.make_problem`.
    ``gate``/``skip``: a kind of :data:`tarp_fast.testing.GATES`; ``variant``: dynamic | bilinear | none."""
    p = make_problem(M, K, N, r, q, T, bias=bias, delta=variant != "none", dynamic=variant == "dynamic",
                     scale=bool(q), gate=gate, skip_gate=skip, residual=residual, activation=activation,
                     hard_skip=hard_skip, scaling=scaling, scale_offset=scale_offset, seed=seed)
    return _as_dicts(p)


def _as_dicts(p: Problem):
    kw = dict(p.kw)
    a = dict(zip(ARG_NAMES, p.args()), residual=kw.pop("residual", None))
    kw.setdefault("gate", None)
    kw.setdefault("skip_gate", None)
    return a, kw


def _as_problem(a, kw) -> Problem:
    extra = {"residual": a["residual"]} if a.get("residual") is not None else {}
    return Problem(*(a.get(n) for n in ARG_NAMES), kw={**kw, **extra})


def cast(a, kw, dtype, requires_grad=True):
    """Copies of the inputs in ``dtype`` (leaf tensors requiring grad where floating)."""
    return _as_dicts(_as_problem(a, kw).to(dtype, requires_grad=requires_grad))


def run(fn, args, kws):
    return _as_problem(args, kws).call(fn)


def leaves(args, kws):
    """``(name, tensor)`` of every input that requires grad, in signature order."""
    return [(n, t) for n, t in _as_problem(args, kws).tensors().items() if t.requires_grad]


def check_case(a, kw, dtype, *, grads=True):
    """Triton vs the float64 reference by the oracle's rule (tarp_fast.testing), outputs poisoned."""
    return compare(tarp_linear_triton, _as_problem(a, kw), dtype, grads=grads, poison=poison_outputs)


# ----------------------------------------------------------------------------------------------
# sampled flag combinations
# ----------------------------------------------------------------------------------------------
def _sampled_cases(n=36, seed=2024):
    """A fixed sample of the flag space that covers every value of every flag at least once."""
    rng = random.Random(seed)
    axes = dict(
        dtype=[torch.float32, torch.float16],
        variant=["dynamic", "bilinear", "none"],
        r=[1, 3, 4, 16],
        q=[0, 2],
        T=[None, 3],
        bias=[True, False],
        gate=[None, "float", "scalar", "zero_rows", "zero_task"],
        skip=[None, "float", "zero_rows", "zero_task"],
        residual=[True, False],
        activation=["none", "relu", "gelu_tanh"],
        hard_skip=[False, True],
    )
    cases = []
    for i in range(n):
        c = {k: v[i % len(v)] if i < max(map(len, axes.values())) else rng.choice(v) for k, v in axes.items()}
        cases.append(c)
    rng.shuffle(cases)
    return cases


SAMPLED = _sampled_cases()


@pytest.mark.parametrize("c", SAMPLED, ids=[
    f"{c['dtype'].__repr__()[6:]}-{c['variant']}-r{c['r']}-q{c['q']}-T{c['T']}-g{c['gate']}-s{c['skip']}-"
    f"{c['activation']}-hs{int(c['hard_skip'])}" for c in SAMPLED])
def test_sampled_flag_combinations(c):
    """Odd M, N, K (not multiples of any tile); skip gates need N == K."""
    c = dict(c)
    dtype = c.pop("dtype")
    gate, skip, T = c["gate"], c["skip"], c["T"]
    if T is None:  # per-task gates need tasks
        c["gate"] = "zero_rows" if gate == "zero_task" else gate
        c["skip"] = "zero_rows" if skip == "zero_task" else skip
    if c["variant"] == "none" and T and not c["q"]:
        c["q"] = 2  # task_index needs per-task factors
    N = 37 if c["skip"] is not None else 29
    a, kw = make_case(M=45, K=37, N=N, seed=zlib.crc32(str(sorted(c.items())).encode()) % 1000, **c)
    check_case(a, kw, dtype)


# ----------------------------------------------------------------------------------------------
# targeted cases
# ----------------------------------------------------------------------------------------------
def small_configs():
    """16x16x16 tiles for every kernel (built lazily: the kernels import only under the interpreter)."""
    return dict(fwd=KernelConfig(16, 16, 16, num_warps=1, GROUP_M=2), proj=KernelConfig(16, 16, 16, num_warps=1),
                dx=KernelConfig(16, 16, 16, num_warps=1), wgrad=KernelConfig(16, 16, 16, num_warps=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_small_tiles_many_segments(dtype):
    """16x16x16 tiles: many row tiles per task, partial tiles in every segment, hard skip."""
    a, kw = make_case(M=83, K=35, N=35, r=3, q=3, T=4, gate="zero_rows", skip="zero_task", residual=True,
                      activation="relu", hard_skip=True, scaling=0.5, seed=7)
    with use_config(**small_configs()):
        check_case(a, kw, dtype)


@pytest.mark.parametrize("M", [0, 1])
def test_zero_and_one_row(M):
    a, kw = make_case(M=M, K=19, N=19, r=4, q=2, T=2, gate="zero_rows", skip="zero_rows", residual=True,
                      activation="gelu_tanh", hard_skip=True, seed=3)
    check_case(a, kw, torch.float32)


def test_zero_rows_single_task():
    a, kw = make_case(M=0, K=21, N=17, r=3, residual=True, activation="relu", seed=4)
    check_case(a, kw, torch.float32)


def test_hard_skip_semantics():
    """Dropped rows give exactly ``skip x + res`` and zero gate gradient, even when the dense
    path of those rows would be inf/NaN (it is never computed)."""
    a, kw = make_case(M=40, K=24, N=24, r=4, gate="zero_rows", skip="zero_rows", residual=True, hard_skip=True, seed=5)
    # row 0 has gate 0 (v[::3] = 0): with x = 1e30, S h ~ 1e60 overflows fp32, so computing the
    # dropped row's dense path would leave inf/NaN in its output and in the weight gradients
    a["x"][0] = 1e30
    args, kws = cast(a, kw, torch.float32)
    y = run(tarp_linear_triton, args, kws)
    dropped = kws["gate"].detach() == 0
    expect = kws["skip_gate"].detach()[:, None] * args["x"].detach() + args["residual"].detach()
    torch.testing.assert_close(y.detach()[dropped], expect[dropped], rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert (kws["gate"].grad[dropped] == 0).all()
    assert torch.isfinite(args["weight"].grad).all()


def test_all_rows_dropped():
    a, kw = make_case(M=20, K=16, N=16, r=4, T=2, gate="zero", skip="zero_rows", residual=True, hard_skip=True, seed=6)
    check_case(a, kw, torch.float32)


def test_without_hard_skip_gate_zero_rows_are_exact_autograd():
    """Without ``hard_skip`` a zero gate still gets the gradient <dy, act(pre)>."""
    a, kw = make_case(M=30, K=20, N=20, r=3, gate="zero_rows", activation="gelu_tanh", seed=8)
    check_case(a, kw, torch.float32)


def test_only_some_inputs_require_grad():
    """Frozen base and frozen x: only the adapter gets gradients, and the weight GEMM is skipped."""
    a, kw = make_case(M=33, K=18, N=26, r=3, gate="zero_rows", activation="relu", seed=9)
    args, kws = cast(a, kw, torch.float32, requires_grad=False)
    for n in ("U", "V", "G"):
        args[n].requires_grad_(True)
    launched = []
    orig = _launch.plan_wgrad

    def spy(*p, **k):
        launched.append(k.get("A"))
        return orig(*p, **k)

    _launch.plan_wgrad = spy
    try:
        y = run(tarp_linear_triton, args, kws)
        y.square().sum().backward()
    finally:
        _launch.plan_wgrad = orig
    assert args["x"].grad is None and args["weight"].grad is None
    N, C = 26, 3 + 9
    assert sorted(launched) == sorted([N, C]), launched  # dU (A=N) and [dV; dG] (A=C), no dW
    a64, kw64 = cast(a, kw, torch.float64, requires_grad=False)
    for n in ("U", "V", "G"):
        a64[n].requires_grad_(True)
    y64 = run(reference.tarp_linear, a64, kw64)
    y64.square().sum().backward()
    for n in ("U", "V", "G"):
        torch.testing.assert_close(args[n].grad.double(), a64[n].grad, rtol=1e-4, atol=1e-4)


_EMULATED_HELPERS = """
import torch
# The CUDA helpers' documented semantics as CPU ops (a CPU build of tarp_fast._C defines none).
lib = torch.library.Library("tarp_fast", "FRAGMENT")
lib.define("compact_rows(Tensor gate) -> (Tensor rows, Tensor count)")
lib.define("group_by_task(Tensor task_index, int num_tasks, Tensor? gate) -> (Tensor perm, Tensor counts, Tensor offsets)")

def stable_sort(keys, nb):
    counts = torch.bincount(keys, minlength=nb)
    return torch.sort(keys, stable=True).indices, counts, torch.cat([counts.new_zeros(1), counts.cumsum(0)])

def compact_rows(gate):
    perm, counts, _ = stable_sort((gate.float() == 0).long(), 2)
    return perm, counts[:1].clone()

def group_by_task(task, T, gate):
    keys = task.clone()
    keys[(keys < 0) | (keys >= T)] = T
    if gate is not None:
        keys[gate.float() == 0] = T
    return stable_sort(keys, T + 1)

lib.define("segmented_sum(Tensor values, Tensor? perm, Tensor offsets) -> Tensor")

def segmented_sum(values, perm, offsets):
    rows = values if perm is None else values[perm]
    return torch.stack([rows[offsets[s]:offsets[s + 1]].sum(0) for s in range(offsets.numel() - 1)])

lib.impl("compact_rows", compact_rows, "CPU")
lib.impl("group_by_task", group_by_task, "CPU")
lib.impl("segmented_sum", segmented_sum, "CPU")

from tarp_fast.kernels import _launch, _schedule, tarp_linear_triton
for T, task_rows, gated in ((5, True, False), (5, True, True), (1, False, True)):
    for M in (0, 1, 50, 1100):
        task = torch.randint(0, T, (M,)) if task_rows else None
        gate = (torch.rand(M) + 0.1).index_fill(0, torch.arange(0, M, 3), 0.0) if gated else None
        pc, oc = _schedule.row_groups_cuda(M, T, task, gate)
        pt, ot = _schedule.row_groups(M, T, task, None if gate is None else gate == 0, "cpu")
        assert pc.dtype == torch.int32 and torch.equal(pc, pt) and torch.equal(oc, ot), (T, M)

g = torch.Generator().manual_seed(0)
M, K, N, r, T = 45, 32, 32, 4, 3
args = [torch.randn(*s, generator=g) * 0.3 for s in ((M, K), (N, K), (N,), (T, N, r), (T, r, K), (T, r * r, K))]
gate = torch.rand(M, generator=g) + 0.1
gate[::4] = 0
kw = dict(task_index=torch.randint(0, T, (M,), generator=g), activation="gelu_tanh", scaling=0.5)
task_gate = torch.rand(T, generator=g) + 0.5  # a per-task gate: its gradient is a per-task sum
outs = []
for helpers in (False, True):
    _launch.use_cuda_helpers = lambda device, on=helpers: on
    for gate_kw in (dict(gate=gate, hard_skip=True), dict(gate=task_gate.clone().requires_grad_())):
        leaves = [a.clone().requires_grad_() for a in args]
        y = tarp_linear_triton(*leaves, **dict(kw, **gate_kw))
        y.square().sum().backward()
        outs.append([y.detach()] + [t.grad for t in leaves])
        if gate_kw["gate"].requires_grad:
            outs[-1].append(gate_kw["gate"].grad)
for a, b in zip(outs[:2], outs[2:]):  # without / with the helpers, for each gate
    assert all(torch.equal(u, v) for u, v in zip(a[:7], b[:7]))
    assert all(torch.allclose(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(a[7:], b[7:]))
    assert len(a) == len(b)
assert outs[1][7].abs().sum() > 0  # the per-task gate did get a gradient
print("ok")
"""


def test_schedule_glue_of_the_cuda_helpers_on_emulated_ops():
    """The Triton path through the CUDA helpers (``TARP_FAST_CUDA_HELPERS=1``), with the helpers
    emulated by CPU ops of their documented semantics: the schedule glue (offsets, dtypes, the
    no-task case) gives the torch schedule exactly, a whole call with hard skip is bitwise equal,
    and a per-task gate's gradient (summed by ``segmented_sum``) matches torch's indexing
    backward. In a subprocess: the emulated ops must not leak into this process's
    ``torch.ops.tarp_fast``."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _EMULATED_HELPERS], capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_forward_and_dx_configs_follow_the_rank(monkeypatch):
    """The launchers pass the rank to the config choice: ranks > 16 take the "-rank>16" tiles where
    a table has them (sm_80's forward and dx; the compile tier compiles the r = 32 kernels with
    those tiles, so a launcher that ignored the rank would run an unchecked, spilling config)."""
    seen = []
    orig = _launch.config_for

    def spy(name, M, itemsize, **k):
        seen.append((name, k.get("rank", 0)))
        return orig(name, M, itemsize, **k)

    monkeypatch.setattr(_launch, "config_for", spy)
    a, kw = make_case(M=9, K=16, N=16, r=5, seed=3)
    args, kws = cast(a, kw, torch.float32, requires_grad=True)
    run(tarp_linear_triton, args, kws).sum().backward()
    assert ("fwd", 5) in seen and ("dx", 5) in seen, seen


def test_non_contiguous_and_batched_inputs():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 21, 5, generator=g).transpose(1, 2)  # [3, 5, 21] non-contiguous
    W = torch.randn(21, 26, generator=g).t()  # [26, 21] non-contiguous
    U = torch.randn(26, 4, generator=g)
    V = torch.randn(21, 4, generator=g).t() * 0.2
    G = torch.randn(16, 21, generator=g) * 0.1
    res = torch.randn(3, 5, 26, generator=g)
    y = tarp_linear_triton(x, W, None, U, V, G, residual=res, activation="relu")
    y64 = reference.tarp_linear(x.double(), W.double(), None, U.double(), V.double(), G.double(),
                                residual=res.double(), activation="relu")
    assert y.shape == (3, 5, 26)
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)


def test_scale_offset_zero_and_scaling():
    a, kw = make_case(M=26, K=22, N=30, r=4, q=3, scaling=2.5, scale_offset=0.0, seed=11)
    check_case(a, kw, torch.float32)


def test_deterministic_bitwise():
    a, kw = make_case(M=50, K=24, N=24, r=3, q=2, T=3, gate="zero_rows", skip="zero_rows", activation="gelu_tanh",
                      hard_skip=True, seed=12)
    res = []
    for _ in range(2):
        args, kws = cast(a, kw, torch.float32)
        y = run(tarp_linear_triton, args, kws)
        y.sum().backward()
        res.append([y.detach()] + [t.grad for _, t in leaves(args, kws)])
    for u, v in zip(*res):
        assert torch.equal(u, v)


@pytest.mark.parametrize("kernel,idx", [(k, i) for k in ("fwd", "dx", "dx_concat", "wgrad", "proj")
                                         for i in range(len(CANDIDATES[k]))])
def test_every_candidate_config(kernel, idx):
    """Each autotuning candidate is correct (its compile is checked by the compile tier)."""
    a, kw = make_case(M=70, K=40, N=40, r=4, T=2, gate="zero_rows", skip="zero_rows", activation="relu", seed=13)
    with use_config(**{kernel: CANDIDATES[kernel][idx]}), use_dx_design("concat" if kernel == "dx_concat" else "fused"):
        check_case(a, kw, torch.float32)


# ----------------------------------------------------------------------------------------------
# the "concat" design of dx (TARP_FAST_DX=concat): pre-pass for dproj, then one GEMM over
# [dpre | dproj] [W; V; G]
# ----------------------------------------------------------------------------------------------
_CONCAT_CASES = {
    # tasks, per-task effective weight (q), hard skip, gates, residual, an activation: dpre is
    # materialized, rows are regrouped
    "dynamic-tasks-hardskip": dict(M=61, K=37, N=37, r=3, q=2, T=3, gate="zero_rows", skip="zero_rows", residual=True,
                                   activation="gelu_tanh", hard_skip=True, scaling=0.5),
    # a plain float gate and no activation: dpre = gate * dy is never formed, the gate scales
    # the dpre part of the GEMM (ROWSCALE) while dproj carries it already
    "bilinear-rowscale": dict(M=50, K=29, N=33, r=5, variant="bilinear", gate="float"),
    "dynamic-rowscale-r16": dict(M=40, K=24, N=24, r=16, gate="float", skip="float"),
    "single-row": dict(M=1, K=19, N=21, r=2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(_CONCAT_CASES))
def test_dx_concat_design(case, dtype):
    """Both dx designs give the reference's gradients (the default tiles: one K tile, one C chunk)."""
    a, kw = make_case(seed=zlib.crc32(case.encode()) % 1000, **_CONCAT_CASES[case])
    with use_dx_design("concat"):
        check_case(a, kw, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dx_concat_small_tiles(dtype):
    """16x16x16 tiles: several K tiles of dx, several N chunks of dpre and several C chunks of
    dproj (C = 3 + 9 = 12 < 16: one chunk; r = 4: C = 20, two), partial tiles everywhere."""
    for r in (3, 4):
        a, kw = make_case(M=83, K=35, N=35, r=r, T=4, gate="zero_rows", skip="zero_task", residual=True, activation="relu",
                          hard_skip=True, scaling=0.5, seed=7 + r)
        cfgs = dict(small_configs(), dx_pre=KernelConfig(16, 16, 16, num_warps=1),
                    dx_concat=KernelConfig(16, 16, 16, num_warps=1, GROUP_M=2))
        with use_config(**cfgs), use_dx_design("concat"):
            check_case(a, kw, dtype)


def test_dx_design_selects_the_launches(monkeypatch):
    """``TARP_FAST_DX`` picks the kernels: ``fused`` launches the dx kernel once (with its GEMM);
    ``concat`` the pre-pass (dx kernel without GEMM) then the concat GEMM; results agree."""
    from tarp_fast.kernels import _plan

    seen = []
    run_launch = _plan.Launch.run

    def spy(launch):
        if launch.name.startswith("dx"):
            seen.append((launch.name, launch.constexprs.get("NEED_DX")))
        run_launch(launch)

    monkeypatch.setattr(_plan.Launch, "run", spy)
    a, kw = make_case(M=33, K=20, N=24, r=3, T=2, gate="zero_rows", activation="relu", seed=19)
    grads = {}
    for design in ("fused", "concat"):
        monkeypatch.setenv("TARP_FAST_DX", design)
        seen.clear()
        args, kws = cast(a, kw, torch.float32)
        y = run(tarp_linear_triton, args, kws)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
        grads[design] = torch.autograd.grad(y, [args[n] for n in ("x", "U", "V", "G")], dy)
        want = [("dx", True)] if design == "fused" else [("dx", False), ("dx_concat", None)]
        assert seen == want, (design, seen)
    for f, c in zip(grads["fused"], grads["concat"]):
        torch.testing.assert_close(f, c, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("TARP_FAST_DX", "bogus")
    args, kws = cast(a, kw, torch.float32)
    y = run(tarp_linear_triton, args, kws)
    with pytest.raises(ValueError, match="TARP_FAST_DX"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dx_concat_tma(dtype, monkeypatch):
    """The concat GEMM's tma=True config reads dpre and the weight through TMA descriptors where
    they can serve (rows in order, 16-byte rows) and gives the reference's gradients."""
    from tarp_fast.kernels import _plan

    seen = set()
    run_launch = _plan.Launch.run

    def spy(launch):
        if launch.name == "dx_concat":
            seen.add(tuple(launch.tags.values()))
        run_launch(launch)

    monkeypatch.setattr(_plan.Launch, "run", spy)
    a, kw = make_case(M=45, K=48, N=48, r=4, skip="zero_rows", residual=True, activation="gelu_tanh", seed=23)
    with use_config(dx_concat=KernelConfig(16, 16, 32, num_warps=1, num_stages=1, tma=True)), use_dx_design("concat"):
        check_case(a, kw, dtype)
    assert seen == {(True, True)}, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout,expect", [
    ("plain", (True, True)),  # rows contiguous: x / dpre and the weight through TMA
    ("tasks-per-task-weight", (False, True)),  # grouped rows gathered by pointer; W [T, N, K]
    ("rows-not-16B", (False, False)),  # K * itemsize % 16 != 0 in fp16: pointer loads
])
def test_tma_loads(dtype, layout, expect, monkeypatch):
    """``tma=True`` configs of the forward and dx kernels read their row operand (x / dpre) and
    the weight, the pre-pass its x, through TMA descriptors where these can serve (checked through
    the launches' tags) and give the reference's results and gradients every time."""
    from tarp_fast.kernels import _plan

    K = 36 if layout == "rows-not-16B" else 48
    tasks = dict(T=3, q=2) if layout == "tasks-per-task-weight" else {}
    a, kw = make_case(M=45, K=K, N=K, r=4, gate="zero_rows", skip="zero_rows", residual=True, activation="gelu_tanh",
                      seed=21, **tasks)
    seen = {"fwd": set(), "dx": set(), "proj": set()}
    run_launch = _plan.Launch.run

    def spy(launch):
        if launch.name in seen:
            seen[launch.name].add(tuple(launch.tags.values()))
        run_launch(launch)

    monkeypatch.setattr(_plan.Launch, "run", spy)
    tma = dict(num_warps=1, num_stages=1, tma=True)
    with use_config(fwd=KernelConfig(16, 16, 16, **tma), dx=KernelConfig(16, 16, 32, **tma),
                    proj=KernelConfig(16, 16, 16, **tma)):
        check_case(a, kw, dtype)
    want = expect if not (layout == "rows-not-16B" and dtype == torch.float32) else (True, True)
    assert seen == {"fwd": {want}, "dx": {want}, "proj": {want[:1]}}, seen


def test_dispatch_through_ops():
    a, kw = make_case(M=12, K=16, N=20, r=2, seed=14)
    args, kws = cast(a, kw, torch.float32, requires_grad=False)
    y = ops.tarp_linear(args["x"], args["weight"], args["bias"], args["U"], args["V"], args["G"],
                        backend="triton", **kws)
    y_ref = reference.tarp_linear(args["x"], args["weight"], args["bias"], args["U"], args["V"], args["G"], **kws)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_validation_errors_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="'x'"):
        tarp_linear_triton(x.double(), torch.randn(8, 8).double())
    with pytest.raises(ValueError, match="'U'"):
        tarp_linear_triton(x, torch.randn(8, 8), None, torch.randn(7, 2), torch.randn(2, 8))
    with pytest.raises(ValueError, match="task_index"):
        tarp_linear_triton(x, torch.randn(8, 8), None, torch.randn(2, 8, 2), torch.randn(2, 2, 8),
                           task_index=torch.tensor([0, 1, 2, 1]))


def _schedule_by(impl, M, T, ti, gate, BM):
    """``(perm, seg_off, tile table)`` of one implementation of the row schedule."""
    if impl == "triton":
        with poison_outputs():  # an entry a kernel forgets to write reads -1
            perm, seg_off = _schedule.row_groups_triton(M, T, ti, gate)
            return perm, seg_off, _schedule.tile_table_triton(seg_off, M, T, BM)
    perm, seg_off = _schedule.row_groups(M, T, ti, None if gate is None else gate == 0, "cpu")
    return perm, seg_off, _schedule.tile_table(seg_off, M, T, BM)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_row_schedule_is_compact(impl):
    """Every kept row is in exactly one tile, tiles never mix segments, and the number of
    non-empty tiles is at most cdiv(count, BM) per segment: work follows the kept fraction."""
    g = torch.Generator().manual_seed(15)
    M, T, BM = 203, 4, 16
    ti = torch.randint(0, T, (M,), generator=g)
    drop = torch.rand(M, generator=g) < 0.7
    perm, seg_off, (seg, start, end, num) = _schedule_by(impl, M, T, ti, (~drop).float(), BM)
    seen = torch.zeros(M, dtype=torch.int64)
    nonempty = 0
    for s, a, b in zip(seg.tolist(), start.tolist(), end.tolist()):
        if b <= a:
            continue
        nonempty += 1
        rows = perm[a:b].long()
        seen[rows] += 1
        keys = torch.where(drop[rows], torch.full_like(rows, T), ti[rows])
        assert (keys == s).all()
    assert (seen == 1).all()
    counts = torch.bincount(torch.where(drop, torch.full_like(ti, T), ti), minlength=T + 1)
    assert nonempty == sum(-(-int(c) // BM) for c in counts)
    kept_tiles = sum(1 for s, a, b in zip(seg.tolist(), start.tolist(), end.tolist()) if b > a and s < T)
    assert kept_tiles <= -(-int((~drop).sum()) // BM) + T


@pytest.mark.parametrize("M,T,mode", [
    (0, 3, "tasks"), (1, 1, "tasks"), (1, 3, "drop"), (50, 1, "drop"), (50, 3, "tasks+drop"),
    (130, 9, "out-of-range"), (77, 300, "tasks"), (1100, 5, "tasks+drop"),
])
def test_triton_schedule_equals_the_torch_schedule(M, T, mode, monkeypatch):
    """The Triton counting sort and tile table give exactly the torch-ops schedule: ``perm``
    (stable: rows of a task in row order), ``seg_off`` and the tile table for two tile heights.
    Covers no rows, one row, chunks of 128 (M <= 128) and of 1024 (two chunks at M = 1100), 300
    tasks (512 key bins; the scan runs over two blocks and the tile table over 39 programs), and
    task indices out of range, which both count as dropped."""
    monkeypatch.setattr(_schedule, "SCAN_BLOCK", 256)  # so that 300 tasks take a two-block scan
    g = torch.Generator().manual_seed(M * 31 + T)
    ti = torch.randint(0, T, (M,), generator=g) if "drop" != mode else None
    if mode == "out-of-range":
        ti[::7] = T + 2
        ti[3::11] = -1
    gate = None
    if "drop" in mode:
        gate = torch.rand(M, generator=g) + 0.1
        gate[torch.rand(M, generator=g) < 0.4] = 0.0
    want = _schedule_by("torch", M, T, ti, gate, 16)
    for BM in (16, 64):
        perm, seg_off, table = _schedule_by("triton", M, T, ti, gate, BM)
        ref = _schedule.tile_table(want[1], M, T, BM)
        assert perm.dtype == seg_off.dtype == torch.int32
        assert torch.equal(perm, want[0]) and torch.equal(seg_off, want[1]), (perm, want[0], seg_off, want[1])
        assert table[3] == ref[3] and all(torch.equal(a, b) for a, b in zip(table[:3], ref[:3])), (table, ref)
    if mode == "out-of-range":  # the dropped segment holds exactly the out-of-range rows, in order
        bad = torch.nonzero((ti < 0) | (ti >= T)).flatten().to(torch.int32)
        assert torch.equal(want[0][int(want[1][T]):], bad)


@pytest.mark.parametrize("grouped", [True, False])
def test_opcheck_forward_op(grouped):
    """Grouped (tasks + hard skip: a row schedule) and plain (no schedule: empty perm / seg_off)."""
    a, kw = make_case(M=9, K=16, N=16, r=2, T=2 if grouped else None, seed=16)
    x = a["x"].float()
    ti = kw.get("task_index")
    gate = torch.rand(9)
    gate[2] = 0
    args = (x.requires_grad_(), a["weight"].float().requires_grad_(), a["bias"].float(), a["U"].float().requires_grad_(),
            a["V"].float(), a["G"].float(), ti, gate.requires_grad_(), None, None, 1.5, "relu", grouped)
    torch.library.opcheck(triton_tarp_fwd, args)


def test_torch_compile_fullgraph_no_graph_break():
    """The registered ops trace without graph breaks (forward and AOT-traced backward)."""
    a, kw = make_case(M=12, K=16, N=16, r=2, gate="zero_rows", skip="zero_rows", residual=True, activation="gelu_tanh",
                      seed=17)
    args, kws = cast(a, kw, torch.float32)

    def f(x, w, b, U, V, G, gate, sk, res):
        return tarp_linear_triton(x, w, b, U, V, G, gate=gate, skip_gate=sk, residual=res, activation="gelu_tanh")

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = [args["x"], args["weight"], args["bias"], args["U"], args["V"], args["G"], kws["gate"],
              kws["skip_gate"], args["residual"]]
    y = cf(*inputs)
    y.sum().backward()
    got = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    f(*inputs).sum().backward()
    for g1, t in zip(got, inputs):
        torch.testing.assert_close(g1, t.grad, rtol=1e-5, atol=1e-5)


def test_tarplinear_compiles_fullgraph_through_the_triton_backend():
    """The module path (TARPLinear -> ops.tarp_linear -> the Triton ops) has no graph break."""
    from tarp_fast import TARPLinear

    torch.manual_seed(18)
    layer = TARPLinear(16, 16, rank=3, scale_weight=True, scale_rank=2)
    torch.nn.init.normal_(layer.tarp_U, std=0.1)
    torch.nn.init.normal_(layer.tarp_P, std=0.1)
    layer.backend = "triton"
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 5, 16, requires_grad=True)
    layer(x)  # resolve the backend once outside tracing, as a training loop would
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in (layer.tarp_U, layer.tarp_V, layer.tarp_G, layer.tarp_P)]
    x.grad = None
    layer.zero_grad()
    layer.backend = "reference"
    layer(x).square().sum().backward()
    want = [x.grad] + [p.grad for p in (layer.tarp_U, layer.tarp_V, layer.tarp_G, layer.tarp_P)]
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the GPU report script: a failure marks its row and the report goes on (the whole script runs in
# tests/test_gpu_run_dry.py)
# ----------------------------------------------------------------------------------------------
def _load_report_module():
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_report.py")
    spec = importlib.util.spec_from_file_location("tarp_fast_gpu_report_smoke", path)
    report = importlib.util.module_from_spec(spec)
    saved_path = list(sys.path)
    try:
        spec.loader.exec_module(report)
    finally:
        sys.path[:] = saved_path
    return report


def test_gpu_report_survives_failures_and_writes_as_it_goes(tmp_path, monkeypatch):
    """A float64 check that fails marks its row (and the goal that rests on it) failed; a provider
    that raises becomes a failed row; later rows and sections still run, and the JSON file on disk
    is complete after every row (here: read back while the report runs)."""
    import json

    report = _load_report_module()
    calls = []
    real_check = report._check

    def flaky_check(ctx, inp, kw=None, grads=True):
        calls.append(1)
        res = real_check(ctx, inp, kw, grads)
        if len(calls) == 1:  # the first check (providers, r = 16) fails
            res = dict(res, ok=False)
        return res

    def broken_lora(inp):
        raise RuntimeError("CUDA out of memory (simulated)")

    seen_on_disk = []
    real_row = report.Report.row

    def row_and_read_back(self, **row):
        out = real_row(self, **row)
        seen_on_disk.append(len(json.loads(open(self.base + ".json").read())["rows"]))
        return out

    monkeypatch.setattr(report, "_check", flaky_check)
    monkeypatch.setattr(report, "_lora", broken_lora)
    monkeypatch.setattr(report.Report, "row", row_and_read_back)
    rc = report.main(["--dry-run", "--quick", "--sections", "providers,tasks", "--M", "24", "--K", "16",
                      "--check-M", "16", "--out", str(tmp_path), "--name", "r"])
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["status"].startswith("complete") and data["meta"]["dtype"] == "float16"
    assert seen_on_disk == list(range(1, len(data["rows"]) + 1))
    failed = [r for r in data["rows"] if not r["ok"]]
    assert any(r["mode"] == "check (float64)" for r in failed)
    assert any("out of memory" in (r.get("error") or "") for r in failed)
    goals = {g["goal"]: g for g in data["goals"]}
    assert not goals["r=16: fwd time / F.linear <= 1.10"]["met"]  # rests on the failed check
    assert "8 tasks in one batch / 1 task (same rows) <= 1.15" in goals  # the next section ran
    assert (tmp_path / "r.md").read_text().count("FAILED") >= 2
