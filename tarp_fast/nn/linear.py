"""``TARPLinear``: a drop-in ``nn.Linear`` with a task-adaptive low-rank reparameterization.

The layer keeps ``weight [out, in]`` and ``bias`` exactly as ``nn.Linear`` (same state-dict
keys) and adds adapter parameters, all named ``tarp_*``::

    variant="dynamic"   y = W x + b + scaling · U (S(x) V x),  S(x) = reshape(G x, (r, r))
    variant="bilinear"  y = W x + b + scaling · U V x          (Σ = I: a LoRA-shaped delta)
    variant="kronecker" y = (W + scaling · Σ_{i=1..n} H_i ⊗ (U_i V_i)) x + b  (n = 4, delta materialized)

``scale_weight=True`` adds the multiplicative term: ``W ← W ⊙ softplus(P Q + scale_offset)``.
Parameters: ``tarp_U [N, r]``, ``tarp_V [r, K]``, ``tarp_G [r*r, K]`` (dynamic),
``tarp_H [n, n, n]``, ``tarp_KU [n, N/n, r]``, ``tarp_KV [n, r, K/n]`` (kronecker, see below),
``tarp_P [N, q]``, ``tarp_Q [q, K]``; with ``num_tasks = T > 1`` the dynamic/bilinear and
multiplicative factors get a leading ``T`` (every task starts from the same values).

**Kronecker** (the paper's form, as in Compacter's parameterized hypercomplex layers)::

    ΔW = Σ_{i=1..n} H_i ⊗ (U_i V_i),   H_i ∈ R^{n×n},  U_i ∈ R^{(N/n)×r},  V_i ∈ R^{r×(K/n)}

with ``n = KRONECKER_N = 4``: ``ΔW`` is an ``n × n`` grid of ``(N/n) × (K/n)`` blocks, block
``(a, b)`` being ``Σ_i H_i[a, b] U_i V_i`` (rank ≤ ``n r``). ``H_i`` is ``tarp_H[i]``, ``U_i``
``tarp_KU[i]`` and ``V_i`` ``tarp_KV[i]`` (not ``tarp_U``/``tarp_V``: those names mean the
bilinear/dynamic ``[N, r]``/``[r, K]`` factors to every consumer that dispatches on names). The
delta has ``n³ + r (N + K)`` parameters. ``N`` and ``K`` must be multiples of ``n``
(``ValueError`` otherwise: there is no padding fallback, because a padded delta would not fold into
the ``[N, K]`` weight exactly). Before this form, ``kronecker`` meant ``Σ_i A_i ⊗ B_i`` with factors
``tarp_A``/``tarp_B``; state dicts and adapters holding those are refused with a ``ValueError``
(:func:`old_kronecker_form_message`), never loaded into the new factors.

Initialization:

* ``init="zero_delta"`` (default): ``U = 0``, ``KU = 0`` and ``P = 0`` so the layer equals its
  base exactly; ``V``, ``G``, ``H``, ``KV`` and ``Q`` are random. The zero factor of a product
  gets a gradient at the first step and the other factors from the second on, as with LoRA's zero
  ``B``. For kronecker the zero factor is ``KU`` (each ``U_i`` is the output-side factor, like
  LoRA's ``B``): its first gradient ``Σ_b H_i[a, b] G_ab V_iᵀ`` (``G_ab`` the output gradient's
  blocks) differs per block row and per term, whereas a zero ``H`` would get only ``n³`` scalars
  ``<G_ab, U_i V_i>`` and leave every ``U_i``, ``V_i`` still until ``H`` moved.
* ``init="paper"``: our reading of the released MLtD code: every factor ``N(0, 0.02²)`` and
  ``scale_offset = 0`` (multiplicative scale ≈ 0.69 at init). The layer does *not* equal its
  base at init.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .._contract import DEFAULT_SCALE_OFFSET
from .context import routed_context

__all__ = ["TARPLinear", "VARIANTS", "INITS", "TARP_PARAM_PREFIX", "KRONECKER_N", "KRONECKER_FACTORS",
           "kronecker_factor_shapes", "kronecker_delta", "old_kronecker_form_message"]

VARIANTS = ("dynamic", "bilinear", "kronecker")
INITS = ("zero_delta", "paper")
TARP_PARAM_PREFIX = "tarp_"
PAPER_INIT_STD = 0.02
#: ``n`` of the Kronecker variant: the number of terms and the size of each ``H_i`` (the paper's 4)
KRONECKER_N = 4
#: the Kronecker variant's factor names, in order (``H``, ``U_i`` stacked, ``V_i`` stacked)
KRONECKER_FACTORS = ("tarp_H", "tarp_KU", "tarp_KV")
#: the factors of the former Kronecker form ``Σ_i A_i ⊗ B_i`` (refused on load)
OLD_KRONECKER_FACTORS = ("tarp_A", "tarp_B")


def kronecker_factor_shapes(in_features: int, out_features: int, rank: int, *, who: str = "TARPLinear") -> dict:
    """Shapes of the Kronecker factors of an ``[N, K] = [out_features, in_features]`` layer::

        tarp_H  [n, n, n]      H_i = tarp_H[i]
        tarp_KU [n, N/n, r]    U_i = tarp_KU[i]
        tarp_KV [n, r, K/n]    V_i = tarp_KV[i]

    ``n = KRONECKER_N``: ``n³ + r (N + K)`` parameters. Raises ``ValueError`` (prefixed ``who``)
    naming the argument, its value and the requirement when ``N`` or ``K`` is not a multiple of
    ``n``.
    """
    n = KRONECKER_N
    for arg, size in (("in_features", in_features), ("out_features", out_features)):
        if size % n:
            raise ValueError(
                f"{who}: variant='kronecker' needs argument '{arg}' to be a multiple of n={n} (ΔW = Σ_i H_i ⊗ "
                f"(U_i V_i) is an n×n grid of blocks of size (out_features/n)×(in_features/n)), got {arg}={size}. "
                "Use variant='bilinear' (also mergeable) for this layer, or leave it out of the targets")
    return {"tarp_H": (n, n, n), "tarp_KU": (n, out_features // n, rank), "tarp_KV": (n, rank, in_features // n)}


def kronecker_delta(H: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``ΔW = Σ_i H_i ⊗ (U_i V_i)``, materialized.

    ``H [..., n, n, n]``, ``U [..., n, N/n, r]``, ``V [..., n, r, K/n]`` with the same leading
    shape (e.g. ``[T]`` per-task copies) -> ``[..., N, K]``. Entry ``(a·N/n + c, b·K/n + d)`` is
    ``Σ_i H_i[a, b] (U_i V_i)[c, d]``: the einsum below sums over ``i`` and lays the blocks out
    row-major, which is exactly ``Σ_i torch.kron(H_i, U_i @ V_i)``.
    """
    M = U @ V  # [..., n, N/n, K/n]: the n low-rank blocks
    n, bn, bk = M.shape[-3], M.shape[-2], M.shape[-1]
    delta = torch.einsum("...iab,...icd->...acbd", H, M)  # [..., n(a), N/n(c), n(b), K/n(d)]
    return delta.reshape(*delta.shape[:-4], n * bn, n * bk)


