"""``transferset demo``: the paper's MNIST story end to end, on the MNIST shipped in data/.

Train a small teacher ensemble in PyTorch (dropout, inputs jittered by up to 2 pixels), export each member to
ONNX, ``label`` the training set with jittered views, ``train-student`` a small MLP from the transfer set, the
same MLP on the hard labels of the training images (the baseline) and on the hard labels of the transfer set's
jittered rows (a control), all for the same number of steps, and ``evaluate`` everything on the 10,000 test
images. Every step's output is kept in the demo folder and reused by a later run.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._io import atomic_write, atomic_write_json, sha256_file
from .errors import TransferSetError
from .inputs.augment import parse_augment, render_views
from .progress import progress_bar
from .training.students import count_parameters

__all__ = ["DemoConfig", "run_demo", "CnnTeacher", "MlpTeacher", "train_teacher", "export_teacher", "mnist_paths",
           "shipped_teachers", "format_table"]

DATA = Path(__file__).resolve().parent.parent / "data" / "mnist"


def mnist_paths(root: str | os.PathLike | None = None) -> dict[str, str]:
    """The four MNIST files shipped in data/mnist (or under ``root``)."""
    base = Path(root) if root else DATA
    paths = {"train_x": base / "train-images.idx3-ubyte.gz", "train_y": base / "train-labels.idx1-ubyte.gz",
             "test_x": base / "t10k-images.idx3-ubyte.gz", "test_y": base / "t10k-labels.idx1-ubyte.gz"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise TransferSetError(f"MNIST files not found: {', '.join(missing)}; the demo needs the repository's data/mnist")
    return {k: str(v) for k, v in paths.items()}


class CnnTeacher(nn.Module):
    """conv5x5(32) -> pool -> conv5x5(64) -> pool -> fc(256) -> dropout -> fc(10); takes uint8 [N, 28, 28]."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.float().div(255.0).unsqueeze(1)))


class MlpTeacher(nn.Module):
    """The paper's big net: 784-1200-1200-10, dropout 0.5 on hidden units and 0.2 on inputs; uint8 input."""

    def __init__(self, hidden: int = 1200, dropout: float = 0.5, input_dropout: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(input_dropout), nn.Linear(784, hidden), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float().div(255.0))


def train_teacher(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int, jitter: int = 2,
                  batch_size: int = 128, lr: float = 2e-3, device: str = "cpu", progress=None) -> nn.Module:
    """Adam with a one-cycle schedule; each epoch sees every row once, jittered by up to ``jitter`` pixels."""
    torch.manual_seed(seed)
    model.to(device).train()
    steps = epochs * (-(-len(x) // batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    spec = parse_augment(f"jitter:{jitter}") if jitter else None
    rng = np.random.default_rng(seed)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        for s in range(0, len(x), batch_size):
            idx = np.sort(order[s:s + batch_size])
            xb = x[idx]
            if spec is not None:  # a fresh jitter per epoch: view number epoch + 1 of each row
                xb = render_views(xb, idx, np.full(len(idx), epoch + 1), spec, base_seed=seed)
            logits = model(torch.from_numpy(np.ascontiguousarray(xb)).to(device))
            loss = nn.functional.cross_entropy(logits, yt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress(1)
    return model.eval()


def export_teacher(model: nn.Module, path: str | os.PathLike) -> None:
    """Export a uint8-input teacher to ONNX (dynamic batch), written atomically."""
    model = model.cpu().eval()

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(2, 28, 28, dtype=torch.uint8),), str(tmp), dynamo=False,
                              opset_version=17, input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})

    atomic_write(path, write)


TEACHERS = Path(__file__).resolve().parent.parent / "data" / "teachers"


def shipped_teachers(kind: str = "cnn", root: str | os.PathLike | None = None) -> list[dict]:
    """The teachers shipped in data/teachers (``teachers.json`` entries of ``kind``), each file's sha256 checked.

    Each entry gains ``path``. A missing or altered file is refused: the demo's numbers are only meaningful with
    the teachers whose training the index records (command, seed, log).
    """
    base = Path(root) if root else TEACHERS
    index = base / "teachers.json"
    try:
        entries = json.loads(index.read_text())["teachers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TransferSetError(f"{index}: cannot read the shipped teachers' index ({e}); restore data/teachers "
                               "from the repository, or let the demo train its own teachers") from None
    chosen = [dict(v, path=base / v["file"]) for k, v in sorted(entries.items()) if v.get("kind") == kind]
    if not chosen:
        raise TransferSetError(f"{index}: lists no {kind} teachers")
    for t in chosen:
        if not t["path"].is_file() or sha256_file(t["path"]) != t["sha256"]:
            raise TransferSetError(f"{t['path']}: missing or not the file {index.name} records (sha256 "
                                   f"{t['sha256'][:12]}...); restore it from the repository, or let the demo "
                                   "train its own teachers")
    return chosen


