"""Stage-2 reader: a torch IterableDataset of whole batches over the shards, plus an in-memory fast path.

Use it as ``DataLoader(ds, batch_size=None, num_workers=k)``; the dataset batches, shuffles (see
:mod:`transferset.plan`) and pads, so every rank gets ``len(ds)`` batches of exactly ``batch_size`` rows. A batch
is a dict of tensors: the requested fields, ``mask`` (bool, False on padded slots) and ``index`` (int64 global
row of the transfer set). ``logits`` and ``soft_targets`` come as float32; ``soft_targets`` are
natural-log probabilities, [B, C] at the chosen stored temperature or [B, len(T), C] when ``temperature`` is None.

Resuming: the reader does not watch what the trainer consumes. After taking ``k`` batches of the current epoch,
the trainer calls ``ds.mark_consumed(k)``; ``ds.state_dict()`` then records ``batches_done = k`` and, after
``load_state_dict``, the next iteration yields batches ``k, k + 1, ...`` of the same plan. ``set_epoch(e)``
with a new epoch resets ``batches_done`` to 0. The state does not depend on the number of DataLoader workers.
Use ``persistent_workers=False`` (the default): workers receive the dataset, epoch included, when a loader
iterator starts.

Fork safety: shard files are opened lazily in the process that reads, remembered with ``os.getpid()`` and
closed when an iteration ends; pickling (spawn workers) drops open handles.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import FAILED, TransferSetError, printable
from ..format import check_shard, read_manifest, shard_path
from ..format.manifest import load_manifest, manifest_hash, sha256_file
from ..format.codecs import SPARSE_FIELDS, read_field  # codecs hook
from ..format.schema import Manifest, shard_layout, temperature_fields  # codecs hook
from .plan import Batch, EpochPlan, epoch_plan, plan_length

__all__ = [
    "FIELDS",
    "DEFAULT_FIELDS",
    "TransferSetDataset",
    "InMemoryBatches",
    "load_in_memory",
    "estimate_bytes",
    "stored_temperature_index",
    "open_transfer_set",
]

#: Fields a reader can ask for (``mask`` and ``index`` are always in a batch).
FIELDS = ("inputs", "soft_targets", "logits", "labels", "source_index", "view", "aug_seed") + SPARSE_FIELDS
DEFAULT_FIELDS = ("inputs", "soft_targets", "logits", "labels")
_MAX_PLAN_CHUNK = 1 << 16
_MAX_OPEN = 8  # shard files open at once per process (a buffer reads at most buffer_chunks runs)
_STATE_KEYS = ("manifest_hash", "seed", "epoch", "batches_done", "batch_size", "world_size")
_FLOAT_FIELDS = ("logits", "soft_targets")


def stored_temperature_index(manifest: dict, temperature: float) -> int | None:
    """Index of ``temperature`` in the manifest's stored temperatures (within 1e-9), or None if not stored."""
    for i, t in enumerate(manifest["temperatures"]):
        if abs(float(t) - float(temperature)) <= 1e-9:
            return i
    return None


def _layout(manifest: dict) -> dict[str, tuple[tuple, np.dtype]]:
    """Row shape and stored dtype of each shard dataset (docs/CONTRACTS.md)."""
    return shard_layout(Manifest.from_json(manifest), include_unstored=True)  # codecs hook: every codec's fields


def estimate_bytes(manifest: dict, fields: Sequence[str] = DEFAULT_FIELDS, temperature: float | None = None) -> int:
    """Bytes :func:`load_in_memory` needs for ``fields`` (stored dtypes, one temperature if given, plus ``index``)."""
    rows = sum(int(s["rows"]) for s in manifest["shards"])
    lay = _layout(manifest)
    per_row = 8  # index
    for name in fields:
        if name not in lay:
            continue
        shape, dt = lay[name]
        if name == "soft_targets" and temperature is not None:
            shape = shape[1:]
        per_row += int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    return rows * per_row


