"""Statistics of the adaptation benchmark: paired comparisons of an arm with a control over seeds.

Every figure is computed per seed from the two arms' fine-tuning curves (``[[step, loss,
seconds]]``, the same evaluation steps for both), then summarized over the seeds:

* **steps to the target**: the first evaluated step whose loss is at most the target (the
  ``direct`` arm's final loss of that seed, DESIGN.md §6). A run that never reaches it within
  the budget of ``B`` steps is *censored*: it counts as ``B + 1`` steps, and the comparison says
  how many seeds were censored on each side (a censored arm makes its speed-up an upper bound,
  a censored control a lower bound). A step count of 0 (target met before fine-tuning) counts
  as 1, so the ratio stays finite.
* **speed-up**: ``control steps / arm steps`` per seed; ``speedup_median`` is the median over
  seeds and ``speedup_ci95`` a paired bootstrap 95% interval: seeds are resampled with
  replacement (each seed keeps its arm and control together), the median recomputed, and the
  2.5th/97.5th percentiles taken, from a seeded generator (``BOOTSTRAP_RESAMPLES`` resamples).
  With few seeds the interval is coarse (with one seed it is the point itself).
* **loss after 1, 5, 10, 20 steps**, **area under the curve** (the trapezoid mean of the loss
  over the fine-tuning steps, i.e. the area divided by the budget: lower is faster) and the
  **final loss**: means over seeds; the paired differences ``arm − control`` of the AUC and of
  the final loss with their bootstrap intervals.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Optional

__all__ = ["censored_steps", "median", "bootstrap_ci", "curve_auc", "loss_at", "compare_pair",
           "BOOTSTRAP_RESAMPLES", "LOSS_AT_STEPS"]

BOOTSTRAP_RESAMPLES = 2000
LOSS_AT_STEPS = (1, 5, 10, 20)


def censored_steps(steps: Optional[int], budget: int) -> int:
    """``steps`` to the target, ``budget + 1`` when never reached (``None``), at least 1."""
    return max(1, budget + 1 if steps is None else int(steps))


def median(xs: Sequence[float]) -> float:
    s = sorted(float(x) for x in xs)
    if not s:
        raise ValueError("median: no values")
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of an already sorted list."""
    if len(sorted_xs) == 1:
        return float(sorted_xs[0])
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return float(sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo))


def bootstrap_ci(values: Sequence[float], stat=median, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """``[low, high]``: percentile bootstrap interval of ``stat`` over ``values`` (one per seed;
    a paired quantity such as a per-seed ratio or difference), from ``random.Random(seed)``."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("bootstrap_ci: no values")
    if len(vals) == 1:
        return [vals[0], vals[0]]
    rng = random.Random(seed)
    n = len(vals)
    stats = sorted(stat([vals[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    tail = 100.0 * (1.0 - level) / 2.0
    return [_percentile(stats, tail), _percentile(stats, 100.0 - tail)]


def curve_auc(curve: Sequence[Sequence[float]]) -> float:
    """Trapezoid area under loss-vs-step divided by the steps spanned (the mean loss over the run)."""
    if len(curve) < 2:
        return float(curve[0][1])
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2.0 for a, b in zip(curve, curve[1:]))
    return float(area / (curve[-1][0] - curve[0][0]))


def loss_at(curve: Sequence[Sequence[float]], step: int) -> Optional[float]:
    """The loss evaluated at ``step`` (``None`` when that step was not evaluated)."""
    for s, loss, *_ in curve:
        if int(s) == step:
            return float(loss)
    return None


def _steps_to(curve, target: float) -> Optional[int]:
    for step, loss, *_ in curve:
        if loss <= target + 1e-9:
            return int(step)
    return None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def compare_pair(arm_curves: Sequence, control_curves: Sequence, targets: Sequence[float], *, seed: int = 0,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Paired statistics of an arm against a control over seeds (see the module docstring).

    ``arm_curves[i]``, ``control_curves[i]`` and ``targets[i]`` belong to seed ``i``. Returns
    ``speedup_median``, ``speedup_ci95``, ``speedup_per_seed``, the censored steps of each side,
    ``censored_arm``/``censored_control`` (seeds that never reached the target), the same
    speed-up with the control's own final loss as the target (``speedup_to_control_final_*``),
    ``loss_at`` (``{step: [arm mean, control mean]}``), ``auc_arm``/``auc_control`` (means),
    ``auc_diff_median``/``auc_diff_ci95`` (arm − control), ``final_loss_arm``/``final_loss_control``
    (means) and ``final_loss_diff_median``/``final_loss_diff_ci95``.
    """
    n = len(arm_curves)
    if n == 0 or len(control_curves) != n or len(targets) != n:
        raise ValueError(f"compare_pair: need one arm curve, control curve and target per seed, got "
                         f"{len(arm_curves)}, {len(control_curves)}, {len(targets)}")
    budget = int(arm_curves[0][-1][0])
    a_steps = [_steps_to(c, t) for c, t in zip(arm_curves, targets)]
    c_steps = [_steps_to(c, t) for c, t in zip(control_curves, targets)]
    a_cens = [censored_steps(s, budget) for s in a_steps]
    c_cens = [censored_steps(s, budget) for s in c_steps]
    ratios = [c / a for a, c in zip(a_cens, c_cens)]
    # the control's own final loss as the target: the control reaches it within the budget
    own = [c[-1][1] for c in control_curves]
    a2 = [censored_steps(_steps_to(c, t), budget) for c, t in zip(arm_curves, own)]
    c2 = [censored_steps(_steps_to(c, t), budget) for c, t in zip(control_curves, own)]
    ratios2 = [c / a for a, c in zip(a2, c2)]
    auc_a = [curve_auc(c) for c in arm_curves]
    auc_c = [curve_auc(c) for c in control_curves]
    fin_a = [float(c[-1][1]) for c in arm_curves]
    fin_c = [float(c[-1][1]) for c in control_curves]
    auc_d = [a - c for a, c in zip(auc_a, auc_c)]
    fin_d = [a - c for a, c in zip(fin_a, fin_c)]
    kw = dict(seed=seed, resamples=resamples)
    return {
        "seeds_n": n,
        "budget_steps": budget,
        "speedup_median": median(ratios),
        "speedup_ci95": bootstrap_ci(ratios, **kw),
        "speedup_per_seed": ratios,
        "steps_arm": a_cens,
        "steps_control": c_cens,
        "censored_arm": sum(s is None for s in a_steps),
        "censored_control": sum(s is None for s in c_steps),
        "speedup_to_control_final_median": median(ratios2),
        "speedup_to_control_final_ci95": bootstrap_ci(ratios2, **kw),
        "loss_at": {str(k): [_mean(loss_at(c, k) for c in arm_curves), _mean(loss_at(c, k) for c in control_curves)]
                    for k in LOSS_AT_STEPS if k <= budget},
        "auc_arm": sum(auc_a) / n,
        "auc_control": sum(auc_c) / n,
        "auc_diff_median": median(auc_d),
        "auc_diff_ci95": bootstrap_ci(auc_d, **kw),
        "final_loss_arm": sum(fin_a) / n,
        "final_loss_control": sum(fin_c) / n,
        "final_loss_diff_median": median(fin_d),
        "final_loss_diff_ci95": bootstrap_ci(fin_d, **kw),
    }
