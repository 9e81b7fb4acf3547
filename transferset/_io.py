"""Atomic writes and hashing: the one temp-file-fsync-rename every file the package writes goes through."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from .errors import FAILED, TransferSetError

__all__ = ["sha256_file", "fsync_file", "atomic_write", "atomic_write_bytes", "atomic_write_json", "append_line",
           "fsync_dir", "lock_file", "unlock_file"]

_HASH_BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks into one buffer (a fresh 4 MiB ``bytes`` a block cost a
    tenth of the hash: 0.036 against 0.033 s for a 64 MB shard in the page cache)."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file written through another handle (h5py, ``write_text``): its bytes are on disk when this returns."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so a rename inside it survives a power cut (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _failed(path: Path, e: OSError) -> TransferSetError:
    return TransferSetError(f"cannot write {path}: {e.strerror or e}; what it held before stays valid; free space "
                            "or fix permissions, then run the same command to resume", FAILED)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary sibling, fsync it, and rename it over ``path``.

    Readers see the old file or the new one, never half of one; a crash leaves at most a hidden
    ``.NAME.tmp-PID`` that the next writer replaces.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _failed(path, e) from None
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON atomically; NaN and infinities are refused, never written."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync, so a line a reader has seen is on disk (metrics logs)."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _failed(path, e) from None


def lock_file(path: str | os.PathLike, wait: bool = False) -> int | None:
    """Hold an exclusive ``flock`` on ``path`` (created if missing): its descriptor, or None when another holds it.

    The kernel releases the lock when the holder dies, so a killed process never leaves it stuck. With ``wait``
    the call blocks until the lock is free. OSError (no permission, read-only folder) reaches the caller.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        if wait:
            raise
        return None
    try:  # the holder's pid, for people (and the crash test); the kernel's flock is what excludes
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError:
        pass
    return fd


def unlock_file(fd: int) -> None:
    """Release a lock :func:`lock_file` took."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
