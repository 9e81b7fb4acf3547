"""What label reads of an ONNX file before opening it (labelling.onnx_header: a member's opset and producer, the
graph's inputs, outputs and initializer names), walked from the protobuf without the onnx package, agrees with
what onnx.load gives; plain labelling no longer imports onnx."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from teachers import export_teacher
from transferset.labelling.ensemble import _model_meta
from transferset.labelling.frame_label import is_frame_teacher
from transferset.labelling.lm_graph import is_decoder
from transferset.labelling.onnx_header import graph_interface


def _reference(path) -> tuple[int | None, str]:
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return opset, f"{model.producer_name} {model.producer_version}".strip()


def _model(opsets, producer=("", ""), big=0):
    w = numpy_helper.from_array(np.arange(max(big, 1), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.producer_name, model.producer_version = producer
    return model


@pytest.mark.parametrize("opsets, producer", [
    ([("", 17)], ("pytorch", "2.13.0")),
    ([("com.microsoft", 1), ("ai.onnx", 13), ("", 18)], ("tf2onnx", "1.16.1 15c810")),  # first default domain wins
    ([("ai.onnx.ml", 3)], ("", "")),  # no default-domain opset: None
    ([("", 11)], ("paddle2onnx", "")),
    ([("", 21)], ("produçer ünïcode", "1.0")),
])
def test_model_meta_agrees_with_onnx_load(tmp_path, opsets, producer):
    path = tmp_path / "m.onnx"
    path.write_bytes(_model(opsets, producer, big=300_000).SerializeToString())  # a graph of 1.2 MB is skipped
    assert _model_meta(path) == _reference(path)


def test_model_meta_of_an_exported_teacher_and_of_broken_files(tmp_path):
    path = export_teacher(tmp_path / "t.onnx", (6,), 3)
    assert _model_meta(path) == _reference(path) and _model_meta(path)[0] is not None
    data = path.read_bytes()
    for name, bad in (("cut.onnx", data[: len(data) // 2]), ("group.onnx", b"\x0b\x0c"), ("long.onnx", b"\x12\xff\xff\xff\xff\x0f")):
        (tmp_path / name).write_bytes(bad)
        assert _model_meta(tmp_path / name) == (None, "")


def test_plain_labelling_does_not_import_onnx(tmp_path):
    # onnx (with ml_dtypes) took about 0.65 s of every `transferset label` process, for two metadata fields
    teacher = export_teacher(tmp_path / "t.onnx", (6,), 3)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32))
    code = ("import sys; from transferset.cli import main\n"
            "try:\n    main(['label', '--ensemble', sys.argv[1], '--data', sys.argv[2], '--out', sys.argv[3], '-q'])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('onnx' in sys.modules, 'ml_dtypes' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, str(teacher), str(tmp_path / "x.npy"), str(tmp_path / "ts")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines()[-1].split() == ["False", "False"], p.stdout


def _interface_reference(path):
    g = onnx.load(str(path), load_external_data=False).graph

    def vi(v):
        t = v.type.tensor_type if v.type.HasField("tensor_type") else None
        return (v.name, t.elem_type if t is not None else 0, len(t.shape.dim) if t is not None else 0)

    return [vi(v) for v in g.input], [vi(v) for v in g.output], {t.name for t in g.initializer}


@pytest.mark.parametrize("kind", ["mlp", "frames", "decoder", "initializer-input", "sequence-output", "int-input"])
def test_graph_interface_agrees_with_onnx_load(tmp_path, kind):
    path = tmp_path / "m.onnx"
    if kind == "mlp":
        path = export_teacher(path, (6,), 3)
    else:
        x_type = TensorProto.INT64 if kind in ("decoder", "int-input") else TensorProto.FLOAT
        x_shape = [None, 7] if kind == "decoder" else [None, 9, 4]
        out = (helper.make_value_info("y", helper.make_sequence_type_proto(
                   helper.make_tensor_type_proto(TensorProto.FLOAT, None))) if kind == "sequence-output" else
               helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 9, 5]))
        w = numpy_helper.from_array(np.ones((4, 5), np.float32), "w")
        inputs = [helper.make_tensor_value_info("x", x_type, x_shape)]
        if kind == "initializer-input":  # an initializer listed among the inputs (IR < 4 style): not a data input
            inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 5]))
        node = (helper.make_node("SequenceEmpty", [], ["y"]) if kind == "sequence-output" else
                helper.make_node("MatMul", ["x", "w"], ["y"]))
        graph = helper.make_graph([node], "g", inputs, [out], [w])
        path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    g = graph_interface(path)
    assert (g.inputs, g.outputs, g.initializers) == _interface_reference(path)
    assert is_frame_teacher(path) == (kind in ("frames", "initializer-input"))
    assert is_decoder(path) == (kind in ("frames", "initializer-input", "decoder", "int-input"))
    assert not is_frame_teacher(path, "no-such-output") and not is_decoder(path, "no-such-output")


def test_mutated_files_give_an_answer_or_header_error_never_another_exception(tmp_path):
    from transferset.labelling.onnx_header import HeaderError, model_meta

    data = bytearray(export_teacher(tmp_path / "t.onnx", (6,), 3).read_bytes())
    rng = np.random.default_rng(0)
    path = tmp_path / "m.onnx"
    for _ in range(300):
        bad = bytearray(data)
        for at in rng.integers(0, len(bad), rng.integers(1, 4)):
            bad[at] = int(rng.integers(0, 256))
        cut = int(rng.integers(1, len(bad) + 1)) if rng.random() < 0.3 else len(bad)
        path.write_bytes(bytes(bad[:cut]))
        for read in (model_meta, graph_interface):
            try:
                read(path)
            except HeaderError:
                pass
        assert isinstance(is_frame_teacher(path), bool) and isinstance(is_decoder(path), bool)
