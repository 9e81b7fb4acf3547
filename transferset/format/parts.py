"""A set labelled in parts: each part's manifest, what is missing, and the merge into the one manifest.json.

Part ``I`` of ``N`` writes shard ``k`` when ``k % N == I - 1`` (interleaved; see docs/FORMAT.md) under its final
name, and lists the shards it finished in ``manifest.part-I-of-N.json``: a full manifest whose ``shards`` are its
own, whose ``complete`` says the part is done, with ``"part": {"index": I, "count": N}`` added. The merge checks
that every part used one definition and that their shards tile the rows exactly once, then writes manifest.json
through :meth:`~.schema.Manifest.list_shards`, as a single run does, so the merged set is the same bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .._io import lock_file, unlock_file
from ..errors import FAILED, TransferSetError
from .card import CARD_NAME, write_card
from .manifest import part_manifest_name, part_manifest_names, read_manifest_file, write_manifest
from .schema import MANIFEST_NAME, Manifest, ShardEntry
from .shards import shard_name

__all__ = ["MERGE_LOCK", "PartsState", "read_manifest", "load_manifest", "parts_state", "unmerged_parts", "merge_parts", "merge_if_complete", "part_lock_name",
           "remove_part_manifests"]

MERGE_LOCK = ".lock-merge"  #: held for the few milliseconds a merge takes, so two last parts merge once


def part_lock_name(index: int, count: int) -> str:
    """The lock file one run of part ``index`` of ``count`` holds while it writes."""
    return f".lock-part-{index}-of-{count}"


def _num_shards(m: Manifest, where: str) -> int:
    if not isinstance(m.expected_rows, int) or not isinstance(m.shard_size, int):
        raise TransferSetError(f"{where}: a part's manifest needs expected_rows and shard_size; relabel that part")
    return -(-m.expected_rows // m.shard_size)


@dataclass
class PartsState:
    """The parts found in a folder: ``manifests`` by part index, ``needed`` the parts that own at least one shard."""

    root: Path
    count: int
    manifests: dict[int, Manifest]
    num_shards: int

    @property
    def needed(self) -> list[int]:
        return list(range(1, min(self.count, self.num_shards) + 1))

    @property
    def missing(self) -> list[int]:
        """Needed parts with no manifest yet (never started, or killed before their first shard)."""
        return [i for i in self.needed if i not in self.manifests]

    @property
    def unfinished(self) -> list[int]:
        return [i for i in self.needed if i in self.manifests and not self.manifests[i].complete]

    @property
    def shards(self) -> list[ShardEntry]:
        return [s for m in self.manifests.values() for s in m.shards]

    def describe(self) -> str:
        """One line: which parts are missing or unfinished, or that all are done."""
        out = []
        for word, parts in (("missing", self.missing), ("unfinished", self.unfinished)):
            if parts:
                plural = "s" if len(parts) > 1 else ""
                out.append(f"part{plural} {', '.join(map(str, parts))} of {self.count} {word}")
        listed = len(self.shards)
        state = " and ".join(out) if out else f"all {self.count} parts done, not merged yet"
        return f"{state} ({listed} of {self.num_shards} shards written)"

    def summary(self) -> dict:
        """What ``info`` prints for an unmerged set."""
        return {"complete": False, "parts": self.count, "parts_missing": self.missing,
                "parts_unfinished": self.unfinished, "shards": len(self.shards), "expected_shards": self.num_shards,
                "rows": sum(s.rows for s in self.shards), "status": self.describe()}


def parts_state(root: str | os.PathLike) -> PartsState | None:
    """The parts of ``root``; refuse parts of different counts or sets. None when it holds no part manifest, or
    when the set was merged as they were read (a merge writes manifest.json, then removes the parts' manifests:
    manifest.json there after the reads means they were, or are being, merged)."""
    root = Path(root)
    names = part_manifest_names(root)
    if not names:
        return None
    counts = sorted({n for _, n in names})
    if len(counts) > 1:
        raise TransferSetError(f"{root}: holds parts of {' and of '.join(map(str, counts))}; a set is split one way: "
                               "remove the parts of the split you abandoned")
    try:
        manifests = {i: read_manifest_file(root, name) for (i, _), name in sorted(names.items())}
    except TransferSetError:
        if (root / MANIFEST_NAME).exists():  # merged as they were read: the merge removed them
            return None
        raise
    if (root / MANIFEST_NAME).exists():  # merged since they were listed: some may be gone, the rest going
        return None
    first_i, first = next(iter(manifests.items()))
    for i, m in manifests.items():
        if m.definition_sha256 != first.definition_sha256 or m.definition_sha256 is None:
            raise TransferSetError(
                f"{root}: {names[(i, counts[0])]} was made with another ensemble, source or options than "
                f"{names[(first_i, counts[0])]} (definition {str(m.definition_sha256)[:12]} vs "
                f"{str(first.definition_sha256)[:12]}); relabel that part with the same command")
    return PartsState(root, counts[0], manifests, _num_shards(first, names[(first_i, counts[0])]))


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read and check ``root/manifest.json``; raise TransferSetError naming what is wrong.

    A folder labelled in parts that are not all merged yet has no manifest.json: it is refused in one line
    naming the parts still missing or unfinished.
    """
    root = Path(root)
    mpath = root / MANIFEST_NAME
    try:
        is_dir = root.is_dir()
    except (OSError, ValueError):
        is_dir = False
    if not is_dir:
        raise TransferSetError(f"{root}: not a folder; give the transfer-set folder made by `transferset label`")
    if not os.path.lexists(mpath):
        state = parts_state(root)
        if state is not None:
            raise TransferSetError(f"{root}: labelled in parts and not complete: {state.describe()}; label the "
                                   "missing parts (the last one to finish merges them) and read it then")
        if not os.path.lexists(mpath):  # else merged since the first look: it removed the parts' manifests
            raise TransferSetError(f"{mpath}: no manifest; is {root} a transfer set made by `transferset label`?")
    return read_manifest_file(root, MANIFEST_NAME)


