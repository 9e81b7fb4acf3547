"""Epoch order as a pure function of (shard sizes, seed, epoch, ranks, workers): numpy only, no I/O, no torch.

The rows of all shards are cut into chunks of ``chunk_rows`` (never across a shard boundary). Per (seed, epoch)
the chunks are shuffled across all shards, grouped into *buffers* of ``buffer_chunks`` consecutive chunks, and the
rows of each buffer are permuted. Concatenating the permuted buffers gives the epoch's row stream of N rows.

The stream is padded to ``world_size * L * batch_size`` slots (``L = ceil(N / (world_size * batch_size))``);
rank ``r`` takes the contiguous slots ``[r * L * batch_size, (r + 1) * L * batch_size)`` so that it reads about
``1 / world_size`` of the chunks. A padding slot repeats a real row (stream position ``slot % N``) with
``mask = False``: every rank gets exactly ``L`` batches of exactly ``batch_size`` rows and every row is real
exactly once. Within a rank, batch ``k`` belongs to worker ``k % num_workers``, so the rank's batch sequence does
not depend on the number of DataLoader workers (a run may resume with another worker count).

Memory: the plan holds one entry per chunk and builds each buffer's permutation on demand (a few are memoised),
so a worker's plan stays at O(chunks + buffer rows) whatever the row count.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..errors import TransferSetError

__all__ = ["Batch", "EpochPlan", "epoch_plan", "plan_length"]

_PERM_CACHE = 4  # buffer permutations memoised per plan (a batch rarely spans more)


@dataclass(frozen=True)
class Batch:
    """One batch of a rank's epoch.

    Attributes:
        index: batch number within the rank's epoch (0-based); a resume at ``k`` starts at ``index == k``.
        worker: the DataLoader worker (``index % num_workers``) that yields it.
        rows: int64 [batch_size] plan-global rows (shards concatenated in the order given); padded slots repeat
            real rows.
        mask: bool [batch_size]; False on padded slots, which must not count in the loss.
        buffer: int64 [batch_size] buffer each slot is read from (see :meth:`EpochPlan.read_units`).
        offset: int64 [batch_size] row of the slot inside that buffer's concatenated read units.
    """

    index: int
    worker: int
    rows: np.ndarray
    mask: np.ndarray
    buffer: np.ndarray
    offset: np.ndarray


def plan_length(shard_rows: Sequence[int], world_size: int = 1, batch_size: int = 256) -> int:
    """Number of batches every rank gets in one epoch: ``ceil(total rows / (world_size * batch_size))``."""
    total = int(sum(int(r) for r in shard_rows))
    per_step = int(world_size) * int(batch_size)
    return -(-total // per_step) if per_step > 0 else 0


def _check(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < low:
        raise TransferSetError(f"must be an integer >= {low}, got {value!r}", option=name)
    return int(value)


class EpochPlan:
    """The order of one epoch for one rank; build it with :func:`epoch_plan`. Batches are made lazily."""

    def __init__(self, shard_rows: Sequence[int], seed: int, epoch: int, world_size: int, rank: int,
                 num_workers: int, batch_size: int, chunk_rows: int, buffer_chunks: int, shuffle: bool) -> None:
        self.shard_rows = np.asarray([int(r) for r in shard_rows], dtype=np.int64)
        if np.any(self.shard_rows < 0):
            raise TransferSetError(f"shard row counts must be >= 0, got {list(shard_rows)}")
        self.seed = _check("seed", seed, 0)
        self.epoch = _check("epoch", epoch, 0)
        self.world_size = _check("world_size", world_size, 1)
        self.rank = _check("rank", rank, 0)
        if self.rank >= self.world_size:
            raise TransferSetError(f"rank {rank} is outside world_size {world_size}")
        self.num_workers = _check("num_workers", num_workers, 1)
        self.batch_size = _check("batch_size", batch_size, 1)
        self.chunk_rows = _check("chunk_rows", chunk_rows, 1)
        self.buffer_chunks = _check("buffer_chunks", buffer_chunks, 1)
        self.shuffle = bool(shuffle)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        self.total_rows = int(self.shard_starts[-1])
        self.num_batches = plan_length(self.shard_rows, self.world_size, self.batch_size)

        # chunks as (shard, start, stop) in shard-local rows
        per_shard = -(-self.shard_rows // self.chunk_rows)
        c_shard = np.repeat(np.arange(len(self.shard_rows), dtype=np.int64), per_shard)
        first = (np.cumsum(per_shard) - per_shard).astype(np.int64)
        c_start = (np.arange(len(c_shard), dtype=np.int64) - np.repeat(first, per_shard)) * self.chunk_rows
        if self.shuffle and len(c_shard):
            order = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, 0])).permutation(len(c_shard))
            c_shard, c_start = c_shard[order], c_start[order]
        c_stop = np.minimum(c_start + self.chunk_rows, self.shard_rows[c_shard]) if len(c_shard) else c_start
        self.chunk_shard, self.chunk_start, self.chunk_stop = c_shard, c_start, c_stop
        sizes = c_stop - c_start
        self.chunk_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # stream start of each chunk
        self.num_buffers = -(-len(c_shard) // self.buffer_chunks)
        self.buffer_offsets = self.chunk_offsets[np.minimum(np.arange(self.num_buffers + 1) * self.buffer_chunks,
                                                            len(c_shard))]
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.num_batches

    def _perm(self, b: int) -> np.ndarray:
        p = self._perms.get(b)
        if p is None:
            n = int(self.buffer_offsets[b + 1] - self.buffer_offsets[b])
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, 1, b]))
            p = rng.permutation(n).astype(np.int64)
            self._perms[b] = p
            if len(self._perms) > _PERM_CACHE:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(b)
        return p

    def read_units(self, b: int) -> list[tuple[int, int, int]]:
        """Buffer ``b``'s rows as ``(shard, start, stop)`` runs; adjacent chunks of one shard are merged."""
        c0, c1 = b * self.buffer_chunks, min((b + 1) * self.buffer_chunks, len(self.chunk_shard))
        units: list[list[int]] = []
        for s, a, z in zip(self.chunk_shard[c0:c1].tolist(), self.chunk_start[c0:c1].tolist(),
                           self.chunk_stop[c0:c1].tolist()):
            if units and units[-1][0] == s and units[-1][2] == a:
                units[-1][2] = z
            else:
                units.append([s, a, z])
        return [tuple(u) for u in units]

    def batch(self, k: int) -> Batch:
        """Batch ``k`` (0 <= k < len(plan)) of this rank."""
        if not 0 <= k < self.num_batches:
            raise IndexError(f"batch {k} outside 0..{self.num_batches - 1}")
        first = (self.rank * self.num_batches + k) * self.batch_size
        slots = np.arange(first, first + self.batch_size, dtype=np.int64)
        mask = slots < self.total_rows
        pos = slots % self.total_rows
        buf = np.searchsorted(self.buffer_offsets, pos, side="right") - 1
        within = pos - self.buffer_offsets[buf]
        offset = np.empty_like(within)
        for b in np.unique(buf).tolist():
            sel = buf == b
            offset[sel] = self._perm(b)[within[sel]] if self.shuffle else within[sel]
        stream = self.buffer_offsets[buf] + offset  # position in the shuffled chunk order
        chunk = np.searchsorted(self.chunk_offsets, stream, side="right") - 1
        rows = self.shard_starts[self.chunk_shard[chunk]] + self.chunk_start[chunk] + (stream - self.chunk_offsets[chunk])
        return Batch(index=k, worker=k % self.num_workers, rows=rows, mask=mask, buffer=buf, offset=offset)

    def batches(self, start: int = 0, worker: int | None = None) -> Iterator[Batch]:
        """This rank's batches ``start, start + 1, ...``; with ``worker``, only those that worker yields."""
        if not 0 <= start <= self.num_batches:
            raise TransferSetError(f"cannot resume at batch {start}: the epoch has {self.num_batches} batches per rank")
        for k in range(start, self.num_batches):
            if worker is None or k % self.num_workers == worker:
                yield self.batch(k)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()


def epoch_plan(shard_rows: Sequence[int], seed: int, epoch: int, world_size: int = 1, rank: int = 0,
               num_workers: int = 1, batch_size: int = 256, chunk_rows: int = 4096, buffer_chunks: int = 8,
               shuffle: bool = True) -> EpochPlan:
    """The epoch's order for ``rank``: a pure function of its arguments (see the module docstring).

    Args:
        shard_rows: rows per shard, in manifest order (0 for a shard left out).
        seed, epoch: the order changes with either; same arguments give the same plan.
        world_size, rank: the data-parallel split; every rank gets ``plan_length(...)`` batches.
        num_workers: DataLoader workers per rank; batch ``k`` goes to worker ``k % num_workers``.
        batch_size: rows per batch, padded slots included.
        chunk_rows: rows per read chunk (use the shards' HDF5 chunk rows).
        buffer_chunks: chunks whose rows are permuted together.
        shuffle: False gives the rows in manifest order.

    Returns:
        An :class:`EpochPlan`; iterate it, or call ``batches(start, worker)`` to resume at batch ``start``.
    """
    return EpochPlan(shard_rows, seed, epoch, world_size, rank, num_workers, batch_size, chunk_rows,
                     buffer_chunks, shuffle)
