"""Stage 1: run an ONNX ensemble over a data source and write a transfer set.

Three overlapping stages in threads (DESIGN.md): prepare (read + augment + preprocess) -> ``session.run`` for
every member -> one writer thread (combine, convert, write HDF5, checksum, manifest). ``session.run`` and
h5py release the GIL, so the stages overlap. Batches are laid out per shard from the shard's first row, so a
resumed run feeds the models exactly the batches an uninterrupted run would, and writes identical bytes.

The parts: :class:`~.geometry.RowGeometry` (which row is which view of which source row, in which shard),
:class:`~.folder.OutputFolder` (lock, debris, resume), :class:`~.batches.BatchPreparer` (the preparing stage),
:class:`LabelPipeline` (the threads) and :class:`~.assembler.ShardAssembler` (shards, statistics, manifest).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..errors import FAILED, TransferSetError
from ..format.card import write_card
from ..format.codecs import codec_for, resolve_codec
from ..format.manifest import read_manifest, write_part_manifest
from ..format.parts import merge_if_complete, part_lock_name, parts_state
from ..format.schema import (FLOAT_DTYPES, MANIFEST_NAME, MAX_TEMPERATURES, TARGETS_SCHEMA_VERSION, Manifest,
                             schema_version_for)
from ..format.shards import TMP_PREFIX, shard_name
from ..progress import progress_bar
from ..targets import COMBINE_RULES, normalise_weights
from .assembler import ShardAssembler
from .augment import AugmentSpec, parse_augment
from .batches import Batch, BatchPreparer
from .ensemble import Ensemble, Preprocess
from .frame_label import is_frame_teacher
from .lm_graph import is_decoder
from .folder import OutputFolder
from .geometry import RowGeometry
from .hints import hint_entries, parse_hints, reduce_hint
from .parts import resolve_part, threads_per_process
from .photos import is_photo_spec
from .sources import Source, open_source, read_labels
from ..wording import plural

__all__ = ["LabelOptions", "LabelResult", "LabelPipeline", "label", "DEFAULT_TEMPERATURES"]

DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)
LAYOUTS = ("nchw", "nhwc")
COMPRESSIONS = ("none", "lzf", "gzip")
_QUEUE_DEPTH = 3
_WRITE_ROWS = 4096  # rows per soft-target computation and HDF5 write (see LabelPipeline._write_loop)
_END = object()  # end of the batches, passed down the queues


@dataclass
class LabelOptions:
    """Every option of ``transferset label`` (the CLI maps its flags onto this one to one)."""

    labels: str | None = None
    limit: int | None = None
    input_name: str | None = None
    output_name: str | None = None
    output_kind: str | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None
    augment: str | None = None
    views: int = 0
    clean_view: bool = True
    seed: int = 0
    store_inputs: bool | None = None  #: None: stored for arrays, replayed for photos
    resize: int | None = None  #: photos: the clean view's shorter side
    crop: int | None = None  #: photos: the square the teachers see (default: their input size)
    norm: str | None = None  #: photos: "imagenet" sets scale, mean and std
    on_bad_image: str = "skip"  #: photos: "skip" (record and leave out) or "fail"
    decode_workers: int | None = None  #: photos: decode processes (default: cores - 1)
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES
    combine: str = "mean-probs"
    weights: Sequence[float] | None = None
    dtype: str = "float16"
    batch_size: int = 256
    shard_size: int = 65536
    compression: str | None = None
    device: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    quiet: bool = False
    license: str | None = None
    citation: str | None = None
    part: tuple[int, int] | None = None  #: ``(I, N)``: label part I of N (default: from torchrun or a Slurm array)
    claim: bool = False  #: take shards through lease files, with any number of workers sharing the folder
    lease_seconds: float = 60.0  #: a claimed shard's lease expires this long after its worker last touched it
    engine: str = "local"  #: "local" (this process, or its part) or "ray" (one Ray task per shard)
    ray_address: str | None = None  #: the Ray cluster (None: RAY_ADDRESS, or a local cluster for this run)
    ray_cpus: float = 1  #: CPUs each Ray task asks for (its ONNX Runtime threads)
    ray_gpus: float = 0  #: GPUs each Ray task asks for
    ray_retries: int = 3  #: times Ray runs a failed task again
    codec: str | None = None  # None: dense below codecs.DENSE_BELOW_CLASSES classes, else codecs.SPARSE_DEFAULT
    text: str | None = None  #: language-model teachers: raw text (.txt, .jsonl, .parquet) packed into rows
    tokenizer: str | None = None  #: the tokenizer.json that tokenizes ``text``
    seq_len: int | None = None  #: positions per row of packed ``text``
    text_field: str = "text"  #: the document's field in .jsonl (column in .parquet)
    hints: tuple[str, ...] = ()  #: ``TENSOR[:member=I][:reduce=R]`` each (labelling.hints)


@dataclass
class LabelResult:
    """What a label run did: ``status`` is ``written``, ``resumed`` or ``already-complete``."""

    out: Path
    manifest: dict
    status: str
    rows_written: int
    seconds: float
    rows_total: int = 0
    extra: dict = field(default_factory=dict)

    def summary_line(self) -> str:
        st = self.manifest.get("stats", {})
        if "claim" in self.extra:
            return self._claim_line()
        if self.extra.get("engine") == "ray":
            e, st = self.extra, self.manifest.get("stats", {})
            return (f"{self.out}: {e['tasks']} Ray task(s) in {e['processes']} worker process(es) wrote "
                    f"{self.rows_written} rows in {self.seconds:.1f} s; the set is complete: {st.get('rows', 0)} "
                    f"rows in {len(self.manifest['shards'])} shards")
        if "part" in self.extra:
            return self._part_line()
        if self.status == "already-complete":
            return (f"{self.out}: already complete ({plural(st.get('rows', 0), 'row')} in "
                    f"{plural(len(self.manifest['shards']), 'shard')}); nothing to do")
        rate = self.rows_written / self.seconds if self.seconds > 0 else float("nan")
        acc = st.get("ensemble_accuracy")
        acc_s = f", ensemble accuracy {acc:.4f} on labelled rows" if acc is not None else ""
        verb = "resumed and wrote" if self.status == "resumed" else "wrote"
        skipped = st.get("skipped_files")
        skip_s = "" if skipped is None else f"; {plural(skipped, 'bad image file')} skipped (listed by `transferset info`)"
        return (f"{self.out}: {verb} {plural(self.rows_written, 'row')} in {self.seconds:.1f} s ({rate:,.0f} rows/s); "
                f"{plural(st.get('rows', 0), 'row')} in {plural(len(self.manifest['shards']), 'shard')}{acc_s}{skip_s}")

    def _claim_line(self) -> str:
        e = self.extra
        shards = e["shards_labelled"]
        rate = self.rows_written / self.seconds if self.seconds > 0 else float("nan")
        did = (f"labelled {len(shards)} shard(s), {self.rows_written} rows in {self.seconds:.1f} s ({rate:,.0f} rows/s)"
               + (f", {len(e['taken_over'])} taken over from expired leases" if e["taken_over"] else "")
               if shards else "found no shard left to claim")
        st = self.manifest.get("stats", {})
        end = (f"the set is complete: {st.get('rows', 0)} rows in {len(self.manifest['shards'])} shards"
               + (" (merged by this worker)" if e["merged"] else "")) if self.manifest else "the set is not complete"
        return f"{self.out}: worker {e['claim']} {did}; {end}"

    def _part_line(self) -> str:
        index, count = self.extra["part"]
        rate = self.rows_written / self.seconds if self.seconds > 0 else float("nan")
        did = "already done" if self.status == "already-complete" else \
            f"{'resumed and wrote' if self.status == 'resumed' else 'wrote'} {self.rows_written} rows in " \
            f"{self.seconds:.1f} s ({rate:,.0f} rows/s)"
        if self.extra.get("merged"):
            st = self.manifest.get("stats", {})
            return (f"{self.out}: part {index} of {count} {did}; the set is complete: "
                    f"{plural(st.get('rows', 0), 'row')} in {plural(len(self.manifest['shards']), 'shard')}")
        return f"{self.out}: part {index} of {count} {did}; waiting for the others: {self.extra.get('waiting')}"


def _option_problems(o: LabelOptions) -> list[tuple[bool, str, str]]:
    """``(wrong, option, message)`` for every check of the options, in the order they are reported."""
    temps = list(o.temperatures)
    bad_t = next((t for t in temps if not (isinstance(t, (int, float)) and np.isfinite(t) and t > 0)), None)
    return [
        (o.views < 0, "views", f"must be >= 0, got {o.views}"),
        (o.views == 0 and not o.clean_view, "views", "0 without the clean view leaves no rows; ask for views"),
        (o.views > 0 and not o.augment, "augment", "is needed for views (a spec such as jitter:2)"),
        (o.batch_size < 1, "batch_size", f"must be >= 1, got {o.batch_size}"),
        (o.shard_size < 1, "shard_size", f"must be >= 1, got {o.shard_size}"),
        (o.limit is not None and o.limit < 1, "limit", f"must be >= 1, got {o.limit}"),
        (not temps, "temperatures", "needs at least one value"),
        (bad_t is not None, "temperatures", f"must be positive numbers, got {bad_t!r}"),
        (len(set(temps)) != len(temps), "temperatures", f"has repeated values: {temps}"),
        (o.claim and not (np.isfinite(o.lease_seconds) and o.lease_seconds > 0), "lease_seconds",
         f"must be a positive number of seconds, got {o.lease_seconds}"),
        (len(temps) > MAX_TEMPERATURES, "temperatures", f"has {len(temps)} values; a set stores at most "
                                                        f"{MAX_TEMPERATURES} (docs/FORMAT.md)"),
        (o.combine not in COMBINE_RULES, "combine", f"{o.combine!r}: choose one of {', '.join(COMBINE_RULES)}"),
        (o.dtype not in FLOAT_DTYPES, "dtype", f"{o.dtype!r}: choose {' or '.join(FLOAT_DTYPES)}"),
        (o.layout not in (None,) + LAYOUTS, "layout", f"{o.layout!r}: choose {' or '.join(LAYOUTS)}"),
        (o.compression not in (None,) + COMPRESSIONS, "compression",
         f"{o.compression!r}: choose {', '.join(COMPRESSIONS[:-1])} or {COMPRESSIONS[-1]}"),
        (o.scale is not None and not np.isfinite(o.scale), "scale", "must be a finite number"),
        (o.std is not None and any((not np.isfinite(s)) or s == 0 for s in o.std), "std",
         "values must be finite and non-zero"),
    ]


def _validate(o: LabelOptions) -> None:
    """Refuse the first wrong option, naming it (as data: the CLI spells the flag)."""
    if o.codec is not None:
        codec_for(o.codec)
    for wrong, option, message in _option_problems(o):
        if wrong:
            raise TransferSetError(message, option=option)


def _labels(o: LabelOptions, src: Source) -> tuple[np.ndarray | None, str | None]:
    """The int64 labels per source row (from ``o.labels`` or the source itself) and their sha256, or Nones."""
    if o.labels:
        labels = read_labels(o.labels, rows=src.rows)
    elif src.labels is not None:
        labels = np.asarray(src.labels, dtype=np.int64)
    else:
        return None, None
    return labels, hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()


def definition_hash(definition: dict) -> str:
    """sha256 of a run's definition (what decides the bytes written)."""
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def _definition(ens: Ensemble, src: Source, labels_fp: str | None, o: LabelOptions, spec: AugmentSpec,
                weights: np.ndarray) -> dict:
    """Everything that decides the bytes written; a folder made with another definition is refused."""
    codec = {"codec": o.codec} if o.codec not in (None, "dense") else {}  # dense definitions keep their hash
    hints = {"hints": [h.canonical for h in ens.hints]} if ens.hints else {}  # so do sets without hints
    return {
        **codec, **hints,
        "schema_version": TARGETS_SCHEMA_VERSION,  # float32 maths: a set begun by schema 1-3 code is not resumed
        "teachers": [[m.sha256, m.input_name, m.output_name] for m in ens.members],
        "output_kind_option": o.output_kind,
        "preprocess": Preprocess(o.scale, o.mean, o.std, o.layout).to_json(),
        "source": src.fingerprint(), "labels": labels_fp, "limit": o.limit,
        "augment": spec.canonical, "views": o.views, "clean_view": o.clean_view, "seed": o.seed,
        "store_inputs": o.store_inputs, "temperatures": [float(t) for t in o.temperatures], "combine": o.combine,
        "weights": [float(w) for w in weights], "dtype": o.dtype, "batch_size": o.batch_size,
        "shard_size": o.shard_size, "compression": o.compression, "provider": "cuda" if ens.cuda_id is not None else "cpu",
    }


