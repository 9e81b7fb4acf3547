"""transferset report: PNGs and an index.html naming only files that exist, for a set, a run and a demo folder."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from conftest import make_transfer_set
from transferset.cli import main
from transferset.report import report

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def _check_page(out, expect: set[str]) -> str:
    """The page names exactly ``expect``, each a real PNG with a caption under it; it opens with a headline, names
    the tool's version and never the machine's absolute paths."""
    page = (out / "index.html").read_text(encoding="utf-8")
    refs = set(re.findall(r"src='([^']+)'", page))
    assert refs == expect
    for name in refs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000  # a real, non-empty image
    figures = re.findall(r"<figure><img [^>]*><figcaption>([^<]*)</figcaption></figure>", page)
    assert len(figures) == len(refs) and all(len(c) > 80 and ("Good" in c or "good" in c) for c in figures), figures
    assert re.search(r"<h1>[^<]+</h1>\n<p class='lead'>[^<]{40,}</p>", page)
    assert "transferset 0." in page
    for root in ("/tmp/", "/home/", "/root/", "/work/", str(out.parent)):  # the tests' folders are under /tmp
        assert root not in page, root
    return page


def test_report_on_a_transfer_set(tmp_path):
    root = make_transfer_set(tmp_path / "set", shard_rows=(300, 0, 700), members=3, classes=6, temperatures=(1, 4))
    res = report(root, tmp_path / "rep", sample_rows=600)
    assert res["kind"] == "transfer set"
    page = _check_page(tmp_path / "rep", {"entropy_vs_temperature.png", "member_agreement.png", "class_counts.png",
                                          "confidence_histogram.png"})
    assert "<td>1,000</td>" in page and "t2.onnx" in page and "1,000 rows of soft targets from 3 teachers" in page
    report(root, tmp_path / "small", sample_rows=100)  # never more rows than asked, even below one block
    assert "<td>1,000</td><td>100</td>" in (tmp_path / "small" / "index.html").read_text().replace("\n", "")


def test_report_escapes_strings_from_the_set(tmp_path):
    root = make_transfer_set(tmp_path / "set")
    m = json.loads((root / "manifest.json").read_text())
    m["teachers"][0]["file"] = "<script>alert(1)</script>.onnx"
    (root / "manifest.json").write_text(json.dumps(m))
    report(root, tmp_path / "rep")
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page


def _run(tmp_path, eval_data: bool):
    from transferset.training.loop import TrainOptions, train_student

    root = make_transfer_set(tmp_path / "set", shard_rows=(200,), classes=4, input_shape=(6,))
    rng = np.random.default_rng(1)
    np.save(tmp_path / "ex.npy", rng.normal(size=(300, 6)).astype(np.float32))
    np.save(tmp_path / "ey.npy", rng.integers(0, 4, 300))
    extra = dict(eval_data=str(tmp_path / "ex.npy"), eval_labels=str(tmp_path / "ey.npy")) if eval_data else {}
    train_student(root, tmp_path / "run", TrainOptions(student="mlp:16", epochs=3, batch_size=32, quiet=True,
                                                       device="cpu", threads=1, **extra))
    return tmp_path / "run"


def _keep_figures(monkeypatch) -> dict:
    from transferset.report import Report

    figs, write = {}, Report.png

    def keep(self, name, fig, caption):
        figs[name] = fig
        write(self, name, fig, caption)

    monkeypatch.setattr(Report, "png", keep)
    return figs


def test_report_on_a_run_with_eval_data(tmp_path, monkeypatch):
    figs = _keep_figures(monkeypatch)
    res = report(_run(tmp_path, True), tmp_path / "rep")
    assert res["kind"] == "run"
    page = _check_page(tmp_path / "rep", {"training_curves.png", "reliability.png"})
    assert "Reliability bins (ECE" in page and "eval errors" in page and "3 epochs" in page
    # every bin's row count is written on the diagram, and they add up to the rows evaluated
    counts = [int(c) for c in re.findall(r"<tr><td>0\.\d\d-[01]\.\d\d</td><td>([\d,]+)</td>", page)]
    drawn = [int(t.get_text().replace(",", "")) for ax in figs["reliability.png"].axes for t in ax.texts]
    assert sum(counts) == 300 and sorted(drawn) == sorted(counts)
    # the curves: a log axis for the loss terms, whole epochs counted from 1, one legend for the figure
    curves = figs["training_curves.png"]
    loss_ax = curves.axes[0]
    assert loss_ax.get_yscale() == "log" and len(curves.legends) == 1
    assert not any(ax.get_legend() for ax in curves.axes)
    curves.canvas.draw() if hasattr(curves.canvas, "draw") else None
    ticks = [t for t in loss_ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert list(loss_ax.lines[0].get_xdata()) == [1, 2, 3] and "<tr><td>1</td>" in page  # the table counts alike


def test_report_on_a_run_without_eval_data_says_what_is_needed(tmp_path, capsys):
    run = _run(tmp_path, False)
    report(run, tmp_path / "rep")
    page = _check_page(tmp_path / "rep", {"training_curves.png"})
    assert "No reliability diagram: the run recorded no eval data" in page
    # held-out data given to report instead
    report(run, tmp_path / "rep2", eval_data=str(tmp_path / "ex.npy"), eval_labels=str(tmp_path / "ey.npy"))
    _check_page(tmp_path / "rep2", {"training_curves.png", "reliability.png"})
    # data named here that cannot be scored (no labels, or labels that do not fit): one line, non-zero exit
    np.save(tmp_path / "short.npy", np.zeros(5, np.int64))
    for extra in ([], ["--eval-labels", str(tmp_path / "short.npy")]):
        with pytest.raises(SystemExit) as e:
            main(["report", str(run), "--out", str(tmp_path / "rep3"), "--eval-data", str(tmp_path / "ex.npy"), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and ("labels" in err or "short.npy" in err), err


def test_report_on_a_run_whose_eval_data_moved_keeps_the_curves(tmp_path):
    run = _run(tmp_path, True)
    (tmp_path / "ex.npy").rename(tmp_path / "moved.npy")
    report(run, tmp_path / "rep")
    assert "is not at that path any more" in _check_page(tmp_path / "rep", {"training_curves.png"})


def test_report_on_a_demo_folder(tmp_path):
    rows = [{"model": f"teacher {i} (CNN)", "parameters": 431080, "n": 10000, "accuracy": 1 - e / 1e4, "errors": e,
             "nll": 0.03, "ece": 0.01, "seconds": 67.0} for i, e in enumerate((95, 95, 85))]
    rows += [{"model": m, "parameters": 1276810, "n": 10000, "accuracy": 1 - e / 1e4, "errors": e, "nll": 0.05,
              "ece": 0.01, "seconds": s} for m, e, s in (("ensemble of 3", 85, None), ("mlp hard labels (baseline)", 144, 47.0),
                                                          ("mlp control", 107, 44.0), ("mlp distilled T=4", 98, 45.0))]
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "results.json").write_text(json.dumps({
        "n_test": 10000, "rows": rows, "student_errors": 98, "baseline_errors": 144, "control_errors": 107,
        "ensemble_errors": 85, "teachers": "shipped",
        "config": {"quick": True, "train_rows": 10000, "views": 2, "student": "mlp:256,256", "student_epochs": 10,
                   "temperature": 4.0, "alpha": 0.9}}))
    assert report(tmp_path / "demo", tmp_path / "rep")["kind"] == "demo"
    page = _check_page(tmp_path / "rep", {"demo_errors.png"})
    assert "mlp distilled T=4" in page and "<td>144 / 10,000</td>" in page and "<td>1,276,810</td>" in page
    assert "<td>47.0 s</td>" in page and "makes 98 errors on 10,000 test images, against 144" in page
    assert "This is a quick run" in page and "Baseline: " in page and "Control: " in page and "Distilled: " in page


def test_cli_report_and_the_missing_extra(tmp_path, capsys, monkeypatch):
    root = make_transfer_set(tmp_path / "set")
    with pytest.raises(SystemExit) as e:
        main(["report", str(root), "--out", str(tmp_path / "rep")])
    assert e.value.code == 0 and "transfer set report with 4 plots" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(SystemExit) as e:
        main(["report", str(root), "--out", str(tmp_path / "rep3")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "pip install 'transferset[report]'" in err
    assert not (tmp_path / "rep3").exists()


def test_report_refuses_an_unknown_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "x"), "--out", str(tmp_path / "rep")])
    assert e.value.code == 2 and "not a transfer set (manifest.json)" in capsys.readouterr().err


def test_report_on_a_one_member_set_says_there_is_no_agreement(tmp_path):
    root = make_transfer_set(tmp_path / "set", members=1)
    report(root, tmp_path / "rep")
    page = _check_page(tmp_path / "rep", {"entropy_vs_temperature.png", "class_counts.png", "confidence_histogram.png"})
    assert "no agreement between members to draw" in page


@pytest.mark.parametrize("codec,plot", [("topk:2", "tail_mass_vs_temperature.png"),
                                        ("sample:4", "sample_classes_vs_temperature.png")])
def test_report_on_a_sparse_set_draws_what_the_codec_kept(tmp_path, codec, plot):
    from transferset.format.recode import recode

    root = make_transfer_set(tmp_path / "set", shard_rows=(300, 700), members=3, classes=6, temperatures=(1, 4))
    recode(root, tmp_path / "sparse", codec)
    res = report(tmp_path / "sparse", tmp_path / "rep", sample_rows=600)
    assert res["kind"] == "transfer set"
    page = _check_page(tmp_path / "rep", {plot, "class_counts.png", "confidence_histogram.png"})
    assert f"<td>{codec}</td>" in page and "<td>1,000</td>" in page
    if codec.startswith("topk"):  # the tail mass grows with the temperature: T=4 spreads mass off the top 2
        rows = re.findall(r"<tr><td>([14])</td><td>([0-9.e-]+)</td></tr>", page.replace("\n", ""))
        tails = dict((t, float(v)) for t, v in rows)
        assert 0 <= tails["1"] < tails["4"] < 1
