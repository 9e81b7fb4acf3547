"""Scoring per-frame predictions: frame accuracy and agreement, and CTC greedy decoding with string metrics.

A per-frame model (an image-line recogniser, an acoustic model) gives log-probabilities ``[N, T, C]``: one
distribution per frame. Frame labels are ``[N, T]`` int64, ``-1`` where a frame has no label (padding). For a CTC
model one class is the blank; its greedy reading of a row takes the argmax of every frame, merges runs of the same
class and drops the blanks (Graves et al. 2006, best path decoding). numpy only, so both stages may use it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import TransferSetError
from ..format.schema import is_frame_set  # noqa: F401  (re-exported: the loop asks here)
from .scoring import torch_log_probs

__all__ = ["frame_metrics", "greedy_decode", "edit_distance", "string_metrics", "is_frame_set",
           "torch_frame_log_probs", "frame_source_metrics"]


def torch_frame_log_probs(model, source, device, batch_size: int = 512) -> np.ndarray:
    """Log-probabilities [N, T, C] of a torch per-frame student over every row of ``source`` (eval mode, restored)."""
    return torch_log_probs(model, source, device, batch_size)


def frame_source_metrics(model, source, labels: np.ndarray, device) -> dict:
    """:func:`frame_metrics` of a torch student over ``source`` against frame ``labels``."""
    return frame_metrics(torch_frame_log_probs(model, source, device), labels)


def _frames(log_probs: np.ndarray, what: str = "predictions") -> np.ndarray:
    lp = np.asarray(log_probs)
    if lp.ndim != 3:
        raise TransferSetError(f"per-frame {what} must be [rows, frames, classes], got shape {list(lp.shape)}")
    return lp


def frame_metrics(log_probs: np.ndarray, labels: np.ndarray | None = None,
                  reference: np.ndarray | None = None) -> dict:
    """Frame accuracy against ``labels`` [N, T] (-1 frames left out) and argmax agreement per frame with
    ``reference`` [N, T, C] (another model's scores, e.g. the teacher's), over every frame.

    Returns ``frames`` (labelled frames counted), ``frame_accuracy``, ``frame_errors`` and, with a reference,
    ``frame_agreement`` and ``row_agreement`` (rows whose every frame agrees).
    """
    lp = _frames(log_probs)
    pred = lp.argmax(-1)
    res: dict = {"rows": int(lp.shape[0])}
    if labels is not None:
        y = np.asarray(labels, dtype=np.int64)
        if y.shape != pred.shape:
            raise TransferSetError(f"frame labels have shape {list(y.shape)} but the predictions have "
                                   f"{list(pred.shape)} (rows x frames)")
        if y.size and y.max() >= lp.shape[-1]:
            raise TransferSetError(f"frame labels must lie in [-1, {lp.shape[-1] - 1}], found {int(y.max())}")
        known = y >= 0
        correct = int(((pred == y) & known).sum())
        res.update(frames=int(known.sum()), frame_errors=int(known.sum()) - correct,
                   frame_accuracy=correct / known.sum() if known.any() else float("nan"))
    if reference is not None:
        ref = _frames(reference, "reference scores")
        if ref.shape[:2] != lp.shape[:2]:
            raise TransferSetError(f"the reference has {ref.shape[1]} frames a row, the predictions "
                                   f"{lp.shape[1]}: frame counts must be equal")
        same = pred == ref.argmax(-1)
        res.update(frame_agreement=float(same.mean()) if same.size else float("nan"),
                   row_agreement=float(same.all(axis=1).mean()) if same.size else float("nan"))
    return res


def greedy_decode(scores: np.ndarray, blank: int) -> list[tuple[int, ...]]:
    """Best-path CTC decoding of scores [N, T, C] (or argmax paths [N, T]): per row, the frame argmaxes with runs
    of one class merged and ``blank`` dropped, as a tuple of class ids."""
    s = np.asarray(scores)
    path = s.argmax(-1) if s.ndim == 3 else s
    if path.ndim != 2:
        raise TransferSetError(f"CTC scores must be [rows, frames, classes] or paths [rows, frames], "
                               f"got shape {list(s.shape)}")
    out = []
    for row in path:
        keep = np.ones(row.shape, dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        out.append(tuple(int(c) for c in row[keep & (row != blank)]))
    return out


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each costing 1) between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def string_metrics(decoded: Sequence[Sequence[int]], truth: Sequence[Sequence[int]] | None = None,
                   reference: Sequence[Sequence[int]] | None = None) -> dict:
    """Whole-string accuracy and character error rate (edit distance / reference characters) against ``truth``;
    string agreement and the character error rate measured against ``reference`` (e.g. the teacher's strings)."""
    res: dict = {"rows": len(decoded)}
    for name, other in (("label", truth), ("teacher", reference)):
        if other is None:
            continue
        if len(other) != len(decoded):
            raise TransferSetError(f"{len(decoded)} decoded strings but {len(other)} {name} strings")
        chars = sum(len(t) for t in other)
        dist = sum(edit_distance(d, t) for d, t in zip(decoded, other))
        same = sum(tuple(d) == tuple(t) for d, t in zip(decoded, other))
        key = "string_accuracy" if name == "label" else "string_agreement"
        res[key] = same / len(decoded) if decoded else float("nan")
        res["cer" if name == "label" else "cer_vs_teacher"] = dist / chars if chars else float(dist > 0)
    return res