@dataclass(frozen=True)
class _Run:
    """What one label run is: everything the manifest of a new set is made from."""

    ensemble: Ensemble
    source: Source
    spec: AugmentSpec
    options: LabelOptions
    weights: np.ndarray
    definition: dict
    definition_sha256: str
    geometry: RowGeometry
    part: tuple[int, int] | None = None
    photo: Any = None  #: a photo run's :class:`~.photo_label.PhotoPlan`, else None
    tmp_prefix: str = TMP_PREFIX  #: the shards' temporary names (a claiming worker has its own)

    def preparer(self, labels: np.ndarray | None):
        """The preparing stage of this run (array rows or decoded photo views)."""
        if self.photo is not None:
            return self.photo.preparer(self, labels)
        return BatchPreparer(self.source, self.geometry, self.spec, self.options.seed, labels, self.ensemble.feed_plan())

    def new_manifest(self, num_classes: int) -> Manifest:
        """The manifest of a new set, before its first shard (``chunk_rows`` is set by the assembler)."""
        o, src, ens = self.options, self.source, self.ensemble
        if src.class_names and len(src.class_names) != num_classes:
            raise TransferSetError(f"{src.spec}: has {len(src.class_names)} classes but the teachers output "
                                   f"{num_classes} scores; label with teachers of this label space", option="data")
        codec = resolve_codec(o.codec, num_classes)
        hints = hint_entries(ens.hints, ens.hint_shapes, o.dtype) if ens.hints else None
        return Manifest(
            codec=codec, schema_version=schema_version_for(codec, hints=bool(hints)), hints=hints,
            num_classes=int(num_classes), num_members=len(ens.members), teachers=[m.describe() for m in ens.members],
            temperatures=[float(t) for t in o.temperatures], combine=o.combine,
            weights=[float(w) for w in self.weights], dtype=o.dtype,
            input={"shape": list(src.row_shape), "dtype": np.dtype(src.dtype).name, "stored": bool(o.store_inputs)},
            augment={"spec": self.spec.canonical, "ops": self.spec.to_json(), "views": o.views,
                     "clean_view": o.clean_view, "views_per_row": self.geometry.views_per_row, "seed": o.seed},
            source={**src.describe(), "fingerprint": src.fingerprint(), "labels": o.labels,
                    "labels_sha256": self.definition["labels"]},
            tool_version=__version__, class_names=list(src.class_names) if src.class_names else None,
            preprocess=ens.members[0].preprocess.to_json(), batch_size=o.batch_size, shard_size=o.shard_size,
            compression=_compression(o), expected_rows=int(self.geometry.total_rows),
            device=self.definition["provider"], definition_sha256=self.definition_sha256,
            extra={k: v for k, v in (("license", o.license), ("citation", o.citation),
                                      ("part", self._part_json())) if v})

    def _part_json(self) -> dict | None:
        return None if self.part is None else {"index": self.part[0], "count": self.part[1]}


