"""Language-model metrics on token rows: perplexity, next-token accuracy, and agreement with a reference teacher.

Over the positions that have a next token (``j < length - 1``): perplexity ``exp(mean NLL)`` of token j + 1,
next-token accuracy (top-1 equals token j + 1); with a reference ONNX teacher, its top-1 agreement with the model
and ``KL(reference || model)`` at T = 1, both over the real positions (``j < length``). A model is a torch module
taking ids [B, L] to logits [B, L, V], a ``student.pt``, or a decoder ``.onnx`` (``input_ids`` -> logits).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import TransferSetError
from .inputs.tokens import open_token_rows

__all__ = ["lm_metrics", "logits_fn", "evaluate_lm", "is_language_model"]


def is_language_model(model: str | os.PathLike) -> bool:
    """Whether ``model`` (a decoder ``.onnx`` or a ``student.pt``) gives logits per position."""
    p = Path(model)
    if not p.is_file():
        return False
    if p.suffix == ".onnx":
        from .labelling.lm_graph import is_decoder

        return is_decoder(p)
    try:
        import torch

        ck = torch.load(str(p), map_location="cpu", weights_only=True)
        return str(ck.get("student_spec", {}).get("spec", "")).startswith("lm:")
    except Exception:  # not a checkpoint: the classifier path says what is wrong with it
        return False


def logits_fn(model, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """``ids [b, L] -> logits [b, L, V] float32`` for a torch module, a ``student.pt`` or a decoder ``.onnx``."""
    import torch

    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx"):
        import onnxruntime as ort

        from .labelling.ensemble import session_options
        from .labelling.lm_graph import token_inputs
        import onnx

        roles = token_inputs(onnx.load(str(model), load_external_data=False))
        sess = ort.InferenceSession(str(model), session_options(), providers=["CPUExecutionProvider"])

        def run_onnx(ids: np.ndarray) -> np.ndarray:
            n, seq = ids.shape
            feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((n, seq), np.int64),
                    "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (n, seq)).copy()}
            return sess.run(None, {name: feed[role] for name, role in roles.items()})[0].astype(np.float32)

        return run_onnx
    if isinstance(model, (str, os.PathLike)):
        from .evaluate import load_student_checkpoint

        model = load_student_checkpoint(Path(model), device)
    dev = next(model.parameters()).device

    def run_torch(ids: np.ndarray) -> np.ndarray:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(torch.from_numpy(ids.astype(np.int64)).to(dev)).float().cpu().numpy()
        finally:
            model.train(was)

    return run_torch


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def lm_metrics(model, rows, *, reference=None, batch_size: int = 16, device: str = "cpu") -> dict:
    """Perplexity, next-token accuracy (and with ``reference``: top-1 agreement, KL to it) over ``rows``."""
    from .inputs.tokens import token_labels

    run = logits_fn(model, device)
    ref = logits_fn(reference, device) if reference is not None else None
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


def evaluate_lm(model: str, *, data: str | None = None, text: str | None = None, tokenizer: str | None = None,
                seq_len: int | None = None, text_field: str = "text", limit: int | None = None,
                reference: str | None = None, batch_size: int = 16, device: str = "cpu") -> dict:
    """:func:`lm_metrics` of a ``student.pt`` or decoder ``.onnx`` on ids or text (``transferset evaluate``)."""
    rows = open_token_rows(data, text, tokenizer, seq_len, text_field, limit)
    res = lm_metrics(model, rows, reference=reference, batch_size=batch_size, device=device)
    return {"model": [str(model)], "rows": rows.rows, **res}
