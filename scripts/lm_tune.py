"""Tuning runs for scripts/lm_task.py's quality goal: one student per configuration, scored on the held-out text.

Each ``--run NAME:ROWS:ALPHA:LR:STEPS:SEED`` trains the ``--student`` (lm_task's defaults otherwise: topk:32 at
T = 1, batch 8, AdamW, warmup 5%) for STEPS steps on the first ROWS rows of the packed corpus, alpha 0 being CE
alone, and appends one JSON line to ``--log``; a NAME already in the log is not trained again. ``--results``
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


def _run(spec: str, a, held) -> dict:
    name, rows, alpha, lr, steps, seed = spec.split(":")
    folder = lm_task._label(Path(a.workdir) / f"topk32-{rows}", "topk:32", int(rows), a, (1.0,))
    a.lr = float(lr)
    r = lm_task._train(name, folder, a, held, alpha=float(alpha), seed=int(seed), steps=int(steps))
    return {**r, "rows": int(rows), "lr": float(lr), "student": a.student, "batch": a.batch}


def write_results(records: list[dict], path: Path, command: str) -> None:
    lines = ["## Tuning the per-token student (issue 21)", "", f"`{command}`", "",
             "Each row one `lm:` student on the first `rows` rows of lm_task's topk:32 set (T = 1), scored on the "
             "same held-out text as lm_task; `kd/CE`: its perplexity over the CE run's with the same rows, lr and "
             "steps.", "", "| run | rows | alpha | lr | steps | seed | held-out perplexity | next-token acc. | kd/CE |",
             "|---|---|---|---|---|---|---|---|---|"]
    ce = {(r["rows"], r["lr"], r["steps"], r["seed"]): r["perplexity"] for r in records if r["alpha"] == 0}
    for r in records:
        base = ce.get((r["rows"], r["lr"], r["steps"], r["seed"]))
        rel = f"{r['perplexity'] / base:.3f}" if base and r["alpha"] > 0 else ""
        lines.append(f"| {r['name']} | {r['rows']} | {r['alpha']:g} | {r['lr']:g} | {r['steps']} | {r['seed']} | "
                     f"{r['perplexity']:.1f} | {r['accuracy']:.4f} | {rel} |")
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
    ap.add_argument("--run", action="append", default=[], metavar="NAME:ROWS:ALPHA:LR:STEPS:SEED")
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
