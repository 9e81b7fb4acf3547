"""Workers that come and go (issue 25): ``label --claim`` through lease files gives the bytes of one process.

The crash test (scripts/crash_test.py --claim) kills workers at random and starts new ones late; these tests check
the pieces it relies on, in seconds: concurrent workers, a late joiner, an expired lease taken over, a live lease
left alone, and the options that cannot go together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from test_parts import ENV, _cli, _run, assert_same_set, inputs, label_args  # noqa: F401 (the fixture)
from transferset.labelling.claim import _leases, lease_name, live_leases, try_claim


def test_two_workers_at_once_write_the_bytes_of_one(inputs, tmp_path):
    work, ref = inputs
    out = tmp_path / "ts"
    cmd = [sys.executable, "-m", "transferset", *label_args(work, out, "--claim", "--lease-seconds", "5")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    lines = [o[0] for o in outs]
    assert sum("merged by this worker" in line for line in lines) == 1, lines  # the last to finish merged, once
    assert_same_set(ref, out)
    assert not [p.name for p in out.iterdir() if p.name.startswith((".lease-", ".tmp-"))]


def test_a_dead_workers_shard_is_taken_over_after_its_lease_expires(inputs, tmp_path):
    """A lease nobody touches expires: the next worker takes its shard (generation 1) and labels everything."""
    work, ref = inputs
    out = tmp_path / "ts"
    out.mkdir()
    (out / lease_name(2, 0)).write_text("a dead worker\n")
    old = time.time() - 60
    os.utime(out / lease_name(2, 0), (old, old))
    p = _run(label_args(work, out, "--claim", "--lease-seconds", "5"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 taken over from expired leases" in p.stdout and "merged by this worker" in p.stdout, p.stdout
    assert_same_set(ref, out)


@pytest.mark.slow
def test_a_live_lease_is_left_to_its_worker_and_a_late_joiner_finds_nothing_left(inputs, tmp_path):
    work, ref = inputs
    out = tmp_path / "ts"
    out.mkdir()
    held = try_claim(out, 0, ttl=30, worker="other")
    assert held is not None and try_claim(out, 0, ttl=30, worker="me") is None  # one holder at a time
    assert live_leases(out, 30) == [0]
    # a worker with everything but shard 0 to do: it labels the rest, then waits on the live lease; release it
    p = subprocess.Popen([sys.executable, "-m", "transferset", *label_args(work, out, "--claim", "--lease-seconds",
                                                                           "30")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("manifest.part-*"))) < 24:  # 25 shards; shard 0 is held
        time.sleep(0.1)
    assert p.poll() is None  # still waiting for the live lease
    held.release()  # its holder gave it up without labelling: the waiting worker takes it
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert "labelled 25 shard(s)" in stdout and "merged by this worker" in stdout, stdout
    assert_same_set(ref, out)
    late = _run(label_args(work, out, "--claim"))  # a late joiner: nothing left, the set unchanged
    assert late.returncode == 0 and "found no shard left to claim" in late.stdout, late.stdout + late.stderr
    assert_same_set(ref, out)


def test_one_worker_takes_an_expired_lease(tmp_path):
    """Two workers seeing the same expired lease: exactly one creates the next generation."""
    (tmp_path / lease_name(4, 2)).write_text("dead\n")
    old = time.time() - 100
    os.utime(tmp_path / lease_name(4, 2), (old, old))
    seen = _leases(tmp_path)
    a = try_claim(tmp_path, 4, ttl=10, worker="a", leases=seen)
    b = try_claim(tmp_path, 4, ttl=10, worker="b", leases=seen)
    assert a is not None and b is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [lease_name(4, 3)]
    a.release()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("more, message", [(("--part", "1/2"), "cannot be combined with --claim"),
                                           (("--lease-seconds", "0"), "--lease-seconds must be a positive number")])
def test_claim_refuses_what_contradicts_it(inputs, tmp_path, capsys, more, message):
    work, _ = inputs
    assert _cli(label_args(work, tmp_path / "ts", "--claim", *more)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_shard_done_reads_no_other_parts_manifest_while_parts_are_missing(inputs, tmp_path, monkeypatch):
    """Claiming workers ask after every shard whether the set can be merged; with parts missing the answer comes
    from the folder's names, so S shards cost S manifest reads, not S^2 / 2 (one worker labels every shard here)."""
    from transferset.format import manifest as manifest_mod
    from transferset.format import parts as parts_mod
    from transferset.labelling import folder as folder_mod

    reads: list[str] = []
    real = manifest_mod.read_manifest_file

    def counted(root, name, *a, **k):
        reads.append(name)
        return real(root, name, *a, **k)

    for mod in (parts_mod, folder_mod):
        monkeypatch.setattr(mod, "read_manifest_file", counted)
    work, ref = inputs
    out = tmp_path / "claim"
    assert _cli(label_args(work, out, "--claim")) == 0
    shards = len(json.loads((out / "manifest.json").read_text())["shards"])
    assert shards >= 6
    # each shard: the first part's manifest (once there is one); the merge: every part once (two shards finishing
    # together may both look): a few per shard, where reading every part after every shard made S^2 / 2
    assert len(reads) <= 3 * shards, reads
    assert_same_set(ref, out)


