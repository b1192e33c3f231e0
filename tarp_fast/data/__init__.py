"""Data without network: multi-domain corpora, tokenizers, support/query sampling.

* :func:`machine_corpus`: one domain per kind of text on this machine (recorded with hashes).
* :func:`markov_corpus`: generated domains with a known optimal loss; :func:`planted_corpus`:
  generated domains with planted shared structure (a shared chain, relabeled and mixed per domain).
* :func:`folder_corpus` / :func:`jsonl_corpus`: user data, one domain per subfolder / record key.
* :class:`ByteTokenizer` (default) or a local transformers tokenizer (:func:`load_tokenizer`).
* :class:`TaskSampler`: meta-batches of domains with support and query windows.
"""

from .corpus import (
    MACHINE_DOMAINS,
    Corpus,
    Domain,
    corpus_from_manifest,
    folder_corpus,
    jsonl_corpus,
    load_corpus,
    machine_corpus,
)
from .generated import (
    entropy_rate,
    markov_corpus,
    markov_domain,
    planted_corpus,
    planted_domain,
    planted_parameters,
)
from .sampling import DomainSplits, TaskBatch, TaskSampler, eval_windows, random_windows, step_generator
from .tokenize import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "MACHINE_DOMAINS",
    "Corpus",
    "Domain",
    "corpus_from_manifest",
    "folder_corpus",
    "jsonl_corpus",
    "load_corpus",
    "machine_corpus",
    "entropy_rate",
    "markov_corpus",
    "markov_domain",
    "planted_corpus",
    "planted_domain",
    "planted_parameters",
    "DomainSplits",
    "TaskBatch",
    "TaskSampler",
    "eval_windows",
    "random_windows",
    "step_generator",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
]
