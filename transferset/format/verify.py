"""Checking a transfer set's shards against its manifest: ``transferset verify`` and every reader's open."""

from __future__ import annotations

import os
from pathlib import Path

import h5py

from .._io import sha256_file
from .manifest import read_manifest, shard_path
from .schema import MANIFEST_NAME, Manifest, ShardEntry, shard_layout

__all__ = ["check_shard", "verify_transfer_set"]


def check_shard(root: str | os.PathLike, entry: ShardEntry, manifest: Manifest, rehash: bool = False) -> str | None:
    """Return None when the shard is sound, else a one-line reason (missing, size, sha256, datasets, shapes)."""
    p = shard_path(root, entry.path)
    if not p.is_file():
        return "missing"
    size = p.stat().st_size
    if entry.bytes is not None and size != entry.bytes:
        return f"{size} bytes on disk, the manifest says {entry.bytes} (truncated, or replaced by another file)"
    if rehash and sha256_file(p) != entry.sha256:
        return "sha256 mismatch (the file changed or is corrupt)"
    try:
        with h5py.File(p, "r") as f:
            for name, (shape, _) in shard_layout(manifest).items():
                if name not in f:
                    return f"dataset {name!r} missing"
                if f[name].shape[0] != entry.rows:
                    return f"dataset {name!r} has {f[name].shape[0]} rows, manifest says {entry.rows}"
                if name in ("logits", "soft_targets") and f[name].shape[1:] != shape:
                    return f"{name} shape {f[name].shape} disagrees with the manifest"
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        return f"unreadable HDF5 ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
    return None


def verify_transfer_set(root: str | os.PathLike, rehash: bool = True) -> list[tuple[str, str]]:
    """Check every listed shard (existence, rows, shapes and, with ``rehash``, sha256).

    Returns a list of ``(shard path, reason)`` for each bad shard; empty when all are sound.
    """
    root = Path(root)
    m = read_manifest(root)
    bad = []
    start, prev_ok = 0, True
    for entry in m.shards:
        reason = check_shard(root, entry, m, rehash)
        row_start = entry.row_start if entry.row_start is not None else start
        if reason is None and prev_ok and row_start != start:
            reason = f"row_start {entry.row_start} but the shards before it hold {start} rows"
        if reason:
            bad.append((entry.path, reason))
        prev_ok = reason is None  # after a bad shard, judge the next one's row_start from its own entry
        start = row_start + entry.rows
    total = m.rows
    if m.complete and isinstance(m.expected_rows, int) and total != m.expected_rows:
        bad.append((MANIFEST_NAME, f"marked complete with {total} rows, expected_rows says {m.expected_rows}"))
    if total != m.stats.get("rows", total):
        bad.append((MANIFEST_NAME, "stats.rows disagrees with the shards' rows"))
    return bad
