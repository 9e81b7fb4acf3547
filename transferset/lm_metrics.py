"""Language-model metrics on token rows for ``transferset evaluate``: perplexity, next-token accuracy, and agreement
with a reference teacher, of models given as files.

The metrics are :func:`transferset.training.scoring.token_metrics` (the training loop scores each epoch with it);
this module turns a model into a logits function: a torch module taking ids [B, L] to logits [B, L, V], a
``student.pt``, or a decoder ``.onnx`` (``input_ids`` -> logits).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .inputs.tokens import open_token_rows
from .training.scoring import onnx_token_logits, token_metrics, torch_token_logits

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


def logits_fn(model, device: str = "cpu", option: str = "model") -> Callable[[np.ndarray], np.ndarray]:
    """``ids [b, L] -> logits [b, L, V] float32`` for a torch module, a ``student.pt`` or a decoder ``.onnx``
    (``option``: the option that named it, for a message)."""
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx"):
        return onnx_token_logits(model, option=option)
    if isinstance(model, (str, os.PathLike)):
        from .evaluate import load_student_checkpoint

        model = load_student_checkpoint(Path(model), device)
    return torch_token_logits(model)


def lm_metrics(model, rows, *, reference=None, batch_size: int = 16, device: str = "cpu") -> dict:
    """Perplexity, next-token accuracy (and with ``reference``: top-1 agreement, KL to it) over ``rows``
    (:func:`transferset.training.scoring.token_metrics` of models given as modules or files)."""
    ref = logits_fn(reference, device, option="reference") if reference is not None else None
    return token_metrics(logits_fn(model, device), rows, ref=ref, batch_size=batch_size)


def evaluate_lm(model: str, *, data: str | None = None, text: str | None = None, tokenizer: str | None = None,
                seq_len: int | None = None, text_field: str = "text", limit: int | None = None,
                reference: str | None = None, batch_size: int = 16, device: str = "cpu") -> dict:
    """:func:`lm_metrics` of a ``student.pt`` or decoder ``.onnx`` on ids or text (``transferset evaluate``)."""
    rows = open_token_rows(data, text, tokenizer, seq_len, text_field, limit)
    res = lm_metrics(model, rows, reference=reference, batch_size=batch_size, device=device)
    return {"model": [str(model)], "rows": rows.rows, **res}
