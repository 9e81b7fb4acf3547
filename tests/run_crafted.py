"""Run crafted transfer sets (tests/crafted.py) through verify, info and train-student, in this one process.

    python tests/run_crafted.py OUT_JSON [CASE ...]

For each case and command it records the exit code, the lines on stderr, the seconds taken (an alarm stops a
command at 30 s), whether a trap outside the set was opened (Python-level opens seen by an audit hook; HDF5's own
opens of the FIFO trap would block and hit the alarm) and the command's peak RSS: each command runs in a child
forked from this process (which has imported the package, as a command's own process would), and the child's
``ru_maxrss`` comes back from ``wait4``. tests/test_untrusted.py runs it in a subprocess and judges the results.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import make_frame_set, make_token_set, make_transfer_set  # noqa: E402
from crafted import CASES, HINT_CASES, make_outside  # noqa: E402

import torch  # noqa: E402,F401 (imported once here, as a command's own process would; each command forks from it)

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
    """:func:`_run_here` in a forked child, with the child's peak RSS (MB) added as ``peak_rss_mb``."""
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the command, send the result and what it opened outside, exit at once
        os.close(r_fd)
        code = 0
        try:
            r = _run_here(argv)
            r["opened_outside"] = list(_watch["opened"])
            with os.fdopen(w_fd, "w") as w:
                w.write(json.dumps(r))
        except BaseException:  # noqa: BLE001 (nothing may escape a forked child)
            code = 3
        os._exit(code)
    os.close(w_fd)
    with os.fdopen(r_fd) as r_file:
        text = r_file.read()
    _, status, usage = os.wait4(pid, 0)
    if not text:
        r = {"argv": argv[0], "code": None, "stderr": [], "stderr_lines": 0, "timed_out": False,
             "crash": f"the command's process died ({status})", "seconds": None, "opened_outside": []}
    else:
        r = json.loads(text)
    _watch["opened"].extend(r.pop("opened_outside"))
    r["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return r


def _run_here(argv: list[str]) -> dict:
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
    frames = base == ["frames"]  # a per-frame set (float input, one distribution per frame)
    root, outside = tmp / name / "set", tmp / name / "outside"
    make_outside(outside)
    hinted = name in HINT_CASES
    if tokens:
        make_token_set(root)
    elif frames:
        make_frame_set(root)
    else:
        make_transfer_set(root, shard_rows=(7, 0, 13, 1), members=3, classes=5, input_shape=(6,), hints=hinted)
    build(root, outside)
    _watch["outside"], _watch["opened"] = str(outside), []
    results = []
    for argv in (["verify", str(root)], ["info", str(root)], ["info", str(root), "--json"],
                 ["train-student", "--transfer-set", str(root), "--out", str(tmp / name / "run"), "--student",
                  "lm:1,8,2" if tokens else "crnn:4,8" if frames else "mlp:8", "--epochs", "1", "--batch-size", "4",
                  "--device", "cpu", "-q"]
                 + (["-T", "1"] if tokens or frames else [])
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
    peak = max([r["peak_rss_mb"] for r in results] + [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
    Path(out_json).write_text(json.dumps({"results": results, "peak_rss_mb": peak}, indent=1))


if __name__ == "__main__":
    main_(sys.argv[1], sys.argv[2:])
