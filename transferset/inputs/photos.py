"""Photo sources: a class-folder tree, a flat folder, or a file list; probing lists files and decodes nothing.

- **Class folders** (``root/<class>/**/<file>``): one sub-folder per class, searched recursively; classes are the
  sub-folder names in sorted order (label ``k`` is the ``k``-th name), files sorted by their relative path.
- **Flat folder**: every image below ``root`` (recursively), sorted, unlabelled.
- **File lists** (``list.txt`` or ``list.csv``): one ``path[,label]`` a line (CSV quoting; ``#`` comments and
  blank lines skipped; an optional ``path,label`` header); paths are relative to the list's folder (absolute
  ones are kept); labels are all integers, or else class names (sorted into ``class_names``); rows without a
  label get -1. The list's order is kept.

Hidden files and folders (``.name``) are skipped. A missing or unreadable listed file is found when it is
decoded (a :class:`~transferset.inputs.decode.BadImage`), never while probing, so a million-file list is
opened in the time it takes to read it.

Fingerprint (:meth:`PhotoSource.fingerprint`): ``"stat"`` (the default) hashes each file's relative path, size
and modification time in nanoseconds: cheap (one ``stat`` a file, no reads), and it changes when a file is
replaced, edited, added, removed or renamed; it also changes when a copy does not keep modification times
(``cp`` without ``-p``), which errs on the safe side. ``"sha256"`` hashes every file's bytes: exact and
portable across copies, at the cost of reading the whole collection once.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TransferSetError, printable
from .decode import BadImage, PhotoTransform, View, render_file
from .sources import Source, open_source

__all__ = ["PHOTO_EXTENSIONS", "LIST_SUFFIXES", "PhotoSource", "open_photo_source", "open_scored_source", "is_photo_spec",
           "list_photo_folder", "photo_listing"]

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LIST_SUFFIXES = (".txt", ".csv")
_HASH_CHUNK = 1 << 20
_HEADER_NAMES = ("path", "file", "filename", "image")


def _is_photo(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(PHOTO_EXTENSIONS)


def _walk(folder: Path) -> list[str]:
    """Relative POSIX paths of the photos below ``folder``, sorted by code point (platform independent)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder)
        found += [(rel / f).as_posix() for f in filenames if _is_photo(f)]
    return sorted(found)


def _raise(e: OSError) -> None:
    raise TransferSetError(f"cannot list {printable(e.filename)} ({e.strerror})", option="data")


def list_photo_folder(root: Path, layout: str = "auto") -> tuple[list[str], np.ndarray | None, list[str] | None]:
    """``(relative paths, labels or None, class names or None)`` of a photo folder, listing only.

    ``layout``: ``"classes"`` (one sub-folder per class), ``"flat"`` (all photos, unlabelled) or ``"auto"``
    (classes when ``root`` has a visible sub-folder).
    """
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if layout not in ("auto", "classes", "flat"):
        raise TransferSetError(f"must be auto, classes or flat, got {layout!r}", option="layout")
    if layout == "flat" or (layout == "auto" and not subdirs):
        return _walk(root), None, None
    if not subdirs:
        raise TransferSetError(f"{printable(root)} has no class sub-folders; put each class's photos in a "
                               "sub-folder named after it", option="data")
    paths, labels = [], []
    for k, name in enumerate(subdirs):
        got = _walk(root / name)
        paths += [f"{name}/{p}" for p in got]
        labels += [k] * len(got)
    return paths, np.asarray(labels, dtype=np.int64), subdirs


def _read_list(path: Path) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), 1)
                    if r and r[0].strip() and not r[0].lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TransferSetError(f"{printable(path)}: cannot read the file list ({e})", option="data") from None
    if rows and rows[0][1][0].strip().lower() in _HEADER_NAMES:
        rows = rows[1:]
    paths, raw = [], []
    for n, r in rows:
        if len(r) > 2:
            raise TransferSetError(f"{printable(path)} line {n}: expected path[,label], got {len(r)} fields; quote "
                                   "paths that hold commas", option="data")
        paths.append(r[0].strip())
        raw.append(r[1].strip() if len(r) == 2 and r[1].strip() else None)
    given = [v for v in raw if v is not None]
    if not given:
        return paths, None, None
    if all(_is_int(v) for v in given):
        return paths, np.asarray([int(v) if v is not None else -1 for v in raw], dtype=np.int64), None
    names = sorted(set(given))
    index = {name: k for k, name in enumerate(names)}
    return paths, np.asarray([index[v] if v is not None else -1 for v in raw], dtype=np.int64), names


