"""The transfer-set format: manifest schema, checksums, atomic writes and validation.

A transfer set is a folder holding ``manifest.json`` and HDF5 shards. docs/FORMAT.md is the prose form of
what this module checks. Nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import h5py

from .. import SCHEMA_VERSION, __version__
from ..errors import FAILED, TransferSetError

__all__ = [
    "MANIFEST_NAME",
    "SHARD_DATASETS",
    "sha256_file",
    "atomic_write_json",
    "load_manifest",
    "shard_path",
    "manifest_hash",
    "verify_transfer_set",
    "summary",
]

MANIFEST_NAME = "manifest.json"
#: Datasets every shard holds; ``inputs`` is present only when the manifest says inputs are stored.
SHARD_DATASETS = ("logits", "soft_targets", "labels", "source_index", "view", "aug_seed")
_HASH_BLOCK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temporary sibling, fsync, and rename over ``path`` (readers see old or new, never half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TransferSetError(f"cannot write {path}: {e.strerror or e}; what it listed before stays valid; free "
                               "space or fix permissions, then run the same command to resume", FAILED) from None
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
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


def manifest_hash(manifest: dict) -> str:
    """A short, stable hash of a manifest's content (used to tie reader state to one transfer set)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def shard_path(root: str | os.PathLike, rel: str) -> Path:
    """Resolve a shard's manifest path inside ``root``; refuse paths that would leave the folder."""
    root_r = Path(root).resolve()
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise TransferSetError(f"{Path(root) / MANIFEST_NAME}: shard path {rel!r} must be a relative path inside the folder")
    p = (root_r / rel).resolve()
    if p != root_r and root_r not in p.parents:
        raise TransferSetError(f"{Path(root) / MANIFEST_NAME}: shard path {rel!r} leaves the transfer-set folder; refusing it")
    return p


_REQUIRED = {
    "format": str, "schema_version": int, "num_classes": int, "num_members": int, "temperatures": list,
    "combine": str, "weights": list, "dtype": str, "input": dict, "teachers": list, "shards": list,
    "augment": dict, "source": dict, "complete": bool,
}


def load_manifest(root: str | os.PathLike) -> dict:
    """Read and validate ``root/manifest.json``; raise TransferSetError naming what is wrong."""
    root = Path(root)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise TransferSetError(f"{root}: not a folder; give the transfer-set folder made by `transferset label`")
    if not mpath.is_file():
        raise TransferSetError(f"{mpath}: no manifest; is {root} a transfer set made by `transferset label`?")
    try:
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TransferSetError(f"{mpath}: not valid JSON ({e}); the manifest is damaged") from None
    if not isinstance(m, dict) or m.get("format") != "transferset":
        raise TransferSetError(f"{mpath}: not a transferset manifest (missing \"format\": \"transferset\")")
    v = m.get("schema_version")
    if not isinstance(v, int) or v > SCHEMA_VERSION or v < 1:
        raise TransferSetError(
            f"{mpath}: schema_version {v!r} is not supported by transferset {__version__} "
            f"(it reads up to {SCHEMA_VERSION}); upgrade transferset to read this set")
    for key, typ in _REQUIRED.items():
        if not isinstance(m.get(key), typ):
            raise TransferSetError(f"{mpath}: field {key!r} is missing or not a {typ.__name__}; the manifest was edited or damaged")
    if m["num_classes"] < 1 or m["num_members"] < 1 or len(m["teachers"]) != m["num_members"]:
        raise TransferSetError(f"{mpath}: num_classes/num_members/teachers disagree; the manifest was edited or damaged")
    temps = m["temperatures"]
    if not temps or not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in temps):
        raise TransferSetError(f"{mpath}: temperatures must be positive numbers, got {temps!r}")
    _check_fields(m, mpath)
    seen = set()
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or not _is_int(s.get("rows")) or s["rows"] < 0 \
                or not isinstance(s.get("sha256"), str) or not isinstance(s.get("path"), str) \
                or ("bytes" in s and not (_is_int(s["bytes"]) and s["bytes"] >= 0)) \
                or ("row_start" in s and not (_is_int(s["row_start"]) and s["row_start"] >= 0)):
            raise TransferSetError(f"{mpath}: shard entry {i} needs path, rows and sha256 (and whole-number bytes "
                                   "and row_start); the manifest was edited or damaged")
        shard_path(root, s["path"])
        if s["path"] in seen:
            raise TransferSetError(f"{mpath}: shard {s['path']} is listed twice")
        seen.add(s["path"])
    return m


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: dtypes a shard's ``inputs`` may have: plain numbers only (no objects, strings or structured types)
INPUT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64", "float16", "float32",
                "float64", "bool")


