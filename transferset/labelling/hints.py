"""Hints: intermediate tensors of the ONNX teachers, stored per row beside the logits (stage 1 only).

A hint is ``TENSOR[:member=I][:reduce=none|avgpool|attention|sign]``: TENSOR names any tensor of member I's graph
(``transferset inspect MODEL.onnx`` lists them). The graph is extended in memory with that tensor as an extra
output (the file, and so its sha256, stay as they are); each batch's raw values are reduced here, in numpy, before
they are written as the set's ``hint_<k>`` field. The reductions keep rows small:

- ``none``: the raw tensor, ``[*tensor_shape]`` (a 64 x 8 x 8 map is 4,096 values: 8 KB a row in float16);
- ``avgpool``: the mean over the spatial axes, one C-vector (all relational KD needs);
- ``attention``: the spatial map ``sum_c A_c^2``, flattened and divided by its L2 norm (Zagoruyko & Komodakis,
  "Paying More Attention to Attention", ICLR 2017, with p = 2);
- ``sign``: ``A > 0`` per neuron, 1 bit each, packed by ``np.packbits`` (big bit order) over the flattened tensor
  (Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons", AAAI 2019).

The stored shapes and dtypes follow from (reduction, tensor shape) alone: :func:`transferset.format.schema.hint_shape`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import TransferSetError
from ..format.schema import HINT_REDUCTIONS, hint_shape

__all__ = ["HintSpec", "parse_hint", "parse_hints", "load_onnx", "graph_tensors", "model_with_outputs", "reduce_hint",
           "hint_entries"]


@dataclass(frozen=True)
class HintSpec:
    """One ``--hint``: the tensor's name in member ``member``'s graph and how each row of it is reduced."""

    tensor: str
    member: int = 0
    reduce: str = "none"

    @property
    def canonical(self) -> str:
        return f"{self.tensor}:member={self.member}:reduce={self.reduce}"


def parse_hint(text: str) -> HintSpec:
    """``TENSOR[:member=I][:reduce=R]`` -> :class:`HintSpec` (options after the last ':' that is not one)."""
    text = str(text)
    parts = text.split(":")
    opts: dict[str, str] = {}
    while len(parts) > 1 and "=" in parts[-1] and parts[-1].split("=", 1)[0] in ("member", "reduce"):
        key, value = parts.pop().split("=", 1)
        opts.setdefault(key, value)
    tensor = ":".join(parts)
    if not tensor:
        raise TransferSetError(f"{text[:200]!r} names no tensor; give TENSOR[:member=I][:reduce=R]", option="hint")
    member = opts.get("member", "0")
    if not member.isdigit():
        raise TransferSetError(f"{text[:200]!r}: member must be a whole number >= 0, got {member!r}", option="hint")
    reduce = opts.get("reduce", "none")
    if reduce not in HINT_REDUCTIONS:
        raise TransferSetError(f"{text[:200]!r}: reduce {reduce!r} is not one of {', '.join(HINT_REDUCTIONS)}",
                               option="hint")
    return HintSpec(tensor, int(member), reduce)


def parse_hints(texts: Sequence[str] | None, members: int) -> list[HintSpec]:
    """Every ``--hint`` parsed; a member index past the ensemble, or a hint given twice, is refused."""
    specs = [parse_hint(t) for t in texts or ()]
    for s in specs:
        if s.member >= members:
            raise TransferSetError(f"{s.tensor!r}: member={s.member}, but the ensemble has {members} member(s) "
                                   f"(0 to {members - 1})", option="hint")
    if len({s.canonical for s in specs}) != len(specs):
        raise TransferSetError("the same hint is given twice", option="hint")
    return specs


def load_onnx(path: str | os.PathLike):
    """The ONNX model at ``path`` (its graph and weights), or one line saying it is not a loadable model."""
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # onnx raises its own decode errors for a file that is not a model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TransferSetError(f"{path}: not a loadable ONNX model ({first[:300]})") from None


def graph_tensors(model) -> list[dict]:
    """Every tensor a node of ``model`` (an ``onnx.ModelProto``) computes: name, op, dtype and inferred shape.

    Shapes come from ONNX shape inference: whole numbers where static, the symbol (``"batch"``) or None where not.
    """
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a nicety; a model it cannot follow still lists its tensors
        inferred = model
    info = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    out = []
    for node in model.graph.node:
        for name in node.output:
            if not name:
                continue
            v = info.get(name)
            dtype, shape = None, None
            if v is not None and v.type.HasField("tensor_type"):
                tt = v.type.tensor_type
                if tt.elem_type:
                    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
                if tt.HasField("shape"):
                    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            out.append({"name": name, "op": node.op_type, "dtype": dtype, "shape": shape})
    return out


def model_with_outputs(path: str | os.PathLike, names: Sequence[str]) -> bytes:
    """The model at ``path`` with ``names`` added to its graph's outputs, serialised (the file is not touched).

    A name no node of the graph computes is refused in one line that says how to list the graph's tensors.
    """
    import onnx

    model = load_onnx(path)
    have = {o for n in model.graph.node for o in n.output if o}
    outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            close = sorted(n for n in have if name.lower() in n.lower())[:3]
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise TransferSetError(f"{Path(path).name} has no tensor named {name!r}{hint}; "
                                   f"`transferset inspect {path}` lists its tensors", option="hint")
        if name not in outputs:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            outputs.add(name)
    return model.SerializeToString()


def reduce_hint(values: np.ndarray, reduce: str) -> np.ndarray:
    """Reduce a batch ``[N, *tensor_shape]`` of one hint tensor; float32 for the float reductions, uint8 for sign.

    ``avgpool``: mean over axes 2.. (a rank-2 tensor is already a vector); ``attention``: ``sum_c x_c^2`` over axis 1,
    flattened, divided by its L2 norm (a zero map stays zero); ``sign``: ``np.packbits(x > 0)`` over the flattened row.
    """
    x = np.asarray(values)
    n = x.shape[0]
    if reduce == "sign":
        return np.packbits(x.reshape(n, -1) > 0, axis=1)
    x = x.astype(np.float32, copy=False)
    if reduce == "none":
        return np.ascontiguousarray(x)
    if reduce == "avgpool":
        return x.reshape(n, -1) if x.ndim <= 2 else x.mean(axis=tuple(range(2, x.ndim)), dtype=np.float64).astype(np.float32)
    if reduce == "attention":
        if x.ndim < 3:
            raise TransferSetError(f"reduce=attention needs a [N, C, H, ...] map, the tensor is {list(x.shape[1:])} a row",
                                   option="hint")
        a = np.square(x, dtype=np.float64).sum(axis=1).reshape(n, -1)
        norm = np.sqrt(np.square(a).sum(axis=1, keepdims=True))
        return (a / np.where(norm > 0, norm, 1.0)).astype(np.float32)
    raise TransferSetError(f"reduce {reduce!r} is not one of {', '.join(HINT_REDUCTIONS)}", option="hint")


def hint_entries(specs: Sequence[HintSpec], tensor_shapes: Sequence[Sequence[int]], float_dtype: str) -> list[dict]:
    """The manifest's ``hints`` list: one entry per hint, field ``hint_<k>``, its shapes and stored dtype."""
    out = []
    for k, (s, tshape) in enumerate(zip(specs, tensor_shapes)):
        shape, dtype = hint_shape(s.reduce, list(tshape), float_dtype)
        out.append({"field": f"hint_{k}", "tensor": s.tensor, "member": s.member, "reduce": s.reduce,
                    "tensor_shape": [int(d) for d in tshape], "shape": shape, "dtype": dtype})
    return out


