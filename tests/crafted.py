"""Crafted transfer sets, as an attacker would make them: each case edits a good set built by conftest's builder.

``CASES`` maps a name to ``(build, expect)``: ``build(root, outside)`` damages the set in ``root`` (``outside`` is
a folder beside it holding trap files: a FIFO that blocks whoever opens it and a file with secret bytes);
``expect`` names which commands must refuse it (one line, exit 1 or 2): ``"manifest"`` all three, ``"refuse"``
verify and train-student (info reads only the manifest), ``"train"`` train-student alone, ``"verify"`` verify
alone, ``"any"`` none (refused
in one line, or accepted harmlessly). tests/run_crafted.py runs every case through verify, info and train-student.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

SECRET = b"transferset-secret-" * 64


def make_outside(outside: Path) -> None:
    outside.mkdir(parents=True, exist_ok=True)
    os.mkfifo(outside / "trap.fifo")
    (outside / "secret.bin").write_bytes(SECRET)
    with h5py.File(outside / "outside.h5", "w") as f:
        f.create_dataset("labels", data=np.zeros(7, np.int64))


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root: Path, m) -> None:
    text = m if isinstance(m, str) else json.dumps(m)
    (root / "manifest.json").write_text(text)


def _edit(fn):
    """A case that edits the manifest's JSON with ``fn(manifest)``."""
    def build(root: Path, outside: Path) -> None:
        m = _manifest(root)
        fn(m)
        _write_manifest(root, m)
    return build


def _rehash(root: Path, shard: str = "shard-00000.h5") -> None:
    """Make the manifest's sha256 and bytes match an edited shard (an attacker controls both)."""
    from transferset._io import sha256_file

    m = _manifest(root)
    for s in m["shards"]:
        if s["path"] == shard:
            s["sha256"] = sha256_file(root / shard)
            if "bytes" in s:
                s["bytes"] = (root / shard).stat().st_size
    _write_manifest(root, m)


def _shard(fn, shard: str = "shard-00000.h5"):
    """A case that edits the first shard's HDF5 with ``fn(file, outside)`` and fixes the checksum."""
    def build(root: Path, outside: Path) -> None:
        with h5py.File(root / shard, "r+") as f:
            fn(f, outside)
        _rehash(root, shard)
    return build


def _replace(name: str, make):
    def fn(f: h5py.File, outside: Path) -> None:
        del f[name]
        make(f, name, outside)
    return _shard(fn)


def _external_link(f, name, outside):
    f[name] = h5py.ExternalLink(str(outside / "outside.h5"), "/labels")


def _external_link_fifo(f, name, outside):
    f[name] = h5py.ExternalLink(str(outside / "trap.fifo"), "/labels")


def _soft_link(f, name, outside):
    f[name] = h5py.SoftLink("/source_index")


def _external_storage(f, name, outside):
    f.create_dataset(name, shape=(7,), dtype=np.int64, external=[(str(outside / "secret.bin"), 0, 56)])


def _external_storage_fifo(f, name, outside):
    f.create_dataset(name, shape=(7,), dtype=np.int64, external=[(str(outside / "trap.fifo"), 0, 56)])


def _virtual(f, name, outside):
    layout = h5py.VirtualLayout(shape=(7,), dtype=np.int64)
    layout[:] = h5py.VirtualSource(str(outside / "outside.h5"), "labels", shape=(7,))
    f.create_virtual_dataset(name, layout)


def _virtual_fifo(f, name, outside):
    layout = h5py.VirtualLayout(shape=(7,), dtype=np.int64)
    layout[:] = h5py.VirtualSource(str(outside / "trap.fifo"), "labels", shape=(7,))
    f.create_virtual_dataset(name, layout)


def _group(f, name, outside):
    f.create_group(name)


def _scalar(f, name, outside):
    f.create_dataset(name, data=np.int64(3))


def _named_type(f, name, outside):
    f["int64_type"] = np.dtype(np.int64)
    f.create_dataset(name, data=np.zeros(7, np.int64), dtype=f["int64_type"])
    del f["int64_type"]  # the dataset still uses the committed type


