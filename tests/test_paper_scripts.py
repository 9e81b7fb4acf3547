"""The paper-reproduction scripts: their RESULTS.md sections and, in a slow smoke run, mnist_claims.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_write_section_replaces_its_own_block_and_appends_a_new_one(tmp_path):
    from reproduce_mnist import write_section

    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n\n<!-- begin run:a -->\nold a\n<!-- end run:a -->\n\ntail\n")
    write_section(path, "a", "new a")
    write_section(path, "b", "first b")
    write_section(path, "b", "second b")
    assert path.read_text() == ("# Results\n\nintro\n\n<!-- begin run:a -->\nnew a\n<!-- end run:a -->\n\ntail\n\n"
                                "<!-- begin run:b -->\nsecond b\n<!-- end run:b -->\n")


def test_born_again_sections_keep_each_other(tmp_path):
    import born_again

    path = tmp_path / "RESULTS.md"
    born_again.write_section(path, "first run")
    born_again.write_section(path, "converged run", "converged")
    born_again.write_section(path, "first run, again")
    text = path.read_text()
    assert "<!-- begin born-again -->\nfirst run, again\n<!-- end born-again -->" in text
    assert "<!-- begin born-again:converged -->\nconverged run\n<!-- end born-again:converged -->" in text
    assert "first run\n" not in text


@pytest.mark.slow
def test_mnist_claims_quick_writes_three_sections_and_shifted_files_agree(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "scripts/mnist_claims.py", "--quick", "--out", str(tmp_path / "w"),
                        "--results", str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    text = results.read_text()
    for name in ("sweep", "sevens", "losses"):
        assert f"<!-- begin run:claims-{name}-quick -->\n## " in text
        assert "Command: `python scripts/mnist_claims.py --quick" in text
    sevens = json.loads((tmp_path / "w" / "claims-sevens.json").read_text())
    # the shift written into the checkpoint and into the ONNX export scores as the logit arithmetic does
    assert sevens["adjusted_files"]["student.pt"]["errors"] == sevens["after_hold"]["errors"]
    assert sevens["adjusted_files"]["student.onnx"]["errors"] == sevens["after_hold"]["errors"]
    assert sevens["before"]["errors"] == sevens["as_trained"]["errors"]
    assert sevens["unseen_cases"] + sevens["seen_cases"] == 10000


def test_lm_tune_run_keys_and_its_table(tmp_path):
    import lm_tune

    assert lm_tune._extras("a:600:0.5:0.003:300:2") == lm_tune.EXTRAS
    assert lm_tune._extras("a:600:0.5:0.003:300:2:warmup=0.2,T=2,codec=dense") == \
        {**lm_tune.EXTRAS, "warmup": 0.2, "T": 2.0, "codec": "dense"}
    for bad in ("a:600:0.5", "a:600:0.5:0.003:300:2:lr=1", "a:600:0.5:0.003:300:2:codec=sample32"):
        with pytest.raises(SystemExit):
            lm_tune._extras(bad)
    rec = dict(rows=600, lr=0.003, steps=300, seed=2, warmup=0.2, clip=5.0, T=1.0, accuracy=0.1)
    records = [{**rec, "name": "ce", "alpha": 0.0, "perplexity": 1000.0, "codec": "topk32"},
               {**rec, "name": "kd", "alpha": 0.5, "perplexity": 700.0, "codec": "topk32"},
               {**rec, "name": "dn", "alpha": 0.5, "perplexity": 600.0, "codec": "dense"},
               {**rec, "name": "kd-w5", "alpha": 0.5, "perplexity": 900.0, "codec": "topk32", "warmup": 0.05}]
    path = tmp_path / "R.md"
    lm_tune.write_results(records, path, "cmd")
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in path.read_text().splitlines()
            if r.startswith("| ") and not r.startswith("| run")}
    assert rows["kd"][-2:] == ["0.700", "0.750"]  # kd/CE, and (1000 - 700) / (1000 - 600)
    assert rows["dn"][-2:] == ["0.600", ""]
    assert rows["kd-w5"][-2:] == ["", ""]  # no CE run with its warm-up: nothing to divide by


def test_lm_task_reuse_scores_a_finished_run_and_retrains_a_changed_one(tmp_path):
    import argparse

    import lm_task
    from transferset.lm_metrics import open_token_rows

    a = argparse.Namespace(seq_len=32, threads=1, temperature=1.0, teacher=str(lm_task.TEACHER), student="lm:1,16,2",
                           batch=2, lr=0.003, warmup=0.2, clip_grad=5.0, workdir=str(tmp_path), reuse=True)
    folder = lm_task._label(tmp_path / "set", "topk:32", 4, a)
    held = open_token_rows(text=str(lm_task.TEXT / "pydocs-heldout.jsonl"),
                           tokenizer=str(lm_task.TEXT / "tokenizer.json"), seq_len=32, limit=2)
    first = lm_task._train("r", folder, a, held, alpha=0.5, seed=0, steps=3)
    weights = tmp_path / "runs" / "r" / "student.pt"
    stamp = weights.stat().st_mtime_ns
    again = lm_task._train("r", folder, a, held, alpha=0.5, seed=0, steps=3)
    assert weights.stat().st_mtime_ns == stamp and again["perplexity"] == first["perplexity"]
    a.warmup = 0.6  # another option (2 warm-up steps of 3, not 1): the folder's run is trained over
    other = lm_task._train("r", folder, a, held, alpha=0.5, seed=0, steps=3)
    assert weights.stat().st_mtime_ns != stamp and other["perplexity"] != first["perplexity"]


def test_lm_task_extra_codecs_table_and_refusals(tmp_path):
    import argparse

    import lm_task

    for bad in ("topk:32", "dense", "sample:0", "samples:32", "topk:x"):
        with pytest.raises(SystemExit, match="--extra-codecs"):
            lm_task._extra_codecs(argparse.Namespace(extra_codecs=bad))
    assert lm_task._extra_codecs(argparse.Namespace(sampled="sample:32, systematic:32")) == \
        ["sample:32", "systematic:32"]  # the old spelling's key, as an old result's args hold it
    assert lm_task._extra_codecs(argparse.Namespace(extra_codecs="topk:64,sample:32,topk:64")) == \
        ["topk:64", "sample:32"]
    args = dict(seeds="0,1", rows=8, dense_rows=8, steps=4, sub_steps=4, student="lm:1,8,2", alpha=0.5,
                temperature=1.0, lr=0.003, batch=2, warmup=0.05, clip_grad=5.0, small_rows=0, bytes_rows=2,
                teacher=str(lm_task.TEACHER), workdir="/tmp/w", sampled="sample:32,systematic:32,topk:64")

    def row(name, seed, ppl, **kw):
        return {"name": name, "seed": seed, "alpha": 0.5, "loss": "kd", "perplexity": ppl, "accuracy": 0.1,
                "reference_agreement": 0.3, "kl_to_reference": 1.0, **kw}

    sub = [row(f"sub-{k}-{s}", s, p) for s, ps in ((0, (1000, 800, 600)), (1, (900, 700, 500)))
           for k, p in zip(("ce", "topk", "dense"), ps)]
    sampled = [row(f"sub-{c.replace(':', '')}-{s}", s, p, codec=c, distinct=d)
               for c, d, ps in (("sample:32", 20.0, (700, 600)), ("systematic:32", 20.0, (620, 520)),
                                ("topk:64", 64.0, (660, 540))) for s, p in zip((0, 1), ps)]
    sizes = {c: {"layout": b, "file": b + 10} for c, b in (("topk:32", 138.2), ("sample:32", 102.2),
                                                             ("systematic:32", 102.2), ("dense", 32774.2),
                                                             ("topk:64", 266.2))}
    tails = [{"k": 32, "covered": 0.5, "tail_mass": 0.45, "tail_nll_share": 0.7},
             {"k": 64, "covered": 0.6, "tail_mass": 0.375, "tail_nll_share": 0.6}]
    r = {"args": args, "teacher": {"perplexity": 250.0, "accuracy": 0.15}, "sizes": sizes, "main": [], "sub": sub,
         "small": [], "losses": [], "sampled": sampled, "set": {"rows": 8, "positions": 16, "vocab": 8192},
         "heldout": {"tokens": 32}, "seconds": 1.0, "machine": "test", "tail": tails[0], "tails": tails}
    path = tmp_path / "R.md"
    lm_task.write_results(r, path)
    text = path.read_text()
    assert "--workdir /tmp/w " in text and "--extra-codecs sample:32,systematic:32,topk:64`" in \
        next(x for x in text.splitlines() if x.startswith("`python"))
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")
            and line.split("|")[1].strip() in ("sample:32", "systematic:32", "topk:32", "topk:64")
            and line.count("|") == 9]  # the codecs' table, not the bytes table
    shares = {(x[0], x[2]): x[-1] for x in rows}
    assert shares[("topk:32", "0")] == "0.500" and shares[("topk:32", "1")] == "0.500"
    assert shares[("sample:32", "0")] == "0.750" and shares[("sample:32", "1")] == "0.750"  # (1000-700)/(1000-600)
    assert shares[("systematic:32", "0")] == "0.950" and shares[("systematic:32", "1")] == "0.950"
    assert shares[("topk:64", "0")] == "0.850" and shares[("topk:64", "1")] == "0.900"
    assert {x[1] for x in rows if x[0] == "topk:64"} == {"266.2 / 276.2"}
    assert "- sample:32 (102.2 B/token layout, 112.2 file, 20.0 distinct ids" in text
    assert "under 0.9 (best seed 0.750" in text
    assert "- systematic:32 (102.2 B/token" in text and "shares 0.950, 0.950, median 0.950: at least 0.9" in text
    assert ("- topk:64 (266.2 B/token layout, 276.2 file, 64 ids kept per position; on the held-out text the "
            "teacher's mass outside its top 64 is 0.375 on average and the next token lies there at 40.0% of "
            "positions): shares 0.850, 0.900, median 0.875: under 0.9 (best seed 0.900, worst 0.850).") in text
    assert "whose shares are 0.500, 0.500 at 138.2 B/token, the teacher's held-out mass outside its top 32 0.450" \
        in text
    # the old option spelling still parses, and a result written before the rename (args under "sampled")
    res = tmp_path / "r.json"
    res.write_text(json.dumps(r))
    lm_task.main(["--workdir", str(tmp_path), "--sampled", "topk:128", "--from-json", str(res),
                  "--results", str(tmp_path / "S.md")])
    assert (tmp_path / "S.md").read_text().replace("/tmp/w ", "") == text.replace("/tmp/w ", "")
    with pytest.raises(SystemExit, match="--extra-codecs topk:32"):
        lm_task.main(["--workdir", str(tmp_path), "--sampled", "topk:32", "--from-json", str(res)])


def test_lm_task_teacher_tails_in_one_pass(tmp_path):
    """The teacher's held-out mass outside its top K, for several K in one pass, equals one K at a time, and a
    larger K leaves less outside and covers more next tokens."""
    import lm_task
    from transferset.lm_metrics import open_token_rows

    held = open_token_rows(text=str(lm_task.TEXT / "pydocs-heldout.jsonl"),
                           tokenizer=str(lm_task.TEXT / "tokenizer.json"), seq_len=32, limit=2)
    both = lm_task._teacher_tails(held, [32, 256])
    assert both[0] == pytest.approx(lm_task._teacher_tail(held, 32))
    assert both[1] == pytest.approx(lm_task._teacher_tail(held, 256))
    assert 0 < both[1]["tail_mass"] < both[0]["tail_mass"] < 1
    assert both[1]["covered"] >= both[0]["covered"] and both[1]["tail_nll_share"] <= both[0]["tail_nll_share"]
