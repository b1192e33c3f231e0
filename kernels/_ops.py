"""torch.library registration of the Triton path (every schema of the backend is in this file).

Ops (namespace ``tarp_fast``):

* ``triton_tarp_fwd(x, weight, bias?, U?, V?, G?, task_index?, gate?, skip_gate?, residual?,
  scaling, activation, hard_skip) -> (y, proj, z, perm, seg_off)``
* ``triton_tarp_bwd(dy, x, weight, ..., proj, z, perm, seg_off, ..., needs) -> (dx, dW, db, dU, dV,
  dG, dgate, dskip)``
* ``triton_scale_weight(weight, P, Q, offset) -> W_eff`` and ``triton_scale_weight_bwd``.

Each has a fake (meta) kernel, the forward ops have autograd, so ``torch.compile(fullgraph=True)``
traces through them and AOTAutograd traces the backward ops too. Nothing in the ops syncs with
the host (the row schedule is built on the device), so they can be captured in CUDA graphs.

Normalization before the op (custom-op schemas take tensors, not floats or None-or-float):
``x`` is flattened to ``[M, K]``; ``gate`` / ``skip_gate`` (None, float, 0-d, ``[M]`` or per-task
``[T]``) become ``[M]`` fp32 tensors with differentiable torch ops outside the op (a per-task gate
is gathered by ``task_index``, a 0-d one is expanded), so their gradients reach the caller's
tensors through autograd; the multiplicative term becomes the per-task effective weight
``W_t = weight * softplus(P_t Q_t + scale_offset)`` (its own op, so its backward composes).

Autograd of ``triton_tarp_fwd`` (single task shown; sums are per task with ``task_index``)::

    pre = W x + b + s U z,  z = S h,  h = V x,  vec(S) = G x,  y = g act(pre) + k x + res
    dpre = g act'(pre) dy              e = s U^T dpre        dS = e h^T      dh = S^T e
    dx = W^T dpre + V^T dh + G^T vec(dS) + k dy
    dW = sum dpre x^T   db = sum dpre   dU = s sum dpre z^T   dV = sum dh x^T   dG = sum vec(dS) x^T
    dg = <dy, act(pre)>   dk = <dy, x>   dres = dy

With ``hard_skip`` the rows whose gate is 0 contribute only ``k x + res`` (and ``dg = 0``).
Saved for backward: the inputs, ``proj = [h | vec(S)]`` and ``z`` (``M (2r + r^2)`` fp32) and
the row schedule (``perm [M]``, ``seg_off [T+2]`` int32; both empty when rows are not regrouped);
``pre`` is recomputed, never stored.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _launch

__all__ = ["triton_tarp", "triton_scale_weight"]


def _flag(spec_hard_skip: bool, gate: Optional[Tensor], task_index: Optional[Tensor]) -> bool:
    return task_index is not None or (spec_hard_skip and gate is not None)


# ----------------------------------------------------------------------------------------------
# multiplicative term
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("tarp_fast::triton_scale_weight", mutates_args=())
def triton_scale_weight(weight: Tensor, P: Tensor, Q: Tensor, offset: float) -> Tensor:
    """``weight [N, K] * softplus(P Q + offset)``: ``[T, N, K]`` for ``P [T, N, q]``, else ``[N, K]``."""
    return _launch.scale_weight_fwd(weight, P, Q, offset)


@triton_scale_weight.register_fake
def _(weight, P, Q, offset):
    return weight.new_empty(tuple(P.shape[:-1]) + (weight.shape[-1],))


@torch.library.custom_op("tarp_fast::triton_scale_weight_bwd", mutates_args=())
def triton_scale_weight_bwd(
    grad: Tensor, weight: Tensor, P: Tensor, Q: Tensor, offset: float, need_w: bool, need_pq: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dweight, dP, dQ)``; entries not asked for are empty tensors."""
    return _launch.scale_weight_bwd(grad, weight, P, Q, offset, need_w, need_pq)


@triton_scale_weight_bwd.register_fake
def _(grad, weight, P, Q, offset, need_w, need_pq):
    return (
        weight.new_empty(weight.shape) if need_w else weight.new_empty(0),
        P.new_empty(P.shape) if need_pq else weight.new_empty(0),
        Q.new_empty(Q.shape) if need_pq else weight.new_empty(0),
    )


def _scale_setup(ctx, inputs, output):
    weight, P, Q, offset = inputs
    ctx.save_for_backward(weight, P, Q)
    ctx.offset = offset


