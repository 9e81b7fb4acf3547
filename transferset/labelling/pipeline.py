"""Stage 1: run an ONNX ensemble over a data source and write a transfer set.

Three overlapping stages in threads (DESIGN.md): prepare (read + augment + preprocess) -> ``session.run`` for
every member -> one writer thread (combine, convert, write HDF5, checksum, manifest). ``session.run`` and
h5py release the GIL, so the stages overlap. Batches are laid out per shard from the shard's first row, so a
resumed run feeds the models exactly the batches an uninterrupted run would, and writes identical bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import SCHEMA_VERSION, __version__
from .augment import parse_augment, render_views, view_seed
from .ensemble import Ensemble, Preprocess
from ..errors import FAILED, TransferSetError
from ..format.manifest import MANIFEST_NAME, atomic_write_json, load_manifest, shard_path
from ..format.shards import TMP_PREFIX, ShardWriter, chunk_rows_for, shard_name
from .sources import open_source, read_labels
from ..targets import COMBINE_RULES, combine_log_probs, entropy_from_log_probs, normalise_weights, soft_targets

__all__ = ["LabelOptions", "LabelResult", "label", "DEFAULT_TEMPERATURES"]

DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)
_QUEUE_DEPTH = 3
_WRITE_ROWS = 4096  # rows per soft-target computation and HDF5 write (see writer_loop)


@dataclass
class LabelOptions:
    """Every option of ``transferset label`` (the CLI maps its flags onto this one to one)."""

    labels: str | None = None
    limit: int | None = None
    input_name: str | None = None
    output_name: str | None = None
    output_kind: str | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None
    augment: str | None = None
    views: int = 0
    clean_view: bool = True
    seed: int = 0
    store_inputs: bool = True
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES
    combine: str = "mean-probs"
    weights: Sequence[float] | None = None
    dtype: str = "float16"
    batch_size: int = 256
    shard_size: int = 65536
    compression: str | None = None
    device: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    quiet: bool = False


@dataclass
class LabelResult:
    """What a label run did: ``status`` is ``written``, ``resumed`` or ``already-complete``."""

    out: Path
    manifest: dict
    status: str
    rows_written: int
    seconds: float
    rows_total: int = 0
    extra: dict = field(default_factory=dict)

    def summary_line(self) -> str:
        st = self.manifest.get("stats", {})
        if self.status == "already-complete":
            return f"{self.out}: already complete ({st.get('rows', 0)} rows in {len(self.manifest['shards'])} shards); nothing to do"
        rate = self.rows_written / self.seconds if self.seconds > 0 else float("nan")
        acc = st.get("ensemble_accuracy")
        acc_s = f", ensemble accuracy {acc:.4f} on labelled rows" if acc is not None else ""
        verb = "resumed and wrote" if self.status == "resumed" else "wrote"
        return (f"{self.out}: {verb} {self.rows_written} rows in {self.seconds:.1f} s ({rate:,.0f} rows/s); "
                f"{st.get('rows', 0)} rows in {len(self.manifest['shards'])} shards{acc_s}")


def _validate(o: LabelOptions) -> None:
    def bad(msg: str) -> None:
        raise TransferSetError(msg)

    if o.views < 0:
        bad(f"--views must be >= 0, got {o.views}")
    if o.views == 0 and not o.clean_view:
        bad("--no-clean-view with --views 0 leaves no rows; add --views K")
    if o.views > 0 and not o.augment:
        bad("--views needs --augment SPEC (e.g. --augment jitter:2)")
    if o.batch_size < 1:
        bad(f"--batch-size must be >= 1, got {o.batch_size}")
    if o.shard_size < 1:
        bad(f"--shard-size must be >= 1, got {o.shard_size}")
    if o.limit is not None and o.limit < 1:
        bad(f"--limit must be >= 1, got {o.limit}")
    if not o.temperatures:
        bad("--temperatures needs at least one value")
    for t in o.temperatures:
        if not (isinstance(t, (int, float)) and np.isfinite(t) and t > 0):
            bad(f"--temperatures must be positive numbers, got {t!r}")
    if len(set(o.temperatures)) != len(o.temperatures):
        bad(f"--temperatures has repeated values: {list(o.temperatures)}")
    if o.combine not in COMBINE_RULES:
        bad(f"--combine {o.combine!r}: choose one of {', '.join(COMBINE_RULES)}")
    if o.dtype not in ("float16", "float32"):
        bad(f"--dtype {o.dtype!r}: choose float16 or float32")
    if o.layout not in (None, "nchw", "nhwc"):
        bad(f"--layout {o.layout!r}: choose nchw or nhwc")
    if o.compression not in (None, "none", "lzf", "gzip"):
        bad(f"--compression {o.compression!r}: choose none, lzf or gzip")
    if o.scale is not None and not np.isfinite(o.scale):
        bad("--scale must be a finite number")
    if o.std is not None and any((not np.isfinite(s)) or s == 0 for s in o.std):
        bad("--std values must be finite and non-zero")


class _Lock:
    """An exclusive ``flock`` on DIR/.lock: released by the kernel when the holder dies, so never stuck."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TransferSetError(f"--out {folder}: cannot write there ({e.strerror or e}); "
                                   "choose a writable folder or fix its permissions", FAILED) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise TransferSetError(f"{folder}: another `transferset label` is writing this folder; wait for it or choose another --out") from None
        try:  # the holder's pid, for people; the kernel's flock is what excludes
            os.ftruncate(self.fd, 0)
            os.write(self.fd, str(os.getpid()).encode())
        except OSError:
            pass

    def release(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)


