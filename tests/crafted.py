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
import math
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


def _set_many(edits: dict):
    """Several manifest nodes at once: ``{(key, ...): value}``."""
    def fn(m):
        for path, value in edits.items():
            node = m
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
    return _edit(fn)


def _bomb(edits: dict, rows: int):
    """The set (any base) made one gzip shard of ``rows`` rows in the layout the manifest declares after
    ``edits`` (``{(key, ...): value}``): every field of every row written (log-probabilities log(1/C), class
    indices 0..K-1, the rest 0), a row at a time, each wide field chunked a row per chunk: a few KB on disk for
    what may decompress to hundreds of MB."""
    def build(root: Path, outside: Path) -> None:
        from transferset._io import sha256_file
        from transferset.format.schema import Manifest, shard_layout

        _set_many(edits)(root, outside)
        m = _manifest(root)
        for e in m["shards"][1:]:
            (root / e["path"]).unlink()
        m["shards"] = [{**m["shards"][0], "rows": rows, "row_start": 0}]
        m["shards"][0].pop("stats", None)
        m.update(expected_rows=rows)
        m["stats"] = {"rows": rows}
        m["source"]["rows"] = rows
        layout = shard_layout(Manifest.from_json(m))
        p = root / m["shards"][0]["path"]
        with h5py.File(p, "w") as f:
            for name, (shape, dt) in layout.items():
                wide = math.prod(shape) * dt.itemsize > 1 << 16
                d = f.create_dataset(name, shape=(rows,) + shape, dtype=dt, compression="gzip",
                                     chunks=(1,) + shape if wide else (min(rows, 64),) + shape)
                if name in ("topk_index", "sample_index"):
                    row = np.broadcast_to(np.arange(shape[-1], dtype=dt), (1,) + shape)
                elif name in ("soft_targets", "topk_log_probs"):
                    row = np.full((1,) + shape, -np.log(m["num_classes"]), dt)
                elif name == "tail_log_mass":
                    row = np.full((1,) + shape, -30.0, dt)
                else:  # zeros, written (a chunk never written is not stored, and rows must be backed by bytes)
                    row = np.zeros((1,) + shape, dt)
                for r in range(rows):
                    d[r:r + 1] = row
        m["shards"][0].update(sha256=sha256_file(p), bytes=p.stat().st_size)
        _write_manifest(root, m)
    return build


def _hints(n: int) -> list:
    return [{"field": f"hint_{k}", "tensor": "t/map", "member": 0, "reduce": "avgpool", "tensor_shape": [3, 2, 2],
             "shape": [3], "dtype": "float16"} for k in range(n)]


def _resize_shard(root: Path, rows: int, temps: int, classes: int, compression: str | None = "gzip",
                  chunked: bool = True) -> None:
    """The set made one shard of ``rows`` rows at ``temps`` temperatures and ``classes`` classes, each row's soft
    targets log(1/C) (gzip: a few KB on disk for what decompresses to rows x temps x classes x 2 bytes), the
    manifest made to agree."""
    from transferset._io import sha256_file

    m = _manifest(root)
    p = root / "shard-00000.h5"
    members = m["num_members"]
    shapes = {"logits": ((members, classes), np.float16), "soft_targets": ((temps, classes), np.float16),
              "labels": ((), np.int64), "source_index": ((), np.int64), "view": ((), np.int32),
              "aug_seed": ((), np.uint64), "inputs": (tuple(m["input"]["shape"]), np.float32)}
    with h5py.File(p, "w") as f:
        for name, (shape, dt) in shapes.items():
            chunk = (1,) + shape if chunked and name in ("logits", "soft_targets") else (min(rows, 4096),) + shape
            d = f.create_dataset(name, shape=(rows,) + shape, dtype=dt, chunks=chunk if chunked else None,
                                 compression=compression if chunked else None)
            if name == "soft_targets":  # log(1/C) everywhere: finite, so verify has to read every value
                block = np.full((1,) + shape, -np.log(classes), dt)
                for r in range(rows):
                    d[r:r + 1] = block
            else:
                d[...] = 0
    for s in m["shards"][1:]:
        (root / s["path"]).unlink()
    m["shards"] = [{**m["shards"][0], "rows": rows, "sha256": sha256_file(p), "bytes": p.stat().st_size}]
    total = rows
    m.update(temperatures=[float(1 + i) for i in range(temps)], num_classes=classes, expected_rows=total)
    m["stats"]["rows"] = total
    m["source"]["rows"] = total
    _write_manifest(root, m)


def _unchunked(chunk_rows):
    """Every shard rewritten with contiguous (unchunked) datasets, the manifest declaring ``chunk_rows``."""
    def build(root: Path, outside: Path) -> None:
        m = _manifest(root)
        for s in m["shards"]:
            p = root / s["path"]
            with h5py.File(p, "r") as f:
                data = {n: f[n][()] for n in f}
            with h5py.File(p, "w") as f:
                for n, a in data.items():
                    f.create_dataset(n, data=a)
        m["chunk_rows"] = chunk_rows
        _write_manifest(root, m)
        for s in m["shards"]:
            _rehash(root, s["path"])
    return build


