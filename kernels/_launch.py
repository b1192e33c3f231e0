"""Launchers of the Triton kernels: flatten, allocate, pick a config, build the launch, run it.

Each ``plan_*`` function returns :class:`Launch` objects (kernel, grid, runtime arguments,
constexpr flags, warps, stages) without running them, so the compile tier
(:mod:`tarp_fast.kernels.compile_check`) compiles exactly what the launchers launch. The
``tarp_fwd`` / ``tarp_bwd`` / ``scale_weight_*`` functions run the plans; they take the arguments
already normalized by :mod:`._custom_ops` (2-D ``x``, contiguous factors, per-row fp32 gates).

Outputs are allocated by :func:`._plan.alloc` (poisoned under ``TARP_FAST_POISON=1`` or
:func:`poison_outputs`, so an element a kernel forgets to write shows up in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import triton

from .._contract import ACTIVATION_CODES, Needs
from . import _kernels as K
from . import precompile
from ._configs import KernelConfig, config_for, device_arch, dx_design
from ._plan import Launch, poison_outputs
from ._plan import alloc as _alloc
from ._schedule import (
    row_groups,
    row_groups_cuda,
    row_groups_triton,
    tile_table,
    tile_table_triton,
    triton_schedule_fits,
    use_cuda_helpers,
)

__all__ = ["Launch", "tarp_fwd", "tarp_bwd", "scale_weight_fwd", "scale_weight_bwd", "poison_outputs",
           "tf32_matmul_allowed"]

ACT_CODES = ACTIVATION_CODES  # (the codes the kernels' ACT constexpr reads)


def tf32_matmul_allowed() -> bool:
    """Whether torch lets fp32 matmuls on CUDA use TF32, read without tripping torch's API check.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` (``"ieee"`` | ``"tf32"`` |
    ``"none"``: not set, inherited from ``torch.backends.fp32_precision``, and reading it gives the
    inherited value); once anything has set the new API, reading the legacy ``allow_tf32``
    raises ("mix of the legacy and new APIs"). So the new attribute decides where it exists and
    is set; the legacy flag only where it is not (older torch, or nothing set with the new API:
    then the legacy flag is what cuBLAS follows). A mixed state that still raises counts as no
    TF32 (exact fp32: never less accurate than what the caller asked for).
    """
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)
    if prec == "tf32":
        return True
    if prec == "ieee":
        return False
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def _dot_prec(dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot`` input precision: fp32 operands follow torch's TF32 setting for CUDA matmuls
    (:func:`tf32_matmul_allowed`: TF32 tensor cores when allowed, exact fp32 otherwise);
    16-bit operands are exact anyway."""
    on_gpu = device.type == "cuda" or precompile.capturing()  # (a capture's CPU tensors stand for CUDA ones)
    if dtype == torch.float32 and on_gpu and tf32_matmul_allowed():
        return "tf32"
    return "ieee"


def _pad_rank(r: int) -> int:
    """``tl.dot`` needs every dimension >= 16: ranks are padded on chip (masked loads)."""
    return max(16, triton.next_power_of_2(max(r, 1)))


def _bench_fn(launch_for_cfg, device):
    """A timing callable for autotuning, or None where tuning must not run (CPU, graph capture).

    Under :func:`tarp_fast.kernels.precompile.capture` (launches recorded, not run) it "times"
    each candidate by recording its launches, so the compiles that autotuning would do are
    counted and precompiled too."""
    if precompile.capturing():
        def record(cfg):
            for p in launch_for_cfg(cfg):
                p.run()
            return 1.0

        return record
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None

    def bench(cfg):
        plans = launch_for_cfg(cfg)
        return triton.testing.do_bench(lambda: [p.run() for p in plans], warmup=5, rep=20)

    return bench


# ----------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------
@dataclass
class Rows:
    """The row schedule of one call (see :mod:`._schedule`)."""

    M: int
    T: int  # task segments (1 without task_index); segment T holds the dropped rows
    grouped: bool
    perm: torch.Tensor  # [M] int32 (empty when not grouped)
    seg_off: torch.Tensor  # [T + 2] int32 (empty when not grouped)
    _tables: dict[int, tuple] = field(default_factory=dict)

    def tiles(self, BM: int):
        """``(tile_seg, tile_start, tile_end, num_row_tiles)`` for tile height ``BM``."""
        if not self.grouped:
            return None, None, None, triton.cdiv(self.M, BM)
        if BM not in self._tables:
            build = tile_table_triton if triton_schedule_fits(self.T) else tile_table
            self._tables[BM] = build(self.seg_off, self.M, self.T, BM)
        return self._tables[BM]


def grouped_in_op(task_index, gate, hard_skip: bool) -> bool:
    """Whether the fused kernels regroup the rows of a call, from its custom op's arguments: by
    task when a per-task factor is read (``task_index`` is None there otherwise), kept rows first
    when ``hard_skip`` has a gate to drop rows by (``gate`` is None unless one was given).
    Otherwise tiles are plain row ranges (no schedule is built)."""
    return task_index is not None or (hard_skip and gate is not None)


