#!/usr/bin/env python3
"""Born-again networks (Furlanello et al. 2018) on MNIST, through transferset's two stages only.

Generation 0 is a student trained on the hard labels of the MNIST training images (``alpha 0``). Generation k+1
has the same architecture and learns from a transfer set labelled by generation k's ONNX export
(``transferset.label`` with that one file as the ensemble), then is exported in turn. Lineage is in the sets
themselves: set k+1's manifest names its teacher by file and sha256 (generation k's export), and generation k's
run folder (config.json) names the manifest hash of the set it learnt from; the script checks the chain.

Each generation and the ensemble of generations 0..k (mean of probabilities) are scored on the 10,000 test images;
the section of docs/RESULTS.md between its markers is rewritten from the run, its command at its head.

    python scripts/born_again.py --out /tmp/born-again --generations 3
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import hashlib
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

def markers(section: str) -> tuple[str, str]:
    """The RESULTS.md markers of a section (``born-again`` keeps the first run's markers)."""
    tag = "born-again" if section == "born-again" else f"born-again:{section}"
    return f"<!-- begin {tag} -->", f"<!-- end {tag} -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("born-again"))
    p.add_argument("--generations", type=int, default=3, help="born-again generations after generation 0")
    p.add_argument("--student", default="mlp:800,800")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--views", type=int, default=0,
                   help="jittered (+-2 px) views per image in every set, beside its clean row: each teacher labels "
                        "rows it did not see as they are, and generation 0 trains on the same rows' hard labels")
    p.add_argument("--gen0-seeds", type=int, default=0,
                   help="also train generation 0 with this many other seeds (100, 101, ...): the seed spread")
    p.add_argument("--fresh-views", action="store_true",
                   help="set k's views drawn with seed k: each teacher labels jittered rows it never trained on")
    p.add_argument("--train-rows", type=int, default=None, help="first N training images (smoke runs)")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "RESULTS.md")
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--section", default="born-again",
                   help="name of this run's section in RESULTS.md (another name keeps the other runs' sections)")
    return p.parse_args(argv)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch

    from transferset.demo import mnist_paths, shipped_teachers
    from transferset.evaluate import evaluate
    from transferset.format.manifest import manifest_hash
    from transferset.format.parts import read_manifest
    from transferset.labelling.pipeline import LabelOptions, label
    from transferset.training.loop import TrainOptions, train_student

    torch.set_num_threads(a.threads)
    t_start, load0 = time.time(), os.getloadavg()[0]
    paths = mnist_paths()
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    lab = LabelOptions(labels=paths["train_y"], limit=a.train_rows, augment="jitter:2" if a.views else None,
                       views=a.views, seed=0, temperatures=sorted({1.0, 2.0, 4.0, 8.0, a.temperature}),
                       threads=a.threads, device="cpu", quiet=True)

    def train(gen: int, ts: Path, alpha: float, seed: int | None = None) -> Path:
        run = out / (f"gen{gen}" if seed is None else f"gen{gen}-seed{seed}")
        train_student(ts, run, TrainOptions(student=a.student, alpha=alpha, temperature=a.temperature,
                                            epochs=a.epochs, lr=a.lr, seed=gen if seed is None else seed,
                                            device="cpu", threads=a.threads,
                                            resume=True, quiet=True, export_onnx=str(run / "student.onnx")))
        if not (run / "student.onnx").exists():  # a run completed before without its export
            raise SystemExit(f"{run}: no student.onnx; delete the folder and run again")
        return run

    # generation 0: hard labels only. A transfer set needs a labeller, so set 0 is labelled by the shipped MLP
    # teacher, whose soft targets alpha = 0 never reads: only the images and their labels reach generation 0.
    set0 = out / "set0"
    label([shipped_teachers("mlp")[0]["path"]], paths["train_x"], set0, lab)
    runs = [train(0, set0, 0.0)]
    sets = [set0]
    for g in range(1, a.generations + 1):
        ts = out / f"set{g}"
        label([runs[-1] / "student.onnx"], paths["train_x"], ts, replace(lab, seed=g) if a.fresh_views else lab)
        sets.append(ts)
        runs.append(train(g, ts, a.alpha))
        print(f"generation {g} trained", flush=True)
    # the lineage, checked: set g's teacher is generation g-1's export, which learnt from set g-1
    lineage = []
    for g in range(a.generations + 1):
        cfg = json.loads((runs[g] / "config.json").read_text())
        if cfg["manifest_hash"] != manifest_hash(read_manifest(sets[g])):
            raise SystemExit(f"lineage broken: {runs[g]} did not learn from {sets[g]}")
        teacher = read_manifest(sets[g]).teachers[0]
        if g > 0 and teacher["sha256"] != sha256(runs[g - 1] / "student.onnx"):
            raise SystemExit(f"lineage broken: {sets[g]}'s teacher is not generation {g - 1}'s export")
        lineage.append({"generation": g, "set": str(sets[g]), "teacher": teacher.get("file"),
                        "teacher_sha256": teacher["sha256"], "set_manifest_hash": cfg["manifest_hash"],
                        "export_sha256": sha256(runs[g] / "student.onnx")})
    rows = []
    for g in range(a.generations + 1):
        one = evaluate([str(runs[g] / "student.onnx")], paths["test_x"], paths["test_y"], device="cpu")
        ens = evaluate([str(r / "student.onnx") for r in runs[:g + 1]], paths["test_x"], paths["test_y"],
                       device="cpu") if g else one
        rows.append({"generation": g, "errors": one["errors"], "nll": one["nll"], "ece": one["ece"],
                     "ensemble_errors": ens["errors"], "ensemble_nll": ens["nll"]})
        print(rows[-1], flush=True)
    # the yardstick: generation 0 again with other seeds (the same rows and steps)
    spread = [evaluate([str(train(0, set0, 0.0, seed) / "student.onnx")], paths["test_x"], paths["test_y"],
                       device="cpu")["errors"] for seed in range(100, 100 + a.gen0_seeds)]
    curve = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines() if x.strip()]
    res = {"rows": rows, "lineage": lineage, "gen0_other_seeds": spread, "gen0_train_ce": [round(x["hard"], 4) for x in curve], "train_rows": read_manifest(set0).rows, "wall_s": time.time() - t_start, "load": [load0, os.getloadavg()[0]]}
    (out / "born_again.json").write_text(json.dumps(res, indent=1))
    cmd = " ".join(shlex.quote(x) for x in ["python", "scripts/born_again.py", *(argv or sys.argv[1:])])
    text = section(res, a, cmd)
    print(text)
    if not a.no_results:
        write_section(a.results, text, a.section)
    return res


