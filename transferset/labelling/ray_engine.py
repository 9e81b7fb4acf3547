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

import math
import os
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from ..errors import FAILED, TransferSetError
from ..format.manifest import MANIFEST_NAME
from ..progress import progress_bar

__all__ = ["RaySpec", "import_ray", "label_with_ray", "label_shard_task", "check_driver_mark", "DRIVER_MARK"]

#: the driver's mark file in the output folder: ``.ray-driver-<token>`` holding the token
DRIVER_MARK = ".ray-driver-"


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
    one ``RAY_ADDRESS`` names), ``cpus`` and ``gpus`` per task, custom ``resources`` per task (``{"name": amount}``
    or ``"name=amount,..."``), ``retries`` per task, and ``wait``: seconds to let a node able to hold a task join
    (an autoscaling cluster adds one for queued tasks) before the run is refused; 0 refuses at once."""

    def __init__(self, address: str | None = None, cpus: float = 1, gpus: float = 0, retries: int = 3,
                 resources: str | dict | None = None, wait: float = 0) -> None:
        if not (isinstance(cpus, (int, float)) and math.isfinite(cpus) and cpus > 0):
            raise TransferSetError(f"must be a positive number of CPUs per task, got {cpus!r}", option="ray_cpus")
        if not (isinstance(gpus, (int, float)) and math.isfinite(gpus) and gpus >= 0):
            raise TransferSetError(f"must be a number of GPUs per task >= 0, got {gpus!r}", option="ray_gpus")
        if gpus > 1 and gpus != int(gpus):
            raise TransferSetError(f"must be a fraction of one GPU or a whole number, got {gpus!r} (Ray's rule)",
                                   option="ray_gpus")
        if not (isinstance(retries, int) and retries >= 0):
            raise TransferSetError(f"must be a whole number >= 0, got {retries!r}", option="ray_retries")
        if not (isinstance(wait, (int, float)) and math.isfinite(wait) and wait >= 0):
            raise TransferSetError(f"must be a number of seconds >= 0, got {wait!r}", option="ray_wait")
        self.address, self.cpus, self.gpus, self.retries, self.wait = address, cpus, gpus, retries, wait
        self.resources = _resources(resources)

    def need(self) -> dict[str, float]:
        """What one task asks Ray for, by resource name (amounts above 0)."""
        return {k: v for k, v in {"CPU": self.cpus, "GPU": self.gpus, **self.resources}.items() if v > 0}


def _resources(spec: str | dict | None) -> dict[str, float]:
    """``"name=amount,..."`` (or a dict) as ``{name: amount}``; CPU and GPU have their own options."""
    if not spec:
        return {}
    items = spec.items() if isinstance(spec, dict) else [item.partition("=")[::2] for item in spec.split(",")]
    out = {}
    for name, amount in items:
        name = str(name).strip()
        try:
            value = float(amount)
        except (TypeError, ValueError):
            value = float("nan")
        if not name or not math.isfinite(value) or value <= 0:
            raise TransferSetError(f"{spec!r}: expected NAME=AMOUNT[,NAME=AMOUNT...] with positive amounts, e.g. "
                                   "shared_fs=1", option="ray_resources")
        if name in ("CPU", "GPU"):
            raise TransferSetError(f"{name}: give it with --ray-{name.lower()}s", option="ray_resources")
        out[name] = value
    return out


def check_driver_mark(out: str, mark: str, patience: float = 3.0) -> None:
    """Refuse, in one line, to label ``out`` on a node that does not see the driver's mark file there: that node
    lacks the shared folder (it would write a folder of its own). A mark just written may take a moment to show on
    a network filesystem: looked for again for ``patience`` seconds."""
    token = mark.removeprefix(DRIVER_MARK)
    deadline = time.monotonic() + patience
    while True:
        try:
            if (Path(out) / mark).read_text() == token:
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TransferSetError(f"{out}: node {socket.gethostname()} does not see the driver's output folder "
                                   f"there (no {mark}); the driver and every node of the cluster must see the "
                                   "folder, the teachers and the source at the same paths (a shared filesystem)",
                                   option="out")
        time.sleep(0.2)


def label_shard_task(label: Callable, ensemble: Sequence[str], data: str, out: str, options, shard: int,
                     count: int, mark: str | None = None) -> dict:
    """One Ray task: label shard ``shard`` of ``count`` as part ``shard + 1`` (resuming what it listed), merging
    the set when it is the last; ``{"shard", "rows", "merged", "pid", "node", "provider"}``. ``label`` is
    :func:`~.pipeline.label`, passed in (Ray pickles it by name; a Ray worker imports the package to run it).
    ``mark``: the driver's mark file, which the task must see in ``out`` (:func:`check_driver_mark`).

    A task that Ray gave no GPU labels on the CPU under ``--device auto``: Ray leaves a GPU-less task's
    ``CUDA_VISIBLE_DEVICES`` alone, so it would otherwise take a GPU that other tasks hold."""
    import ray  # noqa: PLC0415 (inside a Ray worker)

    if mark is not None:
        check_driver_mark(out, mark)
    device = "cpu" if options.device in (None, "auto") and not ray.get_gpu_ids() else options.device
    res = label(list(ensemble), data, out, replace(options, part=(shard + 1, count), quiet=True, claim=False,
                                                    engine="local", device=device))
    return {"shard": shard, "rows": res.rows_written, "merged": bool(res.extra.get("merged_here")),
            "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
            "provider": res.manifest.get("device", device) if res.manifest else device}


def _init(ray, spec: RaySpec) -> bool:
    """Connect to the cluster (or start a local one); True when this call started Ray (and must shut it down)."""
    if ray.is_initialized():
        return False
    address = spec.address or os.environ.get("RAY_ADDRESS") or ""
    if address.startswith("ray://"):
        import importlib.util  # noqa: PLC0415

        if importlib.util.find_spec("grpc") is None:
            raise TransferSetError(f"{address}: a Ray Client address needs Ray's client extra: pip install "
                                   "'ray[client]' (or give the cluster's GCS address, host:6379, from a node of "
                                   "it)", option="ray_address")
    kwargs = {"log_to_driver": False, "configure_logging": False}
    try:
        if spec.address:
            ray.init(address=spec.address, **kwargs)
        else:
            ray.init(include_dashboard=False, **kwargs)
    except Exception as e:  # noqa: BLE001 (Ray raises many kinds: ConnectionError, RuntimeError, ValueError)
        why = " ".join(str(e).split())[:300] or type(e).__name__  # one line ("... from server:" has its why below)
        # Ray enables token authentication on the clusters it starts; a driver given an address must be told
        auth = ("; a cluster with token authentication needs RAY_AUTH_MODE=token (and its token) in this environment"
                if address and not os.environ.get("RAY_AUTH_MODE") else "")
        raise TransferSetError(f"cannot start or reach Ray ({why}){auth}; check the address, or run `ray start "
                               "--head` first", FAILED, option="ray_address") from None
    return True


def _fits(node: dict, need: dict[str, float]) -> bool:
    have = node.get("Resources", {})
    return all(have.get(k, 0) >= v for k, v in need.items())


def _no_node_fits(ray, spec: RaySpec) -> TransferSetError | None:
    """None when a live node of the cluster can hold one task; else the error that says why not (on the option of
    the first resource that no node has enough of)."""
    need = spec.need()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(_fits(n, need) for n in nodes):
        return None
    best = {k: max((n.get("Resources", {}).get(k, 0) for n in nodes), default=0) for k in need}
    short = next((k for k in need if best[k] < need[k]), next(iter(need)))
    asked = ", ".join(f"{v:g} {k}" for k, v in need.items())
    has = ", ".join(f"{v:g} {k}" for k, v in best.items())
    waited = f"none joined in {spec.wait:g} s; " if spec.wait else ""
    return TransferSetError(f"asks for {asked} per task, but no node of the Ray cluster ({len(nodes)} live) has that "
                            f"(the most one has: {has}); Ray would queue the tasks forever; {waited}ask for less, or "
                            "add such a node (on an autoscaling cluster, let one join: --ray-wait SECONDS)",
                            FAILED, option={"CPU": "ray_cpus", "GPU": "ray_gpus"}.get(short, "ray_resources"))


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
    """Run one task per shard; ``{"tasks", "rows", "merged_by_task", "seconds", "pids", "nodes", "on_cpu"}``.

    ``label`` is the function each task runs (:func:`~.pipeline.label`). ``count`` is the set's number of shards
    (from the driver's own look at the source); ``rows_of(k)``, when given, the rows of shard ``k`` for the progress
    bar. When a task still fails after its retries, the others are let finish (their shards are then listed), and
    one TransferSetError names the shards that failed and why.
    """
    ray = import_ray()
    environ = dict(os.environ)
    out = str(Path(out).resolve())
    started = _init(ray, spec)
    t0 = time.perf_counter()
    task = ray.remote(num_cpus=spec.cpus, num_gpus=spec.gpus, resources=spec.resources or None,
                      max_retries=spec.retries, retry_exceptions=[OSError])(label_shard_task)
    # each task's ONNX Runtime threads: the CPUs it asked for
    opts = replace(options, threads=options.threads or max(1, int(spec.cpus)))
    mark = None
    try:
        short = _no_node_fits(ray, spec)
        if short and not spec.wait:
            raise short
        mark = _mark_folder(out)
        deadline = time.monotonic() + spec.wait if short else None
        shard_of = {task.remote(label, list(map(str, ensemble)), str(data), out, opts, k, count, mark.name): k
                    for k in range(count)}
        done, failed = _collect(ray, shard_of, spec, deadline, rows_of, options.quiet)
    finally:
        if mark is not None:
            mark.unlink(missing_ok=True)
            if (Path(out) / MANIFEST_NAME).exists():  # complete: marks a killed driver left go too
                for stale in Path(out).glob(f"{DRIVER_MARK}*"):
                    stale.unlink(missing_ok=True)
        if started:  # Ray's own setting of this process's environment (RAY_AUTH_MODE, PYTHONBREAKPOINT) goes with it
            ray.shutdown()
            os.environ.clear()
            os.environ.update(environ)
    if failed:
        k, why = min(failed)
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        then = ("the other shards are listed: run the same command to finish" if done else
                "no shard was labelled: fix that, then run the same command")
        raise TransferSetError(f"{len(failed)} of {count} Ray task(s) failed: shard {k}: {why}{more}; {then}", FAILED)
    return {"tasks": len(done), "rows": sum(d["rows"] for d in done),
            "merged_by_task": [d["shard"] for d in done if d["merged"]], "pids": sorted({d["pid"] for d in done}),
            "nodes": sorted({d["node"] for d in done}), "on_cpu": sum(d["provider"] == "cpu" for d in done),
            "seconds": time.perf_counter() - t0}


def _collect(ray, shard_of: dict, spec: RaySpec, deadline: float | None, rows_of: Callable[[int], int] | None,
             quiet: bool) -> tuple[list[dict], list[tuple[int, str]]]:
    """Wait for every task: ``(what the done ones returned, [(shard, why) of the failed ones])``. With a
    ``deadline`` (no node could hold a task when they were sent), tasks no node has joined to hold by then are
    cancelled and the run refused."""
    count = len(shard_of)
    bar = progress_bar(sum(map(rows_of, range(count))) if rows_of else count, desc="label (ray)",
                       unit="rows" if rows_of else "shards", quiet=quiet)
    done, failed, pending = [], [], list(shard_of)
    while pending:  # the first task to end, with every other that has ended by then (a long list is not scanned
        ready, pending = ray.wait(pending, num_returns=1,  # once per task)
                                  timeout=None if deadline is None else 1.0)
        if deadline is not None and not ready:  # tasks no node can hold yet: one may join (an autoscaler)
            short = _no_node_fits(ray, spec)
            if short and time.monotonic() >= deadline:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise short
            deadline = deadline if short else None
            continue
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
    return done, failed


def _mark_folder(out: str) -> Path:
    """Make the output folder and leave the driver's mark in it (:func:`check_driver_mark`); its path."""
    token = uuid.uuid4().hex
    mark = Path(out) / f"{DRIVER_MARK}{token}"
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        mark.write_text(token)
    except OSError as e:
        raise TransferSetError(f"{out}: cannot write there ({e.strerror or e}); choose a writable folder or fix its "
                               "permissions", FAILED, option="out") from None
    return mark
