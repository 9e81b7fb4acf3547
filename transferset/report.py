"""``transferset report``: PNG plots and one index.html for a transfer set, a training run or a demo folder.

What is drawn (matplotlib, the optional extra ``transferset[report]``; the object API, no pyplot state):

- a **transfer set** (``manifest.json``): mean entropy of the soft targets against temperature (recomputed from
  the stored member logits over a temperature grid, with the stored temperatures marked), the members' pairwise
  argmax agreement, per-class row counts and a confidence histogram. Plots use a sample of at most
  ``sample_rows`` rows read as random contiguous blocks (memory and reading bounded, whatever the set's size);
  the per-class hard-label counts are exact, streamed over the ``labels`` dataset alone. A sparse set (topk:K,
  sample:K) keeps no logits over all classes: its report draws what the codec kept at each stored temperature
  (the tail mass for topk, the distinct classes drawn for sample), the class counts and the confidence.
- a **run folder** (``config.json`` + ``metrics.jsonl``): training curves (losses, eval errors, NLL, ECE) and a
  reliability diagram of ``student.pt`` on the eval data the run recorded (or on ``eval_data`` given here).
- a **demo folder** (``results.json``): the results table and a bar chart of test errors.

Every string from the inputs is HTML-escaped; index.html names only files that were written.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ._io import atomic_write_bytes
from .errors import USAGE, TransferSetError, printable
from .format.manifest import read_manifest, shard_path
from .format.schema import Manifest, parse_codec
from .format.verify import check_shard
from .targets import combine_log_probs

__all__ = ["report", "Report", "DEFAULT_SAMPLE_ROWS"]

DEFAULT_SAMPLE_ROWS = 20000
_BLOCK = 512  # rows per sampled block: contiguous reads, a few HDF5 chunks at most
_BINS = 15  # as evaluate.ECE_BINS


def _figure(w: float = 6.4, h: float = 4.2):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise TransferSetError("report needs matplotlib: pip install 'transferset[report]'", USAGE) from None
    return Figure(figsize=(w, h), layout="constrained")


class Report:
    """Collects PNGs, tables and numbers for one page, then writes index.html naming only what exists."""

    def __init__(self, out: Path, title: str) -> None:
        self.out, self.title = out, title
        self.items: list[tuple[str, Any]] = []  # ("png", (file, caption)) | ("table", (head, rows)) | ("text", s)
        self.pngs: list[str] = []

    def png(self, name: str, fig, caption: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        atomic_write_bytes(self.out / name, buf.getvalue())
        self.pngs.append(name)
        self.items.append(("png", (name, caption)))

    def table(self, head: list[str], rows: list[list[Any]], caption: str = "") -> None:
        self.items.append(("table", (head, rows, caption)))

    def text(self, s: str) -> None:
        self.items.append(("text", s))

    def write(self) -> Path:
        e = lambda v: html.escape(printable(v))  # noqa: E731
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}td,th{padding:2px 8px;"
                 "text-align:right;border-bottom:1px solid #ddd}img{max-width:100%}</style></head><body>",
                 f"<h1>{e(self.title)}</h1>"]
        for kind, item in self.items:
            if kind == "png" and (self.out / item[0]).is_file():
                parts.append(f"<figure><img src='{e(item[0])}' alt='{e(item[1])}'><figcaption>{e(item[1])}"
                             "</figcaption></figure>")
            elif kind == "table":
                head, rows, caption = item
                parts.append(f"<table><caption>{e(caption)}</caption><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
                             + "</tr>" + "".join("<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in r) + "</tr>"
                                                 for r in rows) + "</table>")
            elif kind == "text":
                parts.append(f"<p>{e(item)}</p>")
        parts.append("</body></html>\n")
        path = self.out / "index.html"
        atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
        return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4f}"
    return "-" if v is None else str(v)


# -- transfer sets ------------------------------------------------------------------------------------------------
def _sample(root: Path, m: Manifest, names: list[str], n: int, seed: int) -> dict[str, np.ndarray]:
    """At most ``n`` rows as random contiguous blocks of ``_BLOCK`` rows (all rows when the set is smaller)."""
    size = min(_BLOCK, n)
    blocks = [(k, a) for k, e in enumerate(m.shards) for a in range(0, e.rows, size)]
    rng = np.random.default_rng(seed)
    if m.rows > n:
        keep = np.sort(rng.choice(len(blocks), size=min(len(blocks), max(1, n // size)), replace=False))
        blocks = [blocks[i] for i in keep]
    out: dict[str, list] = {k: [] for k in names}
    for k in sorted({k for k, _ in blocks}):
        with h5py.File(_checked_shard(root, m, k), "r") as f:
            for a in (a for kk, a in blocks if kk == k):
                for name in names:
                    out[name].append(f[name][a:a + size])
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def _checked_shard(root: Path, m: Manifest, k: int) -> Path:
    entry = m.shards[k]
    reason = check_shard(root, entry, m)
    if reason:
        raise TransferSetError(f"{root / entry.path}: {printable(reason)}; run `transferset verify {root}`", 1)
    return shard_path(root, entry.path)


def _label_counts(root: Path, m: Manifest) -> np.ndarray:
    counts = np.zeros(m.num_classes + 1, np.int64)  # last bin: unlabelled (-1)
    for k, e in enumerate(m.shards):
        with h5py.File(_checked_shard(root, m, k), "r") as f:
            for a in range(0, e.rows, 1 << 20):
                y = f["labels"][a:a + (1 << 20)]
                y = np.where((y >= 0) & (y < m.num_classes), y, m.num_classes)
                counts += np.bincount(y, minlength=m.num_classes + 1)
    return counts


def _entropy(lp: np.ndarray) -> np.ndarray:
    return -(np.exp(lp) * lp).sum(-1)


def _plot_entropy(r: Report, m: Manifest, z: np.ndarray, soft: np.ndarray) -> None:
    grid = np.geomspace(0.5, max(50.0, max(m.temperatures) * 1.5), 28)
    w = np.asarray(m.weights, np.float64)
    ents = np.array([_entropy(combine_log_probs(z, t, m.combine, w)) for t in grid])
    fig = _figure()
    ax = fig.subplots()
    ax.plot(grid, ents.mean(1), label="mean (from member logits)")
    ax.fill_between(grid, np.percentile(ents, 10, 1), np.percentile(ents, 90, 1), alpha=0.2, label="10-90th percentile")
    stored = [_entropy(soft[:, j].astype(np.float64)).mean() for j in range(len(m.temperatures))]
    ax.plot(m.temperatures, stored, "o", color="C3", label="stored soft targets")
    ax.axhline(math.log(m.num_classes), color="grey", ls="--", lw=1, label=f"uniform: ln {m.num_classes}")
    ax.set(xscale="log", xlabel="temperature T", ylabel="entropy of the soft targets (nats)",
           title=f"Entropy against temperature ({len(z):,} sampled rows, {m.combine})")
    ax.legend(fontsize=8)
    r.png("entropy_vs_temperature.png", fig, "Mean entropy of the ensemble's soft targets against temperature")
    r.table(["T", "mean entropy (sample)", "mean entropy (manifest, all rows)"],
            [[f"{t:g}", stored[j], (m.stats.get("mean_entropy") or {}).get(f"{t:g}")] for j, t in enumerate(m.temperatures)],
            "Entropy at the stored temperatures")


def _plot_agreement(r: Report, m: Manifest, z: np.ndarray, y: np.ndarray) -> None:
    pred = z.argmax(-1)
    k = m.num_members
    if k == 1:
        lab = y >= 0
        r.text(f"One member ({printable(m.teachers[0].get('file'))}): no agreement between members to draw"
               + (f"; its accuracy on the labelled sampled rows is {(pred[lab, 0] == y[lab]).mean():.4f}." if lab.any() else "."))
        return
    agree = np.array([[float((pred[:, i] == pred[:, j]).mean()) for j in range(k)] for i in range(k)])
    fig = _figure(1.6 + 0.55 * k + 2, 1.2 + 0.5 * k + 1.2)
    ax = fig.subplots()
    im = ax.imshow(agree, vmin=min(0.5, agree.min()), vmax=1.0, cmap="viridis")
    if k <= 12:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{agree[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if agree[i, j] < 0.5 * (1 + agree.min()) else "black")
    ax.set(xticks=range(k), yticks=range(k), xlabel="member", ylabel="member",
           title=f"Pairwise argmax agreement ({len(z):,} rows)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    r.png("member_agreement.png", fig, "Fraction of sampled rows on which two members' argmax classes agree")
    lab = y >= 0
    acc = [float((pred[lab, i] == y[lab]).mean()) if lab.any() else None for i in range(k)]
    r.table(["member", "file", "agreement with the others (mean)", "accuracy on labelled sampled rows"],
            [[i, m.teachers[i].get("file"), float((agree[i].sum() - 1) / max(k - 1, 1)), acc[i]] for i in range(k)],
            "Members")


def _plot_counts(r: Report, m: Manifest, counts: np.ndarray, pred: np.ndarray, total: int) -> None:
    c = m.num_classes
    est = np.bincount(pred, minlength=c) * (total / max(len(pred), 1))
    fig = _figure(max(6.4, min(16, 0.25 * c + 2)), 4.2)
    ax = fig.subplots()
    x = np.arange(c)
    if counts[:c].sum():
        ax.bar(x - 0.2, counts[:c], width=0.4, label="hard labels (exact)")
    ax.bar(x + 0.2 if counts[:c].sum() else x, est, width=0.4, label="teacher argmax at T=1 (estimated from sample)")
    names = m.class_names or [str(i) for i in range(c)]
    if c <= 60:
        ax.set_xticks(x, [printable(n)[:12] for n in names], rotation=90 if c > 12 else 0, fontsize=7)
    ax.set(xlabel="class", ylabel="rows", title=f"Rows per class ({total:,} rows; {counts[c]:,} without a label)")
    ax.legend(fontsize=8)
    r.png("class_counts.png", fig, "Rows per class: hard labels, and the teachers' predicted class")


def _plot_confidence(r: Report, conf: np.ndarray, pred: np.ndarray, y: np.ndarray, t: float = 1.0,
                     estimate: str = "") -> None:
    lab = y >= 0
    fig = _figure()
    ax = fig.subplots()
    bins = np.linspace(0, 1, 41)
    if lab.any():
        ok = lab & (pred == y)
        ax.hist([conf[ok], conf[lab & ~ok]], bins=bins, stacked=True, label=["argmax = label", "argmax != label"])
        if (~lab).any():
            ax.hist(conf[~lab], bins=bins, histtype="step", color="k", label="unlabelled rows")
        ax.legend(fontsize=8)
    else:
        ax.hist(conf, bins=bins)
    ax.set(yscale="log", xlabel=f"ensemble confidence (max probability at T={t:g}{estimate})", ylabel="rows",
           title=f"Confidence of the soft targets ({len(conf):,} sampled rows)")
    r.png("confidence_histogram.png", fig, f"Histogram of the ensemble's top probability at T={t:g}{estimate}")


def _plot_sparse(r: Report, m: Manifest, s: dict[str, np.ndarray]) -> None:
    """What a sparse codec kept, per stored temperature: the tail mass left out (topk), or the distinct classes
    drawn (sample)."""
    family, k = parse_codec(m.codec)
    temps = np.asarray(m.temperatures, np.float64)
    if family == "topk":
        v = np.exp(s["tail_log_mass"].astype(np.float64))
        what, short, name = (f"probability outside the {k} kept classes", "tail mass",
                             "tail_mass_vs_temperature.png")
    else:
        v = (s["sample_count"] > 0).sum(-1).astype(np.float64)
        what, short, name = (f"distinct classes among the {k} draws", "classes drawn",
                             "sample_classes_vs_temperature.png")
    fig = _figure()
    ax = fig.subplots()
    ax.plot(temps, v.mean(0), "o-", label="mean")
    ax.fill_between(temps, np.percentile(v, 10, 0), np.percentile(v, 90, 0), alpha=0.2, label="10-90th percentile")
    ax.set(xscale="log", xlabel="stored temperature T", ylabel=what,
           title=f"{m.codec}: {short} against temperature ({len(v):,} sampled rows)")
    ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    r.png(name, fig, f"{m.codec}: mean {what} at each stored temperature")
    r.table(["T", f"mean {what}"], [[f"{t:g}", float(x)] for t, x in zip(temps, v.mean(0))], f"Codec {m.codec}")


def _sparse_top1(m: Manifest, s: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, float, str]:
    """``(confidence, predicted class, T, note)`` of each sampled row of a sparse set at the stored temperature
    nearest 1: exact for topk (the kept classes hold the top one), the draws' share for sample (an estimate)."""
    j = int(np.argmin(np.abs(np.log(np.asarray(m.temperatures, np.float64)))))
    if parse_codec(m.codec)[0] == "topk":
        lp = s["topk_log_probs"][:, j].astype(np.float64)
        best = lp.argmax(-1)
        return (np.exp(lp.max(-1)), s["topk_index"][np.arange(len(lp)), best].astype(np.int64),
                m.temperatures[j], "")
    counts = s["sample_count"][:, j].astype(np.int64)
    best = counts.argmax(-1)
    k = parse_codec(m.codec)[1]
    return (counts.max(-1) / k, s["sample_index"][:, j][np.arange(len(counts)), best].astype(np.int64),
            m.temperatures[j], f", estimated from {k} draws")


