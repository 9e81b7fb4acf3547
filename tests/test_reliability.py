"""Reliability (issue 6): crashes, full disks, corruption, bad input on every command, shared-data safety, locks.

Fault tests really fail: processes are SIGKILLed, writes raise ENOSPC from inside the real write path, shards
are truncated and flipped on disk.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from teachers import export_teacher
from transferset.cli import main
from transferset.errors import TransferSetError
from transferset.labelling.pipeline import LabelOptions, label
from transferset.format import load_manifest, verify_transfer_set
from transferset.training.loop import TrainOptions, train_student

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
SHARD_OPTS = dict(shard_size=10, batch_size=4, quiet=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """40 rows of 8x8 bytes with labels, one teacher, a 4-shard transfer set and a 1-epoch student."""
    tmp = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    np.save(tmp / "x.npy", rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8))
    np.save(tmp / "y.npy", rng.integers(0, 5, size=40))
    np.save(tmp / "x7.npy", rng.integers(0, 256, size=(6, 7, 7), dtype=np.uint8))
    np.save(tmp / "y_big.npy", np.full(40, 9))
    export_teacher(tmp / "t.onnx", (8, 8), seed=1)
    label([tmp / "t.onnx"], str(tmp / "x.npy"), tmp / "ts", LabelOptions(labels=str(tmp / "y.npy"), **SHARD_OPTS))
    train_student(tmp / "ts", tmp / "run", TrainOptions(student="mlp:8", epochs=1, batch_size=8, device="cpu", quiet=True))
    return tmp


def _copy_set(world, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(world / "ts", tmp_path / "ts"))


def _edit(folder: Path, fn) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _run_cli(args, capsys) -> tuple[int, list[str], str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return e.value.code, cap.err.strip().splitlines(), cap.out


# -- bad input, every command -------------------------------------------------------------------------------------
# (command, case, exit code, text the one line must hold); `_prepare` builds each case's arguments.
BAD_INPUT = [
    ("label", "out-is-a-file", 2, "is not a folder"),
    ("label", "shard-size-zero", 2, "--shard-size"),
    ("label", "future-schema-in-out", 2, "schema_version 99"),
    ("label", "unknown-option", 2, "No such option"),
    ("verify", "missing-folder", 2, "not a folder"),
    ("verify", "no-manifest", 2, "no manifest"),
    ("verify", "not-json", 2, "not valid JSON"),
    ("verify", "future-schema", 2, "schema_version 99"),
    ("verify", "path-leaves-folder", 2, "leaves the transfer-set folder"),
    ("verify", "absolute-path", 2, "must be a relative path"),
    ("verify", "edited-type", 2, "num_classes"),
    ("verify", "edited-rows", 1, "1 bad of 4 shards"),
    ("verify", "truncated-shard", 1, "1 bad of 4 shards"),
    ("verify", "edited-row-start", 1, "1 bad of 4 shards"),
    ("info", "missing-folder", 2, "not a folder"),
    ("info", "future-schema", 2, "schema_version 99"),
    ("info", "edited-input", 2, "input"),
    ("info", "edited-class-names", 2, "class_names"),
    ("info", "edited-dtype", 2, "dtype"),
    ("train-student", "missing-set", 2, "not a folder"),
    ("train-student", "epochs-zero", 2, "--epochs"),
    ("train-student", "threads-zero", 2, "--threads"),
    ("train-student", "shuffle-chunks-zero", 2, "--shuffle-chunks"),
    ("train-student", "negative-lr", 2, "--lr"),
    ("train-student", "warmup-one", 2, "--warmup"),
    ("train-student", "unknown-student", 2, "unknown student"),
    ("train-student", "bad-choice", 2, "--in-memory"),
    ("train-student", "incomplete-set", 2, "incomplete"),
    ("train-student", "future-schema", 2, "schema_version 99"),
    ("train-student", "truncated-shard", 2, "shard-00002.h5"),
    ("train-student", "bytes-edited", 2, "shard-00001.h5"),
    ("train-student", "missing-shard", 2, "shard-00003.h5"),
    ("train-student", "missing-eval-data", 2, "nope.npy"),
    ("train-student", "damaged-checkpoint", 2, "checkpoint"),
    ("evaluate", "missing-model", 2, "no such checkpoint"),
    ("evaluate", "model-and-ensemble", 2, "exactly one of --model or --ensemble"),
    ("evaluate", "student-does-not-fit", 2, "does not fit"),
    ("evaluate", "teacher-does-not-fit", 2, "do not fit the model input"),
    ("evaluate", "missing-data", 2, "nope.npy"),
    ("evaluate", "batch-size-zero", 2, "--batch-size"),
    ("evaluate", "not-a-checkpoint", 2, "not a transferset student checkpoint"),
    ("evaluate", "labels-out-of-range", 2, "labels must lie in"),
    ("recode", "missing-set", 2, "not a folder"),
    ("recode", "bad-codec", 2, "--codec 'topk:x' is not a codec"),
    ("recode", "dense-codec", 2, "dense set into a sparse one"),
    ("recode", "k-too-big", 2, "keeps 5 classes"),
    ("recode", "out-not-empty", 2, "not an empty folder"),
    ("demo", "out-is-a-file", 2, "cannot create the demo folder"),
    ("demo", "bad-device", 2, "--device"),
    ("demo", "unknown-option", 2, "No such option"),
    ("report", "missing-folder", 2, "not a transfer set"),
    ("report", "future-schema", 2, "schema_version 99"),
    ("export", "missing-folder", 2, "not a folder"),
    ("export", "unstored-temperature", 2, "not a stored temperature"),
    ("label", "part-out-of-range", 2, "--part must be I/N with 1 <= I <= N, got 3/2"),
    ("label", "part-not-a-fraction", 2, "--part"),
    ("merge", "missing-folder", 2, "not a folder"),
    ("merge", "no-parts", 2, "holds no part manifests to merge"),
    ("specialists", "missing-set", 2, "not a folder"),
    ("specialists", "count-zero", 2, "--count"),
    ("shift-bias", "missing-model", 2, "no such model file"),
    ("shift-bias", "bad-shift", 2, "CLASS=SHIFT"),
    ("sweep", "missing-set", 2, "not a folder"),
    ("sweep", "no-eval-data", 2, "--eval-data needs data to score the runs on"),
    ("sweep", "alpha-out-of-range", 2, "--alphas must lie in [0, 1]"),
    ("sweep", "holdout-and-eval-data", 2, "--holdout scores on held-out source rows"),
    ("sweep", "holdout-leaves-nothing", 2, "leaves none to train on"),
    ("inspect", "missing-model", 2, "no such ONNX file"),
    ("inspect", "not-a-model", 2, "not a loadable ONNX model"),
]


def _prepare_recode(case: str, ts: Path, tmp: Path) -> list:
    codec = {"bad-codec": "topk:x", "dense-codec": "dense", "k-too-big": "topk:5"}.get(case, "topk:2")
    if case == "out-not-empty":
        (tmp / "out").mkdir()
        (tmp / "out" / "keep.txt").write_text("x")
    return ["recode", tmp / "nope" if case == "missing-set" else ts, tmp / "out", "--codec", codec]


def _prepare(cmd: str, case: str, w: Path, tmp: Path) -> list:
    ts = tmp / "ts"
    if cmd == "recode":
        return _prepare_recode(case, _copy_set(w, tmp), tmp)
    if cmd in ("verify", "info", "train-student") or case == "future-schema-in-out":
        ts = _copy_set(w, tmp)
    run = tmp / "run"
    if cmd == "label":
        args = ["label", "--ensemble", w / "t.onnx", "--data", w / "x.npy", "--out", tmp / "out", "-q"]
        if case == "out-is-a-file":
            (tmp / "out").write_text("x")
        elif case == "shard-size-zero":
            args += ["--shard-size", "0"]
        elif case == "future-schema-in-out":
            args[args.index(tmp / "out")] = ts
            _edit(ts, lambda m: m.update(schema_version=99))
        elif case == "unknown-option":
            args += ["--shards", "3"]
        elif case.startswith("part-"):
            args += ["--part", "3/2" if case == "part-out-of-range" else "half"]
        return args
    if cmd == "merge":
        (tmp / "empty").mkdir()
        return ["merge", tmp / ("nope" if case == "missing-folder" else "empty")]
    if cmd in ("verify", "info"):
        if case == "missing-folder":
            ts = tmp / "nope"
        elif case == "no-manifest":
            (ts / "manifest.json").unlink()
        elif case == "not-json":
            (ts / "manifest.json").write_text('{"format": "transferset", ')
        elif case == "future-schema":
            _edit(ts, lambda m: m.update(schema_version=99))
        elif case == "path-leaves-folder":
            _edit(ts, lambda m: m["shards"][1].update(path="../../etc/passwd"))
        elif case == "absolute-path":
            _edit(ts, lambda m: m["shards"][1].update(path="/etc/passwd"))
        elif case == "edited-type":
            _edit(ts, lambda m: m.update(num_classes="5"))
        elif case == "edited-rows":
            _edit(ts, lambda m: m["shards"][2].update(rows=11))
        elif case == "truncated-shard":
            _truncate(ts / "shard-00002.h5")
        elif case == "edited-row-start":
            _edit(ts, lambda m: m["shards"][2].update(row_start=25))
        elif case == "edited-input":
            _edit(ts, lambda m: m.update(input=[8, 8]))
        elif case == "edited-class-names":
            _edit(ts, lambda m: m.update(class_names=["a", "b"]))
        elif case == "edited-dtype":
            _edit(ts, lambda m: m["input"].update(dtype="object"))
        return [cmd, ts]
    if cmd == "train-student":
        args = ["train-student", "--transfer-set", ts, "--out", run, "--student", "mlp:8", "--epochs", "1",
                "--device", "cpu", "-q"]
        extra = {"epochs-zero": ["--epochs", "0"], "threads-zero": ["--threads", "0"], "shuffle-chunks-zero": ["--shuffle-chunks", "0"], "negative-lr": ["--lr", "-1"], "warmup-one": ["--warmup", "1"],
                 "unknown-student": ["--student", "transformer:12"], "bad-choice": ["--in-memory", "maybe"],
                 "missing-eval-data": ["--eval-data", tmp / "nope.npy"]}
        args += extra.get(case, [])
        if case == "missing-set":
            args[2] = tmp / "nope"
        elif case == "incomplete-set":
            _edit(ts, lambda m: m.update(complete=False))
        elif case == "future-schema":
            _edit(ts, lambda m: m.update(schema_version=99))
        elif case == "truncated-shard":
            _truncate(ts / "shard-00002.h5", 0.97)
        elif case == "bytes-edited":
            _edit(ts, lambda m: m["shards"][1].update(bytes=m["shards"][1]["bytes"] + 1))
        elif case == "missing-shard":
            (ts / "shard-00003.h5").unlink()
        elif case == "damaged-checkpoint":
            run.mkdir()
            (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
            args.append("--resume")
        return args
    if cmd == "evaluate":
        student = w / "run" / "student.pt"
        args = ["evaluate", "--model", student, "--data", w / "x.npy", "--labels", w / "y.npy"]
        if case == "missing-model":
            args[2] = tmp / "nope.pt"
        elif case == "model-and-ensemble":
            args += ["--ensemble", w / "t.onnx"]
        elif case == "student-does-not-fit":
            np.save(tmp / "y6.npy", np.zeros(6, np.int64))
            args = ["evaluate", "--model", student, "--data", w / "x7.npy", "--labels", tmp / "y6.npy"]
        elif case == "teacher-does-not-fit":
            np.save(tmp / "y6.npy", np.zeros(6, np.int64))
            args = ["evaluate", "--ensemble", w / "t.onnx", "--data", w / "x7.npy", "--labels", tmp / "y6.npy"]
        elif case == "missing-data":
            args[4] = tmp / "nope.npy"
        elif case == "batch-size-zero":
            args += ["--batch-size", "0"]
        elif case == "not-a-checkpoint":
            (tmp / "junk.pt").write_bytes(b"junk, neither zip nor pickle")
            args[2] = tmp / "junk.pt"
        elif case == "labels-out-of-range":
            args[6] = w / "y_big.npy"
        return args
    if cmd in ("report", "export"):
        ts = _copy_set(w, tmp)
        if case == "missing-folder":
            ts = tmp / "nope"
        elif case == "future-schema":
            _edit(ts, lambda m: m.update(schema_version=99))
        args = [cmd, ts, "--out", tmp / "exported"]
        if cmd == "export":
            args += ["--format", "parquet"] + (["--temperatures", "3"] if case == "unstored-temperature" else [])
        return args
    if cmd == "specialists":
        return ["specialists", "plan", tmp / "nope" if case == "missing-set" else _copy_set(w, tmp), "--count",
                "0" if case == "count-zero" else "2", "--out", tmp / "plan.json"]
    if cmd == "shift-bias":
        return ["shift-bias", tmp / "nope.pt", "--shift", "3=1" if case == "missing-model" else "three",
                "--out", tmp / "b.pt"]
    if cmd == "sweep":
        args = ["sweep", "--transfer-set", tmp / "nope" if case == "missing-set" else _copy_set(w, tmp), "--out",
                tmp / "sw", "--student", "mlp:8", "--epochs", "1", "--device", "cpu", "-q"]
        return args + {"missing-set": ["--holdout", "0.2"], "no-eval-data": [],
                       "alpha-out-of-range": ["--holdout", "0.2", "--alphas", "0,2"],
                       "holdout-and-eval-data": ["--holdout", "0.2", "--eval-data", w / "x.npy"],
                       "holdout-leaves-nothing": ["--holdout", "0.999"]}[case]
    if cmd == "inspect":
        if case == "not-a-model":
            (tmp / "bad.onnx").write_bytes(b"not an onnx model")
            return ["inspect", tmp / "bad.onnx"]
        return ["inspect", tmp / "nope.onnx"]
    if cmd == "demo":
        if case == "out-is-a-file":
            (tmp / "demo").write_text("x")
            return ["demo", "--quick", "--out", tmp / "demo", "--device", "cpu", "-q"]
        if case == "bad-device":
            return ["demo", "--quick", "--out", tmp / "demo", "--device", "tpu:7", "-q"]
        return ["demo", "--fast"]
    raise AssertionError(cmd)


@pytest.mark.parametrize("cmd, case, code, needle", BAD_INPUT, ids=[f"{c}-{k}" for c, k, _, _ in BAD_INPUT])
def test_bad_input_on_every_command_ends_with_one_line(world, tmp_path, capsys, cmd, case, code, needle):
    args = _prepare(cmd, case, world, tmp_path)
    got, err, out = _run_cli(args, capsys)
    assert got == code, err
    text = "\n".join(err)
    assert "Traceback" not in text and needle in err[-1], err
    if cmd == "verify" and code == 1:  # one BAD line per problem, then the verdict
        assert err[0].startswith("BAD shard-00002.h5") and all(e.startswith("BAD ") for e in err[:-1])
    else:
        assert len(err) == 1, err
    if cmd == "train-student":  # nothing half-made is left where a user would take it for a result
        assert not (tmp_path / "run" / "student.pt").exists()
    if cmd == "demo" and case == "bad-device":
        assert not (tmp_path / "demo").exists()
    if cmd == "label" and (tmp_path / "out").is_dir():
        assert not list((tmp_path / "out").glob("shard-*.h5"))


def test_every_command_is_covered_by_the_bad_input_table():
    from transferset.cli import cli

    assert set(cli.commands) == {c for c, *_ in BAD_INPUT}


# -- crashes ------------------------------------------------------------------------------------------------------
def test_crash_script_quick_trials_pass():
    """scripts/crash_test.py: SIGKILL label and train-student --resume at random moments; results unchanged."""
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "crash_test.py"), "--trials", "2", "--train-trials", "1",
                        "--max-kills", "1", "--quick", "--json", "--seed", "1"], env=ENV, cwd=str(REPO),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["label"]["passed"] == 2 and res["train"]["passed"] == 1
    assert res["label"]["kills"] >= 2 and res["train"]["kills"] >= 1
    assert res["label"]["manifest_reads"] > 0


@pytest.mark.slow
def test_crash_script_photo_parts_leg_passes():
    """crash_test --photos --parts 2: a photo folder with corrupt files labelled in 2 parts killed at random gives
    the bytes of one process (bad files' rows kept and marked), and a student trains from it."""
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "crash_test.py"), "--photos", "--parts", "2",
                        "--trials", "2", "--train-trials", "1", "--max-kills", "1", "--quick", "--json", "--seed", "2"],
                       env=ENV, cwd=str(REPO), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["label"]["passed"] == 2 and res["parts"] == 2


