"""``transferset report``: PNG plots and one index.html for a transfer set, a training run, a demo or a sweep.

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
- a **sweep folder** (``sweep.json``, written by ``transferset sweep``): the table of runs, a heatmap of errors
  over temperature x alpha (the control fills the alpha-0 row) and the eval errors per epoch of the best run and
  the control.

Every string from the inputs is HTML-escaped; index.html names only files that were written.
"""

from __future__ import annotations

import datetime
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from ._io import atomic_write_bytes
from .errors import USAGE, TransferSetError, printable
from .format.codecs import codec_for
from .format.reading import TransferSet
from .format.schema import Manifest
from .targets import combine_log_probs
from .wording import number, plural, seconds, size

__all__ = ["report", "Report", "DEFAULT_SAMPLE_ROWS", "sweep_heatmap"]

DEFAULT_SAMPLE_ROWS = 20000
_BLOCK = 512  # rows per sampled block: contiguous reads, a few HDF5 chunks at most
_BINS = 15  # as evaluate.ECE_BINS
FIGSIZE = (8.0, 4.8)  #: every figure: one size, so the page reads as one piece
DPI = 160
FONT = 10  #: legends, tick labels and annotations are never smaller than 9 pt
_STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;line-height:1.4;color:#222}"
          "td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}th{background:#f4f4f4}"
          "td:first-child,th:first-child{text-align:left}td+td{white-space:nowrap}"
          "table{border-collapse:collapse;margin:1em 0}"
          "caption{text-align:left;font-weight:bold;padding:4px 0}img{max-width:100%}"
          "figure{margin:1.5em 0}figcaption{color:#333;font-size:95%;max-width:820px}"
          ".lead{font-size:112%}.meta{color:#666;font-size:90%}")


def _figure(rows: int = 1, cols: int = 1, **kw):
    """A figure of the one size (``FIGSIZE``) with its axes; raises the install hint without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise TransferSetError("report needs matplotlib: pip install 'transferset[report]'", USAGE) from None
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, **kw)


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=FONT + 1)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    ax.grid(alpha=0.25)


def _name(path) -> str:
    """What a page may say about a path: its last part, never the machine's absolute path."""
    return printable(Path(str(path)).name or str(path))


class Report:
    """One page: a headline sentence, then PNGs (each with a caption saying what it shows and what good looks
    like), tables and notes; written as index.html naming only files that exist."""

    def __init__(self, out: Path, title: str, subject: str) -> None:
        self.out, self.title, self.subject = out, title, subject
        self.headline = ""
        self.items: list[tuple[str, Any]] = []  # ("png", (file, caption)) | ("table", ...) | ("text"|"html", s)
        self.pngs: list[str] = []

    def png(self, name: str, fig, caption: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        atomic_write_bytes(self.out / name, buf.getvalue())
        self.pngs.append(name)
        self.items.append(("png", (name, caption)))

    def table(self, head: list[str], rows: list[list[Any]], caption: str = "") -> None:
        self.items.append(("table", (head, rows, caption)))

    def text(self, s: str) -> None:
        self.items.append(("text", s))

    def link(self, before: str, href: str, label: str, after: str = "") -> None:
        """A sentence with one link to another page of this report (``href`` relative to this page)."""
        e = lambda v: html.escape(printable(v))  # noqa: E731
        self.items.append(("html", f"{e(before)}<a href='{e(href)}'>{e(label)}</a>{e(after)}"))

    def write(self) -> Path:
        e = lambda v: html.escape(printable(v))  # noqa: E731
        when = datetime.date.today().isoformat()
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>",
                 f"<style>{_STYLE}</style></head><body>", f"<h1>{e(self.title)}</h1>"]
        if self.headline:
            parts.append(f"<p class='lead'>{e(self.headline)}</p>")
        parts.append(f"<p class='meta'>{e(self.subject)}; drawn by transferset {e(__version__)} on {e(when)}.</p>")
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
            elif kind == "html":
                parts.append(f"<p>{item}</p>")
        parts.append("</body></html>\n")
        path = self.out / "index.html"
        atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
        return path


def _fmt(v) -> str:
    """Numbers as people read them: counts 1,276,810; measures to four decimals (0.9931, 0.0150) so a column's
    digits line up; strings (T and alpha as written, seconds) as the caller made them."""
    if isinstance(v, float) and math.isfinite(v) and abs(v) < 1000:
        return f"{v:.4f}"
    return number(v) if not isinstance(v, str) else v