def _set_table(r: Report, m: Manifest, sampled: int) -> None:
    """The set's summary table (a sparse set's with its codec)."""
    codec = [] if m.codec == "dense" else [m.codec]
    st = m.stats
    r.table(["rows", "sampled", "members", "classes"] + (["codec"] if codec else []) +
            ["temperatures", "combine", "complete", "ensemble accuracy"],
            [[st.get("rows", m.rows), sampled, m.num_members, m.num_classes, *codec,
              ", ".join(f"{t:g}" for t in m.temperatures), m.combine, m.complete, st.get("ensemble_accuracy")]],
            "Transfer set")


def _report_sparse_set(root: Path, r: Report, m: Manifest, sample_rows: int, seed: int) -> None:
    """A topk or sample set: what its codec kept, the class counts and the confidence from the stored fields."""
    fields = {"topk": ["topk_index", "topk_log_probs", "tail_log_mass"], "sample": ["sample_index", "sample_count"]}
    s = _sample(root, m, fields[parse_codec(m.codec)[0]] + ["labels"], sample_rows, seed)
    y = s["labels"].astype(np.int64)
    _set_table(r, m, len(y))
    if not len(y):
        r.text("The set has no rows yet: nothing to plot.")
        return
    _plot_sparse(r, m, s)
    conf, pred, t, note = _sparse_top1(m, s)
    _plot_counts(r, m, _label_counts(root, m), pred, m.rows)
    _plot_confidence(r, conf, pred, y, t, note)


