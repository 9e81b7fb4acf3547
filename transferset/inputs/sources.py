"""Data sources read in batches: ``.npy``, ``.npz[:key]``, HDF5 ``file.h5:dataset``, IDX (MNIST) and image folders.

A :class:`Source` knows its rows, row shape and dtype without loading the data; ``read(start, stop)`` and
``read_rows(indices)`` return fresh arrays in the source dtype. Sources are picklable and fork-safe: files are
opened lazily on first read, reopened when the process id changes, and no handle travels in pickled state.
"""

from __future__ import annotations

import abc
import gzip
import hashlib
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TransferSetError

__all__ = ["Source", "open_source", "read_labels", "frame_labels", "IMAGE_EXTENSIONS", "FORMATS"]

FORMATS = ("npy", "npz", "hdf5", "idx", "images")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

_IDX_NAME = re.compile(r"idx\d+-ubyte(\.gz)?$", re.IGNORECASE)
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_FORMAT_HELP = "use .npy, .npz, .h5:dataset, IDX or a folder of images"
_HASH_CHUNK = 1 << 20


def _format_of(path: Path) -> str | None:
    if path.is_dir():
        return "images"
    name = path.name.lower()
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".h5", ".hdf5")):
        return "hdf5"
    if _IDX_NAME.search(name):
        return "idx"
    return None


def _split_spec(spec: str) -> tuple[Path, str | None]:
    """``file.npz:key`` -> (path, key); a spec naming an existing path has no key."""
    if os.path.exists(spec) or ":" not in spec:
        return Path(spec), None
    head, key = spec.rsplit(":", 1)
    if _format_of(Path(head)) in ("npz", "hdf5") or os.path.exists(head):
        return Path(head), key or None
    return Path(spec), None


class Source(abc.ABC):
    """Rows of one data source, read in batches (see :func:`open_source`).

    Attributes:
        rows: rows after ``limit``.
        row_shape: shape of one row.
        dtype: dtype of the rows (native byte order).
        labels: int64 labels the source carries itself (npz ``y``, image-folder classes), else None.
        class_names: class names of an image folder with class sub-folders, else None.
    """

    format = ""

    def __init__(self, spec: str, path: Path, key: str | None, limit: int | None, option: str = "data") -> None:
        self.spec, self.path, self.key, self.limit, self.option = spec, path, key, limit, option
        self.labels: np.ndarray | None = None
        self.class_names: list[str] | None = None
        self._pid: int | None = None
        self._fp: str | None = None
        self.total_rows, self.row_shape, self.dtype = self._probe()
        if self.total_rows < 1:
            raise self._bad("the source has 0 rows; give a source with data")
        self.rows = self.total_rows if limit is None else min(int(limit), self.total_rows)
        if self.labels is not None:
            self.labels = self.labels[: self.rows]

    def _bad(self, what: str) -> TransferSetError:
        """An error about this source, naming the option it came from (``data``, ``labels``, ...) as data."""
        return TransferSetError(f"{self.spec}: {what}", option=self.option)

    # -- subclasses ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _probe(self) -> tuple[int, tuple[int, ...], np.dtype]:
        """(total rows, row shape, dtype) of the source, read from its header."""

    @abc.abstractmethod
    def _open(self) -> None:
        """Open the handles this process reads through."""

    def _close(self) -> None:
        """Drop handles (subclasses close what they hold)."""

    @abc.abstractmethod
    def _slice(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a fresh array."""

    def _take(self, sorted_unique: np.ndarray) -> np.ndarray:
        return np.concatenate([self._slice(int(i), int(i) + 1) for i in sorted_unique])

    _handle_names: tuple[str, ...] = ()

    # -- public ----------------------------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if self._pid != os.getpid():
            if self._pid is not None:  # inherited over fork: the parent's handles are not ours to close
                for name in self._handle_names:
                    setattr(self, name, None)
            self._open()
            self._pid = os.getpid()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a fresh array; ``stop`` past the end is clipped, as for a slice."""
        start, stop = int(start), min(int(stop), self.rows)
        if start < 0 or start > stop:
            raise self._bad(f"cannot read rows [{start}, {stop}) of {self.rows}")
        if start == stop:
            return np.empty((0,) + self.row_shape, self.dtype)
        self._ensure_open()
        return np.array(self._slice(start, stop), dtype=self.dtype, copy=True)

    def read_rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows at ``indices`` (any order, repeats allowed) as a fresh array."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return np.empty((0,) + self.row_shape, self.dtype)
        if idx.min() < 0 or idx.max() >= self.rows:
            raise self._bad(f"row {int(idx.max() if idx.max() >= self.rows else idx.min())} "
                                   f"is outside the source's {self.rows} rows; is this the source that was labelled?")
        uniq, inverse = np.unique(idx, return_inverse=True)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo <= 4 * len(uniq) + 64:  # dense: one contiguous read, then gather
            got = self.read(lo, hi)[uniq - lo]
        else:
            self._ensure_open()
            got = np.asarray(self._take(uniq), dtype=self.dtype)
        return np.ascontiguousarray(got[inverse])

    def _files(self) -> list[tuple[str, Path]]:
        return [(self.path.name, self.path)]

    def fingerprint(self) -> str:
        """sha256 over the data bytes (a folder: sorted relative paths and bytes), the key and the effective limit."""
        if self._fp is None:
            h = hashlib.sha256()
            for rel, p in self._files():
                if self.format == "images":
                    h.update(rel.encode() + b"\0")
                with open(p, "rb") as f:
                    while chunk := f.read(_HASH_CHUNK):
                        h.update(chunk)
            # a limit that keeps every row selects the same data as none, so it hashes as none
            limit = self.rows if self.rows < self.total_rows else None
            h.update(f"\0key={self.key};limit={limit}".encode())
            self._fp = h.hexdigest()
        return self._fp

    def describe(self) -> dict[str, Any]:
        """JSON-safe description for the manifest."""
        return {"data": self.spec, "format": self.format, "key": self.key, "rows": int(self.rows),
                "total_rows": int(self.total_rows), "limit": None if self.limit is None else int(self.limit),
                "row_shape": [int(s) for s in self.row_shape], "dtype": str(self.dtype)}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._handle_names:
            state[name] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, rows={self.rows}, row_shape={self.row_shape}, dtype={self.dtype})"


