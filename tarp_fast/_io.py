"""Atomic file writes: a crash mid-write leaves the previous file intact, never a torn one.

Write to a temporary file in the same folder, flush and fsync it, then ``os.replace`` it over
the target (atomic on POSIX and Windows) and fsync the folder so the rename itself is durable.

A process killed mid-write cannot remove its temporary file. Temporaries are therefore named by
one fixed pattern, ``.<target name>.<8 characters of [a-z0-9_]>.tmp`` (``tempfile.mkstemp``'s
random part), so that a later writer of the same target can find and delete them
(:func:`stale_temporaries`). That is only safe with one writer per folder: a second writer's
in-flight temporary looks stale too.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable

_TEMP_SUFFIX = ".tmp"
#: the random part ``tempfile.mkstemp`` puts between prefix and suffix
_TEMP_RANDOM = r"[a-z0-9_]{8}"


def temp_name_pattern(target_regex: str) -> re.Pattern:
    """The names of this module's temporaries for targets whose name matches ``target_regex``."""
    return re.compile(r"\." + target_regex + r"\." + _TEMP_RANDOM + re.escape(_TEMP_SUFFIX))


def stale_temporaries(folder: str, target_regex: str) -> list[str]:
    """Paths of the temporaries in ``folder`` left by writes to targets matching ``target_regex``."""
    pattern = temp_name_pattern(target_regex)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(folder, n) for n in names if pattern.fullmatch(n))


def remove_quietly(path: str) -> None:
    """Delete ``path`` if it is there (a cleanup must not fail the operation it cleans up after)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def replace_durably(src: str, dst: str) -> None:
    """``os.replace(src, dst)``, then fsync the folder so that the rename survives a power cut."""
    os.replace(src, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to produce the file, then move it over ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=_TEMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        # mkstemp creates 0600; the finished file gets the mode open() would give (0666 & ~umask)
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        replace_durably(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only set it, racing threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
