"""The stage-2 reader: exactly-once epochs through DataLoader workers (fork and spawn), values, resume, refusals."""

from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import make_transfer_set, read_all_rows
from transferset.errors import FAILED, USAGE, TransferSetError
from transferset.format import load_manifest
from transferset.format.manifest import MANIFEST_NAME, atomic_write_json
from transferset.training.reader import (InMemoryBatches, TransferSetDataset, estimate_bytes, load_in_memory,
                                open_transfer_set, stored_temperature_index)

ALL = ("inputs", "soft_targets", "logits", "labels", "source_index", "view", "aug_seed")


def _epoch(ds, workers=0, context=None):
    loader = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context=context if workers else None)
    return list(loader)


def _indices(batches):
    return np.concatenate([b["index"][b["mask"]].numpy() for b in batches])


def _check_values(batches, rows, temperature_index=None):
    for b in batches:
        idx = b["index"].numpy()
        assert torch.equal(b["inputs"], torch.from_numpy(rows["inputs"][idx]))
        assert b["logits"].dtype == torch.float32
        assert torch.equal(b["logits"], torch.from_numpy(rows["logits"][idx].astype(np.float32)))
        st = rows["soft_targets"][idx].astype(np.float32)
        want = st if temperature_index is None else st[:, temperature_index]
        assert torch.equal(b["soft_targets"], torch.from_numpy(want))
        assert b["labels"].dtype == torch.int64 and torch.equal(b["labels"], torch.from_numpy(rows["labels"][idx]))
        assert b["mask"].dtype == torch.bool and b["index"].dtype == torch.int64


def test_inline_epoch_is_exactly_once_with_the_shard_values(tiny_transfer_set):
    rows = read_all_rows(tiny_transfer_set)
    manifest, ds = open_transfer_set(tiny_transfer_set, temperature=4, batch_size=6, seed=1)
    assert manifest["shards"][0]["path"] == "shard-00000.h5"
    batches = _epoch(ds)
    assert len(batches) == len(ds) == 4  # 21 rows in batches of 6
    assert all(b["inputs"].shape == (6, 6) and b["soft_targets"].shape == (6, 5) and b["logits"].shape == (6, 3, 5)
               for b in batches)
    assert sorted(_indices(batches).tolist()) == list(range(21))
    assert int(sum(b["mask"].sum() for b in batches)) == 21
    _check_values(batches, rows, temperature_index=1)
    ds.set_epoch(1)
    assert not np.array_equal(_indices(_epoch(ds)), _indices(batches))


def test_all_fields_and_all_temperatures(tiny_transfer_set):
    rows = read_all_rows(tiny_transfer_set)
    ds = TransferSetDataset(tiny_transfer_set, fields=ALL, batch_size=8, buffer_chunks=2)
    batches = _epoch(ds)
    _check_values(batches, rows)
    b = batches[0]
    assert b["soft_targets"].shape == (8, 2, 5)
    idx = b["index"].numpy()
    assert torch.equal(b["aug_seed"], torch.from_numpy(rows["aug_seed"][idx]))
    assert torch.equal(b["view"], torch.from_numpy(rows["view"][idx]))
    assert torch.equal(b["source_index"], b["index"])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_yield_the_same_batches_once(tiny_transfer_set, context):
    ds = TransferSetDataset(tiny_transfer_set, batch_size=2, seed=5, buffer_chunks=2)
    inline = _epoch(ds)
    parallel = _epoch(ds, workers=2, context=context)
    assert [b["index"].tolist() for b in parallel] == [b["index"].tolist() for b in inline]
    assert [b["mask"].tolist() for b in parallel] == [b["mask"].tolist() for b in inline]
    assert sorted(_indices(parallel).tolist()) == list(range(21))
    _check_values(parallel, read_all_rows(tiny_transfer_set))
    if context == "fork":  # a resumed epoch through workers starts at the saved batch, in order
        ds.mark_consumed(3)
        tail = _epoch(ds, workers=2, context=context)
        assert [b["index"].tolist() for b in tail] == [b["index"].tolist() for b in inline[3:]]


def test_ranks_split_the_epoch_with_equal_batch_counts(tiny_transfer_set):
    seen, lengths = [], []
    for rank in range(3):
        ds = TransferSetDataset(tiny_transfer_set, batch_size=4, world_size=3, rank=rank, seed=2)
        batches = _epoch(ds)
        lengths.append(len(batches))
        assert len(batches) == len(ds) and all(len(b["index"]) == 4 for b in batches)
        seen.append(_indices(batches))
    assert lengths == [2, 2, 2]
    assert sorted(np.concatenate(seen).tolist()) == list(range(21))


