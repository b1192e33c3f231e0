"""Adversarial inputs against every backend available in this process (issue 18).

One parametrized test, ``test_adversarial[case-backend]``, runs every case of ``CASES`` on every
backend that can run here:

* ``reference`` always (float64);
* ``native`` when the extension is built (float64);
* ``triton`` under ``TRITON_INTERPRET=1`` (CPU tensors, float32; those parameters carry the
  ``interpreter`` mark, so the CPU tier ``-m "not interpreter"`` leaves them out) or on a CUDA
  GPU (float32, ``gpu`` mark).

Every call goes through the public ``tarp_fast.ops.tarp_linear(..., backend=...)``, which
validates in Python before it dispatches. Error cases check the exception type and that the
message names the wrong argument (``'weight'`` ...). Value cases compare the output and every
gradient with ``tarp_fast.reference.tarp_linear`` in float64 on the same (rounded) values in a
plain layout, by the rule of ``tarp_fast.testing`` (every tier's): at most 2x the error of eager
PyTorch at the same precision plus a floor per dtype. Buffers a kernel forgets to write are
caught: CPU runs under ``torch.use_deterministic_algorithms(True)`` (fresh ``empty`` tensors hold
NaN) and the Triton backend under ``poison_outputs()``.

Inputs come from ``tarp_fast.testing.make_problem`` and ``torch.Generator``s seeded per case, so a case's
inputs do not depend on which tests ran before it.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import pytest
import torch

import tarp_fast
from tarp_fast import ops, reference
from tarp_fast.testing import make_problem, tolerance
from tarp_fast.testing import rel_err as max_rel_err

ARG_NAMES = ("x", "weight", "bias", "U", "V", "G", "P", "Q")
KW_TENSORS = ("gate", "skip_gate", "residual")
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
class Env:
    """One backend: where and in which dtype it runs, and how it is called."""

    def __init__(self, name: str):
        self.name = name
        self.device = torch.device("cuda" if name == "triton" and not TRITON_INTERPRETER else "cpu")
        self.dtype = torch.float32 if name == "triton" else torch.float64

    def other_float(self) -> torch.dtype:
        return torch.float32 if self.dtype == torch.float64 else torch.float64

    @contextlib.contextmanager
    def guard(self):
        """Unwritten output elements read NaN: deterministic mode on CPU, poisoned Triton buffers."""
        with contextlib.ExitStack() as stack:
            if self.device.type == "cpu":
                prev = torch.are_deterministic_algorithms_enabled()
                torch.use_deterministic_algorithms(True)
                stack.callback(torch.use_deterministic_algorithms, prev)
            if self.name == "triton":
                from tarp_fast.kernels import poison_outputs

                stack.enter_context(poison_outputs())
            yield

    def call(self, args: dict, kw: dict):
        with self.guard():
            return ops.tarp_linear(*(args.get(n) for n in ARG_NAMES), **kw, backend=self.name)


def _backend_params():
    params = [pytest.param("reference", id="reference")]
    if tarp_fast.available_backends()["native"] is None:
        params.append(pytest.param("native", id="native", marks=pytest.mark.native))
    if TRITON_INTERPRETER:
        if tarp_fast.available_backends()["triton"] is None:
            params.append(pytest.param("triton", id="triton", marks=pytest.mark.interpreter))
    elif torch.version.cuda and torch.cuda.is_available() and tarp_fast.available_backends()["triton"] is None:
        params.append(pytest.param("triton", id="triton", marks=pytest.mark.gpu))
    return params


# ----------------------------------------------------------------------------------------------
# problems
# ----------------------------------------------------------------------------------------------
def _generator(tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(tag.encode()))


def _problem(env: Env, tag: str, *, T=3, M=9, K=6, N=6, r=2, q=2, gate=None, skip_gate=None, residual=True,
             activation="none", hard_skip=False, scale=True, dynamic=True, delta=True, bias=True):
    """A float64 problem whose values are representable in ``env.dtype`` (rounded there and back),
    with a seeded task per row in which every task has rows (when ``M >= T``)."""
    g = _generator(tag)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        p = make_problem(M=M, K=K, N=N, r=r, q=q, T=T, bias=bias, delta=delta, dynamic=dynamic, scale=scale,
                         gate=gate, skip_gate=skip_gate, residual=residual, activation=activation,
                         hard_skip=hard_skip, scaling=0.7)
        if T > 1:
            p.kw["task_index"] = (torch.arange(M) % T)[torch.randperm(M)]
    return p.to(env.dtype).to(torch.float64)


def _clone(p):
    """A deep copy of a problem (``Problem.to`` returns the same tensors for the same dtype)."""
    copy = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
    q = type(p)(*(copy(t) for t in p.args()))
    q.kw = {k: copy(v) for k, v in p.kw.items()}
    return q


def _split(p):
    args = dict(zip(ARG_NAMES, p.args()))
    kw = dict(p.kw)
    return args, kw


def _materialize(env: Env, p, layout=None, grad=True):
    """``(args, kw, leaves)``: the problem in ``env``'s dtype and device; ``layout(name, t)`` may
    return a differently strided tensor of the same values; floating inputs require grad."""
    args, kw = _split(p)
    leaves = {}

    def one(name, t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach().to(device=env.device, dtype=env.dtype if t.is_floating_point() else t.dtype)
        if layout is not None:
            t = layout(name, t)
        if grad and t.is_floating_point():
            t.requires_grad_(True)
            leaves[name] = t
        return t

    args = {n: one(n, t) for n, t in args.items()}
    kw = {n: one(n, t) for n, t in kw.items()}
    return args, kw, leaves


def _out_and_grads(fn, args, kw, leaves, dy):
    out = fn(args, kw)
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], dy.to(out.device, out.dtype), allow_unused=True)
    return out, dict(zip(names, grads))


def _reference_call(args, kw):
    return reference.tarp_linear(*(args.get(n) for n in ARG_NAMES), **kw)


def _cpu_env(dtype):
    env = Env("reference")
    env.dtype = dtype
    return env


def _tolerance(env: Env, eager, ref) -> float:
    return tolerance(eager, ref, env.dtype)


def _dy(p, tag, ones=False):
    shape = tuple(p.x.shape[:-1]) + (p.weight.shape[0],)
    if ones:
        return torch.ones(shape, dtype=torch.float64)
    return torch.randn(shape, dtype=torch.float64, generator=_generator(tag + "/dy"))


def _check_against_reference(env: Env, p, tag: str, *, layout=None, ones=False):
    """Output and every gradient of ``env`` on ``p`` (laid out by ``layout``) against the float64
    reference on ``p`` in a plain layout."""
    dy = _dy(p, tag, ones)
    ref_env = _cpu_env(torch.float64)
    a64, k64, l64 = _materialize(ref_env, p)
    ref, gref = _out_and_grads(_reference_call, a64, k64, l64, dy)
    eager, geager = ref, gref
    if env.dtype != torch.float64:
        ae, ke, le = _materialize(_cpu_env(env.dtype), p)
        eager, geager = _out_and_grads(_reference_call, ae, ke, le, dy)
    args, kw, leaves = _materialize(env, p, layout)
    out, grads = _out_and_grads(env.call, args, kw, leaves, dy)
    assert out.dtype == env.dtype and tuple(out.shape) == tuple(ref.shape), (out.dtype, out.shape, ref.shape)
    err = max_rel_err(out.cpu(), ref)
    assert err <= _tolerance(env, eager, ref), f"output: rel err {err:.3g}"
    for name, g in gref.items():
        mine = grads[name]
        if g is None:
            assert mine is None or not bool(mine.detach().abs().gt(0).any()), f"{name}: gradient where none is due"
            continue
        assert mine is not None, f"{name}: no gradient"
        assert tuple(mine.shape) == tuple(g.shape), f"{name}: shape {tuple(mine.shape)} != {tuple(g.shape)}"
        err = max_rel_err(mine.cpu(), g)
        tol = _tolerance(env, geager[name], g)
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol:.3g}"
    return out, grads


# ----------------------------------------------------------------------------------------------
# error cases: (build the bad argument(s) from the problem, exception type, argument to name)
# ----------------------------------------------------------------------------------------------
def _f(env, *shape, dtype=None):
    return torch.randn(shape, dtype=dtype or env.dtype, device=env.device)


def _err(over, exc, name, *, T=3, words=(), **problem_kw):
    def case(env: Env):
        p = _problem(env, f"err/{name}", T=T, **problem_kw)
        args, kw, _ = _materialize(env, p, grad=False)
        for k, v in over(env, args, kw).items():
            (args if k in ARG_NAMES else kw)[k] = v
        with pytest.raises(exc) as info:
            env.call(args, kw)
        msg = str(info.value)
        assert f"'{name}'" in msg, msg
        for w in words:
            assert w in msg, (w, msg)

    return case


M_, K_, N_, R_, Q_, T_ = 9, 6, 6, 2, 2, 3  # the default problem of _problem (T_ tasks)
ERRORS = {
    # ---- shapes (size of one dimension) --------------------------------------------------------
    "shape-x-K": (lambda e, a, k: dict(x=_f(e, M_, K_ + 1)), ValueError, "x", dict(words=("K=6",))),
    "shape-weight-N": (lambda e, a, k: dict(weight=_f(e, N_ + 1, K_)), ValueError, "weight", {}),
    "shape-weight-K": (lambda e, a, k: dict(weight=_f(e, N_, K_ + 1)), ValueError, "weight", {}),
    "shape-bias-N": (lambda e, a, k: dict(bias=_f(e, N_ + 1)), ValueError, "bias", {}),
    "shape-U-N": (lambda e, a, k: dict(U=_f(e, T_, N_ + 1, R_)), ValueError, "U", {}),
    "shape-U-r": (lambda e, a, k: dict(U=_f(e, T_, N_, R_ + 1)), ValueError, "U", {}),
    "shape-U-T": (lambda e, a, k: dict(U=_f(e, T_ + 1, N_, R_)), ValueError, "U", {}),
    "shape-V-r": (lambda e, a, k: dict(V=_f(e, T_, R_ + 1, K_)), ValueError, "V", {}),
    "shape-V-K": (lambda e, a, k: dict(V=_f(e, T_, R_, K_ + 1)), ValueError, "V", {}),
    "shape-V-T": (lambda e, a, k: dict(V=_f(e, T_ - 1, R_, K_)), ValueError, "V", {}),
    "shape-G-rows": (lambda e, a, k: dict(G=_f(e, T_, R_ * R_ + 1, K_)), ValueError, "G", {}),
    "shape-G-K": (lambda e, a, k: dict(G=_f(e, T_, R_ * R_, K_ - 1)), ValueError, "G", {}),
    "shape-P-N": (lambda e, a, k: dict(P=_f(e, T_, N_ - 1, Q_)), ValueError, "P", {}),
    "shape-P-T": (lambda e, a, k: dict(P=_f(e, T_ + 1, N_, Q_)), ValueError, "P", {}),
    "shape-Q-q": (lambda e, a, k: dict(Q=_f(e, T_, Q_ + 1, K_)), ValueError, "Q", {}),
    "shape-Q-K": (lambda e, a, k: dict(Q=_f(e, T_, Q_, K_ + 1)), ValueError, "Q", {}),
    "shape-residual-N": (lambda e, a, k: dict(residual=_f(e, M_, N_ + 1)), ValueError, "residual", {}),
    "shape-residual-rows": (lambda e, a, k: dict(residual=_f(e, M_ - 1, N_)), ValueError, "residual", {}),
    "shape-gate": (lambda e, a, k: dict(gate=_f(e, M_ + 1)), ValueError, "gate", {}),
    "shape-gate-2d": (lambda e, a, k: dict(gate=_f(e, M_, 1)), ValueError, "gate", {}),
    "shape-skip_gate": (lambda e, a, k: dict(skip_gate=_f(e, M_ - 1)), ValueError, "skip_gate", {}),
    "shape-skip_gate-not-square": (lambda e, a, k: dict(weight=_f(e, N_, K_ + 1), bias=None, U=None, V=None,
                                                        G=None, P=None, Q=None, task_index=None, residual=None,
                                                        x=_f(e, M_, K_ + 1), skip_gate=0.5),
                                   ValueError, "skip_gate", {}),
    "shape-task_index-len": (lambda e, a, k: dict(task_index=k["task_index"][:-1]), ValueError, "task_index", {}),
    "shape-task_index-2d": (lambda e, a, k: dict(task_index=k["task_index"][:, None]), ValueError, "task_index", {}),
    # ---- numbers of dimensions -----------------------------------------------------------------
    "dims-x-scalar": (lambda e, a, k: dict(x=_f(e)), ValueError, "x", {}),
    "dims-weight-1d": (lambda e, a, k: dict(weight=_f(e, N_)), ValueError, "weight", {}),
    "dims-weight-3d": (lambda e, a, k: dict(weight=_f(e, 1, N_, K_)), ValueError, "weight", {}),
    "dims-bias-2d": (lambda e, a, k: dict(bias=_f(e, 1, N_)), ValueError, "bias", {}),
    "dims-U-4d": (lambda e, a, k: dict(U=_f(e, 1, T_, N_, R_)), ValueError, "U", {}),
    "dims-U-4d-single": (lambda e, a, k: dict(U=_f(e, 1, 1, N_, R_)), ValueError, "U", dict(T=1)),
    "dims-U-2d-with-tasks": (lambda e, a, k: dict(U=_f(e, N_, R_)), ValueError, "U", {}),
    "dims-G-2d-with-tasks": (lambda e, a, k: dict(G=_f(e, R_ * R_, K_)), ValueError, "G", {}),
    "dims-Q-1d": (lambda e, a, k: dict(Q=_f(e, K_)), ValueError, "Q", dict(T=1)),
    "dims-V-3d-without-tasks": (lambda e, a, k: dict(V=_f(e, 1, R_, K_)), ValueError, "V", dict(T=1)),
    # ---- dtypes --------------------------------------------------------------------------------
    "dtype-x-int": (lambda e, a, k: dict(x=torch.ones(M_, K_, dtype=torch.int64, device=e.device)), TypeError,
                    "x", {}),
    "dtype-weight-mixed": (lambda e, a, k: dict(weight=a["weight"].to(e.other_float())), TypeError, "weight", {}),
    "dtype-bias-mixed": (lambda e, a, k: dict(bias=a["bias"].to(e.other_float())), TypeError, "bias", {}),
    "dtype-U-mixed": (lambda e, a, k: dict(U=a["U"].to(e.other_float())), TypeError, "U", {}),
    "dtype-G-half": (lambda e, a, k: dict(G=a["G"].half()), TypeError, "G", {}),
    "dtype-Q-mixed": (lambda e, a, k: dict(Q=a["Q"].to(e.other_float())), TypeError, "Q", {}),
    "dtype-residual-mixed": (lambda e, a, k: dict(residual=k["residual"].to(e.other_float())), TypeError,
                             "residual", {}),
    "dtype-gate-int": (lambda e, a, k: dict(gate=torch.ones(M_, dtype=torch.int64, device=e.device)), TypeError,
                       "gate", {}),
    "dtype-task_index-float": (lambda e, a, k: dict(task_index=k["task_index"].float()), TypeError, "task_index",
                               dict(words=("int64",))),
    "dtype-task_index-bool": (lambda e, a, k: dict(task_index=k["task_index"] > 0), TypeError, "task_index",
                              dict(words=("int64",))),
    "dtype-task_index-int32": (lambda e, a, k: dict(task_index=k["task_index"].int()), TypeError, "task_index", {}),
    # ---- devices: a meta tensor mixed in -------------------------------------------------------
    "device-weight-meta": (lambda e, a, k: dict(weight=a["weight"].to("meta")), RuntimeError, "weight", {}),
    "device-V-meta": (lambda e, a, k: dict(V=a["V"].to("meta")), RuntimeError, "V", {}),
    "device-residual-meta": (lambda e, a, k: dict(residual=k["residual"].to("meta")), RuntimeError, "residual", {}),
    "device-gate-meta": (lambda e, a, k: dict(gate=torch.ones(M_, dtype=e.dtype, device="meta")), RuntimeError,
                         "gate", {}),
    "device-task_index-meta": (lambda e, a, k: dict(task_index=k["task_index"].to("meta")), RuntimeError,
                               "task_index", {}),
    # ---- task ids out of range -----------------------------------------------------------------
    "range-task_index-negative": (lambda e, a, k: dict(task_index=torch.where(k["task_index"] == 1, -1,
                                                                              k["task_index"])),
                                  ValueError, "task_index", {}),
    "range-task_index-eq-T": (lambda e, a, k: dict(task_index=torch.where(k["task_index"] == 2, T_,
                                                                          k["task_index"])),
                              ValueError, "task_index", {}),
}


# ----------------------------------------------------------------------------------------------
# NaN stays in its rows and tasks
# ----------------------------------------------------------------------------------------------
def _nan_case(where: str):
    def case(env: Env):
        tag = f"nan/{where}"
        p = _problem(env, tag, gate="task", skip_gate="row", residual=True)
        ti = p.kw["task_index"]
        bad_task = 1
        bad = _clone(p)
        if where == "x":
            row = int(torch.nonzero(ti == bad_task)[0])
            bad.x[row] = float("nan")
            bad_rows = torch.zeros(M_, dtype=torch.bool)
            bad_rows[row] = True
        else:
            getattr(bad, where)[bad_task].view(-1)[0] = float("nan")
            bad_rows = ti == bad_task
        good_rows = ~bad_rows
        good_tasks = torch.arange(T_) != bad_task
        dy = _dy(p, tag)
        # the truth: the clean problem in float64 (and eager float32 for the tolerance)
        a64, k64, l64 = _materialize(_cpu_env(torch.float64), p)
        clean, gclean = _out_and_grads(_reference_call, a64, k64, l64, dy)
        ae, ke, le = _materialize(_cpu_env(env.dtype), p)
        eager, geager = _out_and_grads(_reference_call, ae, ke, le, dy)
        # the float64 reference on the poisoned problem decides what shared gradients may hold
        an, kn, ln = _materialize(_cpu_env(torch.float64), bad)
        _, gnan = _out_and_grads(_reference_call, an, kn, ln, dy)
        args, kw, leaves = _materialize(env, bad)
        out, grads = _out_and_grads(env.call, args, kw, leaves, dy)
        out = out.detach().cpu()

        def close(mine, ref, eag, what):
            assert bool(torch.isfinite(mine).all()), f"{what}: NaN/inf leaked outside the poisoned rows/task"
            err = max_rel_err(mine, ref)
            tol = _tolerance(env, eag, ref)
            assert err <= tol, f"{what}: rel err {err:.3g} > {tol:.3g}"

        close(out[good_rows], clean[good_rows], eager[good_rows], "output (clean rows)")
        assert not bool(torch.isfinite(out[bad_rows]).all()), "the poisoned rows lost their NaN"
        per_row = {"x", "skip_gate", "residual"}
        per_task = {"U", "V", "G", "P", "Q", "gate"}
        for name, g in gclean.items():
            mine = grads[name].detach().cpu()
            if name in per_row:
                close(mine[good_rows], g[good_rows], geager[name][good_rows], f"grad {name} (clean rows)")
            elif name in per_task:
                close(mine[good_tasks], g[good_tasks], geager[name][good_tasks], f"grad {name} (clean tasks)")
            elif bool(torch.isfinite(gnan[name]).all()):  # shared (weight, bias): as the float64 math says
                close(mine, gnan[name], geager[name], f"grad {name}")
            else:
                assert not bool(torch.isfinite(mine).all()), f"grad {name}: the NaN the math puts there is missing"

    return case


# ----------------------------------------------------------------------------------------------
# zero sizes
# ----------------------------------------------------------------------------------------------
def _zero_case(dim: str, T: int, **flags):
    def case(env: Env):
        sizes = dict(M=M_, K=K_, N=N_, r=R_)
        sizes[dim] = 0
        plain = not flags  # no activation, no gate: bias.grad is exactly M for a ones gradient
        p = _problem(env, f"zero/{dim}/{T}/{sorted(flags)}", T=T, residual=True, **sizes, **flags)
        out, grads = _check_against_reference(env, p, f"zero/{dim}", ones=plain)
        assert tuple(out.shape) == (sizes["M"], sizes["N"])
        if plain:
            assert torch.equal(grads["bias"].cpu(), torch.full((sizes["N"],), float(sizes["M"]), dtype=env.dtype))
        for name in ("U", "V", "G", "P", "Q"):
            if name in grads:
                assert grads[name] is not None and bool(torch.isfinite(grads[name]).all()), name

    return case


# ----------------------------------------------------------------------------------------------
# strided inputs: the same values in other layouts give the same result
# ----------------------------------------------------------------------------------------------
def _sliced(t: torch.Tensor) -> torch.Tensor:
    """Every other element of the last dimension of a wider buffer (stride 2)."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = buf[..., ::2]
    view.copy_(t)
    return view


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """Column-major storage of the last two dimensions (a transposed view of a contiguous copy)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _strided_case(target: str, how: str, T: int = 3):
    def case(env: Env):
        p = _problem(env, f"strided/{target}/{how}/{T}", T=T, gate="row", skip_gate="row", residual=True,
                     activation="gelu_tanh")

        def layout(name, t):
            if name != target and target != "all":
                return t
            if t.dim() == 0:
                return t
            if how == "transposed" and t.dim() >= 2:
                out = _transposed(t)
            else:
                out = _sliced(t)
            assert not out.is_contiguous() and torch.equal(out, t)
            return out

        _check_against_reference(env, p, f"strided/{target}/{how}", layout=layout)

    return case


def _lead_dims_case(env: Env):
    """x [a, b, K] and residual [a, b, N] as permuted views (leading dims swapped in storage)."""
    p = _problem(env, "strided/lead", M=12, gate="row", skip_gate="row", residual=True, activation="relu")
    p.x = p.x.reshape(3, 4, K_)
    p.kw["residual"] = p.kw["residual"].reshape(3, 4, N_)

    def layout(name, t):
        if name in ("x", "residual"):
            out = t.transpose(0, 1).contiguous().transpose(0, 1)
            assert not out.is_contiguous()
            return out
        return t

    _check_against_reference(env, p, "strided/lead", layout=layout)


# ----------------------------------------------------------------------------------------------
# dtype and module cases
# ----------------------------------------------------------------------------------------------
def _all_bfloat16(env: Env):
    """All-bfloat16 inputs: refused under the Triton interpreter (numpy has no bfloat16), computed
    everywhere else within 2x eager bfloat16's error."""
    p = _problem(env, "bf16", gate="row", residual=True)
    p = p.to(torch.bfloat16).to(torch.float64)
    bf = Env(env.name)
    bf.dtype = torch.bfloat16
    if env.name == "triton" and env.device.type == "cpu":
        args, kw, _ = _materialize(bf, p, grad=False)
        with pytest.raises(RuntimeError) as info:
            bf.call(args, kw)
        msg = str(info.value)
        assert "bfloat16" in msg and "interpreter" in msg, msg
        return
    _check_against_reference(bf, p, "bf16")


