"""The maths where the data is: language-model teachers' graphs extended in memory with the codec's reductions.

A decoder teacher gives logits [B, L, V]; for a vocabulary of tens of thousands that tensor is the largest thing
in the run, and a codec keeps K values of it per position. So the member graphs are joined into one model in
memory (each member's names prefixed, its ``input_ids`` / ``attention_mask`` / ``position_ids`` fed from one
shared input each) and extended with ONNX nodes: temperature scaling, ``ReduceLogSumExp`` (each member's
log-partition at every stored temperature), the combination rule, ``TopK`` at the lowest stored temperature,
``GatherElements`` of the kept classes at every temperature, the tail's log-mass (a ``ReduceLogSumExp`` over
the vocabulary with the kept classes scattered to -inf, not ``log(1 - sum)``), each member's top-1 and the
combined entropy. ONNX Runtime then hands back K values, the tails and the partitions per position (on a GPU the
logits never leave the device). The model files, and so their sha256, are unchanged: nothing is written.

What each codec takes out of the graph:

- ``topk:K``: ``topk_index`` [B, L, K], ``topk_log_probs`` [B, L, T, K], ``tail_log_mass`` [B, L, T],
  ``topk_logits`` [B, L, M, K], ``member_log_partition`` [B, L, M, T], ``member_top1`` [B, L, M],
  ``entropy`` [B, L, T]: O(K + T M) numbers per position.
- ``sample:K`` / ``systematic:K`` need each position's whole cumulative distribution to place their K points
  (an inverse-CDF draw may land on any of the V ids, which is what keeps the estimator unbiased over the whole
  vocabulary); so the graph hands back the combined log-probabilities [B, L, T, V] (float32) and the draws run
  in numpy with the fixed-point search the row codecs use, seeded per (row, position).
- ``dense`` (small vocabularies): the members' logits [B, L, M, V] and the combined log-probabilities.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..errors import TransferSetError

__all__ = ["TokenGraph", "token_inputs", "build_token_graph", "is_decoder"]

_INPUTS = ("input_ids", "attention_mask", "position_ids")


def is_decoder(path: str | os.PathLike | None, output_name: str | None = None) -> bool:
    """Whether the ONNX model at ``path`` gives logits with a position axis ([batch, length, vocab])."""
    if path is None or not os.path.isfile(path):
        return False
    try:
        import onnx

        outs = onnx.load(str(path), load_external_data=False).graph.output
    except Exception:  # not ONNX at all: the ensemble loader says so in its own words
        return False
    out = next((x for x in outs if output_name in (None, x.name)), None)
    return out is not None and len(out.type.tensor_type.shape.dim) == 3


def token_inputs(model) -> dict[str, str]:
    """The role of each graph input of a decoder ONNX (``input_ids``, ``attention_mask``, ``position_ids``).

    Inputs named like a mask or positions take those roles; the one other integer input takes the ids.
    """
    init = {i.name for i in model.graph.initializer}
    roles: dict[str, str] = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        low = inp.name.lower()
        role = "attention_mask" if "mask" in low else "position_ids" if "position" in low else "input_ids"
        if role in roles.values():
            raise TransferSetError(f"has two inputs that look like {role} ({inp.name!r}); a decoder teacher takes "
                                   "input_ids and optionally attention_mask and position_ids", option="ensemble")
        roles[inp.name] = role
    if "input_ids" not in roles.values():
        raise TransferSetError("has no input_ids input; a decoder teacher takes int ids [batch, length]",
                               option="ensemble")
    return roles


class _Builder:
    """Appends nodes to a graph with fresh names, spelling reductions for the graph's opset."""

    def __init__(self, graph, opset: int) -> None:
        self.graph, self.opset, self.n = graph, opset, 0

    def name(self, stem: str) -> str:
        self.n += 1
        return f"ts/{stem}/{self.n}"

    def node(self, op: str, inputs: Sequence[str], stem: str, outputs: int = 1, **attrs) -> list[str]:
        from onnx import helper

        outs = [self.name(stem) for _ in range(outputs)]
        self.graph.node.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs

    def one(self, op: str, inputs: Sequence[str], stem: str, **attrs) -> str:
        return self.node(op, inputs, stem, **attrs)[0]

    def const(self, value, stem: str, dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def reduce(self, op: str, x: str, axes: Sequence[int], keepdims: int, stem: str) -> str:
        if self.opset >= (13 if op == "ReduceSum" else 18):  # ReduceSum took axes as an input first
            return self.one(op, [x, self.const(list(axes), "axes", np.int64)], stem, keepdims=keepdims)
        return self.one(op, [x], stem, axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axis: int, stem: str) -> str:
        if self.opset >= 13:
            return self.one("Unsqueeze", [x, self.const([axis], "axis", np.int64)], stem)
        return self.one("Unsqueeze", [x], stem, axes=[axis])

    def stack(self, xs: list[str], axis: int, stem: str) -> str:
        parts = [self.unsqueeze(x, axis, stem) for x in xs]
        return parts[0] if len(parts) == 1 else self.one("Concat", parts, stem, axis=axis)

    def output(self, name: str, x: str, elem: int) -> None:
        from onnx import helper

        self.graph.node.append(helper.make_node("Identity", [x], [name], name=self.name("out")))
        self.graph.output.append(helper.make_tensor_value_info(name, elem, None))


class TokenGraph:
    """The joined, extended model of a decoder ensemble, and what its run hands back.

    Attributes:
        model_bytes: the serialised model for ``InferenceSession``.
        inputs: the shared graph inputs (a subset of ``input_ids``, ``attention_mask``, ``position_ids``).
        outputs: names of the outputs, in ``session.run`` order.
        vocab: V, the size of the members' last output axis.
    """

    def __init__(self, model_bytes: bytes, inputs: list[str], outputs: list[str], vocab: int) -> None:
        self.model_bytes, self.inputs, self.outputs, self.vocab = model_bytes, inputs, outputs, vocab


def _vocab(model, path: str, output_name: str | None) -> tuple[str, int | None]:
    outs = [o for o in model.graph.output if output_name in (None, o.name)]
    if not outs:
        raise TransferSetError(f"{path}: has no output {output_name!r}", option="output_name")
    out = outs[0]
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 3:
        raise TransferSetError(f"{path}: output {out.name!r} has {len(dims)} axes; a language-model teacher gives "
                               "logits [batch, length, vocab]", option="ensemble")
    v = dims[2].dim_value if dims[2].HasField("dim_value") else None
    return out.name, v


def _join(paths: Sequence[str | os.PathLike], output_name: str | None):
    """One graph holding every member under a prefix, fed by shared inputs; returns (model, member logits, V)."""
    import onnx
    from onnx import TensorProto, compose, helper

    merged, member_out, vocab, opset = None, [], None, None
    shared: dict[str, object] = {}
    for i, p in enumerate(paths):
        model = onnx.load(str(p))
        ops = {o.domain: o.version for o in model.opset_import}
        if opset is not None and ops.get("", 0) != opset:
            raise TransferSetError(f"{p}: opset {ops.get('', 0)} but the first member's is {opset}; export the "
                                   "members with one opset", option="ensemble")
        opset = ops.get("", 0)
        name, v = _vocab(model, str(p), output_name)
        if vocab is not None and v is not None and v != vocab:
            raise TransferSetError(f"{p}: its vocabulary has {v} ids but the first member's has {vocab}; members "
                                   "must share one vocabulary (the same tokenizer)", option="ensemble")
        vocab = vocab or v
        roles = token_inputs(model)
        model = compose.add_prefix(model, f"m{i}/")
        g = model.graph
        for inp in list(g.input):
            role = roles.get(inp.name[len(f"m{i}/"):])
            if role is None:
                continue
            if role not in shared:
                shared[role] = helper.make_tensor_value_info(role, inp.type.tensor_type.elem_type, ["batch", "length"])
            g.node.insert(0, helper.make_node("Identity", [role], [inp.name], name=f"m{i}/feed/{role}"))
            g.input.remove(inp)
        logits = f"m{i}/{name}"
        elem = next(o for o in g.output if o.name == logits).type.tensor_type.elem_type
        if elem != TensorProto.FLOAT:
            cast = f"m{i}/ts/float"
            g.node.append(helper.make_node("Cast", [logits], [cast], to=TensorProto.FLOAT))
            logits = cast
        del g.output[:]
        member_out.append(logits)
        if merged is None:
            merged = model
        else:
            merged.graph.node.extend(g.node)
            merged.graph.initializer.extend(g.initializer)
            merged.graph.value_info.extend(g.value_info)
            merged.graph.sparse_initializer.extend(g.sparse_initializer)
            have = {f.domain for f in merged.opset_import}
            merged.opset_import.extend(o for o in model.opset_import if o.domain not in have)
            merged.functions.extend(model.functions)
    del merged.graph.input[:]
    merged.graph.input.extend(shared[r] for r in _INPUTS if r in shared)
    return merged, member_out, vocab, opset


def build_token_graph(paths: Sequence[str | os.PathLike], temperatures: Sequence[float], combine: str,
                      weights: Sequence[float], codec: str, output_name: str | None = None) -> TokenGraph:
    """Join the members and extend the graph with what ``codec`` keeps (see the module docstring).

    ``weights`` are normalised (sum 1); ``combine`` is ``mean-probs``, ``mean-logits`` or ``geometric``.
    """
    from onnx import TensorProto

    from ..format.schema import parse_codec

    model, zs, vocab, opset = _join(paths, output_name)
    b = _Builder(model.graph, opset)
    family, k = parse_codec(codec)
    temps = [float(t) for t in temperatures]
    members = len(zs)
    member_lp: list[list[str]] = []  # [member][temperature] -> log-softmax(z / T) [B, L, V]
    partitions: list[list[str]] = []  # [member][temperature] -> logZ [B, L, 1]
    for z in zs:
        lps, parts = [], []
        for t in temps:
            s = b.one("Div", [z, b.const(t, "T")], "scaled")
            lz = b.reduce("ReduceLogSumExp", s, [-1], 1, "logZ")
            lps.append(b.one("Sub", [s, lz], "lp"))
            parts.append(lz)
        member_lp.append(lps)
        partitions.append(parts)
    combined = []
    for j, t in enumerate(temps):
        if members == 1:
            combined.append(member_lp[0][j])
        elif combine == "mean-probs":
            terms = [b.one("Add", [member_lp[m][j], b.const(np.log(max(weights[m], 1e-300)), "logw")], "wlp")
                     for m in range(members)]
            combined.append(b.reduce("ReduceLogSumExp", b.stack(terms, 0, "members"), [0], 0, "combined"))
        else:  # mean-logits and geometric are one rule: softmax(sum_m w_m z_m / T)
            zbar = b.one("Sum", [b.one("Mul", [z, b.const(float(weights[m]), "w")], "wz") for m, z in enumerate(zs)],
                         "zbar")
            s = b.one("Div", [zbar, b.const(t, "T")], "scaled")
            combined.append(b.one("Sub", [s, b.reduce("ReduceLogSumExp", s, [-1], 1, "logZ")], "combined"))
    outputs: list[str] = []

    def out(name: str, x: str, elem: int = TensorProto.FLOAT) -> None:
        b.output(name, x, elem)
        outputs.append(name)

    ent = [b.reduce("ReduceSum", b.one("Mul", [b.one("Exp", [lp], "p"), lp], "plp"), [-1], 0, "negH")
           for lp in combined]
    out("entropy", b.one("Neg", [b.stack(ent, 2, "ent")], "H"))
    top1 = [b.one("ArgMax", [z], "top1", axis=-1, keepdims=0) for z in zs]
    out("member_top1", b.stack(top1, 2, "top1s"), TensorProto.INT64)
    if family == "topk":
        low = int(np.argmin(temps))
        vals, idx = b.node("TopK", [combined[low], b.const([k], "K", np.int64)], "topk", outputs=2, axis=-1,
                           largest=1, sorted=1)
        out("topk_index", idx, TensorProto.INT64)
        kept = [b.one("GatherElements", [lp, idx], "kept", axis=-1) for lp in combined]
        out("topk_log_probs", b.stack(kept, 2, "kept_t"))
        neg = b.one("Expand", [b.const(-np.inf, "ninf"), b.one("Shape", [idx], "shape")], "ninfs")
        tails = [b.reduce("ReduceLogSumExp", b.one("ScatterElements", [lp, idx, neg], "rest", axis=-1), [-1], 0,
                          "tail") for lp in combined]
        out("tail_log_mass", b.stack(tails, 2, "tails"))
        out("topk_logits", b.stack([b.one("GatherElements", [z, idx], "zk", axis=-1) for z in zs], 2, "zks"))
        parts = [b.one("Concat", partitions[m], "parts", axis=-1) if len(temps) > 1 else partitions[m][0]
                 for m in range(members)]
        out("member_log_partition", b.stack(parts, 2, "partm"))
    else:
        out("combined_log_probs", b.stack(combined, 2, "lp_t"))
        if family == "dense":
            out("member_logits", b.stack(zs, 2, "zs"))
    inputs = [i.name for i in model.graph.input]
    return TokenGraph(model.SerializeToString(), inputs, outputs, vocab or 0)
