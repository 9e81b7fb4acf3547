"""Parallel photo decoding: worker processes turn (source index, path, view) tasks into ordered uint8 batches.

Design: the parent cuts the task stream into batches of ``batch_size`` and each batch into chunks; at most
``depth`` chunks are in flight (bounded memory: nothing is read ahead of that), results are reordered and a batch
is yielded when all its chunks are back, so output order is input order whatever the workers' speed. Workers are
started with ``forkserver`` on Linux (``spawn`` elsewhere): a child never inherits the threads of ONNX Runtime or
torch that the parent may run, which ``fork`` would copy mid-state. Workers ignore SIGINT, so Ctrl-C reaches
the parent alone, which stops them; a worker that dies (killed, out of memory) stops the run with one line.

``workers=0`` renders in the calling process through the same function, so results are the same bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import traceback
from typing import Any, Iterable, Iterator

from ..errors import FAILED, TransferSetError
from ..inputs.decode import BadImage, PhotoTransform
from ..inputs.render import PhotoBatch, PhotoTask, concat_batches, render_chunk

__all__ = ["DecodePool"]

_POLL_S = 0.5


def _worker(transform: PhotoTransform, base_seed: int, tasks_q: Any, results_q: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = mp.parent_process()
    while True:
        try:
            job = tasks_q.get(timeout=_POLL_S * 4)
        except queue.Empty:  # a parent killed with SIGKILL sends no stop: leave with it, never linger
            if parent is not None and not parent.is_alive():
                return
            continue
        if job is None:
            return
        key, tasks = job
        try:
            results_q.put((key, True, render_chunk(transform, base_seed, tasks)))
        except BaseException:  # a bug, not a bad file: the parent re-raises it with this traceback
            results_q.put((key, False, traceback.format_exc()))


def _default_method() -> str:
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


class DecodePool:
    """Worker processes that render photo views in order.

    Args:
        transform: how each view becomes pixels.
        base_seed: the augmentation seed (views are drawn from it unless a task carries its stored box).
        workers: worker processes (0: render in the calling process).
        on_bad: ``"skip"`` (bad files are reported in each batch's ``bad``) or ``"fail"`` (raise the first
            :class:`~transferset.inputs.decode.BadImage`, in task order, after stopping the workers).
        chunk: tasks per job sent to a worker.
        depth: jobs in flight at most (default ``4 * workers``): bounds memory and read-ahead.
        start_method: multiprocessing start method (default forkserver on Linux, spawn elsewhere).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, transform: PhotoTransform, base_seed: int = 0, workers: int = 2, on_bad: str = "skip",
                 chunk: int = 16, depth: int | None = None, start_method: str | None = None) -> None:
        if on_bad not in ("skip", "fail"):
            raise TransferSetError(f"must be skip or fail, got {on_bad!r}", option="on_bad_image")
        if workers < 0 or chunk < 1:
            raise TransferSetError(f"workers must be >= 0 and chunk >= 1, got {workers} and {chunk}",
                                   option="workers")
        self.transform, self.base_seed, self.workers, self.on_bad = transform, int(base_seed), int(workers), on_bad
        self.chunk, self.depth = int(chunk), int(depth or 4 * max(workers, 1))
        self._procs: list[Any] = []
        if self.workers:
            ctx = mp.get_context(start_method or _default_method())
            self._tasks_q, self._results_q = ctx.Queue(), ctx.Queue()
            for _ in range(self.workers):
                p = ctx.Process(target=_worker, args=(transform, self.base_seed, self._tasks_q, self._results_q),
                                daemon=True)
                p.start()
                self._procs.append(p)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(abort=exc[0] is not None)

    def imap(self, tasks: Iterable[PhotoTask], batch_size: int = 64) -> Iterator[PhotoBatch]:
        """Batches of ``batch_size`` consecutive tasks (the last may be shorter), in task order."""
        if batch_size < 1:
            raise TransferSetError(f"must be >= 1, got {batch_size}", option="batch_size")
        it = iter(tasks)
        return self.imap_groups(iter(lambda: [PhotoTask(*t) for _, t in zip(range(batch_size), it)], []))

    def imap_groups(self, groups: Iterable[list[PhotoTask]]) -> Iterator[PhotoBatch]:
        """One batch per group of tasks, in order (groups may differ in size; an empty group gives an empty batch)."""
        jobs = self._jobs(groups)
        try:
            for parts in (self._run_inline(jobs) if not self.workers else self._run_pool(jobs)):
                batch = concat_batches(parts)
                if batch.bad and self.on_bad == "fail":
                    first = batch.bad[0]
                    raise BadImage(first.path, first.reason)
                yield batch
        except BaseException:
            self.close(abort=True)
            raise

    def _jobs(self, groups: Iterable[list[PhotoTask]]) -> Iterator[tuple[int, bool, list[PhotoTask]]]:
        """(batch number, last chunk of its batch, chunk of tasks)."""
        for batch_no, group in enumerate(groups):
            buf = [PhotoTask(*t) for t in group]
            if not buf:
                yield batch_no, True, []
            for c in range(0, len(buf), self.chunk):
                yield batch_no, c + self.chunk >= len(buf), buf[c:c + self.chunk]

    def _run_inline(self, jobs):
        parts: list[PhotoBatch] = []
        for _, last, chunk in jobs:
            parts.append(render_chunk(self.transform, self.base_seed, chunk))
            if last:
                yield parts
                parts = []

    def _run_pool(self, jobs):
        pending: dict[int, tuple[bool, PhotoBatch]] = {}
        next_send = next_out = 0
        parts: list[PhotoBatch] = []
        exhausted = False
        while True:
            while not exhausted and next_send - next_out < self.depth:
                job = next(jobs, None)
                if job is None:
                    exhausted = True
                    break
                pending_last = job[1]
                self._tasks_q.put(((next_send, pending_last), job[2]))
                next_send += 1
            if next_out == next_send:
                return
            while next_out not in pending:
                (key, last), ok, payload = self._get()
                if not ok:
                    raise RuntimeError(f"a photo decode worker failed:\n{payload}")
                pending[key] = (last, payload)
            last, part = pending.pop(next_out)
            next_out += 1
            parts.append(part)
            if last:
                yield parts
                parts = []

    def _get(self) -> Any:
        while True:
            try:
                return self._results_q.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    raise TransferSetError(f"a photo decode worker (pid {dead[0].pid}) died with exit code "
                                           f"{dead[0].exitcode} (killed, out of memory, or it could not start: see its message above)", FAILED) from None

    def close(self, abort: bool = False) -> None:
        """Stop the workers: let them finish (``abort=False``) or terminate them now."""
        procs, self._procs = self._procs, []
        if not procs:
            return
        if not abort:
            for _ in procs:
                self._tasks_q.put(None)
        for p in procs:
            if abort:
                p.terminate()
            else:
                p.join(timeout=5)
                if p.is_alive():
                    p.terminate()
            p.join(timeout=5)
        for q in (self._tasks_q, self._results_q):
            q.cancel_join_thread()
            q.close()

    def __del__(self) -> None:
        if getattr(self, "_procs", None) and os is not None:
            self.close(abort=True)
