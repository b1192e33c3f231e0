# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing,
# installs the pinned requirements and the package (building tarp_fast._C), then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Console scripts, not `python -m`: `-m` puts the checkout root on sys.path, where the top-level
# kernels/ folder shadows Hugging Face's `kernels` package that transformers probes.
PYTEST := $(VENV)/bin/pytest
MAX_JOBS ?= 2
export MAX_JOBS

COMPAT_VENV ?= .venv-compat

.PHONY: install test test-cpu test-order test-interpreter test-bench-smoke test-compat demo bench compile-check lint clean

$(VENV)/.deps-installed: requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $@

# --no-build-isolation: build the extension against the torch in .venv (an isolated build would
# fetch another torch). Editable, so tests see the working tree.
install: $(VENV)/.deps-installed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

# Every CPU-runnable tier: CPU tests + compile tier (sm_90/sm_80 Triton, nvcc) + native, then the
# Triton interpreter tier in its own process (TRITON_INTERPRET must be set before Python starts),
# then one correctness-checked pass over the benchmark harness, then the compile and interpreter
# tiers again with the oldest supported toolchain (requirements-compat.txt: Triton 3.6).
test: install test-cpu test-order test-interpreter test-bench-smoke test-compat

test-cpu: install
	$(PYTEST) -q -m "not interpreter"

# The CPU tier again in other orders (pytest-reverse, pytest-random-order with a fixed seed, so
# the order is the same in every run): a test that passes only after, or before, another fails here.
ORDER_SEED ?= 20261130
test-order: install
	$(PYTEST) -q -p no:cacheprovider -m "not interpreter and not compile and not slow" --reverse
	$(PYTEST) -q -p no:cacheprovider -m "not interpreter and not compile and not slow" --random-order-bucket=global --random-order-seed=$(ORDER_SEED)

test-interpreter: install
	TRITON_INTERPRET=1 $(PYTEST) -q -m interpreter; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

test-bench-smoke: install
	$(PYTEST) -q benchmarks --benchmark-disable

$(COMPAT_VENV)/.deps-installed: requirements-compat.txt
	@test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q -r requirements-compat.txt
	@touch $@

# Triton 3.6's ptxas (12.8) allocates registers differently from 3.9's: a config can spill under
# one and not the other. No extension build here (the tiers it runs do not need it).
test-compat: $(COMPAT_VENV)/.deps-installed
	TARP_FAST_NO_EXT=1 $(COMPAT_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	$(COMPAT_VENV)/bin/python -m tarp_fast.kernels.compile_check -j $(MAX_JOBS)
	TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/pytest -q -p no:cacheprovider -m interpreter; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

demo: install
	$(VENV)/bin/tarp-fast demo

bench: install
	$(PYTEST) benchmarks --benchmark

compile-check: install
	$(PY) -m tarp_fast.kernels.compile_check

lint: install
	$(PY) -m ruff check tarp_fast kernels tests benchmarks

clean:
	rm -rf build *.egg-info tarp_fast/*.so .pytest_cache .benchmarks $(COMPAT_VENV)
