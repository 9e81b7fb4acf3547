"""Tuning runs for scripts/lm_task.py's quality goal: one student per configuration, scored on the held-out text.

Each ``--run NAME:ROWS:ALPHA:LR:STEPS:SEED[:KEY=VALUE,...]`` trains the ``--student`` (lm_task's defaults
otherwise: topk:32 at T = 1, batch 8, AdamW, warmup 5%, gradient norm clipped at 5) for STEPS steps on the first
ROWS rows of the packed corpus, alpha 0 being CE alone, and appends one JSON line to ``--log``; the optional keys
are ``T`` (the set labelled at T = 1 and T, the soft term at T), ``warmup``, ``clip`` (0: off) and ``codec``
(topk32 or dense: dense costs 2 V bytes a token); a NAME already in the log is not trained again. ``--results``
writes the table of every logged run between ``<!-- begin run:lm_tune -->`` markers.

    python scripts/lm_tune.py --workdir /tmp/lm_tune --log /tmp/lm_tune/runs.jsonl --results docs/RESULTS.md \\
        --run ce-60:600:0:0.003:60:0 --run kd-60:600:1:0.003:60:0 --run ce-300:600:0:0.003:300:0 \\
        --run kd-300:600:1:0.003:300:0 --run a5-300:600:0.5:0.003:300:0
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import lm_task  # noqa: E402


#: ``--run``'s optional sixth field: ``KEY=VALUE`` pairs joined by ``,`` (defaults: lm_task's)
EXTRAS = {"T": 1.0, "warmup": 0.05, "clip": 5.0, "codec": "topk32"}


def _extras(spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) not in (6, 7):
        raise SystemExit(f"--run {spec}: want NAME:ROWS:ALPHA:LR:STEPS:SEED[:KEY=VALUE,...]")
    out = dict(EXTRAS)
    for kv in (parts[6].split(",") if len(parts) == 7 and parts[6] else []):
        k, _, v = kv.partition("=")
        if k not in EXTRAS:
            raise SystemExit(f"--run {spec}: unknown key {k!r} (known: {', '.join(EXTRAS)})")
        out[k] = v if k == "codec" else float(v)
    if out["codec"] not in ("topk32", "dense"):
        raise SystemExit(f"--run {spec}: codec is topk32 or dense, got {out['codec']!r}")
    return out


def _run(spec: str, a, held) -> dict:
    name, rows, alpha, lr, steps, seed = spec.split(":")[:6]
    x = _extras(spec)
    temps = tuple(sorted({1.0, x["T"]}))
    tag = "" if temps == (1.0,) else "-T" + ",".join(f"{t:g}" for t in temps)
    folder = lm_task._label(Path(a.workdir) / f"{x['codec']}-{rows}{tag}", "topk:32" if x["codec"] == "topk32"
                            else "dense", int(rows), a, temps)
    a.lr, a.temperature, a.warmup, a.clip_grad = float(lr), x["T"], x["warmup"], x["clip"]
    r = lm_task._train(name, folder, a, held, alpha=float(alpha), seed=int(seed), steps=int(steps))
    return {**r, "rows": int(rows), "lr": float(lr), "student": a.student, "batch": a.batch, **x}


def _key(r: dict) -> tuple:
    """What a kd run shares with the CE run it is compared to (T and codec do not touch a CE run)."""
    return r["rows"], r["lr"], r["steps"], r["seed"], r.get("warmup", 0.05), r.get("clip", 5.0)


def write_results(records: list[dict], path: Path, command: str) -> None:
    lines = ["## Tuning the per-token student (issue 21)", "", f"`{command}`", "",
             "Each row one `lm:` student on the first `rows` rows of the packed corpus labelled as lm_task labels it "
             "(`codec` topk32: topk:32, one member; dense: every id), scored on the same held-out text as lm_task; "
             "`T`: the stored temperature the soft term uses (the set then holds T = 1 and T); `warmup`: linear "
             "warm-up as a fraction of the steps, then cosine; `clip`: max gradient norm; `kd/CE`: its perplexity "
             "over the CE run's (alpha 0) with the same rows, lr, steps, seed, warm-up and clip; `share`: for a "
             "topk32 run with a dense twin (same options otherwise), (CE - topk) / (CE - dense), not judged where dense did "
             "not beat CE.", "",
             "| run | rows | codec | alpha | T | lr | warmup | clip | steps | seed | held-out perplexity | "
             "next-token acc. | kd/CE | share |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ce = {_key(r): r["perplexity"] for r in records if r["alpha"] == 0}
    dense = {_key(r) + (r["alpha"], r.get("T", 1.0)): r["perplexity"] for r in records
             if r["alpha"] > 0 and r.get("codec") == "dense"}  # older log lines spell it "topk:32"
    for r in records:
        base = ce.get(_key(r))
        rel = f"{r['perplexity'] / base:.3f}" if base and r["alpha"] > 0 else ""
        d = dense.get(_key(r) + (r["alpha"], r.get("T", 1.0))) if r.get("codec", "topk32") != "dense" else None
        share = "" if not (base and d and r["alpha"] > 0) else \
            f"{(base - r['perplexity']) / (base - d):.3f}" if base > d else "dense >= CE"
        lines.append(f"| {r['name']} | {r['rows']} | {r.get('codec', 'topk32').replace(':', '')} | {r['alpha']:g} | "
                     f"{r.get('T', 1.0):g} | {r['lr']:g} | {r.get('warmup', 0.05):g} | {r.get('clip', 5.0):g} | "
                     f"{r['steps']} | {r['seed']} | {r['perplexity']:.1f} | {r['accuracy']:.4f} | {rel} | {share} |")
    begin, end = "<!-- begin run:lm_tune -->", "<!-- end run:lm_tune -->"
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n" + "\n".join(lines) + f"\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--log", required=True, help="JSON lines, one a run (appended)")
    ap.add_argument("--run", action="append", default=[], metavar="NAME:ROWS:ALPHA:LR:STEPS:SEED[:KEY=VALUE,...]",
                    help="keys: " + ", ".join(f"{k} (default {v})" for k, v in EXTRAS.items()))
    ap.add_argument("--student", default="lm:2,64,4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--results", default=None)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    a.seq_len, a.threads, a.temperature, a.heldout_rows = 128, 1, 1.0, 200
    a.teacher = str(lm_task.TEACHER)
    log = Path(a.log)
    done = {json.loads(x)["name"]: json.loads(x) for x in log.read_text().splitlines() if x.strip()} \
        if log.exists() else {}
    for s in a.run:
        _extras(s)
    todo = [s for s in a.run if s.split(":")[0] not in done]
    if todo:
        held = lm_task.open_token_rows(text=str(lm_task.TEXT / "pydocs-heldout.jsonl"),
                                       tokenizer=str(lm_task.TEXT / "tokenizer.json"), seq_len=128, limit=200)
        for spec in todo:
            r = _run(spec, a, held)
            done[r["name"]] = r
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")
    if a.results:
        names = [s.split(":")[0] for s in a.run]
        cmd = "python scripts/lm_tune.py --workdir /tmp/lm_tune --log /tmp/lm_tune/runs.jsonl --results " \
              "docs/RESULTS.md " + " ".join(f"--run {s}" for s in a.run)
        write_results([done[n] for n in names if n in done], Path(a.results), cmd)


if __name__ == "__main__":
    main()
