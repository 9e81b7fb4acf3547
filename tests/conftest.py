"""Shared fixtures: a tiny synthetic transfer set written on the fly (docs/CONTRACTS.md layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import pytest

from transferset import SCHEMA_VERSION, __version__
from transferset.format.manifest import MANIFEST_NAME, atomic_write_json, sha256_file
from transferset.targets import soft_targets


def make_transfer_set(root, shard_rows: Sequence[int] = (7, 0, 13, 1), members: int = 3, classes: int = 5,
                      temperatures: Sequence[float] = (1, 4), input_shape: tuple = (6,), stored: bool = True,
                      dtype: str = "float16", chunk_rows: int = 4, seed: int = 0) -> Path:
    """Write shards ``shard-0000k.h5`` and ``manifest.json`` into ``root``; returns ``root`` as a Path.

    Values are random but fixed by ``seed``; ``inputs[r]`` starts with the global row ``r`` so a test can
    check rows by eye. One view per source row (``source_index == global row``, ``view == 0``).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    temps = [float(t) for t in temperatures]
    shards, start = [], 0
    for k, n in enumerate(shard_rows):
        rows = np.arange(start, start + n, dtype=np.int64)
        logits = rng.normal(size=(n, members, classes)).astype(np.float32) * 3
        arrays = {
            "logits": logits.astype(dtype),
            "soft_targets": soft_targets(logits, temps).astype(dtype),
            "labels": np.where(rows % 3 == 0, -1, rows % classes).astype(np.int64),
            "source_index": rows,
            "view": np.zeros(n, np.int32),
            "aug_seed": (rows.astype(np.uint64) * np.uint64(2654435761)) + np.uint64(1 << 63),
        }
        if stored:
            x = rng.normal(size=(n,) + tuple(input_shape)).astype(np.float32)
            x.reshape(n, int(np.prod(input_shape)))[:, 0] = rows
            arrays["inputs"] = x
        name = f"shard-{k:05d}.h5"
        with h5py.File(root / name, "w") as f:
            for key, arr in arrays.items():
                f.create_dataset(key, data=arr, chunks=(chunk_rows,) + arr.shape[1:], maxshape=(None,) + arr.shape[1:])
        shards.append({"path": name, "rows": int(n), "row_start": start, "sha256": sha256_file(root / name)})
        start += n
    manifest = {
        "format": "transferset", "schema_version": SCHEMA_VERSION, "tool_version": __version__,
        "num_classes": classes, "num_members": members, "class_names": None,
        "teachers": [{"file": f"t{i}.onnx", "sha256": "0" * 64, "output_kind": "logits"} for i in range(members)],
        "temperatures": temps, "combine": "mean-probs", "weights": [1.0 / members] * members, "dtype": dtype,
        "preprocess": {"scale": 1.0, "mean": None, "std": None, "layout": None},
        "input": {"shape": list(input_shape), "dtype": "float32", "stored": bool(stored)},
        "augment": {"spec": "", "views": 0, "clean_view": True, "views_per_row": 1, "seed": 0},
        "source": {"data": "synthetic.npy", "rows": start, "fingerprint": "synthetic"},
        "chunk_rows": chunk_rows, "shards": shards, "complete": True, "expected_rows": start,
        "stats": {"rows": start},
    }
    atomic_write_json(root / MANIFEST_NAME, manifest)
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
