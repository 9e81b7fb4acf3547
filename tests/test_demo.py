"""`transferset demo --quick` runs end to end on the shipped MNIST and writes results.json."""

import json

import pytest

from transferset.cli import main


def test_demo_quick(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--device", "cpu", "-q"])
    assert e.value.code == 0
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {"baseline_errors", "teacher_errors", "ensemble_errors", "student_errors", "n_test"} <= set(res)
    assert len(res["teacher_errors"]) == 3 and res["n_test"] == 2000
    assert res["ensemble_errors"] < 0.2 * res["n_test"]  # the teachers learned something real
    assert "test errors" in capsys.readouterr().out


def test_shipped_teachers_are_checked(tmp_path):
    """The demo's shipped teachers are the files teachers.json records (sha256), and an altered one is refused."""
    import hashlib
    import shutil

    from transferset.demo import TEACHERS, shipped_teachers
    from transferset.errors import TransferSetError

    got = shipped_teachers("cnn")
    assert len(got) == 3
    for t in got:
        assert hashlib.sha256(t["path"].read_bytes()).hexdigest() == t["sha256"]
        assert t["test_errors"] <= 60 and t["log"] and "train_teachers.py" in t["command"]
    copy = tmp_path / "teachers"
    shutil.copytree(TEACHERS, copy)
    data = bytearray((copy / got[1]["file"]).read_bytes())
    data[-1] ^= 1
    (copy / got[1]["file"]).write_bytes(bytes(data))
    with pytest.raises(TransferSetError, match="not the file teachers.json records"):
        shipped_teachers("cnn", root=copy)
    assert sum(p.stat().st_size for p in TEACHERS.iterdir()) <= 20 << 20  # the budget for data/teachers
