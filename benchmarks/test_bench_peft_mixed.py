"""Mixed-adapter batches through PEFT: 8 adapters x 4 sequences in one batch (issue 14).

``pytest benchmarks/test_bench_peft_mixed.py --benchmark``. Rows:

* ``infer``: one forward of the 32-sequence batch with ``adapter_names`` (TARP: one
  ``tarp_linear`` call per layer for all rows, through stacked factors and ``task_index``),
  against PEFT LoRA's ``adapter_names`` at the same rank and targets (LoRA loops over the adapters
  in each layer), and against 8 separate calls (``set_adapter`` + 4 sequences each).
* ``train``: forward + backward of the same batch (PEFT's LoRA refuses ``adapter_names`` in
  training mode, so the baseline is 8 separate forward + backward calls).

Each row first checks that the mixed batch gives the separate calls' outputs (``train``: their
adapter gradients), then records in
``benchmark.extra_info`` medians timed in alternation (A, B, A, B, ...) and their ratios, keys
ending in ``_ratio`` (``benchmarks/conftest.py`` prints them). Nothing asserts a timing.
``TARP_BENCH_THREADS=1`` pins CPU threads. CPU sizes: GPT-2 with n_embd 256, 2 layers, 32 tokens
per sequence, rank 8; ``variant`` is a parameter (``dynamic``, TARP's own, and ``bilinear``,
LoRA-shaped).
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

peft = pytest.importorskip("peft")
from harness import interleaved_medians  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from tarp_fast.peft import TarpConfig  # noqa: E402

ADAPTERS, PER_ADAPTER, SEQ, RANK = 8, 4, 32, 8
NAMES = [f"task{i}" for i in range(ADAPTERS)]


def _base():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=512, n_embd=256, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                     eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _with_adapters(make_config):
    model = get_peft_model(_base(), make_config(), adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.add_adapter(name, make_config())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".tarp_" in n or ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _adapter_grads(model, run) -> dict:
    """The adapter gradients that ``run()`` (a forward + backward) leaves, by parameter name."""
    model.zero_grad(set_to_none=True)
    run()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".tarp_" in n and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("variant", ["dynamic", "bilinear"])
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_mixed_adapter_batch(benchmark, variant, mode):
    tarp = _with_adapters(lambda: TarpConfig(r=RANK, variant=variant))
    ids = torch.randint(2, 512, (ADAPTERS * PER_ADAPTER, SEQ), generator=torch.Generator().manual_seed(2))
    names = [n for n in NAMES for _ in range(PER_ADAPTER)]
    groups = [(n, ids[i * PER_ADAPTER:(i + 1) * PER_ADAPTER]) for i, n in enumerate(NAMES)]
    train = mode == "train"
    tarp.train(train)

    def step(model, x, **kw):
        if train:
            model(input_ids=x, **kw).logits.float().pow(2).mean().backward()
            return None
        with torch.no_grad():
            return model(input_ids=x, **kw).logits

    def tarp_mixed():
        if train:  # set_adapter (in tarp_separate) leaves only the active adapter trainable
            tarp.set_requires_grad(NAMES, True)
        return step(tarp, ids, adapter_names=names)

    def tarp_separate():
        outs = []
        for name, x in groups:
            tarp.base_model.set_adapter(name)
            outs.append(step(tarp, x))
        tarp.base_model.set_adapter(NAMES[0])
        return None if train else torch.cat(outs)

    if not train:  # the mixed batch computes what the separate calls compute
        torch.testing.assert_close(tarp_mixed(), tarp_separate(), rtol=1e-4, atol=1e-5)
    else:  # ... and the same adapter gradients (its loss is the mean of the 8 separate losses)
        mixed, separate = _adapter_grads(tarp, tarp_mixed), _adapter_grads(tarp, tarp_separate)
        assert mixed.keys() == separate.keys() and mixed
        for n in mixed:
            torch.testing.assert_close(mixed[n] * ADAPTERS, separate[n], rtol=1e-4, atol=1e-6, msg=n)
    benchmark.group = f"peft mixed batch ({mode})"
    benchmark.extra_info.update(variant=variant, mode=mode, adapters=ADAPTERS, seqs_per_adapter=PER_ADAPTER,
                                seq_len=SEQ, rank=RANK)
    benchmark(tarp_mixed)
    if getattr(benchmark, "disabled", False):
        return
    fns = [tarp_mixed, tarp_separate]
    if not train:
        lora = _with_adapters(lambda: LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["c_attn", "c_proj", "c_fc"],
                                                 fan_in_fan_out=True, lora_dropout=0.0)).eval()

        def lora_mixed():
            return step(lora, ids, adapter_names=names)

        fns.append(lora_mixed)
    medians = interleaved_medians(fns, min_time=1.0, min_reps=3, max_reps=30)
    info = {"tarp_mixed_median_ms": medians[0] * 1e3, "tarp_separate_median_ms": medians[1] * 1e3,
            "mixed_over_separate_calls_ratio": round(medians[0] / medians[1], 4)}
    if not train:
        info.update(lora_mixed_median_ms=medians[2] * 1e3,
                    tarp_mixed_over_lora_mixed_ratio=round(medians[0] / medians[2], 4))
    benchmark.extra_info.update(info)
