"""Multi-domain corpora that need no network.

A :class:`Corpus` maps domain names to :class:`Domain` objects, each one token stream (the
domain's files concatenated with a blank line between them) plus the list of files it came from
with their sizes and sha256, so a run can be reproduced or checked (:meth:`Corpus.manifest`,
:func:`corpus_from_manifest`). Sources:

* :func:`machine_corpus`: text already on this machine, one domain per kind of text (Python
  sources of the standard library, C headers, licences, Debian changelogs, copyright files,
  manual pages, info manuals, Perl modules, configuration files). Kinds with too little text here
  are left out, so the set of domains depends on the machine; the manifest records what was used.
* :func:`folder_corpus`: a user folder with one subfolder of text files per domain.
* :func:`jsonl_corpus`: a JSONL file of ``{"domain": NAME, "text": TEXT}`` records.
* :func:`tarp_fast.data.generated.markov_corpus`: synthetic domains with a known optimal loss
  (spec ``generated[:N]``), and :func:`tarp_fast.data.generated.planted_corpus`: a family of
  generated domains with planted shared structure, one shared Markov chain that each domain
  relabels and mixes in its own way, each with its known optimal loss (spec ``planted[:N]``).

File choice is deterministic and spread over each kind: candidates are ordered by the sha1 of
their path (not alphabetically, which would take one corner of a tree) and taken until
``max_bytes`` per domain, each file cut to ``max_file_bytes``.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from .._io import atomic_write_bytes
from .tokenize import ByteTokenizer

__all__ = [
    "Domain",
    "Corpus",
    "MACHINE_DOMAINS",
    "machine_corpus",
    "folder_corpus",
    "jsonl_corpus",
    "corpus_from_manifest",
    "load_corpus",
]

SEPARATOR = b"\n\n"


@dataclass
class Domain:
    """One domain: a token stream ``tokens [n]`` (int64) and where it came from.

    ``optimal_loss`` is the lowest achievable expected next-token loss in nats when it is known
    (generated domains), else ``None``.
    """

    name: str
    kind: str
    tokens: torch.Tensor
    files: list[dict] = field(default_factory=list)
    optimal_loss: Optional[float] = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.dim() != 1:
            raise ValueError(f"Domain {self.name!r}: argument 'tokens' must be a 1-D tensor")
        self.tokens = self.tokens.to(torch.int64)

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def split(self, eval_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(train [n - e], eval [e])``: the last ``eval_fraction`` of the stream is held out.

        A contiguous cut (not random windows) so that no training window overlaps an
        evaluation window.
        """
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"Domain.split: argument 'eval_fraction' must be in (0, 1), got {eval_fraction!r}")
        cut = int(len(self) * (1.0 - eval_fraction))
        return self.tokens[:cut], self.tokens[cut:]

    def describe(self) -> dict:
        out = {"kind": self.kind, "num_tokens": len(self), "files": self.files}
        if self.optimal_loss is not None:
            out["optimal_loss"] = self.optimal_loss
        if self.info:
            out["info"] = self.info
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f['path']}\0{f['sha256']}\0{f.get('bytes_used', 0)}\n".encode())
        out["files_sha256"] = h.hexdigest()
        return out