def _compression(o: LabelOptions) -> str | None:
    return None if o.compression in (None, "none") else o.compression


class LabelPipeline:
    """prepare (a thread) -> ``session.run`` (the calling thread) -> write (a thread), joined by bounded queues.

    Args:
        prepare: ``prepare(shard, r0, r1)`` gives the :class:`~.batches.Batch` of rows ``[r0, r1)``.
        ensemble: runs the members on a batch's feeds.
        assembler: writes labelled batches into shards and the manifest.
        geometry: the run's rows and shards.
        shards: the shards to write, in order (those a resumed manifest does not list yet).
        bar: a progress bar, or None.
    """

    def __init__(self, prepare: BatchPreparer, ensemble: Ensemble, assembler: ShardAssembler, geometry: RowGeometry,
                 shards: Sequence[int], bar=None) -> None:
        self.prepare, self.ensemble, self.assembler, self.geometry = prepare, ensemble, assembler, geometry
        self.shards, self.bar = list(shards), bar
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._prepared: queue.Queue = queue.Queue(_QUEUE_DEPTH)
        self._labelled: queue.Queue = queue.Queue(_QUEUE_DEPTH)

    def run(self) -> None:
        """Label every batch of ``shards``; raise the first error any stage met."""
        threads = [threading.Thread(target=self._prepare_loop, name="ts-prepare", daemon=True),
                   threading.Thread(target=self._write_loop, name="ts-write", daemon=True)]
        for t in threads:
            t.start()
        try:
            self._infer_loop()
        except BaseException as e:
            self._fail(e)
        finally:
            if not self._stop.is_set():  # normal end: let the writer drain the queue before stopping it
                threads[1].join()
            self._stop.set()
            for t in threads:
                t.join()
            if self.bar is not None:
                self.bar.close()
            self.assembler.abort()
        if self._errors:
            raise self._errors[0]

    # -- the three stages ------------------------------------------------------------------------------------
    def _prepare_loop(self) -> None:
        try:
            with contextlib.closing(self.prepare.batches(self.shards)) as batches:
                for batch in batches:
                    if not self._put(self._prepared, batch):
                        return
            self._put(self._prepared, _END)
        except BaseException as e:
            self._fail(e)

    def _infer_loop(self) -> None:
        while not self._stop.is_set():
            batch = self._get(self._prepared)
            if batch is None:
                return
            if batch is _END:
                self._put(self._labelled, _END)
                return
            if batch.rows:
                batch.logits, raw = self.ensemble.run_with_hints(batch.feeds, first_row=batch.r0)
                batch.hints = _reduced_hints(self.ensemble, raw)
            else:
                batch.logits = self._no_logits()
            batch.feeds = None
            if not self._put(self._labelled, batch):
                return

    def _no_logits(self) -> np.ndarray:
        """[0, M, C] logits of a batch whose photo files were all bad (C found on one blank view if not yet known)."""
        if self.ensemble.num_classes is None:
            blank = np.zeros((1,) + tuple(self.prepare.source.row_shape), self.prepare.source.dtype)
            self.ensemble.num_classes = self.ensemble.run(self.prepare.feed_plan(blank)).shape[2]
        return np.zeros((0, len(self.ensemble.members), self.ensemble.num_classes), np.float32)

    def _write_loop(self) -> None:
        # Inference batches are grouped into slices of about _WRITE_ROWS rows before the soft targets, the
        # statistics and the HDF5 writes: per-call overhead paid once per slice instead of once per batch, which
        # on a CPU is time taken from ONNX Runtime. Groups depend only on the batch sequence (they restart at
        # every shard), so the bytes written stay the same from run to run and across a resume.
        group: list[Batch] = []
        try:
            while True:
                batch = self._get(self._labelled)
                if batch is None or batch is _END:
                    return
                group.append(batch)
                shard_end = self.geometry.shard_bounds(batch.shard)[1]
                if batch.r1 < shard_end and batch.r1 - group[0].r0 < _WRITE_ROWS:
                    continue
                joined = Batch.join(group)
                group.clear()
                self.assembler.add(joined)
                if self.bar is not None:
                    self.bar.update(joined.r1 - joined.r0)
        except BaseException as e:
            self._fail(e)

    # -- queues that give up when a stage has failed -----------------------------------------------------------
    def _fail(self, e: BaseException) -> None:
        self._errors.append(e)
        self._stop.set()

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue):
        while not self._stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None


