"""Launchers of the Triton kernels: flatten, allocate, pick a config, build the launch, run it.

Each ``plan_*`` function returns :class:`Launch` objects (kernel, grid, runtime arguments,
constexpr flags, warps, stages) without running them, so the compile tier
(:mod:`tarp_fast.kernels.compile_check`) compiles exactly what the launchers launch. The
``tarp_fwd`` / ``tarp_bwd`` / ``scale_weight_*`` functions run the plans; they take the arguments
already normalized by :mod:`._ops` (2-D ``x``, contiguous factors, per-row fp32 gates).

Outputs are allocated by :func:`._plan.alloc` (poisoned under ``TARP_FAST_POISON=1`` or
:func:`poison_outputs`, so an element a kernel forgets to write shows up in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

from . import _kernels as K
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

ACT_CODES = {"none": 0, "relu": 1, "gelu_tanh": 2}


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
    from . import precompile

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
    from . import precompile

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


def make_rows(M: int, T: int, task_index, gate, hard_skip: bool, device) -> Rows:
    grouped = task_index is not None or (hard_skip and gate is not None)
    if not grouped:
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


def rows_from_saved(M: int, T: int, perm: torch.Tensor, seg_off: torch.Tensor, grouped: bool) -> Rows:
    return Rows(M, T, grouped, perm, seg_off)


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


def plan_proj(x, V, G, proj, rows: Rows, cfg: KernelConfig) -> Launch:
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


def plan_z(proj, z, rows: Rows, R: int) -> Launch:
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
    from . import precompile

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


def plan_main(x, weight, bias, U, z, gate, skip, residual, out, rows: Rows, cfg: KernelConfig, *,
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


def tarp_fwd(x, weight, bias, U, V, G, task_index, gate, skip, residual, scaling: float, activation: str,
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
    read. A persistent/cluster scheme would save that read but not FLOPs. This was decided by that
    arithmetic (no GPU was available); ``benchmarks/gpu_report.py`` measures the result.
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
            return [plan_proj(x, V, G, proj, rows, cfg)]

        cfg = config_for("proj", M, item, arch=arch, key=(Kd, C, rows.grouped), bench=_bench_fn(proj_plans, dev))
        proj_plans(cfg)[0].run()
        if G is not None:
            z = _alloc((M, R), torch.float32, dev)
            plan_z(proj, z, rows, R).run()
    zz = z if G is not None else proj
    act = ACT_CODES[activation]

    def plans(cfg):
        return [plan_main(x, weight, bias, U, zz if U is not None else None, gate, skip, residual, out,
                          rows, cfg, scaling=scaling, act=act)]

    rank = U.shape[-1] if U is not None else 0
    cfg = config_for("fwd", M, item, rank=rank, arch=arch, key=(N, Kd, rank, rows.grouped), bench=_bench_fn(plans, dev))
    for p in plans(cfg):
        p.run()
    return out, proj, z, rows.perm, rows.seg_off


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
def plan_dx(dp, rowscale, weight, U, V, G, proj, dy, skip, x, dx, dproj, dskip_part, rows: Rows,
            cfg: KernelConfig, *, scaling: float, need_dx: bool) -> Launch:
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


def plan_dx_concat(dp, rowscale, weight, V, G, dproj, dy, skip, x, dx, dskip_part, rows: Rows,
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


def plan_wgrad(L, Rm, rowscale, out, lsum, rows: Rows, cfg: KernelConfig, *, A: int, B: int,
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


def tarp_bwd(dy, x, weight, bias, U, V, G, task_index, gate, skip, proj, z, perm, seg_off,
             scaling: float, activation: str, hard_skip: bool, needs: list[bool]):
    """Backward of :func:`tarp_fwd`. ``needs`` = which of ``(x, weight, bias, U, V, G, gate,
    skip_gate)`` need a gradient; the others come back as empty tensors.

    Passes (each only when some requested gradient needs it):

    1. ``dpre = gate act'(pre) dy`` (``[M, N]``, x's dtype) by re-running the forward tile
       (``_tarp_fwd_kernel`` with ``BWD=True``), which also gives ``dgate = <dy, act(pre)>``
       -- only when there is an activation or the gate needs a gradient. Otherwise
       ``dpre = gate dy`` is never formed: ``gate`` scales the accumulators of the later passes.
    2. ``dx`` and ``dproj = [dh | vec(dS)]``, by one of two designs (:func:`._configs.dx_design`,
       ``TARP_FAST_DX``): ``fused`` (default), one pass over ``dpre`` (``_tarp_bwd_dx_kernel``)
       that recomputes ``e``, ``dh`` and ``dS`` in every K tile of dx; ``concat``, a narrow
       pre-pass (the same kernel without its GEMM) writes ``dproj`` from one read of ``dpre``,
       then ``_tarp_bwd_dx_concat_kernel`` computes ``dx = [dpre | dproj] [W_t; V_t; G_t]``.
    3. Segmented weight gradients (``_tarp_wgrad_kernel``): ``dW = sum dpre x^T`` (per task when
       the weight is per task), ``dU_t = scaling sum dpre z^T``, ``[dV_t; dG_t] = sum dproj x^T``;
       ``db`` rides along as the column sums of the first of these that reads ``dpre``.
    """
    need_dx, need_dw, need_db, need_du, need_dv, need_dg, need_dgate, need_dskip = needs
    M, Kd = x.shape
    N = weight.shape[-2]
    T = _num_tasks(weight, U, task_index)
    dev = x.device
    grouped = task_index is not None or (hard_skip and gate is not None)
    rows = rows_from_saved(M, T, perm, seg_off, grouped)
    item = x.element_size()
    arch = device_arch(dev)
    act = ACT_CODES[activation]
    # distinct empty tensors: a custom op's outputs may not alias each other
    empty = lambda: torch.empty(0, dtype=x.dtype, device=dev)  # noqa: E731
    R = U.shape[-1] if U is not None else 0
    zz = (z if G is not None else proj) if U is not None else None

    dx = _alloc((M, Kd), x.dtype, dev) if need_dx else empty()
    dgate = torch.zeros(M, dtype=torch.float32, device=dev) if (need_dgate and M == 0) else None
    dskip = None

    # 1. dpre
    materialize = M > 0 and (act != 0 or need_dgate)
    if materialize:
        cfg = config_for("recompute", M, item, arch=arch)
        num_n = triton.cdiv(N, cfg.BN)
        dpre = _alloc((M, N), x.dtype, dev)
        part = _alloc((num_n, M), torch.float32, dev) if need_dgate else None
        plan_main(x, weight, bias, U, zz, gate, skip, None, dpre, rows, cfg, scaling=scaling, act=act,
                  dy=dy, dgate_part=part).run()
        if need_dgate:
            dgate = part.sum(0)
        rowscale = None
    else:
        dpre, rowscale = dy, gate

    # 2. dx and the r-sized terms
    dproj = None
    need_r = U is not None and (need_dv or need_dg)
    if M > 0 and (need_dx or need_r):
        C = proj.shape[1] if U is not None else 1
        dproj = _alloc((M, C), torch.float32, dev) if U is not None else None
        do_dskip = need_dskip and need_dx
        concat = need_dx and U is not None and dx_design() == "concat"

        def dx_launch(cfg):
            num_k = triton.cdiv(Kd, cfg.BK) if need_dx else 1
            part = _alloc((num_k, M), torch.float32, dev) if do_dskip else None
            return plan_dx(dpre, rowscale, weight, U, V, G, proj, dy, skip, x, dx, dproj, part, rows, cfg,
                           scaling=scaling, need_dx=need_dx), part

        if concat:
            # the pre-pass: dproj from one read of dpre (no dx GEMM, one K tile)
            pre = config_for("dx_pre", M, item, rank=R, arch=arch)
            plan_dx(dpre, rowscale, weight, U, V, G, proj, dy, skip, x, dx, dproj, None, rows, pre,
                    scaling=scaling, need_dx=False).run()

            def dx_launch(cfg):  # noqa: F811 (the concat design's dx GEMM)
                part = _alloc((triton.cdiv(Kd, cfg.BK), M), torch.float32, dev) if do_dskip else None
                return plan_dx_concat(dpre, rowscale, weight, V, G, dproj, dy, skip, x, dx, part, rows, cfg), part

            bench = _bench_fn(lambda c: [dx_launch(c)[0]], dev)
            cfg = config_for("dx_concat", M, item, rank=R, arch=arch, key=(N, Kd, R, rows.grouped), bench=bench)
        else:
            # tuned like the forward (the kernel writes every output element once: a relaunch is
            # idempotent), except above rank 16, where only the "-wide" default is spill-checked
            bench = _bench_fn(lambda c: [dx_launch(c)[0]], dev) if R <= 16 else None
            cfg = config_for("dx", M, item, rank=R, arch=arch, key=(N, Kd, R, rows.grouped, need_dx), bench=bench)
        launch, part = dx_launch(cfg)
        launch.run()
        if do_dskip:
            dskip = part.sum(0)
    if need_dskip and dskip is None:
        # skip gate without dx (x frozen): one reduction, no kernel of its own
        dskip = (dy.float() * x.float()).sum(1)

    # 3. weight gradients: each GEMM is tuned on its own key (their shapes differ: [N, K], [N, r],
    # [C, K]); every output element is written once, so a tuning relaunch is idempotent
    def wgrad(L, Rm, rs, out, ls, *, A, B, per_task, r_scale=1.0):
        def plans(cfg):
            return [plan_wgrad(L, Rm, rs, out, ls, rows, cfg, A=A, B=B, per_task=per_task, r_scale=r_scale)]

        cfg = config_for("wgrad", M, item, arch=arch, key=(A, B, per_task, rows.grouped, ls is not None),
                         bench=_bench_fn(plans, dev))
        plans(cfg)[0].run()

    # db rides along as the column sums of the first GEMM that reads dpre, but only of one that
    # launches: with K = 0 (dW [N, 0]) or rank 0 (dU [N, 0]) the grid is empty and would leave
    # lsum unwritten, so then a column-sum pass of its own computes it
    lsum = None
    dW, dU, db = empty(), empty(), empty()
    if need_dw:
        dW = torch.empty(weight.shape, dtype=weight.dtype, device=dev)
        if need_db and Kd > 0:
            lsum = torch.empty((T if weight.dim() == 3 else 1, N), dtype=torch.float32, device=dev)
        wgrad(dpre, x, rowscale, dW, lsum, A=N, B=Kd, per_task=weight.dim() == 3)
    if need_du:
        dU = torch.empty(U.shape, dtype=U.dtype, device=dev)
        ls = None
        if need_db and lsum is None and R > 0:
            ls = lsum = torch.empty((T if U.dim() == 3 else 1, N), dtype=torch.float32, device=dev)
        wgrad(dpre, zz, rowscale, dU, ls, A=N, B=R, per_task=U.dim() == 3, r_scale=scaling)
    if need_db:
        if lsum is None:
            # no weight GEMM ran: a column-sum pass over dpre (B = 1 column of x as a dummy; with
            # K = 0, x has no column to read: a zero column stands in)
            lsum = torch.empty((1, N), dtype=torch.float32, device=dev)
            scratch = torch.empty((1, N, 1), dtype=torch.float32, device=dev)
            dummy = x if Kd > 0 else torch.zeros((M, 1), dtype=x.dtype, device=dev)
            wgrad(dpre, dummy, rowscale, scratch, lsum, A=N, B=1, per_task=False)
        db = lsum.sum(0).to(bias.dtype)
    dV, dG = empty(), empty()
    if need_r:
        C = proj.shape[1]
        Tu = U.shape[0] if U.dim() == 3 else 1
        dvg = torch.empty((Tu, C, Kd), dtype=torch.float32, device=dev)
        if M > 0:
            wgrad(dproj, x, None, dvg, None, A=C, B=Kd, per_task=U.dim() == 3)
        else:
            dvg.zero_()
        lead = V.shape[:-2]
        if need_dv:
            dV = dvg[:, :R].reshape(V.shape).to(V.dtype, copy=True)
        if need_dg:
            dG = dvg[:, R:].reshape(*lead, R * R, Kd).to(G.dtype, copy=True)
    if dgate is None:
        dgate = torch.empty(0, dtype=torch.float32, device=dev)
    if dskip is None:
        dskip = torch.empty(0, dtype=torch.float32, device=dev)
    return dx, dW, db, dU, dV, dG, dgate, dskip


# ----------------------------------------------------------------------------------------------
# multiplicative term
# ----------------------------------------------------------------------------------------------
def plan_scale(weight, P, Q, out, offset: float, cfg: KernelConfig) -> Launch:
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
    the README). Decided by this arithmetic; no GPU has measured it yet.
    """
    out = _alloc(P.shape[:-1] + weight.shape[-1:], weight.dtype, weight.device)
    cfg = config_for("scale", weight.shape[0], weight.element_size(), arch=device_arch(weight.device))
    plan_scale(weight, P, Q, out, offset, cfg).run()
    return out


def plan_scale_bwd(dwe, weight, P, Q, dw, y, offset: float, cfg: KernelConfig, need_w: bool, need_pq: bool):
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
    plan_scale_bwd(dwe.contiguous(), weight, P, Q, dw, y, offset, cfg, need_w, need_pq).run()
    dP, dQ = empty(), empty()
    if need_pq:
        dP = torch.matmul(y, Q.float().transpose(-1, -2)).to(P.dtype)
        dQ = torch.matmul(P.float().transpose(-1, -2), y).to(Q.dtype)
    return (dw if need_w else empty()), dP, dQ
