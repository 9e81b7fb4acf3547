"""The benchmark scripts run in their --quick mode and end with the JSON keys the docs promise.

Only that they work is checked: their times are never judged (STYLE.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, *args, "--quick", "--json", "--workdir", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_bench_label_quick(tmp_path):
    res = _run(["scripts/bench_label.py", "--floor", "--codec", "topk:3", "--no-maths"], tmp_path)
    for key in ("ratio_to_ort", "ratio_to_best_ort", "vs_naive", "rows_per_s", "machine"):
        assert key in res
    assert set(res["rows_per_s"]) == {"ort", "ort_lanes", "label", "naive", "label_codec", "ort_bytes",
                                      "ort_bytes_codec", "label_no_maths"}
    assert res["no_maths_ratio_to_best_ort"] > 0
    assert res["ratio_to_ort"] > 0 and res["vs_naive"] > 0
    assert res["ratio_to_best_ort"] <= res["ratio_to_ort"]
    # the bytes-only leg writes as many bytes a row as label's set holds: a dense row holds 4 members' logits and
    # 5 temperatures over 10 classes in float16 beside its 784 input bytes
    assert res["row_bytes"]["label"] >= 784 + 2 * (4 * 10 + 5 * 10)
    assert res["row_bytes"]["label_codec"] > 784
    assert res["floor_ratio_to_best_ort"] > 0 and res["label_ratio_to_floor"] > 0


def _lm_teacher(tmp_path: Path) -> Path:
    """A tiny decoder ONNX (V = 300): ids [B, L] -> logits [B, L, 300]."""
    import warnings

    import torch

    from transferset.training.lm import CausalLM

    teacher = tmp_path / "lm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(CausalLM(300, 1, 16, 2, 64).eval(), (torch.zeros(2, 8, dtype=torch.int64),), str(teacher),
                          dynamo=False, opset_version=17, input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "b", 1: "l"}, "logits": {0: "b", 1: "l"}})
    return teacher


def test_bench_label_lm_quick(tmp_path):
    teacher = _lm_teacher(tmp_path)
    res = _run(["scripts/bench_label.py", "--lm", str(teacher), "--batch-size", "4"], tmp_path)
    assert set(res["tokens_per_s"]) == {"ort", "ort_runs", "ort_lanes", "graph_lanes", "label"} and res["vocab"] == 300
    assert res["graph_lanes_to_ort_lanes"] > 0 and res["label_to_graph_lanes"] > 0
    assert 0 < res["ratio_to_best_ort"] <= min(res["ratio_to_ort"], res["ratio_to_ort_runs"])
    assert res["ratio_to_ort"] > 0 and res["ratio_to_ort_runs"] > 0 and res["run_rows"] >= 1


def test_bench_lm_graph_quick(tmp_path):
    """The extension's legs and the block TopK: the block TopK gives ORT TopK's values and ids at every block size
    (blocks that divide V, padded blocks, fewer blocks than K) on a teacher's logits and the crafted tie rows."""
    teacher = _lm_teacher(tmp_path)
    res = _run(["scripts/bench_lm_graph.py", "--lm", str(teacher)], tmp_path)
    assert set(res["us_per_position"]) == {"bare", "joined", "topk", "topk_softmax", "extension", "block32",
                                           "block64", "block128"} and res["vocab"] == 300
    assert res["exact"] == {"32": True, "64": True, "128": True}
    assert all(leg["same_as_topk1"] for leg in res["top1"].values()) and len(res["top1"]) == 3
    assert res["bare_over_leg"]["bare"] == 1.0 and all(v > 0 for v in res["us_per_position"].values())
    assert {"teacher", "TopK", "Softmax"} <= set(res["profile_us_per_position"]["extension"])
    assert {"teacher", "TopK"} <= set(res["profile_us_per_position"]["topk"])
    assert {"TopK (btop)", "TopK (bsort)", "TopK (topk)"} <= set(res["profile_us_per_position"]["block32"])


def test_bench_train_quick(tmp_path):
    res = _run(["scripts/bench_train.py", "--threads", "1"], tmp_path)
    for key in ("stream_vs_memory", "offline_vs_online", "fast_vs_memory", "reader_bytes_per_s", "machine"):
        assert key in res
    assert set(res["samples_per_s"]) == {"memory", "stream", "fast", "online", "reader"}


