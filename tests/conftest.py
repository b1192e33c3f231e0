"""Shared fixtures: random tarp_linear problems and the float64 tolerance rule.

Nothing here touches ``torch.cuda`` at import time.
"""

from __future__ import annotations

import math
import os
import random
import sys
import zlib
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `python -m pytest` puts the checkout's root on sys.path, where the top-level `kernels/` folder
# shadows the name of Hugging Face's `kernels` package, which transformers probes by importing
# it. The package is installed (editable or not), so the root is not needed on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """Tiny models run fastest (and time most steadily) on one thread on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _private_base_cache(tmp_path_factory, monkeypatch):
    """CLI runs cache pretrained bases: each test gets its own empty cache, so none depends on what
    an earlier test cached, and nothing lands in the user's ~/.cache/tarp-fast."""
    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path_factory.mktemp("tarp-fast-cache")))


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs per test, reproducible from the test's node id.

    Why crc32 and not ``hash()``: Python salts ``str`` hashes per process (PYTHONHASHSEED), so
    ``hash(nodeid)`` gave every run other inputs and a test that depended on them passed or failed
    by chance; crc32 gives a test the same seed in every process, whatever ran before it.
    """
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    yield


@dataclass
class Problem:
    """Arguments of one tarp_linear call (tensors and keyword options)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    U: Optional[torch.Tensor] = None
    V: Optional[torch.Tensor] = None
    G: Optional[torch.Tensor] = None
    P: Optional[torch.Tensor] = None
    Q: Optional[torch.Tensor] = None
    kw: dict = field(default_factory=dict)

    def args(self):
        return (self.x, self.weight, self.bias, self.U, self.V, self.G, self.P, self.Q)

    def tensors(self):
        """Every tensor input, by name (positional factors and tensor keywords)."""
        named = dict(zip(("x", "weight", "bias", "U", "V", "G", "P", "Q"), self.args()))
        for k in ("gate", "skip_gate", "residual"):
            if isinstance(self.kw.get(k), torch.Tensor):
                named[k] = self.kw[k]
        return {k: v for k, v in named.items() if v is not None}

    def to(self, dtype):
        """Same problem in another dtype (float tensors only; task_index stays int64)."""
        def cast(t):
            return t.detach().to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        kw = {k: cast(v) for k, v in self.kw.items()}
        return Problem(*(cast(t) for t in self.args()), kw=kw)


def make_problem(
    M=7, K=12, N=10, r=3, q=2, T=1, *, lead=None, dtype=torch.float64, bias=True, delta=True,
    dynamic=True, scale=True, gate=None, skip_gate=None, residual=False, activation="none",
    hard_skip=False, scaling=0.7, device="cpu",
) -> Problem:
    """A random problem. ``gate``/``skip_gate``: None | "scalar" | "row" | "task" | "zero_rows"."""
    g = dict(dtype=dtype, device=device)
    shape = tuple(lead) + (K,) if lead is not None else (M, K)
    M = math.prod(shape[:-1])
    multi = T > 1
    pre = (T,) if multi else ()
    x = torch.randn(shape, **g)
    p = Problem(x=x, weight=torch.randn(N, K, **g) / math.sqrt(K))
    if bias:
        p.bias = torch.randn(N, **g)
    if delta:
        p.U = torch.randn(*pre, N, r, **g) / math.sqrt(r)
        p.V = torch.randn(*pre, r, K, **g) / math.sqrt(K)
        if dynamic:
            p.G = torch.randn(*pre, r * r, K, **g) / math.sqrt(K)
    if scale:
        p.P = torch.randn(*pre, N, q, **g) * 0.5
        p.Q = torch.randn(*pre, q, K, **g) * 0.5
    kw = dict(scaling=scaling, activation=activation, hard_skip=hard_skip)
    if multi:
        kw["task_index"] = torch.randint(0, T, (M,), device=device)
    for name, kind in (("gate", gate), ("skip_gate", skip_gate)):
        if kind == "scalar":
            kw[name] = torch.tensor(0.8, **g)
        elif kind == "row":
            kw[name] = torch.rand(M, **g) + 0.1
        elif kind == "task":
            kw[name] = torch.rand(T, **g) + 0.1
        elif kind == "zero_rows":
            v = torch.rand(M, **g) + 0.1
            v[::2] = 0.0
            kw[name] = v
    if residual:
        kw["residual"] = torch.randn(shape[:-1] + (N,), **g)
    p.kw = kw
    return p


@pytest.fixture
def problem_factory():
    return make_problem


def max_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max(|ref|_inf, 1e-6) in float64; NaN anywhere gives inf."""
    a64, r64 = a.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(a64).all()) and bool(torch.isfinite(r64).all()):
        return math.inf
    if a64.numel() == 0:
        return 0.0
    return float((a64 - r64).abs().max() / r64.abs().max().clamp_min(1e-6))