class Corpus:
    """An ordered ``{name: Domain}`` mapping with the tokenizer that produced it."""

    def __init__(self, domains: Iterable[Domain], tokenizer=None, source: str = ""):
        self.domains: dict[str, Domain] = {}
        for d in domains:
            if d.name in self.domains:
                raise ValueError(f"Corpus: domain name {d.name!r} appears twice")
            self.domains[d.name] = d
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.source = source

    def __getitem__(self, name: str) -> Domain:
        if name not in self.domains:
            raise KeyError(f"Corpus: no domain named {name!r}; domains: {sorted(self.domains)}")
        return self.domains[name]

    def __contains__(self, name) -> bool:
        return name in self.domains

    def __iter__(self):
        return iter(self.domains.values())

    def __len__(self) -> int:
        return len(self.domains)

    @property
    def names(self) -> list[str]:
        return list(self.domains)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def subset(self, names: Sequence[str]) -> Corpus:
        return Corpus([self[n] for n in names], self.tokenizer, self.source)

    def split_heldout(self, heldout: Sequence[str]) -> tuple[Corpus, Corpus]:
        """``(preparation, heldout)``: held-out domains are never seen in preparation."""
        heldout = list(heldout)
        missing = [n for n in heldout if n not in self.domains]
        if missing:
            raise ValueError(f"Corpus.split_heldout: argument 'heldout' names unknown domains {missing}; "
                             f"domains: {self.names}")
        prep = [n for n in self.names if n not in heldout]
        if not prep:
            raise ValueError("Corpus.split_heldout: every domain is held out; nothing is left for preparation")
        return self.subset(prep), self.subset(heldout)

    def manifest(self) -> dict:
        """JSON-ready record of the corpus: tokenizer, and per domain its files and hashes."""
        return {
            "format": "tarp-fast-corpus",
            "source": self.source,
            "tokenizer": self.tokenizer.describe(),
            "domains": {n: d.describe() for n, d in self.domains.items()},
        }

    def fingerprint(self) -> str:
        """sha256 of the manifest: equal fingerprints mean the same tokens (cache key)."""
        return hashlib.sha256(json.dumps(self.manifest(), sort_keys=True).encode()).hexdigest()

    def write_manifest(self, path: str) -> str:
        atomic_write_bytes(path, (json.dumps(self.manifest(), indent=1) + "\n").encode())
        return path


# ---- machine domains ----------------------------------------------------------------------------

def _stdlib() -> str:
    return sysconfig.get_paths()["stdlib"]


#: name -> (description, [(root, patterns, recursive)]); roots may be callables (resolved lazily).
MACHINE_DOMAINS: dict[str, tuple[str, list]] = {
    "python": ("Python standard library sources", [(_stdlib, ("*.py",), True)]),
    "c_headers": ("C headers", [("/usr/include", ("*.h",), True)]),
    "licenses": ("licence texts", [("/usr/share/common-licenses", ("*",), False)]),
    "changelogs": ("Debian package changelogs", [("/usr/share/doc", ("changelog.Debian.gz", "changelog.gz"), True)]),
    "copyright": ("Debian copyright files", [("/usr/share/doc", ("copyright",), True)]),
    "manpages": ("manual pages (troff)", [("/usr/share/man/man1", ("*.1.gz", "*.1"), False),
                                         ("/usr/share/man/man8", ("*.8.gz", "*.8"), False)]),
    "info": ("GNU info manuals", [("/usr/share/info", ("*.info.gz", "*.info"), False)]),
    "perl": ("Perl modules", [("/usr/share/perl", ("*.pm",), True), ("/usr/lib/x86_64-linux-gnu/perl-base", ("*.pm",), True)]),
    "config": ("configuration files", [("/etc", ("*.conf", "*.cfg", "*.ini"), True)]),
}


def _candidates(root: str, patterns: Sequence[str], recursive: bool, limit: int = 50000) -> list[str]:
    if not os.path.isdir(root):
        return []
    out: list[str] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            # test data and vendored trees of the stdlib are not "Python sources"
            dirnames[:] = [d for d in dirnames if d not in ("site-packages", "__pycache__", "test", "tests")]
            for fn in sorted(filenames):
                if any(fnmatch.fnmatch(fn, p) for p in patterns):
                    out.append(os.path.join(dirpath, fn))
                    if len(out) >= limit:
                        return out
    else:
        for fn in sorted(os.listdir(root)):
            full = os.path.join(root, fn)
            if os.path.isfile(full) and any(fnmatch.fnmatch(fn, p) for p in patterns):
                out.append(full)
    return out


def _read_text_file(path: str, max_file_bytes: int) -> Optional[tuple[bytes, str]]:
    """``(text bytes cut to max_file_bytes, sha256 of the file as stored)`` or None if unusable."""
    try:
        if os.path.islink(path) and not os.path.exists(path):
            return None
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    digest = hashlib.sha256(raw).hexdigest()
    data = raw
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError):
            return None
    if not data or b"\0" in data[:4096]:
        return None  # empty or binary
    return data[:max_file_bytes], digest


