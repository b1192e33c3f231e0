"""Windows, support/query splits and the task sampler of the preparation stage.

Every random draw here comes from a ``torch.Generator`` seeded from ``(seed, step, slot)``, so a
batch depends only on those numbers: the sampler's whole state is its seed and its step counter
(saved in checkpoints), and two ranks that agree on the seed draw the same tasks without talking.

A domain's training stream (see :meth:`Domain.split`) is cut once more for meta-learning:
support windows come from its first ``support_fraction`` and query windows from the rest, so the
query loss of an adapted model measures generalization within the domain, not memorization.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .corpus import Corpus

__all__ = ["random_windows", "eval_windows", "dedup_eval_windows", "TaskSampler", "TaskBatch", "DomainSplits",
           "step_generator"]

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates neighbouring (seed, step, slot)


def step_generator(seed: int, step: int, slot: int = 0) -> torch.Generator:
    """A generator determined by ``(seed, step, slot)`` only."""
    key = (int(seed) * _MIX + int(step) * 1_000_003 + int(slot) * 97 + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


def random_windows(tokens: torch.Tensor, num: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``[num, length]`` windows at uniform random offsets of ``tokens [n]`` (``n >= length``)."""
    n = int(tokens.numel())
    if n < length:
        raise ValueError(f"random_windows: the token stream has {n} tokens, fewer than the window length {length}")
    starts = torch.randint(0, n - length + 1, (num,), generator=generator)
    return tokens[starts.unsqueeze(-1) + torch.arange(length)]


