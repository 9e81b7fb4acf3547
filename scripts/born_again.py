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

BEGIN, END = "<!-- begin born-again -->", "<!-- end born-again -->"


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
    p.add_argument("--train-rows", type=int, default=None, help="first N training images (smoke runs)")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "RESULTS.md")
    p.add_argument("--no-results", action="store_true")
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
    lab = LabelOptions(labels=paths["train_y"], limit=a.train_rows, temperatures=sorted({1.0, 2.0, 4.0, 8.0, a.temperature}),
                       threads=a.threads, device="cpu", quiet=True)

    def train(gen: int, ts: Path, alpha: float) -> Path:
        run = out / f"gen{gen}"
        train_student(ts, run, TrainOptions(student=a.student, alpha=alpha, temperature=a.temperature,
                                            epochs=a.epochs, lr=a.lr, seed=gen, device="cpu", threads=a.threads,
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
        label([runs[-1] / "student.onnx"], paths["train_x"], ts, lab)
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
    res = {"rows": rows, "lineage": lineage, "train_rows": read_manifest(set0).rows, "wall_s": time.time() - t_start, "load": [load0, os.getloadavg()[0]]}
    (out / "born_again.json").write_text(json.dumps(res, indent=1))
    cmd = " ".join(shlex.quote(x) for x in ["python", "scripts/born_again.py", *(argv or sys.argv[1:])])
    text = section(res, a, cmd)
    print(text)
    if not a.no_results:
        write_section(a.results, text)
    return res


def section(r: dict, a, command: str) -> str:
    rows = r["rows"]
    lines = ["## Born-again generations on MNIST (Furlanello et al. 2018)", "",
             f"Command: `{command}`  ",
             f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, Python {platform.python_version()}, torch "
             f"{__import__('torch').__version__}, {a.threads} torch thread(s); wall time {r['wall_s'] / 60:.1f} min; "
             f"1-minute load average {r['load'][0]:.1f} at the start, {r['load'][1]:.1f} at the end.  ",
             f"Every generation is `{a.student}`, {a.epochs} epochs (AdamW lr {a.lr:g}, cosine), on the "
             f"{r['train_rows']:,} clean training images. Generation 0 learns from their hard labels alone; generation k+1 from a transfer set "
             f"labelled by generation k's ONNX export (T = {a.temperature:g}, alpha {a.alpha:g}; seed = generation). "
             "Lineage: each set's manifest names its teacher's sha256, which the script checks is the previous "
             "generation's export, and each run's config.json the hash of the set it learnt from.", "",
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
              f"{len(rows)} generations {rows[-1]['ensemble_errors']}. One seed per generation: a difference of a "
              "few errors is within what another seed moves."]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{BEGIN}\n{body}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
