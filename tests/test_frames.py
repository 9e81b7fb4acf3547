"""Per-frame students (crnn, conv1d) and per-frame / CTC scoring on hand-made cases."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from transferset.errors import TransferSetError
from transferset.training.frame_scoring import edit_distance, frame_metrics, greedy_decode, string_metrics
from transferset.training.students import create_student, export_onnx


@pytest.mark.parametrize("spec, shape, frames", [
    ("crnn:4,8", (12, 40), 10), ("crnn:4,8,stride=2", (1, 12, 41), 21), ("crnn:4,8,8,stride=8,gru=6", (2, 9, 64), 8),
    ("crnn:4,stride=1", (5, 7), 7), ("crnn", (28, 128), 32),
])
def test_crnn_gives_one_distribution_per_column_group(spec, shape, frames):
    model = create_student(spec, shape, 11, input_scale=1 / 255).eval()
    x = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    out = model(x)
    assert out.shape == (3, frames, 11)
    # a column far from the others sees nothing of them: frames are local without a GRU
    if "gru" not in spec:
        y = x.clone()
        y[..., -1] = 0
        assert torch.allclose(model(y)[:, 0], out[:, 0])


def test_conv1d_keeps_the_frame_count():
    model = create_student("conv1d:8,8,kernel=3", (50, 13), 7).eval()
    assert model(torch.randn(2, 50, 13)).shape == (2, 50, 7)


@pytest.mark.parametrize("spec, shape, message", [
    ("crnn:4,8,stride=3", (28, 64), "power of two"), ("crnn:4,stride=4", (28, 64), "power of two"),
    ("crnn:4,8,gru=-1", (28, 64), "gru must be"), ("crnn:4,8", (784,), "image lines"),
    ("conv1d:8,kernel=4", (50, 13), "odd"), ("conv1d:8", (50,), "frames, features"),
])
def test_frame_students_refuse_bad_specs_in_one_line(spec, shape, message):
    with pytest.raises(TransferSetError, match=message) as e:
        create_student(spec, shape, 5)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, shape, dtype", [("crnn:4,8,gru=5", (1, 12, 40), "uint8"),
                                                ("conv1d:8", (30, 6), "float32")])
def test_frame_students_export_to_onnx(tmp_path, spec, shape, dtype):
    model = create_student(spec, shape, 5, input_scale=1 / 255 if dtype == "uint8" else 1.0).eval()
    path = tmp_path / "s.onnx"
    export_onnx(model, path, shape, dtype)
    x = (np.random.default_rng(0).integers(0, 256, (3, *shape)) if dtype == "uint8"
         else np.random.default_rng(0).normal(size=(3, *shape))).astype(dtype)
    got = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    assert got.shape == (3, model(torch.from_numpy(x)).shape[1], 5)
    np.testing.assert_allclose(got, model(torch.from_numpy(x)).detach().numpy(), atol=1e-4)


def _scores(paths, classes=4):
    """Log-probabilities [N, T, C] whose argmax is each path."""
    p = np.full((*np.shape(paths), classes), -5.0)
    np.put_along_axis(p, np.asarray(paths)[..., None], 0.0, axis=-1)
    return p


def test_frame_accuracy_and_agreement_by_hand():
    pred = _scores([[0, 1, 2, 3], [3, 3, 1, 0]])
    res = frame_metrics(pred, np.array([[0, 1, 0, -1], [3, 3, 1, 1]]), reference=_scores([[0, 1, 2, 3], [3, 2, 1, 0]]))
    assert res["frames"] == 7 and res["frame_errors"] == 2 and res["frame_accuracy"] == pytest.approx(5 / 7)
    assert res["frame_agreement"] == pytest.approx(7 / 8) and res["row_agreement"] == 0.5


def test_frame_metrics_refuse_unequal_frame_counts():
    with pytest.raises(TransferSetError, match="frame counts must be equal"):
        frame_metrics(_scores([[0, 1, 2]]), reference=_scores([[0, 1, 2, 3]]))
    with pytest.raises(TransferSetError, match="frame labels have shape"):
        frame_metrics(_scores([[0, 1, 2]]), np.zeros((1, 4), np.int64))


def test_greedy_decode_merges_runs_and_drops_blanks():
    blank = 3
    paths = [[3, 1, 1, 3, 1, 2, 2, 3], [0, 0, 0, 0, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3], [2, 3, 2, 2, 0, 3, 3, 0]]
    assert greedy_decode(_scores(paths), blank) == [(1, 1, 2), (0,), (), (2, 2, 0, 0)]
    assert greedy_decode(np.array(paths), blank) == greedy_decode(_scores(paths), blank)


def test_edit_distance_and_string_metrics_by_hand():
    assert edit_distance((1, 2, 3), (1, 3)) == 1 and edit_distance((), (4, 4)) == 2
    assert edit_distance((1, 2, 3, 4), (2, 1, 3, 5)) == 3
    res = string_metrics([(1, 2), (3,), ()], truth=[(1, 2), (3, 3), (5,)], reference=[(1, 2), (3,), (5,)])
    assert res["string_accuracy"] == pytest.approx(1 / 3) and res["cer"] == pytest.approx(2 / 5)
    assert res["string_agreement"] == pytest.approx(2 / 3) and res["cer_vs_teacher"] == pytest.approx(1 / 4)


# -- a per-frame set from an image-line teacher -----------------------------------------------------------------
def _frame_teacher(path, shape=(1, 12, 32), classes=5, seed=0):
    """A tiny crnn teacher: float [B, 1, 12, W] in [0, 1] -> logits [B, W / 4, classes], batch and width dynamic."""
    import warnings

    torch.manual_seed(seed)
    model = create_student("crnn:4,8", shape, classes).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, *shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch", 3: "width"}, "logits": {0: "batch", 1: "frames"}})
    return path


@pytest.fixture
def frame_set_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 1, 12, 32), dtype=np.uint8)
    y = rng.integers(-1, 5, (40, 8)).astype(np.int16)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return tmp_path, [_frame_teacher(tmp_path / f"t{i}.onnx", seed=i) for i in range(2)], x, y


class _Ran:
    def __init__(self, exit_code: int, output: str) -> None:
        self.exit_code, self.output = exit_code, output


def _cli(args, capsys):
    """Run the CLI in this process; its exit code and what it printed."""
    from transferset.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return _Ran(code, out.out + out.err)


def test_a_per_frame_set_labels_verifies_replays_and_trains(frame_set_files, capsys):
    import h5py

    d, teachers, x, y = frame_set_files
    res = _cli(["label", "--ensemble", *teachers, "--data", d / "x.npy", "--labels", d / "y.npy", "--out", d / "ts",
                "--scale", 1 / 255, "--shard-size", 16, "--no-store-inputs", "--temperatures", "1,2", "-q"], capsys)
    assert res.exit_code == 0, res.output
    m = json.loads((d / "ts" / "manifest.json").read_text())
    assert m["positions"] == 8 and m["num_classes"] == 5 and m["num_members"] == 2 and m["schema_version"] == 4
    # the stored logits are the teachers' own, frame by frame
    sessions = [ort.InferenceSession(str(t)) for t in teachers]
    want = np.stack([s.run(None, {"image": x[:16].astype(np.float32) / 255})[0] for s in sessions], axis=2)
    with h5py.File(d / "ts" / "shard-00000.h5", "r") as f:
        np.testing.assert_allclose(f["logits"][:].astype(np.float32), want, atol=2e-2)
        np.testing.assert_array_equal(f["labels"][:], y[:16])
        assert "inputs" not in f and (f["length"][:] == 8).all()
    assert _cli(["verify", d / "ts"], capsys).exit_code == 0
    res = _cli(["train-student", "--transfer-set", d / "ts", "--out", d / "run", "--student", "crnn:4,8",
                "--epochs", 2, "--batch-size", 8, "-T", 2, "--source", d / "x.npy",
                "--eval-data", d / "x.npy", "--eval-labels", d / "y.npy", "-q"], capsys)
    assert res.exit_code == 0, res.output
    lines = [json.loads(s) for s in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and np.isfinite(lines[-1]["loss"]) and lines[-1]["eval_frames"] == int((y >= 0).sum())


def test_a_student_with_another_frame_count_is_refused_in_one_line(frame_set_files, capsys):
    d, teachers, _, _ = frame_set_files
    assert _cli(["label", "--ensemble", teachers[0], "--data", d / "x.npy", "--out", d / "ts", "--scale", 1 / 255,
                 "--temperatures", "2", "-q"], capsys).exit_code == 0
    res = _cli(["train-student", "--transfer-set", d / "ts", "--out", d / "run", "--student", "crnn:4,8,stride=2",
                "--epochs", 1, "-T", 2, "-q"], capsys)
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and "16 frames a row" in line and "8 positions" in line
    assert not (d / "run" / "checkpoint.pt").exists()


def test_per_frame_labels_of_the_wrong_shape_are_refused(frame_set_files, capsys):
    d, teachers, _, y = frame_set_files
    np.save(d / "bad.npy", y[:, :6])
    res = _cli(["label", "--ensemble", teachers[0], "--data", d / "x.npy", "--labels", d / "bad.npy", "--out",
                d / "ts", "--scale", 1 / 255, "-q"], capsys)
    assert res.exit_code == 2 and "[40, 8]" in res.output and "\n" not in res.output.strip()


def test_a_per_frame_set_exports_its_inputs_not_token_ids(frame_set_files, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    d, teachers, x, y = frame_set_files
    assert _cli(["label", "--ensemble", teachers[0], "--data", d / "x.npy", "--labels", d / "y.npy", "--out", d / "ts",
                 "--scale", 1 / 255, "--temperatures", "2", "-q"], capsys).exit_code == 0
    assert _cli(["export", d / "ts", "--out", d / "pq"], capsys).exit_code == 0
    t = pq.read_table(next((d / "pq").rglob("*.parquet")))
    assert "input_ids" not in t.column_names
    np.testing.assert_array_equal(np.array(t.column("inputs").to_pylist(), dtype=np.uint8), x.reshape(40, -1))
    np.testing.assert_array_equal(np.array(t.column("labels").to_pylist()), y)