def _next_prime(n: int) -> int:
    def prime(k: int) -> bool:
        return k > 1 and all(k % d for d in range(2, int(math.isqrt(k)) + 1))
    while not prime(n):
        n += 1
    return n


def _warn(message: str) -> None:
    print(f"transferset: WARNING: {printable(message)}", file=sys.stderr, flush=True)


def _default_world(world_size: int | None, rank: int | None) -> tuple[int, int]:
    dist = torch.distributed
    live = dist.is_available() and dist.is_initialized()
    ws = world_size if world_size is not None else (dist.get_world_size() if live else 1)
    rk = rank if rank is not None else (dist.get_rank() if live else 0)
    if not isinstance(ws, int) or ws < 1 or not isinstance(rk, int) or not 0 <= rk < ws:
        raise TransferSetError(f"rank {rk!r} / world_size {ws!r} are invalid; rank must be in 0..world_size-1")
    return ws, rk


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


class _ShardFiles:
    """Lazily opened, read-only h5py handles for the process that uses them.

    At most ``max_open`` stay open (least recently used closed first): each handle holds a chunk cache per
    dataset, so keeping every shard of an epoch open made memory grow with the number of shards.
    """

    def __init__(self, paths: list[Path], rdcc_nbytes: int, rdcc_nslots: int, max_open: int = _MAX_OPEN) -> None:
        self.paths = paths
        self.rdcc_nbytes = rdcc_nbytes
        self.rdcc_nslots = rdcc_nslots
        self.max_open = max(1, int(max_open))
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
                oldest = next(iter(self._handles))
                _close_quietly(self._handles.pop(oldest))
            f = h5py.File(self.paths[shard], "r", rdcc_nbytes=self.rdcc_nbytes, rdcc_nslots=self.rdcc_nslots,
                          rdcc_w0=1.0)
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


