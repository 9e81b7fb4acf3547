#!/usr/bin/env python3
"""Specialists (Hinton, Vinyals & Dean 2015, section 5) on a many-class task built from the shipped MNIST.

``--task three-digits`` (the default): scripts/many_class.py's three MNIST digits side by side (class
``100 a + 10 b + c``, 1,000 classes); ``--task keyed``: scripts/keyed_digits.py's 100 fine-grained classes (a key
digit and the small digit it points to, ``10 a + b``). ONNX CNN teachers, one dense transfer set; then,
all through transferset's own functions (the commands call the same ones):

1. ``specialists plan``: k-means on the columns of the covariance of the ensemble's stored predictions;
2. a generalist (``train-student``) on the whole set;
3. one specialist per cluster (``train-student --specialist plan.json:I --init-from generalist``): its classes
   plus a dustbin, on its rows, with the stored soft targets folded;
4. ``evaluate --generalist --specialists --plan``: the generalist alone and combined with the active specialists
   (q minimising KL(p_g || q) + sum_m KL(p_m || q_m)), by number of active specialists (the paper's table 5).

Every stage is cached in ``--workdir``; the section of docs/RESULTS.md between its markers is rewritten from
this run, its command at its head.

    python scripts/specialists.py --workdir /tmp/mc24 --threads 1
    python scripts/specialists.py --task keyed --workdir /tmp/keyed --threads 1 --section keyed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import keyed_digits  # noqa: E402
import many_class  # noqa: E402

#: per task: its module (stage_data, stage_teachers), rows, the section's heading and its "Task:" line
TASKS = {
    "three-digits": {"module": many_class, "train_rows": 60000, "test_rows": 10000,
                     "heading": "Specialists on 1,000 classes (the paper's section 5)",
                     "rows": "scripts/many_class.py's rows (three MNIST digits side by side, 60,000 train / 10,000 "
                             "test, 1,000 classes)"},
    "keyed": {"module": keyed_digits, "train_rows": 60000, "test_rows": 10000,
              "heading": "Specialists on 100 fine-grained classes: a key digit and the small digit it points to",
              "rows": "scripts/keyed_digits.py's rows (a full-size MNIST key digit a beside ten 14x14 MNIST digits "
                      "in ten slots; class 10 a + b, b the small digit in slot a; {train:,} train / {test:,} test, "
                      "100 classes)"},
}

def markers(section: str) -> tuple[str, str]:
    """The RESULTS.md markers of a section (``specialists`` keeps the first run's markers)."""
    tag = "specialists" if section == "specialists" else f"specialists:{section}"
    return f"<!-- begin {tag} -->", f"<!-- end {tag} -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="three-digits",
                   help="three-digits: scripts/many_class.py's 1,000 classes; keyed: scripts/keyed_digits.py's 100")
    p.add_argument("--train-rows", type=int, default=None, help="train rows (default: the task's 60,000)")
    p.add_argument("--test-rows", type=int, default=None, help="test rows (default: the task's 10,000)")
    p.add_argument("--workdir", type=Path, default=Path("specialists_work"))
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--teacher-epochs", default="1")
    p.add_argument("--count", type=int, default=10, help="k-means clusters")
    p.add_argument("--student", default="mlp:512")
    p.add_argument("--generalist-lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--generalist-epochs", type=int, default=3)
    p.add_argument("--specialist-epochs", type=int, default=2)
    p.add_argument("--specialist-lr", type=float, default=1e-3)
    p.add_argument("--specialist-temperature", type=float, default=1.0,
                   help="T of the specialists' soft term (their targets are the T = 1 fold, tempered)")
    p.add_argument("--control-epochs", default="0",
                   help="also train the generalist alone for this many epochs (same schedule): a control with as "
                        "many steps as the generalist and its specialists together ('auto': the fewest whole epochs "
                        "that take at least as many steps as they did)")
    p.add_argument("--top", default="1,2,3", help="the generalist's top classes that activate a specialist")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "RESULTS.md")
    p.add_argument("--no-results", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--section", default="specialists",
                   help="name of this run's section in RESULTS.md (another name keeps the other runs' sections)")
    a = p.parse_args(argv)
    if a.control_epochs != "auto" and not (a.control_epochs.isdigit()):
        p.error(f"--control-epochs: a whole number of epochs or 'auto', got {a.control_epochs!r}")
    task = TASKS[a.task]
    a.train_rows = a.train_rows or task["train_rows"]
    a.test_rows = a.test_rows or task["test_rows"]
    return a