def test_a_worker_starts_its_next_shard_while_the_last_one_is_still_written(tmp_path, monkeypatch):
    """claim_shards claims a shard while the one before is in its last batch and runs its inference after that
    one's, beside the writing of the one before (at most two in flight), records every shard, and raises a
    shard's error in the worker's thread with no lease left behind."""
    import threading

    import transferset.labelling.claim as claim_mod
    from transferset.errors import TransferSetError
    from transferset.labelling.claim import claim_shards

    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    def label_shard(k, handoff):
        with lock:
            events.append(("start", k))
        if handoff.after is not None:
            handoff.after.wait()  # the shard before is still in inference
        with lock:
            events.append(("infer", k))
        time.sleep(0.05)
        handoff.last_batch()  # the last batch goes into inference: the worker may claim the next shard now
        time.sleep(0.05)
        with lock:
            events.append(("inferred", k))
        handoff.inferred()
        time.sleep(0.05)  # "writing"
        (tmp_path / f"manifest.part-{k + 1}-of-4.json").write_text("{}")
        with lock:
            events.append(("end", k))
        return 10, None

    class Merged:
        def to_json(self):
            return {"shards": "all four"}

    def merge(root, wrote=None):  # the merge, faked: every shard's part manifest above is a stand-in
        (tmp_path / "manifest.json").write_text("{}")
        if wrote is not None:
            wrote.append(True)
        return Merged()

    monkeypatch.setattr(claim_mod, "merge_if_complete", merge)
    report = claim_shards(tmp_path, 4, label_shard, ttl=30)
    assert sorted(report.shards) == [0, 1, 2, 3] and report.rows_written == 40
    assert report.merged and report.manifest == {"shards": "all four"}  # merged once, by this worker
    starts = [i for i, e in enumerate(events) if e[0] == "start"]
    ends = {e[1]: i for i, e in enumerate(events) if e[0] == "end"}
    assert events.index(("start", 1)) < ends[0]  # shard 1 began before shard 0 was written
    for k in (1, 2, 3):  # claimed beside the last batch before, inferred after it: one inference at a time
        assert events.index(("start", k)) < events.index(("inferred", k - 1)) < events.index(("infer", k))
    assert len(starts) == 4 and not [n for n in os.listdir(tmp_path) if n.startswith(".lease-")]

    def failing(k, handoff):
        handoff.last_batch()
        handoff.inferred()
        if k == 1:
            raise TransferSetError("shard 1 cannot be written")
        time.sleep(0.05)
        return 10, None

    other = tmp_path / "other"
    with pytest.raises(TransferSetError, match="shard 1 cannot"):
        claim_shards(other, 4, failing, ttl=30)
    assert not [n for n in os.listdir(other) if n.startswith(".lease-")]


