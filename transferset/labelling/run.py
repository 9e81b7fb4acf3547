"""A labelling run: everything a new set is made from, one interface per kind of row.

:class:`Run` is the interface the pipeline labels rows through (one distribution a row): :func:`array_run` makes
one over an array source and :func:`~.photo_label.photo_run` one over a photo folder or list. A run's
:meth:`Run.preparer` gives the batches (their columns named as ``shard_layout`` names the shard fields),
:meth:`Run.new_manifest` the manifest.

:class:`PositionRun` is the interface of a run whose rows carry a position axis (one distribution a token or a
frame): :class:`~.token_label.TokenRun` over token rows and :class:`~.frame_label.FrameRun` over per-frame rows,
written by :func:`~.position_writer.write_position_set`. A new source kind is one more run of either interface.
"""

from __future__ import annotations

import hashlib
import json
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from .. import __version__
from ..errors import TransferSetError
from ..format.codecs import resolve_codec
from ..format.schema import TARGETS_SCHEMA_VERSION, Manifest, schema_version_for
from ..format.shards import TMP_PREFIX
from ..inputs.augment import AugmentSpec, parse_augment
from ..inputs.sources import Source, open_source, read_labels
from ..targets import normalise_weights
from .batches import BatchPreparer
from .ensemble import Ensemble, Preprocess
from .geometry import RowGeometry
from .hints import hint_entries, parse_hints
from .options import LabelOptions
from .parts import threads_per_process

__all__ = ["Run", "Handoff", "PositionRun", "array_run", "array_preparer", "run_labels", "run_definition", "definition_hash", "stored_compression"]


def run_labels(o: LabelOptions, src: Source) -> tuple[np.ndarray | None, str | None]:
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


def run_definition(ens: Ensemble, src: Source, labels_fp: str | None, o: LabelOptions, spec: AugmentSpec,
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
class Handoff:
    """How a claiming worker passes ONNX Runtime from one shard's run to the next, so that it never waits.

    The next shard is claimed, its folder checked and its first batches prepared while this one's last batch is
    in inference; it starts its own inference when this one's is done (one at a time: each run has the cores).
    """

    #: the shard before's inference is done (None: there is none): wait for it before the first inference
    after: threading.Event | None
    #: called when this run's last batch goes into inference: the worker may claim and prepare its next shard
    last_batch: Callable[[], None]
    #: called once this run's last batch has been through the ensemble (its writer may still be writing)
    inferred: Callable[[], None]
    #: the worker's kept threads for the pipeline's prepare and write stages (``run(fn) -> Event``), or None for
    #: threads of the run's own (see :class:`~.claim.KeptThreads`)
    stages: Any = None


@dataclass(frozen=True)
class Run:
    """What one label run is: everything the manifest of a new set is made from."""

    ensemble: Ensemble
    source: Source
    spec: AugmentSpec
    options: LabelOptions
    weights: np.ndarray
    definition: dict
    definition_sha256: str
    geometry: RowGeometry
    #: ``make_preparer(run, labels)``: the preparing stage of this source kind (array rows, decoded photo views)
    make_preparer: Callable[["Run", np.ndarray | None], Any]
    part: tuple[int, int] | None = None
    tmp_prefix: str = TMP_PREFIX  #: the shards' temporary names (a claiming worker has its own)
    #: files that cannot be decoded keep their rows (marked: labels -1, listed in each shard's entry as skipped)
    lists_bad_files: bool = False
    #: a claiming worker's shard: its next shard is prepared beside this one's last batch, and infers after it
    handoff: Handoff | None = None

    def preparer(self, labels: np.ndarray | None):
        """The preparing stage of this run: ``preparer(shard, r0, r1)`` and ``preparer.batches(shards)``."""
        return self.make_preparer(self, labels)

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
            compression=stored_compression(o), expected_rows=int(self.geometry.total_rows),
            device=self.definition["provider"], definition_sha256=self.definition_sha256,
            extra={k: v for k, v in (("license", o.license), ("citation", o.citation),
                                      ("part", self._part_json())) if v})

    def _part_json(self) -> dict | None:
        return None if self.part is None else {"index": self.part[0], "count": self.part[1]}


def stored_compression(o: LabelOptions) -> str | None:
    return None if o.compression in (None, "none") else o.compression


def array_preparer(run: Run, labels: np.ndarray | None) -> BatchPreparer:
    """The preparing stage of an array run: source rows read, augmented and preprocessed."""
    return BatchPreparer(run.source, run.geometry, run.spec, run.options.seed, labels, run.ensemble.feed_plan())


def _hash_beside(src: Source) -> threading.Thread:
    """Start hashing the source's bytes (its fingerprint, part of the run's definition) in a thread, beside the
    sessions' creation: hashlib lets go of the GIL. A failure there is left for the definition's own call to
    raise, in the caller's thread, in one line."""
    def fingerprint() -> None:
        try:
            src.fingerprint()
        except Exception:  # the definition asks again and reports it
            pass

    t = threading.Thread(target=fingerprint, name="ts-fingerprint", daemon=True)
    t.start()
    return t


def array_run(ensemble: Sequence[str], data: str, o: LabelOptions) -> tuple[Run, np.ndarray | None]:
    o = replace(o, store_inputs=True if o.store_inputs is None else o.store_inputs)
    src = open_source(data, limit=o.limit)
    hashing = _hash_beside(src)
    labels, labels_fp = run_labels(o, src)
    spec = parse_augment(o.augment)
    if o.views > 0 and not spec.ops:
        raise TransferSetError(f"{o.augment!r} has no operation; views need at least one", option="augment")
    pre = Preprocess(o.scale, tuple(o.mean) if o.mean else None, tuple(o.std) if o.std else None, o.layout)
    ens = Ensemble(list(ensemble), preprocess=pre, device=o.device, input_name=o.input_name,
                   output_name=o.output_name, output_kind=o.output_kind, threads=threads_per_process(o.threads),
                   hints=parse_hints(o.hints, len(ensemble)), lanes=True)
    weights = normalise_weights(o.weights, len(ens.members))
    hashing.join()
    definition = run_definition(ens, src, labels_fp, o, spec, weights)
    run = Run(ens, src, spec, o, weights, definition, definition_hash(definition),
               RowGeometry(src.rows, o.views, o.clean_view, o.shard_size, o.batch_size), array_preparer)
    return run, labels


class PositionRun(ABC):
    """A run whose rows carry a position axis: it makes the manifest and encodes every shard field of a batch.

    Attributes every run sets: ``o`` (the :class:`~.options.LabelOptions`), ``total_rows``, ``definition`` and
    ``definition_sha256`` (what decides the bytes; a folder made with another definition is refused).
    """

    o: LabelOptions
    total_rows: int
    definition: dict
    definition_sha256: str

    @abstractmethod
    def new_manifest(self) -> Manifest:
        """The manifest of a new set, before its first shard (``chunk_rows`` set)."""

    @abstractmethod
    def encode(self, r0: int, r1: int, fdtype) -> tuple[dict[str, np.ndarray], dict]:
        """Every shard field of rows ``[r0, r1)``, in the order they are written, and the rows' statistics."""

    def prefetch(self, r0: int, r1: int) -> None:
        """Rows ``[r0, r1)`` come next: a run may start their inference now (the default does nothing)."""

    @abstractmethod
    def close(self) -> None:
        """Release the run's ONNX Runtime sessions (none left for a forked child to inherit)."""
