"""Bytes kept: labelling the golden fixture's source gives exactly the shards stored beside it.

tests/fixtures/golden/ was written by tests/fixtures/make_golden.py with the code before the redesign (main at
d8a1e21), as schema 1 (float64 soft-target maths). It is kept as it is: it must still read and verify. Labelling
its source now writes schema 4 (float32 maths, docs/FORMAT.md "Schema 4"): every shard must still match byte for
byte (sha256 of the file) and every dataset value for value (at 5 classes no float16 value moves), and the manifest
must match apart from the tool version, the source paths (which name where the repository lies), the schema version,
the definition hash (which holds it) and the entropy statistics (float32 sums, equal to 1e-6).
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
    for key in ("tool_version", "schema_version", "definition_sha256"):
        m.pop(key, None)
    m["source"].pop("data", None)
    m["source"].pop("labels", None)
    m["stats"].pop("mean_entropy")
    for s in m["shards"]:
        s["stats"].pop("entropy_sum")
    return m


def _entropies(manifest: dict) -> list[float]:
    return list(manifest["stats"]["mean_entropy"].values()) + [v for s in manifest["shards"]
                                                              for v in s["stats"]["entropy_sum"]]


def test_the_schema_1_golden_set_still_reads_and_verifies():
    from transferset.format.verify import verify_transfer_set
    from transferset.training.reader import load_in_memory

    assert json.loads((GOLDEN / "set" / "manifest.json").read_text())["schema_version"] == 1
    assert verify_transfer_set(GOLDEN / "set", rehash=True) == []
    got = load_in_memory(GOLDEN / "set", ("soft_targets", "labels"), temperature=4.0)
    with h5py.File(GOLDEN / "set" / "shard-00000.h5", "r") as f:
        np.testing.assert_array_equal(got["soft_targets"][:40].numpy(), f["soft_targets"][:, 1])


def test_label_reproduces_the_golden_set(tmp_path):
    options = json.loads((GOLDEN / "options.json").read_text())
    options["temperatures"] = tuple(options["temperatures"])
    out = tmp_path / "set"
    label([GOLDEN / "t0.onnx", GOLDEN / "t1.onnx"], str(GOLDEN / "images.npy"), out,
          LabelOptions(labels=str(GOLDEN / "labels.npy"), quiet=True, **options))
    want = json.loads((GOLDEN / "set" / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert want["schema_version"] == 1 and got["schema_version"] == 4
    assert _comparable(got) == _comparable(want)
    np.testing.assert_allclose(_entropies(got), _entropies(want), rtol=1e-6)
    for s in want["shards"]:
        with h5py.File(GOLDEN / "set" / s["path"], "r") as fw, h5py.File(out / s["path"], "r") as fg:
            assert sorted(fw) == sorted(fg)
            for name in fw:
                assert fw[name].dtype == fg[name].dtype and fw[name].chunks == fg[name].chunks, name
                np.testing.assert_array_equal(fw[name][()], fg[name][()], err_msg=f"{s['path']}:{name}")
        assert (out / s["path"]).read_bytes() == (GOLDEN / "set" / s["path"]).read_bytes()