def test_a_claimed_shards_pipeline_infers_after_the_shard_before_and_says_when_its_last_batch_starts():
    """LabelPipeline with a Handoff: its batches are prepared at once but none is inferred until the shard before
    is through the ensemble; it says so when its last batch goes into inference, and when that one is through."""
    import threading

    import numpy as np

    from transferset.labelling.batches import Batch
    from transferset.labelling.geometry import RowGeometry
    from transferset.labelling.pipeline import LabelPipeline
    from transferset.labelling.run import Handoff

    geometry = RowGeometry(40, 0, True, 20, 8)  # shard 1: rows 20-28, 28-36, 36-40
    events: list = []

    class Prepare:
        def batches(self, shards):
            for k, r0, r1 in geometry.batches(shards):
                events.append(("prepared", r0))
                yield Batch(k, r0, r1, {"source_index": np.arange(r0, r1)}, feeds={"rows": r1 - r0})

    class Members:
        lanes, hints = 1, None

        def run_with_hints(self, feeds, first_row=0):
            events.append(("infer", first_row))
            return np.zeros((feeds["rows"], 1, 3), np.float32), []

    class Written:
        rows = 0

        def add(self, batch):
            self.rows += batch.rows

        def abort(self):
            pass

    before = threading.Event()
    handoff = Handoff(after=before, last_batch=lambda: events.append(("last",)),
                      inferred=lambda: events.append(("inferred",)))
    written = Written()
    pipe = LabelPipeline(Prepare(), Members(), written, geometry, [1], handoff=handoff)
    t = threading.Thread(target=pipe.run)
    t.start()
    while len([e for e in events if e[0] == "prepared"]) < 3:
        time.sleep(0.01)
    time.sleep(0.2)
    assert not [e for e in events if e[0] != "prepared"]  # prepared, not inferred: the shard before still is
    before.set()
    t.join(30)
    assert not t.is_alive() and written.rows == 20
    assert [e for e in events if e[0] != "prepared"] == [("infer", 20), ("infer", 28), ("last",), ("infer", 36),
                                                         ("inferred",)]


def test_a_worker_finishes_a_merge_killed_half_way(inputs, tmp_path):
    """A worker killed after writing manifest.json, before its card and the removal of the parts' manifests: the
    next worker to come (finding the set merged) finishes both; seen by the claim crash test."""
    work, ref = inputs
    out = tmp_path / "claim"
    assert _cli(label_args(work, out, "--claim")) == 0
    # what the folder held before the merge's clean-up: a part manifest (the merged set's first shard, as part 1)
    part = json.loads((out / "manifest.json").read_text())
    count = len(part["shards"])
    part["shards"] = part["shards"][:1]
    part["extra"] = {**part.get("extra", {}), "part": {"index": 1, "count": count}}
    (out / f"manifest.part-1-of-{count}.json").write_text(json.dumps(part))
    (out / "README.md").unlink()
    assert _cli(label_args(work, out, "--claim")) == 0
    assert not list(out.glob("manifest.part-*")) and (out / "README.md").exists()
    assert_same_set(ref, out)


def test_an_idle_worker_looks_soon_then_less_often_up_to_the_poll():
    from itertools import islice

    from transferset.labelling.claim import idle_waits

    waits = list(islice(idle_waits(0.25), 80))
    assert waits[0] == 0.005 and all(b >= a for a, b in zip(waits, waits[1:])) and max(waits) == 0.25
    assert set(waits[:20]) == {0.005}  # every 5 ms for the first 0.1 s: the end of a run is seen at once
    # whenever the awaited event comes, the look that sees it is late by at most 5 ms or a fifth of the time waited
    before = [sum(waits[:i]) for i in range(len(waits))]
    assert all(w <= max(0.005, before[i] / 5) + 1e-12 for i, w in enumerate(waits))
    assert list(islice(idle_waits(0.004), 3)) == [0.004] * 3  # never more than the poll


