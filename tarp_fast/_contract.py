"""Validation and normalization of `tarp_linear` arguments: one call object for every backend.

:func:`check_tarp_args` checks a call once and returns a :class:`TarpCall` (sizes, normalized
tensors, derived flags) that every backend's ``run(call)`` takes, so a bad argument gives the same
error whichever backend runs. Errors name the argument, what was expected and what was given;
no ``assert`` is used, so the checks hold under ``python -O``.

Shape contract (DESIGN.md §2), with ``M`` the number of rows after flattening ``x [..., K]``:

=============  ==========================  =====================================
argument       single task                 ``T`` tasks (with ``task_index [M]``)
=============  ==========================  =====================================
``weight``     ``[N, K]``                  ``[N, K]`` (shared)
``bias``       ``[N]``                     ``[N]``
``U``          ``[N, r]``                  ``[T, N, r]``
``V``          ``[r, K]``                  ``[T, r, K]``
``G``          ``[r*r, K]``                ``[T, r*r, K]``
``P``          ``[N, q]``                  ``[T, N, q]``
``Q``          ``[q, K]``                  ``[T, q, K]``
``gate``       scalar or ``[M]``           scalar, ``[M]`` or ``[T]``
``skip_gate``  scalar or ``[M]``           scalar, ``[M]`` or ``[T]``
``residual``   ``[..., N]``                ``[..., N]``
=============  ==========================  =====================================

A 1-D gate whose length is ``T`` is read per task when ``task_index`` is given (even when
``M == T``: pass ``gate[task_index]`` to be explicit about per-row gates in that case).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple, Optional, Union

import torch

ACTIVATIONS = ("none", "relu", "gelu_tanh")

#: ``softplus(log(e - 1)) == 1``: with this offset the multiplicative scale is exactly 1 when
#: ``P Q == 0``, so a freshly initialised layer equals its base.
DEFAULT_SCALE_OFFSET = math.log(math.e - 1.0)

GateLike = Union[None, float, int, torch.Tensor]


@dataclass(frozen=True)
class TarpSpec:
    """Sizes and flags of one validated `tarp_linear` call.

    ``gate_kind`` / ``skip_kind`` are ``"none"``, ``"scalar"``, ``"row"`` or ``"task"``.
    """

    M: int
    K: int
    N: int
    rank: int
    scale_rank: int
    num_tasks: int
    has_bias: bool
    has_delta: bool
    dynamic: bool
    has_scale: bool
    multi_task: bool
    gate_kind: str
    skip_kind: str
    has_residual: bool
    activation: str
    hard_skip: bool
    out_shape: tuple
    dtype: torch.dtype
    device: torch.device


class Needs(NamedTuple):
    """Which inputs of a call need a gradient (the order of the native op's ``needs`` bits).

    Read by :attr:`TarpCall.needs` from ``requires_grad`` under grad mode, and by each backward
    from its autograd context. ``residual`` is not listed: its gradient is ``dy`` itself.
    """

    x: bool = False
    weight: bool = False
    bias: bool = False
    U: bool = False
    V: bool = False
    G: bool = False
    P: bool = False
    Q: bool = False
    gate: bool = False
    skip_gate: bool = False

    @classmethod
    def from_bits(cls, mask: int) -> Needs:
        """The flags of a ``native_tarp_bwd`` bit mask (bit i = field i, csrc/tarp_common.h)."""
        return cls(*((mask >> i) & 1 == 1 for i in range(len(cls._fields))))


NO_NEEDS = Needs()

ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


@dataclass(frozen=True)
class TarpCall:
    """One validated `tarp_linear` call, normalized once for every backend.

    Tensors: ``x [M, K]`` (``x [..., K]`` flattened), ``bias`` and the factors contiguous,
    ``task_index [M]`` contiguous int64, ``residual [M, N]`` contiguous; each ``None`` when not
    given. ``weight`` is kept as given: a GPT-2 ``Conv1D`` layer passes a transposed view of its
    ``[in, out]`` parameter, which the reference and the native op read as it is (no ``[N, K]``
    copy per call); the Triton path makes it contiguous. ``gate`` / ``skip_gate`` are kept as given (``None``, a Python number or a
    tensor; their kinds are in ``spec``): :meth:`gate_rows` reads them per row in the dtype a
    backend computes in, and the native op takes them as they are.

    Derived flags: ``act`` (the activation's code, ``none=0, relu=1, gelu_tanh=2``, shared with
    csrc/tarp_common.h) and ``needs`` (which inputs require a gradient, a :class:`Needs`; read when
    asked, as only the native backend asks).
    """

    spec: TarpSpec
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    U: Optional[torch.Tensor]
    V: Optional[torch.Tensor]
    G: Optional[torch.Tensor]
    P: Optional[torch.Tensor]
    Q: Optional[torch.Tensor]
    task_index: Optional[torch.Tensor]
    gate: GateLike
    skip_gate: GateLike
    residual: Optional[torch.Tensor]
    scaling: float
    scale_offset: float
    activation: str
    act: int
    hard_skip: bool

    @property
    def needs(self) -> Needs:
        """Which inputs require a gradient now (all False outside grad mode)."""
        if not torch.is_grad_enabled():
            return NO_NEEDS
        return Needs(*(isinstance(t, torch.Tensor) and t.requires_grad for t in (
            self.x, self.weight, self.bias, self.U, self.V, self.G, self.P, self.Q, self.gate, self.skip_gate)))

    def gate_rows(self, which: str, dtype: torch.dtype, gather: Optional[Callable] = None):
        """``gate`` or ``skip_gate`` (``which``) as used per row: ``None``, a Python float, or a
        0-d / ``[M]`` tensor of ``dtype`` (a per-task ``[T]`` gate read per row by ``task_index``,
        with ``gather(g, task_index)`` when given, else by indexing)."""
        g = self.gate if which == "gate" else self.skip_gate
        if not isinstance(g, torch.Tensor):
            return None if g is None else float(g)
        g = g.to(dtype)
        kind = self.spec.gate_kind if which == "gate" else self.spec.skip_kind
        if kind == "task":
            return gather(g, self.task_index) if gather is not None else g[self.task_index]
        return g


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.contiguous() if t is not None else None


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_device(name: str, t: torch.Tensor, x: torch.Tensor, where: str = "the same device as x") -> None:
    if t.device != x.device:
        raise RuntimeError(f"tarp_linear: argument '{name}' must be on {where} ({x.device}), got {t.device}")


def _check_tensor(name: str, t, x: torch.Tensor, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tarp_linear: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    _check_device(name, t, x)
    if floating and t.dtype != x.dtype:
        raise TypeError(
            f"tarp_linear: argument '{name}' must have the dtype of x ({x.dtype}), got {t.dtype}"
        )


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _vote(sources):
    """The size most of ``sources`` (``[(argument, size or None)]``, in priority order) agree on.

    Returns ``(size, supporters)``; ties go to the size of the earliest source in the list (a
    ``None`` size, e.g. a ``G`` whose row count is not a square, agrees with nothing).
    """
    counts: dict = {}
    for _, v in sources:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    if not counts:
        return None, []
    best = max(counts.values())
    size = next(v for _, v in sources if v is not None and counts[v] == best)
    return size, [n for n, v in sources if v == size]


def _expect_dims(name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    if t.dim() != dims:
        raise ValueError(f"tarp_linear: argument '{name}' must be {dims}-D {layout}, got {_shape(t)}")


def _gate_kind(name: str, g: GateLike, x: torch.Tensor, M: int, T: int, multi: bool) -> str:
    if g is None:
        return "none"
    if isinstance(g, bool):
        raise TypeError(f"tarp_linear: argument '{name}' must be a float or a tensor, got bool")
    if isinstance(g, (int, float)):
        return "scalar"
    if not isinstance(g, torch.Tensor):
        raise TypeError(
            f"tarp_linear: argument '{name}' must be None, a float or a tensor, got {type(g).__name__}"
        )
    _check_device(name, g, x)
    if not g.is_floating_point():
        raise TypeError(f"tarp_linear: argument '{name}' must be a floating tensor, got {g.dtype}")
    if g.dim() == 0:
        return "scalar"
    if g.dim() == 1:
        if multi and g.shape[0] == T:
            return "task"
        if g.shape[0] == M:
            return "row"
    expected = f"a scalar or [M]=[{M}]" + (f" or [T]=[{T}] (per task)" if multi else "")
    raise ValueError(f"tarp_linear: argument '{name}' must be {expected}, got {_shape(g)}")


#: The keyword options of ``tarp_linear`` and their defaults, in signature order. The public
#: signatures (:func:`tarp_fast.ops.tarp_linear`, :func:`tarp_fast.reference.tarp_linear`) spell
#: them out for readers and IDEs; every internal caller passes them through :func:`check_tarp_args`
#: as keywords (tests/test_contract.py checks that both signatures match this table).
OPTION_DEFAULTS = MappingProxyType(dict(
    scaling=1.0, scale_offset=DEFAULT_SCALE_OFFSET, task_index=None, gate=None, skip_gate=None,
    residual=None, activation="none", hard_skip=False,
))
_OPTION_NAMES = frozenset(OPTION_DEFAULTS)


def check_tarp_args(x, weight, bias=None, U=None, V=None, G=None, P=None, Q=None, **options) -> TarpCall:
    """Validate a `tarp_linear` call and return it as a :class:`TarpCall` (sizes in ``call.spec``).

    ``options`` are the keyword options of :data:`OPTION_DEFAULTS` (``scaling`` ... ``hard_skip``);
    an unknown keyword raises ``TypeError`` as an unknown keyword of a Python function does.

    Raises ``TypeError`` for wrong types/dtypes, ``ValueError`` for wrong shapes or values and
    ``RuntimeError`` for device mismatches. Task indices are not range-checked here (that needs a
    device sync); the reference backend checks them, fast backends document their behaviour.

    Which argument a size mismatch is blamed on: each size is read from every argument that
    carries it (``K``: weight, x, V, G, Q; ``N``: weight, bias, U, P, residual; ``r``: U, V and
    G's ``r*r`` rows; ``q``: P, Q; ``T``: the stacked factors) and the value most of them agree on
    wins; a tie goes to the first of that list (the weight for ``K`` and ``N``, ``U`` for ``r`` and
    ``T``, ``P`` for ``q``). The error names the first argument (in signature order) that
    disagrees, the shape it must have and the arguments that size was read from. So a weight
    with one row too many is blamed on ``weight`` (bias and U agree on ``N``), a weight with
    one column too many on ``weight`` (x and the factors agree on ``K``) and a ``U [T+1, N, r]``
    on ``U`` (V, G, P and Q agree on ``T``). ``M`` is always x's (rows of x).

    Rank ``r = 0`` (``U [N, 0]``, ``V [0, K]``, ``G [0, K]``) is valid: the delta is exactly 0 and
    the factors' gradients are (empty) zeros. ``K = 0``, ``N = 0`` and ``M = 0`` are valid too:
    with ``K = 0`` the output is ``act(bias)`` (gated, plus skip and residual).
    """
    if not options.keys() <= _OPTION_NAMES:
        unknown = sorted(options.keys() - _OPTION_NAMES)[0]
        raise TypeError(f"tarp_linear() got an unexpected keyword argument {unknown!r}; "
                        f"the options are {', '.join(OPTION_DEFAULTS)}")
    scaling, scale_offset, task_index, gate, skip_gate, residual, activation, hard_skip = map(
        options.get, OPTION_DEFAULTS.keys(), OPTION_DEFAULTS.values())
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tarp_linear: argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"tarp_linear: argument 'x' must be a floating tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("tarp_linear: argument 'x' must have at least 1 dimension [..., K], got a scalar")

    # ---- types, devices and dtypes of every tensor argument ---------------------------------
    _check_tensor("weight", weight, x)
    named = (("bias", bias), ("U", U), ("V", V), ("G", G), ("P", P), ("Q", Q), ("residual", residual))
    for name, t in named:
        if t is not None:
            _check_tensor(name, t, x)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"tarp_linear: argument 'activation' must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(hard_skip, bool):
        raise TypeError(f"tarp_linear: argument 'hard_skip' must be a bool, got {type(hard_skip).__name__}")
    for name, val in (("scaling", scaling), ("scale_offset", scale_offset)):
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"tarp_linear: argument '{name}' must be a Python float, got {type(val).__name__}")
        # (inside a torch.compile trace with dynamic=True a float may be symbolic: not checked there)
        if not torch.compiler.is_compiling() and not math.isfinite(float(val)):
            raise ValueError(f"tarp_linear: argument '{name}' must be finite, got {val}")
    multi = task_index is not None
    if multi:
        if not isinstance(task_index, torch.Tensor):
            raise TypeError(
                f"tarp_linear: argument 'task_index' must be a torch.Tensor, got {type(task_index).__name__}"
            )
        if task_index.dtype != torch.int64:
            raise TypeError(f"tarp_linear: argument 'task_index' must be int64, got {task_index.dtype}")
        _check_device("task_index", task_index, x, "the device of x")

    # ---- which arguments go together -----------------------------------------------------------
    if (U is None) != (V is None):
        raise ValueError(
            "tarp_linear: arguments 'U' and 'V' must be given together, got "
            + ("U without V" if V is None else "V without U")
        )
    if G is not None and U is None:
        raise ValueError("tarp_linear: argument 'G' needs 'U' and 'V', got G alone")
    if (P is None) != (Q is None):
        raise ValueError(
            "tarp_linear: arguments 'P' and 'Q' must be given together, got "
            + ("P without Q" if Q is None else "Q without P")
        )

    # ---- numbers of dimensions -----------------------------------------------------------------
    _expect_dims("weight", weight, 2, "[N, K]")
    if bias is not None:
        _expect_dims("bias", bias, 1, "[N]")
    layouts = dict(U="[N, r]", V="[r, K]", G="[r*r, K]", P="[N, q]", Q="[q, K]")
    factors = [(n, t) for n, t in (("U", U), ("V", V), ("G", G), ("P", P), ("Q", Q)) if t is not None]
    if multi:
        if U is None and P is None:
            raise ValueError(
                "tarp_linear: argument 'task_index' needs per-task factors (U [T, N, r] or P [T, N, q]), got neither"
            )
        for n, t in factors:
            if t.dim() != 3:
                raise ValueError(
                    f"tarp_linear: argument '{n}' must be 3-D [T, {layouts[n][1:]} with 'task_index' (the factors "
                    f"need a leading task dimension), got {_shape(t)}"
                )
    else:
        for n, t in factors:
            if t.dim() == 3:
                raise ValueError(
                    f"tarp_linear: argument '{n}' has a task dimension but 'task_index' is None; "
                    "pass task_index [M] (int64) to select a task per row"
                )
            if t.dim() != 2:
                raise ValueError(
                    f"tarp_linear: argument '{n}' must be 2-D {layouts[n]} (or 3-D [T, {layouts[n][1:]} with "
                    f"'task_index'), got {_shape(t)}"
                )

    # ---- sizes: each read from every argument that carries it, the majority wins -----------------
    def square_root(rows: int):
        root = math.isqrt(rows)
        return root if root * root == rows else None

    K, K_from = _vote([("weight", weight.shape[1]), ("x", x.shape[-1])]
                      + [(n, t.shape[-1]) for n, t in (("V", V), ("G", G), ("Q", Q)) if t is not None])
    N_src = [("weight", weight.shape[0])] + [(n, t.shape[-2 if n in ("U", "P") else 0]) for n, t in
                                            (("bias", bias), ("U", U), ("P", P)) if t is not None]
    if residual is not None and residual.dim() >= 1:
        N_src.append(("residual", residual.shape[-1]))
    N, N_from = _vote(N_src)
    rank, r_from = 0, []
    if U is not None:
        rank, r_from = _vote([("U", U.shape[-1]), ("V", V.shape[-2])]
                             + ([("G", square_root(G.shape[-2]))] if G is not None else []))
    scale_rank, q_from = 0, []
    if P is not None:
        scale_rank, q_from = _vote([("P", P.shape[-1]), ("Q", Q.shape[-2])])
    T, T_from = 1, []
    if multi:
        T, T_from = _vote([(n, t.shape[0]) for n, t in factors])
    M = math.prod(x.shape[:-1])
    sizes = dict(T=(T, T_from), N=(N, N_from), K=(K, K_from), r=(rank, r_from), q=(scale_rank, q_from))

    def blame(name: str, t: torch.Tensor, layout: tuple, expected: tuple) -> None:
        if tuple(t.shape) == tuple(expected):
            return
        why = []
        for dim, want, got in zip(layout, expected, t.shape):
            if want == got:
                continue
            letter = "r" if dim == "r*r" else dim
            if letter in sizes:
                value, sources = sizes[letter]
                others = [s for s in sources if s != name]
                why.append(f"{letter}={value}" + (f" as in {', '.join(others)}" if others else ""))
        exp = _fmt(expected)
        raise ValueError(
            f"tarp_linear: argument '{name}' must have shape {exp} ([{', '.join(layout)}]"
            + (f"; {'; '.join(why)}" if why else "") + f"), got {_shape(t)}"
        )

    if x.shape[-1] != K:
        raise ValueError(
            f"tarp_linear: argument 'x' must have last dimension K={K} (K as in "
            f"{', '.join(s for s in K_from if s != 'x')}; weight is {_shape(weight)}), got {_shape(x)}"
        )
    lead = ("T",) if multi else ()
    lead_size = (T,) if multi else ()
    blame("weight", weight, ("N", "K"), (N, K))
    if bias is not None:
        blame("bias", bias, ("N",), (N,))
    if U is not None:
        blame("U", U, lead + ("N", "r"), lead_size + (N, rank))
        blame("V", V, lead + ("r", "K"), lead_size + (rank, K))
        if G is not None:
            blame("G", G, lead + ("r*r", "K"), lead_size + (rank * rank, K))
    if P is not None:
        blame("P", P, lead + ("N", "q"), lead_size + (N, scale_rank))
        blame("Q", Q, lead + ("q", "K"), lead_size + (scale_rank, K))
    if multi:
        if T < 1:
            raise ValueError("tarp_linear: the task dimension of the factors must be at least 1, got 0")
        if tuple(task_index.shape) != (M,):
            raise ValueError(
                f"tarp_linear: argument 'task_index' must have shape [M]=[{M}] (one task per row of x), "
                f"got {_shape(task_index)}"
            )

    # ---- epilogue -----------------------------------------------------------------------
    gate_kind = _gate_kind("gate", gate, x, M, T, multi)
    skip_kind = _gate_kind("skip_gate", skip_gate, x, M, T, multi)
    if skip_kind != "none" and N != K:
        raise ValueError(
            f"tarp_linear: argument 'skip_gate' needs out_features == in_features, got N={N}, K={K}"
        )
    out_shape = tuple(x.shape[:-1]) + (N,)
    if residual is not None and tuple(residual.shape) != out_shape:
        others = [s for s in N_from if s != "residual"]
        raise ValueError(
            f"tarp_linear: argument 'residual' must have shape {_fmt(out_shape)} (x's rows {_fmt(x.shape[:-1])}, "
            f"N={N} as in {', '.join(others)}), got {_shape(residual)}"
        )

    spec = TarpSpec(
        M=M, K=K, N=N, rank=rank, scale_rank=scale_rank, num_tasks=T,
        has_bias=bias is not None, has_delta=U is not None, dynamic=G is not None,
        has_scale=P is not None, multi_task=multi, gate_kind=gate_kind, skip_kind=skip_kind,
        has_residual=residual is not None, activation=activation, hard_skip=hard_skip,
        out_shape=out_shape, dtype=x.dtype, device=x.device,
    )
    return TarpCall(
        spec=spec, x=(x if x.dim() == 2 else x.reshape(M, K)).contiguous(), weight=weight,
        bias=_contiguous(bias),
        U=_contiguous(U), V=_contiguous(V), G=_contiguous(G), P=_contiguous(P), Q=_contiguous(Q),
        task_index=_contiguous(task_index), gate=gate, skip_gate=skip_gate,
        residual=residual.reshape(M, N).contiguous() if residual is not None else None,
        scaling=float(scaling), scale_offset=float(scale_offset), activation=activation,
        act=ACTIVATION_CODES[activation], hard_skip=hard_skip,
    )


def check_task_range(task_index: torch.Tensor, T: int) -> None:
    """Range-check task indices (syncs with the device; used by the reference backend)."""
    if task_index.numel() == 0:
        return
    lo, hi = int(task_index.min()), int(task_index.max())
    if lo < 0 or hi >= T:
        raise ValueError(
            f"tarp_linear: argument 'task_index' must hold values in [0, {T}) (T from the factors), "
            f"got values in [{lo}, {hi}]"
        )
