"""A sweep over temperature and alpha from one stored transfer set: does distillation pay for *this* student?

A transfer set stores member logits, so every temperature is free. :func:`run_sweep` trains the grid
``losses x temperatures x alphas`` with :func:`transferset.training.loop.train_student` (the code path of
``train-student``), one ordinary run folder per point inside the sweep folder, and scores each on the same
evaluation data (a source, or the set's own held-out source rows). Alpha 0 is the hard-label control: one run
(temperature and loss play no part in it), always included. ``logit-mse`` ignores the temperature, so it gives
one run per alpha.

The sweep is resumable as a whole: a finished run (``student.pt`` written, the same options in its
``config.json``) is never redone; an unfinished one resumes from its checkpoint. With ``jobs > 1`` the runs go
to that many worker processes, each with ``cores / jobs`` torch threads unless threads are given.

``sweep.json`` in the sweep folder holds every run's errors, NLL, ECE and training seconds, the best point and
its margin over the control; :func:`control_comparison` lets a later ``train-student`` run in the same folder say
how it compares with that control.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from .._io import atomic_write_json
from ..errors import TransferSetError
from ..format.manifest import manifest_hash
from ..format.parts import read_manifest
from .loop import TrainOptions, train_student

__all__ = ["SWEEP_FILE", "SweepOptions", "GridPoint", "sweep_grid", "run_sweep", "format_sweep",
           "control_comparison", "run_summary"]

SWEEP_FILE = "sweep.json"
CONTROL = "control"
#: options a sweep varies; two runs that differ only in these are "the same spec"
_DISTIL_OPTIONS = ("alpha", "temperature", "loss", "combine", "teacher_noise")
#: options that change neither a run's result nor what it is compared on
_IGNORED = ("resume", "overwrite", "quiet", "threads", "checkpoint_every", "verify", "export_onnx", "device", "num_workers")


@dataclass
class SweepOptions:
    """The grid and how it runs (``transferset sweep`` maps its flags onto this one)."""

    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    alphas: tuple[float, ...] = (0.0, 0.5, 0.9)
    losses: tuple[str, ...] = ("kd",)
    jobs: int = 1

    def validate(self) -> None:
        if not self.temperatures or any(not (math.isfinite(t) and t > 0) for t in self.temperatures):
            raise TransferSetError(f"must be positive numbers, got {list(self.temperatures)}", option="temperatures")
        if not self.alphas or any(not (0 <= a <= 1) for a in self.alphas):
            raise TransferSetError(f"must lie in [0, 1], got {list(self.alphas)}", option="alphas")
        bad = [x for x in self.losses if x not in ("kd", "logit-mse")]
        if not self.losses or bad:
            raise TransferSetError(f"{bad or 'none'}: choose from kd and logit-mse", option="losses")
        if self.jobs < 1:
            raise TransferSetError(f"must be >= 1, got {self.jobs}", option="jobs")


@dataclass(frozen=True)
class GridPoint:
    """One run of the grid: its folder name and its options."""

    name: str
    loss: str
    temperature: float | None
    alpha: float
    options: TrainOptions


def sweep_grid(base: TrainOptions, s: SweepOptions) -> list[GridPoint]:
    """The runs of the sweep, control first: ``control`` (alpha 0), ``kd-T{T}-a{alpha}``, ``logit-mse-a{alpha}``.

    Every run is ``base`` with only its loss, temperature and alpha replaced.
    """
    points = [GridPoint(CONTROL, "kd", None, 0.0, replace(base, alpha=0.0, loss="kd",
                                                            temperature=TrainOptions.temperature))]
    alphas = sorted({float(a) for a in s.alphas if a > 0})
    temps = sorted({float(t) for t in s.temperatures})
    for loss in dict.fromkeys(s.losses):
        for a in alphas:
            if loss == "logit-mse":
                points.append(GridPoint(f"logit-mse-a{a:g}", loss, None, a,
                                        replace(base, loss=loss, alpha=a, temperature=TrainOptions.temperature)))
                continue
            for t in temps:
                points.append(GridPoint(f"kd-T{t:g}-a{a:g}", loss, t, a, replace(base, loss=loss, alpha=a, temperature=t)))
    return points


# -- one run ----------------------------------------------------------------------------------------------------
def _comparable(options: dict) -> dict:
    full = {**asdict(TrainOptions()), **options}
    return {k: v for k, v in full.items() if k not in _IGNORED}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _history(run: Path) -> list[dict]:
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(x) for x in lines if x.strip()]
    except (OSError, ValueError):
        return []


def _finished(run: Path, options: TrainOptions, set_hash: str) -> bool:
    """True when ``run`` holds a finished run of ``options``; refuse a folder that holds another run."""
    cfg = _read_json(run / "config.json")
    if cfg is None:
        return False
    if cfg.get("manifest_hash") != set_hash:
        raise TransferSetError(f"{run}: holds a run made from another transfer set; the sweep folder belongs to "
                               "another sweep: choose another one", option="out")
    now, was = _comparable(json.loads(json.dumps(asdict(options)))), _comparable(cfg.get("options", {}))
    if now != was:
        diff = sorted(k for k in now if now.get(k) != was.get(k))
        raise TransferSetError(f"{run}: holds a run made with other options ({', '.join(diff)}); the sweep folder "
                               "belongs to another sweep: choose another one", option="out")
    return (run / "student.pt").is_file()


def run_summary(run: Path) -> dict:
    """The last epoch's eval errors, n, NLL, ECE and the training seconds of a run folder."""
    hist = _history(run)
    last = hist[-1] if hist else {}
    return {"errors": last.get("eval_errors"), "n": last.get("eval_n"), "nll": last.get("eval_nll"),
            "ece": last.get("eval_ece"), "epochs": len(hist), "seconds": sum(h.get("seconds", 0.0) for h in hist)}


