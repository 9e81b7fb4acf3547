"""Checking a transfer set's shards against its manifest: ``transferset verify`` and every reader's open."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._io import sha256_file
from ..errors import TransferSetError
from .parts import read_manifest
from .parts import PartsState, unmerged_parts
from .safety import checked_open, regular_file_inside
from .schema import MANIFEST_NAME, SHARD_FIELDS, Manifest, ShardEntry, is_frame_set

__all__ = ["VALUE_CHECKED", "check_shard", "value_fault", "token_ids", "verify_transfer_set"]

_VALUE_BYTES = 32 << 20  # bytes read at a time by the value checks (bounded memory on any shard)


def _log_values_bad(v: np.ndarray) -> np.ndarray:
    # a log-probability may be -inf (it underflowed to zero), never NaN or +inf, and not all -inf in a row
    v = v.reshape(len(v), -1)
    return np.isnan(v).any(axis=1) | (v == np.inf).any(axis=1) | ~np.isfinite(v).any(axis=1)


def _finite_bad(v: np.ndarray) -> np.ndarray:
    return ~np.isfinite(v).reshape(len(v), -1).all(axis=1)


def _tail_bad(v: np.ndarray) -> np.ndarray:
    # the tail may be empty (-inf at every temperature), never NaN or +inf
    v = v.reshape(len(v), -1)
    return np.isnan(v).any(axis=1) | (v == np.inf).any(axis=1)


def _rows(bad: np.ndarray) -> np.ndarray:
    """[N, ...] faults -> [N]: a row is at fault when any of its positions is."""
    return bad.reshape(len(bad), -1).any(axis=1)


def _topk_index_bad(v: np.ndarray, num_classes: int) -> np.ndarray:
    s = np.sort(v.astype(np.int64), axis=-1)  # [N, K] or, per position, [N, P, K]
    return _rows((s >= num_classes).any(axis=-1) | (s[..., 1:] == s[..., :-1]).any(axis=-1))


def _sample_count_bad(v: np.ndarray) -> np.ndarray:
    k = v.shape[-1]
    return (v.astype(np.int64).sum(axis=-1) != k).reshape(len(v), -1).any(axis=1)


#: a field's value rule (``ShardField.values``) -> ``(rows at fault [N] bool, what is wrong)`` for a block
_RULES = {
    "finite": (lambda v, c: _finite_bad(v), "non-finite {name}"),
    "log": (lambda v, c: _log_values_bad(v), "non-finite {name}"),
    "tail": (lambda v, c: _tail_bad(v), "NaN or +inf {name}"),
    "distinct-class": (_topk_index_bad, "{name} outside [0, C) or repeated"),
    "class": (lambda v, c: (v.astype(np.int64) >= c).reshape(len(v), -1).any(axis=1), "{name} outside [0, C)"),
    "count-k": (lambda v, c: _sample_count_bad(v), "{name} not summing to K"),
}
#: dataset -> its value rule, for every field that has one
_VALUE_RULES = {f.name: f.values for f in SHARD_FIELDS if f.values is not None}
VALUE_CHECKED = tuple(_VALUE_RULES)


#: float item size -> (unsigned view, mask dropping the sign bit, bits of +inf): IEEE 754 values whose magnitude
#: bits are below +inf's are finite
_FINITE_BITS = {2: (np.uint16, 0x7FFF, 0x7C00), 4: (np.uint32, 0x7FFFFFFF, 0x7F800000),
                8: (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


def _all_finite(values: np.ndarray) -> bool:
    """Whether a float block holds no NaN and no infinity, by its bit patterns: an integer mask and max, about
    20x faster than ``np.isfinite(...).all()`` or a float64 sum on float16 data (measured for the reader's
    per-block check, docs/BENCHMARKS.md)."""
    kind = _FINITE_BITS.get(values.dtype.itemsize)
    if kind is None:
        return bool(np.isfinite(values).all())
    view, mask, inf = kind
    return int((values.view(view) & view(mask)).max()) < inf


def token_ids(manifest: Manifest) -> bool:
    """Whether a set's stored ``inputs`` are token ids into its vocabulary (a per-position set of integer inputs
    that is not a frame set): a student embeds them, so each must lie in [0, C)."""
    dtype = manifest.input.get("dtype") if isinstance(manifest.input, dict) else None
    try:
        integer = np.dtype(dtype).kind in "iu"
    except (TypeError, ValueError):
        integer = False
    return manifest.positions is not None and integer and not is_frame_set(manifest)


def _range_fault(values: np.ndarray, lo: int, hi: int, first_row: int, what: str) -> str | None:
    """One line naming the first row of ``values`` holding a value outside [lo, hi), and the value, or None (a
    min and a max when every value is in range)."""
    if not values.size or (values.min() >= lo and values.max() < hi):
        return None
    bad = ((values < lo) | (values >= hi)).reshape(len(values), -1)
    r = int(np.flatnonzero(bad.any(axis=1))[0])
    return f"row {first_row + r}: {what} {int(values[r].reshape(-1)[bad[r]][0])} outside [{lo}, {hi})"


def value_fault(name: str, values: np.ndarray, num_classes: int, first_row: int = 0, *,
                ids: bool = False) -> str | None:
    """One line naming the first row of ``values`` (a block of dataset ``name``) the format forbids, or None.

    Logits (and sparse logits and log-partitions) must be finite; soft targets and kept log-probabilities may be
    -inf (a probability that underflowed to zero is exactly that, and the losses handle it) but not NaN, +inf
    or -inf throughout; a tail mass may be -inf; labels must lie in [-1, C); class indices in [0, C), the top-k
    ones distinct; a row's sample counts must sum to K at every temperature; with ``ids`` (:func:`token_ids`),
    the inputs' token ids in [0, C).
    """
    if name == "inputs":
        return _range_fault(values, 0, num_classes, first_row, "token id") if ids else None
    if name.startswith("hint_"):  # float hints must be finite; packed sign bits are any bytes
        if values.dtype.kind != "f" or not values.size or _all_finite(values):
            return None
        return f"row {first_row + int(np.flatnonzero(_finite_bad(values))[0])}: non-finite {name}"
    rule = _VALUE_RULES.get(name)
    if rule is None:
        return None
    if values.dtype.kind == "f" and values.size and _all_finite(values):
        return None
    if rule == "label":
        return _range_fault(values, -1, num_classes, first_row, "label")
    check, what = _RULES[rule]
    bad = check(values, num_classes)
    if not bad.any():
        return None
    return f"row {first_row + int(np.flatnonzero(bad)[0])}: {what.format(name=name)}"


def check_shard(root: str | os.PathLike, entry: ShardEntry, manifest: Manifest, rehash: bool = False,
                values: bool | None = None) -> str | None:
    """Return None when the shard is sound, else a one-line reason.

    Always: a regular file inside the folder, of the listed size, whose structure the format allows (see
    :mod:`transferset.format.safety`). With ``rehash``: its sha256. With ``values`` (default: as ``rehash``):
    every value as :func:`value_fault` asks (every codec's fields).
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
            ids = token_ids(manifest)
            for name in VALUE_CHECKED + ("inputs",) * ids + tuple(h["field"] for h in manifest.hints or ()):
                if name not in f:
                    continue
                block = max(1, _VALUE_BYTES // max(1, f[name].dtype.itemsize * int(np.prod(f[name].shape[1:]))))
                for r0 in range(0, entry.rows, block):
                    fault = value_fault(name, f[name][r0:r0 + block], manifest.num_classes, r0, ids=ids)
                    if fault:
                        return fault
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        return f"unreadable HDF5 ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
    finally:
        f.close()
    return None


def row_start_fault(row_start: int, rows: int, start: int, end: int, total: int, prev_ok: bool) -> str | None:
    """Why a sound shard's ``row_start`` cannot number its rows, or None: after a sound shard it starts where that
    one ends (``start``); after a bad one it may not overlap the sound shards before it (``end``); and its rows lie
    within the set's listed ``total`` (the readers' arrays indexed by row are that long). ``verify`` and the
    readers judge with this one rule."""
    if prev_ok and row_start != start:
        return f"row_start {row_start} but the shards before it hold {start} rows"
    if row_start < end or row_start + rows > total:
        return f"row_start {row_start} with {rows} rows lies outside rows {end} to {total} of the set"
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
    total, start, end, prev_ok = m.rows, 0, 0, True
    for entry in m.shards:
        reason = check_shard(root, entry, m, rehash)
        row_start = entry.row_start if entry.row_start is not None else start
        if reason is None:
            reason = row_start_fault(row_start, entry.rows, start, end, total, prev_ok)
        if reason:
            bad.append((entry.path, reason))
        else:
            end = row_start + entry.rows
        prev_ok = reason is None  # after a bad shard, judge the next one's row_start from its own entry
        start = row_start + entry.rows
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
