"""Hints (issue 23): intermediate teacher tensors stored per row; the reductions, the format, inspect, reteach."""

from __future__ import annotations

import json
import warnings

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from transferset.cli import main
from transferset.errors import TransferSetError
from transferset.format.schema import Manifest
from transferset.format.verify import verify_transfer_set
from transferset.labelling.hints import hint_disagreement, parse_hint, reduce_hint
from transferset.labelling.pipeline import LabelOptions, label

HINT = "/c2/Conv_output_0"


class _TinyCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        h = torch.relu(self.c1(x.float().unsqueeze(1) / 255.0))
        h = torch.max_pool2d(torch.relu(self.c2(h)), 2)
        return self.fc(h.flatten(1))


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TinyCnn().eval(), (torch.zeros(2, 8, 8, dtype=torch.uint8),), str(path),
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def _raw(teacher, x, name=HINT):
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(teacher))
    m.graph.output.append(onnx.ValueInfoProto(name=name))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run([name], {"image": x})[0]


@pytest.fixture(scope="module")
def hint_set(tmp_path_factory, cnn_teacher):
    d = tmp_path_factory.mktemp("hints")
    x = np.random.default_rng(0).integers(0, 256, (40, 8, 8)).astype(np.uint8)
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", np.arange(40) % 5)
    hints = (f"{HINT}:reduce=avgpool", f"{HINT}:reduce=attention", f"{HINT}:reduce=sign", HINT)
    label([cnn_teacher], str(d / "x.npy"), d / "ts", LabelOptions(quiet=True, shard_size=16, batch_size=8,
                                                                   labels=str(d / "y.npy"), hints=hints))
    return d, x


def test_reductions_against_numpy_by_hand():
    a = np.array([[[[1.0, -2.0], [0.0, 3.0]], [[-1.0, 0.5], [2.0, 0.0]]]], np.float32)  # [1, C=2, 2, 2]
    np.testing.assert_allclose(reduce_hint(a, "avgpool"), [[0.5, 0.375]])
    amap = np.array([1 + 1, 4 + 0.25, 0 + 4, 9 + 0])  # sum over channels of squares, row-major
    np.testing.assert_allclose(reduce_hint(a, "attention"), [amap / np.sqrt((amap ** 2).sum())], rtol=1e-6)
    # sign: flattened [1, -2, 0, 3, -1, 0.5, 2, 0] > 0 -> 1 0 0 1 0 1 1 0 = 0b10010110
    assert reduce_hint(a, "sign").tolist() == [[0b10010110]]
    assert reduce_hint(a, "none").shape == (1, 2, 2, 2)
    assert reduce_hint(np.zeros((2, 3, 2, 2), np.float32), "attention").tolist() == [[0.0] * 4] * 2
    with pytest.raises(TransferSetError, match="attention needs"):
        reduce_hint(np.ones((2, 5), np.float32), "attention")


def test_parse_hint():
    h = parse_hint("a/b:c:reduce=sign:member=2")
    assert (h.tensor, h.member, h.reduce) == ("a/b:c", 2, "sign")
    assert parse_hint("x").reduce == "none"
    with pytest.raises(TransferSetError, match="reduce 'max'"):
        parse_hint("x:reduce=max")


def test_hint_set_stores_the_reduced_tensors(hint_set, cnn_teacher):
    d, x = hint_set
    m = json.loads((d / "ts" / "manifest.json").read_text())
    assert m["schema_version"] == 4
    assert [(h["field"], h["reduce"], h["shape"], h["dtype"]) for h in m["hints"]] == [
        ("hint_0", "avgpool", [6], "float16"), ("hint_1", "attention", [64], "float16"),
        ("hint_2", "sign", [48], "uint8"), ("hint_3", "none", [6, 8, 8], "float16")]
    raw = _raw(cnn_teacher, x)
    with h5py.File(d / "ts" / "shard-00000.h5") as f:
        np.testing.assert_allclose(f["hint_0"][:].astype(np.float32), raw[:16].mean(axis=(2, 3)), rtol=2e-3, atol=1e-3)
        assert (np.unpackbits(f["hint_2"][:], axis=1) == (raw[:16].reshape(16, -1) > 0)).all()
        np.testing.assert_allclose(f["hint_3"][:].astype(np.float32), raw[:16], rtol=2e-3, atol=2e-3)
    assert verify_transfer_set(d / "ts") == []
    card = (d / "ts" / "README.md").read_text()
    assert "## Hints" in card and "| hint_3 | `/c2/Conv_output_0` | 0 | none | [6, 8, 8] | [6, 8, 8] float16 | 768 |" in card