def _reduced_hints(ens: Ensemble, raw: list[np.ndarray]) -> dict[str, np.ndarray] | None:
    """Each hint's batch reduced (labelling.hints); the first batch fixes each tensor's per-row shape."""
    if not ens.hints:
        return None
    shapes = [list(r.shape[1:]) for r in raw]
    if ens.hint_shapes is None:
        ens.hint_shapes = shapes
    elif shapes != ens.hint_shapes:
        raise TransferSetError(f"hint tensors changed shape between batches ({ens.hint_shapes} -> {shapes}); a "
                               "hint needs a fixed shape a row", option="hint")
    return {f"hint_{k}": reduce_hint(r, h.reduce) for k, (h, r) in enumerate(zip(ens.hints, raw))}


def label(ensemble: Sequence[str | os.PathLike], data: str | None, out: str | os.PathLike,
          options: LabelOptions | None = None) -> LabelResult:
    """Label ``data`` with the ONNX ``ensemble`` into the transfer-set folder ``out`` (resuming if possible).

    ``data`` is an array source (:func:`~.sources.open_source`) or a photo folder or file list
    (:func:`~.photos.open_photo_source`, labelled by :func:`~.photo_label.photo_run`).
    """
    o = options or LabelOptions()
    _validate(o)
    if o.claim and o.part is not None:
        raise TransferSetError("cannot be combined with --claim: claiming workers take shards as they come",
                               option="part")
    if o.engine not in ("local", "ray"):
        raise TransferSetError(f"{o.engine!r}: choose local or ray", option="engine")
    if o.engine == "ray" and (o.claim or o.part is not None):
        raise TransferSetError("ray runs one task per shard; it cannot be combined with --claim or --part",
                               option="engine")
    first = ensemble[0] if ensemble else None
    if o.text is None and data is not None and is_frame_teacher(first, o.output_name):
        from .frame_label import label_frames

        return label_frames(ensemble, data, out, o)
    if o.text is not None or (data is not None and is_decoder(first, o.output_name)):
        return _label_tokens(ensemble, data, out, o)
    if data is None:
        raise TransferSetError("is needed (or text with a tokenizer, for language-model teachers)", option="data")
    part = None if o.claim else resolve_part(o.part)
    t_start = time.perf_counter()
    if is_photo_spec(str(data)):
        from .photo_label import photo_run

        run, labels = photo_run(ensemble, str(data), o)
    else:
        run, labels = _array_run(ensemble, data, o)
    try:
        if o.engine == "ray":
            return _label_with_ray(ensemble, data, Path(out), run, t_start)
        if o.claim:
            return _label_claiming(Path(out), run, labels, t_start)
        if part is not None:
            if run.photo is not None:
                raise TransferSetError("cannot be combined with a photo source yet: a shard's first row depends on "
                                       "the bad files left out before it; label photos in one process", option="part")
            run = replace(run, part=part)
        with OutputFolder(out, part_lock_name(*part) if part else ".lock") as folder:
            try:
                return (_label_part if part else _label_into)(folder, run, labels, t_start)
            except OSError as e:  # disk full, permission denied, read-only folder: what was listed stays valid
                where = f" ({e.filename})" if e.filename else ""
                raise TransferSetError(f"labelling {folder.path} failed: {e.strerror or e}{where}; the shards listed "
                                       "so far are complete; free space or fix permissions, then run the same "
                                       "command to resume", FAILED) from None
    finally:
        run.ensemble.close()  # no session left to be inherited by a later fork (Ensemble.close)


