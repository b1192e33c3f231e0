"""The oracle of every test tier and benchmark check: one case builder, one gate vocabulary, one
closeness rule (like ``torch.testing``: shipped, so a new backend can be checked the same way).

Rule: a backend's error is at most 2x the error of eager PyTorch (the reference run at the same
precision), plus a floor per dtype, both measured against the float64 reference on the same
(rounded) inputs, relative to ``max(|ref|_inf, 1)``; an output with NaN or inf where the float64
value is finite fails, so outputs allocated NaN-poisoned catch every element a kernel skips.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

ARG_NAMES = ("x", "weight", "bias", "U", "V", "G", "P", "Q")
#: the relative error allowed on top of 2x eager's: what rounding the output alone may cost
FLOOR = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
#: the gate vocabulary of :func:`make_problem` (``gate`` and ``skip_gate``)
GATES = (None, "float", "scalar", "row", "zero_rows", "task", "zero_task", "zero")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max(|ref|_inf, 1)`` in float64; ``inf`` when ``got`` has a NaN or inf
    where ``ref`` is all finite (an unwritten, NaN-poisoned element); 0 for empty tensors."""
    r64 = ref.detach().double()  # on ref's device: a GPU reduces an LLM-sized output in microseconds
    a64 = got.detach().to(r64.device, torch.float64)
    if not bool(torch.isfinite(a64).all()) and bool(torch.isfinite(r64).all()):
        return math.inf
    if a64.numel() == 0:
        return 0.0
    return float((a64 - r64).abs().max() / r64.abs().max().clamp_min(1.0))


def _eager_err(eager: Optional[torch.Tensor], ref: torch.Tensor, dtype: torch.dtype) -> Optional[float]:
    return None if eager is None or dtype == torch.float64 else rel_err(eager, ref)


def _tol(eager_err: Optional[float], dtype: torch.dtype) -> float:
    return FLOOR[dtype] if eager_err is None else 2.0 * eager_err + FLOOR[dtype]


def tolerance(eager: Optional[torch.Tensor], ref: torch.Tensor, dtype: torch.dtype) -> float:
    """``2 rel_err(eager, ref) + FLOOR[dtype]`` (just the floor in float64 or without ``eager``)."""
    return _tol(_eager_err(eager, ref, dtype), dtype)


def closeness(got: torch.Tensor, ref: torch.Tensor, eager: Optional[torch.Tensor],
              dtype: torch.dtype) -> tuple[float, Optional[float], float]:
    """The rule's figures for one tensor: ``(rel_err(got, ref), rel_err(eager, ref) or None, tolerance)``;
    it holds when the first is at most the last."""
    eager_err = _eager_err(eager, ref, dtype)
    return rel_err(got, ref), eager_err, _tol(eager_err, dtype)


def assert_close(got, ref, eager=None, *, dtype: torch.dtype, what: str = "") -> str:
    """Assert the rule for one tensor (``got`` from the backend, ``ref`` float64, ``eager`` the
    reference at ``dtype``); returns a one-line report. ``ref is None`` demands no gradient."""
    if ref is None:
        assert got is None or not bool(got.detach().abs().gt(0).any()), f"{what}: a gradient where none is due"
        return f"{what}: none"
    assert got is not None, f"{what}: missing (no gradient?)"
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err, eager_err, tol = closeness(got, ref, eager, dtype)
    line = f"{what}: rel err {err:.3g}, tol {tol:.3g}" + (f" (eager {eager_err:.3g})" if eager_err is not None else "")
    assert err <= tol, line + (" (NaN or inf: an unwritten element?)" if err == math.inf else "")
    return line


