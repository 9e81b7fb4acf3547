"""Checking a transfer set's shards against its manifest: ``transferset verify`` and every reader's open."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._io import sha256_file
from ..errors import TransferSetError
from .manifest import read_manifest
from .parts import PartsState, unmerged_parts
from .safety import checked_open, regular_file_inside
from .schema import MANIFEST_NAME, Manifest, ShardEntry

__all__ = ["check_shard", "value_fault", "verify_transfer_set"]

_VALUE_BYTES = 32 << 20  # bytes read at a time by the value checks (bounded memory on any shard)


def value_fault(name: str, values: np.ndarray, num_classes: int, first_row: int = 0) -> str | None:
    """One line naming the first row of ``values`` (a block of dataset ``name``) the format forbids, or None.

    Logits and soft targets must be finite (a soft target may be -inf: a probability that underflowed to zero
    is exactly that, and the losses handle it); labels must lie in [-1, num_classes).
    """
    if name == "logits":
        bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1)
    elif name == "soft_targets":
        v = values.reshape(len(values), -1)
        bad = np.isnan(v).any(axis=1) | (v == np.inf).any(axis=1) | ~np.isfinite(v).any(axis=1)
    elif name == "labels":
        bad = (values < -1) | (values >= num_classes)
    else:
        return None
    if not bad.any():
        return None
    r = int(np.flatnonzero(bad)[0])
    what = f"label {int(values[r])} outside [-1, {num_classes})" if name == "labels" else f"non-finite {name}"
    return f"row {first_row + r}: {what}"


def check_shard(root: str | os.PathLike, entry: ShardEntry, manifest: Manifest, rehash: bool = False,
                values: bool | None = None) -> str | None:
    """Return None when the shard is sound, else a one-line reason.

    Always: a regular file inside the folder, of the listed size, whose structure the format allows (see
    :mod:`transferset.format.safety`). With ``rehash``: its sha256. With ``values`` (default: as ``rehash``):
    every logit and soft target finite, every label in [-1, C).
    """
    try:
        p = regular_file_inside(root, entry.path, "shard")
    except TransferSetError as e:
        return "missing" if "does not exist" in str(e) else str(e).split(": ", 1)[-1]
    size = p.stat().st_size
    if entry.bytes is not None and size != entry.bytes:
        return f"{size} bytes on disk, the manifest says {entry.bytes} (truncated, or replaced by another file)"
    if rehash and sha256_file(p) != entry.sha256:
        return "sha256 mismatch (the file changed or is corrupt)"
    f, fault = checked_open(p, entry.rows, manifest)
    if fault:
        return fault
    try:
        if rehash if values is None else values:
            for name in ("logits", "soft_targets", "labels"):
                if name not in f:
                    continue
                block = max(1, _VALUE_BYTES // max(1, f[name].dtype.itemsize * int(np.prod(f[name].shape[1:]))))
                for r0 in range(0, entry.rows, block):
                    fault = value_fault(name, f[name][r0:r0 + block], manifest.num_classes, r0)
                    if fault:
                        return fault
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        return f"unreadable HDF5 ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
    finally:
        f.close()
    return None


def verify_transfer_set(root: str | os.PathLike, rehash: bool = True) -> list[tuple[str, str]]:
    """Check every listed shard (file, structure, rows, shapes and, with ``rehash``, sha256 and values).

    Returns a list of ``(shard path, reason)`` for each bad shard; empty when all are sound.
    """
    root = Path(root)
    parts = unmerged_parts(root)
    if parts is not None:
        return _verify_parts(parts, rehash)
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


def _verify_parts(parts: PartsState, rehash: bool) -> list[tuple[str, str]]:
    """Each shard a part lists, checked against that part's manifest, and at the row its index says."""
    bad = []
    for m in parts.manifests.values():
        for entry in m.shards:
            reason = check_shard(parts.root, entry, m, rehash)
            k = (entry.row_start or 0) // (m.shard_size or 1)
            if reason is None and (entry.row_start is None or entry.row_start != k * (m.shard_size or 1)):
                reason = f"row_start {entry.row_start} is not a shard boundary"
            if reason:
                bad.append((entry.path, reason))
    return bad
