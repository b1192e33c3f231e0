"""`tarp-fast ablate` (issue 16 E) and the Kronecker variant in batched preparation (issue 16 D)."""

from __future__ import annotations

import json

import pytest
import torch
from models import write_letter_corpus

from tarp_fast.data.generated import markov_corpus
from tarp_fast.nn.linear import TARPLinear


@pytest.fixture(autouse=True)
def _base_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tarp-fast-cache"))


def test_kronecker_batched_preparation_matches_per_task_layers():
    """Before: prepare() with variant='kronecker' and several tasks crashed in einsum (stacked [T, r, a, b] factors)."""
    from torch.func import functional_call

    from tarp_fast import patch_model
    from tarp_fast.data.sampling import TaskSampler
    from tarp_fast.meta.models import small_gpt2
    from tarp_fast.meta.prepare import PrepConfig, prepare, stacked_tasks

    torch.manual_seed(0)
    for scale_weight in (False, True):
        # blocks of 3 x 5 (N/n, K/n odd): task t's rows must see exactly task t's H, U_i, V_i
        layer = TARPLinear(20, 12, rank=2, variant="kronecker", scale_weight=scale_weight, dtype=torch.float64)
        T = 3
        fast = {n: torch.randn(T, *p.shape, dtype=torch.float64) for n, p in layer.tarp_named_parameters()}
        assert fast["tarp_H"].shape == (T, 4, 4, 4) and fast["tarp_KU"].shape == (T, 4, 3, 2)
        x, ti = torch.randn(2 * T, 5, 20, dtype=torch.float64), torch.arange(T).repeat_interleave(2)
        with stacked_tasks(layer, T):
            y = functional_call(layer, fast, (x,), {"task_index": ti})
        for t in range(T):
            want = functional_call(layer, {n: v[t] for n, v in fast.items()}, (x[ti == t],))
            torch.testing.assert_close(y[ti == t], want, rtol=1e-10, atol=1e-10)
            # and against the formula itself, not only the single-task layer
            H, U, V = fast["tarp_H"][t], fast["tarp_KU"][t], fast["tarp_KV"][t]
            w = layer.weight.detach()
            if scale_weight:
                w = w * torch.nn.functional.softplus(fast["tarp_P"][t] @ fast["tarp_Q"][t] + layer.scale_offset)
            w = w + sum(torch.kron(H[i], U[i] @ V[i]) for i in range(4))
            torch.testing.assert_close(y[ti == t], torch.nn.functional.linear(x[ti == t], w, layer.bias.detach()),
                                       rtol=1e-10, atol=1e-10)
        # shared (unstacked) factors next to stacked ones: every task uses the shared value
        mixed = {**fast, "tarp_H": layer.tarp_H.detach()}
        with stacked_tasks(layer, T):
            y = functional_call(layer, mixed, (x,), {"task_index": ti})
        want = functional_call(layer, {n: (v[0] if n != "tarp_H" else v) for n, v in mixed.items()}, (x[ti == 0],))
        torch.testing.assert_close(y[ti == 0], want, rtol=1e-10, atol=1e-10)
    corpus = markov_corpus(3, seed=0, num_tokens=4000)
    model = small_gpt2(corpus.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    patch_model(model, rank=2, variant="kronecker")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "tarp_" in n}
    cfg = PrepConfig(meta_steps=2, tasks_per_batch=2, batch_size=2, query_batch_size=2, seq_len=16)
    sampler = TaskSampler(corpus, tasks_per_batch=2, inner_steps=1, batch_size=2, query_batch_size=2, seq_len=16)
    res = prepare(model, sampler, cfg)
    assert res["steps"] == 2
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_ranks_are_matched_to_the_parameter_budget():
    from tarp_fast.meta.ablate import ROWS, adapter_parameter_count, matched_ranks

    shapes = [(16, 48), (16, 16), (16, 64), (64, 16)]
    budget = adapter_parameter_count(shapes, "bilinear", 4, False)
    ranks = matched_ranks(shapes, budget)
    assert set(ranks) == {r[0] for r in ROWS if r[1] == "tarp"}
    assert ranks["bilinear"] == {"rank": 4, "parameters": budget}
    for key, v in ranks.items():
        variant, sw = next((r[2], r[3]) for r in ROWS if r[0] == key)
        assert v["parameters"] == adapter_parameter_count(shapes, variant, v["rank"], sw)
        for other in (v["rank"] - 1, v["rank"] + 1):  # no neighbouring rank is closer to the budget
            if other >= 1:
                assert abs(v["parameters"] - budget) <= abs(adapter_parameter_count(shapes, variant, other, sw) - budget)
    assert ranks["dynamic+hadamard"]["rank"] <= ranks["dynamic"]["rank"]