@contextlib.contextmanager
def tf32(on: bool):
    """TF32 for CUDA fp32 matmuls (cuBLAS and the kernels' fp32 dots) on or off inside the block,
    restored after. Through ``torch.backends.cuda.matmul.fp32_precision`` where torch has it (torch
    >= 2.9: once it is set, reading the legacy ``allow_tf32`` raises), the legacy flag otherwise."""
    m = torch.backends.cuda.matmul
    attr, value = ("fp32_precision", "tf32" if on else "ieee") if hasattr(m, "fp32_precision") else ("allow_tf32", on)
    saved = getattr(m, attr)
    setattr(m, attr, value)
    try:
        yield
    finally:
        setattr(m, attr, saved)


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """Arguments of one tarp_linear call (tensors and keyword options)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    U: Optional[torch.Tensor] = None
    V: Optional[torch.Tensor] = None
    G: Optional[torch.Tensor] = None
    P: Optional[torch.Tensor] = None
    Q: Optional[torch.Tensor] = None
    kw: dict = field(default_factory=dict)

    def args(self):
        return (self.x, self.weight, self.bias, self.U, self.V, self.G, self.P, self.Q)

    def tensors(self):
        """Every tensor input, by name (positional factors and tensor keywords)."""
        named = dict(zip(ARG_NAMES, self.args()))
        for k in ("gate", "skip_gate", "residual"):
            if isinstance(self.kw.get(k), torch.Tensor):
                named[k] = self.kw[k]
        return {k: v for k, v in named.items() if v is not None}

    def to(self, dtype, *, requires_grad: Union[bool, Collection[str], None] = None):
        """Same problem in another dtype (float tensors only; task_index stays int64), as fresh
        leaves: every float tensor requires grad when ``requires_grad`` is True, the named ones
        (argument names, e.g. ``("x", "U")``) when it is a collection."""
        leaves = set(ARG_NAMES) | set(self.kw) if requires_grad is True else set(requires_grad or ())

        def cast(name, t):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                return t
            return t.detach().to(dtype).requires_grad_(name in leaves)

        return Problem(*(cast(n, t) for n, t in zip(ARG_NAMES, self.args())),
                       kw={k: cast(k, v) for k, v in self.kw.items()})

    def rows(self, m: int) -> Problem:
        """The first ``m`` rows of a problem with a 2-D ``x``: ``x``, ``task_index``, ``residual``
        and per-row ``[M]`` gates sliced; the factors and per-task ``[T]`` gates shared (a 1-D gate
        of length ``T`` is per task when ``task_index`` is given, as in ``tarp_fast._contract``)."""
        M = self.x.shape[0]
        multi = "task_index" in self.kw
        T = next((t.shape[0] for t in self.args()[3:] if t is not None and t.dim() == 3), None)

        def head(k, v):
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                return v
            if k in ("gate", "skip_gate") and (v.shape[0] != M or (multi and v.shape[0] == T)):
                return v
            return v[:m]

        return Problem(self.x[:m], *self.args()[1:], kw={k: head(k, v) for k, v in self.kw.items()})

    def call(self, fn: Callable):
        return fn(*self.args(), **self.kw)


def _gate(kind, M: int, T: int, rand, dtype) -> object:
    """One gate of the vocabulary :data:`GATES` (tensors of ``dtype`` on the CPU)."""
    if kind is None:
        return None
    if kind == "float":
        return 0.75  # a Python number: no gradient
    if kind == "scalar":
        return torch.tensor(0.8, dtype=dtype)
    if kind == "zero":
        return torch.zeros(M, dtype=dtype)
    if kind in ("task", "zero_task"):
        v = rand(T) + 0.1
        if kind == "zero_task":
            v[0] = 0.0  # a whole task gated off (hard skip drops its rows)
        return v
    v = rand(M) + 0.1
    if kind == "zero_rows":
        v[::2] = 0.0
    elif kind != "row":
        raise ValueError(f"unknown gate kind {kind!r}; one of {GATES}")
    return v


def make_problem(
    M=7, K=12, N=10, r=3, q=2, T=1, *, lead=None, dtype=torch.float64, bias=True, delta=True,
    dynamic=True, scale=True, gate=None, skip_gate=None, residual=False, activation="none",
    hard_skip=False, scaling=0.7, scale_offset=None, seed=None, device="cpu",
) -> Problem:
    """A random problem (every tier's case builder). ``T > 1`` stacks the factors and draws a
    ``task_index``; ``gate`` / ``skip_gate`` from :data:`GATES`. Drawn on the CPU from the global
    generator (seeded per test by conftest) or from ``torch.Generator().manual_seed(seed)`` in
    ``dtype``, then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=gen, dtype=dtype)  # noqa: E731
    shape = tuple(lead) + (K,) if lead is not None else (M, K)
    M = math.prod(shape[:-1])
    T = T or 1
    pre = (T,) if T > 1 else ()
    sK = math.sqrt(max(K, 1))
    p = Problem(x=rn(*shape), weight=rn(N, K) / sK)
    if bias:
        p.bias = rn(N)
    if delta:
        p.U = rn(*pre, N, r) / math.sqrt(max(r, 1))
        p.V = rn(*pre, r, K) / sK
        if dynamic:
            p.G = rn(*pre, r * r, K) / sK
    if scale:
        p.P = rn(*pre, N, q) * 0.5
        p.Q = rn(*pre, q, K) * 0.5
    kw = dict(scaling=scaling, activation=activation, hard_skip=hard_skip)
    if scale_offset is not None:
        kw["scale_offset"] = scale_offset
    if T > 1:
        kw["task_index"] = torch.randint(0, T, (M,), generator=gen)
    for name, kind in (("gate", gate), ("skip_gate", skip_gate)):
        value = _gate(kind, M, T, rand, dtype)
        if value is not None:
            kw[name] = value
    if residual:
        kw["residual"] = rn(*shape[:-1], N)

    def place(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    return Problem(*(place(t) for t in p.args()), kw={k: place(v) for k, v in kw.items()})


# ----------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------
def outputs_and_grads(fn: Callable, p: Problem, dy: Optional[torch.Tensor]):
    """``fn``'s output on ``p`` and the gradient (for ``dy``) of every leaf that requires grad."""
    y = p.call(fn)
    if dy is None:
        return y, {}
    leaves = {k: t for k, t in p.tensors().items() if t.requires_grad}
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(y.device, y.dtype), allow_unused=True)
    return y, dict(zip(leaves, grads))


