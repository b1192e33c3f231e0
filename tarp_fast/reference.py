"""Plain-PyTorch reference of every tarp-fast op: the oracle of the tests and the CPU fallback.

It runs in the dtype it is given (float64 in the tests), uses only differentiable PyTorch ops,
so autograd gives exact gradients of the formula, and it is deliberately simple rather than
fast. It is also the "eager reference composition" the benchmarks compare against.

Math (DESIGN.md §2), for row ``m`` of ``x [M, K]`` with task ``t``::

    W_t   = weight ⊙ softplus(P_t Q_t + scale_offset)       if P is given, else weight
    h     = V_t x_m                                           # [r]
    S     = reshape(G_t x_m, (r, r)) (row-major)             if G is given, else I
    pre_m = W_t x_m + bias + scaling · U_t (S h)              # [N]
    y_m   = gate_m · act(pre_m) + skip_gate_m · x_m + residual_m

With ``hard_skip=True`` rows whose gate is exactly 0 are not computed (their output is
``skip_gate_m · x_m + residual_m`` and their gate gradient is 0). The reference compacts the kept
rows with ``nonzero`` (a host sync), so its compute also falls with the kept fraction.

Several tasks are computed task by task on each task's own rows (gathered by index, never
masked by multiplication), so a NaN or inf stays where the math puts it: in its own rows and its
own task's factor gradients, as in the native and Triton backends (``0 · NaN = NaN`` would let a
one-hot mask spread one task's NaN to every row).

Inside a ``torch.compile`` trace (``fullgraph=True`` allows no host sync and no data-dependent
shape) the same math runs without gathering: each task on every row with the other rows zeroed
and selected away by ``where`` (same values, a NaN still confined to its task), hard-skipped rows
zeroed and selected away likewise, and the task range checked on the device (``_assert_async``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._contract import DEFAULT_SCALE_OFFSET, TarpCall, TarpSpec, check_tarp_args, check_task_range

__all__ = ["tarp_linear", "run", "DEFAULT_SCALE_OFFSET", "activation_fn"]


def activation_fn(name: str, pre: torch.Tensor) -> torch.Tensor:
    """``none | relu | gelu_tanh`` applied elementwise."""
    if name == "relu":
        return torch.relu(pre)
    if name == "gelu_tanh":
        return F.gelu(pre, approximate="tanh")
    return pre


def _base(x, weight, bias, P, Q, scale_offset):
    """``W x + bias`` with ``W = weight ⊙ softplus(P Q + scale_offset)`` (or ``weight``): ``[m, N]``.

    Exactly ``F.linear`` (bias fused as in ``nn.Linear``), so a layer whose delta is zero
    reproduces its base bitwise.
    """
    if P is None:
        return F.linear(x, weight, bias)
    return F.linear(x, weight * F.softplus(torch.matmul(P, Q) + scale_offset), bias)


def _delta(x, U, V, G):
    """``U (S h)`` (before ``scaling``) for rows ``x [m, K]`` that share one task's factors."""
    m, r = x.shape[0], U.shape[-1]
    h = F.linear(x, V)  # [m, r]
    if G is None:
        z = h
    else:
        S = F.linear(x, G).reshape(m, r, r)
        z = torch.bmm(S, h.unsqueeze(-1)).squeeze(-1)
    return F.linear(z, U)


def _groups(task_index, T):
    """``(order, counts, inverse)``: rows sorted by task, rows per task (a host sync), and the
    permutation that puts the sorted rows back in row order."""
    order = torch.argsort(task_index, stable=True)
    counts = torch.bincount(task_index, minlength=T).tolist()
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return order, counts, inverse


def _per_task(x, groups, fn):
    """``fn(t, x_t)`` on each task's own rows ``x_t``, put back in row order: ``[M, N]``.

    The rows are gathered by index: a row never meets another task's factors, not even multiplied
    by 0, so a NaN or inf in one task's factors (or in one row) reaches only that task's rows and
    that task's factor gradients (a one-hot mask would spread it: 0 · NaN = NaN). Every task runs,
    also one without rows, so its factors get (zero) gradients.
    """
    order, counts, inverse = groups
    parts, start = [], 0
    for t, count in enumerate(counts):
        parts.append(fn(t, x.index_select(0, order[start:start + count])))
        start += count
    return torch.cat(parts).index_select(0, inverse)


def _per_task_traced(x, task_index, T, fn):
    """:func:`_per_task` without data-dependent shapes, for ``torch.compile`` (no host sync).

    Each task runs on every row with the other tasks' rows zeroed (selected with ``where``, never
    multiplied by a mask), and its results are kept on its own rows only: the same values and
    the same confinement of a NaN to its task as the gathered version, at ``T`` times the work.
    """
    out = None
    for t in range(T):
        mine = (task_index == t).unsqueeze(-1)
        part = fn(t, torch.where(mine, x, torch.zeros((), dtype=x.dtype, device=x.device)))
        out = part if out is None else torch.where(mine, part, out)
    return out


