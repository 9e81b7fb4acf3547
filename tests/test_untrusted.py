"""A transfer set from a stranger is untrusted input (issue 11): crafted sets through verify, info, train-student.

Every crafted set in tests/crafted.py must be refused in one line with exit 1 or 2, or accepted harmlessly (info
reads only the manifest, so it may describe a set whose shards verify and train-student refuse); no
file outside its folder may be opened, no command may run past 30 s, no NaN student may be saved, and the whole
run must stay under 1 GB of resident memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crafted import CASES

HERE = Path(__file__).resolve().parent
#: commands that must refuse each kind of case; info reads only the manifest, so it may describe a set whose
#: shards verify and train-student refuse, and verify does not open a source that only replay would read
REFUSED_BY = {"refuse": ("verify", "train-student"), "train": ("train-student",), "manifest":
              ("verify", "info", "train-student"), "verify": ("verify",), "any": ()}


@pytest.fixture(scope="module")
def crafted_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("crafted") / "results.json"
    subprocess.run([sys.executable, str(HERE / "run_crafted.py"), str(out)], check=True, timeout=900)
    return json.loads(out.read_text())


def test_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_crafted_set(crafted_results, name):
    rows = [r for r in crafted_results["results"] if r["case"] == name]
    assert len(rows) == 4
    for r in rows:
        where = f"{name}: {r['argv']}"
        assert r["crash"] is None, f"{where} raised {r['crash']}"
        assert not r["timed_out"], f"{where} ran past 30 s"
        assert r["opened_outside"] == [], f"{where} opened {r['opened_outside']}"
        if r["code"] != 0:
            assert r["code"] in (1, 2), f"{where} exit {r['code']}"
            assert r["stderr_lines"] == 1, f"{where} printed {r['stderr']}"
        elif r["argv"] in REFUSED_BY[r["expect"]]:
            pytest.fail(f"{where} accepted a set it must refuse: {r['stderr']}")
    train = rows[-1]
    assert train["code"] == 0 or not train["student_saved"], f"{name}: a refused run left a student behind"


def test_peak_memory(crafted_results):
    assert crafted_results["peak_rss_mb"] < 1024


def test_fuzzed_sets_smoke():
    """scripts/fuzz_sets.py in a small run: random byte flips and manifest edits give no traceback, hang or read
    outside the set (the 500-case runs are in docs/BENCHMARKS.md)."""
    r = subprocess.run([sys.executable, str(HERE.parent / "scripts" / "fuzz_sets.py"), "--cases", "25", "--seed", "3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 tracebacks, 0 hangs, 0 reads outside" in r.stdout


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_value_fault_finds_every_non_finite_value(dtype):
    """The reader's fast path (bit patterns, no float arithmetic) misses no NaN or infinity anywhere in a block,
    strided or not, and passes the extremes of the type, signed zeros and subnormals."""
    from transferset.format.verify import value_fault

    info = np.finfo(dtype)
    good = np.zeros((6, 8), dtype)
    good[0, 0], good[1, 1], good[2, 2], good[3, 3] = info.max, -info.max, -0.0, info.tiny / 4
    assert value_fault("logits", good, 10) is None
    assert value_fault("logits", good[:, ::3], 10) is None
    for bad in (np.nan, np.inf, -np.inf):
        for r, c in ((0, 0), (5, 7), (3, 4)):
            x = good.copy()
            x[r, c] = bad
            assert value_fault("logits", x, 10, first_row=100) == f"row {100 + r}: non-finite logits"
        x = np.zeros((4, 6), dtype)
        x[2, 3] = bad
        assert value_fault("logits", x[:, ::3], 10) == "row 2: non-finite logits"
    lp = np.log(np.full((3, 4), 0.25, dtype))
    lp[1, 2] = -np.inf  # an underflowed probability is allowed in soft targets
    assert value_fault("soft_targets", lp, 4) is None
    lp[2, :] = -np.inf
    assert value_fault("soft_targets", lp, 4) == "row 2: non-finite soft_targets"


def test_a_shard_changed_after_its_check_is_checked_again(tmp_path):
    """open_shard remembers shards it found sound (a reader reopens them every epoch) by inode, size, mtime and
    ctime: a file rewritten in place or swapped for another is checked again and refused if it is bad."""
    import os
    import shutil

    import h5py

    from conftest import make_transfer_set
    from transferset.errors import TransferSetError
    from transferset.format import read_manifest
    from transferset.format.safety import open_shard

    root = make_transfer_set(tmp_path / "set", shard_rows=(7,))
    m = read_manifest(root)
    path = root / m.shards[0].path
    open_shard(path, 7, m).close()
    open_shard(path, 7, m).close()  # remembered
    st = os.stat(path)
    with h5py.File(path, "a") as f:  # in place: an extra dataset, then the times put back
        f.create_dataset("payload", data=np.zeros(3))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(TransferSetError, match="payload"):
        open_shard(path, 7, m)
    bad = tmp_path / "bad.h5"
    shutil.copy(path, bad)
    fresh = make_transfer_set(tmp_path / "fresh", shard_rows=(7,))
    good = fresh / m.shards[0].path
    open_shard(good, 7, m).close()
    os.replace(bad, good)  # swapped for a bad file
    with pytest.raises(TransferSetError, match="payload"):
        open_shard(good, 7, m)


def test_token_ids_are_held_to_the_vocabulary_and_only_in_token_sets(tmp_path):
    from conftest import make_frame_set, make_token_set, make_transfer_set
    from transferset.format import read_manifest
    from transferset.format.verify import token_ids, value_fault

    ids = np.array([[1, 2], [3, -1], [60, 4]], np.int64)
    assert value_fault("inputs", ids, 50, 10) is None  # pixels, features: any value
    assert value_fault("inputs", ids, 50, 10, ids=True) == "row 11: token id -1 outside [0, 50)"
    assert value_fault("inputs", ids[[0, 2]], 50, 0, ids=True) == "row 1: token id 60 outside [0, 50)"
    assert value_fault("inputs", ids[:1], 50, ids=True) is None
    kinds = {"tokens": make_token_set, "frames": make_frame_set, "rows": make_transfer_set}
    got = {k: token_ids(read_manifest(make(tmp_path / k))) for k, make in kinds.items()}
    assert got == {"tokens": True, "frames": False, "rows": False}
