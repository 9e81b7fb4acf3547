"""Reading a transfer set's manifest from its folder, and resolving the shard paths it lists.

The manifest's content and checks live in :mod:`transferset.format.schema`; this module adds the folder: where
the manifest is, how it is read, and that every path it names stays inside the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from .._io import atomic_write_json, sha256_file
from ..errors import TransferSetError
from .safety import MAX_JSON_DEPTH, MAX_JSON_VALUES, MAX_MANIFEST_BYTES, regular_file_inside
from .schema import MANIFEST_NAME, Manifest

__all__ = ["MANIFEST_NAME", "read_manifest_file", "write_manifest", "shard_path",
           "manifest_hash", "sha256_file", "atomic_write_json", "part_manifest_name", "part_manifest_names",
           "write_part_manifest"]


def manifest_hash(manifest: Manifest | dict) -> str:
    """A short, stable hash of a manifest's content (ties reader state and run folders to one transfer set)."""
    obj = manifest.to_json() if isinstance(manifest, Manifest) else manifest
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def shard_path(root: str | os.PathLike, rel: str) -> Path:
    """Resolve a shard's manifest path inside ``root``; refuse paths that would leave the folder."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel or "\x00" in rel or len(rel) > 4096:
        raise TransferSetError(f"{Path(root) / MANIFEST_NAME}: shard path {str(rel)[:200]!r} must be a relative path "
                               "inside the folder")
    try:
        root_r = Path(root).resolve()
        p = (root_r / rel).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, say
        raise TransferSetError(f"{Path(root) / MANIFEST_NAME}: shard path {rel!r} cannot be resolved ({e})") from None
    if p != root_r and root_r not in p.parents:
        raise TransferSetError(f"{Path(root) / MANIFEST_NAME}: shard path {rel!r} leaves the transfer-set folder; refusing it")
    return p


def read_manifest_file(root: str | os.PathLike, name: str) -> Manifest:
    """Read and check the manifest ``root/name`` (``manifest.json`` or a part's manifest), bounded and safe."""
    root = Path(root)
    mpath = root / name
    p = regular_file_inside(root, name, "manifest")
    size = p.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise TransferSetError(f"{mpath}: {size} bytes, more than the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may "
                               "take; refusing it")
    try:
        with open(p, "rb") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8")
        depth, values = _nesting(text)
        if depth > MAX_JSON_DEPTH:
            raise TransferSetError(f"{mpath}: JSON nested deeper than {MAX_JSON_DEPTH} levels; refusing it")
        if values > MAX_JSON_VALUES:
            raise TransferSetError(f"{mpath}: about {values} JSON values, more than the {MAX_JSON_VALUES} a manifest "
                                   "may hold; refusing it")
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_int64)
    except _NotANumber as e:
        raise TransferSetError(f"{mpath}: {e}; a manifest holds finite numbers that fit 64 bits only (edited or "
                               "damaged: relabel, or restore it)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise TransferSetError(f"{mpath}: not valid JSON ({str(e)[:200]}); the manifest is damaged") from None
    m = Manifest.from_json(obj, str(mpath))
    for s in m.shards:
        shard_path(root, s.path)
    return m


def part_manifest_name(index: int, count: int) -> str:
    """File name of the manifest of part ``index`` of ``count`` (1-based)."""
    return f"manifest.part-{index}-of-{count}.json"


_PART_NAME = re.compile(r"^manifest\.part-([1-9][0-9]{0,8})-of-([1-9][0-9]{0,8})\.json$")


def part_manifest_names(root: str | os.PathLike) -> dict[tuple[int, int], str]:
    """``{(index, count): file name}`` of every part manifest in ``root`` (empty when none, or no folder)."""
    try:
        names = os.listdir(root)
    except OSError:
        return {}
    found = {}
    for name in names:
        match = _PART_NAME.match(name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = name
    return found


def write_part_manifest(root: str | os.PathLike, manifest: Manifest) -> None:
    """Write a part's manifest atomically under :func:`part_manifest_name` of its ``extra["part"]``."""
    part = manifest.extra["part"]
    atomic_write_json(Path(root) / part_manifest_name(part["index"], part["count"]), manifest.to_json())


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


class _NotANumber(ValueError):
    """A number in a manifest that is not finite or does not fit 64 bits."""


def _no_constant(name: str):
    raise _NotANumber(f"{name} where a number goes")


def _finite_float(text: str) -> float:
    v = float(text)
    if not np.isfinite(v):
        raise _NotANumber(f"{text[:40]} overflows a 64-bit float")
    return v


def _int64(text: str) -> int:
    if len(text.lstrip("-")) > 19 or not -(1 << 63) <= int(text) < 1 << 63:
        raise _NotANumber(f"the whole number {text[:40]}{'...' if len(text) > 40 else ''} does not fit 64 bits")
    return int(text)


def _nesting(text: str) -> tuple[int, int]:
    """Deepest bracket nesting outside JSON strings, and about how many values (Python objects) the text parses
    into (regex and numpy: no recursion, no per-character loop)."""
    bare = _STRING.sub('""', text)
    strings = bare.count('""')
    marks = re.sub(r"[^\[\]{},:]", "", bare)
    if not marks:
        return 0, strings + 1
    steps = np.frombuffer(marks.encode("ascii"), dtype=np.uint8)
    opening = (steps == ord("[")) | (steps == ord("{"))
    brackets = opening | (steps == ord("]")) | (steps == ord("}"))
    depth = np.cumsum(np.where(opening, 1, -1)[brackets]) if brackets.any() else np.zeros(1, np.int64)
    # every value but a container's first follows a comma; every object value a colon (its key is a string)
    return int(depth.max()), int(opening.sum()) + int((steps == ord(",")).sum()) + strings + 1


def write_manifest(root: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``root/manifest.json`` atomically: readers see the previous manifest or this one, never half."""
    atomic_write_json(Path(root) / MANIFEST_NAME, manifest.to_json())
