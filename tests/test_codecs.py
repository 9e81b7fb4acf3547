"""Codecs: dense, topk:K and sample:K sets, their maths, their losses and their way through every command."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from teachers import export_teacher
from transferset.cli import main
from transferset.errors import TransferSetError
from transferset.format import check_shard, read_manifest, verify_transfer_set
from transferset.format.codecs import divergence, encode, resolve_codec
from transferset.format.recode import recode
from transferset.format.schema import count_dtype, index_dtype, parse_codec
from transferset.labelling.pipeline import LabelOptions, label
from transferset.targets import log_softmax, soft_targets
from transferset.training.losses import KDLoss
from transferset.training.loop import TrainOptions, train_student
from transferset.training.reader import TransferSetDataset
from transferset.training.sparse_losses import SampledKDLoss, TopKTailKDLoss


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A 6-class task (two ONNX teachers), its test split, and the set labelled dense, topk:2, sample:4 and
    systematic:4."""
    tmp = tmp_path_factory.mktemp("codecs")
    rng = np.random.default_rng(0)
    teachers = [export_teacher(tmp / f"t{i}.onnx", (12,), classes=6, hidden=32, seed=3 + i) for i in range(2)]
    import onnxruntime as ort

    s = ort.InferenceSession(str(teachers[0]), providers=["CPUExecutionProvider"])
    for name, n in (("train", 500), ("test", 200)):
        x = rng.normal(size=(n, 12)).astype(np.float32)
        np.savez(tmp / f"{name}.npz", x=x, y=s.run(None, {"x": x})[0].argmax(1))
    for codec in ("dense", "topk:2", "sample:4", "systematic:4"):
        label(teachers, str(tmp / "train.npz"), tmp / codec.replace(":", ""),
              LabelOptions(shard_size=128, quiet=True, codec=codec, temperatures=(1, 2, 4)))
    return tmp


# -- the format ------------------------------------------------------------------------------------------------
def test_codec_names_dtypes_and_the_default_rule():
    assert parse_codec("dense") == ("dense", None) and parse_codec("topk:10") == ("topk", 10)
    for bad in ("topk", "topk:0", "sample:-1", "topk:1.5", "dense:3", "gzip"):
        with pytest.raises(TransferSetError) as e:
            parse_codec(bad)
        assert e.value.option == "codec"
    assert [index_dtype(c).name for c in (2, 256, 257, 65536, 65537)] == ["uint8", "uint8", "uint16", "uint16", "uint32"]
    assert [count_dtype(k).name for k in (10, 255, 256)] == ["uint8", "uint8", "uint16"]
    assert resolve_codec(None, 999) == "dense" and resolve_codec(None, 1000).startswith("topk:")
    with pytest.raises(TransferSetError, match="keeps 6 classes"):
        resolve_codec("topk:6", 6)


def test_topk_values_by_hand_and_against_dense():
    z = np.array([[[2.0, 0.0, 1.0, -1.0], [0.5, 1.5, 0.0, 0.0]]])  # one row, two members, four classes
    temps = [1.0, 2.0]
    lp = soft_targets(z, temps)
    e = encode("topk:2", z, lp, np.array([0]), temps, "float64")
    part = np.empty((1, 2, 2))  # label's path: the log-partitions come out of the soft targets' own pass
    e_label = encode("topk:2", z, soft_targets(z, temps, log_partition=part), np.array([0]), temps, "float64", part)
    for name in e:
        np.testing.assert_allclose(e_label[name], e[name], rtol=0, atol=1e-12)
    for rule in ("mean-logits", "geometric"):
        other = np.full((1, 2, 2), np.nan)
        soft_targets(z, temps, rule, log_partition=other)
        np.testing.assert_allclose(other, part, atol=1e-12)
    p1 = [sum(math.exp(z[0, m, c]) / sum(math.exp(v) for v in z[0, m]) for m in range(2)) / 2 for c in range(4)]
    assert list(e["topk_index"][0]) == sorted(range(4), key=lambda c: -p1[c])[:2] == [0, 1]
    for j, t in enumerate(temps):
        p = [sum(math.exp(z[0, m, c] / t) / sum(math.exp(v / t) for v in z[0, m]) for m in range(2)) / 2 for c in range(4)]
        assert e["tail_log_mass"][0, j] == pytest.approx(math.log(p[2] + p[3]), abs=1e-12)
        assert e["topk_log_probs"][0, j] == pytest.approx([math.log(p[0]), math.log(p[1])], abs=1e-12)
        for m in range(2):
            assert e["member_log_partition"][0, m, j] == pytest.approx(math.log(sum(math.exp(v / t) for v in z[0, m])))
            # a member's log-probability at a kept class, rebuilt exactly from the stored numbers
            rebuilt = e["topk_logits"][0, m] / t - e["member_log_partition"][0, m, j]
            np.testing.assert_allclose(rebuilt, log_softmax(z[0, m] / t)[[0, 1]], atol=1e-12)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(64, 3, 50)) * 3
    lp = soft_targets(z, [1, 4])
    e = encode("topk:5", z, lp, np.arange(64), [1, 4], "float64")
    kept = np.take_along_axis(lp, e["topk_index"].astype(np.int64)[:, None, :], 2)
    np.testing.assert_array_equal(e["topk_log_probs"], kept)
    np.testing.assert_allclose(np.exp(e["tail_log_mass"]), 1 - np.exp(kept).sum(2), atol=1e-12)
    assert (divergence("topk:5", lp, e) >= -1e-12).all() and divergence("topk:49", lp, encode(
        "topk:49", z, lp, np.arange(64), [1, 4], "float64")).max() < 1e-12  # one tail class: nothing is lost


