"""Per-token distillation of the shipped LM teacher into a small `lm:` student, against next-token CE alone.

Steps (all through the library, as the CLI runs them):

1. label the shipped corpus (data/text/pydocs.jsonl, packed into rows of ``--seq-len``) with the shipped teacher
   (data/teachers/lm-teacher.onnx) as a topk:32 set at T = 1 (first ``--rows`` rows); the same for the first
   ``--dense-rows`` rows as a dense set and as a topk:32 set (dense costs 2 V bytes a token per field, so it is
   labelled on a subset only);
2. bytes per token of every codec (topk:32, sample:32, systematic:32, dense and the extra codecs) from the shard
   layout and the files;
3. students ``--student``, same steps, seeds ``--seeds``: CE alone (alpha 0) vs kd from topk:32 on the full set;
   on the subset CE vs topk:32 vs dense (the share of dense's perplexity gain over CE that topk:32 keeps); with
   ``--extra-codecs sample:32,systematic:32,topk:64`` (old spelling ``--sampled``) the same subset labelled with
   each of these codecs and kd students from it (sample:K / systematic:K: the unbiased estimator over the whole
   vocabulary; topk:K: the kept log-probs and the tail bin, as topk:32; same steps, alpha and T), with the share of
   dense's gain each keeps and its bytes per token; the four losses (kd, reverse-kl, jsd, tvd) from topk:32 on the
   full set, first seed;
4. every student scored on the held-out documents (data/text/pydocs-heldout.jsonl, never trained on): perplexity,
   next-token accuracy, top-1 agreement with the teacher and KL(teacher || student) at T = 1; and the teacher's own
   mass outside its top K there (K = 32 and each extra topk:K).

``--results docs/RESULTS.md`` writes the section between ``<!-- begin run:lm_task -->`` markers.

    python scripts/lm_task.py --workdir /tmp/lm_task --results docs/RESULTS.md
    python scripts/lm_task.py --workdir /tmp/lm_smoke --smoke      # tiny, for CI-sized checks
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transferset.errors import TransferSetError  # noqa: E402
from transferset.format.parts import read_manifest  # noqa: E402
from transferset.format.schema import row_bytes, shard_layout  # noqa: E402
from transferset.labelling.pipeline import LabelOptions, label  # noqa: E402
from transferset.lm_metrics import lm_metrics, open_token_rows  # noqa: E402
from transferset.training.loop import TrainOptions, train_student  # noqa: E402

TEXT = ROOT / "data" / "text"
TEACHER = ROOT / "data" / "teachers" / "lm-teacher.onnx"


def _label(out: Path, codec: str, rows: int, a, temperatures: tuple[float, ...] | None = None) -> Path:
    if not (out / "manifest.json").exists() or not read_manifest(out).complete:
        label([str(TEACHER)], None, out, LabelOptions(
            text=str(TEXT / "pydocs.jsonl"), tokenizer=str(TEXT / "tokenizer.json"), seq_len=a.seq_len, limit=rows,
            codec=codec, temperatures=temperatures or tuple(sorted({1.0, a.temperature})), batch_size=16, shard_size=4096, threads=a.threads, quiet=True,
            overwrite=True))
    return out


def _bytes_per_token(folder: Path) -> dict:
    m = read_manifest(folder)
    tokens = m.rows * m.positions
    files = sum(s.bytes for s in m.shards)
    return {"layout": row_bytes(shard_layout(m)) / m.positions, "file": files / max(tokens, 1)}


def _train(name: str, folder: Path, a, held, *, loss: str = "kd", alpha: float, seed: int, steps: int,
           reference: bool = False) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    run = Path(a.workdir) / "runs" / name
    rows = read_manifest(folder).rows
    epochs = max(1, math.ceil(steps * a.batch / rows))
    t0 = time.perf_counter()
    kw = dict(student=a.student, loss=loss, alpha=alpha, temperature=a.temperature if alpha > 0 else 1.0, beta=0.5,
              lr=a.lr, weight_decay=0.01, epochs=epochs, max_steps=steps, batch_size=a.batch, seed=seed,
              threads=a.threads, quiet=True, warmup=getattr(a, "warmup", 0.05),
              clip_grad=getattr(a, "clip_grad", 5.0) or None)
    res = None
    if getattr(a, "reuse", False):  # a finished (or killed) run with the same options and set: train-student's resume
        try:
            res = train_student(folder, run, TrainOptions(**kw, resume=True))
        except TransferSetError:  # the folder holds a run with other options or another set: trained over below
            res = None
    if res is None:
        res = train_student(folder, run, TrainOptions(**kw, overwrite=True))
    from transferset.evaluate import load_student_checkpoint

    model = load_student_checkpoint(run / "student.pt", "cpu")
    ev = lm_metrics(model, held, reference=a.teacher if reference else None, batch_size=16)
    out = {"name": name, "loss": loss, "alpha": alpha, "seed": seed, "steps": res.metrics[-1]["steps"],
           "seconds": round(time.perf_counter() - t0, 1), **{k: ev[k] for k in ev}}
    print(json.dumps(out), flush=True)
    return out


def _distinct_ids(folder: Path) -> float:
    """Mean distinct ids a sampled set keeps per real position (its K draws hit some ids more than once)."""
    from transferset.format.reading import TransferSet

    ts = TransferSet(folder)
    kept, n = 0, 0
    for _, b in ts.blocks(("sample_count", "length"), 256):
        real = np.arange(b["sample_count"].shape[1])[None, :] < b["length"][:, None]
        kept += int(((b["sample_count"][:, :, 0] > 0).sum(-1) * real).sum())
        n += int(real.sum())
    return kept / max(n, 1)


def _teacher_tail(held, k: int) -> dict:
    """How much of the held-out text the teacher's top ``k`` covers: the share of next tokens among its top k, its
    mean tail mass, and the share of its held-out NLL that the tokens outside its top k carry (what a topk:k set
    at alpha 1 tells the student nothing about: the student's spread over the tail ids gets no target)."""
    return _teacher_tails(held, [k])[0]


def _teacher_tails(held, ks: list[int]) -> list[dict]:
    """:func:`_teacher_tail` for each of ``ks``, the teacher run once over the held-out rows."""
    from transferset.inputs.tokens import token_labels
    from transferset.lm_metrics import logits_fn

    run = logits_fn(str(TEACHER))
    acc = {k: [0, 0.0, 0.0, 0.0] for k in ks}  # inside, tail mass, NLL inside, NLL outside
    n = 0
    for a in range(0, held.rows, 16):
        ids, length = held.ids[a:a + 16], held.length[a:a + 16]
        lab = token_labels(ids, length)
        has = lab >= 0
        z = run(ids).astype(np.float64)
        lp = z - z.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(lp, np.where(has, lab, 0)[..., None], -1)[..., 0][has]
        n += int(has.sum())
        for k in ks:
            top = np.argpartition(-lp, k, axis=-1)[..., :k]
            hit = (top == np.where(has, lab, 0)[..., None]).any(-1)[has]
            s = acc[k]
            s[0] += int(hit.sum())
            s[1] += float((1 - np.exp(np.take_along_axis(lp, top, -1)).sum(-1))[has].sum())
            s[2] += float(nll[hit].sum())
            s[3] += float(nll[~hit].sum())
    return [{"k": k, "covered": acc[k][0] / max(n, 1), "tail_mass": acc[k][1] / max(n, 1),
             "tail_nll_share": acc[k][3] / max(acc[k][2] + acc[k][3], 1e-12)} for k in ks]


def _train_all(specs: list[tuple], a, held) -> list[dict]:
    """Every student run of ``specs`` (``(name, folder, kwargs)``), ``--jobs`` at a time in spawned processes."""
    if a.jobs <= 1:
        return [_train(n, f, a, held, **kw) for n, f, kw in specs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_train, n, f, a, held, **kw) for n, f, kw in specs]
        return [f.result() for f in futures]


