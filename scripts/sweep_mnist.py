#!/usr/bin/env python3
"""A temperature x alpha sweep on the shipped MNIST teachers, into docs/RESULTS.md (a section per ``--name``).

One command per student. It labels (or reuses) a transfer set of the first ``--train-rows`` MNIST training images,
each as its clean row and ``--views`` jittered views, with the three shipped CNN teachers (data/teachers, the
ensemble ``transferset demo`` uses), runs ``transferset.training.sweep.run_sweep`` with ``--holdout`` (so T and
alpha are chosen on held-out training images, never on the test set), then evaluates every run's student on the
10,000 test images once, for the record. The section holds the command, the budget, the grid as a table and as a
picture (the sweep's heatmap, copied next to RESULTS.md), and the test errors beside the holdout errors.

    python scripts/sweep_mnist.py --student mlp:800,800 --epochs 5 --name sweep-mlp
    python scripts/sweep_mnist.py --student cnn:16,32,fc=64 --epochs 3 --name sweep-cnn
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transferset.demo import mnist_paths, shipped_teachers  # noqa: E402
from transferset.evaluate import evaluate  # noqa: E402
from transferset.labelling.pipeline import LabelOptions, label  # noqa: E402
from transferset.report import report  # noqa: E402
from transferset.training.loop import TrainOptions  # noqa: E402
from transferset.training.sweep import SweepOptions, format_sweep, run_sweep  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="mlp:800,800")
    p.add_argument("--name", required=True, help="section name in RESULTS.md and the picture's file name")
    p.add_argument("--out", default="sweep-mnist", help="working folder (transfer set, sweeps)")
    p.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    p.add_argument("--train-rows", type=int, default=10000, help="first N MNIST training images")
    p.add_argument("--views", type=int, default=3, help="jittered views per image (plus the clean one)")
    p.add_argument("--temperatures", default="2,4,8")
    p.add_argument("--alphas", default="0,0.5,0.9")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main(argv=None) -> dict:
    a = parse_args(argv)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    paths, out = mnist_paths(), Path(a.out)
    teachers = shipped_teachers("cnn")[:3]
    ts = out / f"mnist-{a.train_rows}-v{a.views}"
    res_label = label([t["path"] for t in teachers], paths["train_x"], ts, LabelOptions(
        labels=paths["train_y"], limit=a.train_rows, augment="jitter:2", views=a.views, seed=0, quiet=True))
    base = TrainOptions(student=a.student, epochs=a.epochs, lr=a.lr, holdout=a.holdout, seed=a.seed, device="cpu",
                        threads=a.threads, quiet=True)
    sweep_dir = out / a.name
    res = run_sweep(ts, sweep_dir, base, SweepOptions(temperatures=floats(a.temperatures), alphas=floats(a.alphas),
                                                      jobs=a.jobs))
    print(format_sweep(res))
    page = report(sweep_dir, sweep_dir / "report")
    for r in res["runs"]:
        ev = evaluate([sweep_dir / r["name"] / "student.pt"], paths["test_x"], paths["test_y"], device="cpu")
        r["test"] = {k: ev[k] for k in ("errors", "n", "nll", "ece")}
    picture = Path(a.results).parent / "img" / f"{a.name}.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(page["index"]).parent / "sweep_heatmap.png", picture)
    info = {"rows": res_label.manifest["stats"]["rows"], "teachers": [t["path"].name for t in teachers],
            "seconds": time.perf_counter() - t0, "load": (load0, os.getloadavg()[0])}
    command = "python scripts/sweep_mnist.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    write_section(Path(a.results), a, res, info, picture, command)
    return res


def write_section(path: Path, a, res: dict, info: dict, picture: Path, command: str) -> None:
    """Replace (or append) the section ``a.name`` of RESULTS.md between its markers."""
    runs = res["runs"]
    n_hold = runs[0]["n"]
    control = runs[0]
    best = next(r for r in runs if r["name"] == res["best"])
    best_test = min(runs, key=lambda r: (r["test"]["errors"], r["test"]["nll"]))
    lines = [f"## Sweep `{a.student}`: temperature x alpha on MNIST ({a.name})", "",
             f"Command: `{command}`  ",
             f"Budget: transfer set of the first {a.train_rows:,} MNIST training images, each as its clean row and "
             f"{a.views} jittered views ({info['rows']:,} rows), labelled by the 3 shipped CNN teachers "
             f"({', '.join(info['teachers'])}); holdout {a.holdout:g} of the source rows ({n_hold:,} images, all their "
             f"views kept out of training); each run `{a.student}`, {a.epochs} epochs, AdamW lr {a.lr:g}, batch 256, "
             f"seed {a.seed}, on a 2-core CPU shared with other jobs (load average {info['load'][0]:.1f} at the "
             f"start, {info['load'][1]:.1f} at the end: the seconds below say more about the load than the runs); wall time {info['seconds'] / 60:.1f} min for the whole "
             f"command ({sum(r['seconds'] for r in runs) / 60:.1f} min of training). One seed: differences of a few "
             "errors are within seed noise.", "",
             "| run | T | alpha | holdout errors / %s | holdout NLL | holdout ECE | test errors / 10,000 | test NLL | "
             "test ECE | train s |" % f"{n_hold:,}", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        mark = " (best on holdout)" if r["name"] == res["best"] else ""
        lines.append(f"| `{r['name']}`{mark} | {format(r['temperature'], 'g') if r['temperature'] is not None else '-'} | "
                     f"{r['alpha']:g} | {r['errors']} | {r['nll']:.4f} | {r['ece']:.4f} | {r['test']['errors']} | "
                     f"{r['test']['nll']:.4f} | {r['test']['ece']:.4f} | {r['seconds']:.0f} |")
    temps = sorted({r["temperature"] for r in runs if r["temperature"] is not None})
    alphas = sorted({r["alpha"] for r in runs})
    cell = {(r["temperature"], r["alpha"]): r for r in runs}
    lines += ["", "Test errors as the grid (rows alpha, columns T; alpha 0 is the one control run):", "",
              "| alpha \\ T | " + " | ".join(f"{t:g}" for t in temps) + " |", "|---|" + "---:|" * len(temps)]
    for al in alphas:
        vals = [control["test"]["errors"] if al == 0 else cell[(t, al)]["test"]["errors"] for t in temps]
        lines.append(f"| {al:g}{' (control)' if al == 0 else ''} | " + " | ".join(str(v) for v in vals) + " |")
    rel = picture.relative_to(path.parent)
    lines += ["", f"![holdout errors over T x alpha]({rel.as_posix()})", "",
              f"Chosen on the holdout: `{best['name']}`, {best['errors']} errors against the control's "
              f"{control['errors']} (margin {res.get('margin_errors')}); on the test set it makes "
              f"{best['test']['errors']} against the control's {control['test']['errors']}. The best run on the test "
              f"set is `{best_test['name']}` ({best_test['test']['errors']}).", ""]
    begin, end = f"<!-- begin run:{a.name} -->", f"<!-- end run:{a.name} -->"
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n" + "\n".join(lines) + f"\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