def test_state_dict_round_trip_resumes_the_remaining_batches(tiny_transfer_set):
    ds = TransferSetDataset(tiny_transfer_set, batch_size=3, seed=9)
    ds.set_epoch(2)
    full = _epoch(ds)
    for k, _ in enumerate(full[:4], start=1):
        ds.mark_consumed(k)
    state = json.loads(json.dumps(ds.state_dict()))
    assert state["epoch"] == 2 and state["batches_done"] == 4 and state["batch_size"] == 3
    fresh = TransferSetDataset(tiny_transfer_set, batch_size=3, seed=9)
    fresh.load_state_dict(state)
    fresh.set_epoch(2)  # a trainer's epoch loop re-selecting the same epoch keeps the resume point
    rest = _epoch(fresh)
    assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in full[4:]]
    fresh.set_epoch(3)
    assert fresh.state_dict()["batches_done"] == 0 and len(_epoch(fresh)) == len(full)


def test_mismatched_state_is_refused(tiny_transfer_set, tmp_path):
    state = TransferSetDataset(tiny_transfer_set, batch_size=3, seed=9).state_dict()
    with pytest.raises(TransferSetError, match="seed=9 but this reader has seed=1"):
        TransferSetDataset(tiny_transfer_set, batch_size=3, seed=1).load_state_dict(state)
    with pytest.raises(TransferSetError, match="batch_size=3 but this reader has batch_size=4"):
        TransferSetDataset(tiny_transfer_set, batch_size=4, seed=9).load_state_dict(state)
    with pytest.raises(TransferSetError, match="world_size=1 but this reader has world_size=2"):
        TransferSetDataset(tiny_transfer_set, batch_size=3, seed=9, world_size=2, rank=0).load_state_dict(state)
    other = make_transfer_set(tmp_path / "other", shard_rows=[5, 5])
    with pytest.raises(TransferSetError, match="another transfer set"):
        TransferSetDataset(other, batch_size=3, seed=9).load_state_dict(state)
    with pytest.raises(TransferSetError, match="batches_done"):
        TransferSetDataset(tiny_transfer_set, batch_size=3, seed=9).load_state_dict({**state, "batches_done": 99})
    with pytest.raises(TransferSetError, match="must be a dict"):
        TransferSetDataset(tiny_transfer_set, batch_size=3, seed=9).load_state_dict({"epoch": 0})


def _edit_manifest(root, fn):
    m = load_manifest(root)
    fn(m)
    atomic_write_json(root / MANIFEST_NAME, m)


def test_shard_disagreeing_with_the_manifest_is_refused_or_skipped(tiny_transfer_set, capsys):
    _edit_manifest(tiny_transfer_set, lambda m: m["shards"][2].update(rows=14))
    with pytest.raises(TransferSetError, match=r"shard-00002\.h5: dataset 'logits' has 13 rows, manifest says 14") as e:
        TransferSetDataset(tiny_transfer_set)
    assert e.value.exit_code == USAGE and "skip_bad_shards" in str(e.value)
    ds = TransferSetDataset(tiny_transfer_set, batch_size=4, skip_bad_shards=True)
    assert "WARNING: skipping shard" in capsys.readouterr().err
    assert sorted(_indices(_epoch(ds)).tolist()) == list(range(7)) + [20]  # row_start from the manifest
    assert ds.state_dict()["skipped_shards"] == ["shard-00002.h5"]


def test_missing_shard_and_path_escaping_the_folder_are_refused(tiny_transfer_set):
    (tiny_transfer_set / "shard-00003.h5").unlink()
    with pytest.raises(TransferSetError, match=r"shard-00003\.h5: missing"):
        TransferSetDataset(tiny_transfer_set)
    _edit_manifest(tiny_transfer_set, lambda m: m["shards"][0].update(path="../evil.h5"))
    with pytest.raises(TransferSetError, match="leaves the transfer-set folder"):
        TransferSetDataset(tiny_transfer_set)


def test_verify_rehashes_shards(tiny_transfer_set):
    _edit_manifest(tiny_transfer_set, lambda m: m["shards"][0].update(sha256="0" * 64))
    TransferSetDataset(tiny_transfer_set)  # rows and shapes are fine
    with pytest.raises(TransferSetError, match=r"shard-00000\.h5: sha256 mismatch"):
        TransferSetDataset(tiny_transfer_set, verify=True)


def test_read_failure_mid_epoch_names_the_shard(tiny_transfer_set, capsys):
    ds = TransferSetDataset(tiny_transfer_set, batch_size=4, shuffle=False)
    skip = TransferSetDataset(tiny_transfer_set, batch_size=4, shuffle=False, skip_bad_shards=True)
    (tiny_transfer_set / "shard-00002.h5").write_bytes(b"not hdf5 any more")  # damaged after opening
    with pytest.raises(TransferSetError, match=r"shard-00002\.h5: reading rows") as e:
        _epoch(ds)
    assert e.value.exit_code == FAILED
    batches = _epoch(skip)  # same batch count, the lost rows masked out
    assert "masked out" in capsys.readouterr().err
    assert len(batches) == 6 and sorted(_indices(batches).tolist()) == list(range(7)) + [20]