def _module_task_index(kind: str):
    def case(env: Env):
        layer = tarp_fast.TARPLinear(K_, N_, rank=R_, num_tasks=T_, scale_weight=True, init="paper",
                                     dtype=env.dtype, device=env.device)
        layer.backend = env.name
        x = torch.randn(M_, K_, generator=_generator("module/x"), dtype=torch.float64).to(env.device, env.dtype)
        ti = (torch.arange(M_) % T_).to(env.device)
        if kind in ("float", "bool"):
            bad = ti.float() + 0.9 if kind == "float" else ti > 0
            with pytest.raises(TypeError) as info:
                layer(x, task_index=bad)
            msg = str(info.value)
            assert "'task_index'" in msg and "int64" in msg and str(bad.dtype) in msg, msg
            return
        # other integer dtypes are converted: same result as int64
        with env.guard():
            expect = layer(x, task_index=ti)
            got = layer(x, task_index=ti.to(torch.int32 if kind == "int32" else torch.uint8))
        torch.testing.assert_close(got, expect, rtol=0, atol=0)

    return case


# ----------------------------------------------------------------------------------------------
# the case table
# ----------------------------------------------------------------------------------------------
CASES = {}
for _name, (_over, _exc, _arg, _extra) in ERRORS.items():
    CASES[f"error-{_name}"] = _err(_over, _exc, _arg, **_extra)
