"""Per-frame students (crnn, conv1d) and per-frame / CTC scoring on hand-made cases."""

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