def old_kronecker_form_message(where: str, keys) -> str:
    """The error for ``keys``, factors of the former Kronecker form (``tarp_A``/``tarp_B``), found in ``where``."""
    return (f"{where} holds {', '.join(keys)}: factors of the former kronecker form ΔW = Σ_i A_i ⊗ B_i. The "
            f"kronecker variant changed to the paper's ΔW = Σ_i H_i ⊗ (U_i V_i) with n={KRONECKER_N} (factors "
            f"{', '.join(KRONECKER_FACTORS)}), which cannot represent the old delta, so they are not loaded. "
            "Load them with the tarp-fast version that saved them (an adapter's adapter_config.json records it as "
            "tarp_fast_version) and fold them into the base (tarp_fast.merge_and_unload), or train/prepare a new "
            "kronecker adapter")


@torch.no_grad()
def init_kronecker_factor_(name: str, t: torch.Tensor, init: str) -> None:
    """Initialize one Kronecker factor in place (shared with the PEFT layer).

    ``"paper"``: ``N(0, PAPER_INIT_STD²)``. ``"zero_delta"``: ``KU = 0`` (ΔW = 0); ``H ~ N(0, 1/n)``
    so each block ``Σ_i H_i[a, b] U_i V_i`` has about the variance of one ``U_i V_i``; each ``V_i``
    gets LoRA's ``A`` initialization with its own fan-in ``K/n``.
    """
    if init == "paper":
        t.normal_(0.0, PAPER_INIT_STD)
    elif name == "tarp_KU":
        t.zero_()
    elif name == "tarp_H":
        t.normal_(0.0, 1.0 / math.sqrt(KRONECKER_N))
    elif name == "tarp_KV":
        nn.init.kaiming_uniform_(t.view(-1, t.shape[-1]), a=math.sqrt(5))  # rows of V_i: fan-in K/n
    else:
        raise ValueError(f"init_kronecker_factor_: argument 'name' must be one of {KRONECKER_FACTORS}, got {name!r}")