def make_rows(M: int, T: int, task_index, gate, hard_skip: bool, device) -> Rows:
    """The row schedule of a forward: built on the device when the rows are grouped."""
    if not grouped_in_op(task_index, gate, hard_skip):
        # no schedule: tiles are plain row ranges, so no kernel runs here (this is on the
        # critical path of every plain call); empty, distinct tensors stand for perm and seg_off
        return Rows(M, T, False, torch.empty(0, dtype=torch.int32, device=device),
                    torch.empty(0, dtype=torch.int32, device=device))
    drop_gate = gate if (hard_skip and gate is not None) else None
    if use_cuda_helpers(device):
        perm, seg_off = row_groups_cuda(M, T, task_index, drop_gate)
    elif triton_schedule_fits(T, M):
        perm, seg_off = row_groups_triton(M, T, task_index, drop_gate)
    else:
        perm, seg_off = row_groups(M, T, task_index, None if drop_gate is None else drop_gate == 0, device)
    return Rows(M, T, True, perm, seg_off)


def _sched_args(rows: Rows, BM: int):
    seg, start, end, num = rows.tiles(BM)
    perm = rows.perm if rows.grouped else None
    return dict(perm_ptr=perm, tile_seg_ptr=seg, tile_start_ptr=start, tile_end_ptr=end), num


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
def _num_tasks(weight, U, task_index) -> int:
    if task_index is None:
        return 1
    if U is not None and U.dim() == 3:
        return U.shape[0]
    return weight.shape[0]


def plan_proj(*, x, V, G, proj, rows: Rows, cfg: KernelConfig) -> Launch:
    M, Kd = x.shape
    R = V.shape[-2]
    C = proj.shape[1]
    sched, num_m = _sched_args(rows, cfg.BM)
    BC = min(cfg.BN, max(16, triton.next_power_of_2(C)))
    num_c = triton.cdiv(C, BC)
    x_desc = _descriptor(x, cfg.BM, cfg.BK) if cfg.tma and not rows.grouped and _tma_can_serve(x) else None
    return Launch(
        K._tarp_proj_kernel, (num_m * num_c,),
        dict(x_ptr=x, v_ptr=V, g_ptr=G, proj_ptr=proj, x_desc=x_desc, **sched, M=M, K=Kd, T=rows.T, num_m=num_m,
             num_c=num_c),
        dict(R=R, C=C, HAS_G=G is not None, GROUPED=rows.grouped, TMA_X=x_desc is not None, BM=cfg.BM, BC=BC,
             BK=cfg.BK, DOT_PREC=_dot_prec(x.dtype, x.device)),
        cfg.num_warps, cfg.num_stages, name="proj", tags=dict(tma_x=x_desc is not None),
    )


