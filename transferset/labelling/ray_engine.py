"""``label --engine ray``: the shards of a set as Ray tasks, one per shard, on a Ray cluster or a local one.

Shard ``k`` of ``S`` is labelled by a task as part ``k + 1`` of ``S`` (:mod:`transferset.format.parts`), so the
tasks write the same files as ``--part I/N`` and ``--claim`` do, the last one to finish merges, and the folder
holds the single run's bytes. Each task asks Ray for ``cpus`` CPUs (its ONNX Runtime threads) and ``gpus`` GPUs;
a task whose worker dies, or that fails, is run again by Ray up to ``retries`` times, and a part resumes from
what it listed (its debris removed), so a retried task gives the same bytes. Every task must see the output folder,
the teachers and the source at the same paths (a shared filesystem), and import the same transferset.

Ray is an optional extra (``pip install 'transferset[ray]'``): nothing here imports it until a run asks for it.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from ..errors import FAILED, TransferSetError
from ..progress import progress_bar

__all__ = ["RaySpec", "import_ray", "label_with_ray", "label_shard_task"]


def import_ray():
    """The ``ray`` module, or one TransferSetError naming the extra to install."""
    try:
        import ray  # noqa: PLC0415 (optional extra)
    except ImportError:
        raise TransferSetError("ray needs the optional extra: pip install 'transferset[ray]' (or pip install ray)",
                               option="engine") from None
    return ray


class RaySpec:
    """Where the tasks run and what each asks for: ``address`` (None: a local cluster started for this run, or the
    one ``RAY_ADDRESS`` names), ``cpus`` and ``gpus`` per task, ``retries`` per task."""

    def __init__(self, address: str | None = None, cpus: float = 1, gpus: float = 0, retries: int = 3) -> None:
        if not (isinstance(cpus, (int, float)) and cpus > 0):
            raise TransferSetError(f"must be a positive number of CPUs per task, got {cpus!r}", option="ray_cpus")
        if not (isinstance(gpus, (int, float)) and gpus >= 0):
            raise TransferSetError(f"must be a number of GPUs per task >= 0, got {gpus!r}", option="ray_gpus")
        if not (isinstance(retries, int) and retries >= 0):
            raise TransferSetError(f"must be a whole number >= 0, got {retries!r}", option="ray_retries")
        self.address, self.cpus, self.gpus, self.retries = address, cpus, gpus, retries


def label_shard_task(label: Callable, ensemble: Sequence[str], data: str, out: str, options, shard: int,
                     count: int) -> dict:
    """One Ray task: label shard ``shard`` of ``count`` as part ``shard + 1`` (resuming what it listed), merging
    the set when it is the last; ``{"shard", "rows", "merged", "pid"}``. ``label`` is
    :func:`~.pipeline.label`, passed in (Ray pickles it by name; a Ray worker imports the package to run it)."""
    res = label(list(ensemble), data, out, replace(options, part=(shard + 1, count), quiet=True, claim=False,
                                                    engine="local"))
    return {"shard": shard, "rows": res.rows_written, "merged": bool(res.extra.get("merged_here")),
            "pid": os.getpid()}


def _init(ray, spec: RaySpec) -> bool:
    """Connect to the cluster (or start a local one); True when this call started Ray (and must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if spec.address:
            ray.init(address=spec.address, **kwargs)
        else:
            ray.init(**kwargs)
    except Exception as e:  # noqa: BLE001 (Ray raises many kinds: ConnectionError, RuntimeError, ValueError)
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        # Ray enables token authentication on the clusters it starts; a driver given an address must be told
        auth = ("; a cluster with token authentication needs RAY_AUTH_MODE=token (and its token) in this environment"
                if (spec.address or os.environ.get("RAY_ADDRESS")) and not os.environ.get("RAY_AUTH_MODE") else "")
        raise TransferSetError(f"cannot start or reach Ray ({why}){auth}; check the address, or run `ray start "
                               "--head` first", FAILED, option="ray_address") from None
    return True


def _failure(ray, error: Exception, retries: int) -> str:
    """Why a task failed, in one line: what it raised (only an OSError is retried), or how its worker died."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause
        if isinstance(cause, TransferSetError):
            return str(cause)
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[-1][:300] if text else ''}"
    text = str(error).strip().splitlines()
    return f"{text[0][:300] if text else type(error).__name__} (after {retries} retries)"


def label_with_ray(label: Callable, ensemble: Sequence[str], data: str, out: str | os.PathLike, options, count: int,
                   spec: RaySpec, rows_of: Callable[[int], int] | None = None) -> dict:
    """Run one task per shard; ``{"tasks", "rows", "merged_by_task", "seconds", "pids"}``.

    ``label`` is the function each task runs (:func:`~.pipeline.label`). ``count`` is the set's number of shards
    (from the driver's own look at the source); ``rows_of(k)``, when given, the rows of shard ``k`` for the progress
    bar. When a task still fails after its retries, the others are let finish (their shards are then listed), and
    one TransferSetError names the shards that failed and why.
    """
    ray = import_ray()
    environ = dict(os.environ)
    started = _init(ray, spec)
    t0 = time.perf_counter()
    out = str(Path(out).resolve())
    task = ray.remote(num_cpus=spec.cpus, num_gpus=spec.gpus, max_retries=spec.retries,
                      retry_exceptions=[OSError])(label_shard_task)
    # each task's ONNX Runtime threads: the CPUs it asked for
    opts = replace(options, threads=options.threads or max(1, int(spec.cpus)))
    done, failed = [], []
    try:
        shard_of = {task.remote(label, list(map(str, ensemble)), str(data), out, opts, k, count): k
                    for k in range(count)}
        bar = progress_bar(sum(map(rows_of, range(count))) if rows_of else count, desc="label (ray)",
                           unit="rows" if rows_of else "shards", quiet=options.quiet)
        pending = list(shard_of)
        while pending:  # the first task to end, with every other that has ended by then (a long list is not
            ready, pending = ray.wait(pending, num_returns=1)  # scanned once per task)
            if pending:
                more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                ready += more
            for ref in ready:
                k = shard_of[ref]
                try:
                    done.append(ray.get(ref))
                except Exception as e:  # noqa: BLE001 (a task's error arrives wrapped in Ray's own types)
                    failed.append((k, _failure(ray, e, spec.retries)))
                if bar:
                    bar.update(rows_of(k) if rows_of else 1)
        if bar:
            bar.close()
    finally:
        if started:  # Ray's own setting of this process's environment (RAY_AUTH_MODE, PYTHONBREAKPOINT) goes with it
            ray.shutdown()
            os.environ.clear()
            os.environ.update(environ)
    if failed:
        k, why = min(failed)
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        raise TransferSetError(f"{len(failed)} of {count} Ray task(s) failed: shard {k}: {why}{more}; the other "
                               "shards are listed: run the same command to finish", FAILED)
    return {"tasks": len(done), "rows": sum(d["rows"] for d in done),
            "merged_by_task": [d["shard"] for d in done if d["merged"]], "pids": sorted({d["pid"] for d in done}),
            "seconds": time.perf_counter() - t0}
