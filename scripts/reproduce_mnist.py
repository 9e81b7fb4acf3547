#!/usr/bin/env python3
"""Reproduce Hinton, Vinyals & Dean (2015), section 3, on MNIST, through transferset's own stages.

Three experiments share one teacher ensemble (trained here in PyTorch, exported to ONNX, labelled with
``transferset.label``; students trained with ``transferset.train_student`` from the transfer set alone):

1. **The table.** Teachers 784-1200-1200-10 (dropout 0.5, input dropout 0.2, inputs jittered by up to 2 px);
   a 784-800-800-10 student distilled at T=20; the same net on hard labels alone (no regularisation) as the
   baseline. The paper: baseline 146 errors, big net 67, distilled 74.
2. **The omitted digit.** A transfer set with every 3 removed; the distilled student's errors on the test 3s
   before and after raising the bias of class 3 by the shift that minimises the total test errors (the paper's
   choice: +3.5, after which 98.6% of the test 3s are right).
3. **Soft targets as a regulariser** (the paper's section 6, on speech): a student on 3% of the training rows
   with soft targets from the full ensemble, against the same student on hard labels for the same 3%.

Every number goes into docs/RESULTS.md (a section per ``--name``, replaced on a re-run), beside the command line,
the budget, the seeds, the machine and the wall time. Each stage's output is kept under ``--out`` and reused.

    python scripts/reproduce_mnist.py                       # the paper's architecture, CPU-sized budget
    python scripts/reproduce_mnist.py --teacher cnn --teacher-epochs 2 --views 3 --temperature 4 --name cnn
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from transferset.demo import (CnnTeacher, MlpTeacher, export_teacher, mnist_paths, shipped_teachers,  # noqa: E402
                              train_teacher)
from transferset.evaluate import metrics, predict_log_probs  # noqa: E402
from transferset.labelling.pipeline import LabelOptions, label  # noqa: E402
from transferset.inputs.sources import open_source, read_labels  # noqa: E402
from transferset.training.students import count_parameters  # noqa: E402
from transferset.targets import combine_log_probs  # noqa: E402
from transferset.devices import torch_device as resolve_device  # noqa: E402
from transferset.training.loop import TrainOptions, train_student  # noqa: E402

PAPER = {"baseline": 146, "teacher": 67, "student": 74, "omitted_3s_correct_after_shift": 0.986, "shift": 3.5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reproduce-mnist", help="working folder (teachers, transfer sets, students)")
    p.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"), help="markdown file to update")
    p.add_argument("--name", default=None, help="section name in RESULTS.md (default: the teacher kind)")
    p.add_argument("--teacher", choices=("mlp", "cnn"), default="mlp",
                   help="mlp: the paper's 784-1200-1200-10; cnn: the demo's small convnet (stronger per CPU second)")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--shipped", action="store_true",
                   help="use the teachers shipped in data/teachers (trained by scripts/train_teachers.py) instead "
                        "of training them here")
    p.add_argument("--mixup", type=float, default=None,
                   help="also run the function-matching comparison: the same views with mixup:A added, equal steps")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--views", type=int, default=0, help="jittered views per row in the transfer set (0: clean only)")
    p.add_argument("--student", default="mlp:800,800")
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--student-lr", type=float, default=None)
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--small-fraction", type=float, default=0.03)
    p.add_argument("--small-epochs", type=int, default=60)
    p.add_argument("--train-rows", type=int, default=None, help="use only the first N training rows (smoke runs)")
    p.add_argument("--test-rows", type=int, default=None)
    p.add_argument("--skip", default="", help="comma list of experiments to skip: omitted,small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="a tiny budget that only checks the script runs")
    p.add_argument("--json", action="store_true", help="print one JSON object with every number last")
    a = p.parse_args(argv)
    if a.quick:
        a.members, a.teacher_epochs, a.student_epochs, a.small_epochs = 2, 1, 1, 2
        a.train_rows, a.test_rows = a.train_rows or 3000, a.test_rows or 1000
        a.student = "mlp:64,64"
    a.name = a.name or (a.teacher + ("-quick" if a.quick else ""))
    return a


def say(text: str) -> None:
    print(text, flush=True)


def train_students(ts: Path, out: Path, a, runs: dict[str, float], epochs: int) -> dict:
    """Train each student in ``runs`` (name -> alpha) from transfer set ``ts``; return name -> student.pt."""
    paths = {}
    for name, alpha in runs.items():
        t = time.perf_counter()
        train_student(ts, out / name, TrainOptions(student=a.student, alpha=alpha, temperature=a.temperature,
                                                   epochs=epochs, lr=a.student_lr, seed=a.seed, device=a.device,
                                                   resume=True, quiet=True))
        paths[name] = out / name / "student.pt"
        say(f"  student {name} (alpha={alpha:g}, T={a.temperature:g}) trained in {time.perf_counter() - t:.0f} s")
    return paths


def label_subset(teachers, x: np.ndarray, y: np.ndarray, folder: Path, a) -> Path:
    """Save rows ``x``/``y`` as .npy and label them with the ensemble into ``folder/transfer-set``."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "x.npy").exists():
        np.save(folder / "x.npy", x)
        np.save(folder / "y.npy", y)
    ts = folder / "transfer-set"
    label(teachers, str(folder / "x.npy"), ts, label_options(a, str(folder / "y.npy")))
    return ts


