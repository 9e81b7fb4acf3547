"""format/reading.py: one TransferSet, opened once, serving rows and fields; format/codecs.py: one object per codec."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import read_all_rows
from transferset.cli import main
from transferset.errors import FAILED, TransferSetError
from transferset.format import SHARD_FIELDS
from transferset.format.codecs import CODECS, Codec, codec_for
from transferset.format.reading import TransferSet
from transferset.format.schema import CODEC_FAMILIES
from transferset.format.verify import verify_transfer_set


def test_blocks_take_and_read_serve_the_rows_in_set_order(tiny_transfer_set):
    want = read_all_rows(tiny_transfer_set)
    ts = TransferSet(tiny_transfer_set)
    assert ts.rows == 21 and ts.shard_rows == [7, 0, 13, 1] and ts.row_starts.tolist() == [0, 7, 7, 20]
    starts, labels = [], []
    for start, got in ts.blocks(["labels", "logits"], 5):
        starts.append(start)
        labels.append(got["labels"])
        np.testing.assert_array_equal(got["logits"], want["logits"][start:start + len(got["labels"])])
    assert starts == [0, 5, 7, 12, 17, 20]
    np.testing.assert_array_equal(np.concatenate(labels), want["labels"])
    rows = np.array([0, 6, 7, 19, 20])
    got = ts.take(rows, ["soft_targets", "source_index"])
    np.testing.assert_array_equal(got["soft_targets"], want["soft_targets"][rows])
    assert ts.locate(rows)[0].tolist() == [0, 0, 2, 2, 3]
    into = {"labels": np.full(9, -7, np.int64)}
    ts.read(2, 3, 8, ["labels"], into=into, at=4)
    np.testing.assert_array_equal(into["labels"][4:], want["labels"][10:15])
    with pytest.raises(TransferSetError, match="outside the shards"):
        ts.locate(np.array([21]))
    ts.close()


def test_a_bad_shard_is_refused_in_one_line_or_skipped(tiny_transfer_set, capsys):
    (tiny_transfer_set / "shard-00002.h5").write_bytes(b"not hdf5")
    with pytest.raises(TransferSetError, match=r"shard-00002\.h5: .*run `transferset verify") as e:
        TransferSet(tiny_transfer_set)
    assert e.value.exit_code == FAILED
    with pytest.raises(TransferSetError) as e:
        TransferSet(tiny_transfer_set, option="skip_bad_shards")
    assert e.value.option == "skip_bad_shards"
    ts = TransferSet(tiny_transfer_set, skip_bad_shards=True)
    assert ts.skipped == ["shard-00002.h5"] and ts.rows == 8 and "WARNING: skipping shard" in capsys.readouterr().err
    assert [s for s, _ in ts.blocks(["labels"], 100)] == [0, 20]


def test_values_the_format_forbids_are_refused_as_read(tiny_transfer_set):
    ts = TransferSet(tiny_transfer_set)
    got = ts.read(0, 0, 7, ["soft_targets", "labels"])
    ts.check_values(0, 0, got)
    got["soft_targets"][3, 1, 2] = np.nan
    ts.check_values(0, 0, got, temperature_index=0)  # only the temperature delivered is checked
    with pytest.raises(TransferSetError, match=r"shard-00000\.h5: row 3: non-finite soft_targets"):
        ts.check_values(0, 0, got)


def test_every_codec_is_one_object_whose_fields_come_from_the_schema():
    assert set(CODECS) == set(CODEC_FAMILIES)
    for name, cls in CODECS.items():
        c = codec_for("dense" if name == "dense" else f"{name}:3")
        assert isinstance(c, Codec) and type(c) is cls and c.name == name
        stored = {f.name for f in SHARD_FIELDS if f.codecs is not None and CODEC_FAMILIES[name] in f.codecs}
        assert set(c.fields) == stored and set(c.targets) | set(c.members) <= stored
        assert c.card_text() and c.export_doc
        assert c.sparse == (name != "dense")
    assert codec_for("systematic:4").fields == codec_for("sample:4").fields
    with pytest.raises(TransferSetError):
        codec_for("topk")


def test_one_temperature_is_read_alone_in_bounded_blocks(tiny_transfer_set, tmp_path, monkeypatch):
    """read(temperature_index=j) hands over that stored temperature only (HDF5 selects it), equal to the slice of
    the whole; blocks() hold at most BLOCK_BYTES (one row when a row is more), for per-position sets too."""
    from conftest import make_frame_set
    from transferset.format import reading

    want = read_all_rows(tiny_transfer_set)
    ts = TransferSet(tiny_transfer_set)
    got = ts.read(2, 1, 12, ["soft_targets", "logits"], temperature_index=1)
    assert got["soft_targets"].shape == (11, 5)
    np.testing.assert_array_equal(got["soft_targets"], want["soft_targets"][8:19, 1])
    np.testing.assert_array_equal(got["logits"], want["logits"][8:19])
    row = ts.held_layout(["soft_targets"], 1)["soft_targets"]
    monkeypatch.setattr(reading, "BLOCK_BYTES", 3 * 5 * 2)  # three rows of one temperature of float16
    sizes = [len(b["soft_targets"]) for _, b in ts.blocks(["soft_targets"], 100, temperature_index=0)]
    assert row == ((5,), np.dtype(np.float16)) and sizes == [3, 3, 1, 3, 3, 3, 3, 1, 1]
    ts.close()
    frames = make_frame_set(tmp_path / "frames")
    fs = TransferSet(frames)
    whole = fs.read(0, 0, 5, ["soft_targets"])["soft_targets"]  # [N, P, T, C]
    one = fs.read(0, 0, 5, ["soft_targets"], temperature_index=1)["soft_targets"]
    assert whole.shape == (5, 4, 2, 5) and one.shape == (5, 4, 5)
    np.testing.assert_array_equal(one, whole[:, :, 1])
    fs.close()


def test_read_blocks_follow_the_chunks_and_bound_contiguous_reads(monkeypatch):
    """A chunked dataset is read a whole number of its chunks at a time; contiguous storage (or an object without
    ``chunks``) in blocks bounded by the bytes held."""
    from transferset.format import reading

    class Fake:
        def __init__(self, chunks):
            self.chunks, self.calls = chunks, []
            self.data = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)

        def read_direct(self, out, src, dst):
            self.calls.append((src[0].start, src[0].stop))
            out[dst] = self.data[src]

    monkeypatch.setattr(reading, "READ_BYTES", 2 * 4 * 3 * 4)  # two chunks of 4 rows x 3 float32
    d = Fake((4, 3))
    out = np.empty((30, 3), np.float32)
    reading.read_blocks(d, out, 5, 35)
    assert d.calls == [(5, 8), (8, 16), (16, 24), (24, 32), (32, 35)]
    np.testing.assert_array_equal(out, d.data[5:35])
    flat = Fake(None)
    reading.read_blocks(flat, out, 0, 20)
    assert flat.calls == [(0, 8), (8, 16), (16, 20)]


def test_read_blocks_with_a_selection_read_whole_rows_in_bounded_blocks(monkeypatch):
    """One temperature of [rows, T, C]: whole rows are read (HDF5's strided selection is ~10x slower) into a
    scratch block of at most READ_BYTES of whole rows, and the selection is copied out."""
    from transferset.format import reading

    class Fake:
        def __init__(self):
            self.chunks, self.calls, self.shape = (4, 2, 3), [], (40, 2, 3)
            self.data = np.arange(40 * 2 * 3, dtype=np.float32).reshape(40, 2, 3)

        def read_direct(self, out, src, dst):
            assert len(src) == 1, "a whole-row read"
            self.calls.append((src[0].start, src[0].stop, out.nbytes))
            out[dst] = self.data[src]

    monkeypatch.setattr(reading, "READ_BYTES", 4 * 2 * 3 * 4)  # one chunk: 4 whole rows
    d = Fake()
    out = np.full((32, 3), -1, np.float32)
    reading.read_blocks(d, out, 3, 33, tail=(1,), at=2)
    np.testing.assert_array_equal(out[2:], d.data[3:33, 1])
    assert (out[:2] == -1).all()
    assert [c[:2] for c in d.calls] == [(3, 4)] + [(a, a + 4) for a in range(4, 32, 4)] + [(32, 33)]
    assert max(c[2] for c in d.calls) <= reading.READ_BYTES


def test_label_refuses_a_set_past_the_limits_a_reader_holds(tmp_path):
    """refuse_past_limits (called by every labelling path before its first shard) names the field and its row
    size; a set within the limits passes."""
    import copy

    from conftest import make_token_set
    from transferset.format.parts import read_manifest
    from transferset.format.schema import MAX_ROW_VALUES, refuse_past_limits

    m = read_manifest(make_token_set(tmp_path / "tokens"))
    refuse_past_limits(m)
    wide = copy.deepcopy(m)
    wide.codec, wide.positions = "topk:32", 1 << 20
    with pytest.raises(TransferSetError, match=rf"cannot label this set: a row of 'topk_index' would hold "
                                               rf"33554432 values .* at most {MAX_ROW_VALUES} values"):
        refuse_past_limits(wide)
    hot = copy.deepcopy(m)
    hot.temperatures = [float(t) for t in range(1, 66)]
    with pytest.raises(TransferSetError, match="65 temperatures"):
        refuse_past_limits(hot)


def _set_row_starts(root, starts: dict[int, int]) -> None:
    m = json.loads((root / "manifest.json").read_text())
    for i, v in starts.items():
        m["shards"][i]["row_start"] = v
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("starts, bad", [({2: 10 ** 12}, ["shard-00002.h5"]), ({2: 3}, ["shard-00002.h5"]),
                                         ({2: 10 ** 12, 3: 10 ** 12}, ["shard-00002.h5", "shard-00003.h5"])])
def test_a_row_start_the_shards_before_it_do_not_end_at_makes_its_shard_bad(tiny_transfer_set, capsys, starts, bad):
    # found by fuzz_sets (seed 5, case 369): train-student on a photo set with a shard's row_start at 10^12 indexed
    # its photo marks' row array with it (IndexError); after one bad shard, the next one's row_start must still
    # lie inside the set; verify names the same shards as the readers (it used to report only the first of two)
    _set_row_starts(tiny_transfer_set, starts)
    assert [p for p, _ in verify_transfer_set(tiny_transfer_set, rehash=False)] == bad
    with pytest.raises(TransferSetError, match=rf"{bad[0]}: row_start {starts[2]} ") as e:
        TransferSet(tiny_transfer_set)
    assert e.value.exit_code == FAILED and "\n" not in str(e.value)
    ts = TransferSet(tiny_transfer_set, skip_bad_shards=True)
    assert ts.skipped == bad and capsys.readouterr().err.count("WARNING: skipping shard") == len(bad)
    assert (np.diff(ts.row_starts) >= 0).all() and max(ts.row_starts + ts.shard_rows) <= 21
    assert [s for s, _ in ts.blocks(["labels"], 100)] == [0] + ([20] if len(bad) == 1 else [])


def test_train_student_refuses_a_row_start_past_the_set_in_one_line_or_skips_it(tiny_transfer_set, tmp_path, capsys):
    _set_row_starts(tiny_transfer_set, {2: 10 ** 12})
    args = ["train-student", "--transfer-set", str(tiny_transfer_set), "--student", "mlp:8", "--epochs", "1",
            "--batch-size", "4", "--device", "cpu", "-q", "--holdout", "0.25"]
    with pytest.raises(SystemExit) as e:
        main(args + ["--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "shard-00002.h5: row_start 1000000000000 but" in err[0], err
    with pytest.raises(SystemExit) as e:
        main(args + ["--out", str(tmp_path / "b"), "--skip-bad-shards", "--seed", "1"])  # holds out rows 2, 20
    err = capsys.readouterr().err
    assert e.value.code == 0 and "Traceback" not in err and "WARNING: skipping shard" in err, err