def _report_set(root: Path, r: Report, sample_rows: int, seed: int) -> None:
    m = read_manifest(root)
    if m.codec != "dense":  # a sparse set keeps no logits over all classes: its own fields are drawn instead
        return _report_sparse_set(root, r, m, sample_rows, seed)
    s = _sample(root, m, ["logits", "soft_targets", "labels"], sample_rows, seed)
    z, y = s["logits"].astype(np.float32), s["labels"].astype(np.int64)
    _set_table(r, m, len(z))
    if not len(z):
        r.text("The set has no rows yet: nothing to plot.")
        return
    j1 = m.temperature_index(1.0)
    lp1 = s["soft_targets"][:, j1].astype(np.float64) if j1 is not None else \
        combine_log_probs(z, 1.0, m.combine, np.asarray(m.weights))
    _plot_entropy(r, m, z, s["soft_targets"])
    _plot_agreement(r, m, z, y)
    _plot_counts(r, m, _label_counts(root, m), lp1.argmax(-1), m.rows)
    _plot_confidence(r, np.exp(lp1.max(-1)), lp1.argmax(-1), y)


# -- run folders ---------------------------------------------------------------------------------------------------
def _read_metrics(path: Path) -> list[dict]:
    lines = []
    for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if ln.strip():
            try:
                lines.append(json.loads(ln))
            except json.JSONDecodeError:
                raise TransferSetError(f"{path}: line {i + 1} is not JSON; the run folder is damaged") from None
    return lines