def train(work: Path, name: str, a, data: dict, temperature: float, **kw):
    from transferset.training.loop import TrainOptions, train_student

    o = TrainOptions(student=a.student, alpha=0.9, temperature=temperature, batch_size=256, device="cpu",
                     threads=a.threads, quiet=True, resume=True, eval_data=data["test_x"], eval_labels=data["test_y"],
                     **kw)
    t0 = time.perf_counter()
    run = work / name
    if (run / "student.pt").exists() and (run / "metrics.jsonl").exists():  # trained before: its record
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        if len(lines) == o.epochs:
            return {"run": name, "accuracy": lines[-1]["eval_accuracy"], "seconds": sum(x["seconds"] for x in lines),
                    "status": "cached", "steps": lines[-1]["steps"]}
    res = train_student(work / "dense", run, o)
    last = res.metrics[-1]
    return {"run": name, "accuracy": last["eval_accuracy"], "seconds": time.perf_counter() - t0,
            "status": res.status, "steps": last["steps"]}


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    t_start = time.time()
    load0 = os.getloadavg()[0]
    w = a.workdir
    w.mkdir(parents=True, exist_ok=True)
    task = TASKS[a.task]["module"]
    data = task.stage_data(w, a.train_rows, a.test_rows)
    teachers = task.stage_teachers(w, data, a.members, [int(v) for v in a.teacher_epochs.split(",")])
    if not (w / "dense" / "manifest.json").exists():
        many_class.stage_label(w, data, a.members, a.threads)
    from transferset.evaluate import evaluate
    from transferset.specialist_combine import combine_and_score, specialist_predictions
    from transferset.training.specialists import make_plan, read_plan, write_plan

    plan_path = w / f"plan{a.count}.json"
    if not plan_path.exists():
        write_plan(make_plan(w / "dense", a.count), plan_path)
    plan = read_plan(plan_path)
    # the first runs (3 generalist epochs) live in "gen" and "spec..-head-I"; longer ones name their epochs
    gname = "gen" if a.generalist_epochs == 3 else f"gen-e{a.generalist_epochs}"
    gname += "" if a.generalist_lr == 2e-3 else f"-lr{a.generalist_lr:g}"
    gen = train(w, gname, a, data, a.temperature, epochs=a.generalist_epochs, lr=a.generalist_lr)
    print(f"generalist: {gen}", flush=True)
    specs = []
    for i in range(len(plan["clusters"])):
        name = (f"spec{a.count}-T{a.specialist_temperature:g}-e{a.specialist_epochs}-head-{i}" if gname == "gen" else
                f"spec{a.count}-{gname}-T{a.specialist_temperature:g}-e{a.specialist_epochs}-lr{a.specialist_lr:g}-{i}")
        specs.append(train(w, name, a, data, a.specialist_temperature, epochs=a.specialist_epochs, lr=a.specialist_lr,
                           specialist=f"{plan_path}:{i}", init_from=str(w / gname / "student.pt")))
        print(f"specialist {i}: {specs[-1]}", flush=True)
    control = None
    a.control_epochs = control_epochs(a.control_epochs, gen, specs, a.generalist_epochs)
    if a.control_epochs:  # the generalist alone, trained for as many more steps as the specialists took
        cname = f"gen-e{a.control_epochs}" + ("" if a.generalist_lr == 2e-3 else f"-lr{a.generalist_lr:g}")
        control = train(w, cname, a, data, a.temperature, epochs=a.control_epochs, lr=a.generalist_lr)
        print(f"control generalist: {control}", flush=True)
    paths = [str(w / s["run"] / "student.pt") for s in specs]
    plan_, g, spec_lp, y = specialist_predictions(str(w / gname / "student.pt"), paths, plan_path, data["test_x"],
                                                  data["test_y"], device="cpu")
    inside = in_cluster(plan_, g, spec_lp, y)
    combos = {}
    for top in [int(v) for v in a.top.split(",")]:
        for shift in (True, False):
            r = combine_and_score(plan_, g, spec_lp, y, top=top, dustbin_shift=shift)
            combos[(top, shift)] = dict(r, specialists=paths)
            print(f"top {top}, shift {shift}: {r['generalist_errors']} -> {r['combined_errors']} "
                  f"({100 * r['relative_error_reduction']:.1f}%)", flush=True)
    # a diagnostic, not a rule: every dustbin all but silenced (its logit lowered by 30), so only each specialist's
    # votes among its own classes count: what the specialists' knowledge of their clusters buys on its own
    mute = json.loads(json.dumps(plan_))
    for c in mute["clusters"]:
        c["dustbin_shift"] = -30.0
    silent = combine_and_score(mute, g, spec_lp, y, top=1, dustbin_shift=True)
    print(f"top 1, dustbins silenced: {silent['combined_errors']}", flush=True)
    describe = getattr(TASKS[a.task]["module"], "describe_plan", None)
    ens = evaluate([str(w / f"t{i}.onnx") for i in range(a.members)], data["test_x"], data["test_y"], device="cpu")
    if control is not None:
        control["errors"] = evaluate([str(w / control["run"] / "student.pt")], data["test_x"], data["test_y"],
                                     device="cpu")["errors"]
    res = {"teachers": teachers, "ensemble_accuracy": ens["accuracy"], "plan": plan, "generalist": gen,
           "control": control, "in_cluster": inside, "dustbins_silenced": {k: v for k, v in silent.items()
                                                                          if k != "by_active"},
           "specialists": specs, "combinations": {f"top{k[0]}{'' if k[1] else '-noshift'}": v for k, v in combos.items()},
           "clusters_note": describe(plan) if describe else None, "n_test": int(len(y)),
           "wall_s": time.time() - t_start, "load": [load0, os.getloadavg()[0]]}
    (w / "specialists_results.json").write_text(json.dumps(res, indent=1, default=str))
    text = section(res, a, " ".join(shlex.quote(x) for x in ["python", "scripts/specialists.py", *(argv or sys.argv[1:])]))
    print(text)
    if not a.no_results:
        write_section(a.results, text, a.section)
    return res


