"""One replay: the exact rows the teachers saw, rebuilt from the source and each row's trace (no stored pixels).

A row's trace is its ``source_index`` and ``view`` (and, for a photo set, its crop box and flip). An array set
replays the augmentation its manifest records (:func:`~transferset.inputs.augment.replay`); a photo set decodes the
file and renders the stored view with the transform it was labelled with
(:func:`~transferset.inputs.render.render_chunk`, the code ``label`` ran). Training (the reader), ``evaluate`` and
``verify --reteach`` all replay through :class:`Replay`.

The trust rule (docs/FORMAT.md, "What a reader refuses"): a set is untrusted, so the source is opened only when the
user names it, or when the manifest's source lies inside the set's own folder; never elsewhere on the manifest's
word alone. The source must have the fingerprint the manifest records.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FAILED, ReplayVersionWarning, TransferSetError, printable
from ..format.safety import source_inside
from ..format.schema import Manifest, source_format
from .augment import parse_augment, replay
from .decode import PhotoTransform
from .photos import PhotoSource, open_photo_source
from .render import PhotoTask, render_chunk
from .sources import Source, open_source

__all__ = ["TRACE_FIELDS", "PHOTO_FIELDS", "Replay", "trusted_source", "photo_transform", "version_note",
           "take_version_notes", "ReplayVersionWarning"]

#: shard fields every replay reads
TRACE_FIELDS = ("source_index", "view")
#: shard fields a photo replay reads beside them
PHOTO_FIELDS = ("photo_box", "photo_flip")


def trusted_source(root: Path, manifest: Manifest, source_override: Any, option: str = "source_override") -> str:
    """The source to replay from: ``source_override`` when given, else the manifest's source if it lies inside
    the set's folder (a relative path is taken from the folder); anything else is refused in one line."""
    if source_override is not None:
        return str(source_override)
    data = manifest.source.get("data")
    if not isinstance(data, str) or not data or "\0" in data:
        raise TransferSetError(f"is needed: inputs are not stored in {root} and its manifest names no source; give "
                               "the source, read without 'inputs' or relabel with stored inputs", option=option)
    cand = source_inside(root, data)
    if cand is None:
        raise TransferSetError(
            f"is needed: inputs are not stored in {root} and its manifest names {printable(data)[:200]}, which is not "
            "inside the set's folder; a source outside the set's folder is not opened on an untrusted set's word: "
            "give the source yourself, read without 'inputs' or relabel with stored inputs", option=option)
    return str(cand)


def photo_transform(manifest: Manifest) -> PhotoTransform:
    """The photo transform a photo set was labelled with, checked."""
    d = manifest.source.get("transform")
    try:
        return PhotoTransform.from_json(d)
    except (TypeError, KeyError, AttributeError, TransferSetError) as e:
        raise TransferSetError(f"manifest.json: source.transform {printable(d)!s:.200} is not a photo transform "
                               f"({e}); the manifest was edited or damaged") from None


def _changed(spec: str, have: str, want: Any, root: Path, option: str) -> TransferSetError:
    return TransferSetError(f"{printable(spec)}: the source changed since labelling (fingerprint {have[:16]} != "
                            f"{printable(want)[:16]} in {root}: a row or file added, removed or edited); restore the "
                            "original data, give its new location with this option, or read without 'inputs'",
                            option=option)


def _open_photos(spec: str, manifest: Manifest, option: str) -> PhotoSource:
    meta = manifest.source
    layout = meta.get("layout") if meta.get("layout") in ("classes", "flat") else "auto"
    kind = meta.get("fingerprint_kind") if meta.get("fingerprint_kind") in ("stat", "sha256") else "stat"
    limit = meta.get("limit")
    try:
        return open_photo_source(spec, photo_transform(manifest), layout=layout,
                                 limit=limit if isinstance(limit, int) and limit > 0 else None, fingerprint_kind=kind)
    except TransferSetError as e:
        raise TransferSetError(e.message, e.exit_code, option=option) from None


#: version notes of photo replays opened in this process, printed by the command line when its command succeeds
#: (:func:`take_version_notes`): a command that fails says only its one line, a replay failure naming the versions.
#: A program using the API gets each note as a :class:`ReplayVersionWarning` when the source is opened.
_NOTES: list[str] = []


def version_note(meta: dict) -> str | None:
    """What to tell a user whose Pillow / libjpeg-turbo differ from the ones that decoded a photo set's files (its
    manifest's ``source``), or None when they are the same: the replayed pixels may then differ slightly."""
    import PIL
    from PIL import features

    here = (PIL.__version__, features.version("libjpeg_turbo"))
    there = (meta.get("pillow"), meta.get("libjpeg_turbo"))
    if there == here:
        return None
    return (f"the set was labelled with Pillow {printable(there[0])!s:.40} / libjpeg-turbo {printable(there[1])!s:.40}, this is "
            f"{here[0]} / {here[1]}; replayed pixels may differ slightly")


