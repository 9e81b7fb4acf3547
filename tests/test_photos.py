"""Photo sources, decoding, torchvision-style views and the decode pool (transferset.inputs.photos/decode/photo_pool)."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferset.errors import TransferSetError
from transferset.inputs import decode as dec
from transferset.inputs.decode import (CLEAN, RRC, BadImage, PhotoTransform, View, decode_image, flip_bit,
                                          render_file, rrc_params, upright_size)
from transferset.inputs.render import PhotoTask, render_chunk
from transferset.labelling.photo_pool import DecodePool
from transferset.inputs.photos import open_photo_source

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos") / "set"
    _script("make_photo_folder").main([str(out), "--count", "30", "--classes", "3", "--workers", "1"])
    return out


def _save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


# -- sources -----------------------------------------------------------------------------------------------
def test_class_folder_is_recursive_sorted_and_skips_hidden(tmp_path):
    img = Image.new("RGB", (20, 30), (10, 20, 30))
    for rel in ("b/z.png", "b/deep/er/a.jpg", "a/2.PNG", "a/1.webp", "a/.hidden.png", "a/.cache/x.png",
                "c/readme.txt", "a/sub/3.bmp"):
        if rel.endswith(".txt"):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text("not an image")
        else:
            _save(tmp_path / rel, img)
    src = open_photo_source(str(tmp_path), PhotoTransform(16))
    assert src.class_names == ["a", "b", "c"]
    assert src.rel_paths == ["a/1.webp", "a/2.PNG", "a/sub/3.bmp", "b/deep/er/a.jpg", "b/z.png"]
    assert src.labels.tolist() == [0, 0, 0, 1, 1]
    flat = open_photo_source(str(tmp_path), PhotoTransform(16), layout="flat")
    assert flat.labels is None and flat.class_names is None and len(flat.rel_paths) == 5


def test_file_lists_relative_paths_names_and_integers(tmp_path):
    img = Image.new("RGB", (40, 30), (200, 0, 0))
    _save(tmp_path / "imgs" / "a.jpg", img)
    _save(tmp_path / "imgs" / "b c.png", img)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "l.txt").write_text("# comment\n../imgs/a.jpg,dog\n\n\"../imgs/b c.png\",cat\n../imgs/gone.jpg\n")
    (lists / "l.csv").write_text("path,label\n../imgs/b c.png,7\n../imgs/a.jpg,2\n")
    t = PhotoTransform(16)
    txt = open_photo_source(str(lists / "l.txt"), t)
    assert txt.class_names == ["cat", "dog"] and txt.labels.tolist() == [1, 0, -1]
    assert txt.path_of(1) == os.path.join(lists, "../imgs/b c.png")
    csv_src = open_photo_source(str(lists / "l.csv"), t)
    assert csv_src.class_names is None and csv_src.labels.tolist() == [7, 2]
    assert txt.read(0, 2).shape == (2, 16, 16, 3)  # relative paths resolve against the list's folder
    batch = render_chunk(t, 0, [PhotoTask(i, 0, txt.path_of(i)) for i in range(3)])
    assert batch.source_index.tolist() == [0, 1] and batch.bad[0].source_index == 2  # missing: found at decode
    assert "No such file" in batch.bad[0].reason


def test_probing_and_fingerprint_read_no_pixels(folder, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("probing opened an image")

    monkeypatch.setattr(Image, "open", refuse)
    src = open_photo_source(str(folder), PhotoTransform(32))
    assert src.rows == 35 and src.class_names == ["0-disc", "1-square", "2-triangle"]
    assert len(src.fingerprint()) == 64 and src.describe()["format"] == "photos"


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    p = _save(tmp_path / "x" / "a.png", Image.new("RGB", (20, 20)))
    t = PhotoTransform(16)
    stat = open_photo_source(str(tmp_path), t).fingerprint()
    sha = open_photo_source(str(tmp_path), t, fingerprint_kind="sha256").fingerprint()
    assert stat == open_photo_source(str(tmp_path), t).fingerprint() and stat != sha
    _save(p, Image.new("RGB", (20, 20), (1, 2, 3)))
    os.utime(p, ns=(1, 1))
    assert open_photo_source(str(tmp_path), t).fingerprint() != stat
    assert open_photo_source(str(tmp_path), t, fingerprint_kind="sha256").fingerprint() != sha


# -- decoding ----------------------------------------------------------------------------------------------
def test_mixed_folder_decodes_to_shape_and_reports_five_bad_files(folder):
    for channels in (3, 1):
        t = PhotoTransform(24, channels=channels, rrc=True, flip=True)
        src = open_photo_source(str(folder), t)
        tasks = [PhotoTask(i, v, src.path_of(i)) for i in range(src.rows) for v in (0, 1)]
        batch = render_chunk(t, 3, tasks)
        assert batch.pixels.shape == (60, 24, 24, channels) and batch.pixels.dtype == np.uint8
        assert sorted({Path(b.path).name for b in batch.bad}) == sorted(
            "zz-" + n for n in ("truncated.jpg", "truncated.png", "garbage.jpg", "empty.png", "text.webp"))
        assert all(b.reason and "\n" not in b.reason for b in batch.bad)


@pytest.mark.parametrize("mode", ["L", "P", "PA", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1", "RGB"])
def test_every_mode_becomes_rgb_or_l(tmp_path, mode):
    base = Image.new("RGB", (33, 21), (120, 60, 200))
    im = base.convert(mode) if mode not in ("I;16", "I", "F", "PA") else None
    if mode == "PA":
        im = base.convert("P").convert("PA")
    elif mode == "I;16":
        im = Image.fromarray(np.full((21, 33), 257 * 77, np.uint16))
    elif mode == "I":
        im = Image.fromarray(np.full((21, 33), 257 * 77, np.int32))
    elif mode == "F":
        im = Image.fromarray(np.full((21, 33), 77 / 255, np.float32))
    if mode == "PA":  # no common format stores PA: convert in memory
        for channels, want in ((3, "RGB"), (1, "L")):
            assert dec._to_channels(im, channels).mode == want
        return
    ext = {"CMYK": ".jpg", "I": ".tif", "F": ".tif"}.get(mode, ".png")
    p = _save(tmp_path / f"x{ext}", im)
    for channels, want in ((3, "RGB"), (1, "L")):
        got, reduced = decode_image(p, channels)
        assert got.mode == want and got.size == (33, 21) and reduced == 1.0
    if mode in ("I;16", "I", "F"):  # 16-bit and float are scaled, not clipped at 255
        assert np.asarray(decode_image(p, 1)[0]).max() == 77


def test_sixteen_bit_scaling_is_rounded():
    v = np.array([[0, 128, 129, 257 * 128, 65535]], np.uint16)
    got = np.asarray(dec._to_channels(Image.fromarray(v), 1))
    assert got.tolist() == [[0, 0, 1, 128, 255]]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_decodes_upright(tmp_path, orientation):
    up = np.zeros((60, 40, 3), np.uint8)
    up[:30] = (255, 0, 0)  # red on top, blue below: upright is 40 wide, 60 tall
    up[30:] = (0, 0, 255)
    stored = Image.fromarray(up).transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                            8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = _save(tmp_path / "r.jpg", stored, quality=95, exif=exif.tobytes())
    assert upright_size(p) == (40, 60)
    got = np.asarray(decode_image(p)[0]).astype(int)
    assert got.shape == (60, 40, 3)
    assert got[5, 20, 0] > 200 and got[5, 20, 2] < 60 and got[55, 20, 2] > 200 and got[55, 20, 0] < 60


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(decode_image(p)[0])[0, 0]) == (255, 0, 0)


def test_corrupt_files_raise_bad_image_with_one_line(tmp_path):
    p = _save(tmp_path / "t.jpg", Image.new("RGB", (300, 200), (5, 6, 7)))
    p.write_bytes(p.read_bytes()[:200])
    (tmp_path / "e.png").write_bytes(b"")
    for f in (p, tmp_path / "e.png", tmp_path / "missing.jpg"):
        with pytest.raises(BadImage) as e:
            decode_image(f)
        assert e.value.reason and "\n" not in str(e.value) and str(f) in str(e.value)
        assert "--" not in str(e.value)  # the library never names a flag


# -- views -------------------------------------------------------------------------------------------------
def _torchvision_get_params(width, height, scale, ratio, uniform):
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed; ``uniform(a, b)`` and ``randint(n)``
    from ``uniform`` replace torch's generator. Returns (i=top, j=left, h, w) like torchvision."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * uniform(scale[0], scale[1])
        aspect_ratio = math.exp(uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(uniform(0, 1) * (height - h + 1))
            j = int(uniform(0, 1) * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def test_rrc_matches_torchvision_algorithm_and_stays_inside():
    rng = np.random.default_rng(0)
    cases = 0
    for k in range(1500):
        w, h = (int(v) for v in rng.integers(1, 900, 2)) if k % 5 else (int(rng.integers(500, 3000)), 7)
        scale = (0.08, 1.0) if k % 3 else (0.5, 2.0)
        ratio = (3 / 4, 4 / 3) if k % 4 else (0.2, 0.3)
        seed_int = dec._seed(11, k, 1 + k % 4)
        draws = iter(range(dec._RRC_COUNTER, dec._RRC_COUNTER + 40))
        uniform = lambda a, b: a + (b - a) * dec._uniform(seed_int, next(draws))
        i, j, hh, ww = _torchvision_get_params(w, h, scale, ratio, uniform)
        box = rrc_params(11, k, 1 + k % 4, w, h, scale, ratio)
        assert box == (j, i, ww, hh)
        assert box == rrc_params(11, k, 1 + k % 4, w, h, scale, ratio)  # pure
        left, top, bw, bh = box
        assert 0 <= left and 0 <= top and 0 < bw and 0 < bh and left + bw <= w and top + bh <= h
        cases += 1
    assert cases == 1500


def test_rrc_known_cases_and_flip_rate():
    assert rrc_params(0, 0, 1, 300, 200, (1.0, 1.0), (1.0, 1.0)) == (50, 0, 200, 200)  # every try too big
    assert rrc_params(0, 0, 1, 256, 256, (1.0, 1.0), (1.0, 1.0)) == (0, 0, 256, 256)
    assert rrc_params(0, 0, 1, 1000, 10) == (493, 0, 13, 10)  # a sliver: fallback at the max ratio
    flips = [flip_bit(7, i, 1) for i in range(4000)]
    assert 0.45 < np.mean(flips) < 0.55
    t = PhotoTransform(32, rrc=True, flip=True)
    assert t.view_for(7, 3, 0, 100, 80) == View(CLEAN, 0, 0, 100, 80, 0)  # view 0: clean, never flipped
    assert t.view_for(7, 3, 2, 100, 80).kind == RRC


def test_render_is_the_torchvision_pil_path_and_bit_identical(folder):
    t = PhotoTransform(40, resize=48, rrc=True, flip=True)
    src = open_photo_source(str(folder), t)
    path = src.path_of(0)
    img = Image.open(path).convert("RGB")
    clean, v0 = render_file(path, t, view_number=0)
    w, h = dec.resized_shorter_size(*img.size, 48)
    ref = img.resize((w, h), Image.BILINEAR)
    left, top = int(round((w - 40) / 2.0)), int(round((h - 40) / 2.0))
    assert np.array_equal(clean, np.asarray(ref.crop((left, top, left + 40, top + 40))))
    for view in range(1, 6):
        px, v = render_file(path, t, base_seed=9, source_index=0, view_number=view)
        crop = img.crop((v.left, v.top, v.left + v.width, v.top + v.height)).resize((40, 40), Image.BILINEAR)
        ref = np.asarray(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if v.flip else crop)
        assert np.array_equal(px, ref)
        assert np.array_equal(px, render_file(path, t, v)[0]) and np.array_equal(px, src.replay(0, view, v.box, v.flip))


def test_centre_crop_larger_than_resize_pads_like_torchvision(tmp_path):
    p = _save(tmp_path / "a.png", Image.new("RGB", (30, 20), (9, 9, 9)))
    px, _ = render_file(p, PhotoTransform(24, resize=20))  # 30x20 -> 30x20, crop 24: 2 rows of zeros each side
    assert px[:2].max() == 0 and px[-2:].max() == 0 and (px[2:-2] == 9).all()


def test_stored_box_outside_the_image_is_refused(tmp_path):
    p = _save(tmp_path / "a.png", Image.new("RGB", (30, 20)))
    t = PhotoTransform(8, rrc=True)
    with pytest.raises(TransferSetError, match="source changed"):
        render_file(p, t, View(RRC, 25, 0, 10, 10, 0))
    with pytest.raises(TransferSetError, match="source changed"):
        render_file(p, t, View(CLEAN, 0, 0, 31, 20, 0))


def test_transform_options_and_json():
    t = PhotoTransform.from_options(crop=224, augment="rrc:224:0.25:1,flip")
    assert (t.size, t.resize, t.rrc, t.flip, t.scale, t.ratio) == (224, 256, True, True, (0.25, 1.0), (0.75, 4 / 3))
    assert PhotoTransform.from_json(t.to_json()) == t
    with pytest.raises(TransferSetError) as e:
        PhotoTransform.from_options(crop=200, augment="rrc:224")
    assert e.value.option == "crop"
    with pytest.raises(TransferSetError) as e:
        PhotoTransform.from_options(crop=224, augment="jitter:2")
    assert e.value.option == "augment"


# -- pool --------------------------------------------------------------------------------------------------
def test_pool_matches_in_process_in_order_and_skips_bad(folder):
    t = PhotoTransform(32, rrc=True, flip=True)
    src = open_photo_source(str(folder), t)
    tasks = [PhotoTask(i, v, src.path_of(i)) for i in range(src.rows) for v in range(3)]
    inline = list(DecodePool(t, base_seed=4, workers=0).imap(tasks, 16))
    with DecodePool(t, base_seed=4, workers=2, chunk=5) as pool:
        par = list(pool.imap(tasks, 16))
        assert len(par) == len(inline) == math.ceil(len(tasks) / 16)
        for a, b in zip(par, inline):
            for k in ("source_index", "view", "pixels", "boxes", "flips"):
                assert np.array_equal(getattr(a, k), getattr(b, k))
            assert a.bad == b.bad
        got = np.concatenate([b.source_index for b in par])
        assert np.all(np.diff(got) >= 0) and len(got) == 90 and sum(len(b.bad) for b in par) == 15
        # replay the stored views through the pool: the same bytes
        stored = [PhotoTask(int(s), int(v), src.path_of(int(s)), tuple(bx), int(f))
                  for b in par for s, v, bx, f in zip(b.source_index, b.view, b.boxes, b.flips)]
        again = np.concatenate([b.pixels for b in pool.imap(stored, 32)])
        assert np.array_equal(again, np.concatenate([b.pixels for b in par]))
        procs = list(pool._procs)
        for _ in pool.imap(tasks, 4):  # abandoned early: the pool is closed, no worker left behind
            break
    assert all(not p.is_alive() for p in procs)


def test_pool_fail_policy_stops_with_one_line(folder):
    t = PhotoTransform(16)
    src = open_photo_source(str(folder), t)
    tasks = [PhotoTask(i, 0, src.path_of(i)) for i in range(src.rows)]
    with pytest.raises(BadImage) as e:
        list(DecodePool(t, workers=0, on_bad="fail").imap(tasks, 8))
    assert "zz-" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TransferSetError) as e:
        DecodePool(t, workers=0, on_bad="ignore")
    assert e.value.option == "on_bad_image"