def load_manifest(root: str | os.PathLike) -> dict:
    """:func:`read_manifest` as plain JSON data (for code that indexes the manifest as a dict)."""
    return read_manifest(root).to_json()


def unmerged_parts(root: str | os.PathLike) -> PartsState | None:
    """The parts of a set labelled in parts and not merged yet (no manifest.json); None for any other folder."""
    root = Path(root)
    if (root / MANIFEST_NAME).exists() or not root.is_dir():
        return None
    return parts_state(root)


def _tiling(state: PartsState) -> list[ShardEntry]:
    """Every shard once, each written by the part that owns it, covering rows ``[0, expected_rows)``."""
    first = next(iter(state.manifests.values()))
    size, total = first.shard_size, first.expected_rows
    entries: dict[int, ShardEntry] = {}
    for i, m in state.manifests.items():
        for s in m.shards:
            k = (s.row_start or 0) // size
            want_rows = min((k + 1) * size, total) - k * size
            if s.path != shard_name(k) or s.row_start != k * size or s.rows != want_rows or k % state.count != i - 1:
                raise TransferSetError(f"{state.root}: {part_manifest_name(i, state.count)} lists {s.path} at row "
                                       f"{s.row_start} with {s.rows} rows, which is not a shard of part {i} of "
                                       f"{state.count}; relabel that part", FAILED)
            if k in entries:
                raise TransferSetError(f"{state.root}: {s.path} is listed by two parts", FAILED)
            entries[k] = s
    absent = [shard_name(k) for k in range(state.num_shards) if k not in entries]
    if absent:
        raise TransferSetError(f"{state.root}: the parts are done but {', '.join(absent[:5])} are not listed", FAILED)
    for s in entries.values():  # cheap: the file is there with its listed size (verify re-hashes)
        p = state.root / s.path
        if not p.is_file() or (s.bytes is not None and p.stat().st_size != s.bytes):
            raise TransferSetError(f"{p}: missing or not the size its part listed; relabel its part", FAILED)
    return [entries[k] for k in range(state.num_shards)]


