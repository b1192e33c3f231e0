"""Benchmark harness for ``tarp_linear``: named shapes, providers, modes, device timing.

Run with ``pytest benchmarks/ --benchmark-only`` (``make bench``). Each benchmark

1. builds the inputs of its shape on its device (CPU float32, CUDA bfloat16),
2. asserts the provider's output against the float64 reference before timing anything (the rule
   of the tests, :mod:`tarp_fast.testing`: error at most 2x eager PyTorch's + a floor),
3. times the provider with pytest-benchmark (CUDA is synchronized inside the timed function, so
   the device is timed, not the launch),
4. times ``F.linear`` of the same shape and mode in the same run and records
   ``ratio_to_F.linear`` and the op's FLOP floor ratio in ``benchmark.extra_info``.

Providers: ``F.linear`` (the floor), ``reference`` (the eager composition in
:mod:`tarp_fast.reference`), ``peft_lora`` (PEFT's LoRA layer at the same rank: a cheaper,
static delta, the baseline users know), and every tarp-fast backend that can run here
(``triton``, ``native``), called through :func:`tarp_fast.ops.tarp_linear`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import tarp_fast
from tarp_fast import reference
from tarp_fast.testing import make_problem, rel_err, tolerance


@dataclass(frozen=True)
class Shape:
    M: int
    K: int
    N: int
    r: int
    large: bool = False  # LLM-sized: CUDA only unless TARP_BENCH_LARGE_ON_CPU=1

    def flop_floor_ratio(self) -> float:
        """FLOPs of the dynamic op over a plain GEMM's (DESIGN §2 "cost floor")."""
        M, K, N, r = self.M, self.K, self.N, self.r
        gemm = 2 * M * N * K
        delta = 2 * M * K * (r + r * r) + 2 * M * r * r + 2 * M * N * r
        return (gemm + delta) / gemm


SHAPES = {
    "cpu_small": Shape(M=512, K=256, N=256, r=8),
    "cpu_medium": Shape(M=2048, K=768, N=768, r=16),
    "llm_r4": Shape(M=8192, K=4096, N=4096, r=4, large=True),
    "llm_r16": Shape(M=8192, K=4096, N=4096, r=16, large=True),
    "llm_r32": Shape(M=8192, K=4096, N=4096, r=32, large=True),
}
PROVIDERS = ("F.linear", "reference", "peft_lora", "triton", "native")
MODES = ("fwd", "fwd+bwd")
TARP_BACKENDS = ("triton", "native")


def bench_device() -> torch.device:
    """CUDA when present (asked only when a benchmark runs, never at import), else CPU."""
    forced = os.environ.get("TARP_BENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    G: torch.Tensor
    dy: torch.Tensor
    scaling: float


def make_inputs(shape: Shape, device, dtype, seed: int = 0) -> Inputs:
    """One plain call's tensors from the tests' case builder (:func:`tarp_fast.testing.make_problem`,
    unit-scale outputs, a non-zero delta) and an output gradient ``dy``, on ``device`` in ``dtype``."""
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    p = make_problem(M, K, N, r, scale=False, dtype=dtype, seed=seed, device=device)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype).to(device)
    return Inputs(p.x, p.weight, p.bias, p.U, p.V, p.G, dy=dy, scaling=p.kw["scaling"])


def _float64(t: Optional[torch.Tensor]):
    """``t`` in float64 on its own device (a GPU computes the LLM shapes' reference in seconds)."""
    return None if t is None else t.detach().double()


def provider_unavailable(provider: str, shape: Shape, device: torch.device) -> Optional[str]:
    """Why this provider/shape cannot run here, or None."""
    if shape.large and device.type != "cuda" and os.environ.get("TARP_BENCH_LARGE_ON_CPU") != "1":
        return "LLM-sized shape: CUDA only (set TARP_BENCH_LARGE_ON_CPU=1 to force)"
    if provider == "peft_lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed"
    if provider in TARP_BACKENDS:
        reason = tarp_fast.available_backends()[provider]
        if reason is not None:
            return reason
        if provider == "triton" and device.type != "cuda":
            return "triton benchmarks need CUDA tensors"
        if provider == "native" and device.type != "cpu":
            return "the native backend runs on CPU tensors"
    return None