def _check_fields(m: dict, mpath: Path) -> None:
    """The fields readers index into: right types and consistent sizes, so an edit gives a message, not a crash."""
    def bad(what: str) -> None:
        raise TransferSetError(f"{mpath}: {what}; the manifest was edited or damaged (relabel, or restore it)")

    if not _is_int(m["num_classes"]) or not _is_int(m["num_members"]):
        bad("num_classes and num_members must be whole numbers")
    if m["dtype"] not in ("float16", "float32"):
        bad(f"dtype {m['dtype']!r} is not float16 or float32")
    inp = m["input"]
    if not isinstance(inp.get("shape"), list) or not all(_is_int(d) and d >= 0 for d in inp["shape"]):
        bad("input.shape must be a list of whole numbers")
    if inp.get("dtype") not in INPUT_DTYPES:
        bad(f"input.dtype {inp.get('dtype')!r} is not one of {', '.join(INPUT_DTYPES)}")
    if not isinstance(inp.get("stored"), bool):
        bad("input.stored must be true or false")
    w = m["weights"]
    if len(w) != m["num_members"] or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and math.isfinite(v) and v >= 0 for v in w):
        bad(f"weights must be {m['num_members']} non-negative numbers")
    if not all(isinstance(t, dict) for t in m["teachers"]):
        bad("teachers must be a list of objects")
    names = m.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != m["num_classes"]
                              or not all(isinstance(n, str) for n in names)):
        bad(f"class_names must be null or {m['num_classes']} strings")
    if "stats" in m and not isinstance(m["stats"], dict):
        bad("stats must be an object")
    aug = m["augment"]
    if "views_per_row" in aug and not (_is_int(aug["views_per_row"]) and aug["views_per_row"] >= 1):
        bad("augment.views_per_row must be a whole number >= 1")
    if "seed" in aug and not _is_int(aug["seed"]):
        bad("augment.seed must be a whole number")
    if "chunk_rows" in m and not (_is_int(m["chunk_rows"]) and m["chunk_rows"] >= 1):
        bad("chunk_rows must be a whole number >= 1")


def _check_shard(root: Path, entry: dict, manifest: dict, rehash: bool) -> str | None:
    """Return None when the shard is sound, else a one-line reason."""
    p = shard_path(root, entry["path"])
    if not p.is_file():
        return "missing"
    size = p.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        return f"{size} bytes on disk, the manifest says {entry['bytes']} (truncated, or replaced by another file)"
    if rehash and sha256_file(p) != entry["sha256"]:
        return "sha256 mismatch (the file changed or is corrupt)"
    try:
        with h5py.File(p, "r") as f:
            names = list(SHARD_DATASETS) + (["inputs"] if manifest["input"].get("stored") else [])
            for name in names:
                if name not in f:
                    return f"dataset {name!r} missing"
                if f[name].shape[0] != entry["rows"]:
                    return f"dataset {name!r} has {f[name].shape[0]} rows, manifest says {entry['rows']}"
            if f["logits"].shape[1:] != (manifest["num_members"], manifest["num_classes"]):
                return f"logits shape {f['logits'].shape} disagrees with the manifest"
            if f["soft_targets"].shape[1:] != (len(manifest["temperatures"]), manifest["num_classes"]):
                return f"soft_targets shape {f['soft_targets'].shape} disagrees with the manifest"
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        return f"unreadable HDF5 ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
    return None


def verify_transfer_set(root: str | os.PathLike, rehash: bool = True) -> list[tuple[str, str]]:
    """Check every listed shard (existence, rows, shapes and, with ``rehash``, sha256).

    Returns a list of ``(shard path, reason)`` for each bad shard; empty when all are sound.
    """
    root = Path(root)
    m = load_manifest(root)
    bad = []
    start, total, prev_ok = 0, 0, True
    for entry in m["shards"]:
        reason = _check_shard(root, entry, m, rehash)
        if reason is None and prev_ok and entry.get("row_start", start) != start:
            reason = f"row_start {entry['row_start']} but the shards before it hold {start} rows"
        if reason:
            bad.append((entry["path"], reason))
        prev_ok = reason is None  # after a bad shard, judge the next one's row_start from its own entry
        start = entry.get("row_start", start) + entry["rows"]
        total += entry["rows"]
    start = total
    expected = m.get("expected_rows")
    if m["complete"] and isinstance(expected, int) and start != expected:
        bad.append((MANIFEST_NAME, f"marked complete with {start} rows, expected_rows says {expected}"))
    if sum(s["rows"] for s in m["shards"]) != m.get("stats", {}).get("rows", sum(s["rows"] for s in m["shards"])):
        bad.append((MANIFEST_NAME, "stats.rows disagrees with the shards' rows"))
    return bad


def summary(manifest: dict) -> dict:
    """The short, human-facing summary printed by ``transferset info``."""
    st = manifest.get("stats", {})
    return {
        "schema_version": manifest["schema_version"],
        "tool_version": manifest.get("tool_version"),
        "complete": manifest["complete"],
        "rows": st.get("rows", sum(s["rows"] for s in manifest["shards"])),
        "expected_rows": manifest.get("expected_rows"),
        "shards": len(manifest["shards"]),
        "members": [t.get("file") for t in manifest["teachers"]],
        "output_kinds": [t.get("output_kind") for t in manifest["teachers"]],
        "num_classes": manifest["num_classes"],
        "class_names": manifest.get("class_names"),
        "input": manifest["input"],
        "temperatures": manifest["temperatures"],
        "combine": manifest["combine"],
        "dtype": manifest["dtype"],
        "augment": manifest["augment"],
        "member_accuracy": st.get("member_accuracy"),
        "ensemble_accuracy": st.get("ensemble_accuracy"),
        "mean_entropy": st.get("mean_entropy"),
    }