def control_epochs(value: str, gen: dict, specs: list[dict], generalist_epochs: int) -> int:
    """The control's epochs: ``value`` as a number, or for ``auto`` the fewest whole epochs of the generalist's
    schedule with at least as many steps as the generalist and its specialists together."""
    if value != "auto":
        return int(value)
    per_epoch = gen["steps"] / generalist_epochs
    return math.ceil((gen["steps"] + sum(s["steps"] for s in specs)) / per_epoch - 1e-9)


def in_cluster(plan: dict, g, spec_lp, y) -> list[dict]:
    """Per specialist, on the test cases where it is active (the generalist's top class in its cluster) and the
    true class is in the cluster too: how many the generalist gets right, and how many the specialist would with
    its dustbin left out (its best cluster class). A specialist can only help where the second beats the first."""
    import numpy as np

    top = g.argmax(1)
    out = []
    for i, lp in enumerate(spec_lp):
        cl = np.asarray(plan["clusters"][i]["classes"])
        both = np.isin(top, cl) & np.isin(y, cl)
        out.append({"cases": int(both.sum()), "generalist_correct": int((top == y)[both].sum()),
                    "specialist_correct": int((cl[lp[:, :-1].argmax(1)] == y)[both].sum()),
                    "errors_outside": int((np.isin(top, cl) & ~np.isin(y, cl)).sum())})
    return out


