"""``TARPLinear``: a drop-in ``nn.Linear`` with a task-adaptive low-rank reparameterization.

The layer keeps ``weight [out, in]`` and ``bias`` exactly as ``nn.Linear`` (same state-dict
keys) and adds adapter parameters, all named ``tarp_*``::

    variant="dynamic"   y = W x + b + scaling · U (S(x) V x),  S(x) = reshape(G x, (r, r))
    variant="bilinear"  y = W x + b + scaling · U V x          (Σ = I: a LoRA-shaped delta)
    variant="kronecker" y = (W + scaling · Σ_i A_i ⊗ B_i) x + b  (delta materialized, r terms)

``scale_weight=True`` adds the multiplicative term: ``W ← W ⊙ softplus(P Q + scale_offset)``.
Parameters: ``tarp_U [N, r]``, ``tarp_V [r, K]``, ``tarp_G [r*r, K]`` (dynamic),
``tarp_A [r, n1, k1]``, ``tarp_B [r, n2, k2]`` (kronecker, ``N = n1 n2``, ``K = k1 k2``),
``tarp_P [N, q]``, ``tarp_Q [q, K]``; with ``num_tasks = T > 1`` the dynamic/bilinear and
multiplicative factors get a leading ``T`` (every task starts from the same values).

Initialization:

* ``init="zero_delta"`` (default): ``U = 0``, ``A = 0`` and ``P = 0`` so the layer equals its
  base exactly; ``V``, ``G``, ``B`` and ``Q`` are random so gradients flow from the first step.
* ``init="paper"``: our reading of the released MLtD code: every factor ``N(0, 0.02²)`` and
  ``scale_offset = 0`` (multiplicative scale ≈ 0.69 at init). The layer does *not* equal its
  base at init.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .._contract import DEFAULT_SCALE_OFFSET
from .context import current_context

__all__ = ["TARPLinear", "VARIANTS", "INITS", "TARP_PARAM_PREFIX"]

VARIANTS = ("dynamic", "bilinear", "kronecker")
INITS = ("zero_delta", "paper")
TARP_PARAM_PREFIX = "tarp_"
PAPER_INIT_STD = 0.02


def _balanced_split(n: int) -> tuple:
    """``n = a · b`` with ``a`` the largest divisor of ``n`` not above ``sqrt(n)``."""
    a = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return a, n // a


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (weight ``[in, out]``), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


class TARPLinear(nn.Linear):
    """``nn.Linear`` plus a TARP delta; see the module docstring for the math.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        rank: ``r``, the rank of ``U``/``V`` (and ``S`` is ``r × r``), or the number of
            Kronecker terms.
        variant: ``"dynamic" | "bilinear" | "kronecker"``.
        scale_weight: add the multiplicative term ``softplus(P Q + scale_offset)``.
        scale_rank: ``q``, the rank of ``P``/``Q`` (default: ``rank``).
        scaling: multiplies the additive delta.
        num_tasks: ``T``; with ``T > 1`` the factors are stacked per task and each call needs
            ``task_index`` (argument or :func:`tarp_fast.tarp_context`).
        init: ``"zero_delta" | "paper"``.

    ``forward(x, *, task_index=None, gate=None, skip_gate=None, residual=None)`` calls
    :func:`tarp_fast.ops.tarp_linear`; ``backend`` (attribute, default ``"auto"``) picks its
    backend. ``task_index`` (``[M]``, x's leading shape or ``[batch]``) must hold integers: int64,
    or another integer dtype (converted to int64); a float or bool ``task_index`` is a
    ``TypeError``, never rounded to a task.
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
        self._merged_from: Optional[torch.Tensor] = None
        self._conv1d_layout = False
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._create_tarp_parameters(self.weight.device, self.weight.dtype)
        self.reset_tarp_parameters()

    # ---- parameters -------------------------------------------------------------------------
    def _create_tarp_parameters(self, device, dtype) -> None:
        N, K, r, q = self.out_features, self.in_features, self.rank, self.scale_rank
        lead = (self.num_tasks,) if self.num_tasks > 1 else ()
        kw = dict(device=device, dtype=dtype)
        if self.variant in ("dynamic", "bilinear"):
            self.tarp_U = nn.Parameter(torch.empty(*lead, N, r, **kw))
            self.tarp_V = nn.Parameter(torch.empty(*lead, r, K, **kw))
        if self.variant == "dynamic":
            self.tarp_G = nn.Parameter(torch.empty(*lead, r * r, K, **kw))
        if self.variant == "kronecker":
            (n1, n2), (k1, k2) = _balanced_split(N), _balanced_split(K)
            self.tarp_A = nn.Parameter(torch.empty(r, n1, k1, **kw))
            self.tarp_B = nn.Parameter(torch.empty(r, n2, k2, **kw))
        if self.scale_weight:
            self.tarp_P = nn.Parameter(torch.empty(*lead, N, q, **kw))
            self.tarp_Q = nn.Parameter(torch.empty(*lead, q, K, **kw))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "variant") and any(n.startswith(TARP_PARAM_PREFIX) for n, _ in self.named_parameters()):
            self.reset_tarp_parameters()

    @torch.no_grad()
    def reset_tarp_parameters(self) -> None:
        """(Re-)initialize the adapter factors per ``self.init`` (every task identically)."""
        K, r = self.in_features, self.rank
        for name, p in self.tarp_named_parameters():
            one = p[0] if (self.num_tasks > 1 and name not in ("tarp_A", "tarp_B")) else p
            if self.init == "paper":
                one.normal_(0.0, PAPER_INIT_STD)
            elif name in ("tarp_U", "tarp_A", "tarp_P"):
                one.zero_()  # the zero factor makes the layer equal its base at init
            elif name == "tarp_G":
                # S = G x has entries of the size of h = V x / sqrt(r): z = S h keeps h's scale.
                one.normal_(0.0, 1.0 / math.sqrt(K * r))
            else:  # V, B, Q: the LoRA "A" initialization
                nn.init.kaiming_uniform_(one.view(one.shape[0], -1) if one.dim() > 2 else one, a=math.sqrt(5))
            if one is not p:
                p.copy_(one.unsqueeze(0).expand_as(p))

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

        The new layer shares the base parameters' storage: ``nn.Linear``'s ``weight``/``bias``
        are the same ``Parameter`` objects; for ``Conv1D`` (weight ``[in, out]``) ``weight`` is a
        transposed view of the same storage, and the layer's state dict presents it back in
        ``Conv1D`` layout so checkpoints keep their keys and shapes.
        """
        if isinstance(module, nn.Linear):
            in_f, out_f, weight = module.in_features, module.out_features, module.weight
        elif _is_conv1d(module):
            in_f, out_f = module.nx, module.nf
            weight = nn.Parameter(module.weight.detach().t(), requires_grad=module.weight.requires_grad)
        else:
            raise TypeError(
                f"TARPLinear.from_module: argument 'module' must be an nn.Linear or a transformers Conv1D, "
                f"got {type(module).__name__}"
            )
        bias = module.bias
        with torch.device("meta"):
            layer = cls(in_f, out_f, bias is not None, dtype=weight.dtype, **kw)
        layer.weight = module.weight if isinstance(module, nn.Linear) else weight
        if bias is not None:
            layer.bias = bias
        layer._create_tarp_parameters(weight.device, weight.dtype)
        layer.reset_tarp_parameters()
        if _is_conv1d(module):
            layer._conv1d_layout = True
            layer.register_state_dict_post_hook(_conv1d_state_dict_hook)
            layer.register_load_state_dict_pre_hook(_conv1d_load_hook)
        return layer

    # ---- forward ------------------------------------------------------------------------------
    def _effective_weight(self) -> torch.Tensor:
        """Kronecker: ``W ⊙ scale + scaling Σ_i A_i ⊗ B_i`` materialized (``[N, K]``)."""
        w = self.weight
        if self.scale_weight:
            w = w * F.softplus(self.tarp_P @ self.tarp_Q + self.scale_offset)
        kron = torch.einsum("rab,rcd->acbd", self.tarp_A, self.tarp_B).reshape(self.out_features, self.in_features)
        return w + self.scaling * kron

    def forward(self, x, *, task_index=None, gate=None, skip_gate=None, residual=None):
        if isinstance(task_index, torch.Tensor):
            _integer_task_index(task_index)  # also when a single-task layer ignores it: never a float
        ctx = current_context()
        hard_skip = False
        if ctx is not None:
            if task_index is None:
                task_index = ctx.task_index
            if gate is None and id(self) in ctx.gates:
                gate, hard_skip = ctx.gates[id(self)], ctx.hard_skip
        if self.num_tasks > 1:
            task_index = self._rows_task_index(x, task_index)
        else:
            task_index = None
        common = dict(
            task_index=task_index, gate=gate, skip_gate=skip_gate, residual=residual,
            activation=self.activation, hard_skip=hard_skip, backend=self.backend,
            scale_offset=self.scale_offset,
        )
        if self._merged_from is not None:
            return ops.tarp_linear(x, self.weight, self.bias, **{**common, "task_index": None})
        if self.variant == "kronecker":
            return ops.tarp_linear(x, self._effective_weight(), self.bias, **common)
        return ops.tarp_linear(
            x, self.weight, self.bias, self.tarp_U, self.tarp_V, getattr(self, "tarp_G", None),
            getattr(self, "tarp_P", None), getattr(self, "tarp_Q", None), scaling=self.scaling, **common,
        )

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
        raise ValueError(
            f"TARPLinear.forward: argument 'task_index' must be [M]={math.prod(lead)}, x's leading shape "
            f"{list(lead)} or [batch]={x.shape[0] if x.dim() >= 2 else '-'}, got {list(task_index.shape)}"
        )

    # ---- merge / unmerge ----------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold a static delta into ``weight`` (inference). Bitwise undone by :meth:`unmerge`."""
        if self.variant == "dynamic":
            raise RuntimeError(
                "TARPLinear.merge: variant='dynamic' cannot be merged: its delta U S(x) V depends on the "
                "input x. Use variant='bilinear' or 'kronecker' for mergeable adapters"
            )
        if self.num_tasks > 1:
            raise RuntimeError(f"TARPLinear.merge: num_tasks={self.num_tasks} has one delta per task; merge needs num_tasks=1")
        if self._merged_from is not None:
            raise RuntimeError("TARPLinear.merge: the layer is already merged; call unmerge() first")
        original = self.weight.detach().clone()
        if self.variant == "kronecker":
            merged = self._effective_weight()
        else:
            w = self.weight
            if self.scale_weight:
                w = w * F.softplus(self.tarp_P @ self.tarp_Q + self.scale_offset)
            merged = w + self.scaling * (self.tarp_U @ self.tarp_V)
        self.weight.copy_(merged)
        self._merged_from = original

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight saved by :meth:`merge`, bitwise."""
        if self._merged_from is None:
            raise RuntimeError("TARPLinear.unmerge: the layer is not merged")
        self.weight.copy_(self._merged_from)
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


def _integer_task_index(task_index: torch.Tensor) -> None:
    """Reject a float, complex or bool ``task_index`` (never rounded: 0.9 is not task 0).

    Integer dtypes other than int64 (int32, uint8, ...) are accepted and converted to int64.
    """
    if task_index.is_floating_point() or task_index.is_complex() or task_index.dtype == torch.bool:
        raise TypeError(
            f"TARPLinear.forward: argument 'task_index' must be int64 (or another integer dtype, converted "
            f"to int64), got {task_index.dtype}"
        )


def _check_config(rank, variant, scale_rank, scaling, num_tasks, init) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"TARPLinear: argument 'rank' must be a positive int, got {rank!r}")
    if variant not in VARIANTS:
        raise ValueError(f"TARPLinear: argument 'variant' must be one of {VARIANTS}, got {variant!r}")
    if scale_rank is not None and (isinstance(scale_rank, bool) or not isinstance(scale_rank, int) or scale_rank < 1):
        raise ValueError(f"TARPLinear: argument 'scale_rank' must be a positive int or None, got {scale_rank!r}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"TARPLinear: argument 'scaling' must be a finite float, got {scaling!r}")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"TARPLinear: argument 'num_tasks' must be a positive int, got {num_tasks!r}")
    if variant == "kronecker" and num_tasks > 1:
        raise ValueError("TARPLinear: variant='kronecker' supports num_tasks=1 only, got num_tasks=" + str(num_tasks))
    if init not in INITS:
        raise ValueError(f"TARPLinear: argument 'init' must be one of {INITS}, got {init!r}")


def _conv1d_state_dict_hook(module, state_dict, prefix, local_metadata):
    """Present ``weight`` in ``Conv1D`` layout ``[in, out]`` (a view: no copy)."""
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = state_dict[key].t()


def _conv1d_load_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    key = prefix + "weight"
    if key in state_dict and tuple(state_dict[key].shape) == (module.in_features, module.out_features):
        state_dict[key] = state_dict[key].t()
