"""Stage-2 reader: a torch IterableDataset of whole batches over the shards, plus an in-memory fast path.

Use it as ``DataLoader(ds, batch_size=None, num_workers=k)``; the dataset batches, shuffles (see
:mod:`transferset.training.plan`) and pads, so every rank gets ``len(ds)`` batches of exactly ``batch_size`` rows.
A batch is a dict of tensors: the requested fields, ``mask`` (bool, False on padded slots) and ``index`` (int64
global row of the transfer set). ``logits`` and ``soft_targets`` come as float32; ``soft_targets`` are
natural-log probabilities, [B, C] at the chosen stored temperature or [B, len(T), C] when ``temperature`` is None.

The reader is built from four parts, each with one job:

- :class:`ReadSpec`: what is read (the checked manifest, the fields, the stored temperature, which HDF5 datasets);
- :class:`ShardAccess`: the reader's policy over the opened set (:class:`~transferset.format.reading.TransferSet`
  checks every shard on open and holds the lazily opened per-process h5py handles): chunk and cache sizing,
  values checked as read, shards failing mid-epoch;
- :class:`~transferset.inputs.replay.Replay`: inputs rebuilt from the source for sets labelled without stored inputs;
- :class:`BatchAssembler`: plan batches turned into tensors (read buffers, gather rows, cast);

and :class:`ResumableEpoch`, the resume protocol both :class:`TransferSetDataset` and :class:`InMemoryBatches`
follow. After taking ``k`` batches of the current epoch, the trainer calls ``ds.mark_consumed(k)``;
``ds.state_dict()`` then records ``batches_done = k`` and, after ``load_state_dict``, the next iteration yields
batches ``k, k + 1, ...`` of the same plan. ``set_epoch(e)`` with a new epoch resets ``batches_done`` to 0. The
state does not depend on the number of DataLoader workers. Use ``persistent_workers=False`` (the default):
workers receive the dataset, epoch included, when a loader iterator starts.

Fork safety: shard files are opened lazily in the process that reads, remembered with ``os.getpid()`` and
closed when an iteration ends; pickling (spawn workers) drops open handles and the replay source.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import FAILED, TransferSetError
from ..format.codecs import SPARSE_FIELDS, read_field
from ..format.manifest import manifest_hash, shard_path
from ..format.reading import BadValues, TransferSet, warn
from ..format.schema import Manifest, held_row_shape, row_bytes, shard_layout, temperature_fields
from ..inputs.replay import Replay
from .plan import Batch, EpochPlan, epoch_plan, plan_length

__all__ = [
    "FIELDS",
    "DEFAULT_FIELDS",
    "ReadSpec",
    "ShardAccess",
    "BatchAssembler",
    "ResumableEpoch",
    "TransferSetDataset",
    "InMemoryBatches",
    "load_in_memory",
    "estimate_bytes",
    "fits_in_memory",
    "MAX_HELD_EXPANSION",
    "stored_temperature_index",
    "open_transfer_set",
    "loader_batches",
]

#: Fields a reader can ask for (``mask`` and ``index`` are always in a batch).
FIELDS = ("inputs", "soft_targets", "logits", "labels", "source_index", "view", "aug_seed", "length") + SPARSE_FIELDS
DEFAULT_FIELDS = ("inputs", "soft_targets", "logits", "labels")
_MAX_PLAN_CHUNK = 1 << 16
_PLAN_CHUNK_BYTES = 32 << 20  # held bytes of one plan chunk at most (label's sets: about 4 MB)
_STATE_KEYS = ("manifest_hash", "seed", "epoch", "batches_done", "batch_size", "world_size")
_FLOAT_FIELDS = ("logits", "soft_targets")
_WORKER_TAG = "transferset-worker-error:"


def _as_manifest(manifest: Manifest | dict) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest)


def stored_temperature_index(manifest: Manifest | dict, temperature: float) -> int | None:
    """Index of ``temperature`` in the manifest's stored temperatures (within 1e-9), or None if not stored."""
    return _as_manifest(manifest).temperature_index(temperature)