def _label_tokens(ensemble: Sequence[str | os.PathLike], data: str | None, out, o: LabelOptions) -> LabelResult:
    from .token_label import label_tokens
    from .tokens import open_ids, pack_text

    if o.text is not None:
        if data is not None:
            raise TransferSetError("and text are two sources; give one", option="data")
        if o.tokenizer is None:
            raise TransferSetError("is needed to tokenize text (a tokenizers tokenizer.json)", option="tokenizer")
        rows = pack_text(o.text, o.tokenizer, o.seq_len, o.text_field, o.limit)
    else:
        rows = open_ids(str(data), o.limit)
    return label_tokens(ensemble, rows, out, o)


def _array_run(ensemble: Sequence[str | os.PathLike], data: str, o: LabelOptions) -> tuple[_Run, np.ndarray | None]:
    o = replace(o, store_inputs=True if o.store_inputs is None else o.store_inputs)
    src = open_source(data, limit=o.limit)
    labels, labels_fp = _labels(o, src)
    spec = parse_augment(o.augment)
    if o.views > 0 and not spec.ops:
        raise TransferSetError(f"{o.augment!r} has no operation; views need at least one", option="augment")
    pre = Preprocess(o.scale, tuple(o.mean) if o.mean else None, tuple(o.std) if o.std else None, o.layout)
    ens = Ensemble(list(ensemble), preprocess=pre, device=o.device, input_name=o.input_name,
                   output_name=o.output_name, output_kind=o.output_kind, threads=threads_per_process(o.threads),
                   hints=parse_hints(o.hints, len(ensemble)))
    weights = normalise_weights(o.weights, len(ens.members))
    definition = _definition(ens, src, labels_fp, o, spec, weights)
    run = _Run(ens, src, spec, o, weights, definition, definition_hash(definition),
               RowGeometry(src.rows, o.views, o.clean_view, o.shard_size, o.batch_size))
    return run, labels


