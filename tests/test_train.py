"""Stage 2 end to end: a student learns from shards alone, resumes exactly, exports to ONNX."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from teachers import export_teacher
from transferset.cli import main
from transferset.errors import TransferSetError
from transferset.evaluate import evaluate
from transferset.labelling.pipeline import LabelOptions, label
from transferset.training.loop import TrainOptions, train_student


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """A 4-class problem whose 'truth' is an ONNX teacher; a transfer set of 600 rows plus a test split."""
    tmp = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(0)
    teacher = export_teacher(tmp / "t.onnx", (12,), classes=4, hidden=32, seed=3)
    import onnxruntime as ort

    s = ort.InferenceSession(str(teacher), providers=["CPUExecutionProvider"])
    for name, n in (("train", 600), ("test", 300)):
        x = rng.normal(size=(n, 12)).astype(np.float32)
        y = s.run(None, {"x": x})[0].argmax(1)
        np.savez(tmp / f"{name}.npz", x=x, y=y)
    label([teacher], str(tmp / "train.npz"), tmp / "ts", LabelOptions(shard_size=128, quiet=True))
    return tmp


def _opts(**kw):
    base = dict(student="mlp:64", epochs=3, batch_size=32, lr=3e-3, quiet=True, device="cpu")
    base.update(kw)
    return TrainOptions(**base)


def test_student_learns_from_the_transfer_set_alone(learnable):
    res = train_student(learnable / "ts", learnable / "run", _opts(eval_data=str(learnable / "test.npz"), epochs=6))
    assert res.metrics[-1]["eval_accuracy"] > 0.7  # chance is about 0.25
    lines = [json.loads(s) for s in (learnable / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(6)) and all(m["samples_per_s"] > 0 for m in lines)
    cfg = json.loads((learnable / "run" / "config.json").read_text())
    assert cfg["options"]["student"] == "mlp:64" and cfg["in_memory"] is True
    ck = torch.load(learnable / "run" / "student.pt", weights_only=True)
    assert ck["student_spec"]["spec"] == "mlp:64"


@pytest.mark.parametrize("kw", [
    dict(alpha=0.0),                                  # the hard-label baseline, same command
    dict(temperature=3.0),                            # not stored: recombined from the member logits
    dict(loss="logit-mse", alpha=1.0),
    dict(teacher_noise=0.5),
    dict(combine="mean-logits", temperature=4.0),
    dict(in_memory="no", num_workers=2),
    dict(optimizer="sgd", lr=0.05),
])
def test_loss_and_reader_variants_train(learnable, tmp_path, kw):
    res = train_student(learnable / "ts", tmp_path / "run", _opts(eval_data=str(learnable / "test.npz"), **kw))
    assert res.metrics[-1]["eval_accuracy"] > 0.5
    assert np.isfinite(res.metrics[-1]["loss"])


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_resume_mid_epoch_gives_identical_weights(learnable, tmp_path, monkeypatch, in_memory):
    import transferset.training.loop as tr

    opts = _opts(in_memory=in_memory, checkpoint_every=5, student="mlp:32,dropout=0.2", teacher_noise=0.3)
    train_student(learnable / "ts", tmp_path / "full", opts)
    real = tr.build_loss

    def dying_loss(*a, **k):
        fn = real(*a, **k)
        calls = {"n": 0}

        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 28:  # in the second epoch, 3 steps after the checkpoint at step 25
                raise KeyboardInterrupt
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(tr, "build_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train_student(learnable / "ts", tmp_path / "part", opts)
    monkeypatch.setattr(tr, "build_loss", real)
    res = train_student(learnable / "ts", tmp_path / "part", TrainOptions(**{**opts.__dict__, "resume": True}))
    assert len(res.metrics) == 3
    a = torch.load(tmp_path / "full" / "student.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "student.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = train_student(learnable / "ts", tmp_path / "part", TrainOptions(**{**opts.__dict__, "resume": True}))
    assert again.status == "already-complete"


def test_resume_refuses_other_options(learnable, tmp_path):
    train_student(learnable / "ts", tmp_path / "run", _opts(epochs=1))
    with pytest.raises(TransferSetError, match="other options"):
        train_student(learnable / "ts", tmp_path / "run", _opts(epochs=1, lr=0.1, resume=True))


def test_resume_accepts_runtime_options_and_names_the_changed_one(learnable, tmp_path):
    """--quiet, --threads or --checkpoint-every change how a run goes, not what it computes: resume allows them."""
    train_student(learnable / "ts", tmp_path / "run", _opts(epochs=1))
    threads = torch.get_num_threads()
    try:
        r = train_student(learnable / "ts", tmp_path / "run",
                          _opts(epochs=1, resume=True, quiet=False, threads=1, checkpoint_every=5))
        assert r.metrics and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(TransferSetError, match=r"other options .*\(lr\)"):
        train_student(learnable / "ts", tmp_path / "run", _opts(epochs=1, lr=0.1, resume=True))


def test_an_existing_run_is_refused_without_resume_or_overwrite(learnable, tmp_path, capsys):
    """A second run into a run folder must not silently replace it: one line, exit 2, the old files untouched."""
    train_student(learnable / "ts", tmp_path / "run", _opts(epochs=1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(SystemExit) as e:
        main(["train-student", "--transfer-set", str(learnable / "ts"), "--student", "mlp:8", "--out",
              str(tmp_path / "run"), "--epochs", "1", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "--out" in err and "holds a run already" in err and "--resume" not in err  # flags spelled by the CLI only
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    with pytest.raises(TransferSetError, match="choose one"):
        train_student(learnable / "ts", tmp_path / "run", _opts(epochs=1, resume=True, overwrite=True))


def test_overwrite_keeps_the_old_run_until_the_new_one_starts(learnable, tmp_path):
    train_student(learnable / "ts", tmp_path / "run", _opts(epochs=2))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(TransferSetError, match="no-such-student"):  # fails to start: nothing of the old run goes
        train_student(learnable / "ts", tmp_path / "run", _opts(epochs=1, overwrite=True, student="no-such-student"))
    with pytest.raises(TransferSetError):  # nor when its eval data cannot be opened
        train_student(learnable / "ts", tmp_path / "run", _opts(epochs=1, overwrite=True,
                                                               eval_data=str(tmp_path / "missing.npz")))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    res = train_student(learnable / "ts", tmp_path / "run", _opts(epochs=1, overwrite=True, student="mlp:8"))
    assert len(res.metrics) == 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads((tmp_path / "run" / "config.json").read_text())["options"]["student"] == "mlp:8"
    assert (tmp_path / "run" / "student.pt").read_bytes() != before["student.pt"]


def test_resume_accepts_a_checkpoint_written_before_an_option_existed(learnable, tmp_path):
    train_student(learnable / "ts", tmp_path / "run", _opts(epochs=1))
    path = tmp_path / "run" / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    config = json.loads(ck["config"])
    del config["options"]["shuffle_chunks"]  # as written by a version without that option
    ck["config"] = json.dumps(config)
    torch.save(ck, path)
    assert train_student(learnable / "ts", tmp_path / "run", _opts(epochs=1, resume=True)).metrics


def test_onnx_export_and_evaluate_agree(learnable, tmp_path):
    train_student(learnable / "ts", tmp_path / "run", _opts(export_onnx=str(tmp_path / "s.onnx"), epochs=6))
    pt = evaluate([tmp_path / "run" / "student.pt"], str(learnable / "test.npz"))
    ox = evaluate([tmp_path / "s.onnx"], str(learnable / "test.npz"))
    assert pt["errors"] == ox["errors"] and pt["n"] == ox["n"] == 300
    assert abs(pt["nll"] - ox["nll"]) < 1e-4 and abs(pt["ece"] - ox["ece"]) < 1e-4
    both = evaluate([tmp_path / "s.onnx"], str(learnable / "test.npz"), reference=[tmp_path / "run" / "student.pt"])
    assert both["agreement"] == 1.0
    # the exported student is a teacher again: the born-again loop
    res = label([tmp_path / "s.onnx"], str(learnable / "train.npz"), tmp_path / "ts2", LabelOptions(quiet=True))
    assert res.manifest["stats"]["ensemble_accuracy"] > 0.7


def test_cli_train_and_evaluate_json(learnable, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-student", "--transfer-set", str(learnable / "ts"), "--student", "mlp:32", "--out",
              str(tmp_path / "run"), "--epochs", "2", "--device", "cpu", "-q"])
    assert e.value.code == 0 and "trained 2 epochs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model", str(tmp_path / "run" / "student.pt"), "--data", str(learnable / "test.npz"), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert {"accuracy", "errors", "n", "nll", "ece"} <= set(res) and res["n"] == 300
    # what the student costs, beside what it scores: its parameters (12*32+32 + 32*4+4), its ONNX bytes, rows/s
    assert res["parameters"] == 548 and res["onnx_bytes"] > 548 * 4 and res["rows_per_s_1"] > 0 < res["rows_per_s_256"]
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--ensemble", str(learnable / "t.onnx"), "--data", str(learnable / "test.npz"), "--json"])
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0  # the truth is this teacher


def test_torchrun_ddp_two_ranks_on_cpu(learnable, tmp_path):
    """Scale-out goes through torchrun and DDP (gloo on CPU): two ranks train one student, rank 0 writes it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "transferset", "train-student", "--transfer-set", str(learnable / "ts"), "--out",
           str(tmp_path / "run"), "--student", "mlp:64", "--epochs", "8", "--batch-size", "32", "--lr", "3e-3",
           "--device", "cpu", "--in-memory", "no"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("trained 8 epochs") == 1, p.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["world_size"] == 2
    res = evaluate([tmp_path / "run" / "student.pt"], str(learnable / "test.npz"))
    assert res["accuracy"] > 0.5, res  # 4 classes: chance is 0.25


