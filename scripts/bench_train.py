"""Training speed as a ratio to its ceiling: streaming from shards vs tensors in memory vs online teachers.

In one run, with the same student (``mlp:800,800`` on 28x28 uint8), batch size and number of steps, it times
samples/s of:

1. ``memory``: the ceiling, train.py's step (same student, KD loss, AdamW, schedule, clipping) over batches
   already in memory as tensors;
2. ``stream``: ``transferset.train_student`` with ``in_memory="no"`` (the streaming shard reader), and
   ``fast``: the same with ``in_memory="yes"`` (the in-memory fast path);
3. ``online``: the ceiling's step plus the teacher ensemble (4 MLPs 784-1200-1200-10, torch, eval mode,
   no_grad) run on every batch to make the soft targets.

Plus ``codec``: the same train-student run side by side from the dense set and from it recoded with ``--codec``
(default ``topk:3``; ``none`` skips it), streaming and in memory, interleaved: a sparse set must train at least as
fast as a dense one (scripts/many_class.py measures the same at 1,000 classes).
With ``--lm TEACHER.onnx`` (a decoder: ids [B, L] -> logits [B, L, V]) only the per-token leg runs: the teacher
labels random ids into a ``topk:32`` per-position set, then ``train-student`` trains the same ``lm:`` student on
it with the per-token KD loss (``alpha`` 1, the sparse fields read) and with next-token CE alone (``alpha`` 0: no
teacher field read), interleaved; the goal of issue 21 is KD at <= 1.2 x the time of CE.
Plus ``reader``: the streaming reader alone (no training), in samples/s and bytes/s of batch tensors.
With ``--device cuda`` the student trains on the GPU in every leg and the ceiling's batches are put there before
its timer starts, so ``stream_vs_memory`` is train-student's feed against tensors already on the device (issue
25's GPU goal, 0.95; not yet run on a GPU: no session so far had one).
For the train-student legs the time is the training loop's own (metrics.jsonl ``seconds``), which starts
with the loader and ends at the last step; set-up and the final save are left out, as they are for the
ceiling. Legs are interleaved over ``--repeats`` rounds; medians are reported. Each leg is also timed in
process CPU seconds (``time.process_time``), which other jobs on a shared machine disturb far less than wall
time; with one torch thread the two agree on an idle machine. Usage::

    python scripts/bench_train.py
    python scripts/bench_train.py --quick --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import lm_ids, machine, make_teachers, mnist_labels, mnist_rows  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from transferset.labelling.pipeline import LabelOptions, label  # noqa: E402
from transferset.training.losses import build_loss, teacher_log_probs  # noqa: E402
from transferset.training.reader import TransferSetDataset  # noqa: E402
from transferset.training.students import create_student  # noqa: E402
from transferset.training.loop import TrainOptions, fused, train_student, warmup_cosine  # noqa: E402

STUDENT, T, ALPHA = "mlp:800,800", 4.0, 0.9


def memory_batches(x: np.ndarray, y: np.ndarray, soft: np.ndarray, batch: int, steps: int,
                   device: str = "cpu") -> list[dict]:
    """``steps`` batches as train.py receives them: uint8 inputs, float32 log-prob targets, labels, mask, already
    on ``device`` (the ceiling of a feed: tensors that are where the step runs)."""
    g = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        i = torch.from_numpy(g.integers(0, len(x), batch))
        b = {"inputs": torch.from_numpy(x)[i], "soft_targets": torch.from_numpy(soft)[i].float(),
             "labels": torch.from_numpy(y)[i], "mask": torch.ones(batch, dtype=torch.bool)}
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def _sync(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a timer must not stop before it is done)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def step_loop(batches: list[dict], teachers=None, seed: int = 0, device: str = "cpu") -> tuple[float, float]:
    """(wall, process CPU) seconds of train.py's step over ``batches`` on ``device``; with ``teachers``, their
    combined log-probs replace the stored ones."""
    torch.manual_seed(seed)
    model = create_student(STUDENT, [28, 28], 10, 1.0 / 255.0, 0.0, 1.0).to(device)
    teachers = None if teachers is None else [m.to(device) for m in teachers]
    loss_fn = build_loss("kd", ALPHA, T)
    opt = fused(torch.optim.AdamW, model, lr=1e-3, weight_decay=1e-4)  # as train-student builds it
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(len(batches), 0.05))
    weights = torch.full((4,), 0.25, device=device)
    model.train()
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    for batch in batches:
        teacher = batch["soft_targets"]
        if teachers is not None:
            with torch.no_grad():
                xf = batch["inputs"].float().flatten(1) * (1.0 / 255.0)
                z = torch.stack([m(xf) for m in teachers], dim=1)
                teacher = teacher_log_probs(z, T, "mean-probs", weights)
        logits = model(batch["inputs"])
        res = loss_fn(logits.float(), teacher, batch["labels"], batch["mask"])
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        n = int(batch["mask"].sum())
        for key in ("loss", "soft", "hard"):
            float(res[key].detach()) * n
    _sync(device)
    return time.perf_counter() - t, time.process_time() - c


def train_leg(ts: Path, run: Path, batch: int, steps: int, in_memory: str,
              student: str = STUDENT, device: str = "cpu") -> tuple[float, float, float]:
    """(loop wall seconds, loop CPU seconds, whole-call wall seconds) of ``train_student`` for ``steps`` steps."""
    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    res = train_student(ts, run, TrainOptions(student=student, temperature=T, alpha=ALPHA, batch_size=batch,
                                              epochs=1000, max_steps=steps, in_memory=in_memory, device=device,
                                              quiet=True))
    wall = time.perf_counter() - t
    done = res.metrics[-1]["steps"]
    if done != steps:
        raise SystemExit(f"train-student ran {done} steps, expected {steps}")
    return sum(m["seconds"] for m in res.metrics), sum(m["cpu_seconds"] for m in res.metrics), wall


def codec_legs(ts: Path, tmp: Path, batch: int, steps: int, codec: str, repeats: int, student: str = STUDENT) -> dict:
    """Median train-student samples/s from the dense set and from it recoded as ``codec``, both readers."""
    from transferset.format.recode import recode

    sparse = tmp / "ts-codec"
    shutil.rmtree(sparse, ignore_errors=True)
    recode(ts, sparse, codec)
    secs: dict[str, list] = {}
    for _ in range(repeats):
        for name, folder in (("dense", ts), (codec, sparse)):
            for mode in ("no", "yes"):
                secs.setdefault(f"{name} {'stream' if mode == 'no' else 'memory'}", []).append(
                    train_leg(folder, tmp / "run", batch, steps, mode, student)[0])
    rate = {k: round(steps * batch / statistics.median(v), 1) for k, v in secs.items()}
    out = {"codec": codec, "set": str(ts), "student": student, "samples_per_s": rate,
           "seconds": {k: [round(x, 3) for x in v] for k, v in secs.items()}}
    for mode in ("stream", "memory"):
        out[f"{mode}_sparse_vs_dense"] = round(rate[f"{codec} {mode}"] / rate[f"dense {mode}"], 4)
    return out


def reader_leg(ts: Path, batch: int, steps: int) -> tuple[float, int]:
    """(seconds, bytes of batch tensors) for the streaming reader alone over ``steps`` batches."""
    ds = TransferSetDataset(ts, fields=("inputs", "soft_targets", "labels"), temperature=T, batch_size=batch)
    t, nbytes = time.perf_counter(), 0
    epoch = 0
    while steps > 0:
        ds.set_epoch(epoch)
        for b in ds:
            nbytes += sum(v.numel() * v.element_size() for v in b.values())
            steps -= 1
            if steps == 0:
                break
        epoch += 1
    return time.perf_counter() - t, nbytes


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=120000, help="rows of the transfer set (MNIST, repeated)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smoke run (few rows and steps, one round)")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for every leg (default: torch's, one per core). On a machine "
                         "shared with other busy jobs, 1 avoids OpenMP's collapse under oversubscription")
    ap.add_argument("--codec", default="topk:3", help="the sparse codec of the side-by-side leg ('none': skip it)")
    ap.add_argument("--codec-set", default=None,
                    help="only the codec leg, on this existing dense set (e.g. scripts/many_class.py's 1,000-class "
                         "set), with --codec-student")
    ap.add_argument("--codec-student", default=STUDENT)
    ap.add_argument("--device", default="cpu",
                    help="where the student trains (cpu, cuda, cuda:N): the ceiling's batches are put there first, so "
                         "stream_vs_memory is the feed's ratio to training from tensors already on the device")
    ap.add_argument("--lm", default=None, help="a decoder ONNX: run the per-token loss leg instead (KD vs CE)")
    ap.add_argument("--lm-student", default="lm:2,64,4")
    ap.add_argument("--seq-len", type=int, default=128, help="per-token leg: ids per row")
    a = ap.parse_args(argv)
    if a.codec_set:
        return _codec_only(a)
    if a.lm:
        return _lm_only(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.rows, a.steps, a.repeats = min(a.rows, 4096), min(a.steps, 12), 1
    tmp = Path(a.workdir or tempfile.mkdtemp(prefix="bench_train-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _, teachers = make_teachers(tmp / "teachers")          # the 4 teachers, for the online leg
        tiny, _ = make_teachers(tmp / "tiny", widths=(16,))    # cheap stand-ins to write the shards fast
        x, y = mnist_rows(a.rows), mnist_labels(a.rows)
        np.save(tmp / "x.npy", x)
        np.save(tmp / "y.npy", y)
        ts = tmp / "ts"
        label([str(p) for p in tiny], str(tmp / "x.npy"), ts,
              LabelOptions(labels=str(tmp / "y.npy"), scale=1.0 / 255.0, device="cpu", quiet=True))
        m = json.loads((ts / "manifest.json").read_text())
        soft = np.concatenate([__import__("h5py").File(ts / s["path"], "r")["soft_targets"][:, m["temperatures"].index(T)]
                               for s in m["shards"]])
        batches = memory_batches(x, y, soft, a.batch_size, a.steps, a.device)
        legs = {k: [] for k in ("memory", "stream", "fast", "online", "reader")}
        cpu = {k: [] for k in ("memory", "stream", "fast", "online")}
        walls = {"stream": [], "fast": []}
        nbytes = 0
        load0 = os.getloadavg()
        for _ in range(a.repeats):
            for k, mode in (("memory", None), ("stream", "no"), ("fast", "yes"), ("online", "teachers")):
                if mode in ("no", "yes"):
                    s, c, w = train_leg(ts, tmp / "run", a.batch_size, a.steps, mode, device=a.device)
                    walls[k].append(w)
                else:
                    s, c = step_loop(batches, teachers if mode else None, device=a.device)
                legs[k].append(s)
                cpu[k].append(c)
            s, nbytes = reader_leg(ts, a.batch_size, a.steps)
            legs["reader"].append(s)
        sec = {k: statistics.median(v) for k, v in legs.items()}
        rate = {k: a.steps * a.batch_size / s for k, s in sec.items()}
        cpu_rate = {k: a.steps * a.batch_size / statistics.median(v) for k, v in cpu.items()}
        res = {"rows": a.rows, "batch_size": a.batch_size, "steps": a.steps, "repeats": a.repeats, "device": a.device,
               "torch_threads": torch.get_num_threads(),
               "samples_per_s": {k: round(v, 1) for k, v in rate.items()},
               "seconds": {k: [round(s, 3) for s in v] for k, v in legs.items()},
               "wall_seconds": {k: [round(s, 3) for s in v] for k, v in walls.items()},
               "cpu_seconds": {k: [round(s, 3) for s in v] for k, v in cpu.items()},
               "cpu_samples_per_s": {k: round(v, 1) for k, v in cpu_rate.items()},
               "cpu_stream_vs_memory": round(cpu_rate["stream"] / cpu_rate["memory"], 4),
               "cpu_offline_vs_online": round(cpu_rate["stream"] / cpu_rate["online"], 4),
               "reader_bytes_per_s": round(nbytes / sec["reader"], 1),
               "stream_vs_memory": round(rate["stream"] / rate["memory"], 4),
               "fast_vs_memory": round(rate["fast"] / rate["memory"], 4),
               "offline_vs_online": round(rate["stream"] / rate["online"], 4),
               "loadavg_before": [round(v, 2) for v in load0], "machine": machine()}
        print(f"train benchmark: {STUDENT} on 28x28 uint8 ({a.device}), {a.rows} rows, batch {a.batch_size}, "
              f"{a.steps} steps, "
              f"{torch.get_num_threads()} torch threads, "
              f"median of {a.repeats} interleaved rounds; load average before {res['loadavg_before']}, after "
              f"{res['machine']['loadavg']}")
        names = {"memory": "1 ceiling (step, tensors in memory)", "stream": "2 train-student, streaming shards",
                 "fast": "2 train-student, in-memory path", "online": "3 online (4 torch teachers per batch)",
                 "reader": "  streaming reader alone"}
        print(f"{'leg':<40}{'samples/s':>11}{'vs ceiling':>12}{'CPU-time samples/s':>20}{'vs ceiling':>12}")
        for k in ("memory", "stream", "fast", "online", "reader"):
            cpu_cols = f"{cpu_rate[k]:>20,.0f}{cpu_rate[k] / cpu_rate['memory']:>12.3f}" if k in cpu_rate else ""
            print(f"{names[k]:<40}{rate[k]:>11,.0f}{rate[k] / rate['memory']:>12.3f}{cpu_cols}")
        print(f"stream_vs_memory = {res['stream_vs_memory']:.3f} (goal >= 0.95); offline_vs_online = "
              f"{res['offline_vs_online']:.2f} (goal >= 3); reader {res['reader_bytes_per_s'] / 1e6:,.1f} MB/s")
        if a.codec != "none":
            res["codec"] = codec_legs(ts, tmp, a.batch_size, a.steps, a.codec, a.repeats)
            print(f"codec leg, samples/s: {res['codec']['samples_per_s']}; sparse/dense streaming "
                  f"{res['codec']['stream_sparse_vs_dense']:.3f}, in memory {res['codec']['memory_sparse_vs_dense']:.3f}")
        if a.json:
            print(json.dumps(res))
        return res
    finally:
        if not a.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


def _codec_only(a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench_train-codec-") as tmp:
        load0 = os.getloadavg()
        res = codec_legs(Path(a.codec_set), Path(tmp), a.batch_size, a.steps, a.codec, a.repeats, a.codec_student)
    res.update(steps=a.steps, batch_size=a.batch_size, repeats=a.repeats, torch_threads=torch.get_num_threads(),
               loadavg_before=[round(v, 2) for v in load0], machine=machine())
    print(f"codec leg on {a.codec_set}, student {a.codec_student}, {a.steps} steps of {a.batch_size}, median of "
          f"{a.repeats} interleaved rounds; load average before {res['loadavg_before']}, after "
          f"{res['machine']['loadavg']}")
    print(f"samples/s: {res['samples_per_s']}; sparse/dense streaming {res['stream_sparse_vs_dense']:.3f}, "
          f"in memory {res['memory_sparse_vs_dense']:.3f}")
    if a.json:
        print(json.dumps(res))
    return res



def _lm_only(a) -> dict:
    """Per-token KD (topk:32 set, alpha 1) against next-token CE (alpha 0), same student, batch and steps."""
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.rows, a.steps, a.repeats = min(a.rows, 64), min(a.steps, 4), 1
    rows = min(a.rows, 2048)
    batch = a.batch_size if a.batch_size != 256 else 16
    with tempfile.TemporaryDirectory(prefix="bench_train-lm-") as tmp:
        tmp = Path(tmp)
        ids, vocab = lm_ids(a.lm, rows, a.seq_len)
        np.save(tmp / "ids.npy", ids)
        ts = tmp / "ts"
        label([a.lm], str(tmp / "ids.npy"), ts, LabelOptions(codec="topk:32", temperatures=(1.0,), batch_size=16,
                                                            threads=a.threads, quiet=True))
        secs: dict[str, list] = {"kd": [], "ce": []}
        cpus: dict[str, list] = {"kd": [], "ce": []}
        load0 = os.getloadavg()
        for _ in range(a.repeats):
            for name, alpha in (("kd", 1.0), ("ce", 0.0)):
                run = tmp / "run"
                shutil.rmtree(run, ignore_errors=True)
                res = train_student(ts, run, TrainOptions(
                    student=a.lm_student, loss="kd", alpha=alpha, temperature=1.0, batch_size=batch, epochs=1000,
                    max_steps=a.steps, device="cpu", quiet=True, threads=a.threads))
                if res.metrics[-1]["steps"] != a.steps:
                    raise SystemExit(f"train-student ran {res.metrics[-1]['steps']} steps, expected {a.steps}")
                secs[name].append(sum(m["seconds"] for m in res.metrics))
                cpus[name].append(sum(m["cpu_seconds"] for m in res.metrics))
        med = {k: statistics.median(v) for k, v in secs.items()}
        cmed = {k: statistics.median(v) for k, v in cpus.items()}
        out = {"lm": a.lm, "student": a.lm_student, "vocab": vocab, "rows": rows, "seq_len": a.seq_len,
               "batch_size": batch, "steps": a.steps, "repeats": a.repeats, "codec": "topk:32",
               "torch_threads": torch.get_num_threads(),
               "seconds": {k: [round(x, 3) for x in v] for k, v in secs.items()},
               "cpu_seconds": {k: [round(x, 3) for x in v] for k, v in cpus.items()},
               "kd_vs_ce_time": round(med["kd"] / med["ce"], 4),
               "cpu_kd_vs_ce_time": round(cmed["kd"] / cmed["ce"], 4),
               "loadavg_before": [round(v, 2) for v in load0], "machine": machine()}
    print(f"per-token loss: {a.lm_student} on {rows} rows x {a.seq_len} ids (V = {vocab}, topk:32), batch {batch}, "
          f"{a.steps} steps, median of {a.repeats} interleaved rounds: KD {med['kd']:.2f} s, CE {med['ce']:.2f} s, "
          f"kd_vs_ce_time = {out['kd_vs_ce_time']:.3f} (goal <= 1.2); CPU time {out['cpu_kd_vs_ce_time']:.3f}; "
          f"load average before {out['loadavg_before']}, after {out['machine']['loadavg']}")
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