def _write_shards(run: _Run, out: Path, manifest: Manifest | None, shards: list[int], labels: np.ndarray | None,
                  publish=None) -> ShardAssembler:
    """Label the shards of ``shards`` that ``manifest`` (being resumed, or None) does not list yet."""
    o, ens, geometry = run.options, run.ensemble, run.geometry
    prepare = run.preparer(labels)
    if manifest is not None and resolve_codec(o.codec, manifest.num_classes) != manifest.codec:
        raise TransferSetError(f"{out}: holds a {manifest.codec} set, not {resolve_codec(o.codec, manifest.num_classes)}; "
                               "choose another folder, or start over with overwrite", option="codec")
    if manifest is not None:  # resume: the recorded output kinds hold, whatever batch comes first now
        for m, t in zip(ens.members, manifest.teachers):
            m.output_kind = t["output_kind"]
        ens.num_classes = manifest.num_classes
    elif run.part is not None and any(m.output_kind is None for m in ens.members):
        # a part's first batch is not the set's: detect output kinds on the set's first batch, as one run does
        k, r0, r1 = next(geometry.batches([0]))
        ens.run(prepare(k, r0, r1).feeds, first_row=r0)
    listed = {s.path for s in manifest.shards} if manifest is not None else set()
    todo = [k for k in shards if shard_name(k) not in listed]
    assembler = ShardAssembler(out, geometry, manifest, run.new_manifest, o.combine, run.weights, o.temperatures,
                               _compression(o), expected_shards=len(shards), publish=publish,
                               photos=run.photo is not None, tmp_prefix=run.tmp_prefix)
    total = geometry.rows_of(shards)
    bar = progress_bar(total, desc="label", initial=total - geometry.rows_of(todo), quiet=o.quiet)
    LabelPipeline(prepare, ens, assembler, geometry, todo, bar).run()
    return assembler


