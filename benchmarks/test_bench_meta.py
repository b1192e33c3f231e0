"""Batched vs sequential task adaptation in the preparation stage (one meta-step, same tasks).

``batched=True`` adapts the ``T`` tasks of a meta-batch in one forward/backward per inner step
(stacked per-task TARP factors + ``task_index``; with TAMS also the searched cells' weights,
read per sequence); ``batched=False`` is the Python loop over tasks. Both are timed interleaved in the same run, on the same meta-batch, after checking that they produce
the same meta-gradient; the ratio ``sequential / batched`` goes to ``extra_info``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from harness import interleaved_medians

import tarp_fast
from tarp_fast.data import TaskSampler, markov_corpus
from tarp_fast.meta import small_gpt2
from tarp_fast.meta.prepare import MetaLearner, PrepConfig

SHAPES = {
    # name: (n_embd, n_layer, tasks, batch per task, seq_len, inner steps, TAMS)
    "cpu-small-T8": (64, 2, 8, 4, 64, 2, False),
    "cpu-small-T4": (64, 2, 4, 8, 64, 1, False),
    "cpu-small-T4-tams": (64, 2, 4, 8, 64, 1, True),
}


def _setup(n_embd, n_layer, T, B, L, k, tams):
    corpus = markov_corpus(max(T, 2), num_tokens=4000, num_symbols=8)
    model = small_gpt2(256, n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=max(64, L))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        tarp_fast.patch_model(model, rank=4)
        if tams:  # deterministic architectures (argmax), so both paths see the same ones
            from tarp_fast.tams import add_tams

            add_tams(model, cell=True, gates=False, cell_width=32, cell_init="normal", estimator="argmax")
    cfg = dict(tasks_per_batch=T, inner_steps=k, batch_size=B, query_batch_size=B, seq_len=L, inner_optimizer="sgd",
               inner_lr=0.05)
    batch = TaskSampler(corpus, tasks_per_batch=T, inner_steps=k, batch_size=B, query_batch_size=B,
                        seq_len=L).batch_at(0)
    return model, cfg, batch, tams


def _meta_grad(model, cfg, batch, tams):
    learner = MetaLearner(model, PrepConfig(**cfg), tams=tams)
    for p in learner.outer_params:
        p.grad = torch.zeros_like(p)
    groups = [list(range(len(batch.domains)))] if cfg["batched"] else [[t] for t in range(len(batch.domains))]
    for g in groups:
        learner._meta_grad(batch.select(g), len(batch.domains))
    return [p.grad for p in learner.slow]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_batched_vs_sequential_meta_step(benchmark, shape):
    model, cfg, batch, tams = _setup(*SHAPES[shape])
    # correctness first: both paths give the same meta-gradient
    gb = _meta_grad(copy.deepcopy(model), {**cfg, "batched": True}, batch, tams)
    gs = _meta_grad(copy.deepcopy(model), {**cfg, "batched": False}, batch, tams)
    for a, b in zip(gb, gs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    mb, ms = copy.deepcopy(model), copy.deepcopy(model)
    if getattr(benchmark, "disabled", False):  # smoke run: correctness and one call only
        benchmark(lambda: _meta_grad(mb, {**cfg, "batched": True}, batch, tams))
        return
    seq, bat = interleaved_medians([lambda: _meta_grad(ms, {**cfg, "batched": False}, batch, tams),
                                    lambda: _meta_grad(mb, {**cfg, "batched": True}, batch, tams)], min_reps=5)
    benchmark.extra_info.update({
        "shape": shape, "tasks": SHAPES[shape][2], "batched_ms": bat * 1e3, "sequential_ms": seq * 1e3,
        "speedup_ratio": seq / bat, "threads": torch.get_num_threads(),
    })
    benchmark(lambda: _meta_grad(mb, {**cfg, "batched": True}, batch, tams))