def tarp_factor_shapes(in_features: int, out_features: int, rank: int, variant: str, scale_weight: bool,
                       scale_rank: int, num_tasks: int = 1, *, who: str = "TARPLinear") -> dict:
    """``{name: shape}`` of a layer's adapter factors, in parameter order (shared with the PEFT layer).

    ``tarp_U [N, r]``, ``tarp_V [r, K]`` (dynamic, bilinear), ``tarp_G [r*r, K]`` (dynamic), the
    Kronecker factors of :func:`kronecker_factor_shapes` (kronecker; ``ValueError`` prefixed
    ``who`` when ``N`` or ``K`` is not a multiple of ``n``), ``tarp_P [N, q]``, ``tarp_Q [q, K]``
    (``scale_weight``). With ``num_tasks = T > 1`` every factor but the Kronecker ones gets a
    leading ``T``.
    """
    N, K, r, q = out_features, in_features, rank, scale_rank
    lead = (num_tasks,) if num_tasks > 1 else ()
    shapes = {}
    if variant in ("dynamic", "bilinear"):
        shapes.update(tarp_U=(*lead, N, r), tarp_V=(*lead, r, K))
    if variant == "dynamic":
        shapes["tarp_G"] = (*lead, r * r, K)
    if variant == "kronecker":  # single-task only (_check_config): no leading T
        shapes.update(kronecker_factor_shapes(K, N, r, who=who))
    if scale_weight:
        shapes.update(tarp_P=(*lead, N, q), tarp_Q=(*lead, q, K))
    return shapes


@torch.no_grad()
def init_factor_(name: str, t: torch.Tensor, init: str, *, in_features: int, rank: int) -> None:
    """Initialize one adapter factor ``t`` (one task's, no leading ``T``) in place, per ``init``
    (module docstring; shared with the PEFT layer).

    ``"paper"``: ``N(0, PAPER_INIT_STD²)``. ``"zero_delta"``: ``U = P = 0`` (the layer equals its
    base); ``G ~ N(0, 1/(K r))`` (``S = G x`` has entries of the size of ``h = V x / sqrt(r)``, so
    ``z = S h`` keeps ``h``'s scale); ``V``, ``Q``: LoRA's ``A`` initialization; the Kronecker
    factors as :func:`init_kronecker_factor_`.
    """
    if name in KRONECKER_FACTORS:
        init_kronecker_factor_(name, t, init)
    elif init == "paper":
        t.normal_(0.0, PAPER_INIT_STD)
    elif name in ("tarp_U", "tarp_P"):
        t.zero_()  # the zero factor makes the layer equal its base at init
    elif name == "tarp_G":
        t.normal_(0.0, 1.0 / math.sqrt(in_features * rank))
    else:  # V, Q: the LoRA "A" initialization
        nn.init.kaiming_uniform_(t.view(t.shape[0], -1) if t.dim() > 2 else t, a=math.sqrt(5))


def static_effective_weight(weight: torch.Tensor, factors: dict, *, variant: str, scaling: float,
                            scale_offset: float, scale_weight: bool) -> torch.Tensor:
    """The weight a static delta folds into: ``W ⊙ softplus(P Q + scale_offset) + scaling · Δ``
    with ``Δ = U V`` (``bilinear``) or ``Σ_i H_i ⊗ (U_i V_i)`` (``kronecker``).

    ``factors`` maps factor names (``tarp_U`` ...) to tensors; they may carry one leading task
    dimension ``[T]`` (the result is then ``[T, N, K]``). The one formula of
    :meth:`TARPLinear.merge`, the Kronecker forward and the PEFT layer.
    """
    w = weight
    if scale_weight:
        w = w * F.softplus(factors["tarp_P"] @ factors["tarp_Q"] + scale_offset)
    if variant == "kronecker":
        delta = kronecker_delta(factors["tarp_H"], factors["tarp_KU"], factors["tarp_KV"])
    elif variant == "bilinear":
        delta = factors["tarp_U"] @ factors["tarp_V"]
    else:
        raise ValueError(f"static_effective_weight: argument 'variant' must be 'bilinear' or 'kronecker' (a "
                         f"'dynamic' delta depends on the input), got {variant!r}")
    return w + scaling * delta


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (weight ``[in, out]``), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