def test_sample_draws_are_seeded_by_the_row_and_count_to_k():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(10, 2, 30)) * 2
    lp = soft_targets(z, [1, 2])
    whole = encode("sample:7", z, lp, np.arange(100, 110), [1, 2], "float16")
    part = encode("sample:7", z[4:6], lp[4:6], np.arange(104, 106), [1, 2], "float16")
    for name in ("sample_index", "sample_count"):
        np.testing.assert_array_equal(whole[name][4:6], part[name])  # a resumed run draws the same classes
    assert (whole["sample_count"].astype(int).sum(2) == 7).all() and whole["sample_count"].dtype == np.uint8
    idx, cnt = whole["sample_index"].astype(int), whole["sample_count"]
    assert (np.take_along_axis(lp, idx, 2)[cnt > 0] > -np.inf).all()


def test_systematic_counts_are_floor_or_ceil_of_k_p_and_unbiased():
    """systematic:K: K evenly spaced points from one seeded offset, so each class gets floor(K p) or ceil(K p)
    draws; over many rows the mean of count / K is p (unbiased), with far less spread than sample:K's."""
    rng = np.random.default_rng(4)
    z = rng.normal(size=(1, 3, 20)) * 2
    rows, k = 20000, 8
    zz = np.repeat(z, rows, 0)
    lp = soft_targets(zz, [1.0, 4.0])
    e = encode(f"systematic:{k}", zz, lp, np.arange(rows), [1.0, 4.0], "float32")
    s = encode(f"sample:{k}", zz, lp, np.arange(rows), [1.0, 4.0], "float32")
    for j in range(2):
        p = np.exp(lp[0, j])
        dense_counts = {}
        for name, enc in (("systematic", e), ("sample", s)):
            counts = np.zeros((rows, 20))
            np.put_along_axis(counts, enc["sample_index"][:, j].astype(np.int64), enc["sample_count"][:, j], axis=1)
            counts[:, 0] = np.where((enc["sample_index"][:, j] == 0) & (enc["sample_count"][:, j] > 0),
                                    enc["sample_count"][:, j], 0).sum(1)  # class 0 and empty slots share index 0
            assert (counts.sum(1) == k).all()
            dense_counts[name] = counts
            mean, stderr = counts.mean(0) / k, counts.std(0) / k / math.sqrt(rows)
            assert (np.abs(mean - p) <= 5 * stderr + 1e-9).all(), name
        sys_c = dense_counts["systematic"]
        assert ((sys_c == np.floor(k * p)) | (sys_c == np.ceil(k * p))).all()
        frac = k * p - np.floor(k * p)  # a class's count is floor(K p) + Bernoulli(frac): variance frac (1 - frac)
        np.testing.assert_allclose(sys_c.var(0), frac * (1 - frac), atol=0.02)
        np.testing.assert_allclose(dense_counts["sample"].var(0), k * p * (1 - p), rtol=0.1, atol=0.02)  # binomial
        assert sys_c.var(0).sum() < 0.8 * dense_counts["sample"].var(0).sum()
    again = encode(f"systematic:{k}", zz[5:9], lp[5:9], np.arange(5, 9), [1.0, 4.0], "float32")
    np.testing.assert_array_equal(again["sample_index"], e["sample_index"][5:9])  # seeded by the row alone


# -- the losses ------------------------------------------------------------------------------------------------
def test_topk_loss_equals_dense_kd_when_one_class_is_left_out():
    torch.manual_seed(0)
    s, t = torch.randn(8, 6), 2.0
    lp = torch.log_softmax(torch.randn(8, 6) * 2, dim=1)
    idx = torch.argsort(lp, dim=1, descending=True)[:, :5]
    tail = torch.logsumexp(lp.scatter(1, idx, float("-inf")), dim=1)
    sparse = TopKTailKDLoss(1.0, t)(s, {"index": idx, "log_probs": lp.gather(1, idx), "tail": tail})["loss"]
    assert float(sparse) == pytest.approx(float(KDLoss(1.0, t)(s, lp)["loss"]), rel=1e-5)


