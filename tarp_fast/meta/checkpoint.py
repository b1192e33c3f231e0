"""Checkpoints: safetensors for tensors, JSON for the rest, written so a crash cannot tear them.

Layout of a checkpoint folder::

    ckpt-00000120.safetensors   model parameters, optimizer tensors, torch RNG state
                                (its metadata names the format and the step)
    ckpt-00000120.json          step, sampler state, optimizer scalars, python RNG, the sha256 of
                                the tensor file, and sha256 digests of the record's own fields
    latest.json                 {"step": 120, "name": "ckpt-00000120"}: a hint, see below

Each file is written atomically (temporary file, fsync, rename); the pointer ``latest.json``
is replaced last and older checkpoints beyond ``keep`` are deleted only after it moved.
Nothing is pickled.

**Integrity.** A checkpoint loads only when every check passes: the record parses and has the
format tag; its ``step`` equals the step in the file name; the tensor file's sha256 equals the
record's ``tensors_sha256``; the tensor file's own metadata names the same step; and every
field of the record (to the depth of :data:`DIGEST_DEPTH`, e.g. ``meta.learner.step``) still
has the sha256 recorded in the field ``sha256`` when it was written. A failed check is a
``ValueError`` that names the file and the field.

**Which checkpoint.** :meth:`Checkpointer.load` finds the checkpoints by listing the folder
(``latest.json`` is only a hint: a missing or unreadable one is reported with a warning) and
loads the newest; with ``fallback=True`` (what resuming a preparation uses), when the newest is
incomplete or fails a check it warns, naming the file and what is wrong, and falls back to the
newest intact older one. When none is intact it raises a ``ValueError`` naming the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._io import atomic_write, atomic_write_bytes, sha256_file

__all__ = ["Checkpointer", "CheckpointError", "optimizer_state_to_flat", "optimizer_state_from_flat", "rng_state", "set_rng_state",
           "DIGEST_DEPTH"]

FORMAT = "tarp-fast-checkpoint"
#: Fields of a checkpoint record get their own sha256 down to this depth (``meta.learner.step``
#: is depth 3); deeper values are covered by their ancestor's digest.
DIGEST_DEPTH = 3
_NAME = re.compile(r"^ckpt-(\d{8,})\.(json|safetensors)$")
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")


def optimizer_state_to_flat(opt: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, scalars)``: an optimizer's state dict split into safetensors- and JSON-ready parts."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{idx}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def optimizer_state_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                              prefix: str = "optim") -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = t
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(cuda_devices=()) -> tuple[dict[str, torch.Tensor], dict]:
    """torch's CPU generator state (and that of each CUDA device in ``cuda_devices``, as tensors)
    and Python's ``random`` state (JSON)."""
    version, internal, gauss = random.getstate()
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    for d in cuda_devices:
        tensors[f"rng.torch_cuda.{int(d)}"] = torch.cuda.get_rng_state(int(d))
    return tensors, {"python_random": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    for key, t in tensors.items():
        if key.startswith("rng.torch_cuda."):
            d = int(key.rsplit(".", 1)[1])
            if torch.cuda.is_available() and d < torch.cuda.device_count():
                torch.cuda.set_rng_state(t, d)
    if "python_random" in meta:
        version, internal, gauss = meta["python_random"]
        random.setstate((version, tuple(internal), gauss))


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _field(prefix: str, key: str) -> str:
    key = key if _PLAIN_KEY.match(key) else json.dumps(key)
    return f"{prefix}.{key}" if prefix else key


def _digests(record: dict, depth: int = DIGEST_DEPTH) -> dict[str, str]:
    """``{field path: sha256 of its canonical JSON}`` for every field of ``record`` to ``depth``."""
    out: dict[str, str] = {}

    def walk(node: dict, prefix: str, level: int) -> None:
        for k, v in node.items():
            path = _field(prefix, str(k))
            out[path] = hashlib.sha256(_canonical(v)).hexdigest()
            if isinstance(v, dict) and level < depth:
                walk(v, path, level + 1)

    walk({k: v for k, v in record.items() if k != "sha256"}, "", 1)
    return out


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or fails an integrity check (names the file and the field)."""


class Checkpointer:
    """Save and load checkpoints in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str, keep: int = 2):
        if keep < 1:
            raise ValueError(f"Checkpointer: argument 'keep' must be >= 1, got {keep}")
        self.directory = directory
        self.keep = int(keep)
        #: the name of the checkpoint the last :meth:`load` returned
        self.loaded: Optional[str] = None

    @staticmethod
    def _name(step: int) -> str:
        return f"ckpt-{step:08d}"

    def _paths(self, step: int) -> tuple[str, str]:
        name = self._name(step)
        return os.path.join(self.directory, name + ".json"), os.path.join(self.directory, name + ".safetensors")

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> str:
        """Write checkpoint ``step``; return its name. ``meta`` must be JSON-serializable.

        Afterwards checkpoints newer than ``step`` (left by a run that fell back past them or
        started over) are deleted, and of the older ones the newest ``keep - 1`` are kept.
        """
        os.makedirs(self.directory, exist_ok=True)
        for k, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Checkpointer.save: tensor {k!r} is a {type(t).__name__}, not a tensor")
        name = self._name(step)
        jpath, tpath = self._paths(step)
        clean = {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}
        atomic_write(tpath, lambda tmp: save_file(clean, tmp, metadata={"format": FORMAT, "step": str(int(step))}))
        # JSON round trip first: the digests are of what a reader will see (tuples -> lists, int keys -> str)
        record = json.loads(json.dumps({"format": FORMAT, "step": int(step), "meta": meta,
                                        "tensors_sha256": sha256_file(tpath)}))
        record["sha256"] = _digests(record)
        atomic_write_bytes(jpath, (json.dumps(record) + "\n").encode())
        atomic_write_bytes(os.path.join(self.directory, "latest.json"),
                           (json.dumps({"step": int(step), "name": name}) + "\n").encode())
        self._prune(step)
        return name

    def _prune(self, current: int) -> None:
        steps = sorted(self._listed())
        older = [s for s in steps if s < current]
        drop = [s for s in steps if s > current] + older[:max(0, len(older) - (self.keep - 1))]
        for s in drop:
            for path in self._paths(s):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def _listed(self) -> set[int]:
        """Steps with a checkpoint file (``.json`` or ``.safetensors``, complete or not) in the folder."""
        if not os.path.isdir(self.directory):
            return set()
        out = set()
        for fn in os.listdir(self.directory):
            m = _NAME.match(fn)
            if m:
                out.add(int(m.group(1)))
        return out

    def steps(self) -> list[int]:
        """Steps that have a checkpoint record (``.json``) in the folder (not verified)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(s for s in self._listed() if os.path.isfile(self._paths(s)[0]))

    def exists(self) -> bool:
        """Whether the folder holds any checkpoint file or ``latest.json`` (intact or not)."""
        return bool(self._listed()) or os.path.isfile(os.path.join(self.directory, "latest.json"))

    def _hint(self) -> tuple[Optional[int], Optional[str]]:
        """``(step latest.json names, None)``, ``(None, None)`` without one, ``(None, problem)`` when unreadable."""
        path = os.path.join(self.directory, "latest.json")
        if not os.path.isfile(path):
            return None, None
        try:
            with open(path, encoding="utf-8") as fh:
                rec = json.load(fh)
            return int(rec["step"]), None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            what = f"no field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            return None, f"{path} is not a valid checkpoint pointer ({what})"

    def latest_step(self) -> Optional[int]:
        """The step ``latest.json`` names (``None`` without one); ``ValueError`` naming the file when unreadable.

        Only a hint: :meth:`load` finds the checkpoints by listing the folder.
        """
        step, problem = self._hint()
        if problem:
            raise CheckpointError(f"Checkpointer.latest_step: {problem}")
        return step

    def _load_one(self, step: int) -> tuple[int, dict[str, torch.Tensor], dict]:
        jpath, tpath = self._paths(step)
        for path, other in ((jpath, tpath), (tpath, jpath)):
            if not os.path.isfile(path):
                raise CheckpointError(f"{path} is missing: checkpoint {self._name(step)} is incomplete "
                                      f"(only {os.path.basename(other)} exists)")
        try:
            with open(jpath, encoding="utf-8") as fh:
                record = json.load(fh)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{jpath} is not valid JSON ({exc})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            got = record.get("format") if isinstance(record, dict) else type(record).__name__
            raise CheckpointError(f"{jpath}: field 'format' is {got!r}, not {FORMAT!r}: not a tarp-fast checkpoint")
        if record.get("step") != step:
            raise CheckpointError(f"{jpath}: field 'step' is {record.get('step')!r} but the file name says {step}")
        stored = record.get("sha256")
        if not isinstance(stored, dict):
            raise CheckpointError(f"{jpath}: field 'sha256' (the digests of the record's fields) is missing: the file "
                                  "was edited or written by an older tarp-fast, its integrity cannot be checked")
        now = _digests(record)
        bad = sorted(p for p in set(stored) | set(now) if stored.get(p) != now.get(p))
        if bad:
            # name the innermost changed fields (a changed field also changes each enclosing one)
            leaves = [p for p in bad if not any(q != p and q.startswith(p + ".") for q in bad)]
            what = ", ".join(f"{p!r}" + (" was added" if p not in stored else " is missing" if p not in now else "")
                             for p in leaves)
            raise CheckpointError(f"{jpath}: field {what} does not match the sha256 recorded in field 'sha256' when the "
                                  "checkpoint was written: the file was edited or damaged")
        if record.get("tensors_sha256") != sha256_file(tpath):
            raise CheckpointError(f"{tpath} does not match the sha256 in field 'tensors_sha256' of {jpath}: "
                                  "the tensor file was changed or damaged")
        tensors = {}
        with safe_open(tpath, framework="pt") as fh:
            tmeta = fh.metadata() or {}
            if tmeta.get("step") != str(step):
                raise CheckpointError(f"{tpath}: its metadata field 'step' is {tmeta.get('step')!r} but {jpath} "
                                      f"is step {step}")
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
        return step, tensors, record["meta"]

    def load(self, step: Optional[int] = None, *, fallback: bool = False) -> tuple[int, dict[str, torch.Tensor], dict]:
        """``(step, tensors, meta)`` of checkpoint ``step``, or by default of the newest one in the folder.

        A missing checkpoint is a ``FileNotFoundError``, a damaged or incomplete one a
        ``ValueError`` naming the file and the field. Without ``step`` the folder is listed
        (``latest.json`` is a hint; an unreadable one is a warning naming it) and the newest
        checkpoint loaded. With ``fallback`` (what resuming uses) a damaged or incomplete newest
        checkpoint is skipped with a warning naming the file and the problem, and the newest
        intact older one loaded; ``ValueError`` naming the folder when none is intact.
        """
        if step is not None:
            jpath, tpath = self._paths(step)
            if not (os.path.isfile(jpath) or os.path.isfile(tpath)):
                raise FileNotFoundError(f"Checkpointer.load: no checkpoint {self._name(step)} in {self.directory}")
            try:
                out = self._load_one(int(step))
            except CheckpointError as exc:
                raise CheckpointError(f"Checkpointer.load: {exc}") from None
            self.loaded = self._name(step)
            return out
        hint, problem = self._hint()
        problems = [problem] if problem else []
        if problem:
            warnings.warn(f"Checkpointer.load: ignoring {problem}; finding the checkpoints by listing the folder",
                          RuntimeWarning, stacklevel=2)
        listed = sorted(self._listed(), reverse=True)
        if hint is not None and hint not in listed:
            problems.append(f"latest.json names {self._name(hint)}, which is not in the folder")
            warnings.warn(f"Checkpointer.load: {os.path.join(self.directory, 'latest.json')} names "
                          f"{self._name(hint)}, which is not in the folder; using the folder listing",
                          RuntimeWarning, stacklevel=2)
        if not listed:
            if hint is not None or problems:
                raise CheckpointError(f"Checkpointer.load: no intact checkpoint in {self.directory}: "
                                      f"{'; '.join(problems)}; no checkpoint files")
            raise FileNotFoundError(f"Checkpointer.load: no checkpoint in {self.directory}")
        for s in listed:
            try:
                out = self._load_one(s)
            except CheckpointError as exc:
                if not fallback:
                    raise CheckpointError(f"Checkpointer.load: {exc}") from None
                problems.append(str(exc))
                older = [o for o in listed if o < s]
                then = f"trying the older {self._name(older[0])}" if older else "no older checkpoint"
                warnings.warn(f"Checkpointer.load: skipping checkpoint {self._name(s)}: {exc}; {then}",
                              RuntimeWarning, stacklevel=2)
                continue
            self.loaded = self._name(s)
            return out
        raise CheckpointError(f"Checkpointer.load: no intact checkpoint in {self.directory}: " + "; ".join(problems))
