"""Kernel configs of the Triton path: defaults, overrides and autotuning (CPU tier; no kernel runs).

Autotuning (``TARP_FAST_AUTOTUNE=1``) times every candidate once per bucketed key through the
``bench`` callable a launcher passes (CUDA only) and keeps the fastest; these tests drive
:func:`config_for` with a fake ``bench`` that returns chosen timings.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tarp_fast.kernels import _configs as C  # noqa: E402
from tarp_fast.kernels._configs import KernelConfig, candidates, config_for, default_config, use_config  # noqa: E402


@pytest.fixture
def tuning(monkeypatch):
    """Autotuning on, with an empty cache restored afterwards."""
    monkeypatch.setenv("TARP_FAST_AUTOTUNE", "1")
    saved = dict(C._tuned)
    C._tuned.clear()
    yield
    C._tuned.clear()
    C._tuned.update(saved)


def _fake_bench(winner: KernelConfig, calls: list):
    def bench(cfg):
        calls.append(cfg)
        return 1.0 if cfg == winner else 2.0 + len(calls)

    return bench


@pytest.mark.parametrize("name", ["fwd", "dx", "dx_concat", "wgrad", "proj"])
def test_autotuning_keeps_the_fastest_candidate_per_bucketed_key(tuning, name):
    cands = candidates(name, 90)
    winner = cands[-1]
    calls = []
    bench = _fake_bench(winner, calls)
    got = config_for(name, 700, 2, arch=90, key=(4096, 4096, 16, False), bench=bench)
    assert got == winner
    assert set(calls) == set([default_config(name, "many-rows-16bit", arch=90)] + cands)  # each timed once
    n = len(calls)
    # the same bucket (M rounded up to a power of two: 1024) reuses the choice, no new timing
    assert config_for(name, 1000, 2, arch=90, key=(4096, 4096, 16, False), bench=bench) == winner
    assert len(calls) == n
    # another bucket, another key or another arch is tuned afresh
    config_for(name, 1100, 2, arch=90, key=(4096, 4096, 16, False), bench=bench)
    config_for(name, 700, 2, arch=90, key=(4096, 4096, 16, True), bench=bench)
    assert len(calls) == 3 * n


def test_tma_candidates_are_hopper_only():
    assert any(c.tma for c in candidates("fwd", 90)) and any(c.tma for c in candidates("dx", 90))
    assert not any(c.tma for c in candidates("fwd", 80) + candidates("dx", 80))
    assert not any(default_config(k, cls, arch=a).tma for k in ("fwd", "dx", "proj", "wgrad")
                   for cls in ("few-rows-16bit", "many-rows-16bit", "few-rows-32bit", "many-rows-32bit") for a in (80, 90))


def test_no_tuning_without_the_switch_for_fp32_or_without_a_bench(tuning, monkeypatch):
    calls = []
    bench = _fake_bench(candidates("fwd", 90)[-1], calls)
    default = default_config("fwd", "many-rows-16bit", arch=90)
    assert config_for("fwd", 700, 2, arch=90, bench=None) == default  # CPU / graph capture: no bench
    assert config_for("fwd", 700, 4, arch=90, bench=bench) == default_config("fwd", "many-rows-32bit", arch=90)
    monkeypatch.setenv("TARP_FAST_AUTOTUNE", "0")
    assert config_for("fwd", 700, 2, arch=90, bench=bench) == default
    assert calls == []


def test_a_tuned_choice_applies_where_nothing_can_be_timed(tuning):
    """Under CUDA-graph capture the launchers pass no bench: the capture must run the configs
    its eager warm-up tuned, not the defaults."""
    winner = candidates("fwd", 90)[-1]
    key = dict(arch=90, key=(4096, 4096, 16, False))
    assert config_for("fwd", 700, 2, bench=None, **key) == default_config("fwd", "many-rows-16bit", arch=90)
    assert config_for("fwd", 700, 2, bench=_fake_bench(winner, []), **key) == winner
    assert config_for("fwd", 700, 2, bench=None, **key) == winner


def test_an_override_wins_over_tuning(tuning):
    forced = KernelConfig(16, 16, 16, num_warps=1)
    calls = []
    with use_config(dx=forced):
        assert config_for("dx", 700, 2, arch=90, bench=_fake_bench(forced, calls)) == forced
    assert calls == []


def test_the_launchers_pass_no_bench_off_cuda():
    from tarp_fast.kernels._launch import _bench_fn

    assert _bench_fn(lambda cfg: [], torch.device("cpu")) is None


def test_which_schedule_serves_a_call():
    """The Triton sort takes up to 1022 tasks and a one-program scan of at most MAX_SCAN
    histogram entries; larger calls use torch's sort (the tile-table kernel only needs T)."""
    from tarp_fast.kernels import _schedule as S

    assert S.triton_schedule_fits(1022, 1000) and not S.triton_schedule_fits(1023, 1000)
    assert S.triton_schedule_fits(8, 7_000_000) and not S.triton_schedule_fits(8, 8_000_000)
    assert S.triton_schedule_fits(1000, 65_000) and not S.triton_schedule_fits(1000, 100_000)
    assert S.triton_schedule_fits(5, 0)
    with pytest.raises(ValueError, match="T=1000, M=100000"):
        S.row_groups_triton(100_000, 1000, torch.zeros(100_000, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="needs task_index or a gate"):
        S.row_groups_triton(10, 1, None, None)


def test_tma_weight_needs_aligned_rows_and_whole_task_tiles():
    """A per-task weight goes through TMA only when no N tile straddles two tasks; rows must be a
    multiple of 16 bytes; a config without tma never does."""
    from tarp_fast.kernels._launch import _tma_weight

    tma = KernelConfig(16, 16, 16, tma=True)
    w3 = torch.zeros(3, 48, 40, dtype=torch.float16)
    assert _tma_weight(w3, tma, 16) and not _tma_weight(w3, tma, 32)
    assert _tma_weight(torch.zeros(48, 40, dtype=torch.float16), tma, 32)  # one weight: any tile
    assert not _tma_weight(torch.zeros(48, 36, dtype=torch.float16), tma, 16)  # 72-byte rows
    assert not _tma_weight(w3, KernelConfig(16, 16, 16), 16)


def test_dx_design_from_the_environment_and_the_context_manager(monkeypatch):
    """``TARP_FAST_DX`` (``fused`` by default) or :func:`use_dx_design` picks the dx design; an
    unknown value is an error that names the variable, never a silent fallback."""
    from tarp_fast.kernels import DX_DESIGNS, dx_design, use_dx_design

    assert DX_DESIGNS == ("fused", "concat")
    monkeypatch.delenv("TARP_FAST_DX", raising=False)
    assert dx_design() == "fused"
    monkeypatch.setenv("TARP_FAST_DX", " Concat ")
    assert dx_design() == "concat"
    with use_dx_design("fused"):
        assert dx_design() == "fused"
    assert dx_design() == "concat"
    monkeypatch.setenv("TARP_FAST_DX", "fast")
    with pytest.raises(ValueError, match="TARP_FAST_DX='fast'.*fused, concat"):
        dx_design()
    with pytest.raises(ValueError, match="use_dx_design"):
        with use_dx_design("both"):
            pass


def test_tf32_is_read_through_the_new_api_where_torch_has_it():
    """torch >= 2.9: once ``torch.backends.cuda.matmul.fp32_precision`` (or the global
    ``torch.backends.fp32_precision``) is set, reading the legacy ``allow_tf32`` raises; the
    launchers read the new API and follow it (fp32 ``tl.dot`` in TF32 or exact)."""
    from tarp_fast.kernels._launch import _dot_prec, tf32_matmul_allowed

    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32 flag")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: no CUDA call
    saved, saved_global = m.fp32_precision, torch.backends.fp32_precision
    try:
        m.fp32_precision = "tf32"
        assert tf32_matmul_allowed() and _dot_prec(torch.float32, cuda) == "tf32"
        assert _dot_prec(torch.float32, cpu) == "ieee" and _dot_prec(torch.bfloat16, cuda) == "ieee"
        m.fp32_precision = "ieee"
        assert not tf32_matmul_allowed() and _dot_prec(torch.float32, cuda) == "ieee"
        m.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"  # inherited by the matmul setting
        assert tf32_matmul_allowed()
        torch.backends.fp32_precision = "none"
        assert tf32_matmul_allowed() == bool(m.allow_tf32)  # nothing set with the new API: the legacy flag
    finally:
        m.fp32_precision = saved
        torch.backends.fp32_precision = saved_global
    m.allow_tf32  # noqa: B018  (the state is left readable through the legacy flag again)