def photo_listing(spec: str, layout: str = "auto") -> dict:
    """What a photo folder or file list lists, as JSON data: ``{"layout", "paths", "labels", "class_names"}``
    (``layout`` resolved: classes, flat or list). Fixed once, it gives every process the same rows."""
    path = Path(spec)
    if path.is_dir():
        paths, labels, names = list_photo_folder(path, layout)
        layout = ("flat" if names is None else "classes") if layout == "auto" else layout
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        (paths, labels, names), layout = _read_list(path), "list"
    else:
        raise TransferSetError(f"{printable(spec)}: give a photo folder or a .txt/.csv file list", option="data")
    return {"layout": layout, "paths": paths, "labels": None if labels is None else labels.tolist(),
            "class_names": names}


def _is_int(text: str) -> bool:
    t = text[1:] if text[:1] in "+-" else text
    return t.isdigit()


def is_photo_spec(spec: str) -> bool:
    """True when ``spec`` names a photo folder or a ``.txt``/``.csv`` file list."""
    p = Path(spec)
    return p.is_dir() or (p.is_file() and p.suffix.lower() in LIST_SUFFIXES)


class PhotoSource(Source):
    """Photos as rows of ``transform.row_shape`` uint8 (the clean view), plus per-view rendering for augmentation.

    ``read(start, stop)`` and ``read_rows`` decode in this process and raise
    :class:`~transferset.inputs.decode.BadImage` on a bad file; the labelling pipeline decodes through
    :class:`~transferset.labelling.photo_pool.DecodePool` instead, which can skip bad files.

    Attributes (beyond :class:`~transferset.inputs.sources.Source`'s): ``rel_paths`` (as listed),
    ``root`` (the folder paths are relative to), ``transform``, ``layout`` (classes, flat or list).
    """

    format = "photos"

    def __init__(self, spec: str, transform: PhotoTransform, layout: str = "auto", limit: int | None = None,
                 fingerprint_kind: str = "stat", listing: dict | None = None) -> None:
        if fingerprint_kind not in ("stat", "sha256"):
            raise TransferSetError(f"must be stat or sha256, got {fingerprint_kind!r}", option="fingerprint")
        self.transform, self.layout, self.fingerprint_kind = transform, layout, fingerprint_kind
        self._listing = listing  #: a listing fixed before (:func:`photo_listing`), used instead of listing again
        #: evaluation reads: a file that cannot be decoded gives a row of zeros, recorded here (row -> reason),
        #: for the caller to leave out (:func:`~transferset.training.scoring.source_metrics`); off, it raises
        self.skip_bad = False
        self.bad_rows: dict[int, str] = {}
        path = Path(spec)
        if not path.exists():
            raise TransferSetError(f"{printable(spec)}: does not exist; check the path", option="data")
        super().__init__(str(spec), path, None, limit)

    def _probe(self):
        listing = self._listing if self._listing is not None else photo_listing(self.spec, self.layout)
        self.root = self.path if self.path.is_dir() else self.path.parent
        self.layout = listing["layout"]
        paths, names = listing["paths"], listing["class_names"]
        labels = None if listing["labels"] is None else np.asarray(listing["labels"], dtype=np.int64)
        if not paths:
            raise TransferSetError(f"{printable(self.spec)}: lists no photos ({', '.join(PHOTO_EXTENSIONS)})",
                                   option="data")
        self.rel_paths: list[str] = paths
        self.labels, self.class_names = labels, names
        return len(paths), self.transform.row_shape, np.dtype(np.uint8)

    def path_of(self, i: int) -> str:
        """The file of source row ``i`` (relative paths joined to the root)."""
        return os.path.join(self.root, self.rel_paths[int(i)])

    def _open(self) -> None:
        pass

    def _slice(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self._clean(i) for i in range(start, stop)])

    def _take(self, sorted_unique: np.ndarray) -> np.ndarray:
        return np.stack([self._clean(int(i)) for i in sorted_unique])

    def _clean(self, i: int) -> np.ndarray:
        """Row ``i``'s clean view; with ``skip_bad``, a bad file gives zeros and is recorded in ``bad_rows``."""
        if not self.skip_bad:
            return self.render(i, 0)[0]
        try:
            return self.render(i, 0)[0]
        except BadImage as e:
            self.bad_rows[int(i)] = e.reason
            return np.zeros(self.transform.row_shape, np.uint8)

    def render(self, i: int, view_number: int, base_seed: int = 0) -> tuple[np.ndarray, View]:
        """Draw and render view ``view_number`` of row ``i`` in this process: ``(pixels, view)``."""
        return render_file(self.path_of(i), self.transform, base_seed=base_seed, source_index=int(i),
                           view_number=int(view_number))

    def replay(self, i: int, view_number: int, box: Any, flip: Any) -> np.ndarray:
        """The exact pixels of a stored view (view number, ``box`` = (left, top, width, height), ``flip``)."""
        return render_file(self.path_of(i), self.transform, self.transform.stored_view(view_number, box, flip))[0]

    def fingerprint(self) -> str:
        """sha256 over the listing (relative paths with size + mtime, or bytes), labels, classes and limit."""
        if self._fp is None:
            h = hashlib.sha256(f"photos-v1;{self.fingerprint_kind};{self.layout}\0".encode())
            for rel in self.rel_paths[: self.rows]:
                h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
                h.update(self._file_digest(os.path.join(self.root, rel)))
            if self.labels is not None:
                h.update(np.ascontiguousarray(self.labels[: self.rows], dtype="<i8").tobytes())
            h.update(repr(self.class_names).encode())
            self._fp = h.hexdigest()
        return self._fp

    def _file_digest(self, p: str) -> bytes:
        try:
            if self.fingerprint_kind == "stat":
                st = os.stat(p)
                return f"{st.st_size};{st.st_mtime_ns}\n".encode()
            fh = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    fh.update(chunk)
            return fh.digest()
        except OSError:
            return b"missing\n"

    def describe(self) -> dict[str, Any]:
        """JSON-safe description; records the Pillow and libjpeg-turbo versions, which bit-identical replay needs."""
        import PIL
        from PIL import features

        d = super().describe()
        d.update({"layout": self.layout, "fingerprint_kind": self.fingerprint_kind, "bad_files": "kept",
                  "classes": None if self.class_names is None else len(self.class_names),
                  "transform": self.transform.to_json(), "pillow": PIL.__version__,
                  "libjpeg_turbo": features.version("libjpeg_turbo")})
        return d


