"""The paper-reproduction scripts: their RESULTS.md sections and, in a slow smoke run, mnist_claims.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_write_section_replaces_its_own_block_and_appends_a_new_one(tmp_path):
    from reproduce_mnist import write_section

    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n\n<!-- begin run:a -->\nold a\n<!-- end run:a -->\n\ntail\n")
    write_section(path, "a", "new a")
    write_section(path, "b", "first b")
    write_section(path, "b", "second b")
    assert path.read_text() == ("# Results\n\nintro\n\n<!-- begin run:a -->\nnew a\n<!-- end run:a -->\n\ntail\n\n"
                                "<!-- begin run:b -->\nsecond b\n<!-- end run:b -->\n")


def test_born_again_sections_keep_each_other(tmp_path):
    import born_again

    path = tmp_path / "RESULTS.md"
    born_again.write_section(path, "first run")
    born_again.write_section(path, "converged run", "converged")
    born_again.write_section(path, "first run, again")
    text = path.read_text()
    assert "<!-- begin born-again -->\nfirst run, again\n<!-- end born-again -->" in text
    assert "<!-- begin born-again:converged -->\nconverged run\n<!-- end born-again:converged -->" in text
    assert "first run\n" not in text


@pytest.mark.slow
def test_mnist_claims_quick_writes_three_sections_and_shifted_files_agree(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "scripts/mnist_claims.py", "--quick", "--out", str(tmp_path / "w"),
                        "--results", str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    text = results.read_text()
    for name in ("sweep", "sevens", "losses"):
        assert f"<!-- begin run:claims-{name}-quick -->\n## " in text
        assert "Command: `python scripts/mnist_claims.py --quick" in text
    sevens = json.loads((tmp_path / "w" / "claims-sevens.json").read_text())
    # the shift written into the checkpoint and into the ONNX export scores as the logit arithmetic does
    assert sevens["adjusted_files"]["student.pt"]["errors"] == sevens["after_hold"]["errors"]
    assert sevens["adjusted_files"]["student.onnx"]["errors"] == sevens["after_hold"]["errors"]
    assert sevens["before"]["errors"] == sevens["as_trained"]["errors"]
    assert sevens["unseen_cases"] + sevens["seen_cases"] == 10000
