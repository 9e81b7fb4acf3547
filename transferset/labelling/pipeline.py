"""Stage 1: run an ONNX ensemble over a data source and write a transfer set.

Three overlapping stages in threads (DESIGN.md): prepare (read + augment + preprocess) -> ``session.run`` for
every member -> one writer thread (combine, convert, write HDF5, checksum, manifest). ``session.run`` and
h5py release the GIL, so the stages overlap. On a CPU the inference stage runs ``Ensemble.lanes`` batches at once,
each in its own thread on sessions of ``threads // lanes`` intra-op threads, and hands them on in order
(``ensemble.cpu_lanes`` says why). Batches are laid out per shard from the shard's first row, so a
resumed run feeds the models exactly the batches an uninterrupted run would, and writes identical bytes.

The parts: :class:`~.geometry.RowGeometry` (which row is which view of which source row, in which shard),
:class:`~.folder.OutputFolder` (lock, debris, resume), :class:`~.batches.BatchPreparer` (the preparing stage),
:class:`LabelPipeline` (the threads) and :class:`~.assembler.ShardAssembler` (shards, statistics, manifest).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import queue
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import FAILED, TransferSetError
from ..format.card import write_card
from ..format.codecs import resolve_codec
from ..format.manifest import write_part_manifest
from ..format.parts import merge_if_complete, merge_or_wait, part_lock_name, read_manifest
from ..format.schema import MANIFEST_NAME, Manifest
from ..format.shards import TMP_PREFIX, shard_name
from ..inputs.photos import is_photo_spec
from ..inputs.tokens import open_token_rows
from ..progress import progress_bar
from .assembler import ShardAssembler
from .batches import Batch, BatchPreparer
from .ensemble import Ensemble
from .folder import OutputFolder
from .frame_label import is_frame_teacher, label_frames
from .geometry import RowGeometry
from .hints import reduce_hint
from .lm_graph import is_decoder
from .options import DEFAULT_TEMPERATURES, LabelOptions, validate_options
from .parts import resolve_part
from .photo_label import fixed_listing, photo_run
from .result import LabelResult
from .run import Handoff, Run, array_run, stored_compression
from .token_label import label_tokens

__all__ = ["LabelOptions", "LabelResult", "LabelPipeline", "label", "DEFAULT_TEMPERATURES"]

_QUEUE_DEPTH = 3
#: batches queued per lane, so a lane that finishes finds its next batch waiting instead of waiting for this
#: thread to wake and hand it one (lanes idled about a tenth of a 10-class run); only for batches whose inputs
#: hold at most _QUEUE_BYTES, so large inputs (photos at full size) keep one batch a lane
_PENDING_PER_LANE = 2
_QUEUE_BYTES = 16 << 20
_WRITE_ROWS = 4096  # rows per soft-target computation and HDF5 write (see LabelPipeline._write_loop)
_WRITE_BYTES = 4 << 20  # ... or fewer, once the group's logits reach this many bytes
_END = object()  # end of the batches, passed down the queues


class LabelPipeline:
    """prepare (a thread) -> ``session.run`` (the calling thread, or its lanes) -> write (a thread), joined by
    bounded queues.

    Args:
        prepare: ``prepare(shard, r0, r1)`` gives the :class:`~.batches.Batch` of rows ``[r0, r1)``.
        ensemble: runs the members on a batch's feeds.
        assembler: writes labelled batches into shards and the manifest.
        geometry: the run's rows and shards.
        shards: the shards to write, in order (those a resumed manifest does not list yet).
        bar: a progress bar, or None.
        handoff: a claiming worker's shard (:class:`~.run.Handoff`): wait for the shard before to be inferred,
            say when the last batch goes into inference and when it is through.
    """

    def __init__(self, prepare: BatchPreparer, ensemble: Ensemble, assembler: ShardAssembler, geometry: RowGeometry,
                 shards: Sequence[int], bar=None, handoff: Handoff | None = None) -> None:
        self.prepare, self.ensemble, self.assembler, self.geometry = prepare, ensemble, assembler, geometry
        self.shards, self.bar, self.handoff = list(shards), bar, handoff
        self._last = (self.shards[-1], geometry.shard_bounds(self.shards[-1])[1]) if self.shards else None
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._prepared: queue.Queue = queue.Queue(_QUEUE_DEPTH)
        self._labelled: queue.Queue = queue.Queue(_QUEUE_DEPTH)

    def run(self) -> None:
        """Label every batch of ``shards``; raise the first error any stage met."""
        joins = self._start_stages()
        try:
            if self._my_turn():
                self._infer_loop()
            if self.handoff is not None:
                self.handoff.inferred()
        except BaseException as e:
            self._fail(e)
        finally:
            if not self._stop.is_set():  # normal end: let the writer drain the queue before stopping it
                joins[1]()
            self._stop.set()
            for join in joins:
                join()
            if self.bar is not None:
                self.bar.close()
            self.assembler.abort()
        if self._errors:
            raise self._errors[0]

    def _start_stages(self) -> list:
        """Start the prepare and write stages, on the worker's kept threads when it has some (a claiming worker:
        ``handoff.stages``); the functions that wait for each to end."""
        kept = self.handoff.stages if self.handoff is not None else None
        if kept is not None:
            return [kept.run(self._prepare_loop).wait, kept.run(self._write_loop).wait]
        threads = [threading.Thread(target=self._prepare_loop, name="ts-prepare", daemon=True),
                   threading.Thread(target=self._write_loop, name="ts-write", daemon=True)]
        for t in threads:
            t.start()
        return [t.join for t in threads]

    # -- the three stages ------------------------------------------------------------------------------------
    def _prepare_loop(self) -> None:
        try:
            with contextlib.closing(self.prepare.batches(self.shards)) as batches:
                for batch in batches:
                    if not self._put(self._prepared, batch):
                        return
            self._put(self._prepared, _END)
        except BaseException as e:
            self._fail(e)

    def _infer_loop(self) -> None:
        lanes = getattr(self.ensemble, "lanes", 1)
        if lanes > 1:
            return self._infer_lanes(lanes)
        while not self._stop.is_set():
            batch = self._get(self._prepared)
            if batch is None:
                return
            if batch is _END:
                self._put(self._labelled, _END)
                return
            if not self._put(self._labelled, self._infer(batch)):
                return

    def _my_turn(self) -> bool:
        """Wait until the shard before (a claiming worker's) has been through the ensemble; False when stopped."""
        after = self.handoff.after if self.handoff is not None else None
        while after is not None and not after.wait(0.1):
            if self._stop.is_set():
                return False
        return True

    def _infer(self, batch: Batch) -> Batch:
        if self.handoff is not None and (batch.shard, batch.r1) == self._last:
            self.handoff.last_batch()
        batch.logits, raw = self.ensemble.run_with_hints(batch.feeds, first_row=batch.r0)
        batch.hints = _reduced_hints(self.ensemble, raw)
        batch.feeds = None
        return batch

    def _infer_lanes(self, lanes: int) -> None:
        """Up to ``lanes`` batches in inference at once (``Ensemble.lanes``), handed on in their order.

        The first batch runs alone: it settles what every later batch is checked against (the members' output
        kind, the class count, the hint shapes).
        """
        pending: collections.deque = collections.deque()
        with concurrent.futures.ThreadPoolExecutor(lanes, thread_name_prefix="ts-infer") as pool:
            first = True
            while not self._stop.is_set():
                batch = self._get(self._prepared)
                if batch is None:
                    return
                if batch is _END:
                    break
                if first:
                    first = False
                    if not self._put(self._labelled, self._infer(batch)):
                        return
                    continue
                depth = lanes * (_PENDING_PER_LANE if _feed_bytes(batch) <= _QUEUE_BYTES else 1)
                pending.append(pool.submit(self._infer, batch))
                while len(pending) >= depth or (pending and pending[0].done()):
                    if not self._put(self._labelled, pending.popleft().result()):
                        return
            while pending and not self._stop.is_set():
                if not self._put(self._labelled, pending.popleft().result()):
                    return
        self._put(self._labelled, _END)

    def _write_loop(self) -> None:
        # Inference batches are grouped into slices of about _WRITE_ROWS rows before the soft targets, the
        # statistics and the HDF5 writes: per-call overhead paid once per slice instead of once per batch, which
        # on a CPU is time taken from ONNX Runtime. A group also ends at _WRITE_BYTES of logits: the writer's
        # arrays (soft targets at every temperature, their exponentials, the float16 copies) then stay small
        # enough for the allocator to reuse instead of mapping fresh pages for every group (at 1,000 classes,
        # 4 members and 5 temperatures, 4,096 rows made 80 MB arrays, and their page faults cost as much as the
        # maths). Groups depend only on the batch sequence and the logits' shape (they restart at every shard),
        # so the bytes written stay the same from run to run and across a resume.
        group: list[Batch] = []
        try:
            while True:
                batch = self._get(self._labelled)
                if batch is None or batch is _END:
                    return
                group.append(batch)
                shard_end = self.geometry.shard_bounds(batch.shard)[1]
                if batch.r1 < shard_end and batch.r1 - group[0].r0 < _WRITE_ROWS and \
                        sum(b.logits.nbytes for b in group) < _WRITE_BYTES:
                    continue
                joined = Batch.join(group)
                group.clear()
                self.assembler.add(joined)
                if self.bar is not None:
                    self.bar.update(joined.r1 - joined.r0)
        except BaseException as e:
            self._fail(e)

    # -- queues that give up when a stage has failed -----------------------------------------------------------
    def _fail(self, e: BaseException) -> None:
        self._errors.append(e)
        self._stop.set()

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue):
        while not self._stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None