def test_the_first_parts_definition_is_read_once_per_version_of_its_file(inputs, tmp_path, monkeypatch, capsys):
    """A claiming worker checks the first part's definition at every shard it takes: the file is read and checked
    once per version (a rewrite is a rename: a new file), and a changed definition is still refused."""
    from transferset.labelling import folder as folder_mod

    work, _ = inputs
    out = tmp_path / "ts"
    assert _cli(label_args(work, out, "--part", "1/2")) == 0
    name = "manifest.part-1-of-2.json"
    reads: list[str] = []
    real = folder_mod.read_manifest_file
    monkeypatch.setattr(folder_mod, "read_manifest_file", lambda root, n: reads.append(n) or real(root, n))
    definition = folder_mod._definition(out, name)
    assert folder_mod._definition(out, name) == definition and reads == [name]
    other = json.loads((out / name).read_text())
    other["definition_sha256"] = "0" * 64
    (out / "rewritten.tmp").write_text(json.dumps(other))
    os.replace(out / "rewritten.tmp", out / name)
    assert folder_mod._definition(out, name) == "0" * 64 and reads == [name, name]
    capsys.readouterr()
    assert _cli(label_args(work, out, "--part", "2/2")) == 2
    assert "its parts were made with another ensemble" in capsys.readouterr().err


def test_kept_threads_are_reused_from_shard_to_shard_and_end_when_closed():
    """A claiming worker runs each shard and its pipeline's stages on threads it keeps: an idle one is reused, a
    new one starts only when every one is busy, one whose function raised is not reused, and close ends them."""
    import threading

    from transferset.labelling.claim import KeptThreads

    kept = KeptThreads("test-kept")
    seen: list[int] = []

    def record():
        seen.append(threading.get_ident())

    for _ in range(3):
        assert kept.run(record).wait(30)
    assert len(set(seen)) == 1  # one after the other: the same thread
    release = threading.Event()
    busy = kept.run(lambda: release.wait(30))
    assert kept.run(record).wait(30) and seen[-1] != seen[0]  # the kept one is busy: a second thread
    release.set()
    assert busy.wait(30)

    def fail():
        seen.append(threading.get_ident())
        raise RuntimeError("kept threads do not keep a failed one")

    before = threading.active_count()
    threading.excepthook, hook = (lambda args: None), threading.excepthook
    try:
        assert kept.run(fail).wait(30)
    finally:
        threading.excepthook = hook
    failed = seen[-1]
    deadline = time.time() + 30
    while threading.active_count() >= before and time.time() < deadline:
        time.sleep(0.01)
    assert kept.run(record).wait(30) and seen[-1] != failed
    names = lambda: [t.name for t in threading.enumerate() if t.name.startswith("test-kept")]  # noqa: E731
    assert names()
    kept.close()
    while names() and time.time() < deadline:
        time.sleep(0.01)
    assert not names()


def test_a_worker_alone_merges_once_and_reads_the_merged_set_no_more(inputs, tmp_path, monkeypatch):
    """The worker whose last shard merged the set neither looks at the merged set again (its own shard may still be
    merging when it finds every shard listed: it waits for that shard first) nor reads manifest.json for its
    report (the merge gave it). Its two shards in flight may finish together: both then take the merge lock, one
    merges and the other finds the set merged (a loaded machine shows it, 3 runs in 25)."""
    from transferset.format import parts as parts_mod
    from transferset.labelling import pipeline as pipeline_mod

    calls: list[str] = []
    real_merge, real_read = parts_mod._merge_locked, pipeline_mod.read_manifest

    def merge(root, required, wrote):
        before = len(wrote) if wrote is not None else None
        out = real_merge(root, required, wrote)
        calls.append("merge" if wrote is not None and len(wrote) > before else "found merged")
        return out

    monkeypatch.setattr(parts_mod, "_merge_locked", merge)
    monkeypatch.setattr(pipeline_mod, "read_manifest", lambda *a, **k: calls.append("read") or real_read(*a, **k))
    work, ref = inputs
    out = tmp_path / "claim"
    assert _cli(label_args(work, out, "--claim")) == 0
    assert calls in (["merge"], ["merge", "found merged"]), calls
    assert_same_set(ref, out)