#: non-numbers a manifest may hold where a number belongs (raw JSON text)
NON_NUMBERS = {"nan": "NaN", "inf": "Infinity", "minus-inf": "-Infinity", "1e400": "1e400", "2e64": str(2 ** 64),
               "2e70": str(2 ** 70), "minus-2e63": str(-2 ** 63 - 1), "string": '"7"', "object": '{"a": {"b": [1]}}',
               "list": "[[1], [2]]", "null": "null", "true": "true"}


def _non_number(path: list, token: str):
    """Set the manifest node at ``path`` to the raw JSON ``token`` (NaN and 1e400 are not what json.dumps writes)."""
    def build(root: Path, outside: Path) -> None:
        m = _manifest(root)
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = "@@TOKEN@@"
        _write_manifest(root, json.dumps(m).replace('"@@TOKEN@@"', token))
    return build


#: where in a manifest a number goes (the classes the fuzz also draws from)
NUMBER_PLACES = {
    "stats-ensemble-accuracy": ["stats", "ensemble_accuracy"], "stats-member-accuracy": ["stats", "member_accuracy"],
    "stats-member-accuracy-item": ["stats", "member_accuracy", 0], "stats-rows": ["stats", "rows"],
    "stats-labelled-rows": ["stats", "labelled_rows"], "stats-mean-entropy": ["stats", "mean_entropy"],
    "stats-mean-entropy-item": ["stats", "mean_entropy", "4"], "stats": ["stats"],
    "shard-stats-labelled": ["shards", 0, "stats", "labelled"], "shard-row-start": ["shards", 1, "row_start"],
    "shard-rows": ["shards", 0, "rows"], "shard-bytes": ["shards", 0, "bytes"],
    "temperature": ["temperatures", 1], "weight": ["weights", 0], "num-classes": ["num_classes"],
    "chunk-rows": ["chunk_rows"], "expected-rows": ["expected_rows"], "input-shape": ["input", "shape", 0],
    "augment-seed": ["augment", "seed"], "views-per-row": ["augment", "views_per_row"],
    "preprocess-scale": ["preprocess", "scale"], "source-rows": ["source", "rows"], "batch-size": ["batch_size"],
}


def _with_stats(build):
    """``build`` on a set whose manifest has full statistics (labelled rows, accuracies, entropies) to damage."""
    def full(root: Path, outside: Path) -> None:
        m = _manifest(root)
        m["stats"] = {"rows": m["stats"]["rows"], "labelled_rows": 14, "member_accuracy": [0.5, 0.25, 0.75],
                      "ensemble_accuracy": 0.5, "mean_entropy": {"1": 1.2, "4": 1.5}}
        for s in m["shards"]:
            s["stats"] = {"labelled": 1, "member_correct": [1, 0, 1], "ensemble_correct": 1,
                          "entropy_sum": [1.0, 2.0]}
        _write_manifest(root, m)
        build(root, outside)
    return full


