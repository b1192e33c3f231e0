"""TAMS cost: a searched cell per architecture, and blocks with skipped sublayers, vs the full work.

``pytest benchmarks/test_bench_tams.py --benchmark-only``. Every row checks its output first
(sparse cell == dense mixture; gated FFN == ungated FFN on the kept rows and 0 elsewhere), then
records in ``benchmark.extra_info`` the ratio of its median time to its baseline's, both
measured in this run, interleaved (A, B, A, B, ...) so that load from other processes hits
both alike. Goals (issue 5): a cell whose edges are all ``zero`` costs <= 5% of an all-``linear``
cell; an FFN sublayer gated off for half the rows costs <= 55% of the ungated FFN. Nothing here
asserts a timing. ``TARP_BENCH_THREADS=1`` pins CPU intra-op threads (stable on a shared
machine).

Shapes: CPU ``D = 512`` (FFN 2048), 8 x 64 tokens; CUDA ``D = 1024`` (FFN 4096), 16 x 256 tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import bench_device, bench_dtype, interleaved_medians, synchronize
from transformers import GPT2Config, GPT2Model

import tarp_fast
from tarp_fast.tams import (
    NUM_EDGES,
    NUM_OPS,
    OPS,
    Architecture,
    SearchedCell,
    add_tams,
    cell_flops_per_token,
    make_plan,
    use_architecture,
)

CELL_ARCHS = {
    "all_linear": [OPS.index("linear")] * NUM_EDGES,
    "all_zero": [OPS.index("zero")] * NUM_EDGES,
    "all_skip": [OPS.index("skip")] * NUM_EDGES,
    # edges from the input nodes skip, the rest zero: the cheapest cell that still reads its inputs
    "zero_and_skip": [OPS.index("skip") if k in (0, 1, 2, 3, 5, 6) else OPS.index("zero") for k in range(NUM_EDGES)],
    "mixed": [0, 1, 2, 3, 4, 5, 0, 1, 2],
}


def _sizes(device):
    if device.type == "cuda":
        return dict(D=1024, B=16, S=256)
    return dict(D=512, B=8, S=64)



def _tol(dtype):
    return {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]


# ---- the searched cell ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch_name", [k for k in CELL_ARCHS if k != "all_linear"] + ["dense_mixture"])
def test_cell_cost(benchmark, arch_name):
    """One cell's forward (inference) for an architecture, vs the all-linear cell.

    ``dense_mixture`` is what the released MLtD code does: every candidate op of every edge runs.
    """
    device = bench_device()
    dtype = bench_dtype(device)
    sz = _sizes(device)
    torch.manual_seed(0)
    cell = SearchedCell(sz["D"], 64, causal=True, init="normal").to(device=device, dtype=dtype)
    x = torch.randn(sz["B"], sz["S"], sz["D"], device=device, dtype=dtype)
    f = torch.randn_like(x)

    def runner(ops):
        plan = make_plan([ops] * sz["B"], device=device)
        w = torch.ones(sz["B"], NUM_EDGES, device=device, dtype=dtype)

        def run():
            with torch.no_grad():
                y = cell(x, f, w, plan)
            synchronize(device)
            return y

        return run

    if arch_name == "dense_mixture":
        w_full = F.one_hot(torch.tensor(CELL_ARCHS["mixed"], device=device), NUM_OPS).to(dtype)
        w_full = w_full.expand(sz["B"], -1, -1)

        def run():
            with torch.no_grad():
                y = cell.forward_dense(x, f, w_full)
            synchronize(device)
            return y

        ref = runner(CELL_ARCHS["mixed"])()
    else:
        run = runner(CELL_ARCHS[arch_name])
        w_full = F.one_hot(torch.tensor(CELL_ARCHS[arch_name], device=device), NUM_OPS).to(dtype)
        with torch.no_grad():
            ref = cell.forward_dense(x, f, w_full.expand(sz["B"], -1, -1))
    out = run()
    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert err < _tol(dtype), f"sparse cell differs from the dense mixture: rel err {err:.2e}"

    benchmark.group = "tams cell"
    benchmark.extra_info.update(device=str(device), dtype=str(dtype), **sz, width=64, arch=arch_name)
    benchmark(run)
    if getattr(benchmark, "disabled", False):
        return
    mine, base = interleaved_medians([run, runner(CELL_ARCHS["all_linear"])])
    benchmark.extra_info.update(median_ms=mine * 1e3, all_linear_median_ms=base * 1e3,
                                ratio_to_all_linear=round(mine / base, 4))
    if arch_name in CELL_ARCHS:
        # the cell's FLOP floor for this architecture: a skip edge is free, but the input and
        # output projections (D -> 64 and back) still run, and they dominate at D >> 64
        flops = [cell_flops_per_token(sz["D"], 64, CELL_ARCHS[a]) for a in (arch_name, "all_linear")]
        benchmark.extra_info["flop_ratio_to_all_linear"] = round(flops[0] / flops[1], 4)
    if arch_name == "all_zero":
        benchmark.extra_info["goal_ratio_to_all_linear"] = 0.05


# ---- blocks with skipped sublayers ------------------------------------------------------------------
def _gpt2_block(device, dtype, patched):
    sz = _sizes(device)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=sz["D"], n_head=8, n_positions=max(sz["S"], 64), vocab_size=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2Model(cfg).to(device=device, dtype=dtype).eval()
    if patched:
        tarp_fast.patch_model(model, rank=8)
    add_tams(model, cell=False)
    return model, model.h[0], sz


def _half_gated(sz, device, dtype, sublayers):
    """Two tasks: task 0 keeps everything, task 1 skips ``sublayers``; half the sequences each."""
    z = torch.ones(2, 1, 2, device=device, dtype=dtype)
    for s in sublayers:
        z[1, 0, s] = 0.0
    ti = torch.arange(sz["B"], device=device) % 2
    return Architecture(None, z), ti


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "tarp"])
def test_ffn_half_rows_gated(benchmark, patched):
    """The FFN sublayer (c_fc, GELU, c_proj) with half the sequences gated off, vs ungated."""
    device = bench_device()
    dtype = bench_dtype(device)
    model, block, sz = _gpt2_block(device, dtype, patched)
    h = torch.randn(sz["B"], sz["S"], sz["D"], device=device, dtype=dtype)
    arch, ti = _half_gated(sz, device, dtype, [1])

    def gated():
        with torch.no_grad(), use_architecture(model, arch, ti):
            y = block.mlp(h)
        synchronize(device)
        return y

    def full():
        with torch.no_grad():
            y = block.mlp(h)
        synchronize(device)
        return y

    got, want = gated(), full()
    kept = ti == 0
    err = float((got[kept].float() - want[kept].float()).abs().max() / want.float().abs().max())
    assert err < _tol(dtype) and bool((got[~kept] == 0).all()), f"gated FFN is wrong (rel err {err:.2e})"

    benchmark.group = "tams ffn gated"
    benchmark.extra_info.update(device=str(device), dtype=str(dtype), **sz, ffn=4 * sz["D"],
                                layers="TARPLinear rank 8" if patched else "Conv1D", kept_fraction=0.5)
    benchmark(gated)
    if getattr(benchmark, "disabled", False):
        return
    mine, base = interleaved_medians([gated, full])
    benchmark.extra_info.update(median_ms=mine * 1e3, ungated_median_ms=base * 1e3,
                                ratio_to_ungated=round(mine / base, 4), goal_ratio_to_ungated=0.55)


@pytest.mark.parametrize("case", ["half_rows_skip_both", "all_rows_skip_attention", "all_rows_skip_both"])
def test_block_with_skipped_sublayers(benchmark, case):
    """A whole GPT-2 block (TARP-patched) with skipped sublayers, vs the full block."""
    device = bench_device()
    dtype = bench_dtype(device)
    model, block, sz = _gpt2_block(device, dtype, True)
    h = torch.randn(sz["B"], sz["S"], sz["D"], device=device, dtype=dtype)
    if case == "half_rows_skip_both":
        arch, ti = _half_gated(sz, device, dtype, [0, 1])
    else:
        z = torch.ones(1, 1, 2, device=device, dtype=dtype)
        z[0, 0, 0] = 0.0
        if case == "all_rows_skip_both":
            z[0, 0, 1] = 0.0
        arch, ti = Architecture(None, z), None

    def gated():
        with torch.no_grad(), use_architecture(model, arch, ti):
            y = block(h)
        synchronize(device)
        return y

    def full():
        with torch.no_grad():
            y = block(h)
        synchronize(device)
        return y

    got = gated()
    if case == "all_rows_skip_both":
        assert torch.equal(got, h)  # both sublayers skipped: the block is the identity
    benchmark.group = "tams block"
    benchmark.extra_info.update(device=str(device), dtype=str(dtype), **sz, case=case)
    benchmark(gated)
    if getattr(benchmark, "disabled", False):
        return
    mine, base = interleaved_medians([gated, full])
    benchmark.extra_info.update(median_ms=mine * 1e3, full_median_ms=base * 1e3,
                                ratio_to_full=round(mine / base, 4))
