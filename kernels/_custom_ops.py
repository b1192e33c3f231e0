"""torch.library registration of the Triton path: every schema of the backend, and the one place
where a :class:`~tarp_fast._contract.TarpCall` is unpacked into the ops' arguments (:func:`run`).

Ops (namespace ``tarp_fast``):

* ``triton_tarp_fwd(x, weight, bias?, U?, V?, G?, task_index?, gate?, skip_gate?, residual?,
  scaling, activation, hard_skip) -> (y, proj, z, perm, seg_off)``
* ``triton_tarp_bwd(dy, x, weight, ..., proj, z, perm, seg_off, ..., needs) -> (dx, dW, db, dU, dV,
  dG, dgate, dskip)`` (``needs``: the fields of :class:`~tarp_fast._contract.Needs` in order)
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

import os
from typing import Optional

import torch
from torch import Tensor

from .._contract import Needs, TarpCall, check_task_range
from . import _launch, precompile

__all__ = ["run", "triton_scale_weight"]


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    return _launch.tarp_fwd(x=x, weight=weight, bias=bias, U=U, V=V, G=G, task_index=task_index, gate=gate,
                            skip=skip_gate, residual=residual, scaling=scaling, act=_launch.ACT_CODES[activation],
                            hard_skip=hard_skip)


def _fake_aux(x, weight, U, G, task_index, gate, hard_skip):
    M = x.shape[0]
    if U is not None:
        R = U.shape[-1]
        proj = x.new_empty((M, R + R * R if G is not None else R), dtype=torch.float32)
        z = x.new_empty((M, R), dtype=torch.float32) if G is not None else x.new_empty(0, dtype=torch.float32)
    else:
        proj = z = x.new_empty(0, dtype=torch.float32)
    T = _launch._num_tasks(weight, U, task_index)
    grouped = _launch.grouped_in_op(task_index, gate, hard_skip)
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
    """Gradients ``(dx, dweight, dbias, dU, dV, dG, dgate, dskip_gate)``; those not asked for in
    ``needs`` (a :class:`~tarp_fast._contract.Needs` as a list) are empty tensors."""
    grads = _launch.tarp_bwd(
        dy=dy, x=x, weight=weight, bias=bias, U=U, V=V, G=G, task_index=task_index, gate=gate, skip=skip_gate,
        proj=proj, z=z, perm=perm, seg_off=seg_off, scaling=scaling, act=_launch.ACT_CODES[activation],
        hard_skip=hard_skip, needs=Needs(*needs))
    return grads.x, grads.weight, grads.bias, grads.U, grads.V, grads.G, grads.gate, grads.skip_gate


@triton_tarp_bwd.register_fake
def _(dy, x, weight, bias, U, V, G, task_index, gate, skip_gate, proj, z, perm, seg_off, scaling, activation,
      hard_skip, needs):
    need = Needs(*needs)

    def like(flag, t):
        return t.new_empty(t.shape) if flag and t is not None else x.new_empty(0)

    def per_row(flag):
        return x.new_empty((x.shape[0],) if flag else (0,), dtype=torch.float32)

    return (like(need.x, x), like(need.weight, weight), like(need.bias, bias), like(need.U, U), like(need.V, V),
            like(need.G, G), per_row(need.gate), per_row(need.skip_gate))


def _tarp_setup(ctx, inputs, output):
    (x, weight, bias, U, V, G, task_index, gate, skip_gate, residual, scaling, activation, hard_skip) = inputs
    _, proj, z, perm, seg_off = output
    ctx.save_for_backward(x, weight, bias, U, V, G, task_index, gate, skip_gate, proj, z, perm, seg_off)
    ctx.scaling, ctx.activation, ctx.hard_skip = scaling, activation, hard_skip
    ctx.mark_non_differentiable(proj, z, perm, seg_off)


def _tarp_backward(ctx, dy, _dproj, _dz, _dperm, _dseg):
    (x, weight, bias, U, V, G, task_index, gate, skip_gate, proj, z, perm, seg_off) = ctx.saved_tensors
    ng = ctx.needs_input_grad  # in the order of triton_tarp_fwd's arguments
    needs = Needs(x=ng[0], weight=ng[1], bias=ng[2] and bias is not None, U=ng[3] and U is not None,
                  V=ng[4] and V is not None, G=ng[5] and G is not None, gate=ng[7] and gate is not None,
                  skip_gate=ng[8] and skip_gate is not None)
    d = dict.fromkeys(Needs._fields)
    if any(needs):
        outs = triton_tarp_bwd(dy.contiguous(), x, weight, bias, U, V, G, task_index, gate, skip_gate, proj, z,
                               perm, seg_off, ctx.scaling, ctx.activation, ctx.hard_skip, list(needs))
        for name, g in zip(("x", "weight", "bias", "U", "V", "G", "gate", "skip_gate"), outs):
            d[name] = g if getattr(needs, name) else None
    return (d["x"], d["weight"], d["bias"], d["U"], d["V"], d["G"], None, d["gate"], d["skip_gate"],
            dy if ng[9] else None, None, None, None)


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


def _row_gate(call: TarpCall, which: str) -> Optional[Tensor]:
    """``gate`` or ``skip_gate`` as the kernels read it: a contiguous ``[M]`` fp32 tensor made with
    differentiable torch ops (so its gradient reaches the caller's tensor), or None."""
    M = call.spec.M
    per_task = (call.spec.gate_kind if which == "gate" else call.spec.skip_kind) == "task"
    gather = _TaskGateRows.apply if per_task and _launch.use_cuda_helpers(call.x.device) else None
    g = call.gate_rows(which, torch.float32, gather)
    if g is None:
        return None
    if not isinstance(g, Tensor):
        return torch.full((M,), g, dtype=torch.float32, device=call.x.device)
    return (g.expand(M) if g.dim() == 0 else g).contiguous()


def run(call: TarpCall) -> Tensor:
    """The Triton backend's entry (from :func:`tarp_fast.ops.tarp_linear`): check that the kernels
    can run this validated call here, then unpack it into the registered ops (the one place the
    call object is unpacked). Returns ``call.spec.out_shape`` in x's dtype."""
    # (under precompile.capture launches are recorded, not run: CPU tensors stand in for CUDA ones)
    spec = call.spec
    capturing = precompile.capturing()
    if spec.device.type != "cuda" and not _interpreter_on() and not capturing:
        raise RuntimeError(
            f"tarp_linear_triton: needs CUDA tensors, got tensors on {spec.device}; "
            "set TRITON_INTERPRET=1 before starting Python to run the kernels on CPU"
        )
    if spec.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"tarp_linear_triton: argument 'x' must be float16, bfloat16 or float32, got {spec.dtype}")
    if spec.dtype == torch.bfloat16 and spec.device.type != "cuda" and not capturing:
        # numpy, which the interpreter computes with, has no bfloat16: results were garbage (errors
        # of 1e10), so refuse rather than return them
        raise RuntimeError(
            f"tarp_linear_triton: the Triton interpreter (TRITON_INTERPRET=1, tensors on {spec.device}) cannot run "
            f"{spec.dtype}: numpy has no bfloat16. Use float16 or float32 inputs under the interpreter, or run "
            "bfloat16 on a CUDA GPU"
        )
    if spec.multi_task and spec.device.type == "cpu":
        check_task_range(call.task_index, spec.num_tasks)
    U, V, G, P = call.U, call.V, call.G, call.P
    empty_factors = ()
    if U is not None and spec.rank == 0:
        # rank 0: the delta U S(x) V x is exactly 0. The kernels run without it (a zero-width
        # factor would be read out of bounds) and the empty factors get their gradients below.
        empty_factors = tuple(t for t in (U, V, G) if t is not None)
        U = V = G = None
    # no per-task factor left (rank 0, no P): every row runs the same weights; per-task gates are
    # read per row below with the real task_index
    kernel_task_index = call.task_index if (U is not None or P is not None) else None
    w = call.weight.contiguous()  # a Conv1D layer's transposed view: the kernels read unit-stride rows
    if P is not None:
        w = triton_scale_weight(w, P, call.Q, call.scale_offset)
    g = _row_gate(call, "gate")
    sg = _row_gate(call, "skip_gate")
    y = triton_tarp_fwd(call.x, w, call.bias, U, V, G, kernel_task_index, g, sg, call.residual,
                        call.scaling, call.activation, call.hard_skip)[0]
    if any(t.requires_grad for t in empty_factors) and torch.is_grad_enabled():
        # + 0 (a sum over no elements): connects the rank-0 factors, whose gradients are empty
        y = y + sum(t.sum() for t in empty_factors).to(y.dtype)
    return y.reshape(spec.out_shape)