def _feed_bytes(batch: Batch) -> int:
    return sum(getattr(f, "nbytes", 0) for f in (batch.feeds or {}).values())


def _reduced_hints(ens: Ensemble, raw: list[np.ndarray]) -> dict[str, np.ndarray] | None:
    """Each hint's batch reduced (labelling.hints); the first batch fixes each tensor's per-row shape."""
    if not ens.hints:
        return None
    shapes = [list(r.shape[1:]) for r in raw]
    if ens.hint_shapes is None:
        ens.hint_shapes = shapes
    elif shapes != ens.hint_shapes:
        raise TransferSetError(f"hint tensors changed shape between batches ({ens.hint_shapes} -> {shapes}); a "
                               "hint needs a fixed shape a row", option="hint")
    return {f"hint_{k}": reduce_hint(r, h.reduce) for k, (h, r) in enumerate(zip(ens.hints, raw))}


def label(ensemble: Sequence[str | os.PathLike], data: str | None, out: str | os.PathLike,
          options: LabelOptions | None = None) -> LabelResult:
    """Label ``data`` with the ONNX ``ensemble`` into the transfer-set folder ``out`` (resuming if possible).

    ``data`` is an array source (:func:`~.sources.open_source`) or a photo folder or file list
    (:func:`~.photos.open_photo_source`, labelled by :func:`~.photo_label.photo_run`).
    """
    o = options or LabelOptions()
    validate_options(o)
    if o.claim and o.part is not None:
        raise TransferSetError("cannot be combined with --claim: claiming workers take shards as they come",
                               option="part")
    if o.engine == "ray" and (o.claim or o.part is not None):
        raise TransferSetError("ray runs one task per shard; it cannot be combined with --claim or --part",
                               option="engine")
    first = ensemble[0] if ensemble else None
    if o.text is None and data is not None and is_frame_teacher(first, o.output_name):
        return label_frames(ensemble, data, out, o)
    if o.text is not None or (data is not None and is_decoder(first, o.output_name)):
        return _label_tokens(ensemble, data, out, o)
    if data is None:
        raise TransferSetError("is needed (or text with a tokenizer, for language-model teachers)", option="data")
    part = None if o.claim else resolve_part(o.part)
    t_start = time.perf_counter()
    # a Ray driver only counts the shards (the tasks label, on their nodes' devices): on the CPU, wherever it runs
    here = replace(o, device="cpu") if o.engine == "ray" else o
    # a run per source kind, one interface (labelling.run.Run) from here on
    if is_photo_spec(str(data)):  # the files fixed once per folder, so every process labels the same rows
        run, labels = photo_run(ensemble, str(data), here, fixed_listing(out, str(data), o.overwrite))
    else:
        run, labels = array_run(ensemble, str(data), here)
    try:
        if o.engine == "ray":
            return _label_with_ray(ensemble, data, Path(out), run, o, t_start)
        if o.claim:
            return _label_claiming(Path(out), run, labels, t_start)
        if part is not None:
            run = replace(run, part=part)
        with OutputFolder(out, part_lock_name(*part) if part else ".lock") as folder:
            try:
                return (_label_part if part else _label_into)(folder, run, labels, t_start)
            except OSError as e:  # disk full, permission denied, read-only folder: what was listed stays valid
                where = f" ({e.filename})" if e.filename else ""
                raise TransferSetError(f"labelling {folder.path} failed: {e.strerror or e}{where}; the shards listed "
                                       "so far are complete; free space or fix permissions, then run the same "
                                       "command to resume", FAILED) from None
    finally:
        run.ensemble.close()  # no session left to be inherited by a later fork (Ensemble.close)


