"""Labelling in parts (issue 14): torchrun, --part I/N, kills, merge, unmerged sets refused, DDP on the result.

Every way of writing the set in parts must give the bytes of one process: each shard file, README.md and
manifest.json (tool version aside, which is the same here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from teachers import export_teacher
from transferset.cli import main
from transferset.errors import TransferSetError
from transferset.labelling.parts import resolve_part, threads_per_process

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 300-row uint8 source, labels, a logits teacher and a softmax one (its kind detected on the first batch)."""
    work = tmp_path_factory.mktemp("parts")
    for i, head in enumerate(("logits", "softmax")):
        export_teacher(work / f"t{i}.onnx", (8, 8), seed=i + 1, head=head)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, size=(300, 8, 8), dtype=np.uint8), rng.integers(0, 5, size=300)
    np.save(work / "x.npy", x)
    np.save(work / "y.npy", y)
    ref = work / "one"
    assert _cli(label_args(work, ref)) == 0
    return work, ref


def label_args(work: Path, out: Path, *more: str) -> list[str]:
    return ["label", "--ensemble", str(work / "t0.onnx"), str(work / "t1.onnx"), "--data", str(work / "x.npy"),
            "--labels", str(work / "y.npy"), "--out", str(out), "--augment", "jitter:1,noise:4", "--views", "1",
            "--seed", "3", "--shard-size", "24", "--batch-size", "8", "--threads", "1", "--device", "cpu", "-q",
            *more]


def _cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return e.code
    return 0


def _run(args: list[str], launcher: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(launcher or []), "-m", "transferset", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240, **kw)


def assert_same_set(ref: Path, got: Path) -> None:
    """Every file of the single run, byte for byte; no other visible file (hidden lock files aside)."""
    want = sorted(p.name for p in ref.iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in got.iterdir() if not p.name.startswith(".")) == want
    for name in want:
        assert (got / name).read_bytes() == (ref / name).read_bytes(), name


def test_torchrun_two_processes_write_the_bytes_of_one(inputs, tmp_path):
    work, ref = inputs
    p = _run(label_args(work, tmp_path / "ts"), ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])
    assert p.returncode == 0, p.stderr[-2000:]
    # one part merged; a part that finished while the other merged says the set is complete, without merging
    assert p.stdout.count("(merged by this part)") == 1, p.stdout
    assert_same_set(ref, tmp_path / "ts")


def test_parts_one_after_the_other_and_merge(inputs, tmp_path, capsys):
    work, ref = inputs
    out = tmp_path / "ts"
    assert _cli(label_args(work, out, "--part", "2/2")) == 0
    assert "waiting for the others: part 1 of 2 missing (12 of 25 shards written)" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("manifest*")) == ["manifest.part-2-of-2.json"]
    assert _cli(label_args(work, out, "--part", "1/2")) == 0
    assert "the set is complete: 600 rows in 25 shards" in capsys.readouterr().out
    assert_same_set(ref, out)  # part manifests removed: manifest.json holds all they held
    assert _cli(label_args(work, out, "--part", "2/2")) == 0  # run again after the merge: nothing to do
    assert "already done; the set is complete" in capsys.readouterr().out
    assert _cli(["merge", str(out)]) == 0 and "complete: 600 rows in 25 shards" in capsys.readouterr().out
    assert_same_set(ref, out)


def test_the_sets_first_batch_runs_once_in_the_part_that_labels_it(inputs, tmp_path, monkeypatch):
    """The teachers' output kinds are detected on the set's first batch, as one run detects them: the part that
    labels that batch detects them there (one run of it); another part runs that batch beside its own to detect
    them. The bytes are those of one process either way (the fixture's softmax teacher is detected)."""
    from transferset.labelling.ensemble import Ensemble

    work, ref = inputs
    firsts: list[int] = []
    real = Ensemble.run_with_hints

    def counted(self, feeds, first_row=0):
        if first_row == 0:
            firsts.append(first_row)
        return real(self, feeds, first_row)

    monkeypatch.setattr(Ensemble, "run_with_hints", counted)
    out = tmp_path / "ts"
    assert _cli(label_args(work, out, "--part", "1/2")) == 0
    assert len(firsts) == 1
    assert _cli(label_args(work, out, "--part", "2/2")) == 0
    assert len(firsts) == 2
    assert_same_set(ref, out)


