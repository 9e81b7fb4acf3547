#!/usr/bin/env python3
"""How far label's float32 soft-target maths (schema 4) lands from the float64 maths sets were written with
before (schema 1-3), in what a set stores: the float16 values of soft_targets (and a top-k set's kept
log-probabilities, tails and log-partitions, computed by the same pass).

For random ensembles (4 members, weights 0.1..0.4, ``mean-probs``, label's default temperatures 1, 2, 4, 8, 20)
at several class counts and logit scales, it prints the fraction of float16 values that differ, the largest
absolute difference, and the largest difference in float16 steps; and the largest difference before rounding.

    python scripts/targets_precision.py [--rows 2000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transferset.labelling.half import to_float16  # noqa: E402
from transferset.targets import soft_targets  # noqa: E402

TEMPS = [1.0, 2.0, 4.0, 8.0, 20.0]


def measure(rows: int, classes: int, scale: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w = np.array([0.1, 0.2, 0.3, 0.4])
    out = {"classes": classes, "logit_scale": scale, "values": 0, "differ": 0, "max_abs": 0.0, "max_steps": 0.0,
           "max_abs_float32": 0.0}
    step_rows = max(1, (4 << 20) // (classes * len(TEMPS)))
    for a in range(0, rows, step_rows):
        z = (rng.normal(size=(min(step_rows, rows - a), 4, classes)) * scale).astype(np.float32)
        ref = soft_targets(z, TEMPS, "mean-probs", w)
        got = soft_targets(z, TEMPS, "mean-probs", w, dtype=np.float32)
        h64, h32 = ref.astype(np.float16), to_float16(got)
        d = np.abs(h64.astype(np.float64) - h32.astype(np.float64))
        steps = d / np.spacing(np.maximum(np.abs(h64), np.abs(h32))).astype(np.float64)
        out["values"] += int(h64.size)
        out["differ"] += int((h64 != h32).sum())
        out["max_abs"] = max(out["max_abs"], float(d.max()))
        out["max_steps"] = max(out["max_steps"], float(steps.max()))
        out["max_abs_float32"] = max(out["max_abs_float32"], float(np.abs(got - ref).max()))
    out["fraction"] = out["differ"] / out["values"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = [measure(a.rows, c, s) for c in (10, 1000, 32000) for s in (1.0, 5.0, 20.0)]
    print(f"{'classes':>8} {'scale':>6} {'float16 values':>15} {'differ':>8} {'fraction':>10} {'max abs':>9} "
          f"{'steps':>6} {'float32 max abs':>16}")
    for r in res:
        print(f"{r['classes']:>8} {r['logit_scale']:>6g} {r['values']:>15,} {r['differ']:>8,} {r['fraction']:>10.2e} "
              f"{r['max_abs']:>9.4g} {r['max_steps']:>6g} {r['max_abs_float32']:>16.3g}")
    if a.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