def _die_with_parent() -> None:
    """A worker ends when the sweep process does (Linux), so a killed sweep leaves no run writing on its own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _train_point(transfer_set: str, run: str, options: dict) -> dict:
    """One grid point in a worker: train (or resume) it; a TransferSetError comes back as data."""
    try:
        train_student(transfer_set, run, TrainOptions(**options))
    except TransferSetError as e:
        return {"error": e.message, "option": e.option, "exit_code": e.exit_code}
    return {}


# -- the sweep --------------------------------------------------------------------------------------------------
def _check_base(base: TrainOptions) -> None:
    base.validate()
    if not base.eval_data and not base.holdout:
        raise TransferSetError("needs data to score the runs on: evaluation data, or a holdout fraction of the set",
                               option="eval_data")


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(f"sweep: {text}", file=sys.stderr, flush=True)


def _point_options(point: GridPoint, jobs: int) -> TrainOptions:
    o = replace(point.options, resume=True)
    if jobs > 1:
        o = replace(o, quiet=True, threads=o.threads or max(1, (os.cpu_count() or 1) // jobs))
    return o


def run_sweep(transfer_set: str | os.PathLike, out: str | os.PathLike, base: TrainOptions,
              s: SweepOptions | None = None) -> dict:
    """Train every grid point not yet finished into ``out/<name>``; return and write ``out/sweep.json``."""
    s = s or SweepOptions()
    s.validate()
    _check_base(base)
    out = Path(out)
    points = sweep_grid(base, s)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TransferSetError(f"{out}: cannot create the folder ({e.strerror or e})", option="out") from None
    set_hash = manifest_hash(read_manifest(transfer_set))
    todo = [p for p in points if not _finished(out / p.name, p.options, set_hash)]
    _say(base.quiet, f"{len(points)} runs, {len(points) - len(todo)} already finished in {out}")
    t0 = time.perf_counter()
    if s.jobs == 1 or len(todo) <= 1:
        for i, p in enumerate(todo, 1):
            _say(base.quiet, f"[{i}/{len(todo)}] {p.name}")
            train_student(transfer_set, out / p.name, _point_options(p, 1))
            _write(out, transfer_set, base, s, points)
    else:
        ctx = get_context("spawn")  # a fresh interpreter per worker: no forked torch or HDF5 state
        with ProcessPoolExecutor(max_workers=s.jobs, mp_context=ctx, initializer=_die_with_parent) as pool:
            futures = {pool.submit(_train_point, str(transfer_set), str(out / p.name),
                                   asdict(_point_options(p, s.jobs))): p for p in todo}
            for done, fut in enumerate(as_completed(futures), 1):
                err = fut.result()
                if err:
                    for f in futures:
                        f.cancel()
                    raise TransferSetError(f"run {futures[fut].name}: {err['error']}", err["exit_code"],
                                           option=err["option"])
                _say(base.quiet, f"[{done}/{len(todo)}] {futures[fut].name} finished")
                _write(out, transfer_set, base, s, points)
    res = _write(out, transfer_set, base, s, points)
    res["seconds_this_call"] = time.perf_counter() - t0
    res["finished_before"] = len(points) - len(todo)
    return res


def _write(out: Path, transfer_set, base: TrainOptions, s: SweepOptions, points: list[GridPoint]) -> dict:
    """Collect every run's summary into ``sweep.json`` (rewritten after each finished run)."""
    runs = []
    for p in points:
        done = (out / p.name / "student.pt").is_file()
        runs.append({"name": p.name, "loss": p.loss, "temperature": p.temperature, "alpha": p.alpha,
                     "finished": done, **(run_summary(out / p.name) if done else {})})
    scored = [r for r in runs if r["finished"] and r.get("errors") is not None]
    control = next((r for r in scored if r["name"] == CONTROL), None)
    best = min(scored, key=lambda r: (r["errors"], r["nll"])) if scored else None
    res = {"transfer_set": str(transfer_set), "student": base.student, "epochs": base.epochs,
           "scored_on": "holdout" if base.holdout else "eval_data", "holdout": base.holdout,
           "eval_data": base.eval_data, "base_options": asdict(base),
           "grid": {"temperatures": sorted(set(s.temperatures)), "alphas": sorted(set(s.alphas) | {0.0}),
                    "losses": list(dict.fromkeys(s.losses))},
           "runs": runs, "complete": all(r["finished"] for r in runs),
           "best": best["name"] if best else None, "control": CONTROL if control else None}
    if best and control:
        res["margin_errors"] = control["errors"] - best["errors"]
        res["margin_relative"] = res["margin_errors"] / control["errors"] if control["errors"] else None
    atomic_write_json(out / SWEEP_FILE, res)
    return res


