"""Batch preparation for stage 1: source rows read, augmented and preprocessed for the ensemble.

:class:`BatchPreparer` is a small picklable callable (the source reopens its files after a fork or unpickling),
so the preparing stage can run in a thread today and in worker processes later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import Iterable, Iterator

import numpy as np

from ..inputs.augment import AugmentSpec, mixup_op, mixup_params, render_views, view_seed
from .ensemble import FeedPlan
from .geometry import RowGeometry
from ..inputs.sources import Source

__all__ = ["Batch", "BatchPreparer"]


@dataclass
class Batch:
    """Rows ``[r0, r1)`` of shard ``shard``: what the teachers see, how to trace each row, and their outputs.

    ``columns`` holds one array per shard field the batch fills, under the field's name (``shard_layout``):
    ``inputs`` (the rows in the source dtype), ``source_index``, ``view``, ``aug_seed``, ``labels``, and what a
    source kind adds (``mixup_partner`` and ``mixup_weight`` for mixup views, ``photo_box`` and ``photo_flip``
    for photos). The writer writes each field of the set's layout from the column of that name.
    """

    shard: int
    r0: int
    r1: int
    columns: dict[str, np.ndarray]
    feeds: dict | None = None  #: prepared model inputs (dropped once the ensemble has run)
    logits: np.ndarray | None = None  #: [N, M, C] float32, set by the ensemble
    skipped: list = field(default_factory=list)  #: photo sets: [source index, path, reason] of files not decoded
    hints: dict | None = None  #: ``hint_<k>`` -> the batch's reduced hint values (labelling.hints), set with logits

    @property
    def rows(self) -> int:
        """Rows of the set this batch gives."""
        return len(self.columns["source_index"])

    @classmethod
    def join(cls, batches: list["Batch"]) -> "Batch":
        """One batch for consecutive batches of one shard: their columns and logits joined along rows."""
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        columns = {n: np.concatenate([b.columns[n] for b in batches]) for n in first.columns}
        hints = {k: np.concatenate([b.hints[k] for b in batches]) for k in first.hints} if first.hints else None
        return cls(first.shard, first.r0, batches[-1].r1, columns,
                   logits=np.concatenate([b.logits for b in batches]),
                   skipped=[s for b in batches for s in b.skipped], hints=hints)


@dataclass
class BatchPreparer:
    """``preparer(shard, r0, r1)`` reads, augments and preprocesses rows ``[r0, r1)`` into a :class:`Batch`;
    ``preparer.batches(first_shard)`` gives every batch of the run from that shard on.

    Attributes:
        source: the data source.
        geometry: rows, views and shards of the run.
        spec: the augmentation (no ops: clean rows).
        seed: the augmentation's base seed.
        labels: int64 labels per source row, or None (every row gets -1).
        feed_plan: how rows become each member's input.
    """

    source: Source
    geometry: RowGeometry
    spec: AugmentSpec
    seed: int
    labels: np.ndarray | None
    feed_plan: FeedPlan

    def batches(self, shards: Iterable[int]) -> Iterator[Batch]:
        """Every batch of the shards ``shards``, in order."""
        for k, r0, r1 in self.geometry.batches(shards):
            yield self(k, r0, r1)

    def __call__(self, shard: int, r0: int, r1: int) -> Batch:
        sidx, view = self.geometry.trace(r0, r1)
        s0, s1 = int(sidx[0]), int(sidx[-1]) + 1
        x = self.source.read(s0, s1)[sidx - s0]
        if self.spec.ops:
            x = render_views(x, sidx, view, self.spec, self.seed, block_reader=self.source.read,
                             row_reader=self.source.read_rows, source_rows=self.source.rows)
        x = np.ascontiguousarray(x, dtype=self.source.dtype)
        labels = self.labels[sidx] if self.labels is not None else np.full(len(sidx), -1, np.int64)
        columns = {"inputs": x, "source_index": sidx, "view": view,
                   "aug_seed": view_seed(self.seed, sidx, view).astype(np.uint64), "labels": labels}
        mix = mixup_op(self.spec)
        if mix:
            partner, weight = mixup_params(self.seed, sidx, view, self.source.rows, mix[1], mix[0])
            columns.update(mixup_partner=partner, mixup_weight=weight.astype(np.float32))
        return Batch(shard, r0, r1, columns, feeds=self.feed_plan(x))
