"""A transfer set from someone else is untrusted input: its folder is the boundary.

Every path a set names is opened only when it is a regular file inside the folder (no FIFOs, devices, sockets,
directories, or symlinks that leave it), checked before the path reaches HDF5. Every shard is checked on its
structure before any data is read: only the datasets the format defines, reached by plain (hard) links, stored
contiguously or in chunks with the filters the format allows, of the declared dtype and shape, with no external
storage, no virtual datasets, no named datatypes and no extra objects; and its declared rows must be backed by
bytes on disk, so a few kilobytes cannot stand for billions of rows; and no chunk may decompress to more than
MAX_CHUNK_BYTES, so reading one row never takes more. What the format does not define is refused, in one line that
names the shard and the fault. Together with the limits a manifest may declare (temperatures, classes, values per
row: :mod:`transferset.format.schema`), a reader that reads one temperature in bounded blocks holds bounded memory
whatever a shard decompresses to.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import h5py
import numpy as np

from ..errors import TransferSetError
from .schema import FIELD_NAMES, MAX_FIELD_ROW_BYTES, Manifest, shard_layout

__all__ = ["MAX_MANIFEST_BYTES", "MAX_JSON_DEPTH", "MAX_JSON_VALUES", "MAX_CHUNK_BYTES", "MAX_EXPANSION", "ALLOWED_FILTERS", "regular_file_inside",
           "structure_fault", "checked_open", "open_shard", "source_inside"]

MAX_MANIFEST_BYTES = 64 << 20  #: a manifest for 100,000 shards is about 30 MB
MAX_JSON_DEPTH = 32  #: the format nests 4 deep; anything past this is refused before it is parsed
#: values (numbers, strings, lists, objects) a manifest may parse into: 64 MB of "{}," would be 21 million empty
#: objects (1.4 GB in Python); 4 million are about 400 MB at worst, and 100,000 shards take about 2 million
MAX_JSON_VALUES = 1 << 22
#: stored bytes may expand at most this much when read (deflate's ceiling is about 1032:1)
MAX_EXPANSION = 1100
#: bytes one HDF5 chunk may decompress to: a reader decompresses whole chunks, so this bounds what one read of
#: one row takes whatever the chunk's compression (label writes chunks of about 4 MB, one row when a row is more)
MAX_CHUNK_BYTES = MAX_FIELD_ROW_BYTES
#: HDF5 filter ids the format allows: deflate (gzip), shuffle, fletcher32, lzf
ALLOWED_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}


def regular_file_inside(root: str | os.PathLike, rel: str, what: str = "path") -> Path:
    """``root / rel`` resolved, when it is a regular file inside ``root``; else one TransferSetError.

    Symlinks are followed only while they stay inside the folder; the file type is checked with ``stat`` before
    anything opens it, so a FIFO cannot block and a device cannot be read.
    """
    root = Path(root)
    where = f"{root}: {what} {rel!r}"
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel) or "\\" in rel:
        raise TransferSetError(f"{where} must be a relative path inside the folder")
    if len(rel) > 4096 or any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in rel.split("/")):
        raise TransferSetError(f"{where[:300]}... is longer than any file name the folder can hold")
    try:
        root_r = root.resolve(strict=True)
        p = (root_r / rel).resolve(strict=True)
        st = os.stat(p)
    except FileNotFoundError:
        raise TransferSetError(f"{where} does not exist", 1) from None
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, over-long names, permission
        raise TransferSetError(f"{where} cannot be resolved ({getattr(e, 'strerror', None) or e})") from None
    if p != root_r and root_r not in p.parents:
        raise TransferSetError(f"{where} leaves the transfer-set folder; refusing it")
    if not stat.S_ISREG(st.st_mode):
        raise TransferSetError(f"{where} is not a regular file (a FIFO, device, socket or folder); refusing it")
    return p


def source_inside(root: str | os.PathLike, data) -> Path | None:
    """The source path a manifest names, resolved, when it exists inside the set's folder ``root``; else None.

    A set is untrusted: the source it names elsewhere on disk is opened only when the user names it, never on the
    manifest's word. A relative path is taken from the folder.
    """
    if not isinstance(data, str) or not data or "\x00" in data:
        return None
    try:
        root_r = Path(root).resolve()
        p = (Path(data) if os.path.isabs(data) else root_r / data).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return p if root_r in p.parents and p.exists() else None


def _dataset_fault(f: h5py.File, name: str, rows: int, shape: tuple, dtype: np.dtype) -> str | None:
    link = f.get(name, getlink=True)
    if link is None:
        return f"dataset {name!r} missing"
    if not isinstance(link, h5py.HardLink):
        return f"{name!r} is a {type(link).__name__} (links may point outside the folder)"
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        return f"{name!r} is a {type(obj).__name__}, not a dataset"
    if obj.id.get_type().committed():
        return f"{name!r} uses a named datatype"
    dcpl = obj.id.get_create_plist()
    if dcpl.get_layout() not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED, h5py.h5d.COMPACT):
        return f"{name!r} is a virtual dataset (it may read other files)"
    if dcpl.get_external_count():
        return f"{name!r} keeps its bytes in external files"
    filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
    bad = [c for c in filters if c not in ALLOWED_FILTERS]
    if bad:
        return f"{name!r} uses HDF5 filter(s) {bad}, which the format does not allow"
    if obj.dtype != dtype:
        return f"{name!r} has dtype {obj.dtype}, the format says {dtype}"
    if len(obj.shape) >= 1 and obj.shape[0] != rows:
        return f"dataset {name!r} has {obj.shape[0]} rows, manifest says {rows}"
    if obj.shape != (rows,) + tuple(shape):
        return f"{name!r} has shape {obj.shape}, the manifest says {(rows,) + tuple(shape)}"
    if obj.chunks is not None and math.prod(obj.chunks) * dtype.itemsize > MAX_CHUNK_BYTES:
        return f"{name!r} is stored in chunks of {obj.chunks}, more than the {MAX_CHUNK_BYTES >> 20} MB a chunk may take"
    want = math.prod(obj.shape) * dtype.itemsize
    have = obj.id.get_storage_size()
    if want and (have < want if not filters or filters == [3] else have * MAX_EXPANSION < want):
        return f"{name!r} declares {want} bytes but {have} are stored (rows not backed by data)"
    return None


def structure_fault(f: h5py.File, rows: int, manifest: Manifest) -> str | None:
    """One line naming what in an open shard the format does not allow, or None. Reads no data."""
    layout = shard_layout(manifest)
    extra = sorted(set(f.keys()) - set(layout))
    if extra:
        known = [n for n in extra if n in FIELD_NAMES]
        return (f"holds {', '.join(repr(n) for n in extra[:5])}, which this set's manifest does not declare"
                + (" (inputs are stored although the manifest says they are not)" if known == ["inputs"] else ""))
    for name, (shape, dtype) in layout.items():
        fault = _dataset_fault(f, name, rows, shape, dtype)
        if fault:
            return fault
    return None


def _reason(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def checked_open(path: Path, rows: int, manifest: Manifest, **kwargs) -> tuple[h5py.File | None, str | None]:
    """``(open file, None)`` when the shard's structure is sound, else ``(None, one-line reason)``.

    ``path`` must come from :func:`regular_file_inside`; ``kwargs`` go to h5py.File (chunk-cache sizes).
    """
    try:
        f = h5py.File(path, "r", **kwargs)
    except (OSError, ValueError) as e:
        return None, f"unreadable HDF5 ({_reason(e)})"
    try:
        fault = structure_fault(f, rows, manifest)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        fault = f"unreadable HDF5 structure ({_reason(e)})"
    if fault:
        f.close()
        return None, fault
    return f, None


#: shards this process found sound, by path, file identity and the layout they were checked against: a reader
#: reopens its shards every epoch, and the structure check costs ~7x the open itself (BENCHMARKS.md)
_SOUND: set[tuple] = set()


def _identity(path: Path, rows: int, manifest: Manifest) -> tuple | None:
    """What a sound shard is remembered by: any write to the file changes its ctime (which no user can set), a
    replaced file its inode; None when it cannot be stat'ed (the open then reports why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    layout = tuple((n, tuple(shape), np.dtype(dt).str) for n, (shape, dt) in sorted(shard_layout(manifest).items()))
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, int(rows), layout)


def _opened_identity(f: h5py.File) -> tuple | None:
    try:
        st = os.fstat(f.id.get_vfd_handle())
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_shard(path: Path, rows: int, manifest: Manifest, **kwargs) -> h5py.File:
    """:func:`checked_open`, raising one TransferSetError (exit 1) that names the shard and the fault.

    A shard this process already found sound, unchanged since (same inode, size, mtime and ctime) and checked
    against the same layout, is opened without checking its structure again.
    """
    key = _identity(path, rows, manifest)
    if key is not None and key in _SOUND:
        try:
            f = h5py.File(path, "r", **kwargs)
        except (OSError, ValueError) as e:
            raise TransferSetError(f"{path}: unreadable HDF5 ({_reason(e)})", 1) from None
        if _opened_identity(f) == key[1:6]:  # the very file that was stat'ed: not swapped in between
            return f
        f.close()
    f, fault = checked_open(path, rows, manifest, **kwargs)
    if fault:
        raise TransferSetError(f"{path}: {fault}", 1)
    if key is not None:
        _SOUND.add(key)
    return f