def against_float64(fn: Callable, p: Problem, dtype: torch.dtype, *, grads: bool = True,
                    wrt: Optional[Collection[str]] = None, poison: Callable = contextlib.nullcontext,
                    fn_only: bool = False) -> dict:
    """``fn`` (a ``tarp_linear``-like callable) at ``dtype``, the float64 reference and eager PyTorch
    (the reference at ``dtype``), all three on ``p``'s inputs first rounded to ``dtype`` (so the
    comparison measures the computation, not the rounding of the inputs); ``fn`` runs inside
    ``poison()`` (e.g. ``tarp_fast.kernels.poison_outputs``).

    Returns ``{name: (got, ref, eager)}`` for the output ``"y"`` and, with ``grads``, ``"grad <input>"``
    for each tensor input named in ``wrt`` (default: every one), for one fixed ``dy``. ``fn_only``
    runs ``fn`` alone, as the comparison would, and returns ``{}`` (a capture of its launches).
    """
    from tarp_fast import reference

    rounded = p.to(dtype).to(torch.float64)
    leaves = (True if wrt is None else tuple(wrt)) if grads else False
    dy = None
    if grads:  # float64 from a fixed seed, on p's device
        gen = torch.Generator().manual_seed(123)
        dy = torch.randn(*p.x.shape[:-1], p.weight.shape[0], generator=gen, dtype=torch.float64).to(p.x.device)

    def run(f, at, scope=contextlib.nullcontext):
        with scope():
            return outputs_and_grads(f, rounded.to(at, requires_grad=leaves), dy)

    y, g = run(fn, dtype, poison)
    if fn_only:
        return {}
    y64, g64 = run(reference.tarp_linear, torch.float64)
    ye, ge = run(reference.tarp_linear, dtype)
    out = {"y": (y, y64, ye)}
    out.update({f"grad {name}": (g.get(name), ref, ge.get(name)) for name, ref in g64.items()})
    return out


def compare(fn: Callable, p: Problem, dtype: torch.dtype, *, grads: bool = True,
            wrt: Optional[Collection[str]] = None, poison: Callable = contextlib.nullcontext,
            check: bool = True, what: str = "") -> list:
    """Assert the rule on :func:`against_float64`'s results: the output and, with ``grads``, the
    gradient of every input in ``wrt`` (default: every tensor input). ``check=False`` only runs
    ``fn`` as the comparison would (a capture, where results are garbage); ``what`` prefixes the
    messages. Returns the report lines."""
    results = against_float64(fn, p, dtype, grads=grads, wrt=wrt, poison=poison, fn_only=not check)
    if not check:
        return []
    y, y64, _ = results["y"]
    assert y.dtype == dtype and y.shape == y64.shape, (y.dtype, y.shape, y64.shape)
    pre = f"{what}: " if what else ""
    return [assert_close(got, ref, eager, dtype=dtype, what=pre + name) for name, (got, ref, eager) in results.items()]
