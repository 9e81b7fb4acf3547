import json
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from transferset.errors import TransferSetError
from transferset.training.students import (
    STUDENTS,
    count_parameters,
    create_student,
    export_onnx,
    list_students,
    rebuild_student,
    register_student,
)


def test_builtins_are_registered():
    assert {"mlp", "cnn", "resnet8", "resnet20"} <= set(list_students())
    assert list_students() == sorted(STUDENTS)


@pytest.mark.parametrize("spec, shape", [
    ("mlp:32,16", (4, 5)), ("mlp:8,dropout=0.2", (10,)), ("mlp", (3, 2, 2)),
    ("cnn", (8, 8)), ("cnn:4,8,fc=0", (7, 7, 3)), ("cnn:4,8", (3, 9, 9)),
    ("resnet8", (8, 8)), ("resnet8:width=4", (6, 6, 1)), ("resnet20", (3, 8, 8)),
])
def test_students_take_stored_dtype_and_give_logits(spec, shape):
    model = create_student(spec, shape, 7, input_scale=1 / 255).eval()
    x = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    out = model(x)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    assert torch.allclose(out, model(x.float()), atol=1e-6)


def test_input_scaling_is_inside_the_module():
    model = create_student("mlp:4", (3,), 2, input_scale=0.5, input_mean=1.0, input_std=4.0).eval()
    plain = model.body
    x = torch.tensor([[2, 6, 10]], dtype=torch.uint8)
    expected = plain(torch.tensor([[0.0, 0.5, 1.0]]))  # ((x * .5) - 1) / 4
    assert torch.allclose(model(x), expected)


def test_image_layout_rule():
    hwc = create_student("cnn:4,4,fc=0", (6, 6, 3), 2)
    assert hwc.body[1].in_channels == 3
    chw = create_student("cnn:4,4,fc=0", (5, 6, 6), 2)
    assert chw.body[1].in_channels == 5
    hw = create_student("resnet8", (6, 6), 2)
    assert hw.body.stem[0].in_channels == 1
    # channels-last and channels-first rows of the same pixels give the same logits with the same weights
    torch.manual_seed(0)
    a = create_student("cnn:4,4", (6, 6, 3), 2).eval()
    b = create_student("cnn:4,4", (3, 6, 6), 2).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 6, 6)
    assert torch.allclose(a(x.permute(0, 2, 3, 1)), b(x), atol=1e-6)


def test_resnet_depths_and_parameter_counts():
    r8, r20 = create_student("resnet8", (3, 32, 32), 10), create_student("resnet20", (3, 32, 32), 10)
    convs = lambda m: sum(isinstance(x, nn.Conv2d) and x.kernel_size == (3, 3) for x in m.modules())
    assert convs(r8) + 1 == 8 and convs(r20) + 1 == 20  # 3x3 convs + the fc layer
    assert 0.26e6 < count_parameters(r20) < 0.28e6  # ~0.27M as in He et al. 2016, table 6
    mlp = create_student("mlp:800,800", (28, 28), 10)
    total = 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    assert count_parameters(mlp) == total
    mlp.body[1].weight.requires_grad_(False)  # frozen parameters are not counted
    assert count_parameters(mlp) == total - 784 * 800


def test_dropout_option_builds_dropout_layers():
    model = create_student("mlp:800,800,dropout=0.2", (4,), 3)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and drops[0].p == 0.2


def test_student_spec_rebuilds_the_same_architecture_through_json():
    model = create_student("cnn:4,8,fc=16", (8, 8, 3), 5, input_scale=1 / 255, input_mean=0.5, input_std=0.25)
    spec = json.loads(json.dumps(model.student_spec))
    assert spec == {"spec": "cnn:4,8,fc=16", "input_shape": [8, 8, 3], "num_classes": 5,
                    "input_scale": 1 / 255, "input_mean": 0.5, "input_std": 0.25}
    for again in (rebuild_student(spec), create_student(**spec)):
        again.load_state_dict(model.state_dict())
        x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
        assert torch.equal(again.eval()(x), model.eval()(x))
    with pytest.raises(TransferSetError, match="student_spec"):
        rebuild_student({"spec": "mlp", "input_shape": [3], "num_classes": 2, "code": "rm -rf"})


def test_unknown_student_lists_registered_names():
    with pytest.raises(TransferSetError) as err:
        create_student("vgg16", (3, 32, 32), 10)
    for name in ("mlp", "cnn", "resnet8", "resnet20"):
        assert name in str(err.value)


@pytest.mark.parametrize("spec", ["cnn", "resnet8", "resnet20"])
def test_image_students_refuse_flat_inputs(spec):
    with pytest.raises(TransferSetError, match="mlp"):
        create_student(spec, (784,), 10)


@pytest.mark.parametrize("spec, message", [
    ("mlp:800,wide", "not an integer"), ("mlp:800,dropout=2", "dropout"), ("mlp:8,depth=3", "unknown option"),
    ("cnn:4", "two channel widths"), ("resnet8:3", "positional"), ("mlp:0", "positive"),
    ("mlp:dropout=x", "must be a float"), ("mlp:dropout=0.1,8", "before"),
])
def test_bad_arguments_name_the_option(spec, message):
    with pytest.raises(TransferSetError, match=message) as err:
        create_student(spec, (4, 4), 3)
    assert err.value.option == "student" and str(err.value).startswith("student ")  # the CLI spells --student