def _vlen_str(f, name, outside):
    f.create_dataset(name, data=np.array(["a"] * 7, dtype=object), dtype=h5py.string_dtype())


def _compound(f, name, outside):
    f.create_dataset(name, data=np.zeros(7, dtype=[("a", "<i8")]))


def _big_endian(f, name, outside):
    f.create_dataset(name, data=np.zeros(7, dtype=">i8"))


def _wrong_rows(f, name, outside):
    f.create_dataset(name, data=np.zeros(8, np.int64))


def _unbacked(f, name, outside):  # 10^10 rows of nothing: a few KB of file
    f.create_dataset(name, shape=(10 ** 10,), dtype=np.int64, chunks=(4096,))


def _values(name: str, value, row: int = 2):
    return _values_at(name, row, value)


def _values_at(name: str, where: tuple, value):
    def fn(f, outside):
        data = f[name][()]
        data[where] = value
        del f[name]
        f.create_dataset(name, data=data, chunks=(4,) + data.shape[1:])
    return _shard(fn)


def _set_position(f, name: str, where: tuple, value) -> None:
    v = f[name][:]
    v[where] = value
    f[name][:] = v


def _extra_dataset(f, outside):
    f.create_dataset("payload", data=np.zeros(7))


def _extra_group(f, outside):
    f.create_group("more")


def _extra_link(f, outside):
    f["elsewhere"] = h5py.ExternalLink(str(outside / "trap.fifo"), "/x")


def _inputs_shape(f, outside):
    del f["inputs"]
    f.create_dataset("inputs", data=np.zeros((7, 5), np.float32))


def _shard_path(path: str):
    def fn(m):
        m["shards"][0]["path"] = path
    return _edit(fn)


def _file_case(name: str, make):
    """A case that replaces the set's file ``name`` with what ``make(path, outside)`` puts there."""
    def build(root: Path, outside: Path) -> None:
        p = root / name
        p.unlink()
        make(p, outside)
    return build


def _shard_file(make):
    return _file_case("shard-00000.h5", make)


def _manifest_file(make):
    return _file_case("manifest.json", make)