def _own_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name == MANIFEST_NAME or p.name.startswith(TMP_PREFIX)
            or (p.name.startswith("shard-") and p.name.endswith(".h5")) or p.name.startswith(f".{MANIFEST_NAME}.tmp")]


def _definition(ens: Ensemble, src, labels_fp: str | None, o: LabelOptions, spec, weights: np.ndarray) -> dict:
    """Everything that decides the bytes written; a folder made with another definition is refused."""
    return {
        "schema_version": SCHEMA_VERSION,
        "teachers": [[m.sha256, m.input_name, m.output_name] for m in ens.members],
        "output_kind_option": o.output_kind,
        "preprocess": Preprocess(o.scale, o.mean, o.std, o.layout).to_json(),
        "source": src.fingerprint(), "labels": labels_fp, "limit": o.limit,
        "augment": spec.canonical, "views": o.views, "clean_view": o.clean_view, "seed": o.seed,
        "store_inputs": o.store_inputs, "temperatures": [float(t) for t in o.temperatures], "combine": o.combine,
        "weights": [float(w) for w in weights], "dtype": o.dtype, "batch_size": o.batch_size,
        "shard_size": o.shard_size, "compression": o.compression, "provider": "cuda" if ens.cuda_id is not None else "cpu",
    }


def _stats(manifest: dict) -> dict:
    shards = manifest["shards"]
    rows = sum(s["rows"] for s in shards)
    labelled = sum(s["stats"]["labelled"] for s in shards)
    m = manifest["num_members"]
    out = {"rows": rows, "labelled_rows": labelled, "member_accuracy": None, "ensemble_accuracy": None,
           "mean_entropy": {}}
    if labelled:
        out["member_accuracy"] = [sum(s["stats"]["member_correct"][i] for s in shards) / labelled for i in range(m)]
        out["ensemble_accuracy"] = sum(s["stats"]["ensemble_correct"] for s in shards) / labelled
    if rows:
        for j, t in enumerate(manifest["temperatures"]):
            out["mean_entropy"][f"{t:g}"] = sum(s["stats"]["entropy_sum"][j] for s in shards) / rows
    return out


