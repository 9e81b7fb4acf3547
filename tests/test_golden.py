"""Bytes kept: labelling the golden fixture's source gives exactly the set stored beside it.

tests/fixtures/golden/ was written by tests/fixtures/make_golden.py with the code before the redesign (main at
d8a1e21). Every shard must match byte for byte (sha256 of the file) and every dataset value for value, and the
manifest must match apart from the tool version and the source paths (which name where the repository lies).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from transferset import label
from transferset.labelling.pipeline import LabelOptions

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"


def _comparable(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    m.pop("tool_version", None)
    m["source"].pop("data", None)
    m["source"].pop("labels", None)
    return m


def test_label_reproduces_the_golden_set(tmp_path):
    options = json.loads((GOLDEN / "options.json").read_text())
    options["temperatures"] = tuple(options["temperatures"])
    out = tmp_path / "set"
    label([GOLDEN / "t0.onnx", GOLDEN / "t1.onnx"], str(GOLDEN / "images.npy"), out,
          LabelOptions(labels=str(GOLDEN / "labels.npy"), quiet=True, **options))
    want = json.loads((GOLDEN / "set" / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert _comparable(got) == _comparable(want)
    for s in want["shards"]:
        with h5py.File(GOLDEN / "set" / s["path"], "r") as fw, h5py.File(out / s["path"], "r") as fg:
            assert sorted(fw) == sorted(fg)
            for name in fw:
                assert fw[name].dtype == fg[name].dtype and fw[name].chunks == fg[name].chunks, name
                np.testing.assert_array_equal(fw[name][()], fg[name][()], err_msg=f"{s['path']}:{name}")
        assert (out / s["path"]).read_bytes() == (GOLDEN / "set" / s["path"]).read_bytes()