def test_train_resume_after_kill_past_the_last_checkpoint_still_writes_the_weights(world, tmp_path, monkeypatch):
    """A kill after the final checkpoint but before student.pt: the resume must write student.pt, not skip it."""
    import transferset.training.run_folder as tr

    opts = TrainOptions(student="mlp:8", epochs=2, batch_size=8, device="cpu", quiet=True, checkpoint_every=2)
    train_student(world / "ts", tmp_path / "full", opts)
    real = tr._atomic_save

    def dies_at_the_weights(obj, path):
        if path.name == "student.pt":
            raise KeyboardInterrupt
        return real(obj, path)

    monkeypatch.setattr(tr, "_atomic_save", dies_at_the_weights)
    with pytest.raises(KeyboardInterrupt):
        train_student(world / "ts", tmp_path / "part", opts)
    monkeypatch.setattr(tr, "_atomic_save", real)
    assert not (tmp_path / "part" / "student.pt").exists()
    res = train_student(world / "ts", tmp_path / "part", TrainOptions(**{**opts.__dict__, "resume": True}))
    assert res.status == "already-complete"
    a = torch.load(tmp_path / "full" / "student.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "student.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


# -- disk full and I/O errors -------------------------------------------------------------------------------------
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["shard-data", "shard-rename", "manifest", "lock-permission"])
def test_failed_write_gives_a_clear_line_keeps_what_was_listed_and_resumes(world, tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "ts"
    args = ["label", "--ensemble", world / "t.onnx", "--data", world / "x.npy", "--labels", world / "y.npy",
            "--out", out, "--shard-size", "10", "--batch-size", "4", "-q"]
    real_replace, real_open = os.replace, os.open
    calls = {"n": 0}
    if where == "shard-data":  # the third shard's data write hits a full disk inside h5py's write path
        real_set = h5py.Dataset.__setitem__

        def setitem(self, key, value):
            if "shard-00002" in self.file.filename:
                raise ENOSPC
            return real_set(self, key, value)
        monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    elif where == "shard-rename":
        def replace(src, dst, *a, **k):
            if str(dst).endswith("shard-00002.h5"):
                raise ENOSPC
            return real_replace(src, dst, *a, **k)
        monkeypatch.setattr(os, "replace", replace)
    elif where == "manifest":  # the shard is complete on disk, but its manifest update fails
        def replace(src, dst, *a, **k):
            if str(dst).endswith("manifest.json"):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise ENOSPC
            return real_replace(src, dst, *a, **k)
        monkeypatch.setattr(os, "replace", replace)
    else:  # a folder the user may not write (chmod does not stop root, so the refusal is raised where it would be)
        def open_(path, flags, *a, **k):
            if str(path).endswith(".lock"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *a, **k)
        monkeypatch.setattr(os, "open", open_)
    code, err, _ = _run_cli(args, capsys)
    assert code == 1 and len(err) == 1 and "Traceback" not in err[0], err
    needle = "Permission denied" if where == "lock-permission" else "No space left on device"
    assert needle in err[0] and ("resume" in err[0] or "writable" in err[0]), err
    monkeypatch.undo()
    if where != "lock-permission":
        m = load_manifest(out)
        assert [s["path"] for s in m["shards"]] == ["shard-00000.h5", "shard-00001.h5"] and not m["complete"]
        assert verify_transfer_set(out) == []
        assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]
    code, err, printed = _run_cli(args, capsys)
    assert code == 0 and ("resumed" in printed or where == "lock-permission"), err
    ref = load_manifest(world / "ts")
    assert [s["sha256"] for s in load_manifest(out)["shards"]] == [s["sha256"] for s in ref["shards"]]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through chmod")
