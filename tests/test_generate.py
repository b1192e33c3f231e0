"""Generation with TAMS conv ops and a KV cache (issue 19: cached generation silently gave other
tokens than ``use_cache=False``), and per-sequence task ids under beam search.

Each test failed before the fix (named in its docstring).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import VOCAB, tiny_model

import tarp_fast
from tarp_fast.nn.linear import expand_task_index
from tarp_fast.tams import NUM_EDGES, NUM_OPS, OPS, Architecture, add_tams, use_architecture

CONV3, CONV5, LINEAR, SKIP = OPS.index("conv3"), OPS.index("conv5"), OPS.index("linear"), OPS.index("skip")


def _tams_model(family: str = "gpt2", gates: bool = False):
    model = tiny_model(family)
    tarp_fast.patch_model(model, rank=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        add_tams(model, cell=True, gates=gates, cell_width=8, cell_init="normal")
        for cell in (b.tams_cell for b in model.modules() if hasattr(b, "tams_cell")):
            with torch.no_grad():
                cell.out_proj.weight.normal_(0, 0.5)  # a cell that moves the logits
    return model.eval()


def _arch(ops_rows, layers: int = 2, gates: bool = False) -> Architecture:
    w = F.one_hot(torch.tensor(ops_rows), NUM_OPS).float()
    z = torch.ones(len(ops_rows), layers, 2) if gates else None
    return Architecture(w, z)


# conv3 and conv5 on edges from both input nodes and from intermediate nodes
CONV_OPS = [CONV3, CONV5, CONV5, LINEAR, CONV3, CONV3, SKIP, CONV5, CONV3]
assert len(CONV_OPS) == NUM_EDGES


def _generate(model, arch, ids, **kw):
    with torch.no_grad(), use_architecture(model, arch):
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=1,
                              eos_token_id=None, **kw)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generate_same_tokens_with_and_without_cache(family):
    """Before: conv ops saw only the new token with the KV cache (zero padding in place of the past)."""
    model = _tams_model(family)
    arch = _arch([CONV_OPS])
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    cached = _generate(model, arch, ids, max_new_tokens=12, use_cache=True)
    plain = _generate(model, arch, ids, max_new_tokens=12, use_cache=False)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, plain)


def test_incremental_logits_equal_full_forward():
    model = _tams_model()
    arch = _arch([CONV_OPS])
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_architecture(model, arch):
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :4], use_cache=True)
        steps = [out.logits]
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for t in range(4, 9):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_bart_decoder_incremental_logits_equal_full_forward():
    model = _tams_model("bart")
    arch = _arch([CONV_OPS])
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    dec = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_architecture(model, arch):
        full = model(ids, decoder_input_ids=dec, use_cache=False).logits
        out = model(ids, decoder_input_ids=dec[:, :3], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        steps = [out.logits]
        for t in range(3, 8):
            out = model(encoder_outputs=(out.encoder_last_hidden_state,), decoder_input_ids=dec[:, t:t + 1],
                        cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_beam_search_and_several_returned_sequences_match_without_cache():
    """Beam search reorders the cache between steps; the conv windows move with it."""
    model = _tams_model(gates=True)
    arch = _arch([CONV_OPS], gates=True)
    ids = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=10, num_beams=3, num_return_sequences=3, return_dict_in_generate=True,
              output_scores=True)
    cached = _generate(model, arch, ids, use_cache=True, **kw)
    plain = _generate(model, arch, ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(cached.sequences_scores, plain.sequences_scores, rtol=1e-5, atol=1e-5)


def test_a_new_generation_starts_a_new_window_and_a_stale_cache_is_refused():
    model = _tams_model()
    arch = _arch([CONV_OPS])
    a = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    b = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    first = _generate(model, arch, a, max_new_tokens=6)
    _generate(model, arch, b, max_new_tokens=6)  # another sequence in between
    assert torch.equal(_generate(model, arch, a, max_new_tokens=6), first)
    # a cache filled without the architecture (no windows) cannot be continued with conv ops
    with torch.no_grad():
        out = model(a, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        with use_architecture(model, arch), pytest.raises(RuntimeError, match="window of past inputs"):
            model(b[:, :1], cache=cache, use_cache=True)


def test_deepcopied_cache_continues_like_the_original():
    model = _tams_model()
    arch = _arch([CONV_OPS])
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), use_architecture(model, arch):
        out = model(ids[:, :5], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        copied = copy.deepcopy(cache)
        a = model(ids[:, 5:6], cache=cache, use_cache=True).logits
        b = model(ids[:, 5:6], cache=copied, use_cache=True).logits
    assert torch.equal(a, b)


# ---- per-sequence task ids under generate's batch expansion ------------------------------------


def _multi_task_model():
    model = tiny_model("gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        tarp_fast.patch_model(model, rank=2, num_tasks=2, variant="bilinear")
        for p in tarp_fast.tarp_parameters(model):
            with torch.no_grad():
                p.normal_(0, 0.3)  # two tasks with different adapters
    return model.eval()


@pytest.mark.parametrize("kw", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2),
                                dict(do_sample=True, num_return_sequences=3)])
def test_task_index_per_sequence_follows_beams_and_returned_sequences(kw):
    """Before: "task_index must be [M]=20 ... got [2]" as soon as generate expanded the batch."""
    model = _multi_task_model()
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    gen = dict(max_new_tokens=5, pad_token_id=1, eos_token_id=None, **kw)
    torch.manual_seed(0)
    with torch.no_grad(), tarp_fast.tarp_context(task_index=torch.tensor([0, 1])):
        both = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    k = both.shape[0] // 2
    for t in (0, 1):
        torch.manual_seed(0)
        with torch.no_grad(), tarp_fast.tarp_context(task_index=torch.tensor([t])):
            alone = model.generate(ids[t:t + 1], attention_mask=torch.ones_like(ids[t:t + 1]), **gen)
        if kw.get("do_sample"):
            assert alone.shape == both[t * k:(t + 1) * k].shape  # sampled: the draws differ by batch layout
        else:
            assert torch.equal(alone, both[t * k:(t + 1) * k])


def test_expand_task_index():
    ti = torch.tensor([3, 5])
    assert expand_task_index(ti, 2) is ti
    assert expand_task_index(ti, 6).tolist() == [3, 3, 3, 5, 5, 5]
    with pytest.raises(ValueError, match="not a multiple"):
        expand_task_index(ti, 5)


def test_single_task_model_refuses_routed_task_ids():
    """Before: a single-task model inside tarp_context(task_index=...) ignored the ids silently."""
    model = tiny_model("gpt2")
    tarp_fast.patch_model(model, rank=2)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    with tarp_fast.tarp_context(task_index=torch.tensor([0, 1])), pytest.raises(ValueError, match="num_tasks=T"):
        model(ids)
    model(ids)  # without task ids it runs


@pytest.mark.parametrize("kw", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)])
def test_tams_architecture_per_sequence_follows_beams(kw):
    """Before: "the architecture was activated with task_index for 2 sequences, but a layer got a
    batch of 4": each beam now keeps its sequence's architecture (two tasks, two cells)."""
    model = _tams_model(gates=True)
    arch = _arch([CONV_OPS, [LINEAR] * NUM_EDGES], gates=True)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(8))
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=None, **kw)
    with torch.no_grad(), use_architecture(model, arch, task_index=torch.tensor([0, 1])):
        both = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    k = both.shape[0] // 2
    for t in (0, 1):
        one = _arch([[CONV_OPS, [LINEAR] * NUM_EDGES][t]], gates=True)
        with torch.no_grad(), use_architecture(model, one):
            alone = model.generate(ids[t:t + 1], attention_mask=torch.ones_like(ids[t:t + 1]), **gen)
        assert torch.equal(alone, both[t * k:(t + 1) * k])
