"""Scoring a model's predictions: log-probabilities of a torch student over a source, and the metrics table;
for language models, perplexity, next-token accuracy and agreement with a reference over token rows.

Used by the training loop (per-epoch evaluation) and by :mod:`transferset.evaluate` and
:mod:`transferset.lm_metrics` (which add ONNX models, ensembles and checkpoints), so training needs nothing from the
layer above it.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np

from ..devices import session_options
from ..errors import TransferSetError
from ..inputs.tokens import decoder_input_roles, token_labels

__all__ = ["ECE_BINS", "torch_log_probs", "metrics", "source_metrics", "token_metrics", "torch_token_logits",
           "onnx_token_logits"]

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


def torch_token_logits(model) -> Callable[[np.ndarray], np.ndarray]:
    """``ids [b, L] -> logits [b, L, V] float32`` of a torch language model (eval mode, restored after)."""
    import torch

    dev = next(model.parameters()).device

    def run(ids: np.ndarray) -> np.ndarray:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(torch.from_numpy(ids.astype(np.int64)).to(dev)).float().cpu().numpy()
        finally:
            model.train(was)

    return run


def onnx_token_logits(path: str | os.PathLike, option: str = "reference") -> Callable[[np.ndarray], np.ndarray]:
    """``ids [b, L] -> logits [b, L, V] float32`` of a decoder ``.onnx`` (``input_ids`` and optionally
    ``attention_mask`` and ``position_ids``, all given), on the CPU."""
    import onnx
    import onnxruntime as ort

    roles = decoder_input_roles(onnx.load(str(path), load_external_data=False), option)
    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])

    def run(ids: np.ndarray) -> np.ndarray:
        n, seq = ids.shape
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((n, seq), np.int64),
                "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (n, seq)).copy()}
        return sess.run(None, {name: feed[role] for name, role in roles.items()})[0].astype(np.float32)

    return run


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def token_metrics(run: Callable[[np.ndarray], np.ndarray], rows, *, ref: Callable | None = None,
                  batch_size: int = 16) -> dict:
    """Perplexity, next-token accuracy (and with ``ref``: top-1 agreement, KL to it) of the logits function ``run``
    over token ``rows`` (:class:`~transferset.inputs.tokens.TokenRows`).

    Over the positions that have a next token (``j < length - 1``): perplexity ``exp(mean NLL)`` of token j + 1 and
    next-token accuracy (top-1 equals token j + 1); with a reference, its top-1 agreement with the model and
    ``KL(reference || model)`` at T = 1, both over the real positions (``j < length``).
    """
    nll, hits, labelled, agree, kl, real_n = 0.0, 0, 0, 0, 0.0, 0
    for a in range(0, rows.rows, batch_size):
        ids, length = rows.ids[a:a + batch_size], rows.length[a:a + batch_size]
        labels = token_labels(ids, length)
        lp = _log_softmax(run(ids).astype(np.float64))
        has = labels >= 0
        safe = np.where(has, labels, 0)
        picked = np.take_along_axis(lp, safe[..., None], -1)[..., 0]
        nll -= float(picked[has].sum())
        top = lp.argmax(-1)
        hits += int((top[has] == labels[has]).sum())
        labelled += int(has.sum())
        if ref is not None:
            real = np.arange(ids.shape[1])[None, :] < length[:, None]
            rp = _log_softmax(ref(ids).astype(np.float64))
            agree += int((rp.argmax(-1)[real] == top[real]).sum())
            kl += float((np.exp(rp) * (rp - lp)).sum(-1)[real].sum())
            real_n += int(real.sum())
    if not labelled:
        raise TransferSetError("the rows hold no position with a next token; give longer rows", option="data")
    out = {"positions": labelled, "nll": nll / labelled, "perplexity": math.exp(nll / labelled),
           "accuracy": hits / labelled}
    if ref is not None:
        out.update(reference_agreement=agree / max(real_n, 1), kl_to_reference=kl / max(real_n, 1))
    return out
