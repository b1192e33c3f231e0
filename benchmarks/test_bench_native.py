"""Native CPU backend (``tarp_fast._C``) against the eager reference composition, fwd and fwd+bwd.

``pytest benchmarks/test_bench_native.py --benchmark-only`` (CPU, float32, torch's thread count).

Shapes: the small adaptation shapes of issue 4 (M in {64, 512}, K = N in {128, 256, 768},
r in {4, 8, 16}) and one larger shape (M=2048, K=N=1024, r=16). fwd+bwd is an adaptation step:
the base weight and bias are frozen, ``x`` and the dynamic factors U, V, G require grad.
``test_native_epilogue`` adds the fused epilogue's flags at two shapes (gelu, relu, a per-row
gate that requires grad, a hard skip of half the rows, a skip gate with a residual) and
``test_native_factors`` the multiplicative term (P, Q trained) and four tasks through
``task_index``, because ``backend="auto"`` takes native for every CPU call and a slow path
would make it a loss.

Each benchmark first asserts the native output and every gradient against the float64 reference,
then pytest-benchmark times the native step, and finally both providers are timed *interleaved*
(native, reference, native, ...) in the same run, so machine load hits both alike; the medians
and ``speedup_vs_reference = reference / native`` go to ``benchmark.extra_info`` (printed at the
end of the run by ``benchmarks/conftest.py``). Plain calls also time, in the same round-robin,
the GEMMs of the math alone (``_gemm_floor``): ``reference_over_gemm_floor`` is the largest
speedup over the reference that any implementation on the same BLAS could show at that shape.
"""

from __future__ import annotations

import pytest
import torch
from harness import interleaved_medians

from tarp_fast import reference
from tarp_fast.testing import ARG_NAMES, Problem, compare, make_problem

_native = pytest.importorskip("tarp_fast._native")
_REASON = _native.unavailable_reason()
if _REASON is not None:
    pytest.skip(f"native extension not available: {_REASON}", allow_module_level=True)

SMALL = [(M, kn, kn, r) for M in (64, 512) for kn in (128, 256, 768) for r in (4, 8, 16)]
LARGE = [(2048, 1024, 1024, 16)]
MODES = ("fwd", "fwd+bwd")
SCALING = 0.5
def _ids(shape):
    M, K, N, r = shape
    return f"M{M}-K{K}-N{N}-r{r}"


def _inputs(shape, seed=0, tasks=0, q=0):
    """Inputs of one call by name, from the tests' case builder (:func:`tarp_fast.testing.make_problem`)
    and an output gradient ``dy``; ``tasks`` > 0: per-task factors [T, ...] and a random
    ``task_index``; ``q`` > 0: the multiplicative term's factors P [(T,) N, q], Q [(T,) q, K]."""
    M, K, N, r = shape
    p = make_problem(M, K, N, r, q or 1, tasks or 1, scale=bool(q), dtype=torch.float32, seed=seed)
    inp = {name: t for name, t in zip(ARG_NAMES, p.args()) if t is not None}
    if tasks:
        inp["task_index"] = p.kw["task_index"]
    inp["dy"] = torch.randn(M, N, generator=torch.Generator().manual_seed(seed + 1))
    return inp


#: Epilogue flags of ``test_native_epilogue``: name -> (M, N, generator) -> tarp_linear keywords.
EPILOGUES = {
    "gelu": lambda M, N, g: dict(activation="gelu_tanh"),
    "relu": lambda M, N, g: dict(activation="relu"),
    "gelu-rowgate": lambda M, N, g: dict(activation="gelu_tanh", gate=torch.rand(M, generator=g) + 0.5),
    "hardskip-half": lambda M, N, g: dict(gate=(torch.arange(M) % 2).float(), hard_skip=True),
    "skip-residual": lambda M, N, g: dict(skip_gate=torch.rand(M, generator=g),
                                          residual=torch.randn(M, N, generator=g)),
}
#: Factor layouts of ``test_native_factors``: name -> ``_inputs`` keywords (P and Q require grad
#: in fwd+bwd, as when the multiplicative term is trained).
FACTORS = {"scale-q4": dict(q=4), "tasks4": dict(tasks=4), "tasks4-scale-q4": dict(tasks=4, q=4)}


def _flags(name, shape):
    M, _, N, _ = shape
    return EPILOGUES[name](M, N, torch.Generator().manual_seed(1))


def _step(fn, inp, train, flags=None):
    """One call of ``fn`` (a tarp_linear), with the backward of an adaptation step when ``train``
    (a gate or skip gate in ``flags`` then requires grad too, as a TAMS controller's would)."""
    flags = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in (flags or {}).items()}
    if "task_index" in inp:
        flags["task_index"] = inp["task_index"]
    leaves = [inp[k].requires_grad_(train) for k in ("x", "U", "V", "G")]
    x, U, V, G = leaves
    P, Q = inp.get("P"), inp.get("Q")
    if train:
        leaves += [t.requires_grad_(True) for t in (P, Q) if t is not None]
        leaves += [flags[k].requires_grad_(True) for k in ("gate", "skip_gate")
                   if k in flags and not flags.get("hard_skip")]

    def run():
        y = fn(x, inp["weight"], inp["bias"], U, V, G, P, Q, scaling=SCALING, **flags)
        if train:
            return y, torch.autograd.grad(y, leaves, inp["dy"])
        return y, ()

    return run