def test_sampled_estimator_mean_gradient_equals_the_dense_gradient():
    """Over 20,000 rows of sample:8 draws, the mean gradient is within 5 standard errors of the dense one."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(1, 3, 12)) * 2
    rows, k, t = 20000, 8, 2.0
    lp = soft_targets(np.repeat(z, rows, 0), [t])
    e = encode(f"sample:{k}", np.repeat(z, rows, 0), lp, np.arange(rows), [t], "float32")
    s = torch.randn(1, 12).repeat(rows, 1).requires_grad_(True)
    loss = SampledKDLoss(1.0, t)(s, {"index": torch.from_numpy(e["sample_index"][:, 0].astype(np.int64)),
                                     "count": torch.from_numpy(e["sample_count"][:, 0].astype(np.float32))})["loss"]
    (per_row,) = torch.autograd.grad(loss * rows, s)  # each row's own gradient
    s_dense = s.detach()[:1].clone().requires_grad_(True)
    KDLoss(1.0, t)(s_dense, torch.from_numpy(lp[:1, 0]).float())["loss"].backward()
    mean, stderr = per_row.mean(0), per_row.std(0) / math.sqrt(rows)
    assert ((mean - s_dense.grad[0]).abs() <= 5 * stderr + 1e-6).all()
    assert (mean - s_dense.grad[0]).abs().max() < 0.01


# -- sets through every command --------------------------------------------------------------------------------
def test_sparse_sets_through_verify_info_train_and_evaluate(sets, tmp_path, capsys):
    for name, codec in (("topk2", "topk:2"), ("sample4", "sample:4"), ("systematic4", "systematic:4")):
        m = read_manifest(sets / name)
        assert (m.codec, m.schema_version) == (codec, 4) and verify_transfer_set(sets / name) == []
        with pytest.raises(SystemExit) as e:
            main(["info", str(sets / name), "--json"])
        assert e.value.code == 0 and json.loads(capsys.readouterr().out)["codec"] == codec
        with pytest.raises(SystemExit) as e:
            main(["train-student", "--transfer-set", str(sets / name), "--student", "mlp:32", "--out",
                  str(tmp_path / name), "--epochs", "10", "--lr", "1e-2", "-T", "2", "--device", "cpu", "-q"])
        assert e.value.code == 0 and "trained 10 epochs" in capsys.readouterr().out
        with pytest.raises(SystemExit) as e:
            main(["evaluate", "--model", str(tmp_path / name / "student.pt"), "--data", str(sets / "test.npz"),
                  "--json"])
        assert json.loads(capsys.readouterr().out)["accuracy"] > 0.4  # chance is about 0.17
    dense = read_manifest(sets / "dense")
    assert dense.schema_version == 4 and "codec" not in json.loads((sets / "dense" / "manifest.json").read_text())


@pytest.mark.parametrize("name", ["topk2", "sample4", "systematic4"])
def test_streaming_reader_gives_the_sparse_fields_at_one_temperature(sets, name):
    fields = ("topk_index", "topk_log_probs", "tail_log_mass") if name == "topk2" else ("sample_index", "sample_count")
    ds = TransferSetDataset(sets / name, fields=("inputs", *fields, "labels"), temperature=2, batch_size=16)
    batch = next(iter(ds))
    assert batch[fields[0]].dtype == torch.int64 and batch[fields[0]].shape[0] == 16
    assert all(batch[f].dim() <= 2 for f in fields)
    with pytest.raises(TransferSetError, match="not stored"):
        TransferSetDataset(sets / name, fields=("inputs", *fields), temperature=3)
    with pytest.raises(TransferSetError, match="holds no"):
        TransferSetDataset(sets / name, fields=("inputs", "soft_targets"))


@pytest.mark.parametrize("kw,option", [(dict(temperature=3.0), "temperature"), (dict(loss="logit-mse"), "loss"),
                                       (dict(combine="mean-logits"), "combine"), (dict(teacher_noise=0.1), "teacher_noise")])
def test_a_sparse_set_refuses_what_it_cannot_honour(sets, tmp_path, kw, option):
    with pytest.raises(TransferSetError) as e:
        train_student(sets / "topk2", tmp_path / "run", TrainOptions(student="mlp:8", device="cpu", quiet=True, **kw))
    assert e.value.option == option
    if option == "temperature":
        assert "stored: 1, 2, 4" in str(e.value) and "cannot be rebuilt" in str(e.value)


def test_hard_labels_train_from_a_sparse_set(sets, tmp_path):
    res = train_student(sets / "sample4", tmp_path / "run", TrainOptions(student="mlp:8", device="cpu", quiet=True,
                                                                       alpha=0.0, epochs=1, temperature=3.0))
    assert res.metrics and res.metrics[-1]["soft"] == 0.0


def test_recode_round_trip(sets, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["recode", str(sets / "dense"), str(tmp_path / "r"), "--codec", "topk:2", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert e.value.code == 0 and res["rows"] == 500 and len(res["kl"]) == 3 and all(v >= 0 for v in res["kl"])
    assert res["row_bytes"]["dense"] > res["row_bytes"]["topk:2"]
    assert verify_transfer_set(tmp_path / "r") == []
    got, labelled = read_manifest(tmp_path / "r"), read_manifest(sets / "topk2")
    assert (got.codec, got.schema_version, got.stats) == ("topk:2", 4, labelled.stats)
    for s in got.shards:
        with h5py.File(tmp_path / "r" / s.path) as fr, h5py.File(sets / "dense" / s.path) as fd, \
                h5py.File(sets / "topk2" / s.path) as fl:
            np.testing.assert_array_equal(fr["labels"][()], fd["labels"][()])
            np.testing.assert_array_equal(fr["inputs"][()], fd["inputs"][()])
            idx = fr["topk_index"][()].astype(np.int64)
            # the kept log-probabilities are the dense set's own values, copied
            np.testing.assert_array_equal(fr["topk_log_probs"][()],
                                          np.take_along_axis(fd["soft_targets"][()], idx[:, None, :], 2))
            # and agree with labelling the codec directly, up to the float16 rounding of the dense logits
            same = (fl["topk_index"][()] == fr["topk_index"][()]).all(axis=1)
            assert same.mean() > 0.95
            np.testing.assert_allclose(fl["tail_log_mass"][()][same], fr["tail_log_mass"][()][same], atol=0.02)
    recode(sets / "dense", tmp_path / "s1", "sample:4")
    recode(sets / "dense", tmp_path / "s2", "sample:4")
    assert [s.sha256 for s in read_manifest(tmp_path / "s1").shards] == \
        [s.sha256 for s in read_manifest(tmp_path / "s2").shards]
    with pytest.raises(TransferSetError, match="not an empty folder"):
        recode(sets / "dense", tmp_path / "s1", "sample:4")
    with pytest.raises(TransferSetError, match="dense set into a sparse"):
        recode(sets / "topk2", tmp_path / "x", "sample:4")


@pytest.mark.parametrize("name,field,value,why", [
    ("topk2", "topk_index", 6, "topk_index outside"), ("topk2", "tail_log_mass", np.nan, "NaN"),
    ("topk2", "topk_logits", np.inf, "non-finite topk_logits"),
    ("sample4", "sample_count", 3, "not summing to K"), ("sample4", "sample_index", 200, "sample_index outside")])
def test_value_checks_know_the_sparse_fields(sets, tmp_path, name, field, value, why):
    import shutil

    shutil.copytree(sets / name, tmp_path / name)
    m = read_manifest(tmp_path / name)
    with h5py.File(tmp_path / name / m.shards[1].path, "r+") as f:
        a = f[field][()]
        a.reshape(len(a), -1)[3, 0] = value
        f[field][...] = a
    reason = check_shard(tmp_path / name, m.shards[1], m, rehash=False, values=True)
    assert reason is not None and reason.startswith("row 3:") and why in reason


def test_a_resumed_label_run_keeps_its_codec(sets, tmp_path):
    with pytest.raises(TransferSetError) as e:
        label([sets / "t0.onnx", sets / "t1.onnx"], str(sets / "train.npz"), sets / "topk2",
              LabelOptions(shard_size=128, quiet=True, codec="topk:3", temperatures=(1, 2, 4)))
    assert e.value.option == "out"  # another definition


def test_top_classes_break_ties_by_lower_class_at_the_kth_place_too():
    """Ties that reach past the k kept (argpartition picks among them freely) go to the lower classes, as ONNX
    TopK (the per-token graph) and a stable sort choose; e.g. [5, 3, 3, 3, 1] keeps classes 0 and 1 at k = 2."""
    from transferset.format.codecs import top_classes

    rng = np.random.default_rng(0)
    lp = rng.integers(0, 4, (500, 12)).astype(np.float32)
    lp[::3] = rng.normal(size=(167, 12))
    lp[1, 5:] = -np.inf  # fewer finite classes than k: the -inf ones tie
    for k in (1, 5, 7):
        assert np.array_equal(top_classes(lp, k), np.argsort(-lp, axis=1, kind="stable")[:, :k])
    assert top_classes(np.array([[5, 3, 3, 3, 1]], np.float32), 2).tolist() == [[0, 1]]