def label_options(a, labels: str, limit: int | None = None) -> LabelOptions:
    temps = sorted({1.0, 2.0, 4.0, 8.0, 20.0, float(a.temperature)})
    return LabelOptions(labels=labels, limit=limit, augment="jitter:2" if a.views else None, views=a.views,
                        seed=a.seed, temperatures=temps, quiet=True, shard_size=65536)


def main(argv=None) -> dict:
    a = parse_args(argv)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(a.device))
    skip = {s for s in a.skip.split(",") if s}
    paths = mnist_paths()
    src = open_source(paths["train_x"], limit=a.train_rows)
    x_train, y_train = src.read(0, src.rows), read_labels(paths["train_y"], rows=src.rows)
    test = open_source(paths["test_x"], limit=a.test_rows)
    x_test, y_test = test.read(0, test.rows), read_labels(paths["test_y"], rows=test.rows)
    timings: dict[str, float] = {}

    # Teachers, trained once and reused by all three experiments.
    make = (lambda: MlpTeacher()) if a.teacher == "mlp" else (lambda: CnnTeacher())
    tdir = out / f"teachers-{a.teacher}-e{a.teacher_epochs}-n{src.rows}"
    tdir.mkdir(parents=True, exist_ok=True)
    teachers, reused = [], 0
    t = time.perf_counter()
    shipped = shipped_teachers(a.teacher)[: a.members] if a.shipped else []
    if shipped:
        teachers = [s["path"] for s in shipped]
        reused = len(teachers)
        say(f"teachers: {len(teachers)} shipped ({', '.join(s['file'] for s in shipped)}; test errors "
            f"{[s['test_errors'] for s in shipped]})")
    for i in range(0 if shipped else a.members):
        f = tdir / f"teacher-{i}.onnx"
        if not f.exists():
            ts = time.perf_counter()
            model = train_teacher(make(), x_train, y_train, epochs=a.teacher_epochs, seed=1000 + i, jitter=2,
                                  lr=a.teacher_lr, device=device)
            export_teacher(model, f)
            say(f"teacher {i}: {a.teacher}, {a.teacher_epochs} epochs in {time.perf_counter() - ts:.0f} s")
        else:
            reused += 1
        teachers.append(f)
    timings["teachers"] = time.perf_counter() - t
    timings["teachers_reused"] = reused

    # 1. The table.
    say("experiment 1: the table")
    t = time.perf_counter()
    run = out / f"{a.name}-table"
    ts_full = run / "transfer-set"
    label(teachers, paths["train_x"], ts_full, label_options(a, paths["train_y"], limit=a.train_rows))
    if a.views:
        # The paper's baseline learns from the training images as they are: a clean-only set, trained for as
        # many steps; hard labels of the jittered rows become a control (what the augmentation alone buys).
        students = train_students(ts_full, run, a, {"distilled": a.alpha, "control": 0.0}, a.student_epochs)
        clean = run / "training-set"
        label(teachers, paths["train_x"], clean, LabelOptions(labels=paths["train_y"], limit=a.train_rows,
                                                              seed=a.seed, quiet=True, shard_size=65536))
        students.update(train_students(clean, run, a, {"baseline": 0.0}, a.student_epochs * (a.views + 1)))
    else:
        students = train_students(ts_full, run, a, {"baseline": 0.0, "distilled": a.alpha}, a.student_epochs)
    teacher_lp = [predict_log_probs([f], test, device=a.device) for f in teachers]
    ens_lp = combine_log_probs(np.stack(teacher_lp, axis=1), 1.0, "mean-probs")
    lp = {k: predict_log_probs([p], test, device=a.device) for k, p in students.items()}
    table = {
        "teacher_errors": [metrics(x, y_test)["errors"] for x in teacher_lp],
        "ensemble_errors": metrics(ens_lp, y_test)["errors"],
        "baseline_errors": metrics(lp["baseline"], y_test)["errors"],
        "student_errors": metrics(lp["distilled"], y_test)["errors"],
        "control_errors": metrics(lp["control"], y_test)["errors"] if "control" in lp else None,
        "teacher_parameters": int(shipped[0]["parameters"]) if shipped else count_parameters(make()),
        "teachers": [s["file"] + " (shipped, sha256 " + s["sha256"][:12] + ")" for s in shipped] or None,
        "transfer_set_rows": int(json.loads((ts_full / "manifest.json").read_text())["stats"]["rows"]),
    }
    gap = table["baseline_errors"] - table["ensemble_errors"]
    table["gap_closed"] = (table["baseline_errors"] - table["student_errors"]) / gap if gap > 0 else None
    timings["table"] = time.perf_counter() - t
    say(json.dumps(table))

    results = {"name": a.name, "n_test": int(test.rows), "table": table}

    # 2. The omitted digit: no 3 anywhere in the transfer set.
    if "omitted" not in skip:
        say("experiment 2: the omitted digit")
        t = time.perf_counter()
        keep = y_train != 3
        folder = out / f"{a.name}-no3"
        ts = label_subset(teachers, x_train[keep], y_train[keep], folder, a)
        st = train_students(ts, folder, a, {"distilled": a.alpha}, a.student_epochs)
        lp3 = predict_log_probs([st["distilled"]], test, device=a.device)
        threes = y_test == 3
        before = lp3.argmax(1)
        shifts = np.round(np.arange(0.0, 15.01, 0.25), 2)
        totals = []
        for s in shifts:
            z = lp3.copy()
            z[:, 3] += s  # raising class 3's output bias adds s to its logit, so to its log-probability's argmax
            totals.append(int((z.argmax(1) != y_test).sum()))
        best = float(shifts[int(np.argmin(totals))])
        z = lp3.copy()
        z[:, 3] += best
        after = z.argmax(1)
        results["omitted"] = {
            "transfer_set_rows": int(json.loads((ts / "manifest.json").read_text())["stats"]["rows"]),
            "test_threes": int(threes.sum()),
            "errors_before": int((before != y_test).sum()),
            "three_errors_before": int((before[threes] != 3).sum()),
            "shift": best,
            "errors_after": int((after != y_test).sum()),
            "three_errors_after": int((after[threes] != 3).sum()),
            "threes_correct_after": float((after[threes] == 3).mean()),
        }
        timings["omitted"] = time.perf_counter() - t
        say(json.dumps(results["omitted"]))

    # 3. Soft targets as a regulariser: 3% of the rows.
    if "small" not in skip:
        say("experiment 3: soft targets on a small fraction of the rows")
        t = time.perf_counter()
        rng = np.random.default_rng(a.seed)
        n = max(1, int(round(a.small_fraction * src.rows)))
        idx = np.sort(rng.choice(src.rows, size=n, replace=False))
        folder = out / f"{a.name}-small"
        ts = label_subset(teachers, x_train[idx], y_train[idx], folder, a)
        st = train_students(ts, folder, a, {"hard": 0.0, "soft": a.alpha}, a.small_epochs)
        results["small"] = {"rows": n, "fraction": a.small_fraction, "epochs": a.small_epochs,
                            **{f"{k}_errors": metrics(predict_log_probs([p], test, device=a.device), y_test)["errors"]
                               for k, p in st.items()}}
        timings["small"] = time.perf_counter() - t
        say(json.dumps(results["small"]))

    # 4. Function matching (Beyer et al. 2022): the same views with mixup added, the same steps.
    if a.mixup is not None and a.views:
        say(f"experiment 4: function matching (jitter:2 + mixup:{a.mixup:g}), same steps")
        t = time.perf_counter()
        folder = out / f"{a.name}-mixup"
        opts = label_options(a, paths["train_y"], limit=a.train_rows)
        opts.augment = f"jitter:2,mixup:{a.mixup:g}"
        label(teachers, paths["train_x"], folder / "transfer-set", opts)
        st = train_students(folder / "transfer-set", folder, a, {"distilled": a.alpha, "control": 0.0},
                            a.student_epochs)
        results["mixup"] = {"alpha": a.mixup, "views": a.views,
                            **{f"{k}_errors": metrics(predict_log_probs([p], test, device=a.device), y_test)["errors"]
                               for k, p in st.items()},
                            "jitter_only_distilled_errors": table["student_errors"],
                            "jitter_only_control_errors": table["control_errors"]}
        timings["mixup"] = time.perf_counter() - t
        say(json.dumps(results["mixup"]))

    timings["total"] = time.perf_counter() - t0
    results.update(budget={k: getattr(a, k) for k in ("teacher", "members", "teacher_epochs", "teacher_lr", "views",
                                                       "student", "student_epochs", "student_lr", "temperature",
                                                       "alpha", "small_fraction", "small_epochs", "train_rows",
                                                       "seed")},
                   seconds=timings, device=device, machine=machine(), loadavg=[load_start, os.getloadavg()[0]])
    write_results(Path(a.results), results, command=shlex.join(["python", "scripts/reproduce_mnist.py",
                                                               *(argv if argv is not None else sys.argv[1:])]))
    if a.json:
        print(json.dumps(results))
    return results