def plan_z(*, proj, z, rows: Rows, R: int) -> Launch:
    M, C = proj.shape
    RZ = triton.next_power_of_2(max(R, 1))
    BMZ = max(1, min(64, 2048 // (RZ * RZ)))
    return Launch(
        K._tarp_z_kernel, (triton.cdiv(M, BMZ),),
        dict(proj_ptr=proj, z_ptr=z, perm_ptr=rows.perm if rows.grouped else None, M=M,
             T_seg_end_ptr=rows.seg_off[rows.T:] if rows.grouped else None),
        dict(R=R, C=C, RZ=RZ, BMZ=BMZ, GROUPED=rows.grouped),
        4, 1, name="z",
    )


def _tma_can_serve(t: torch.Tensor) -> bool:
    """Whether a contiguous row-major ``t`` can be read with a TMA descriptor on its device:
    Hopper or newer (the interpreter and the compile tier's meta tensors count as able), a
    16-byte aligned base and rows of a multiple of 16 bytes."""
    if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device)[0] < 9:
        return False
    if t.device.type != "cuda" and (precompile.capture_arch() or 90) < 90:
        return False
    aligned = t.device.type == "meta" or t.data_ptr() % 16 == 0
    return aligned and t.is_contiguous() and (t.shape[-1] * t.element_size()) % 16 == 0 and 0 < t.numel() < 2**31


def _tma_weight(weight: torch.Tensor, cfg: KernelConfig, n_tile: int) -> bool:
    """Whether the weight goes through TMA: a per-task weight ``[T, N, K]`` only when no N tile of
    ``n_tile`` rows straddles two tasks (a tile past N would read the next task's rows: harmless
    times zeros unless those hold inf or NaN, and then it would leak into this task's sums)."""
    return cfg.tma and _tma_can_serve(weight) and (weight.dim() == 2 or weight.shape[-2] % n_tile == 0)


def _descriptor(t: torch.Tensor, rows: int, cols: int):
    """A TMA descriptor of row-major ``t`` viewed as 2-D ``[numel / last, last]``, block ``[rows, cols]``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    t2 = t.reshape(-1, t.shape[-1])
    return TensorDescriptor(t2, list(t2.shape), [t2.shape[1], 1], [rows, cols])


def plan_main(*, x, weight, bias, U, z, gate, skip, residual, out, rows: Rows, cfg: KernelConfig,
              scaling: float, act: int, dy=None, dgate_part=None) -> Launch:
    """The fused forward kernel; with ``dy`` given, its backward-recompute mode (``out`` = dpre)."""
    M, Kd = x.shape
    N = weight.shape[-2]
    R = U.shape[-1] if U is not None else 0
    sched, num_m = _sched_args(rows, cfg.BM)
    num_n = triton.cdiv(N, cfg.BN)
    bwd = dy is not None
    x_desc = _descriptor(x, cfg.BM, cfg.BK) if cfg.tma and not rows.grouped and _tma_can_serve(x) else None
    w_desc = _descriptor(weight, cfg.BN, cfg.BK) if _tma_weight(weight, cfg, cfg.BN) else None
    return Launch(
        K._tarp_fwd_kernel, (num_m * num_n,),
        dict(x_ptr=x, w_ptr=weight, bias_ptr=bias, u_ptr=U, z_ptr=z, gate_ptr=gate, skip_ptr=skip,
             res_ptr=residual, out_ptr=out, dy_ptr=dy, dgate_part_ptr=dgate_part, x_desc=x_desc, w_desc=w_desc,
             **sched, M=M, N=N, K=Kd, T=rows.T, num_m=num_m, num_n=num_n, scaling=float(scaling)),
        dict(R=max(R, 1), RP=_pad_rank(R), HAS_BIAS=bias is not None, HAS_DELTA=U is not None,
             W_TASK=weight.dim() == 3, HAS_GATE=gate is not None, HAS_SKIP=skip is not None,
             HAS_RES=residual is not None, ACT=act, GROUPED=rows.grouped, BWD=bwd,
             NEED_DGATE=dgate_part is not None, TMA_X=x_desc is not None, TMA_W=w_desc is not None,
             BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, DOT_PREC=_dot_prec(x.dtype, x.device)),
        cfg.num_warps, cfg.num_stages, name="fwd_recompute" if bwd else "fwd",
        tags=dict(tma_x=x_desc is not None, tma_w=w_desc is not None),
    )


def tarp_fwd(*, x, weight, bias, U, V, G, task_index, gate, skip, residual, scaling: float, act: int,
             hard_skip: bool):
    """Forward: ``(y [M, N], proj [M, C] fp32, z [M, r] fp32, perm [M] int32, seg_off [T+2] int32)``.

    Passes: (1) the row schedule (a device-side counting sort in three small Triton kernels, plus
    one for the tile table; only with tasks or ``hard_skip``);
    (2) ``proj = [V_t; G_t] x`` (one GEMM of width ``C = r + r*r`` over the kept rows);
    (3) ``z = S h`` per row; (4) the fused main kernel. ``proj`` and ``z`` are what backward
    needs of the delta (``M (2r + r*r)`` floats); nothing ``[M, N]`` is kept.

    Why a pre-pass for ``h`` and ``S`` rather than recomputing them in every N tile: the
    projections are ``r + r*r`` columns wide (272 at r = 16), so recomputing them per ``BN = 128``
    output tile would add ``(r + r*r) / BN`` = 2.1x the base GEMM's FLOPs (at r = 4: 16%), while
    the pre-pass adds them once (``(r + r*r) / N`` = 6.6% at N = 4096, r = 16: the op's floor)
    plus one extra read of ``x`` (``M K`` elements, about 1.5% of the GEMM's time at
    M = 8192, K = N = 4096 on an H100-class GPU by bandwidth) and ``M (r + r*r)`` fp32 written and
    read. A persistent/cluster scheme would save that read but not FLOPs.
    """
    M, Kd = x.shape
    N = weight.shape[-2]
    T = _num_tasks(weight, U, task_index)
    dev = x.device
    rows = make_rows(M, T, task_index, gate, hard_skip, dev)
    # distinct empty tensors: a custom op's outputs may not alias each other
    empty32 = lambda: torch.empty(0, dtype=torch.float32, device=dev)  # noqa: E731
    proj, z = empty32(), empty32()
    out = _alloc((M, N), x.dtype, dev)
    if M == 0:
        if U is not None:
            R = U.shape[-1]
            proj = _alloc((0, R + R * R if G is not None else R), torch.float32, dev)
            z = _alloc((0, R), torch.float32, dev) if G is not None else empty32()
        return out, proj, z, rows.perm, rows.seg_off
    item = x.element_size()
    arch = device_arch(dev)
    if U is not None:
        R = U.shape[-1]
        C = R + R * R if G is not None else R
        proj = _alloc((M, C), torch.float32, dev)

        def proj_plans(cfg):
            return [plan_proj(x=x, V=V, G=G, proj=proj, rows=rows, cfg=cfg)]

        cfg = config_for("proj", M, item, arch=arch, key=(Kd, C, rows.grouped), bench=_bench_fn(proj_plans, dev))
        proj_plans(cfg)[0].run()
        if G is not None:
            z = _alloc((M, R), torch.float32, dev)
            plan_z(proj=proj, z=z, rows=rows, R=R).run()
    zz = z if G is not None else proj

    def plans(cfg):
        return [plan_main(x=x, weight=weight, bias=bias, U=U, z=zz if U is not None else None, gate=gate,
                          skip=skip, residual=residual, out=out, rows=rows, cfg=cfg, scaling=scaling, act=act)]

    rank = U.shape[-1] if U is not None else 0
    cfg = config_for("fwd", M, item, rank=rank, arch=arch, key=(N, Kd, rank, rows.grouped), bench=_bench_fn(plans, dev))
    for p in plans(cfg):
        p.run()
    return out, proj, z, rows.perm, rows.seg_off


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
def plan_dx(*, dp, rowscale, weight, U, V, G, proj, dy, skip, x, dx, dproj, dskip_part, rows: Rows,
            cfg: KernelConfig, scaling: float, need_dx: bool) -> Launch:
    M, Kd = x.shape
    N = weight.shape[-2]
    R = U.shape[-1] if U is not None else 0
    C = proj.shape[1] if U is not None else 1
    sched, num_m = _sched_args(rows, cfg.BM)
    num_k = triton.cdiv(Kd, cfg.BK) if need_dx else 1
    tma_w = need_dx and _tma_weight(weight, cfg, cfg.BN)
    tma_dp = cfg.tma and not rows.grouped and _tma_can_serve(dp)
    dp_desc = _descriptor(dp, cfg.BM, cfg.BN) if tma_dp else None
    w_desc = _descriptor(weight, cfg.BN, cfg.BK) if tma_w else None
    return Launch(
        K._tarp_bwd_dx_kernel, (num_m * num_k,),
        dict(dp_ptr=dp, rowscale_ptr=rowscale, w_ptr=weight, u_ptr=U, v_ptr=V, g_ptr=G, proj_ptr=proj,
             dy_ptr=dy, skip_ptr=skip, x_ptr=x, dx_ptr=dx, dproj_ptr=dproj, dskip_part_ptr=dskip_part,
             dp_desc=dp_desc, w_desc=w_desc,
             **sched, M=M, N=N, K=Kd, T=rows.T, num_m=num_m, num_k=num_k, scaling=float(scaling)),
        dict(R=max(R, 1), RP=_pad_rank(R), C=C, HAS_DELTA=U is not None, HAS_G=G is not None,
             W_TASK=weight.dim() == 3, ROWSCALE=rowscale is not None, HAS_SKIP=skip is not None and need_dx,
             NEED_DX=need_dx, NEED_DSKIP=dskip_part is not None, GROUPED=rows.grouped,
             TMA_DP=tma_dp, TMA_W=tma_w,
             BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, DOT_PREC=_dot_prec(x.dtype, x.device)),
        cfg.num_warps, cfg.num_stages, name="dx", tags=dict(tma_dp=tma_dp, tma_w=tma_w),
    )


def plan_dx_concat(*, dp, rowscale, weight, V, G, dproj, dy, skip, x, dx, dskip_part, rows: Rows,
                   cfg: KernelConfig) -> Launch:
    """The dx GEMM of the "concat" design: ``dx = [dpre | dproj] [W_t; V_t; G_t] + skip dy``
    (``dproj`` from :func:`plan_dx` with ``need_dx=False``)."""
    M, Kd = x.shape
    N = weight.shape[-2]
    R = V.shape[-2]
    C = dproj.shape[1]
    sched, num_m = _sched_args(rows, cfg.BM)
    num_k = triton.cdiv(Kd, cfg.BK)
    tma_w = _tma_weight(weight, cfg, cfg.BN)
    tma_dp = cfg.tma and not rows.grouped and _tma_can_serve(dp)
    dp_desc = _descriptor(dp, cfg.BM, cfg.BN) if tma_dp else None
    w_desc = _descriptor(weight, cfg.BN, cfg.BK) if tma_w else None
    BC = min(cfg.BN, max(16, triton.next_power_of_2(C)))
    return Launch(
        K._tarp_bwd_dx_concat_kernel, (num_m * num_k,),
        dict(dp_ptr=dp, rowscale_ptr=rowscale, w_ptr=weight, v_ptr=V, g_ptr=G, dproj_ptr=dproj, dy_ptr=dy,
             skip_ptr=skip, x_ptr=x, dx_ptr=dx, dskip_part_ptr=dskip_part, dp_desc=dp_desc, w_desc=w_desc,
             **sched, M=M, N=N, K=Kd, T=rows.T, num_m=num_m, num_k=num_k),
        dict(R=R, C=C, HAS_DELTA=True, HAS_G=G is not None, W_TASK=weight.dim() == 3,
             ROWSCALE=rowscale is not None, HAS_SKIP=skip is not None, NEED_DSKIP=dskip_part is not None,
             GROUPED=rows.grouped, TMA_DP=tma_dp, TMA_W=tma_w, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BC=BC,
             GROUP_M=cfg.GROUP_M, DOT_PREC=_dot_prec(x.dtype, x.device)),
        cfg.num_warps, cfg.num_stages, name="dx_concat", tags=dict(tma_dp=tma_dp, tma_w=tma_w),
    )


def plan_wgrad(*, L, Rm, rowscale, out, lsum, rows: Rows, cfg: KernelConfig, A: int, B: int,
               per_task: bool, r_scale: float = 1.0) -> Launch:
    """``out[t] = sum_m L[m, :A]^T (r_scale Rm[m, :B])`` over task t's rows (or all kept rows)."""
    BB = min(cfg.BN, max(16, triton.next_power_of_2(B)))
    BA = min(cfg.BK, max(16, triton.next_power_of_2(A)))
    n_out = rows.T if per_task else 1
    return Launch(
        K._tarp_wgrad_kernel, (triton.cdiv(A, BA) * triton.cdiv(B, BB), n_out),
        dict(l_ptr=L, r_ptr=Rm, rowscale_ptr=rowscale, out_ptr=out, lsum_ptr=lsum,
             perm_ptr=rows.perm if rows.grouped else None, seg_off_ptr=rows.seg_off if rows.grouped else None,
             M=rows.M, A=A, B=B, T=rows.T, l_stride=L.shape[1], r_stride=Rm.shape[1], r_scale=float(r_scale)),
        dict(ROWSCALE=rowscale is not None, PER_TASK=per_task, GROUPED=rows.grouped, LSUM=lsum is not None,
             BA=BA, BB=BB, BM=cfg.BM, DOT_PREC=_dot_prec(Rm.dtype if Rm.dtype != torch.float32 else L.dtype,
                                                          L.device)),
        cfg.num_warps, cfg.num_stages, name="wgrad",
    )


#: The gradients of :func:`tarp_bwd`, each like its input (``gate`` and ``skip_gate``: ``[M]`` fp32);
#: those not asked for are empty tensors.
Grads = NamedTuple("Grads", [(name, torch.Tensor) for name in ("x", "weight", "bias", "U", "V", "G", "gate",
                                                                "skip_gate")])


@dataclass
class _Pass:
    """What every backward pass shares besides tensors: sizes, device, schedule and flags."""

    rows: Rows
    scaling: float
    act: int
    needs: Needs
    M: int
    K: int
    N: int
    R: int  # rank (0 without a delta)
    dtype: torch.dtype
    dev: torch.device

    def __post_init__(self):
        self.item = self.dtype.itemsize
        self.arch = device_arch(self.dev)

    def empty(self, dtype=None) -> torch.Tensor:
        # distinct empty tensors: a custom op's outputs may not alias each other
        return torch.empty(0, dtype=dtype or self.dtype, device=self.dev)


def tarp_bwd(*, dy, x, weight, bias, U, V, G, task_index, gate, skip, proj, z, perm, seg_off, scaling: float,
             act: int, hard_skip: bool, needs: Needs) -> Grads:
    """Backward of :func:`tarp_fwd` for the gradients in ``needs`` (``P``, ``Q`` are ignored: the
    multiplicative term has its own op). Passes, each only when a requested gradient needs it:

    1. :func:`bwd_dpre`: ``dpre = gate act'(pre) dy`` (``[M, N]``, x's dtype) by re-running the
       forward tile (``_tarp_fwd_kernel`` with ``BWD=True``), which also gives
       ``dgate = <dy, act(pre)>`` -- only with an activation or a gate gradient. Otherwise
       ``dpre = gate dy`` is never formed: ``gate`` scales the accumulators of the later passes.
    2. :func:`bwd_dx`: ``dx`` and ``dproj = [dh | vec(dS)]``, by one of two designs
       (:func:`._configs.dx_design`, ``TARP_FAST_DX``): ``fused`` (default), one pass over ``dpre``
       (``_tarp_bwd_dx_kernel``) that recomputes ``e``, ``dh`` and ``dS`` in every K tile of dx;
       ``concat``, a narrow pre-pass (the same kernel without its GEMM) writes ``dproj`` from one
       read of ``dpre``, then ``_tarp_bwd_dx_concat_kernel`` computes ``dx = [dpre | dproj] [W_t; V_t; G_t]``.
    3. :func:`bwd_weight_grads`: segmented GEMMs ``dW = sum dpre x^T`` (per task when the weight is
       per task), ``dU_t = scaling sum dpre z^T``, ``[dV_t; dG_t] = sum dproj x^T``; ``db`` rides
       along as the column sums of the first of these that reads ``dpre``.
    """
    (M, Kd), N = x.shape, weight.shape[-2]
    rows = Rows(M, _num_tasks(weight, U, task_index), grouped_in_op(task_index, gate, hard_skip), perm, seg_off)
    c = _Pass(rows=rows, scaling=scaling, act=act, needs=needs, M=M, K=Kd, N=N, R=U.shape[-1] if U is not None else 0,
              dtype=x.dtype, dev=x.device)
    zz = (z if G is not None else proj) if U is not None else None  # z, or h = proj (bilinear)
    dpre, rowscale, dgate = bwd_dpre(c, dy=dy, x=x, weight=weight, bias=bias, U=U, z=zz, gate=gate, skip=skip)
    dx, dproj, dskip = bwd_dx(c, dpre=dpre, rowscale=rowscale, dy=dy, x=x, weight=weight, U=U, V=V, G=G, proj=proj,
                              skip=skip)
    dW, db, dU, dV, dG = bwd_weight_grads(c, dpre=dpre, rowscale=rowscale, dproj=dproj, x=x, weight=weight,
                                          bias=bias, U=U, V=V, G=G, z=zz, proj=proj)
    f32 = torch.float32
    return Grads(x=dx, weight=dW, bias=db, U=dU, V=dV, G=dG, gate=dgate if dgate is not None else c.empty(f32),
                 skip_gate=dskip if dskip is not None else c.empty(f32))


def bwd_dpre(c: _Pass, *, dy, x, weight, bias, U, z, gate, skip):
    """Pass 1: ``(dpre, rowscale, dgate)``. ``dpre [M, N]`` is materialized by the recompute
    kernel only with an activation or a gate gradient; otherwise it is ``dy`` and ``rowscale`` is
    the gate (applied by the later passes). ``dgate [M]`` fp32 or None."""
    need_dgate = c.needs.gate
    if c.M == 0 or not (c.act != 0 or need_dgate):
        dgate = torch.zeros(c.M, dtype=torch.float32, device=c.dev) if (need_dgate and c.M == 0) else None
        return dy, gate, dgate
    cfg = config_for("recompute", c.M, c.item, arch=c.arch)
    dpre = _alloc((c.M, c.N), c.dtype, c.dev)
    part = _alloc((triton.cdiv(c.N, cfg.BN), c.M), torch.float32, c.dev) if need_dgate else None
    plan_main(x=x, weight=weight, bias=bias, U=U, z=z, gate=gate, skip=skip, residual=None, out=dpre, rows=c.rows,
              cfg=cfg, scaling=c.scaling, act=c.act, dy=dy, dgate_part=part).run()
    return dpre, None, part.sum(0) if need_dgate else None


def bwd_dx(c: _Pass, *, dpre, rowscale, dy, x, weight, U, V, G, proj, skip):
    """Pass 2: ``(dx, dproj, dskip)``: ``dx [M, K]`` (empty when not needed), ``dproj [M, C]`` fp32
    (None without a delta or without dx / dV / dG), ``dskip [M]`` fp32 or None."""
    needs, M, Kd, N, R = c.needs, c.M, c.K, c.N, c.R
    dx = _alloc((M, Kd), c.dtype, c.dev) if needs.x else c.empty()
    dproj = dskip = None
    if M > 0 and (needs.x or (U is not None and (needs.V or needs.G))):
        dproj = _alloc((M, proj.shape[1]), torch.float32, c.dev) if U is not None else None
        do_dskip = needs.skip_gate and needs.x
        common = dict(dp=dpre, rowscale=rowscale, weight=weight, V=V, G=G, dy=dy, skip=skip, x=x, dx=dx,
                      dproj=dproj, rows=c.rows)

        def dskip_part(cfg):
            return _alloc((triton.cdiv(Kd, cfg.BK), M), torch.float32, c.dev) if do_dskip else None

        if needs.x and U is not None and dx_design() == "concat":
            # the pre-pass: dproj from one read of dpre (no dx GEMM, one K tile)
            pre = config_for("dx_pre", M, c.item, rank=R, arch=c.arch)
            plan_dx(**common, U=U, proj=proj, dskip_part=None, cfg=pre, scaling=c.scaling, need_dx=False).run()

            def dx_launch(cfg):  # the concat design's dx GEMM
                part = dskip_part(cfg)
                return plan_dx_concat(**common, dskip_part=part, cfg=cfg), part

            bench = _bench_fn(lambda cfg: [dx_launch(cfg)[0]], c.dev)
            cfg = config_for("dx_concat", M, c.item, rank=R, arch=c.arch, key=(N, Kd, R, c.rows.grouped), bench=bench)
        else:
            def dx_launch(cfg):
                part = dskip_part(cfg)
                return plan_dx(**common, U=U, proj=proj, dskip_part=part, cfg=cfg, scaling=c.scaling,
                               need_dx=needs.x), part

            # tuned like the forward (the kernel writes every output element once: a relaunch is
            # idempotent), except above rank 16, where only the wide-rank default is spill-checked
            bench = _bench_fn(lambda cfg: [dx_launch(cfg)[0]], c.dev) if R <= 16 else None
            cfg = config_for("dx", M, c.item, rank=R, arch=c.arch, key=(N, Kd, R, c.rows.grouped, needs.x),
                             bench=bench)
        launch, part = dx_launch(cfg)
        launch.run()
        if do_dskip:
            dskip = part.sum(0)
    if needs.skip_gate and dskip is None:
        # skip gate without dx (x frozen): one reduction, no kernel of its own
        dskip = (dy.float() * x.float()).sum(1)
    return dx, dproj, dskip


def bwd_weight_grads(c: _Pass, *, dpre, rowscale, dproj, x, weight, bias, U, V, G, z, proj):
    """Pass 3: ``(dW, db, dU, dV, dG)`` by segmented GEMMs (each tuned on its own key: their shapes
    differ, ``[N, K]``, ``[N, r]``, ``[C, K]``; every output element is written once, so a tuning
    relaunch is idempotent). ``z``: the forward's ``z`` (``h`` for the bilinear delta)."""
    needs, M, Kd, N, R, T, dev = c.needs, c.M, c.K, c.N, c.R, c.rows.T, c.dev

    def wgrad(L, Rm, rs, out, ls, *, A, B, per_task, r_scale=1.0):
        def plans(cfg):
            return [plan_wgrad(L=L, Rm=Rm, rowscale=rs, out=out, lsum=ls, rows=c.rows, cfg=cfg, A=A, B=B,
                               per_task=per_task, r_scale=r_scale)]

        cfg = config_for("wgrad", M, c.item, arch=c.arch, key=(A, B, per_task, c.rows.grouped, ls is not None),
                         bench=_bench_fn(plans, dev))
        plans(cfg)[0].run()

    # db rides along as the column sums of the first GEMM that reads dpre, but only of one that
    # launches: with K = 0 (dW [N, 0]) or rank 0 (dU [N, 0]) the grid is empty and would leave
    # lsum unwritten, so then a column-sum pass of its own computes it
    lsum = None
    dW, dU, db = c.empty(), c.empty(), c.empty()
    if needs.weight:
        dW = torch.empty(weight.shape, dtype=weight.dtype, device=dev)
        if needs.bias and Kd > 0:
            lsum = torch.empty((T if weight.dim() == 3 else 1, N), dtype=torch.float32, device=dev)
        wgrad(dpre, x, rowscale, dW, lsum, A=N, B=Kd, per_task=weight.dim() == 3)
    if needs.U:
        dU = torch.empty(U.shape, dtype=U.dtype, device=dev)
        ls = None
        if needs.bias and lsum is None and R > 0:
            ls = lsum = torch.empty((T if U.dim() == 3 else 1, N), dtype=torch.float32, device=dev)
        wgrad(dpre, z, rowscale, dU, ls, A=N, B=R, per_task=U.dim() == 3, r_scale=c.scaling)
    if needs.bias:
        if lsum is None:
            # no weight GEMM ran: a column-sum pass over dpre (B = 1 column of x as a dummy; with
            # K = 0, x has no column to read: a zero column stands in)
            lsum = torch.empty((1, N), dtype=torch.float32, device=dev)
            scratch = torch.empty((1, N, 1), dtype=torch.float32, device=dev)
            dummy = x if Kd > 0 else torch.zeros((M, 1), dtype=x.dtype, device=dev)
            wgrad(dpre, dummy, rowscale, scratch, lsum, A=N, B=1, per_task=False)
        db = lsum.sum(0).to(bias.dtype)
    dV, dG = c.empty(), c.empty()
    if U is not None and (needs.V or needs.G):
        C = proj.shape[1]
        dvg = torch.empty((U.shape[0] if U.dim() == 3 else 1, C, Kd), dtype=torch.float32, device=dev)
        if M > 0:
            wgrad(dproj, x, None, dvg, None, A=C, B=Kd, per_task=U.dim() == 3)
        else:
            dvg.zero_()
        if needs.V:
            dV = dvg[:, :R].reshape(V.shape).to(V.dtype, copy=True)
        if needs.G:
            dG = dvg[:, R:].reshape(*V.shape[:-2], R * R, Kd).to(G.dtype, copy=True)
    return dW, db, dU, dV, dG


# ----------------------------------------------------------------------------------------------
# multiplicative term
# ----------------------------------------------------------------------------------------------
def plan_scale(*, weight, P, Q, out, offset: float, cfg: KernelConfig) -> Launch:
    N, Kd = weight.shape
    T = P.shape[0] if P.dim() == 3 else 1
    q = P.shape[-1]
    return Launch(
        K._scale_weight_kernel, (triton.cdiv(N, cfg.BN) * triton.cdiv(Kd, cfg.BK), T),
        dict(w_ptr=weight, p_ptr=P, q_ptr=Q, out_ptr=out, N=N, K=Kd, offset=float(offset)),
        dict(Q=q, QP=_pad_rank(q), BN=cfg.BN, BK=cfg.BK, DOT_PREC=_dot_prec(weight.dtype, weight.device)),
        cfg.num_warps, cfg.num_stages, name="scale",
    )


def scale_weight_fwd(weight, P, Q, offset: float) -> torch.Tensor:
    """``W_t = weight * softplus(P_t Q_t + offset)``: ``[T, N, K]`` (``[N, K]`` for 2-D ``P``).

    Why the effective weight is materialized (once per call) instead of built inside the main
    kernel's K-loop: fused, every M tile would rebuild its ``[BN, BK]`` weight tiles, i.e. the
    whole ``W_t`` is rebuilt ``ceil(M_t / BM)`` times. Per element that is ``q`` MACs (a tensor-core
    dot padded to 16: ``16 / BM`` = 12.5% of the GEMM at ``BM = 128``) plus a softplus (``exp`` and
    ``log1p``: 2 special-function ops). An H100 SM issues 16 special-function ops per clock
    against 1024 bf16 tensor-core FMAs, so the softplus alone costs ``2 * 1024 / (16 * BM)`` = 1.0x
    the GEMM's time at ``BM = 128``: fusing would roughly double the op. Materialized, the cost is
    one pass over ``[N, K]`` per task: ``N K`` softplus (once, not ``M / BM`` times) and one extra
    read of ``W0`` plus the write of ``W_t`` (the main kernel then reads ``W_t`` instead of ``W0``).
    At ``K = N = 4096`` in bf16 that is 64 MB, about 13 us at an H200's 4.8 TB/s, against about
    0.4 ms for the ``M = 8192`` GEMM: ~3%. The price is ``T N K`` elements of memory (stated in
    the README).
    """
    out = _alloc(P.shape[:-1] + weight.shape[-1:], weight.dtype, weight.device)
    cfg = config_for("scale", weight.shape[0], weight.element_size(), arch=device_arch(weight.device))
    plan_scale(weight=weight, P=P, Q=Q, out=out, offset=offset, cfg=cfg).run()
    return out


def plan_scale_bwd(*, dwe, weight, P, Q, dw, y, offset: float, cfg: KernelConfig, need_w: bool, need_pq: bool):
    N, Kd = weight.shape
    T = P.shape[0] if P.dim() == 3 else 1
    q = P.shape[-1]
    return Launch(
        K._scale_weight_bwd_kernel, (triton.cdiv(N, cfg.BN) * triton.cdiv(Kd, cfg.BK),),
        dict(dwe_ptr=dwe, w_ptr=weight, p_ptr=P, q_ptr=Q, dw_ptr=dw, y_ptr=y, N=N, K=Kd, T=T,
             offset=float(offset)),
        dict(Q=q, QP=_pad_rank(q), NEED_W=need_w, NEED_PQ=need_pq, BN=cfg.BN, BK=cfg.BK,
             DOT_PREC=_dot_prec(weight.dtype, weight.device)),
        cfg.num_warps, cfg.num_stages, name="scale_bwd",
    )


def scale_weight_bwd(dwe, weight, P, Q, offset: float, need_w: bool, need_pq: bool):
    """``(dW0, dP, dQ)`` (empty when not needed). ``dP_t = Y_t Q_t^T`` and ``dQ_t = P_t^T Y_t``
    with ``Y_t = dW_t * W0 * sigmoid(a_t)`` from the kernel: two rank-q products done with
    ``torch.matmul`` in fp32 (``2 T N K q`` FLOPs, off the frozen-base fast path)."""
    dev = weight.device
    empty = lambda: torch.empty(0, dtype=weight.dtype, device=dev)  # noqa: E731
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if need_w else None
    y = torch.empty(P.shape[:-1] + weight.shape[-1:], dtype=torch.float32, device=dev) if need_pq else None
    cfg = config_for("scale_bwd", weight.shape[0], weight.element_size(), arch=device_arch(dev))
    plan_scale_bwd(dwe=dwe.contiguous(), weight=weight, P=P, Q=Q, dw=dw, y=y, offset=offset, cfg=cfg, need_w=need_w,
                   need_pq=need_pq).run()
    dP, dQ = empty(), empty()
    if need_pq:
        dP = torch.matmul(y, Q.float().transpose(-1, -2)).to(P.dtype)
        dQ = torch.matmul(P.float().transpose(-1, -2), y).to(Q.dtype)
    return (dw if need_w else empty()), dP, dQ