def label(ensemble: Sequence[str | os.PathLike], data: str, out: str | os.PathLike,
          options: LabelOptions | None = None) -> LabelResult:
    """Label ``data`` with the ONNX ``ensemble`` into the transfer-set folder ``out`` (resuming if possible)."""
    o = options or LabelOptions()
    _validate(o)
    t_start = time.perf_counter()
    out = Path(out)
    src = open_source(data, limit=o.limit)
    if o.labels:
        labels_all = read_labels(o.labels, rows=src.rows)
        labels_fp = hashlib.sha256(np.ascontiguousarray(labels_all).tobytes()).hexdigest()
    elif src.labels is not None:
        labels_all = np.asarray(src.labels, dtype=np.int64)
        labels_fp = hashlib.sha256(np.ascontiguousarray(labels_all).tobytes()).hexdigest()
    else:
        labels_all, labels_fp = None, None
    spec = parse_augment(o.augment)
    if o.views > 0 and not spec.ops:
        raise TransferSetError("--views needs an --augment spec with at least one operation")
    pre = Preprocess(o.scale, tuple(o.mean) if o.mean else None, tuple(o.std) if o.std else None, o.layout)
    ens = Ensemble(list(ensemble), preprocess=pre, device=o.device, input_name=o.input_name,
                   output_name=o.output_name, output_kind=o.output_kind, threads=o.threads)
    weights = normalise_weights(o.weights, len(ens.members))
    definition = _definition(ens, src, labels_fp, o, spec, weights)
    def_hash = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()

    if out.exists() and not out.is_dir():
        raise TransferSetError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TransferSetError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    had_lock = (out / ".lock").exists()  # a label run has held this folder before
    lock = _Lock(out)
    try:
        return _run(ens, src, labels_all, spec, weights, definition, def_hash, o, out, t_start, had_lock)
    except OSError as e:  # disk full, permission denied, read-only folder: what was listed stays valid
        where = f" ({e.filename})" if e.filename else ""
        raise TransferSetError(f"labelling {out} failed: {e.strerror or e}{where}; the shards listed so far are "
                               "complete; free space or fix permissions, then run the same command to resume",
                               FAILED) from None
    finally:
        lock.release()