@dataclass
class DemoConfig:
    """The demo's budget. ``quick`` trims it to under a minute on a 2-core CPU."""

    out: Path = Path("transferset-demo")
    quick: bool = False
    train_teachers: bool = False
    members: int = 3
    teacher_epochs: int = 2
    train_rows: int | None = None
    views: int = 3
    student: str = "mlp:800,800"
    student_epochs: int = 5
    student_lr: float = 3e-3
    temperature: float = 4.0
    alpha: float = 0.9
    test_rows: int | None = None
    device: str = "auto"
    quiet: bool = False

    @classmethod
    def for_mode(cls, quick: bool, out: str | os.PathLike | None = None, **kw) -> "DemoConfig":
        base = dict(out=Path(out or "transferset-demo"), quick=quick)
        if quick:
            base.update(teacher_epochs=2, train_rows=10000, views=2, student="mlp:256,256", student_epochs=10,
                        test_rows=2000)
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)


def _say(cfg: DemoConfig, text: str) -> None:
    if not cfg.quiet:
        print(text, flush=True)


class _Demo:
    """The demo's steps, one method each; every step's output is kept in ``cfg.out`` and reused."""

    def __init__(self, cfg: DemoConfig) -> None:
        from .devices import torch_device
        from .inputs.sources import open_source, read_labels

        self.cfg = cfg
        self.paths = mnist_paths()
        self.device = str(torch_device(cfg.device))  # refuse a bad device before creating anything
        self.out = Path(cfg.out)
        try:
            (self.out / "teachers").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TransferSetError(f"{self.out}: cannot create the demo folder ({e.strerror or e}); choose a "
                                   "writable folder", option="out") from None
        # the CPUs this process may use (a taskset or a container's share), not every core of the machine:
        # OpenMP threads beyond them spin against each other and crawl
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                  else os.cpu_count() or 1))
        self.times: dict[str, float] = {}
        self.src = open_source(self.paths["train_x"], limit=cfg.train_rows)
        self.y = read_labels(self.paths["train_y"], rows=self.src.rows)

    def teachers(self) -> list[tuple[Path, str, int]]:
        """(file, name, parameters) of each member: the shipped ones, or trained here when asked."""
        if not self.cfg.train_teachers:
            shipped = shipped_teachers("cnn")[: self.cfg.members]
            _say(self.cfg, f"[1/5] teachers: {len(shipped)} shipped CNNs from {TEACHERS} (sha256 checked; "
                           f"trained by scripts/train_teachers.py, test errors {[t['test_errors'] for t in shipped]})")
            return [(t["path"], f"teacher {i} (CNN, shipped)", int(t["parameters"])) for i, t in enumerate(shipped)]
        x = self.src.read(0, self.src.rows)
        files = []
        for i in range(self.cfg.members):
            f = self.out / "teachers" / f"teacher-{i}.onnx"
            files.append((f, f"teacher {i} (CNN)", count_parameters(CnnTeacher())))
            if f.exists():
                _say(self.cfg, f"[1/5] teacher {i}: reusing {f}")
                continue
            t = time.perf_counter()
            bar = progress_bar(self.cfg.teacher_epochs * -(-len(x) // 128), desc=f"teacher {i}", unit="step",
                               quiet=self.cfg.quiet)
            model = train_teacher(CnnTeacher(), x, self.y, epochs=self.cfg.teacher_epochs, seed=1000 + i,
                                  device=self.device, progress=bar.update if bar else None)
            if bar:
                bar.close()
            export_teacher(model, f)
            self.times[f"teacher_{i}"] = time.perf_counter() - t
            _say(self.cfg, f"[1/5] teacher {i}: trained in {self.times[f'teacher_{i}']:.0f} s -> {f}")
        return files

    def label_sets(self, files: list[Path]):
        """The transfer set (clean row + jittered views) and the clean training set for the baseline."""
        from .labelling.pipeline import LabelOptions, label

        cfg, t = self.cfg, time.perf_counter()
        common = dict(labels=self.paths["train_y"], limit=cfg.train_rows, seed=0, quiet=cfg.quiet, shard_size=65536)
        res = label(files, self.paths["train_x"], self.out / "transfer-set",
                    LabelOptions(augment="jitter:2", views=cfg.views, **common))
        _say(cfg, f"[2/5] {res.summary_line()}")
        # The paper's baseline learns from the hard labels of the training images as they are: a clean-only set
        # (same teachers, no views), trained for as many steps as the distilled student.
        label(files, self.paths["train_x"], self.out / "training-set", LabelOptions(**common))
        self.times["label"] = time.perf_counter() - t
        return res

    def students(self, views_per_row: int) -> dict:
        """Three runs of the same net for the same number of steps: distilled, baseline and control."""
        from .training.loop import TrainOptions, train_student

        cfg, runs = self.cfg, {}
        # the control learns the hard labels of the transfer set's jittered rows: what the views alone buy
        plan = (("student", "transfer-set", cfg.alpha, cfg.student_epochs),
                ("baseline", "training-set", 0.0, cfg.student_epochs * views_per_row),
                ("control", "transfer-set", 0.0, cfg.student_epochs))
        test = self.test_set()  # evaluated after every epoch: the curves `transferset report` draws
        for k, (name, source, alpha, epochs) in enumerate(plan, start=1):
            t = time.perf_counter()
            runs[name] = train_student(self.out / source, self.out / name, TrainOptions(
                student=cfg.student, alpha=alpha, temperature=cfg.temperature, epochs=epochs, lr=cfg.student_lr,
                device=cfg.device, quiet=cfg.quiet, resume=True, seed=0, eval_data=str(test)))
            self.times[name] = time.perf_counter() - t
            _say(cfg, f"[3/5] student {k} of 3, {name}: {runs[name].summary_line()}")
        return runs

    def test_set(self) -> Path:
        """The test rows the table scores, as one .npz (x, y) in the demo folder, for the students' eval curves."""
        from .inputs.sources import open_source, read_labels

        path = self.out / "test-set.npz"
        if not path.is_file():
            test = open_source(self.paths["test_x"], limit=self.cfg.test_rows)
            y = read_labels(self.paths["test_y"], rows=test.rows)
            x = test.read(0, test.rows)

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a temporary name
                    np.savez_compressed(f, x=x, y=np.asarray(y))

            atomic_write(path, write)
        return path

    def evaluate(self, teachers: list[tuple[Path, str, int]], runs: dict) -> tuple[list[tuple], int]:
        """(model, parameters, metrics, seconds) rows on the test set: each teacher, the ensemble, each student."""
        from .evaluate import metrics, model_cost, predict_log_probs
        from .inputs.sources import open_source, read_labels
        from .targets import combine_log_probs

        cfg, t = self.cfg, time.perf_counter()
        test = open_source(self.paths["test_x"], limit=cfg.test_rows)
        y_test = read_labels(self.paths["test_y"], rows=test.rows)
        teacher_lp = [predict_log_probs([f], test, device=cfg.device) for f, _, _ in teachers]
        ens_lp = combine_log_probs(np.stack(teacher_lp, axis=1), 1.0, "mean-probs")
        rows = [(name, params, metrics(lp, y_test), self.times.get(f"teacher_{i}"))
                for i, ((_, name, params), lp) in enumerate(zip(teachers, teacher_lp))]
        rows.append((f"ensemble of {len(teachers)}", sum(p for _, _, p in teachers), metrics(ens_lp, y_test),
                     sum(v for k, v in self.times.items() if k.startswith("teacher_")) or None))
        names = {"baseline": f"{cfg.student} hard labels (baseline)",
                 "control": f"{cfg.student} hard labels, jittered rows",
                 "student": f"{cfg.student} distilled T={cfg.temperature:g}"}
        for name, label_ in names.items():
            lp = predict_log_probs([self.out / name / "student.pt"], test, device=cfg.device)
            rows.append((label_, runs[name].parameters, metrics(lp, y_test), self.times.get(name)))
        # what each model costs beside what it scores: ONNX bytes and rows/s at batch 1 and 256 on this CPU
        files = [[f] for f, _, _ in teachers] + [[f for f, _, _ in teachers]] + \
                [[self.out / name / "student.pt"] for name in names]
        rows = [(*r[:2], {**r[2], **{k: v for k, v in model_cost(f, test).items() if k != "parameters"}}, r[3])
                for r, f in zip(rows, files)]
        self.times["evaluate"] = time.perf_counter() - t
        _say(cfg, f"[4/5] evaluated {len(rows)} models on {test.rows:,} test images in {self.times['evaluate']:.1f} s")
        return rows, int(test.rows)


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or reuse) every step into ``cfg.out``; print the table and return the results written to results.json."""
    demo = _Demo(cfg)
    teachers = demo.teachers()
    res = demo.label_sets([f for f, _, _ in teachers])
    runs = demo.students(res.manifest["augment"].get("views_per_row", 1))
    rows, n_test = demo.evaluate(teachers, runs)
    m = len(teachers)
    results = {
        "n_test": n_test,
        "teacher_errors": [r[2]["errors"] for r in rows[:m]],
        "ensemble_errors": rows[m][2]["errors"],
        "baseline_errors": rows[-3][2]["errors"],
        "control_errors": rows[-2][2]["errors"],
        "student_errors": rows[-1][2]["errors"],
        "rows": [{"model": r[0], "parameters": r[1], **r[2], "seconds": r[3]} for r in rows],
        "transfer_set_rows": res.manifest["stats"]["rows"],
        "teachers": "trained" if cfg.train_teachers else "shipped",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()},
        "device": demo.device,
        "seconds": demo.times,
    }
    atomic_write_json(demo.out / "results.json", results)
    _say(cfg, f"[5/5] results in {demo.out / 'results.json'}; draw them with `transferset report {demo.out} "
              f"--out {demo.out / 'report'}`")
    print(format_table(results))
    _say(cfg, f"T={cfg.temperature:g} and alpha {cfg.alpha:g} are a starting point, not an answer for every "
              f"student: `transferset sweep --transfer-set {demo.out / 'transfer-set'} --student SPEC --holdout 0.1 "
              "--out DIR` shows whether distillation pays for yours (docs/RESULTS.md, \"Defaults revisited\")")
    return results


def format_table(results: dict) -> str:
    """The demo's table: test errors, NLL, ECE, parameters, ONNX size, speed and training time of every model."""
    from .wording import size

    rows = results["rows"]
    speed = all("rows_per_s_1" in r for r in rows)
    w = max(34, *(len(r["model"]) for r in rows))
    head = f"{'model':<{w}} {'params':>10} {'test errors':>15} {'NLL':>7} {'ECE':>7}"
    if speed:
        head += f" {'ONNX':>8} {'rows/s b1':>9} {'b256':>7}"
    lines = [head + f" {'time':>8}", "-" * (len(head) + 9)]
    for r in rows:
        secs = f"{r['seconds']:.0f} s" if r["seconds"] is not None else (
            "shipped" if results.get("teachers") == "shipped" and "student" not in r["model"] and "hard" not in r["model"]
            else "reused")
        line = (f"{r['model']:<{w}} {r['parameters']:>10,} {r['errors']:>6} / {r['n']:<6,} {r['nll']:>7.4f} "
                f"{r['ece']:>7.4f}")
        if speed:
            line += f" {size(r['onnx_bytes']):>8} {r['rows_per_s_1']:>9,.0f} {r['rows_per_s_256']:>7,.0f}"
        lines.append(line + f" {secs:>8}")
    gap = results["baseline_errors"] - results["ensemble_errors"]
    closed = (results["baseline_errors"] - results["student_errors"]) / gap if gap > 0 else float("nan")
    lines.append(f"distilled student: {results['student_errors']} errors vs baseline {results['baseline_errors']} "
                 f"(closes {closed:.0%} of the baseline-to-ensemble gap); the same net on hard labels of the "
                 f"same jittered rows: {results['control_errors']}")
    if speed:
        lines.append("rows/s: ONNX Runtime on one CPU thread of this machine at batch 1 and 256 (students exported "
                     "to ONNX); they change with the machine and its load, the errors only with its float rounding.")
    return "\n".join(lines)
