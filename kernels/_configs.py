"""Launch configurations of the Triton kernels: defaults per shape class, overrides, autotuning.

Every kernel has a *deterministic default* chosen from the shape class of the call (see each
``*_config`` function), a list of *candidates* (``CANDIDATES``; each passes the compile tier for
sm_90 and sm_80, see ``python -m tarp_fast.kernels.compile_check``), an *explicit override*
(:func:`use_config`, a context manager, used by the tests to force small tiles through every
code path), and *optional autotuning* (``TARP_FAST_AUTOTUNE=1``, CUDA only, not while a CUDA graph
is being captured): the candidates are timed once per bucketed key with
``triton.testing.do_bench`` and the fastest is cached for the process. Keys bucket ``M`` to a
power of two so that varying batch sizes (and the kept-row counts of ``hard_skip``) do not
re-tune forever.

Every config is spill-free with the ptxas of each supported Triton (the compile tier checks).
16-bit many-row forward tiles of 128x128x64 with 8 warps and 3 stages are the classic Hopper /
Ampere GEMM tile (96 KiB of shared memory for the operand ring, fits sm_80's 164 KiB); fp32
halves BK to keep the same shared memory. Few rows (decode-like, <= 64) take 64-row tiles so that
fewer rows are wasted. ``benchmarks/gpu_report.py`` measures them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

__all__ = ["KernelConfig", "use_config", "CANDIDATES", "config_for", "autotune_enabled", "DX_DESIGNS", "dx_design",
           "use_dx_design"]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel launch.

    ``BM``: rows per tile; ``BN``: the second tile dimension (output columns for ``fwd``, the
    reduction chunk over N for ``dx``, the B tile for ``wgrad``); ``BK``: the reduction chunk for
    ``fwd`` / ``proj``, the output K tile for ``dx``, the A tile for ``wgrad``.
    """

    BM: int
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8
    #: read the GEMM operands through TMA tensor descriptors (sm_90+): in the forward and dx
    #: kernels the weight, and ``x`` / ``dpre`` when their rows are contiguous (no task grouping,
    #: no hard skip); in the pre-pass ``x``. The launcher uses pointer loads where TMA cannot
    #: serve (before sm_90, rows not a multiple of 16 bytes).
    tma: bool = False