@pytest.mark.parametrize("what", ["train", "label", "storage"])
def test_bench_scale_quick(tmp_path, what):
    res = _run(["scripts/bench_scale.py", what], tmp_path)
    assert res["what"] == what and res["results"]
    if what != "storage":
        assert all(r["peak_rss_mb"] > 0 for r in res["results"])
    else:
        assert {(r["dtype"], r["inputs_stored"]) for r in res["results"]} >= {("float16", True), ("float32", False)}


def test_bench_parts_quick(tmp_path):
    res = _run(["scripts/bench_parts.py"], tmp_path)
    for key in ("ratio", "claim_ratio", "rows_per_s", "seconds", "machine"):
        assert key in res
    assert set(res["rows_per_s"]) == {"one", "parts", "claim"}


@pytest.mark.slow
def test_bench_photos_parts_leg_smoke():
    """bench_photos --parts-leg: 2 parts at once and 1 process write the same bytes; the keys the docs use."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "scripts/bench_photos.py", "--count", "20", "--size", "32", "--views", "2",
                        "--workers", "1", "--no-pipeline", "--no-decoders", "--parts-leg", "--parts-shard-size", "16",
                        "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    parts = json.loads(p.stdout.strip().splitlines()[-1])["parts"]
    assert parts["identical"] and parts["rows"] == 50 and parts["parts_vs_one"] > 0


@pytest.mark.parametrize("codec", ["dense", "topk:5"])
def test_bench_targets_graph_quick(tmp_path, codec):
    """The graph computes the codec's fields: the same kept classes, values within float16 rounding of numpy's."""
    res = _run(["scripts/bench_targets_graph.py", "--codec", codec], tmp_path)
    assert set(res["cpu_seconds"]) == {"numpy", "graph"} and res["numpy_over_graph"] > 0
    assert res["entropy_max_abs_gap"] < 1e-3 and all(v < 0.05 for v in res["float16_values_differing"].values())
    assert res["same_topk_index"] is (None if codec == "dense" else True)
    assert set(res["float16_values_differing"]) == ({"logits", "soft_targets"} if codec == "dense" else
                                                    {"topk_log_probs", "tail_log_mass", "topk_logits",
                                                     "member_log_partition"})


def test_bench_token_memory_quick():
    """Each chunk size runs in its own process and gives the all-at-once loss and gradient (the script exits 1
    otherwise); the report holds each leg's step memory."""
    p = subprocess.run([sys.executable, "scripts/bench_token_memory.py", "--quick", "--json"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert [leg["chunk"] for leg in res["legs"]] == [0, 32] and res["vocab"] == 5000
    assert all(leg["step_mb"] > 0 and leg["positions"] == 128 for leg in res["legs"])


def test_maths_free_writes_a_set_of_the_same_layout_with_constant_targets(tmp_path):
    """bench_label's ``--no-maths`` leg: inside ``maths_free`` label writes the same fields, shapes and dtypes as
    without it (so the same bytes go through HDF5, the hash and the fsync), its targets are constants, and the real
    maths is back afterwards."""
    import h5py
    import numpy as np

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_label
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from teachers import export_teacher
    from transferset import label
    from transferset.labelling import assembler
    from transferset.labelling.pipeline import LabelOptions

    paths = [export_teacher(tmp_path / f"t{i}.onnx", (6,), classes=12, seed=i) for i in range(2)]
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    real = assembler.soft_targets
    sets = {}
    for name, ctx in (("real", None), ("free", bench_label.maths_free)):
        out = tmp_path / name
        if ctx is None:
            label(paths, str(tmp_path / "x.npy"), out, LabelOptions(codec="topk:3", quiet=True, shard_size=20))
        else:
            with ctx():
                assert assembler.soft_targets is not real
                label(paths, str(tmp_path / "x.npy"), out, LabelOptions(codec="topk:3", quiet=True, shard_size=20))
        with h5py.File(out / "shard-00000.h5", "r") as f:
            sets[name] = {k: f[k][()] for k in f}
    assert assembler.soft_targets is real
    assert {k: (v.shape, v.dtype) for k, v in sets["free"].items()} == \
        {k: (v.shape, v.dtype) for k, v in sets["real"].items()}
    assert len(np.unique(sets["free"]["tail_log_mass"])) == 1 < len(np.unique(sets["real"]["tail_log_mass"]))
    assert np.array_equal(sets["free"]["inputs"], sets["real"]["inputs"])
