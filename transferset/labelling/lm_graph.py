"""The maths where the data is: language-model teachers' graphs extended in memory with the codec's reductions.

A decoder teacher gives logits [B, L, V]; for a vocabulary of tens of thousands that tensor is the largest thing
in the run, and a codec keeps K values of it per position. So the member graphs are joined into one model in
memory (each member's names prefixed, its ``input_ids`` / ``attention_mask`` / ``position_ids`` fed from one
shared input each) and extended with ONNX nodes, so that ONNX Runtime hands back K values, the tails and the
partitions per position (on a GPU the logits never leave the device). The model files, and so their sha256, are
unchanged: nothing is written.

Every pass over [B, L, V] costs about as much as a small part of the teacher's own head, so the extension makes
few, and each is an op ONNX Runtime runs fast (measured in docs/BENCHMARKS.md): for ``topk:K`` and one member,
one ``TopK`` over the raw logits (the same order as over log-probabilities: T > 0 keeps it; ties by lower id)
and per temperature one ``Softmax`` (MLAS: max, exp and sum fused per row, where ``ReduceLogSumExp`` calls exp
once per element). From p = softmax(s): the log-partition log Z = s_max - log p[argmax] (p at the argmax is
1 / sum exp(s - max)); the kept log-probabilities s_k - log Z; the tail, the sum of p with the kept ids zeroed by a
``ScatterElements`` that overwrites p in place (declared shapes let ONNX Runtime reuse the buffer); the entropy
log Z - sum_v p_v s_v, the sum over the rest read by one ``FusedMatMul`` (a dot product per position). A tail
below 1e-30 (float32 probabilities underflow near 1e-38) makes an ``If`` compute its batch's tails again in the
log domain (a ``ReduceLogSumExp`` over the vocabulary with the kept ids at -inf), so every tail stays exact.
Several members: mean-logits and geometric are softmax(sum_m w_m z_m / T), the same graph on the weighted sum,
plus each member's ``TopK`` (K = 1: its top-1 and maximum) and ``Softmax`` for its log-partition; mean-probs
mixes the members' probabilities (its kept log-probabilities in the log domain, from each member's kept logits).

ORT's ``TopK`` is most of the extension's time (the LM teacher, one thread, a row a run: about 6 us a position of
the extension's 10 to 12, the teacher itself 26 to 30; ``scripts/bench_lm_graph.py``). On a CPU it keeps a heap of
the K best and sifts it for each value that enters, about 80 a position over V = 8,192. A block TopK (the maximum
of each block of S ids, a TopK over those, the K chosen blocks' values gathered in id order, a TopK over them)
gives the same ids and values, ties included, but measured slower at S = 32, 64 and 128: the values that enter the
heap are the ones kept, so its last TopK sifts nearly as often, and the TopK over the maxima and the sort of the
chosen blocks come on top. So the graph keeps one ``TopK`` (docs/BENCHMARKS.md, "Round 3, fifth session"). A
member's top-1 is ``TopK`` with K = 1 (one scalar pass): ``ArgMax`` beside ``ReduceMax``, or ``ArgMax`` over
``Equal`` to the maximum, measured slower.

What each codec takes out of the graph:

- ``topk:K``: ``topk_index`` [B, L, K], ``topk_log_probs`` [B, L, T, K], ``tail_log_mass`` [B, L, T],
  ``topk_logits`` [B, L, M, K], ``member_log_partition`` [B, L, M, T], ``member_top1`` [B, L, M],
  ``entropy`` [B, L, T]: O(K + T M) numbers per position.
- ``sample:K`` / ``systematic:K`` need each position's whole cumulative distribution to place their K points
  (an inverse-CDF draw may land on any of the V ids, which is what keeps the estimator unbiased over the whole
  vocabulary); so the graph hands back the combined log-probabilities [B, L, T, V] (float32) and the draws run
  in numpy with the fixed-point search the row codecs use, seeded per (row, position).
- ``dense`` (small vocabularies): the members' logits [B, L, M, V] and the combined log-probabilities.
- both also give ``combined_top1`` [B, L, 1], the combined distribution's top-1 at the lowest temperature.

For those the combined log-probabilities are one ``LogSoftmax`` per temperature (mean-probs: the members'
``LogSoftmax`` mixed in the log domain by vectorised Max, Sub, Exp, Sum and Log) and the entropy one
``FusedMatMul``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..errors import TransferSetError
from ..inputs.tokens import decoder_input_roles
from .onnx_header import HeaderError, graph_interface

__all__ = ["TokenGraph", "token_inputs", "build_token_graph", "decoder_vocab", "is_decoder"]

_INPUTS = ("input_ids", "attention_mask", "position_ids")


def is_decoder(path: str | os.PathLike | None, output_name: str | None = None) -> bool:
    """Whether the ONNX model at ``path`` gives logits with a position axis ([batch, length, vocab])."""
    if path is None or not os.path.isfile(path):
        return False
    try:
        outs = graph_interface(path).outputs
    except (OSError, HeaderError):  # not ONNX at all: the ensemble loader says so in its own words
        return False
    out = next((x for x in outs if output_name in (None, x.name)), None)
    return out is not None and out.rank == 3


def token_inputs(model) -> dict[str, str]:
    """The role of each graph input of a decoder ONNX (``input_ids``, ``attention_mask``, ``position_ids``): the
    rule of :func:`transferset.inputs.tokens.decoder_input_roles`, for a member of ``--ensemble``."""
    return decoder_input_roles(model, option="ensemble")


class _Builder:
    """Appends nodes to a graph with fresh names, spelling reductions for the graph's opset."""

    def __init__(self, graph, opset: int, parent: "_Builder | None" = None) -> None:
        self.graph, self.opset, self.n = graph, opset, parent.n if parent is not None else 0  # names unique model-wide

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