def _label_into(folder: OutputFolder, run: _Run, labels: np.ndarray | None, t_start: float) -> LabelResult:
    o, geometry, out = run.options, run.geometry, folder.path
    manifest = folder.existing(run.definition_sha256, o.overwrite)
    if manifest is not None and manifest.complete:
        write_card(out, manifest)  # a card lost or edited since is made true again
        return LabelResult(out, manifest.to_json(), "already-complete", 0, time.perf_counter() - t_start)
    assembler = _write_shards(run, out, manifest, geometry.part_shards(None), labels)
    final = assembler.manifest
    if final is None or not final.complete:
        raise TransferSetError(f"labelling {out} stopped before the last shard", FAILED)
    return LabelResult(out, final.to_json(), "resumed" if manifest is not None else "written",
                       assembler.rows_written, time.perf_counter() - t_start, geometry.total_rows)


def _label_with_ray(ensemble, data: str, out: Path, run: _Run, t_start: float) -> LabelResult:
    """``--engine ray``: one Ray task per shard (:mod:`.ray_engine`), each labelled as a part of its own."""
    from .ray_engine import RaySpec, import_ray, label_with_ray

    o = run.options
    if run.photo is not None:
        raise TransferSetError("cannot be combined with a photo source yet: a shard's first row depends on the bad "
                               "files left out before it; label photos in one process", option="engine")
    if o.overwrite:
        raise TransferSetError("cannot be combined with --engine ray (the tasks share the folder); empty the folder "
                               "or choose another one", option="overwrite")
    spec = RaySpec(o.ray_address, o.ray_cpus, o.ray_gpus, o.ray_retries)
    import_ray()  # refuse before anything is written when the extra is missing
    run.ensemble.close()  # the driver only counted the shards; the tasks open their own sessions
    got = label_with_ray([str(e) for e in ensemble], str(data), out, o, run.geometry.num_shards, spec)
    if not (out / MANIFEST_NAME).exists():
        merge_if_complete(out)  # every task done; a merge that a last task could not finish
    final = read_manifest(out)
    return LabelResult(out, final.to_json(), "written", got["rows"], time.perf_counter() - t_start,
                       run.geometry.total_rows, {"engine": "ray", "tasks": got["tasks"],
                                                 "processes": len(got["pids"])})