def test_a_worker_that_finds_the_set_merged_by_another_finishes_that_merge_once(tmp_path, monkeypatch):
    """Every shard listed, the set not merged yet when this worker looks: it takes the merge lock once (another
    worker is merging; the call finishes that merge if it was killed half-way) and reports the set it found."""
    import transferset.labelling.claim as claim_mod
    from transferset.labelling.claim import claim_shards

    def label_shard(k, handoff):
        handoff.last_batch()
        handoff.inferred()
        (tmp_path / f"manifest.part-{k + 1}-of-3.json").write_text("{}")
        return 10, None

    calls: list = []

    class Found:
        def to_json(self):
            return {"merged by": "another worker"}

    def merge(root, wrote=None):  # another worker merged meanwhile: found merged, nothing written here
        calls.append(wrote)
        (tmp_path / "manifest.json").write_text("{}")
        return Found()

    monkeypatch.setattr(claim_mod, "merge_if_complete", merge)
    report = claim_shards(tmp_path, 3, label_shard, ttl=30)
    assert len(calls) == 1 and not report.merged and report.manifest == {"merged by": "another worker"}


def test_a_merge_between_the_look_and_the_listing_relabels_nothing(tmp_path, monkeypatch):
    """The merge writes manifest.json and then removes the parts' manifests. When it lands between the worker's
    look for manifest.json and its listing of part manifests, the listing shows no shard done: the worker must see
    the set merged, not label every shard again (CI once saw 26 shards labelled of 25, and three merges)."""
    import threading

    import transferset.labelling.claim as claim_mod
    from transferset.labelling.claim import claim_shards

    count, last_started, go, merged = 3, threading.Event(), threading.Event(), threading.Event()
    labelled: list[int] = []

    def label_shard(k, handoff):
        labelled.append(k)
        handoff.last_batch()
        handoff.inferred()
        if k == count - 1 and not go.is_set():
            last_started.set()
            go.wait(30)  # held until the worker has looked for manifest.json, then merges as the real last shard
        (tmp_path / f"manifest.part-{k + 1}-of-{count}.json").write_text("{}")
        if k == count - 1 and not merged.is_set():
            (tmp_path / "manifest.json").write_text("{}")
            for i in range(count):
                (tmp_path / f"manifest.part-{i + 1}-of-{count}.json").unlink()
            merged.set()
            return 10, {"merged by": "this worker"}
        return 10, None

    real_done = claim_mod._done

    def done(root, n):  # the worker looked for manifest.json (absent): the last shard merges before the listing
        if last_started.is_set() and not go.is_set():
            go.set()
            assert merged.wait(30)
        return real_done(root, n)

    monkeypatch.setattr(claim_mod, "_done", done)
    report = claim_shards(tmp_path, count, label_shard, ttl=30)
    assert go.is_set() and merged.is_set()  # the race was staged
    assert sorted(labelled) == [0, 1, 2] and sorted(report.shards) == [0, 1, 2] and report.rows_written == 30
    assert report.merged and report.manifest == {"merged by": "this worker"}


def test_a_claimed_shard_found_merged_is_not_labelled(tmp_path):
    """A shard claimed after the listing may have been finished by another worker and the set merged since: its
    part manifest is gone with the merge, so manifest.json alone says it is done."""
    import transferset.labelling.claim as claim_mod

    (tmp_path / "manifest.json").write_text("{}")
    lease = try_claim(tmp_path, 1, ttl=30, worker="me")
    called: list = []
    assert claim_mod._label_claimed(tmp_path, 3, 1, lease, lambda k, h: called.append(k), None) is None
    assert not called and not [n for n in os.listdir(tmp_path) if n.startswith(".lease-")]