CASES = {
    # a photo set's marks (issue 28): kept bad-file rows claimed by a set that is no photo set
    "bad-files-kept-on-an-array-set": (_set_many({("source", "bad_files"): "kept",
                                                  ("shards", 0, "stats"): {"skipped": [[0, "x.jpg", "r"],
                                                                                       [2 ** 47, "y.jpg", "r"]]}}),
                                       "any"),
    "photo-format-on-an-array-set": (_set_many({("source", "format"): "photos", ("source", "bad_files"): "kept"}),
                                     "refuse"),
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
    # 512 rows x 2,000 temperatures x 1,000 classes of float16: 2 GB decompressed from a few MB of gzip; more
    # temperatures than a set may declare
    "gzip-bomb-2000-temperatures": (lambda r, o: _resize_shard(r, 512, 2000, 1000), "manifest"),
    # within the limits: 32 rows x 64 temperatures x 65,536 classes, 256 MB decompressed from ~0.5 MB of gzip
    "gzip-bomb-64-temperatures": (lambda r, o: _resize_shard(r, 32, 64, 65536), "any"),
    "gzip-bomb-classes-over-limit": (lambda r, o: _resize_shard(r, 4, 2, 1 << 22), "manifest"),
    # offsets: row_start and byte counts out of range
    "row-start-beyond-64-bits": (_set(["shards", 1, "row_start"], 2 ** 70), "manifest"),
    "row-start-at-int64-max": (_set(["shards", 1, "row_start"], 2 ** 63 - 1), "manifest"),
    "row-start-negative": (_set(["shards", 1, "row_start"], -7), "manifest"),
    # a row_start the shards before it do not end at: verify refuses it, and so does a reader (rows numbered by it
    # indexed the photo marks' and the holdout's row arrays: fuzz_sets seed 5 case 369)
    "row-start-past-the-set": (_set(["shards", 2, "row_start"], 10 ** 12), "refuse"),
    "row-start-past-2e48": (_set(["shards", 2, "row_start"], 2 ** 48), "manifest"),
    "row-start-overlaps": (_set(["shards", 2, "row_start"], 3), "refuse"),
    "bytes-beyond-64-bits": (_set(["shards", 0, "bytes"], 2 ** 70), "manifest"),
    "rows-beyond-64-bits": (_set(["shards", 0, "rows"], 2 ** 70), "manifest"),
    "expected-rows-beyond-64-bits": (_set(["expected_rows"], 2 ** 64), "manifest"),
    # unchunked (contiguous) datasets, the manifest declaring a chunk larger than any shard
    "unchunked-chunk-rows-10e12": (_unchunked(10 ** 12), "any"),
    "unchunked-chunk-rows-1000": (_unchunked(1000), "any"),
    "unchunked-chunk-rows-beyond-64-bits": (_unchunked(2 ** 70), "manifest"),
    "unchunked-gzip-bomb": (lambda r, o: _resize_shard(r, 64, 8, 4096, chunked=False), "any"),
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
    # an input id a student would embed past its vocabulary (fuzz 500, seed 16: train-student ended in torch's
    # IndexError); the set's inputs are uint8 ids of a 50-token vocabulary
    "token-input-id-outside-vocab": (_values_at("inputs", (2, 3), 200), "refuse", "tokens"),
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
    "json-nan-temperature": (_non_number(["temperatures", 1], "NaN"), "manifest"),
    "json-infinity-weight": (_non_number(["weights", 0], "Infinity"), "manifest"),
    # each place a number goes, with one non-number (in turn), and each non-number in the statistics
    **{f"non-number-{place}-{kind}": (_with_stats(_non_number(path, NON_NUMBERS[kind])), "any")
       for i, (place, path) in enumerate(NUMBER_PLACES.items()) for kind in [list(NON_NUMBERS)[i % len(NON_NUMBERS)]]},
    **{f"non-number-stats-mean-entropy-item-{kind}": (_with_stats(_non_number(["stats", "mean_entropy", "4"], token)),
                                                      "any") for kind, token in NON_NUMBERS.items()},
    # limits on what a per-position set and hint fields may declare (issue 25): a reader's memory is bounded by a
    # row of one temperature, positions and hints included
    "token-row-over-limit": (_set_many({("codec",): "topk:32", ("positions",): 1 << 20}), "manifest", "tokens"),
    "token-temperatures-65": (_set(["temperatures"], [float(1 + i) for i in range(65)]), "manifest", "tokens"),
    "token-unchunked-chunk-rows-10e12": (_unchunked(10 ** 12), "any", "tokens"),
    "token-non-number-positions-nan": (_non_number(["positions"], "NaN"), "manifest", "tokens"),
    "token-non-number-positions-2e70": (_non_number(["positions"], str(2 ** 70)), "manifest", "tokens"),
    "token-row-start-beyond-64-bits": (_set(["shards", 1, "row_start"], 2 ** 70), "manifest", "tokens"),
    # 64 rows x 2,048 positions x 64 temperatures x topk:4 (32 MB of topk_log_probs, 64 MB in all) from gzip
    "token-gzip-bomb-within-limits": (_bomb({("positions",): 2048, ("temperatures",): [float(1 + i) for i in range(64)],
                                             ("input", "shape"): [2048]}, 64), "any", "tokens"),
    "frame-row-over-limit": (_set_many({("positions",): 1 << 20, ("num_classes",): 16}), "manifest", "frames"),
    "frame-temperatures-65": (_set(["temperatures"], [float(1 + i) for i in range(65)]), "manifest", "frames"),
    "frame-non-number-positions-inf": (_non_number(["positions"], "Infinity"), "manifest", "frames"),
    "frame-unchunked-chunk-rows-2e70": (_unchunked(2 ** 70), "manifest", "frames"),
    # 16 rows x 512 frames x 32 temperatures x 512 classes: 8 M values (16 MB) of soft targets a row, 256 MB in all
    "frame-gzip-bomb-within-limits": (_bomb({("positions",): 512, ("num_classes",): 512,
                                             ("temperatures",): [float(1 + i) for i in range(32)]}, 16), "any", "frames"),
    "hint-row-over-limit": (_set_many({("hints", 0, "reduce"): "none", ("hints", 0, "tensor_shape"): [4096, 8192],
                                       ("hints", 0, "shape"): [4096, 8192]}), "manifest"),
    "hints-65": (_set(["hints"], _hints(65)), "manifest"),
    "hint-non-number-member-2e64": (_non_number(["hints", 1, "member"], str(2 ** 64)), "manifest"),
    "hint-non-number-tensor-shape-nan": (_non_number(["hints", 0, "tensor_shape", 0], "NaN"), "manifest"),
    # 16 rows of a [2048, 2048] hint (4 M values, 8 MB a row), 128 MB in all from gzip
    "hint-gzip-bomb-within-limits": (_bomb({("hints", 0, "reduce"): "none", ("hints", 0, "tensor_shape"): [2048, 2048],
                                            ("hints", 0, "shape"): [2048, 2048]}, 16), "any"),
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
