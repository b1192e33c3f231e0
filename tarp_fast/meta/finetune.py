"""Plain training loops: pretraining, multitask continued training and fine-tuning on one domain.

One recipe for every arm of the benchmark (:class:`FinetuneRecipe`): Adam, a fixed number of
steps, ``batch_size`` random windows of ``seq_len`` tokens from the domain's training text per
step, a fixed evaluation set of windows from its held-out text evaluated at log-spaced steps.
Arms differ only in the starting model and in which parameters train.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import asdict, dataclass
from typing import Optional, TextIO, Union

import torch
import torch.nn as nn

from ..data.sampling import eval_windows, random_windows, step_generator
from .models import sequence_losses

__all__ = ["FinetuneRecipe", "eval_schedule", "evaluate", "finetune", "train_lm", "NonFiniteLossError", "RunProgress",
           "PROGRESS_MODES"]


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite; the message says where."""


def check_finite(loss: torch.Tensor, where: str, step: int) -> None:
    if not bool(torch.isfinite(loss).all()):
        raise NonFiniteLossError(
            f"{where}: non-finite loss ({loss.detach().flatten()[:4].tolist()}) at step {step}; "
            "lower the learning rate or check the data"
        )


@dataclass
class FinetuneRecipe:
    """The fine-tuning recipe shared by every arm (see the module docstring)."""

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 16
    seq_len: int = 96
    eval_windows: int = 32
    eval_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(f"FinetuneRecipe: argument {name!r} must be a {'non-negative' if name == 'steps' else 'positive'} int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"FinetuneRecipe: argument 'lr' must be a positive float, got {self.lr!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def eval_schedule(total: int, *, dense: int = 20) -> list[int]:
    """Log-spaced steps (0, 1, 2, 5, 10, 20, 50, ...) plus ``dense`` evenly spaced ones, and ``total``.

    The even grid gives steps-to-target a resolution of ``total / dense`` steps; the log grid
    shows the start of the curve.
    """
    steps = {0, total}
    k = 1
    while k <= total:
        for m in (1, 2, 5):
            if m * k <= total:
                steps.add(m * k)
        k *= 10
    if total > 0 and dense > 0:
        steps.update(round(total * i / dense) for i in range(1, dense + 1))
    return sorted(steps)


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 32,
             context: Optional[Callable[[], ContextManager]] = None) -> float:
    """Mean next-token loss (nats) over ``windows [n, L]``; ``context()`` wraps each forward."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    context = context or contextlib.nullcontext
    for i in range(0, windows.shape[0], batch_size):
        chunk = windows[i:i + batch_size]
        with context():
            total += float(sequence_losses(model, chunk).sum())
        n += chunk.shape[0]
    model.train(was_training)
    return total / max(n, 1)


def _adam(params: list, recipe: FinetuneRecipe, lr: Optional[float] = None) -> torch.optim.Optimizer:
    # foreach=False: the single-tensor path keeps results independent of how tensors are grouped
    return torch.optim.AdamW(params, lr=lr or recipe.lr, weight_decay=recipe.weight_decay, foreach=False)


def finetune(
    model: nn.Module,
    params: Iterable,
    train_tokens: torch.Tensor,
    eval_tokens: torch.Tensor,
    recipe: FinetuneRecipe,
    *,
    seed: int = 0,
    lr: Optional[float] = None,
    progress: Union[bool, RunProgress] = False,
    desc: str = "fine-tune",
    on_eval: Optional[Callable[[int, float, float], None]] = None,
    context: Optional[Callable[[], ContextManager]] = None,
) -> list[list[float]]:
    """Fine-tune ``params`` of ``model`` on one domain; return the curve ``[[step, loss, seconds]]``.

    ``params`` are parameters, or optimizer parameter groups (dicts with ``"params"`` and their
    own ``"lr"``); every other parameter of ``model`` is frozen.

    ``loss`` is the mean loss on the fixed evaluation windows of ``eval_tokens``; ``seconds`` is
    the wall time spent in training steps up to that step (evaluation time excluded). The batch of
    step ``s`` depends on ``(seed, s)`` only, so every arm sees the same data in the same order.
    ``context()`` (optional) wraps every forward pass (e.g. a fixed TAMS architecture).
    ``progress``: ``True`` (a bar on a terminal, plain lines otherwise) or a :class:`RunProgress`
    that counts this call as one phase of a longer run.
    """
    context = context or contextlib.nullcontext
    params = list(params)
    trained = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    if not trained:
        raise ValueError("finetune: argument 'params' is empty: nothing would train")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = _adam(params, recipe, lr)
    ev = eval_windows(eval_tokens, recipe.eval_windows, recipe.seq_len)
    marks = set(eval_schedule(recipe.steps))
    curve: list[list[float]] = []
    seconds = 0.0
    bar = _phase(progress, desc, recipe.steps, kind="finetune", cost=recipe.batch_size)
    model.train()
    for step in range(recipe.steps + 1):
        if step in marks:
            loss_eval = evaluate(model, ev, context=context)
            if not math.isfinite(loss_eval):
                raise NonFiniteLossError(f"{desc}: non-finite evaluation loss ({loss_eval}) at step {step}")
            curve.append([step, loss_eval, seconds])
            if on_eval is not None:
                on_eval(step, loss_eval, seconds)
            if bar is not None:
                bar.note(eval_loss=loss_eval)
        if step == recipe.steps:
            break
        t0 = time.perf_counter()
        ids = random_windows(train_tokens, recipe.batch_size, recipe.seq_len, step_generator(seed, step, 1))
        with context():
            loss = sequence_losses(model, ids).mean()
            check_finite(loss, desc, step)
            # read while timed: check_finite has already synchronized, so this adds no wait of its own
            loss_value = float(loss.detach()) if bar is not None else None
            opt.zero_grad(set_to_none=True)
            loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(trained, recipe.grad_clip)
        opt.step()
        seconds += time.perf_counter() - t0
        if bar is not None:
            bar.update(1, loss=loss_value)
    if bar is not None:
        bar.close()
    return curve


def train_lm(
    model: nn.Module,
    batch_fn: Callable[[int], torch.Tensor],
    steps: int,
    *,
    lr: float = 1e-3,
    params: Optional[Iterable[nn.Parameter]] = None,
    grad_clip: float = 1.0,
    warmup: int = 0,
    progress: Union[bool, RunProgress] = False,
    desc: str = "train",
    log: Optional[Callable[[dict], None]] = None,
) -> list[float]:
    """Train ``model`` on ``batch_fn(step) -> ids [B, L]`` for ``steps`` Adam steps; return losses.

    Used for pretraining the base and for multitask continued training (the DAPT-style control).
    A linear warm-up over ``warmup`` steps, then a cosine decay to 10% of ``lr``.
    """
    params = list(model.parameters()) if params is None else list(params)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, steps, warmup))
    losses: list[float] = []
    bar = _phase(progress, desc, steps, kind="pretrain" if desc.startswith("pretrain") else "train")
    model.train()
    for step in range(steps):
        loss = sequence_losses(model, batch_fn(step)).mean()
        check_finite(loss, desc, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log({"phase": desc, "step": step, "loss": losses[-1]})
        if bar is not None:
            bar.update(1, loss=losses[-1])
    if bar is not None:
        bar.close()
    return losses


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))




# ---- progress --------------------------------------------------------------------------------

#: ``RunProgress`` modes: ``auto`` (bars on a terminal, plain lines otherwise), ``bars``,
#: ``lines`` (plain periodic lines), ``quiet`` (one line per finished phase), ``off``.
PROGRESS_MODES = ("auto", "bars", "lines", "quiet", "off")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class RunProgress:
    """Progress of a run made of phases (pretraining, preparation, fine-tuning runs, ...).

    Every phase is announced as ``[k/N] description``; with a ``plan`` (one ``(kind, steps,
    cost)`` per phase expected, in order; ``cost`` is the work of one step, e.g. the windows it
    processes) the run's remaining time is estimated from the seconds per unit of work measured so
    far (per kind once a phase of that kind has run). Output goes to ``stream`` (stderr):

    * ``bars``: a tqdm bar per phase, kept on screen when finished, with the phase's loss and the
      run's estimate;
    * ``lines``: plain lines, at the start and end of each phase and every ``interval`` seconds
      in between (what ``auto`` picks when the stream is not a terminal, e.g. redirected to a log);
    * ``quiet``: one line per finished phase; ``off``: nothing.
    """

    def __init__(self, plan: Optional[list] = None, *, mode: str = "auto", stream: Optional[TextIO] = None,
                 interval: float = 15.0, clock: Callable[[], float] = time.perf_counter):
        if mode not in PROGRESS_MODES:
            raise ValueError(f"RunProgress: argument 'mode' must be one of {PROGRESS_MODES}, got {mode!r}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bars" if (isatty is not None and isatty()) else "lines"
        self.mode, self.interval, self.clock = mode, float(interval), clock
        self.plan = [tuple(p) for p in (plan or [])]
        self.done = 0  # finished phases
        self.t0: Optional[float] = None
        self.units_done = 0.0
        self.kind_rate: dict[str, list[float]] = {}  # kind -> [seconds, units]
        self.current: Optional[_Phase] = None

    @property
    def total(self) -> int:
        return max(len(self.plan), self.done + (1 if self.current is not None else 0))

    def add(self, kind: str, steps: int, cost: float = 1.0) -> None:
        """Append a phase to the plan (known only once the run is under way)."""
        self.plan.append((kind, int(steps), float(cost)))

    def phase(self, desc: str, total: int, *, kind: str = "train", cost: Optional[float] = None) -> _Phase:
        """Start the next phase: ``total`` steps; returns it (``update``, ``note``, ``close``)."""
        if self.current is not None:
            self.current.close()
        if self.t0 is None:
            self.t0 = self.clock()
        k = self.done
        if k < len(self.plan):
            kind, _, planned_cost = self.plan[k]
            cost = planned_cost if cost is None else cost
        else:
            self.plan.append((kind, int(total), float(cost or 1.0)))
        self.current = _Phase(self, k + 1, desc, int(total), kind, float(cost or 1.0))
        return self.current

    def _rate(self, kind: str) -> Optional[float]:
        seconds, units = self.kind_rate.get(kind, (0.0, 0.0))
        if units > 0:
            return seconds / units
        all_s = sum(v[0] for v in self.kind_rate.values())
        all_u = sum(v[1] for v in self.kind_rate.values())
        return all_s / all_u if all_u > 0 else None

    def estimate_left(self) -> Optional[float]:
        """Seconds left in the whole run (``None`` until something has been measured)."""
        ph = self.current
        left = 0.0
        if ph is not None and ph.steps > 0:
            rate = ph.seconds() / (ph.steps * ph.cost)
            left += (ph.total - ph.steps) * ph.cost * rate
        elif ph is not None:
            rate = self._rate(ph.kind)
            if rate is None:
                return None
            left += ph.total * ph.cost * rate
        for kind, steps, cost in self.plan[self.done + (1 if ph is not None else 0):]:
            rate = self._rate(kind)
            if rate is None:
                if ph is None or ph.steps == 0:
                    return None
                rate = ph.seconds() / (ph.steps * ph.cost)
            left += steps * cost * rate
        return left

    def run_summary(self) -> str:
        elapsed = self.clock() - (self.t0 if self.t0 is not None else self.clock())
        left = self.estimate_left()
        est = f", ~{_clock(left)} left (estimate)" if left is not None else ""
        return f"run {_clock(elapsed)} elapsed{est}"

    def _finish(self, ph: _Phase) -> None:
        secs = ph.seconds()
        slot = self.kind_rate.setdefault(ph.kind, [0.0, 0.0])
        slot[0] += secs
        slot[1] += ph.steps * ph.cost
        self.done += 1
        self.current = None

    def write(self, line: str) -> None:
        if self.mode != "off":
            print(line, file=self.stream, flush=True)


class _Phase:
    """One phase of a :class:`RunProgress`."""

    def __init__(self, run: RunProgress, index: int, desc: str, total: int, kind: str, cost: float):
        self.run, self.index, self.desc, self.total, self.kind, self.cost = run, index, desc, total, kind, cost
        self.steps = 0
        self.info: dict[str, float] = {}
        self.t0 = run.clock()
        self.last_line = self.t0
        self.closed = False
        self.bar = None
        if run.mode == "bars":
            from tqdm.auto import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total, desc=self.label, leave=True, dynamic_ncols=True, file=run.stream)
        elif run.mode == "lines":
            run.write(f"{self.label}: {total} steps; {run.run_summary()}")

    @property
    def label(self) -> str:
        return f"[{self.index}/{self.run.total}] {self.desc}"

    def seconds(self) -> float:
        return self.run.clock() - self.t0

    def _info_text(self) -> str:
        return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.info.items())

    def note(self, **info) -> None:
        """Record figures shown with the phase (e.g. ``loss=``, ``eval_loss=``)."""
        self.info.update(info)
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in self.info.items()},
                                 refresh=False)

    def update(self, n: int = 1, **info) -> None:
        self.steps += n
        if info:
            self.note(**info)
        run = self.run
        if self.bar is not None:
            if self.steps == self.total or self.steps % 10 == 0:
                left = run.estimate_left()
                if left is not None:
                    self.bar.set_postfix({**{k: (f"{v:.3f}" if isinstance(v, float) else v)
                                             for k, v in self.info.items()}, "run_left": _clock(left)}, refresh=False)
            self.bar.update(n)
        elif run.mode == "lines":
            now = run.clock()
            if now - self.last_line >= run.interval and self.steps < self.total:
                self.last_line = now
                info = self._info_text()
                run.write(f"{self.label}: step {self.steps}/{self.total}{', ' + info if info else ''}; "
                          f"{run.run_summary()}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        run = self.run
        secs = self.seconds()
        if self.bar is not None:
            self.bar.close()
        run._finish(self)
        if run.mode in ("lines", "quiet"):
            info = self._info_text()
            run.write(f"{self.label}: done, {self.steps} steps in {secs:.1f} s{', ' + info if info else ''}; "
                      f"{run.run_summary()}")

    def __enter__(self) -> _Phase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _phase(progress, desc: str, total: int, *, kind: str, cost: Optional[float] = None) -> Optional[_Phase]:
    """The phase object for a loop: from a :class:`RunProgress`, or a one-phase run for ``True``."""
    if isinstance(progress, RunProgress):
        return progress.phase(desc, total, kind=kind, cost=cost)
    if progress:
        return RunProgress().phase(desc, total, kind=kind, cost=cost)
    return None