def _label_tokens(ensemble: Sequence[str | os.PathLike], data: str | None, out, o: LabelOptions) -> LabelResult:
    if o.text is not None and data is not None:
        raise TransferSetError("and text are two sources; give one", option="data")
    rows = open_token_rows(None if data is None else str(data), o.text, o.tokenizer, o.seq_len, o.text_field, o.limit)
    return label_tokens(ensemble, rows, out, o)


def _write_shards(run: Run, out: Path, manifest: Manifest | None, shards: list[int], labels: np.ndarray | None,
                  publish=None) -> ShardAssembler:
    """Label the shards of ``shards`` that ``manifest`` (being resumed, or None) does not list yet."""
    o, ens, geometry = run.options, run.ensemble, run.geometry
    prepare = run.preparer(labels)
    if manifest is not None and resolve_codec(o.codec, manifest.num_classes) != manifest.codec:
        raise TransferSetError(f"{out}: holds a {manifest.codec} set, not {resolve_codec(o.codec, manifest.num_classes)}; "
                               "choose another folder, or start over with overwrite", option="codec")
    if manifest is not None:  # resume: the recorded output kinds hold, whatever batch comes first now
        for m, t in zip(ens.members, manifest.teachers):
            m.output_kind = t["output_kind"]
        ens.num_classes = manifest.num_classes
    listed = {s.path for s in manifest.shards} if manifest is not None else set()
    todo = [k for k in shards if shard_name(k) not in listed]
    if manifest is None and todo and todo[0] != 0 and any(m.output_kind is None for m in ens.members):
        # a part's first batch is not the set's: detect output kinds on the set's first batch, as one run does
        # (a part that begins with shard 0 detects them on that batch, in the pipeline, as one run does)
        k, r0, r1 = next(geometry.batches([0]))
        ens.run(prepare(k, r0, r1).feeds, first_row=r0)
    assembler = ShardAssembler(out, geometry, manifest, run.new_manifest, o.combine, run.weights, o.temperatures,
                               stored_compression(o), expected_shards=len(shards), publish=publish,
                               lists_bad_files=run.lists_bad_files, tmp_prefix=run.tmp_prefix)
    total = geometry.rows_of(shards)
    bar = progress_bar(total, desc="label", initial=total - geometry.rows_of(todo), quiet=o.quiet)
    LabelPipeline(prepare, ens, assembler, geometry, todo, bar, run.handoff).run()
    return assembler