def format_sweep(res: dict) -> str:
    """The sweep's table (errors, NLL, ECE, seconds per run) and the best setting against the control."""
    n = next((r.get("n") for r in res["runs"] if r.get("n")), "?")
    scored = "held-out source rows" if res["scored_on"] == "holdout" else "the evaluation data"
    lines = [f"{res['student']}, {res['epochs']} epochs, scored on {scored} ({n} rows)",
             f"{'run':<18} {'loss':<9} {'T':>5} {'alpha':>6} {'errors':>7} {'NLL':>7} {'ECE':>7} {'time':>8}",
             "-" * 73]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in res["runs"]:
        mark = " *" if r["name"] == res["best"] else ""
        lines.append(f"{r['name']:<18} {r['loss'] if r['alpha'] else 'hard':<9} {f(r['temperature'], 'g'):>5} "
                     f"{r['alpha']:>6g} {f(r.get('errors'), 'd'):>7} {f(r.get('nll'), '.4f'):>7} "
                     f"{f(r.get('ece'), '.4f'):>7} {f(r.get('seconds'), '.0f'):>6} s{mark}")
    if res.get("margin_errors") is not None:
        best = next(r for r in res["runs"] if r["name"] == res["best"])
        control = next(r for r in res["runs"] if r["name"] == CONTROL)
        verdict = ("the hard-label control is best: distillation does not pay for this student here"
                   if res["best"] == CONTROL else
                   f"{res['margin_errors']} fewer errors than the control ({control['errors']}, "
                   f"{res['margin_relative']:.1%})")
        lines.append(f"best: {res['best']} with {best['errors']} errors; {verdict}")
    if not res["complete"]:
        lines.append("the sweep is not complete; run the same command again to finish it")
    return "\n".join(lines)


# -- a later run against the sweep's control --------------------------------------------------------------------
def control_comparison(out: str | os.PathLike) -> str | None:
    """How the run in ``out`` compares with a hard-label control of the same spec beside it, or None.

    The control is a finished sibling run folder (alpha 0) whose options differ from this run's only in the
    distillation options (alpha, temperature, loss, combine rule, teacher noise), on the same transfer set and
    scored on the same data.
    """
    out = Path(out)
    cfg = _read_json(out / "config.json")
    mine = run_summary(out)
    if cfg is None or mine["errors"] is None or not out.parent.is_dir():
        return None
    key = lambda c: ({k: v for k, v in _comparable(c.get("options", {})).items() if k not in _DISTIL_OPTIONS},  # noqa: E731
                     c.get("manifest_hash"))
    want = key(cfg)
    for sib in sorted(out.parent.iterdir())[:1000]:
        if sib.resolve() == out.resolve() or not (sib / "student.pt").is_file():
            continue
        other = _read_json(sib / "config.json")
        if not other or other.get("options", {}).get("alpha") != 0 or key(other) != want:
            continue
        ctl = run_summary(sib)
        if ctl["errors"] is None or ctl["epochs"] != mine["epochs"]:
            continue
        d = mine["errors"] - ctl["errors"]
        how = "as many errors as" if d == 0 else f"{abs(d)} {'fewer' if d < 0 else 'more'} error{'s' * (abs(d) > 1)} than"
        return (f"against the hard-label control {sib}: {mine['errors']} vs {ctl['errors']} errors ({how} the "
                f"control), NLL {mine['nll']:.4f} vs {ctl['nll']:.4f}, ECE {mine['ece']:.4f} vs {ctl['ece']:.4f}")
    return None
