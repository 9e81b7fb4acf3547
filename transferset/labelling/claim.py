"""Workers that come and go: ``label --claim`` labels a set with any number of workers sharing its folder.

Each shard ``k`` of ``S`` is a part of its own (part ``k + 1`` of ``S``, see :mod:`transferset.format.parts`), so
the set is written, listed and merged exactly as ``--part I/N`` writes it, and the merged folder holds the single
run's bytes. A worker takes a shard by creating its **lease** file ``.lease-00007-g`` (shard 7, generation ``g``)
with ``O_CREAT | O_EXCL``, which one worker alone can do, on one machine or many sharing the folder. While it
labels the shard it touches the lease every ``ttl / 4`` seconds; a lease untouched for ``ttl`` seconds belongs to
a worker that died (or stalled), and the next worker takes the shard over by creating generation ``g + 1`` (again
one alone succeeds) and labels it again from the start. A shard is done when its part manifest exists. Workers
may join at any time (the same command) and stop at any time; each takes shards until none is left unclaimed, then
waits while other workers hold leases (it takes over a shard whose lease expires), and the last one to finish a
shard merges the set. A worker that stalled past its lease and comes back writes the same bytes as its successor
(labelling is deterministic), each through its own temporary file.

Clocks: a lease's age is this machine's clock minus the file's modification time, so ``ttl`` should exceed the
clock skew between machines (and a shard's labelling must touch its lease: it does, from a thread).
"""

from __future__ import annotations

import os
import queue
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import TransferSetError
from ..format.manifest import part_manifest_name, part_manifest_names
from ..format.parts import merge_if_complete, part_lock_name
from ..format.schema import MANIFEST_NAME
from ..format.shards import TMP_PREFIX
from .run import Handoff

__all__ = ["LEASE_PREFIX", "DEFAULT_LEASE_SECONDS", "Lease", "lease_name", "live_leases", "try_claim",
           "ClaimReport", "claim_shards", "idle_waits", "remove_claim_files", "lock_of", "claimed_run", "KeptThreads"]

LEASE_PREFIX = ".lease-"
DEFAULT_LEASE_SECONDS = 60.0
_LEASE = re.compile(r"^\.lease-([0-9]{5,})-([0-9]+)$")


def lease_name(shard: int, generation: int) -> str:
    """The lease file of ``shard``'s ``generation``-th claim."""
    return f"{LEASE_PREFIX}{shard:05d}-{generation}"


def _leases(root: Path) -> dict[int, tuple[int, Path]]:
    """``{shard: (highest generation, its lease path)}`` of the leases in ``root``."""
    out: dict[int, tuple[int, Path]] = {}
    for name in os.listdir(root):
        m = _LEASE.match(name)
        if m:
            k, g = int(m.group(1)), int(m.group(2))
            if k not in out or g > out[k][0]:
                out[k] = (g, root / name)
    return out


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def live_leases(root: str | os.PathLike, ttl: float) -> list[int]:
    """Shards whose newest lease was touched within ``ttl`` seconds (their workers are alive, or just died)."""
    return sorted(k for k, (_, p) in _leases(Path(root)).items() if (_age(p) or ttl + 1) <= ttl)


class Lease:
    """A held lease: touched from a thread every ``ttl / 4`` s until :meth:`release` (use as a context manager)."""

    def __init__(self, path: Path, ttl: float) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(max(ttl / 4, 0.05),), daemon=True,
                                        name=f"lease {path.name}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:  # cleaned up by the merge, or the folder went away: the shard's own write will tell
                pass

    def release(self) -> None:
        """Stop touching the lease and remove it (the shard is done, or this worker gave it up)."""
        self._stop.set()
        self._thread.join()
        try:
            self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def try_claim(root: str | os.PathLike, shard: int, ttl: float, worker: str,
              leases: dict[int, tuple[int, Path]] | None = None) -> Lease | None:
    """Take ``shard``: a new lease when it has none, the next generation when its newest one expired; None when
    another worker holds it (or took it first)."""
    root = Path(root)
    leases = _leases(root) if leases is None else leases
    generation = 0
    if shard in leases:
        g, p = leases[shard]
        age = _age(p)
        if age is not None and age <= ttl:
            return None
        generation = g + 1
    path = root / lease_name(shard, generation)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    try:
        os.write(fd, f"{worker}\n".encode())
    finally:
        os.close(fd)
    if generation:  # the expired generation is no one's any more
        (root / lease_name(shard, generation - 1)).unlink(missing_ok=True)
    return Lease(path, ttl)


def remove_claim_files(root: str | os.PathLike) -> None:
    """Remove leases, per-shard part locks and workers' temporary files once the set is merged (nothing claims
    a merged set's shards; a stalled worker still writing one fails to rename it and stops)."""
    root = Path(root)
    for name in os.listdir(root):
        if _LEASE.match(name) or name.startswith((".lock-part-", f"{TMP_PREFIX}claim-")):
            (root / name).unlink(missing_ok=True)