def _label_claiming(out: Path, run: _Run, labels: np.ndarray | None, t_start: float) -> LabelResult:
    """``--claim``: take shards through leases (:mod:`.claim`), each labelled as a part of its own; the worker that
    finishes the last shard merges the set."""
    from .claim import claim_shards, claimed_run, lock_of

    if run.photo is not None:
        raise TransferSetError("cannot be combined with a photo source yet: a shard's first row depends on the bad "
                               "files left out before it; label photos in one process", option="claim")
    if run.options.overwrite:
        raise TransferSetError("cannot be combined with --claim (the folder is shared with the other workers); empty "
                               "the folder or choose another one", option="overwrite")
    count = run.geometry.num_shards
    worker_run = replace(run, tmp_prefix=f"{TMP_PREFIX}claim-{os.getpid()}-{uuid.uuid4().hex[:8]}-")

    def label_shard(k: int) -> tuple[int, bool]:
        with contextlib.ExitStack() as stack:
            try:
                folder = stack.enter_context(OutputFolder(out, lock_of(k, count)))
            except TransferSetError as e:  # a stalled worker on this machine still writes it: leave it to that one
                if "another `transferset label`" not in e.message:
                    raise
                time.sleep(0.2)
                return 0, False
            res = _label_part(folder, claimed_run(worker_run, k, count), labels, time.perf_counter())
        return res.rows_written, bool(res.extra.get("merged_here"))

    report = claim_shards(out, count, label_shard, run.options.lease_seconds)
    final = read_manifest(out).to_json() if (out / MANIFEST_NAME).exists() else {}
    extra = {"claim": report.worker, "shards_labelled": report.shards, "taken_over": report.taken_over,
             "merged": report.merged}
    return LabelResult(out, final, "written" if report.shards else "already-complete", report.rows_written,
                       time.perf_counter() - t_start, run.geometry.total_rows, extra)


def _label_part(folder: OutputFolder, run: _Run, labels: np.ndarray | None, t_start: float) -> LabelResult:
    """Label this part's shards into the shared folder, then merge the set if every part is done."""
    o, geometry, out, part = run.options, run.geometry, folder.path, run.part
    if o.overwrite:
        raise TransferSetError("cannot be combined with a part (the folder is shared with the other parts); empty "
                               "the folder or choose another one", option="overwrite")
    shards = geometry.part_shards(part)
    own, merged = folder.existing_part(run.definition_sha256, part, [shard_name(k) for k in shards])
    extra: dict = {"part": part, "merged": merged is not None}
    if merged is not None:  # merged before; a merge killed half-way has its card and clean-up finished here
        merged = merge_if_complete(out)
        return LabelResult(out, merged.to_json(), "already-complete", 0, time.perf_counter() - t_start, extra=extra)
    status, rows = "already-complete", 0
    if shards and not (own is not None and own.complete):
        assembler = _write_shards(run, out, own, shards, labels, publish=write_part_manifest)
        status, rows, own = ("resumed" if own is not None else "written"), assembler.rows_written, assembler.manifest
        if own is None or not own.complete:
            raise TransferSetError(f"labelling part {part[0]} of {part[1]} into {out} stopped before its last shard",
                                   FAILED)
    wrote: list = []
    merged = merge_if_complete(out, wrote=wrote)
    state = parts_state(out) if merged is None else None
    extra.update(merged=merged is not None, merged_here=bool(wrote),
                 waiting=state.describe() if state else "merged by another part")
    final = merged if merged is not None else own
    return LabelResult(out, final.to_json() if final is not None else {}, status, rows,
                       time.perf_counter() - t_start, geometry.rows_of(shards), extra)
