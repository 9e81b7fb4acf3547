"""A byte-level distillation task from real files on this machine, end to end through the CLI.

Each file under ``--root`` (default /usr) becomes one row of 2,048 int32 ids: its first 1,024 bytes and its last
1,024 bytes (id 256 pads a file shorter than 1,024 bytes), labelled by its extension. Extensions with at least
``--min-files`` files become classes (at most ``--max-files`` files each, drawn with a fixed seed); files are split
into train and test **by file** (rows with identical ids are kept once, so no test row repeats a train row).

Then:
1. a teacher ``seqcnn`` (bigger) is trained in torch on the train files' hard labels and exported to ONNX with an
   int32 input;
2. ``transferset label`` labels a transfer set: the train files (with their labels) plus unlabelled files from
   /usr that are not test files (the classes' leftover files and files of other extensions, label -1);
3. ``transferset train-student`` trains a small ``seqcnn`` student from it (soft targets, T and alpha below);
4. ``transferset evaluate`` measures the student's accuracy and its top-1 agreement with the teacher on the test
   files, which neither the teacher nor the student saw.

Prints a table and, with ``--json``, one JSON object. ``--smoke`` runs a tiny version in seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from transferset.training.students import count_parameters, create_student, export_onnx  # noqa: E402

HEAD = TAIL = 1024
PAD = 256
VOCAB = 257


def extension(name: str) -> str | None:
    base, dot, ext = name.rpartition(".")
    if not dot or not base or not ext.isalnum() or ext.isdigit() or len(ext) > 8:
        return None
    return ext.lower()


def list_files(root: str) -> list[tuple[str, str | None]]:
    """Regular files (no symlinks) under ``root`` with their extension, in a sorted, reproducible order."""
    out = []
    for d, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            try:
                if os.path.islink(p) or not os.path.isfile(p) or os.path.getsize(p) == 0:
                    continue
            except OSError:
                continue
            out.append((p, extension(f)))
    return out


def file_ids(path: str) -> np.ndarray | None:
    """First and last 1,024 bytes of a file as 2,048 int32 ids (256 pads a short file)."""
    row = np.full(HEAD + TAIL, PAD, np.int32)
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD)
            size = f.seek(0, 2)
            f.seek(max(0, size - TAIL))
            tail = f.read(TAIL)
    except OSError:
        return None
    row[:len(head)] = np.frombuffer(head, np.uint8)
    row[HEAD:HEAD + len(tail)] = np.frombuffer(tail, np.uint8)
    return row


def _unique_rows(paths: list[str], order, limit: int, seen: set[bytes], used: set[str] | None = None) -> list:
    """Up to ``limit`` readable files of ``paths`` in ``order`` as id rows, skipping any whose ids were ``seen``
    (updated); every readable file tried is added to ``used`` when given."""
    rows = []
    for i in order:
        if len(rows) >= limit:
            break
        x = file_ids(paths[i])
        if x is None:
            continue
        if used is not None:
            used.add(paths[i])
        key = hashlib.sha256(x.tobytes()).digest()
        if key in seen:
            continue
        seen.add(key)
        rows.append(x)
    return rows


def build(args) -> dict:
    """Pick classes and files, read their ids, split by file; returns arrays and counts."""
    rng = np.random.default_rng(args.seed)
    files = list_files(args.root)
    by_ext: dict[str, list[str]] = {}
    for p, e in files:
        if e is not None:
            by_ext.setdefault(e, []).append(p)
    classes = sorted(e for e, ps in by_ext.items() if len(ps) >= args.min_files)
    classes = sorted(classes, key=lambda e: -len(by_ext[e]))[:args.max_classes]
    classes.sort()
    seen: set[bytes] = set()
    train_x, train_y, test_x, test_y, used = [], [], [], [], set()
    for c, ext in enumerate(classes):
        paths = by_ext[ext]
        rows = _unique_rows(paths, rng.permutation(len(paths)), args.max_files, seen, used)
        n_test = int(round(len(rows) * args.test_fraction))
        test_x += rows[:n_test]
        test_y += [c] * n_test
        train_x += rows[n_test:]
        train_y += [c] * (len(rows) - n_test)
    # unlabelled transfer rows: files not picked above (other extensions, leftovers), never a test row's bytes
    extra = [p for p, _ in files if p not in used]
    extra_x = _unique_rows(extra, rng.permutation(len(extra)), args.extra_rows, seen)
    return {"classes": classes, "train_x": np.stack(train_x), "train_y": np.array(train_y, np.int64),
            "test_x": np.stack(test_x), "test_y": np.array(test_y, np.int64),
            "extra_x": np.stack(extra_x) if extra_x else np.zeros((0, HEAD + TAIL), np.int32),
            "files_seen": len(files)}


def train_teacher(spec: str, x: np.ndarray, y: np.ndarray, classes: int, epochs: int, seed: int,
                  lr: float = 3e-3, batch: int = 64) -> nn.Module:
    """Adam + one-cycle on hard labels, cross-entropy with a little label smoothing."""
    torch.manual_seed(seed)
    model = create_student(spec, (x.shape[1],), classes)
    steps = epochs * -(-len(x) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for k in range(0, len(x), batch):
            idx = perm[k:k + batch]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def cli(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "transferset", *argv], env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"transferset {' '.join(argv)} failed ({res.returncode}):\n{res.stderr}")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/usr")
    ap.add_argument("--out", default="byte-task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-files", type=int, default=60)
    ap.add_argument("--max-files", type=int, default=200)
    ap.add_argument("--max-classes", type=int, default=32)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--extra-rows", type=int, default=8000, help="unlabelled files added to the transfer set")
    ap.add_argument("--teacher", default=f"seqcnn:32,96,96,kernel=8,stride=8,vocab={VOCAB}")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--student", default=f"seqcnn:16,64,kernel=8,stride=8,vocab={VOCAB}")
    ap.add_argument("--student-epochs", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing in seconds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.min_files, args.max_files, args.max_classes, args.extra_rows = 40, 30, 5, 100
        args.teacher_epochs = args.student_epochs = 1
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t = time.perf_counter()
    d = build(args)
    times["read files"] = time.perf_counter() - t
    for k in ("train_x", "train_y", "test_x", "test_y"):
        np.save(out / f"{k}.npy", d[k])
    # the transfer set's source: train rows (labelled) then the unlabelled extra rows (label -1)
    np.save(out / "transfer_x.npy", np.concatenate([d["train_x"], d["extra_x"]]))
    np.save(out / "transfer_y.npy", np.concatenate([d["train_y"], np.full(len(d["extra_x"]), -1, np.int64)]))
    (out / "classes.json").write_text(json.dumps(d["classes"]) + "\n")

    t = time.perf_counter()
    teacher = train_teacher(args.teacher, d["train_x"], d["train_y"], len(d["classes"]), args.teacher_epochs, args.seed)
    times["teacher train"] = time.perf_counter() - t
    export_onnx(teacher, out / "teacher.onnx", (HEAD + TAIL,), "int32")

    set_dir, run_dir = out / "set", out / "run"
    t = time.perf_counter()
    cli("label", "--ensemble", str(out / "teacher.onnx"), "--data", str(out / "transfer_x.npy"),
        "--labels", str(out / "transfer_y.npy"), "--out", str(set_dir), "--temperatures", "1,2,4,8",
        "--threads", str(args.threads), "--overwrite", "--quiet")
    times["label"] = time.perf_counter() - t
    t = time.perf_counter()
    cli("train-student", "--transfer-set", str(set_dir), "--student", args.student, "--out", str(run_dir),
        "--epochs", str(args.student_epochs), "-T", f"{args.temperature:g}", "--alpha", f"{args.alpha:g}",
        "--lr", "3e-3", "--batch-size", "64", "--threads", str(args.threads), "--seed", str(args.seed),
        "--eval-data", str(out / "test_x.npy"), "--eval-labels", str(out / "test_y.npy"), "--quiet")
    times["student train"] = time.perf_counter() - t

    def evaluate(*model: str) -> dict:
        return json.loads(cli("evaluate", *model, "--data", str(out / "test_x.npy"), "--labels",
                              str(out / "test_y.npy"), "--reference", str(out / "teacher.onnx"), "--json"))

    t = time.perf_counter()
    ev_teacher = evaluate("--ensemble", str(out / "teacher.onnx"))
    ev_student = evaluate("--model", str(run_dir / "student.pt"))
    times["evaluate"] = time.perf_counter() - t
    manifest = json.loads((set_dir / "manifest.json").read_text())
    student_params = count_parameters(create_student(args.student, (HEAD + TAIL,), len(d["classes"])))
    res = {
        "classes": len(d["classes"]), "files_seen": d["files_seen"], "train_files": len(d["train_x"]),
        "test_files": len(d["test_x"]), "transfer_rows": manifest["stats"]["rows"],
        "unlabelled_transfer_rows": len(d["extra_x"]),
        "teacher": args.teacher, "teacher_params": count_parameters(teacher),
        "teacher_test_accuracy": ev_teacher["accuracy"],
        "student": args.student, "student_params": student_params,
        "student_test_accuracy": ev_student["accuracy"], "student_teacher_agreement": ev_student["agreement"],
        "student_nll": ev_student["nll"], "student_ece": ev_student["ece"],
        "temperature": args.temperature, "alpha": args.alpha,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "load_average": os.getloadavg()[0],
    }
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps(res, sort_keys=True))
        return
    print(f"classes {res['classes']} ({', '.join(d['classes'])})")
    print(f"files: {res['train_files']} train, {res['test_files']} test (split by file); transfer set "
          f"{res['transfer_rows']} rows ({res['unlabelled_transfer_rows']} unlabelled)")
    print(f"teacher {args.teacher} ({res['teacher_params']:,} params): test accuracy {res['teacher_test_accuracy']:.4f}")
    print(f"student {args.student} ({student_params:,} params): test accuracy {res['student_test_accuracy']:.4f}, "
          f"agreement with the teacher on unseen files {res['student_teacher_agreement']:.4f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f"; load average {res['load_average']:.1f}")


if __name__ == "__main__":
    main()