# -- transfer sets ------------------------------------------------------------------------------------------------
def _sample(ts: TransferSet, names: list[str], n: int, seed: int) -> dict[str, np.ndarray]:
    """At most ``n`` rows as random contiguous blocks of ``_BLOCK`` rows (all rows when the set is smaller)."""
    size = min(_BLOCK, n, ts.block_rows(names))  # a block holds at most BLOCK_BYTES, whatever a row takes
    blocks = [(k, a) for k, rows in enumerate(ts.shard_rows) for a in range(0, rows, size)]
    rng = np.random.default_rng(seed)
    if ts.rows > n:
        keep = np.sort(rng.choice(len(blocks), size=min(len(blocks), max(1, n // size)), replace=False))
        blocks = [blocks[i] for i in keep]
    out: dict[str, list] = {k: [] for k in names}
    for k, a in blocks:
        got = ts.read(k, a, min(ts.shard_rows[k], a + size), names)
        for name in names:
            out[name].append(got[name])
    ts.close()
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def _label_counts(ts: TransferSet) -> np.ndarray:
    c = ts.manifest.num_classes
    counts = np.zeros(c + 1, np.int64)  # last bin: unlabelled (-1)
    for _, got in ts.blocks(["labels"], 1 << 20):
        y = got["labels"]
        counts += np.bincount(np.where((y >= 0) & (y < c), y, c), minlength=c + 1)
    return counts


def _entropy(lp: np.ndarray) -> np.ndarray:
    return -(np.exp(lp) * lp).sum(-1)


def _temperature_ticks(ax, temps) -> None:
    """Ticks at the stored temperatures, labelled as written (1, 2, 4, 8, 20), on a log axis."""
    ax.set_xscale("log")
    ax.set_xticks(list(temps), [f"{t:g}" for t in temps])
    ax.minorticks_off()


def _plot_entropy(r: Report, m: Manifest, z: np.ndarray, soft: np.ndarray) -> None:
    temps = sorted(m.temperatures)
    grid = np.geomspace(min(0.5, temps[0]), max(50.0, temps[-1] * 1.5), 28)
    w = np.asarray(m.weights, np.float64)
    ents = np.array([_entropy(combine_log_probs(z, t, m.combine, w)) for t in grid])
    fig, ((ax,),) = _figure()
    ax.plot(grid, ents.mean(1), color="C0", label="mean, recomputed from the member logits")
    ax.fill_between(grid, np.percentile(ents, 10, 1), np.percentile(ents, 90, 1), color="C0", alpha=0.2,
                    label="10th-90th percentile of rows")
    stored = [_entropy(soft[:, j].astype(np.float64)).mean() for j in range(len(m.temperatures))]
    ax.plot(m.temperatures, stored, "o", color="C3", label="mean of the stored soft targets")
    ax.axhline(math.log(m.num_classes), color="grey", ls="--", lw=1, label=f"uniform over {m.num_classes} classes")
    _temperature_ticks(ax, temps)
    _style(ax, f"Entropy of the soft targets against temperature ({len(z):,} sampled rows)",
           "temperature T (ticks at the stored temperatures)", "entropy (nats)")
    ax.legend(fontsize=FONT - 1, loc="center left")
    r.png("entropy_vs_temperature.png", fig,
          "How soft the ensemble's targets are at each temperature: 0 nats is a one-hot target, the dashed line a "
          "uniform one. Good: at the temperature you train at the curve lies well between the two (the "
          "targets carry the teachers' view of the other classes), and the red dots, the stored targets, sit on the "
          "blue curve (they come from the same logits).")
    r.table(["T", "mean entropy (sample)", "mean entropy (all rows, from the manifest)"],
            [[f"{t:g}", stored[j], (m.stats.get("mean_entropy") or {}).get(f"{t:g}")]
             for j, t in sorted(enumerate(m.temperatures), key=lambda jt: jt[1])],
            "Entropy at the stored temperatures (nats)")


def _cell_text_colour(cmap, norm, v: float) -> str:
    """Black on light cells, white on dark ones, by the cell colour's luminance."""
    red, green, blue, _ = cmap(norm(v))
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


def _plot_agreement(r: Report, m: Manifest, z: np.ndarray, y: np.ndarray) -> None:
    pred = z.argmax(-1)
    k = m.num_members
    if k == 1:
        lab = y >= 0
        r.text(f"One member ({printable(m.teachers[0].get('file'))}): no agreement between members to draw"
               + (f"; its accuracy on the labelled sampled rows is {(pred[lab, 0] == y[lab]).mean():.4f}." if lab.any() else "."))
        return
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    agree = np.array([[float((pred[:, i] == pred[:, j]).mean()) for j in range(k)] for i in range(k)])
    dis = 1 - agree
    off = dis[~np.eye(k, dtype=bool)]
    norm = Normalize(0.0, max(float(off.max()), 1e-3))  # the data's own range: small differences stay visible
    fig, ((ax,),) = _figure()
    cmap = colormaps["Blues"]
    im = ax.imshow(np.where(np.eye(k, dtype=bool), np.nan, dis), cmap=cmap, norm=norm)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                text = "-" if i == j else f"{dis[i, j]:.2%}"
                ax.text(j, i, text, ha="center", va="center", fontsize=FONT,
                        color="black" if i == j else _cell_text_colour(cmap, norm, dis[i, j]))
    names = [f"{i}: {_name(t.get('file'))[:18]}" for i, t in enumerate(m.teachers)]
    ax.set_xticks(range(k), [str(i) for i in range(k)])
    ax.set_yticks(range(k), names if k <= 12 else [str(i) for i in range(k)])
    _style(ax, f"Members' disagreement ({len(z):,} sampled rows)", "member", "member")
    ax.grid(False)
    bar = fig.colorbar(im, ax=ax, shrink=0.9, format=lambda v, _: f"{v:.2%}")
    bar.set_label("rows where the two members' argmax classes differ", fontsize=FONT)
    bar.ax.tick_params(labelsize=FONT - 1)
    r.png("member_agreement.png", fig,
          "How often two members pick different classes (argmax at T=1), for each pair. Good: a little disagreement, "
          "about equal for every pair; an ensemble is for the rows where members differ (members that never do add "
          "nothing to each other), and one member far from all the others may be broken or fed the wrong input.")
    lab = y >= 0
    acc = [float((pred[lab, i] == y[lab]).mean()) if lab.any() else None for i in range(k)]
    r.table(["member", "file", "agreement with the others (mean)", "accuracy on labelled sampled rows"],
            [[i, m.teachers[i].get("file"), float((agree[i].sum() - 1) / max(k - 1, 1)), acc[i]] for i in range(k)],
            "Members")


def _plot_counts(r: Report, m: Manifest, counts: np.ndarray, pred: np.ndarray, total: int) -> None:
    c = m.num_classes
    est = np.bincount(pred, minlength=c) * (total / max(len(pred), 1))
    fig, ((ax,),) = _figure()
    x = np.arange(c)
    labelled = bool(counts[:c].sum())
    if labelled:
        ax.bar(x - 0.2, counts[:c], width=0.4, color="C0", label="hard labels (exact count)")
    ax.bar(x + 0.2 if labelled else x, est, width=0.4, color="C1", label="teachers' argmax at T=1 (from the sample)")
    names = m.class_names or [str(i) for i in range(c)]
    if c <= 60:
        ax.set_xticks(x, [printable(n)[:12] for n in names], rotation=90 if c > 12 else 0)
    _style(ax, f"Rows per class ({total:,} rows; {counts[c]:,} without a label)", "class", "rows")
    ax.yaxis.set_major_formatter("{x:,.0f}")
    fig.legend(loc="outside upper center", ncols=2, fontsize=FONT - 1, frameon=False)
    r.png("class_counts.png", fig,
          "How many rows each class has, by the hard labels and by the teachers' predictions. Good: the two bars of "
          "each class are about equal (the teachers predict the classes the labels say) and no class is far rarer "
          "than the others (a rare class gives the student few examples).")


def _plot_confidence(r: Report, conf: np.ndarray, pred: np.ndarray, y: np.ndarray, t: float = 1.0,
                     estimate: str = "") -> None:
    lab = y >= 0
    fig, ((ax,),) = _figure()
    bins = np.linspace(0, 1, 41)
    if lab.any():
        ok = lab & (pred == y)
        ax.hist([conf[ok], conf[lab & ~ok]], bins=bins, stacked=True, color=["C0", "C3"],
                label=["argmax = label", "argmax != label"])
        if (~lab).any():
            ax.hist(conf[~lab], bins=bins, histtype="step", color="k", label="unlabelled rows")
        ax.legend(fontsize=FONT - 1, loc="upper left")
    else:
        ax.hist(conf, bins=bins, color="C0")
    ax.set_yscale("log")
    _style(ax, f"Confidence of the soft targets ({len(conf):,} sampled rows)",
           f"ensemble confidence: top probability at T={t:g}{estimate}", "rows (log scale)")
    r.png("confidence_histogram.png", fig,
          f"How sure the ensemble is of each row (its top probability at T={t:g}{estimate}), split by whether its "
          "choice matches the hard label. Good: the rows it gets wrong (red) sit at low confidence, and the rows it "
          "gets right pile up near 1; red rows near 1 are confident mistakes, often label noise.")


def _plot_sparse(r: Report, m: Manifest, s: dict[str, np.ndarray]) -> None:
    """What a sparse codec kept, per stored temperature (:meth:`~transferset.format.codecs.Codec.kept`: the tail
    mass left out for topk, the distinct classes drawn for sample)."""
    v, what, short, name, good = codec_for(m.codec).kept(s)
    order = np.argsort(m.temperatures)
    temps = np.asarray(m.temperatures, np.float64)[order]
    v = v[:, order]
    fig, ((ax,),) = _figure()
    ax.plot(temps, v.mean(0), "o-", color="C0", label="mean")
    ax.fill_between(temps, np.percentile(v, 10, 0), np.percentile(v, 90, 0), color="C0", alpha=0.2,
                    label="10th-90th percentile of rows")
    _temperature_ticks(ax, temps)
    _style(ax, f"{m.codec}: {short} against temperature ({len(v):,} sampled rows)", "stored temperature T", what)
    ax.legend(fontsize=FONT - 1)
    r.png(name, fig, f"{m.codec}: the mean {what} at each stored temperature. {good}")
    r.table(["T", f"mean {what}"], [[f"{t:g}", float(x)] for t, x in zip(temps, v.mean(0))], f"Codec {m.codec}")


def _sparse_top1(m: Manifest, s: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, float, str]:
    """``(confidence, predicted class, T, note)`` of each sampled row of a sparse set at the stored temperature
    nearest 1: exact for topk (the kept classes hold the top one), the draws' share for sample (an estimate)."""
    j = int(np.argmin(np.abs(np.log(np.asarray(m.temperatures, np.float64)))))
    conf, pred, note = codec_for(m.codec).top1(s, j)
    return conf, pred, m.temperatures[j], note


def _set_table(r: Report, m: Manifest, sampled: int) -> None:
    """The page's headline and the set's summary table (a sparse set's with its codec)."""
    from .info import augment_text

    st = m.stats
    src = m.source if isinstance(m.source, dict) else {}
    acc = st.get("ensemble_accuracy")
    r.headline = (
        f"{plural(int(st.get('rows', m.rows)), 'row')} of soft targets from {plural(m.num_members, 'teacher')} over "
        f"{plural(m.num_classes, 'class', 'classes')}, made from "
        f"{number(src.get('rows')) + ' rows of ' if src.get('rows') is not None else ''}{_name(src.get('data', '?'))}"
        f" (augment: {augment_text(m.augment)})"
        + (f"; the ensemble's top class matches the hard label on {acc:.2%} of labelled rows." if isinstance(acc, float)
           else "."))
    codec = [] if m.codec == "dense" else [m.codec]
    r.table(["rows", "sampled for the plots", "members", "classes"] + (["codec"] if codec else []) +
            ["temperatures", "combine", "complete", "ensemble accuracy"],
            [[st.get("rows", m.rows), sampled, m.num_members, m.num_classes, *codec,
              ", ".join(f"{t:g}" for t in sorted(m.temperatures)), m.combine, m.complete, acc]],
            "Transfer set")


def _hints_table(ts: TransferSet, r: Report, sample_rows: int, seed: int) -> None:
    """The set's hints (label --hint): what each stores, its bytes a row and its values over the sampled rows
    (read through ``ts``, so the shards' checks hold for them as for every other field)."""
    m = ts.manifest
    if not m.hints:
        return
    s = _sample(ts, [h["field"] for h in m.hints], sample_rows, seed)
    rows = []
    for h in m.hints:
        v = s[h["field"]]
        if not len(v):
            values = "-"
        elif h["reduce"] == "sign":
            size = int(np.prod(h["tensor_shape"]))
            bits = np.unpackbits(v.reshape(len(v), -1), axis=1, count=size)
            values = f"{bits.mean():.3f} of neurons active"
        else:
            f = v.astype(np.float64)
            values = f"mean {f.mean():.4g}, std {f.std():.4g}"
        rows.append([h["field"], h["tensor"], h["member"], h["reduce"], str(h["tensor_shape"]), str(h["shape"]),
                     h["dtype"], int(np.prod(h["shape"])) * np.dtype(h["dtype"]).itemsize, values])
    r.table(["field", "tensor", "member", "reduce", "tensor shape", "stored shape", "dtype", "bytes a row",
             "sampled values"], rows, "Hints (intermediate teacher tensors stored per row)")


def _report_sparse_set(ts: TransferSet, r: Report, sample_rows: int, seed: int) -> None:
    """A topk or sample set: what its codec kept, the class counts and the confidence from the stored fields."""
    m = ts.manifest
    s = _sample(ts, list(ts.codec.targets) + ["labels"], sample_rows, seed)
    y = s["labels"].astype(np.int64)
    _set_table(r, m, len(y))
    _hints_table(ts, r, sample_rows, seed)
    if not len(y):
        r.text("The set has no rows yet: nothing to plot.")
        return
    _plot_sparse(r, m, s)
    conf, pred, t, note = _sparse_top1(m, s)
    _plot_counts(r, m, _label_counts(ts), pred, m.rows)
    _plot_confidence(r, conf, pred, y, t, note)


def _report_token_set(ts: TransferSet, r: Report, sample_rows: int, seed: int) -> None:
    """A per-position set: its table, and per position the teacher's top-1 next-token accuracy on the sampled
    rows (the stored statistics give the whole set's)."""
    m = ts.manifest
    family = ts.codec.stored_as
    names = {"topk": ["topk_index"], "sample": ["sample_index", "sample_count"], "dense": ["soft_targets"]}[family]
    s = _sample(ts, names + ["labels", "length"], sample_rows, seed)
    y = s["labels"].astype(np.int64)
    _set_table(r, m, len(y))
    _hints_table(ts, r, sample_rows, seed)
    r.table(["positions", "labelled positions", "next-token accuracy (teacher top-1)", "mean entropy (nats)"],
            [[m.positions, m.stats.get("labelled_rows"), m.stats.get("ensemble_accuracy"),
              ", ".join(f"T={k}: {v:.3f}" for k, v in (m.stats.get("mean_entropy") or {}).items())]],
            "Per-position set: position j holds the teachers' distribution over token j + 1")
    if not len(y):
        r.text("The set has no rows yet: nothing to plot.")
        return
    low = int(np.argmin(m.temperatures))
    if family == "topk":
        top = s["topk_index"][..., 0].astype(np.int64)
    elif family == "dense":
        top = s["soft_targets"][:, :, low].argmax(-1)
    else:
        top = np.take_along_axis(s["sample_index"][:, :, low], s["sample_count"][:, :, low].argmax(-1)[..., None],
                                 -1)[..., 0].astype(np.int64)
    has = y >= 0
    acc = np.where(has, top == y, False).sum(0) / np.maximum(has.sum(0), 1)
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.plot(np.arange(m.positions), acc)
    ax.set_xlabel("position j")
    ax.set_ylabel("teacher top-1 == token j + 1")
    r.png("positions.png", fig, f"Teacher next-token accuracy by position ({len(y)} sampled rows)")


def _report_set(root: Path, r: Report, sample_rows: int, seed: int) -> None:
    ts = TransferSet(root)
    m = ts.manifest
    if m.positions is not None:
        return _report_token_set(ts, r, sample_rows, seed)
    if ts.codec.sparse:  # a sparse set keeps no logits over all classes: its own fields are drawn instead
        return _report_sparse_set(ts, r, sample_rows, seed)
    s = _sample(ts, list(ts.codec.members) + list(ts.codec.targets) + ["labels"], sample_rows, seed)
    z, y = s["logits"].astype(np.float32), s["labels"].astype(np.int64)
    _set_table(r, m, len(z))
    _hints_table(ts, r, sample_rows, seed)
    if not len(z):
        r.text("The set has no rows yet: nothing to plot.")
        return
    j1 = m.temperature_index(1.0)
    lp1 = s["soft_targets"][:, j1].astype(np.float64) if j1 is not None else \
        combine_log_probs(z, 1.0, m.combine, np.asarray(m.weights))
    _plot_entropy(r, m, z, s["soft_targets"])
    _plot_agreement(r, m, z, y)
    _plot_counts(r, m, _label_counts(ts), lp1.argmax(-1), m.rows)
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


def _positive(values: list) -> list[float]:
    """For a log axis: a missing or non-positive value is not drawn (alpha = 0 leaves the soft term at 0)."""
    return [v if isinstance(v, (int, float)) and v > 0 else np.nan for v in values]


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


_CURVES = (("loss", "training loss: alpha T\u00b2 KL + (1 - alpha) CE", "C0"), ("soft", "soft term: KL at T", "C1"),
           ("hard", "hard term: cross-entropy", "C2"))
_EVAL = (("eval_errors", "held-out errors", "C3"), ("eval_nll", "held-out NLL (nats)", "C4"),
         ("eval_ece", "held-out ECE", "C5"))


def _plot_curves(r: Report, hist: list[dict]) -> None:
    """One panel per quantity (no twin axes): the loss terms on a log axis, then each eval metric."""
    ev = [e for e in _EVAL if any(e[0] in h for h in hist)]
    fig, axes = _figure(2 if ev else 1, 2 if ev else 1)
    axes = axes.ravel()
    ep = [int(h.get("epoch", i)) + 1 for i, h in enumerate(hist)]  # epochs counted from 1, as the table below
    same = all(abs(h.get("loss", 0) - h.get("hard", 0)) <= 1e-9 * max(1.0, abs(h.get("loss", 0))) for h in hist)
    for key, label, colour in _CURVES:
        values = _positive([h.get(key) for h in hist])
        if all(np.isnan(values)) or (key == "hard" and same):  # alpha 0: no soft term, and the loss is the CE
            continue
        axes[0].plot(ep, values, "o-", color=colour, label="training loss: cross-entropy (alpha 0)"
                     if key == "loss" and same else label)
    axes[0].set_yscale("log")
    _style(axes[0], "Training loss (mean per row)", "epoch", "loss (log scale)")
    for ax, (key, label, colour) in zip(axes[1:], ev):
        ax.plot(ep, [h.get(key, np.nan) for h in hist], "o-", color=colour, label=label)
        _style(ax, label[0].upper() + label[1:], "epoch", label.split(" (")[0].replace("held-out ", ""))
    for ax in axes[1 + len(ev):]:
        ax.set_visible(False)
    for ax in axes:
        _epoch_axis(ax)
    fig.legend(loc="outside lower center", ncols=3, fontsize=FONT - 1, frameon=False)
    r.png("training_curves.png", fig,
          "The training loss per epoch (log scale: the soft term is scaled by T\u00b2 and would flatten the others)"
          + (" and the held-out errors, NLL and ECE measured after each epoch. Good: the loss falls and flattens; "
             "the held-out errors and NLL fall and stay down (a rise while the loss still falls is overfitting; "
             "a curve still falling at the last epoch says more epochs would help)." if ev else
             ". Good: it falls and flattens. Train with --eval-data to see held-out errors here too."))


def _plot_reliability(r: Report, lp: np.ndarray, y: np.ndarray, where: str) -> dict:
    """Accuracy against confidence per bin, with each bin's row count written on it and drawn below."""
    conf, correct = np.exp(lp.max(1)), lp.argmax(1) == y
    b = np.minimum((conf * _BINS).astype(int), _BINS - 1)
    n = np.bincount(b, minlength=_BINS)
    acc = np.bincount(b, weights=correct, minlength=_BINS) / np.maximum(n, 1)
    mc = np.bincount(b, weights=conf, minlength=_BINS) / np.maximum(n, 1)
    ece = float((n / n.sum() * np.abs(acc - mc)).sum())
    fig, (top, bottom) = _figure(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    ax, hx = top[0], bottom[0]
    centers = (np.arange(_BINS) + 0.5) / _BINS
    has = n > 0
    share = n / max(n.sum(), 1)
    # a bin's bar is as opaque as its share of the rows: a bin of 3 rows cannot look like one of 2,000
    colours = [(0.12, 0.47, 0.71, 0.25 + 0.75 * min(1.0, 5 * f)) for f in share[has]]
    ax.bar(centers[has], acc[has], width=1 / _BINS, color=colours, edgecolor="k", lw=0.5, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(mc[has], acc[has], "o", color="C3", ms=4, label="(mean confidence, accuracy) of the bin")
    ax.set(xlim=(0, 1), ylim=(0, 1.08))
    _style(ax, f"Reliability: ECE {ece:.4f}, accuracy {correct.mean():.4f} ({len(y):,} held-out rows)",
           "", "accuracy")
    fig.legend(loc="outside upper center", ncols=3, fontsize=FONT - 1, frameon=False)  # off the bars
    bars = hx.bar(centers[has], n[has], width=1 / _BINS, color="C7", edgecolor="k", lw=0.5)
    hx.bar_label(bars, labels=[f"{v:,}" for v in n[has]], fontsize=FONT - 1, padding=1)
    hx.set_yscale("log")
    hx.set_ylim(0.5, max(n.max(), 1) * 8)
    _style(hx, "", "confidence (top probability)", "rows in bin")
    r.png("reliability.png", fig,
          f"Reliability of the student on {where}: rows grouped by the student's confidence; each bar is how often "
          "it was right in that group, and the lower panel counts the rows of each group (a faint bar holds few "
          "rows and says little). Good: the bars of the groups that hold the rows reach the dashed diagonal "
          "(confidence 0.9 right 90% of the time); bars below it are over-confidence. ECE is the row-weighted "
          "gap.")
    r.table(["bin", "rows", "mean confidence", "accuracy"],
            [[f"{i / _BINS:.2f}-{(i + 1) / _BINS:.2f}", int(n[i]), float(mc[i]), float(acc[i])]
             for i in range(_BINS) if n[i]], f"Reliability bins (ECE {ece:.4f})")
    return {"ece": ece, "counts": n.tolist()}


def _student_log_probs(run: Path, data: str, labels: str | None, limit: int) -> tuple[np.ndarray, np.ndarray]:
    from .evaluate import load_student_checkpoint, torch_log_probs
    from .inputs.sources import open_source, read_labels

    src = open_source(data, limit=limit)
    y = read_labels(labels, rows=src.rows) if labels else src.labels
    if y is None:
        raise TransferSetError(f"is needed: {data} carries no labels", option="eval_labels")
    model = load_student_checkpoint(run / "student.pt", "cpu")
    return torch_log_probs(model, src, "cpu"), np.asarray(y, np.int64)[:src.rows]


def _run_headline(opts: dict, cfg: dict, hist: list[dict]) -> str:
    t, alpha = opts.get("temperature"), opts.get("alpha")
    how = ("on hard labels alone (alpha 0)" if alpha == 0 else
           f"at T={t:g}, alpha {alpha:g}" if isinstance(t, (int, float)) and isinstance(alpha, (int, float)) else "")
    text = (f"The student {printable(opts.get('student', '?'))}, trained {how} for {plural(len(hist), 'epoch')} from "
            f"the transfer set {_name(cfg.get('transfer_set', '?'))}")
    last = hist[-1] if hist else {}
    if "eval_errors" in last:
        text += (f"; after its last epoch it makes {last['eval_errors']:,} errors on "
                 f"{number(last.get('eval_n'))} held-out rows (NLL {last.get('eval_nll', float('nan')):.4f}, "
                 f"ECE {last.get('eval_ece', float('nan')):.4f})")
    return text + "."


def _report_run(run: Path, r: Report, sample_rows: int, eval_data: str | None, eval_labels: str | None) -> None:
    try:
        cfg = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TransferSetError(f"{run / 'config.json'}: cannot be read ({e}); is {run} a train-student run folder?") from None
    hist = _read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    opts = cfg.get("options") or {}
    r.headline = _run_headline(opts, cfg, hist)
    g = lambda v: f"{v:g}" if isinstance(v, (int, float)) else v  # noqa: E731
    r.table(["student", "transfer set", "epochs", "T", "alpha", "loss", "last loss", "last eval errors"],
            [[opts.get("student"), _name(cfg.get("transfer_set", "-")), len(hist), g(opts.get("temperature")),
              g(opts.get("alpha")), opts.get("loss"), hist[-1].get("loss") if hist else None,
              hist[-1].get("eval_errors") if hist else None]], "Run")
    if hist:
        _plot_curves(r, hist)
        keys = [k for k in ("loss", "soft", "hard", "eval_errors", "eval_accuracy", "eval_nll", "eval_ece",
                            "samples_per_s", "seconds") if any(k in h for h in hist)]
        names = {"eval_nll": "eval NLL", "eval_ece": "eval ECE", "samples_per_s": "rows/s", "soft": "soft (KL)",
                 "hard": "hard (CE)"}
        r.table(["epoch", *[names.get(k, k.replace("_", " ")) for k in keys]],
                [[int(h.get("epoch", i)) + 1, *[seconds(h.get(k)) if k == "seconds" else
                                                 round(h[k]) if k == "samples_per_s" and k in h else h.get(k)
                                                 for k in keys]] for i, h in enumerate(hist)],
                "Per epoch (metrics.jsonl; epochs counted from 1)")
    else:
        r.text("metrics.jsonl is missing or empty: the run has not finished an epoch; no training curves.")
    _run_reliability(run, r, opts, sample_rows, eval_data, eval_labels)


def _run_reliability(run: Path, r: Report, opts: dict, sample_rows: int, eval_data: str | None,
                     eval_labels: str | None) -> None:
    data = eval_data or opts.get("eval_data")
    labels = eval_labels if eval_data else opts.get("eval_labels")
    if not (run / "student.pt").is_file():
        r.text("No student.pt yet: the reliability diagram needs the finished student.")
    elif not data:
        r.text("No reliability diagram: the run recorded no eval data. Give labelled held-out data "
               "(report --eval-data FILE [--eval-labels FILE]), or train with --eval-data.")
    elif not eval_data and not Path(str(data).split(":")[0]).exists():
        r.text(f"No reliability diagram: the run's eval data {_name(data)} is not at that path any more; "
               "give its new place with --eval-data.")
    else:
        try:
            lp, y = _student_log_probs(run, data, labels, sample_rows)
        except TransferSetError as e:
            if eval_data:  # data the user named here: a fault in it is theirs to fix, not a note on the page
                raise
            r.text(f"No reliability diagram: {e}")  # the run's own record went stale: the curves still make a page
            return
        _plot_reliability(r, lp, y, f"{len(y):,} rows of {_name(data)} (held out)")


# -- demo folders --------------------------------------------------------------------------------------------------
_ROLES = (("student", "distilled", "the student trained on the teachers' soft targets (and a little on the hard "
                                   "labels) of the transfer set: the clean images and their jittered views"),
          ("baseline", "baseline", "the same network trained on the hard labels of the clean training images "
                                   "alone, for the same number of steps (the paper's baseline)"),
          ("control", "control", "the same network trained on the hard labels of the very rows the student saw, "
                                 "jittered views included, for the same steps: what the augmentation alone buys"))


def _demo_curves(folder: Path, r: Report) -> None:
    """The three students' held-out errors against training steps, from their runs' metrics.jsonl."""
    runs = {name: _read_metrics(folder / name / "metrics.jsonl") for name, _, _ in _ROLES
            if (folder / name / "metrics.jsonl").is_file()}
    runs = {k: v for k, v in runs.items() if any("eval_errors" in h for h in v)}
    if not runs:
        r.text("No students' curves: these runs were trained without eval data (a demo from before the demo "
               "evaluated its students each epoch); delete the three run folders and run the demo again to get them.")
        return
    fig, ((ax,),) = _figure()
    for (name, role, _), colour in zip(_ROLES, ("C3", "C0", "C1")):
        if name in runs:
            h = [x for x in runs[name] if "eval_errors" in x]
            ax.plot([x["steps"] for x in h], [x["eval_errors"] for x in h], "o-", color=colour, ms=3, label=role)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter("{x:,.0f}")
    ax.yaxis.set_minor_formatter("{x:,.0f}")
    _style(ax, "Held-out errors of the three students during training", "training steps (batches)",
           "test errors (log scale)")
    ax.legend(fontsize=FONT)
    r.png("demo_students.png", fig,
          "Test errors of the three students after each epoch, against training steps (all three take the same "
          "number of steps; the baseline's epochs are shorter, over the clean images only). Good: the distilled "
          "curve ends lowest; where the curves still fall at the end, more steps would help.")


def _demo_headline(res: dict, rows: list[dict]) -> str:
    by = {k: res.get(f"{k}_errors") for k in ("student", "baseline", "control", "ensemble")}
    n = number(res.get("n_test"))
    student = next((x.get("model", "") for x in rows if "distilled" in str(x.get("model", ""))), "student")
    if None in by.values():
        return f"Distillation on MNIST: test errors of the teachers, their ensemble and three students on {n} images."
    return (f"Distillation on MNIST: the distilled student ({printable(student)}) makes {by['student']:,} errors on "
            f"{n} test images, against {by['baseline']:,} for the same network on hard labels (baseline) and "
            f"{by['control']:,} on the hard labels of the same jittered rows (control); the teachers' ensemble makes "
            f"{by['ensemble']:,}.")


def _demo_mode(res: dict) -> str:
    c = res.get("config") or {}
    what = (f"{number(c.get('train_rows')) if c.get('train_rows') else 'all 60,000'} training images with "
            f"{plural(c.get('views', 0), 'jittered view')} each, student {printable(c.get('student', '?'))} for "
            f"{plural(c.get('student_epochs', 0), 'epoch')} at T={c.get('temperature', 0):g}, alpha "
            f"{c.get('alpha', 0):g}, {number(res.get('n_test'))} test images, teachers {res.get('teachers', '?')}")
    if c.get("quick"):
        return (f"This is a quick run (demo --quick: {what}): a smoke test of the whole path, whose numbers are "
                "noisier and worse than the full demo's (transferset demo, without --quick).")
    return f"This is the full demo ({what})."


def _demo_table(r: Report, res: dict, rows: list[dict]) -> None:
    speed = any("rows_per_s_1" in x for x in rows)
    head = ["model", "parameters", "test errors", "accuracy", "NLL", "ECE", "training time"]
    if speed:
        head += ["ONNX file", "rows/s at batch 1", "rows/s at batch 256"]
    body = []
    for x in rows:
        row = [x.get("model"), x.get("parameters"), f"{number(x.get('errors'))} / {number(x.get('n'))}",
               x.get("accuracy"), x.get("nll"), x.get("ece"),
               seconds(x.get("seconds")) if x.get("seconds") is not None else res.get("teachers", "-")]
        if speed:
            row += [size(x.get("onnx_bytes")), _rate(x.get("rows_per_s_1")), _rate(x.get("rows_per_s_256"))]
        body.append(row)
    r.table(head, body, "Every model on the test images (results.json)" + (
        "; speeds measured on this machine's CPU with ONNX Runtime, one thread" if speed else ""))


def _rate(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _plot_demo_errors(r: Report, res: dict, rows: list[dict]) -> None:
    fig, ((ax,),) = _figure()
    names = [printable(x.get("model", "?")) for x in rows]
    errs = [x.get("errors", 0) for x in rows]
    teacher = ["teacher" in n or "ensemble" in n for n in names]
    bars = ax.barh(range(len(rows)), errs, color=["C7" if t else "C0" for t in teacher])
    ax.bar_label(bars, labels=[f"{e:,}" for e in errs], fontsize=FONT - 1, padding=2)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, max(errs + [1]) * 1.15)
    _style(ax, "Test errors per model (fewer is better)", f"test errors (of {number(res.get('n_test'))})", "")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="C7", label="teachers and their ensemble"), Patch(color="C0", label="students")],
              fontsize=FONT - 1, loc="lower right")
    r.png("demo_errors.png", fig,
          "Test errors of each teacher, their ensemble and the three students (same network, same steps). Good: the "
          "distilled student's bar is shorter than the baseline's and the control's, and close to the ensemble's: "
          "the soft targets taught it more than the hard labels of the same rows.")


def _report_demo(folder: Path, r: Report, out: Path, sample_rows: int, seed: int) -> list[str]:
    """The demo page, and a page each for its transfer set and its three runs (linked); returns their PNGs."""
    try:
        res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        rows = res["rows"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise TransferSetError(f"{folder / 'results.json'}: not a demo result ({e})") from None
    r.headline = _demo_headline(res, rows)
    r.text(_demo_mode(res))
    for _, role, what in _ROLES:
        r.text(f"{role[0].upper() + role[1:]}: {what}.")
    pngs = []
    test = folder / "test-set.npz"
    subs = [("transfer-set", "the transfer set", "its soft targets, members and classes")] + \
           [(name, f"the {role} run", "its training curves and reliability") for name, role, _ in _ROLES]
    for name, label, what in subs:
        if (folder / name / ("manifest.json" if name == "transfer-set" else "config.json")).is_file():
            sub = _write_page(folder / name, out / name, _kind(folder / name), sample_rows, seed,
                              str(test) if name != "transfer-set" and test.is_file() else None, None, "../index.html")
            pngs += sub["pngs"]
            r.link("Page of ", f"{name}/index.html", label, f": {what}.")
    _demo_table(r, res, rows)
    _plot_demo_errors(r, res, rows)
    _demo_curves(folder, r)
    return pngs


# -- sweep folders -------------------------------------------------------------------------------------------------
def sweep_heatmap(res: dict) -> tuple[list[float], list[float], np.ndarray]:
    """``(alphas, temperatures, errors[alpha, T])`` of a sweep's kd runs; the control fills the alpha-0 row."""
    runs = {(r["temperature"], r["alpha"]): r.get("errors") for r in res["runs"] if r["loss"] == "kd" and r["alpha"]}
    control = next((r.get("errors") for r in res["runs"] if r["alpha"] == 0), None)
    temps = sorted({t for t, _ in runs})
    alphas = sorted({0.0} | {a for _, a in runs})
    grid = np.full((len(alphas), len(temps)), np.nan)
    for i, a in enumerate(alphas):
        for j, t in enumerate(temps):
            v = control if a == 0 else runs.get((t, a))
            grid[i, j] = np.nan if v is None else v
    return alphas, temps, grid


def _report_sweep(folder: Path, r: Report) -> None:
    try:
        res = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
        runs = res["runs"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise TransferSetError(f"{folder / 'sweep.json'}: not a sweep result ({e})") from None
    where = "held-out source rows" if res.get("scored_on") == "holdout" else "the evaluation data"
    margin = res.get("margin_errors")
    r.headline = (f"{res.get('student')}, {res.get('epochs')} epochs a run, scored on {where}: the best setting is "
                  f"{res.get('best')}" + ("" if margin is None else
                                          f", {margin} errors fewer than the hard-label control (alpha 0)") + ".")
    r.table(["run", "loss", "T", "alpha", "errors", "rows scored", "NLL", "ECE", "seconds"],
            [[x["name"], x["loss"], x["temperature"], x["alpha"], x.get("errors"), x.get("n"), x.get("nll"),
              x.get("ece"), x.get("seconds")] for x in runs], "Every run of the sweep (sweep.json)")
    alphas, temps, grid = sweep_heatmap(res)
    if temps:
        fig, ((ax,),) = _figure()
        im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        for i in range(len(alphas)):
            for j in range(len(temps)):
                if not np.isnan(grid[i, j]):
                    dark = im.norm(grid[i, j]) > 0.5  # viridis_r: many errors are dark cells
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", color="w" if dark else "k",
                            fontsize=FONT)
        ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" + (" (control)" if a == 0 else "") for a in alphas])
        _style(ax, f"Errors on {where}", "temperature T", "alpha")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="errors")
        r.png("sweep_heatmap.png", fig, "Errors of every kd run over temperature x alpha; the alpha-0 row is the one "
              "hard-label control, repeated. Good: a cell lighter than the control's row, by more than seed noise.")
    curves = [(n, _read_metrics(folder / n / "metrics.jsonl")) for n in dict.fromkeys([res.get("best"), "control"])
              if n and (folder / n / "metrics.jsonl").is_file()]
    if curves:
        fig, ((ax,),) = _figure()
        for name, hist in curves:
            ax.plot([h["epoch"] + 1 for h in hist], [h.get("eval_errors", np.nan) for h in hist], "o-", label=name)
        _style(ax, "Best setting and hard-label control per epoch", "epoch", "errors")
        ax.legend(fontsize=FONT)
        r.png("sweep_curves.png", fig, "Errors after each epoch of the best run and the control: whether the margin "
              "holds over training or is one epoch's luck.")


def report(path: str | os.PathLike, out: str | os.PathLike, *, sample_rows: int = DEFAULT_SAMPLE_ROWS, seed: int = 0,
           eval_data: str | None = None, eval_labels: str | None = None) -> dict:
    """Write PNGs and ``out/index.html`` for a transfer set, a train-student run folder, a demo or a sweep folder.

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
    kind = _kind(path)
    _figure()  # fail early, with the install hint, before any work
    return _write_page(path, out, kind, sample_rows, seed, eval_data, eval_labels)


def _kind(path: Path) -> str:
    if (path / "manifest.json").is_file():
        return "transfer set"
    if (path / "config.json").is_file():
        return "run"
    if (path / "results.json").is_file():
        return "demo"
    if (path / "sweep.json").is_file():
        return "sweep"
    raise TransferSetError(f"{path}: not a transfer set (manifest.json), a run folder (config.json), a demo "
                           "folder (results.json) or a sweep folder (sweep.json)")


def _write_page(path: Path, out: Path, kind: str, sample_rows: int, seed: int, eval_data: str | None,
                eval_labels: str | None, up: str | None = None) -> dict:
    """One page (and, for a demo, its linked pages); ``up`` links back to the page that links here."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TransferSetError(f"cannot create {out}: {e.strerror or e}", 1) from None
    name = printable(path.resolve().name)
    r = Report(out, f"transferset report: {kind} {name}", f"Report on the {kind} {name}")
    if up:
        r.link("Back to ", up, "the demo page", ".")
    pages = []
    if kind == "transfer set":
        _report_set(path, r, sample_rows, seed)
    elif kind == "run":
        _report_run(path, r, sample_rows, eval_data, eval_labels)
    elif kind == "sweep":
        _report_sweep(path, r)
    else:
        pages = _report_demo(path, r, out, sample_rows, seed)
    index = r.write()
    return {"kind": kind, "index": str(index), "pngs": [str(out / p) for p in r.pngs] + pages}
