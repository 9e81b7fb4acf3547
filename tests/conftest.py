"""Shared fixtures: a tiny synthetic transfer set written on the fly (docs/CONTRACTS.md layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import pytest

from transferset import __version__
from transferset.format.manifest import MANIFEST_NAME, sha256_file, write_manifest
from transferset.format.schema import Manifest, ShardEntry, shard_layout
from transferset.targets import soft_targets


def make_transfer_set(root, shard_rows: Sequence[int] = (7, 0, 13, 1), members: int = 3, classes: int = 5,
                      temperatures: Sequence[float] = (1, 4), input_shape: tuple = (6,), stored: bool = True,
                      dtype: str = "float16", chunk_rows: int = 4, seed: int = 0, hints: bool = False) -> Path:
    """Write shards ``shard-0000k.h5`` and ``manifest.json`` into ``root``; returns ``root`` as a Path.

    Values are random but fixed by ``seed``; ``inputs[r]`` starts with the global row ``r`` so a test can
    check rows by eye. One view per source row (``source_index == global row``, ``view == 0``). The datasets
    and the manifest follow ``transferset.format.schema``. With ``hints``, a schema-3 set with two hint fields:
    ``hint_0`` (avgpool of a [3, 2, 2] tensor: [3] floats) and ``hint_1`` (sign of a [12] tensor: [2] uint8).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    temps = [float(t) for t in temperatures]
    total = int(sum(shard_rows))
    m = Manifest(
        num_classes=classes, num_members=members,
        teachers=[{"file": f"t{i}.onnx", "sha256": "0" * 64, "output_kind": "logits"} for i in range(members)],
        temperatures=temps, combine="mean-probs", weights=[1.0 / members] * members, dtype=dtype,
        input={"shape": list(input_shape), "dtype": "float32", "stored": bool(stored)},
        augment={"spec": "", "views": 0, "clean_view": True, "views_per_row": 1, "seed": 0},
        source={"data": "synthetic.npy", "rows": total, "fingerprint": "synthetic"}, tool_version=__version__,
        preprocess={"scale": 1.0, "mean": None, "std": None, "layout": None}, chunk_rows=chunk_rows,
        expected_rows=total, complete=True, stats={"rows": total})
    if hints:
        m.schema_version = 3
        m.hints = [{"field": "hint_0", "tensor": "t/map", "member": 0, "reduce": "avgpool", "tensor_shape": [3, 2, 2],
                    "shape": [3], "dtype": dtype},
                   {"field": "hint_1", "tensor": "t/fc", "member": members - 1, "reduce": "sign", "tensor_shape": [12],
                    "shape": [2], "dtype": "uint8"}]
    layout = shard_layout(m)
    start = 0
    for k, n in enumerate(shard_rows):
        rows = np.arange(start, start + n, dtype=np.int64)
        logits = rng.normal(size=(n, members, classes)).astype(np.float32) * 3
        arrays = {
            "logits": logits,
            "soft_targets": soft_targets(logits, temps),
            "labels": np.where(rows % 3 == 0, -1, rows % classes),
            "source_index": rows,
            "view": np.zeros(n),
            "aug_seed": (rows.astype(np.uint64) * np.uint64(2654435761)) + np.uint64(1 << 63),
        }
        if hints:
            arrays["hint_0"] = rng.normal(size=(n, 3))
            arrays["hint_1"] = np.packbits(rng.normal(size=(n, 12)) > 0, axis=1)
        if stored:
            x = rng.normal(size=(n,) + tuple(input_shape)).astype(np.float32)
            x.reshape(n, int(np.prod(input_shape)))[:, 0] = rows
            arrays["inputs"] = x
        name = f"shard-{k:05d}.h5"
        with h5py.File(root / name, "w") as f:
            for key, (shape, dt) in layout.items():
                f.create_dataset(key, data=arrays[key].astype(dt), chunks=(chunk_rows,) + shape,
                                 maxshape=(None,) + shape)
        m.shards.append(ShardEntry(name, int(n), sha256_file(root / name), row_start=start))
        start += n
    write_manifest(root, m)
    return root