@dataclass
class ClaimReport:
    """What one claiming worker did: the shards it labelled, rows written, whether it merged the set."""

    worker: str
    shards: list[int] = field(default_factory=list)
    rows_written: int = 0
    taken_over: list[int] = field(default_factory=list)  #: shards whose lease had expired when this worker took them
    merged: bool = False
    manifest: dict | None = None  #: the merged set's manifest, as a merge here or the finishing look read it


def _done(root: Path, count: int) -> set[int]:
    """Shards (0-based) whose part manifest exists: labelled and listed."""
    return {i - 1 for (i, n) in part_manifest_names(root) if n == count}


def claim_shards(root: str | os.PathLike, count: int, label_shard, ttl: float = DEFAULT_LEASE_SECONDS,
                 poll: float | None = None) -> ClaimReport:
    """Claim and label shards of a ``count``-shard set in ``root`` until every one is done; merge when last.

    ``label_shard(k, handoff)`` labels shard ``k`` as part ``k + 1`` of ``count`` (holding that part's lock) and
    returns ``(rows written, the merged manifest as JSON when it merged the set, else None)``; it raises
    TransferSetError when another process on this machine holds the part's lock.
    """
    root = Path(root)
    if not (isinstance(ttl, (int, float)) and ttl > 0):
        raise TransferSetError(f"must be a positive number of seconds, got {ttl!r}", option="lease_seconds")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TransferSetError(f"{root}: cannot create the folder ({e.strerror or e})", option="out") from None
    report = ClaimReport(f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    flight = _Flight(report)
    try:
        _claim_until_done(root, count, label_shard, ttl, poll, flight)
        flight.take(keep=0)
    finally:
        flight.close()
    if (root / MANIFEST_NAME).exists():
        if report.manifest is None:  # a merge killed half-way (parts' manifests, the card) is finished here,
            report.manifest = merge_if_complete(root).to_json()  # unless this worker merged or finished it above
        remove_claim_files(root)
    return report


def _claim_until_done(root: Path, count: int, label_shard, ttl: float, poll: float | None, flight: "_Flight") -> None:
    """Claim and start shards until every one is done (or the set merged), merging when this worker is last."""
    report = flight.report
    # a worker left with no shard to claim looks again (a directory listing): soon at first, then less often, up
    # to a few times a second while it waits for the live workers to finish or for a lease to expire; its wait
    # after the last shard is done was the idle tail of a whole run
    poll = min(max(ttl / 8, 0.05), 0.25) if poll is None else poll
    waits = idle_waits(poll)
    while not (root / MANIFEST_NAME).exists():
        flight.take(keep=1)  # at most the shard being written beside the next one (a shard's error is raised here)
        done = _done(root, count)
        if (root / MANIFEST_NAME).exists():  # merged since the look above: its clean-up may have removed part
            break  # manifests before the listing, which would show done shards as not done, to be labelled again
        todo = [k for k in range(count) if k not in done]
        if not todo:  # every shard done: merge unless the worker that finished the last one already did
            flight.take(keep=0)  # (this one's own last shard may be merging it now: no second look after it)
            if not (root / MANIFEST_NAME).exists():
                wrote: list = []
                merged = merge_if_complete(root, wrote=wrote)  # merged here, or found merged (and finished)
                if merged is not None:
                    report.merged, report.manifest = report.merged or bool(wrote), merged.to_json()
            break
        leases = _leases(root)
        lease, k = None, None
        for k in todo:
            expired = k in leases
            lease = try_claim(root, k, ttl, report.worker, leases)
            if lease is not None:
                if expired:
                    report.taken_over.append(k)
                break
        if lease is None:  # every shard left is held by a live worker (this one's too): wait for it or its expiry
            wait = next(waits)
            if not flight.wait(wait):
                time.sleep(wait)
            continue
        waits = idle_waits(poll)
        flight.start(k, lambda handoff, k=k, lease=lease: _label_claimed(root, count, k, lease, label_shard, handoff))


def idle_waits(poll: float, first: float = 0.005, growth: float = 1.2, flat: float = 0.1):
    """Seconds between an idle worker's looks at the folder: ``first`` until ``flat`` seconds have passed, then
    ``growth`` times longer each time, never more than ``poll``. A wait of w seconds is then overshot by at most
    ``first`` when w < ``flat`` (the wait for a worker's last shard at the end of a run, often), else by at most
    w / 5 (or ``poll``). A look is two directory listings, a fraction of a millisecond: the forty looks before
    ``poll`` cost little, and then a long wait (a lease expiring) looks only a few times a second."""
    wait, waited = min(first, poll), 0.0
    while True:
        yield wait
        waited += wait
        if waited >= flat:
            wait = min(poll, wait * growth)


def _finished(root: Path, count: int, k: int) -> bool:
    """Whether shard ``k`` is done: its part manifest exists, or the set is merged. In this order: a merge writes
    manifest.json before it removes the parts' manifests, so no part manifest and then no manifest.json means the
    shard was not done when its part manifest was looked for."""
    return (root / part_manifest_name(k + 1, count)).exists() or (root / MANIFEST_NAME).exists()


def _label_claimed(root: Path, count: int, k: int, lease: Lease, label_shard, handoff: Handoff) -> tuple[int, bool] | None:
    with lease:
        if _finished(root, count, k):  # finished (and perhaps merged) between the listing and the claim
            return None
        return label_shard(k, handoff)


class KeptThreads:
    """Daemon threads a claiming worker keeps from shard to shard: :meth:`run` runs a function on an idle one, or
    on a new one when every one is busy, and returns an Event set once it has returned.

    A thread started afresh for every shard (the shard's own, and its pipeline's prepare and write stages) drew a
    malloc arena of its own whose pages went back to the kernel in between: 2 workers x 8 shards of 1,024 MNIST
    rows paid about 14,000 more page faults than 2 parts. Functions given here keep their own errors (a claimed
    shard and the pipeline's stages record theirs); one that raises ends its thread, which is then not reused.
    """

    def __init__(self, name: str) -> None:
        self._name, self._lock = name, threading.Lock()
        self._idle: list[queue.SimpleQueue] = []
        self._inboxes: list[queue.SimpleQueue] = []

    def run(self, fn) -> threading.Event:
        """Run ``fn()`` on a kept thread; the Event is set once it has returned (or raised)."""
        done = threading.Event()
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
            if inbox is None:
                inbox = queue.SimpleQueue()
                self._inboxes.append(inbox)
                threading.Thread(target=self._serve, args=(inbox,), name=f"{self._name}-{len(self._inboxes)}",
                                 daemon=True).start()
        inbox.put((fn, done))
        return done

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        while (task := inbox.get()) is not None:
            fn, done = task
            returned = False
            try:
                fn()
                returned = True
            finally:
                if returned:
                    with self._lock:
                        self._idle.append(inbox)
                done.set()

    def close(self) -> None:
        """Let every thread end once its function has returned (none is given another)."""
        with self._lock:
            for inbox in self._inboxes:
                inbox.put(None)
            self._inboxes.clear()
            self._idle.clear()


class _Flight:
    """The shards a worker is labelling: one in inference, the one before it still being written, and (from when
    the one in inference begins its last batch) the next one, claimed and preparing, waiting for its turn.

    Each shard runs in a thread of its own. The worker claims its next shard once the current one's last batch
    goes into inference (:class:`~.run.Handoff`): its lease, folder checks, pipeline and first batches are ready
    when that batch is through, and its inference starts at once, while the shard before's last soft targets,
    HDF5 writes, sha256, fsyncs and manifest are written beside it (ONNX Runtime idle before both). Results and
    errors are taken in the worker's thread, in the order the shards were started."""

    def __init__(self, report: ClaimReport) -> None:
        self.report = report
        self._running: list[tuple[int, threading.Event, list]] = []
        self._inferred: threading.Event | None = None  # the last started shard's inference is done
        self._shards, self._stages = KeptThreads("ts-claim"), KeptThreads("ts-stage")

    def start(self, k: int, work) -> None:
        """Run ``work(handoff)`` (shard ``k``) in a thread, its inference after the shard started before; return
        once its last batch goes into inference, or it ends."""
        result: list = []
        ready, inferred = threading.Event(), threading.Event()  # this shard's own
        handoff = Handoff(after=self._inferred, last_batch=ready.set, inferred=inferred.set, stages=self._stages)
        self._inferred = inferred

        def target() -> None:
            try:
                result.append(("ok", work(handoff)))
            except BaseException as e:  # noqa: BLE001 -- raised again in the worker's thread
                result.append(("error", e))
            finally:
                inferred.set()
                ready.set()

        self._running.append((k, self._shards.run(target), result))
        ready.wait()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the oldest running shard; False when none was running."""
        if not self._running:
            return False
        self._running[0][1].wait(timeout)
        self.take(keep=len(self._running))
        return True

    def take(self, keep: int) -> None:
        """Join the oldest shards until ``keep`` remain (finished ones are taken too); record or raise."""
        while self._running and (len(self._running) > keep or self._running[0][1].is_set()):
            k, finished, result = self._running.pop(0)
            finished.wait()
            status, value = result[0]
            if status == "error":
                self._join_all()
                raise value
            if value is None:  # done by another worker before this one began it
                continue
            rows, merged = value
            self.report.shards.append(k)
            self.report.rows_written += rows
            if merged is not None:
                self.report.merged, self.report.manifest = True, merged

    def _join_all(self) -> None:
        """After an error: let the other shard end (its own error, if any, is dropped for the first one)."""
        for _, finished, _ in self._running:
            finished.wait()
        self._running.clear()

    def close(self) -> None:
        """Let the kept threads end (every shard taken)."""
        self._shards.close()
        self._stages.close()


def lock_of(shard: int, count: int) -> str:
    """The part lock a claimed shard's writer holds (on one machine, one process per shard whatever the leases)."""
    return part_lock_name(shard + 1, count)


def claimed_run(run, shard: int, count: int, handoff: Handoff | None = None):
    """``run`` (a label run) made to label shard ``shard`` alone, as part ``shard + 1`` of ``count``, quietly,
    handing ONNX Runtime over to the worker's next shard through ``handoff``."""
    return replace(run, part=(shard + 1, count), options=replace(run.options, quiet=True), handoff=handoff)