def _spread_order(paths: Sequence[str]) -> list[str]:
    return sorted(paths, key=lambda p: hashlib.sha1(p.encode()).hexdigest())


def _collect(paths: Sequence[str], max_bytes: int, max_file_bytes: int) -> tuple[bytes, list[dict]]:
    chunks, files, total = [], [], 0
    seen = set()
    for path in paths:
        if total >= max_bytes:
            break
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        got = _read_text_file(path, min(max_file_bytes, max_bytes - total))
        if got is None:
            continue
        data, digest = got
        chunks.append(data)
        files.append({"path": path, "sha256": digest, "bytes_used": len(data)})
        total += len(data) + len(SEPARATOR)
    return SEPARATOR.join(chunks), files


def machine_corpus(
    names: Optional[Sequence[str]] = None,
    *,
    max_bytes: int = 400_000,
    max_file_bytes: int = 16_384,
    min_bytes: int = 50_000,
    tokenizer=None,
) -> Corpus:
    """Build one domain per kind of text found on this machine (see :data:`MACHINE_DOMAINS`).

    ``names`` restricts the kinds (an unknown name is an error; a known kind with fewer than
    ``min_bytes`` of text here is an error only when it was asked for by name, else skipped).
    """
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    wanted = list(MACHINE_DOMAINS) if names is None else list(names)
    unknown = [n for n in wanted if n not in MACHINE_DOMAINS]
    if unknown:
        raise ValueError(f"machine_corpus: argument 'names' has unknown kinds {unknown}; known: {list(MACHINE_DOMAINS)}")
    if max_bytes < min_bytes:
        raise ValueError(f"machine_corpus: argument 'max_bytes' ({max_bytes}) must be >= min_bytes ({min_bytes})")
    domains = []
    for name in wanted:
        desc, sources = MACHINE_DOMAINS[name]
        paths: list[str] = []
        for root, patterns, recursive in sources:
            root = root() if callable(root) else root
            paths.extend(_candidates(root, patterns, recursive))
        data, files = _collect(_spread_order(paths), max_bytes, max_file_bytes)
        if len(data) < min_bytes:
            if names is not None:
                raise ValueError(f"machine_corpus: domain {name!r} ({desc}) has only {len(data)} bytes here "
                                 f"(< min_bytes={min_bytes})")
            continue
        domains.append(Domain(name, "machine", tokenizer.encode(data), files, info={"description": desc}))
    if not domains:
        raise RuntimeError("machine_corpus: no kind of text with enough bytes was found on this machine; "
                           "use folder_corpus/jsonl_corpus or generated domains")
    return Corpus(domains, tokenizer, source="machine")


def corpus_from_manifest(manifest: dict, *, tokenizer=None, verify: bool = True) -> Corpus:
    """Rebuild a corpus from its manifest's file lists; with ``verify`` every sha256 must match.

    Only file-based domains can be rebuilt (generated domains are rebuilt from their own seed).
    """
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    domains = []
    for name, entry in manifest.get("domains", {}).items():
        if entry.get("kind") == "generated":
            raise ValueError(f"corpus_from_manifest: domain {name!r} is generated; rebuild it with markov_corpus or "
                             "planted_corpus (its 'info' records the seed)")
        chunks = []
        for f in entry["files"]:
            got = _read_text_file(f["path"], f["bytes_used"])
            if got is None:
                raise FileNotFoundError(f"corpus_from_manifest: {f['path']} (domain {name!r}) cannot be read")
            data, digest = got
            if verify and digest != f["sha256"]:
                raise ValueError(f"corpus_from_manifest: {f['path']} changed since the manifest was written (sha256)")
            chunks.append(data)
        domains.append(Domain(name, entry.get("kind", "machine"), tokenizer.encode(SEPARATOR.join(chunks)),
                              list(entry["files"]), info=entry.get("info", {})))
    return Corpus(domains, tokenizer, source=manifest.get("source", "manifest"))


# ---- user data ----------------------------------------------------------------------------------

