#!/usr/bin/env python3
"""Fuzz the readers with damaged transfer sets: byte flips in shards, edits, non-numbers and bad offsets in
manifests, unchunked shards.

Each case builds a small good set (tests/conftest.py's builders: a plain set, a per-position set of a language-model
teacher, a set with hints or a per-frame set, in turn) and damages it one random way: a random manifest node
replaced or deleted (25%), 1-64 byte flips in a shard, checksum fixed or not (25%), a non-number (NaN, infinity, a
whole number past 64 bits, a string, a nested object) anywhere in the manifest, its statistics, positions and hint
entries included (15%), a shard's row_start, rows or bytes out of range (15%), every shard rewritten unchunked with
a random declared chunk size (10%), or a count past the format's limits (temperatures, classes, members, positions,
hints: 10%). It runs ``verify``, ``info`` and ``train-student`` on it as tests/run_crafted.py does, each in a child
forked from this process: an alarm stops a command at 30 s (a hang), an audit hook records Python-level opens
outside the set's folder, any exception other than the CLI's own exit is a traceback, and the child's peak RSS
must stay under 1 GB. The goal is 0 of each, whatever the damage; refusing in one line or accepting harmlessly are
both fine.

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

import h5py  # noqa: E402
import run_crafted as rc  # noqa: E402
from conftest import make_frame_set, make_token_set, make_transfer_set  # noqa: E402
from crafted import make_outside  # noqa: E402

from transferset._io import sha256_file  # noqa: E402

_VALUES = [None, True, -1, 0, 1, 7, 10 ** 12, 1e308, -0.0, 3.5, "", "x", "../../etc/passwd", "/etc/passwd",
           "\x00", [], [1, 2], {}, {"a": 1}, "shard-00000.h5", "float64", "object", 99]
#: where numbers go: values out of any range a reader holds (json.dumps writes NaN and Infinity as such)
_NON_NUMBERS = [float("nan"), float("inf"), -float("inf"), 2 ** 63, 2 ** 64, 2 ** 70, -2 ** 63 - 1, 2 ** 63 - 1, 2 ** 48 + 1,
                -1, 10 ** 12, "7", "1e400", {"a": {"b": [1]}}, [[1], [2]], None, True, 1e308]
#: what a shard entry's offsets may be set to, and a contiguous set's declared chunk rows
_OFFSETS = [2 ** 64, 2 ** 70, -1, -7, -2 ** 63 - 1, 2 ** 63 - 1, 2 ** 48, 2 ** 48 + 1, 10 ** 12, 10 ** 6, 3, 0]
_CHUNK_ROWS = [1000, 10 ** 6, 10 ** 12, 2 ** 31, 2 ** 48, 2 ** 63 - 1, 2 ** 64, 2 ** 70, 0, -1, 1]


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


def _with_stats(m: dict) -> None:
    """Full statistics in ``m`` (a set labelled by ``label`` has them): the places the non-number generator damages."""
    members, temps = m["num_members"], len(m["temperatures"])
    m["stats"] = {"rows": m["stats"]["rows"], "labelled_rows": 14, "member_accuracy": [0.5] * members,
                  "ensemble_accuracy": 0.5, "mean_entropy": {f"{t:g}": 1.2 for t in m["temperatures"]}}
    for s in m["shards"]:
        s["stats"] = {"labelled": 1, "member_correct": [1] * members, "ensemble_correct": 1,
                      "entropy_sum": [1.0] * temps}


def past_limits(root: Path, rng: random.Random) -> str:
    """Declare one count past what a set may (temperatures, classes, members, positions, hints, K)."""
    m = json.loads((root / "manifest.json").read_text())
    choices = [("temperatures", [float(1 + i) for i in range(rng.choice([65, 1000]))]),
               ("num_classes", rng.choice([(1 << 20) + 1, 1 << 24])), ("num_members", 257),
               ("codec", f"topk:{rng.choice([10 ** 9, 10 ** 10, 1 << 24])}")]
    if m.get("positions") is not None:
        choices.append(("positions", rng.choice([1 << 20, (1 << 20) + 1, 1 << 19])))
    if m.get("hints"):
        choices.append(("hints", m["hints"] * 33))
    key, value = rng.choice(choices)
    m[key] = value
    (root / "manifest.json").write_text(json.dumps(m))
    return f"past the limits: {key} ({len(value) if isinstance(value, list) else value})"


def non_number(root: Path, rng: random.Random) -> str:
    """Put a non-number (NaN, infinity, a whole number past 64 bits, a string, a nested object, ...) at a random
    place of the manifest, statistics included."""
    m = json.loads((root / "manifest.json").read_text())
    _with_stats(m)
    path = rng.choice([p for p in _leaves(m) if p])
    node = m
    for k in path[:-1]:
        node = node[k]
    value = rng.choice(_NON_NUMBERS)
    node[path[-1]] = value
    (root / "manifest.json").write_text(json.dumps(m))
    return f"non-number {value!r:.30} at {'/'.join(map(str, path))}"


def bad_offset(root: Path, rng: random.Random) -> str:
    """Set a shard entry's row_start, rows or bytes out of range (past 64 bits, negative, past the shard)."""
    m = json.loads((root / "manifest.json").read_text())
    i = rng.randrange(len(m["shards"]))
    key = rng.choice(["row_start", "row_start", "rows", "bytes"])
    value = rng.choice(_OFFSETS)
    m["shards"][i][key] = value
    (root / "manifest.json").write_text(json.dumps(m))
    return f"shard {i} {key} = {value}"