def make_token_set(root, shard_rows: Sequence[int] = (5, 3), vocab: int = 50, positions: int = 6, k: int = 4,
                   seed: int = 0) -> Path:
    """A per-position topk:K set (one member, T = 1) like ``label`` makes from a language-model teacher: random
    logits per position, encoded by the codec; row 1 is padded after 4 positions."""
    from transferset.format.codecs import encode
    from transferset.format.schema import POSITIONS_SCHEMA_VERSION
    from transferset.inputs.tokens import token_labels

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = int(sum(shard_rows))
    m = Manifest(
        num_classes=vocab, num_members=1, positions=positions, codec=f"topk:{k}",
        schema_version=POSITIONS_SCHEMA_VERSION,
        teachers=[{"file": "lm.onnx", "sha256": "0" * 64, "output_kind": "logits"}], temperatures=[1.0],
        combine="mean-probs", weights=[1.0], dtype="float16",
        input={"shape": [positions], "dtype": "uint8", "stored": True},
        augment={"spec": "", "views": 0, "clean_view": True, "views_per_row": 1, "seed": 0},
        source={"data": "ids.npy", "rows": total, "fingerprint": "synthetic"}, tool_version=__version__,
        chunk_rows=4, expected_rows=total, complete=True, stats={"rows": total})
    layout = shard_layout(m)
    start = 0
    for i, n in enumerate(shard_rows):
        rows = np.arange(start, start + n, dtype=np.int64)
        ids = rng.integers(0, vocab, (n, positions))
        length = np.full(n, positions, np.int32)
        length[rows == 1] = 4
        z = rng.normal(size=(n * positions, 1, vocab)) * 2
        enc = encode(f"topk:{k}", z, soft_targets(z, [1.0]), rows, [1.0], np.float16)
        arrays = {key: v.reshape((n, positions) + v.shape[1:]) for key, v in enc.items()}
        arrays.update(labels=token_labels(ids, length), length=length, inputs=ids, source_index=rows,
                      view=np.zeros(n), aug_seed=np.zeros(n, np.uint64))
        name = f"shard-{i:05d}.h5"
        with h5py.File(root / name, "w") as f:
            for key, (shape, dt) in layout.items():
                f.create_dataset(key, data=arrays[key].astype(dt), chunks=(4,) + shape, maxshape=(None,) + shape)
        m.shards.append(ShardEntry(name, int(n), sha256_file(root / name), row_start=start))
        start += n
    write_manifest(root, m)
    return root


def make_frame_set(root, shard_rows: Sequence[int] = (5, 3), classes: int = 5, frames: int = 4,
                   input_shape: tuple = (1, 8, 16), members: int = 2, temperatures: Sequence[float] = (1, 4),
                   seed: int = 0) -> Path:
    """A per-frame dense set like ``label`` makes from teachers with a float input and scores [B, T, C] (image
    lines, signals): ``frames`` positions a row, each member's logits and the soft targets per frame, frame labels
    in [-1, C)."""
    from transferset.format.schema import POSITIONS_SCHEMA_VERSION

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    temps = [float(t) for t in temperatures]
    total = int(sum(shard_rows))
    m = Manifest(
        num_classes=classes, num_members=members, positions=frames, schema_version=POSITIONS_SCHEMA_VERSION,
        teachers=[{"file": f"f{i}.onnx", "sha256": "0" * 64, "output_kind": "logits", "input_dtype": "float32"}
                  for i in range(members)],
        temperatures=temps, combine="mean-probs", weights=[1.0 / members] * members, dtype="float16",
        input={"shape": list(input_shape), "dtype": "float32", "stored": True},
        augment={"spec": "", "views": 0, "clean_view": True, "views_per_row": 1, "seed": 0},
        source={"data": "lines.npy", "rows": total, "fingerprint": "synthetic"}, tool_version=__version__,
        preprocess={"scale": 1.0, "mean": None, "std": None, "layout": None}, chunk_rows=4, expected_rows=total,
        complete=True, stats={"rows": total})
    layout = shard_layout(m)
    start = 0
    for i, n in enumerate(shard_rows):
        rows = np.arange(start, start + n, dtype=np.int64)
        z = rng.normal(size=(n, frames, members, classes)).astype(np.float32) * 2
        st = soft_targets(z.reshape(n * frames, members, classes), temps).reshape(n, frames, len(temps), classes)
        arrays = {"logits": z, "soft_targets": st, "labels": rng.integers(-1, classes, (n, frames)),
                  "length": np.full(n, frames), "inputs": rng.normal(size=(n,) + tuple(input_shape)),
                  "source_index": rows, "view": np.zeros(n), "aug_seed": np.zeros(n, np.uint64)}
        name = f"shard-{i:05d}.h5"
        with h5py.File(root / name, "w") as f:
            for key, (shape, dt) in layout.items():
                f.create_dataset(key, data=arrays[key].astype(dt), chunks=(4,) + shape, maxshape=(None,) + shape)
        m.shards.append(ShardEntry(name, int(n), sha256_file(root / name), row_start=start))
        start += n
    write_manifest(root, m)
    return root


def read_all_rows(root) -> dict[str, np.ndarray]:
    """Every dataset of every shard, concatenated in manifest order (row ``r`` is global row ``r``)."""
    import json

    root = Path(root)
    m = json.loads((root / MANIFEST_NAME).read_text())
    out: dict[str, list] = {}
    for s in m["shards"]:
        with h5py.File(root / s["path"], "r") as f:
            for key in f:
                out.setdefault(key, []).append(f[key][:])
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.fixture
def tiny_transfer_set(tmp_path) -> Path:
    """Four shards (7, 0, 13, 1 rows: an empty and a one-row shard), 3 members, 5 classes, T = 1 and 4."""
    return make_transfer_set(tmp_path / "set")