def section(r: dict, a, command: str) -> str:
    rows = r["rows"]
    title = "## Born-again generations on MNIST (Furlanello et al. 2018)"
    lines = [title + (f": {a.section}" if a.section != "born-again" else ""), "",
             f"Command: `{command}`  ",
             f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, Python {platform.python_version()}, torch "
             f"{__import__('torch').__version__}, {a.threads} torch thread(s); wall time {r['wall_s'] / 60:.1f} min; "
             f"1-minute load average {r['load'][0]:.1f} at the start, {r['load'][1]:.1f} at the end.  ",
             f"Every generation is `{a.student}`, {a.epochs} epochs (AdamW lr {a.lr:g}, cosine), on the "
             f"{r['train_rows']:,} rows of every set ("
             + (f"the 60,000 training images, each as its clean row and {a.views} jittered views, "
                + ("drawn afresh for every set (seed = set), so each teacher labels views it never trained on"
                   if a.fresh_views else "the same in every set")
                if a.views else "the clean training images") + "). Generation 0 learns from their hard labels alone; generation k+1 from a transfer set "
             f"labelled by generation k's ONNX export (T = {a.temperature:g}, alpha {a.alpha:g}; seed = generation). "
             "Lineage: each set's manifest names its teacher's sha256, which the script checks is the previous "
             "generation's export, and each run's config.json the hash of the set it learnt from.  ",
             "Generation 0's training cross-entropy by epoch (is it trained to convergence?): "
             + ", ".join(f"{v:.4f}" for v in r["gen0_train_ce"]) + ".", "",
             "| generation | test errors | NLL | ECE | ensemble of generations 0..k: errors | its NLL |",
             "|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        lines.append(f"| {x['generation']} | {x['errors']} | {x['nll']:.4f} | {x['ece']:.4f} | "
                     f"{x['ensemble_errors'] if x['generation'] else '-'} | "
                     f"{x['ensemble_nll']:.4f} |" if x["generation"] else
                     f"| 0 | {x['errors']} | {x['nll']:.4f} | {x['ece']:.4f} | - | - |")
    errs = [x["errors"] for x in rows]
    better = all(b < a_ for a_, b in zip(errs, errs[1:]))
    verdict = ("each generation made fewer test errors than the one before" if better else
               f"the generations did not improve one after another (test errors {', '.join(map(str, errs))})")
    lines += ["", f"Reading (written by the script from the numbers above): {verdict}; the last generation made "
              f"{errs[-1]} errors against generation 0's {errs[0]}, and the ensemble of all "
              f"{len(rows)} generations {rows[-1]['ensemble_errors']}. " + (
              f"Generation 0 trained again with seeds {', '.join(str(100 + i) for i in range(len(r['gen0_other_seeds'])))} "
              f"made {', '.join(map(str, r['gen0_other_seeds']))} errors: the spread one seed moves."
              if r.get("gen0_other_seeds") else "One seed per generation: a difference of a few errors is within "
              "what another seed moves.")]
    return "\n".join(lines)


def write_section(path: Path, body: str, section: str = "born-again") -> None:
    BEGIN, END = markers(section)
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{BEGIN}\n{body}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
