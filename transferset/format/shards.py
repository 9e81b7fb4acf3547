"""HDF5 shard writing: temporary name, fixed chunking, fsync, sha256, atomic rename.

Shards are uncompressed by default (gzip writes at about 40 MB/s, too slow for logits); ``lzf`` is offered
as a fast optional filter. Every dataset is chunked along rows by a multiple of one base ``chunk_rows`` so a
reader's contiguous run of base chunks never straddles a partial chunk of another dataset.
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import h5py
import numpy as np

from .._io import fsync_file, sha256_file
from ..errors import FAILED, TransferSetError
from .schema import row_bytes

__all__ = ["CHUNK_BYTES", "chunk_rows_for", "layout_chunk_rows", "ShardWriter", "shard_name", "TMP_PREFIX"]

CHUNK_BYTES = 4 << 20  #: target bytes per chunk of the widest dataset (the format asks for 1-8 MB)
MIN_CHUNK_BYTES = 1 << 20
TMP_PREFIX = ".tmp-"
_RESUME = ("; the shards listed in manifest.json are complete; free space or fix permissions, then run the same "
           "command to resume")


def shard_name(index: int) -> str:
    """File name of shard ``index`` inside the transfer-set folder."""
    return f"shard-{index:05d}.h5"


def chunk_rows_for(row_bytes: list[int], shard_rows: int) -> int:
    """Base chunk rows: the widest dataset's chunk is about ``CHUNK_BYTES`` (at least one row)."""
    widest = max(max(row_bytes), 1)
    return int(max(1, min(shard_rows, CHUNK_BYTES // widest)))


def layout_chunk_rows(layout: dict[str, tuple[tuple, np.dtype]], shard_rows: int) -> int:
    """Base chunk rows of a shard layout (``schema.shard_layout``) whose shards hold up to ``shard_rows`` rows."""
    return chunk_rows_for([row_bytes(layout, (name,)) for name in layout], shard_rows)


def _dataset_chunk(base: int, row_bytes: int, rows: int) -> int:
    # narrow datasets (labels, seeds) get a multiple of the base so their chunks reach ~1 MB, never past the shard
    mult = max(1, MIN_CHUNK_BYTES // max(row_bytes * base, 1))
    return int(max(1, min(rows, base * mult)))


def _reason(e: BaseException) -> str:
    return (getattr(e, "strerror", None) or str(e).splitlines()[0] if str(e) else type(e).__name__)[:300]


class ShardWriter:
    """Write one shard of a known row count; visible under its final name only once complete."""

    def __init__(self, final_path: str | os.PathLike, rows: int, layout: dict[str, tuple[tuple, np.dtype]],
                 chunk_rows: int, compression: str | None = None, tmp_prefix: str = TMP_PREFIX) -> None:
        self.final = Path(final_path)
        self.tmp = self.final.with_name(f"{tmp_prefix}{self.final.name}")
        self.rows = rows
        try:
            self.tmp.unlink(missing_ok=True)
            self.file = h5py.File(self.tmp, "w", libver=("earliest", "v110"), track_order=False)
        except OSError as e:
            raise TransferSetError(f"cannot create {self.tmp}: {_reason(e)}{_RESUME}", FAILED) from None
        self.datasets = {}
        for name, (tail, dtype) in layout.items():
            dtype = np.dtype(dtype)
            row_bytes = int(np.prod(tail, dtype=np.int64)) * dtype.itemsize
            chunk = (_dataset_chunk(chunk_rows, row_bytes, rows),) + tuple(tail) if rows else None
            self.datasets[name] = self.file.create_dataset(
                name, shape=(rows,) + tuple(tail), dtype=dtype, chunks=chunk,
                compression=compression if rows else None, track_times=False)

    def write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write rows ``[start, start + n)`` of every dataset."""
        try:
            for name, arr in arrays.items():
                self.datasets[name][start:start + len(arr)] = arr
        except (OSError, ValueError) as e:
            self.abort()
            raise TransferSetError(f"writing {self.final} failed: {_reason(e)}{_RESUME}", FAILED) from None

    def finish(self) -> str:
        """Close, fsync, hash and rename into place; returns the shard's sha256."""
        try:
            self.file.close()
            # the fsync waits on the disk and the hash on the CPU: both at once (a shard of hundreds of MB is the
            # end of a run, when nothing else is left to overlap them with)
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ts-fsync") as sync:
                synced = sync.submit(fsync_file, self.tmp)
                digest = sha256_file(self.tmp)
                synced.result()
            os.replace(self.tmp, self.final)
        except OSError as e:
            self.abort()
            raise TransferSetError(f"finishing {self.final} failed: {_reason(e)}{_RESUME}", FAILED) from None
        return digest

    def abort(self) -> None:
        """Close and remove the temporary file (used on errors)."""
        try:
            if self.file.id.valid:
                self.file.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)
