"""The dataset card: every field a reader looks for, deterministic, escaped, written atomically."""

from __future__ import annotations

import json

import pytest
from pathlib import Path

from conftest import make_transfer_set
from transferset.format import read_manifest
from transferset.format.card import CARD_NAME, render_card, write_card


def _manifest(tmp_path, **edit):
    root = make_transfer_set(tmp_path / "set")
    obj = json.loads((root / "manifest.json").read_text())
    obj["teachers"][1].update({"file": "big.onnx", "sha256": "ab" * 32, "input_name": "x", "input_shape": [None, 6],
                               "input_dtype": "float32", "output_name": "y", "output_shape": [None, 5]})
    obj["source"].update({"format": "npy", "labels": "labels.npy", "labels_sha256": "cd" * 32})
    obj["augment"].update({"spec": "jitter:2", "views": 3, "views_per_row": 4})
    obj["stats"].update({"labelled_rows": 14, "member_accuracy": [0.5, 0.25, 0.75], "ensemble_accuracy": 0.625,
                         "mean_entropy": {"1": 0.8125, "4": 1.5}})
    obj.update(edit)
    (root / "manifest.json").write_text(json.dumps(obj))
    return root, read_manifest(root)


def test_card_names_teachers_source_options_counts_and_statistics(tmp_path):
    _, m = _manifest(tmp_path)
    card = render_card(m)
    for text in ("big.onnx", "ab" * 32, "t0.onnx", "synthetic.npy", "labels.npy", "cd" * 32, "jitter:2",
                 "| views per row | 4 |", "T = 1, 4", "mean-probs", "rows: 21 in 4 shards (complete)",
                 "classes: 5", "labelled rows: 14", "0.5000, 0.2500, 0.7500", "argmax at T=1): 0.6250",
                 "T=1: 0.8125, T=4: 1.5000", "[6] float32, stored"):
        assert text in card, text
    assert "Not stated" in card and "## Citation" not in card
    assert render_card(m) == card  # deterministic: no dates, rewriting on resume changes nothing


def test_card_license_and_citation(tmp_path):
    _, m = _manifest(tmp_path)
    card = render_card(m, license="CC-BY-4.0", citation="@misc{ts,\n  title={Soft labels}}")
    assert card.startswith('---\nlicense: "CC-BY-4.0"\n')
    assert "## License\n\nCC-BY-4.0" in card
    assert "```\n@misc{ts,\n  title={Soft labels}}\n```" in card


def test_card_escapes_hostile_strings(tmp_path):
    _, m = _manifest(tmp_path, class_names=["a|b", "\x1b[31mred", "c\nd", "e", "f"])
    card = render_card(m, license="MIT\n---\nevil: 1")
    assert "\x1b" not in card and "a\\|b" in card and "c\\nd" in card
    assert "\nevil: 1" not in card  # the YAML header cannot be extended by a licence string


def test_card_tells_an_incomplete_set(tmp_path):
    _, m = _manifest(tmp_path, complete=False, expected_rows=100)
    assert "incomplete: 21 of 100 rows written so far" in render_card(m)


def test_write_card_writes_readme_atomically(tmp_path):
    root, m = _manifest(tmp_path)
    path = write_card(root, m, license="MIT")
    assert path == root / CARD_NAME
    assert path.read_text(encoding="utf-8") == render_card(m, license="MIT")
    assert not [p for p in root.iterdir() if p.name.startswith(".README")]  # no temporary left behind


def test_label_writes_the_card_and_keeps_it_true_on_resume(tmp_path):
    """label writes README.md beside the manifest with --license/--citation, and a resume rewrites it."""
    import shutil

    from transferset.cli import main
    from transferset.format import read_manifest

    golden = Path(__file__).resolve().parent / "fixtures" / "golden"
    out = tmp_path / "set"
    args = ["label", "--ensemble", str(golden / "t0.onnx"), str(golden / "t1.onnx"), "--data",
            str(golden / "images.npy"), "--out", str(out), "--shard-size", "40", "--license", "CC-BY-4.0",
            "--citation", "Someone (2026)", "-q"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    card = (out / "README.md").read_text()
    m = read_manifest(out)
    assert "CC-BY-4.0" in card and "Someone (2026)" in card and m.teachers[0]["sha256"] in card
    assert f"{m.rows:,}" in card
    (out / "README.md").write_text("stale")
    with pytest.raises(SystemExit) as e:
        main(args)  # already complete: the card is made true again
    assert e.value.code == 0 and (out / "README.md").read_text() == card
    shutil.rmtree(out)
