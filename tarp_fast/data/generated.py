"""Generated domains whose optimal loss is known: first-order Markov chains over a few symbols.

Domain ``i`` draws an alphabet of ``k`` byte values and a transition matrix ``P [k, k]`` whose
rows are Dirichlet(``concentration``) samples, then emits one long stream started from the
stationary distribution ``π`` (``π P = π``). For such a stream the best possible next-token
predictor is ``P`` itself, and its expected cross-entropy per token, in nats, is the entropy rate

    H = Σ_i π_i · (−Σ_j P_ij log P_ij)

which :class:`~tarp_fast.data.corpus.Domain` records as ``optimal_loss``: a model's loss minus
``H`` is its exact excess loss. Domains share nothing but the generator, so each is a new task
(:func:`markov_corpus`, ``--corpus generated[:N]``).

**Planted shared structure** (:func:`planted_corpus`, ``--corpus planted[:N]``): a family in
which preparation has something to learn. One *shared base chain* ``P₀ [k, k]`` (Dirichlet
rows, drawn once from the family's seed) over one alphabet shared by every domain; domain ``d``
is a small, structured transformation of it with its own parameters:

* a **mixture** with a domain-specific chain: ``P_d = (1 − α) P₀ + α Q_d`` (``Q_d``: fresh
  Dirichlet rows, ``α`` = ``mix``), so every row of ``P_d`` is within total variation ``α`` of
  the same row of ``P₀``;
* a **relabeling** of a few symbols: a permutation ``σ_d`` that moves ``num_permuted`` of the
  ``k`` states among themselves (one cycle through them in a random order, so each of them
  changes symbol; the other states keep theirs);
  the domain emits ``alphabet[σ_d(s_t)]`` for the hidden state ``s_t`` of ``P_d``.

The emitted stream is the Markov chain ``Π_d P_d Π_dᵀ`` (``Π_d``: the permutation matrix of
``σ_d``); relabeling states changes neither the stationary weights of a state nor its row's
entropy, so its optimal loss is exactly ``H(P_d)`` (the entropy rate above), recorded as
``optimal_loss``. What is shared (``P₀``, the alphabet) can be learned from the preparation
domains; what differs per domain (``σ_d``, ``Q_d``) is small: with the defaults (``k`` = 12,
``α`` = 0.2, 4 relabeled states) a held-out domain is the shared chain with a 4-cycle of its
symbols relabeled and a fifth of its transition mass moved to a chain of its own.
"""

from __future__ import annotations

import bisect
from typing import Optional

import torch

from .corpus import Corpus, Domain
from .tokenize import ByteTokenizer

__all__ = ["markov_domain", "markov_corpus", "entropy_rate", "planted_parameters", "planted_domain",
           "planted_corpus"]

_SYMBOLS = b"abcdefghijklmnopqrstuvwxyz0123456789 .,;:-_=+*/()[]{}<>"


def entropy_rate(P: torch.Tensor) -> float:
    """Entropy rate in nats of the chain with transition matrix ``P [k, k]`` (rows sum to 1)."""
    P = P.double()
    k = P.shape[0]
    # stationary distribution: left eigenvector of P for eigenvalue 1, solved as the square linear
    # system (P^T - I) pi = 0 with its last equation replaced by sum(pi) = 1 (LU, deterministic:
    # the value goes into corpus fingerprints, i.e. cache keys); a reducible chain makes it
    # singular, then least squares on the stacked system
    A = P.T - torch.eye(k, dtype=P.dtype)
    A[-1] = 1.0
    b = torch.zeros(k, dtype=P.dtype)
    b[-1] = 1.0
    pi, info = torch.linalg.solve_ex(A, b)
    if int(info) != 0 or not torch.isfinite(pi).all():
        A2 = torch.cat([(P.T - torch.eye(k, dtype=P.dtype)), torch.ones(1, k, dtype=P.dtype)], 0)
        b2 = torch.zeros(k + 1, dtype=P.dtype)
        b2[-1] = 1.0
        pi = torch.linalg.lstsq(A2, b2.unsqueeze(-1)).solution.squeeze(-1)
    pi = pi.clamp_min(0)
    pi = pi / pi.sum()
    row_h = -(P * torch.log(P.clamp_min(1e-300))).sum(-1)
    # rounded to 12 decimals: far below any loss difference, and the same on every machine
    return round(float((pi * row_h).sum()), 12)