def _shared_vocab(vocab: int | None, v: int | None, path) -> int | None:
    if vocab is not None and v is not None and v != vocab:
        raise TransferSetError(f"{path}: its vocabulary has {v} ids but the first member's has {vocab}; members "
                               "must share one vocabulary (the same tokenizer)", option="ensemble")
    return vocab or v


def decoder_vocab(paths: Sequence[str | os.PathLike], output_name: str | None = None) -> int | None:
    """V, the size of the members' logits' last axis as their files declare it (None when not fixed), without
    joining the graphs; members that disagree are refused as :func:`build_token_graph` refuses them."""
    import onnx

    vocab = None
    for p in paths:
        vocab = _shared_vocab(vocab, _vocab(onnx.load(str(p), load_external_data=False), str(p), output_name)[1], p)
    return vocab


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
        vocab = _shared_vocab(vocab, v, p)
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


#: a fast tail below this (probability domain, float32) is computed again in the log domain for its whole batch
TAIL_RECHECK_BELOW = 1e-30
#: the smallest normal float32: log(max(p, this)) keeps 0 * log 0 out of an entropy
_TINY = float(np.finfo(np.float32).tiny)


def _scaled(b: _Builder, x: str, t: float) -> str:
    return x if t == 1.0 else b.one("Div", [x, b.const(t, "T")], "scaled")


def _first(b: _Builder, x: str) -> str:
    """``x[..., :1]``."""
    i64 = np.int64
    return b.one("Slice", [x, b.const([0], "start", i64), b.const([1], "end", i64), b.const([-1], "axis", i64)],
                 "first")


def _declared(b: _Builder, x: str, vocab: int | None) -> str:
    """``x``, declared a float [batch, length, V] tensor: ONNX Runtime lets an op overwrite its input in place (the
    ScatterElements that zeroes the kept ids, instead of a [B, L, V] copy) only between tensors of one known shape."""
    from onnx import TensorProto, helper

    b.graph.value_info.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, ["ts_batch", "ts_length", vocab]))
    return x


def _softmax(b: _Builder, s: str, vocab: int | None) -> str:
    """softmax(s) over the vocabulary, declared [batch, length, V] (:func:`_declared`)."""
    return _declared(b, b.one("Softmax", [s], "p", axis=-1), vocab)


def _dot(b: _Builder, x: str, y: str) -> str:
    """sum_v x_v y_v at every position, [B, L, 1]: one FusedMatMul of [.., 1, V] by its transpose reads each once."""
    d = b.one("FusedMatMul", [b.unsqueeze(x, -2, "row"), b.unsqueeze(y, -2, "row")], "dot", domain="com.microsoft",
              transB=1)
    return b.reduce("ReduceSum", d, [-1], 0, "dot")


def _top1(b: _Builder, z: str) -> tuple[str, str]:
    """(max, argmax) of ``z`` over the vocabulary, [B, L, 1] each: TopK with K = 1 is one pass, ArgMax twice as slow."""
    top, idx = b.node("TopK", [z, b.const([1], "K", np.int64)], "top1", outputs=2, axis=-1)
    return top, idx


