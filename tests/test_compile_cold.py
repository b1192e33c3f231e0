"""``torch.compile(model, fullgraph=True)`` of a whole patched model in a fresh process.

Each backend runs in its own new Python process (subprocesses, side by side) whose first call of
the model is the compiled one: no eager warm-up. Before the fix, Dynamo reached
``importlib.import_module`` in ``tarp_fast.ops._load`` ("Attempted to call function marked as
skipped"). Inductor, forward and backward, two tasks in a batch routed by ``tarp_context`` and a
hard-skipped gate; three batch sizes compile once (dynamic batch dimension: the recompile count
is Dynamo's ``unique_graphs`` counter), and the compiled outputs and gradients equal eager ones.
``auto`` is the native backend on CPU float32 (its ops show in the profile of the compiled step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tarp_fast

# fresh processes and inductor: the order of the other tests cannot change them (`make
# test-order` skips slow)
pytestmark = pytest.mark.slow

SCRIPT = r'''
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from torch._dynamo.utils import counters
from transformers import GPT2Config, GPT2LMHeadModel

import tarp_fast
from tarp_fast.testing import rel_err

backend, dynamic = sys.argv[1], sys.argv[2] == "dynamic"
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=1)
model = GPT2LMHeadModel(cfg).eval()
tarp_fast.patch_model(model, rank=4, num_tasks=2, init="paper", scale_weight=True)
layers = tarp_fast.patch.tarp_layers(model)
for layer in layers.values():
    layer.backend = backend
gated = model.transformer.h[0].mlp.c_fc
factors = [p for n, p in model.named_parameters() if "tarp_" in n]


def inputs(B, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (B, 8), generator=g)
    task_index = torch.arange(B) % 2
    gate = torch.rand(B * 8, generator=g) + 0.5
    gate[::3] = 0.0  # hard-skipped rows
    return ids, task_index, gate


def step(run, ids, task_index, gate):
    with tarp_fast.tarp_context(task_index=task_index, gates={gated: gate}, hard_skip=True):
        logits = run(input_ids=ids).logits
    logits.pow(2).mean().backward()
    grads = [p.grad.clone() for p in factors]
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


compiled = torch.compile(model, fullgraph=True, dynamic=True if dynamic else None)
t0 = time.perf_counter()
results = []
for B, seed in ((2, 1), (3, 2), (5, 3)):
    args = inputs(B, seed)
    if not dynamic:
        for t in args:
            torch._dynamo.mark_dynamic(t, 0)  # the batch dimension
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        results.append((args, step(compiled, *args)))  # the first call of the model is compiled
seconds = time.perf_counter() - t0
native_ops = sorted({e.name for e in prof.events() if "native_tarp" in e.name})
err = 0.0
for args, (out, grads) in results:  # eager afterwards, same inputs
    e_out, e_grads = step(model, *args)
    for a, b in zip([out] + grads, [e_out] + e_grads):
        err = max(err, rel_err(a, b))
print(json.dumps({"backend": backend, "unique_graphs": counters["stats"]["unique_graphs"],
                  "loaded": sorted(tarp_fast.ops._loaded), "native_ops": native_ops, "max_rel_err": err, "compile_and_run_s": seconds}))
'''

NATIVE = tarp_fast.ops.available_backends()["native"] is None
# auto on CPU float32 is the native backend where it is built; the batch dimension is marked
# dynamic (torch._dynamo.mark_dynamic; dynamic=True works too, see the last test, but traces slower)
CASES = [("auto", "marked"), ("reference", "marked")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "cold.py"
    path.write_text(SCRIPT)
    # one compile thread: no worker pool to start in each process (2 cores for all of them)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TORCHINDUCTOR_COMPILE_THREADS="1")
    procs = {case: subprocess.Popen([sys.executable, str(path), *case], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env) for case in CASES}
    # the README's compile example, as written, side by side
    from test_fsdp import readme_script

    readme = path.parent / "compiled.py"
    readme.write_text(readme_script("compiled.py")[0])
    procs["readme"] = subprocess.Popen([sys.executable, str(readme)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=env, cwd=str(path.parent))
    out = {}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[case] = (proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{b}-{d}" for b, d in CASES])
def test_fullgraph_inductor_from_a_cold_process(runs, case):
    rc, stdout, stderr = runs[case]
    assert rc == 0, stderr[-4000:]
    res = json.loads(stdout.strip().splitlines()[-1])
    print(f"{case}: {res}")
    assert res["unique_graphs"] == 1  # three batch sizes, one graph: no recompilation
    assert res["max_rel_err"] < 1e-4
    if case[0] == "auto" and NATIVE:
        assert "native" in res["loaded"]  # imported during the trace, not by an eager call
        assert res["native_ops"] == ["tarp_fast::native_tarp_bwd", "tarp_fast::native_tarp_fwd"]
    if case[0] == "reference":
        assert res["native_ops"] == []


def test_readme_compile_example_runs_in_a_fresh_process(runs):
    rc, _, stderr = runs["readme"]
    assert rc == 0, stderr[-4000:]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_dynamic_true_compiles_once_for_every_batch_size(backend):
    """``torch.compile(dynamic=True)`` makes the layer's float settings symbolic too (they were
    checked with ``math.isfinite``, which Dynamo cannot trace); several tasks, in process."""
    import torch
    from torch._dynamo.utils import counters

    from tarp_fast import TARPLinear, tarp_context

    torch._dynamo.reset()
    counters.clear()
    layer = TARPLinear(8, 6, rank=2, num_tasks=2, scale_weight=True, init="paper")
    layer.backend = backend
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for B in (3, 5, 7):
        x = torch.randn(B, 4, 8)
        ti = torch.arange(B) % 2
        with tarp_context(task_index=ti):
            out = compiled(x)
            torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