def _dirichlet_rows(k: int, concentration: float, seed: int) -> torch.Tensor:
    """``[k, k]`` float64 transition matrix whose rows are Dirichlet(``concentration``) draws."""
    # Dirichlet rows as normalized Gamma draws; torch's Gamma sampler takes no generator, so the
    # global RNG is seeded inside fork_rng (the caller's RNG state is left untouched).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        gam = torch._standard_gamma(torch.full((k, k), float(concentration), dtype=torch.float64))
    P = gam.clamp_min(1e-12)
    return P / P.sum(-1, keepdim=True)


def _sample_states(P: torch.Tensor, num_tokens: int, g: torch.Generator) -> torch.Tensor:
    """``[num_tokens]`` int64 states of the chain ``P [k, k]``, drawn with ``g``."""
    k = P.shape[0]
    # The chain is inherently sequential: sample by inverse CDF with one uniform per step, after
    # a burn-in from state 0 so the stream starts (very nearly) from the stationary distribution.
    cdf = P.cumsum(-1)
    cdf[:, -1] = 1.0
    cdf_rows = cdf.tolist()
    u = torch.rand(num_tokens + 256, generator=g, dtype=torch.float64).tolist()
    s, out = 0, []
    for t, ut in enumerate(u):
        s = min(bisect.bisect_left(cdf_rows[s], ut), k - 1)
        if t >= 256:
            out.append(s)
    return torch.tensor(out, dtype=torch.int64)


def markov_domain(name: str, *, seed: int, num_tokens: int = 200_000, num_symbols: int = 12,
                  concentration: float = 0.3) -> Domain:
    """One generated domain (see the module docstring); deterministic in ``seed``."""
    if num_symbols < 2 or num_symbols > len(_SYMBOLS):
        raise ValueError(f"markov_domain: argument 'num_symbols' must be in [2, {len(_SYMBOLS)}], got {num_symbols}")
    if num_tokens < 2:
        raise ValueError(f"markov_domain: argument 'num_tokens' must be >= 2, got {num_tokens}")
    if not concentration > 0:
        raise ValueError(f"markov_domain: argument 'concentration' must be > 0, got {concentration}")
    g = torch.Generator().manual_seed(int(seed))
    alphabet = torch.tensor(list(_SYMBOLS), dtype=torch.int64)[torch.randperm(len(_SYMBOLS), generator=g)[:num_symbols]]
    P = _dirichlet_rows(num_symbols, concentration, int(seed) * 7919 + 17)
    H = entropy_rate(P)
    tokens = alphabet[_sample_states(P, num_tokens, g)]
    return Domain(name, "generated", tokens, files=[], optimal_loss=H,
                  info={"seed": int(seed), "num_symbols": num_symbols, "concentration": concentration,
                        "alphabet": bytes(alphabet.tolist()).decode("ascii")})


def markov_corpus(num_domains: int = 6, *, seed: int = 0, num_tokens: int = 200_000, num_symbols: int = 12,
                  concentration: float = 0.3, prefix: str = "markov", tokenizer: Optional[object] = None) -> Corpus:
    """``num_domains`` generated domains named ``{prefix}{i}`` (byte tokens, vocabulary 256)."""
    if num_domains < 1:
        raise ValueError(f"markov_corpus: argument 'num_domains' must be >= 1, got {num_domains}")
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    if getattr(tok, "vocab_size", 256) < 256:
        raise ValueError("markov_corpus: generated domains emit byte values and need a tokenizer with >= 256 ids")
    doms = [markov_domain(f"{prefix}{i}", seed=seed * 1000 + i, num_tokens=num_tokens, num_symbols=num_symbols,
                          concentration=concentration) for i in range(num_domains)]
    return Corpus(doms, tok, source=f"generated:markov(seed={seed})")