def take_version_notes() -> list[str]:
    """The version notes of the photo replays opened in this process since the last call (each once)."""
    notes = list(_NOTES)  # each once: source() adds a note only when it is not there yet
    _NOTES.clear()
    return notes


class Replay:
    """Rebuilds a set's rows from its source: ``replay(trace)`` with ``trace`` holding :attr:`fields` [N] each.

    The source is resolved by the trust rule when the replay is made and opened lazily in the process that
    replays (checked against the manifest's fingerprint there); pickling drops it, so each DataLoader worker
    opens its own. A photo source holds no open file, so it is kept across a fork.
    """

    def __init__(self, root: str | os.PathLike, manifest: Manifest, source_override: Any = None,
                 option: str = "source_override") -> None:
        self.root, self.option = Path(root), option
        self.manifest = manifest
        self.photo = source_format(manifest) == "photos"
        self.fields = TRACE_FIELDS + (PHOTO_FIELDS if self.photo else ())
        self.shape = tuple(int(d) for d in manifest.input["shape"])
        self.dtype = np.dtype(manifest.input["dtype"])
        self.spec = trusted_source(self.root, manifest, source_override, option)
        #: a photo set whose bad files keep their rows: those rows are the blank view the teachers saw
        self.blank_sources = np.array(sorted({e["source_index"] for e in manifest.skipped_files()})
                                      if self.photo and manifest.source.get("bad_files") == "kept" else [], np.int64)
        self._source: Source | None = None
        self._pid: int | None = None
        #: a photo set's :func:`version_note` (known once the source is opened)
        self.version_note: str | None = None

    def source(self) -> Source:
        """The opened source for this process; refuses a source whose fingerprint changed."""
        if self._source is not None and (self._pid == os.getpid() or self.photo):
            return self._source
        meta = self.manifest.source
        if self.photo:
            src: Source = _open_photos(self.spec, self.manifest, self.option)
        else:
            src = open_source(self.spec, limit=meta["limit"] if "limit" in meta else meta.get("rows"),
                              option=self.option)
        if src.fingerprint() != meta.get("fingerprint"):
            raise _changed(self.spec, src.fingerprint(), meta.get("fingerprint"), self.root, self.option)
        if self.photo:
            self.version_note = version_note(meta)
            if self.version_note and self.version_note not in _NOTES:
                _NOTES.append(self.version_note)
                warnings.warn(self.version_note, ReplayVersionWarning, stacklevel=2)
        self._source, self._pid = src, os.getpid()
        return src

    def __call__(self, trace: dict[str, np.ndarray]) -> np.ndarray:
        """The rows [N, *input shape] in the input dtype, exactly as the teachers saw them."""
        sidx, view = np.asarray(trace["source_index"], np.int64), np.asarray(trace["view"])
        if self.photo:
            x = self._photos(sidx, view, trace["photo_box"], trace["photo_flip"])
        else:
            aug = self.manifest.augment
            x = replay(self.source(), sidx, view, parse_augment(aug.get("spec", "")), int(aug.get("seed", 0)))
        x = np.asarray(x, dtype=self.dtype)
        if x.shape != (len(sidx),) + self.shape:
            raise TransferSetError(f"replayed inputs have shape {x.shape[1:]}, the manifest says {self.shape}; "
                                   f"the source {self.spec} is not the one labelled")
        return x

    def _photos(self, sidx: np.ndarray, view: np.ndarray, box: np.ndarray, flip: np.ndarray) -> np.ndarray:
        """A photo view is its stored crop box and flip, rendered from the file; a bad file is one line."""
        src = self.source()
        if sidx.size and (sidx.min() < 0 or sidx.max() >= src.rows):
            raise TransferSetError(f"source_index {int(sidx.max() if sidx.max() >= src.rows else sidx.min())} is "
                                   f"outside the photo source's {src.rows} files; the set does not match it")
        blank = np.isin(sidx, self.blank_sources)
        tasks = [PhotoTask(int(i), int(v), src.path_of(int(i)), tuple(int(b) for b in bx), int(f))
                 for i, v, bx, f, no in zip(sidx, view, np.asarray(box), np.asarray(flip), blank) if not no]
        got = render_chunk(src.transform, 0, tasks)
        if got.bad:
            b = got.bad[0]
            note = f" ({self.version_note})" if self.version_note else ""
            raise TransferSetError(f"cannot replay row of source {b.source_index} ({printable(b.path)}): "
                                   f"{printable(b.reason)}; restore the photo or relabel{note}", FAILED)
        if not blank.any():
            return got.pixels
        x = np.zeros((len(sidx),) + src.transform.row_shape, got.pixels.dtype)
        x[~blank] = got.pixels
        return x

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None, "_pid": None}
