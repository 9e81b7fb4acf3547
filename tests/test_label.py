"""Stage 1 end to end: stored values against direct ONNX Runtime runs and hand-computed soft targets."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from teachers import export_teacher, reference_outputs
from transferset.cli import main
from transferset.errors import TransferSetError
from transferset.labelling.pipeline import LabelOptions, label
from transferset.format import load_manifest, verify_transfer_set


def _read(folder, name):
    m = load_manifest(folder)
    return np.concatenate([h5py.File(folder / s["path"], "r")[name][()] for s in m["shards"]])


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(37, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 5, size=37)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return tmp_path, x, y


def test_stored_logits_equal_direct_ort_within_fp16(images):
    tmp, x, y = images
    a = export_teacher(tmp / "a.onnx", (8, 8), seed=1)
    b = export_teacher(tmp / "b.onnx", (8, 8), seed=2)
    res = label([a, b], str(tmp / "x.npy"), tmp / "ts", LabelOptions(labels=str(tmp / "y.npy"), scale=1 / 255,
                                                                      batch_size=8, shard_size=16, quiet=True))
    assert res.status == "written" and res.manifest["complete"]
    xf = x.astype(np.float32) * np.float32(1 / 255)
    want = np.stack([reference_outputs(a, xf), reference_outputs(b, xf)], axis=1)
    got = _read(tmp / "ts", "logits")
    assert got.dtype == np.float16 and got.shape == (37, 2, 5)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-3, atol=1e-3)
    assert np.array_equal(_read(tmp / "ts", "labels"), y)
    assert np.array_equal(_read(tmp / "ts", "inputs"), x)  # stored in the source dtype
    assert [s["rows"] for s in res.manifest["shards"]] == [16, 16, 5]
    assert res.manifest["teachers"][0]["output_kind"] == "logits"


def test_soft_targets_equal_hand_computation(images):
    tmp, x, _ = images
    a = export_teacher(tmp / "a.onnx", (8, 8), seed=1)
    b = export_teacher(tmp / "b.onnx", (8, 8), seed=2)
    temps = [1.0, 2.0, 4.0, 8.0, 20.0]
    for rule in ("mean-probs", "mean-logits", "geometric"):
        out = tmp / f"ts-{rule}"
        label([a, b], str(tmp / "x.npy"), out, LabelOptions(scale=1 / 255, combine=rule, weights=[1, 3],
                                                             dtype="float32", quiet=True))
        logits = _read(out, "logits").astype(np.float64)
        st = _read(out, "soft_targets")
        w = [0.25, 0.75]
        for r in (0, 5, 36):
            for j, t in enumerate(temps):
                probs = []
                for m in range(2):
                    e = [math.exp(v / t) for v in logits[r, m]]
                    probs.append([v / sum(e) for v in e])
                if rule == "mean-probs":
                    p = [w[0] * probs[0][c] + w[1] * probs[1][c] for c in range(5)]
                else:  # geometric mean of probabilities, renormalised (equals softmax of the mean logits)
                    g = [probs[0][c] ** w[0] * probs[1][c] ** w[1] for c in range(5)]
                    p = [v / sum(g) for v in g]
                np.testing.assert_allclose(np.exp(st[r, j]), p, rtol=1e-5, atol=1e-7)


def test_probability_fixed_batch_and_nc11_members(images):
    tmp, x, _ = images
    soft = export_teacher(tmp / "soft.onnx", (8, 8), head="softmax", seed=3)
    manual = export_teacher(tmp / "manual.onnx", (8, 8), head="manual-softmax", seed=4)
    one = export_teacher(tmp / "one.onnx", (1, 8, 8), fixed_batch=1, seed=5)
    nc11 = export_teacher(tmp / "nc11.onnx", (8, 8), head="nc11", seed=6)
    res = label([soft, manual, one, nc11], str(tmp / "x.npy"), tmp / "ts",
                LabelOptions(scale=1 / 255, batch_size=10, dtype="float32", quiet=True))
    t = res.manifest["teachers"]
    assert [m["output_kind"] for m in t] == ["probabilities", "probabilities", "logits", "logits"]
    assert t[2]["fixed_batch"] == 1 and t[3]["squeeze_output"] is True
    xf = x.astype(np.float32) / 255
    got = _read(tmp / "ts", "logits")
    np.testing.assert_allclose(got[:, 0], np.log(reference_outputs(soft, xf)), atol=1e-5)
    np.testing.assert_allclose(got[:, 2], reference_outputs(one, xf[:, None]), atol=1e-5)
    np.testing.assert_allclose(got[:, 3], reference_outputs(nc11, xf)[:, :, 0, 0], atol=1e-5)
    # the stored log-probabilities give back the member's probabilities under softmax at T=1
    z = torch.from_numpy(got[:, 1])
    np.testing.assert_allclose(torch.softmax(z, 1).numpy(), reference_outputs(manual, xf), atol=1e-5)


def test_int_and_nhwc_inputs(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 100, size=(9, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    m_int = export_teacher(tmp_path / "int.onnx", (108,), dtype=torch.int32)
    m_nchw = export_teacher(tmp_path / "nchw.onnx", (3, 6, 6), seed=2)
    res = label([m_int], str(tmp_path / "x.npy"), tmp_path / "a", LabelOptions(dtype="float32", quiet=True))
    assert res.manifest["teachers"][0]["input_dtype"] == "int32"
    np.testing.assert_allclose(_read(tmp_path / "a", "logits")[:, 0],
                               reference_outputs(m_int, x.reshape(9, 108).astype(np.int32)), atol=1e-4)
    label([m_nchw], str(tmp_path / "x.npy"), tmp_path / "b", LabelOptions(dtype="float32", layout="nchw", quiet=True))
    np.testing.assert_allclose(_read(tmp_path / "b", "logits")[:, 0],
                               reference_outputs(m_nchw, x.transpose(0, 3, 1, 2).astype(np.float32)), atol=1e-4)


def test_augmented_views_replay_to_stored_inputs(images):
    from transferset.inputs.augment import parse_augment, replay
    from transferset.inputs.sources import open_source

    tmp, x, _ = images
    a = export_teacher(tmp / "a.onnx", (8, 8))
    res = label([a], str(tmp / "x.npy"), tmp / "ts", LabelOptions(augment="jitter:2", views=3, seed=7, shard_size=50,
                                                                   batch_size=16, quiet=True))
    m = res.manifest
    assert m["augment"]["views_per_row"] == 4 and m["stats"]["rows"] == 37 * 4
    inputs, sidx, view = (_read(tmp / "ts", k) for k in ("inputs", "source_index", "view"))
    assert np.array_equal(sidx, np.repeat(np.arange(37), 4)) and np.array_equal(view, np.tile(np.arange(4), 37))
    assert np.array_equal(inputs[view == 0], x)
    assert not np.array_equal(inputs[view == 1], x)
    rebuilt = replay(open_source(str(tmp / "x.npy")), sidx, view, parse_augment(m["augment"]["spec"]), m["augment"]["seed"])
    assert np.array_equal(rebuilt, inputs)


def test_resume_after_interruption_is_identical(images, monkeypatch):
    import transferset.labelling.pipeline as lab
    from transferset.labelling.assembler import ShardAssembler

    tmp, x, y = images
    a = export_teacher(tmp / "a.onnx", (8, 8), seed=1)
    opts = LabelOptions(labels=str(tmp / "y.npy"), augment="jitter:1,noise:3", views=2, shard_size=20, batch_size=7,
                        quiet=True)
    monkeypatch.setattr(lab, "_WRITE_ROWS", 7)  # one write per batch, so the 8th falls inside a shard
    full = label([a], str(tmp / "x.npy"), tmp / "full", opts)
    real = ShardAssembler.add
    calls = {"n": 0}

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # mid-way through the third shard
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(ShardAssembler, "add", dying)
    with pytest.raises(KeyboardInterrupt):
        label([a], str(tmp / "x.npy"), tmp / "part", opts)
    partial = load_manifest(tmp / "part")
    assert not partial["complete"] and len(partial["shards"]) == 2
    assert sorted(p.name for p in (tmp / "part").glob("*.h5")) == ["shard-00000.h5", "shard-00001.h5"]
    monkeypatch.setattr(ShardAssembler, "add", real)
    resumed = label([a], str(tmp / "x.npy"), tmp / "part", opts)
    assert resumed.status == "resumed"
    assert json.dumps(resumed.manifest["shards"], sort_keys=True) == json.dumps(full.manifest["shards"], sort_keys=True)  # sha256 of every shard equal
    for name in ("logits", "soft_targets", "labels", "inputs", "aug_seed"):
        assert np.array_equal(_read(tmp / "full", name), _read(tmp / "part", name))
    again = label([a], str(tmp / "x.npy"), tmp / "part", opts)
    assert again.status == "already-complete" and "nothing to do" in again.summary_line()


def test_other_options_refused_then_overwrite(images):
    tmp, _, _ = images
    a = export_teacher(tmp / "a.onnx", (8, 8))
    label([a], str(tmp / "x.npy"), tmp / "ts", LabelOptions(quiet=True))
    with pytest.raises(TransferSetError, match="another ensemble, source or options"):
        label([a], str(tmp / "x.npy"), tmp / "ts", LabelOptions(temperatures=(1, 3), quiet=True))
    res = label([a], str(tmp / "x.npy"), tmp / "ts", LabelOptions(temperatures=(1, 3), overwrite=True, quiet=True))
    assert res.manifest["temperatures"] == [1.0, 3.0]


def test_verify_names_a_shard_with_one_flipped_byte(images, capsys):
    tmp, _, _ = images
    a = export_teacher(tmp / "a.onnx", (8, 8))
    label([a], str(tmp / "x.npy"), tmp / "ts", LabelOptions(shard_size=10, quiet=True))
    assert verify_transfer_set(tmp / "ts") == []
    target = tmp / "ts" / "shard-00002.h5"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        main(["verify", str(tmp / "ts")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "shard-00002.h5" in err and "sha256" in err and "shard-00001.h5" not in err


def test_cli_label_and_info(images, capsys):
    tmp, _, _ = images
    a = export_teacher(tmp / "a.onnx", (8, 8), seed=1)
    b = export_teacher(tmp / "b.onnx", (8, 8), seed=2)
    with pytest.raises(SystemExit) as e:
        main(["label", "--ensemble", str(a), str(b), "--data", str(tmp / "x.npy"), "--labels", str(tmp / "y.npy"),
              "--out", str(tmp / "ts"), "--scale", "0.0039215686", "--temperatures", "1,4", "-q"])
    assert e.value.code == 0
    assert "wrote 37 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["info", str(tmp / "ts"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 37 and info["members"] == ["a.onnx", "b.onnx"] and info["temperatures"] == [1.0, 4.0]
    assert 0 <= info["ensemble_accuracy"] <= 1


def test_info_prints_numeric_temperature_order_augment_and_source(images, capsys):
    """info reads as a person would: temperatures 1, 2, 4, 8, 20 (not as strings), the augmentation in words, the
    source and how many of its rows were used, counts with the right plural."""
    tmp, _, _ = images
    a = export_teacher(tmp / "a.onnx", (8, 8), seed=1)
    label([a], str(tmp / "x.npy"), tmp / "ts", LabelOptions(labels=str(tmp / "y.npy"), limit=30, augment="jitter:2",
                                                            views=3, temperatures=(20, 4, 1, 8, 2), quiet=True))
    with pytest.raises(SystemExit) as e:
        main(["info", str(tmp / "ts")])
    out = capsys.readouterr().out
    assert e.value.code == 0
    lines = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in out.splitlines() if ":" in ln}
    assert lines["temperatures"] == "1, 2, 4, 8, 20"
    assert lines["augment"] == "jitter:2, 3 views + clean"
    assert lines["rows"] == "120 in 1 shard"
    assert lines["source"].startswith(str(tmp / "x.npy")) and lines["source rows"] == "30 of 37 (the first 30)"
    assert lines["labels"] == str(tmp / "y.npy")
    assert all(": " in line for line in out.splitlines())  # every line is "key: value"
    entropy = lines["mean entropy"]
    assert [t.split()[0] for t in entropy.split(", ")] == ["T=1", "T=2", "T=4", "T=8", "T=20"], entropy
    assert "{" not in out and "'" not in out  # no Python dicts or lists


@pytest.mark.parametrize("case, code, needle", [
    ("missing-onnx", 2, "no such ONNX file"),
    ("bad-onnx", 2, "not a loadable ONNX model (its bytes do not parse as one); is this an ONNX model?"),
    ("wrong-shape", 2, "do not fit the model input"),
    ("labels-length", 2, "y_short.npy"),
    ("nan-teacher", 1, "NaN or Inf"),
    ("bad-temperature", 2, "--temperatures"),
    ("classes-disagree", 2, "disagree on the number of classes"),
    ("views-without-augment", 2, "--augment"),
])
def test_bad_input_gives_one_line(images, capsys, case, code, needle):
    tmp, x, _ = images
    good = export_teacher(tmp / "a.onnx", (8, 8))
    args = ["label", "--ensemble", str(good), "--data", str(tmp / "x.npy"), "--out", str(tmp / "ts"), "-q"]
    if case == "missing-onnx":
        args[2] = str(tmp / "nope.onnx")
    elif case == "bad-onnx":
        (tmp / "bad.onnx").write_bytes(b"not a model at all")
        args[2] = str(tmp / "bad.onnx")
    elif case == "wrong-shape":
        np.save(tmp / "x7.npy", np.zeros((4, 7, 7), np.uint8))
        args[4] = str(tmp / "x7.npy")
    elif case == "labels-length":
        np.save(tmp / "y_short.npy", np.zeros(5, np.int64))
        args += ["--labels", str(tmp / "y_short.npy")]
    elif case == "nan-teacher":
        args[2] = str(export_teacher(tmp / "nan.onnx", (8, 8), head="nan"))
    elif case == "bad-temperature":
        args += ["--temperatures", "1,-2"]
    elif case == "classes-disagree":
        args.insert(3, str(export_teacher(tmp / "c7.onnx", (8, 8), classes=7)))
    elif case == "views-without-augment":
        args += ["--views", "2"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == code
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    if (tmp / "ts" / "manifest.json").exists():
        assert load_manifest(tmp / "ts")["shards"] == []
    assert not list((tmp / "ts").glob("shard-*.h5")) if (tmp / "ts").exists() else True


@pytest.mark.parametrize("shape,pre", [
    ((5, 24, 24, 3), (1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "nchw")),  # photos, imagenet
    ((5, 24, 24, 3), (1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "nhwc")),
    ((5, 24, 24, 3), (1 / 255, None, None, "nchw")),
    ((5, 28, 28), (1 / 255, (0.1307,), (0.3081,), "nchw")),  # MNIST
    ((5, 784), (2.0, None, None, None)),
    ((5, 3, 24, 24), (1 / 255, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), "nchw")),  # stored NCHW: the arithmetic path
    ((5, 24, 24, 1), (None, (10.0,), (3.0,), "nchw")),
])
def test_uint8_preprocessing_by_table_is_bit_identical_to_the_arithmetic(shape, pre):
    """The lookup table gives every float32 bit the float passes give, in the model's layout, contiguous."""
    from transferset.labelling.ensemble import Preprocess

    p = Preprocess(*pre)
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    x[0].flat[:256] = np.arange(256)[: x[0].size]  # every level
    got = p.apply(x, np.dtype(np.float32), None)
    want = p._arith(x)
    if want.ndim == 3:
        want = want[:, None]
    elif pre[3] == "nchw" and want.shape[-1] <= 4 < want.shape[1]:
        want = want.transpose(0, 3, 1, 2)
    assert got.flags.c_contiguous and got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), np.ascontiguousarray(want).view(np.uint32))
    with pytest.raises(TransferSetError, match=r"rows \(28, 28\) have no channel axis"):
        Preprocess(1.0, (0.1, 0.2, 0.3), None, "nchw").apply(np.zeros((2, 28, 28), np.uint8), np.dtype(np.float32), None)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork")