def _check_planted(num_symbols: int, num_permuted: int, mix: float, concentration: float, num_tokens: int) -> None:
    if num_symbols < 2 or num_symbols > len(_SYMBOLS):
        raise ValueError(f"planted: argument 'num_symbols' must be in [2, {len(_SYMBOLS)}], got {num_symbols}")
    if num_permuted == 1 or not 0 <= num_permuted <= num_symbols:
        raise ValueError(f"planted: argument 'num_permuted' must be 0 or in [2, num_symbols={num_symbols}] "
                         f"(one symbol cannot move alone), got {num_permuted}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"planted: argument 'mix' must be in [0, 1], got {mix}")
    if not concentration > 0:
        raise ValueError(f"planted: argument 'concentration' must be > 0, got {concentration}")
    if num_tokens < 2:
        raise ValueError(f"planted: argument 'num_tokens' must be >= 2, got {num_tokens}")


def planted_parameters(index: int, *, seed: int = 0, num_symbols: int = 12, num_permuted: int = 4, mix: float = 0.2,
                       concentration: float = 0.3) -> dict:
    """The generating parameters of domain ``index`` of the planted family ``seed`` (module docstring).

    Returns ``{"alphabet": [k] int64 byte values (shared), "base": P₀ [k, k] (shared), "mixed":
    P_d = (1 − mix) P₀ + mix Q_d [k, k], "permutation": σ_d [k] int64 (state i is emitted as
    ``alphabet[σ_d[i]]``), "optimal_loss": H(P_d) in nats}``; float64 matrices, rows summing to 1.
    Deterministic in ``(seed, index)``; ``alphabet`` and ``base`` depend on ``seed`` only.
    """
    _check_planted(num_symbols, num_permuted, mix, concentration, 2)
    fam = torch.Generator().manual_seed(int(seed) * 1_000_003 + 11)
    alphabet = torch.tensor(list(_SYMBOLS), dtype=torch.int64)[torch.randperm(len(_SYMBOLS), generator=fam)[:num_symbols]]
    base = _dirichlet_rows(num_symbols, concentration, int(seed) * 1_000_003 + 13)
    own = _dirichlet_rows(num_symbols, concentration, int(seed) * 1_000_003 + 7919 * (int(index) + 1) + 17)
    mixed = (1.0 - mix) * base + mix * own
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * (int(index) + 1) + 19)
    perm = torch.arange(num_symbols)
    if num_permuted:
        moved = torch.randperm(num_symbols, generator=g)[:num_permuted]
        # one cycle through the moved states in a random order: every one of them changes symbol
        # (no fixed point), so the relabeling really moves num_permuted symbols
        order = moved[torch.randperm(num_permuted, generator=g)]
        perm[order] = torch.roll(order, 1)
    return {"alphabet": alphabet, "base": base, "mixed": mixed, "permutation": perm,
            "optimal_loss": entropy_rate(mixed)}


def planted_domain(name: str, index: int, *, seed: int = 0, num_tokens: int = 200_000, num_symbols: int = 12,
                   num_permuted: int = 4, mix: float = 0.2, concentration: float = 0.3) -> Domain:
    """Domain ``index`` of the planted family ``seed`` (module docstring): ``num_tokens`` byte
    tokens of the chain ``Π_d P_d Π_dᵀ``, ``optimal_loss`` its entropy rate ``H(P_d)``.
    ``info`` records the parameters, the relabeled symbols and the shared chain's entropy rate."""
    _check_planted(num_symbols, num_permuted, mix, concentration, num_tokens)
    par = planted_parameters(index, seed=seed, num_symbols=num_symbols, num_permuted=num_permuted, mix=mix,
                             concentration=concentration)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * (int(index) + 1) + 23)
    states = _sample_states(par["mixed"], num_tokens, g)
    alphabet, perm = par["alphabet"], par["permutation"]
    tokens = alphabet[perm[states]]
    moved = [i for i in range(num_symbols) if int(perm[i]) != i]
    relabel = {bytes([int(alphabet[i])]).decode("ascii"): bytes([int(alphabet[perm[i]])]).decode("ascii")
               for i in moved}
    return Domain(name, "generated", tokens, files=[], optimal_loss=par["optimal_loss"],
                  info={"family": "planted", "seed": int(seed), "index": int(index), "num_symbols": num_symbols,
                        "num_permuted": num_permuted, "mix": mix, "concentration": concentration,
                        "alphabet": bytes(alphabet.tolist()).decode("ascii"), "relabeled": relabel,
                        "permutation": perm.tolist(), "shared_entropy_rate": entropy_rate(par["base"])})


def planted_corpus(num_domains: int = 8, *, seed: int = 0, num_tokens: int = 200_000, num_symbols: int = 12,
                   num_permuted: int = 4, mix: float = 0.2, concentration: float = 0.3, prefix: str = "planted",
                   tokenizer: Optional[object] = None) -> Corpus:
    """``num_domains`` domains of the planted family ``seed``, named ``{prefix}{i}`` (module
    docstring; byte tokens, vocabulary 256). Deterministic in ``seed``; domain ``i`` is the same
    whatever ``num_domains`` is."""
    if num_domains < 1:
        raise ValueError(f"planted_corpus: argument 'num_domains' must be >= 1, got {num_domains}")
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    if getattr(tok, "vocab_size", 256) < 256:
        raise ValueError("planted_corpus: generated domains emit byte values and need a tokenizer with >= 256 ids")
    doms = [planted_domain(f"{prefix}{i}", i, seed=seed, num_tokens=num_tokens, num_symbols=num_symbols,
                           num_permuted=num_permuted, mix=mix, concentration=concentration)
            for i in range(num_domains)]
    return Corpus(doms, tok, source=f"generated:planted(seed={seed}, mix={mix}, num_permuted={num_permuted})")
