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
from ..format.codecs import encode
from ..format.manifest import write_manifest
from ..format.schema import Manifest, ShardEntry, shard_layout
from ..format.shards import ShardWriter, layout_chunk_rows, shard_name
from ..targets import combine_log_probs, entropy_from_log_probs, soft_targets
from .batches import Batch
from .geometry import RowGeometry

__all__ = ["ShardStats", "ShardAssembler"]


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

    def add(self, logits: np.ndarray, st: np.ndarray, labels: np.ndarray, combined_t1: Callable[[], np.ndarray]) -> None:
        """Count one slice: member and ensemble hits on labelled rows, entropy of every row at each temperature."""
        has = labels >= 0
        if has.any():
            self.labelled += int(has.sum())
            for i in range(logits.shape[1]):
                self.member_correct[i] += int((logits[has, i].argmax(-1) == labels[has]).sum())
            self.ensemble_correct += int((combined_t1()[has].argmax(-1) == labels[has]).sum())
        ent = entropy_from_log_probs(st)  # [N, T]
        for j in range(self.temperatures):
            self.entropy_sum[j] += float(ent[:, j].sum())

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
    """

    def __init__(self, folder: Path, geometry: RowGeometry, manifest: Manifest | None,
                 new_manifest: Callable[[int], Manifest], combine: str, weights: np.ndarray,
                 temperatures: Sequence[float], compression: str | None) -> None:
        self.folder, self.geometry, self.manifest = Path(folder), geometry, manifest
        self._new_manifest = new_manifest
        self.combine, self.weights, self.temperatures = combine, weights, [float(t) for t in temperatures]
        self.compression = compression
        self.rows_written = 0
        self._writer: ShardWriter | None = None
        self._stats: ShardStats | None = None

    def _layout_manifest(self, num_classes: int) -> Manifest:
        if self.manifest is None:
            m = self._new_manifest(num_classes)
            m.chunk_rows = layout_chunk_rows(shard_layout(m), min(self.geometry.shard_size, self.geometry.total_rows))
            self.manifest = m
        return self.manifest

    def _open_shard(self, k: int, num_classes: int) -> None:
        m = self._layout_manifest(num_classes)
        s0, s1 = self.geometry.shard_bounds(k)
        self._writer = ShardWriter(self.folder / shard_name(k), s1 - s0, shard_layout(m), m.chunk_rows,
                                   self.compression)
        self._stats = ShardStats(m.num_members, len(self.temperatures))

    def add(self, batch: Batch) -> None:
        """Write ``batch`` (rows of one shard, following the rows written before); finish the shard at its end."""
        k = batch.shard
        logits = batch.logits
        if self._writer is None:
            self._open_shard(k, logits.shape[2])
        m = self.manifest
        fdtype = np.dtype(m.dtype)
        st = soft_targets(logits, self.temperatures, self.combine, self.weights)
        arrays = encode(m.codec, logits, st, np.arange(batch.r0, batch.r1, dtype=np.int64), self.temperatures, fdtype)
        arrays.update({"labels": batch.labels, "source_index": batch.source_index, "view": batch.view,
                       "aug_seed": batch.aug_seed})
        if m.input["stored"]:
            arrays["inputs"] = batch.inputs
        s0, s1 = self.geometry.shard_bounds(k)
        self._writer.write(batch.r0 - s0, arrays)
        self._stats.add(logits, st, batch.labels, lambda: self._combined_t1(logits, st))
        self.rows_written += batch.rows
        if batch.r1 == s1:
            self._finish_shard(k)

    def _combined_t1(self, logits: np.ndarray, st: np.ndarray) -> np.ndarray:
        t1 = self.temperatures.index(1.0) if 1.0 in self.temperatures else None
        return st[:, t1] if t1 is not None else combine_log_probs(logits, 1.0, self.combine, self.weights)

    def _finish_shard(self, k: int) -> None:
        digest = self._writer.finish()
        self._writer = None
        s0, s1 = self.geometry.shard_bounds(k)
        name = shard_name(k)
        m = self.manifest
        m.shards.append(ShardEntry(name, s1 - s0, digest, row_start=s0, bytes=(self.folder / name).stat().st_size,
                                   stats=self._stats.to_json()))
        m.complete = len(m.shards) == self.geometry.num_shards
        m.stats = m.compute_stats()
        write_manifest(self.folder, m)
        write_card(self.folder, m)  # the dataset card follows the manifest, so it is true at every step

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); what the manifest lists stays valid."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