def eval_windows(tokens: torch.Tensor, num: int, length: int) -> torch.Tensor:
    """``[num', length]`` evenly spaced windows (deterministic; ``num' <= num`` on short streams)."""
    n = int(tokens.numel())
    if n < length:
        raise ValueError(f"eval_windows: the token stream has {n} tokens, fewer than the window length {length}")
    num = max(1, min(num, n // length))
    starts = torch.linspace(0, n - length, num).round().to(torch.int64)
    return tokens[starts.unsqueeze(-1) + torch.arange(length)]


@dataclass
class DomainSplits:
    """Per-domain token streams: ``support``, ``query`` (both from training text) and ``eval``."""

    support: torch.Tensor
    query: torch.Tensor
    eval: torch.Tensor

    @classmethod
    def of(cls, tokens: torch.Tensor, *, eval_fraction: float = 0.1, support_fraction: float = 0.7) -> DomainSplits:
        if not 0.0 < support_fraction < 1.0:
            raise ValueError(f"DomainSplits: argument 'support_fraction' must be in (0, 1), got {support_fraction!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"DomainSplits: argument 'eval_fraction' must be in (0, 1), got {eval_fraction!r}")
        n = int(tokens.numel())
        cut_eval = int(n * (1.0 - eval_fraction))
        cut_sup = int(cut_eval * support_fraction)
        return cls(tokens[:cut_sup], tokens[cut_sup:cut_eval], tokens[cut_eval:])

    @functools.cached_property
    def train(self) -> torch.Tensor:
        """Support and query together: everything but the evaluation text.

        Concatenated on first access and kept: :meth:`TaskSampler.mixed_batch_at` reads it once
        per window, and at 200k tokens per domain concatenating each time cost more than the
        training step. The splits are not reassigned after construction (nor their tokens
        modified in place), so the cached text stays that of ``support`` and ``query``.
        """
        return torch.cat([self.support, self.query])


@dataclass
class TaskBatch:
    """One meta-batch: ``T`` tasks (domains), their support and query windows.

    ``support [T, k, B, L]`` (one batch per inner step), ``query [T, Bq, L]``; ``domains`` names
    each task. Row ``t`` of every tensor belongs to task ``t``.
    """

    domains: list[str]
    support: torch.Tensor
    query: torch.Tensor

    def select(self, tasks: Sequence[int]) -> TaskBatch:
        idx = torch.as_tensor(list(tasks), dtype=torch.int64)
        return TaskBatch([self.domains[i] for i in tasks], self.support[idx], self.query[idx])


class TaskSampler:
    """Draws meta-batches of tasks from the preparation domains.

    A task is a domain; each meta-batch picks ``tasks_per_batch`` distinct domains (uniformly, or
    all of them in order when there are no more domains than that), then ``inner_steps`` support
    batches of ``batch_size`` windows and one query batch of ``query_batch_size`` windows per task.
    ``state_dict()``/``load_state_dict()`` carry the step counter; the draws of step ``s`` are a
    function of ``(seed, s)`` only.
    """

    def __init__(self, corpus: Corpus, *, tasks_per_batch: int = 4, inner_steps: int = 1, batch_size: int = 8,
                 query_batch_size: int = None, seq_len: int = 64, seed: int = 0, eval_fraction: float = 0.1,
                 support_fraction: float = 0.7):
        if tasks_per_batch < 1 or inner_steps < 0 or batch_size < 1 or seq_len < 2:
            raise ValueError(
                "TaskSampler: arguments must satisfy tasks_per_batch >= 1, inner_steps >= 0, batch_size >= 1, "
                f"seq_len >= 2; got {tasks_per_batch}, {inner_steps}, {batch_size}, {seq_len}"
            )
        self.names = corpus.names
        self.splits: dict[str, DomainSplits] = {
            n: DomainSplits.of(corpus[n].tokens, eval_fraction=eval_fraction, support_fraction=support_fraction)
            for n in self.names
        }
        for n, sp in self.splits.items():
            if min(sp.support.numel(), sp.query.numel()) < seq_len:
                raise ValueError(f"TaskSampler: domain {n!r} is too short for seq_len={seq_len}")
        self.tasks_per_batch = int(tasks_per_batch)
        self.inner_steps = int(inner_steps)
        self.batch_size = int(batch_size)
        self.query_batch_size = int(query_batch_size or batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.step = 0

    def tasks_at(self, step: int) -> list[str]:
        """The domains of meta-batch ``step``."""
        T = self.tasks_per_batch
        if len(self.names) <= T:
            return [self.names[i % len(self.names)] for i in range(T)]
        perm = torch.randperm(len(self.names), generator=step_generator(self.seed, step, 0))
        return [self.names[int(i)] for i in perm[:T]]

    def batch_at(self, step: int) -> TaskBatch:
        doms = self.tasks_at(step)
        sup, qry = [], []
        L = self.seq_len
        for slot, name in enumerate(doms):
            g = step_generator(self.seed, step, slot + 1)
            sp = self.splits[name]
            k = max(self.inner_steps, 1)
            sup.append(random_windows(sp.support, k * self.batch_size, L, g).view(k, self.batch_size, L))
            qry.append(random_windows(sp.query, self.query_batch_size, L, g))
        return TaskBatch(doms, torch.stack(sup), torch.stack(qry))

    def next(self) -> TaskBatch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def mixed_batch_at(self, step: int, size: int) -> tuple[torch.Tensor, list[str]]:
        """``[size, L]`` windows from the training text of random domains (multitask training)."""
        g = step_generator(self.seed, step, 10_007)
        picks = torch.randint(0, len(self.names), (size,), generator=g).tolist()
        rows = [random_windows(self.splits[self.names[i]].train, 1, self.seq_len, g)[0] for i in picks]
        return torch.stack(rows), [self.names[i] for i in picks]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "names": list(self.names)}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("names", self.names)) != list(self.names):
            raise ValueError(f"TaskSampler.load_state_dict: the checkpoint's domains {state.get('names')} differ "
                             f"from this sampler's {self.names}")
        self.seed, self.step = int(state["seed"]), int(state["step"])


#: Shingle length (tokens; bytes under the byte tokenizer) of :func:`dedup_eval_windows`.
SHINGLE = 32
_HASH_BASE = 1_000_003  # odd, so multiplying by it is invertible modulo 2**64


def _shingle_hashes(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Polynomial hashes of every ``k``-token shingle of ``tokens [n]`` (``[n - k + 1]`` int64).

    Each shingle is folded token by token, ``h = h * BASE + token + 1``, in int64 arithmetic that
    wraps around: the hash is the polynomial modulo 2**64. The hashes are only compared with each
    other within one call (never stored), so any fixed function with rare collisions serves.
    """
    t = tokens.to(torch.int64)
    n = int(t.numel())
    if n < k:
        return torch.empty(0, dtype=torch.int64)
    h = torch.zeros(n - k + 1, dtype=torch.int64)
    for j in range(k):
        h = h * _HASH_BASE + (t[j:j + n - k + 1] + 1)
    return h


def dedup_eval_windows(train: torch.Tensor, eval_tokens: torch.Tensor, num: int, length: int, *,
                       shingle: int = SHINGLE) -> tuple[torch.Tensor, dict]:
    """Evaluation windows of ``eval_tokens`` that share no ``shingle``-token run with ``train``.

    The candidates are the non-overlapping windows of ``eval_tokens``; a candidate is dropped when
    any of its ``shingle``-token runs also occurs in ``train`` (the domain's training split: text
    duplicated across files, such as licence headers, would otherwise be measured as if unseen).
    Returns ``(windows [num', length], report)`` with ``num' <= num`` evenly spaced among the kept
    candidates, and ``report = {"candidates", "dropped", "kept", "shingle", "fallback"}``; when
    no candidate survives, the plain :func:`eval_windows` are returned and ``fallback`` is True.
    """
    n = int(eval_tokens.numel())
    if n < length:
        raise ValueError(f"dedup_eval_windows: the evaluation stream has {n} tokens, fewer than the window length {length}")
    k = min(int(shingle), length)
    cands = eval_tokens[: (n // length) * length].view(-1, length)
    seen = torch.unique(_shingle_hashes(train, k))
    # every candidate's shingles in one pass: hash the stream, then read each window's slice
    per = length - k + 1
    hs = _shingle_hashes(cands.reshape(-1), k)
    starts = torch.arange(cands.shape[0]) * length
    idx = starts.unsqueeze(-1) + torch.arange(per)  # shingles fully inside window i
    hit = torch.isin(hs[idx], seen).any(-1)
    keep = torch.nonzero(~hit).flatten().tolist()
    report = {"candidates": int(cands.shape[0]), "dropped": int(cands.shape[0] - len(keep)), "kept": len(keep),
              "shingle": k, "fallback": not keep}
    if not keep:
        return eval_windows(eval_tokens, num, length), report
    m = min(num, len(keep))
    pick = torch.linspace(0, len(keep) - 1, m).round().to(torch.int64).tolist()
    return cands[[keep[j] for j in pick]], report