def _check(shape, train, flags=None, layout=None):
    """Native (float32) against the float64 reference by the tests' rule (:func:`tarp_fast.testing.compare`):
    the output and, in fwd+bwd, the gradient of every input ``_step`` trains."""
    inp = _inputs(shape, **(layout or {}))
    kw = dict(flags or {}, scaling=SCALING)
    if "task_index" in inp:
        kw["task_index"] = inp["task_index"]
    trained = ["x", "U", "V", "G"] + [k for k in ("P", "Q") if k in inp]
    if not kw.get("hard_skip"):
        trained += [k for k in ("gate", "skip_gate") if torch.is_tensor(kw.get(k))]
    p = Problem(*(inp.get(name) for name in ARG_NAMES), kw=kw)
    compare(_native.tarp_linear_native, p, torch.float32, grads=train, wrt=trained, what=f"native {_ids(shape)}")


def _gemm_floor(shape, train):
    """The matrix products of one plain call (one task, no flags), and nothing else.

    Forward: the base ``x Wᵀ + b`` [M, K, N], the projection ``x [V; G]ᵀ`` [M, K, R] (R = r + r²,
    on a pre-stacked ``[V; G]``, so no copy is timed) and the delta ``z Uᵀ`` [M, r, N]. Backward
    (``train``, base frozen): ``dpre W`` [M, N, K], ``Uᵀ dpreᵀ`` [r, N, M], ``zᵀ dpre`` (dU) [r, M, N],
    ``dprojᵀ x`` (dV, dG) [R, M, K] and ``dproj [V; G]`` (dx) [M, R, K]. The reference and the
    native op both run every one of these through the same BLAS, so ``reference / floor`` bounds
    the speedup that any implementation on these GEMMs can reach at this shape.
    """
    M, K, N, r = shape
    R = r + r * r
    inp = _inputs(shape)
    x, W, b, U, dy = inp["x"], inp["weight"], inp["bias"], inp["U"], inp["dy"]
    VG = torch.cat([inp["V"], inp["G"]])
    g = torch.Generator().manual_seed(2)
    z, dproj = torch.randn(M, r, generator=g), torch.randn(M, R, generator=g)

    def run():
        pre = torch.addmm(b, x, W.t())
        torch.mm(x, VG.t())
        pre.addmm_(z, U.t())
        if train:
            dx = torch.mm(dy, W)
            torch.mm(U.t(), dy.t())
            torch.mm(z.t(), dy)
            torch.mm(dproj.t(), x)
            dx.addmm_(dproj, VG)

    return run


def _bench(benchmark, shape, mode, epilogue=None, factors=None):
    train = mode == "fwd+bwd"
    flags = _flags(epilogue, shape) if epilogue else None
    layout = FACTORS[factors] if factors else {}
    _check(shape, train, flags, layout)  # correctness before any timing
    M, K, N, r = shape
    benchmark.group = " ".join(["native", mode, _ids(shape)] + [v for v in (epilogue, factors) if v])
    benchmark.extra_info.update(shape=dict(M=M, K=K, N=N, r=r), mode=mode, dtype="float32",
                                threads=torch.get_num_threads(), epilogue=epilogue or "none",
                                factors=factors or "one task")
    native_run = _step(_native.tarp_linear_native, _inputs(shape, **layout), train, flags)
    benchmark.pedantic(native_run, rounds=5 if M * K * N < 2**28 else 2, iterations=1, warmup_rounds=1)
    if getattr(benchmark, "disabled", False):
        return
    ref_run = _step(reference.tarp_linear, _inputs(shape, **layout), train, flags)
    plain = epilogue is None and factors is None
    runs = [native_run, ref_run] + ([_gemm_floor(shape, train)] if plain else [])
    t_nat, t_ref, *t_floor = interleaved_medians(runs, min_time=0.4, max_reps=200)
    benchmark.extra_info.update(native_ms=round(t_nat * 1e3, 4), reference_ms=round(t_ref * 1e3, 4))
    benchmark.extra_info["speedup_vs_reference_ratio"] = round(t_ref / t_nat, 3)
    if t_floor:  # the GEMMs alone: how far any implementation on this BLAS could go
        benchmark.extra_info["gemm_floor_ms"] = round(t_floor[0] * 1e3, 4)
        benchmark.extra_info["reference_over_gemm_floor_ratio"] = round(t_ref / t_floor[0], 3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SMALL, ids=_ids)
def test_native_small(benchmark, shape, mode):
    _bench(benchmark, shape, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", LARGE, ids=_ids)
def test_native_large(benchmark, shape, mode):
    _bench(benchmark, shape, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("shape", [(64, 256, 256, 8), (512, 768, 768, 8)], ids=_ids)
def test_native_epilogue(benchmark, shape, epilogue, mode):
    _bench(benchmark, shape, mode, epilogue)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factors", list(FACTORS))
@pytest.mark.parametrize("shape", [(64, 256, 256, 8), (512, 768, 768, 8)], ids=_ids)
def test_native_factors(benchmark, shape, factors, mode):
    _bench(benchmark, shape, mode, factors=factors)