def test_reteach_checks_hints_and_names_an_edited_one(hint_set, cnn_teacher, tmp_path, capsys):
    import shutil

    d, _ = hint_set
    main_ok = ["verify", str(d / "ts"), "--reteach", "40", "--teachers", str(cnn_teacher)]
    with pytest.raises(SystemExit) as e:
        main(main_ok)
    assert e.value.code == 0, capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(d / "ts", bad)
    with h5py.File(bad / "shard-00001.h5", "r+") as f:
        v = f["hint_1"][:]
        v[2, 5] += 0.25
        f["hint_1"][:] = v
    with pytest.raises(SystemExit) as e:
        main(["verify", str(bad), "--quick", "--reteach", "40", "--teachers", str(cnn_teacher)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "row 18" in err and "hint_1" in err and "value 5" in err


def test_hint_disagreement_tolerates_noise_at_zero_only():
    raw = np.array([[0.5, -1e-7, -0.3]], np.float32)
    ok = np.packbits(np.array([[1, 1, 0]], bool), axis=1)  # the -1e-7 bit may cross zero
    assert hint_disagreement(ok, raw, "sign")[1] is None
    assert hint_disagreement(np.packbits(np.array([[1, 0, 1]], bool), axis=1), raw, "sign")[1] == (0, 2)


def test_unknown_tensor_and_member_are_one_line(cnn_teacher, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
    for hint, what in (("/nope/Relu", "has no tensor named '/nope/Relu'"), (f"{HINT}:member=1", "member=1")):
        with pytest.raises(SystemExit) as e:
            main(["label", "--ensemble", str(cnn_teacher), "--data", str(tmp_path / "x.npy"), "--out",
                  str(tmp_path / "ts"), "--hint", hint, "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and what in err[0]


def test_hint_changes_the_definition(hint_set, cnn_teacher, capsys):
    d, _ = hint_set
    with pytest.raises(SystemExit) as e:  # the same folder with other hints is another set
        main(["label", "--ensemble", str(cnn_teacher), "--data", str(d / "x.npy"), "--out", str(d / "ts"),
              "--shard-size", "16", "--batch-size", "8", "--labels", str(d / "y.npy"), "--hint", HINT, "-q"])
    assert e.value.code == 2


def test_manifest_refuses_inconsistent_hints(hint_set):
    d, _ = hint_set
    m = json.loads((d / "ts" / "manifest.json").read_text())
    for edit in (lambda h: h[0].__setitem__("shape", [7]), lambda h: h[2].__setitem__("dtype", "float16"),
                 lambda h: h[1].__setitem__("member", 1), lambda h: h[0].__setitem__("field", "inputs"),
                 lambda h: h[3].__setitem__("tensor_shape", [10 ** 6, 10 ** 6, 10 ** 6])):
        bad = json.loads(json.dumps(m))
        edit(bad["hints"])
        with pytest.raises(TransferSetError, match="hints"):
            Manifest.from_json(bad)


def test_inspect_lists_tensors_and_the_contract(cnn_teacher, capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(cnn_teacher), "--json"])
    assert e.value.code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["contract"]["input_name"] == "image" and res["contract"]["output_name"] == "logits"
    assert res["contract"]["output_kind"] == "logits"
    conv = next(t for t in res["tensors"] if t["name"] == HINT)
    assert conv["shape"] == ["N", 6, 8, 8] and conv["shape_from"] == "run" and conv["values_per_row"] == 384
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(cnn_teacher)])
    out = capsys.readouterr().out
    assert HINT in out and "label will feed input 'image'" in out
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(cnn_teacher) + ".missing"])
    assert e.value.code == 2


_KILL_AT_THIRD_CHECKPOINT = """
import os, signal, sys
import transferset.training.loop as loop
real, seen = loop.Trainer.checkpoint, []
def dying(self, epoch, batches_done):
    real(self, epoch, batches_done)
    seen.append(1)
    if len(seen) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
loop.Trainer.checkpoint = dying
from transferset.cli import main
main(sys.argv[1:])
"""