def run(a) -> dict:
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    held = open_token_rows(text=str(TEXT / "pydocs-heldout.jsonl"), tokenizer=str(TEXT / "tokenizer.json"),
                           seq_len=a.seq_len, limit=a.heldout_rows)
    teacher = lm_metrics(str(TEACHER), held, batch_size=16)
    print("teacher", json.dumps(teacher), flush=True)
    tag = "" if a.temperature == 1.0 else f"-T{a.temperature:g}"
    full = _label(work / f"topk32{tag}", "topk:32", a.rows, a)
    whole = a.dense_rows == a.rows and a.sub_steps == a.steps  # dense on the whole set: CE and topk are the main runs
    sub_topk = full if whole else _label(work / f"sub-topk32{tag}", "topk:32", a.dense_rows, a)
    sub_dense = _label(work / (f"dense-{a.rows}{tag}" if whole else f"sub-dense{tag}"), "dense", a.dense_rows, a)
    small = _label(work / f"small-topk32-{a.small_rows}{tag}", "topk:32", a.small_rows, a) if a.small_rows else None
    # the sampled codecs on the dense comparison's rows, so each shares its CE and dense students
    extra = _extra_codecs(a)
    sampled = {c: _label(work / f"{'' if whole else 'sub-'}{c.replace(':', '')}{tag}", c, a.dense_rows, a)
               for c in extra}
    sizes = {}
    for codec in dict.fromkeys(("topk:32", "sample:32", "systematic:32", "dense", *extra)):
        f = _label(work / f"bytes-{codec.replace(':', '')}", codec, a.bytes_rows, a, (1.0,))
        sizes[codec] = _bytes_per_token(f)
    seeds = [int(s) for s in a.seeds.split(",")]
    specs = []
    for s in seeds:
        specs.append((f"ce-{s}", full, dict(alpha=0.0, seed=s, steps=a.steps, reference=True)))
        specs.append((f"topk-{s}", full, dict(alpha=a.alpha, seed=s, steps=a.steps, reference=True)))
    for s in seeds:
        if not whole:
            specs.append((f"sub-ce-{s}", sub_topk, dict(alpha=0.0, seed=s, steps=a.sub_steps)))
            specs.append((f"sub-topk-{s}", sub_topk, dict(alpha=a.alpha, seed=s, steps=a.sub_steps)))
        specs.append((f"sub-dense-{s}", sub_dense, dict(alpha=a.alpha, seed=s, steps=a.sub_steps)))
    for c, folder in sampled.items():  # codec by codec: the first codec's seeds finish first
        for s in seeds:
            specs.append((f"sub-{c.replace(':', '')}-{s}", folder, dict(alpha=a.alpha, seed=s, steps=a.sub_steps,
                                                                      reference=True)))
    if small is not None:
        for s in seeds:
            specs.append((f"small-ce-{s}", small, dict(alpha=0.0, seed=s, steps=a.steps)))
            specs.append((f"small-topk-{s}", small, dict(alpha=a.alpha, seed=s, steps=a.steps)))
    for loss in () if a.no_losses else ("reverse-kl", "jsd", "tvd"):
        specs.append((f"{loss}-{seeds[0]}", full, dict(loss=loss, alpha=a.alpha, seed=seeds[0], steps=a.steps,
                                                       reference=True)))
    done = {r["name"]: r for r in _train_all(specs, a, held)}
    main = [done[n] for n, _, _ in specs if re.fullmatch(r"(ce|topk)-\d+", n)]
    if whole:
        for s in seeds:
            done[f"sub-ce-{s}"], done[f"sub-topk-{s}"] = ({**done[f"{k}-{s}"], "name": f"sub-{k}-{s}"}
                                                         for k in ("ce", "topk"))
    sub = [done[f"sub-{k}-{s}"] for s in seeds for k in ("ce", "topk", "dense")]
    few = [done[n] for n, _, _ in specs if n.startswith("small-")]
    distinct = {c: _distinct_ids(f) if c.partition(":")[0] != "topk" else float(c.partition(":")[2])
                for c, f in sampled.items()}
    by_codec = [{**done[f"sub-{c.replace(':', '')}-{s}"], "codec": c, "distinct": distinct[c]}
                for c in sampled for s in seeds]
    losses = [] if a.no_losses else \
        [done[f"topk-{seeds[0]}"]] + [done[f"{x}-{seeds[0]}"] for x in ("reverse-kl", "jsd", "tvd")]
    m = read_manifest(full)
    tails = _teacher_tails(held, sorted({32} | {int(c.partition(":")[2]) for c in sampled if c.startswith("topk:")}))
    return {"args": vars(a), "teacher": teacher, "tail": tails[0], "tails": tails, "sizes": sizes, "main": main,
            "sub": sub, "small": few, "losses": losses, "sampled": by_codec,
            "set": {"rows": m.rows, "positions": m.positions, "tokens": m.source.get("tokens"),
                    "vocab": m.num_classes, "teacher_top1": m.stats.get("ensemble_accuracy")},
            "heldout": {"rows": held.rows, "tokens": int(held.length.sum())},
            "seconds": round(time.perf_counter() - t0, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end"}


def _extra_codecs(a) -> list[str]:
    """The ``--extra-codecs`` (old spelling ``--sampled``): ``sample:K``, ``systematic:K`` and ``topk:K`` with K other
    than 32, checked: a wrong name fails before any work. An old result's args hold them under ``sampled``."""
    from transferset.format.schema import parse_codec

    given = getattr(a, "extra_codecs", None) or getattr(a, "sampled", "") or ""
    out = list(dict.fromkeys(c.strip() for c in given.split(",") if c.strip()))
    for c in out:
        try:
            family, k = parse_codec(c)
        except (TransferSetError, ValueError) as e:
            raise SystemExit(f"--extra-codecs {c}: {e}") from None
        if family == "dense" or c == "topk:32":
            raise SystemExit(f"--extra-codecs {c}: only sample:K, systematic:K and topk:K with K other than 32 "
                             "(topk:32 and dense run anyway)")
    return out


_sampled_codecs = _extra_codecs  # the old name


def _ppl(rows: list[dict], name: str) -> list[float]:
    return [r["perplexity"] for r in rows if re.fullmatch(name + r"-\d+", r["name"])]


def _shown(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (no machine's absolute path in RESULTS.md)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


def _sampled_lines(r: dict, topk_share: list[float], sce: list[float], sdn: list[float]) -> list[str]:
    """The extra codecs (sampled and topk:K) beside topk:32 and dense: per seed each student's held-out numbers, its
    set's bytes per token (layout and file) and the share of dense's perplexity gain over CE it keeps, then per
    codec the shares against the 90% bar and, for topk:K, the teacher's held-out mass outside its top K."""
    rows = r.get("sampled") or []
    if not rows:
        return []
    a, sizes = r["args"], r["sizes"]
    seeds = a["seeds"].split(",")
    codecs = list(dict.fromkeys(x["codec"] for x in rows))
    drawn = [c for c in codecs if not c.startswith("topk:")]
    kept = [c for c in codecs if c.startswith("topk:")]
    tails = {t["k"]: t for t in r.get("tails") or ([r["tail"]] if r.get("tail") else [])}
    tk = [x for x in r["sub"] if x["name"].startswith("sub-topk-")]
    what = []
    if drawn:
        what.append(f"{', '.join(drawn)} (K draws per position from the teacher at T, stored as distinct ids and "
                    "counts; the loss is the estimate -sum (n_i / K) log q(c_i) of the cross-entropy over the whole "
                    "vocabulary, unbiased)")
    if kept:
        what.append(f"{', '.join(kept)} (the teacher's K most probable ids with their log-probs and the exact tail "
                    "mass; the loss is kd with the tail bin, as topk:32)")
    title = "**Sampled codecs at the same K**" if not kept else "**Other codecs and K**"
    out = [f"{title}: kd students from {' and '.join(what)}, sets of the same rows, with the same CE term, alpha, T, "
           "steps and seeds, beside the topk:32 and dense students above. `B/token`: the set's bytes per token "
           f"(layout / file, as in the bytes table below). `share`: (CE - codec) / (CE - dense) in held-out "
           "perplexity, per seed.", "",
           "| codec | B/token (layout / file) | seed | held-out perplexity | next-token acc. | top-1 agreement | "
           "KL(teacher \\|\\| student) | share of dense's gain |", "|---|---|---|---|---|---|---|---|"]
    ok = min(c - d for c, d in zip(sce, sdn)) > 0

    def shares(ppl):
        return [(c - k) / (c - d) if c != d else float("nan") for c, k, d in zip(sce, ppl, sdn)]

    def size(c):
        v = sizes.get(c, {})
        return v.get("layout", float("nan")), v.get("file", float("nan"))

    for i, s_ in enumerate(seeds):
        out.append(f"| topk:32 | {size('topk:32')[0]:.1f} / {size('topk:32')[1]:.1f} | {s_} | "
                   f"{tk[i]['perplexity']:.2f} | {tk[i]['accuracy']:.4f} | {_opt(tk[i], 'reference_agreement')} | "
                   f"{_opt(tk[i], 'kl_to_reference')} | {topk_share[i]:.3f} |")
    summary = []
    for c in codecs:
        mine = [x for x in rows if x["codec"] == c]
        g = shares([x["perplexity"] for x in mine])
        b, f = size(c)
        for s_, x, gi in zip(seeds, mine, g):
            out.append(f"| {c} | {b:.1f} / {f:.1f} | {s_} | {x['perplexity']:.2f} | {x['accuracy']:.4f} | "
                       f"{_opt(x, 'reference_agreement')} | {_opt(x, 'kl_to_reference')} | {gi:.3f} |")
        k = int(c.partition(":")[2])
        if c.startswith("topk:"):
            t = tails.get(k)
            ids = f"{k} ids kept per position" + (
                f"; on the held-out text the teacher's mass outside its top {k} is {t['tail_mass']:.3f} on average "
                f"and the next token lies there at {1 - t['covered']:.1%} of positions" if t else "")
        else:
            ids = f"{mine[0].get('distinct', float('nan')):.1f} distinct ids kept per position on average"
        summary.append(f"- {c} ({b:.1f} B/token layout, {f:.1f} file, {ids}): shares "
                       f"{', '.join(f'{x:.3f}' for x in g)}, median {np.median(g):.3f}: "
                       + ("at least 0.9 at every seed." if min(g) >= 0.9 else
                          f"under 0.9 (best seed {max(g):.3f}, worst {min(g):.3f})."))
    t32 = tails.get(32)
    head = ("At the 90% bar of the quality goal (stated for topk:32, whose shares are "
            f"{', '.join(f'{x:.3f}' for x in topk_share)} at {size('topk:32')[0]:.1f} B/token"
            + (f", the teacher's held-out mass outside its top 32 {t32['tail_mass']:.3f}" if t32 else "")
            + "; here the same bar for each codec)")
    return out + ["", head + (":" if ok else ": dense did not beat CE at every seed, so the shares are not judged:"),
                  "", *summary, ""]


def _opt(row: dict, key: str) -> str:
    return f"{row[key]:.4f}" if key in row else ""


def write_results(r: dict, path: Path) -> None:
    a, t = r["args"], r["teacher"]
    ce, kd = _ppl(r["main"], "ce"), _ppl(r["main"], "topk")
    sce, stk, sdn = _ppl(r["sub"], "sub-ce"), _ppl(r["sub"], "sub-topk"), _ppl(r["sub"], "sub-dense")
    ratio = [k / c for k, c in zip(kd, ce)]
    share = [(c - k) / (c - d) if c != d else float("nan") for c, k, d in zip(sce, stk, sdn)]
    extra = ",".join(_extra_codecs(argparse.Namespace(**{k: a.get(k) for k in ("extra_codecs", "sampled")})))
    cmd = (f"python scripts/lm_task.py --workdir {a.get('workdir') or '/tmp/lm_task'} --results docs/RESULTS.md"
           + "".join(f" --{k.replace('_', '-')} {v}" for k, v in a.items()
                     if k in ("rows", "dense_rows", "small_rows", "steps", "sub_steps", "student", "seeds", "alpha",
                              "temperature", "lr", "batch", "warmup", "clip_grad") and v not in ("", None))
           + (f" --extra-codecs {extra}" if extra else "") + (" --no-losses" if a.get("no_losses") else ""))
    lines = [
        "## Per-token distillation: an `lm:` student from the LM teacher (issue 21)", "",
        f"`{cmd}` ({r['seconds']:.0f} s on {r['machine']}). Teacher: {_shown(a['teacher'])} (data/teachers/teachers.json: "
        f"its command, seed and log), V = {r['set']['vocab']}; held-out: {r['heldout']['tokens']} tokens of "
        f"documents never trained on, where the teacher has perplexity **{t['perplexity']:.1f}** and next-token "
        f"accuracy {t['accuracy']:.3f}. Set: {r['set']['rows']} rows x {r['set']['positions']} positions of the "
        f"packed corpus, topk:32 at T = {', '.join(f'{x:g}' for x in sorted({1.0, a['temperature']}))}, one member. "
        f"Students `{a['student']}`, {a['steps']} steps of "
        f"{a['batch']} rows, AdamW lr {a['lr']} (linear warm-up over {a.get('warmup', 0.05):g} of the steps, then "
        f"cosine; gradient norm clipped at {a.get('clip_grad', 5.0):g}), alpha {a['alpha']} (the CE student: alpha 0, the same set and "
        f"steps), T = {a['temperature']:g}; scored once at the end.", "",
        "| student | seed | held-out perplexity | next-token acc. | top-1 agreement with teacher | KL(teacher \\|\\| student) |",
        "|---|---|---|---|---|---|"]
    for row in r["main"]:
        lines.append(f"| {'CE only' if row['alpha'] == 0 else 'kd from topk:32'} | {row['seed']} | "
                     f"{row['perplexity']:.2f} | {row['accuracy']:.4f} | {row['reference_agreement']:.4f} | "
                     f"{row['kl_to_reference']:.4f} |")
    lines += ["", f"**Quality goal (perplexity <= 0.92 x CE)**: kd/CE = {', '.join(f'{x:.3f}' for x in ratio)} "
              f"(seeds {a['seeds']}); mean {np.mean(ratio):.3f}: "
              + ("met at every seed." if ratio and max(ratio) <= 0.92 else
                 f"not met (the worst seed {max(ratio):.3f}, {max(ratio) - 0.92:.3f} above 0.92)." if ratio else ""), ""]
    sm = r.get("small") or []
    if sm:
        c_s, k_s = _ppl(sm, "small-ce"), _ppl(sm, "small-topk")
        rs = [k / c for k, c in zip(k_s, c_s)]
        lines += [f"**Fewer rows**: the same students, steps and seeds on the first {a['small_rows']} rows of the set "
                  f"only ({a['steps'] * a['batch'] / max(a['small_rows'], 1):.0f} passes over them, against "
                  f"{a['steps'] * a['batch'] / max(r['set']['rows'], 1):.1f} above):", "",
                  "| seed | CE only | kd from topk:32 | kd/CE | next-token acc. CE / kd |", "|---|---|---|---|---|"]
        by = {(x["name"].rsplit("-", 1)[0], x["seed"]): x for x in sm}
        for s_ in a["seeds"].split(","):
            c, k = by[("small-ce", int(s_))], by[("small-topk", int(s_))]
            lines.append(f"| {s_} | {c['perplexity']:.2f} | {k['perplexity']:.2f} | "
                         f"{k['perplexity'] / c['perplexity']:.3f} | {c['accuracy']:.4f} / {k['accuracy']:.4f} |")
        lines += ["", f"On {a['small_rows']} rows kd/CE = mean {np.mean(rs):.3f} (worst seed {max(rs):.3f}): "
                  + ("within the goal's 0.92 at every seed." if max(rs) <= 0.92 else "above 0.92."), ""]
    tl = r.get("tail")
    if tl:
        lines += [f"What the topk:{tl['k']} set leaves out, on the held-out text: the next token is among the teacher's "
                  f"top {tl['k']} at {tl['covered']:.1%} of positions; the teacher's tail mass is {tl['tail_mass']:.3f} "
                  f"on average, and the positions whose next token lies in its tail carry {tl['tail_nll_share']:.1%} of "
                  "its held-out NLL. The topk loss gives the student the tail's total mass, not how to spread it over "
                  f"the {r['set']['vocab'] - tl['k']:,} ids it holds (its gradient on a tail id is proportional to the "
                  "student's own probability there), so only the CE term (1 - alpha) teaches that spread.", ""]
    lines += [
              (f"**topk:32 vs dense**, on the whole set (dense costs 2 V bytes per field a token; the CE and topk:32 "
               "students are those of the first table), the same steps:" if a["dense_rows"] == a["rows"] and
               a["sub_steps"] == a["steps"] else
               f"**topk:32 vs dense**, on the first {a['dense_rows']} rows (dense costs 2 V bytes per field a token), "
               f"{a['sub_steps']} steps each:"), "",
              "| seed | CE only | topk:32 | dense | share of dense's gain kept by topk:32 |", "|---|---|---|---|---|"]
    for s, c, k, d, g in zip(a["seeds"].split(","), sce, stk, sdn, share):
        lines.append(f"| {s} | {c:.2f} | {k:.2f} | {d:.2f} | {g:.3f} |")
    gains = [c - d for c, d in zip(sce, sdn)]
    lines += ["", (f"Goal (>= 90% of the gain at every seed): shares {', '.join(f'{g:.3f}' for g in share)}, median "
                   f"{np.median(share):.3f}: " + ("met." if min(share) >= 0.9 else
                                                  f"not met (the best seed {max(share):.3f}, the worst {min(share):.3f}).")
                   if min(gains) > 0 else
                   "Dense did not beat CE at every seed here, so the share is not meaningful: goal not judged."), "",
              ]
    lines += _sampled_lines(r, share, sce, sdn)
    if r["losses"]:
        lines += [f"**Four losses**, topk:32 with its tail bin, seed {a['seeds'].split(',')[0]}, same steps:", "",
                  "| loss | held-out perplexity | next-token acc. | top-1 agreement | KL(teacher \\|\\| student) |",
                  "|---|---|---|---|---|"]
    for row in r["losses"]:
        lines.append(f"| {row['loss']} | {row['perplexity']:.2f} | {row['accuracy']:.4f} | "
                     f"{row['reference_agreement']:.4f} | {row['kl_to_reference']:.4f} |")
    lines += ["", "**Bytes per token** (one member, T = 1, float16; `layout`: the shard fields' bytes per token, "
              "per-row fields spread over the row's positions; `file`: the HDF5 files' bytes over the tokens of a "
              f"{a['bytes_rows']}-row set):", "", "| codec | layout B/token | file B/token |", "|---|---|---|"]
    for codec, v in r["sizes"].items():
        lines.append(f"| {codec} | {v['layout']:.1f} | {v['file']:.1f} |")
    tk = r["sizes"]["topk:32"]["layout"]
    lines += ["", f"Storage goal (topk:32 <= 140 B/token): {tk:.1f}: {'met' if tk <= 140 else 'not met'}.", ""]
    body = "\n".join(lines)
    begin, end = "<!-- begin run:lm_task -->", "<!-- end run:lm_task -->"
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> dict:
    global TEACHER
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--results", default=None, help="write the section into this markdown file")
    ap.add_argument("--teacher", default=str(ROOT / "data" / "teachers" / "lm-teacher.onnx"), help="the decoder ONNX (default: the shipped LM teacher)")
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--dense-rows", type=int, default=32)
    ap.add_argument("--bytes-rows", type=int, default=16)
    ap.add_argument("--heldout-rows", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--student", default="lm:2,64,4")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sub-steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=0.05, help="linear warm-up as a fraction of the steps, then cosine")
    ap.add_argument("--clip-grad", type=float, default=5.0, help="max gradient norm (0: off)")
    ap.add_argument("--temperature", type=float, default=1.0, help="the stored temperature the students learn at")
    ap.add_argument("--small-rows", type=int, default=0,
                    help="also CE vs kd on the first N rows only, the same steps and seeds (0: not run)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="student runs at a time (spawned processes)")
    ap.add_argument("--reuse", action="store_true",
                    help="a run already in --workdir/runs with the same options and set is resumed (scored as it is "
                         "when finished), not trained again: train-student's resume check decides; others train over")
    ap.add_argument("--no-losses", action="store_true", help="leave out the reverse-kl, jsd and tvd students")
    ap.add_argument("--extra-codecs", "--sampled", dest="extra_codecs", default="", metavar="CODECS",
                    help="also kd students from these codecs (sample:K, systematic:K, topk:K with K other than 32; "
                         "e.g. sample:32,systematic:32,topk:64; --sampled is the old spelling) on the dense "
                         "comparison's rows and steps, beside topk:32 and dense")
    ap.add_argument("--smoke", action="store_true", help="a few rows and steps: checks the script runs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--from-json", default=None, metavar="FILE",
                    help="write the section from a result this script printed with --json (no labelling, no training)")
    a = ap.parse_args(argv)
    _extra_codecs(a)
    if a.from_json:
        r = json.loads(Path(a.from_json).read_text())
        if a.results:
            write_results(r, Path(a.results))
        return r
    if a.smoke:
        whole = a.dense_rows == a.rows and a.sub_steps == a.steps
        a.rows, a.dense_rows, a.bytes_rows, a.heldout_rows, a.steps, a.sub_steps, a.seeds = 16, 4, 2, 4, 3, 2, "0"
        if whole:
            a.dense_rows, a.sub_steps = a.rows, a.steps
        a.small_rows = min(a.small_rows, 8)
    TEACHER = Path(a.teacher)
    if not TEACHER.is_file():
        raise SystemExit(f"{TEACHER} is missing: run scripts/train_lm_teacher.py first")
    import torch

    torch.set_num_threads(a.threads)
    r = run(a)
    if a.results:
        write_results(r, Path(a.results))
    if a.json:
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