def _field_shape(layout: dict, name: str, temperature_index: int | None,
                 positions: int | None) -> tuple[tuple[int, ...], np.dtype]:
    """Per-row shape and dtype of ``name`` as a reader holds it (``soft_targets`` at one temperature if chosen;
    a per-position row [P, T, ...] loses its T axis, not its P axis), as ``TransferSet.held_layout`` holds it."""
    shape, dt = layout[name]
    return held_row_shape(name, shape, temperature_index, positions), dt


def estimate_bytes(manifest: Manifest | dict, fields: Sequence[str] = DEFAULT_FIELDS,
                   temperature: float | None = None) -> int:
    """Bytes :func:`load_in_memory` holds for ``fields`` (stored dtypes, one temperature if given, plus ``index``).

    Every requested field counts, ``inputs`` included when the set replays them from the source (they are held
    at the source dtype all the same).
    """
    m = _as_manifest(manifest)
    layout = shard_layout(m, include_unstored=True)
    held = {n: _field_shape(layout, n, None if temperature is None else 0, m.positions) for n in fields if n in layout}
    return m.rows * (8 + row_bytes(held))  # 8: the int64 index


#: a set is held in memory only when what it holds is at most this many times its shards' bytes on disk (plus
#: 16 MB): label's sets hold about as much as they store (one temperature of several, gzip at 1.1-3x); a shard of
#: zeros that decompresses 1,000-fold is streamed in bounded buffers instead of held whole
MAX_HELD_EXPANSION = 64


def fits_in_memory(root: str | os.PathLike, manifest: Manifest | dict, fields: Sequence[str],
                   temperature: float | None, budget_bytes: int) -> bool:
    """Whether :func:`load_in_memory` of ``fields`` stays within ``budget_bytes`` and within MAX_HELD_EXPANSION
    of the bytes the listed shards take on disk (replayed inputs are held at the budget's word alone)."""
    m = _as_manifest(manifest)
    if estimate_bytes(m, fields, temperature) > budget_bytes:
        return False
    stored = [f for f in fields if f != "inputs" or m.input["stored"]]
    disk = 0
    for s in m.shards:
        try:
            disk += os.stat(shard_path(root, s.path)).st_size
        except (OSError, TransferSetError):
            pass  # a missing shard holds nothing; the reader refuses or skips it
    return estimate_bytes(m, stored, temperature) <= MAX_HELD_EXPANSION * disk + (16 << 20)


def _default_world(world_size: int | None, rank: int | None) -> tuple[int, int]:
    dist = torch.distributed
    live = dist.is_available() and dist.is_initialized()
    ws = world_size if world_size is not None else (dist.get_world_size() if live else 1)
    rk = rank if rank is not None else (dist.get_rank() if live else 0)
    if not isinstance(ws, int) or ws < 1 or not isinstance(rk, int) or not 0 <= rk < ws:
        raise TransferSetError(f"rank {rk!r} / world_size {ws!r} are invalid; rank must be in 0..world_size-1")
    return ws, rk


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TransferSetError(f"must be a {'non-negative' if low == 0 else 'positive'} integer, got {value!r}",
                               option=name)
    return value


