"""Memory and scale: peak RSS of ``train-student`` (streaming) and ``label`` as the set grows; bytes per row.

Subcommands (each prints a table; ``--json`` ends with one JSON line):

- ``train``: writes synthetic transfer sets (784 uint8 inputs, 10 classes, 4 members, float16, 5 temperatures,
  65536-row shards, written with transferset's own ShardWriter) of each ``--rows`` size, then runs
  ``train_student`` with ``in_memory="no"`` for ``--steps`` steps in a fresh subprocess per size and reports that
  process's peak resident memory (``VmHWM``). With ``--read-all`` the child instead streams one whole
  epoch through the reader (no training), which touches every shard.
- ``label``: writes a uint8 source of each ``--rows`` size, labels it with 4 tiny ONNX members (784-16-10, so
  the run is I/O-bound) in a subprocess, and reports seconds, rows/s and peak RSS.
- ``storage``: labels a small source with each storage option and reports bytes per row on disk.

The big files go to ``--workdir`` (default: a temporary folder) and are deleted after each size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import ROOT, machine, make_teachers, mnist_labels, mnist_rows  # noqa: E402

import numpy as np  # noqa: E402

SHARD = 65536
TEMPS = [1.0, 2.0, 4.0, 8.0, 20.0]


def write_synthetic_set(root: Path, rows: int, seed: int = 0) -> Path:
    """A complete transfer set of ``rows`` rows in the label layout; values random, 8 shard templates reused."""
    from transferset import __version__
    from transferset.format.manifest import write_manifest
    from transferset.format.schema import Manifest, ShardEntry, shard_layout
    from transferset.format.shards import ShardWriter, layout_chunk_rows, shard_name
    from transferset.targets import soft_targets

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    m = Manifest(
        num_classes=10, num_members=4,
        teachers=[{"file": f"t{i}.onnx", "sha256": "0" * 64, "output_kind": "logits"} for i in range(4)],
        temperatures=TEMPS, combine="mean-probs", weights=[0.25] * 4, dtype="float16",
        input={"shape": [28, 28], "dtype": "uint8", "stored": True},
        augment={"spec": "", "ops": [], "views": 0, "clean_view": True, "views_per_row": 1, "seed": 0},
        source={"data": "synthetic", "rows": rows, "fingerprint": "synthetic"}, tool_version=__version__,
        preprocess={"scale": 1.0 / 255.0, "mean": None, "std": None, "layout": None}, batch_size=256,
        shard_size=SHARD, expected_rows=rows, complete=True, stats={"rows": rows})
    layout = shard_layout(m)
    m.chunk_rows = layout_chunk_rows(layout, min(SHARD, rows))
    templates = []
    for _ in range(min(8, -(-rows // SHARD))):
        z = (rng.normal(size=(SHARD, 4, 10)) * 3).astype(np.float32)
        templates.append({"logits": z.astype(np.float16), "soft_targets": soft_targets(z, TEMPS).astype(np.float16),
                          "labels": rng.integers(0, 10, SHARD), "view": np.zeros(SHARD, np.int32),
                          "inputs": rng.integers(0, 256, (SHARD, 28, 28), dtype=np.uint8)})
    for k, s0 in enumerate(range(0, rows, SHARD)):
        n = min(SHARD, rows - s0)
        t = templates[k % len(templates)]
        idx = np.arange(s0, s0 + n, dtype=np.int64)
        arrays = {name: v[:n] for name, v in t.items()}
        arrays.update(source_index=idx, aug_seed=idx.astype(np.uint64))
        w = ShardWriter(root / shard_name(k), n, layout, m.chunk_rows)
        w.write(0, arrays)
        m.shards.append(ShardEntry(shard_name(k), n, w.finish(), row_start=s0))
    write_manifest(root, m)
    return root


def child(argv: list[str]) -> None:
    """Run one job in this (fresh) process and print its JSON result with the peak RSS."""
    kind, args = argv[0], json.loads(argv[1])
    if args.get("threads"):
        import torch

        torch.set_num_threads(args["threads"])
    t = time.perf_counter()
    if kind == "train":
        from transferset.training.loop import TrainOptions, train_student

        train_student(args["ts"], args["run"], TrainOptions(batch_size=256, epochs=1000, max_steps=args["steps"],
                                                            in_memory="no", device="cpu", quiet=True))
    elif kind == "read":
        from transferset.training.reader import TransferSetDataset

        ds = TransferSetDataset(args["ts"], fields=("inputs", "soft_targets", "labels"), temperature=4.0,
                                batch_size=args.get("batch", 4096))
        for _ in ds:
            pass
    elif kind == "label":
        from transferset.labelling.pipeline import LabelOptions, label

        label(args["ensemble"], args["data"], args["out"], LabelOptions(scale=1.0 / 255.0, device="cpu", quiet=True))
    sec = time.perf_counter() - t
    print(json.dumps({"seconds": sec, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM, which exec resets. (``ru_maxrss`` is not reset by
    exec on Linux, so a child started from a big parent would report the parent's size.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(kind: str, args: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_child", kind, json.dumps(args)],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"child {kind} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def bench_train(sizes, steps, work: Path, read_all: bool, threads: int | None) -> list[dict]:
    out = []
    for n in sizes:
        ts = work / f"ts-{n}"
        t = time.perf_counter()
        write_synthetic_set(ts, n)
        made = time.perf_counter() - t
        size = dir_bytes(ts)
        r = run_child("read" if read_all else "train", {"ts": str(ts), "run": str(work / "run"), "steps": steps,
                                                         "threads": threads})
        out.append({"rows": n, "set_bytes": size, "write_seconds": round(made, 1), **r,
                    "mode": "read one epoch" if read_all else f"train {steps} steps", "loadavg": os.getloadavg()})
        print(f"  {n:>11,} rows  {size / 1e9:6.2f} GB  {out[-1]['mode']:<18} {r['seconds']:8.1f} s  "
              f"peak RSS {r['peak_rss_mb']:8.1f} MiB  load {os.getloadavg()[0]:.1f}", flush=True)
        shutil.rmtree(ts, ignore_errors=True)
        shutil.rmtree(work / "run", ignore_errors=True)
    return out


def bench_label(sizes, work: Path) -> list[dict]:
    tiny, _ = make_teachers(work / "tiny", widths=(16,))
    base = mnist_rows(60000)
    out = []
    for n in sizes:
        data = work / f"rows-{n}.npy"
        mm = np.lib.format.open_memmap(data, mode="w+", dtype=np.uint8, shape=(n, 28, 28))
        for a in range(0, n, 60000):
            mm[a:a + 60000] = base[: min(60000, n - a)]
        mm.flush()
        del mm
        r = run_child("label", {"ensemble": [str(p) for p in tiny], "data": str(data), "out": str(work / "ts")})
        out.append({"rows": n, **r, "rows_per_s": n / r["seconds"], "set_bytes": dir_bytes(work / "ts"),
                    "loadavg": os.getloadavg()})
        print(f"  {n:>11,} rows  {r['seconds']:8.1f} s  {n / r['seconds']:10,.0f} rows/s  "
              f"peak RSS {r['peak_rss_mb']:8.1f} MiB  load {os.getloadavg()[0]:.1f}", flush=True)
        data.unlink()
        shutil.rmtree(work / "ts", ignore_errors=True)
    return out


def bench_storage(rows: int, work: Path) -> list[dict]:
    from transferset.labelling.pipeline import LabelOptions, label

    tiny, _ = make_teachers(work / "tiny", widths=(16,))
    np.save(work / "x.npy", mnist_rows(rows))
    np.save(work / "y.npy", mnist_labels(rows))
    out = []
    for dtype in ("float16", "float32"):
        for stored in (True, False):
            for comp in ("none", "lzf"):
                ts = work / f"ts-{dtype}-{stored}-{comp}"
                label([str(p) for p in tiny], str(work / "x.npy"), ts,
                      LabelOptions(labels=str(work / "y.npy"), scale=1.0 / 255.0, dtype=dtype, store_inputs=stored,
                                   compression=comp, device="cpu", quiet=True))
                import h5py

                shard_bytes = sum(f.stat().st_size for f in ts.glob("shard-*.h5"))
                per = {}
                with h5py.File(next(ts.glob("shard-*.h5")), "r") as f:
                    n0 = f["labels"].shape[0]
                    for name in f:
                        per[name] = f[name].id.get_storage_size() / n0
                # label has no option to drop the members' logits; what dropping them would save is computed
                out.append({"dtype": dtype, "inputs_stored": stored, "compression": comp,
                            "bytes_per_row": shard_bytes / rows, "per_dataset": per,
                            "bytes_per_row_without_member_logits": shard_bytes / rows - per["logits"]})
                print(f"  {dtype:<8} inputs {'stored  ' if stored else 'replayed'} {comp:<5} "
                      f"{shard_bytes / rows:8.1f} B/row  " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items())))
                shutil.rmtree(ts)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["train", "label", "storage"])
    ap.add_argument("--rows", default=None, help="comma-separated sizes (train: 1000000,10000000; label: 1000000,3000000,10000000)")
    ap.add_argument("--steps", type=int, default=3000, help="train: steps of each run")
    ap.add_argument("--read-all", action="store_true", help="train: stream one whole epoch instead of training")
    ap.add_argument("--threads", type=int, default=None, help="train: torch threads in the child (default: torch's)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    defaults = {"train": "1000000,10000000", "label": "1000000,3000000,10000000", "storage": "60000"}
    sizes = [int(s) for s in (a.rows or defaults[a.what]).split(",")]
    if a.quick:
        cap = 4096 if a.what == "storage" else 20000
        sizes, a.steps = [min(s, cap * (i + 1)) for i, s in enumerate(sizes[:2])], min(a.steps, 20)
    print(f"{a.what}: sizes {sizes}; load average {[round(v, 2) for v in os.getloadavg()]}", flush=True)
    try:
        if a.what == "train":
            res = bench_train(sizes, a.steps, work, a.read_all, a.threads)
        elif a.what == "label":
            res = bench_label(sizes, work)
        else:
            res = bench_storage(sizes[0], work)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = {"what": a.what, "results": res, "machine": machine()}
    if a.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
    else:
        main()
