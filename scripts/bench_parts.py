"""Labelling in parts on one machine: 2 parts with 1 ONNX Runtime thread each vs 1 process with 2 threads.

Both legs run ``transferset label`` as subprocesses over the same rows, teachers, batch and shard size (the
parts' leg starts ``--part 1/2`` and ``--part 2/2`` at once and is timed until both have exited, the merge
included). Legs are interleaved over ``--repeats`` rounds and the median of each is reported; the ratio
``parts rows/s / one rows/s`` is the figure of issue 14 (goal >= 0.9 on a 2-core machine). A third leg starts two
claiming workers (``label --claim``, 1 thread each) at once: ``claim rows/s / one rows/s`` is issue 25's figure
(goal >= 0.9). Usage::

    python scripts/bench_parts.py                 # 4 MLP teachers 784-1200-1200-10, 20000 MNIST rows
    python scripts/bench_parts.py --quick --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_setup import ROOT, machine, make_teachers, mnist_rows  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _label(paths, data: Path, out: Path, a, threads: int, part: str | None = None, claim: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "transferset", "label", "--ensemble", *map(str, paths), "--data", str(data),
           "--out", str(out), "--scale", "0.00392156862745098", "--batch-size", str(a.batch_size),
           "--shard-size", str(a.shard_size), "--threads", str(threads), "--device", "cpu", "-q"]
    return cmd + (["--part", part] if part else []) + (["--claim"] if claim else [])


def _timed(cmds: list[list[str]], out: Path) -> float:
    """Seconds from starting every command at once until the last has exited (each must succeed)."""
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in cmds]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"label failed: {err.decode(errors='replace')[-500:]}")
    sec = time.perf_counter() - t
    if not (out / "manifest.json").exists():
        raise SystemExit(f"{out}: no merged manifest")
    return sec


def measure(a, tmp: Path) -> dict:
    """Time both legs, interleaved over ``a.repeats`` rounds, in the folder ``tmp``."""
    paths = make_teachers(tmp / "teachers")[0]
    data = tmp / "rows.npy"
    np.save(data, mnist_rows(a.rows))
    legs = {"one": [], "parts": [], "claim": []}
    load0 = os.getloadavg()
    for _ in range(a.repeats):
        legs["one"].append(_timed([_label(paths, data, tmp / "one", a, 2)], tmp / "one"))
        legs["parts"].append(_timed([_label(paths, data, tmp / "parts", a, 1, f"{i}/2") for i in (1, 2)],
                                    tmp / "parts"))
        legs["claim"].append(_timed([_label(paths, data, tmp / "claim", a, 1, claim=True) for _ in (1, 2)],
                                    tmp / "claim"))
    rate = {k: a.rows / statistics.median(v) for k, v in legs.items()}
    return {"rows": a.rows, "batch_size": a.batch_size, "shard_size": a.shard_size, "members": len(paths),
            "repeats": a.repeats, "rows_per_s": {k: round(v, 1) for k, v in rate.items()},
            "seconds": {k: [round(s, 3) for s in v] for k, v in legs.items()},
            "ratio": round(rate["parts"] / rate["one"], 4), "claim_ratio": round(rate["claim"] / rate["one"], 4),
            "loadavg_before": [round(v, 2) for v in load0],
            "machine": machine()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=2048, help="rows per shard (the parts share them out)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smoke run (few rows, one round), seconds")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.rows, a.repeats, a.shard_size = min(a.rows, 1024), 1, min(a.shard_size, 256)
    tmp = Path(a.workdir or tempfile.mkdtemp(prefix="bench_parts-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        res = measure(a, tmp)
    finally:
        if not a.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    rate = res["rows_per_s"]
    print(f"parts benchmark: {a.rows} rows, {res['members']} members, batch {a.batch_size}, shard {a.shard_size}, "
          f"median of {a.repeats} interleaved rounds; load average before {res['loadavg_before']}, after "
          f"{res['machine']['loadavg']}")
    print(f"{'1 process, 2 ORT threads':<40}{rate['one']:>10,.0f} rows/s")
    print(f"{'2 parts at once, 1 ORT thread each':<40}{rate['parts']:>10,.0f} rows/s")
    print(f"{'2 claiming workers, 1 ORT thread each':<40}{rate['claim']:>10,.0f} rows/s")
    print(f"ratio = {res['ratio']:.3f} (goal >= 0.90); claim ratio = {res['claim_ratio']:.3f} (goal >= 0.90)")
    if a.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
