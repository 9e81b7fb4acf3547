"""Reading a transfer set's manifest from its folder, and resolving the shard paths it lists.

The manifest's content and checks live in :mod:`transferset.format.schema`; this module adds the folder: where
the manifest is, how it is read, and that every path it names stays inside the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .._io import atomic_write_json, sha256_file
from ..errors import TransferSetError
from .schema import MANIFEST_NAME, Manifest

__all__ = ["MANIFEST_NAME", "read_manifest", "load_manifest", "write_manifest", "shard_path", "manifest_hash",
           "sha256_file", "atomic_write_json"]


def manifest_hash(manifest: Manifest | dict) -> str:
    """A short, stable hash of a manifest's content (ties reader state and run folders to one transfer set)."""
    obj = manifest.to_json() if isinstance(manifest, Manifest) else manifest
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def shard_path(root: str | os.PathLike, rel: str) -> Path:
    """Resolve a shard's manifest path inside ``root``; refuse paths that would leave the folder."""
    root_r = Path(root).resolve()
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise TransferSetError(f"{Path(root) / MANIFEST_NAME}: shard path {rel!r} must be a relative path inside the folder")
    p = (root_r / rel).resolve()
    if p != root_r and root_r not in p.parents:
        raise TransferSetError(f"{Path(root) / MANIFEST_NAME}: shard path {rel!r} leaves the transfer-set folder; refusing it")
    return p


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read and check ``root/manifest.json``; raise TransferSetError naming what is wrong."""
    root = Path(root)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise TransferSetError(f"{root}: not a folder; give the transfer-set folder made by `transferset label`")
    if not mpath.is_file():
        raise TransferSetError(f"{mpath}: no manifest; is {root} a transfer set made by `transferset label`?")
    try:
        with open(mpath, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TransferSetError(f"{mpath}: not valid JSON ({e}); the manifest is damaged") from None
    m = Manifest.from_json(obj, str(mpath))
    for s in m.shards:
        shard_path(root, s.path)
    return m


def load_manifest(root: str | os.PathLike) -> dict:
    """:func:`read_manifest` as plain JSON data (for code that indexes the manifest as a dict)."""
    return read_manifest(root).to_json()


def write_manifest(root: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``root/manifest.json`` atomically: readers see the previous manifest or this one, never half."""
    atomic_write_json(Path(root) / MANIFEST_NAME, manifest.to_json())
