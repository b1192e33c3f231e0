"""Shared fixtures: per-test seeding, a private cache, and the oracle of ``tarp_fast.testing``
(random tarp_linear problems, the float64 closeness rule) under its old names.

Nothing here touches ``torch.cuda`` at import time.
"""

from __future__ import annotations

import os
import random
import sys
import zlib

import pytest
import torch

from tarp_fast.testing import Problem, make_problem, rel_err  # noqa: F401  (re-exported for the tests)

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


@pytest.fixture
def problem_factory():
    return make_problem


#: the relative error of every tier (``tarp_fast.testing``): max |a - ref| / max(|ref|_inf, 1) in
#: float64, inf where ``a`` has a NaN or inf that ``ref`` has not
max_rel_err = rel_err


def native_or_skip():
    """``tarp_fast._native``, or skip the calling test module when the extension is not built here."""
    native = pytest.importorskip("tarp_fast._native")
    reason = native.unavailable_reason()
    if reason is not None:
        pytest.skip(f"native extension not available: {reason}", allow_module_level=True)
    return native
