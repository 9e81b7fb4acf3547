"""A class-bias adjustment applied to a trained student, as the paper does for the digit its transfer set lacked.

Hinton, Vinyals & Dean (2015), section 3: a student that never saw a 3 gets most test 3s right once "the bias for
the 3 is increased by an appropriate amount"; the same for a set of only 7s and 8s, whose student needs the biases
of the other classes raised. Adding ``s_c`` to class c's output bias adds it to that class's logit for every input,
so the adjustment can be written into either form of a student:

- a checkpoint (``student.pt``): the output layer's bias (the last parameter named ``*bias`` with one value per
  class) gets the shifts;
- an ONNX export: one ``Add`` of a constant ``[C]`` vector is appended to the class-score output, whatever made
  the graph.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from .errors import TransferSetError

__all__ = ["parse_shifts", "shift_class_bias"]


def parse_shifts(items) -> dict[int, float]:
    """``["3=2.5", "7=-1"]`` -> ``{3: 2.5, 7: -1.0}``; also ``"all=1.5"`` for every class (``-1`` key)."""
    out: dict[int, float] = {}
    for item in items:
        cls, sep, value = str(item).partition("=")
        try:
            key = -1 if cls == "all" else int(cls)
            shift = float(value)
        except ValueError:
            key, shift = None, float("nan")
        if not sep or key is None or key < -1 or shift != shift or abs(shift) == float("inf"):
            raise TransferSetError(f"{item!r}: give CLASS=SHIFT (e.g. 3=2.5, or all=1.5)", option="shift")
        out[key] = shift
    if not out:
        raise TransferSetError("give at least one CLASS=SHIFT", option="shift")
    return out


def _vector(shifts: Mapping[int, float], classes: int):
    import numpy as np

    v = np.zeros(classes, np.float32)
    if -1 in shifts:
        v += shifts[-1]
    for c, s in shifts.items():
        if c == -1:
            continue
        if c >= classes:
            raise TransferSetError(f"class {c} does not exist: the model has {classes} classes", option="shift")
        v[c] += s
    return v


def _shift_checkpoint(src: Path, dst: Path, shifts: Mapping[int, float]) -> int:
    import torch

    from ._io import atomic_write

    try:
        ck = torch.load(str(src), map_location="cpu", weights_only=True)
        state, classes = ck["model"], int(ck["num_classes"])
    except Exception as e:
        raise TransferSetError(f"{src}: not a transferset student checkpoint ({str(e).splitlines()[0][:160]})") from None
    names = [k for k, v in state.items() if k.endswith("bias") and tuple(v.shape) == (classes,)]
    if not names:
        raise TransferSetError(f"{src}: no output bias with one value per class ({classes}) to adjust")
    v = torch.from_numpy(_vector(shifts, classes))
    state[names[-1]] = state[names[-1]] + v.to(state[names[-1]].dtype)
    ck.setdefault("bias_shifts", [])
    ck["bias_shifts"] = list(ck["bias_shifts"]) + [{str(k): float(s) for k, s in shifts.items()}]
    atomic_write(dst, lambda tmp: torch.save(ck, tmp))
    return classes


def _shift_onnx(src: Path, dst: Path, shifts: Mapping[int, float], output: str | None) -> int:
    import onnx
    from onnx import helper, numpy_helper

    from ._io import atomic_write

    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise TransferSetError(f"{src}: not an ONNX model ({str(e).splitlines()[0][:160]})") from None
    outs = model.graph.output
    out = next((o for o in outs if o.name == output), None) if output else (outs[0] if len(outs) == 1 else None)
    if out is None:
        raise TransferSetError(f"{src}: name the class-score output ({', '.join(o.name for o in outs)})",
                               option="output_name")
    dims = out.type.tensor_type.shape.dim
    if not dims or not dims[-1].HasField("dim_value"):
        raise TransferSetError(f"{src}: the output {out.name!r} has no fixed class axis to shift")
    classes = int(dims[-1].dim_value)
    v = _vector(shifts, classes)
    raw = out.name + "_before_bias_shift"
    for node in model.graph.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
        node.input[:] = [raw if i == out.name else i for i in node.input]
    const = numpy_helper.from_array(v, out.name + "_bias_shift")
    model.graph.initializer.append(const)
    model.graph.node.append(helper.make_node("Add", [raw, const.name], [out.name], name="class_bias_shift"))
    onnx.checker.check_model(model)
    atomic_write(dst, lambda tmp: onnx.save(model, str(tmp)))
    return classes


def shift_class_bias(model: str | os.PathLike, out: str | os.PathLike, shifts: Mapping[int, float], *,
                     output_name: str | None = None) -> dict:
    """Write ``model`` (``student.pt`` or ``.onnx``) to ``out`` with ``shifts`` added to the class logits.

    Returns ``{"model", "out", "classes", "shifts"}``.
    """
    src, dst = Path(model), Path(out)
    if not src.is_file():
        raise TransferSetError(f"{src}: no such model file")
    if src.suffix != dst.suffix:
        raise TransferSetError(f"{dst}: write the same kind of file as {src.name} ({src.suffix})", option="out")
    if src.suffix in (".pt", ".pth"):
        classes = _shift_checkpoint(src, dst, shifts)
    elif src.suffix == ".onnx":
        classes = _shift_onnx(src, dst, shifts, output_name)
    else:
        raise TransferSetError(f"{src}: give a student.pt or an .onnx file")
    return {"model": str(src), "out": str(dst), "classes": classes, "shifts": {str(k): v for k, v in shifts.items()}}