def test_bad_scaling_and_shape():
    with pytest.raises(TransferSetError, match="input_std"):
        create_student("mlp", (3,), 2, input_std=0.0)
    with pytest.raises(TransferSetError, match="num_classes"):
        create_student("mlp", (3,), 0)


def test_user_factory_by_dotted_path(tmp_path, monkeypatch):
    pkg = tmp_path / "mystudents"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        import math
        from torch import nn

        def tiny(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))

        def not_a_module(input_shape, num_classes):
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_student("mystudents.nets:tiny", (2, 3), 4, input_scale=2.0)
    assert model(torch.ones(1, 2, 3, dtype=torch.uint8)).shape == (1, 4)
    assert rebuild_student(model.student_spec, allow_import=True).student_spec == model.student_spec
    with pytest.raises(TransferSetError, match="user code to import"):
        rebuild_student(model.student_spec)  # a spec read from a file imports nothing unless allowed
    with pytest.raises(TransferSetError, match="no callable"):
        create_student("mystudents.nets:missing", (2, 3), 4)
    with pytest.raises(TransferSetError, match="not a torch.nn.Module"):
        create_student("mystudents.nets:not_a_module", (2, 3), 4)
    with pytest.raises(TransferSetError, match="cannot import"):
        create_student("nowhere.at_all:net", (2, 3), 4)
    sys.modules.pop("mystudents.nets", None)
    sys.modules.pop("mystudents", None)


def test_register_student_decorator():
    @register_student("test-linear")
    def _linear(spec, input_shape, num_classes, positional, options):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))

    try:
        assert "test-linear" in list_students()
        assert create_student("test-linear", (3,), 2)(torch.zeros(1, 3)).shape == (1, 2)
        with pytest.raises(ValueError):
            register_student("test-linear")(_linear)
    finally:
        STUDENTS.pop("test-linear")


@pytest.mark.parametrize("spec, shape, dtype", [
    ("mlp:16,8", (4, 5), "uint8"), ("cnn:4,8", (8, 8, 3), "uint8"), ("resnet8:width=8", (3, 8, 8), "uint8"),
    ("cnn:4,8,fc=0", (6, 6), "float32"),
])
def test_onnx_export_matches_torch(tmp_path, spec, shape, dtype):
    torch.manual_seed(0)
    model = create_student(spec, shape, 6, input_scale=1 / 255, input_mean=0.5, input_std=0.25)
    model.train()
    if spec.startswith("resnet"):  # give batch norm non-trivial running statistics
        with torch.no_grad():
            model(torch.randint(0, 256, (16, *shape), dtype=torch.uint8))
    path = tmp_path / "student.onnx"
    export_onnx(model, path, shape, dtype)
    assert model.training  # restored
    model.eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type == f"tensor({dtype.replace('float32', 'float')})"
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.integers(0, 256, (batch, *shape)).astype(dtype)
        got = session.run(None, {"input": x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 6)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_export_refuses_unknown_dtype(tmp_path):
    with pytest.raises(TransferSetError, match="input dtype"):
        export_onnx(create_student("mlp", (3,), 2), tmp_path / "m.onnx", (3,), "complex64")


class _FakeTimm:
    """A stand-in for the timm package (which cannot import here: no torchvision build for this CPU torch):
    records what ``create_model`` was asked and builds a small CNN as timm would, NCHW in, logits out."""

    def __init__(self) -> None:
        self.calls = []

    def create_model(self, name, pretrained=False, num_classes=1000, in_chans=3, **kw):
        self.calls.append((name, pretrained, num_classes, in_chans, kw))
        if name != "tinynet":
            raise RuntimeError(f"Unknown model ({name})")
        return torch.nn.Sequential(torch.nn.Conv2d(in_chans, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, num_classes))


def test_timm_students_are_built_without_download_for_the_sets_channels_and_classes(monkeypatch, tmp_path):
    fake = _FakeTimm()
    monkeypatch.setitem(sys.modules, "timm", fake)
    m = create_student("timm:tinynet,drop_rate=0.1,global_pool=avg", (20, 20, 3), 7)
    assert fake.calls == [("tinynet", False, 7, 3, {"drop_rate": 0.1, "global_pool": "avg"})]
    x = torch.randint(0, 256, (5, 20, 20, 3), dtype=torch.uint8)  # stored HxWxC rows, as photo sets hold them
    assert m(x).shape == (5, 7)
    create_student("timm:tinynet", (1, 28, 28), 10)
    assert fake.calls[-1][3] == 1  # CHW grayscale: one input channel
    with pytest.raises(TransferSetError, match="timm cannot build it"):
        create_student("timm:nosuch", (20, 20, 3), 7)
    with pytest.raises(TransferSetError, match="options are key=value"):
        create_student("timm:tinynet,drop_rate", (20, 20, 3), 7)
    m.eval()
    export_onnx(m, tmp_path / "s.onnx", (20, 20, 3), "uint8")
    got = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, m(x).numpy(), atol=1e-4)


def test_timm_missing_or_broken_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(TransferSetError, match=r"needs the optional extra timm \(pip install 'transferset\[timm\]'\)"):
        create_student("timm:resnet18", (32, 32, 3), 10)
