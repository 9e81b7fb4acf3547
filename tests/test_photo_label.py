"""Photo folders through the product: label, bad files, replay in stage 2, verify --reteach, file lists, resume."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from transferset._io import sha256_file
from transferset.cli import main
from transferset.errors import TransferSetError
from transferset.format import load_manifest
from transferset.inputs.decode import PhotoTransform, render_file
from transferset.labelling.pipeline import LabelOptions, label
from transferset.training.reader import load_in_memory, open_transfer_set

ROOT = Path(__file__).resolve().parents[1]
SIDE = 24


class _Cnn(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Cnn().eval(), (torch.zeros(2, 3, SIDE, SIDE),), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17,
                          dynamo=False)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """35 good photos of every kind (sizes, formats, modes, EXIF) in 3 classes, plus 5 corrupt files."""
    spec = importlib.util.spec_from_file_location("mpf", ROOT / "scripts" / "make_photo_folder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("photos") / "set"
    mod.main([str(out), "--count", "35", "--classes", "3", "--workers", "1"])
    return out


def _opts(**kw) -> LabelOptions:
    base = dict(augment=f"rrc:{SIDE},flip", views=2, norm="imagenet", shard_size=40, batch_size=16,
                decode_workers=2, quiet=True)
    return LabelOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, teacher, photos) -> Path:
    out = tmp_path_factory.mktemp("labelled") / "ts"
    label([teacher], str(photos), out, _opts())
    return out


def _read(folder: Path, name: str) -> np.ndarray:
    m = load_manifest(folder)
    return np.concatenate([h5py.File(folder / s["path"], "r")[name][()] for s in m["shards"]])


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name.endswith((".h5", ".json"))}


def test_mixed_photos_label_and_bad_files_are_skipped_and_recorded(labelled, photos, capsys):
    m = load_manifest(labelled)
    assert m["complete"] and m["input"] == {"shape": [SIDE, SIDE, 3], "dtype": "uint8", "stored": False}
    skipped = {e[1] for s in m["shards"] for e in s["stats"]["skipped"]}
    assert len(skipped) == 5 and all("zz-" in p for p in skipped)
    assert m["stats"]["rows"] == 35 * 3 == m["expected_rows"] and m["stats"]["skipped_files"] == 5
    sidx, view = _read(labelled, "source_index"), _read(labelled, "view")
    assert sorted(set(view.tolist())) == [0, 1, 2] and len(set(sidx.tolist())) == 35
    boxes, flips = _read(labelled, "photo_box"), _read(labelled, "photo_flip")
    assert boxes.dtype == np.int32 and boxes.shape == (105, 4) and flips.dtype == np.uint8
    assert (flips[view == 0] == 0).all() and 0 < flips[view > 0].sum() < (view > 0).sum()
    starts = [s["row_start"] for s in m["shards"]]
    assert starts == list(np.cumsum([0] + [s["rows"] for s in m["shards"]])[:-1])
    with pytest.raises(SystemExit):
        main(["info", str(labelled), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert {e["path"] for e in info["skipped_files"]} == skipped and all(e["reason"] for e in info["skipped_files"])
    with pytest.raises(SystemExit):
        main(["verify", str(labelled)])
    assert "rows verified; complete" in capsys.readouterr().out


def test_fail_stops_in_one_line(tmp_path, teacher, photos, capsys):
    with pytest.raises(SystemExit) as e:
        main(["label", "--ensemble", str(teacher), "--data", str(photos), "--out", str(tmp_path / "o"), "-q",
              "--on-bad-image", "fail", "--decode-workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "zz-" in err[0] and err[0].startswith("transferset: error: image")


def test_crop_that_disagrees_with_the_teacher_is_one_line(tmp_path, teacher, photos):
    with pytest.raises(TransferSetError, match=f"takes {SIDE}x{SIDE} inputs; use {SIDE}") as e:
        label([teacher], str(photos), tmp_path / "o", _opts(augment=None, views=0, crop=SIDE + 8))
    assert e.value.option == "crop"


def test_replay_is_bit_identical_in_label_stage2_and_open_transfer_set(tmp_path, labelled, photos, teacher):
    m = load_manifest(labelled)
    t = PhotoTransform.from_json(m["source"]["transform"])
    sidx, view = _read(labelled, "source_index"), _read(labelled, "view")
    rel = __import__("transferset.inputs.photos", fromlist=["x"]).open_photo_source(str(photos), t).rel_paths
    drawn = np.stack([render_file(photos / rel[i], t, base_seed=0, source_index=int(i), view_number=int(v))[0]
                      for i, v in zip(sidx, view)])  # what label rendered for the teachers
    stored = tmp_path / "stored"  # label's own pixels, kept
    label([teacher], str(photos), stored, _opts(store_inputs=True))
    assert np.array_equal(_read(stored, "inputs"), drawn)
    mem = load_in_memory(labelled, fields=("inputs", "source_index"), source_override=str(photos))
    assert np.array_equal(mem["inputs"].numpy(), drawn)
    _, ds = open_transfer_set(labelled, fields=("inputs", "source_index"), source_override=str(photos),
                              batch_size=32, shuffle=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)  # forked DataLoader workers
    for b in loader:
        keep = b["mask"].numpy()
        assert np.array_equal(b["inputs"].numpy()[keep], drawn[b["index"].numpy()[keep]])
    with pytest.raises(TransferSetError, match="not inside the set's folder"):
        open_transfer_set(labelled, fields=("inputs",))  # never a path on the manifest's word alone


def test_verify_reteach_passes_and_names_an_edited_row(tmp_path, labelled, teacher, photos, capsys):
    ts = tmp_path / "ts"
    os.system(f"cp -r {labelled} {ts}")
    args = ["verify", str(ts), "--reteach", "200", "--teachers", str(teacher.parent), "--source", str(photos)]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0 and "105 sampled rows match the teachers" in capsys.readouterr().out
    m = json.loads((ts / "manifest.json").read_text())
    shard = m["shards"][1]
    with h5py.File(ts / shard["path"], "r+") as f:  # a consistent manifest over edited logits
        f["logits"][3, 0, 1] = f["logits"][3, 0, 1] + 0.5
    shard["sha256"], shard["bytes"] = sha256_file(ts / shard["path"]), (ts / shard["path"]).stat().st_size
    (ts / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and f"row {shard['row_start'] + 3} ({shard['path']}" in err[0]


def test_file_lists_with_relative_paths(tmp_path, teacher, photos):
    lists = tmp_path / "lists"
    lists.mkdir()
    good = sorted(p for p in photos.rglob("*") if p.is_file() and not p.name.startswith("zz-"))[:6]
    rows = [f"{os.path.relpath(p, lists)},{p.parent.name.split('-')[0]}" for p in good] + ["../nowhere.jpg"]
    (lists / "l.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "o"
    label([teacher], str(lists / "l.csv"), out, _opts(views=0, augment=None))
    m = load_manifest(out)
    assert m["stats"]["rows"] == 6 and m["source"]["layout"] == "list"
    assert [e[1] for e in m["shards"][0]["stats"]["skipped"]] == ["../nowhere.jpg"]


def test_kill_and_resume_writes_identical_bytes(tmp_path, teacher, photos):
    ref = tmp_path / "ref"
    cmd = [sys.executable, "-m", "transferset", "label", "--ensemble", str(teacher), "--data", str(photos),
           "--augment", f"rrc:{SIDE},flip", "--views", "2", "--norm", "imagenet", "--shard-size", "10",
           "--batch-size", "5", "--decode-workers", "2", "-q"]
    subprocess.run(cmd + ["--out", str(ref)], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "manifest.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = len(load_manifest(out)["shards"]) if (out / "manifest.json").exists() else 0
    assert listed < len(load_manifest(ref)["shards"])  # killed mid-run
    subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True)
    assert _digests(out) == _digests(ref)


def test_train_student_evaluates_on_a_photo_folder_in_its_clean_view(tmp_path, labelled, photos, capsys):
    """--eval-data FOLDER opens the folder with the set's own transform (clean view): the curve's last point is
    what `evaluate` gives the saved student, and the 5 corrupt files are left out of both and counted."""
    from transferset.evaluate import evaluate
    from transferset.training.loop import TrainOptions, train_student

    run = tmp_path / "run"
    res = train_student(labelled, run, TrainOptions(student="mlp:8", epochs=2, batch_size=16, device="cpu",
                                                     source=str(photos), eval_data=str(photos), seed=0))
    last = res.metrics[-1]
    assert last["eval_n"] == 35 and last["eval_skipped_files"] == 5
    assert "5 undecodable photos left out" in capsys.readouterr().err
    ev = evaluate([run / "student.pt"], str(photos), device="cpu")
    assert (ev["n"], ev["skipped_files"], ev["errors"]) == (35, 5, last["eval_errors"])
    assert ev["nll"] == pytest.approx(last["eval_nll"], rel=1e-5)