def _run(ens, src, labels_all, spec, weights, definition, def_hash, o, out, t_start, had_lock) -> LabelResult:
    manifest = None
    if (out / MANIFEST_NAME).exists() and not o.overwrite:
        manifest = load_manifest(out)
        if manifest.get("definition_sha256") != def_hash:
            raise TransferSetError(
                f"{out}: holds a transfer set made with another ensemble, source or options; "
                "use another --out, or --overwrite to start over")
        if manifest["complete"]:
            return LabelResult(out, manifest, "already-complete", 0, time.perf_counter() - t_start)
    if manifest is None:
        if o.overwrite or (had_lock and not (out / MANIFEST_NAME).exists()):
            # --overwrite, or the debris of a label run killed before its first manifest (it left its .lock):
            # temporary files and shards it renamed but never listed
            for p in _own_files(out):
                p.unlink()
        others = [p.name for p in out.iterdir() if p.name != ".lock" and p not in _own_files(out)]
        if _own_files(out) or (others and not o.overwrite and any(not n.startswith(".") for n in others)):
            raise TransferSetError(f"--out {out}: the folder is not empty and holds no transfer set; choose an empty folder")
    for p in out.iterdir():  # debris of a killed run: temporary files and shards the manifest never listed
        if p.name.startswith(TMP_PREFIX) or p.name.startswith(f".{MANIFEST_NAME}.tmp"):
            p.unlink()
    listed = {s["path"] for s in manifest["shards"]} if manifest else set()
    for p in out.glob("shard-*.h5"):
        if p.name not in listed:
            p.unlink()

    vpr = o.views + (1 if o.clean_view else 0)
    total = src.rows * vpr
    n_shards = -(-total // o.shard_size)
    row_shape = tuple(src.row_shape)
    in_dtype = np.dtype(src.dtype)
    fdtype = np.dtype(o.dtype)
    temps = [float(t) for t in o.temperatures]

    if manifest is not None:  # resume: the recorded output kinds hold, whatever batch comes first now
        for m, t in zip(ens.members, manifest["teachers"]):
            m.output_kind = t["output_kind"]
        ens.num_classes = manifest["num_classes"]
        done_shards = len(manifest["shards"])
        status = "resumed"
    else:
        done_shards = 0
        status = "written"
    start_row = done_shards * o.shard_size

    def prepare(r0: int, r1: int):
        rows = np.arange(r0, r1, dtype=np.int64)
        sidx = rows // vpr
        view = (rows % vpr + (0 if o.clean_view else 1)).astype(np.int32)
        s0, s1 = int(sidx[0]), int(sidx[-1]) + 1
        clean = src.read(s0, s1)
        x = clean[sidx - s0]
        if spec.ops:
            x = render_views(x, sidx, view, spec, o.seed, block_reader=src.read)
        x = np.ascontiguousarray(x, dtype=in_dtype)
        lab = labels_all[sidx] if labels_all is not None else np.full(len(rows), -1, np.int64)
        return {"r0": r0, "r1": r1, "x": x, "source_index": sidx, "view": view,
                "aug_seed": view_seed(o.seed, sidx, view).astype(np.uint64), "labels": lab, "feeds": ens.feeds(x)}

    jobs = []
    for k in range(done_shards, n_shards):
        s0, s1 = k * o.shard_size, min((k + 1) * o.shard_size, total)
        jobs.extend((k, r0, min(r0 + o.batch_size, s1)) for r0 in range(s0, s1, o.batch_size))

    stop = threading.Event()
    errors: list[BaseException] = []
    q_in: queue.Queue = queue.Queue(_QUEUE_DEPTH)
    q_out: queue.Queue = queue.Queue(_QUEUE_DEPTH)

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue):
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def preparer() -> None:
        try:
            for k, r0, r1 in jobs:
                item = prepare(r0, r1)
                item["shard"] = k
                if not put(q_in, item):
                    return
            put(q_in, "end")
        except BaseException as e:
            errors.append(e)
            stop.set()

    state = {"manifest": manifest, "writer": None, "written": 0}
    bar = _progress(total, start_row, o.quiet)

    def writer_loop() -> None:
        # Inference batches are grouped into slices of about _WRITE_ROWS rows before the soft targets, the
        # statistics and the HDF5 writes: per-call overhead paid once per slice instead of once per batch, which
        # on a CPU is time taken from ONNX Runtime. Groups depend only on the batch sequence (they restart at
        # every shard), so the bytes written stay the same from run to run and across a resume.
        group: list[dict] = []
        try:
            while True:
                item = get(q_out)
                if item is None or item == "end":
                    return
                group.append(item)
                shard_end = min((item["shard"] + 1) * o.shard_size, total)
                if item["r1"] < shard_end and item["r1"] - group[0]["r0"] < _WRITE_ROWS:
                    continue
                merged = _merge_batches(group)
                group.clear()
                _write_batch(merged, state, ens, src, spec, o, out, definition, def_hash, temps, weights, fdtype,
                             in_dtype, row_shape, total, n_shards, vpr)
                state["written"] += merged["r1"] - merged["r0"]
                if bar is not None:
                    bar.update(merged["r1"] - merged["r0"])
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=preparer, name="ts-prepare", daemon=True),
               threading.Thread(target=writer_loop, name="ts-write", daemon=True)]
    for t in threads:
        t.start()
    try:
        while not stop.is_set():
            item = get(q_in)
            if item is None:
                break
            if item == "end":
                put(q_out, "end")
                break
            item["logits"] = ens.run(item.pop("feeds"), first_row=item["r0"])
            if not put(q_out, item):
                break
    except BaseException as e:
        errors.append(e)
        stop.set()
    finally:
        if not stop.is_set():  # normal end: let the writer drain the queue before stopping it
            threads[1].join()
        stop.set()
        for t in threads:
            t.join()
        if bar is not None:
            bar.close()
        if state["writer"] is not None:
            state["writer"].abort()
    if errors:
        err = errors[0]
        if isinstance(err, (TransferSetError, KeyboardInterrupt)):
            raise err
        if isinstance(err, OSError):
            raise err  # worded by label()
        raise err
    final = state["manifest"]
    if final is None or not final["complete"]:
        raise TransferSetError(f"labelling {out} stopped before the last shard", FAILED)
    return LabelResult(out, final, status, state["written"], time.perf_counter() - t_start, total)


def _progress(total: int, initial: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="rows", unit_scale=True, desc="label", dynamic_ncols=True)


def _merge_batches(items: list[dict]) -> dict:
    """One item for consecutive batches of one shard: their arrays joined along rows."""
    if len(items) == 1:
        return items[0]
    merged = {"shard": items[0]["shard"], "r0": items[0]["r0"], "r1": items[-1]["r1"]}
    for key, value in items[0].items():
        if key not in merged and isinstance(value, np.ndarray):
            merged[key] = np.concatenate([it[key] for it in items])
    return merged