def test_replayed_hint_set_trains_with_every_loss_and_resumes_after_kill_9(cnn_teacher, tmp_path):
    import os
    import subprocess
    import sys

    import torch

    x = np.random.default_rng(1).integers(0, 256, (24, 8, 8)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(24) % 5)
    hints = (HINT, f"{HINT}:reduce=attention", f"{HINT}:reduce=sign", f"{HINT}:reduce=avgpool")
    label([cnn_teacher], str(tmp_path / "x.npy"), tmp_path / "ts", LabelOptions(
        quiet=True, shard_size=16, batch_size=8, labels=str(tmp_path / "y.npy"), hints=hints, augment="jitter:1",
        views=1, store_inputs=False))
    assert verify_transfer_set(tmp_path / "ts") == []
    losses = ["fitnet:hint_0=body.4", "at:hint_1=body.5",
              "ab:hint_2=body.4", "rkd:hint_3=body.5", "mmd:hint_0=body.4:weight=2"]
    args = ["train-student", "--transfer-set", str(tmp_path / "ts"), "--source", str(tmp_path / "x.npy"),
            "--student", "cnn:4,8,fc=0", "--epochs", "3", "--batch-size", "8", "--device", "cpu", "--threads", "1",
            "--checkpoint-every", "1", "--hint-epochs", "1", "-q"] + [a for h in losses for a in ("--hint-loss", h)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(__import__("pathlib").Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    full = subprocess.run([sys.executable, "-m", "transferset"] + args + ["--out", str(tmp_path / "full")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_THIRD_CHECKPOINT] + args + ["--out", str(tmp_path / "part")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9 and not (tmp_path / "part" / "student.pt").exists()
    resumed = subprocess.run([sys.executable, "-m", "transferset"] + args + ["--out", str(tmp_path / "part"), "--resume"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("student.pt", "checkpoint.pt"):
        a = torch.load(tmp_path / "full" / name, weights_only=True)
        b = torch.load(tmp_path / "part" / name, weights_only=True)
        for key in ("model", "hint_regressors") if name == "checkpoint.pt" else ("model",):
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (name, key)
    ck = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("regressors.") for k in ck["hint_regressors"])  # fitnet and ab needed regressors
    assert not any(k.startswith("regressors.") for k in torch.load(tmp_path / "full" / "student.pt",
                                                                   weights_only=True)["model"])
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and all(m["hint"] > 0 for m in metrics)


def test_hint_loss_on_a_set_without_hints_or_an_unknown_module_is_one_line(hint_set, tmp_path, capsys):
    d, _ = hint_set
    for args, what in ((["--hint-loss", "fitnet:hint_0=body.77"], "no module named 'body.77'"),
                       (["--hint-loss", "fitnet:hint_9=body.1"], "not a hint"),
                       (["--hint-epochs", "1"], "needs at least one --hint-loss")):
        with pytest.raises(SystemExit) as e:
            main(["train-student", "--transfer-set", str(d / "ts"), "--out", str(tmp_path / "r"), "--student",
                  "cnn:4,8", "--epochs", "2", "--device", "cpu", "-q"] + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and what in err[0], err


def test_info_export_recode_and_report_carry_the_hints(hint_set, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d, x = hint_set
    with pytest.raises(SystemExit):
        main(["info", str(d / "ts"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert len(info["hints"]) == 4 and info["hints"][2].startswith("hint_2: /c2/Conv_output_0 (member 0, sign) [48]")
    with pytest.raises(SystemExit):
        main(["info", str(d / "ts")])
    assert "hint: hint_3: /c2/Conv_output_0 (member 0, none) [6, 8, 8] float16" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["export", str(d / "ts"), "--out", str(tmp_path / "pq"), "-q"])
    assert e.value.code == 0
    f = pq.ParquetFile(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet")
    t = f.read()
    meta = json.loads(f.schema_arrow.metadata[b"transferset"])
    assert [h["field"] for h in meta["hints"]] == ["hint_0", "hint_1", "hint_2", "hint_3"]
    with h5py.File(d / "ts" / "shard-00000.h5") as h:
        assert np.array(t.column("hint_2")[3].as_py(), np.uint8).tolist() == h["hint_2"][3].tolist()
        np.testing.assert_array_equal(np.array(t.column("hint_3")[3].as_py(), np.float32),
                                      h["hint_3"][3].astype(np.float32).ravel())
    from transferset.format.recode import recode

    recode(d / "ts", tmp_path / "topk", "topk:3")
    assert verify_transfer_set(tmp_path / "topk") == []
    with h5py.File(d / "ts" / "shard-00001.h5") as a, h5py.File(tmp_path / "topk" / "shard-00001.h5") as b:
        assert all(np.array_equal(a[f"hint_{k}"][:], b[f"hint_{k}"][:]) for k in range(4))


def test_report_hint_table_reads_through_the_checked_set(hint_set, cnn_teacher, tmp_path):
    pytest.importorskip("matplotlib")
    import re
    import shutil

    from transferset.report import report

    d, x = hint_set
    res = report(d / "ts", tmp_path / "rep", sample_rows=100)
    page = (tmp_path / "rep" / "index.html").read_text()
    assert res["kind"] and "Hints (intermediate teacher tensors stored per row)" in page
    cells = re.findall(r"<tr><td>(hint_\d)</td>(.*?)</tr>", page)
    assert [c[0] for c in cells] == ["hint_0", "hint_1", "hint_2", "hint_3"]
    raw = _raw(cnn_teacher, x)  # [40, 6, 8, 8]: every row sampled (the set has 40)
    assert f"<td>{(raw > 0).mean():.3f} of neurons active</td>" in cells[2][1]
    assert "<td>float16</td><td>12</td>" in cells[0][1]  # avgpool: 6 channels of float16 a row
    pooled = raw.mean((2, 3)).astype(np.float16).astype(np.float64)
    assert f"mean {pooled.mean():.4g}, std {pooled.std():.4g}" in cells[0][1]
    # a shard whose hint field is not what the manifest declares: the report refuses, in one line
    bad = tmp_path / "bad"
    shutil.copytree(d / "ts", bad)
    with h5py.File(bad / "shard-00000.h5", "a") as f:
        rows = f["hint_0"].shape[0]
        del f["hint_0"]
        f.create_dataset("hint_0", data=np.zeros((rows, 7), np.float32))
    manifest = json.loads((bad / "manifest.json").read_text())  # the size matches: the field's check must refuse
    manifest["shards"][0]["bytes"] = (bad / "shard-00000.h5").stat().st_size
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TransferSetError, match="hint_0"):
        report(bad, tmp_path / "rep2", sample_rows=100)


def test_batches_in_cpu_lanes_write_the_bytes_of_one_batch_at_a_time(tmp_path, cnn_teacher):
    """label runs several batches at once on a CPU (Ensemble.lanes, sessions of one intra-op thread each); the
    shards, hints and views included, are the bytes of one batch after another on one session."""
    from transferset.labelling.ensemble import Ensemble, cpu_lanes

    x = np.random.default_rng(1).integers(0, 256, (53, 8, 8)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    made = {}
    for threads in (1, 2, 4):
        opts = LabelOptions(quiet=True, shard_size=20, batch_size=3, threads=threads, views=1, augment="jitter:1",
                            hints=(f"{HINT}:reduce=avgpool", f"{HINT}:reduce=sign"))
        res = label([cnn_teacher], str(tmp_path / "x.npy"), tmp_path / f"t{threads}", opts)
        made[threads] = [(s["path"], s["sha256"]) for s in res.manifest["shards"]]
    assert made[1] == made[2] == made[4] and len(made[1]) == 6
    assert cpu_lanes(1) == (1, 1) and cpu_lanes(2) == (2, 1) and cpu_lanes(4) == (4, 1) and cpu_lanes(16) == (4, 4)
    with Ensemble([cnn_teacher], device="cpu", threads=4, lanes=True) as ens:
        assert ens.lanes == 4
    with Ensemble([cnn_teacher], device="cpu", threads=4) as ens:
        assert ens.lanes == 1


def test_a_failure_in_a_lane_ends_label_in_one_line(tmp_path, cnn_teacher, monkeypatch):
    """An error raised while several batches are in inference at once stops the run with that error."""
    from transferset.labelling.ensemble import Ensemble

    np.save(tmp_path / "x.npy", np.zeros((40, 8, 8), np.uint8))
    real = Ensemble.run_with_hints

    def failing(self, feeds, first_row=0):
        if first_row >= 18:
            raise TransferSetError(f"row {first_row} failed")
        return real(self, feeds, first_row)

    monkeypatch.setattr(Ensemble, "run_with_hints", failing)
    with pytest.raises(TransferSetError, match="row 18 failed"):
        label([cnn_teacher], str(tmp_path / "x.npy"), tmp_path / "t", LabelOptions(quiet=True, shard_size=40,
                                                                                    batch_size=3, threads=2))
