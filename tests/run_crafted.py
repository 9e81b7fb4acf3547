"""Run crafted transfer sets (tests/crafted.py) through verify, info and train-student, in this one process.

    python tests/run_crafted.py OUT_JSON [CASE ...]

For each case and command it records the exit code, the lines on stderr, the seconds taken (an alarm stops a
command at 30 s), whether a trap outside the set was opened (Python-level opens seen by an audit hook; HDF5's own
opens of the FIFO trap would block and hit the alarm) and the peak RSS of the process. tests/test_untrusted.py
runs it in a subprocess and judges the results.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import make_token_set, make_transfer_set  # noqa: E402
from crafted import CASES, HINT_CASES, make_outside  # noqa: E402

from transferset.cli import main  # noqa: E402

LIMIT_S = 30
_watch: dict = {"outside": None, "opened": []}


def _audit(event: str, args) -> None:
    if event == "open" and _watch["outside"] is not None and args and isinstance(args[0], (str, bytes)):
        p = args[0].decode() if isinstance(args[0], bytes) else args[0]
        if p.startswith(_watch["outside"]) or p == "/etc/passwd":
            _watch["opened"].append(p)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _run(argv: list[str]) -> dict:
    err, out = io.StringIO(), io.StringIO()
    t = time.perf_counter()
    signal.alarm(LIMIT_S)
    code, timed_out, crash = 0, False, None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except _Timeout:
        timed_out = True
    except BaseException as e:  # a traceback: what the test forbids
        crash = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        signal.alarm(0)
    # verify names each bad shard on a BAD line before its one-line verdict; the rest must be one line
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith("BAD ")]
    return {"argv": argv[0], "code": code, "stderr": lines[-3:], "stderr_lines": len(lines), "timed_out": timed_out,
            "crash": crash, "seconds": round(time.perf_counter() - t, 2)}


def run_case(name: str, tmp: Path) -> list[dict]:
    build, expect, *base = CASES[name]
    tokens = base == ["tokens"]  # a per-position set (language-model teacher) as the starting point
    root, outside = tmp / name / "set", tmp / name / "outside"
    make_outside(outside)
    hinted = name in HINT_CASES
    if tokens:
        make_token_set(root)
    else:
        make_transfer_set(root, shard_rows=(7, 0, 13, 1), members=3, classes=5, input_shape=(6,), hints=hinted)
    build(root, outside)
    _watch["outside"], _watch["opened"] = str(outside), []
    results = []
    for argv in (["verify", str(root)], ["info", str(root)], ["info", str(root), "--json"],
                 ["train-student", "--transfer-set", str(root), "--out", str(tmp / name / "run"), "--student",
                  "lm:1,8,2" if tokens else "mlp:8", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "-q"]
                 + (["-T", "1"] if tokens else [])
                 + (["--hint-loss", "rkd:hint_0=body.1", "--hint-loss", "ab:hint_1=body.1"] if hinted else [])):
        r = _run(argv)
        r.update(case=name, expect=expect, opened_outside=list(_watch["opened"]),
                 student_saved=(tmp / name / "run" / "student.pt").exists())
        _watch["opened"] = []
        results.append(r)
    _watch["outside"] = None
    return results


def main_(out_json: str, names: list[str]) -> None:
    sys.addaudithook(_audit)
    signal.signal(signal.SIGALRM, _alarm)
    results = []
    with tempfile.TemporaryDirectory() as d:
        for name in names or list(CASES):
            results.extend(run_case(name, Path(d)))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out_json).write_text(json.dumps({"results": results, "peak_rss_mb": peak_kb / 1024}, indent=1))


if __name__ == "__main__":
    main_(sys.argv[1], sys.argv[2:])
