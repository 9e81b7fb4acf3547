"""``transferset verify --reteach N``: run the teachers again on sampled rows and compare with the stored logits.

The rows' inputs come from the shards when stored, else they are replayed from the source (a photo set's crop
boxes and flips, or an array set's augmentation), opened only when the user names it or when it lies inside the
set's folder. The teachers are the ONNX files the manifest lists, found by name in a folder or given one by one,
and each must have the sha256 the manifest records. A stored logit agrees when it is the recomputed one rounded
to the set's dtype, give or take one unit in the last place (fp16) or 1e-4 relative (fp32): run-to-run noise of
ONNX Runtime may cross a rounding boundary, an edited or foreign logit does not stay that close.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .._io import sha256_file
from ..errors import FAILED, TransferSetError, printable
from ..format.reading import TransferSet
from ..format.schema import Manifest
from ..inputs.replay import TRACE_FIELDS, Replay
from .ensemble import Ensemble, Preprocess
from ..wording import plural
from .hints import HintSpec, hint_disagreement

__all__ = ["ReteachResult", "teacher_paths", "sample_rows", "reteach"]

_BATCH = 64


@dataclass
class ReteachResult:
    """Rows checked, the largest |stored - recomputed| logit, and the first disagreement (one line) or None."""

    rows: int
    max_abs_diff: float
    first_bad: str | None


def teacher_paths(m: Manifest, teachers: Sequence[str | os.PathLike]) -> list[Path]:
    """The set's teacher files: one folder holding them under their recorded names, or one file per member;
    each must have the recorded sha256."""
    if len(teachers) == 1 and Path(teachers[0]).is_dir():
        folder = Path(teachers[0])
        paths = []
        for t in m.teachers:
            name = t.get("file")
            if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
                raise TransferSetError(f"the manifest names teacher file {printable(name)!r}, not a plain file name; "
                                       "give the teacher files one by one", option="teachers")
            paths.append(folder / name)
    else:
        paths = [Path(p) for p in teachers]
    if len(paths) != m.num_members:
        raise TransferSetError(f"gives {plural(len(paths), 'file')} but the set has {plural(m.num_members, 'teacher')}",
                               option="teachers")
    for i, (p, t) in enumerate(zip(paths, m.teachers)):
        if not p.is_file():
            raise TransferSetError(f"{printable(p)}: no such ONNX file (teacher {i} of the set)", option="teachers")
        if sha256_file(p) != t.get("sha256"):
            raise TransferSetError(f"{printable(p)}: its sha256 differs from teacher {i} "
                                   f"({printable(t.get('file'))}) of the set; give the files it was labelled with",
                                   option="teachers")
    return paths


def sample_rows(total: int, n: int, seed: int = 0) -> np.ndarray:
    """``min(n, total)`` distinct row numbers in increasing order, a pure function of (total, n, seed)."""
    n = min(int(n), int(total))
    if n >= total:
        return np.arange(total, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(total, n, replace=False)).astype(np.int64)


def _read_rows(ts: TransferSet, rows: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """``names`` datasets at the set's rows ``rows`` (sorted), plus ``row`` and ``shard`` (its path) per row."""
    got = ts.take(rows, names)
    shard, _ = ts.locate(rows)
    got["row"], got["shard"] = rows, [ts.manifest.shards[k].path for k in shard.tolist()]
    ts.close()
    return got


def _ensemble(m: Manifest, paths: list[Path], device: str) -> Ensemble:
    p = m.preprocess or {}
    pre = Preprocess(p.get("scale"), tuple(p["mean"]) if p.get("mean") else None,
                     tuple(p["std"]) if p.get("std") else None, p.get("layout"))
    same = lambda key: m.teachers[0].get(key) if all(t.get(key) == m.teachers[0].get(key) for t in m.teachers) else None  # noqa: E731
    hints = [HintSpec(h["tensor"], h["member"], h["reduce"]) for h in m.hints or ()]
    ens = Ensemble(paths, preprocess=pre, device=device, input_name=same("input_name"), output_name=same("output_name"),
                   hints=hints)
    for member, t in zip(ens.members, m.teachers):
        member.output_kind = t.get("output_kind")
    return ens


def _first_bad(stored: np.ndarray, fresh: np.ndarray, got: dict, m: Manifest) -> tuple[float, str | None]:
    s32 = stored.astype(np.float32)
    diff = np.abs(s32 - fresh)
    if stored.dtype == np.float16:
        tol = np.spacing(np.abs(fresh).astype(np.float16)).astype(np.float32) + 1e-4 * (1 + np.abs(fresh))
    else:
        tol = 1e-4 * (1 + np.abs(fresh))
    bad = diff > tol
    if not bad.any():
        return float(diff.max(initial=0.0)), None
    i, member, c = (int(v) for v in np.argwhere(bad)[0])
    name = printable(m.teachers[member].get("file"))
    return float(diff.max()), (f"row {int(got['row'][i])} ({printable(got['shard'][i])}, source row "
                               f"{int(got['source_index'][i])}, view {int(got['view'][i])}): teacher {name} class {c} "
                               f"logit is {s32[i, member, c]:.6g} in the set but {fresh[i, member, c]:.6g} recomputed")


def reteach(root: str | os.PathLike, rows: int, teachers: Sequence[str | os.PathLike], *, source_override=None,
            seed: int = 0, device: str = "auto") -> ReteachResult:
    """Re-run the teachers on ``rows`` sampled rows of the set at ``root`` and compare with its stored logits."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise TransferSetError(f"must be a whole number >= 1, got {rows!r}", option="reteach")
    ts = TransferSet(root)
    root, m = ts.root, ts.manifest
    if "logits" not in ts.layout:
        raise TransferSetError(f"{root}: codec {m.codec} keeps no full logits to compare", FAILED)
    replay = None if m.input["stored"] else Replay(root, m, source_override)
    names = ["logits", *(replay.fields if replay else TRACE_FIELDS + ("inputs",)), *(h["field"] for h in m.hints or ())]
    with _ensemble(m, teacher_paths(m, teachers), device) as ens:
        got = _read_rows(ts, sample_rows(ts.rows, rows, seed), names)
        x = replay(got) if replay else got["inputs"]
        worst = 0.0
        for s in range(0, len(x), _BATCH):
            fresh, raw = ens.run_with_hints(ens.feeds(x[s:s + _BATCH]), first_row=s)
            part = {k: v[s:s + _BATCH] for k, v in got.items()}
            diff, bad = _first_bad(got["logits"][s:s + _BATCH], fresh, part, m)
            worst = max(worst, diff)
            bad = bad or _hints_bad(m, part, raw)
            if bad:
                return ReteachResult(s + len(fresh), worst, bad)
    return ReteachResult(len(x), worst, None)


def _hints_bad(m: Manifest, part: dict, raw: list[np.ndarray]) -> str | None:
    """The first stored hint value that the re-run teachers do not give, as one line, or None."""
    for h, values in zip(m.hints or (), raw):
        _, at = hint_disagreement(part[h["field"]], values, h["reduce"])
        if at is not None:
            i, j = at
            return (f"row {int(part['row'][i])} ({printable(part['shard'][i])}): {h['field']} ({printable(h['tensor'])}, "
                    f"{h['reduce']}) value {j} differs from the recomputed one")
    return None

