"""A real many-class task from the shipped MNIST: three digits side by side, 1,000 classes (000 to 999).

Stages (each cached in ``--workdir``, so a later stage reruns without the earlier ones):

1. ``data``: 60,000 train rows from MNIST train digits and 10,000 test rows from MNIST test digits, uint8 [28, 84],
   the three digits of a row drawn with fixed seeds; the class is ``100 a + 10 b + c``.
2. ``teachers``: ``--members`` small CNNs (conv5x5(16)-pool-conv5x5(32)-pool-fc(128), one trunk shared by the three
   positions, one 10-way head per position; the 1,000 logits are ``h1[a] + h2[b] + h3[c]``), trained with the
   1,000-way cross-entropy for ``--teacher-epochs`` epochs each, exported to ONNX (uint8 [N, 28, 84] -> [N, 1000]).
3. ``label``: ``transferset label`` of the train rows, dense, 5 temperatures.
4. ``recode``: ``transferset recode`` into topk:K and sample:K sets; the mean KL(dense || decoded) per temperature.
5. ``students``: one small student per set (and one on hard labels), equal steps, test accuracy and samples/s.

Prints a Markdown table (``--json``: one JSON object at the end) and writes ``results.json`` in the workdir.

    python scripts/many_class.py --workdir /tmp/many_class [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MNIST = ROOT / "data" / "mnist"


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def compose(images: np.ndarray, labels: np.ndarray, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` images of three random digits side by side ([rows, 28, 84] uint8) and their classes 0..999."""
    pick = np.random.default_rng(seed).integers(0, len(images), size=(rows, 3))
    x = np.concatenate([images[pick[:, i]] for i in range(3)], axis=2)
    y = (labels[pick[:, 0]].astype(np.int64) * 100 + labels[pick[:, 1]] * 10 + labels[pick[:, 2]])
    return np.ascontiguousarray(x), y


def stage_data(work: Path, train_rows: int, test_rows: int, compose_rows=None) -> dict:
    """Train rows from MNIST's train digits and test rows from its test digits (seeds 0 and 1), composed by
    ``compose_rows`` (default :func:`compose`: three digits side by side), as .npy files in ``work`` (made once)."""
    compose_rows = compose_rows or compose
    paths = {k: work / f"{k}.npy" for k in ("train_x", "train_y", "test_x", "test_y")}
    if all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    tx, ty = _idx(MNIST / "train-images.idx3-ubyte.gz"), _idx(MNIST / "train-labels.idx1-ubyte.gz")
    vx, vy = _idx(MNIST / "t10k-images.idx3-ubyte.gz"), _idx(MNIST / "t10k-labels.idx1-ubyte.gz")
    for name, (x, y) in {"train": compose_rows(tx, ty, train_rows, 0),
                         "test": compose_rows(vx, vy, test_rows, 1)}.items():
        np.save(paths[f"{name}_x"], x)
        np.save(paths[f"{name}_y"], y)
    return {k: str(v) for k, v in paths.items()}


def _teacher_class():
    import torch
    from torch import nn

    class ThreeDigitCnn(nn.Module):
        """uint8 [N, 28, 84] -> 1,000 logits ``h1[a] + h2[b] + h3[c]`` from one trunk over the three 28x28 crops."""

        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(
                nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.2))
            self.heads = nn.Linear(128, 30)

        def forward(self, x):
            n = x.shape[0]
            crops = (x.float() / 255.0).reshape(n, 28, 3, 28).permute(0, 2, 1, 3).reshape(n * 3, 1, 28, 28)
            h = self.heads(self.trunk(crops)).reshape(n, 3, 3, 10)
            a, b, c = h[:, 0, 0], h[:, 1, 1], h[:, 2, 2]  # position i uses head i
            return (a[:, :, None, None] + b[:, None, :, None] + c[:, None, None, :]).reshape(n, 1000)

    return ThreeDigitCnn


