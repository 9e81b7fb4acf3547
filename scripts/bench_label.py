"""Labelling speed as a ratio to its ceiling: ``transferset label`` vs bare ONNX Runtime vs the naive way.

In one run, on the same ensemble, rows and batch size, it times (rows/s):

1. ``ort``: the ceiling, the same ONNX Runtime sessions transferset builds (``Ensemble``), run over batches
   already preprocessed in memory, outputs thrown away; ``ort_lanes``: ORT alone run as ``label`` runs it on a
   CPU (``Ensemble.lanes`` threads each taking every lanes-th batch, sessions of threads // lanes intra-op
   threads); ``ratio_to_best_ort`` compares ``label`` with the faster of the two;
2. ``label``: ``transferset.label`` end to end (read, augment, preprocess, infer, combine, convert, write
   HDF5, fsync, sha256, manifest), timed from the call to its return (sessions opened inside);
3. ``naive``: default ``InferenceSession`` objects run one after another, outputs appended to a resizable
   HDF5 dataset per batch.

With ``--codec topk:K`` (or ``sample:K``) a fourth leg, ``label_codec``, is ``label`` writing that codec, so the
codec's own cost (choosing the kept classes, the log-partitions, the draws) shows as its ratio to the same ceiling;
``--classes C`` gives the random MLP teachers C outputs (sparse codecs are for many classes)::

    python scripts/bench_label.py --classes 1000 --codec topk:20

``--no-maths`` adds ``label_no_maths``: the codec leg again (dense without ``--codec``) with the soft-target maths
and the sparse encoder replaced by constant arrays of their shapes (``maths_free``), everything else as it is. Its
ratio, ``no_maths_ratio_to_best_ort``, is the most faster maths could bring ``label`` to on this machine.

With ``--lm TEACHER.onnx`` (a decoder: ids [B, L] -> logits [B, L, V]) the LM leg runs instead: ``ort`` is a bare
ONNX Runtime session running the unmodified teacher over the same id rows with the same threads, outputs thrown
away; ``label`` is ``transferset label`` writing a per-position ``--codec`` set (default topk:32, T = 1) from those
rows, its graph extended with the codec's reductions (``--rows`` rows of ``--seq-len`` random ids). For a top-k
set on a CPU ``label`` runs its session a few rows at a time (``token_label.CPU_RUN_BYTES`` of logits, so the
extension reads them from the cache); ``ort_runs`` is the bare session run the same few rows at a time, and
``ratio_to_ort_runs`` compares ``label`` with it; ``ort_lanes`` runs those few-row runs in label's CPU lanes
(``ensemble.cpu_lanes``), and ``ratio_to_best_ort`` compares ``label`` with the fastest of the bare legs;
``graph_lanes`` is label's own extended graph (``lm_graph.build_token_graph``) run in those lanes with nothing encoded
or written, so ``graph_lanes_to_ort_lanes`` is the graph's share of the gap and ``label_to_graph_lanes`` the rest
(sessions opened, encoding, HDF5, sha256, fsync)::

    python scripts/bench_label.py --lm data/teachers/lm-teacher.onnx --rows 512 --batch-size 16

Legs are interleaved over ``--repeats`` rounds and the median of each is reported, so the ratios compare
runs made under the same machine load. Usage::

    python scripts/bench_label.py            # 4 MLP teachers 784-1200-1200-10, 60000 MNIST rows
    python scripts/bench_label.py --quick --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import lm_ids, machine, make_teachers, mnist_rows  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from transferset.labelling.ensemble import Ensemble, Preprocess  # noqa: E402
from transferset.labelling.pipeline import LabelOptions, label  # noqa: E402

SCALE = 1.0 / 255.0


def ceiling(paths, x: np.ndarray, batch: int, device: str) -> float:
    """Seconds for the transferset-configured sessions over preprocessed in-memory batches."""
    ens = Ensemble(paths, preprocess=Preprocess(scale=SCALE), device=device)
    feeds = [ens.feeds(x[a:a + batch]) for a in range(0, len(x), batch)]
    runs = []
    for f in feeds:
        for m in ens.members:
            runs.append((m.session, [m.output_name], {m.input_name: f[(m.input_dtype.str, m.row_shape)]}))
    ens.members[0].session.run(*runs[0][1:])  # first-run allocations are not throughput
    t = time.perf_counter()
    for sess, out, feed in runs:
        sess.run(out, feed)
    return time.perf_counter() - t


def ceiling_lanes(paths, x: np.ndarray, batch: int, device: str, on_batch=None, beside=None) -> float:
    """Seconds for ORT alone run the way ``label`` runs it on a CPU: ``Ensemble.lanes`` threads, each taking every
    ``lanes``-th batch through sessions of ``threads // lanes`` intra-op threads (``ensemble.cpu_lanes``).

    ``on_batch(i)``, when given, is called by the lane that ran batch ``i``; ``beside(batches)`` runs in one more
    thread, timed with the lanes (``ort_and_bytes``)."""
    ens = Ensemble(paths, preprocess=Preprocess(scale=SCALE), device=device, lanes=True)
    feeds = [ens.feeds(x[a:a + batch]) for a in range(0, len(x), batch)]

    def lane(k: int) -> None:
        for i in range(k, len(feeds), ens.lanes):
            f = feeds[i]
            for m in ens.members:
                m.session.run([m.output_name], {m.input_name: f[(m.input_dtype.str, m.row_shape)]})
            if on_batch is not None:
                on_batch(i)

    m0 = ens.members[0]
    m0.session.run([m0.output_name], {m0.input_name: feeds[0][(m0.input_dtype.str, m0.row_shape)]})
    t = time.perf_counter()
    threads = [threading.Thread(target=lane, args=(k,)) for k in range(ens.lanes)]
    threads += [threading.Thread(target=beside, args=(len(feeds),))] if beside is not None else []
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def ort_and_bytes(paths, x: np.ndarray, batch: int, device: str, row_bytes: int, out: Path) -> float:
    """Seconds for ORT alone in label's lanes while one more thread writes ``row_bytes`` a row of float16 into an
    HDF5 dataset (about 1 MiB chunks, as label's), then fsyncs and hashes the file, as ``label`` ends a shard.

    No soft-target maths, no encoding, no statistics: the bytes a set of this size must write, hash and fsync
    beside inference on the same cores. ``label`` cannot beat this leg with any maths, so its ratio to the ceiling
    is the most the format's bytes leave on this machine."""
    import concurrent.futures
    import queue

    from transferset._io import fsync_file, sha256_file

    width = max(1, row_bytes // 2)
    block = np.random.default_rng(0).standard_normal((batch, width)).astype(np.float16)
    chunk = max(1, min(len(x), (1 << 20) // (2 * width)))
    done: queue.Queue = queue.Queue()
    out.unlink(missing_ok=True)

    def writer(batches: int) -> None:
        with h5py.File(out, "w") as h:
            ds = h.create_dataset("values", (len(x), width), np.float16, chunks=(chunk, width))
            for _ in range(batches):
                a = done.get() * batch
                ds[a:min(a + batch, len(x))] = block[:min(batch, len(x) - a)]
        with concurrent.futures.ThreadPoolExecutor(1) as sync:
            synced = sync.submit(fsync_file, out)
            sha256_file(out)
            synced.result()

    return ceiling_lanes(paths, x, batch, device, on_batch=done.put, beside=writer)


@contextlib.contextmanager
def maths_free():
    """Within it, ``label`` runs with its soft-target maths and its sparse codec's encoder replaced by arrays of
    the shapes and dtypes they return (constants, written fresh each batch as the real ones are); everything else
    runs as it does: reading, the lanes, the finite check, the statistics, the float16 casts, the HDF5 writes,
    the hash and the fsync. So a ``label`` leg run inside it is the most any soft-target maths, however fast,
    leaves on this machine (its set's values are constants: it is a measurement, never a set to train from)."""
    from transferset.format import codecs
    from transferset.labelling import assembler

    real_targets, real_encode, made = assembler.soft_targets, codecs.Codec.encode, {}

    def targets(logits, temperatures, rule="mean-probs", weights=None, log_partition=None, *, dtype=np.float64,
                entropy=None):
        n, _, c = logits.shape
        for a in (log_partition, entropy):
            if a is not None:
                a.fill(np.log(c))
        return np.full((n, len(temperatures), c), -np.log(c), dtype)

    def encode(self, logits, log_probs, rows, temperatures, fdtype, log_partition=None):
        if not self.sparse:  # dense stores the logits and the soft targets as they are: no maths to leave out
            return real_encode(self, logits, log_probs, rows, temperatures, fdtype, log_partition)
        key = (self.spec, logits.shape[1:], len(temperatures), np.dtype(fdtype).str)
        if key not in made or len(next(iter(made[key].values()))) < len(logits):
            made[key] = real_encode(self, logits, log_probs, rows, temperatures, fdtype, log_partition)
        return {name: a[:len(logits)].copy() for name, a in made[key].items()}

    assembler.soft_targets, codecs.Codec.encode = targets, encode
    try:
        yield
    finally:
        assembler.soft_targets, codecs.Codec.encode = real_targets, real_encode


def set_bytes(out: Path) -> int:
    """Bytes of a set's shard files."""
    return sum(p.stat().st_size for p in Path(out).glob("shard-*.h5"))


def end_to_end(paths, data: Path, out: Path, batch: int, device: str, codec: str = "dense") -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    res = label([str(p) for p in paths], str(data), out,
                LabelOptions(scale=SCALE, batch_size=batch, device=device, quiet=True, codec=codec))
    sec = time.perf_counter() - t
    if not res.manifest["complete"]:
        raise SystemExit("label did not complete")
    return sec


def naive(paths, data: Path, out: Path, batch: int, device: str) -> float:
    """What a user writes first: default sessions (same providers), one after another, h5py append per batch."""
    import onnxruntime as ort

    from transferset.devices import ort_providers

    t = time.perf_counter()
    sessions = [ort.InferenceSession(str(p), providers=ort_providers(device)[0]) for p in paths]
    rows = np.load(data)
    with h5py.File(out, "w") as f:
        ds = None
        for a in range(0, len(rows), batch):
            xb = rows[a:a + batch].reshape(-1, 784).astype(np.float32) / 255.0
            z = np.stack([s.run(None, {s.get_inputs()[0].name: xb})[0] for s in sessions], axis=1)
            if ds is None:
                ds = f.create_dataset("logits", shape=(0,) + z.shape[1:], maxshape=(None,) + z.shape[1:],
                                      dtype=np.float32, chunks=(batch,) + z.shape[1:])
            ds.resize(ds.shape[0] + len(z), axis=0)
            ds[-len(z):] = z
    return time.perf_counter() - t


def lm_legs(a, tmp: Path) -> dict:
    """The LM leg: bare ORT on the unmodified decoder vs ``label`` writing a per-position set (same rows, threads)."""
    import onnxruntime as ort

    from transferset.labelling.ensemble import session_options
    codec = a.codec or "topk:32"
    ids, vocab = lm_ids(a.lm, a.rows, a.seq_len)
    data = tmp / "ids.npy"
    np.save(data, ids)

    from transferset.labelling.ensemble import cpu_lanes
    from transferset.labelling.parts import threads_per_process
    from transferset.labelling.lm_graph import build_token_graph
    from transferset.labelling.token_label import CPU_RUN_BYTES, TokenRun

    run_rows = max(1, CPU_RUN_BYTES // (4 * a.seq_len * vocab)) if codec.startswith("topk") else a.batch_size

    def bare(step: int) -> float:
        sess = ort.InferenceSession(str(a.lm), session_options(a.threads), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        sess.run(None, {name: ids[:1]})  # first-run allocations are not throughput
        t = time.perf_counter()
        for b in range(0, len(ids), a.batch_size):
            for r in range(b, min(b + a.batch_size, len(ids)), step):
                sess.run(None, {name: ids[r:min(r + step, b + a.batch_size)]})
        return time.perf_counter() - t

    def bare_lanes(step: int, graph=None) -> float:
        """The bare teacher run as ``label`` runs a top-k set on a CPU: ``cpu_lanes`` threads, each running
        every lanes-th run of ``step`` rows on one shared session of threads // lanes intra-op threads; with
        ``graph`` (a ``TokenGraph``), label's own extended graph run the same way, nothing encoded or written."""
        lanes, threads = cpu_lanes(threads_per_process(a.threads))
        sess = ort.InferenceSession(str(a.lm) if graph is None else graph.model_bytes, session_options(threads),
                                    providers=["CPUExecutionProvider"])
        name, full = sess.get_inputs()[0].name, np.full(len(ids), ids.shape[1])

        def feeds(r0: int, r1: int) -> dict:
            return {name: ids[r0:r1]} if graph is None else TokenRun._feeds(ids[r0:r1], full[r0:r1], graph.inputs)

        sess.run(None, feeds(0, 1))
        starts = [(r, min(r + step, b + a.batch_size)) for b in range(0, len(ids), a.batch_size)
                  for r in range(b, min(b + a.batch_size, len(ids)), step)]

        def lane(k: int) -> None:
            for r0, r1 in starts[k::lanes]:
                sess.run(None, feeds(r0, r1))

        t = time.perf_counter()
        pool = [threading.Thread(target=lane, args=(k,)) for k in range(lanes)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        return time.perf_counter() - t

    def labelled() -> float:
        shutil.rmtree(tmp / "lm-set", ignore_errors=True)
        t = time.perf_counter()
        label([str(a.lm)], str(data), tmp / "lm-set", LabelOptions(
            codec=codec, temperatures=(1.0,), batch_size=a.batch_size, threads=a.threads, quiet=True))
        return time.perf_counter() - t

    graph = build_token_graph([str(a.lm)], [1.0], "mean-probs", [1.0], codec)
    legs: dict[str, list] = {"ort": [], "ort_runs": [], "ort_lanes": [], "graph_lanes": [], "label": []}
    load0 = os.getloadavg()
    for _ in range(a.repeats):
        legs["ort"].append(bare(a.batch_size))
        legs["ort_runs"].append(bare(run_rows))
        legs["ort_lanes"].append(bare_lanes(run_rows))
        legs["graph_lanes"].append(bare_lanes(run_rows, graph))
        legs["label"].append(labelled())
    tokens = a.rows * a.seq_len
    rate = {k: tokens / statistics.median(v) for k, v in legs.items()}
    res = {"lm": str(a.lm), "rows": a.rows, "seq_len": a.seq_len, "vocab": vocab, "codec": codec,
           "batch_size": a.batch_size, "threads": a.threads, "repeats": a.repeats,
           "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
           "seconds": {k: [round(x, 3) for x in v] for k, v in legs.items()},
           "ratio_to_ort": round(rate["label"] / rate["ort"], 4), "run_rows": run_rows,
           "ratio_to_ort_runs": round(rate["label"] / rate["ort_runs"], 4),
           "ratio_to_best_ort": round(rate["label"] / max(rate["ort"], rate["ort_runs"], rate["ort_lanes"]), 4),
           "graph_lanes_to_ort_lanes": round(rate["graph_lanes"] / rate["ort_lanes"], 4),
           "label_to_graph_lanes": round(rate["label"] / rate["graph_lanes"], 4),
           "loadavg_before": [round(v, 2) for v in load0], "machine": machine()}
    print(f"LM label benchmark: {a.rows} rows x {a.seq_len} ids, V = {vocab}, {codec}, batch {a.batch_size}; "
          f"bare ORT {rate['ort']:,.0f} tokens/s ({rate['ort_runs']:,.0f} at {run_rows} rows a run), label "
          f"{rate['label']:,.0f} tokens/s, ratio_to_ort = {res['ratio_to_ort']:.3f} (goal >= 0.9), "
          f"ratio_to_ort_runs = {res['ratio_to_ort_runs']:.3f}; bare ORT in label's lanes {rate['ort_lanes']:,.0f} "
          f"tokens/s, ratio_to_best_ort = {res['ratio_to_best_ort']:.3f}; label's extended graph alone in its lanes "
          f"{rate['graph_lanes']:,.0f} tokens/s ({res['graph_lanes_to_ort_lanes']:.3f} of bare in lanes; label "
          f"{res['label_to_graph_lanes']:.3f} of it)")
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--teachers", nargs="*", default=None, help="ONNX files (default: 4 MLPs built here)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="a smoke run (few rows, one round), seconds")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--classes", type=int, default=10, help="outputs of the built MLP teachers")
    ap.add_argument("--codec", default=None, help="also time label writing this codec (e.g. topk:20)")
    ap.add_argument("--floor", action="store_true",
                    help="also time ORT alone in lanes beside a thread that writes, fsyncs and hashes as many bytes a "
                         "row as label's set holds (no maths): the most label could reach with these bytes")
    ap.add_argument("--no-maths", action="store_true",
                    help="also time label (with --codec, that codec) with the soft-target maths and the sparse "
                         "encoder replaced by constant arrays of their shapes: what maths of any speed leaves")
    ap.add_argument("--lm", default=None, help="a decoder ONNX: run the LM leg instead (ids -> per-position set)")
    ap.add_argument("--seq-len", type=int, default=128, help="LM leg: ids per row")
    ap.add_argument("--threads", type=int, default=None, help="LM leg: ONNX Runtime threads in both legs")
    a = ap.parse_args(argv)
    if a.quick:
        a.rows, a.repeats = min(a.rows, 2048), 1
        if a.lm:
            a.rows, a.seq_len = min(a.rows, 8), min(a.seq_len, 16)
    tmp = Path(a.workdir or tempfile.mkdtemp(prefix="bench_label-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        if a.lm:
            res = lm_legs(a, tmp)
            if a.json:
                print(json.dumps(res))
            return res
        paths = [Path(p) for p in a.teachers] if a.teachers else make_teachers(tmp / "teachers",
                                                                                 classes=a.classes)[0]
        x = mnist_rows(a.rows)
        data = tmp / "rows.npy"
        np.save(data, x)
        legs = {"ort": [], "ort_lanes": [], "label": [], "naive": []} | ({"label_codec": []} if a.codec else {})
        if a.no_maths:
            legs |= {"label_no_maths": []}
        if a.floor:
            legs |= {"ort_bytes": []} | ({"ort_bytes_codec": []} if a.codec else {})
        row_bytes: dict[str, int] = {}
        load0 = os.getloadavg()
        for _ in range(a.repeats):
            legs["ort"].append(ceiling(paths, x, a.batch_size, a.device))
            legs["ort_lanes"].append(ceiling_lanes(paths, x, a.batch_size, a.device))
            legs["label"].append(end_to_end(paths, data, tmp / "ts", a.batch_size, a.device))
            row_bytes["label"] = -(-set_bytes(tmp / "ts") // a.rows)
            legs["naive"].append(naive(paths, data, tmp / "naive.h5", a.batch_size, a.device))
            if a.codec:
                legs["label_codec"].append(end_to_end(paths, data, tmp / "ts", a.batch_size, a.device, a.codec))
                row_bytes["label_codec"] = -(-set_bytes(tmp / "ts") // a.rows)
            if a.no_maths:
                with maths_free():
                    legs["label_no_maths"].append(end_to_end(paths, data, tmp / "ts", a.batch_size, a.device,
                                                             a.codec or "dense"))
            if a.floor:
                legs["ort_bytes"].append(ort_and_bytes(paths, x, a.batch_size, a.device, row_bytes["label"],
                                                       tmp / "bytes.h5"))
                if a.codec:
                    legs["ort_bytes_codec"].append(ort_and_bytes(paths, x, a.batch_size, a.device,
                                                                 row_bytes["label_codec"], tmp / "bytes.h5"))
        sec = {k: statistics.median(v) for k, v in legs.items()}
        rate = {k: a.rows / s for k, s in sec.items()}
        res = {"rows": a.rows, "batch_size": a.batch_size, "members": len(paths), "repeats": a.repeats,
               "classes": a.classes, "codec": a.codec,
               "rows_per_s": {k: round(v, 1) for k, v in rate.items()},
               "seconds": {k: [round(s, 3) for s in v] for k, v in legs.items()},
               "ratio_to_ort": round(rate["label"] / rate["ort"], 4),
               # the stricter ceiling: the faster of ORT alone one batch at a time and ORT alone in label's lanes
               "ratio_to_best_ort": round(rate["label"] / max(rate["ort"], rate["ort_lanes"]), 4),
               "vs_naive": round(rate["label"] / rate["naive"], 4),
               **({"codec_ratio_to_ort": round(rate["label_codec"] / rate["ort"], 4),
                   "codec_ratio_to_best_ort": round(rate["label_codec"] / max(rate["ort"], rate["ort_lanes"]), 4)}
                  if a.codec else {}),
               **({"no_maths_ratio_to_best_ort": round(rate["label_no_maths"] / max(rate["ort"], rate["ort_lanes"]),
                                                       4)} if a.no_maths else {}),
               **({"row_bytes": row_bytes,
                   "floor_ratio_to_best_ort": round(rate["ort_bytes"] / max(rate["ort"], rate["ort_lanes"]), 4),
                   "label_ratio_to_floor": round(rate["label"] / rate["ort_bytes"], 4),
                   **({"codec_floor_ratio_to_best_ort": round(rate["ort_bytes_codec"] / max(rate["ort"],
                                                                                            rate["ort_lanes"]), 4),
                       "codec_ratio_to_floor": round(rate["label_codec"] / rate["ort_bytes_codec"], 4)}
                      if a.codec else {})} if a.floor else {}),
               "loadavg_before": [round(v, 2) for v in load0], "machine": machine()}
        print(f"label benchmark: {a.rows} rows, {len(paths)} members, batch {a.batch_size}, "
              f"median of {a.repeats} interleaved rounds; load average before {res['loadavg_before']}, after "
              f"{res['machine']['loadavg']}")
        print(f"{'leg':<34}{'rows/s':>10}{'vs ceiling':>12}")
        names = {"ort": "1 ceiling (ORT sessions, in memory)", "ort_lanes": "1b ORT alone in label's CPU lanes",
                 "label": "2 transferset label end to end",
                 "naive": "3 naive (default sessions + h5py)", "label_codec": f"4 label --codec {a.codec}",
                 "ort_bytes": "5 ORT in lanes + label's bytes",
                 "label_no_maths": f"6 label {a.codec or 'dense'}, no maths",
                 "ort_bytes_codec": f"5b ORT + {a.codec}'s bytes"}
        for k in legs:
            print(f"{names[k]:<34}{rate[k]:>10,.0f}{rate[k] / rate['ort']:>12.3f}")
        print(f"ratio_to_ort = {res['ratio_to_ort']:.3f} (goal >= 0.90 CPU, 0.95 GPU); to the faster ORT-alone leg "
              f"{res['ratio_to_best_ort']:.3f}; vs_naive = {res['vs_naive']:.2f}x")
        if a.json:
            print(json.dumps(res))
        return res
    finally:
        if not a.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
