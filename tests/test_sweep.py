"""transferset sweep and --holdout: grid runs are train-student runs, a killed sweep resumes, a holdout stays out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from teachers import export_teacher
from transferset.cli import main
from transferset.errors import TransferSetError
from transferset.labelling.pipeline import LabelOptions, label
from transferset.training import loop
from transferset.training.holdout import held_out_sources, open_holdout
from transferset.training.loop import TrainOptions, train_student
from transferset.training.sweep import SweepOptions, run_sweep, sweep_grid

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def viewed(tmp_path_factory):
    """A 4-class set of 120 source rows, each as its clean row and 2 noisy views (360 rows), and a test split."""
    tmp = tmp_path_factory.mktemp("viewed")
    rng = np.random.default_rng(1)
    teacher = export_teacher(tmp / "t.onnx", (8,), classes=4, hidden=16, seed=2)
    import onnxruntime as ort

    s = ort.InferenceSession(str(teacher), providers=["CPUExecutionProvider"])
    for name, n in (("train", 120), ("test", 100)):
        x = rng.normal(size=(n, 8)).astype(np.float32)
        np.savez(tmp / f"{name}.npz", x=x, y=s.run(None, {"x": x})[0].argmax(1))
    label([teacher], str(tmp / "train.npz"), tmp / "ts",
          LabelOptions(augment="noise:0.2", views=2, shard_size=100, temperatures=(1, 4), quiet=True))
    return tmp


def _base(tmp: Path, **kw) -> TrainOptions:
    o = dict(student="mlp:16", epochs=2, batch_size=32, lr=3e-3, quiet=True, device="cpu", threads=1,
             eval_data=str(tmp / "test.npz"))
    o.update(kw)
    return TrainOptions(**o)


def _weights(run: Path) -> dict:
    return torch.load(run / "student.pt", weights_only=True)["model"]


def test_grid_runs_are_the_runs_train_student_makes(viewed, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--transfer-set", str(viewed / "ts"), "--student", "mlp:16", "--out", str(tmp_path / "sw"),
              "--temperatures", "2", "--alphas", "0.5", "--epochs", "2", "--batch-size", "32", "--lr", "3e-3",
              "--eval-data", str(viewed / "test.npz"), "--device", "cpu", "--threads", "1", "-q"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "control" in out and "kd-T2-a0.5" in out and "best:" in out
    res = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["name"] for r in res["runs"]] == ["control", "kd-T2-a0.5"] and res["complete"]
    assert all(r["n"] == 100 and r["errors"] is not None for r in res["runs"])
    for name, flags in (("control", ["--alpha", "0"]), ("kd-T2-a0.5", ["--alpha", "0.5", "-T", "2"])):
        with pytest.raises(SystemExit) as e:
            main(["train-student", "--transfer-set", str(viewed / "ts"), "--student", "mlp:16", "--out",
                  str(tmp_path / name), "--epochs", "2", "--batch-size", "32", "--lr", "3e-3", "--eval-data",
                  str(viewed / "test.npz"), "--device", "cpu", "--threads", "1", "-q", *flags])
        assert e.value.code == 0
        mine, grid = (json.loads((p / "config.json").read_text()) for p in (tmp_path / name, tmp_path / "sw" / name))
        keep = lambda c: {k: v for k, v in c["options"].items() if k != "resume"}  # noqa: E731
        assert keep(mine) == keep(grid) and mine["manifest_hash"] == grid["manifest_hash"]
        a, b = _weights(tmp_path / name), _weights(tmp_path / "sw" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the report page's heatmap holds the control on the alpha-0 row
    from transferset.report import sweep_heatmap

    alphas, temps, grid = sweep_heatmap(res)
    assert alphas == [0.0, 0.5] and temps == [2.0] and grid[0, 0] == res["runs"][0]["errors"]


def test_train_student_compares_with_the_sweeps_control(viewed, tmp_path, capsys):
    base = _base(viewed)
    res = run_sweep(viewed / "ts", tmp_path / "sw", base, SweepOptions(temperatures=(4,), alphas=(0.9,)))
    with pytest.raises(SystemExit) as e:
        main(["train-student", "--transfer-set", str(viewed / "ts"), "--student", "mlp:16", "--out",
              str(tmp_path / "sw" / "mine"), "--epochs", "2", "--batch-size", "32", "--lr", "3e-3", "--eval-data",
              str(viewed / "test.npz"), "--device", "cpu", "-T", "1", "--alpha", "0.7", "-q"])
    out = capsys.readouterr().out
    control = res["runs"][0]["errors"]
    assert e.value.code == 0 and f"against the hard-label control {tmp_path / 'sw' / 'control'}" in out
    assert f"vs {control} errors" in out
    # another spec (other epochs) has no control beside it: no comparison line
    with pytest.raises(SystemExit) as e:
        main(["train-student", "--transfer-set", str(viewed / "ts"), "--student", "mlp:16", "--out",
              str(tmp_path / "sw" / "other"), "--epochs", "1", "--eval-data", str(viewed / "test.npz"),
              "--device", "cpu", "-q"])
    assert e.value.code == 0 and "hard-label control" not in capsys.readouterr().out


def test_a_killed_sweep_resumes_at_the_next_unfinished_run(viewed, tmp_path, capsys):
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "transferset", "sweep", "--transfer-set", str(viewed / "ts"), "--student",
           "mlp:16", "--out", str(out), "--temperatures", "1,2,4", "--alphas", "0.5", "--epochs", "10",
           "--batch-size", "16", "--eval-data", str(viewed / "test.npz"), "--device", "cpu", "--threads", "1", "-q"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "control" / "student.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    finished = sorted(p.parent.name for p in out.glob("*/student.pt"))
    assert "control" in finished and len(finished) < 4  # killed inside the grid, not after it
    stamps = {n: ((out / n / "student.pt").stat().st_mtime_ns, (out / n / "student.pt").read_bytes()) for n in finished}
    res = run_sweep(viewed / "ts", out, _base(viewed, epochs=10, batch_size=16, lr=None),
                    SweepOptions(temperatures=(1, 2, 4), alphas=(0.5,)))
    assert res["finished_before"] == len(finished)
    assert res["complete"] and len(res["runs"]) == 4
    for n, (mtime, data) in stamps.items():  # finished runs were not redone
        p = out / n / "student.pt"
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    assert all(len((out / r["name"] / "metrics.jsonl").read_text().splitlines()) == 10 for r in res["runs"])


def test_a_sweep_folder_of_another_sweep_is_refused(viewed, tmp_path):
    run_sweep(viewed / "ts", tmp_path / "sw", _base(viewed, epochs=1), SweepOptions(temperatures=(4,), alphas=(0.9,)))
    with pytest.raises(TransferSetError, match="other options .*epochs"):
        run_sweep(viewed / "ts", tmp_path / "sw", _base(viewed, epochs=2), SweepOptions(temperatures=(4,), alphas=(0.9,)))
    other = tmp_path / "ts2"
    label([viewed / "t.onnx"], str(viewed / "test.npz"), other, LabelOptions(temperatures=(1, 4), quiet=True))
    with pytest.raises(TransferSetError, match="another transfer set"):
        run_sweep(other, tmp_path / "sw", _base(viewed, epochs=1), SweepOptions(temperatures=(4,), alphas=(0.9,)))


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_holdout_never_trains_on_a_held_out_source_rows_views(viewed, tmp_path, monkeypatch, in_memory):
    seen = []
    step = loop.Trainer.train_step

    def spy(self, batch):
        seen.append(batch["index"][batch["mask"]].cpu().numpy())
        return step(self, batch)

    monkeypatch.setattr(loop.Trainer, "train_step", spy)
    o = _base(viewed, eval_data=None, holdout=0.25, epochs=1, in_memory=in_memory)
    res = train_student(viewed / "ts", tmp_path / "run", o)
    ho = open_holdout(viewed / "ts", 0.25, o.seed)
    trained = np.concatenate(seen)
    src = trained // 3  # 3 rows per source row, source-major (docs/CONTRACTS.md)
    assert len(ho.sources) == 30 and not np.isin(src, ho.sources).any()
    # every other row is trained on exactly once in the epoch: held-out views are all that is missing
    assert np.array_equal(np.sort(trained), np.flatnonzero(~np.isin(np.arange(360) // 3, ho.sources)))
    assert res.metrics[-1]["eval_n"] == 30  # scored on each held-out source row's clean row


def test_holdout_split_is_seeded_and_refuses_bad_fractions(viewed):
    s = np.repeat(np.arange(50), 3)
    a, b, c = held_out_sources(s, 0.2, 0), held_out_sources(s, 0.2, 0), held_out_sources(s, 0.2, 1)
    assert len(a) == 10 and np.array_equal(a, b) and not np.array_equal(a, c)
    for bad in (0.0, 1.0, 0.999):
        with pytest.raises(TransferSetError, match="holdout|hold out"):
            held_out_sources(s, bad, 0)
    with pytest.raises(TransferSetError, match="evaluation data, not both"):
        TrainOptions(holdout=0.1, eval_data="x.npz").validate()


def test_sweep_refuses_bad_input_in_one_line(viewed, tmp_path, capsys):
    for args, text in ((["--alphas", "0,1.5"], "--alphas must lie in [0, 1]"),
                       (["--losses", "kd,mse"], "--losses ['mse']: choose from kd and logit-mse"),
                       ([], "--eval-data needs data to score the runs on")):
        with pytest.raises(SystemExit) as e:
            main(["sweep", "--transfer-set", str(viewed / "ts"), "--out", str(tmp_path / "sw"), *args,
                  *(["--holdout", "0.2"] if args else [])])
        err = capsys.readouterr().err
        assert e.value.code == 2 and text in err and len(err.strip().splitlines()) == 1


def test_grid_has_one_control_and_logit_mse_ignores_temperature(viewed):
    pts = sweep_grid(_base(viewed), SweepOptions(temperatures=(1, 4), alphas=(0, 0.5, 0.9), losses=("kd", "logit-mse")))
    names = [p.name for p in pts]
    assert names == ["control", "kd-T1-a0.5", "kd-T4-a0.5", "kd-T1-a0.9", "kd-T4-a0.9", "logit-mse-a0.5",
                     "logit-mse-a0.9"]
    assert all(asdict(p.options)["student"] == "mlp:16" for p in pts) and pts[0].options.alpha == 0


def test_without_matplotlib_the_sweep_still_prints_its_table_and_says_why_no_page(viewed, tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--transfer-set", str(viewed / "ts"), "--student", "mlp:8", "--out", str(tmp_path / "sw"),
              "--temperatures", "4", "--alphas", "0.9", "--epochs", "1", "--holdout", "0.2", "--device", "cpu", "-q"])
    got = capsys.readouterr()
    assert e.value.code == 0 and "best:" in got.out and (tmp_path / "sw" / "sweep.json").is_file()
    assert got.err.strip() == "no report page: report needs matplotlib: pip install 'transferset[report]'"


@pytest.mark.slow
def test_jobs_2_trains_the_same_runs_in_worker_processes(viewed, tmp_path):
    grid = SweepOptions(temperatures=(2, 4), alphas=(0.5,))
    one = run_sweep(viewed / "ts", tmp_path / "one", _base(viewed), grid)
    two = run_sweep(viewed / "ts", tmp_path / "two", _base(viewed), replace(grid, jobs=2))
    assert [r["errors"] for r in one["runs"]] == [r["errors"] for r in two["runs"]] and two["complete"]
    for r in one["runs"]:
        a, b = _weights(tmp_path / "one" / r["name"]), _weights(tmp_path / "two" / r["name"])
        assert all(torch.equal(a[k], b[k]) for k in a)

