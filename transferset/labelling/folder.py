"""The output folder of a label run: created, locked, cleared of a killed run's debris, checked for resume.

One label run at a time holds a folder (an ``flock`` on ``.lock`` that the kernel releases when the holder
dies, so a killed run never leaves it stuck). A folder with a manifest made by the same definition is resumed
after its last listed shard; one made by another definition is refused unless ``overwrite``.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import FAILED, TransferSetError
from ..format.card import CARD_NAME
from ..format.manifest import read_manifest
from ..format.schema import MANIFEST_NAME, Manifest
from ..format.shards import TMP_PREFIX

__all__ = ["OutputFolder"]

_MANIFEST_TMP = f".{MANIFEST_NAME}.tmp"  # the prefix _io.atomic_write gives the manifest's temporary file


def _is_shard(name: str) -> bool:
    return name.startswith("shard-") and name.endswith(".h5")


def _is_temporary(name: str) -> bool:
    # the card's atomic write leaves .README.md.tmp-PID when killed, as the manifest's does
    return name.startswith(TMP_PREFIX) or name.startswith(_MANIFEST_TMP) or name.startswith(f".{CARD_NAME}.tmp-")


class OutputFolder:
    """A transfer-set folder held for one label run; use as a context manager (it holds the lock inside).

    Args:
        path: the folder (created if missing).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.had_lock = False  # a label run has held this folder before (it leaves its .lock)

    # -- the lock ------------------------------------------------------------------------------------------
    def __enter__(self) -> "OutputFolder":
        out = self.path
        if out.exists() and not out.is_dir():
            raise TransferSetError(f"{out}: exists and is not a folder", option="out")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TransferSetError(f"{out}: cannot create the folder ({e.strerror or e})", option="out") from None
        lock = out / ".lock"
        self.had_lock = lock.exists()
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TransferSetError(f"{out}: cannot write there ({e.strerror or e}); choose a writable folder or fix "
                                   "its permissions", FAILED, option="out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TransferSetError(f"{out}: another `transferset label` is writing this folder; wait for it or "
                                   "choose another folder", option="out") from None
        self._fd = fd
        try:  # the holder's pid, for people; the kernel's flock is what excludes
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    # -- what the folder holds -------------------------------------------------------------------------------
    def _own_files(self) -> list[Path]:
        return [p for p in self.path.iterdir()
                if p.name in (MANIFEST_NAME, CARD_NAME) or _is_temporary(p.name) or _is_shard(p.name)]

    def existing(self, definition_sha256: str, overwrite: bool) -> Manifest | None:
        """The manifest to resume (same definition), or None to start afresh; the folder is made ready.

        A folder holding another definition is refused (unless ``overwrite``), as is a non-empty folder that
        holds no transfer set. Temporary files and shards the manifest never listed (a killed run's debris)
        are removed.
        """
        out = self.path
        manifest = None
        if (out / MANIFEST_NAME).exists() and not overwrite:
            manifest = read_manifest(out)
            if manifest.definition_sha256 != definition_sha256:
                raise TransferSetError(
                    f"{out}: holds a transfer set made with another ensemble, source or options; choose another "
                    "folder, or start over with overwrite", option="out")
        if manifest is None:
            self._start_afresh(overwrite)
        if manifest is None or not manifest.complete:  # a complete set is left exactly as it is
            self._remove_debris({s.path for s in manifest.shards} if manifest else set())
        else:  # but for a temporary file of a run killed while it rewrote the card
            for p in [p for p in out.iterdir() if _is_temporary(p.name)]:
                p.unlink()
        return manifest

    def _start_afresh(self, overwrite: bool) -> None:
        out = self.path
        if overwrite or (self.had_lock and not (out / MANIFEST_NAME).exists()):
            # overwrite, or the debris of a label run killed before its first manifest (it left its .lock):
            # temporary files and shards it renamed but never listed
            for p in self._own_files():
                p.unlink()
        own = self._own_files()
        others = [p.name for p in out.iterdir() if p.name != ".lock" and p not in own]
        if own or (others and not overwrite and any(not n.startswith(".") for n in others)):
            raise TransferSetError(f"{out}: the folder is not empty and holds no transfer set; choose an empty folder",
                                   option="out")

    def _remove_debris(self, listed: set[str]) -> None:
        for p in self.path.iterdir():  # temporary files, and shards the manifest never listed
            if _is_temporary(p.name) or (_is_shard(p.name) and p.name not in listed):
                p.unlink()