def _label_into(folder: OutputFolder, run: Run, labels: np.ndarray | None, t_start: float) -> LabelResult:
    o, geometry, out = run.options, run.geometry, folder.path
    manifest = folder.existing(run.definition_sha256, o.overwrite)
    if manifest is not None and manifest.complete:
        write_card(out, manifest)  # a card lost or edited since is made true again
        return LabelResult(out, manifest.to_json(), "already-complete", 0, time.perf_counter() - t_start)
    assembler = _write_shards(run, out, manifest, geometry.part_shards(None), labels)
    final = assembler.manifest
    if final is None or not final.complete:
        raise TransferSetError(f"labelling {out} stopped before the last shard", FAILED)
    return LabelResult(out, final.to_json(), "resumed" if manifest is not None else "written",
                       assembler.rows_written, time.perf_counter() - t_start, geometry.total_rows)


def _label_with_ray(ensemble, data: str, out: Path, run: Run, o: LabelOptions, t_start: float) -> LabelResult:
    """``--engine ray``: one Ray task per shard (:mod:`.ray_engine`), each labelled as a part of its own with the
    options as given (``o``; ``run.options`` holds what they resolved to here, which a task resolves again)."""
    from .ray_engine import RaySpec, import_ray, label_with_ray

    if o.overwrite:
        raise TransferSetError("cannot be combined with --engine ray (the tasks share the folder); empty the folder "
                               "or choose another one", option="overwrite")
    spec = RaySpec(o.ray_address, o.ray_cpus, o.ray_gpus, o.ray_retries, o.ray_resources, o.ray_wait)
    _ray_device(o.device, o.ray_gpus)
    import_ray()  # refuse before anything is written when the extra is missing
    run.ensemble.close()  # the driver only counted the shards; the tasks open their own sessions
    got = label_with_ray(label, [str(e) for e in ensemble], str(data), out, o, run.geometry.num_shards, spec,
                         rows_of=lambda k: run.geometry.rows_of([k]))
    if not (out / MANIFEST_NAME).exists():
        merge_if_complete(out)  # every task done; a merge that a last task could not finish
    final = read_manifest(out)
    return LabelResult(out, final.to_json(), "written", got["rows"], time.perf_counter() - t_start,
                       run.geometry.total_rows, {"engine": "ray", "tasks": got["tasks"], "processes": len(got["pids"]),
                                                 "nodes": len(got["nodes"]), "gpus": o.ray_gpus,
                                                 "on_cpu": got["on_cpu"]})


