"""scripts/keyed_digits.py (the 100-class keyed task) and scripts/specialists.py's --task option."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import keyed_digits  # noqa: E402
import specialists  # noqa: E402


def _traceable_digits(n: int = 200):
    """Images whose every pixel is their own index (so a row's pixels say which image went where), labels i % 10
    except a few, so that label and index differ in more than the last digit."""
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None], 28, axis=1).repeat(28, axis=2)
    labels = (np.arange(n) * 7 % 10).astype(np.uint8)
    return images, labels


def test_compose_puts_the_key_left_and_reads_the_slot_it_points_to():
    images, labels = _traceable_digits()
    x, y = keyed_digits.compose(images, labels, 50, seed=3)
    assert x.shape == (50, 28, 98) and x.dtype == np.uint8 and y.dtype == np.int64
    for r in range(50):
        key = int(x[r, 0, 0])
        assert (x[r, :, :28] == key).all()
        slots = []
        for s in range(10):
            top, left = keyed_digits.slot_box(s)
            block = x[r, top:top + 14, left:left + 14]
            assert (block == block[0, 0]).all()  # one small image per slot
            slots.append(int(block[0, 0]))
        a = int(labels[key])
        assert y[r] == 10 * a + int(labels[slots[a]])
    again, y2 = keyed_digits.compose(images, labels, 50, seed=3)
    assert (again == x).all() and (y2 == y).all()


def test_small_halves_by_two_by_two_means():
    img = np.zeros((1, 28, 28), np.uint8)
    img[0, 0, 0], img[0, 1, 1] = 200, 100
    got = keyed_digits.small(img)
    assert got.shape == (1, 14, 14) and got[0, 0, 0] == 75 and got[0].sum() == 75


def test_keyed_cnn_class_10a_plus_b_reads_slot_a_only():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = keyed_digits.KeyedCnn().eval()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 28, 98), dtype=np.uint8)
    with torch.no_grad():
        base = model(torch.from_numpy(x)).reshape(2, 10, 10)
        for s in (0, 3, 7):
            y = x.copy()
            top, left = keyed_digits.slot_box(s)
            y[:, top:top + 14, left:left + 14] = 255 - y[:, top:top + 14, left:left + 14]
            moved = (model(torch.from_numpy(y)).reshape(2, 10, 10) - base).abs().amax(dim=(0, 2))
            assert moved[s] > 1e-4 and float(moved[torch.arange(10) != s].max()) == 0.0  # only key s's classes
        y = x.copy()
        y[:, :, :28] = 0
        shift = model(torch.from_numpy(y)).reshape(2, 10, 10) - base
        # the key adds h[a] to all ten classes of key a alike
        torch.testing.assert_close(shift, shift[:, :, :1].expand(2, 10, 10))


def test_describe_plan_says_whether_the_clusters_are_keys():
    plan = {"clusters": [{"classes": [30, 31, 35]}, {"classes": [4, 14]}], "uncovered_classes": [99]}
    assert keyed_digits.describe_plan(plan) == ("The clusters' keys: {3}; {0,1} (1 of 2 clusters hold the classes of "
                                                "one key only; 1 classes in no specialist's cluster).")


def test_specialists_task_option_and_auto_control():
    a = specialists.parse_args(["--task", "keyed", "--train-rows", "500"])
    assert (a.task, a.train_rows, a.test_rows, a.control_epochs) == ("keyed", 500, 10000, "0")
    assert specialists.parse_args([]).task == "three-digits"
    with pytest.raises(SystemExit):
        specialists.parse_args(["--control-epochs", "many"])
    gen = {"steps": 100}
    specs = [{"steps": 30}, {"steps": 31}]
    assert specialists.control_epochs("auto", gen, specs, 10) == 17  # 161 steps at 10 an epoch
    assert specialists.control_epochs("auto", gen, [{"steps": 100}], 10) == 20  # exactly 200
    assert specialists.control_epochs("7", gen, specs, 10) == 7


def _result(n: int = 2000) -> dict:
    combo = {"top": 1, "dustbin_shift": True, "generalist_accuracy": 0.9, "combined_accuracy": 0.92,
             "generalist_errors": 200, "combined_errors": 160, "relative_error_reduction": 0.2,
             "specialists": ["s0", "s1"], "by_active": [{"active": 1, "cases": n, "generalist_correct": 1800,
                                                          "combined_correct": 1840, "relative_accuracy_change": 0.0222}]}
    return {"teachers": [{"test_accuracy": 0.97, "seconds": 90.0}, {"test_accuracy": 0.96, "seconds": 30.0}],
            "ensemble_accuracy": 0.975, "n_test": n, "wall_s": 600.0, "load": [1.0, 2.0],
            "plan": {"clusters": [{"classes": [0, 1], "rows": 300}, {"classes": [10, 11, 12], "rows": 400}],
                     "temperature": 8.0, "mass": 0.1, "select_temperature": 1.0},
            "clusters_note": "The clusters' keys: {0}; {1}.", "generalist": {"steps": 100},
            "specialists": [{"accuracy": 0.95, "steps": 20}, {"accuracy": 0.96, "steps": 21}],
            "control": {"steps": 150, "errors": 180}, "combinations": {"top1": combo},
            "dustbins_silenced": {"combined_errors": 150, "relative_error_reduction": 0.25}, "in_cluster": []}


def test_section_of_the_keyed_task_names_its_task_and_counts_its_test_rows(tmp_path):
    a = specialists.parse_args(["--task", "keyed", "--test-rows", "2000", "--section", "keyed", "--control-epochs", "15"])
    text = specialists.section(_result(), a, "python scripts/specialists.py --task keyed")
    assert text.startswith("## Specialists on 100 fine-grained classes: a key digit and the small digit it points "
                           "to: keyed\n")
    assert "| model | test accuracy | errors / 2,000 |" in text
    assert "| teacher ensemble | 97.50% | 50 |" in text
    assert "| control: the generalist alone trained 150 steps (15 epochs; the generalist and its specialists " \
           "together took 141) | 91.00% | 180 |" in text
    assert "2.0 min of training in all" in text and "The clusters' keys: {0}; {1}." in text
    assert "goal, a relative error reduction of at least 5% with the paper's rule (top 1, dustbin shift): met, 20.0%" \
        in text
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\n<!-- begin specialists:other -->\nkept\n<!-- end specialists:other -->\n")
    specialists.write_section(out, text, "keyed")
    got = out.read_text()
    assert "kept" in got and got.count("<!-- begin specialists:keyed -->") == 1
    three = specialists.section(_result(10000), specialists.parse_args(["--section", "x"]), "cmd")
    assert three.startswith("## Specialists on 1,000 classes (the paper's section 5): x\n")
    assert "min of training in all" not in three and "errors / 10,000" in three
    json.dumps(_result())