def test_read_only_folder_is_refused_with_a_clear_line(world, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, err, _ = _run_cli(["label", "--ensemble", world / "t.onnx", "--data", world / "x.npy", "--out", out,
                                 "-q"], capsys)
    finally:
        out.chmod(0o755)
    assert code == 1 and len(err) == 1 and "cannot write there" in err[0]


# -- corruption ---------------------------------------------------------------------------------------------------
def test_verify_names_a_truncated_shard_even_in_quick_mode(world, tmp_path, capsys):
    ts = _copy_set(world, tmp_path)
    _truncate(ts / "shard-00001.h5", 0.99)
    for extra in ([], ["--quick"]):
        code, err, _ = _run_cli(["verify", ts, *extra], capsys)
        assert code == 1 and err[0].startswith("BAD shard-00001.h5") and "bytes on disk" in err[0]
        assert len(err) == 2


class _FailingDataset:
    def __init__(self, name):
        self.name = name

    def __getitem__(self, key):
        raise OSError(f"Can't synchronously read data (inflate() failed) in {self.name}")

    def read_direct(self, dest, source_sel=None, dest_sel=None):  # the streaming reader reads in place
        self[source_sel]


@pytest.mark.parametrize("in_memory, workers", [("yes", 0), ("no", 0), ("no", 1)])
def test_train_stops_naming_a_shard_that_fails_mid_run_and_skips_it_loudly(world, tmp_path, capfd, monkeypatch,
                                                                           in_memory, workers):
    capsys = capfd  # file-descriptor capture: a DataLoader worker's warning is written by another process
    import transferset.format.reading as rd

    real_get = rd.ShardFiles.get

    def get(self, shard):
        f = real_get(self, shard)
        if self.paths[shard].name == "shard-00002.h5":
            return {n: _FailingDataset(n) for n in f}
        return f

    args = ["train-student", "--transfer-set", world / "ts", "--out", tmp_path / "run", "--student", "mlp:8",
            "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--in-memory", in_memory, "-q",
            "--num-workers", workers]
    if workers:
        # A fresh process forks the DataLoader worker: forking the test process itself, after the threads and
        # pools that earlier tests started, once hung the worker inside torch's seeding.
        _worker_failure_in_a_subprocess(args, tmp_path)
        return
    monkeypatch.setattr(rd.ShardFiles, "get", get)
    code, err, _ = _run_cli(args, capsys)
    assert code == 1 and len(err) == 1 and "shard-00002.h5" in err[0] and "--skip-bad-shards" in err[0], err
    assert not (tmp_path / "run" / "student.pt").exists()
    code, err, out = _run_cli(args + ["--skip-bad-shards"], capsys)
    assert code == 0 and "trained 2 epochs" in out
    warnings = [e for e in err if "WARNING" in e and "shard-00002.h5" in e]
    assert warnings, err


_FAILING_MAIN = """
import sys
import transferset.format.reading as rd
from transferset.cli import main

class Failing:
    def __init__(self, name):
        self.name = name
    def __getitem__(self, key):
        raise OSError(f"Can't synchronously read data (inflate() failed) in {self.name}")
    def read_direct(self, dest, source_sel=None, dest_sel=None):
        self[source_sel]

real_get = rd.ShardFiles.get
def get(self, shard):
    f = real_get(self, shard)
    return {n: Failing(n) for n in f} if self.paths[shard].name == "shard-00002.h5" else f
rd.ShardFiles.get = get
main(sys.argv[1:])
"""


def _worker_failure_in_a_subprocess(args, tmp_path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, "-c", _FAILING_MAIN, *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "shard-00002.h5" in err[-1] and "--skip-bad-shards" in err[-1], err
    assert not (tmp_path / "run" / "student.pt").exists()
    p = subprocess.run(cmd + ["--skip-bad-shards"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and "trained 2 epochs" in p.stdout, p.stderr[-2000:]
    assert any("WARNING" in e and "shard-00002.h5" in e for e in p.stderr.splitlines()), p.stderr


# -- safety of shared data ----------------------------------------------------------------------------------------
def test_strings_from_a_manifest_are_printed_escaped(world, tmp_path, capsys):
    ts = _copy_set(world, tmp_path)
    _edit(ts, lambda m: (m.update(class_names=["\x1b[31mred", "two\nlines", "ok", "café", "\u202eevil"]),
                         m["teachers"][0].update(file="t\x1b]0;owned\x07.onnx")))
    code, err, out = _run_cli(["info", ts], capsys)
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[31mred" in out and "two\\nlines" in out and "café" in out
    assert all(":" in line for line in out.splitlines())  # no line forged by a newline in a class name
    code, err, out = _run_cli(["info", ts, "--json"], capsys)
    assert json.loads(out)["class_names"][0] == "\x1b[31mred" and "\x1b" not in out  # JSON escapes it


def test_a_path_in_an_error_is_printed_escaped(world, tmp_path, capsys):
    ts = tmp_path / "set\x1b[2J"
    import shutil

    shutil.copytree(world / "ts", ts)
    (ts / "shard-00000.h5").unlink()
    code, err, _ = _run_cli(["train-student", "--transfer-set", ts, "--out", tmp_path / "run", "--device", "cpu", "-q"],
                            capsys)
    assert code == 2 and len(err) == 1 and "\x1b" not in err[0] and "set\\x1b[2J" in err[0]


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_checkpoints_are_never_unpickled(world, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": _Boom(marker)}, run / "checkpoint.pt")
    torch.save({"model": {}, "student_spec": _Boom(marker)}, tmp_path / "evil.pt")
    code, err, _ = _run_cli(["train-student", "--transfer-set", world / "ts", "--out", run, "--student", "mlp:8",
                             "--epochs", "1", "--device", "cpu", "--resume", "-q"], capsys)
    assert code == 2 and "unreadable checkpoint" in err[0]
    code, err, _ = _run_cli(["evaluate", "--model", tmp_path / "evil.pt", "--data", world / "x.npy", "--labels",
                             world / "y.npy"], capsys)
    assert code == 2 and "not a transferset student checkpoint" in err[0]
    assert not marker.exists()


def test_a_checkpoint_naming_code_is_not_imported(world, tmp_path, capsys, monkeypatch):
    (tmp_path / "sneaky_mod.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
                                            "def net(input_shape, num_classes):\n    raise SystemExit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ck = torch.load(world / "run" / "student.pt", weights_only=True)
    ck["student_spec"] = {**ck["student_spec"], "spec": "sneaky_mod.x:net"}
    torch.save(ck, tmp_path / "s.pt")
    code, err, _ = _run_cli(["evaluate", "--model", tmp_path / "s.pt", "--data", world / "x.npy", "--labels",
                             world / "y.npy"], capsys)
    assert code == 2 and "user code to import" in err[0] and "--allow-import" in err[0]
    assert not (tmp_path / "imported").exists()


# -- concurrency --------------------------------------------------------------------------------------------------
_HOLD_LOCK = ("import fcntl, os, sys, time\n"
              "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
              "os.write(fd, str(os.getpid()).encode()); print('held', flush=True); time.sleep(60)\n")


def test_second_label_is_refused_while_the_first_holds_the_folder_and_a_killed_holder_frees_it(world, tmp_path, capsys):
    out = tmp_path / "ts"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["label", "--ensemble", world / "t.onnx", "--data", world / "x.npy", "--out", out, "-q"]
        code, err, _ = _run_cli(args, capsys)
        assert code == 2 and len(err) == 1 and "another `transferset label` is writing this folder" in err[0]
        assert not (out / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").exists()  # the killed holder's file stays, but the kernel dropped its lock
    code, err, printed = _run_cli(args, capsys)
    assert code == 0 and "wrote 40 rows" in printed, err


def test_a_reader_during_writing_sees_only_complete_shards(world, tmp_path, monkeypatch):
    import transferset.format.shards as sh

    real_write = sh.ShardWriter.write

    def slow_write(self, start, arrays):
        time.sleep(0.02)
        return real_write(self, start, arrays)

    monkeypatch.setattr(sh.ShardWriter, "write", slow_write)
    out = tmp_path / "ts"
    done = threading.Event()
    errors = []

    def write():
        try:
            label([world / "t.onnx"], str(world / "x.npy"), out, LabelOptions(shard_size=5, batch_size=2, quiet=True))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=write)
    t.start()
    seen = set()
    while not done.is_set():
        if (out / "manifest.json").exists():
            m = load_manifest(out)
            assert verify_transfer_set(out) == []  # every listed shard is whole: rows, shapes and sha256
            seen.add(len(m["shards"]))
        time.sleep(0.005)
    t.join()
    assert not errors
    assert len(seen) >= 3 and load_manifest(out)["complete"]
    with pytest.raises(TransferSetError, match="incomplete"):
        _edit(out, lambda m: m.update(complete=False))
        train_student(out, tmp_path / "run", TrainOptions(student="mlp:8", epochs=1, device="cpu", quiet=True))


@pytest.mark.parametrize("debris", [".tmp-shard-00000.h5", "shard-00000.h5", ".manifest.json.tmp-123"])
def test_a_run_killed_before_its_first_manifest_resumes(world, tmp_path, capsys, debris):
    """Found by scripts/crash_test.py: a SIGKILL before the first manifest left debris that blocked the resume."""
    out = tmp_path / "ts"
    out.mkdir()
    (out / ".lock").write_text("4242")  # the killed run's lock file (its flock died with it)
    (out / debris).write_bytes(b"half a shard")
    args = ["label", "--ensemble", world / "t.onnx", "--data", world / "x.npy", "--labels", world / "y.npy",
            "--out", out, "--shard-size", "10", "--batch-size", "4", "-q"]
    code, err, printed = _run_cli(args, capsys)
    assert code == 0, err
    ref = load_manifest(world / "ts")
    assert [s["sha256"] for s in load_manifest(out)["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert not (out / debris).exists() or debris.startswith("shard-")


def test_shard_files_in_a_folder_label_never_locked_are_not_deleted(world, tmp_path, capsys):
    out = tmp_path / "ts"
    out.mkdir()
    (out / "shard-00000.h5").write_bytes(b"someone else's file")
    code, err, _ = _run_cli(["label", "--ensemble", world / "t.onnx", "--data", world / "x.npy", "--out", out, "-q"],
                            capsys)
    assert code == 2 and "not empty" in err[0]
    assert (out / "shard-00000.h5").read_bytes() == b"someone else's file"


def test_sha256_file_is_hashlib_over_the_whole_file(tmp_path):
    """The shard digest reads into one reused buffer: every block must be hashed once, the last one short."""
    import hashlib

    from transferset._io import _HASH_BLOCK, sha256_file

    rng = np.random.default_rng(5)
    for size in (0, 1, _HASH_BLOCK - 1, _HASH_BLOCK, 2 * _HASH_BLOCK + 7):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        (tmp_path / "f").write_bytes(data)
        assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest(), size