def test_a_merged_sets_card_is_rewritten_only_when_it_is_not_the_manifests(inputs, tmp_path):
    """Every worker or part that finds the set merged finishes a merge killed half-way (the card among it); a card
    that is already right is left alone (no rewrite, no fsync), an edited one is made right again."""
    from transferset.format.parts import merge_if_complete

    work, ref = inputs
    out = tmp_path / "ts"
    shutil.copytree(ref, out)
    card = out / "README.md"
    inode = card.stat().st_ino
    assert merge_if_complete(out) is not None and card.stat().st_ino == inode
    card.write_text(card.read_text() + "edited\n")
    assert merge_if_complete(out) is not None
    assert_same_set(ref, out)


def test_part_killed_mid_run_resumes_to_the_same_bytes(inputs, tmp_path):
    work, ref = inputs
    out = tmp_path / "ts"
    cmd = [sys.executable, "-m", "transferset", *label_args(work, out, "--part", "1/2")]
    child = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listed, deadline = 0, time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        try:
            listed = len(json.loads((out / "manifest.part-1-of-2.json").read_text())["shards"])
        except (OSError, ValueError):
            listed = 0
        if listed >= 2:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    child.wait()
    assert child.returncode == -signal.SIGKILL and 2 <= listed < 13, (child.returncode, listed)
    assert _cli(label_args(work, out, "--part", "2/2")) == 0  # the other part, meanwhile: not the last to finish
    assert not (out / "manifest.json").exists()
    assert _cli(label_args(work, out, "--part", "1/2")) == 0  # resumes its own shards, then merges
    assert_same_set(ref, out)