# name -> shape class (:func:`shape_class`) -> default config.
_DEFAULTS: dict[str, dict[str, KernelConfig]] = {
    "fwd": {
        "few-rows-16bit": KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
        "many-rows-16bit": KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
        "few-rows-32bit": KernelConfig(64, 64, 32, num_warps=4, num_stages=3),
        "many-rows-32bit": KernelConfig(128, 64, 32, num_warps=8, num_stages=3),
    },
    # proj: BN is the column tile over the C = r + r*r projection columns
    "proj": {
        "few-rows-16bit": KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
        "many-rows-16bit": KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
        "few-rows-32bit": KernelConfig(64, 32, 32, num_warps=4, num_stages=3),
        "many-rows-32bit": KernelConfig(128, 64, 32, num_warps=8, num_stages=3),
    },
    # the forward kernel re-run in backward (dpre): the gelu' + dy epilogue needs a narrower tile
    # than the forward (128x128 spills 32 B on sm_90)
    "recompute": {
        "few-rows-16bit": KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
        "many-rows-16bit": KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
        "few-rows-32bit": KernelConfig(64, 64, 32, num_warps=4, num_stages=3),
        "many-rows-32bit": KernelConfig(128, 64, 32, num_warps=8, num_stages=3),
    },
    # dx: BN is the reduction chunk over N, BK the output tile over K. Ranks > 16 ("-rank>16"):
    # the per-row dS / dh loop needs registers, the K tile is halved (128 spills at r = 32).
    # fp32 (FMA dots, large register tiles): 64x32x32 for every rank, the largest tile that is
    # spill-free with both toolchains (128x32x64 spilled 4 B, 32x32x64 8-12 B with ptxas 12.8).
    "dx": {
        "few-rows-16bit": KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
        "many-rows-16bit": KernelConfig(128, 64, 128, num_warps=8, num_stages=3),
        "many-rows-16bit-rank>16": KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
        "few-rows-32bit": KernelConfig(64, 32, 32, num_warps=8, num_stages=3),
        "many-rows-32bit": KernelConfig(64, 32, 32, num_warps=8, num_stages=3),
    },
    # dx, "concat" design (TARP_FAST_DX=concat): the pre-pass that builds dproj = [dh | vec(dS)]
    # from one read of dpre (the dx kernel without its GEMM: BN is the chunk over N, BK unused,
    # kept at 16). 64-row tiles: one program per row tile, so 128 programs at M = 8192 (an H100 /
    # H200 has 132 SMs; 128-row tiles would leave half of them idle).
    "dx_pre": {
        "few-rows-16bit": KernelConfig(64, 64, 16, num_warps=4, num_stages=3),
        "many-rows-16bit": KernelConfig(64, 64, 16, num_warps=4, num_stages=3),
        "few-rows-32bit": KernelConfig(64, 32, 16, num_warps=4, num_stages=3),
        "many-rows-32bit": KernelConfig(64, 32, 16, num_warps=4, num_stages=3),
    },
    # ... and its dx GEMM over [dpre | dproj]: BN is the reduction chunk over N (the chunk over
    # the C columns of dproj is min(BN, next_pow2(C))), BK the output tile over K. No per-row
    # loop here, so no "-rank>16" variant: the same tile for every rank.
    "dx_concat": {
        "few-rows-16bit": KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
        "many-rows-16bit": KernelConfig(128, 64, 128, num_warps=8, num_stages=3),
        "few-rows-32bit": KernelConfig(64, 32, 32, num_warps=8, num_stages=3),
        "many-rows-32bit": KernelConfig(64, 32, 32, num_warps=8, num_stages=3),
    },
    # wgrad: BK = A tile, BN = B tile, BM = reduction chunk over rows. fp32 without TF32 runs
    # the dot on FMA units, whose register tiles are larger: small tiles and 8 warps there
    # (4 warps spilled 4 B in the dW epilogue with ptxas 12.8).
    "wgrad": {
        "few-rows-16bit": KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
        "many-rows-16bit": KernelConfig(64, 128, 128, num_warps=8, num_stages=3),
        "few-rows-32bit": KernelConfig(16, 64, 64, num_warps=8, num_stages=2),
        "many-rows-32bit": KernelConfig(16, 64, 64, num_warps=8, num_stages=2),
    },
    # scale (multiplicative term): BN x BK tiles of the [N, K] weight (BM unused)
    "scale": {
        "few-rows-16bit": KernelConfig(16, 64, 64, num_warps=4, num_stages=1),
        "many-rows-16bit": KernelConfig(16, 64, 64, num_warps=4, num_stages=1),
        "few-rows-32bit": KernelConfig(16, 64, 64, num_warps=4, num_stages=1),
        "many-rows-32bit": KernelConfig(16, 64, 64, num_warps=4, num_stages=1),
    },
    # its backward loops over tasks with several live tiles: 8 warps to halve registers/thread
    "scale_bwd": {
        "few-rows-16bit": KernelConfig(16, 64, 64, num_warps=8, num_stages=1),
        "many-rows-16bit": KernelConfig(16, 64, 64, num_warps=8, num_stages=1),
        "few-rows-32bit": KernelConfig(16, 64, 64, num_warps=8, num_stages=1),
        "many-rows-32bit": KernelConfig(16, 64, 64, num_warps=8, num_stages=1),
    },
}

