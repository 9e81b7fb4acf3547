"""Writing a per-position set (token rows, per-frame rows) from a :class:`~.run.PositionRun`, one batch at a time.

Shards are written and listed as by ``label`` for any other source (atomic shards, the manifest rewritten after each,
a killed run resumed by the same command into byte-identical files). Each batch's fields are written in the order
the run's ``encode`` gives them: that order decides where HDF5 puts each chunk, so it is part of the bytes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..errors import FAILED, TransferSetError
from ..format.manifest import write_part_manifest
from ..format.parts import merge_if_complete, merge_or_wait, part_lock_name
from ..format.schema import Manifest, ShardEntry, shard_layout
from ..format.shards import ShardWriter, shard_name
from ..progress import progress_bar
from .assembler import publish_set
from .folder import OutputFolder
from .options import LabelOptions, validate_options
from .parts import resolve_part
from .result import LabelResult
from .run import PositionRun

__all__ = ["write_position_set"]


def _add_stats(total: dict | None, s: dict) -> dict:
    if total is None:
        return s
    return {"labelled": total["labelled"] + s["labelled"],
            "ensemble_correct": total["ensemble_correct"] + s["ensemble_correct"],
            "member_correct": [a + b for a, b in zip(total["member_correct"], s["member_correct"])],
            "entropy_sum": [a + b for a, b in zip(total["entropy_sum"], s["entropy_sum"])]}


def _write_shard(run: PositionRun, folder: Path, m: Manifest, k: int, bar) -> ShardEntry:
    o = run.o
    r0, r1 = k * o.shard_size, min((k + 1) * o.shard_size, run.total_rows)
    writer = ShardWriter(folder / shard_name(k), r1 - r0, shard_layout(m), m.chunk_rows, m.compression)
    stats = None
    try:
        for b0 in range(r0, r1, o.batch_size):
            b1 = min(b0 + o.batch_size, r1)
            run.prefetch(b0, b1)  # queued already but for the shard's first batch
            if b1 < r1:  # the next batch's inference starts before this one is encoded and written
                run.prefetch(b1, min(b1 + o.batch_size, r1))
            arrays, s = run.encode(b0, b1, np.dtype(m.dtype))
            writer.write(b0 - r0, arrays)
            stats = _add_stats(stats, s)
            if bar is not None:
                bar.update(b1 - b0)
        digest = writer.finish()
    except BaseException:
        writer.abort()
        raise
    name = shard_name(k)
    return ShardEntry(name, r1 - r0, digest, row_start=r0, bytes=(folder / name).stat().st_size, stats=stats)


def _shard_rows(run: PositionRun, k: int) -> int:
    return min(run.o.shard_size, run.total_rows - k * run.o.shard_size)


def _write_listed(run: PositionRun, folder: Path, m: Manifest, shards: list[int], publish, desc: str) -> tuple[int, list]:
    """Write the shards of ``shards`` that ``m`` does not list yet, listing each in ``m`` and publishing ``m``
    (``publish(folder, m)``) after it; ``m`` is complete once all of ``shards`` are listed. Returns the rows
    written and the shards that were to do."""
    listed = {s.path for s in m.shards}
    todo = [k for k in shards if shard_name(k) not in listed]
    rows = sum(_shard_rows(run, k) for k in shards)
    bar = progress_bar(rows, desc=desc, initial=rows - sum(_shard_rows(run, k) for k in todo), quiet=run.o.quiet)
    written = 0
    for k in todo:
        entry = _write_shard(run, folder, m, k, bar)
        m.list_shards(m.shards + [entry], complete=len(m.shards) + 1 == len(shards))
        publish(folder, m)
        written += entry.rows
    if bar is not None:
        bar.close()
    return written, todo


def write_position_set(run: PositionRun, out: str | os.PathLike, o, t0: float) -> LabelResult:
    """Write (or resume) the per-position set of ``run`` over its ``total_rows`` rows into ``out``, options ``o``:
    the whole set, or this process's part (``--part I/N``, torchrun's or a Slurm array's; :func:`.parts.resolve_part`).
    """
    part = resolve_part(o.part)
    if part is not None:
        return _write_position_part(run, out, o, t0, part)
    total = run.total_rows
    shards = range(-(-total // o.shard_size))
    with OutputFolder(out) as folder:
        try:
            manifest = folder.existing(run.definition_sha256, o.overwrite)
            if manifest is not None and manifest.complete:
                return LabelResult(folder.path, manifest.to_json(), "already-complete", 0, time.perf_counter() - t0)
            status = "resumed" if manifest is not None else "written"
            m = manifest or run.new_manifest()
            written, _ = _write_listed(run, folder.path, m, list(shards), publish_set, "label")
        except OSError as e:
            raise TransferSetError(f"labelling {folder.path} failed: {e.strerror or e}; the shards listed so far are "
                                   "complete; free space or fix permissions, then run the same command to resume",
                                   FAILED) from None
    return LabelResult(folder.path, m.to_json(), status, written, time.perf_counter() - t0, total)


def _write_position_part(run: PositionRun, out: str | os.PathLike, o, t0: float, part: tuple[int, int]) -> LabelResult:
    """Part ``I`` of ``N`` of a per-position set: shard ``k`` when ``k % N == I - 1``, listed in the part's own
    manifest after each shard (as the array sources' parts, docs/FORMAT.md); the part that finds every part done
    merges them into manifest.json, the same bytes as one process."""
    if o.overwrite:
        raise TransferSetError("cannot be combined with a part (the folder is shared with the other parts); empty "
                               "the folder or choose another one", option="overwrite")
    total, (index, count) = run.total_rows, part
    owned = [k for k in range(-(-total // o.shard_size)) if k % count == index - 1]
    with OutputFolder(out, part_lock_name(index, count)) as folder:
        try:
            own, merged = folder.existing_part(run.definition_sha256, part, [shard_name(k) for k in owned])
            extra: dict = {"part": part}
            if merged is not None:  # merged before; a merge killed half-way is finished here
                merged = merge_if_complete(folder.path)
                return LabelResult(folder.path, merged.to_json(), "already-complete", 0, time.perf_counter() - t0,
                                   extra=extra | {"merged": True})
            m = own or run.new_manifest()
            m.extra["part"] = {"index": index, "count": count}
            written, todo = _write_listed(run, folder.path, m, owned, write_part_manifest,
                                          f"label part {index}/{count}")
            wrote: list = []
            merged, waits = merge_or_wait(folder.path, wrote)
            extra.update(merged_here=bool(wrote), waiting=waits)
        except OSError as e:
            raise TransferSetError(f"labelling part {index} of {count} into {folder.path} failed: {e.strerror or e}; "
                                   "the shards listed so far are complete; free space or fix permissions, then run "
                                   "the same command to resume", FAILED) from None
    status = "already-complete" if not todo else "written" if own is None else "resumed"
    final = merged if merged is not None else m
    return LabelResult(folder.path, final.to_json(), status, written, time.perf_counter() - t0,
                       sum(_shard_rows(run, k) for k in owned),
                       extra | {"merged": merged is not None})


def label_positions(make_run, noun: str, out: str | os.PathLike, options: LabelOptions | None) -> LabelResult:
    """The per-position sources' ``label``: ``options`` checked (no views, no claiming workers or Ray yet for
    ``noun``, e.g. "token rows"), then the run ``make_run(options)`` written into ``out`` (resuming if possible) and closed."""
    o = options or LabelOptions()
    validate_options(o)
    if o.views or o.augment:
        raise TransferSetError(f"augmented views of {noun} are not defined yet; label {noun} without views",
                               option="views")
    if o.claim:
        raise TransferSetError(f"cannot be combined with {noun} yet; give each process its part (--part I/N, "
                               "torchrun or a Slurm array) instead", option="claim")
    if o.engine == "ray":
        raise TransferSetError(f"cannot label {noun} yet; give each process its part (--part I/N, torchrun or a "
                               "Slurm array) instead", option="engine")
    t0 = time.perf_counter()
    run = make_run(o)
    try:
        return write_position_set(run, out, o, t0)
    finally:
        run.close()
