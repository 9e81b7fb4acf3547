"""Scoring a model's predictions: log-probabilities of a torch student over a source, and the metrics table.

Used by the training loop (per-epoch evaluation) and by :mod:`transferset.evaluate` (which adds ONNX models and
ensembles), so training needs nothing from the layer above it.
"""

from __future__ import annotations

import numpy as np

from ..errors import TransferSetError

__all__ = ["ECE_BINS", "torch_log_probs", "metrics", "source_metrics"]

ECE_BINS = 15


def torch_log_probs(model, source, device, batch_size: int = 1024) -> np.ndarray:
    """Log-probabilities [N, C] (a per-frame student: [N, T, C]) of a torch student over every row of ``source``
    (eval mode, restored after); softmax over the last axis."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, source.rows, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(source.read(s, min(s + batch_size, source.rows)))).to(device)
            try:
                z = model(x)
            except (RuntimeError, ValueError, TypeError) as e:
                raise TransferSetError(
                    f"the student does not fit the data: rows of shape {tuple(x.shape[1:])} {x.dtype} failed "
                    f"({str(e).splitlines()[0][:200]}); evaluate it on data shaped like its transfer set") from None
            out.append(torch.log_softmax(z.float(), dim=-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def metrics(log_probs: np.ndarray, labels: np.ndarray, reference: np.ndarray | None = None) -> dict:
    """Accuracy, error count, NLL, expected calibration error (15 equal-width bins) and agreement."""
    lp = np.asarray(log_probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if lp.shape[0] != y.shape[0]:
        raise TransferSetError(f"the labels have {y.shape[0]} rows but the data has {lp.shape[0]}")
    if y.size and (y.min() < 0 or y.max() >= lp.shape[1]):
        raise TransferSetError(f"labels must lie in [0, {lp.shape[1] - 1}] for a {lp.shape[1]}-class model")
    pred = lp.argmax(1)
    correct = pred == y
    conf = np.exp(lp.max(1))
    bins = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    res = {"n": int(y.size), "accuracy": float(correct.mean()) if y.size else float("nan"),
           "errors": int((~correct).sum()), "nll": float(-lp[np.arange(y.size), y].mean()) if y.size else float("nan"),
           "ece": float(ece)}
    if reference is not None:
        res["agreement"] = float((pred == np.asarray(reference).argmax(1)).mean())
    return res


def source_metrics(log_probs: np.ndarray, labels: np.ndarray, source, reference: np.ndarray | None = None) -> dict:
    """:func:`metrics` over the rows of ``source`` that could be read: rows a photo source recorded in
    ``bad_rows`` (files it could not decode) are left out and counted in ``skipped_files``."""
    bad = sorted(getattr(source, "bad_rows", None) or ())
    if not bad:
        return metrics(log_probs, labels, reference)
    keep = np.ones(len(log_probs), bool)
    keep[bad] = False
    res = metrics(np.asarray(log_probs)[keep], np.asarray(labels)[keep],
                  None if reference is None else np.asarray(reference)[keep])
    res["skipped_files"] = len(bad)
    return res
