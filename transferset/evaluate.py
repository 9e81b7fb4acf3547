"""Metrics for any model on labelled data: an ONNX ensemble, an ONNX student, or a torch checkpoint.

One function, one table: teachers, the ensemble and students are compared on equal terms.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .devices import torch_device
from .errors import TransferSetError
from .targets import combine_log_probs, log_softmax
from .training.scoring import ECE_BINS, metrics, source_metrics, torch_log_probs

__all__ = ["torch_log_probs", "predict_log_probs", "metrics", "evaluate", "load_student_checkpoint", "ECE_BINS",
           "model_cost"]

SPEED_BATCHES = (1, 256)  #: the batch sizes whose rows/s ``model_cost`` measures


def load_student_checkpoint(path: str | os.PathLike, device: str = "cpu", *, allow_import: bool = False):
    """Rebuild a student from ``student.pt`` (weights + spec), loaded with ``weights_only=True``.

    A student made by a ``package.module:factory`` is rebuilt only with ``allow_import`` (see rebuild_student).
    """
    import torch

    from .training.students import rebuild_student

    try:
        ckpt = torch.load(str(path), map_location=device, weights_only=True)
    except FileNotFoundError:
        raise TransferSetError(f"{path}: no such checkpoint") from None
    except Exception as e:  # unpickling refused or a damaged file
        raise TransferSetError(f"{path}: not a transferset student checkpoint ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "student_spec" not in ckpt or "model" not in ckpt:
        raise TransferSetError(f"{path}: not a transferset student checkpoint (needs 'model' and 'student_spec')")
    try:
        model = rebuild_student(ckpt["student_spec"], allow_import=allow_import)
    except TransferSetError as e:  # name the checkpoint, keep the option at fault
        text = f"{e.message} ({path})" if e.option else f"{path}: {e.message}"
        raise TransferSetError(text, e.exit_code, option=e.option) from None
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def predict_log_probs(models: Sequence[str | os.PathLike], source, *, preprocess=None, combine: str = "mean-probs",
                      batch_size: int = 1024, device: str = "auto", quiet: bool = True,
                      allow_import: bool = False) -> np.ndarray:
    """Log-probabilities [N, C] of one model (``.pt`` or ``.onnx``) or of an ONNX ensemble at T=1."""
    paths = [Path(p) for p in models]
    if not paths:
        raise TransferSetError("give one model (a student.pt or an .onnx file) or the ONNX files of an ensemble")
    out = []
    if len(paths) == 1 and paths[0].suffix in (".pt", ".pth"):
        dev = torch_device(device)
        return torch_log_probs(load_student_checkpoint(paths[0], dev, allow_import=allow_import), source, dev, batch_size)
    for p in paths:
        if p.suffix in (".pt", ".pth"):
            raise TransferSetError(f"{p}: an ensemble is made of ONNX files; evaluate a checkpoint on its own, as the "
                                   "one model")
    from .labelling.ensemble import Ensemble, Preprocess

    with Ensemble(paths, preprocess=preprocess or Preprocess(), device="cpu" if device == "cpu" else "auto") as ens:
        for s in range(0, source.rows, batch_size):
            rows = source.read(s, min(s + batch_size, source.rows))
            z = ens.run(ens.feeds(rows), first_row=s)
            out.append(combine_log_probs(z, 1.0, combine) if z.shape[1] > 1 else
                       log_softmax(z[:, 0].astype(np.float64)))
    return np.concatenate(out)


def _photo_source(models: Sequence[str | os.PathLike], data: str, photo: dict, preprocess, limit: int | None):
    """A photo folder or list opened with the clean view of the models' input, and their preprocessing."""
    from .inputs.decode import PhotoTransform
    from .labelling.ensemble import Ensemble, Preprocess
    from .labelling.photo_label import photo_preprocess, teacher_input
    from .inputs.photos import open_scored_source

    pre = preprocess or Preprocess()
    onnx = [Path(m) for m in models if Path(m).suffix == ".onnx"]
    if onnx:
        with Ensemble(onnx, device="cpu") as probe:
            layout, channels, side = teacher_input(probe.members, pre.layout)
        pre = photo_preprocess(photo.get("norm"), pre.scale, pre.mean, pre.std, layout)
    else:  # a student checkpoint: it takes the rows of its transfer set, HxWxC uint8
        import torch

        spec = torch.load(str(models[0]), map_location="cpu", weights_only=True).get("student_spec", {})
        shape = list(spec.get("input_shape") or [None, None, 3])
        side, channels = shape[0], (shape[2] if len(shape) == 3 else 1)
    crop = photo.get("crop") or side
    transform = PhotoTransform.from_options(crop, photo.get("resize"), None, channels=int(channels or 3))
    return open_scored_source(data, transform, limit=limit), pre