def unchunked(root: Path, rng: random.Random) -> str:
    """Rewrite every shard with contiguous (unchunked) datasets, the manifest declaring a random chunk size."""
    m = json.loads((root / "manifest.json").read_text())
    for s in m["shards"]:
        p = root / s["path"]
        with h5py.File(p, "r") as f:
            data = {n: f[n][()] for n in f}
        with h5py.File(p, "w") as f:
            for n, a in data.items():
                f.create_dataset(n, data=a)
        s["sha256"] = sha256_file(p)
    m["chunk_rows"] = rng.choice(_CHUNK_ROWS)
    (root / "manifest.json").write_text(json.dumps(m))
    return f"unchunked, chunk_rows {m['chunk_rows']}"


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
        entry["sha256"], entry["bytes"] = sha256_file(p), p.stat().st_size
        (root / "manifest.json").write_text(json.dumps(m))
    return f"{n} byte flips in {entry['path']}{' (checksum fixed)' if rehash else ''}"


def run(cases: int, seed: int) -> dict:
    sys.addaudithook(rc._audit)
    signal.signal(signal.SIGALRM, rc._alarm)
    rng = random.Random(seed)
    summary = {"cases": cases, "commands": 0, "refused": 0, "accepted": 0, "tracebacks": [], "hangs": [],
               "reads_outside": [], "multi_line": [], "over_1gb": [], "peak_command_rss_mb": 0.0}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for i in range(cases):
            case = Path(d) / f"c{i}"
            root, outside = case / "set", case / "outside"
            make_outside(outside)
            tokens = i % 4 == 1  # every fourth case a per-position set (a language-model teacher's)
            hinted = i % 4 == 2  # one a set with hints (issue 23), which train-student then reads
            frames = i % 4 == 3  # and one a per-frame set (float input, a distribution per frame)
            if tokens:
                make_token_set(root, seed=i)
            elif frames:
                make_frame_set(root, seed=i)
            else:
                make_transfer_set(root, shard_rows=(7, 0, 13, 1), seed=i, hints=hinted)
            kind = rng.random()
            if kind < 0.25:
                what = edit_manifest(root, rng)
            elif kind < 0.5:
                what = flip_bytes(root, rng, rehash=kind < 0.4)
            elif kind < 0.65:
                what = non_number(root, rng)
            elif kind < 0.8:
                what = bad_offset(root, rng)
            elif kind < 0.9:
                what = unchunked(root, rng)
            else:
                what = past_limits(root, rng)
            rc._watch["outside"], rc._watch["opened"] = str(outside), []
            for argv in (["verify", str(root)], ["info", str(root), "--json"],
                         ["train-student", "--transfer-set", str(root), "--out", str(case / "run"), "--student",
                          "lm:1,8,2" if tokens else "crnn:4,8" if frames else "mlp:8", "--epochs", "1",
                          "--batch-size", "4", "--device", "cpu", "-q"] + (["-T", "1"] if tokens or frames else [])
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
                if r["peak_rss_mb"] >= 1024:
                    summary["over_1gb"].append(f"{tag}: {r['peak_rss_mb']} MB")
                summary["peak_command_rss_mb"] = max(summary["peak_command_rss_mb"], r["peak_rss_mb"])
                summary["refused" if r["code"] else "accepted"] += 1
                rc._watch["opened"] = []
            rc._watch["outside"] = None
            import shutil

            shutil.rmtree(case, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # this process
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
        print(f"{s['cases']} cases, {s['commands']} commands in {s['seconds']} s (peak RSS of a command "
              f"{s['peak_command_rss_mb']} MB): {s['refused']} refused, {s['accepted']} accepted; "
              f"{len(s['tracebacks'])} tracebacks, {len(s['hangs'])} hangs, {len(s['reads_outside'])} reads outside, "
              f"{len(s['multi_line'])} refusals longer than one line, {len(s['over_1gb'])} over 1 GB")
        for key in ("tracebacks", "hangs", "reads_outside", "multi_line", "over_1gb"):
            for line in s[key][:10]:
                print(f"  {key}: {line}")
    bad = s["tracebacks"] or s["hangs"] or s["reads_outside"] or s["multi_line"] or s["over_1gb"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