def _plot_curves(r: Report, hist: list[dict]) -> None:
    ev = [k for k in ("eval_errors", "eval_nll", "eval_ece") if any(k in h for h in hist)]
    fig = _figure(6.4 if not ev else 11, 4.2)
    axes = fig.subplots(1, 1 + bool(ev), squeeze=False)[0]
    ep = [h.get("epoch", i) + 1 for i, h in enumerate(hist)]
    for key in ("loss", "soft", "hard"):
        if any(key in h for h in hist):
            axes[0].plot(ep, [h.get(key, np.nan) for h in hist], "o-", label=key)
    axes[0].set(xlabel="epoch", ylabel="training loss (mean per row)", title="Training loss")
    axes[0].legend(fontsize=8)
    if ev:
        ax = axes[1]
        ax.plot(ep, [h.get("eval_errors", np.nan) for h in hist], "o-", color="C3", label="eval errors")
        ax.set(xlabel="epoch", ylabel="errors", title="Evaluation after each epoch")
        twin = ax.twinx()
        for k, c in (("eval_nll", "C0"), ("eval_ece", "C2")):
            if k in ev:
                twin.plot(ep, [h.get(k, np.nan) for h in hist], "s--", color=c, label=k[5:].upper())
        twin.set_ylabel("NLL / ECE")
        fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    r.png("training_curves.png", fig, "Training loss per epoch" + (" and evaluation metrics" if ev else ""))


