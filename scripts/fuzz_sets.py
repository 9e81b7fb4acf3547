#!/usr/bin/env python3
"""Fuzz the readers with damaged transfer sets: random byte flips in shards and field edits in manifests.

Each case builds a small good set (tests/conftest.py's builders; every other case a per-position set), damages it one random way, and runs ``verify``,
``info`` and ``train-student`` on it in this process, as tests/run_crafted.py does: an alarm stops a command at
30 s (a hang), an audit hook records Python-level opens outside the set's folder, and any exception other than
the CLI's own exit is a traceback. The goal is 0 tracebacks, 0 hangs and 0 reads outside, whatever the damage;
refusing in one line or accepting harmlessly are both fine.

    python scripts/fuzz_sets.py --cases 500 --seed 0 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import run_crafted as rc  # noqa: E402
from conftest import make_token_set, make_transfer_set  # noqa: E402
from crafted import make_outside  # noqa: E402

_VALUES = [None, True, -1, 0, 1, 7, 10 ** 12, 1e308, -0.0, 3.5, "", "x", "../../etc/passwd", "/etc/passwd",
           "\x00", [], [1, 2], {}, {"a": 1}, "shard-00000.h5", "float64", "object", 99]


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    yield path


def edit_manifest(root: Path, rng: random.Random) -> str:
    """Replace, delete or duplicate one random node of the manifest's JSON."""
    m = json.loads((root / "manifest.json").read_text())
    paths = [p for p in _leaves(m) if p]
    path = rng.choice(paths)
    node = m
    for k in path[:-1]:
        node = node[k]
    how = rng.choice(["replace", "replace", "delete"])
    if how == "delete" and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = rng.choice(_VALUES)
    (root / "manifest.json").write_text(json.dumps(m))
    return f"manifest {how} {'/'.join(map(str, path))}"


def flip_bytes(root: Path, rng: random.Random, rehash: bool) -> str:
    """Flip 1 to 64 random bytes of one shard (and, half the time, fix its sha256 and size in the manifest)."""
    m = json.loads((root / "manifest.json").read_text())
    entry = rng.choice([s for s in m["shards"] if s["rows"] > 0])
    p = root / entry["path"]
    data = bytearray(p.read_bytes())
    n = rng.randint(1, 64)
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= rng.randint(1, 255)
    p.write_bytes(bytes(data))
    if rehash:
        rc_sha = __import__("transferset._io", fromlist=["sha256_file"]).sha256_file
        entry["sha256"], entry["bytes"] = rc_sha(p), p.stat().st_size
        (root / "manifest.json").write_text(json.dumps(m))
    return f"{n} byte flips in {entry['path']}{' (checksum fixed)' if rehash else ''}"


def run(cases: int, seed: int) -> dict:
    sys.addaudithook(rc._audit)
    signal.signal(signal.SIGALRM, rc._alarm)
    rng = random.Random(seed)
    summary = {"cases": cases, "commands": 0, "refused": 0, "accepted": 0, "tracebacks": [], "hangs": [],
               "reads_outside": [], "multi_line": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for i in range(cases):
            case = Path(d) / f"c{i}"
            root, outside = case / "set", case / "outside"
            make_outside(outside)
            tokens = i % 3 == 1  # every third case a per-position set (a language-model teacher's)
            hinted = i % 3 == 2  # and every third a set with hints (issue 23), which train-student then reads
            if tokens:
                make_token_set(root, seed=i)
            else:
                make_transfer_set(root, shard_rows=(7, 0, 13, 1), seed=i, hints=hinted)
            kind = rng.random()
            what = edit_manifest(root, rng) if kind < 0.5 else flip_bytes(root, rng, rehash=kind < 0.8)
            rc._watch["outside"], rc._watch["opened"] = str(outside), []
            for argv in (["verify", str(root)], ["info", str(root), "--json"],
                         ["train-student", "--transfer-set", str(root), "--out", str(case / "run"), "--student",
                          "lm:1,8,2" if tokens else "mlp:8", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                          "-q"] + (["-T", "1"] if tokens else [])
                         + (["--hint-loss", "rkd:hint_0=body.1", "--hint-loss", "ab:hint_1=body.1"] if hinted else [])):
                r = rc._run(argv)
                summary["commands"] += 1
                tag = f"case {i} ({what}): {argv[0]}"
                if r["crash"]:
                    summary["tracebacks"].append(f"{tag}: {r['crash']}")
                if r["timed_out"]:
                    summary["hangs"].append(tag)
                if rc._watch["opened"]:
                    summary["reads_outside"].append(f"{tag}: {rc._watch['opened']}")
                if r["code"] not in (0, None) and r["stderr_lines"] != 1:
                    summary["multi_line"].append(f"{tag}: {r['stderr']}")
                summary["refused" if r["code"] else "accepted"] += 1
                rc._watch["opened"] = []
            rc._watch["outside"] = None
            import shutil

            shutil.rmtree(case, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary["loadavg"] = os.getloadavg()[0]
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    s = run(a.cases, a.seed)
    if a.json:
        print(json.dumps(s))
    else:
        print(f"{s['cases']} cases, {s['commands']} commands in {s['seconds']} s (peak RSS {s['peak_rss_mb']} MB): "
              f"{s['refused']} refused, {s['accepted']} accepted; {len(s['tracebacks'])} tracebacks, "
              f"{len(s['hangs'])} hangs, {len(s['reads_outside'])} reads outside, {len(s['multi_line'])} refusals "
              "longer than one line")
        for key in ("tracebacks", "hangs", "reads_outside", "multi_line"):
            for line in s[key][:10]:
                print(f"  {key}: {line}")
    bad = s["tracebacks"] or s["hangs"] or s["reads_outside"] or s["multi_line"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