def _log_partition(b: _Builder, p: str, s_max: str, argmax: str) -> str:
    """log sum_v exp(s_v) [B, L, 1] from p = softmax(s): max s - log p[argmax] (Softmax is one fused, vectorised pass,
    where ReduceLogSumExp calls exp once per element; the probability at the argmax is 1 / sum exp(s - max))."""
    p_top = b.one("GatherElements", [p, argmax], "p_top", axis=-1)
    return b.one("Sub", [s_max, b.one("Log", [p_top], "log_p_top")], "logZ")


def _rest(b: _Builder, p: str, idx: str, after: str, vocab: int | None) -> str:
    """``p`` with the kept ids set to 0: once ``after`` (a finite [B, L, K] read of ``p``) is computed, the scatter
    writes into ``p``'s own buffer (no [B, L, V] copy)."""
    return _declared(b, b.one("ScatterElements", [p, idx, b.one("Sub", [after, after], "zeros")], "rest", axis=-1),
                     vocab)


def _by_logits(b: _Builder, s: str, idx: str, s_kept: str, vocab: int | None) -> tuple[str, str, str, str]:
    """softmax(s), whose largest value sits at ``idx[..., 0]``: (kept log-probs [B, L, K], tail mass [B, L, 1] in
    the probability domain, entropy [B, L, 1], log-partition [B, L, 1]), with one Softmax pass over V.

    H = log Z - sum_v p_v s_v, the sum taken over the kept ids ([B, L, K]) and the rest (one FusedMatMul).
    """
    p = _softmax(b, s, vocab)
    p_kept = b.one("GatherElements", [p, idx], "p_kept", axis=-1)
    log_z = b.one("Sub", [_first(b, s_kept), b.one("Log", [_first(b, p_kept)], "log_p_top")], "logZ")
    q = _rest(b, p, idx, p_kept, vocab)
    tail = b.reduce("ReduceSum", q, [-1], 1, "tail")
    kept_s = b.reduce("ReduceSum", b.one("Mul", [p_kept, s_kept], "ps_kept"), [-1], 1, "ps_kept")
    mean_s = b.one("Add", [_dot(b, q, s), kept_s], "mean_s")
    return b.one("Sub", [s_kept, log_z], "kept"), tail, b.one("Sub", [log_z, mean_s], "H"), log_z


def _mixture(b: _Builder, ss: list[str], log_zs: list[str], weights: Sequence[float], idx: str, pbar: str,
             vocab: int | None) -> tuple[str, str, str]:
    """The mean of the members' probabilities ``pbar`` = sum_m w_m softmax(s_m): (kept log-probs, computed in the log
    domain from the members' kept logits, tail mass, entropy -sum pbar log pbar)."""
    terms = [b.one("Add", [b.one("Sub", [b.one("GatherElements", [s, idx], "s_kept", axis=-1), lz], "lp_kept"),
                           b.const(np.log(max(w, 1e-300)), "logw")], "wlp") for s, lz, w in zip(ss, log_zs, weights)]
    kept = b.reduce("ReduceLogSumExp", b.stack(terms, 0, "members"), [0], 0, "kept")
    log_p = b.one("Log", [b.one("Max", [pbar, b.const(_TINY, "tiny")], "pbar_pos")], "log_pbar")
    h = b.one("Neg", [_dot(b, pbar, log_p)], "H")
    q = _rest(b, pbar, idx, b.one("Add", [kept, h], "after_H"), vocab)
    return kept, b.reduce("ReduceSum", q, [-1], 1, "tail"), h


def _exact_tails(b: _Builder, sources: list[list[tuple[str, str]]], weights: Sequence[float], idx: str) -> str:
    """The log tail masses [B, L, T] in the log domain (the ids kept set to -inf, ReduceLogSumExp over V), for a
    batch where a probability-domain tail came out too small to trust; ``sources[t]`` lists (logits, log Z) of
    the distributions mixed at temperature t (one unless mean-probs)."""
    neg = b.one("Expand", [b.const(-np.inf, "ninf"), b.one("Shape", [idx], "shape")], "ninfs")
    tails = []
    for pairs in sources:
        logs = [b.one("Sub", [b.reduce("ReduceLogSumExp", b.one("ScatterElements", [s, idx, neg], "rest", axis=-1),
                                       [-1], 1, "tail"), lz], "log_tail") for s, lz in pairs]
        if len(logs) > 1:
            logs = [b.reduce("ReduceLogSumExp", b.stack(
                [b.one("Add", [x, b.const(np.log(max(w, 1e-300)), "logw")], "wt") for x, w in zip(logs, weights)],
                0, "members"), [0], 0, "log_tail")]
        tails.append(logs[0])
    return b.one("Concat", tails, "tails", axis=-1) if len(tails) > 1 else tails[0]