def section(r: dict, a, command: str) -> str:
    plan = r["plan"]
    sizes = [len(c["classes"]) for c in plan["clusters"]]
    rows = [c["rows"] for c in plan["clusters"]]
    best = r["combinations"]["top1"]
    accs = ", ".join(f"{100 * t['test_accuracy']:.2f}%" for t in r["teachers"])
    task = TASKS[a.task]
    n = r.get("n_test", 10000)
    teacher_time = sum(t.get("seconds", 0) for t in r["teachers"]) / 60
    lines = [
        f"## {task['heading']}" + (f": {a.section}" if a.section != "specialists" else ""), "",
        f"Command: `{command}`  ",
        f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, Python {platform.python_version()}, torch "
        f"{__import__('torch').__version__}, {a.threads} torch thread(s); wall time {r['wall_s'] / 60:.1f} min for the "
        f"stages this run did (earlier stages cached in the workdir); 1-minute load average {r['load'][0]:.1f} at the "
        f"start, {r['load'][1]:.1f} at the end (other engineers' jobs).  ",
        f"Task: {task['rows'].format(train=a.train_rows, test=a.test_rows)}; {len(r['teachers'])} CNN teachers "
        f"({accs}; ensemble {100 * r['ensemble_accuracy']:.2f}%"
        + (f"; {teacher_time:.1f} min of training in all" if a.task != "three-digits" else "")
        + "), one dense transfer set (T = 1, 2, 4, 8, 20).  ",
        f"Plan: `transferset specialists plan --count {a.count}`: k-means on the columns of the covariance of the "
        f"ensemble's stored predictions at T = {plan['temperature']:g}; {len(sizes)} clusters of {min(sizes)} to "
        f"{max(sizes)} classes; a specialist's rows are those where the ensemble puts >= {plan['mass']:g} on its "
        f"cluster at T = {plan['select_temperature']:g}, plus as many drawn from the rest ({min(rows):,} to "
        f"{max(rows):,} rows)." + (f" {r['clusters_note']}" if r.get("clusters_note") else "") + "  ",
        f"Students: generalist `{a.student}`, {a.generalist_epochs} epochs, lr {a.generalist_lr:g}, T = {a.temperature:g}, alpha "
        f"0.9; each specialist the same architecture with its cluster's classes + a dustbin, started from the "
        f"generalist's weights (its output layer too: the rows of its classes, and for the dustbin the mean of the other rows and the log-sum-exp of their biases), {a.specialist_epochs} epochs on its rows, lr "
        f"{a.specialist_lr:g}, T = {a.specialist_temperature:g}, alpha 0.9, targets the tempered fold (the ensemble's "
        "T = 1 distribution folded to the cluster's classes and a dustbin, then tempered at T: the fold of the "
        "distribution stored at T would inflate the dustbin at T = 1).", "",
        f"| model | test accuracy | errors / {n:,} |", "|---|---:|---:|",
        f"| teacher ensemble | {100 * r['ensemble_accuracy']:.2f}% | {round((1 - r['ensemble_accuracy']) * n)} |",
        f"| generalist alone | {100 * best['generalist_accuracy']:.2f}% | {best['generalist_errors']} |",
    ]
    for key, c in r["combinations"].items():
        top = c["top"]
        note = "" if c["dustbin_shift"] else ", dustbin logits as trained"
        lines.append(f"| generalist + {len(c['specialists'])} specialists (active: one of its classes in the "
                     f"generalist's top {top}{note}) | {100 * c['combined_accuracy']:.2f}% | {c['combined_errors']} "
                     f"({100 * c['relative_error_reduction']:.1f}% fewer) |")
    if r.get("control"):
        c = r["control"]
        lines.append(f"| control: the generalist alone trained {c['steps']:,} steps ({a.control_epochs} epochs; the "
                     f"generalist and its specialists together took {r['generalist']['steps'] + sum(s['steps'] for s in r['specialists']):,}) "
                     f"| {100 * (1 - c['errors'] / n):.2f}% | {c['errors']} |")
    red = 100 * best["relative_error_reduction"]
    lines += ["", f"The issue's goal, a relative error reduction of at least 5% with the paper's rule (top 1, dustbin "
              f"shift): {'met' if red >= 5 else 'not met'}, {red:.1f}% ({best['generalist_errors']} -> "
              f"{best['combined_errors']} errors)."]
    lines += ["", "Specialists alone, on their own folded test labels (cluster class or dustbin): "
              + ", ".join(f"{100 * s['accuracy']:.1f}%" for s in r["specialists"]) + ".", ""]
    if r.get("dustbins_silenced"):
        z = r["dustbins_silenced"]
        lines += [f"Diagnostic (not a rule): with every specialist's dustbin logit lowered by 30, so that only its votes "
                  f"among its own classes count (top 1), the combination makes {z['combined_errors']} errors "
                  f"({100 * z['relative_error_reduction']:.1f}% fewer than the generalist): what the specialists' "
                  "knowledge of their clusters buys without their dustbins.", ""]
    if r.get("in_cluster"):
        ic = r["in_cluster"]
        lines += ["Where a specialist can help (top-1 rule): test cases whose generalist's top class and true class "
                  "both lie in the specialist's cluster, and how many of them the generalist and the specialist (its "
                  "best cluster class, dustbin left out) get right; 'outside': active cases whose true class is "
                  "outside the cluster (the specialist can only vote for its dustbin there).", "",
                  "| specialist | cases | generalist correct | specialist correct | outside |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {i} | {x['cases']:,} | {x['generalist_correct']:,} | {x['specialist_correct']:,} | "
                  f"{x['errors_outside']:,} |" for i, x in enumerate(ic)]
        tot = {k: sum(x[k] for x in ic) for k in ("cases", "generalist_correct", "specialist_correct", "errors_outside")}
        lines += [f"| all | {tot['cases']:,} | {tot['generalist_correct']:,} | {tot['specialist_correct']:,} | "
                  f"{tot['errors_outside']:,} |", ""]
    for key in [k for k in r["combinations"] if not k.endswith("noshift")]:
        c = r["combinations"][key]
        lines += [f"By number of active specialists (top {c['top']}; the paper's table 5 counts specialists covering "
                  "the case the same way):", "",
                  "| active specialists | test cases | generalist correct | combined correct | change |",
                  "|---:|---:|---:|---:|---:|"]
        for t in c["by_active"]:
            lines.append(f"| {t['active']} | {t['cases']:,} | {t['generalist_correct']:,} | {t['combined_correct']:,} "
                         f"| {100 * t['relative_accuracy_change']:+.1f}% |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def write_section(path: Path, body: str, section: str = "specialists") -> None:
    BEGIN, END = markers(section)
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{BEGIN}\n{body}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