class _OriginalDropped:
    """``TARPLinear._merged_from`` of a layer merged with ``keep_original=False`` (no base weight
    kept): merged, and not unmergeable. One object: copies and pickles stay it."""

    def __reduce__(self):
        return "_ORIGINAL_DROPPED"

    def __repr__(self) -> str:
        return "<base weight not kept>"


_ORIGINAL_DROPPED = _OriginalDropped()


class TARPLinear(nn.Linear):
    """``nn.Linear`` plus a TARP delta; see the module docstring for the math.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        rank: ``r``, the rank of ``U``/``V`` (and ``S`` is ``r × r``), or, for ``kronecker``, of
            each ``U_i``/``V_i`` (``U_i V_i`` is a rank-``r`` block).
        variant: ``"dynamic" | "bilinear" | "kronecker"`` (``kronecker``: ``in_features`` and
            ``out_features`` must be multiples of :data:`KRONECKER_N`, else ``ValueError``).
        scale_weight: add the multiplicative term ``softplus(P Q + scale_offset)``.
        scale_rank: ``q``, the rank of ``P``/``Q`` (default: ``rank``).
        scaling: multiplies the additive delta.
        num_tasks: ``T``; with ``T > 1`` the factors are stacked per task and each call needs
            ``task_index`` (argument or :func:`tarp_fast.tarp_context`).
        init: ``"zero_delta" | "paper"``.

    ``forward(x, *, task_index=None, gate=None, skip_gate=None, residual=None)`` calls
    :func:`tarp_fast.ops.tarp_linear` with :attr:`linear_weight` (``weight`` itself, or the
    transposed view of a ``Conv1D``'s ``[in, out]`` weight, see :meth:`from_module`);
    ``backend`` (attribute, default ``"auto"``) picks its backend. Every parameter is contiguous
    in its own storage (FSDP2's ``fully_shard`` needs it). Under activation checkpointing the
    recomputation uses the routing (``tarp_context``) of the forward it replays. ``task_index``
    (``[M]``, x's leading shape or ``[batch]``) must hold integers: int64, or another integer
    dtype (converted to int64); a float or bool ``task_index`` is a ``TypeError``, never rounded
    to a task.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int = 8,
        variant: str = "dynamic",
        scale_weight: bool = False,
        scale_rank: Optional[int] = None,
        scaling: float = 1.0,
        num_tasks: int = 1,
        init: str = "zero_delta",
        device=None,
        dtype=None,
    ):
        _check_config(rank, variant, scale_rank, scaling, num_tasks, init)
        if variant == "kronecker":
            kronecker_factor_shapes(in_features, out_features, rank)  # the divisibility error, before allocating
        self.rank = int(rank)
        self.variant = variant
        self.scale_weight = bool(scale_weight)
        self.scale_rank = int(scale_rank) if scale_rank is not None else self.rank
        self.scaling = float(scaling)
        self.num_tasks = int(num_tasks)
        self.init = init
        self.scale_offset = 0.0 if init == "paper" else DEFAULT_SCALE_OFFSET
        self.backend = "auto"
        self.activation = "none"
        # the base weight before merge(); _ORIGINAL_DROPPED after merge(keep_original=False)
        self._merged_from: Optional[Union[torch.Tensor, _OriginalDropped]] = None
        self._conv1d_layout = False
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._create_tarp_parameters(self.weight.device, self.weight.dtype)
        self.reset_tarp_parameters()

    # ---- parameters -------------------------------------------------------------------------
    def _create_tarp_parameters(self, device, dtype) -> None:
        shapes = tarp_factor_shapes(self.in_features, self.out_features, self.rank, self.variant, self.scale_weight,
                                    self.scale_rank, self.num_tasks)
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "variant") and any(n.startswith(TARP_PARAM_PREFIX) for n, _ in self.named_parameters()):
            self.reset_tarp_parameters()

    @torch.no_grad()
    def reset_tarp_parameters(self) -> None:
        """(Re-)initialize the adapter factors per ``self.init`` (every task identically)."""
        for name, p in self.tarp_named_parameters():
            # Kronecker factors never carry a task dimension in the layer (single-task only; the
            # per-task copies of batched preparation live outside it)
            one = p[0] if (self.num_tasks > 1 and name not in KRONECKER_FACTORS) else p
            init_factor_(name, one, self.init, in_features=self.in_features, rank=self.rank)
            if one is not p:
                p.copy_(one.unsqueeze(0).expand_as(p))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A state dict of the former kronecker form must not load silently wrong: non-strict loading
        # would keep the fresh H/KU/KV and drop tarp_A/tarp_B without a word.
        if self.variant == "kronecker":
            old = [prefix + n for n in OLD_KRONECKER_FACTORS if prefix + n in state_dict]
            if old:
                raise ValueError(old_kronecker_form_message("TARPLinear.load_state_dict: the state dict", old))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def tarp_named_parameters(self):
        """``(name, parameter)`` of the adapter factors only (names start with ``tarp_``)."""
        return [(n, p) for n, p in self.named_parameters(recurse=False) if n.startswith(TARP_PARAM_PREFIX)]

    def tarp_config(self) -> dict:
        """The constructor arguments that define the adapter (saved in ``adapter_config.json``)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "rank": self.rank,
            "variant": self.variant,
            "scale_weight": self.scale_weight,
            "scale_rank": self.scale_rank,
            "scaling": self.scaling,
            "num_tasks": self.num_tasks,
            "init": self.init,
            "scale_offset": self.scale_offset,
        }

    # ---- wrapping existing layers -------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, **kw) -> TARPLinear:
        """Wrap an ``nn.Linear`` or a transformers ``Conv1D`` without copying its weight.

        The new layer holds the very same base ``Parameter`` objects (``weight``, ``bias``) as
        ``module``. For ``Conv1D`` that means ``weight`` keeps ``Conv1D``'s own layout
        ``[in, out]``, contiguous in its storage, and the forward reads it through the transposed
        view :attr:`linear_weight` ``[out, in]`` at call time: no parameter is ever a transposed
        view (FSDP2 shards only contiguous parameters), and the state dict has ``Conv1D``'s keys,
        shapes and values with no hook. Use :attr:`linear_weight` for the ``nn.Linear``-layout
        weight of any TARP layer.
        """
        if isinstance(module, nn.Linear):
            in_f, out_f = module.in_features, module.out_features
        elif _is_conv1d(module):
            in_f, out_f = module.nx, module.nf
        else:
            raise TypeError(
                f"TARPLinear.from_module: argument 'module' must be an nn.Linear or a transformers Conv1D, "
                f"got {type(module).__name__}"
            )
        weight, bias = module.weight, module.bias
        with torch.device("meta"):
            layer = cls(in_f, out_f, bias is not None, dtype=weight.dtype, **kw)
        layer.weight = weight  # the module's own Parameter: [out, in] (Linear) or [in, out] (Conv1D)
        if bias is not None:
            layer.bias = bias
        layer._conv1d_layout = _is_conv1d(module)
        layer._create_tarp_parameters(weight.device, weight.dtype)
        layer.reset_tarp_parameters()
        return layer

    @property
    def linear_weight(self) -> torch.Tensor:
        """The base weight in ``nn.Linear`` layout ``[out, in]``: ``weight`` itself, or, for a layer
        made from a ``Conv1D`` (whose ``weight`` is stored ``[in, out]``), its transposed view."""
        w = self.weight
        return w.t() if self._conv1d_layout else w

    # ---- forward ------------------------------------------------------------------------------
    def _effective_weight(self) -> torch.Tensor:
        """``W ⊙ softplus(P Q + offset) + scaling Δ`` materialized (``[N, K]``; a static variant)."""
        return static_effective_weight(self.linear_weight, self._static_factors(), variant=self.variant,
                                       scaling=self.scaling, scale_offset=self.scale_offset,
                                       scale_weight=self.scale_weight)

    def forward(self, x, *, task_index=None, gate=None, skip_gate=None, residual=None):
        if isinstance(task_index, torch.Tensor):
            _integer_task_index(task_index)  # also when a single-task layer ignores it: never a float
        # The active tarp_context, or, when activation checkpointing recomputes this call during
        # backward, the one its original forward saw (see tarp_fast.nn.context).
        ctx = routed_context(self)
        hard_skip = False
        routed = False
        if ctx is not None:
            if task_index is None and ctx.task_index is not None:
                task_index, routed = ctx.task_index, True
            if gate is None and id(self) in ctx.gates:
                gate, hard_skip = ctx.gates[id(self)], ctx.hard_skip
        if self.num_tasks > 1:
            task_index = self._rows_task_index(x, task_index)
        elif routed:
            raise ValueError(
                "TARPLinear(num_tasks=1).forward: tarp_context(task_index=...) routes a task to each sequence, "
                "but this layer has one set of factors, so the task ids would be ignored. Patch with "
                "num_tasks=T (patch_model(model, num_tasks=T, ...)) for one adapter per task, or leave "
                "task_index out of tarp_context"
            )
        else:
            task_index = None
        common = dict(
            task_index=task_index, gate=gate, skip_gate=skip_gate, residual=residual,
            activation=self.activation, hard_skip=hard_skip, backend=self.backend,
            scale_offset=self.scale_offset,
        )
        if self._merged_from is not None:
            return ops.tarp_linear(x, self.linear_weight, self.bias, **{**common, "task_index": None})
        if self.variant == "kronecker":
            if self.num_tasks > 1:
                return self._kronecker_per_task(x, task_index, common)
            return ops.tarp_linear(x, self._effective_weight(), self.bias, **common)
        return ops.tarp_linear(
            x, self.linear_weight, self.bias, self.tarp_U, self.tarp_V, getattr(self, "tarp_G", None),
            getattr(self, "tarp_P", None), getattr(self, "tarp_Q", None), scaling=self.scaling, **common,
        )

    def _static_factors(self) -> dict:
        """The factors of a static delta (``bilinear``/``kronecker``, plus ``P``/``Q``) by name."""
        names = KRONECKER_FACTORS if self.variant == "kronecker" else ("tarp_U", "tarp_V")
        if self.scale_weight:
            names = (*names, "tarp_P", "tarp_Q")
        return {n: getattr(self, n) for n in names}

    def _kronecker_per_task(self, x: torch.Tensor, task_index: torch.Tensor, common: dict) -> torch.Tensor:
        """A Kronecker layer with several tasks: one dense weight per task, each row computed with
        its task's. Each factor may carry a leading task dimension (the stacked per-task copies of
        batched preparation: ``H [T, n, n, n]``, ``KU [T, n, N/n, r]``, ``KV [T, n, r, K/n]``,
        ``P [T, N, q]``, ``Q [T, q, K]``) or be shared by the tasks (no leading ``T``).

        Each task's weight computes its own rows only: the rows are grouped by task (one stable
        sort), each group is one ``tarp_linear`` call (per-row gates and ``residual`` split with
        it), and the outputs are put back in row order (one gather); autograd routes each row's
        gradient to its task's factors. Arguments ``tarp_linear`` refuses (and an input without
        rows) take one call per task on every row instead, so the error is the one the whole
        input gives.
        """
        T = self.num_tasks
        f = self._static_factors()
        for n in KRONECKER_FACTORS:  # shared factors expanded (a view, no copy): one leading [T] for kronecker_delta
            if f[n].dim() == 3:
                f[n] = f[n].unsqueeze(0).expand(T, *f[n].shape)
        weights = static_effective_weight(self.linear_weight, f, variant="kronecker", scaling=self.scaling,
                                          scale_offset=self.scale_offset, scale_weight=self.scale_weight)  # [T, N, K]
        kw = {**common, "task_index": None}
        for key in ("gate", "skip_gate"):  # per-task gates [T] become per-row gates [M]
            g = kw[key]
            if isinstance(g, torch.Tensor) and g.dim() == 1 and g.shape[0] == T and T != task_index.numel():
                kw[key] = g.index_select(0, task_index)
        groups = _task_groups(x, task_index, kw, weights)
        if groups is None:
            outs = torch.stack([ops.tarp_linear(x, weights[t], self.bias, **kw) for t in range(T)])  # [T, ..., N]
            sel = task_index.view(1, *x.shape[:-1], 1).expand(1, *outs.shape[1:])
            return outs.gather(0, sel).squeeze(0)
        order, counts, rowwise = groups
        if max(counts) == task_index.numel():  # every row on one task: no grouping needed
            return ops.tarp_linear(x, weights[counts.index(max(counts))], self.bias, **kw)
        split = {k: v.index_select(0, order).split(counts) for k, v in rowwise.items()}
        parts = []
        for t, count in enumerate(counts):
            if count:
                parts.append(ops.tarp_linear(split["x"][t], weights[t], self.bias,
                                             **{**kw, **{k: v[t] for k, v in split.items() if k != "x"}}))
        y = torch.cat(parts)  # [M, N], rows grouped by task
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return y.index_select(0, inverse).view(*x.shape[:-1], y.shape[-1])

    def _rows_task_index(self, x: torch.Tensor, task_index) -> torch.Tensor:
        """Expand ``[B]`` (per sequence) or ``x.shape[:-1]`` task ids to ``[M]`` rows."""
        if task_index is None:
            raise ValueError(
                f"TARPLinear(num_tasks={self.num_tasks}).forward: 'task_index' is required "
                "(pass it, or wrap the call in tarp_fast.tarp_context(task_index=...))"
            )
        if not isinstance(task_index, torch.Tensor):
            task_index = torch.as_tensor(task_index, device=x.device)
        _integer_task_index(task_index)
        task_index = task_index.to(device=x.device, dtype=torch.int64)
        lead = tuple(x.shape[:-1])
        if tuple(task_index.shape) == lead:
            return task_index.reshape(-1)
        if x.dim() >= 2 and task_index.dim() == 1 and task_index.shape[0] == x.shape[0]:
            return task_index.view(-1, *([1] * (x.dim() - 2))).expand(lead).reshape(-1)
        if task_index.dim() == 1 and task_index.numel() == math.prod(lead):
            return task_index
        if (x.dim() >= 3 and task_index.dim() == 1 and 0 < task_index.shape[0] < x.shape[0]
                and x.shape[0] % task_index.shape[0] == 0):
            # generate(num_beams=k / num_return_sequences=k) repeats each sequence k times in a row
            per_seq = expand_task_index(task_index, x.shape[0])
            return per_seq.view(-1, *([1] * (x.dim() - 2))).expand(lead).reshape(-1)
        raise ValueError(
            f"TARPLinear.forward: argument 'task_index' must be [M]={math.prod(lead)}, x's leading shape "
            f"{list(lead)} or [batch]={x.shape[0] if x.dim() >= 2 else '-'}, got {list(task_index.shape)}"
        )

    # ---- merge / unmerge ----------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, *, keep_original: bool = True) -> None:
        """Fold a static delta into ``weight`` (inference). Bitwise undone by :meth:`unmerge`.

        ``keep_original=False`` keeps no copy of the base weight (no memory for it): the layer is
        merged for good and :meth:`unmerge` raises ``RuntimeError`` (what ``merge_and_unload``
        uses, which drops the layer right after).
        """
        if self.variant == "dynamic":
            raise RuntimeError(
                "TARPLinear.merge: variant='dynamic' cannot be merged: its delta U S(x) V depends on the "
                "input x. Use variant='bilinear' or 'kronecker' for mergeable adapters"
            )
        if self.num_tasks > 1:
            raise RuntimeError(f"TARPLinear.merge: num_tasks={self.num_tasks} has one delta per task; merge needs num_tasks=1")
        if self._merged_from is not None:
            raise RuntimeError("TARPLinear.merge: the layer is already merged; call unmerge() first")
        original = self.linear_weight.detach().clone() if keep_original else _ORIGINAL_DROPPED
        self.linear_weight.copy_(self._effective_weight())
        self._merged_from = original

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight saved by :meth:`merge`, bitwise."""
        if self._merged_from is None:
            raise RuntimeError("TARPLinear.unmerge: the layer is not merged")
        if self._merged_from is _ORIGINAL_DROPPED:
            raise RuntimeError("TARPLinear.unmerge: the layer was merged with keep_original=False, so the base weight "
                               "was not kept; it cannot be unmerged")
        self.linear_weight.copy_(self._merged_from)
        self._merged_from = None

    @property
    def merged(self) -> bool:
        return self._merged_from is not None

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}", f"out_features={self.out_features}",
            f"bias={self.bias is not None}", f"rank={self.rank}", f"variant={self.variant!r}",
        ]
        if self.scale_weight:
            parts.append(f"scale_weight=True, scale_rank={self.scale_rank}")
        if self.scaling != 1.0:
            parts.append(f"scaling={self.scaling:g}")
        if self.num_tasks > 1:
            parts.append(f"num_tasks={self.num_tasks}")
        if self.init != "zero_delta":
            parts.append(f"init={self.init!r}")
        if self._conv1d_layout:
            parts.append("from=Conv1D")
        return ", ".join(parts)


def _task_groups(x: torch.Tensor, task_index: torch.Tensor, kw: dict, weights: torch.Tensor):
    """The rows of ``x`` grouped by task, for :meth:`TARPLinear._kronecker_per_task`.

    Returns ``(order, counts, rowwise)``: ``order [M]`` the row indices sorted by task (stable),
    ``counts`` the number of rows of each of the ``T`` tasks (a list: one host sync), and
    ``rowwise[name]`` the per-row tensors to split: ``x`` as ``[M, K]`` and the per-row arguments
    in ``kw`` (``gate``/``skip_gate [M]``, ``residual`` as ``[M, N]``). ``None`` when the
    call should not be split: no rows, an argument ``tarp_linear`` refuses (wrong shape or device:
    its error names the whole input's sizes), or a task id outside ``[0, T)``.
    """
    T, N, K = weights.shape
    M = task_index.numel()
    if M == 0 or not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != K:
        return None
    rowwise = {"x": x.reshape(M, K)}
    for key in ("gate", "skip_gate"):
        g = kw[key]
        if isinstance(g, torch.Tensor) and g.dim() > 0:
            if g.dim() != 1 or g.shape[0] != M or g.device != x.device:
                return None
            rowwise[key] = g
    res = kw["residual"]
    if res is not None:
        if not isinstance(res, torch.Tensor) or tuple(res.shape) != (*x.shape[:-1], N) or res.device != x.device:
            return None
        rowwise["residual"] = res.reshape(M, N)
    ids, order = torch.sort(task_index, stable=True)
    bounds = torch.searchsorted(ids, torch.arange(T + 1, device=ids.device)).tolist()
    if bounds[0] != 0 or bounds[T] != M:  # a task id < 0 or >= T
        return None
    counts = [bounds[t + 1] - bounds[t] for t in range(T)]
    return order, counts, rowwise


def expand_task_index(task_index: torch.Tensor, batch: int, *,
                      argument: str = "TARPLinear.forward: 'task_index' has {b} per-sequence task ids") -> torch.Tensor:
    """Per-sequence task ids ``[b]`` for a batch of ``batch`` sequences in which each of the ``b``
    sequences was repeated ``batch // b`` times in a row, as ``generate`` expands its inputs for
    ``num_beams`` and ``num_return_sequences`` (``repeat_interleave``). ``ValueError`` when
    ``batch`` is not a multiple of ``b``; ``argument`` (formatted with ``b``) starts its message.
    """
    b = int(task_index.shape[0])
    if b == batch:
        return task_index
    if b == 0 or batch % b:
        raise ValueError(
            f"{argument.format(b=b)} but the batch has {batch} sequences (not a multiple: generate repeats each "
            "sequence num_beams x num_return_sequences times); pass one per sequence of the batch")
    return task_index.repeat_interleave(batch // b)


def _integer_task_index(task_index: torch.Tensor) -> None:
    """Reject a float, complex or bool ``task_index`` (never rounded: 0.9 is not task 0).

    Integer dtypes other than int64 (int32, uint8, ...) are accepted and converted to int64.
    """
    if task_index.is_floating_point() or task_index.is_complex() or task_index.dtype == torch.bool:
        raise TypeError(
            f"TARPLinear.forward: argument 'task_index' must be int64 (or another integer dtype, converted "
            f"to int64), got {task_index.dtype}"
        )


def _check_config(rank, variant, scale_rank, scaling, num_tasks, init, *, who: str = "TARPLinear",
                  rank_arg: str = "'rank'") -> None:
    """Clear ``ValueError`` s (prefixed ``who``) naming the bad argument (rank 0, unknown variant, ...);
    ``rank_arg`` is how the message names the rank (the PEFT config calls it ``'r' (the rank)``)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{who}: argument {rank_arg} must be a positive int, got {rank!r}")
    if variant not in VARIANTS:
        raise ValueError(f"{who}: argument 'variant' must be one of {VARIANTS}, got {variant!r}")
    if scale_rank is not None and (isinstance(scale_rank, bool) or not isinstance(scale_rank, int) or scale_rank < 1):
        raise ValueError(f"{who}: argument 'scale_rank' must be a positive int or None, got {scale_rank!r}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"{who}: argument 'scaling' must be a finite float, got {scaling!r}")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"{who}: argument 'num_tasks' must be a positive int, got {num_tasks!r}")
    if variant == "kronecker" and num_tasks > 1:
        raise ValueError(f"{who}: variant='kronecker' supports num_tasks=1 only, got num_tasks=" + str(num_tasks))
    if init not in INITS:
        raise ValueError(f"{who}: argument 'init' must be one of {INITS}, got {init!r}")

