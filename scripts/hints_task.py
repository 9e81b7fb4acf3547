#!/usr/bin/env python3
"""Hints on MNIST: logits-only KD against each feature-distillation loss, at equal steps (issue 23).

The shipped CNN teachers (data/teachers/cnn-*.onnx) label a subset of the MNIST training rows (3% by default,
clean + jittered views) with hints of member 0 stored beside the logits; two students learn from the set alone:
a thin, deep CNN (the FitNets setting) and a small MLP. Each student trains once with logits-only KD and once per
hint loss (KD + the hint term; fitnet as FitNets' two stages), the same epochs and steps, at several seeds;
test errors on the 10,000 MNIST test images. The section of docs/RESULTS.md between its markers is rewritten.

    nice -n 10 python scripts/hints_task.py --fraction 0.03 --views 3 --epochs 8 --seeds 0,1,2
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

from transferset.demo import mnist_paths  # noqa: E402
from transferset.evaluate import evaluate  # noqa: E402
from transferset.format.schema import hint_shape, row_bytes, shard_layout  # noqa: E402
from transferset.format.parts import read_manifest  # noqa: E402
from transferset.labelling.pipeline import LabelOptions, label  # noqa: E402
from transferset.inputs.sources import open_source, read_labels  # noqa: E402
from transferset.training.hint_losses import DEFAULT_WEIGHTS  # noqa: E402
from transferset.training.loop import TrainOptions, train_student  # noqa: E402

MAP, POOLED, FC = ("/features/features.7/MaxPool_output_0", "/features/features.6/Relu_output_0",
                   "/head/head.2/Relu_output_0")
#: the set's hints (member 0): hint_0 the 64x4x4 map raw, hint_1 the 64x8x8 map's attention, hint_2 the fc
#: layer's signs, hint_3 the fc layer's 256 values (avgpool of a vector is the vector)
HINTS = (f"{MAP}:reduce=none", f"{POOLED}:reduce=attention", f"{FC}:reduce=sign", f"{FC}:reduce=avgpool")
CNN = "deepcnn:8,8,16,16,16,16,fc=64"  # body.15: [16, 4, 4] after the third pool; body.17 fc pre-ReLU; body.18 after
MLP = "mlp:256,256"  # body.3: second hidden layer pre-ReLU; body.4 after
#: student -> run name -> (hint losses, hint epochs)
RUNS = {
    CNN: {"kd": ((), 0), "fitnet": (("fitnet:hint_0=body.15",), 2), "at": (("at:hint_1=body.14",), 0),
          "ab": (("ab:hint_2=body.17",), 0), "rkd": (("rkd:hint_3=body.18",), 0), "mmd": (("mmd:hint_0=body.15",), 0)},
    MLP: {"kd": ((), 0), "fitnet": (("fitnet:hint_3=body.4",), 2), "ab": (("ab:hint_2=body.3",), 0),
          "rkd": (("rkd:hint_3=body.4",), 0)},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.03)
    p.add_argument("--views", type=int, default=3, help="jittered views per row beside the clean one")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--hint-epochs", type=int, default=2, help="fitnet runs: epochs of the hint alone (FitNets' "
                   "first stage) before KD alone; fewer than --epochs")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--students", default="cnn,mlp")
    p.add_argument("--runs", default=None, help="only these runs (comma list of kd, fitnet, at, ab, rkd, mmd, and the "
                   "weighted runs' names, e.g. 'rkd w=0.01')")
    p.add_argument("--weight", action="append", default=[], metavar="[STUDENT:]KIND=W[,W...]",
                   help="also run the hint loss KIND at these weights (a run 'KIND w=W' per weight, for each student "
                        "that has a KIND run, or for STUDENT (cnn, mlp) only); repeatable")
    p.add_argument("--out", default="hints-task")
    p.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    p.add_argument("--name", default="hints-3pct")
    p.add_argument("--grad-check", action="store_true",
                   help="add the gradient norms of the KD and rkd terms at the deep CNN's initialisation")
    return p.parse_args(argv)


def say(msg: str) -> None:
    print(f"[hints_task] {msg}", file=sys.stderr, flush=True)


def label_set(a, out: Path) -> Path:
    paths = mnist_paths()
    src = open_source(paths["train_x"])
    labels = read_labels(paths["train_y"], rows=src.rows)
    n = max(1, int(round(a.fraction * src.rows)))
    idx = np.sort(np.random.default_rng(0).choice(src.rows, size=n, replace=False))
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "x.npy").exists():
        np.save(out / "x.npy", src.read(0, src.rows)[idx])
        np.save(out / "y.npy", labels[idx])
    teachers = sorted(str(p) for p in (ROOT / "data" / "teachers").glob("cnn-*.onnx"))
    ts = out / "transfer-set"
    label(teachers, str(out / "x.npy"), ts, LabelOptions(
        labels=str(out / "y.npy"), augment="jitter:2" if a.views else None, views=a.views, seed=0,
        temperatures=(1.0, 2.0, 4.0, 8.0, 20.0), quiet=True, threads=1, hints=HINTS))
    return ts


def bytes_table(ts: Path) -> list[str]:
    m = read_manifest(ts)
    layout = shard_layout(m)
    base = row_bytes(layout, [n for n in layout if not n.startswith("hint_")])
    lines = [f"Row bytes (float16): the set without hints {base} B a row (inputs 784 B, logits and soft targets of 3 "
             "members x 10 classes x 5 temperatures); each teacher tensor as each reduction would store it:", "",
             "| tensor (member 0) | per-row shape | none | avgpool | attention | sign |", "|---|---|---|---|---|---|"]
    shapes = {h["tensor"]: h["tensor_shape"] for h in m.hints}
    for tensor, tshape in shapes.items():
        cells = []
        for r in ("none", "avgpool", "attention", "sign"):
            if r == "attention" and len(tshape) < 2:
                cells.append("-")
                continue
            shape, dtype = hint_shape(r, tshape, "float16")
            cells.append(f"{int(np.prod(shape)) * np.dtype(dtype).itemsize:,}")
        lines.append(f"| `{tensor}` | {tshape} | " + " | ".join(cells) + " |")
    return lines + [""]


def runs_of(key: str, spec: str, weights: list[str]) -> dict:
    """The runs of one student (``key`` cnn or mlp): :data:`RUNS` and, for each ``[STUDENT:]KIND=W[,W...]`` of
    ``--weight`` (STUDENT: only that student's), a run ``KIND w=W`` with the same hint and module at weight W."""
    runs = dict(RUNS[spec])
    for item in weights:
        kind, _, values = item.partition("=")
        student, _, kind = kind.rpartition(":")
        if (student and student != key) or kind not in runs or kind == "kd" or not values:
            continue
        losses, hint_epochs = runs[kind]
        for w in values.split(","):
            runs[f"{kind} w={float(w):g}"] = (tuple(f"{x}:weight={float(w):g}" for x in losses), hint_epochs)
    return runs


def train_all(a, ts: Path, out: Path, seeds: list[int]) -> dict:
    paths = mnist_paths()
    students = {"cnn": CNN, "mlp": MLP}
    res: dict = {}
    for key in a.students.split(","):
        spec = students[key]
        for run, (losses, hint_epochs) in runs_of(key, spec, a.weight).items():
            if a.runs and run not in a.runs.split(","):
                continue
            for seed in seeds:
                folder = out / f"{key}-{run.replace(' w=', '-w')}-s{seed}"
                t = time.perf_counter()
                r = train_student(ts, folder, TrainOptions(
                    student=spec, alpha=a.alpha, temperature=a.temperature, epochs=a.epochs, lr=a.lr, seed=seed,
                    device="cpu", threads=1, quiet=True, resume=True, hint_loss=losses,
                    hint_epochs=a.hint_epochs if hint_epochs else 0,
                    batch_size=128))
                ev = evaluate([folder / "student.pt"], paths["test_x"], paths["test_y"], device="cpu")
                trained_s = sum(float(json.loads(line)["seconds"]) for line in
                                (folder / "metrics.jsonl").read_text().splitlines() if line.strip())
                steps = r.metrics[-1]["steps"] if r.metrics else None
                res.setdefault(key, {}).setdefault(run, []).append(
                    {"seed": seed, "errors": int(ev["errors"]), "nll": ev["nll"], "steps": steps, "train_seconds": trained_s,
                     "seconds": round(time.perf_counter() - t, 1)})
                say(f"{key} {run} seed {seed}: {ev['errors']} errors, {steps} steps, {time.perf_counter() - t:.0f} s")
    return res


def init_gradients(a, ts: Path, seeds: list[int]) -> list[str]:
    """At the deep CNN's initialisation, on the set's first 128 rows: the gradient norm (over the student's weights)
    of the KD term and of the rkd term at weight 1, and the scale of the embedding rkd compares. rkd divides
    distances by their mean and compares angles, so it does not depend on the embedding's scale and its gradient
    grows as 1 / scale; the loop clips the whole gradient to norm 5 (``clip_grad``), so when rkd's part is much
    the larger, the KD part that reaches the weights shrinks with it."""
    import torch
    import torch.nn.functional as F

    from transferset.format.reading import TransferSet
    from transferset.training.hint_losses import HintLosses, parse_hint_loss
    from transferset.training.students import create_student

    torch.set_num_threads(1)
    data = TransferSet(ts)
    m = data.manifest
    b = data.read(0, 0, 128, ["inputs", "soft_targets", "hint_3"])
    data.close()
    x, j = torch.from_numpy(b["inputs"]), list(m.temperatures).index(a.temperature)
    p = torch.from_numpy(b["soft_targets"][:, j].astype(np.float32)).exp()
    spec = RUNS[CNN]["rkd"][0][0]
    lines = [f"Gradients at initialisation (`{CNN}` drawn after torch.manual_seed(seed), the set's first 128 rows, "
             "`--grad-check`): the norm over the "
             f"student's weights of the KD term (alpha T^2 KL at T={a.temperature:g}) and of `{spec}` at weight 1, "
             "and the mean |value| of the embedding rkd compares:", "",
             "| seed | KD term gradient | rkd gradient | ratio | embedding mean \|e\| |", "|---|---|---|---|---|"]
    for seed in seeds:
        torch.manual_seed(seed)
        model = create_student(CNN, list(m.input["shape"]), m.num_classes, input_scale=1 / 255)
        hl = HintLosses([parse_hint_loss(spec)], m.hints, model, m.input["shape"], m.input["dtype"])
        z = model(x)
        emb = hl._captured[0].abs().mean().item()
        kd = a.alpha * a.temperature ** 2 * F.kl_div(F.log_softmax(z / a.temperature, -1), p, reduction="batchmean")
        hint = hl({"mask": torch.ones(len(x)), "hint_3": torch.from_numpy(b["hint_3"])})
        params = list(model.parameters())
        norm = lambda gs: float(torch.sqrt(sum((g ** 2).sum() for g in gs if g is not None)))  # noqa: E731
        gk = norm(torch.autograd.grad(kd, params, retain_graph=True, allow_unused=True))
        gh = norm(torch.autograd.grad(hint, params, allow_unused=True))
        lines.append(f"| {seed} | {gk:.3g} | {gh:.3g} | {gh / gk:.0f} | {emb:.3g} |")
        hl.remove()
    return lines + [""]


def write_section(path: Path, name: str, body: str) -> None:
    begin, end = f"<!-- begin run:{name} -->", f"<!-- end run:{name} -->"
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def report(a, res: dict, ts: Path, command: str, wall: float, load: tuple) -> str:
    m = read_manifest(ts)
    train_s = [r["train_seconds"] for runs in res.values() for rows in runs.values() for r in rows]
    lines = [f"## Hints: feature distillation from stored teacher tensors (`{a.name}`)", "",
             f"Command: `{command}`  ",
             f"Machine: 2-core x86_64 CPU shared with other jobs (one torch thread, nice {os.nice(0)}), Python "
             f"{platform.python_version()}; training time per run (epochs' wall seconds from its metrics.jsonl) "
             f"median {np.median(train_s):.0f} s, {sum(train_s) / 60:.0f} min over {len(train_s)} runs (runs that "
             "were already trained, from an earlier invocation with --runs or one stopped early, are resumed as "
             f"complete and only evaluated); this invocation {wall / 60:.1f} min; 1-minute load average "
             f"{load[0]:.1f} at its start, {load[1]:.1f} at its end.  ",
             f"Budget: the 3 shipped CNN teachers; {m.source.get('rows')} MNIST training rows ({a.fraction:.0%}, "
             f"seed 0) x (clean + {a.views} jittered views) = {m.rows:,} rows, hints of member 0 (cnn-0); students "
             f"`{CNN}` and `{MLP}`, {a.epochs} epochs each, batch 128, AdamW lr {a.lr:g} with cosine, T={a.temperature:g}, "
             f"alpha={a.alpha:g}; every run of a student takes the same steps; 10,000 test images.", "",
             "Runs: `kd` is logits-only KD; each other run adds one hint loss to it at its default weight "
             f"({', '.join(f'{k} {w:g}' for k, w in DEFAULT_WEIGHTS.items())}; `KIND w=W`: at weight W instead) "
             f"(`fitnet` as FitNets' two stages: `--hint-epochs {a.hint_epochs}` of the hint alone, then KD alone). "
             "Hints: hint_0 "
             f"`{MAP}` raw (fitnet, mmd), hint_1 `{POOLED}` attention (at), hint_2 `{FC}` sign (ab), hint_3 the same "
             "fc layer's 256 values (rkd; fitnet for the MLP).", ""]
    for key, runs in res.items():
        kd = float(np.mean([r["errors"] for r in runs["kd"]])) if "kd" in runs else float("nan")
        lines += [f"**Student `{CNN if key == 'cnn' else MLP}`** (test errors of 10,000):", "",
                  "| run | errors per seed | mean | vs kd | steps |", "|---|---|---|---|---|"]
        for run, rows in runs.items():
            mean = float(np.mean([r["errors"] for r in rows]))
            rel = "" if run == "kd" else f"{(mean - kd) / kd:+.1%}"
            lines.append(f"| {run} | {', '.join(str(r['errors']) for r in rows)} | {mean:.1f} | {rel} | "
                         f"{rows[0]['steps']} |")
        lines.append("")
    lines += bytes_table(ts)
    if a.grad_check:
        lines += init_gradients(a, ts, [int(x) for x in a.seeds.split(",")])
    goal = []
    for key, runs in res.items():
        if "kd" not in runs or len(runs) < 2:
            continue
        kd = float(np.mean([r["errors"] for r in runs["kd"]]))
        best = min((float(np.mean([r["errors"] for r in rows])), run) for run, rows in runs.items() if run != "kd")
        goal.append(f"{key}: best hint loss {best[1]} {best[0]:.1f} against kd {kd:.1f} "
                    f"({(kd - best[0]) / kd:.1%} fewer errors; the goal is 10%)")
    lines += ["Goal (best hint loss at least 10% fewer test errors than logits-only KD, mean of the seeds): "
              + "; ".join(goal) + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    a = parse_args(argv)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    out = Path(a.out)
    ts = label_set(a, out)
    say(f"labelled {ts}")
    res = train_all(a, ts, out, [int(s) for s in a.seeds.split(",")])
    (out / "results.json").write_text(json.dumps(res, indent=1))
    command = shlex.join(["python", "scripts/hints_task.py"] + (argv if argv is not None else sys.argv[1:]))
    write_section(Path(a.results), a.name, report(a, res, ts, command, time.perf_counter() - t0,
                                                  (load0, os.getloadavg()[0])))
    return res


if __name__ == "__main__":
    main()
