"""tarp_linear against F.linear, the eager reference and PEFT's LoRA, fwd and fwd+bwd.

``pytest benchmarks/ --benchmark-only``; every row's ``extra_info`` holds ``ratio_to_F.linear``
(both medians measured in this run, timed in alternation) and the FLOP floor ratio of the shape.
"""

from __future__ import annotations

import pytest
from harness import (
    MODES,
    PROVIDERS,
    SHAPES,
    bench_device,
    bench_dtype,
    build,
    interleaved_medians,
    provider_unavailable,
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_tarp_linear(benchmark, shape_name, provider, mode):
    shape = SHAPES[shape_name]
    device = bench_device()
    why = provider_unavailable(provider, shape, device)
    if why:
        pytest.skip(why)
    dtype = bench_dtype(device)
    run = build(provider, mode, shape, device, dtype)  # asserts correctness first
    benchmark.group = f"{shape_name} {mode}"
    benchmark.extra_info.update(
        shape=dict(M=shape.M, K=shape.K, N=shape.N, r=shape.r), device=str(device), dtype=str(dtype),
        flop_floor_ratio=round(shape.flop_floor_ratio(), 4),
    )
    benchmark(run)
    if getattr(benchmark, "disabled", False):
        return
    floor = build("F.linear", mode, shape, device, dtype)
    mine, base = interleaved_medians([run, floor], min_time=0.4, max_reps=100)
    benchmark.extra_info.update(median_ms=mine * 1e3, flinear_median_ms=base * 1e3)
    benchmark.extra_info["ratio_to_F.linear"] = round(mine / base, 3)
