"""Stage 1 for photo folders and file lists: the teacher's input size, the crop views, parallel decoding.

:func:`photo_run` turns ``label``'s options into a :class:`~.run.Run` over a
:class:`~transferset.inputs.photos.PhotoSource`; the shared pipeline (:mod:`.pipeline`) then labels it with a
:class:`PhotoPreparer` in place of the array preparer. Views are decoded
in :class:`~.photo_pool.DecodePool` worker processes, whose ordered batches feed ONNX Runtime through the
pipeline's bounded queues.

Geometry with bad files: the run is laid out over *slots* (source row x view) exactly as an array run
(:class:`~.geometry.RowGeometry`); a slot whose file cannot be decoded gives no row. A file is bad or not by its
content alone, so which rows exist, their order and every shard's bytes are a pure function of the source, the
options and the shards written before: a killed run resumes at its next shard and writes the same bytes. Shard
``k`` covers slots ``[k * shard_size, ...)``; its rows are the good slots, numbered after the rows of the shards
before it (``row_start`` in the manifest), and its entry lists the files it left out.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import TransferSetError
from ..targets import normalise_weights
from ..inputs.augment import view_seed
from .batches import Batch
from ..inputs.decode import BadImage, PhotoTransform, parse_photo_augment
from .ensemble import Ensemble, FeedPlan, Member, Preprocess
from .geometry import RowGeometry
from .hints import parse_hints
from .options import NORMS, ON_BAD
from .run import Run, definition_hash, run_definition, run_labels
from ..inputs.render import PhotoBatch, PhotoTask, render_chunk
from .photo_pool import DecodePool
from ..inputs.photos import PhotoSource, open_photo_source, photo_listing

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NORMS", "PhotoAugment", "PhotoPreparer", "photo_preprocess",
           "teacher_input", "photo_run", "default_decode_workers", "photo_threads"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHUNK = 16  # tasks per decode job: small enough to spread a batch over the workers
_IN_FLIGHT_BYTES = 256 << 20  # decoded pixels in flight at most (34 chunks of 224 x 224 x 3 views take 82 MB)


def default_decode_workers() -> int:
    """Decode worker processes by default: every core but one for ONNX Runtime, at least 1."""
    return max(1, (os.cpu_count() or 2) - 1)


def photo_threads(threads: int | None, workers: int) -> int | None:
    """ONNX Runtime threads of a photo run: ``threads``, else the cores the decode workers leave (at least 1), so
    decoding and inference overlap instead of contending for the same cores."""
    if threads is not None or not workers:
        return threads
    return max(1, (os.cpu_count() or 1) - workers)


@dataclass(frozen=True)
class PhotoAugment:
    """The photo augmentation as the manifest records it (what :class:`~.augment.AugmentSpec` is for arrays)."""

    canonical: str
    transform: PhotoTransform

    @classmethod
    def of(cls, spec: str | None, transform: PhotoTransform) -> "PhotoAugment":
        parsed = parse_photo_augment(spec)
        items = []
        if "rrc_size" in parsed:
            t = transform
            items.append(f"rrc:{t.size}:{t.scale[0]:g}:{t.scale[1]:g}:{t.ratio[0]:g}:{t.ratio[1]:g}")
        if parsed.get("flip"):
            items.append("flip")
        return cls(",".join(items), transform)

    @property
    def ops(self) -> bool:
        return bool(self.canonical)

    def to_json(self) -> dict:
        return {"photo": self.transform.to_json()}


def photo_preprocess(norm: str | None, scale: float | None, mean: Sequence[float] | None,
                     std: Sequence[float] | None, layout: str) -> Preprocess:
    """The model input of a photo run: ``norm`` (``imagenet``: 1/255 then torchvision's mean and std) or the
    explicit scale, mean and std."""
    if norm is None:
        return Preprocess(scale, tuple(mean) if mean else None, tuple(std) if std else None, layout)
    if norm not in NORMS:
        raise TransferSetError(f"{norm!r}: choose {' or '.join(NORMS)}, or give scale, mean and std", option="norm")
    if scale is not None or mean or std:
        raise TransferSetError(f"{norm} sets the scale, mean and std; give either it or them", option="norm")
    return Preprocess(1 / 255, IMAGENET_MEAN, IMAGENET_STD, layout)


def _member_input(m: Member, layout: str | None) -> tuple[str, int | None, int | None]:
    dims = m.input_shape[1:]
    if len(dims) != 3:
        raise TransferSetError(f"{m.path}: input {m.input_name!r} has shape {m.input_shape}; a photo teacher takes "
                               "[N, C, H, W] or [N, H, W, C]")
    fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
    if layout is None:
        layout = "nhwc" if fixed[2] in (1, 3) and fixed[0] not in (1, 3) else "nchw"
    c, h, w = (fixed[0], fixed[1], fixed[2]) if layout == "nchw" else (fixed[2], fixed[0], fixed[1])
    if h is not None and w is not None and h != w:
        raise TransferSetError(f"{m.path}: takes {h}x{w} inputs; photo views are square crops")
    return layout, c, h


def teacher_input(members: Sequence[Member], layout: str | None) -> tuple[str, int, int | None]:
    """``(layout, channels, side or None)`` the teachers take, read from their ONNX inputs; members must agree."""
    got = [(m, _member_input(m, layout)) for m in members]
    first_m, (lay, c, side) = got[0]
    for m, (lay2, c2, side2) in got[1:]:
        if (lay2, c2, side2) != (lay, c, side):
            raise TransferSetError(f"{first_m.path.name} takes {lay} {c}x{side} inputs but {m.path.name} takes "
                                   f"{lay2} {c2}x{side2}; photo teachers must take the same input")
    if c not in (None, 1, 3):
        raise TransferSetError(f"{first_m.path}: takes {c} channels; photos decode to 1 (L) or 3 (RGB)")
    return lay, int(c or 3), side


def _crop_for(o: Any, side: int | None, member: Member) -> int | None:
    rrc = parse_photo_augment(o.augment).get("rrc_size")
    for name, asked in (("crop", o.crop), ("augment", rrc)):
        if asked is not None and side is not None and int(asked) != side:
            raise TransferSetError(f"gives {asked}x{asked} views but {member.path.name} takes {side}x{side} inputs; "
                                   f"use {side} (the crop defaults to the teacher's input size)", option=name)
    return o.crop if o.crop is not None else (rrc if rrc is not None else side)


@dataclass
class PhotoPreparer:
    """Batches of a photo run, decoded by worker processes, in slot order (see the module docstring).

    Attributes:
        source: the photo source. geometry: the run's slots and shards. seed: the augmentation seed.
        labels: int64 labels per source row, or None. feed_plan: how pixels become each member's input.
        workers: decode worker processes (0: decode in the preparing thread). on_bad: ``skip`` or ``fail``.
    """

    source: PhotoSource
    geometry: RowGeometry
    seed: int
    labels: np.ndarray | None
    feed_plan: FeedPlan
    workers: int
    on_bad: str

    def _tasks(self, r0: int, r1: int) -> list[PhotoTask]:
        sidx, view = self.geometry.trace(r0, r1)
        return [PhotoTask(int(i), int(v), self.source.path_of(int(i))) for i, v in zip(sidx, view)]

    def __call__(self, shard: int, r0: int, r1: int) -> Batch:
        """The batch of rows ``[r0, r1)``, decoded in this process (a part's look at the set's first batch)."""
        got = render_chunk(self.source.transform, self.seed, self._tasks(r0, r1))
        if got.bad and self.on_bad == "fail":
            raise BadImage(got.bad[0].path, got.bad[0].reason)
        return self._batch(shard, r0, r1, got)

    def batches(self, shards) -> Iterator[Batch]:
        """Every batch of the shards ``shards``, in order; the decode workers stop when the generator is closed."""
        spans: collections.deque = collections.deque()

        def groups() -> Iterator[list[PhotoTask]]:
            for span in self.geometry.batches(shards):
                spans.append(span)
                yield self._tasks(span[1], span[2])

        # two batches of chunks in flight: the workers decode the next batch while this one waits for ONNX Runtime
        # (with fewer, a worker idles whenever the pipeline's queue to inference is full; measured, BENCHMARKS.md)
        # at most _IN_FLIGHT_BYTES of decoded pixels waiting, whatever the crop size
        chunk_bytes = _CHUNK * int(np.prod(self.source.transform.row_shape))
        depth = min(2 * -(-self.geometry.batch_size // _CHUNK) + 2 * max(self.workers, 1),
                    max(2 * max(self.workers, 1), _IN_FLIGHT_BYTES // chunk_bytes))
        with DecodePool(self.source.transform, self.seed, self.workers, self.on_bad, chunk=_CHUNK,
                        depth=depth) as pool:
            for got in pool.imap_groups(groups()):
                yield self._batch(*spans.popleft(), got)

    def _batch(self, shard: int, r0: int, r1: int, got: PhotoBatch) -> Batch:
        """Every row of ``[r0, r1)``: a file that could not be decoded keeps its rows, as a blank view (pixels,
        box and flip 0) with label -1, listed in ``skipped``; the teachers see the blank view, so every shard's
        bytes depend on its rows alone, whichever process labels it."""
        sidx, view = self.geometry.trace(r0, r1)
        bad = {(b.source_index, b.view) for b in got.bad}
        ok = np.fromiter(((int(i), int(v)) not in bad for i, v in zip(sidx, view)), bool, len(sidx))
        pixels = np.zeros((len(sidx),) + got.pixels.shape[1:], got.pixels.dtype)
        boxes, flips = np.zeros((len(sidx), 4), np.int32), np.zeros(len(sidx), np.uint8)
        pixels[ok], boxes[ok], flips[ok] = got.pixels, got.boxes, got.flips
        labels = self.labels[sidx] if self.labels is not None else np.full(len(sidx), -1, np.int64)
        labels = np.where(ok, labels, -1)
        skipped = [[b.source_index, self.source.rel_paths[b.source_index], b.reason] for b in got.bad]
        columns = {"inputs": pixels, "source_index": sidx, "view": view,
                   "aug_seed": view_seed(self.seed, sidx, view).astype(np.uint64), "labels": labels,
                   "photo_box": boxes, "photo_flip": flips}
        return Batch(shard, r0, r1, columns, feeds=self.feed_plan(pixels), skipped=skipped)


@dataclass(frozen=True)
class PhotoPlan:
    """What a photo run adds to a :class:`~.run.Run`: decode workers and the bad-file rule."""

    workers: int
    on_bad: str

    def preparer(self, run: Any, labels: np.ndarray | None) -> PhotoPreparer:
        return PhotoPreparer(run.source, run.geometry, run.options.seed, labels, run.ensemble.feed_plan(),
                             self.workers, self.on_bad)


#: the listing of a photo source, fixed by the first process that labels into a folder (hidden: not part of the set)
PHOTO_LISTING = ".photo-listing.json"


def _checked_listing(d: Any, path: Path) -> dict:
    ok = (isinstance(d, dict) and d.get("layout") in ("classes", "flat", "list") and isinstance(d.get("paths"), list)
          and all(isinstance(p, str) for p in d["paths"])
          and (d.get("labels") is None or (isinstance(d["labels"], list) and len(d["labels"]) == len(d["paths"])
                                           and all(isinstance(v, int) and not isinstance(v, bool) for v in d["labels"])))
          and (d.get("class_names") is None or (isinstance(d["class_names"], list)
                                                and all(isinstance(n, str) for n in d["class_names"]))))
    if not ok:
        raise TransferSetError(f"{path}: is not a photo listing label wrote; remove it (the folder's first label "
                               "process lists the photos again)", option="out")
    return d


def fixed_listing(out: str | os.PathLike, data: str, overwrite: bool = False) -> dict:
    """The photo listing every process labelling ``data`` into ``out`` uses: read from ``out``'s listing file when
    an earlier process fixed it for the same ``data``, else listed now and stored there (the first of racing
    processes wins), so processes that list the folder later, or differently, label the same rows."""
    path, where = Path(out) / PHOTO_LISTING, str(Path(data).resolve())
    stored = _read_listing(path) if path.exists() and not overwrite else None
    if stored is not None and stored.get("data") == where:
        return stored
    listing = {**photo_listing(data), "data": where}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{PHOTO_LISTING}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(listing, sort_keys=True))
    try:
        if stored is not None or overwrite:  # another source's listing (or starting over): replaced
            os.replace(tmp, path)
            return listing
        try:
            os.link(tmp, path)  # fails when another process stored its listing first: theirs is used
        except FileExistsError:
            return _read_listing(path)
        return listing
    finally:
        tmp.unlink(missing_ok=True)


def _read_listing(path: Path) -> dict:
    try:
        return _checked_listing(json.loads(path.read_text(encoding="utf-8")), path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TransferSetError(f"{path}: cannot read the photo listing ({e}); remove it", option="out") from None


def photo_run(ensemble: Sequence[Any], data: str, o: Any, listing: dict | None = None) -> tuple[Any, np.ndarray | None]:
    """The run (and labels) of ``label`` over the photo folder or file list ``data``, options ``o``; ``listing``:
    the files as :func:`fixed_listing` fixed them (None: list them now)."""
    if o.on_bad_image not in ON_BAD:
        raise TransferSetError(f"must be skip or fail, got {o.on_bad_image!r}", option="on_bad_image")
    workers = default_decode_workers() if o.decode_workers is None else int(o.decode_workers)
    if workers < 0:
        raise TransferSetError(f"must be >= 0, got {workers}", option="decode_workers")
    ens = Ensemble(list(ensemble), device=o.device, input_name=o.input_name, output_name=o.output_name,
                   output_kind=o.output_kind, threads=photo_threads(o.threads, workers),
                   hints=parse_hints(o.hints, len(ensemble)))
    layout, channels, side = teacher_input(ens.members, o.layout)
    pre = photo_preprocess(o.norm, o.scale, o.mean, o.std, layout)
    for m in ens.members:
        m.preprocess = pre
    crop = _crop_for(o, side, ens.members[0])
    transform = PhotoTransform.from_options(crop, o.resize, o.augment, channels=channels)
    src = open_photo_source(data, transform, limit=o.limit, listing=listing)
    labels, labels_fp = run_labels(o, src)
    o = replace(o, store_inputs=bool(o.store_inputs), layout=layout, scale=pre.scale, mean=pre.mean, std=pre.std)
    spec = PhotoAugment.of(o.augment, transform)
    weights = normalise_weights(o.weights, len(ens.members))
    definition = run_definition(ens, src, labels_fp, o, spec, weights)
    d = src.describe()
    definition["photos"] = {"transform": d["transform"], "pillow": d["pillow"], "libjpeg_turbo": d["libjpeg_turbo"],
                            "bad_files": d["bad_files"]}
    geometry = RowGeometry(src.rows, o.views, o.clean_view, o.shard_size, o.batch_size)
    run = Run(ens, src, spec, o, weights, definition, definition_hash(definition), geometry,
              PhotoPlan(workers, o.on_bad_image).preparer, lists_bad_files=True)
    return run, labels