def _scale_backward(ctx, grad):
    weight, P, Q = ctx.saved_tensors
    need_w = ctx.needs_input_grad[0]
    need_pq = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dw, dP, dQ = triton_scale_weight_bwd(grad.contiguous(), weight, P, Q, ctx.offset, need_w, need_pq)
    return (dw if need_w else None, dP if ctx.needs_input_grad[1] else None,
            dQ if ctx.needs_input_grad[2] else None, None)


triton_scale_weight.register_autograd(_scale_backward, setup_context=_scale_setup)


# ----------------------------------------------------------------------------------------------
# the fused op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("tarp_fast::triton_tarp_fwd", mutates_args=())
def triton_tarp_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], U: Optional[Tensor], V: Optional[Tensor],
    G: Optional[Tensor], task_index: Optional[Tensor], gate: Optional[Tensor], skip_gate: Optional[Tensor],
    residual: Optional[Tensor], scaling: float, activation: str, hard_skip: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalized forward: ``x [M, K]``, ``weight [N, K]`` or ``[T, N, K]``, gates ``[M]`` fp32."""
    return _launch.tarp_fwd(x, weight, bias, U, V, G, task_index, gate, skip_gate, residual,
                            scaling, activation, hard_skip)


def _fake_aux(x, weight, U, G, task_index, gate, hard_skip):
    M = x.shape[0]
    if U is not None:
        R = U.shape[-1]
        proj = x.new_empty((M, R + R * R if G is not None else R), dtype=torch.float32)
        z = x.new_empty((M, R), dtype=torch.float32) if G is not None else x.new_empty(0, dtype=torch.float32)
    else:
        proj = z = x.new_empty(0, dtype=torch.float32)
    T = _launch._num_tasks(weight, U, task_index)
    grouped = _flag(hard_skip, gate, task_index)
    perm = x.new_empty((M if grouped else 0,), dtype=torch.int32)
    seg = x.new_empty((T + 2 if grouped else 0,), dtype=torch.int32)
    return proj, z, perm, seg


@triton_tarp_fwd.register_fake
def _(x, weight, bias, U, V, G, task_index, gate, skip_gate, residual, scaling, activation, hard_skip):
    y = x.new_empty((x.shape[0], weight.shape[-2]))
    return (y,) + _fake_aux(x, weight, U, G, task_index, gate, hard_skip)


@torch.library.custom_op("tarp_fast::triton_tarp_bwd", mutates_args=())
def triton_tarp_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], U: Optional[Tensor], V: Optional[Tensor],
    G: Optional[Tensor], task_index: Optional[Tensor], gate: Optional[Tensor], skip_gate: Optional[Tensor],
    proj: Tensor, z: Tensor, perm: Tensor, seg_off: Tensor, scaling: float, activation: str, hard_skip: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dweight, dbias, dU, dV, dG, dgate, dskip_gate)``; those not in ``needs``
    (same order) are empty tensors."""
    return _launch.tarp_bwd(dy, x, weight, bias, U, V, G, task_index, gate, skip_gate, proj, z, perm, seg_off,
                            scaling, activation, hard_skip, list(needs))


@triton_tarp_bwd.register_fake
def _(dy, x, weight, bias, U, V, G, task_index, gate, skip_gate, proj, z, perm, seg_off, scaling, activation,
      hard_skip, needs):
    like = (x, weight, bias, U, V, G)
    out = [t.new_empty(t.shape) if (n and t is not None) else x.new_empty(0) for n, t in zip(needs[:6], like)]
    M = x.shape[0]
    out.append(x.new_empty((M,), dtype=torch.float32) if needs[6] else x.new_empty(0, dtype=torch.float32))
    out.append(x.new_empty((M,), dtype=torch.float32) if needs[7] else x.new_empty(0, dtype=torch.float32))
    return tuple(out)


def _tarp_setup(ctx, inputs, output):
    (x, weight, bias, U, V, G, task_index, gate, skip_gate, residual, scaling, activation, hard_skip) = inputs
    _, proj, z, perm, seg_off = output
    ctx.save_for_backward(x, weight, bias, U, V, G, task_index, gate, skip_gate, proj, z, perm, seg_off)
    ctx.scaling, ctx.activation, ctx.hard_skip = scaling, activation, hard_skip
    ctx.mark_non_differentiable(proj, z, perm, seg_off)