def _checked_tails(b: _Builder, fast: list[str], sources: list[list[tuple[str, str]]], weights: Sequence[float],
                   idx: str) -> str:
    """log of the probability-domain tails [B, L, T], or, when one falls below :data:`TAIL_RECHECK_BELOW` (float32
    probabilities underflow near 1e-38), the batch's tails again in the log domain (an ``If``: no cost otherwise)."""
    import onnx
    from onnx import TensorProto, helper

    tails = b.one("Concat", fast, "tails", axis=-1) if len(fast) > 1 else fast[0]
    small = b.one("Less", [b.reduce("ReduceMin", tails, [0, 1, 2], 0, "smallest"),
                           b.const(TAIL_RECHECK_BELOW, "recheck")], "recheck")
    branches = {}
    for name, fill in (("then_branch", lambda g: _exact_tails(g, sources, weights, idx)),
                       ("else_branch", lambda g: g.one("Log", [tails], "log_tails"))):
        sub = onnx.GraphProto(name=b.name(name))
        g = _Builder(sub, b.opset, b)
        out = fill(g)
        b.n = g.n
        sub.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
        branches[name] = sub
    return b.one("If", [small], "log_tails", **branches)


def _member_stats(b: _Builder, zs: list[str], temps: list[float], ps: list[list[str]] | None = None
                  ) -> tuple[list[str], list[list[str]]]:
    """Each member's argmax [B, L, 1] and log-partition at each temperature (from its softmax ``ps[m][t]`` when
    given, else from a Softmax made here)."""
    tops, log_zs = [], []
    for m, z in enumerate(zs):
        z_max, arg = _top1(b, z)
        tops.append(arg)
        log_zs.append([_log_partition(b, ps[m][j] if ps else b.one("Softmax", [_scaled(b, z, t)], "p", axis=-1),
                                      _scaled(b, z_max, t), arg) for j, t in enumerate(temps)])
    return tops, log_zs


def _mean_logits(b: _Builder, zs: list[str], weights: Sequence[float]) -> str:
    """sum_m w_m z_m: mean-logits and geometric are one rule, softmax(sum_m w_m z_m / T)."""
    return b.one("Sum", [b.one("Mul", [z, b.const(float(w), "w")], "wz") for z, w in zip(zs, weights)], "zbar")


def _topk_graph(b: _Builder, zs: list[str], temps: list[float], combine: str, weights: Sequence[float], k: int,
                vocab: int | None) -> dict[str, tuple[str, int]]:
    """The topk:K outputs (module docstring): one TopK, one Softmax per distribution and temperature."""
    from onnx import TensorProto

    kk = b.const([k], "K", np.int64)
    mixture = len(zs) > 1 and combine == "mean-probs"
    if mixture:
        ss = [[_scaled(b, z, t) for t in temps] for z in zs]
        ps = [[b.one("Softmax", [s], "p", axis=-1) for s in row] for row in ss]
        tops, member_z = _member_stats(b, zs, temps, ps)
        pbars = [_declared(b, b.one("Sum", [b.one("Mul", [ps[m][j], b.const(float(w), "w")], "wp")
                                            for m, w in enumerate(weights)], "pbar"), vocab)
                 for j in range(len(temps))]
        idx = b.node("TopK", [pbars[int(np.argmin(temps))], kk], "topk", outputs=2, axis=-1)[1]
        per_t = [_mixture(b, [s[j] for s in ss], [lz[j] for lz in member_z], weights, idx, pbars[j], vocab)
                 for j in range(len(temps))]
        sources = [[(ss[m][j], member_z[m][j]) for m in range(len(zs))] for j in range(len(temps))]
    else:
        x = zs[0] if len(zs) == 1 else _mean_logits(b, zs, weights)
        x_kept, idx = b.node("TopK", [x, kk], "topk", outputs=2, axis=-1)
        xs = [_scaled(b, x, t) for t in temps]
        full = [_by_logits(b, s, idx, _scaled(b, x_kept, t), vocab) for s, t in zip(xs, temps)]
        per_t = [f[:3] for f in full]
        sources = [[(s, f[3])] for s, f in zip(xs, full)]
        tops, member_z = ([_first(b, idx)], [[f[3] for f in full]]) if len(zs) == 1 else _member_stats(b, zs, temps)
    tail = _checked_tails(b, [t[1] for t in per_t], sources, weights, idx)
    cat = lambda xs, stem: b.one("Concat", xs, stem, axis=-1) if len(xs) > 1 else xs[0]  # noqa: E731
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    out = {"entropy": (cat([t[2] for t in per_t], "H"), f), "member_top1": (cat(tops, "top1s"), i64),
           "topk_index": (idx, i64), "topk_log_probs": (b.stack([t[0] for t in per_t], 2, "kept_t"), f),
           "tail_log_mass": (tail, f),
           "member_log_partition": (b.stack([cat(lz, "parts") for lz in member_z], 2, "partm"), f)}
    if len(zs) > 1:  # with one member a kept logit is T * (log-prob + log Z): the set does not store them
        out["topk_logits"] = (b.stack([b.one("GatherElements", [z, idx], "zk", axis=-1) for z in zs], 2, "zks"), f)
    return out


