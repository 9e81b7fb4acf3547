"""The output folder of a label run: created, locked, cleared of a killed run's debris, checked for resume.

One label run at a time holds a folder (an ``flock`` on ``.lock`` that the kernel releases when the holder
dies, so a killed run never leaves it stuck), or, labelling in parts, one run per part (``.lock-part-I-of-N``).
A folder with a manifest made by the same definition is resumed after its listed shards; one made by another
definition is refused unless ``overwrite``. A part resumes from its own manifest and touches only its own files.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from .._io import lock_file, unlock_file
from ..errors import FAILED, TransferSetError
from ..format.card import CARD_NAME
from ..format.manifest import part_manifest_name, part_manifest_names, read_manifest_file
from ..format.parts import read_manifest
from ..format.parts import parts_state
from ..format.schema import MANIFEST_NAME, Manifest
from ..format.shards import TMP_PREFIX

__all__ = ["OutputFolder"]

_MANIFEST_TMP = f".{MANIFEST_NAME}.tmp"  # the prefix _io.atomic_write gives the manifest's temporary file
_PART_MANIFEST = re.compile(r"^manifest\.part-[0-9]+-of-[0-9]+\.json$")


def _is_shard(name: str) -> bool:
    return name.startswith("shard-") and name.endswith(".h5")


def _is_temporary(name: str) -> bool:
    # the card's atomic write leaves .README.md.tmp-PID when killed, as the manifest's does
    return name.startswith(TMP_PREFIX) or name.startswith(_MANIFEST_TMP) or name.startswith(f".{CARD_NAME}.tmp-")


def _definition(out: Path, name: str) -> str | None:
    """The definition of another part's manifest ``out/name``, read and checked once per version of the file (a
    claiming worker asks for the first part's at every shard it takes; a manifest is rewritten by a rename, so a
    new version is a new inode, and an edit in place moves its change time)."""
    try:
        st = os.lstat(out / name)
    except OSError:
        return read_manifest_file(out, name).definition_sha256  # says why in its own words
    return _definition_of(out, name, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


@functools.lru_cache(maxsize=64)
def _definition_of(out: Path, name: str, version: tuple) -> str | None:
    """``version`` (the file's identity) is only the key of the cache: a new version is read again."""
    return read_manifest_file(out, name).definition_sha256


class OutputFolder:
    """A transfer-set folder held for one label run; use as a context manager (it holds the lock inside).

    Args:
        path: the folder (created if missing).
    """

    def __init__(self, path: str | os.PathLike, lock_name: str = ".lock") -> None:
        self.path = Path(path)
        self.lock_name = lock_name
        self._fd: int | None = None
        self.had_lock = False  # a label run has held this folder before (it leaves its lock file)

    # -- the lock ------------------------------------------------------------------------------------------
    def __enter__(self) -> "OutputFolder":
        out = self.path
        if out.exists() and not out.is_dir():
            raise TransferSetError(f"{out}: exists and is not a folder", option="out")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TransferSetError(f"{out}: cannot create the folder ({e.strerror or e})", option="out") from None
        lock = out / self.lock_name
        self.had_lock = lock.exists()
        try:
            self._fd = lock_file(lock)
        except OSError as e:
            raise TransferSetError(f"{out}: cannot write there ({e.strerror or e}); choose a writable folder or fix "
                                   "its permissions", FAILED, option="out") from None
        if self._fd is None:
            what = "this part of " if self.lock_name != ".lock" else ""
            raise TransferSetError(f"{out}: another `transferset label` is writing {what}this folder; wait for it or "
                                   "choose another folder", option="out")
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            unlock_file(fd)

    # -- what the folder holds -------------------------------------------------------------------------------
    def _own_files(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name in (MANIFEST_NAME, CARD_NAME) or _is_temporary(p.name)
                or _is_shard(p.name) or _PART_MANIFEST.match(p.name)]

    def _merged(self, definition_sha256: str) -> Manifest | None:
        """The set's manifest.json when it exists (refused when made by another definition), else None."""
        if not (self.path / MANIFEST_NAME).exists():
            return None
        manifest = read_manifest(self.path)
        if manifest.definition_sha256 != definition_sha256:
            raise TransferSetError(f"{self.path}: holds a transfer set made with another ensemble, source or options; "
                                   "choose another folder, or start over with overwrite", option="out")
        return manifest

    def existing_part(self, definition_sha256: str, part: tuple[int, int], owned: list[str]) -> tuple[Manifest | None, Manifest | None]:
        """``(this part's manifest to resume or None, the merged manifest when the set is complete or None)``.

        The folder is shared with the other parts: only this part's debris (temporary files of the shards it
        owns, and those shards when its manifest does not list them) is removed; nothing of theirs is touched.
        """
        out, (index, count) = self.path, part
        merged = self._merged(definition_sha256)
        if merged is not None:
            if merged.complete:
                return None, merged
            raise TransferSetError(f"{out}: holds a set being labelled by one process, not in parts; finish it with "
                                   "the same command without a part, or choose another folder", option="out")
        names = part_manifest_names(out)
        if len({n for _, n in names}) > 1:
            parts_state(out)  # refuses a folder split two ways, naming both
        other = next(iter({n for _, n in names}), count)
        if other != count:
            raise TransferSetError(f"{out}: is being labelled in {other} parts, not {count}; give the same "
                                   "count, or choose another folder", option="part")
        # the first part's manifest and this part's own: not every part's (a claiming worker asks for each shard
        # it takes; the merge checks every manifest's definition once all are there)
        try:
            own = read_manifest_file(out, names[(index, count)]) if (index, count) in names else None
            first = (own.definition_sha256 if min(names) == (index, count) else _definition(out, names[min(names)])) \
                if names else None
        except TransferSetError:
            if all((out / name).exists() for name in names.values()):
                raise
            return self.existing_part(definition_sha256, part, owned)  # a merge removed them as they were read
        if first is not None and first != definition_sha256:
            raise TransferSetError(f"{out}: its parts were made with another ensemble, source or options; label "
                                   "them with the same command, or choose another folder", option="out")
        foreign = [p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in (CARD_NAME,
                   MANIFEST_NAME) and not _is_shard(p.name) and not _PART_MANIFEST.match(p.name)]
        if foreign:
            raise TransferSetError(f"{out}: the folder holds other files ({foreign[0]}); choose an empty folder",
                                   option="out")
        if (out / MANIFEST_NAME).exists():  # another part merged the set since the first look (it writes
            return self.existing_part(definition_sha256, part, owned)  # manifest.json, then removes the parts')
        listed = {s.path for s in own.shards} if own is not None else set()
        tmp_manifest = f".{part_manifest_name(index, count)}.tmp"
        for name in owned:
            for p in (out / f"{TMP_PREFIX}{name}", out / name):
                if p.exists() and p.name not in listed:
                    p.unlink()
        for p in out.iterdir():
            if p.name.startswith(tmp_manifest):
                p.unlink()
        return own, None

    def existing(self, definition_sha256: str, overwrite: bool) -> Manifest | None:
        """The manifest to resume (same definition), or None to start afresh; the folder is made ready.

        A folder holding another definition is refused (unless ``overwrite``), as is a non-empty folder that
        holds no transfer set. Temporary files and shards the manifest never listed (a killed run's debris)
        are removed.
        """
        out = self.path
        manifest = None
        if not overwrite and not (out / MANIFEST_NAME).exists() and part_manifest_names(out):
            raise TransferSetError(f"{out}: is being labelled in parts ({parts_state(out).describe()}); label the "
                                   "remaining parts, or choose another folder", option="out")
        if not overwrite:
            manifest = self._merged(definition_sha256)
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