def machine() -> str:
    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU"
    if torch.cuda.is_available():
        cpu += f", GPU {torch.cuda.get_device_name(0)}"
    return f"{cpu}, {platform.system()}, Python {platform.python_version()}, torch {torch.__version__}"


def write_results(path: Path, r: dict, command: str) -> None:
    """Replace (or append) this run's section of RESULTS.md, between markers naming the run."""
    t, b = r["table"], r["budget"]
    n = r["n_test"]
    views = "clean only" if not b["views"] else f"clean + {b['views']} jittered views"
    sec = r["seconds"]
    teacher_time = ("the shipped teachers of data/teachers, trained by scripts/train_teachers.py (their commands, "
                    "seeds and logs are in data/teachers/teachers.json)" if t.get("teachers") else
                    f"teachers {sec['teachers']:.0f} s" if not sec["teachers_reused"] else
                    f"{sec['teachers_reused']} teachers reused from an earlier run of this budget, their training "
                    "time not included; other finished stages are reused likewise")
    lines = [f"## Run `{r['name']}`", "",
             f"Command: `{command}`  ",
             f"Machine: {r['machine']}; device `{r['device']}`; wall time {r['seconds']['total'] / 60:.1f} min "
             f"({teacher_time}); 1-minute load average {r['loadavg'][0]:.1f} at the start, "
             f"{r['loadavg'][1]:.1f} at the end.  ",
             (f"Budget: {len(t['teacher_errors'])} shipped {b['teacher']} teachers ({', '.join(t['teachers'])}); transfer set "
              if t.get("teachers") else
              f"Budget: {b['members']} {b['teacher']} teachers x {b['teacher_epochs']} epochs (Adam one-cycle, max lr "
              f"{b['teacher_lr']:g}, +-2 px jitter, seeds 1000..{1000 + b['members'] - 1}); transfer set ") +
             f"{t['transfer_set_rows']:,} rows ({views}); "
             f"students `{b['student']}` x {b['student_epochs']} epochs (AdamW, cosine), T={b['temperature']:g}, "
             f"alpha={b['alpha']:g}, seed {b['seed']}; {n:,} test images.", "",
             "| model | paper (errors / 10,000) | this run (errors / %s) |" % f"{n:,}", "|---|---:|---:|",
             f"| student `{b['student']}` on the hard labels of the training images (baseline) | {PAPER['baseline']} | {t['baseline_errors']} |",
             *([f"| student `{b['student']}` on the hard labels of the transfer set's jittered rows (control) | | {t['control_errors']} |"]
               if t.get("control_errors") is not None else []),
             *[f"| teacher {i} ({b['teacher']}, {t['teacher_parameters']:,} parameters) | {PAPER['teacher'] if b['teacher'] == 'mlp' and i == 0 else ''} | {e} |"
               for i, e in enumerate(t["teacher_errors"])],
             f"| ensemble of {len(t['teacher_errors'])} | | {t['ensemble_errors']} |",
             f"| student `{b['student']}` distilled, T={b['temperature']:g} | {PAPER['student']} | {t['student_errors']} |", ""]
    gap = t["gap_closed"]
    lines.append(f"The distilled student closes **{gap:.0%}** of the baseline-to-ensemble gap "
                 f"(the paper's student closes {(146 - 74) / (146 - 67):.0%} of the gap to its big net)." if gap is not None
                 else "The ensemble is not better than the baseline at this budget, so there is no gap to close.")
    if t.get("control_errors") is not None:
        lines.append(f"Against the control, which saw the same jittered rows with hard labels for the same steps, "
                     f"the distilled student makes {t['student_errors']} errors to its {t['control_errors']}.")
    lines.append("")
    if "omitted" in r:
        o = r["omitted"]
        lines += ["**The omitted digit.** Transfer set without a single 3 "
                  f"({o['transfer_set_rows']:,} rows); {o['test_threes']} test 3s.", "",
                  "| | total errors | errors on test 3s | test 3s correct |", "|---|---:|---:|---:|",
                  f"| distilled, as trained | {o['errors_before']} | {o['three_errors_before']} | "
                  f"{1 - o['three_errors_before'] / o['test_threes']:.1%} |",
                  f"| bias of class 3 raised by {o['shift']:g} | {o['errors_after']} | {o['three_errors_after']} | "
                  f"{o['threes_correct_after']:.1%} |",
                  f"| paper, as trained | 206 | 133 | {1 - 133 / 1010:.1%} |",
                  f"| paper, bias raised by {PAPER['shift']} | 109 | 14 | {PAPER['omitted_3s_correct_after_shift']:.1%} |", "",
                  "The shift is the one (on a 0.25 grid) that minimises the total test errors, as in the paper.", ""]
    if "small" in r:
        s = r["small"]
        lines += [f"**Soft targets as a regulariser.** {s['rows']:,} training rows ({s['fraction']:.0%}), "
                  f"{s['epochs']} epochs each, same student and steps: hard labels **{s['hard_errors']}** test errors, "
                  f"soft targets from the full ensemble (alpha={b['alpha']:g}) **{s['soft_errors']}**. (The paper, on speech: "
                  "frame accuracy 44.5% with hard targets on 3% of the data, 57.0% with soft targets, 58.9% for the "
                  "baseline on all of it.)", ""]
    if "mixup" in r:
        x = r["mixup"]
        lines += [f"**Function matching** (Beyer et al. 2022). The same {x['views']} views per row with "
                  f"`mixup:{x['alpha']:g}` added after the jitter, students trained for the same steps: distilled "
                  f"**{x['distilled_errors']}** errors (jitter-only views: {x['jitter_only_distilled_errors']}); "
                  f"the hard-label control on the mixed rows {x['control_errors']} (jitter-only: "
                  f"{x['jitter_only_control_errors']}).", ""]
    write_section(path, r["name"], "\n".join(lines))


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md, between the markers ``run:<name>``."""
    begin, end = f"<!-- begin run:{name} -->", f"<!-- end run:{name} -->"
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