def _tarp_backward(ctx, dy, _dproj, _dz, _dperm, _dseg):
    (x, weight, bias, U, V, G, task_index, gate, skip_gate, proj, z, perm, seg_off) = ctx.saved_tensors
    ng = ctx.needs_input_grad
    present = (x, weight, bias, U, V, G, None, gate, skip_gate)
    needs = [bool(ng[i]) and present[i] is not None for i in (0, 1, 2, 3, 4, 5, 7, 8)]
    grads = [None] * 13
    if any(needs):
        outs = triton_tarp_bwd(dy.contiguous(), x, weight, bias, U, V, G, task_index, gate, skip_gate, proj, z,
                               perm, seg_off, ctx.scaling, ctx.activation, ctx.hard_skip, needs)
        for slot, need, g in zip((0, 1, 2, 3, 4, 5, 7, 8), needs, outs):
            grads[slot] = g if need else None
    if ng[9]:
        grads[9] = dy
    return tuple(grads)


triton_tarp_fwd.register_autograd(_tarp_backward, setup_context=_tarp_setup)


class _TaskGateRows(torch.autograd.Function):
    """``g[task_index]`` (a per-task gate read per row) whose backward sums the row gradients per
    task with the extension's CUDA helpers: ``group_by_task`` then ``segmented_sum``, a fixed-order
    reduction without atomics. Used with ``TARP_FAST_CUDA_HELPERS=1`` (see :mod:`._schedule`);
    otherwise the gather is plain indexing, whose backward is torch's ``index_put_``."""

    @staticmethod
    def forward(ctx, g: Tensor, task_index: Tensor) -> Tensor:
        ctx.save_for_backward(task_index)
        ctx.num_tasks = g.shape[0]
        return g[task_index]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (task_index,) = ctx.saved_tensors
        T = ctx.num_tasks
        perm, _, offsets = torch.ops.tarp_fast.group_by_task(task_index, T, None)
        dg = torch.ops.tarp_fast.segmented_sum(grad.float().unsqueeze(1), perm, offsets[: T + 1])
        return dg.squeeze(1).to(grad.dtype), None


def _row_gate(g, kind: str, task_index, M: int, x: Tensor) -> Optional[Tensor]:
    """A gate argument as a contiguous ``[M]`` fp32 tensor (differentiable torch ops), or None."""
    if kind == "none":
        return None
    if not isinstance(g, Tensor):
        return torch.full((M,), float(g), dtype=torch.float32, device=x.device)
    g = g.to(torch.float32)
    if kind == "task":
        g = _TaskGateRows.apply(g, task_index) if _launch.use_cuda_helpers(x.device) else g[task_index]
    elif g.dim() == 0:
        g = g.expand(M)
    return g.contiguous()


def triton_tarp(spec, x, weight, bias, U, V, G, P, Q, *, scaling, scale_offset, task_index, gate, skip_gate,
                residual, activation, hard_skip) -> Tensor:
    """Run the registered ops for an already validated call (``spec`` from ``check_tarp_args``)."""
    M, Kd, N = spec.M, spec.K, spec.N
    if task_index is not None:
        task_index = task_index.contiguous()  # the schedule kernels read it with unit stride
    empty_factors = ()
    if U is not None and spec.rank == 0:
        # rank 0: the delta U S(x) V x is exactly 0. The kernels run without it (a zero-width
        # factor would be read out of bounds) and the empty factors get their gradients below.
        empty_factors = tuple(t for t in (U, V, G) if t is not None)
        U = V = G = None
    kernel_task_index = task_index
    if task_index is not None and U is None and P is None:
        # no per-task factor left (rank 0, no P): every row runs the same weights; per-task
        # gates were read per row by _row_gate with the real task_index
        kernel_task_index = None
    x2 = x.reshape(M, Kd).contiguous()
    w = weight.contiguous()
    if P is not None:
        w = triton_scale_weight(w, P.contiguous(), Q.contiguous(), float(scale_offset))
    cont = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    res = residual.reshape(M, N).contiguous() if residual is not None else None
    g = _row_gate(gate, spec.gate_kind, task_index, M, x)
    sg = _row_gate(skip_gate, spec.skip_kind, task_index, M, x)
    y = triton_tarp_fwd(x2, w, cont(bias), cont(U), cont(V), cont(G), kernel_task_index, g, sg, res,
                        float(scaling), activation, bool(hard_skip))[0]
    if any(t.requires_grad for t in empty_factors) and torch.is_grad_enabled():
        # + 0 (a sum over no elements): connects the rank-0 factors, whose gradients are empty
        y = y + sum(t.sum() for t in empty_factors).to(y.dtype)
    return y.reshape(spec.out_shape)