def _merged(state: PartsState) -> Manifest:
    """The one manifest of a set whose parts are all done, built as a single run builds its own."""
    pending = state.missing + state.unfinished
    if pending:
        raise TransferSetError(f"{state.root}: cannot merge yet: {state.describe()}; label the missing parts first")
    entries = _tiling(state)
    m = state.manifests[min(state.manifests)]  # the lowest part's description (file paths as it was given them)
    m.extra.pop("part", None)
    m.list_shards(entries, complete=True)
    return m


def remove_part_manifests(root: str | os.PathLike) -> None:
    """Remove the parts' manifests once manifest.json lists every shard (it holds all they held), and the
    temporary files of a merge killed while writing (only a merge, under its lock, writes the set's files)."""
    for name in part_manifest_names(root).values():
        Path(root, name).unlink(missing_ok=True)
    for p in Path(root).iterdir():
        if p.name.startswith((f".{MANIFEST_NAME}.tmp", f".{CARD_NAME}.tmp")):
            p.unlink(missing_ok=True)


def _merge_locked(root: Path, required: bool, wrote: list | None) -> Manifest | None:
    if (root / MANIFEST_NAME).exists():  # merged already (perhaps killed before removing the parts' manifests)
        done = read_manifest(root)
        if done.complete:  # a merge killed after manifest.json: the card and the clean-up may be missing
            write_card(root, done, keep_if_same=True)
            remove_part_manifests(root)
            return done
        raise TransferSetError(f"{root}: holds a set being labelled by one process, not in parts; finish it with "
                               "the same label command, without a part")
    state = parts_state(root)
    if state is None:
        if required:
            raise TransferSetError(f"{root}: holds no part manifests to merge")
        return None
    if not required and (state.missing or state.unfinished):
        return None
    m = _merged(state)
    write_manifest(root, m)
    if wrote is not None:
        wrote.append(True)
    write_card(root, m)
    remove_part_manifests(root)
    return m


def _parts_missing(root: Path) -> bool:
    """Whether a part manifest is certainly missing, from the folder's names alone (no manifest read): one
    split, fewer manifests than parts, and no merged manifest. A claiming worker asks after every shard, so
    reading every part's manifest each time would make a set of S shards read S^2 / 2 manifests."""
    names = part_manifest_names(root)
    counts = {n for _, n in names}
    return len(counts) == 1 and len(names) < next(iter(counts)) and not (root / MANIFEST_NAME).exists()


def merge_if_complete(root: str | os.PathLike, required: bool = False, wrote: list | None = None) -> Manifest | None:
    """Under the merge lock: write manifest.json when every part is done, and return it; else None.

    With ``required`` (``transferset merge``), a set whose parts are not all done is refused, naming them.
    A set merged before is returned as it is; ``wrote``, when given, gets ``True`` appended only when this call
    wrote manifest.json (of two parts finishing together, one merges and the other finds it merged).
    """
    root = Path(root)
    if not root.is_dir():
        raise TransferSetError(f"{root}: not a folder; give the transfer-set folder the parts were labelled into")
    if not required and _parts_missing(root):
        return None  # looked at again, under the lock and with every manifest read, once the last part is there
    try:
        fd = lock_file(root / MERGE_LOCK, wait=True)
    except OSError as e:
        raise TransferSetError(f"{root}: cannot take the merge lock ({e.strerror or e})", FAILED) from None
    try:
        return _merge_locked(root, required, wrote)
    finally:
        unlock_file(fd)


def merge_or_wait(root: str | os.PathLike, wrote: list, describe: bool = True) -> tuple[Manifest | None, str | None]:
    """A finished part's last step: ``(the merged manifest, None)`` when every part is done (merged here, or by
    another part), else ``(None, what it waits for)`` (None without ``describe``: a claiming worker does not ask).

    Describing reads the parts' manifests. A part finishing meanwhile may merge the set and remove them as they are
    read: that set is returned then, as found merged (this part did succeed).
    """
    merged = merge_if_complete(root, wrote=wrote)
    if merged is not None or not describe:
        return merged, None
    state = parts_state(root)
    if state is None:  # merged since the look above
        return merge_if_complete(root), None
    return None, state.describe()


def merge_parts(root: str | os.PathLike) -> Manifest:
    """``transferset merge``: the set's manifest.json from its parts' manifests (see :func:`merge_if_complete`)."""
    return merge_if_complete(root, required=True)