def test_unstored_temperature_and_unknown_fields_are_refused(tiny_transfer_set):
    m = load_manifest(tiny_transfer_set)
    assert stored_temperature_index(m, 4.0 + 1e-12) == 1 and stored_temperature_index(m, 2.0) is None
    with pytest.raises(TransferSetError, match="temperature 2 is not stored.*stored: 1, 4"):
        TransferSetDataset(tiny_transfer_set, temperature=2)
    TransferSetDataset(tiny_transfer_set, temperature=2, fields=("logits", "labels"))  # the trainer recomputes
    with pytest.raises(TransferSetError, match="unknown field"):
        TransferSetDataset(tiny_transfer_set, fields=("pixels",))


def test_pickling_drops_open_handles(tiny_transfer_set):
    ds = TransferSetDataset(tiny_transfer_set, batch_size=4)
    it = iter(ds)
    next(it)
    assert ds.shards.ts.files._handles
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.shards.ts.files._handles == {}
    it.close()
    assert ds.shards.ts.files._handles == {}
    assert [b["index"].tolist() for b in clone] == [b["index"].tolist() for b in ds]


def test_in_memory_matches_streaming_and_is_deterministic(tiny_transfer_set):
    m = load_manifest(tiny_transfer_set)
    tensors = load_in_memory(tiny_transfer_set, temperature=1)
    assert tensors["logits"].dtype == torch.float16 and tensors["soft_targets"].shape == (21, 5)
    assert torch.equal(tensors["index"], torch.arange(21))
    assert estimate_bytes(m, temperature=1) == sum(t.numel() * t.element_size() for t in tensors.values())
    mem = InMemoryBatches(tensors, batch_size=5, seed=3, manifest_hash=TransferSetDataset(tiny_transfer_set).manifest_hash)
    a, b = list(mem), list(mem)
    assert len(a) == len(mem) == 5 and all(len(x["index"]) == 5 for x in a)
    assert [x["index"].tolist() for x in a] == [x["index"].tolist() for x in b]
    streamed = _epoch(TransferSetDataset(tiny_transfer_set, temperature=1, batch_size=5))
    assert sorted(_indices(a).tolist()) == sorted(_indices(streamed).tolist()) == list(range(21))
    _check_values(a, read_all_rows(tiny_transfer_set), temperature_index=0)
    assert set(a[0]) == set(streamed[0])
    mem.set_epoch(1)
    assert [x["index"].tolist() for x in mem] != [x["index"].tolist() for x in a]
    mem.mark_consumed(2)
    again = InMemoryBatches(tensors, batch_size=5, seed=3, manifest_hash=mem.manifest_hash)
    again.load_state_dict(json.loads(json.dumps(mem.state_dict())))
    assert [x["index"].tolist() for x in again] == [x["index"].tolist() for x in list(mem)]
    with pytest.raises(TransferSetError, match="seed=3 but this reader has seed=4"):
        InMemoryBatches(tensors, batch_size=5, seed=4, manifest_hash=mem.manifest_hash).load_state_dict(mem.state_dict())
    ranks = [list(InMemoryBatches(tensors, batch_size=4, seed=0, world_size=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert sorted(np.concatenate([_indices(r) for r in ranks]).tolist()) == list(range(21))


def test_replayed_inputs_match_the_source(tmp_path):
    sources = pytest.importorskip("transferset.inputs.sources")
    augment = pytest.importorskip("transferset.inputs.augment")
    data = np.random.default_rng(0).normal(size=(21, 6)).astype(np.float32)
    np.save(tmp_path / "src.npy", data)
    src = sources.open_source(str(tmp_path / "src.npy"))
    root = make_transfer_set(tmp_path / "set", stored=False)
    _edit_manifest(root, lambda m: m["source"].update(data=str(tmp_path / "src.npy"), rows=21,
                                                       fingerprint=src.fingerprint()))
    # the manifest's source lies outside the set: it is used only when the user names it
    with pytest.raises(TransferSetError, match="outside the set's folder") as e:
        TransferSetDataset(root, batch_size=4)
    assert e.value.option == "source_override"
    ds = TransferSetDataset(root, batch_size=4, source_override=tmp_path / "src.npy")
    spec = augment.parse_augment("")
    for b in _epoch(ds):
        idx = b["index"].numpy()
        want = augment.replay(src, idx, np.zeros(len(idx), np.int32), spec, 0)
        assert np.array_equal(b["inputs"].numpy(), np.asarray(want, np.float32))
    # a source inside the set's folder is the set's own: used on the manifest's word
    (root / "src.npy").write_bytes((tmp_path / "src.npy").read_bytes())
    _edit_manifest(root, lambda m: m["source"].update(data="src.npy"))
    assert sum(int(b["mask"].sum()) for b in _epoch(TransferSetDataset(root, batch_size=4))) == 21
    _edit_manifest(root, lambda m: m["source"].update(fingerprint="something else"))
    with pytest.raises(TransferSetError, match="changed since labelling"):
        TransferSetDataset(root)


def test_estimate_counts_replayed_inputs_too(tmp_path):
    """A set without stored inputs still holds them in memory once replayed: the estimate counts every field."""
    root = make_transfer_set(tmp_path / "set", stored=False)
    m = load_manifest(root)
    assert estimate_bytes(m, ("inputs", "labels")) == 21 * (8 + 6 * 4 + 8)  # index, 6 float32 inputs, label