# -- what is read -----------------------------------------------------------------------------------------------
@dataclass
class ReadSpec:
    """What a reader reads from one set: the checked manifest, the fields asked for and the datasets behind them.

    ``read_names`` are the HDF5 datasets read per row: a set whose inputs are replayed reads the trace columns
    (``source_index``, ``view``) instead of the pixels. ``ts`` is the opened set. Build it with :meth:`open`.
    """

    ts: TransferSet
    root: Path
    manifest: Manifest
    fields: tuple[str, ...]
    temperature: float | None
    temperature_index: int | None
    layout: dict
    read_names: tuple[str, ...]
    replay: Replay | None

    @classmethod
    def open(cls, root: str | os.PathLike, fields: Sequence[str], temperature: float | None,
             source_override: str | os.PathLike | None = None, *, verify: bool = False,
             skip_bad_shards: bool = False) -> "ReadSpec":
        """Open the set (manifest and every shard checked), check the fields and the temperature; open the replay
        source if needed."""
        ts = TransferSet(root, verify=verify, skip_bad_shards=skip_bad_shards, option="skip_bad_shards")
        root, m = ts.root, ts.manifest
        fields = tuple(fields)
        bad = [f for f in fields if f not in FIELDS and not f.startswith("hint_")]  # hint_<k>: the set says (below)
        if bad or not fields:
            raise TransferSetError(f"unknown field(s) {bad or list(fields)}; choose from {', '.join(FIELDS)}")
        t_index = None if temperature is None else m.temperature_index(temperature)
        if temperature is not None and t_index is None and set(fields) & set(temperature_fields()):
            raise TransferSetError(
                f"{temperature:g} is not stored in {root} (stored: {', '.join(f'{t:g}' for t in m.temperatures)}); "
                "pick a stored one, or read 'logits' and compute the soft targets at that temperature",
                option="temperature")
        layout = shard_layout(m, include_unstored=True)
        missing = [f for f in fields if f not in layout]
        if missing:
            raise TransferSetError(f"a {m.codec} set holds no {', '.join(missing)}; read the fields this set's codec "
                                   f"keeps ({', '.join(n for n in layout if n in FIELDS)})")
        replay = None
        if "inputs" in fields and not m.input["stored"]:
            replay = Replay(root, m, source_override)
            replay.source()  # refuse a changed source now, not in a worker
        names = [f for f in fields if not (f == "inputs" and replay)]
        if replay:
            names += [n for n in replay.fields if n not in names]
        return cls(ts, root, m, fields, temperature, t_index, layout, tuple(names), replay)

    def held_shape(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """Per-row shape and stored dtype of a field as delivered (one temperature of ``soft_targets`` if chosen)."""
        return _field_shape(self.layout, name, self.temperature_index, self.manifest.positions)

    def finish(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The requested fields from read ``arrays`` (stored dtypes, one temperature if chosen: the set's
        :meth:`~transferset.format.reading.TransferSet.read` selected it): inputs replayed, torch-ready dtypes."""
        out = {}
        for name in self.fields:
            if name == "inputs" and self.replay:
                out[name] = self.replay(arrays)
            elif name in SPARSE_FIELDS:  # indices int64, the rest float32 (the temperature was chosen on read)
                out[name] = read_field(name, arrays[name], None, self.manifest.positions)
            else:
                out[name] = arrays[name]
        return out


# -- shard access -----------------------------------------------------------------------------------------------
def _next_prime(n: int) -> int:
    def prime(k: int) -> bool:
        return k > 1 and all(k % d for d in range(2, int(math.isqrt(k)) + 1))
    while not prime(n):
        n += 1
    return n


class ShardAccess:
    """The reader's policy over an opened :class:`~transferset.format.reading.TransferSet`: chunk and cache
    sizing, values checked as they are read, and shards failing mid-epoch.

    A shard failing mid-epoch stops the run, or, with ``skip_bad_shards``, gives masked-out slots for the rest of
    the epoch, keeping batch counts equal. ``row_starts`` are each shard's first global row; ``chunk_rows`` the
    plan's chunk, a whole number of HDF5 chunks.
    """

    def __init__(self, spec: ReadSpec) -> None:
        self.ts = ts = spec.ts
        self.root, self.manifest = ts.root, ts.manifest
        self.read_names = spec.read_names
        # fields with a temperature axis are read (and checked) at the one temperature delivered, if one is: the
        # values a loss sees (verify checks all); HDF5 selects it, so the others are never held
        self.temperature_index = spec.temperature_index
        self.held_row_bytes = row_bytes({n: spec.held_shape(n) for n in spec.read_names})
        self.skip_bad_shards = ts.skip_bad_shards
        self.shard_rows, self.row_starts, self.skipped = ts.shard_rows, ts.row_starts, ts.skipped
        self.failed: set[int] = set()
        if not self.manifest.complete:
            warn(f"{self.root} is incomplete (labelling was interrupted); reading the {sum(self.shard_rows)} rows "
                 "labelled so far")
        self._size(ts.chunking(self.read_names))

    def _size(self, chunking: tuple[set, int]) -> None:
        chunk_rows, chunk_bytes = chunking
        # plan chunks cover whole HDF5 chunks of every dataset read (they are multiples of one base)
        # When that multiple is too large, the smallest chunk (the widest dataset's, which label makes the
        # base of all the others) bounds the buffer; the narrow datasets' larger chunks are then read again per
        # run (a few bytes per row). Taking the largest instead made a plan chunk a whole 65536-row shard and a
        # buffer ~0.5 GB in the default layout.
        lcm = math.lcm(*chunk_rows) if chunk_rows else min(int(self.manifest.chunk_rows or 4096), _MAX_PLAN_CHUNK)
        self.chunk_rows = lcm if lcm <= _MAX_PLAN_CHUNK else min(chunk_rows)
        # what a plan chunk holds is bounded whatever the set's chunking says (contiguous datasets have none, and the
        # manifest's chunk_rows is the set's word): a buffer holds buffer_chunks of them
        self.chunk_rows = max(1, min(self.chunk_rows, _PLAN_CHUNK_BYTES // max(1, self.held_row_bytes)))
        # a cache per dataset of two of its HDF5 chunks: a read run that splits a chunk finds the rest cached.
        # Sizing it to plan chunks (whole shards, in the default layout) made every open shard hold ~100 MB; the
        # set caps it (a larger chunk is decompressed for the read and dropped)
        cache = max(1 << 20, 2 * chunk_bytes)
        self.ts.set_cache(cache, _next_prime(max(1009, 20 * len(self.read_names))))

    def read(self, shard: int, start: int, stop: int, into: dict[str, np.ndarray] | None = None,
             at: int = 0) -> dict[str, np.ndarray] | None:
        """Rows ``[start, stop)`` of ``shard``, one slice per dataset; None when it failed and skipping is on.

        With ``into``, the rows are read straight into ``into[name][at:at + stop - start]`` (no extra copy).
        """
        if shard in self.failed:
            return None
        try:
            out = self.ts.read(shard, start, stop, self.read_names, into, at, self.temperature_index)
            self.ts.check_values(shard, start, {n: out[n] for n in self.read_names}, at if into is not None else 0,
                                 stop - start)
            return out
        except BadValues:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError, TransferSetError) as e:
            p = self.ts.paths[shard]
            if not self.skip_bad_shards:
                raise TransferSetError(
                    f"is off, so a bad shard stops the run: {p}: reading rows {start}-{stop} failed ({e}); the file "
                    "is damaged or its disk is failing; run `transferset verify`, relabel the shard, or turn this "
                    "option on to train without it", FAILED, option="skip_bad_shards") from None
            warn(f"shard {p} failed to read ({e}); its rows are masked out for the rest of this epoch")
            self.failed.add(shard)
            return None

    def start_epoch(self) -> None:
        """Forget the shards that failed in an earlier epoch (each epoch tries them again)."""
        self.failed = set()

    def close(self) -> None:
        self.ts.close()


# -- batch assembly ---------------------------------------------------------------------------------------------
class BatchAssembler:
    """Turns one rank's plan into batch dicts of tensors: reads buffers of chunk runs, gathers, casts."""

    def __init__(self, spec: ReadSpec, shards: ShardAccess) -> None:
        self.spec = spec
        self.shards = shards

    def _empty(self, n: int) -> dict[str, np.ndarray]:
        return {name: np.empty((n,) + self.spec.held_shape(name)[0], self.spec.held_shape(name)[1])
                for name in self.spec.read_names}

    def read_buffer(self, plan: EpochPlan, b: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Buffer ``b`` of the plan and its validity mask (False where a failed shard's rows were)."""
        # one array per dataset, filled in place: concatenating per-run parts held every buffer twice
        units = plan.read_units(b)
        total = sum(z - a for _, a, z in units)
        arrays = self._empty(total)
        valid = np.ones(total, dtype=bool)
        at = 0
        for s, a, z in units:
            if self.shards.read(s, a, z, into=arrays, at=at) is None:
                for n in self.spec.read_names:
                    arrays[n][at:at + z - a] = 0
                valid[at:at + z - a] = False
            at += z - a
        return arrays, valid

    def gather(self, plan: EpochPlan, batch: Batch, buffers: dict) -> dict[str, torch.Tensor]:
        """The batch's rows out of the buffers it draws from, as tensors with ``mask`` and ``index``."""
        n = len(batch.rows)
        mask = batch.mask.copy()
        arrays = self._empty(n)
        # integer gathers with np.take: boolean-mask assignment of image rows was most of the reader's time
        for b in np.unique(batch.buffer).tolist():
            pos = np.flatnonzero(batch.buffer == b)
            off = batch.offset[pos]
            data, valid = buffers[b]
            for name in self.spec.read_names:
                if len(pos) == n:
                    np.take(data[name], off, axis=0, out=arrays[name])
                else:
                    arrays[name][pos] = np.take(data[name], off, axis=0)
            mask[pos] &= valid[off]
        shard = np.searchsorted(plan.shard_starts, batch.rows, side="right") - 1
        index = self.shards.row_starts[shard] + (batch.rows - plan.shard_starts[shard])
        return self.to_tensors(arrays, mask, index)

    def to_tensors(self, arrays: dict[str, np.ndarray], mask: np.ndarray, index: np.ndarray) -> dict[str, torch.Tensor]:
        out = {}
        for name, a in self.spec.finish(arrays).items():
            if name in _FLOAT_FIELDS:
                a = a.astype(np.float32)
            out[name] = torch.from_numpy(np.ascontiguousarray(a))
        out["mask"] = torch.from_numpy(mask)
        out["index"] = torch.from_numpy(index)
        return out

    def batches(self, plan: EpochPlan, start: int, worker: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``start, ...`` of ``plan`` that ``worker`` owns; a buffer is read once and dropped when done."""
        buffers: dict[int, tuple] = {}
        self.shards.start_epoch()
        try:
            for batch in plan.batches(start, worker=worker):
                need = set(np.unique(batch.buffer).tolist())
                for b in [b for b in buffers if b not in need]:
                    del buffers[b]
                for b in need - buffers.keys():
                    buffers[b] = self.read_buffer(plan, b)
                yield self.gather(plan, batch, buffers)
        finally:
            self.shards.close()


# -- resumable epochs -------------------------------------------------------------------------------------------
def _check_state(state: dict, expected: dict, length: int) -> None:
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise TransferSetError(f"reader state must be a dict with {', '.join(_STATE_KEYS)}; got {state!r:.200}")
    if state["manifest_hash"] != expected["manifest_hash"]:
        raise TransferSetError(
            f"the reader state belongs to another transfer set (manifest hash {state['manifest_hash']}, this set "
            f"has {expected['manifest_hash']}); resume with the original transfer set or start a fresh run")
    for key, value in expected.items():
        if key in state and state[key] != value and key not in ("epoch", "batches_done"):
            raise TransferSetError(
                f"the reader state was saved with {key}={state[key]!r} but this reader has {key}={value!r}; "
                f"resume with the same {key} or start a fresh run")
    if not isinstance(state["epoch"], int) or state["epoch"] < 0:
        raise TransferSetError(f"reader state epoch must be an integer >= 0, got {state['epoch']!r}")
    if not isinstance(state["batches_done"], int) or not 0 <= state["batches_done"] <= length:
        raise TransferSetError(f"reader state batches_done={state['batches_done']!r} is outside 0..{length} "
                               f"(batches per rank in this epoch); the state is damaged")


class ResumableEpoch(ABC):
    """The resume protocol of both readers: an epoch, the batches the trainer took of it, a checked state.

    A reader sets ``epoch`` and ``batches_done`` to 0, defines ``__len__`` (batches per rank) and
    ``_identity()`` (what must match for a state to be resumed: set, seed, batch size, world size, ...).
    """

    epoch: int = 0
    batches_done: int = 0

    @abstractmethod
    def _identity(self) -> dict:
        """What a saved state must match to be resumed here."""

    @abstractmethod
    def __len__(self) -> int:
        """Batches per rank in an epoch."""

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts at batch 0, the current one keeps its resume point."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise TransferSetError(f"must be an integer >= 0, got {epoch!r}", option="epoch")
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def mark_consumed(self, batches_done: int) -> None:
        """Record that the trainer has taken ``batches_done`` batches of the current epoch (absolute count)."""
        if isinstance(batches_done, bool) or not isinstance(batches_done, int) or not 0 <= batches_done <= len(self):
            raise TransferSetError(f"must be in 0..{len(self)}, got {batches_done!r}", option="batches_done")
        self.batches_done = batches_done

    def state_dict(self) -> dict:
        """A small JSON-able resume point: which set, which order, and how far the consumer got."""
        return {**self._identity(), "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`'s output; refuse a state made for another set or order."""
        _check_state(state, self._identity(), len(self))
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]


# -- the streaming reader ---------------------------------------------------------------------------------------
class TransferSetDataset(ResumableEpoch, IterableDataset):
    """Batches of a transfer set for one rank, shuffled by :func:`transferset.training.plan.epoch_plan`.

    Args:
        root: the transfer-set folder.
        fields: any of :data:`FIELDS`.
        temperature: a stored temperature for ``soft_targets`` [B, C]; None gives all stored ones [B, T, C].
            For an unstored temperature, ask for ``logits`` and compute targets with the loss code.
        batch_size, seed, shuffle, buffer_chunks: see :func:`transferset.training.plan.epoch_plan`.
        world_size, rank: default from ``torch.distributed`` when initialised, else 1 and 0.
        verify: re-hash every shard (sha256) before reading.
        skip_bad_shards: leave out (with a loud warning) shards that are missing, short or unreadable, instead
            of refusing; a shard failing mid-epoch then gives masked-out slots, keeping batch counts equal.
        source_override: the source's new location when inputs are replayed (not stored) and it moved.
    """

    def __init__(self, root: str | os.PathLike, *, fields: Sequence[str] = DEFAULT_FIELDS,
                 temperature: float | None = None, batch_size: int = 256, seed: int = 0, shuffle: bool = True,
                 world_size: int | None = None, rank: int | None = None, buffer_chunks: int = 8,
                 verify: bool = False, skip_bad_shards: bool = False,
                 source_override: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.spec = ReadSpec.open(root, fields, temperature, source_override, verify=verify,
                                  skip_bad_shards=skip_bad_shards)
        self.root, self.fields, self.temperature = self.spec.root, self.spec.fields, temperature
        self.manifest = self.spec.manifest.to_json()
        self.manifest_hash = manifest_hash(self.manifest)
        self.temperature_index = self.spec.temperature_index
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.buffer_chunks = _check_int("buffer_chunks", buffer_chunks, 1)
        self.seed = _check_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.world_size, self.rank = _default_world(world_size, rank)
        self.shards = ShardAccess(self.spec)
        self.assembler = BatchAssembler(self.spec, self.shards)
        self.shard_rows, self.row_starts = self.shards.shard_rows, self.shards.row_starts
        self.chunk_rows, self.skipped = self.shards.chunk_rows, self.shards.skipped
        self.epoch, self.batches_done = 0, 0

    def plan(self, num_workers: int = 1) -> EpochPlan:
        """This rank's plan for the current epoch."""
        return epoch_plan(self.shard_rows, self.seed, self.epoch, self.world_size, self.rank, num_workers,
                          self.batch_size, self.chunk_rows, self.buffer_chunks, self.shuffle)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        start = self.batches_done
        try:
            # loader worker 0 is asked first, so it plays the plan worker that owns batch `start`
            yield from self.assembler.batches(self.plan(workers), start, (wid + start) % workers)
        except TransferSetError as e:
            if info is None:
                raise
            # torch re-raises a worker's error as type(e)(text with a traceback): carry the option through it
            raise TransferSetError(_WORKER_TAG + json.dumps({"message": e.message, "option": e.option}),
                                   e.exit_code) from None

    def __len__(self) -> int:
        return plan_length(self.shard_rows, self.world_size, self.batch_size)

    def _identity(self) -> dict:
        return {"manifest_hash": self.manifest_hash, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle": self.shuffle, "buffer_chunks": self.buffer_chunks,
                "skipped_shards": list(self.skipped)}


def loader_batches(loader: Iterable) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate a DataLoader over a :class:`TransferSetDataset`; an error in a worker comes back as its own line.

    The error keeps its option (so the CLI still names the flag) and exits as a failed run.
    """
    try:
        yield from loader
    except TransferSetError as e:
        lines = [ln for ln in str(e).splitlines() if _WORKER_TAG in ln]
        if not lines:
            raise
        carried = json.loads(lines[-1].split(_WORKER_TAG, 1)[1])
        raise TransferSetError(carried["message"], FAILED, option=carried["option"]) from None


def open_transfer_set(root: str | os.PathLike, **kwargs) -> tuple[dict, TransferSetDataset]:
    """Open a transfer-set folder: ``(manifest, TransferSetDataset(root, **kwargs))``."""
    ds = TransferSetDataset(root, **kwargs)
    return ds.manifest, ds


# -- the in-memory reader ---------------------------------------------------------------------------------------
def load_in_memory(root: str | os.PathLike, fields: Sequence[str] = DEFAULT_FIELDS, temperature: float | None = None,
                   device: str | torch.device = "cpu", *, verify: bool = False, skip_bad_shards: bool = False,
                   source_override: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Every row of ``fields`` (plus ``index``) as tensors on ``device``, read shard by shard in whole slices.

    Tensors keep the stored dtypes (fp16 logits stay fp16 in memory; :class:`InMemoryBatches` casts per batch);
    ``soft_targets`` holds only ``temperature`` when given. Rows are in manifest order.
    """
    spec = ReadSpec.open(root, fields, temperature, source_override, verify=verify, skip_bad_shards=skip_bad_shards)
    shards = ShardAccess(spec)
    parts: dict[str, list] = {name: [] for name in (*spec.fields, "index")}
    try:
        for i, rows in enumerate(shards.shard_rows):
            got = shards.read(i, 0, rows) if rows else None
            if got is None:
                continue
            got = spec.finish(got)
            got["index"] = shards.row_starts[i] + np.arange(rows, dtype=np.int64)
            for name in parts:
                parts[name].append(got[name])
    finally:
        shards.close()
    out = {}
    for name, chunks in parts.items():
        shape, dt = spec.held_shape(name) if name != "index" else ((), np.dtype(np.int64))
        a = np.concatenate(chunks) if chunks else np.zeros((0,) + shape, dt)
        out[name] = torch.from_numpy(a).to(device)
    return out


class InMemoryBatches(ResumableEpoch):
    """Batches from :func:`load_in_memory`'s tensors, in ``torch.randperm`` order per (seed, epoch).

    Same batch format, padding rule (``plan_length`` batches per rank, masked repeats) and resume protocol
    (:class:`ResumableEpoch`) as :class:`TransferSetDataset`; pass ``manifest_hash`` so a saved state is tied
    to its transfer set.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int = 256, seed: int = 0,
                 world_size: int | None = None, rank: int | None = None, *, shuffle: bool = True,
                 manifest_hash: str | None = None) -> None:
        if "index" not in tensors:
            raise TransferSetError("tensors need an 'index' entry; build them with load_in_memory")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.tensors = tensors
        self.rows = len(tensors["index"])
        self.shuffle = bool(shuffle)
        self.world_size, self.rank = _default_world(world_size, rank)
        self.manifest_hash = manifest_hash
        self.epoch, self.batches_done = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return plan_length([self.rows], self.world_size, self.batch_size)

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                s = int(np.random.SeedSequence([self.seed, self.epoch, 2]).generate_state(1, np.uint64)[0])
                g = torch.Generator().manual_seed(s)
                perm = torch.randperm(self.rows, generator=g)
            else:
                perm = torch.arange(self.rows)
            self._order = (self.epoch, perm)
        return self._order[1]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        perm = self._permutation()
        length = len(self)
        device = self.tensors["index"].device
        for k in range(self.batches_done, length):
            first = (self.rank * length + k) * self.batch_size
            slots = torch.arange(first, first + self.batch_size)
            mask = slots < self.rows
            idx = perm[slots % self.rows].to(device)
            batch = {}
            for name, t in self.tensors.items():
                v = t.index_select(0, idx)
                batch[name] = v.float() if name in _FLOAT_FIELDS else v
            batch["mask"] = mask.to(device)
            yield batch

    def _identity(self) -> dict:
        return {"manifest_hash": self.manifest_hash, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle": self.shuffle}