#: sm_80 (Ampere) replacements: mma.sync keeps operand fragments in registers, so the tiles
#: that are spill-free on sm_90 (wgmma reads shared memory) spill there (compile tier, ptxas -v):
#: rank > 16 forward and dx, the [dV; dG] weight gradient with 128-wide tiles, the fp32 forward
#: with 128-row tiles and the multiplicative term's 64x64 tiles.
_SM80: dict[str, dict[str, KernelConfig]] = {
    "fwd": {"many-rows-16bit": KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
            "many-rows-16bit-rank>16": KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
            "few-rows-32bit": KernelConfig(64, 64, 32, num_warps=8, num_stages=3),
            "many-rows-32bit": KernelConfig(64, 64, 32, num_warps=8, num_stages=3)},
    "proj": {"many-rows-16bit": KernelConfig(128, 64, 64, num_warps=8, num_stages=3)},
    "dx": {"many-rows-16bit": KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
           "many-rows-16bit-rank>16": KernelConfig(64, 64, 32, num_warps=4, num_stages=3),
           # 4 warps spill 20 B with the swizzled grid's index arithmetic
           "few-rows-16bit": KernelConfig(64, 64, 64, num_warps=8, num_stages=3)},
    "dx_concat": {"many-rows-16bit": KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
                  "few-rows-16bit": KernelConfig(64, 64, 64, num_warps=8, num_stages=3)},
    "wgrad": {"many-rows-16bit": KernelConfig(64, 64, 64, num_warps=4, num_stages=3)},
    "scale": {"many-rows-32bit": KernelConfig(16, 32, 64, num_warps=4, num_stages=1),
              "few-rows-32bit": KernelConfig(16, 32, 64, num_warps=4, num_stages=1)},
    "scale_bwd": {cls: KernelConfig(16, 32, 64, num_warps=8, num_stages=1)
                  for cls in ("few-rows-16bit", "many-rows-16bit", "few-rows-32bit", "many-rows-32bit")},
}

#: Autotuning candidates per kernel (the defaults are always among them). Kept short: every
#: entry is compiled for sm_90 and sm_80 by the compile tier. Not here: the 128x256 and 256x128
#: tiles of Hopper GEMMs, which spill 400-600 B in the forward with the delta epilogue (r = 16).
CANDIDATES: dict[str, list[KernelConfig]] = {
    "fwd": [
        KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
        KernelConfig(128, 128, 64, num_warps=8, num_stages=4),
        KernelConfig(128, 128, 64, num_warps=8, num_stages=3, tma=True),
        KernelConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True),
        KernelConfig(128, 128, 32, num_warps=8, num_stages=4),
        KernelConfig(64, 128, 64, num_warps=4, num_stages=4),
        KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
    ],
    "dx": [
        KernelConfig(128, 64, 128, num_warps=8, num_stages=3),
        KernelConfig(128, 64, 128, num_warps=8, num_stages=3, tma=True),
        KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
    ],
    "dx_concat": [
        KernelConfig(128, 64, 128, num_warps=8, num_stages=3),
        KernelConfig(128, 64, 128, num_warps=8, num_stages=3, tma=True),
        KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
    ],
    "wgrad": [
        KernelConfig(64, 128, 128, num_warps=8, num_stages=3),
        KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
    ],
    # proj: BN is the column tile over C = r + r^2 (272 at r = 16: 128-wide tiles compute 384
    # columns, 64-wide ones 320 but start twice as many programs per row tile)
    "proj": [
        KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
        KernelConfig(128, 128, 64, num_warps=8, num_stages=3, tma=True),
        KernelConfig(128, 64, 64, num_warps=4, num_stages=3),
        KernelConfig(64, 64, 64, num_warps=4, num_stages=4),
    ],
}

#: sm_80 candidates: the sm_90 lists without the tiles that spill under mma.sync
CANDIDATES_SM80: dict[str, list[KernelConfig]] = {
    "fwd": [
        KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
        KernelConfig(128, 64, 32, num_warps=8, num_stages=4),
        KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
    ],
    "dx": [
        KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
        KernelConfig(64, 64, 64, num_warps=8, num_stages=3),
    ],
    "dx_concat": [
        KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
        KernelConfig(64, 64, 64, num_warps=8, num_stages=3),
    ],
    "wgrad": [KernelConfig(64, 64, 64, num_warps=4, num_stages=3)],
    "proj": [
        KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
        KernelConfig(64, 64, 64, num_warps=4, num_stages=4),
    ],
}