def _set(path: list, value):
    def fn(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return _edit(fn)


def _gzip_bomb(root: Path, outside: Path) -> None:
    """2,000 temperatures x 1,000 classes of zeros, gzip-compressed: small on disk, huge in memory."""
    from transferset._io import sha256_file

    m = _manifest(root)
    temps = [float(1 + i) for i in range(2000)]
    for s in m["shards"]:
        p = root / s["path"]
        with h5py.File(p, "r+") as f:
            n = f["labels"].shape[0]
            del f["soft_targets"], f["logits"]
            f.create_dataset("soft_targets", shape=(n, 2000, 1000), dtype=np.float16,
                             chunks=(1, 2000, 1000) if n else None, compression="gzip" if n else None)
            for r in range(n):
                f["soft_targets"][r] = np.zeros((2000, 1000), np.float16)
            f.create_dataset("logits", data=np.zeros((n, 3, 1000), np.float16))
            f["labels"][...] = np.zeros(n, np.int64)
        s["sha256"] = sha256_file(p)
        s.pop("bytes", None)
    m.update(temperatures=temps, num_classes=1000)
    _write_manifest(root, m)


CASES = {
    # references inside a shard that leave the folder, or block
    "external-link": (_replace("labels", _external_link), "refuse"),
    "external-link-to-fifo": (_replace("labels", _external_link_fifo), "refuse"),
    "soft-link": (_replace("labels", _soft_link), "refuse"),
    "external-storage": (_replace("labels", _external_storage), "refuse"),
    "external-storage-fifo": (_replace("labels", _external_storage_fifo), "refuse"),
    "virtual-dataset": (_replace("labels", _virtual), "refuse"),
    "virtual-dataset-fifo": (_replace("labels", _virtual_fifo), "refuse"),
    "extra-external-link": (_shard(_extra_link), "refuse"),
    # objects the format does not define
    "group-for-dataset": (_replace("labels", _group), "refuse"),
    "scalar-dataset": (_replace("labels", _scalar), "refuse"),
    "named-datatype": (_replace("labels", _named_type), "refuse"),
    "vlen-string-dtype": (_replace("labels", _vlen_str), "refuse"),
    "compound-dtype": (_replace("labels", _compound), "refuse"),
    "big-endian-dtype": (_replace("labels", _big_endian), "refuse"),
    "rows-disagree": (_replace("labels", _wrong_rows), "refuse"),
    "unbacked-10e10-rows": (_replace("labels", _unbacked), "refuse"),
    "inputs-shape": (_shard(_inputs_shape), "refuse"),
    "extra-dataset": (_shard(_extra_dataset), "refuse"),
    "extra-group": (_shard(_extra_group), "refuse"),
    # meaning
    "nan-soft-targets": (_values("soft_targets", np.nan), "refuse"),
    # NaN at T=1 only: training at T=4 never reads it (harmless there), verify refuses it
    "nan-soft-targets-unused-temperature": (_values_at("soft_targets", (2, 0), np.nan), "verify"),
    # training at a stored T reads the soft targets, not the logits: harmless there, refused by verify
    "inf-logits": (_values("logits", np.inf), "verify"),
    "label-too-big": (_values("labels", 5), "refuse"),
    "label-below-minus-one": (_values("labels", -7), "refuse"),
    "zero-weights": (_set(["weights"], [0.0, 0.0, 0.0]), "manifest"),
    "temperature-zero": (_set(["temperatures"], [0, 4]), "manifest"),
    "temperature-negative": (_set(["temperatures"], [1, -4]), "manifest"),
    "declares-10e10-rows": (_set(["shards", 0, "rows"], 10 ** 10), "refuse"),
    "num-classes-10e7": (_set(["num_classes"], 10 ** 7), "refuse"),
    "gzip-bomb-2000-temperatures": (_gzip_bomb, "any"),
    # paths
    "shard-path-parent": (_shard_path("../outside/outside.h5"), "manifest"),
    "shard-path-absolute": (_shard_path("/etc/passwd"), "manifest"),
    "shard-path-nul": (_shard_path("shard\x00.h5"), "manifest"),
    "shard-path-too-long": (_shard_path("a" * 5000), "manifest"),
    "shard-path-duplicate": (_edit(lambda m: m["shards"].__setitem__(1, dict(m["shards"][0]))), "manifest"),
    "shard-symlink-loop": (_shard_file(lambda p, o: (os.symlink(p.name + ".b", p),
                                                     os.symlink(p.name, str(p) + ".b"))), "refuse"),
    "shard-symlink-outside": (_shard_file(lambda p, o: os.symlink(o / "outside.h5", p)), "refuse"),
    "shard-is-fifo": (_shard_file(lambda p, o: os.mkfifo(p)), "refuse"),
    "shard-is-folder": (_shard_file(lambda p, o: p.mkdir()), "refuse"),
    "shard-is-devnull": (_shard_file(lambda p, o: os.symlink("/dev/zero", p)), "refuse"),
    "manifest-is-fifo": (_manifest_file(lambda p, o: os.mkfifo(p)), "manifest"),
    "manifest-symlink-outside": (_manifest_file(lambda p, o: os.symlink(o / "secret.bin", p)), "manifest"),
    # manifest content
    "json-deep-nesting": (lambda r, o: _write_manifest(r, "[" * 100000 + "]" * 100000), "manifest"),
    "json-huge-int": (lambda r, o: _write_manifest(
        r, (r / "manifest.json").read_text().replace('"num_classes": 5', '"num_classes": ' + "9" * 5000)),
        "manifest"),
    "json-1e400": (lambda r, o: _write_manifest(
        r, (r / "manifest.json").read_text().replace('"num_classes": 5', '"num_classes": 1e400')), "manifest"),
    "manifest-too-big": (lambda r, o: os.truncate(r / "manifest.json", 80 << 20), "manifest"),
    "not-json": (lambda r, o: _write_manifest(r, "\x00\xff{"), "manifest"),
    "string-for-number": (_set(["num_classes"], "5"), "manifest"),
    "string-for-rows": (_set(["shards", 0, "rows"], "7"), "manifest"),
    "stats-not-number": (_set(["stats", "ensemble_accuracy"], "high"), "any"),
    "weights-wrong-length": (_set(["weights"], [1.0]), "manifest"),
    "teachers-not-objects": (_set(["teachers"], ["a", "b", "c"]), "manifest"),
    "schema-version-99": (_set(["schema_version"], 99), "manifest"),
    "input-dtype-object": (_set(["input", "dtype"], "object"), "manifest"),
    "class-names-escapes": (_set(["class_names"], ["\x1b[2J" + str(i) for i in range(5)]), "any"),
    # per-position sets (a language-model teacher's): the third element builds that base set instead
    "token-label-too-big": (_values_at("labels", (2, 3), 50), "refuse", "tokens"),
    "token-topk-index-repeated": (_shard(lambda f, o: _set_position(f, "topk_index", (2, 1, 1), f["topk_index"][2, 1, 0])),
                                  "refuse", "tokens"),
    "token-topk-index-outside-vocab": (_values_at("topk_index", (3, 2, 0), 60), "refuse", "tokens"),
    "token-nan-log-probs": (_values_at("topk_log_probs", (1, 2, 0, 1), np.nan), "refuse", "tokens"),
    "token-positions-disagree": (_set(["positions"], 7), "refuse", "tokens"),
    "token-positions-huge": (_set(["positions"], 10 ** 9), "manifest", "tokens"),
    "token-positions-on-schema-2": (_set(["schema_version"], 2), "manifest", "tokens"),
    "token-length-negative": (_values_at("length", (1,), -5), "any", "tokens"),
    # hint fields (issue 23): these cases start from a set with hints (HINT_CASES)
    "hint-nan": (_values("hint_0", np.nan), "refuse"),
    "hint-dataset-missing": (_shard(lambda f, o: f.__delitem__("hint_1")), "refuse"),
    "hint-wrong-dtype": (_replace("hint_1", lambda f, n, o: f.create_dataset(n, data=np.zeros((7, 2), np.float16))),
                         "refuse"),
    "hint-wrong-shape": (_replace("hint_0", lambda f, n, o: f.create_dataset(n, data=np.zeros((7, 4), np.float16))),
                         "refuse"),
    "hint-shape-disagrees": (_set(["hints", 0, "shape"], [300]), "manifest"),
    "hint-member-out-of-range": (_set(["hints", 1, "member"], 3), "manifest"),
    "hint-field-renamed": (_set(["hints", 0, "field"], "inputs"), "manifest"),
    "hint-tensor-shape-10e12": (_set(["hints", 0, "tensor_shape"], [10 ** 6, 10 ** 6, 1]), "manifest"),
    "hints-in-schema-2": (_set(["schema_version"], 2), "manifest"),
    "hints-not-a-list": (_set(["hints"], {"field": "hint_0"}), "manifest"),
    "source-data-outside": (lambda r, o: _outside_source(r, o, "secret.bin"), "train"),
    "source-data-fifo": (lambda r, o: _outside_source(r, o, "trap.fifo"), "train"),
}


#: cases built on a set with hints (tests/conftest.py make_transfer_set(hints=True)); train-student reads them
HINT_CASES = {name for name in CASES if name.startswith("hint")}


def _outside_source(root: Path, outside: Path, name: str) -> None:
    """A set without stored inputs whose manifest names a file outside as its source (replay would read it)."""
    m = _manifest(root)
    for s in m["shards"]:
        with h5py.File(root / s["path"], "r+") as f:
            del f["inputs"]
    m["input"]["stored"] = False
    m["source"]["data"] = str(outside / name)
    _write_manifest(root, m)
    for s in m["shards"]:
        _rehash(root, s["path"])