def test_a_closed_ensemble_leaves_nothing_to_hang_a_forked_child(tmp_path):
    """Why `label` closes its ensemble: an ONNX Runtime session left to the garbage collector and freed in a forked
    child (a DataLoader worker of the same process) can wait there for thread-pool threads that do not exist. Run
    alone, this script without ``close()`` hung its child every time; inside the suite the hang depends on the
    pool's state, so only the closed case is asserted: its child collects the garbage and exits."""
    import gc
    import os
    import signal

    from transferset.labelling.ensemble import Ensemble

    ens = Ensemble([export_teacher(tmp_path / "t.onnx", (12,), classes=4, hidden=8, seed=0)], device="cpu", threads=2)
    ens.run(ens.feeds(np.zeros((64, 12), np.float32)))  # ORT's pool threads are running
    ens.close()
    assert all(m.session is None for m in ens.members)
    ens.cycle = ens  # only the collector can free it
    del ens
    was = gc.isenabled()
    gc.disable()
    try:
        pid = os.fork()
        if pid == 0:  # the child: collect, which frees the session here
            signal.alarm(5)
            gc.collect()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    finally:
        if was:
            gc.enable()
        gc.collect()
    assert os.waitstatus_to_exitcode(status) == 0


def test_label_closes_its_ensemble(images, monkeypatch):
    from transferset.labelling import ensemble

    tmp, _, _ = images
    closed = []
    original = ensemble.Ensemble.close
    monkeypatch.setattr(ensemble.Ensemble, "close", lambda self: (closed.append(self), original(self)))
    label([export_teacher(tmp / "a.onnx", (8, 8), seed=1)], str(tmp / "x.npy"), tmp / "ts",
          LabelOptions(quiet=True, scale=1 / 255))
    assert len(closed) == 1 and all(m.session is None for m in closed[0].members)