class TransferSetDataset(IterableDataset):
    """Batches of a transfer set for one rank, shuffled by :func:`transferset.plan.epoch_plan`.

    Args:
        root: the transfer-set folder.
        fields: any of :data:`FIELDS`.
        temperature: a stored temperature for ``soft_targets`` [B, C]; None gives all stored ones [B, T, C].
            For an unstored temperature, ask for ``logits`` and compute targets with the loss code.
        batch_size, seed, shuffle, buffer_chunks: see :func:`transferset.plan.epoch_plan`.
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
        self.root = Path(root)
        self._manifest = read_manifest(self.root)
        m = self._manifest.to_json()
        self.manifest = m
        self.manifest_hash = manifest_hash(m)
        self.fields = tuple(fields)
        bad = [f for f in self.fields if f not in FIELDS]
        if bad or not self.fields:
            raise TransferSetError(f"unknown field(s) {bad or list(fields)}; choose from {', '.join(FIELDS)}")
        if m["dtype"] not in ("float16", "float32"):
            raise TransferSetError(f"{self.root}: manifest dtype {m['dtype']!r} is not float16 or float32; "
                                   "this transferset cannot read it")
        self.temperature = temperature
        self.temperature_index = None
        if temperature is not None:
            self.temperature_index = stored_temperature_index(m, temperature)
            if self.temperature_index is None and set(self.fields) & set(temperature_fields()):  # codecs hook
                raise TransferSetError(
                    f"temperature {temperature:g} is not stored in {self.root} (stored: "
                    f"{', '.join(f'{t:g}' for t in m['temperatures'])}); pick a stored one, or read 'logits' "
                    "and compute the soft targets at that temperature")
        for name, val in (("batch_size", batch_size), ("buffer_chunks", buffer_chunks), ("seed", seed)):
            if isinstance(val, bool) or not isinstance(val, int) or val < (0 if name == "seed" else 1):
                raise TransferSetError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} "
                                       f"integer, got {val!r}")
        self.batch_size, self.seed, self.shuffle, self.buffer_chunks = batch_size, seed, bool(shuffle), buffer_chunks
        self.world_size, self.rank = _default_world(world_size, rank)
        self.skip_bad_shards = bool(skip_bad_shards)
        self.replay = "inputs" in self.fields and not m["input"].get("stored", False)
        self.source_spec = str(source_override) if source_override is not None else m["source"].get("data")
        self._source = None
        self._source_pid = None
        self.layout = _layout(m)
        if [f for f in self.fields if f not in self.layout and f != "inputs"]:  # codecs hook
            raise TransferSetError(f"{self.root}: a {m.get('codec', 'dense')} set holds no "
                                   f"{', '.join(f for f in self.fields if f not in self.layout)}")
        # HDF5 datasets read per batch: replay needs the trace columns instead of the pixels
        names = [f for f in self.fields if not (f == "inputs" and self.replay)]
        if self.replay:
            names += [n for n in ("source_index", "view") if n not in names]
        self.read_names = tuple(names)
        if self.replay:
            self._source_handle()  # refuse a changed source now, not in a worker
        self._validate_shards(verify)
        self.epoch = 0
        self.batches_done = 0

    # -- opening -----------------------------------------------------------------------------------------
    def _validate_shards(self, verify: bool) -> None:
        m = self.manifest
        rows, paths, self.skipped = [], [], []
        chunk_rows: set[int] = set()
        chunk_bytes = 0
        for entry in m["shards"]:
            p = shard_path(self.root, entry["path"])
            reason = check_shard(self.root, self._manifest.shards[len(paths)], self._manifest)
            if reason is None and verify and sha256_file(p) != entry["sha256"]:
                reason = "sha256 mismatch (the file changed or is corrupt)"
            if reason is None and not chunk_rows and entry["rows"] > 0:
                try:
                    with h5py.File(p, "r") as f:
                        chunk_rows = {f[n].chunks[0] for n in self.read_names if f[n].chunks}
                        chunk_bytes = max([int(np.prod(f[n].chunks, dtype=np.int64)) * f[n].dtype.itemsize
                                           for n in self.read_names if f[n].chunks] or [0])
                except OSError as e:
                    reason = f"unreadable HDF5 ({e})"
            if reason is not None:
                if not self.skip_bad_shards:
                    raise TransferSetError(
                        f"{p}: {reason}; relabel it (`transferset label` resumes), run `transferset verify`, "
                        "or pass skip_bad_shards (--skip-bad-shards) to train without it")
                _warn(f"skipping shard {p} ({reason}); its {entry['rows']} rows are left out of training")
                self.skipped.append(entry["path"])
                rows.append(0)
            else:
                rows.append(int(entry["rows"]))
            paths.append(p)
        if not m["complete"]:
            _warn(f"{self.root} is incomplete (labelling was interrupted); reading the {sum(rows)} rows labelled so far")
        self.shard_rows = rows
        starts = np.cumsum([0] + [int(s["rows"]) for s in m["shards"]])
        self.row_starts = np.asarray([int(s.get("row_start", starts[i])) for i, s in enumerate(m["shards"])],
                                     dtype=np.int64)
        # plan chunks cover whole HDF5 chunks of every dataset read (they are multiples of one base)
        # When that multiple is too large, the smallest chunk (the widest dataset's, which label makes the
        # base of all the others) bounds the buffer; the narrow datasets' larger chunks are then read again per
        # run (a few bytes per row). Taking the largest instead made a plan chunk a whole 65536-row shard and a
        # buffer ~0.5 GB in the default layout.
        lcm = math.lcm(*chunk_rows) if chunk_rows else int(m.get("chunk_rows", 4096))
        self.chunk_rows = lcm if lcm <= _MAX_PLAN_CHUNK else min(chunk_rows)
        # a cache per dataset of two of its HDF5 chunks: a read run that splits a chunk finds the rest cached.
        # Sizing it to plan chunks (whole shards, in the default layout) made every open shard hold ~100 MB.
        cache = max(1 << 20, 2 * chunk_bytes)
        self._files = _ShardFiles(paths, cache, _next_prime(max(1009, 20 * len(self.read_names))))
        self._failed: set[int] = set()

    def _source_handle(self):
        if self._source is not None and self._source_pid == os.getpid():
            return self._source
        from ..labelling import sources  # stage-1 ground module; only needed when inputs are replayed

        src_m = self.manifest["source"]
        if not self.source_spec:
            raise TransferSetError(f"{self.root}: inputs are not stored and the manifest names no source; "
                                   "read without 'inputs' or relabel with stored inputs")
        limit = src_m["limit"] if "limit" in src_m else src_m.get("rows")
        src = sources.open_source(self.source_spec, limit=limit)
        if src.fingerprint() != src_m.get("fingerprint"):
            raise TransferSetError(
                f"the source {self.source_spec} changed since labelling (fingerprint {src.fingerprint()} != "
                f"{src_m.get('fingerprint')} in {self.root}); restore the original data, pass the right one with "
                "source_override (--source), or read without 'inputs'")
        self._source, self._source_pid = src, os.getpid()
        return src

    def _replay(self, source_index: np.ndarray, view: np.ndarray) -> np.ndarray:
        from ..labelling import augment

        aug = self.manifest["augment"]
        spec = augment.parse_augment(aug.get("spec", ""))
        x = augment.replay(self._source_handle(), source_index, view, spec, int(aug.get("seed", 0)))
        shape, dt = self.layout["inputs"]
        x = np.asarray(x, dtype=dt)
        if x.shape != (len(source_index),) + shape:
            raise TransferSetError(f"replayed inputs have shape {x.shape[1:]}, the manifest says {shape}; "
                                   f"the source {self.source_spec} is not the one labelled")
        return x

    # -- reading -----------------------------------------------------------------------------------------
    def _read(self, shard: int, start: int, stop: int, into: dict[str, np.ndarray] | None = None,
              at: int = 0) -> dict[str, np.ndarray] | None:
        """Rows ``[start, stop)`` of ``shard``, one slice per dataset; None when it failed and skipping is on.

        With ``into``, the rows are read straight into ``into[name][at:at + stop - start]`` (no extra copy).
        """
        if shard in self._failed:
            return None
        try:
            f = self._files.get(shard)
            if into is None:
                return {n: f[n][start:stop] for n in self.read_names}
            if stop > start:
                for n in self.read_names:
                    f[n].read_direct(into[n], np.s_[start:stop], np.s_[at:at + stop - start])
            return into
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            p = self._files.paths[shard]
            if not self.skip_bad_shards:
                raise TransferSetError(
                    f"{p}: reading rows {start}-{stop} failed ({e}); the file is damaged or its disk is failing; "
                    "run `transferset verify`, relabel the shard, or pass skip_bad_shards (--skip-bad-shards)",
                    FAILED) from None
            _warn(f"shard {p} failed to read ({e}); its rows are masked out for the rest of this epoch")
            self._failed.add(shard)
            return None

    def _read_buffer(self, plan: EpochPlan, b: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        # one array per dataset, filled in place: concatenating per-run parts held every buffer twice
        units = plan.read_units(b)
        total = sum(z - a for _, a, z in units)
        arrays = {n: np.empty((total,) + self.layout[n][0], self.layout[n][1]) for n in self.read_names}
        valid = np.ones(total, dtype=bool)
        at = 0
        for s, a, z in units:
            if self._read(s, a, z, into=arrays, at=at) is None:
                for n in self.read_names:
                    arrays[n][at:at + z - a] = 0
                valid[at:at + z - a] = False
            at += z - a
        return arrays, valid

    def _to_tensors(self, arrays: dict[str, np.ndarray], mask: np.ndarray, index: np.ndarray) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.fields:
            if name == "inputs" and self.replay:
                a = self._replay(arrays["source_index"], arrays["view"])
            elif name == "soft_targets":
                a = arrays[name] if self.temperature_index is None else arrays[name][:, self.temperature_index]
                a = a.astype(np.float32)
            elif name == "logits":
                a = arrays[name].astype(np.float32)
            elif name in SPARSE_FIELDS:  # codecs hook
                a = read_field(name, arrays[name], self.temperature_index)
            else:
                a = arrays[name]
            out[name] = torch.from_numpy(np.ascontiguousarray(a))
        out["mask"] = torch.from_numpy(mask)
        out["index"] = torch.from_numpy(index)
        return out

    def _assemble(self, plan: EpochPlan, batch: Batch, buffers: dict) -> dict[str, torch.Tensor]:
        n = len(batch.rows)
        mask = batch.mask.copy()
        arrays = {name: np.empty((n,) + self.layout[name][0], self.layout[name][1]) for name in self.read_names}
        # integer gathers with np.take: boolean-mask assignment of image rows was most of the reader's time
        for b in np.unique(batch.buffer).tolist():
            pos = np.flatnonzero(batch.buffer == b)
            off = batch.offset[pos]
            data, valid = buffers[b]
            for name in self.read_names:
                if len(pos) == n:
                    np.take(data[name], off, axis=0, out=arrays[name])
                else:
                    arrays[name][pos] = np.take(data[name], off, axis=0)
            mask[pos] &= valid[off]
        shard = np.searchsorted(plan.shard_starts, batch.rows, side="right") - 1
        index = self.row_starts[shard] + (batch.rows - plan.shard_starts[shard])
        return self._to_tensors(arrays, mask, index)

    def plan(self, num_workers: int = 1) -> EpochPlan:
        """This rank's plan for the current epoch."""
        return epoch_plan(self.shard_rows, self.seed, self.epoch, self.world_size, self.rank, num_workers,
                          self.batch_size, self.chunk_rows, self.buffer_chunks, self.shuffle)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        plan = self.plan(workers)
        start = self.batches_done
        buffers: dict[int, tuple] = {}
        self._failed = set()
        try:
            # loader worker 0 is asked first, so it plays the plan worker that owns batch `start`
            for batch in plan.batches(start, worker=(wid + start) % workers):
                need = set(np.unique(batch.buffer).tolist())
                for b in [b for b in buffers if b not in need]:
                    del buffers[b]
                for b in need - buffers.keys():
                    buffers[b] = self._read_buffer(plan, b)
                yield self._assemble(plan, batch, buffers)
        finally:
            self._files.close()

    def __len__(self) -> int:
        return plan_length(self.shard_rows, self.world_size, self.batch_size)

    # -- epochs and resume -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts at batch 0, the current one keeps its resume point."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise TransferSetError(f"epoch must be an integer >= 0, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def mark_consumed(self, batches_done: int) -> None:
        """Record that the trainer has taken ``batches_done`` batches of the current epoch (absolute count)."""
        if isinstance(batches_done, bool) or not isinstance(batches_done, int) or not 0 <= batches_done <= len(self):
            raise TransferSetError(f"batches_done must be in 0..{len(self)}, got {batches_done!r}")
        self.batches_done = batches_done

    def _identity(self) -> dict:
        return {"manifest_hash": self.manifest_hash, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle": self.shuffle, "buffer_chunks": self.buffer_chunks,
                "skipped_shards": list(self.skipped)}

    def state_dict(self) -> dict:
        """A small JSON-able resume point: which set, which order, and how far the consumer got."""
        return {**self._identity(), "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`'s output; refuse a state made for another set or order."""
        _check_state(state, self._identity(), len(self))
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None, "_source_pid": None}


