"""Sources: every format reads the same rows in batches, lazily, after pickling and with clear errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zipfile

import h5py
import numpy as np
import pytest
from PIL import Image

from transferset.errors import TransferSetError
from transferset.inputs.sources import open_source, read_labels


def _data(n=23, shape=(5, 6), dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 200, size=(n,) + shape).astype(dtype)


def _write_idx(path, arr, code=0x08, compress=False):
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    big = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    payload = header + arr.astype(big).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _check_reads(src, x):
    assert src.rows == len(x) and src.row_shape == x.shape[1:] and src.dtype == x.dtype.newbyteorder("=")
    got = src.read(3, 9)
    assert type(got) is np.ndarray and got.flags.writeable  # a fresh array, not a view of a memmap
    assert np.array_equal(got, x[3:9])
    idx = np.array([4, 0, 4, len(x) - 1, 2])
    assert np.array_equal(src.read_rows(idx), x[idx])
    assert np.array_equal(src.read(0, src.rows), x)
    assert np.array_equal(src.read(len(x) - 2, len(x) + 10), x[-2:])  # a stop past the end is clipped
    clone = pickle.loads(pickle.dumps(src))
    assert np.array_equal(clone.read_rows(idx), x[idx]) and clone.fingerprint() == src.fingerprint()


def test_npy_npz_hdf5_idx_read_the_same_rows(tmp_path):
    x = _data()
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "plain.npz", x=x, y=np.arange(23) % 4)
    np.savez_compressed(tmp_path / "packed.npz", x=x, other=x[:, 0])
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("grp/images", data=x)
        f.create_dataset("labels", data=np.arange(23))
    with h5py.File(tmp_path / "one.hdf5", "w") as f:
        f.create_dataset("only", data=x)
    _write_idx(tmp_path / "x-idx3-ubyte", x)
    _write_idx(tmp_path / "x.idx3-ubyte.gz", x, compress=True)
    specs = {"x.npy": "npy", "plain.npz": "npz", "packed.npz:x": "npz", "d.h5:grp/images": "hdf5", "one.hdf5": "hdf5",
             "x-idx3-ubyte": "idx", "x.idx3-ubyte.gz": "idx"}
    for spec, fmt in specs.items():
        src = open_source(str(tmp_path / spec))
        _check_reads(src, x)
        d = src.describe()
        assert d["format"] == fmt and d["rows"] == 23 and d["row_shape"] == [5, 6] and d["dtype"] == "uint8"
    assert np.array_equal(open_source(str(tmp_path / "plain.npz")).labels, np.arange(23) % 4)
    assert open_source(str(tmp_path / "plain.npz:x")).labels is None  # a picked key takes labels only from --labels
    assert open_source(str(tmp_path / "packed.npz:x")).labels is None


def test_uncompressed_npz_member_is_memory_mapped(tmp_path):
    x = _data(n=50)
    np.savez(tmp_path / "a.npz", x=x)
    src = open_source(str(tmp_path / "a.npz"))
    src.read(0, 1)
    assert isinstance(src._arr, np.memmap)
    assert np.array_equal(src.read(10, 20), x[10:20])


def test_idx_dtypes_are_big_endian_and_read_natively(tmp_path):
    for code, dt in [(0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)]:
        x = (np.arange(60).reshape(10, 6) - 30).astype(dt)
        src = open_source(str(_write_idx(tmp_path / f"t{code}-idx2-ubyte", x, code)))
        assert src.dtype == np.dtype(dt) and np.array_equal(src.read(0, 10), x)
    y = np.arange(12) % 10
    assert np.array_equal(read_labels(str(_write_idx(tmp_path / "y-idx1-ubyte.gz", y, compress=True))), y)


def test_limit_cuts_rows_labels_and_changes_the_fingerprint(tmp_path):
    x = _data()
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(23))
    full, cut = open_source(str(tmp_path / "d.npz")), open_source(str(tmp_path / "d.npz"), limit=5)
    assert cut.rows == 5 and cut.describe()["total_rows"] == 23 and cut.describe()["limit"] == 5
    assert np.array_equal(cut.labels, np.arange(5)) and np.array_equal(cut.read(0, 99), x[:5])
    assert cut.fingerprint() != full.fingerprint() and len(full.fingerprint()) == 64
    assert open_source(str(tmp_path / "d.npz"), limit=1000).rows == 23
    with pytest.raises(TransferSetError, match="limit must be") as e:  # the CLI spells it --limit
        open_source(str(tmp_path / "d.npz"), limit=0)
    assert e.value.option == "limit"


def test_fingerprint_follows_bytes_not_location(tmp_path):
    x = _data()
    np.save(tmp_path / "a.npy", x)
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "b" / "a.npy", x)
    assert open_source(str(tmp_path / "a.npy")).fingerprint() == open_source(str(tmp_path / "b" / "a.npy")).fingerprint()
    x[0, 0, 0] += 1
    np.save(tmp_path / "b" / "a.npy", x)
    assert open_source(str(tmp_path / "a.npy")).fingerprint() != open_source(str(tmp_path / "b" / "a.npy")).fingerprint()


def test_image_folder_with_classes(tmp_path):
    rng = np.random.default_rng(1)
    imgs = {}
    for cls in ("cat", "ant"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            a = rng.integers(0, 255, size=(4, 5, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "imgs" / cls / f"{i}.png")
            imgs[(cls, i)] = a
    (tmp_path / "imgs" / "ant" / "notes.txt").write_text("ignored")
    src = open_source(str(tmp_path / "imgs"))
    assert src.class_names == ["ant", "cat"] and src.row_shape == (4, 5, 3) and src.dtype == np.uint8
    assert np.array_equal(src.labels, [0, 0, 0, 1, 1, 1])
    expect = np.stack([imgs[("ant", i)] for i in range(3)] + [imgs[("cat", i)] for i in range(3)])
    _check_reads(src, expect)
    assert src.describe()["format"] == "images"
    Image.fromarray(expect[0]).save(tmp_path / "imgs" / "cat" / "9.png")
    assert open_source(str(tmp_path / "imgs")).fingerprint() != src.fingerprint()


def test_grayscale_and_palette_images(tmp_path):
    (tmp_path / "g").mkdir()
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(a).save(tmp_path / "g" / "a.png")
    src = open_source(str(tmp_path / "g"))
    assert src.row_shape == (3, 4) and src.labels is None and np.array_equal(src.read(0, 1)[0], a)
    (tmp_path / "p").mkdir()
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).convert("P").save(tmp_path / "p" / "a.png")
    assert open_source(str(tmp_path / "p")).row_shape == (3, 4, 3)


def test_image_folder_refuses_mixed_sizes(tmp_path):
    (tmp_path / "m").mkdir()
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "m" / "a.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "m" / "b.png")
    with pytest.raises(TransferSetError, match="b.png"):
        open_source(str(tmp_path / "m"))
    (tmp_path / "e").mkdir()
    with pytest.raises(TransferSetError, match="no images"):
        open_source(str(tmp_path / "e"))


def test_fork_reopens_hdf5(tmp_path):
    x = _data()
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("x", data=x)
    src = open_source(str(tmp_path / "d.h5:x"))
    src.read(0, 2)  # parent opens its handle
    state = src.__getstate__()
    assert state["_file"] is None and state["_ds"] is None
    if not hasattr(os, "fork"):
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must reopen, not reuse the parent's handle
        ok = np.array_equal(src.read(5, 9), x[5:9]) and src._pid == os.getpid()
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    assert np.array_equal(src.read(0, 3), x[:3])


def test_read_labels(tmp_path):
    y = np.arange(10) % 3
    np.save(tmp_path / "y.npy", y.astype(np.float32))
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 2)), y=y, t=y + 1)
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f.create_dataset("y", data=y.astype(np.int32))
    for spec in ("y.npy", "d.npz", "y.h5", "y.h5:y"):
        got = read_labels(str(tmp_path / spec), rows=10)
        assert got.dtype == np.int64 and np.array_equal(got, y)
    assert np.array_equal(read_labels(str(tmp_path / "d.npz:t")), y + 1)
    assert np.array_equal(read_labels(str(tmp_path / "y.npy"), rows=4), y[:4])  # the source was cut by --limit
    with pytest.raises(TransferSetError, match=r"y.npy.*10 labels.*12 rows"):
        read_labels(str(tmp_path / "y.npy"), rows=12)
    np.save(tmp_path / "bad.npy", np.full(10, 0.5))
    with pytest.raises(TransferSetError, match="non-integer"):
        read_labels(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "two.npy", np.zeros((10, 2), np.int64))
    with pytest.raises(TransferSetError, match="1-D"):
        read_labels(str(tmp_path / "two.npy"))


def test_errors_name_the_file_and_the_fix(tmp_path):
    x = _data()
    np.savez(tmp_path / "d.npz", a=x, b=x)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("p", data=x)
        f.create_dataset("q", data=x)
    (tmp_path / "d.csv").write_text("1,2\n")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    _write_idx(tmp_path / "ok-idx2-ubyte", x[:, 0])
    (tmp_path / "bad-idx2-ubyte").write_bytes(b"\x01\x02\x08\x02" + b"\0" * 20)
    (tmp_path / "short-idx2-ubyte").write_bytes((tmp_path / "ok-idx2-ubyte").read_bytes()[:-3])
    (tmp_path / "z-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 9) + b"\0" * 4))
    cases = {
        "missing.npy": "does not exist",
        "d.csv": "cannot tell the format",
        "d.npz": r"no array 'x'.*a, b",
        "d.npz:c": r"no array 'c'.*a, b",
        "d.h5": r"2 datasets.*p, q",
        "d.h5:r": r"no dataset 'r'.*p, q",
        "empty.npy": "0 rows",
        "bad-idx2-ubyte": "bad IDX magic",
        "short-idx2-ubyte": "truncated or corrupt",
    }
    for spec, msg in cases.items():
        with pytest.raises(TransferSetError, match=msg):
            open_source(str(tmp_path / spec))
    with pytest.raises(TransferSetError, match="truncated or corrupt"):
        open_source(str(tmp_path / "z-idx1-ubyte.gz")).read(0, 1)
    with pytest.raises(TransferSetError, match="outside"):
        open_source(str(tmp_path / "ok-idx2-ubyte")).read_rows(np.array([99]))


def test_npy_rows_read_without_the_memory_map_match_the_file(tmp_path):
    from transferset.inputs.sources import open_source

    rng = np.random.default_rng(3)
    for name, arr in {"c.npy": rng.integers(0, 255, (37, 4, 3), dtype=np.uint8),
                      "be.npy": rng.normal(size=(29, 5)).astype(">f4"),
                      "f.npy": np.asfortranarray(rng.normal(size=(23, 6)))}.items():
        np.save(tmp_path / name, arr)
        src = open_source(str(tmp_path / name))
        for a, b in ((0, len(arr)), (3, 4), (5, 17), (len(arr) - 2, len(arr) + 5)):
            got = src.read(a, b)
            assert got.dtype == arr.dtype.newbyteorder("=") and np.array_equal(got, arr[a:b])
        assert np.array_equal(src.read_rows(np.array([4, 1, 4, 0])), arr[[4, 1, 4, 0]])