def _pre(spec: TarpSpec, x, weight, bias, U, V, G, P, Q, scaling, scale_offset, task_index):
    """``pre = W_t x + bias + scaling · U_t (S h)`` for the rows of ``x [M, K]``: ``[M, N]``."""
    if not spec.multi_task:
        pre = _base(x, weight, bias, P, Q, scale_offset)
        return pre + scaling * _delta(x, U, V, G) if U is not None else pre
    # the order of the single-task path (base product with bias, then + scaling · delta), which
    # the reference always used (so float16/bfloat16 round as before); each per-task term is
    # computed on its own task's rows only
    T = spec.num_tasks
    if torch.compiler.is_compiling():  # inside a trace: no host sync, no data-dependent shapes
        def per_task(fn):
            return _per_task_traced(x, task_index, T, fn)
    else:
        groups = _groups(task_index, T)

        def per_task(fn):
            return _per_task(x, groups, fn)
    Us, Vs, Gs, Ps, Qs = (t.unbind(0) if t is not None else (None,) * T for t in (U, V, G, P, Q))
    if P is None:
        pre = F.linear(x, weight, bias)  # shared by every task: no grouping needed
    else:
        pre = per_task(lambda t, xt: _base(xt, weight, None, Ps[t], Qs[t], scale_offset))
        pre = pre + bias if bias is not None else pre
    if U is not None:
        pre = pre + scaling * per_task(lambda t, xt: _delta(xt, Us[t], Vs[t], Gs[t]))
    return pre


def _activated(spec, x, weight, bias, U, V, G, P, Q, scaling, scale_offset, task_index):
    """``act(pre)`` for the rows of ``x [M, K]``."""
    pre = _pre(spec, x, weight, bias, U, V, G, P, Q, scaling, scale_offset, task_index)
    return activation_fn(spec.activation, pre)


def tarp_linear(
    x,
    weight,
    bias=None,
    U=None,
    V=None,
    G=None,
    P=None,
    Q=None,
    *,
    scaling=1.0,
    scale_offset=DEFAULT_SCALE_OFFSET,
    task_index=None,
    gate=None,
    skip_gate=None,
    residual=None,
    activation="none",
    hard_skip=False,
):
    """Reference `tarp_linear`: same contract as :func:`tarp_fast.ops.tarp_linear` (no ``backend``).

    Args:
        x: ``[..., K]`` input; flattened to ``[M, K]``.
        weight: ``[N, K]`` base weight (``nn.Linear`` layout); bias ``[N]`` or None.
        U, V, G: ``[N, r]``, ``[r, K]``, ``[r*r, K]`` (or with a leading ``T``); ``G=None`` gives
            the bilinear delta ``U V x``; ``U=V=None`` gives no delta.
        P, Q: ``[N, q]``, ``[q, K]`` multiplicative term (or with a leading ``T``), or None.
        scaling: multiplies the additive delta. scale_offset: added before the softplus.
        task_index: ``[M]`` int64 in ``[0, T)`` selecting the factors of each row.
        gate, skip_gate: None, a scalar, ``[M]`` or ``[T]`` (see ``tarp_fast._contract``).
        residual: ``[..., N]`` added to the output.
        activation: ``"none" | "relu" | "gelu_tanh"``.
        hard_skip: rows with ``gate == 0`` are not computed and get no gate gradient.

    Returns:
        ``[..., N]`` tensor of ``x``'s dtype.
    """
    return run(check_tarp_args(
        x, weight, bias, U, V, G, P, Q, scaling=scaling, scale_offset=scale_offset,
        task_index=task_index, gate=gate, skip_gate=skip_gate, residual=residual,
        activation=activation, hard_skip=hard_skip,
    ))


def run(call: TarpCall) -> torch.Tensor:
    """The reference backend's entry: :func:`tarp_linear` of an already validated call (the one
    :func:`tarp_fast.ops.tarp_linear` builds once for every backend). Returns ``call.spec.out_shape``."""
    spec, task_index = call.spec, call.task_index
    if spec.multi_task:
        if torch.compiler.is_compiling():  # no host sync inside a trace: checked on the device
            torch._assert_async((task_index >= 0).all() & (task_index < spec.num_tasks).all(),
                                f"tarp_linear: argument 'task_index' must hold values in [0, {spec.num_tasks})")
        else:
            check_task_range(task_index, spec.num_tasks)
    x2 = call.x
    g = call.gate_rows("gate", x2.dtype)
    sg = call.gate_rows("skip_gate", x2.dtype)
    factors = (call.weight, call.bias, call.U, call.V, call.G, call.P, call.Q, call.scaling, call.scale_offset)

    if call.hard_skip and g is not None:
        out = _hard_skip_rows(spec, x2, g, factors, task_index)
    else:
        out = _activated(spec, x2, *factors, task_index)
        if g is not None:
            out = out * (g.unsqueeze(-1) if isinstance(g, torch.Tensor) and g.dim() == 1 else g)
    if sg is not None:
        out = out + x2 * (sg.unsqueeze(-1) if isinstance(sg, torch.Tensor) and sg.dim() == 1 else sg)
    if call.residual is not None:
        out = out + call.residual
    return out.reshape(spec.out_shape)


def _hard_skip_rows(spec, x2, g, factors, task_index):
    """Compute only rows with a non-zero gate; the others contribute exactly 0 (not NaN)."""
    M = spec.M
    g_rows = g if isinstance(g, torch.Tensor) and g.dim() == 1 else torch.as_tensor(
        g, dtype=x2.dtype, device=x2.device
    ).expand(M)
    if torch.compiler.is_compiling():
        # inside a trace: no data-dependent shapes; dropped rows are zeroed (selected, not
        # multiplied) before the product and their outputs selected away, so they contribute
        # exactly 0 and no gradient, as in the compacted version below
        keep = (g_rows != 0).unsqueeze(-1)
        zero = torch.zeros((), dtype=x2.dtype, device=x2.device)
        part = _activated(spec, torch.where(keep, x2, zero), *factors, task_index) * g_rows.unsqueeze(-1)
        return torch.where(keep, part, zero)
    kept = torch.nonzero(g_rows != 0).squeeze(-1)  # host sync: the reference may sync
    ti = task_index[kept] if task_index is not None else None
    part = _activated(spec, x2[kept], *factors, ti) * g_rows[kept].unsqueeze(-1)
    out = x2.new_zeros(M, spec.N)
    return out.index_copy(0, kept, part)