def test_a_non_finite_loss_stops_training_and_saves_no_student(learnable, tmp_path, monkeypatch):
    """The first non-finite loss ends the run with one TransferSetError (exit 1); no NaN student is written."""
    import transferset.training.loop as tr

    real = tr.build_loss

    def nan_after_two_steps(*args, **kw):
        loss = real(*args, **kw)
        calls = {"n": 0}

        def wrapped(*a, **k):
            res = loss(*a, **k)
            calls["n"] += 1
            if calls["n"] > 2:
                res["loss"] = res["loss"] * float("nan")
            return res
        return wrapped

    monkeypatch.setattr(tr, "build_loss", nan_after_two_steps)
    with pytest.raises(TransferSetError, match="step 3: the loss is nan") as e:
        train_student(learnable / "ts", tmp_path / "run", TrainOptions(student="mlp:16", epochs=1, batch_size=8,
                                                                device="cpu", quiet=True))
    assert e.value.exit_code == 1 and not (tmp_path / "run" / "student.pt").exists()


def test_warmup_cosine_ramps_linearly_then_falls_to_zero():
    """--warmup 0.2 of 100 steps: the factor climbs 1/20, 2/20, ... to 1 at step 19, then a cosine to 0 (the LM
    student's instability at 5% warm-up that lm_task's reading describes is what a longer warm-up cures)."""
    from transferset.training.loop import warmup_cosine

    f = warmup_cosine(100, 0.2)
    assert [f(s) for s in range(20)] == pytest.approx([(s + 1) / 20 for s in range(20)])
    after = [f(s) for s in range(20, 101)]
    assert after[0] == pytest.approx(1.0) and after[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(after, after[1:]))
    assert f(60) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine(10, 0.0)(0) == pytest.approx(1.0)  # no warm-up: the full rate at once
    assert warmup_cosine(10, 0.01)(0) == pytest.approx(1.0)  # under one step rounds to one step


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_is_fused_where_torch_has_the_kernel(name):
    """build_optimizer asks for the fused step; its update is the for-each optimizer's up to rounding, and a
    for-each optimizer's state loads into it (a checkpoint from before resumes)."""
    from transferset.training.loop import build_optimizer

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))

    o = TrainOptions(optimizer=name)
    net, ref = model(), model()
    opt, _ = build_optimizer(net, o, 10)
    cls = type(opt)
    kw = {k: opt.defaults[k] for k in ("lr", "weight_decay")}
    kw.update(dict(momentum=o.momentum, nesterov=True) if name == "sgd" else {})
    ref_opt = cls(ref.parameters(), foreach=True, **kw)
    torch_version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert opt.defaults["fused"] is (True if torch_version >= (2, 4) else None)
    x = torch.randn(8, 6)
    for _ in range(3):
        for m, op in ((net, opt), (ref, ref_opt)):
            op.zero_grad()
            m(x).square().mean().backward()
            op.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    opt.load_state_dict(ref_opt.state_dict())  # for-each state into the fused optimizer


def test_fused_falls_back_to_for_each_where_there_is_no_kernel():
    from transferset.training.loop import fused

    class NoFused(torch.optim.AdamW):
        def __init__(self, params, fused=None, **kw):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                                   "devices")
            super().__init__(params, **kw)

    opt = fused(NoFused, torch.nn.Linear(2, 2), lr=1e-3)
    assert isinstance(opt, NoFused) and not opt.defaults.get("fused") and len(opt.param_groups[0]["params"]) == 2
