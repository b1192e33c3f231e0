"""Every validation error of tarp_linear, backend dispatch, and import hygiene."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_problem

import tarp_fast
from tarp_fast import ops


def _call(p, **over):
    args = dict(zip(("x", "weight", "bias", "U", "V", "G", "P", "Q"), p.args()))
    kw = dict(p.kw)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return ops.tarp_linear(*args.values(), **kw, backend="reference")


def _base():
    return make_problem(M=4, K=6, N=6, r=2, T=1)


# (override, exception type, words the message must contain)
CASES = {
    "x_not_tensor": (dict(x=[1.0]), TypeError, ["'x'", "torch.Tensor", "list"]),
    "x_int": (dict(x=torch.ones(4, 6, dtype=torch.int64)), TypeError, ["'x'", "floating", "int64"]),
    "x_wrong_K": (dict(x=torch.randn(4, 5, dtype=torch.float64)), ValueError, ["'x'", "K=6", "[4, 5]"]),
    "weight_1d": (dict(weight=torch.randn(6, dtype=torch.float64)), ValueError, ["'weight'", "[N, K]", "[6]"]),
    "weight_dtype": (dict(weight=torch.randn(6, 6)), TypeError, ["'weight'", "float64", "float32"]),
    "bias_shape": (dict(bias=torch.randn(5, dtype=torch.float64)), ValueError, ["'bias'", "[6]", "[5]"]),
    "U_without_V": (dict(V=None, G=None), ValueError, ["'U'", "'V'", "U without V"]),
    "G_alone": (dict(U=None, V=None), ValueError, ["'G'"]),
    "V_rank": (dict(V=torch.randn(3, 6, dtype=torch.float64)), ValueError, ["'V'", "[2, 6]", "[3, 6]"]),
    "G_rows": (dict(G=torch.randn(2, 6, dtype=torch.float64)), ValueError, ["'G'", "[4, 6]", "[2, 6]"]),
    "P_without_Q": (dict(Q=None), ValueError, ["'P'", "'Q'"]),
    "Q_shape": (dict(Q=torch.randn(2, 5, dtype=torch.float64)), ValueError, ["'Q'", "[2, 6]", "[2, 5]"]),
    "activation": (dict(activation="tanh"), ValueError, ["'activation'", "gelu_tanh", "'tanh'"]),
    "hard_skip_type": (dict(hard_skip=1), TypeError, ["'hard_skip'", "bool"]),
    "scaling_nan": (dict(scaling=float("nan")), ValueError, ["'scaling'", "finite"]),
    "scaling_tensor": (dict(scaling=torch.tensor(1.0)), TypeError, ["'scaling'", "float"]),
    "gate_shape": (dict(gate=torch.ones(3, dtype=torch.float64)), ValueError, ["'gate'", "[M]=[4]", "[3]"]),
    "gate_int": (dict(gate=torch.ones(4, dtype=torch.int64)), TypeError, ["'gate'", "floating"]),
    "gate_bool": (dict(gate=True), TypeError, ["'gate'", "bool"]),
    "skip_needs_square": (dict(weight=torch.randn(5, 6, dtype=torch.float64), bias=None, U=None, V=None, G=None,
                               P=None, Q=None, skip_gate=0.5), ValueError, ["'skip_gate'", "N=5", "K=6"]),
    "residual_shape": (dict(residual=torch.randn(4, 5, dtype=torch.float64)), ValueError, ["'residual'", "[4, 6]"]),
    "task_dim_without_index": (dict(U=torch.randn(2, 6, 2, dtype=torch.float64)), ValueError, ["'U'", "task_index"]),
    "task_index_without_stack": (dict(task_index=torch.zeros(4, dtype=torch.int64)), ValueError,
                                 ["'task_index'", "leading task dimension"]),
    "task_index_dtype": (dict(task_index=torch.zeros(4, dtype=torch.int32)), TypeError, ["'task_index'", "int64"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_error_names_argument(case):
    over, exc, words = CASES[case]
    with pytest.raises(exc) as info:
        _call(_base(), **over)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_task_index_out_of_range_and_shape():
    p = make_problem(M=4, K=6, N=6, r=2, T=3)
    with pytest.raises(ValueError, match=r"'task_index' must hold values in \[0, 3\).*\[0, 3\]"):
        _call(p, task_index=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"'task_index' must have shape \[M\]=\[4\]"):
        _call(p, task_index=torch.tensor([0, 1]))


def test_device_mismatch_is_runtime_error():
    p = _base()
    with pytest.raises(RuntimeError, match="'weight' must be on the same device as x"):
        _call(p, weight=p.weight.to("meta"))


def test_errors_survive_python_O():
    """Validation uses no assert: the same error under `python -O`."""
    code = textwrap.dedent(
        """
        import torch, tarp_fast
        try:
            tarp_fast.tarp_linear(torch.randn(2, 3), torch.randn(4, 5))
        except ValueError as e:
            print("OK", e)
        """
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK") and "'x'" in out.stdout


def test_public_signatures_match_the_option_table():
    """The two public signatures spell out the options that `check_tarp_args` reads from one
    table: same names, order and defaults (`backend` is the dispatch's own)."""
    import inspect

    from tarp_fast import reference
    from tarp_fast._contract import OPTION_DEFAULTS

    for fn in (ops.tarp_linear, reference.tarp_linear):
        params = inspect.signature(fn).parameters.values()
        keywords = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "backend"}
        assert list(keywords.items()) == list(OPTION_DEFAULTS.items()), fn.__module__
        positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional == ["x", "weight", "bias", "U", "V", "G", "P", "Q"], fn.__module__