def _plot_reliability(r: Report, lp: np.ndarray, y: np.ndarray, where: str) -> None:
    conf, correct = np.exp(lp.max(1)), lp.argmax(1) == y
    b = np.minimum((conf * _BINS).astype(int), _BINS - 1)
    n = np.bincount(b, minlength=_BINS)
    acc = np.bincount(b, weights=correct, minlength=_BINS) / np.maximum(n, 1)
    mc = np.bincount(b, weights=conf, minlength=_BINS) / np.maximum(n, 1)
    ece = float((n / n.sum() * np.abs(acc - mc)).sum())
    fig = _figure(5.6, 5.4)
    ax = fig.subplots()
    centers = (np.arange(_BINS) + 0.5) / _BINS
    ax.bar(centers[n > 0], acc[n > 0], width=1 / _BINS, edgecolor="k", alpha=0.8, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(mc[n > 0], acc[n > 0], "o", color="C3", ms=4, label="(mean confidence, accuracy)")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy",
           title=f"Reliability: ECE {ece:.4f}, accuracy {correct.mean():.4f}\n{len(y):,} rows of "
                 f"{printable(Path(where.split(' ')[0]).name)[:40]}")
    ax.legend(fontsize=8, loc="upper left")
    r.png("reliability.png", fig, f"Reliability diagram of the student on {where}")
    r.table(["bin", "rows", "mean confidence", "accuracy"],
            [[f"{i / _BINS:.2f}-{(i + 1) / _BINS:.2f}", int(n[i]), float(mc[i]), float(acc[i])]
             for i in range(_BINS) if n[i]], f"Reliability bins (ECE {ece:.4f})")


def _student_log_probs(run: Path, data: str, labels: str | None, limit: int) -> tuple[np.ndarray, np.ndarray]:
    from .evaluate import load_student_checkpoint, torch_log_probs
    from .labelling.sources import open_source, read_labels

    src = open_source(data, limit=limit)
    y = read_labels(labels, rows=src.rows) if labels else src.labels
    if y is None:
        raise TransferSetError(f"{data}: carries no labels; give eval labels", option="eval_labels")
    model = load_student_checkpoint(run / "student.pt", "cpu")
    return torch_log_probs(model, src, "cpu"), np.asarray(y, np.int64)[:src.rows]