def _native(dt: np.dtype) -> np.dtype:
    return dt.newbyteorder("=") if dt.byteorder not in ("=", "|") else dt


def _check_dtype(src: Source, dt: np.dtype) -> np.dtype:
    if dt.hasobject or dt.fields is not None or dt.kind not in "biuf":
        raise src._bad(f"dtype {dt} is not numeric; store the rows as numbers")
    return _native(dt)


class _NpySource(Source):
    """A ``.npy`` file. Contiguous row ranges are read with ``pread`` into fresh arrays, not through the memory
    map: pages touched through a map stay in the process's resident set, so labelling a 10-million-row file
    made peak RSS grow to the file's size. Scattered rows (replay) still go through the map."""

    format = "npy"
    _handle_names = ("_mm", "_fd")

    def _probe(self):
        self._mm = None
        try:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise self._bad(f"not a readable .npy file ({e})") from None
        if arr.ndim < 1:
            raise self._bad("holds a scalar; rows need at least one axis")
        return arr.shape[0], tuple(arr.shape[1:]), _check_dtype(self, arr.dtype)

    def _open(self):
        self._mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        self._fd = None
        if self._mm.ndim and self._mm.flags.c_contiguous and hasattr(os, "preadv"):
            self._fd = os.open(self.path, os.O_RDONLY)

    def _close(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
        self._mm = self._fd = None

    def _slice(self, start, stop):
        if self._fd is None:
            return self._mm[start:stop]
        out = np.empty((stop - start,) + tuple(self._mm.shape[1:]), self._mm.dtype)
        view = memoryview(out).cast("B")
        pos, offset = 0, int(self._mm.offset) + start * (out.nbytes // max(stop - start, 1))
        while pos < len(view):
            got = os.preadv(self._fd, [view[pos:]], offset + pos)
            if got <= 0:
                raise self._bad(f"the file ended early (rows {start}-{stop}); was it truncated?")
            pos += got
        return out

    def _take(self, sorted_unique):
        return self._mm[sorted_unique]


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


class _NpzSource(Source):
    format = "npz"
    _handle_names = ("_arr",)

    def _probe(self):
        self._arr = None
        default = self.key is None
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise self._bad(f"not a readable .npz file ({e})") from None
        with zf:
            names = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            key = self.key or "x"
            if key not in names and default and len(names) == 1:
                key = next(iter(names))
            if key not in names:
                raise self._bad(f"{self.path.name} has no array {key!r}; it holds "
                                       f"{', '.join(sorted(names)) or 'no arrays'}; pick one with {self.path}:KEY")
            self.key, info = key, zf.getinfo(names[key])
            with zf.open(info) as member:
                header = _npy_header(member)
                if header is None:
                    raise self._bad(f"member {key} uses an .npy version this reader "
                                           "does not know; save it again with numpy.savez")
                shape, fortran, dt = header
            self._offset = None
            if info.compress_type == zipfile.ZIP_STORED:
                with open(self.path, "rb") as f:
                    f.seek(info.header_offset)
                    local = f.read(30)
                    if local[:4] == b"PK\x03\x04":
                        n_name, n_extra = struct.unpack("<HH", local[26:30])
                        f.seek(info.header_offset + 30 + n_name + n_extra)
                        if _npy_header(f) is not None:
                            self._offset = f.tell()
            self._member, self._shape, self._fortran, self._raw_dtype = names[key], shape, fortran, dt
            if default and key == "x" and "y" in names:
                with zf.open(names["y"]) as member:
                    self.labels = _as_labels(np.load(member, allow_pickle=False), f"{self.path}:y")
        if len(shape) < 1:
            raise self._bad(f"array {key!r} is a scalar; rows need at least one axis")
        if self.labels is not None and len(self.labels) < shape[0]:
            raise self._bad(f"labels 'y' have {len(self.labels)} rows but 'x' has "
                                   f"{shape[0]}; fix the file or pick the data with {self.path}:x")
        return shape[0], tuple(shape[1:]), _check_dtype(self, dt)

    def _open(self):
        if self._offset is not None:
            self._arr = np.memmap(self.path, dtype=self._raw_dtype, mode="r", offset=self._offset,
                                  shape=self._shape, order="F" if self._fortran else "C")
        else:  # compressed member: no seeking inside a deflate stream, so load it once
            with zipfile.ZipFile(self.path) as zf, zf.open(self._member) as member:
                self._arr = np.load(member, allow_pickle=False)

    def _slice(self, start, stop):
        return self._arr[start:stop]

    def _take(self, sorted_unique):
        return self._arr[sorted_unique]


def _h5_datasets(f) -> list[str]:
    import h5py

    found: list[str] = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    return found


class _H5Source(Source):
    format = "hdf5"
    _handle_names = ("_file", "_ds")

    def _probe(self):
        import h5py

        self._file = self._ds = None
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise self._bad(f"not a readable HDF5 file ({e})") from None
        with f:
            names = _h5_datasets(f)
            if self.key is None:
                if len(names) != 1:
                    raise self._bad(f"{self.path.name} holds {len(names)} datasets "
                                           f"({', '.join(names) or 'none'}); name one as {self.path}:DATASET")
                self.key = names[0]
            if self.key.strip("/") not in names:
                raise self._bad(f"{self.path.name} has no dataset {self.key!r}; it holds "
                                       f"{', '.join(names) or 'none'}")
            ds = f[self.key]
            if ds.ndim < 1:
                raise self._bad(f"dataset {self.key!r} is a scalar; rows need an axis")
            return ds.shape[0], tuple(ds.shape[1:]), _check_dtype(self, ds.dtype)

    def _open(self):
        import h5py

        self._file = h5py.File(self.path, "r")
        self._ds = self._file[self.key]

    def _close(self):
        if self._file is not None:
            self._file.close()
        self._file = self._ds = None

    def _slice(self, start, stop):
        return self._ds[start:stop]

    def _take(self, sorted_unique):
        return self._ds[sorted_unique]

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            try:
                self._close()
            except Exception:  # interpreter shutdown: h5py may already be gone
                pass


class _IdxSource(Source):
    format = "idx"
    _handle_names = ("_arr",)

    def _probe(self):
        self._arr = None
        self._gz = self.path.name.lower().endswith(".gz")
        try:
            with (gzip.open(self.path, "rb") if self._gz else open(self.path, "rb")) as f:
                magic = f.read(4)
                if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_DTYPES or magic[3] < 1:
                    raise self._bad(f"bad IDX magic {magic.hex() or '(empty)'}; "
                                           "the file is not IDX or is corrupt; download it again")
                ndim = magic[3]
                dims_raw = f.read(4 * ndim)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise self._bad(f"cannot read the IDX file ({e})") from None
        if len(dims_raw) != 4 * ndim:
            raise self._bad("IDX header is truncated; download the file again")
        shape = struct.unpack(f">{ndim}I", dims_raw)
        self._raw_dtype, self._shape = _IDX_DTYPES[magic[2]], tuple(int(s) for s in shape)
        self._offset = 4 + 4 * ndim
        self._expected = self._offset + int(np.prod(shape)) * self._raw_dtype.itemsize
        if not self._gz and self.path.stat().st_size != self._expected:
            raise self._bad(f"IDX header says {shape} ({self._expected} bytes) but the file "
                                   f"has {self.path.stat().st_size} bytes; the file is truncated or corrupt")
        return self._shape[0], self._shape[1:], _native(self._raw_dtype)

    def _open(self):
        if not self._gz:
            self._arr = np.memmap(self.path, dtype=self._raw_dtype, mode="r", offset=self._offset, shape=self._shape)
            return
        try:
            with gzip.open(self.path, "rb") as f:  # MNIST is 47 MB unpacked: decompress once, keep in memory
                buf = f.read()
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise self._bad(f"cannot decompress the IDX file ({e}); download it again") from None
        if len(buf) != self._expected:
            raise self._bad(f"IDX header says {self._shape} ({self._expected} bytes) but "
                                   f"the file unpacks to {len(buf)} bytes; the file is truncated or corrupt")
        self._arr = np.frombuffer(buf, dtype=self._raw_dtype, offset=self._offset).reshape(self._shape)

    def _slice(self, start, stop):
        return self._arr[start:stop]

    def _take(self, sorted_unique):
        return self._arr[sorted_unique]


class _ImageFolderSource(Source):
    format = "images"

    def _probe(self):
        from PIL import Image

        def images(folder: Path) -> list[Path]:
            return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

        subdirs = sorted(p for p in self.path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if self.key is not None:
            raise self._bad("an image folder takes no ':key'")
        if subdirs:
            self.class_names = [d.name for d in subdirs]
            files, labels = [], []
            for k, d in enumerate(subdirs):
                got = images(d)
                files += got
                labels += [k] * len(got)
            self.labels = np.asarray(labels, dtype=np.int64)
        else:
            files = images(self.path)
        if not files:
            raise self._bad(f"the folder holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                   "put images in it or in one sub-folder per class")
        self._all_files = files
        if self.limit is not None:
            files = files[: int(self.limit)]
        self._paths = files
        first = None
        for p in files:
            try:
                with Image.open(p) as im:
                    size, mode = im.size, ("L" if im.mode == "L" else "RGB")
            except OSError as e:
                raise self._bad(f"cannot read image {p} ({e})") from None
            if first is None:
                first = (size, mode, p)
            elif (size, mode) != first[:2]:
                raise self._bad(f"image {p} is {size[0]}x{size[1]} {mode} but {first[2]} is "
                                       f"{first[0][0]}x{first[0][1]} {first[1]}; all images must share size and mode")
        (w, h), mode, _ = first
        self._mode = mode
        return len(self._all_files), ((h, w) if mode == "L" else (h, w, 3)), np.dtype(np.uint8)

    def _open(self):
        pass

    def _load(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self._paths[i]) as im:
            return np.asarray(im if im.mode == self._mode else im.convert(self._mode), dtype=np.uint8)

    def _slice(self, start, stop):
        return np.stack([self._load(i) for i in range(start, stop)])

    def _take(self, sorted_unique):
        return np.stack([self._load(int(i)) for i in sorted_unique])

    def _files(self):
        return [(p.relative_to(self.path).as_posix(), p) for p in self._all_files]


_CLASSES = {"npy": _NpySource, "npz": _NpzSource, "hdf5": _H5Source, "idx": _IdxSource, "images": _ImageFolderSource}


def _resolve(spec: str, option: str) -> tuple[Path, str | None, str]:
    spec = str(spec)
    path, key = _split_spec(spec)
    if not path.exists():
        raise TransferSetError(f"{spec}: {path} does not exist; check the path", option=option)
    fmt = _format_of(path)
    if fmt is None:
        raise TransferSetError(f"{spec}: cannot tell the format of {path}; {_FORMAT_HELP}", option=option)
    if key is not None and fmt not in ("npz", "hdf5"):
        raise TransferSetError(f"{spec}: only .npz and HDF5 files take ':key'; drop ':{key}'", option=option)
    return path, key, fmt


def open_source(spec: str, limit: int | None = None, option: str = "data") -> Source:
    """Open ``spec`` (``file.npy``, ``file.npz[:key]``, ``file.h5[:dataset]``, IDX, image folder) lazily.

    Args:
        spec: the source as the user gave it.
        limit: use only the first ``limit`` rows.
        option: the option ``spec`` came from, named in errors (``data``; a reader replaying inputs from a
            moved source passes its own).
    """
    if limit is not None and int(limit) < 1:
        raise TransferSetError(f"must be at least 1, got {limit}", option="limit")
    path, key, fmt = _resolve(spec, option)
    return _CLASSES[fmt](str(spec), path, key, limit, option)


def _as_labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise TransferSetError(f"labels {name}: must be one integer per row (1-D), got shape {y.shape}")
    if y.dtype.kind == "b":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise TransferSetError(f"labels {name}: holds non-integer values; labels must be class numbers")
    elif y.dtype.kind not in "iu":
        raise TransferSetError(f"labels {name}: dtype {y.dtype} is not integer; labels must be class numbers")
    return y.astype(np.int64)


def read_labels(spec: str, rows: int | None = None, option: str = "labels") -> np.ndarray:
    """Integer labels (int64, 1-D) from ``.npy``, ``.npz[:key]`` (default ``y``), IDX or HDF5.

    Args:
        spec: the labels file as the user gave it.
        rows: the number of source rows; a longer file (the source was cut by ``limit``) is cut to match.
        option: the option ``spec`` came from, named in errors.
    """
    path, key, fmt = _resolve(spec, option)
    if fmt == "images":
        raise TransferSetError(f"{spec}: is a folder; give labels as .npy, .npz, HDF5 or IDX", option=option)
    if fmt == "npz" and key is None:
        key = "y"
    src = _CLASSES[fmt](str(spec), path, key, None, option)
    y = _as_labels(src.read(0, src.rows).reshape((src.rows,) + src.row_shape), spec)
    if rows is not None:
        if len(y) < rows:
            raise TransferSetError(f"{spec}: has {len(y)} labels but the source has {rows} rows; "
                                   "give one label per row", option=option)
        y = y[:rows]
    return y


def frame_labels(spec: str, rows: int, frames: int, classes: int) -> tuple[np.ndarray, str]:
    """Per-frame labels [rows, frames] int32 from an array file (-1: no label) and their sha256."""
    src = open_source(spec, option="labels")
    if src.rows < rows or tuple(src.row_shape) != (frames,) or np.dtype(src.dtype).kind not in "iu":
        raise TransferSetError(f"{spec}: per-frame labels must be integers [rows, frames] = [{rows}, {frames}] (the "
                               f"teachers give {frames} frames a row); got {np.dtype(src.dtype).name} "
                               f"[{src.rows}, {', '.join(map(str, src.row_shape))}]", option="labels")
    y = src.read(0, rows).astype(np.int64)
    if y.size and (y.min() < -1 or y.max() >= classes):
        bad = int(y.min()) if y.min() < -1 else int(y.max())
        raise TransferSetError(f"{spec}: holds label {bad}; frame labels are -1 (none) or 0 .. {classes - 1}",
                               option="labels")
    y = y.astype(np.int32)
    return y, hashlib.sha256(np.ascontiguousarray(y).tobytes()).hexdigest()
