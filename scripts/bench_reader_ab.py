"""The streaming reader of two checkouts side by side: this one and ``--old`` (e.g. a worktree of d8a1e21).

One transfer set is labelled once (dense sets are byte-identical between the two, tests/test_golden.py); then each
round runs the reader of each checkout in a fresh subprocess (its own imports, ``PYTHONPATH`` set to the checkout),
alternating which goes first, and times ``--epochs`` full shuffled epochs of whole batches
(``inputs``, ``soft_targets`` at T=4, ``labels``) after one warm-up epoch. Reported: samples/s per round, the
median and best of each, and new / old. The reader alone is short work (~1 s an epoch), so many rounds and the
median are what make the comparison hold on a shared machine. Usage::

    git worktree add /tmp/old d8a1e21
    python scripts/bench_reader_ab.py --old /tmp/old [--rows 120000] [--rounds 7] [--epochs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import importlib, json, sys, time
TransferSetDataset = importlib.import_module(sys.argv[4]).TransferSetDataset
ds = TransferSetDataset(sys.argv[1], fields=("inputs", "soft_targets", "labels"), temperature=4.0,
                        batch_size=int(sys.argv[2]))
rows = 0
for epoch in range(int(sys.argv[3]) + 1):
    if epoch == 1:
        t0, c0, rows = time.perf_counter(), time.process_time(), 0
    ds.set_epoch(epoch)
    for b in ds:
        rows += int(b["mask"].sum()) if "mask" in b else len(b["labels"])
print(json.dumps({"samples_per_s": rows / (time.perf_counter() - t0),
                  "cpu_samples_per_s": rows / (time.process_time() - c0),
                  "module": TransferSetDataset.__module__, "file": sys.modules[sys.argv[4]].__file__}))
"""


def _label(out: Path, rows: int) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_setup import make_teachers, mnist_labels, mnist_rows
    import numpy as np

    from transferset.labelling.pipeline import LabelOptions, label

    tiny, _ = make_teachers(out.parent / "tiny", widths=(16,))
    np.save(out.parent / "x.npy", mnist_rows(rows))
    np.save(out.parent / "y.npy", mnist_labels(rows))
    label([str(p) for p in tiny], str(out.parent / "x.npy"), out,
          LabelOptions(labels=str(out.parent / "y.npy"), scale=1.0 / 255.0, device="cpu", quiet=True))


def _run(tree: Path, ts: Path, batch: int, epochs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    # by the checkout's own layout: importing by trial could find the other checkout's module through an editable
    # install's finder (a submodule missing from this tree's package is looked up there)
    module = "transferset.stream" if (tree / "transferset" / "stream.py").exists() else "transferset.training.reader"
    out = subprocess.run([sys.executable, "-c", _CHILD, str(ts), str(batch), str(epochs), module], env=env,
                         cwd=str(tree),
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the other checkout (its root folder)")
    ap.add_argument("--rows", type=int, default=120000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per run (after one warm-up epoch)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    trees = {"new": ROOT, "old": Path(a.old).resolve()}
    with tempfile.TemporaryDirectory(prefix="bench_reader_ab-") as tmp:
        ts = Path(tmp) / "ts"
        _label(ts, a.rows)
        load0 = os.getloadavg()
        runs: dict[str, list[dict]] = {"new": [], "old": []}
        for r in range(a.rounds):
            for name in (("new", "old") if r % 2 == 0 else ("old", "new")):
                runs[name].append(_run(trees[name], ts, a.batch_size, a.epochs))
    res = {"rows": a.rows, "batch_size": a.batch_size, "rounds": a.rounds, "epochs": a.epochs,
           "load_average": [[round(v, 2) for v in load0], [round(v, 2) for v in os.getloadavg()]],
           "modules": {k: v[0]["file"] for k, v in runs.items()}}
    for name, rs in runs.items():
        rates = [x["samples_per_s"] for x in rs]
        res[name] = {"samples_per_s": [round(v) for v in rates], "median": round(statistics.median(rates)),
                     "best": round(max(rates)),
                     "cpu_median": round(statistics.median(x["cpu_samples_per_s"] for x in rs))}
    res["new_vs_old_median"] = round(res["new"]["median"] / res["old"]["median"], 3)
    res["new_vs_old_best"] = round(res["new"]["best"] / res["old"]["best"], 3)
    res["new_vs_old_cpu_median"] = round(res["new"]["cpu_median"] / res["old"]["cpu_median"], 3)
    print(f"streaming reader alone, {a.rows} rows, batch {a.batch_size}, {a.rounds} alternating rounds of "
          f"{a.epochs} epochs; load average {res['load_average']}")
    for name in ("old", "new"):
        print(f"  {name} ({res['modules'][name]}): median {res[name]['median']:,} samples/s, best "
              f"{res[name]['best']:,}, CPU-time median {res[name]['cpu_median']:,}; rounds {res[name]['samples_per_s']}")
    print(f"  new / old: median {res['new_vs_old_median']}, best {res['new_vs_old_best']}, "
          f"CPU-time {res['new_vs_old_cpu_median']}")
    if a.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
