"""The seqcnn student: integer ids through an embedding, never scaled; ONNX with an int32 input; trains from a set."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from transferset.errors import TransferSetError
from transferset.training.students import (
    SEQCNN_DEFAULT_VOCAB,
    count_parameters,
    create_student,
    export_onnx,
    id_vocab,
    resolve_id_spec,
    list_students,
    rebuild_student,
    takes_ids,
)


def test_registered_and_shapes():
    assert "seqcnn" in list_students() and takes_ids("seqcnn:8,16") and not takes_ids("mlp:8")
    m = create_student("seqcnn:8,16,32,kernel=3,stride=2,pool=2", (40,), 7).eval()
    x = torch.randint(0, 256, (5, 40), dtype=torch.int32)
    assert m(x).shape == (5, 7)
    # a rank-2 row is read as one flattened sequence
    assert create_student("seqcnn:4,8", (4, 10), 3)(torch.randint(0, 256, (2, 4, 10))).shape == (2, 3)
    assert count_parameters(create_student("seqcnn:8,16", (40,), 7)) == 256 * 8 + (8 * 16 * 5 + 16) + (16 * 7 + 7)


def test_ids_are_never_scaled():
    """An input scale (uint8's default 1/255, or one given) would turn ids into fractions: seqcnn records 1, 0, 1."""
    torch.manual_seed(0)
    a = create_student("seqcnn:8,16", (30,), 4, input_scale=1 / 255, input_mean=0.5, input_std=2.0)
    assert (a.scale, a.mean, a.std) == (1.0, 0.0, 1.0)
    assert a.student_spec["input_scale"] == 1.0 and a.student_spec["input_std"] == 1.0
    b = rebuild_student(a.student_spec)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (3, 30), dtype=torch.uint8)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a(x), a(x.to(torch.int64)))  # same ids, any integer dtype


def test_id_outside_the_vocabulary_names_the_option():
    m = create_student("seqcnn:4,8,vocab=100", (10,), 3)
    with pytest.raises(TransferSetError, match=r"id 300, outside the seqcnn vocabulary \[0, 100\); give the "
                                               r"student 'vocab=301'") as e:
        m(torch.full((1, 10), 300, dtype=torch.int32))
    assert e.value.option == "student"
    with pytest.raises(TransferSetError, match="outside"):
        m(torch.full((1, 10), -1, dtype=torch.int32))


@pytest.mark.parametrize("spec, msg", [("seqcnn:8", "an embedding size and at least one channel width"),
                                       ("seqcnn:8,0", "must be positive"), ("seqcnn:8,8,vocab=0", "must be positive"),
                                       ("seqcnn:8,8,width=3", "unknown option 'width'")])
def test_bad_specs(spec, msg):
    with pytest.raises(TransferSetError, match=msg):
        create_student(spec, (10,), 3)


def test_vocab_from_the_set():
    assert id_vocab("uint8") == SEQCNN_DEFAULT_VOCAB == 256 and id_vocab("int8") == 256
    assert id_vocab("int32", input_max=256) == 257
    assert id_vocab("int32") is None  # neither the dtype nor a recorded max says: the student's default applies
    assert resolve_id_spec("seqcnn:16,64", "int32", 1000) == "seqcnn:16,64,vocab=1001"
    assert resolve_id_spec("seqcnn:16,64,vocab=300", "uint8") == "seqcnn:16,64,vocab=300"  # given wins
    assert resolve_id_spec("seqcnn:16,64", "int32") == "seqcnn:16,64"
    assert resolve_id_spec("mlp:64", "uint8") == "mlp:64"


def test_onnx_export_takes_int32(tmp_path):
    torch.manual_seed(0)
    m = create_student("seqcnn:8,16,16,vocab=257", (64,), 5).eval()
    export_onnx(m, tmp_path / "s.onnx", (64,), "int32")
    s = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    assert s.get_inputs()[0].type == "tensor(int32)"
    x = np.random.default_rng(0).integers(0, 257, (6, 64)).astype(np.int32)
    np.testing.assert_allclose(s.run(None, {"input": x})[0], m(torch.from_numpy(x)).detach().numpy(), atol=1e-4)


def test_student_from_an_int32_set_agrees_with_its_teacher(tmp_path):
    """End to end: an int32-input ONNX teacher labels a set; a seqcnn student learns it from the shards alone."""
    from transferset.evaluate import evaluate
    from transferset.labelling.pipeline import LabelOptions, label
    from transferset.training.loop import TrainOptions, train_student

    rng = np.random.default_rng(0)
    # the class is which of 4 "marker" byte values appears most in the row: a task for an embedding + max pool
    def rows(n):
        x = rng.integers(0, 200, (n, 32)).astype(np.int32)
        y = rng.integers(0, 4, n)
        for i in range(n):
            x[i, rng.choice(32, 6, replace=False)] = 250 + y[i]
        return x, y

    x, y = rows(800)
    xt, yt = rows(200)
    teacher = create_student("seqcnn:16,32", (32,), 4)
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(teacher(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    export_onnx(teacher, tmp_path / "t.onnx", (32,), "int32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "xt.npy", xt)
    np.save(tmp_path / "yt.npy", yt)
    label([tmp_path / "t.onnx"], str(tmp_path / "x.npy"), tmp_path / "ts", LabelOptions(quiet=True, shard_size=300))
    train_student(tmp_path / "ts", tmp_path / "run",
                  TrainOptions(student="seqcnn:8,16", epochs=6, batch_size=32, lr=1e-2, quiet=True, device="cpu",
                               threads=1))
    res = evaluate([tmp_path / "run" / "student.pt"], str(tmp_path / "xt.npy"), str(tmp_path / "yt.npy"),
                   reference=[tmp_path / "t.onnx"], device="cpu")
    assert res["agreement"] >= 0.9, res
