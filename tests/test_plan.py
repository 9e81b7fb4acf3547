"""Epoch plan properties: exactly once, equal batches per rank, masks, determinism, resume."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transferset.errors import TransferSetError
from transferset.training.plan import epoch_plan, plan_length

shard_lists = st.lists(st.one_of(st.just(0), st.integers(1, 3), st.integers(0, 120)), min_size=0, max_size=6)


def _all_batches(shard_rows, world, workers, **kw):
    """{rank: [batch, ...]} gathering every worker's batches back into batch order."""
    out = {}
    for rank in range(world):
        per_worker = [list(epoch_plan(shard_rows, world_size=world, rank=rank, num_workers=workers, **kw)
                           .batches(worker=w)) for w in range(workers)]
        merged = sorted((b for bs in per_worker for b in bs), key=lambda b: b.index)
        assert [b.index for b in merged] == list(range(len(merged)))  # each batch from exactly one worker
        assert all(b.worker == b.index % workers for b in merged)
        out[rank] = merged
    return out


@settings(max_examples=150, deadline=None)
@given(shard_rows=shard_lists, world=st.integers(1, 4), workers=st.integers(1, 3), batch=st.integers(1, 64),
       chunk=st.integers(1, 50), buffer=st.integers(1, 5), seed=st.integers(0, 2**32), epoch=st.integers(0, 5),
       shuffle=st.booleans())
def test_every_row_exactly_once_and_equal_batches(shard_rows, world, workers, batch, chunk, buffer, seed, epoch,
                                                  shuffle):
    total = sum(shard_rows)
    got = _all_batches(shard_rows, world, workers, seed=seed, epoch=epoch, batch_size=batch, chunk_rows=chunk,
                       buffer_chunks=buffer, shuffle=shuffle)
    length = plan_length(shard_rows, world, batch)
    real = []
    for rank, batches in got.items():
        assert len(batches) == length
        for b in batches:
            assert b.rows.shape == (batch,) and b.mask.shape == (batch,) and b.mask.dtype == bool
            assert b.rows.dtype == np.int64
            assert np.all((b.rows >= 0) & (b.rows < max(total, 1)))
            real.append(b.rows[b.mask])
    real = np.concatenate(real) if real else np.zeros(0, np.int64)
    assert np.array_equal(np.sort(real), np.arange(total))
    assert length * world * batch - total < world * batch  # padding is less than one global step
    if not shuffle:
        assert np.array_equal(real, np.arange(total))


@settings(max_examples=60, deadline=None)
@given(shard_rows=shard_lists, world=st.integers(1, 3), batch=st.integers(1, 16), chunk=st.integers(1, 10),
       start=st.integers(0, 40), seed=st.integers(0, 1000))
def test_resume_gives_the_tail_and_same_args_same_plan(shard_rows, world, batch, chunk, start, seed):
    kw = dict(seed=seed, epoch=2, world_size=world, rank=world - 1, batch_size=batch, chunk_rows=chunk, buffer_chunks=3)
    full = list(epoch_plan(shard_rows, **kw))
    again = list(epoch_plan(list(shard_rows), **kw))
    assert all(np.array_equal(a.rows, b.rows) and np.array_equal(a.mask, b.mask) for a, b in zip(full, again))
    start = min(start, len(full))
    tail = list(epoch_plan(shard_rows, **kw).batches(start))
    assert [b.index for b in tail] == list(range(start, len(full)))
    assert all(np.array_equal(a.rows, b.rows) and np.array_equal(a.mask, b.mask) for a, b in zip(full[start:], tail))


def test_epochs_and_seeds_change_the_order_but_not_the_rows():
    rows = [100, 37, 0, 250]
    kw = dict(batch_size=32, chunk_rows=16, buffer_chunks=4)
    order = lambda **k: np.concatenate([b.rows[b.mask] for b in epoch_plan(rows, **kw, **k)])  # noqa: E731
    e0, e1, s1 = order(seed=0, epoch=0), order(seed=0, epoch=1), order(seed=1, epoch=0)
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, s1)
    assert np.array_equal(np.sort(e0), np.sort(e1))


def test_rows_are_mixed_within_a_buffer_and_runs_are_contiguous():
    plan = epoch_plan([64, 64], seed=3, epoch=0, batch_size=8, chunk_rows=8, buffer_chunks=4)
    first = plan.batch(0)
    assert len(np.unique(first.rows // 8)) > 1  # one batch draws from several chunks
    units = [u for b in range(plan.num_buffers) for u in plan.read_units(b)]
    covered = sorted((s, a, z) for s, a, z in units)
    assert sum(z - a for _, a, z in covered) == 128
    # buffer b's rows are exactly the rows its read units cover
    for b in range(plan.num_buffers):
        want = np.concatenate([plan.shard_starts[s] + np.arange(a, z) for s, a, z in plan.read_units(b)])
        got = np.concatenate([x.rows[x.buffer == b] for x in plan])
        assert np.array_equal(np.sort(got), np.sort(want))


def test_unshuffled_plan_merges_chunks_into_long_runs():
    plan = epoch_plan([50, 30], seed=0, epoch=0, shuffle=False, chunk_rows=4, buffer_chunks=100)
    assert plan.read_units(0) == [(0, 0, 50), (1, 0, 30)]


def test_empty_and_bad_arguments():
    assert len(epoch_plan([0, 0], seed=0, epoch=0)) == 0
    assert plan_length([], 2, 8) == 0
    with pytest.raises(TransferSetError, match="rank 2 is outside world_size 2"):
        epoch_plan([10], seed=0, epoch=0, world_size=2, rank=2)
    with pytest.raises(TransferSetError, match="batch_size"):
        epoch_plan([10], seed=0, epoch=0, batch_size=0)
    with pytest.raises(TransferSetError, match="cannot resume at batch 5"):
        list(epoch_plan([10], seed=0, epoch=0, batch_size=4).batches(5))


def test_ten_million_rows_plan_is_small_and_quick():
    plan = epoch_plan([1_000_000] * 10, seed=0, epoch=0, world_size=4, rank=3, num_workers=4, batch_size=256)
    assert plan.chunk_shard.nbytes < 100_000
    last = plan.batch(len(plan) - 1)
    assert len(plan) == 9766 and last.mask.sum() == 0  # 384 padding slots: the last rank's last batch is all padding
    assert plan.batch(len(plan) - 2).mask.sum() == 256 - 128
