"""Parquet export: a round trip equal to the set's values (pyarrow and Hugging Face datasets), streamed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_transfer_set, read_all_rows
from transferset.cli import main
from transferset.errors import TransferSetError
from transferset.export import PARQUET_NAME, _group_rows, export_parquet
from transferset.format import Manifest

pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture
def ts(tmp_path):
    return make_transfer_set(tmp_path / "set", shard_rows=(7, 0, 13, 1), members=3, classes=5, temperatures=(1, 2, 4),
                             input_shape=(2, 3))


def test_round_trip_with_pyarrow_equals_the_set(ts, tmp_path):
    res = export_parquet(ts, tmp_path / "out", temperatures=[1, 4], include_logits=True, row_group_rows=4)
    want = read_all_rows(ts)
    f = pq.ParquetFile(res["path"])
    assert f.metadata.num_rows == 21 == res["rows"]
    assert all(f.metadata.row_group(i).num_rows <= 4 for i in range(f.metadata.num_row_groups))
    t = f.read()
    assert t.column_names == ["soft_targets_T1", "soft_targets_T4", "label", "source_index", "view", "aug_seed",
                              "inputs", "logits"]
    for name, j in (("soft_targets_T1", 0), ("soft_targets_T4", 2)):
        got = np.array(t[name].to_pylist(), np.float32)
        np.testing.assert_array_equal(got, np.exp(want["soft_targets"][:, j].astype(np.float32)))
        np.testing.assert_allclose(got.sum(1), 1, atol=2e-2)  # float16 log-probabilities, exponentiated
    np.testing.assert_array_equal(t["label"].to_numpy(), want["labels"])
    np.testing.assert_array_equal(t["source_index"].to_numpy(), want["source_index"])
    np.testing.assert_array_equal(t["view"].to_numpy(), want["view"])
    np.testing.assert_array_equal(t["aug_seed"].to_numpy(), want["aug_seed"])
    meta = json.loads(f.schema_arrow.metadata[b"transferset"])
    assert meta["input"]["shape"] == [2, 3] and meta["temperatures"] == {"soft_targets_T1": 1.0, "soft_targets_T4": 4.0}
    x = np.array(t["inputs"].to_pylist(), np.float32).reshape(-1, *meta["input"]["shape"])
    np.testing.assert_array_equal(x, want["inputs"])
    np.testing.assert_array_equal(np.array(t["logits"].to_pylist(), np.float32), want["logits"].astype(np.float32))
    assert (tmp_path / "out" / "README.md").read_text().startswith("---")  # a card even when the set has none


def test_round_trip_with_hf_datasets(ts, tmp_path):
    datasets = pytest.importorskip("datasets")
    export_parquet(ts, tmp_path / "out", row_group_rows=5)
    d = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / PARQUET_NAME), split="train",
                              cache_dir=str(tmp_path / "hf-cache"))
    want = read_all_rows(ts)
    assert d.num_rows == 21
    assert d.column_names == ["soft_targets_T1", "soft_targets_T2", "soft_targets_T4", "label", "source_index",
                              "view", "aug_seed", "inputs"]
    d = d.with_format("numpy")
    np.testing.assert_array_equal(np.stack(d["soft_targets_T2"]), np.exp(want["soft_targets"][:, 1].astype(np.float32)))
    np.testing.assert_array_equal(d["label"], want["labels"])
    np.testing.assert_array_equal(np.stack(d["inputs"]).reshape(want["inputs"].shape), want["inputs"])


def test_card_is_copied_and_inputs_can_be_left_out(ts, tmp_path):
    (ts / "README.md").write_text("# my card\n")
    res = export_parquet(ts, tmp_path / "out", include_inputs=False)
    assert (tmp_path / "out" / "README.md").read_text() == "# my card\n"
    assert "inputs" not in res["columns"] and "logits" not in res["columns"]


def test_unstored_temperature_and_incomplete_set_are_refused(ts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(ts), "--out", str(tmp_path / "o"), "--temperatures", "1,3"])
    assert e.value.code == 2
    assert "--temperatures 3 is not a stored temperature; this set stores 1, 2, 4" in capsys.readouterr().err
    m = json.loads((ts / "manifest.json").read_text())
    m["complete"] = False
    (ts / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TransferSetError, match="incomplete"):
        export_parquet(ts, tmp_path / "o")


def test_cli_export_prints_one_line(ts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(ts), "--out", str(tmp_path / "o"), "--temperatures", "4", "--logits", "--quiet"])
    assert e.value.code == 0
    assert "21 rows in" in capsys.readouterr().out
    assert pq.ParquetFile(tmp_path / "o" / PARQUET_NAME).schema_arrow.names[0] == "soft_targets_T4"


def test_empty_set_gives_an_empty_file_with_the_columns(tmp_path):
    root = make_transfer_set(tmp_path / "set", shard_rows=(0,))
    res = export_parquet(root, tmp_path / "out")
    t = pq.read_table(res["path"])
    assert t.num_rows == 0 and "soft_targets_T1" in t.column_names


def test_row_groups_are_bounded_for_a_huge_set():
    """A 10M-row, 1000-class, 5-member set: each group reads a bounded slice, never the set."""
    m = Manifest.from_json({
        "format": "transferset", "schema_version": 1, "num_classes": 1000, "num_members": 5,
        "temperatures": [1, 4], "combine": "mean-probs", "weights": [0.2] * 5, "dtype": "float16",
        "input": {"shape": [3, 32, 32], "dtype": "uint8", "stored": True}, "teachers": [{}] * 5, "shards": [],
        "augment": {}, "source": {}, "complete": True, "expected_rows": 10_000_000})
    names = ["soft_targets", "labels", "source_index", "view", "aug_seed", "inputs", "logits"]
    rows = _group_rows(m, names, None)
    per_row = 2 * (5 * 1000 + 2 * 1000) + 8 + 8 + 4 + 8 + 3 * 32 * 32
    assert 1 <= rows and rows * per_row <= 64 << 20


@pytest.mark.parametrize("codec", ["topk:2", "sample:3"])
def test_sparse_sets_export_their_own_fields(ts, tmp_path, codec):
    """A recoded set exports its stored sparse fields (probabilities for the log-values), equal to the shards."""
    from transferset.format.recode import recode

    sparse = tmp_path / "sparse"
    recode(ts, sparse, codec)
    res = export_parquet(sparse, tmp_path / "out", temperatures=[2, 4], include_logits=True, row_group_rows=5)
    want = read_all_rows(sparse)
    f = pq.ParquetFile(res["path"])
    t = f.read()
    meta = json.loads(f.schema_arrow.metadata[b"transferset"])
    assert meta["codec"] == codec and t.num_rows == 21
    if codec.startswith("topk"):
        assert t.column_names == ["topk_index", "topk_probs_T2", "tail_mass_T2", "topk_probs_T4", "tail_mass_T4",
                                  "label", "source_index", "view", "aug_seed", "inputs", "topk_logits",
                                  "member_log_partition"]
        np.testing.assert_array_equal(np.array(t["topk_index"].to_pylist()), want["topk_index"])
        for name, j in (("T2", 1), ("T4", 2)):
            probs = np.array(t[f"topk_probs_{name}"].to_pylist(), np.float32)
            tail = t[f"tail_mass_{name}"].to_numpy()
            np.testing.assert_array_equal(probs, np.exp(want["topk_log_probs"][:, j].astype(np.float32)))
            np.testing.assert_array_equal(tail, np.exp(want["tail_log_mass"][:, j].astype(np.float32)))
            np.testing.assert_allclose(probs.sum(1) + tail, 1, atol=2e-2)
        np.testing.assert_array_equal(np.array(t["topk_logits"].to_pylist(), np.float32),
                                      want["topk_logits"].astype(np.float32))
        np.testing.assert_array_equal(np.array(t["member_log_partition"].to_pylist(), np.float32),
                                      want["member_log_partition"].astype(np.float32))
    else:
        assert t.column_names == ["sample_index_T2", "sample_count_T2", "sample_index_T4", "sample_count_T4",
                                  "label", "source_index", "view", "aug_seed", "inputs"]
        for name, j in (("T2", 1), ("T4", 2)):
            np.testing.assert_array_equal(np.array(t[f"sample_index_{name}"].to_pylist()), want["sample_index"][:, j])
            counts = np.array(t[f"sample_count_{name}"].to_pylist())
            np.testing.assert_array_equal(counts, want["sample_count"][:, j])
            assert (counts.sum(1) == 3).all()
    np.testing.assert_array_equal(t["label"].to_numpy(), want["labels"])