def _report_run(run: Path, r: Report, sample_rows: int, eval_data: str | None, eval_labels: str | None) -> None:
    try:
        cfg = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TransferSetError(f"{run / 'config.json'}: cannot be read ({e}); is {run} a train-student run folder?") from None
    hist = _read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    opts = cfg.get("options") or {}
    r.table(["student", "transfer set", "epochs logged", "T", "alpha", "last loss", "last eval errors"],
            [[opts.get("student"), cfg.get("transfer_set"), len(hist), opts.get("temperature"), opts.get("alpha"),
              hist[-1].get("loss") if hist else None, hist[-1].get("eval_errors") if hist else None]], "Run")
    if hist:
        _plot_curves(r, hist)
        keys = [k for k in ("epoch", "loss", "soft", "hard", "eval_errors", "eval_accuracy", "eval_nll", "eval_ece",
                            "samples_per_s") if any(k in h for h in hist)]
        r.table(keys, [[h.get(k) for k in keys] for h in hist], "metrics.jsonl")
    else:
        r.text("metrics.jsonl is missing or empty: the run has not finished an epoch; no training curves.")
    data = eval_data or opts.get("eval_data")
    labels = eval_labels if eval_data else opts.get("eval_labels")
    if not (run / "student.pt").is_file():
        r.text("No student.pt yet: the reliability diagram needs the finished student.")
    elif not data:
        r.text("No reliability diagram: the run recorded no eval data. Give labelled held-out data "
               "(report --eval-data FILE [--eval-labels FILE]), or train with --eval-data.")
    elif not eval_data and not Path(str(data).split(":")[0]).exists():
        r.text(f"No reliability diagram: the run's eval data {data} is not at that path any more; "
               "give its new place with --eval-data.")
    else:
        try:
            lp, y = _student_log_probs(run, data, labels, sample_rows)
        except TransferSetError as e:
            if eval_data:  # data the user named here: a fault in it is theirs to fix, not a note on the page
                raise
            r.text(f"No reliability diagram: {e}")  # the run's own record went stale: the curves still make a page
            return
        _plot_reliability(r, lp, y, f"{data} (held out; its first {len(y):,} rows)")


# -- demo folders --------------------------------------------------------------------------------------------------
def _report_demo(folder: Path, r: Report) -> None:
    try:
        res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        rows = res["rows"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise TransferSetError(f"{folder / 'results.json'}: not a demo result ({e})") from None
    r.table(["model", "parameters", "test errors", "n", "accuracy", "NLL", "ECE", "seconds"],
            [[x.get("model"), x.get("parameters"), x.get("errors"), x.get("n"), x.get("accuracy"), x.get("nll"),
              x.get("ece"), x.get("seconds")] for x in rows], "Demo results (results.json)")
    fig = _figure(7.5, 0.45 * len(rows) + 1.4)
    ax = fig.subplots()
    names = [printable(x.get("model", "?")) for x in rows]
    errs = [x.get("errors", 0) for x in rows]
    bars = ax.barh(range(len(rows)), errs, color=["C0" if "teacher" in n or "ensemble" in n else "C1" for n in names])
    ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=f"test errors (of {res.get('n_test', '?')})", title="Demo: test errors per model")
    r.png("demo_errors.png", fig, "Test errors of the teachers, the ensemble and the students")


def report(path: str | os.PathLike, out: str | os.PathLike, *, sample_rows: int = DEFAULT_SAMPLE_ROWS, seed: int = 0,
           eval_data: str | None = None, eval_labels: str | None = None) -> dict:
    """Write PNGs and ``out/index.html`` for a transfer set, a train-student run folder or a demo folder.

    Args:
        path: the folder to report on; its kind is told by ``manifest.json``, ``config.json`` or ``results.json``.
        out: the folder to write into (created).
        sample_rows: most rows read for plots of a transfer set, or evaluated for a reliability diagram.
        seed: seed of the row sample.
        eval_data, eval_labels: held-out data for a run's reliability diagram (default: what the run recorded).

    Returns:
        ``{"kind", "index", "pngs"}``.
    """
    if sample_rows < 1:
        raise TransferSetError("must be >= 1", option="sample_rows")
    path, out = Path(path), Path(out)
    if (path / "manifest.json").is_file():
        kind = "transfer set"
    elif (path / "config.json").is_file():
        kind = "run"
    elif (path / "results.json").is_file():
        kind = "demo"
    else:
        raise TransferSetError(f"{path}: not a transfer set (manifest.json), a run folder (config.json) or a demo "
                               "folder (results.json)")
    _figure()  # fail early, with the install hint, before any work
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TransferSetError(f"cannot create {out}: {e.strerror or e}", 1) from None
    r = Report(out, f"transferset report: {kind} {path.resolve().name}")
    if kind == "transfer set":
        _report_set(path, r, sample_rows, seed)
    elif kind == "run":
        _report_run(path, r, sample_rows, eval_data, eval_labels)
    else:
        _report_demo(path, r)
    index = r.write()
    return {"kind": kind, "index": str(index), "pngs": [str(out / p) for p in r.pngs]}