def open_photo_source(spec: str, transform: PhotoTransform, layout: str = "auto", limit: int | None = None,
                      fingerprint_kind: str = "stat", listing: dict | None = None) -> PhotoSource:
    """Open a photo folder or file list lazily (lists files, or takes ``listing``; decodes and opens none)."""
    if limit is not None and int(limit) < 1:
        raise TransferSetError(f"must be at least 1, got {limit}", option="limit")
    return PhotoSource(spec, transform, layout, limit, fingerprint_kind, listing)


def open_scored_source(spec: str, transform: PhotoTransform | None = None, limit: int | None = None,
                       option: str = "data") -> Source:
    """The rows a model is scored on (``evaluate``, ``train-student --eval-data``): a photo folder or list in the
    clean view of ``transform`` (resize, centre crop: the view ``label`` makes), a file that cannot be decoded left
    out of the score and counted, as ``label`` leaves it out of a set; any other ``spec`` an array source."""
    if transform is None or not is_photo_spec(str(spec)):
        return open_source(str(spec), limit=limit, option=option)
    clean = PhotoTransform(size=transform.size, resize=transform.resize, channels=transform.channels,
                           draft=transform.draft)
    try:
        src = open_photo_source(str(spec), clean, limit=limit)
    except TransferSetError as e:
        raise TransferSetError(e.message, e.exit_code, option=option) from None
    src.skip_bad = True
    return src