def open_transfer_set(root: str | os.PathLike, **kwargs) -> tuple[dict, TransferSetDataset]:
    """Open a transfer-set folder: ``(manifest, TransferSetDataset(root, **kwargs))``."""
    ds = TransferSetDataset(root, **kwargs)
    return ds.manifest, ds


def load_in_memory(root: str | os.PathLike, fields: Sequence[str] = DEFAULT_FIELDS, temperature: float | None = None,
                   device: str | torch.device = "cpu", *, verify: bool = False, skip_bad_shards: bool = False,
                   source_override: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Every row of ``fields`` (plus ``index``) as tensors on ``device``, read shard by shard in whole slices.

    Tensors keep the stored dtypes (fp16 logits stay fp16 in memory; :class:`InMemoryBatches` casts per batch);
    ``soft_targets`` holds only ``temperature`` when given. Rows are in manifest order.
    """
    ds = TransferSetDataset(root, fields=fields, temperature=temperature, world_size=1, rank=0, verify=verify,
                            skip_bad_shards=skip_bad_shards, source_override=source_override)
    parts: dict[str, list] = {}
    try:
        for i, rows in enumerate(ds.shard_rows):
            if rows == 0:
                continue
            got = ds._read(i, 0, rows)
            if got is None:
                continue
            if ds.replay:
                got["inputs"] = ds._replay(got["source_index"], got["view"])
            if "soft_targets" in got and ds.temperature_index is not None:
                got["soft_targets"] = np.ascontiguousarray(got["soft_targets"][:, ds.temperature_index])
            got.update({n: read_field(n, got[n], ds.temperature_index) for n in SPARSE_FIELDS if n in got})  # codecs hook
            got["index"] = ds.row_starts[i] + np.arange(rows, dtype=np.int64)
            for name in (*ds.fields, "index"):
                parts.setdefault(name, []).append(got[name])
    finally:
        ds._files.close()
    out = {}
    for name in (*ds.fields, "index"):
        if name in parts:
            a = np.concatenate(parts[name])
        else:
            shape, dt = ds.layout.get(name, ((), np.dtype(np.int64)))
            if name == "soft_targets" and ds.temperature_index is not None:
                shape = shape[1:]
            a = np.zeros((0,) + shape, dt)
        out[name] = torch.from_numpy(a).to(device)
    return out


class InMemoryBatches:
    """Batches from :func:`load_in_memory`'s tensors, in ``torch.randperm`` order per (seed, epoch).

    Same batch format, padding rule (``plan_length`` batches per rank, masked repeats) and resume protocol
    (``set_epoch``, ``mark_consumed``, ``state_dict``/``load_state_dict``) as :class:`TransferSetDataset`;
    pass ``manifest_hash`` so a saved state is tied to its transfer set.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int = 256, seed: int = 0,
                 world_size: int | None = None, rank: int | None = None, *, shuffle: bool = True,
                 manifest_hash: str | None = None) -> None:
        if "index" not in tensors:
            raise TransferSetError("tensors need an 'index' entry; build them with load_in_memory")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TransferSetError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TransferSetError(f"seed must be a non-negative integer, got {seed!r}")
        self.tensors = tensors
        self.rows = len(tensors["index"])
        self.batch_size, self.seed, self.shuffle = batch_size, seed, bool(shuffle)
        self.world_size, self.rank = _default_world(world_size, rank)
        self.manifest_hash = manifest_hash
        self.epoch = 0
        self.batches_done = 0
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

    set_epoch = TransferSetDataset.set_epoch
    mark_consumed = TransferSetDataset.mark_consumed

    def _identity(self) -> dict:
        return {"manifest_hash": self.manifest_hash, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle": self.shuffle}

    def state_dict(self) -> dict:
        """Same keys as :meth:`TransferSetDataset.state_dict`."""
        return {**self._identity(), "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        """Resume; refuses a state made for another set, seed, batch size or world size."""
        _check_state(state, self._identity(), len(self))
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
