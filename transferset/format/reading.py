"""Reading a transfer set: :class:`TransferSet`, opened once, that every consumer reads through (no torch).

Opening reads and checks the manifest, then checks every listed shard as :func:`transferset.format.check_shard`
does (a regular file inside the folder, of the listed size, of the structure the format allows; re-hashed with
``verify``). A bad shard is refused in one line, or, with ``skip_bad_shards``, left out with a warning (0 rows
in ``shard_rows``). After that, shards are opened only through :func:`transferset.format.safety.open_shard`
(the structure checked again unless the very same file was found sound before), lazily, in the process that
reads, at most ``max_open`` at a time; pickling drops the open handles, so DataLoader workers open their own.

It serves rows and fields: :meth:`TransferSet.read` (rows of one shard, optionally straight into arrays),
:meth:`TransferSet.blocks` (the set in order, a block at a time), :meth:`TransferSet.take` (given rows) and
:meth:`TransferSet.check_values` (the values the format forbids). The training reader, export, report,
reteach, recode and verify's reteach all read through it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from ..errors import FAILED, TransferSetError, printable
from .codecs import Codec, codec_for
from .manifest import shard_path
from .parts import read_manifest
from .safety import open_shard
from .schema import Manifest, held_row_shape, row_bytes, shard_layout, temperature_axis, temperature_fields
from .verify import check_shard, row_start_fault, token_ids, value_fault

__all__ = ["TransferSet", "ShardFiles", "MAX_OPEN", "READ_BYTES", "BLOCK_BYTES", "MAX_CACHE_BYTES", "read_blocks",
           "warn"]

MAX_OPEN = 8  #: shard files open at once per process (each holds a chunk cache per dataset)
READ_BYTES = 32 << 20  #: what the HDF5 chunks one read touches decompress to, at most (one chunk if more)
BLOCK_BYTES = 32 << 20  #: what one of :meth:`TransferSet.blocks`' blocks holds, at most (one row if more)
MAX_CACHE_BYTES = 16 << 20  #: HDF5 chunk cache per dataset and open file, at most


def warn(message: str) -> None:
    """One warning line on stderr (a shard left out, an incomplete set)."""
    print(f"transferset: WARNING: {printable(message)}", file=sys.stderr, flush=True)


def read_blocks(d, out: np.ndarray, start: int, stop: int, tail: tuple = (), at: int = 0) -> None:
    """Rows ``[start, stop)`` of the dataset ``d`` (``tail`` selects within a row: one temperature, say) into
    ``out[at:]``, in blocks whose HDF5 chunks decompress to at most about READ_BYTES, so what one read touches is
    bounded by the chunks' size and not by the rows asked for.

    A chunked dataset's block is a whole number of its chunks (no chunk read twice); contiguous storage (or a
    dataset-like object without ``chunks``) reads the selected bytes alone, so its block is bounded by what is held.
    """
    chunks = getattr(d, "chunks", None)
    itemsize = out.dtype.itemsize
    if chunks:
        block = max(1, READ_BYTES // max(1, math.prod(chunks) * itemsize)) * chunks[0]
    else:
        block = max(1, READ_BYTES // max(1, math.prod(out.shape[1:]) * itemsize))
    scratch = None
    if tail:  # whole rows into a bounded scratch block, then the selection: HDF5's strided reads are ~10x slower
        block = min(block, max(1, READ_BYTES // max(1, math.prod(d.shape[1:]) * itemsize)))
        scratch = np.empty((min(block, stop - start),) + tuple(d.shape[1:]), out.dtype)
    a = start
    while a < stop:
        z = min(stop, (a // block + 1) * block)  # blocks on chunk boundaries
        if scratch is None:
            d.read_direct(out, (slice(a, z),) + tail, np.s_[at + a - start:at + z - start])
        else:
            d.read_direct(scratch, (slice(a, z),), np.s_[0:z - a])
            out[at + a - start:at + z - start] = scratch[(slice(0, z - a),) + tail]
        a = z


class ShardFiles:
    """Lazily opened, read-only, checked h5py handles for the process that uses them (least recently used closed
    first when more than ``max_open`` would be open)."""

    def __init__(self, paths: list[Path], rows: list[int], manifest: Manifest, max_open: int = MAX_OPEN,
                 **h5_options) -> None:
        self.paths, self.rows, self.manifest = paths, rows, manifest
        self.max_open = max(1, int(max_open))
        self.h5_options = h5_options  # chunk-cache sizes
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def get(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():
            # inherited across a fork: never touch the parent's handles (not even to close them)
            _INHERITED.append(self._handles)
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.pop(shard, None)
        if f is None:
            while len(self._handles) >= self.max_open:
                _close_quietly(self._handles.pop(next(iter(self._handles))))
            # every open (in every worker) checks the structure again: the file may have changed since
            f = open_shard(self.paths[shard], self.rows[shard], self.manifest, **self.h5_options)
        self._handles[shard] = f  # re-inserted last: dict order is the recency order
        return f

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._handles.values():
                _close_quietly(f)
        self._handles = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}


_INHERITED: list = []


def _close_quietly(f: h5py.File) -> None:
    try:
        f.close()
    except Exception:  # closing a read-only file cannot lose data
        pass


class TransferSet:
    """A transfer set opened for reading (module docstring).

    Args:
        root: the transfer-set folder.
        verify: re-hash every shard (sha256) and check its values before reading.
        skip_bad_shards: leave out a bad shard with a warning instead of refusing the set.
        option: the caller's option that turns skipping on (named in the refusal), or None.

    Attributes: ``root``, ``manifest``, ``codec`` (:class:`~transferset.format.codecs.Codec`), ``layout`` (the
    stored datasets, ``shard_layout``), ``paths`` and ``shard_rows`` (0 for a skipped shard) per listed shard,
    ``row_starts`` (each shard's first global row, int64), ``skipped`` (the paths left out).
    """

    def __init__(self, root: str | os.PathLike, *, verify: bool = False, skip_bad_shards: bool = False,
                 option: str | None = None) -> None:
        self.root, self.skip_bad_shards = Path(root), bool(skip_bad_shards)
        self.manifest = m = read_manifest(self.root)
        self.codec: Codec = codec_for(m.codec)
        self.layout = shard_layout(m)
        self._token_ids = token_ids(m)  # its inputs index the vocabulary: check_values holds them to [0, C)
        self.paths = [shard_path(self.root, e.path) for e in m.shards]
        self.shard_rows: list[int] = []
        self.skipped: list[str] = []
        self.row_starts = np.zeros(len(m.shards), dtype=np.int64)
        total, start, end, prev_ok = m.rows, 0, 0, True
        for i, (entry, p) in enumerate(zip(m.shards, self.paths)):
            reason = check_shard(self.root, entry, m, rehash=verify)
            row_start = entry.row_start if entry.row_start is not None else start
            if reason is None:
                reason = row_start_fault(row_start, entry.rows, start, end, total, prev_ok)
            self._admit(entry, p, reason, skip_bad_shards, option)
            if reason is None:
                end = row_start + entry.rows
            self.row_starts[i] = row_start if reason is None else end  # a skipped shard holds no rows, kept sorted
            prev_ok = reason is None
            start = row_start + entry.rows
        self.files = ShardFiles(self.paths, [s.rows for s in m.shards], m)

    def _admit(self, entry, p: Path, reason: str | None, skip: bool, option: str | None) -> None:
        if reason is None:
            self.shard_rows.append(entry.rows)
            return
        if not skip and option:
            raise TransferSetError(
                f"is off, so a bad shard stops the run: {p}: {reason}; relabel it (`transferset label` resumes), "
                "run `transferset verify`, or turn this option on to go on without it", option=option)
        if not skip:
            raise TransferSetError(f"{p}: {printable(reason)}; run `transferset verify {self.root}`", FAILED)
        warn(f"skipping shard {p} ({reason}); its {entry.rows} rows are left out")
        self.skipped.append(entry.path)
        self.shard_rows.append(0)

    # -- what is there --------------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows in the shards that are read (skipped shards left out)."""
        return int(sum(self.shard_rows))

    def replay_layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """:attr:`layout` plus the fields the manifest declares but does not store (``inputs`` replayed)."""
        return shard_layout(self.manifest, include_unstored=True)

    def set_cache(self, rdcc_nbytes: int, rdcc_nslots: int, max_open: int = MAX_OPEN) -> None:
        """Chunk-cache sizes of the shard handles opened from now on (the streaming reader sizes them), at most
        MAX_CACHE_BYTES per dataset (a larger chunk is decompressed for the read and dropped)."""
        self.files.close()
        # HDF5's default preemption (rdcc_w0 0.75): with 1.0, reading one temperature of each row (part of every
        # chunk) kept every chunk it decompressed, 525 MB for 256 rows of a 64 x 16,384 shard (57 MB with 0.75)
        self.files = ShardFiles(self.paths, self.files.rows, self.manifest, max_open,
                                rdcc_nbytes=min(int(rdcc_nbytes), MAX_CACHE_BYTES), rdcc_nslots=rdcc_nslots)

    def held_layout(self, names: Sequence[str], temperature_index: int | None = None
                    ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row shape and stored dtype of ``names`` as :meth:`read` hands them over: fields with a temperature
        axis hold only ``temperature_index`` when it is given."""
        return {n: (held_row_shape(n, self.layout[n][0], temperature_index, self.manifest.positions), self.layout[n][1])
                for n in names}

    def _tail(self, name: str, temperature_index: int | None) -> tuple:
        if temperature_index is None or name not in temperature_fields():
            return ()
        return (slice(None),) * (temperature_axis(self.manifest.positions) - 1) + (temperature_index,)

    def chunking(self, names: Sequence[str]) -> tuple[set[int], int]:
        """The HDF5 chunk rows of the datasets ``names`` and their largest chunk's bytes, from the first sound
        shard that chunks them (``(set(), 0)`` when none does)."""
        for k, rows in enumerate(self.shard_rows):
            if not rows:
                continue
            f = self.files.get(k)
            chunked = [f[n] for n in names if n in f and f[n].chunks]
            if chunked:
                return ({d.chunks[0] for d in chunked},
                        max(int(np.prod(d.chunks, dtype=np.int64)) * d.dtype.itemsize for d in chunked))
        return set(), 0

    # -- rows and fields ----------------------------------------------------------------------------------------
    def read(self, shard: int, start: int, stop: int, names: Sequence[str], into: dict[str, np.ndarray] | None = None,
             at: int = 0, temperature_index: int | None = None) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of ``shard``, one array per dataset in ``names``.

        With ``temperature_index``, fields with a temperature axis hold that stored temperature alone (HDF5 selects
        it; the others are never held). With ``into``, the rows are read straight into
        ``into[name][at:at + stop - start]`` (no extra copy). Reads go in bounded blocks (:func:`read_blocks`).
        Read errors (OSError and the like) reach the caller, which owns the policy.
        """
        f = self.files.get(shard)
        if into is None:
            into, at = {n: np.empty((stop - start,) + shape, dt)
                        for n, (shape, dt) in self.held_layout(names, temperature_index).items()}, 0
        if stop > start:
            for n in names:
                read_blocks(f[n], into[n], start, stop, self._tail(n, temperature_index), at)
        return into

    def block_rows(self, names: Sequence[str], temperature_index: int | None = None, limit: int | None = None) -> int:
        """Rows of ``names`` (as :meth:`held_layout` holds them) that fit ``limit`` bytes (BLOCK_BYTES when None);
        at least one."""
        limit = BLOCK_BYTES if limit is None else limit
        return max(1, limit // max(1, row_bytes(self.held_layout(names, temperature_index))))

    def blocks(self, names: Sequence[str], block_rows: int, temperature_index: int | None = None
               ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(global row start, {name: array})`` blocks of at most ``block_rows`` rows (and at most BLOCK_BYTES
        held, one row if a row is more), in set order."""
        step = max(1, min(int(block_rows), self.block_rows(names, temperature_index)))
        try:
            for k, rows in enumerate(self.shard_rows):
                for a in range(0, rows, step):
                    yield int(self.row_starts[k]) + a, self.read(k, a, min(rows, a + step), names,
                                                                 temperature_index=temperature_index)
        finally:
            self.close()

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, row within it)`` of each global row (rows of skipped shards are refused)."""
        rows = np.asarray(rows, dtype=np.int64)
        shard = np.searchsorted(self.row_starts, rows, side="right") - 1
        within = rows - self.row_starts[np.maximum(shard, 0)]
        sizes = np.asarray(self.shard_rows, dtype=np.int64)
        if len(rows) and ((shard < 0) | (within >= sizes[np.maximum(shard, 0)])).any():
            raise TransferSetError(f"{self.root}: rows asked for lie outside the shards read")
        return shard, within

    def take(self, rows: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """``names`` at the global rows ``rows`` (increasing), one read per shard touched."""
        shard, within = self.locate(rows)
        parts: dict[str, list] = {n: [] for n in names}
        for k in np.unique(shard).tolist():
            got = self.files.get(k)
            sel = within[shard == k].tolist()
            for n in names:
                parts[n].append(got[n][sel])
        out = {}
        for n in names:
            shape, dt = self.layout[n]
            out[n] = np.concatenate(parts[n]) if parts[n] else np.zeros((0,) + shape, dt)
        return out

    def check_values(self, shard: int, start: int, arrays: dict[str, np.ndarray], at: int = 0, n: int | None = None,
                     temperature_index: int | None = None) -> None:
        """Refuse rows the format forbids among ``arrays[name][at:at + n]`` (rows ``start..`` of ``shard``), in
        one line naming the shard and the row; fields with a temperature axis are checked at
        ``temperature_index`` only when given (the values a loss then sees)."""
        for name, a in arrays.items():
            block = a[at:at + n] if n is not None else a
            if not len(block):
                continue
            if temperature_index is not None and name in temperature_fields():
                block = block[(slice(None),) * temperature_axis(self.manifest.positions) + (temperature_index,)]
            fault = value_fault(name, block, self.manifest.num_classes, start, ids=self._token_ids)
            if fault:
                raise BadValues(f"{self.paths[shard]}: {fault}; the set is damaged or was made to mislead: run "
                                "`transferset verify`, and relabel or restore it")

    def close(self) -> None:
        """Close the shard files this process opened (reading again reopens them)."""
        self.files.close()

    def __enter__(self) -> "TransferSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BadValues(TransferSetError):
    """Rows whose values the format forbids: bad input, never skipped (the shard itself reads fine)."""