def _write_batch(item, state, ens, src, spec, o, out, definition, def_hash, temps, weights, fdtype, in_dtype,
                 row_shape, total, n_shards, vpr) -> None:
    k = item["shard"]
    s0, s1 = k * o.shard_size, min((k + 1) * o.shard_size, total)
    logits = item["logits"]
    c = logits.shape[2]
    if state["writer"] is None:
        layout = {"logits": ((len(ens.members), c), fdtype), "soft_targets": ((len(temps), c), fdtype),
                  "labels": ((), np.int64), "source_index": ((), np.int64), "view": ((), np.int32),
                  "aug_seed": ((), np.uint64)}
        if o.store_inputs:
            layout["inputs"] = (row_shape, in_dtype)
        row_bytes = [int(np.prod(t, dtype=np.int64)) * np.dtype(d).itemsize for t, d in layout.values()]
        state["chunk_rows"] = chunk_rows_for(row_bytes, min(o.shard_size, total))
        state["writer"] = ShardWriter(out / shard_name(k), s1 - s0, layout, state["chunk_rows"],
                                      None if o.compression in (None, "none") else o.compression)
        state["shard_stats"] = {"labelled": 0, "member_correct": [0] * len(ens.members), "ensemble_correct": 0,
                                "entropy_sum": [0.0] * len(temps)}
    st = soft_targets(logits, temps, o.combine, weights)
    arrays = {"logits": logits.astype(fdtype), "soft_targets": st.astype(fdtype), "labels": item["labels"],
              "source_index": item["source_index"], "view": item["view"], "aug_seed": item["aug_seed"]}
    if o.store_inputs:
        arrays["inputs"] = item["x"]
    state["writer"].write(item["r0"] - s0, arrays)
    ss = state["shard_stats"]
    lab = item["labels"]
    has = lab >= 0
    if has.any():
        ss["labelled"] += int(has.sum())
        for i in range(logits.shape[1]):
            ss["member_correct"][i] += int((logits[has, i].argmax(-1) == lab[has]).sum())
        t1 = temps.index(1.0) if 1.0 in temps else None
        comb = st[:, t1] if t1 is not None else combine_log_probs(logits, 1.0, o.combine, weights)
        ss["ensemble_correct"] += int((comb[has].argmax(-1) == lab[has]).sum())
    ent = entropy_from_log_probs(st)  # [N, T]
    for j in range(len(temps)):
        ss["entropy_sum"][j] += float(ent[:, j].sum())
    if item["r1"] == s1:
        digest = state["writer"].finish()
        state["writer"] = None
        m = state["manifest"] or _new_manifest(ens, src, spec, o, definition, def_hash, temps, weights, c,
                                               row_shape, in_dtype, total, vpr, state["chunk_rows"])
        m["shards"].append({"path": shard_name(k), "rows": s1 - s0, "row_start": s0, "sha256": digest,
                            "bytes": (out / shard_name(k)).stat().st_size, "stats": ss})
        m["complete"] = len(m["shards"]) == n_shards
        m["stats"] = _stats(m)
        atomic_write_json(out / MANIFEST_NAME, m)
        state["manifest"] = m


def _new_manifest(ens, src, spec, o, definition, def_hash, temps, weights, c, row_shape, in_dtype, total, vpr,
                  chunk_rows) -> dict:
    return {
        "format": "transferset",
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "num_classes": int(c),
        "class_names": list(src.class_names) if getattr(src, "class_names", None) else None,
        "num_members": len(ens.members),
        "teachers": [m.describe() for m in ens.members],
        "temperatures": temps,
        "combine": o.combine,
        "weights": [float(w) for w in weights],
        "dtype": o.dtype,
        "preprocess": ens.members[0].preprocess.to_json(),
        "input": {"shape": list(row_shape), "dtype": in_dtype.name, "stored": bool(o.store_inputs)},
        "augment": {"spec": spec.canonical, "ops": spec.to_json(), "views": o.views, "clean_view": o.clean_view,
                    "views_per_row": vpr, "seed": o.seed},
        "source": {**src.describe(), "fingerprint": src.fingerprint(), "labels": o.labels,
                   "labels_sha256": definition["labels"]},
        "batch_size": o.batch_size,
        "shard_size": o.shard_size,
        "chunk_rows": int(chunk_rows),
        "compression": None if o.compression in (None, "none") else o.compression,
        "expected_rows": int(total),
        "device": definition["provider"],
        "definition_sha256": def_hash,
        "complete": False,
        "shards": [],
    }
