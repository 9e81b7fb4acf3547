"""Crash test: SIGKILL `label` and `train-student --resume` at random moments; the results must not change.

For each trial, ``transferset label`` runs as a subprocess over a small synthetic source with two tiny ONNX
teachers and a small shard size (many shards). It is killed with SIGKILL at a random moment, resumed with the
same command, killed again, ... (1 to ``--max-kills`` kills), then left to finish. While it runs, a watcher
re-reads manifest.json every few milliseconds and checks that every listed shard exists with the listed
sha256 (a manifest must never list a shard that is not complete). The final folder is compared with an
uninterrupted reference run: the manifest, every shard file's bytes, and every dataset and attribute.

Then the same for ``train-student --resume --checkpoint-every K`` on CPU: killed and resumed until done, the
final student weights must equal an uninterrupted run's exactly (``torch.equal`` on every tensor).

    python scripts/crash_test.py --trials 50 [--seed 0] [--json] [--quick] [--workdir DIR] [--parts N | --claim W | --ray] [--lm | --photos]

With ``--lm`` the same for language-model teachers: two tiny causal LMs label token ids into a per-position set,
and an ``lm:`` student trains from it with the per-token loss.

With ``--parts N`` the set is labelled in N parts (``--part I/N``): each kill lands on a part drawn at random,
the parts not yet finished then run to the end in a random order, and the merged folder must hold the single
run's bytes (the reference is one process). With ``--claim W`` it is labelled by claiming workers (``label
--claim``): 1..W start together, more start late, SIGKILLs land on live workers at random, and fresh workers
finish after the dead ones' leases expire; the folder must again hold the single run's bytes. With ``--ray`` (the
ray extra) it is labelled by ``label --engine ray`` drivers on one local Ray instance: SIGKILLs land on Ray workers
caught mid-shard (Ray runs the task again, or, when the trial's ``--ray-retries`` are spent, the run stops in one line
and the same command finishes it) and on drivers (the same command finishes it); the reference is one process.

Prints one line per trial and a summary; with ``--json`` the last line is one JSON object. Exit 0 when every
trial passed, 1 otherwise. The package is never changed by this script; it imports transferset only to read.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from transferset.format import verify_transfer_set  # noqa: E402
from transferset.labelling.photo_label import PHOTO_LISTING  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
ENV.setdefault("OMP_NUM_THREADS", "1")  # children share the CPU with this script's watcher; no oversubscription
EARLY_KILL_FRACTION = 0.15  # kills drawn over the whole run, start-up (imports, model loading) included


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _export_teacher(path: Path, d_in: int, classes: int, seed: int) -> None:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, classes)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 8, 8),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17, dynamo=False)


def make_inputs(work: Path, rows: int) -> dict:
    """A uint8 8x8 source with labels and two tiny ONNX teachers."""
    rng = np.random.default_rng(0)
    np.save(work / "x.npy", rng.integers(0, 256, size=(rows, 8, 8), dtype=np.uint8))
    np.save(work / "y.npy", rng.integers(0, 5, size=rows).astype(np.int64))
    for i in range(2):
        _export_teacher(work / f"t{i}.onnx", 64, 5, seed=i + 1)
    return {"x": work / "x.npy", "y": work / "y.npy", "teachers": [work / "t0.onnx", work / "t1.onnx"]}


def make_lm_inputs(work: Path, rows: int) -> dict:
    """Token ids [rows, 12] over 60 ids and two tiny causal-LM teachers (logits [B, L, 60]): the LM leg."""
    import torch

    from transferset.training.lm import CausalLM

    np.save(work / "ids.npy", np.random.default_rng(0).integers(0, 60, size=(rows, 12)))
    for i in range(2):
        torch.manual_seed(i + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(CausalLM(60, 1, 16, 2, 32).eval(), (torch.zeros(2, 12, dtype=torch.int64),),
                              str(work / f"lm{i}.onnx"), input_names=["input_ids"], output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "b", 1: "l"}, "logits": {0: "b", 1: "l"}},
                              opset_version=17, dynamo=False)
    return {"x": work / "ids.npy", "teachers": [work / "lm0.onnx", work / "lm1.onnx"], "lm": True}


def make_photo_inputs(work: Path, rows: int) -> dict:
    """A photo folder (scripts/make_photo_folder.py: every kind of file, and 5 corrupt ones that land in several
    shards) and a tiny CNN teacher of 24x24 RGB views: the photo leg."""
    import importlib.util

    import torch
    from torch import nn

    spec = importlib.util.spec_from_file_location("mpf", Path(__file__).resolve().parent / "make_photo_folder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with contextlib.redirect_stdout(io.StringIO()):
        mod.main([str(work / "photos"), "--count", str(rows), "--classes", "3", "--workers", "1"])
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 24, 24),), str(work / "cnn.onnx"), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17,
                          dynamo=False)
    return {"x": work / "photos", "teachers": [work / "cnn.onnx"], "photos": True}


def label_cmd(inp: dict, out: Path, shard_size: int, codec: str | None = None, threads: int = 1) -> list[str]:
    """The label command of a trial; ``threads`` > 1 runs it in CPU lanes (``ensemble.cpu_lanes``)."""
    if inp.get("photos"):  # a photo folder: random crops and flips, pixels stored so training needs no source
        return [sys.executable, "-m", "transferset", "label", "--ensemble", *map(str, inp["teachers"]),
                "--data", str(inp["x"]), "--out", str(out), "--augment", "rrc:24,flip", "--views", "1",
                "--norm", "imagenet", "--store-inputs", "--shard-size", str(shard_size), "--batch-size", "8",
                "--decode-workers", "1", "--threads", str(threads), "--device", "cpu", "-q"] + (["--codec", codec] if codec else [])
    if inp.get("lm"):  # a per-position set from token ids
        return [sys.executable, "-m", "transferset", "label", "--ensemble", *map(str, inp["teachers"]),
                "--data", str(inp["x"]), "--out", str(out), "--temperatures", "1,2", "--shard-size", str(shard_size),
                "--batch-size", "8", "--threads", str(threads), "--device", "cpu", "-q", "--codec", codec or "topk:8"]
    return [sys.executable, "-m", "transferset", "label", "--ensemble", *map(str, inp["teachers"]),
            "--data", str(inp["x"]), "--labels", str(inp["y"]), "--out", str(out), "--scale", "0.00392156862745098",
            "--augment", "jitter:1,noise:4", "--views", "1", "--seed", "3", "--shard-size", str(shard_size),
            "--batch-size", "8", "--threads", str(threads), "--device", "cpu", "-q"] + (["--codec", codec] if codec else [])


def train_cmd(ts: Path, out: Path, in_memory: str, epochs: int, codec: str | None = None, lm: bool = False) -> list[str]:
    if lm:  # an lm: student from the per-position set, per-token kd at a stored temperature
        return [sys.executable, "-m", "transferset", "train-student", "--transfer-set", str(ts), "--out", str(out),
                "--student", "lm:1,16,2,dropout=0.1", "--epochs", str(epochs), "--batch-size", "8", "--lr", "0.003",
                "-T", "2", "--alpha", "0.7", "--checkpoint-every", "3", "--in-memory", in_memory, "--device", "cpu",
                "--resume", "-q"]
    # a sparse set has no member logits over every class, so no teacher noise there
    noise = ["--teacher-noise", "0.2"] if codec in (None, "dense") else []
    return [sys.executable, "-m", "transferset", "train-student", "--transfer-set", str(ts), "--out", str(out),
            "--student", "mlp:32,dropout=0.1", "--epochs", str(epochs), "--batch-size", "16", "--lr", "0.003",
            *noise, "--checkpoint-every", "3", "--in-memory", in_memory, "--device", "cpu",
            "--resume", "-q"]


class ManifestWatcher(threading.Thread):
    """Re-reads manifest.json while a label run writes; records any listed shard that is not complete."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder, self.stop, self.violations, self.reads = folder, threading.Event(), [], 0
        self.checked: dict[str, str] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            self.check()
            time.sleep(0.003)

    def check(self) -> None:
        try:
            names = [p.name for p in self.folder.iterdir() if p.name.startswith("manifest")]
        except FileNotFoundError:
            return
        for name in names:  # manifest.json, or the parts' manifests
            self.check_one(name)

    def check_one(self, name: str) -> None:
        try:
            m = json.loads((self.folder / name).read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:  # a torn manifest would be a violation too
            self.violations.append(f"{name} unreadable: {e}")
            return
        self.reads += 1
        for s in m["shards"]:
            if self.checked.get(s["path"]) == s["sha256"]:
                continue  # shards are never rewritten under a listed name; hash each one once
            p = self.folder / s["path"]
            try:
                digest = _sha(p)
            except FileNotFoundError:
                self.violations.append(f"{s['path']} listed but missing")
                continue
            if digest != s["sha256"]:
                self.violations.append(f"{s['path']} listed with sha256 {s['sha256'][:12]} but holds {digest[:12]}")
            else:
                self.checked[s["path"]] = digest


def _ready(kind: str, out: Path, pid: int, t_start_ns: int) -> bool:
    """Has the child finished starting up (imports, model loading) and begun its real work?"""
    try:
        if kind == "label":
            return any(p.read_text().strip() == str(pid) for p in out.glob(".lock*"))
        return (out / "config.json").stat().st_mtime_ns >= t_start_ns
    except (OSError, ValueError):
        return False


def run_once(cmd: list[str], kind: str, out: Path, kill_after: float | None, early: bool,
             watcher_folder: Path | None = None) -> dict:
    """Run ``cmd``; SIGKILL it ``kill_after`` s after it is ready (or after start when ``early``)."""
    t0 = time.perf_counter()
    t0_ns = time.time_ns() - 10_000_000  # file mtimes can trail the clock by a tick
    watcher = ManifestWatcher(watcher_folder) if watcher_folder is not None else None
    if watcher:
        watcher.start()
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    killed, t_ready = False, None
    deadline = t0 + kill_after if kill_after is not None and early else None
    while p.poll() is None:
        now = time.perf_counter()
        if t_ready is None and _ready(kind, out, p.pid, t0_ns):
            t_ready = now
            if kill_after is not None and deadline is None:
                deadline = now + kill_after
        if deadline is not None and now >= deadline:
            p.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    stdout, stderr = p.communicate()
    if watcher:
        watcher.stop.set()
        watcher.join()
        watcher.check()
    return {"rc": p.returncode, "killed": killed and p.returncode == -signal.SIGKILL,
            "seconds": time.perf_counter() - t0, "ready_s": None if t_ready is None else t_ready - t0,
            "stderr": stderr.decode(errors="replace").strip(), "stdout": stdout.decode(errors="replace").strip(),
            "violations": watcher.violations if watcher else [], "reads": watcher.reads if watcher else 0}


def compare_sets(a: Path, b: Path) -> list[str]:
    """Differences between two transfer sets: manifest, shard bytes, datasets and attributes."""
    diffs = []
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    if ma != mb:
        keys = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
        diffs.append(f"manifest differs in {keys}")
    for s in ma["shards"]:
        pa, pb = a / s["path"], b / s["path"]
        if not pb.exists():
            diffs.append(f"{s['path']} missing")
            continue
        if pa.read_bytes() != pb.read_bytes():
            diffs.append(f"{s['path']} bytes differ")
        with h5py.File(pa, "r") as fa, h5py.File(pb, "r") as fb:
            if sorted(fa) != sorted(fb):
                diffs.append(f"{s['path']} datasets {sorted(fa)} != {sorted(fb)}")
            for name in fa:
                if name not in fb:
                    continue
                da, db = fa[name], fb[name]
                if da.dtype != db.dtype or da.shape != db.shape or not np.array_equal(da[()], db[()]):
                    diffs.append(f"{s['path']}/{name} differs")
                if dict(da.attrs) != dict(db.attrs) or da.chunks != db.chunks or da.compression != db.compression:
                    diffs.append(f"{s['path']}/{name} attributes or layout differ")
            if dict(fa.attrs) != dict(fb.attrs):
                diffs.append(f"{s['path']} file attributes differ")
    if (a / "README.md").exists() and (not (b / "README.md").exists()
                                       or (a / "README.md").read_bytes() != (b / "README.md").read_bytes()):
        diffs.append("README.md (the dataset card) differs")
    extra = sorted(p.name for p in b.iterdir() if p.name not in {s["path"] for s in ma["shards"]}
                   and p.name not in ("manifest.json", "README.md", PHOTO_LISTING) and not p.name.startswith(".lock"))
    if extra:
        diffs.append(f"left-over files {extra}")
    return diffs


def compare_runs(a: Path, b: Path) -> list[str]:
    """Final student weights exactly equal; metrics.jsonl holds each epoch once, as the reference does."""
    import torch

    if not (b / "student.pt").exists():
        return ["student.pt missing"]
    wa = torch.load(a / "student.pt", map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b / "student.pt", map_location="cpu", weights_only=True)["model"]
    if wa.keys() != wb.keys():
        return ["state_dict keys differ"]
    diffs = [f"{k} differs" for k in wa if not torch.equal(wa[k], wb[k])]
    epochs = [[json.loads(line)["epoch"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    if epochs[0] != epochs[1]:
        diffs.append(f"metrics.jsonl epochs {epochs[1]} != {epochs[0]}")
    return diffs


def run_trials(kind: str, trials: int, rng: random.Random, make_cmd, ref_out: Path, work: Path, ref: dict,
               max_kills: int, compare) -> dict:
    """``trials`` runs of ``kind``, each SIGKILLed 1..max_kills times (at least once) and resumed to the end.

    A kill lands at a uniform moment of the work (from the child holding its lock or writing config.json to its
    exit, as last measured), or with probability EARLY_KILL_FRACTION at a uniform moment of its start-up.
    A trial whose first run ends before its kill is started again from an empty folder (at most 5 times).
    """
    res = {"trials": trials, "passed": 0, "kills": 0, "kills_mid_work": 0, "runs": 0, "manifest_reads": 0,
           "restarts": 0, "failures": []}
    work_s = max(ref["seconds"] - (ref["ready_s"] or 0.0), 0.05)
    start_s = max(ref["ready_s"] or 0.5, 0.1)
    for t in range(trials):
        out = work / f"{kind}-trial-{t}"
        cmd = make_cmd(out, t)
        want = rng.randint(1, max_kills)
        problems, kills, states, attempts = [], 0, [], 0
        shutil.rmtree(out, ignore_errors=True)
        while kills < want:
            early = rng.random() < EARLY_KILL_FRACTION
            delay = rng.uniform(0, start_s) if early else rng.uniform(0, 0.95 * work_s)
            r = run_once(cmd, kind, out, delay, early, out if kind == "label" else None)
            res["runs"] += 1
            res["manifest_reads"] += r["reads"]
            problems += r["violations"]
            if not r["killed"]:
                if r["rc"] != 0:
                    problems.append(f"run exited {r['rc']}: {r['stderr'][-300:]}")
                    break
                if kills == 0 and r["ready_s"] is not None:
                    work_s = max(r["seconds"] - r["ready_s"], 0.05)  # the machine is faster now: aim again
                if kills == 0 and attempts < 5:
                    attempts += 1
                    res["restarts"] += 1
                    shutil.rmtree(out, ignore_errors=True)
                    continue
                break  # what was left finished before the kill landed
            kills += 1
            if kind == "label":
                if (out / "manifest.json").exists():
                    m = json.loads((out / "manifest.json").read_text())
                    states.append(len(m["shards"]))
                    bad = verify_transfer_set(out)
                    problems += [f"after kill {kills}: {p}: {why}" for p, why in bad]
                else:
                    states.append(0)
            else:
                states.append((out / "checkpoint.pt").exists())
        else:
            r = run_once(cmd, kind, out, None, False, out if kind == "label" else None)
            res["runs"] += 1
            res["manifest_reads"] += r["reads"]
            problems += r["violations"]
            if r["rc"] != 0:
                problems.append(f"final run exited {r['rc']}: {r['stderr'][-300:]}")
        if not problems:
            problems = compare(ref_out, out)
        res["kills"] += kills
        if kind == "label":
            n_ref = len(json.loads((ref_out / "manifest.json").read_text())["shards"])
            res["kills_mid_work"] += sum(0 < s < n_ref for s in states)
        else:
            res["kills_mid_work"] += sum(bool(s) for s in states)
        ok = not problems
        res["passed"] += ok
        if not ok:
            res["failures"].append({"trial": t, "problems": problems[:5]})
        where = "shards listed" if kind == "label" else "checkpoint.pt existed"
        print(f"{kind:>5} trial {t + 1:>3}/{trials}: {kills} SIGKILL(s), {where} at each: {states}; "
              f"{'identical to the uninterrupted run' if ok else 'FAILED: ' + '; '.join(problems[:3])}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return res


def _listed(out: Path) -> int:
    """Shards listed so far: by manifest.json, or by all the parts' manifests together."""
    names = ["manifest.json"] if (out / "manifest.json").exists() else [p.name for p in out.glob("manifest.part-*")]
    return sum(len(json.loads((out / n).read_text())["shards"]) for n in names)


def _part_run(res: dict, cmd: list[str], out: Path, delay: float | None, early: bool) -> tuple[dict, list[str]]:
    r = run_once(cmd, "label", out, delay, early, out)
    res["runs"] += 1
    res["manifest_reads"] += r["reads"]
    problems = list(r["violations"])
    if not r["killed"] and r["rc"] != 0:
        problems.append(f"run exited {r['rc']}: {r['stderr'][-300:]}")
    return r, problems


def _tally(res: dict, t: int, problems: list, kills: int, states: list[str], n_ref: int) -> list:
    """Add trial ``t`` to ``res``: its kills, the kills that found some but not all of the ``n_ref`` shards listed
    (``states``: "who:shards listed" at each kill), pass or its first problems; returns ``problems``."""
    res["kills"] += kills
    res["kills_mid_work"] += sum(0 < int(s.split(":")[1]) < n_ref for s in states)
    res["passed"] += not problems
    if problems:
        res["failures"].append({"trial": t, "problems": problems[:5]})
    return problems


def run_part_trials(trials: int, rng: random.Random, make_cmds, ref_out: Path, work: Path, ref: dict,
                    max_kills: int) -> dict:
    """``trials`` sets labelled in parts: 1..max_kills SIGKILLs, each of a part drawn at random at a random moment
    of its work (or of its start-up), then every part not yet finished run to the end in a random order (the last
    one merges). The folder must then hold exactly the single run's bytes."""
    res = {"trials": trials, "passed": 0, "kills": 0, "kills_mid_work": 0, "runs": 0, "manifest_reads": 0,
           "restarts": 0, "failures": []}
    n_ref = len(json.loads((ref_out / "manifest.json").read_text())["shards"])
    start_s = max(ref["ready_s"] or 0.5, 0.1)
    for t in range(trials):
        out = work / f"parts-trial-{t}"
        shutil.rmtree(out, ignore_errors=True)
        cmds = make_cmds(out)
        work_s = max(ref["seconds"] - (ref["ready_s"] or 0.0), 0.05) / len(cmds)  # a part does 1/N of the work
        pending, want, kills, problems, states = list(range(len(cmds))), rng.randint(1, max_kills), 0, [], []
        while kills < want and pending and not problems:
            i, early = rng.choice(pending), rng.random() < EARLY_KILL_FRACTION
            delay = rng.uniform(0, start_s) if early else rng.uniform(0, 0.95 * work_s)
            r, found = _part_run(res, cmds[i], out, delay, early)
            problems += found
            if not r["killed"]:
                pending.remove(i)  # it finished before the kill landed
                continue
            kills += 1
            states.append(f"{i + 1}:{_listed(out)}")
            if any(out.glob("manifest*.json")):
                problems += [f"after kill {kills}: {p}: {why}" for p, why in verify_transfer_set(out)]
        rng.shuffle(pending)
        for i in pending if not problems else []:
            problems += _part_run(res, cmds[i], out, None, False)[1]
        problems = _tally(res, t, problems or compare_sets(ref_out, out), kills, states, n_ref)
        print(f"parts trial {t + 1:>3}/{trials}: {kills} SIGKILL(s), part:shards listed at each: {states}; "
              f"{'identical to the single run' if not problems else 'FAILED: ' + '; '.join(problems[:3])}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return res


def _claim_events(rng: random.Random, kills: int, workers: int, span: float) -> list[tuple[float, str]]:
    """When to SIGKILL a live worker and when to start a late one, over ``span`` seconds."""
    events = [(rng.uniform(0.05, span), "kill") for _ in range(kills)]
    events += [(rng.uniform(0.0, span), "start") for _ in range(rng.randint(1, workers))]
    return sorted(events)


def _claim_finished(out: Path) -> bool:
    """Merged and cleaned up: manifest.json, its card, and no part manifest or lease left. A worker SIGKILLed in
    its merge after manifest.json (before the card or the clean-up), with no other worker left, leaves the rest to
    the next run of the command, which finishes it: that is the resume the crash test owes it."""
    return ((out / "manifest.json").exists() and (out / "README.md").exists()
            and not any(out.glob("manifest.part-*")) and not any(out.glob(".lease-*")))


def run_claim_trials(trials: int, rng: random.Random, make_cmd, ref_out: Path, work: Path, ref: dict,
                     max_kills: int, workers: int) -> dict:
    """``trials`` sets labelled by claiming workers (``--claim``): 1..``workers`` start together, 1..max_kills
    SIGKILLs land on live workers at random moments while 1..``workers`` more start late; when all have exited,
    fresh workers are started until the set is merged and cleaned up (they take over the dead workers' shards once
    their leases expire, and finish a merge killed half-way). A watcher checks every manifest while they write; the folder must then hold the single run's bytes."""
    res = {"trials": trials, "passed": 0, "kills": 0, "kills_mid_work": 0, "runs": 0, "manifest_reads": 0,
           "late_starts": 0, "restarts": 0, "failures": []}
    n_ref = len(json.loads((ref_out / "manifest.json").read_text())["shards"])
    span = max(ref["seconds"] - (ref["ready_s"] or 0.0), 0.3)  # one process's work, start-up left out
    for t in range(trials):
        out = work / f"claim-trial-{t}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = make_cmd(out)
        watcher = ManifestWatcher(out)
        watcher.start()
        procs, problems, states, kills = [], [], [], 0

        def start() -> None:
            procs.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO)))
            res["runs"] += 1

        for _ in range(rng.randint(1, workers)):
            start()
        while not any(out.glob(".lease-*")) and any(p.poll() is None for p in procs):
            time.sleep(0.005)  # kills and late starts are spread over the work, from the first claim on
        t0 = time.perf_counter()
        for at, what in _claim_events(rng, rng.randint(1, max_kills), workers, span):
            time.sleep(max(0.0, at - (time.perf_counter() - t0)))
            live = [p for p in procs if p.poll() is None]
            if what == "kill" and live:
                victim = rng.choice(live)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                kills += 1
                states.append(_listed(out))
            elif what == "start":
                start()
                res["late_starts"] += 1
        for p in procs:
            _, err = p.communicate()
            if p.returncode not in (0, -signal.SIGKILL):
                problems.append(f"a worker exited {p.returncode}: {err.decode(errors='replace')[-300:]}")
        for _ in range(3):  # everyone exited (or was killed): fresh workers finish what is left and merge
            if _claim_finished(out) or problems:  # (a merge killed in its clean-up is finished by a rerun too)
                break
            start()
            res["restarts"] += 1
            _, err = procs[-1].communicate()
            if procs[-1].returncode != 0:
                problems.append(f"a fresh worker exited {procs[-1].returncode}: {err.decode(errors='replace')[-300:]}")
        watcher.stop.set()
        watcher.join()
        watcher.check()
        res["manifest_reads"] += watcher.reads
        problems = problems + watcher.violations
        problems = problems or compare_sets(ref_out, out)
        res["kills"] += kills
        res["kills_mid_work"] += sum(0 < s < n_ref for s in states)
        res["passed"] += not problems
        if problems:
            res["failures"].append({"trial": t, "problems": problems[:5]})
        print(f"claim trial {t + 1:>3}/{trials}: {len(procs)} workers, {kills} SIGKILL(s), shards listed at each: "
              f"{states}; {'identical to the single run' if not problems else 'FAILED: ' + '; '.join(problems[:3])}",
              flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return res


def _ray_env() -> dict:
    """The drivers' environment: RAY_AUTH_MODE and the rest as this script's Ray instance set them (Ray enables
    token authentication on the clusters it starts, and a driver given an address must be told)."""
    return {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("RAY_")}}


def _tmp_state(p: Path) -> tuple:
    st = p.stat()
    return p.name, st.st_ino, st.st_ctime_ns, st.st_size


def _fresh_tmps(out: Path, stale: set) -> list[Path]:
    """Temporary shard files being written now: not the debris an earlier killed run left (nobody writes that)."""
    found = []
    for p in sorted(out.glob(".tmp-shard-*.h5")):
        with contextlib.suppress(OSError):
            if _tmp_state(p) not in stale:
                found.append(p)
    return found


def _kill_ray_worker_mid_shard(out: Path, driver: subprocess.Popen, shards: int, stale: set) -> str | None:
    """SIGKILL the Ray worker writing a shard of ``out``: frozen first (SIGSTOP), killed only if its shard's temporary
    file is still there and fresh, so the kill surely lands mid-shard; the shard's name, or None if the run ended."""
    from transferset.format.parts import part_lock_name

    while driver.poll() is None:
        for tmp in _fresh_tmps(out, stale):
            k = int(tmp.name.removeprefix(".tmp-shard-").removesuffix(".h5"))
            try:
                pid = int((out / part_lock_name(k + 1, shards)).read_text())
                if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                    continue  # the part's last holder, gone: not the one writing now
                os.kill(pid, signal.SIGSTOP)
            except (OSError, ValueError):
                continue
            try:
                mid = bool(_fresh_tmps(out, stale)) and tmp.exists() and _tmp_state(tmp) not in stale
            except OSError:
                mid = False
            os.kill(pid, signal.SIGKILL if mid else signal.SIGCONT)
            if mid:
                return tmp.name
        time.sleep(0.002)
    return None


def _ray_reference_run(cmd: list[str], out: Path) -> dict:
    """One uninterrupted Ray run: its seconds, and when its first shard began (the work's span follows)."""
    stale: set = set()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=_ray_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    first = None
    while p.poll() is None:
        if first is None and _fresh_tmps(out, stale):
            first = time.perf_counter() - t0
        time.sleep(0.005)
    _, err = p.communicate()
    return {"rc": p.returncode, "seconds": time.perf_counter() - t0, "first_shard_s": first,
            "stderr": err.decode(errors="replace")}


def _ray_run(cmd: list[str], out: Path, shards: int, events: list[tuple[str, float]]) -> dict:
    """One driver run, making as many of ``events`` as it lasts for, in order: each ``(what, delay)`` kills a Ray
    worker caught mid-shard or the driver (which ends the run), ``delay`` s after its first fresh shard or the kill
    before. ``kills``: ``(what, shards listed at that moment)`` for each kill made."""
    stale = {_tmp_state(p) for p in out.glob(".tmp-shard-*.h5")} if out.exists() else set()
    p = subprocess.Popen(cmd, env=_ray_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    kills = []
    if events:
        while p.poll() is None and not (out.exists() and _fresh_tmps(out, stale)):
            time.sleep(0.002)
    for what, delay in events:
        t_at = time.perf_counter() + delay
        while p.poll() is None and time.perf_counter() < t_at:
            time.sleep(0.002)
        if p.poll() is not None:
            break
        if what == "driver":
            p.send_signal(signal.SIGKILL)
            kills.append(("driver", _listed(out)))
            break
        if _kill_ray_worker_mid_shard(out, p, shards, stale) is None:
            break  # the run ended first
        kills.append(("worker", _listed(out)))
    out_b, err_b = p.communicate()
    return {"rc": p.returncode, "kills": kills, "stdout": out_b.decode(errors="replace"),
            "stderr": err_b.decode(errors="replace").strip()}


def run_ray_trials(trials: int, rng: random.Random, make_cmd, ref_out: Path, work: Path, max_kills: int) -> dict:
    """``trials`` sets labelled by ``label --engine ray`` drivers on one local Ray instance: 1..max_kills SIGKILLs,
    each of a Ray worker caught mid-shard (Ray runs its task again, up to the trial's ``--ray-retries`` drawn from
    0, 1, 3; when they are spent the run stops in one line and the same command is run again) or of the driver
    (Ray ends its job's tasks; the same command is run again), then the runs left to finish. A watcher checks every
    manifest while they write; the folder must hold the single process's bytes (the reference is not Ray)."""
    res = {"trials": trials, "passed": 0, "kills": 0, "worker_kills": 0, "driver_kills": 0, "kills_mid_work": 0,
           "runs": 0, "reruns_after_spent_retries": 0, "manifest_reads": 0, "restarts": 0, "failures": []}
    n_ref = len(json.loads((ref_out / "manifest.json").read_text())["shards"])
    probe = work / "ray-reference"
    shutil.rmtree(probe, ignore_errors=True)
    r = _ray_reference_run(make_cmd(probe, 3), probe)
    problems = [f"the uninterrupted Ray run exited {r['rc']}: {r['stderr'][-300:]}"] if r["rc"] else []
    problems = problems or compare_sets(ref_out, probe)
    if problems:
        res["failures"].append({"trial": "uninterrupted", "problems": problems[:5]})
        return res
    res["uninterrupted_seconds"] = round(r["seconds"], 2)
    span = max(r["seconds"] - (r["first_shard_s"] or 0.0), 0.2)
    shutil.rmtree(probe, ignore_errors=True)
    for t in range(trials):
        out = work / f"ray-trial-{t}"
        shutil.rmtree(out, ignore_errors=True)
        retries = rng.choice((0, 1, 3))
        cmd = make_cmd(out, retries)
        events = [(rng.choice(("worker", "worker", "driver")), rng.uniform(0, 0.9 * span / 2))
                  for _ in range(rng.randint(1, max_kills))]
        watcher = ManifestWatcher(out)
        watcher.start()
        problems, states, kills, runs, restarts = [], [], 0, 0, 0
        while not problems and runs < 2 * max_kills + 3:
            r = _ray_run(cmd, out, n_ref, events)
            runs += 1
            del events[:len(r["kills"])]
            for what, listed in r["kills"]:
                kills += 1
                res["worker_kills" if what == "worker" else "driver_kills"] += 1
                states.append(f"{what}:{listed}")
            if not r["kills"] and events and kills == 0 and r["rc"] == 0 and restarts < 5:
                restarts += 1  # the run ended before its first kill landed: this trial starts again from nothing
                res["restarts"] += 1
                runs = 0
                shutil.rmtree(out, ignore_errors=True)
                continue
            if (out / "manifest.json").exists() and r["rc"] == 0:
                break  # complete (kills not yet made are not needed)
            killed_driver = bool(r["kills"]) and r["kills"][-1][0] == "driver"
            if killed_driver and r["rc"] == -signal.SIGKILL:
                continue
            if r["rc"] == 1 and "Ray task(s) failed" in r["stderr"] and "The worker died" in r["stderr"] \
                    and r["kills"] and len(r["stderr"].splitlines()) == 1:
                res["reruns_after_spent_retries"] += 1  # the kills spent a task's retries: run it again
                continue
            problems.append(f"run {runs} ({len(r['kills'])} kills) exited {r['rc']}: {r['stderr'][-300:]}")
        else:
            problems = problems or [f"not complete after {runs} runs"]
        watcher.stop.set()
        watcher.join()
        watcher.check()
        res["manifest_reads"] += watcher.reads
        res["runs"] += runs
        problems = problems + watcher.violations
        problems = _tally(res, t, problems or compare_sets(ref_out, out), kills, states, n_ref)
        print(f"  ray trial {t + 1:>3}/{trials}: --ray-retries {retries}, {runs} run(s), {kills} SIGKILL(s), "
              f"kill:shards listed at each: {states}; "
              f"{'identical to the single process' if not problems else 'FAILED: ' + '; '.join(problems[:3])}",
              flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return res


def _ray_label_trials(a, rng: random.Random, inp: dict, shard: int, ref_ts: Path, work: Path) -> dict:
    """The Ray leg: one local Ray instance (2 CPUs) for all trials; each driver reaches it by address."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        address = ray.get_runtime_context().gcs_address

        def ray_cmd(out, retries):
            return label_cmd(inp, out, shard, a.codec, a.threads) + ["--engine", "ray", "--ray-address", address,
                                                          "--ray-retries", str(retries)]
        return run_ray_trials(a.trials, rng, ray_cmd, ref_ts, work, a.max_kills)
    finally:
        ray.shutdown()


def label_trials(a, rng: random.Random, inp: dict, shard: int, ref_ts: Path, work: Path, ref: dict) -> dict:
    """The label trials: one process, ``a.parts`` parts (``--part I/N``) or ``a.claim`` claiming workers (and
    late ones) killed at random, or ``a.ray``: Ray drivers and workers killed at random."""
    if a.ray:
        return _ray_label_trials(a, rng, inp, shard, ref_ts, work)
    if a.claim:
        def claim_cmd(out):
            return label_cmd(inp, out, shard, a.codec, a.threads) + ["--claim", "--lease-seconds", str(a.lease_seconds)]
        return run_claim_trials(a.trials, rng, claim_cmd, ref_ts, work, ref, a.max_kills, a.claim)
    if a.parts > 1:
        def cmds(out):
            return [label_cmd(inp, out, shard, a.codec, a.threads) + ["--part", f"{i}/{a.parts}"] for i in range(1, a.parts + 1)]
        return run_part_trials(a.trials, rng, cmds, ref_ts, work, ref, a.max_kills)
    return run_trials("label", a.trials, rng, lambda out, t: label_cmd(inp, out, shard, a.codec, a.threads), ref_ts, work, ref,
                      a.max_kills, compare_sets)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10, help="trials of each stage (label, train-student)")
    ap.add_argument("--train-trials", type=int, default=None, help="train-student trials (default: --trials)")
    ap.add_argument("--max-kills", type=int, default=3, help="SIGKILLs per trial, drawn from 1..N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="ONNX Runtime threads of each killed label run (2 or more: CPU lanes, each with batches "
                         "queued); the reference is labelled with 1 thread")
    ap.add_argument("--parts", type=int, default=1, help="label in N parts (--part I/N), killing parts at random")
    ap.add_argument("--claim", type=int, default=0, metavar="W",
                    help="label with claiming workers (--claim): 1..W at once, 1..W more started late, killed at random")
    ap.add_argument("--lease-seconds", type=float, default=2.0, help="with --claim: the workers' lease time")
    ap.add_argument("--ray", action="store_true", help="label with --engine ray on a local Ray instance, killing Ray "
                    "workers mid-shard and drivers at random (needs the ray extra); larger shards, so kills land mid-shard")
    ap.add_argument("--quick", action="store_true", help="a smaller set and a shorter training (CI smoke)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    ap.add_argument("--codec", default=None, help="label with this codec (dense, topk:K, sample:K, systematic:K); train from it")
    ap.add_argument("--photos", action="store_true", help="the photo leg: a photo folder with corrupt files "
                    "labelled by a tiny CNN teacher (bad files' rows kept and marked); a student trains from it")
    ap.add_argument("--lm", action="store_true", help="the LM leg: two tiny causal-LM teachers label token ids into "
                    "a per-position set (default codec topk:8); an lm: student trains from it")
    a = ap.parse_args(argv)
    if a.trials < 0 or a.max_kills < 1 or a.parts < 1:
        ap.error("--trials must be >= 0, --max-kills and --parts >= 1")
    train_trials = a.trials if a.train_trials is None else a.train_trials
    rng = random.Random(a.seed)
    t_all = time.perf_counter()
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ts-crash-")
        work = Path(tmp.name)
    else:
        work = a.workdir
        work.mkdir(parents=True, exist_ok=True)
    rows, shard, epochs = (96, 16, 2) if a.quick else (240, 24, 3)
    if a.ray:  # shards that take a while to write, so that a worker can be caught in the middle of one
        rows, shard = (960, 240) if a.quick else (2400, 400)
    try:
        inp = make_lm_inputs(work, rows) if a.lm else make_photo_inputs(work, rows // 2) if a.photos else \
            make_inputs(work, rows)
        ref_ts = work / "ref-ts"
        shutil.rmtree(ref_ts, ignore_errors=True)
        r = run_once(label_cmd(inp, ref_ts, shard, a.codec), "label", ref_ts, None, False)
        if r["rc"] != 0:
            print(f"reference label run failed: {r['stderr']}", file=sys.stderr)
            return 1
        m = json.loads((ref_ts / "manifest.json").read_text())
        results = {"label": label_trials(a, rng, inp, shard, ref_ts, work, r)}
        results["label"]["shards"] = len(m["shards"])
        results["label"]["rows"] = m["stats"]["rows"]
        results["label"]["reference_seconds"] = round(r["seconds"], 2)
        ref_runs, train_res = {}, {"trials": 0, "passed": 0, "kills": 0, "kills_mid_work": 0, "runs": 0,
                                   "restarts": 0, "failures": []}
        modes = () if train_trials == 0 else ("yes",) if a.quick else ("yes", "no")  # in-memory and streaming readers
        for mode in modes:
            ref_run = work / f"ref-run-{mode}"
            shutil.rmtree(ref_run, ignore_errors=True)
            rr = run_once(train_cmd(ref_ts, ref_run, mode, epochs, a.codec, a.lm), "train", ref_run, None, False)
            if rr["rc"] != 0:
                print(f"reference train run failed: {rr['stderr']}", file=sys.stderr)
                return 1
            ref_runs[mode] = (ref_run, rr)
        for mode in modes:
            n = train_trials // len(modes) + (1 if modes.index(mode) < train_trials % len(modes) else 0)
            ref_run, rr = ref_runs[mode]
            got = run_trials("train", n, rng, lambda out, t, mode=mode: train_cmd(ref_ts, out, mode, epochs, a.codec, a.lm),
                             ref_run, work, rr, a.max_kills, compare_runs)
            for key in ("trials", "passed", "kills", "kills_mid_work", "runs", "restarts"):
                train_res[key] += got[key]
            train_res["failures"] += [{**f, "in_memory": mode} for f in got["failures"]]
        train_res["reference_seconds"] = {m: round(v[1]["seconds"], 2) for m, v in ref_runs.items()}
        results["train"] = train_res
    finally:
        if tmp is not None:
            tmp.cleanup()
    wall = time.perf_counter() - t_all
    ok = all(results[k]["passed"] == results[k]["trials"] for k in ("label", "train"))
    lab, tr = results["label"], results["train"]
    how = (f" by Ray ({lab['runs']} driver runs, {lab['reruns_after_spent_retries']} of them after a task's retries "
           f"were spent; {lab['worker_kills']} workers killed mid-shard, {lab['driver_kills']} drivers killed)"
           if a.ray else
           f" by claiming workers ({lab['runs']} started, {lab['late_starts']} of them late)" if a.claim else
           f" in {a.parts} parts" if a.parts > 1 else "")
    print(f"label{how}: {lab['passed']}/{lab['trials']} trials identical (shard bytes, datasets, manifest) after "
          f"{lab['kills']} SIGKILLs ({lab['kills_mid_work']} with some but not all shards listed); "
          f"{lab['manifest_reads']} manifest reads during writing, each checking every listed shard's sha256")
    print(f"train-student: {tr['passed']}/{tr['trials']} trials with identical final weights after {tr['kills']} "
          f"SIGKILLs ({tr['kills_mid_work']} after a checkpoint existed)")
    print(f"{'PASS' if ok else 'FAIL'} in {wall:.1f} s")
    if a.json:
        print(json.dumps({"ok": ok, "seconds": round(wall, 1), "seed": a.seed, "quick": a.quick, "parts": a.parts,
                          "claim": a.claim, "ray": a.ray,
                          **results},
                         sort_keys=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
