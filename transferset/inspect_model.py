"""``transferset inspect MODEL.onnx``: a model's tensors with their shapes, and the contract ``label`` will assume.

So a user can choose ``label --hint TENSOR`` and see, before labelling, which input is fed, which output is taken
for class scores, and whether it looks like logits or probabilities. Shapes come from ONNX shape inference and,
where the per-row input shape is fixed, from running one all-zero row with every tensor added to the outputs in
memory (the file is not touched).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .labelling.ensemble import Preprocess, load_member
from .labelling.hints import graph_tensors, load_onnx
from .targets import looks_like_probabilities

__all__ = ["inspect_model", "format_inspection"]


def _run_one_row(path: Path, row_shape: tuple, dtype: np.dtype, input_name: str, names: list[str]) -> dict:
    """Each of ``names``' shape on one all-zero row (or an empty dict when the model will not run on it)."""
    import onnx
    import onnxruntime as ort

    model = load_onnx(path)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend([onnx.ValueInfoProto(name=n) for n in names if n not in have])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = [o.name for o in sess.get_outputs()]
        got = sess.run(outs, {input_name: np.zeros((1,) + tuple(row_shape), dtype)})
    except Exception:  # a model that needs real data to run still gets its static shapes listed
        return {}
    return {n: np.asarray(v) for n, v in zip(outs, got)}


def inspect_model(path: str | os.PathLike, run: bool = True) -> dict:
    """The model's contract (input, class-score output, fixed batch, output kind on a zero row) and its tensors.

    Each tensor: ``name``, ``op``, ``dtype``, ``shape`` (the batch axis as ``"N"`` where a row was run) and
    ``shape_from`` (``run`` or ``static``).
    """
    path = Path(path)
    member = load_member(path, ["CPUExecutionProvider"], Preprocess(), threads=1)
    contract = member.describe()
    contract["output_kind"] = None
    tensors = graph_tensors(load_onnx(path))
    ran = {}
    if run and member.row_shape is not None:
        ran = _run_one_row(path, member.row_shape, member.input_dtype, member.input_name, [t["name"] for t in tensors])
    for t in tensors:
        t["shape_from"] = "static"
        v = ran.get(t["name"])
        if v is not None:
            batched = v.ndim >= 1 and v.shape[0] == 1 and t["shape"] is not None and len(t["shape"]) == v.ndim \
                and not isinstance(t["shape"][0], int)
            t["shape"] = (["N"] + list(v.shape[1:])) if batched else list(v.shape)
            t["dtype"] = v.dtype.name
            t["shape_from"] = "run"
        t["values_per_row"] = int(np.prod(t["shape"][1:])) if t["shape"] and t["shape"][0] in ("N", "batch") \
            and all(isinstance(d, int) for d in t["shape"][1:]) else None
    out = ran.get(member.output_name)
    if out is not None and out.dtype.kind == "f":
        contract["output_kind"] = "probabilities" if looks_like_probabilities(out.reshape(1, -1)) else "logits"
    contract.pop("preprocess", None)
    return {"model": str(path), "contract": contract, "tensors": tensors, "ran_one_row": bool(ran)}


def format_inspection(res: dict) -> list[str]:
    """The lines ``inspect`` prints."""
    c = res["contract"]
    kind = f", looks like {c['output_kind']} on a zero row" if c["output_kind"] else ""
    lines = [f"{res['model']}: sha256 {c['sha256']}, opset {c['opset']}, producer {c['producer'] or '-'}",
             f"label will feed input {c['input_name']!r} {c['input_shape']} {c['input_dtype']} and take class scores "
             f"from {c['output_name']!r} {c['output_shape']}{kind}; fixed batch: {c['fixed_batch'] or 'none'}",
             f"{len(res['tensors'])} tensors ({'shapes from one zero row' if res['ran_one_row'] else 'static shapes'}"
             "; use a name with label --hint NAME[:member=I][:reduce=none|avgpool|attention|sign]):"]
    width = max([len(t["name"]) for t in res["tensors"]] + [4])
    for t in res["tensors"]:
        shape = "?" if t["shape"] is None else "[" + ", ".join(str(d) for d in t["shape"]) + "]"
        per_row = f"  {t['values_per_row']} values a row" if t["values_per_row"] else ""
        lines.append(f"  {t['name']:<{width}}  {t['op']:<12} {t['dtype'] or '?':<8} {shape}{per_row}")
    return lines