def hint_disagreement(stored: np.ndarray, raw: np.ndarray, reduce: str) -> tuple[float, tuple[int, int] | None]:
    """Largest |stored - recomputed| of a hint and the first ``(row, flat position)`` that disagrees, or None.

    Float reductions agree as logits do in ``verify --reteach``: the recomputed value rounded to the stored dtype,
    give or take one unit in the last place (fp16) or 1e-4 relative. A sign bit agrees when equal, or when the
    recomputed activation is within 1e-5 of zero (run-to-run noise may cross zero there).
    """
    n = len(stored)
    if reduce == "sign":
        x = np.asarray(raw, np.float32).reshape(n, -1)
        bits = np.unpackbits(stored.reshape(n, -1), axis=1, count=x.shape[1]).astype(bool)
        bad = (bits != (x > 0)) & (np.abs(x) > 1e-5)
        diff = float(bad.sum())
    else:
        fresh = reduce_hint(raw, reduce).reshape(n, -1)
        s32 = stored.reshape(n, -1).astype(np.float32)
        d = np.abs(s32 - fresh)
        tol = 1e-4 * (1 + np.abs(fresh))
        if stored.dtype == np.float16:
            tol = tol + np.spacing(np.abs(fresh).astype(np.float16)).astype(np.float32)
        bad = d > tol
        diff = float(d.max(initial=0.0))
    if not bad.any():
        return diff, None
    r, j = (int(v) for v in np.argwhere(bad)[0])
    return diff, (r, j)
