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
    assert m["schema_version"] == 3
    assert [(h["field"], h["reduce"], h["shape"], h["dtype"]) for h in m["hints"]] == [
        ("hint_0", "avgpool", [6], "float16"), ("hint_1", "attention", [64], "float16"),
        ("hint_2", "sign", [48], "uint8"), ("hint_3", "none", [6, 8, 8], "float16")]
    raw = _raw(cnn_teacher, x)
    with h5py.File(d / "ts" / "shard-00000.h5") as f:
        np.testing.assert_allclose(f["hint_0"][:].astype(np.float32), raw[:16].mean(axis=(2, 3)), rtol=2e-3, atol=1e-3)
        assert (np.unpackbits(f["hint_2"][:], axis=1) == (raw[:16].reshape(16, -1) > 0)).all()
        np.testing.assert_allclose(f["hint_3"][:].astype(np.float32), raw[:16], rtol=2e-3, atol=2e-3)
    assert verify_transfer_set(d / "ts") == []


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