def test_unknown_keyword_is_a_type_error_naming_it():
    from tarp_fast.kernels import tarp_linear_triton

    from tarp_fast._contract import check_tarp_args

    p = _base()
    for fn in (check_tarp_args, tarp_linear_triton):
        with pytest.raises(TypeError, match="unexpected keyword argument 'scailing'"):
            fn(*p.args(), scailing=0.5)


def test_backend_argument_and_unavailable_backends():
    p = _base()
    with pytest.raises(ValueError, match="'backend' must be one of"):
        ops.tarp_linear(*p.args(), **p.kw, backend="cuda")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors.*TRITON_INTERPRET=1"):
            ops.tarp_linear(*p.args(), **p.kw, backend="triton")
    reasons = tarp_fast.available_backends()
    assert reasons["reference"] is None
    if reasons["native"] is not None:
        with pytest.raises(RuntimeError, match="backend='native' is unavailable: .*Fix:"):
            ops.tarp_linear(*p.args(), **p.kw, backend="native")


def test_auto_on_cpu_is_exact_reference_or_native():
    p = _base()
    ref = tarp_fast.reference.tarp_linear(*p.args(), **p.kw)
    auto = ops.tarp_linear(*p.args(), **p.kw)
    torch.testing.assert_close(auto, ref, rtol=1e-12, atol=1e-12)


def test_import_needs_no_triton_no_extension_and_no_cuda():
    """`import tarp_fast` with Triton and the extension hidden, and torch.cuda booby-trapped."""
    code = textwrap.dedent(
        """
        import sys, torch
        sys.modules["triton"] = None          # import triton -> ImportError
        sys.modules["tarp_fast._C"] = None
        def boom(*a, **k):
            raise SystemExit("torch.cuda touched at import")
        for name in ("is_available", "device_count", "init", "current_device", "get_device_properties"):
            setattr(torch.cuda, name, boom)
        import tarp_fast
        x = torch.randn(3, 4)
        layer = tarp_fast.TARPLinear(4, 5, rank=2)
        print(tuple(layer(x).shape))
        print(tarp_fast.available_backends()["triton"])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "(3, 5)"
    assert "triton" in lines[1].lower()
