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
    out = capsys.readouterr().out
    assert "test errors" in out and "rows/s b1" in out
    # each model's cost beside its score, and the students' eval curves (the demo holds the test set)
    assert all(r["onnx_bytes"] > 0 and r["rows_per_s_1"] > 0 and r["rows_per_s_256"] > 0 for r in res["rows"])
    for run in ("student", "baseline", "control"):
        lines = [json.loads(x) for x in (tmp_path / "demo" / run / "metrics.jsonl").read_text().splitlines()]
        assert lines and all(x["eval_n"] == 2000 for x in lines)
    assert lines[-1]["eval_errors"] == res["control_errors"]  # the curve ends where the table does


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
    lm = {e["file"] for e in json.loads((TEACHERS / "teachers.json").read_text())["teachers"].values()
          if e.get("kind") == "lm"}
    # the classifier teachers' budget (issue 7), and the language-model teacher's own (issue 21)
    assert sum(p.stat().st_size for p in TEACHERS.iterdir() if p.name not in lm) <= 20 << 20
    assert all((TEACHERS / f).stat().st_size <= 15 << 20 for f in lm)