def train_teacher(data: dict, seed: int, epochs: int, out: Path, model_class=None) -> dict:
    """Train one member (``model_class``, default this task's ``ThreeDigitCnn``) on the train rows with the
    cross-entropy, Adam + one-cycle, batch 128; export it to ONNX at ``out`` (uint8 rows of the data's shape)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = (model_class or _teacher_class())()
    x = torch.from_numpy(np.load(data["train_x"]))
    y = torch.from_numpy(np.load(data["train_y"]))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * math.ceil(len(x) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    acc = teacher_accuracy(model, data)
    _export(model, out, tuple(x.shape[1:]))
    return {"file": str(out), "seed": seed, "epochs": epochs, "seconds": time.perf_counter() - t0, "test_accuracy": acc}


def teacher_accuracy(model, data: dict) -> float:
    import torch

    model.eval()
    x, y = torch.from_numpy(np.load(data["test_x"])), torch.from_numpy(np.load(data["test_y"]))
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean())


def _export(model, path: Path, row_shape: tuple[int, ...] = (28, 84)) -> None:
    import warnings

    import torch

    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, *row_shape, dtype=torch.uint8),), str(path), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


def stage_teachers(work: Path, data: dict, members: int, epochs: list[int], model_class=None) -> list[dict]:
    """Train each member not yet in the workdir (``t{i}.onnx`` with its record ``t{i}.json``)."""
    out = []
    for seed in range(members):
        record = work / f"t{seed}.json"
        if not record.exists():
            rec = train_teacher(data, seed, epochs[min(seed, len(epochs) - 1)], work / f"t{seed}.onnx", model_class)
            record.write_text(json.dumps(rec, indent=2))
        out.append(json.loads(record.read_text()))
    return out


def stage_label(work: Path, data: dict, members: int, threads: int) -> tuple[Path, float]:
    from transferset.labelling.pipeline import LabelOptions, label

    out = work / "dense"
    t0 = time.perf_counter()
    label([work / f"t{i}.onnx" for i in range(members)], data["train_x"], out,
          LabelOptions(labels=data["train_y"], codec="dense", temperatures=(1, 2, 4, 8, 20), batch_size=512,
                       threads=threads, device="cpu", quiet=True))
    return out, time.perf_counter() - t0


def _bytes(folder: Path) -> dict:
    from transferset.format import read_manifest
    from transferset.format.schema import row_bytes, shard_layout

    m = read_manifest(folder)
    layout = shard_layout(m)
    return {"targets": row_bytes(layout, [n for n in layout if n != "inputs"]), "row": row_bytes(layout),
            "on_disk": sum(s.bytes or 0 for s in m.shards) / max(m.rows, 1)}


def stage_recode(work: Path, dense: Path, codecs: list[str]) -> dict:
    from transferset.format.recode import recode

    out = {"dense": {"bytes": _bytes(dense), "kl": [0.0] * 5, "kl_direction": "-"}}
    for codec in codecs:
        folder = work / codec.replace(":", "")
        record = folder.with_suffix(".json")
        if not record.exists():
            t0 = time.perf_counter()
            res = recode(dense, folder, codec)
            res["seconds"] = time.perf_counter() - t0
            record.write_text(json.dumps(res))
        res = json.loads(record.read_text())
        out[codec] = {"bytes": _bytes(folder), "kl": res["kl"], "kl_direction": res["kl_direction"],
                      "seconds": res.get("seconds")}
    return out


def train_one(work: Path, data: dict, name: str, a) -> dict:
    from transferset.training.loop import TrainOptions, train_student

    folder = work / ("dense" if name == "hard" else name.replace(":", ""))
    seed_tag = f"-seed{a.seed}" if a.seed else ""
    run = work / f"run-{name.replace(':', '')}{getattr(a, 'tag', '')}{seed_tag}"
    record = run / "result.json"
    if record.exists():
        return json.loads(record.read_text())
    opts = TrainOptions(student=a.student, alpha=0.0 if name == "hard" else 0.9, temperature=a.temperature,
                        epochs=a.epochs, batch_size=256, lr=2e-3, device="cpu", threads=a.threads, quiet=True,
                        eval_data=data["test_x"], eval_labels=data["test_y"], seed=a.seed)
    res = train_student(folder, run, opts)
    last = res.metrics[-1]
    out = {"accuracy": last["eval_accuracy"], "nll": last.get("eval_nll"), "ece": last.get("eval_ece"),
           "samples_per_s": sum(m["samples_per_s"] for m in res.metrics) / len(res.metrics),
           "cpu_samples_per_s": sum(m["steps"] for m in res.metrics[-1:]) * 256 / sum(m["cpu_seconds"] for m in res.metrics),
           "steps": last["steps"]}
    record.write_text(json.dumps(out))
    return out


def table(rec: dict, students: dict, temps=(1, 2, 4, 8, 20)) -> str:
    dense_b = rec["dense"]["bytes"]["targets"]
    head = ("| set | target bytes a row | x smaller | row bytes incl. inputs | "
            + " | ".join(f"KL T={t:g}" for t in temps) + " | student acc. | samples/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in ["hard"] + list(rec):
        r = rec.get(name if name != "hard" else "dense")
        st = students.get(name)
        if st is None:
            continue
        b = r["bytes"]
        kl = " | ".join(("-" if name == "hard" else f"{v:.4f}") for v in r["kl"])
        label = "dense, hard labels only (alpha 0)" if name == "hard" else name
        lines.append(f"| {label} | {b['targets'] if name != 'hard' else '-'} | "
                     f"{dense_b / b['targets']:.1f} | {b['row']} | {kl} | {100 * st['accuracy']:.2f} | "
                     f"{st['samples_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("many_class_work"))
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--teacher-epochs", default="2,1,1", help="epochs of each member (the last repeats)")
    ap.add_argument("--codecs", default="topk:5,topk:10,topk:20,topk:50,sample:10,sample:50,systematic:10,systematic:50")
    ap.add_argument("--student", default="mlp:512")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the students' seed (run folders get -seedN when not 0)")
    ap.add_argument("--students", default=None, help="train only these sets' students (comma list, e.g. dense,"
                    "sample:50; default: hard, dense and every codec)")
    ap.add_argument("--tag", default="", help="suffix of the student run folders (e.g. -T2 for --temperature 2)")
    ap.add_argument("--train-rows", type=int, default=60000)
    ap.add_argument("--test-rows", type=int, default=10000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    a.workdir.mkdir(parents=True, exist_ok=True)
    data = stage_data(a.workdir, a.train_rows, a.test_rows)
    teachers = stage_teachers(a.workdir, data, a.members, [int(v) for v in a.teacher_epochs.split(",")])
    dense = a.workdir / "dense"
    label_s = None
    if not (dense / "manifest.json").exists():
        dense, label_s = stage_label(a.workdir, data, a.members, a.threads)
    codecs = [c for c in a.codecs.split(",") if c]
    rec = stage_recode(a.workdir, dense, codecs)
    which = a.students.split(",") if a.students else ["hard", "dense"] + codecs
    students = {name: train_one(a.workdir, data, name, a) for name in which}
    from transferset.evaluate import evaluate

    ens = evaluate([str(a.workdir / f"t{i}.onnx") for i in range(a.members)], data["test_x"], data["test_y"],
                   device="cpu")
    res = {"teachers": teachers, "ensemble_accuracy": ens["accuracy"], "label_seconds": label_s, "recode": rec,
           "students": students, "student": a.student, "epochs": a.epochs, "temperature": a.temperature}
    (a.workdir / "results.json").write_text(json.dumps(res, indent=1))
    print(f"teachers {[round(t['test_accuracy'], 4) for t in teachers]}, ensemble {ens['accuracy']:.4f}")
    print(table(rec, students))
    if a.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