def test_merge_refuses_parts_from_another_definition(inputs, tmp_path, capsys):
    work, _ = inputs
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli(label_args(work, a, "--part", "1/2")) == 0
    assert _cli(label_args(work, b, "--part", "2/2", "--temperatures", "1,3")) == 0
    assert _cli(label_args(work, a, "--part", "2/2", "--temperatures", "1,3")) == 2  # refused before any work
    assert "its parts were made with another ensemble, source or options" in capsys.readouterr().err
    for p in b.iterdir():
        if not p.name.startswith("."):
            shutil.copy(p, a / p.name)
    assert _cli(["merge", str(a)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.part-2-of-2.json was made with another ensemble" in err, err
    assert not (a / "manifest.json").exists()


def test_missing_part_named_by_info_and_verify_and_refused_by_readers(inputs, tmp_path, capsys):
    work, _ = inputs
    out = tmp_path / "ts"
    assert _cli(label_args(work, out, "--part", "1/3")) == 0
    capsys.readouterr()
    assert _cli(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] is False and info["parts_missing"] == [2, 3] and info["shards"] == 9
    assert _cli(["verify", str(out)]) == 0
    assert "not complete: parts 2, 3 of 3 missing (9 of 25 shards written)" in capsys.readouterr().out
    assert _cli(["train-student", "--transfer-set", str(out), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "parts 2, 3 of 3 missing" in err, err
    from transferset import open_transfer_set

    with pytest.raises(TransferSetError, match="parts 2, 3 of 3 missing"):
        open_transfer_set(out)
    assert _cli(["merge", str(out)]) == 2 and "cannot merge yet: parts 2, 3 of 3 missing" in capsys.readouterr().err


def test_merged_set_trains_under_ddp(inputs, tmp_path):
    work, _ = inputs
    ts = tmp_path / "ts"
    for part in ("1/2", "2/2"):
        assert _cli(label_args(work, ts, "--part", part)) == 0
    p = _run(["train-student", "--transfer-set", str(ts), "--out", str(tmp_path / "run"), "--student", "mlp:16",
              "--epochs", "1", "--batch-size", "32", "--max-steps", "3", "--device", "cpu", "-q"],
             ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2
    assert (tmp_path / "run" / "student.pt").exists()


def test_part_from_the_environment_and_the_explicit_part_wins():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}
    slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
             "SLURM_ARRAY_TASK_STEP": "1"}
    assert resolve_part(None, torchrun) == (4, 8)
    assert resolve_part(None, slurm) == (3, 4)
    assert resolve_part(None, {**slurm, "RANK": "1", "WORLD_SIZE": "2"}) == (6, 8)  # torchrun inside array tasks
    assert resolve_part((2, 5), torchrun) == (2, 5)
    assert resolve_part(None, {}) is None and resolve_part((1, 1), torchrun) is None
    with pytest.raises(TransferSetError, match="1 <= I <= N"):
        resolve_part((3, 2), {})
    with pytest.raises(TransferSetError, match="array with gaps"):
        resolve_part(None, {**slurm, "SLURM_ARRAY_TASK_ID": "17"})
    assert threads_per_process(None, torchrun) == max(1, (os.cpu_count() or 1) // 4)
    assert threads_per_process(2, torchrun) == 2 and threads_per_process(None, {}) is None


@pytest.mark.parametrize("between", ["part_manifest_names", "read_manifest_file"])
def test_a_part_that_starts_while_another_merges_finds_the_set_merged(inputs, tmp_path, monkeypatch, between):
    """Both parts done, not merged; a part started again looks (no manifest.json), then another part's merge lands
    (manifest.json written, the parts' manifests removed) before it lists or reads them. It takes the set as
    merged: no failure, no shard removed. (Ray starts every shard's task at once, so a rerun races its merge.)"""
    import transferset.labelling.folder as folder
    import transferset.labelling.pipeline as pipeline
    from transferset.format.parts import merge_if_complete

    work, ref = inputs
    out = tmp_path / "ts"
    with monkeypatch.context() as m:
        m.setattr(pipeline, "merge_or_wait", lambda *a, **k: (None, None))  # both parts finish; neither merges
        assert _cli(label_args(work, out, "--part", "1/2")) == 0
        assert _cli(label_args(work, out, "--part", "2/2")) == 0
    assert not (out / "manifest.json").exists() and len(list(out.glob("manifest.part-*"))) == 2
    real, merged = getattr(folder, between), []

    def merge_first(root, *args):
        if not merged:
            merged.append(merge_if_complete(root))  # the other part's merge, between this part's two looks
        return real(root, *args)

    monkeypatch.setattr(folder, between, merge_first)
    assert _cli(label_args(work, out, "--part", "1/2")) == 0
    assert merged and merged[0] is not None
    assert_same_set(ref, out)


def test_a_part_reading_the_others_while_the_last_one_merges_reports_the_merged_set(inputs, tmp_path, monkeypatch,
                                                                                    capsys):
    """A part that finds the set not complete reads the parts' manifests to say what it waits for; the last part,
    finishing meanwhile, merges and removes them as they are read. That part succeeded: it says the set is complete
    and exits 0 (it failed with 'missing' on a manifest the merge had just removed)."""
    from transferset.format import parts as parts_mod

    work, ref = inputs
    out = tmp_path / "ts"
    assert _cli(label_args(work, out, "--part", "1/2")) == 0
    real_merge, real_read = parts_mod._merge_locked, parts_mod.read_manifest_file
    staged: list[str] = []

    def merge(root, required, wrote):  # the other part is not done yet when this one looks
        if not staged:
            staged.append("not done")
            return None
        return real_merge(root, required, wrote)

    def read(root, name):  # ... and finishes, merging, while this one reads the parts' manifests
        if staged == ["not done"]:
            staged.append("merged by the other")
            assert real_merge(Path(root), False, None) is not None
        return real_read(root, name)

    monkeypatch.setattr(parts_mod, "_merge_locked", merge)
    monkeypatch.setattr(parts_mod, "read_manifest_file", read)
    capsys.readouterr()
    assert _cli(label_args(work, out, "--part", "2/2")) == 0
    assert staged == ["not done", "merged by the other"]
    printed = capsys.readouterr().out
    assert "part 2 of 2 wrote" in printed and "the set is complete" in printed, printed
    assert_same_set(ref, out)


@pytest.mark.parametrize("reader", ["read_manifest", "unmerged_parts"])
@pytest.mark.parametrize("between", ["part_manifest_names", "read_manifest_file"])
def test_a_reader_opening_a_set_as_it_is_merged_reads_the_merged_set(inputs, tmp_path, monkeypatch, between, reader):
    """A reader finds no manifest.json, then the last part's merge lands (manifest.json written, the parts'
    manifests removed) before it lists or reads them: it reads the merged set (it said 'does not exist' on a part
    manifest just removed, or 'no manifest'), and verify's look for unmerged parts finds none."""
    from transferset.format import parts as parts_mod
    from transferset.format.parts import merge_if_complete, read_manifest, unmerged_parts

    work, ref = inputs
    out = tmp_path / "ts"
    assert _cli(label_args(work, out, "--part", "1/2")) == 0
    with monkeypatch.context() as m:
        m.setattr(parts_mod, "_merge_locked", lambda *a, **k: None)  # part 2 finishes; it does not merge
        assert _cli(label_args(work, out, "--part", "2/2")) == 0
    assert not (out / "manifest.json").exists()
    real, merged = getattr(parts_mod, between), []

    def merge_first(root, *args):
        if not merged:
            merged.append("merging")  # the merge reads the parts' manifests through this too
            merged.append(merge_if_complete(root))  # the last part's merge, between the reader's two looks
        return real(root, *args)

    monkeypatch.setattr(parts_mod, between, merge_first)
    if reader == "unmerged_parts":
        assert unmerged_parts(out) is None
    m = read_manifest(out)
    assert len(merged) == 2 and merged[1] is not None and m.complete and len(m.shards) == 25
    assert_same_set(ref, out)
