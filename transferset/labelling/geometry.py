"""Where each row of a transfer set comes from and which shard holds it: the one formula stage 1 uses.

Row ``r`` of the set is view ``r % views_per_row`` (shifted by one when the clean view is left out) of source row
``r // views_per_row``; shard ``k`` holds rows ``[k * shard_size, min((k + 1) * shard_size, total_rows))``, and
its batches start at the shard's first row, so a resumed run feeds the models exactly the batches an
uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

__all__ = ["RowGeometry"]


@dataclass(frozen=True)
class RowGeometry:
    """Rows, views and shards of one label run.

    Attributes:
        source_rows: rows of the source (after ``limit``).
        views: augmented views per source row.
        clean_view: whether view 0, the clean row, is kept.
        shard_size: rows per shard (the last may hold fewer).
        batch_size: rows per inference batch (the last of a shard may hold fewer).
    """

    source_rows: int
    views: int
    clean_view: bool
    shard_size: int
    batch_size: int

    @property
    def views_per_row(self) -> int:
        """Rows of the set made from each source row."""
        return self.views + (1 if self.clean_view else 0)

    @property
    def total_rows(self) -> int:
        """Rows of the complete set: source rows times views per row."""
        return self.source_rows * self.views_per_row

    @property
    def num_shards(self) -> int:
        return -(-self.total_rows // self.shard_size)

    def shard_bounds(self, k: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of shard ``k``."""
        return k * self.shard_size, min((k + 1) * self.shard_size, self.total_rows)

    def shard_of(self, row: int) -> int:
        """The shard that holds row ``row``."""
        return row // self.shard_size

    def trace(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """``(source_index int64, view int32)`` of rows ``[r0, r1)``."""
        rows = np.arange(r0, r1, dtype=np.int64)
        vpr = self.views_per_row
        return rows // vpr, (rows % vpr + (0 if self.clean_view else 1)).astype(np.int32)

    def part_shards(self, part: tuple[int, int] | None) -> list[int]:
        """The shards part ``(I, N)`` writes (1-based ``I``): shard ``k`` belongs to part ``k % N + 1``; all for None.

        Interleaved rather than contiguous ranges: shards of uneven cost (the short last one, photo shards of
        large files) spread over every part, and parts finishing at about the same time leave no long tail.
        """
        if part is None:
            return list(range(self.num_shards))
        index, count = part
        return list(range(index - 1, self.num_shards, count))

    def rows_of(self, shards: Iterable[int]) -> int:
        """Rows in the shards ``shards``."""
        return sum(self.shard_bounds(k)[1] - self.shard_bounds(k)[0] for k in shards)

    def batches(self, shards: Iterable[int]) -> Iterator[tuple[int, int, int]]:
        """``(shard, r0, r1)`` of every inference batch of the shards ``shards``, in the order given."""
        for k in shards:
            s0, s1 = self.shard_bounds(k)
            for r0 in range(s0, s1, self.batch_size):
                yield k, r0, min(r0 + self.batch_size, s1)
