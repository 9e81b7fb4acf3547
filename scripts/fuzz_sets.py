#!/usr/bin/env python3
"""Fuzz the readers with damaged transfer sets: byte flips in shards, edits, non-numbers and bad offsets in
manifests, unchunked shards, a photo set's bad-file marks and its listing.

Each case builds a small good set (tests/conftest.py's builders: a plain set, a per-position set of a language-model
teacher, a set with hints, a per-frame set, or a copy of a photo set labelled at the start from a tiny folder with
one file that cannot be decoded, in turn) and damages it one random way: a random manifest node replaced or deleted
(22%), 1-64 byte flips in a shard, checksum fixed or not (23%), a non-number (NaN, infinity, a whole number past 64
bits, a string, a nested object) anywhere in the manifest, its statistics, positions and hint entries included
(13%), a shard's row_start, rows or bytes out of range (14%), every shard rewritten unchunked with a random declared
chunk size (10%), a count past the format's limits (temperatures, classes, members, positions, hints: 8%), or a
photo set's marks (issue 28) on any set: a shard's ``stats.skipped`` entries, ``source.bad_files``,
``source.format``, ``stats.skipped_files`` (10%). 60% of the photo cases are damaged in what only photo sets have
instead: those marks, the rows' own marks (labels, photo_box, photo_flip rewritten, checksum fixed), or the
``.photo-listing.json`` beside the set (a path out of the folder, to a FIFO or missing, labels that disagree, a node
replaced), with the shards and manifest removed half the time; ``label`` then runs first, resuming from it.
It runs ``verify``, ``info`` and ``train-student`` on it as tests/run_crafted.py does, each in a child
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
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
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


#: what a photo set's per-row marks may become: skipped entries ``[source_index, path, reason]`` and bad_files
_SKIPPED = [[0, "x.jpg", "r"], [-1, "x.jpg", "r"], [2 ** 47, "y.jpg", "r"], [2 ** 64, "y.jpg", "r"], [1, 7, "r"],
            [1, "../../outside/secret.bin", "r"], [1, "/etc/passwd", None], [1.5, "x", "r"], [1, "x"], [],
            ["1", "x", "r"], [True, "x", "r"], [1, "x", "r", "extra"], [float("nan"), "x", "r"], [1, "\x1b[2J", "r"]]
_BAD_FILES = ["kept", "dropped", None, "", 1, True, ["kept"], {"a": 1}]
#: where a photo set's listing may send label, and what else its nodes may become
_LISTED = ["../outside/secret.bin", "../outside/trap.fifo", "/etc/passwd", "", ".", "..", "c0", "\x00",
           "c0/0.png", "c1/bad.png", "c9/none.png"]
PHOTO_SIDE = 16


def make_photo_template(d: Path) -> tuple[Path, Path]:
    """``(case, teacher)``: a case folder holding ``photos/`` (3 classes of 2 photos and one file that cannot be
    decoded: its rows are marked, listed in its shard's ``stats.skipped``) and ``set/``, the photo set labelled
    from it (with its ``.photo-listing.json``), and the teacher. Every photo case copies the case folder.

    Built in a forked child: the threads torch and ONNX Runtime start must not be in this process, whose every
    command runs in a child forked from it (a fork taken while another thread holds a lock can deadlock)."""
    case, teacher = d / "photo-template", d / "photo-teacher.onnx"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _build_photo_template(case, teacher)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"could not build the photo set the photo cases copy (status {status})")
    return case, teacher


def _build_photo_template(case: Path, teacher: Path) -> None:
    from PIL import Image
    from teachers import export_teacher
    from transferset.labelling.pipeline import LabelOptions, label

    gen = np.random.default_rng(0)
    for c in range(3):
        folder = case / "photos" / f"c{c}"
        folder.mkdir(parents=True)
        for k in range(2):
            Image.fromarray(gen.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    (case / "photos" / "c1" / "bad.png").write_bytes(b"not a png")
    export_teacher(teacher, (3, PHOTO_SIDE, PHOTO_SIDE), classes=3)
    label([teacher], str(case / "photos"), case / "set", LabelOptions(**_PHOTO_OPTIONS, quiet=True))


_PHOTO_OPTIONS = {"crop": PHOTO_SIDE, "norm": "imagenet", "shard_size": 3, "decode_workers": 0,
                  "augment": f"rrc:{PHOTO_SIDE},flip", "views": 1}


def photo_label_argv(root: Path, teacher: Path) -> list[str]:
    """The command that made a photo case's set (label resumes it, reading its listing)."""
    return ["label", "--ensemble", str(teacher), "--data", str(root.parent / "photos"), "--out", str(root), "--crop",
            str(PHOTO_SIDE), "--norm", "imagenet", "--shard-size", "3", "--decode-workers", "0", "--augment",
            f"rrc:{PHOTO_SIDE},flip", "--views", "1", "-q"]


def photo_marks(root: Path, rng: random.Random) -> str:
    """Damage a photo set's bad-file marks (issue 28): a shard's ``stats.skipped`` entries, ``source.bad_files``,
    ``source.format`` or ``stats.skipped_files`` (on any set: an array set then claims photo marks)."""
    m = json.loads((root / "manifest.json").read_text())
    how = rng.choice(["skipped", "skipped", "skipped-list", "bad_files", "format", "skipped_files"])
    if how == "skipped":
        s = rng.choice(m["shards"])
        s.setdefault("stats", {})["skipped"] = [rng.choice(_SKIPPED) for _ in range(rng.randint(1, 4))]
        what = f"{s['path']} stats.skipped = {s['stats']['skipped']!r:.60}"
    elif how == "skipped-list":
        s = rng.choice(m["shards"])
        s.setdefault("stats", {})["skipped"] = rng.choice(_VALUES + [[[0, "x", "r"]] * 100000])
        what = f"{s['path']} stats.skipped = {s['stats']['skipped']!r:.40}"
    elif how in ("bad_files", "format"):
        key = "bad_files" if how == "bad_files" else "format"
        m["source"][key] = rng.choice(_BAD_FILES if how == "bad_files" else ["photos", "array", "npy", None, 3])
        what = f"source.{key} = {m['source'][key]!r}"
    else:
        m.setdefault("stats", {})["skipped_files"] = rng.choice(_NON_NUMBERS)
        what = f"stats.skipped_files = {m['stats']['skipped_files']!r:.30}"
    (root / "manifest.json").write_text(json.dumps(m))
    return f"photo marks: {what}"


def row_marks(root: Path, rng: random.Random) -> str:
    """Rewrite a photo shard's per-row marks (labels, photo_box, photo_flip) with random values, checksum fixed:
    a skipped row unmarked, a good row marked, crop boxes off the image or past 64 bits."""
    m = json.loads((root / "manifest.json").read_text())
    entry = rng.choice([s for s in m["shards"] if s["rows"] > 0])
    p = root / entry["path"]
    name = rng.choice(["labels", "photo_box", "photo_flip"])
    with h5py.File(p, "r+") as f:
        if name not in f:
            return f"row marks: {entry['path']} has no {name}"
        a = f[name][()]
        info = np.iinfo(a.dtype) if a.dtype.kind in "iu" else None
        pick = rng.choice([-1, 0, 1, 255, 10 ** 6] + ([int(info.min), int(info.max)] if info else []))
        a.flat[rng.randrange(a.size)] = np.asarray(pick).astype(a.dtype)
        f[name][...] = a
    entry["sha256"], entry["bytes"] = sha256_file(p), p.stat().st_size
    (root / "manifest.json").write_text(json.dumps(m))
    return f"row marks: {entry['path']} {name} = {pick}"


def photo_listing(root: Path, rng: random.Random) -> str:
    """Damage the set's ``.photo-listing.json`` (label's aid, which readers never read): a path out of the folder,
    to a FIFO or missing, labels that disagree, a node replaced or deleted; half the time the set's shards and
    manifest are removed too, so label starts from the listing (as a part or a claiming worker would)."""
    path = root / ".photo-listing.json"
    listing = json.loads(path.read_text())
    how = rng.choice(["path", "path", "node", "labels"])
    if how == "path":
        i = rng.randrange(len(listing["paths"]))
        listing["paths"][i] = rng.choice(_LISTED)
        what = f"paths[{i}] = {listing['paths'][i]!r}"
    elif how == "labels":
        listing["labels"] = rng.choice([[], [0] * 1000, [-5] * len(listing["paths"]), [2 ** 63] * len(listing["paths"]),
                                        None, "x"])
        what = f"labels = {listing['labels']!r:.30}"
    else:
        keys = [p for p in _leaves(listing) if p and p != ("data",)]
        key = rng.choice(keys)
        node = listing
        for k in key[:-1]:
            node = node[k]
        node[key[-1]] = rng.choice(_VALUES)
        what = f"{'/'.join(map(str, key))} = {node[key[-1]]!r:.30}"
    path.write_text(json.dumps(listing))
    fresh = rng.random() < 0.5
    if fresh:
        for f in list(root.glob("shard-*.h5")) + [root / "manifest.json"]:
            f.unlink()
    return f"listing {what}{' (fresh folder)' if fresh else ''}"


def _damaged_case(i: int, root: Path, rng: random.Random, photo_set: Path, teacher: Path) -> tuple[str, list]:
    """Build case ``i``'s set in ``root`` and damage it one random way: ``(what was done, commands to run first)``.

    The kinds take turns: a plain set, a per-position set (a language-model teacher's), a set with hints (issue 23),
    a per-frame set, and a photo set (issue 28) whose damage is its bad-file marks, its rows' marks or its listing
    60% of the time (label then runs first, resuming from the listing)."""
    kind = i % 5
    if kind == 4:
        shutil.copytree(photo_set, root.parent, dirs_exist_ok=True)
        pick = rng.random()
        if pick < 0.6:
            how = photo_listing if pick < 0.25 else row_marks if pick < 0.4 else photo_marks
            return how(root, rng), [photo_label_argv(root, teacher)] if how is photo_listing else []
    elif kind == 1:
        make_token_set(root, seed=i)
    elif kind == 3:
        make_frame_set(root, seed=i)
    else:
        make_transfer_set(root, shard_rows=(7, 0, 13, 1), seed=i, hints=kind == 2)
    pick = rng.random()
    for edge, how in ((0.22, edit_manifest), (0.45, flip_bytes), (0.58, non_number), (0.72, bad_offset),
                      (0.82, unchunked), (0.9, past_limits), (1.0, photo_marks)):
        if pick < edge:
            return (flip_bytes(root, rng, rehash=pick < 0.37) if how is flip_bytes else how(root, rng)), []
    raise AssertionError(pick)


def _train_argv(i: int, root: Path, case: Path) -> list[str]:
    """train-student on case ``i``'s set, with a student that fits its kind."""
    tokens, hinted, frames = i % 5 == 1, i % 5 == 2, i % 5 == 3
    return (["train-student", "--transfer-set", str(root), "--out", str(case / "run"), "--student",
             "lm:1,8,2" if tokens else "crnn:4,8" if frames else "mlp:8", "--epochs", "1", "--batch-size", "4",
             "--device", "cpu", "-q"] + (["-T", "1"] if tokens or frames else [])
            + (["--hint-loss", "rkd:hint_0=body.1", "--hint-loss", "ab:hint_1=body.1"] if hinted else [])
            + (["--source", str(case / "photos")] if i % 5 == 4 else []))


def run(cases: int, seed: int) -> dict:
    sys.addaudithook(rc._audit)
    signal.signal(signal.SIGALRM, rc._alarm)
    rng = random.Random(seed)
    summary = {"cases": cases, "commands": 0, "refused": 0, "accepted": 0, "tracebacks": [], "hangs": [],
               "reads_outside": [], "multi_line": [], "over_1gb": [], "peak_command_rss_mb": 0.0}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        photo_set, teacher = make_photo_template(Path(d))
        for i in range(cases):
            case = Path(d) / f"c{i}"
            root, outside = case / "set", case / "outside"
            make_outside(outside)
            what, commands = _damaged_case(i, root, rng, photo_set, teacher)
            commands += [["verify", str(root)], ["info", str(root), "--json"], _train_argv(i, root, case)]
            rc._watch["outside"], rc._watch["opened"] = str(outside), []
            for argv in commands:
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