for _where in ("U", "V", "G", "P", "Q", "x"):
    CASES[f"nan-{_where}"] = _nan_case(_where)
for _dim in ("M", "K", "N", "r"):
    for _T in (1, 3):
        CASES[f"zero-{_dim}-T{_T}"] = _zero_case(_dim, _T)
CASES["zero-K-T3-relu-taskgate-hardskip"] = _zero_case("K", 3, activation="relu", gate="task", hard_skip=True)
CASES["zero-r-T3-relu-taskgate-hardskip"] = _zero_case("r", 3, activation="relu", gate="task", hard_skip=True)
CASES["zero-r-T3-noscale"] = _zero_case("r", 3, scale=False)
for _target in ("x", "weight", "bias", "U", "V", "G", "P", "Q", "residual", "gate", "skip_gate", "task_index"):
    CASES[f"strided-{_target}-sliced"] = _strided_case(_target, "sliced")
    if _target not in ("bias", "gate", "skip_gate", "task_index"):
        CASES[f"strided-{_target}-transposed"] = _strided_case(_target, "transposed")
CASES["strided-all-sliced-T1"] = _strided_case("all", "sliced", T=1)
CASES["strided-all-transposed-T3"] = _strided_case("all", "transposed")
CASES["strided-lead-dims-permuted"] = _lead_dims_case
CASES["dtype-all-bfloat16"] = _all_bfloat16
for _kind in ("float", "bool", "int32", "uint8"):
    CASES[f"module-task_index-{_kind}"] = _module_task_index(_kind)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("case", sorted(CASES))
def test_adversarial(case, backend):
    env = Env(backend)
    if case.startswith("error-range-") and env.device.type == "cuda":
        pytest.skip("task ids are range-checked on CPU only: on CUDA a check would sync with the host")
    CASES[case](env)
