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
