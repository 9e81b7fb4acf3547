"""Augmented views: seeded, bounded, in the source dtype, and replayable byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from transferset.inputs.augment import (MUNGE_BLOCK, AugmentSpec, munge_blocks_needed, needs_block, parse_augment,
                                 render_views, replay, view_seed)
from transferset.errors import TransferSetError
from transferset.inputs.sources import open_source


def test_view_seeds_are_fixed_and_distinct():
    sidx = np.repeat(np.arange(1000), 5)
    view = np.tile(np.arange(5), 1000)
    s = view_seed(3, sidx, view)
    assert s.dtype == np.uint64 and len(np.unique(s)) == len(s)
    assert np.array_equal(s, view_seed(3, sidx, view))
    assert int(view_seed(3, 7, 2)) == int(s[7 * 5 + 2])
    assert not np.array_equal(s, view_seed(4, sidx, view))
    assert view_seed(-1, 0, 0) == view_seed(2**64 - 1, 0, 0)
    # pinned values: the mix is plain uint64 arithmetic, the same on every platform and numpy version
    assert int(view_seed(0, 0, 0)) == 17411749291405128137
    assert int(view_seed(12345, np.array([678]), np.array([9]))[0]) == 5277385174197099121


def test_parse_canonical_and_json():
    spec = parse_augment(" jitter:2 , noise:0.1,flip,crop:3,munge:0.5 ")
    assert spec.ops == (("jitter", 2), ("noise", 0.1), ("flip",), ("crop", 3), ("munge", 0.5, 1.0))
    assert spec.canonical == "jitter:2,noise:0.1,flip,crop:3,munge:0.5:1.0"
    assert parse_augment(spec.canonical) == spec
    assert spec.to_json()[0] == {"op": "jitter", "args": [2]}
    for empty in (None, "", "none", "NONE"):
        assert parse_augment(empty) == AugmentSpec() and parse_augment(empty).canonical == ""
    assert needs_block("munge:0.2:2") and needs_block(spec) and not needs_block("jitter:1,noise:2")
    assert munge_blocks_needed(np.array([0, 5, MUNGE_BLOCK + 1])) == [(0, MUNGE_BLOCK), (MUNGE_BLOCK, 2 * MUNGE_BLOCK)]


@pytest.mark.parametrize("bad, msg", [
    ("blur:2", "unknown op 'blur'"), ("jitter", "jitter:N"), ("jitter:x", "integer"), ("jitter:0", "positive"),
    ("flip:1", "no argument"), ("noise:-1", "positive"), ("noise:nan", "finite"), ("munge:2", r"\[0, 1\]"),
    ("munge:0.5:0", "positive"), ("jitter:1,,flip", "empty op"), ("crop:1.5", "integer"),
])
def test_bad_specs_name_the_op_and_the_valid_ones(bad, msg):
    with pytest.raises(TransferSetError, match=msg) as e:
        parse_augment(bad)
    assert "jitter:N, crop:P, flip, noise:SIGMA, munge:P[:S]" in str(e.value)


def _dots(n=200, h=9, w=11):
    """Rows with one lit pixel at the centre."""
    x = np.zeros((n, h, w), np.uint8)
    x[:, h // 2, w // 2] = 255
    return x


def test_jitter_moves_content_within_bounds_with_zero_fill():
    x = _dots()
    out = render_views(x, np.arange(200), np.ones(200, int), parse_augment("jitter:2"), 5)
    assert out.dtype == np.uint8 and out.shape == x.shape
    shifts = set()
    for r in out:
        ys, xs = np.nonzero(r)
        assert len(ys) == 1 and r.sum() == 255  # moved, nothing duplicated, the rest zero
        dy, dx = ys[0] - 4, xs[0] - 5
        assert abs(dy) <= 2 and abs(dx) <= 2
        shifts.add((dy, dx))
    assert len(shifts) == 25  # every shift in [-2, 2]^2 shows up
    full = np.full((50, 6, 6), 9, np.uint8)
    out = render_views(full, np.arange(50), np.ones(50, int), parse_augment("jitter:3"), 0)
    assert (out == 0).any() and set(np.unique(out)) <= {0, 9}


def test_crop_is_pad_and_crop_and_channels_follow_layout():
    x = _dots(100)
    out = render_views(x, np.arange(100), np.ones(100, int), parse_augment("crop:1"), 1)
    for r in out:
        ys, xs = np.nonzero(r)
        assert len(ys) == 1 and abs(ys[0] - 4) <= 1 and abs(xs[0] - 5) <= 1
    hwc = np.repeat(_dots(40)[..., None], 3, axis=-1)
    chw = np.moveaxis(hwc, -1, 1)
    spec, sidx, view = parse_augment("jitter:2,flip"), np.arange(40), np.full(40, 2)
    a = render_views(hwc, sidx, view, spec, 9)
    b = render_views(chw, sidx, view, spec, 9)
    assert np.array_equal(np.moveaxis(b, 1, -1), a)
    assert np.array_equal(a[..., 0], render_views(hwc[..., 0], sidx, view, spec, 9))


def test_flip_is_a_flip_or_identity():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(300, 4, 6), dtype=np.uint8)
    out = render_views(x, np.arange(300), np.ones(300, int), parse_augment("flip"), 2)
    flipped = np.array([np.array_equal(o, r[:, ::-1]) for o, r in zip(out, x)])
    same = np.array([np.array_equal(o, r) for o, r in zip(out, x)])
    assert np.all(flipped | same) and 100 < flipped.sum() < 200


def test_noise_statistics_and_uint8_clipping():
    x = np.zeros((2000, 50), np.float32)
    out = render_views(x, np.arange(2000), np.ones(2000, int), parse_augment("noise:0.3"), 4)
    assert out.dtype == np.float32
    assert abs(out.mean()) < 0.01 and abs(out.std() - 0.3) < 0.01
    u = np.full((500, 4, 4), 250, np.uint8)
    u[:, 0] = 3
    got = render_views(u, np.arange(500), np.ones(500, int), parse_augment("noise:20"), 4)
    assert got.dtype == np.uint8 and got.max() == 255 and got.min() == 0
    assert np.array_equal(got, np.clip(got.astype(float), 0, 255))


def test_view_zero_is_clean_and_views_differ():
    x = np.random.default_rng(0).normal(size=(10, 8, 8)).astype(np.float32)
    sidx = np.repeat(np.arange(5), 2)
    view = np.tile([0, 3], 5)
    out = render_views(x, sidx, view, parse_augment("jitter:1,noise:0.1"), 0)
    assert np.array_equal(out[view == 0], x[view == 0])
    assert not np.array_equal(out[view == 3], x[view == 3])
    other = render_views(x, sidx, np.tile([0, 4], 5), parse_augment("jitter:1,noise:0.1"), 0)
    assert not np.array_equal(other[1::2], out[1::2])


def test_chw_rows_with_more_than_four_channels_are_images():
    """One channel rule (transferset.inputs.images): an (8, H, W) row is CHW, as the students read it."""
    from transferset.inputs.images import CHW, HW, HWC, channel_axis, image_layout

    assert [image_layout(s) for s in ((8, 8), (8, 8, 3), (3, 8, 8), (8, 32, 32), (3, 32, 4))] == [HW, HWC, CHW, CHW, HWC]
    assert [image_layout(s) for s in ((784,), (9, 9, 9), (40, 32, 32), (2, 3, 8, 8))] == [None] * 4
    assert [channel_axis(s) for s in ((8, 8), (8, 8, 3), (8, 32, 32))] == [None, 2, 0]
    hwc = np.random.default_rng(1).integers(0, 255, size=(20, 10, 12, 8), dtype=np.uint8)
    chw = np.moveaxis(hwc, -1, 1)  # (8, 10, 12) rows: 8 channels
    spec, sidx, view = parse_augment("jitter:2,flip,crop:1"), np.arange(20), np.full(20, 1)
    per_channel = np.stack([render_views(hwc[..., c], sidx, view, spec, 4) for c in range(8)], axis=1)
    assert np.array_equal(render_views(chw, sidx, view, spec, 4), per_channel)


def test_image_ops_refuse_vector_rows():
    with pytest.raises(TransferSetError, match=r"jitter needs image rows.*\(784,\)"):
        render_views(np.zeros((2, 784)), np.arange(2), np.ones(2, int), parse_augment("jitter:2"), 0)
    with pytest.raises(TransferSetError, match="flip needs image rows"):
        render_views(np.zeros((2, 9, 9, 9)), np.arange(2), np.ones(2, int), parse_augment("flip"), 0)


def _tabular(n=300, d=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def _nearest(x, i):
    d2 = ((x - x[i]) ** 2).sum(axis=1)
    d2[i] = np.inf
    return int(np.argmin(d2))


def test_munge_draws_around_the_nearest_neighbour():
    x = _tabular()
    sidx, view = np.arange(300), np.ones(300, int)
    read = lambda a, b: x[a:b]  # noqa: E731
    assert np.array_equal(render_views(x, sidx, view, parse_augment("munge:0"), 1, block_reader=read), x)
    # S huge: a swapped attribute lands on the neighbour's value
    out = render_views(x, sidx, view, parse_augment("munge:0.5:1e9"), 1, block_reader=read)
    changed = 0
    for i in range(300):
        nb = x[_nearest(x, i)]
        moved = out[i] != x[i]
        assert np.allclose(out[i][moved], nb[moved], atol=1e-6)
        changed += moved.sum()
    assert 0.4 < changed / x.size < 0.6
    # S = 1: draws spread by |x - nb| around the neighbour, so they stay near it on average
    out = render_views(x, sidx, view, parse_augment("munge:1:1"), 1, block_reader=read)
    nbs = np.stack([x[_nearest(x, i)] for i in range(300)])
    z = (out - nbs) / np.abs(x - nbs)
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    with pytest.raises(TransferSetError, match="block_reader"):
        render_views(x, sidx, view, parse_augment("munge:0.5"), 1)


def test_munge_uses_the_block_of_each_row():
    x = _tabular(n=MUNGE_BLOCK + 3, d=2)
    x[MUNGE_BLOCK:] = 1000 + np.arange(6).reshape(3, 2)  # the last block is far away from the first
    out = render_views(x[MUNGE_BLOCK:], np.arange(MUNGE_BLOCK, MUNGE_BLOCK + 3), np.ones(3, int),
                       parse_augment("munge:1:1e9"), 0, block_reader=lambda a, b: x[a:b])
    assert np.all(out > 900)


@pytest.mark.parametrize("spec, make", [
    ("jitter:2,flip,noise:4", lambda: np.random.default_rng(0).integers(0, 255, (64, 7, 9, 3), dtype=np.uint8)),
    ("crop:2,noise:0.5", lambda: np.random.default_rng(1).normal(size=(64, 3, 8, 8)).astype(np.float32)),
    ("noise:0.1,munge:0.4:2", lambda: np.random.default_rng(2).normal(size=(64, 6))),
])
def test_rows_do_not_depend_on_the_batch(spec, make):
    x = make()
    spec = parse_augment(spec)
    sidx = np.repeat(np.arange(16), 4)
    view = np.tile(np.arange(4), 16)
    read = lambda a, b: x[::4][a:b]  # noqa: E731  (clean rows by source index)
    batch = render_views(x[sidx * 4], sidx, view, spec, 11, block_reader=read)
    order = np.random.default_rng(5).permutation(64)
    for i in order:
        one = render_views(x[sidx[i:i + 1] * 4], sidx[i:i + 1], view[i:i + 1], spec, 11, block_reader=read)
        assert one.tobytes() == batch[i:i + 1].tobytes()
    shuffled = render_views(x[sidx[order] * 4], sidx[order], view[order], spec, 11, block_reader=read)
    assert shuffled.tobytes() == batch[order].tobytes()


def test_replay_equals_render(tmp_path):
    x = np.random.default_rng(3).normal(size=(30, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    img = np.random.default_rng(4).integers(0, 255, (30, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "img.npy", img)
    sidx = np.repeat(np.arange(30), 3)
    view = np.tile(np.arange(3), 30)
    for data, arr, spec in (("x.npy", x, "munge:0.5,noise:0.05"), ("img.npy", img, "jitter:2,crop:1,flip")):
        spec = parse_augment(spec)
        src = open_source(str(tmp_path / data))
        rendered = render_views(arr[sidx], sidx, view, spec, 7, block_reader=src.read)
        pick = np.random.default_rng(0).permutation(90)[:25]
        assert replay(src, sidx[pick], view[pick], spec, 7).tobytes() == rendered[pick].tobytes()


def test_mixup_views_are_replayable_and_store_partner_and_weight(tmp_path):
    """mixup:A rows equal lam * row + (1 - lam) * partner (rounded to the dtype), from the stored partner and
    weight; Beta(1, 1) weights have the uniform's mean and variance; view 0 stays clean."""
    import h5py

    from teachers import export_teacher
    from transferset import label
    from transferset.inputs.augment import mixup_params, replay
    from transferset.labelling.pipeline import LabelOptions

    x = np.random.default_rng(0).integers(0, 256, (30, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    export_teacher(tmp_path / "t.onnx", (8, 8), classes=5)
    label([tmp_path / "t.onnx"], str(tmp_path / "x.npy"), tmp_path / "set",
          LabelOptions(augment="mixup:1", views=2, quiet=True, seed=5))
    with h5py.File(tmp_path / "set" / "shard-00000.h5") as f:
        rows = {k: f[k][()] for k in ("inputs", "source_index", "view", "mixup_partner", "mixup_weight")}
    lam = rows["mixup_weight"].astype(np.float64)[:, None, None]
    want = np.clip(np.rint(lam * x[rows["source_index"]] + (1 - lam) * x[rows["mixup_partner"]]), 0, 255)
    assert np.array_equal(rows["inputs"], want.astype(np.uint8))
    clean = rows["view"] == 0
    assert (rows["mixup_weight"][clean] == 1).all() and not (rows["mixup_partner"][~clean] == rows["source_index"][~clean]).any()
    src = open_source(str(tmp_path / "x.npy"))
    assert np.array_equal(replay(src, rows["source_index"], rows["view"], parse_augment("mixup:1"), 5), rows["inputs"])
    _, lam = mixup_params(0, np.arange(50000), np.ones(50000), 1000, 1.0)
    assert abs(lam.mean() - 0.5) < 0.01 and abs(lam.var() - 1 / 12) < 0.003
    with pytest.raises(TransferSetError, match="one mixup"):
        parse_augment("mixup:1,mixup:2")