def candidates(name: str, arch: int = 90) -> list[KernelConfig]:
    """Autotuning candidates of ``name`` for ``sm_<arch>`` (empty when the kernel is not tuned)."""
    return list((CANDIDATES_SM80 if arch < 90 else CANDIDATES).get(name, []))


_override: dict[str, KernelConfig] = {}
_tuned: dict[tuple, KernelConfig] = {}


#: calls with at most this many rows are "few-rows" (decode-like): they get 64-row (or smaller) tiles
FEW_ROWS = 64
#: the suffix of a class's default for ranks above 16 (the delta epilogue needs smaller tiles there)
WIDE_RANK = "-rank>16"


def class_name(rows: str, itemsize: int) -> str:
    """``"<rows>-rows-<16|32>bit"``: ``rows`` is ``"few"`` or ``"many"``, the width is the operands'."""
    return f"{rows}-rows-{'32' if itemsize >= 4 else '16'}bit"


def shape_class(M: int, itemsize: int) -> str:
    """The shape class of a call: ``few-rows`` (``M <= FEW_ROWS``, decode-like) or ``many-rows``,
    and ``16bit`` or ``32bit`` operands, e.g. ``"many-rows-16bit"``."""
    return class_name("few" if M <= FEW_ROWS else "many", itemsize)


@contextlib.contextmanager
def use_config(**configs: KernelConfig) -> Iterator[None]:
    """Force configs for the named kernels (``fwd``, ``recompute``, ``proj``, ``dx``, ``dx_pre``,
    ``dx_concat``, ``wgrad``, ``scale``, ``scale_bwd``)
    within the block, e.g. ``with use_config(fwd=KernelConfig(16, 16, 16)): ...``."""
    for name, cfg in configs.items():
        if name not in _DEFAULTS:
            raise ValueError(f"use_config: unknown kernel {name!r}, expected one of {sorted(_DEFAULTS)}")
        if not isinstance(cfg, KernelConfig):
            raise TypeError(f"use_config: config for {name!r} must be a KernelConfig, got {type(cfg).__name__}")
    saved = dict(_override)
    _override.update(configs)
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)


def autotune_enabled() -> bool:
    return os.environ.get("TARP_FAST_AUTOTUNE", "0") not in ("", "0")


#: The two designs of the backward's dx pass (``TARP_FAST_DX``, or :func:`use_dx_design`):
#:
#: * ``fused`` (the default): one kernel over ``dpre`` per ``[BM, BK]`` tile of dx; every K tile
#:   recomputes ``e = scaling dpre U_t`` (``RP / BK`` of the GEMM) and the per-row ``dh`` / ``dS``
#:   (an r-step loop on chip), and K tile 0 stores ``dproj``;
#: * ``concat``: a narrow pre-pass builds ``dproj = [dh | vec(dS)]`` from one read of ``dpre``,
#:   then one GEMM over the concatenated reduction ``[dpre | dproj] [W_t; V_t; G_t]`` recomputes
#:   nothing per K tile (one more read of ``dpre`` and ``M C`` fp32 written and read back).
#:
#: ``benchmarks/gpu_report.py`` (section "dx design") times both.
DX_DESIGNS = ("fused", "concat")
_dx_override: list[Optional[str]] = [None]


def dx_design() -> str:
    """The dx design of the next backward: :func:`use_dx_design`, else ``TARP_FAST_DX``, else
    ``fused``. An unknown value is an error naming the variable (not a silent fallback)."""
    if _dx_override[0] is not None:
        return _dx_override[0]
    value = os.environ.get("TARP_FAST_DX", "").strip().lower() or "fused"
    if value not in DX_DESIGNS:
        raise ValueError(f"TARP_FAST_DX={os.environ.get('TARP_FAST_DX')!r}: expected one of {', '.join(DX_DESIGNS)}")
    return value