def _peft_layer(inp: Inputs, shape: Shape):
    """PEFT's LoRA layer on an nn.Linear holding the same base weight, at the same rank."""
    import peft

    holder = nn.Module()
    holder.proj = nn.Linear(shape.K, shape.N, device=inp.weight.device, dtype=inp.weight.dtype)
    with torch.no_grad():
        holder.proj.weight.copy_(inp.weight)
        holder.proj.bias.copy_(inp.bias)
    cfg = peft.LoraConfig(r=shape.r, lora_alpha=shape.r * inp.scaling, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(holder, cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(inp.V)
        layer.lora_B["default"].weight.copy_(inp.U)
    return layer


def build(provider: str, mode: str, shape: Shape, device, dtype) -> Callable[[], torch.Tensor]:
    """Return ``run()`` doing one forward (and backward) of ``provider``; checks it first.

    fwd+bwd is the adaptation step: the base weight is frozen, ``x`` and the adapter factors
    require grad. Raises ``AssertionError`` when the provider disagrees with float64.
    """
    inp = make_inputs(shape, device, dtype)
    train = mode == "fwd+bwd"
    x = inp.x.requires_grad_(train)
    factors = [t.requires_grad_(train) for t in (inp.U, inp.V, inp.G)]
    U, V, G = factors

    if provider == "F.linear":
        forward = lambda: F.linear(x, inp.weight, inp.bias)  # noqa: E731
        oracle = lambda x, w, b, U, V, G: F.linear(x, w, b)  # noqa: E731
    elif provider == "peft_lora":
        layer = _peft_layer(inp, shape)
        if train:
            U, V = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            for p in (layer.base_layer.weight, layer.base_layer.bias):
                p.requires_grad_(False)
        forward = lambda: layer(x)  # noqa: E731
        oracle = lambda x, w, b, U, V, G: reference.tarp_linear(x, w, b, U, V, scaling=inp.scaling)  # noqa: E731
    else:
        kw = dict(scaling=inp.scaling)
        if provider == "reference":
            forward = lambda: reference.tarp_linear(x, inp.weight, inp.bias, U, V, G, **kw)  # noqa: E731
        else:
            forward = lambda: tarp_fast.tarp_linear(x, inp.weight, inp.bias, U, V, G, backend=provider, **kw)  # noqa: E731
        oracle = lambda x, w, b, U, V, G: reference.tarp_linear(x, w, b, U, V, G, **kw)  # noqa: E731

    # the rule of the tests (tarp_fast.testing): error vs float64 at most 2x eager's + a floor
    tensors = (x, inp.weight, inp.bias, inp.U, inp.V, inp.G)
    with torch.no_grad():
        out = forward()
        ref = oracle(*(_float64(t) for t in tensors))
        eager = oracle(*(t.detach() for t in tensors))
    err, tol = rel_err(out, ref), tolerance(eager, ref, dtype)
    if err > tol:
        raise AssertionError(f"{provider} {mode} disagrees with float64: rel err {err:.2e} > {tol:.2e} (2x eager's + floor)")

    leaves = [t for t in (x, U, V, G) if t is not None and t.requires_grad] if train else []

    def run():
        y = forward()
        if train:
            torch.autograd.grad(y, leaves if provider != "F.linear" else [x], inp.dy, allow_unused=True)
        synchronize(device)
        return y

    return run


def interleaved_medians(fns: list[Callable[[], object]], min_time: float = 0.5, min_reps: int = 5,
                        max_reps: int = 40) -> list[float]:
    """Median wall time of each ``fn`` (each synchronizes the device itself), timed in alternation in
    one run after one warm-up call each, so drift on a shared machine hits every ``fn`` alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_reps or (time.perf_counter() - start < min_time and len(times[0]) < max_reps):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def ratio_table(rows: list[dict]) -> list[str]:
    """The run's ``tarp_linear`` times over ``F.linear`` as text lines, one per (shape, mode).

    ``rows``: one dict per measured benchmark with ``shape_name``, ``mode``, ``provider``,
    ``ratio`` (median time over ``F.linear``'s in the same run), ``flinear_ms`` and ``floor``
    (the shape's FLOP floor ratio). Providers that did not run here show ``-``.
    """
    if not rows:
        return []
    cells: dict[tuple, dict] = {}
    for r in rows:
        key = (r["shape_name"], r["mode"])
        cell = cells.setdefault(key, {"floor": r["floor"]})
        cell[r["provider"]] = r["ratio"]
        if r["provider"] == "F.linear" or "flinear_ms" not in cell:
            cell["flinear_ms"] = r["flinear_ms"]
    providers = [p for p in PROVIDERS if p != "F.linear" and any(p in c for c in cells.values())]
    header = f"{'shape':<12} {'mode':<8} {'F.linear ms':>11} " + " ".join(f"{p:>10}" for p in providers)
    lines = [header + f" {'FLOP floor':>10}"]
    order = {name: i for i, name in enumerate(SHAPES)}
    for (shape_name, mode), c in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 99), MODES.index(kv[0][1]))):
        ratios = " ".join(f"{c[p]:>9.2f}x" if p in c else f"{'-':>10}" for p in providers)
        lines.append(f"{shape_name:<12} {mode:<8} {c['flinear_ms']:>11.3f} {ratios} {c['floor']:>9.3f}x")
    return lines
