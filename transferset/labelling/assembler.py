"""The shard assembler: turns labelled batches into shards, per-shard statistics and the manifest.

It owns the open :class:`~transferset.format.shards.ShardWriter`, the statistics of the shard being written and
the :class:`~transferset.format.schema.Manifest`. A shard is listed (and the manifest rewritten atomically) only
once its last row is written and the file renamed into place, so the manifest never lists a partial shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..format.card import write_card
from ..format.codecs import codec_for
from ..format.manifest import write_manifest
from ..format.schema import Manifest, ShardEntry, refuse_past_limits, shard_layout
from ..format.shards import TMP_PREFIX, ShardWriter, layout_chunk_rows, shard_name
from ..targets import combine_log_probs, soft_targets
from .half import cast_stored
from .batches import Batch
from .geometry import RowGeometry

__all__ = ["ShardStats", "ShardAssembler", "publish_set"]


def publish_set(folder: Path, m: Manifest) -> None:
    """Write the set's manifest.json, then its dataset card (the card follows the manifest: true at every step)."""
    write_manifest(folder, m)
    write_card(folder, m)


@dataclass
class ShardStats:
    """Sums over one shard's rows, stored in its manifest entry; the set's statistics add them up."""

    members: int
    temperatures: int
    labelled: int = 0
    ensemble_correct: int = 0
    member_correct: list[int] = field(default_factory=list)
    entropy_sum: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.member_correct = self.member_correct or [0] * self.members
        self.entropy_sum = self.entropy_sum or [0.0] * self.temperatures

    def add(self, logits: np.ndarray, entropy: np.ndarray, labels: np.ndarray,
            combined_t1: Callable[[], np.ndarray]) -> None:
        """Count one slice: member and ensemble hits on labelled rows, ``entropy`` [N, T] of every row at each
        temperature summed."""
        has = labels >= 0
        if has.any():
            self.labelled += int(has.sum())
            for i in range(logits.shape[1]):
                self.member_correct[i] += int((logits[has, i].argmax(-1) == labels[has]).sum())
            self.ensemble_correct += int((combined_t1()[has].argmax(-1) == labels[has]).sum())
        for j in range(self.temperatures):
            self.entropy_sum[j] += float(entropy[:, j].sum(dtype=np.float64))

    def to_json(self) -> dict:
        return {"labelled": self.labelled, "member_correct": self.member_correct,
                "ensemble_correct": self.ensemble_correct, "entropy_sum": self.entropy_sum}