def test_parameter_counts_follow_the_formulas():
    """Kronecker: n³ + r(N + K) (n = 4), the Hadamard term r(N + K) more; the counts matched_ranks
    reports are these."""
    from tarp_fast.meta.ablate import adapter_parameter_count, layer_parameter_count, matched_ranks

    shapes = [(16, 48), (16, 16), (16, 64), (64, 16)]  # (in, out) of a GPT-2 block at n_embd = 16
    for r in (1, 2, 5):
        assert adapter_parameter_count(shapes, "kronecker", r, False) == sum(64 + r * (k + n) for k, n in shapes)
        assert adapter_parameter_count(shapes, "kronecker", r, True) == sum(64 + 2 * r * (k + n) for k, n in shapes)
        for variant in ("bilinear", "dynamic", "kronecker"):
            for sw in (False, True):
                assert adapter_parameter_count(shapes, variant, r, sw) == sum(
                    layer_parameter_count(k, n, variant, r, sw) for k, n in shapes), (variant, r, sw)
    budget = adapter_parameter_count(shapes, "bilinear", 4, False)
    assert budget == 4 * 256  # Σ (N + K) = 256
    ranks = matched_ranks(shapes, budget)
    # kronecker: 4 · 64 + 256 r, exactly the budget at r = 3
    assert ranks["kronecker"] == {"rank": 3, "parameters": 1024}
    # with the Hadamard term 256 + 512 r: r = 1 (768) and r = 2 (1280) tie, and ties go to the smaller
    assert ranks["kronecker+hadamard"] == {"rank": 1, "parameters": 768}
    with pytest.raises(ValueError, match="'out_features' to be a multiple of n=4 .* got out_features=6"):
        layer_parameter_count(16, 6, "kronecker", 2, False)


def test_scale_weight_reaches_the_benchmark_model():
    from tarp_fast.meta.bench import BenchConfig, _adapter_model
    from tarp_fast.meta.models import small_gpt2

    base = small_gpt2(32, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    names = [n for n, _ in _adapter_model(base, BenchConfig(n_embd=16, scale_weight=True)).named_parameters()]
    assert any(n.endswith("tarp_P") for n in names)
    names = [n for n, _ in _adapter_model(base, BenchConfig(n_embd=16)).named_parameters()]
    assert not any(n.endswith("tarp_P") for n in names)


def test_ablate_command_table_json_png(tmp_path, capsys):
    pytest.importorskip("peft")
    from tarp_fast.cli import main

    root = write_letter_corpus(tmp_path / "c", names=("alpha", "beta", "gamma"), files=("f.txt",))
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    rc = main(["ablate", "--corpus", str(root), "--heldout", "gamma", "--json", str(out), "--png", str(png),
               "--rows", "bilinear,kronecker+hadamard,dynamic+hadamard,peft_lora", "--seeds", "0,1",
               "--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--rank", "2", "--pretrain-steps", "2",
               "--meta-steps", "1", "--tasks-per-batch", "2", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
               "--threads", "1", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ranks matched to the parameter budget: bilinear r=2" in printed and "95% interval" in printed
    res = json.loads(out.read_text())
    # the kronecker row's printed count is n³ + 2r(N + K) per layer (n = 4, with the Hadamard term)
    from tarp_fast.meta.ablate import _layer_shapes, layer_parameter_count
    from tarp_fast.meta.models import small_gpt2

    shapes = _layer_shapes(small_gpt2(32, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert sorted(shapes) == sorted([(16, 48), (16, 16), (16, 64), (64, 16)])
    kr = res["ranks"]["kronecker+hadamard"]
    assert kr["parameters"] == sum(64 + 2 * kr["rank"] * (k + n) for k, n in shapes)
    assert kr["parameters"] == sum(layer_parameter_count(k, n, "kronecker", kr["rank"], True) for k, n in shapes)
    assert f"kronecker+hadamard r={kr['rank']} ({kr['parameters']:,} parameters)" in printed
    rows = res["rows"]["gamma"]
    assert set(rows) == {"bilinear", "kronecker+hadamard", "dynamic+hadamard", "peft_lora", "full_finetune"}
    assert rows["peft_lora"]["parameters"] == rows["bilinear"]["parameters"] == res["budget_parameters"]
    for r in rows.values():
        lo, hi = r["final_loss_ci95"]
        assert lo <= r["final_loss"] <= hi
    assert res["seeds"] == [0, 1] and "dynamic+matmul" in res["not_run"]
    assert png.stat().st_size > 1000
    assert main(["ablate", "--corpus", str(root), "--heldout", "gamma", "--rows", "bogus", "--no-progress"]) == 2