def evaluate(models: Sequence[str | os.PathLike], data: str, labels: str | None = None, *,
             reference: Sequence[str | os.PathLike] | None = None, preprocess=None, combine: str = "mean-probs",
             batch_size: int = 1024, device: str = "auto", limit: int | None = None,
             allow_import: bool = False, photo: dict | None = None, speed: bool = False) -> dict:
    """Evaluate a model or an ensemble on ``data`` with hard ``labels`` (from the source when omitted).

    ``data`` may be a photo folder or list: each photo's clean view (``photo``: ``crop`` (default the models'
    input size), ``resize``, ``norm``) is what the models see, as ``label`` makes it. With ``speed``, the result
    also holds :func:`model_cost`'s parameters, ONNX bytes and rows/s.
    """
    from .inputs.photos import is_photo_spec
    from .inputs.sources import open_source, read_labels

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TransferSetError(f"must be >= 1, got {batch_size!r}", option="batch_size")
    if is_photo_spec(str(data)):
        src, preprocess = _photo_source(list(models) + list(reference or []), str(data), photo or {}, preprocess, limit)
    else:
        src = open_source(data, limit=limit)
    y = read_labels(labels, rows=src.rows) if labels else src.labels
    if y is None:
        raise TransferSetError(f"is needed: {data} carries no labels", option="labels")
    kw = dict(preprocess=preprocess, combine=combine, batch_size=batch_size, device=device, allow_import=allow_import)
    lp = predict_log_probs(models, src, **kw)
    ref = predict_log_probs(reference, src, **kw) if reference else None
    res = source_metrics(lp, y, src, ref)
    res["model"] = [str(m) for m in models]
    if speed:
        res.update(model_cost(models, src, preprocess=preprocess, allow_import=allow_import))
    return res


def _onnx_parameters(path: Path) -> int | None:
    """Elements in the graph's initializers (its weights), or None when the onnx package cannot read it."""
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        return int(sum(int(np.prod(t.dims)) for t in graph.initializer))
    except Exception:  # onnx missing or an odd file: the count is left out, the speed still measured
        return None


def _rows_per_s(run, rows: np.ndarray, budget_s: float = 0.5, most: int = 200) -> float:
    """Rows per second of ``run(rows)``: one warm-up call, then calls for ``budget_s`` (at least 3, at most
    ``most``)."""
    run(rows)
    t0, calls = time.perf_counter(), 0
    while calls < 3 or (calls < most and time.perf_counter() - t0 < budget_s):
        run(rows)
        calls += 1
    return len(rows) * calls / (time.perf_counter() - t0)


def model_cost(models: Sequence[str | os.PathLike], source, *, preprocess=None, allow_import: bool = False) -> dict:
    """What a model costs to keep and to run: its parameters, its ONNX file's bytes and the rows per second ONNX
    Runtime gives it on this machine's CPU with one thread, at batch 1 and batch 256 (rows of ``source``).

    A ``student.pt`` is exported to a temporary ONNX file first, so students and teachers are measured alike; an
    ensemble's numbers are its members' together (parameters and bytes summed, every member run per call).
    Speeds depend on the machine and on what else runs on it: compare them within one run.
    """
    from .labelling.ensemble import Ensemble, Preprocess

    paths = [Path(p) for p in models]
    n = min(max(SPEED_BATCHES), source.rows)
    if n < 1:
        raise TransferSetError("the data has no rows to time the model on", option="data")
    rows = source.read(0, n)
    rows = np.concatenate([rows] * -(-max(SPEED_BATCHES) // n))[:max(SPEED_BATCHES)]
    with tempfile.TemporaryDirectory() as tmp:
        if len(paths) == 1 and paths[0].suffix in (".pt", ".pth"):
            from .training.students import count_parameters, export_onnx

            model = load_student_checkpoint(paths[0], "cpu", allow_import=allow_import)
            params = count_parameters(model)
            paths, preprocess = [Path(tmp) / "student.onnx"], Preprocess()  # scaling is inside the exported graph
            export_onnx(model, paths[0], model.student_spec["input_shape"], str(rows.dtype))
        else:
            counts = [_onnx_parameters(p) for p in paths]
            params = None if None in counts else sum(counts)
        res = {"parameters": params, "onnx_bytes": sum(p.stat().st_size for p in paths)}
        with Ensemble(paths, preprocess=preprocess or Preprocess(), device="cpu", threads=1) as ens:
            for b in SPEED_BATCHES:
                res[f"rows_per_s_{b}"] = _rows_per_s(lambda x: ens.run(ens.feeds(x)), rows[:b])
    return res