class ShardAssembler:
    """Write labelled batches, in row order, into the shards of ``geometry`` inside ``folder``.

    Args:
        folder: the transfer-set folder.
        geometry: rows and shards of the run.
        manifest: the manifest being resumed, or None for a new set.
        new_manifest: ``new_manifest(num_classes)`` builds the manifest of a new set (no shards, no chunk_rows)
            once the first batch shows the number of classes.
        combine, weights, temperatures: how soft targets are made from the members' logits.
        compression: the HDF5 filter of every dataset (None: none).
        expected_shards: shards the manifest lists when complete (default: every shard of ``geometry``; a part
            lists only its own).
        publish: ``publish(manifest)`` writes the manifest after each shard (default: :func:`publish_set`).
        lists_bad_files: each shard's entry lists the files that could not be decoded (a photo run: their rows
            are kept, as blank views with label -1).

    Each shard field is written from the codec's encoding or else from the batch column of the same name, in
    ``shard_layout`` order: a source kind adds a field by filling that column, nothing here changes.
    """

    def __init__(self, folder: Path, geometry: RowGeometry, manifest: Manifest | None,
                 new_manifest: Callable[[int], Manifest], combine: str, weights: np.ndarray,
                 temperatures: Sequence[float], compression: str | None, expected_shards: int | None = None,
                 publish: Callable[[Path, Manifest], None] | None = None, lists_bad_files: bool = False,
                 tmp_prefix: str = TMP_PREFIX) -> None:
        self.folder, self.geometry, self.manifest = Path(folder), geometry, manifest
        self.tmp_prefix = tmp_prefix  # a claiming worker's own, so a worker that took a shard over never shares it
        self.expected_shards = geometry.num_shards if expected_shards is None else expected_shards
        self._publish = publish or publish_set
        self._new_manifest = new_manifest
        self.combine, self.weights, self.temperatures = combine, weights, [float(t) for t in temperatures]
        self.compression = compression
        self.rows_written = 0
        self.lists_bad_files = lists_bad_files
        self._writer: ShardWriter | None = None
        self._stats: ShardStats | None = None
        self._at = 0  # rows written into the open shard
        self._skipped: dict[int, list] = {}  # source index -> [source index, path, reason] in the open shard

    def _layout_manifest(self, num_classes: int) -> Manifest:
        if self.manifest is None:
            m = self._new_manifest(num_classes)
            refuse_past_limits(m)
            m.chunk_rows = layout_chunk_rows(shard_layout(m), min(self.geometry.shard_size, self.geometry.total_rows))
            self.manifest = m
        return self.manifest

    def _open_shard(self, k: int, num_classes: int) -> None:
        m = self._layout_manifest(num_classes)
        s0, s1 = self.geometry.shard_bounds(k)
        self._layout = shard_layout(m)
        self._writer = ShardWriter(self.folder / shard_name(k), s1 - s0, self._layout, m.chunk_rows,
                                   self.compression, tmp_prefix=self.tmp_prefix)
        self._stats = ShardStats(m.num_members, len(self.temperatures))
        self._at, self._skipped = 0, {}

    def add(self, batch: Batch) -> None:
        """Write ``batch`` (rows of one shard, following the rows written before); finish the shard at its end."""
        k = batch.shard
        logits = batch.logits
        if self._writer is None:
            self._open_shard(k, logits.shape[2])
        for entry in batch.skipped:
            self._skipped.setdefault(int(entry[0]), list(entry))
        if batch.rows:
            self._write_rows(batch)
        if batch.r1 == self.geometry.shard_bounds(k)[1]:
            self._finish_shard(k)

    def _write_rows(self, batch: Batch) -> None:
        logits, m = batch.logits, self.manifest
        codec, t_count = codec_for(m.codec), len(self.temperatures)
        # float32 maths (schema 4); a codec that stores each member's log-partitions, and the statistics' entropy,
        # come from the soft targets' own pass; float16 fields are rounded by ONNX Runtime (half.py)
        part = np.empty(logits.shape[:2] + (t_count,), np.float32) if codec.wants_log_partition else None
        ent = np.empty((len(logits), t_count), np.float32)
        st = soft_targets(logits, self.temperatures, self.combine, self.weights, part, dtype=np.float32, entropy=ent)
        encoded = codec.encode(logits, st, np.arange(batch.r0, batch.r1, dtype=np.int64), self.temperatures,
                               np.float32, part)
        hints = {h["field"]: batch.hints[h["field"]] for h in m.hints or ()}
        # in declaration order, as before: the order of writes decides where HDF5 puts each chunk (the bytes)
        arrays = {name: encoded[name] if name in encoded else hints[name] if name in hints else batch.columns[name]
                  for name in self._layout}
        self._writer.write(self._at, cast_stored(arrays, self._layout))
        self._at += batch.rows
        self._stats.add(logits, ent, batch.columns["labels"], lambda: self._combined_t1(logits, st))
        self.rows_written += batch.rows

    def _combined_t1(self, logits: np.ndarray, st: np.ndarray) -> np.ndarray:
        t1 = self.temperatures.index(1.0) if 1.0 in self.temperatures else None
        return st[:, t1] if t1 is not None else combine_log_probs(logits, 1.0, self.combine, self.weights, np.float32)

    def _finish_shard(self, k: int) -> None:
        digest = self._writer.finish()
        self._writer = None
        name = shard_name(k)
        m = self.manifest
        stats = self._stats.to_json()
        if self.lists_bad_files:
            stats["skipped"] = [self._skipped[i] for i in sorted(self._skipped)]
        entry = ShardEntry(name, self._at, digest, row_start=self.geometry.shard_bounds(k)[0],
                           bytes=(self.folder / name).stat().st_size, stats=stats)
        m.list_shards(m.shards + [entry], complete=len(m.shards) + 1 == self.expected_shards)
        self.publish(m)

    def publish(self, m: Manifest) -> None:
        self._publish(self.folder, m)

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); what the manifest lists stays valid."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