def folder_corpus(path: str, *, tokenizer=None, max_bytes: int = 4_000_000, max_file_bytes: int = 1 << 20,
                  min_bytes: int = 1) -> Corpus:
    """One domain per subfolder of ``path``; every readable text file below it, in sorted order."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"folder_corpus: argument 'path' must be a folder, {path!r} is not one")
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    domains = []
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        if not os.path.isdir(sub) or name.startswith("."):
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(sub):
            dirnames.sort()
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
        data, used = _collect(files, max_bytes, max_file_bytes)
        if len(data) < min_bytes:
            continue
        domains.append(Domain(name, "folder", tokenizer.encode(data), used))
    if not domains:
        raise ValueError(f"folder_corpus: {path!r} has no subfolder with text files (expected one subfolder per domain)")
    return Corpus(domains, tokenizer, source=os.path.abspath(path))


def jsonl_corpus(path: str, *, tokenizer=None, domain_key: str = "domain", text_key: str = "text") -> Corpus:
    """Domains from a JSONL file of ``{"domain": NAME, "text": TEXT}`` records (in file order)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"jsonl_corpus: argument 'path' must be a file, {path!r} is not one")
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    texts: dict[str, list[bytes]] = {}
    with open(path, "rb") as fh:
        raw = fh.read()
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"jsonl_corpus: {path}:{lineno} is not valid JSON ({exc})") from exc
        if not isinstance(rec, dict) or not isinstance(rec.get(domain_key), str) or not isinstance(rec.get(text_key), str):
            raise ValueError(f"jsonl_corpus: {path}:{lineno} must be an object with string fields "
                             f"{domain_key!r} and {text_key!r}")
        texts.setdefault(rec[domain_key], []).append(rec[text_key].encode("utf-8"))
    if not texts:
        raise ValueError(f"jsonl_corpus: {path} holds no records")
    digest = hashlib.sha256(raw).hexdigest()
    domains = [
        Domain(name, "jsonl", tokenizer.encode(SEPARATOR.join(chunks)),
               [{"path": os.path.abspath(path), "sha256": digest, "bytes_used": sum(map(len, chunks))}],
               info={"records": len(chunks)})
        for name, chunks in texts.items()
    ]
    return Corpus(domains, tokenizer, source=os.path.abspath(path))


def _generated_count(spec: str, family: str, default: int, minimum: int) -> int:
    """``N`` of a ``family[:N]`` spec (``default`` without ``:N``); a clear error otherwise."""
    if spec == family:
        return default
    text = spec[len(family) + 1:]
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < minimum:
        raise ValueError(f"load_corpus: argument 'spec' {spec!r}: '{family}:N' needs an integer number of domains "
                         f"N >= {minimum}, got {text!r}")
    return n


def load_corpus(spec: str, *, tokenizer=None, **kw) -> Corpus:
    """``"machine"``, ``"generated[:N]"`` (N independent Markov domains, default 6),
    ``"planted[:N]"`` (N domains of the planted family, default 8), a ``.jsonl`` file, a manifest
    ``.json`` or a folder of domains."""
    if spec in ("machine", "", None):
        return machine_corpus(tokenizer=tokenizer, **kw)
    if spec == "generated" or (isinstance(spec, str) and spec.startswith("generated:")):
        from .generated import markov_corpus  # noqa: PLC0415

        return markov_corpus(_generated_count(spec, "generated", 6, 1), **kw)
    if spec == "planted" or (isinstance(spec, str) and spec.startswith("planted:")):
        from .generated import planted_corpus  # noqa: PLC0415

        # at least 2: a family needs a domain to prepare on and one to hold out
        return planted_corpus(_generated_count(spec, "planted", 8, 2), **kw)
    if os.path.isfile(spec) and spec.endswith(".jsonl"):
        return jsonl_corpus(spec, tokenizer=tokenizer)
    if os.path.isfile(spec) and spec.endswith(".json"):
        with open(spec, encoding="utf-8") as fh:
            return corpus_from_manifest(json.load(fh), tokenizer=tokenizer)
    if os.path.isdir(spec):
        return folder_corpus(spec, tokenizer=tokenizer, **kw)
    raise FileNotFoundError(f"load_corpus: argument 'spec' must be 'machine', 'generated[:N]', 'planted[:N]', a "
                            f".jsonl file, a corpus manifest .json or a folder of domains; got {spec!r}")