def _log_sum_exp(b: _Builder, terms: list[str]) -> str:
    """log sum_m exp(terms[m]) elementwise, in the log domain (exact for any finite terms): max, then exp of the
    differences, vectorised op by op (a ReduceLogSumExp over a stacked member axis calls exp once per element)."""
    top = b.one("Max", terms, "top")
    total = b.one("Sum", [b.one("Exp", [b.one("Sub", [x, top], "diff")], "e") for x in terms], "sum")
    return b.one("Add", [top, b.one("Log", [total], "log_sum")], "lse")


def _full_graph(b: _Builder, zs: list[str], temps: list[float], combine: str, weights: Sequence[float],
                dense: bool) -> dict[str, tuple[str, int]]:
    """The outputs of the codecs that need every id: the combined log-probabilities [B, L, T, V] (LogSoftmax, one
    fused pass), their entropy, each member's argmax, and for dense the members' logits."""
    from onnx import TensorProto

    lps = []
    x = zs[0] if len(zs) == 1 else _mean_logits(b, zs, weights) if combine != "mean-probs" else None
    for t in temps:
        if x is not None:
            lps.append(b.one("LogSoftmax", [_scaled(b, x, t)], "combined", axis=-1))
            continue
        terms = [b.one("Add", [b.one("LogSoftmax", [_scaled(b, z, t)], "lp", axis=-1),
                               b.const(np.log(max(w, 1e-300)), "logw")], "wlp") for z, w in zip(zs, weights)]
        lps.append(_log_sum_exp(b, terms))
    ent = [b.one("Neg", [_dot(b, b.one("Exp", [lp], "p"), lp)], "H") for lp in lps]
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    tops = [_top1(b, z)[1] for z in zs]
    out = {"entropy": (b.one("Concat", ent, "H", axis=-1) if len(ent) > 1 else ent[0], f),
           "member_top1": (b.one("Concat", tops, "top1s", axis=-1) if len(zs) > 1 else tops[0], i64),
           "combined_top1": (tops[0] if len(zs) == 1 else _top1(b, lps[int(np.argmin(temps))])[1], i64),
           "combined_log_probs": (b.stack(lps, 2, "lp_t"), f)}
    if dense:
        out["member_logits"] = (b.stack(zs, 2, "zs"), f)
    return out


def build_token_graph(paths: Sequence[str | os.PathLike], temperatures: Sequence[float], combine: str,
                      weights: Sequence[float], codec: str, output_name: str | None = None) -> TokenGraph:
    """Join the members and extend the graph with what ``codec`` keeps (see the module docstring).

    ``weights`` are normalised (sum 1); ``combine`` is ``mean-probs``, ``mean-logits`` or ``geometric``.
    """
    from onnx import helper

    from ..format.schema import parse_codec

    model, zs, vocab, opset = _join(paths, output_name)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    b = _Builder(model.graph, opset)
    family, k = parse_codec(codec)
    temps = [float(t) for t in temperatures]
    if family == "topk":
        outs = _topk_graph(b, zs, temps, combine, [float(w) for w in weights], k, vocab)
    else:
        outs = _full_graph(b, zs, temps, combine, [float(w) for w in weights], family == "dense")
    for name, (x, elem) in outs.items():
        b.output(name, x, elem)
    inputs = [i.name for i in model.graph.input]
    return TokenGraph(model.SerializeToString(), inputs, list(outs), vocab or 0)