@contextlib.contextmanager
def use_dx_design(design: str) -> Iterator[None]:
    """Run the backward's dx pass with ``design`` (``fused`` | ``concat``) within the block."""
    if design not in DX_DESIGNS:
        raise ValueError(f"use_dx_design: expected one of {', '.join(DX_DESIGNS)}, got {design!r}")
    saved = _dx_override[0]
    _dx_override[0] = design
    try:
        yield
    finally:
        _dx_override[0] = saved


def _bucket(M: int) -> int:
    return 1 << max(0, (max(M, 1) - 1).bit_length())


def default_config(name: str, cls: str, *, rank: int = 0, arch: int = 90) -> KernelConfig:
    """The deterministic default of kernel ``name`` for shape class ``cls`` on ``sm_<arch>``."""
    table = dict(_DEFAULTS[name])
    if arch < 90:
        table.update(_SM80.get(name, {}))
    sm80 = _SM80.get(name, {}) if arch < 90 else {}
    # an sm_80 replacement of the class also replaces its rank > 16 variant unless it has its own
    wide = cls + WIDE_RANK
    if rank > 16 and wide in table and (cls not in sm80 or wide in sm80):
        return table[wide]
    return table[cls]


def all_defaults(name: str, bits: str, arch: int) -> list[KernelConfig]:
    """Every default config of ``name`` for 16- or 32-bit operands on ``sm_<arch>`` (compile tier)."""
    itemsize = 2 if bits == "16" else 4
    out = [default_config(name, class_name(rows, itemsize), arch=arch) for rows in ("many", "few")]
    if bits == "16":
        out.append(default_config(name, "many-rows-16bit", rank=32, arch=arch))
    return list(dict.fromkeys(out))


def device_arch(device) -> int:
    """``major * 10 + minor`` of a CUDA device (90 for CPU tensors under the interpreter, the
    captured arch under :func:`tarp_fast.kernels.precompile.capture`)."""
    if getattr(device, "type", "cpu") != "cuda":
        from . import precompile

        return precompile.capture_arch() or 90
    import torch

    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _arch_cache:
        major, minor = torch.cuda.get_device_capability(idx)
        _arch_cache[idx] = major * 10 + minor
    return _arch_cache[idx]


_arch_cache: dict[int, int] = {}


def config_for(
    name: str,
    M: int,
    itemsize: int,
    *,
    rank: int = 0,
    arch: int = 90,
    key: tuple = (),
    bench: Optional[Callable[[KernelConfig], float]] = None,
) -> KernelConfig:
    """The config of kernel ``name`` for a call with ``M`` rows.

    ``rank`` > 16 selects the ``-rank>16`` default of the class where there is one; ``arch`` < 90
    takes the sm_80 table where it differs.
    Order: an active :func:`use_config` override; else, with autotuning on, the fastest candidate
    for ``(name, bucket(M), itemsize) + key`` (timed with ``bench`` on the key's first call; the
    launcher passes one only on CUDA outside graph capture, and without one an earlier choice
    still applies); else the deterministic default of the shape class.
    """
    if name in _override:
        return _override[name]
    default = default_config(name, shape_class(M, itemsize), rank=rank, arch=arch)
    # fp32 operands keep their defaults: the 16-bit candidates would overflow shared memory.
    if not autotune_enabled() or not candidates(name, arch) or itemsize >= 4:
        return default
    tkey = (name, _bucket(M), itemsize, arch) + tuple(key)
    if bench is None:
        # nothing can be timed (CUDA-graph capture): a choice made earlier still applies, so a
        # captured graph runs the configs its eager warm-up tuned
        return _tuned.get(tkey, default)
    if tkey not in _tuned:
        cands = list(dict.fromkeys([default] + candidates(name, arch)))
        timings = [(bench(c), i, c) for i, c in enumerate(cands)]
        _tuned[tkey] = min(timings)[2]
    return _tuned[tkey]