def _ray_device(device: str | None, gpus: float) -> None:
    """Refuse a GPU device that the Ray tasks would not be given: Ray hands a task GPUs only when it asks for them
    (--ray-gpus), and numbers them from 0 in the task."""
    spec = (device or "auto").strip().lower()
    if spec.startswith("cuda") and gpus <= 0:
        raise TransferSetError(f"{device} with --engine ray needs --ray-gpus (e.g. 1): Ray gives a task a GPU only "
                               "when it asks for one", option="device")
    index = spec.partition(":")[2]
    if spec.startswith("cuda:") and index.isdigit() and int(index) >= max(1, int(gpus)):
        raise TransferSetError(f"{device}: each Ray task sees only the {max(1, int(gpus))} GPU(s) it asked for "
                               "(--ray-gpus), numbered from 0; give cuda or auto", option="device")


def _label_claiming(out: Path, run: Run, labels: np.ndarray | None, t_start: float) -> LabelResult:
    """``--claim``: take shards through leases (:mod:`.claim`), each labelled as a part of its own; the worker that
    finishes the last shard merges the set."""
    from .claim import claim_shards, claimed_run, lock_of

    if run.options.overwrite:
        raise TransferSetError("cannot be combined with --claim (the folder is shared with the other workers); empty "
                               "the folder or choose another one", option="overwrite")
    count = run.geometry.num_shards
    worker_run = replace(run, tmp_prefix=f"{TMP_PREFIX}claim-{os.getpid()}-{uuid.uuid4().hex[:8]}-")

    def label_shard(k: int, handoff: Handoff | None = None) -> tuple[int, dict | None]:
        with contextlib.ExitStack() as stack:
            try:
                folder = stack.enter_context(OutputFolder(out, lock_of(k, count)))
            except TransferSetError as e:  # a stalled worker on this machine still writes it: leave it to that one
                if "another `transferset label`" not in e.message:
                    raise
                time.sleep(0.2)
                return 0, None
            res = _label_part(folder, claimed_run(worker_run, k, count, handoff), labels, time.perf_counter(),
                              waiting=False)
        return res.rows_written, res.manifest if res.extra.get("merged_here") else None

    report = claim_shards(out, count, label_shard, run.options.lease_seconds)
    final = report.manifest if report.manifest is not None else \
        read_manifest(out).to_json() if (out / MANIFEST_NAME).exists() else {}
    extra = {"claim": report.worker, "shards_labelled": report.shards, "taken_over": report.taken_over,
             "merged": report.merged}
    return LabelResult(out, final, "written" if report.shards else "already-complete", report.rows_written,
                       time.perf_counter() - t_start, run.geometry.total_rows, extra)


def _label_part(folder: OutputFolder, run: Run, labels: np.ndarray | None, t_start: float,
                waiting: bool = True) -> LabelResult:
    """Label this part's shards into the shared folder, then merge the set if every part is done (``waiting``:
    describe the other parts when it is not, which reads their manifests; a claiming worker does not ask)."""
    o, geometry, out, part = run.options, run.geometry, folder.path, run.part
    if o.overwrite:
        raise TransferSetError("cannot be combined with a part (the folder is shared with the other parts); empty "
                               "the folder or choose another one", option="overwrite")
    shards = geometry.part_shards(part)
    own, merged = folder.existing_part(run.definition_sha256, part, [shard_name(k) for k in shards])
    extra: dict = {"part": part, "merged": merged is not None}
    if merged is not None:  # merged before; a merge killed half-way has its card and clean-up finished here
        merged = merge_if_complete(out)
        return LabelResult(out, merged.to_json(), "already-complete", 0, time.perf_counter() - t_start, extra=extra)
    status, rows = "already-complete", 0
    if shards and not (own is not None and own.complete):
        assembler = _write_shards(run, out, own, shards, labels, publish=write_part_manifest)
        status, rows, own = ("resumed" if own is not None else "written"), assembler.rows_written, assembler.manifest
        if own is None or not own.complete:
            raise TransferSetError(f"labelling part {part[0]} of {part[1]} into {out} stopped before its last shard",
                                   FAILED)
    wrote: list = []
    merged, waits = merge_or_wait(out, wrote, describe=waiting)
    extra.update(merged=merged is not None, merged_here=bool(wrote),
                 waiting=waits if merged is None else None if wrote else "merged by another part")
    final = merged if merged is not None else own
    return LabelResult(out, final.to_json() if final is not None else {}, status, rows,
                       time.perf_counter() - t_start, geometry.rows_of(shards), extra)
