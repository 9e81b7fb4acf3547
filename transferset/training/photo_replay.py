"""Stage 2 for photo sets: rebuild each row's pixels from the source file, bit for bit what the teacher saw.

A photo set stores per row the source index, the view number and the view's crop box and flip
(``photo_box``, ``photo_flip``); :func:`replay_photo_inputs` decodes the file and renders that view with the
transform the manifest records (:class:`~transferset.labelling.decode.PhotoTransform`), the same code label ran.
It holds no open handle, so a :class:`~transferset.training.reader.TransferSetDataset` forked into DataLoader
workers replays there (fork-safe; each worker decodes its own rows).

The set is untrusted (docs/FORMAT.md, "What a reader refuses"): the source is opened only when the user names it
(``source_override``), or when the manifest's source lies inside the set's own folder, never elsewhere on the
manifest's word alone; its listing must match the recorded fingerprint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FAILED, TransferSetError, printable
from ..format.safety import source_inside

__all__ = ["PHOTO_FIELDS", "is_photo_set", "trusted_source_spec", "photo_layout", "open_photo_replay_source", "set_transform", "replay_photo_inputs"]

#: shard fields a photo replay reads beside ``source_index`` and ``view``
PHOTO_FIELDS = ("photo_box", "photo_flip")


def is_photo_set(manifest: dict) -> bool:
    """True for a set labelled from a photo folder or file list."""
    src = manifest.get("source")
    return isinstance(src, dict) and src.get("format") == "photos"


def photo_layout(manifest: dict) -> dict[str, tuple[tuple, np.dtype]]:
    """Row shape and dtype of the photo fields of ``manifest``'s shards (empty for other sets)."""
    if not is_photo_set(manifest):
        return {}
    return {"photo_box": ((4,), np.dtype(np.int32)), "photo_flip": ((), np.dtype(np.uint8))}


def set_transform(manifest: dict):
    """The photo transform a photo set was labelled with, checked."""
    from ..labelling.decode import PhotoTransform

    d = manifest["source"].get("transform")
    try:
        return PhotoTransform.from_json(d)
    except (TypeError, KeyError, AttributeError, TransferSetError) as e:
        raise TransferSetError(f"manifest.json: source.transform {printable(d)!s:.200} is not a photo transform "
                               f"({e}); the manifest was edited or damaged") from None


def trusted_source_spec(root: Path, manifest: dict, source_override: Any) -> str:
    """The source to replay from: ``source_override`` when given, else the manifest's source if it lies inside
    the set's folder (a relative path is taken from the folder); anything else is refused."""
    if source_override is not None:
        return str(source_override)
    data = manifest["source"].get("data")
    if not isinstance(data, str) or not data or "\0" in data:
        raise TransferSetError(f"is needed: {root} does not store its inputs and its manifest names no usable "
                               "source", option="source_override")
    cand = source_inside(root, data)
    if cand is None:
        raise TransferSetError(f"is needed: {root} was labelled from {printable(data)}, which is not inside the "
                               "set's folder; a set is untrusted, so name its source yourself", option="source_override")
    return str(cand)


def open_photo_replay_source(root: str | os.PathLike, manifest: dict, source_override: Any = None):
    """The :class:`~transferset.labelling.photos.PhotoSource` to replay ``manifest``'s rows from, checked."""
    from ..labelling.photos import open_photo_source

    root = Path(root)
    src_m = manifest["source"]
    spec = trusted_source_spec(root, manifest, source_override)
    layout = src_m.get("layout") if src_m.get("layout") in ("classes", "flat") else "auto"
    kind = src_m.get("fingerprint_kind") if src_m.get("fingerprint_kind") in ("stat", "sha256") else "stat"
    limit = src_m.get("limit")
    try:
        src = open_photo_source(spec, set_transform(manifest), layout=layout,
                                limit=limit if isinstance(limit, int) and limit > 0 else None, fingerprint_kind=kind)
    except TransferSetError as e:
        raise TransferSetError(e.message, e.exit_code, option="source_override") from None
    if src.fingerprint() != src_m.get("fingerprint"):
        raise TransferSetError(f"the photos at {printable(spec)} differ from those labelled (fingerprint "
                               f"{src.fingerprint()[:12]} != {str(src_m.get('fingerprint'))[:12]}: a file added, removed, "
                               "edited or copied without its times); restore them or name the right folder",
                               option="source_override")
    _warn_versions(src_m)
    return src


def _warn_versions(src_m: dict) -> None:
    import PIL
    from PIL import features

    here = (PIL.__version__, features.version("libjpeg_turbo"))
    there = (src_m.get("pillow"), src_m.get("libjpeg_turbo"))
    if there != here:
        print(f"transferset: warning: the set was labelled with Pillow {printable(there[0])} / libjpeg-turbo "
              f"{printable(there[1])}, this is {here[0]} / {here[1]}; replayed pixels may differ slightly",
              file=sys.stderr)


def replay_photo_inputs(manifest: dict, source: Any, source_index: np.ndarray, view: np.ndarray,
                        photo_box: np.ndarray, photo_flip: np.ndarray) -> np.ndarray:
    """The uint8 pixels [N, size, size, channels] of rows given by their trace columns, rendered in this process.

    Raises one TransferSetError naming the file when a row's file is missing, unreadable or no longer the
    size its crop box was drawn on.
    """
    from ..labelling.photo_pool import PhotoTask, render_chunk

    sidx = np.asarray(source_index, dtype=np.int64)
    if sidx.size and (sidx.min() < 0 or sidx.max() >= source.rows):
        raise TransferSetError(f"source_index {int(sidx.max() if sidx.max() >= source.rows else sidx.min())} is "
                               f"outside the photo source's {source.rows} files; the set does not match it")
    tasks = [PhotoTask(int(i), int(v), source.path_of(int(i)), tuple(int(b) for b in box), int(f))
             for i, v, box, f in zip(sidx, np.asarray(view), np.asarray(photo_box), np.asarray(photo_flip))]
    got = render_chunk(source.transform, 0, tasks)
    if got.bad:
        b = got.bad[0]
        raise TransferSetError(f"cannot replay row of source {b.source_index} ({printable(b.path)}): "
                               f"{printable(b.reason)}; restore the photo or relabel", FAILED)
    return got.pixels
