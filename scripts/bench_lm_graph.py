"""Where the LM extension graph's time goes, and the block TopK tried in place of its one TopK.

Each leg is one ONNX Runtime session of one intra-op thread, run one row at a time (as ``label`` runs a top-k set
on a CPU, ``token_label.CPU_RUN_BYTES``), over the same ``--rows`` rows of random ids; the legs are timed in
interleaved rounds and the median of each is reported, in microseconds a position and as bare / leg:

- ``bare``: the unmodified teacher;
- ``joined``: the teacher joined as ``label`` joins it (``lm_graph._join``), no extension (one logit a position
  handed back);
- ``topk``: the joined teacher and one TopK(K) over its logits;
- ``topk_softmax``: that and one Softmax over the vocabulary (the probabilities at the K ids are read back);
- ``extension``: the graph ``label`` runs (``build_token_graph``, topk:K, one member, T = 1);
- ``block{S}``: the joined teacher and the block TopK below instead of TopK(K).

The block TopK: the logits [.., V] as [.., V/S, S] blocks (padded with -inf when S does not divide V), ReduceMax per
block, TopK(K) over the block maxima, the K chosen block ids sorted ascending (a TopK with largest=0), their K*S
logits gathered (GatherND), TopK(K) over those, and each position p mapped back to the id block[p // S]*S + p % S.
It is exact: order the elements by (value falling, id rising), ORT TopK's order (ties by lower index). A block's
best element is its maximum at its lowest id, and the TopK over the maxima ranks blocks by their best elements in
that order (tied maxima: the lower block holds the lower ids). An element of the global top K inside a block not
chosen would come after that block's best element, which comes after the K chosen blocks' best elements: K
elements before it, so it is not in the top K. The chosen blocks gathered in id order keep the ties of the second
TopK on the lower id, and -inf padding sits after every real id. With V/S < K blocks it is the plain TopK.
Before any timing, each block size is compared with ORT's TopK (values and ids) on the teacher's logits and on
crafted rows: integer logits (ties inside and across blocks and at the K-th place), all-equal rows, -inf entries,
a vocabulary S does not divide (padding) and one of fewer than K blocks; ``exact`` in the JSON says it held.

``top1`` times a member's top-1 (maximum and id) over the teacher's logits fed in: ``TopK`` with K = 1 (what the
graph uses), ``ArgMax`` beside ``ReduceMax``, and ``ArgMax`` over (logits == maximum) as uint8.

With ``--profile`` ORT's profiler splits the kernel time of ``topk``, the first block size's graph and ``extension`` by
op type (the teacher's own nodes as one ``teacher`` entry), in microseconds a position.

    python scripts/bench_lm_graph.py --lm data/teachers/lm-teacher.onnx --rows 32 --rounds 5 --profile --json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import lm_ids, machine  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from transferset.labelling import lm_graph  # noqa: E402
from transferset.labelling.ensemble import session_options  # noqa: E402

I64, F32 = np.int64, np.float32


def block_topk(b: "lm_graph._Builder", x: str, vocab: int, k: int, size: int) -> tuple[str, str]:
    """(values, ids) of the K largest of ``x`` [.., V] over its last axis by the block TopK (module docstring)."""
    kk = b.const([k], "K", I64)
    blocks = -(-vocab // size)
    if blocks < k:
        top, idx = b.node("TopK", [x, kk], "topk", outputs=2, axis=-1)
        return top, idx
    if blocks * size != vocab:
        x = b.one("Pad", [x, b.const([0, 0, 0, 0, 0, blocks * size - vocab], "pads", I64),
                          b.const(-np.inf, "ninf", F32)], "padded")
    xb = b.one("Reshape", [x, b.const([0, 0, blocks, size], "blocks", I64)], "xb")
    chosen = b.node("TopK", [b.reduce("ReduceMax", xb, [-1], 0, "bmax"), kk], "btop", outputs=2, axis=-1)[1]
    in_order = b.node("TopK", [chosen, kk], "bsort", outputs=2, axis=-1, largest=0)[0]
    cand = b.one("GatherND", [xb, b.unsqueeze(in_order, -1, "bidx")], "cand", batch_dims=2)
    cand = b.one("Reshape", [cand, b.const([0, 0, k * size], "flat", I64)], "cand")
    top, pos = b.node("TopK", [cand, kk], "topk", outputs=2, axis=-1)
    s = b.const(size, "S", I64)
    first = b.one("Mul", [b.one("GatherElements", [in_order, b.one("Div", [pos, s], "pb")], "bid", axis=-1), s], "b0")
    return top, b.one("Add", [first, b.one("Mod", [pos, s], "pm")], "ids")


def _session(model: onnx.ModelProto | str | bytes, profile: bool = False) -> ort.InferenceSession:
    """A CPU session of one intra-op thread (``label``'s lanes of two cores), ORT's profiler on if asked."""
    so = session_options(1)
    so.enable_profiling = profile
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _joined(lm: str, leg: str, k: int, size: int = 0) -> tuple[onnx.ModelProto, int]:
    """The joined teacher extended with ``leg``'s nodes (module docstring), and V."""
    model, zs, vocab, opset = lm_graph._join([lm], None)
    b = lm_graph._Builder(model.graph, opset)
    if leg == "joined":  # the teacher as label joins it, no extension: one logit a position handed back
        b.output("first", lm_graph._first(b, zs[0]), TensorProto.FLOAT)
        return model, vocab
    if leg == "block":
        top, idx = block_topk(b, zs[0], vocab, k, size)
    else:
        top, idx = b.node("TopK", [zs[0], b.const([k], "K", I64)], "topk", outputs=2, axis=-1)
    if leg == "topk_softmax":
        top = b.one("GatherElements", [b.one("Softmax", [zs[0]], "p", axis=-1), idx], "p_kept", axis=-1)
    b.output("values", top, TensorProto.FLOAT)
    b.output("ids", idx, TensorProto.INT64)
    return model, vocab


def _logits_graph(vocab: int, k: int, size: int) -> onnx.ModelProto:
    """logits [b, l, V] -> (block TopK values, ids, ORT TopK values, ids): the crafted rows' check."""
    g = helper.make_graph([], "check", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "l", vocab])], [])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    b = lm_graph._Builder(model.graph, 17)
    outs = [*block_topk(b, "z", vocab, k, size), *b.node("TopK", ["z", b.const([k], "K", I64)], "ref", outputs=2,
                                                         axis=-1)]
    for i, (x, elem) in enumerate(zip(outs, [TensorProto.FLOAT, TensorProto.INT64] * 2)):
        b.output(f"o{i}", x, elem)
    return model


def _crafted(vocab: int, k: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Rows built to break a block TopK: ties everywhere, all equal, -inf, and vocabularies S does not divide."""
    cases = []
    for v in (vocab, vocab + 3, max(k, size * (k - 1))):  # as given, padded, fewer than K blocks
        rows = np.round(rng.normal(0, 1.5, (1, 6, v))).astype(F32)  # integer logits: ties at and across the K-th
        rows[0, 1] = 0.0
        rows[0, 2, rng.permutation(v)[: v // 2]] = -np.inf
        rows[0, 3] = np.where(np.arange(v) % size == size - 1, 2.0, 1.0)  # tied maxima, one per block
        rows[0, 4, -5:] = 9.0  # the top ids in the last (padded) block
        rows[0, 5] = -np.inf
        rows[0, 5, :3] = 1.0
        cases.append(rows)
    return cases


def check_exact(lm: str, ids: np.ndarray, k: int, sizes: list[int]) -> dict[int, bool]:
    """Per block size: the block TopK gives ORT TopK's values and ids on the teacher's logits and the crafted rows."""
    rng = np.random.default_rng(0)
    model, vocab = _joined(lm, "topk", k)
    ref = _session(model).run(None, {"input_ids": ids})
    exact = {}
    for size in sizes:
        got = _session(_joined(lm, "block", k, size)[0]).run(None, {"input_ids": ids})
        same = all(np.array_equal(a, c) for a, c in zip(got, ref))
        for rows in _crafted(vocab, k, size, rng):
            o = _session(_logits_graph(rows.shape[-1], k, size)).run(None, {"z": rows})
            same = same and np.array_equal(o[0], o[2]) and np.array_equal(o[1], o[3])
        exact[size] = bool(same)
    return exact


def _legs(lm: str, k: int, sizes: list[int], profile: bool = False) -> dict[str, ort.InferenceSession]:
    legs = {"bare": _session(lm, profile)}
    for leg in ("joined", "topk", "topk_softmax"):
        legs[leg] = _session(_joined(lm, leg, k)[0], profile)
    graph = lm_graph.build_token_graph([lm], [1.0], "mean-probs", [1.0], f"topk:{k}")
    legs["extension"] = _session(graph.model_bytes, profile)
    for size in sizes:
        legs[f"block{size}"] = _session(_joined(lm, "block", k, size)[0], profile)
    return legs


def time_legs(lm: str, ids: np.ndarray, k: int, sizes: list[int], rounds: int) -> dict[str, list[float]]:
    """Seconds per round of each leg over every row, a row a run, legs interleaved within each round."""
    legs = _legs(lm, k, sizes)
    for s in legs.values():
        s.run(None, {"input_ids": ids[:1]})  # first-run allocations are not throughput
    secs: dict[str, list[float]] = {name: [] for name in legs}
    for _ in range(rounds):
        for name, s in legs.items():
            t = time.perf_counter()
            for r in range(len(ids)):
                s.run(None, {"input_ids": ids[r:r + 1]})
            secs[name].append(time.perf_counter() - t)
    return secs


def _topk_roles(lm: str, k: int, size: int) -> dict[str, str]:
    """Node name -> ``TopK (stem)`` for the block TopK's three TopKs (maxima, block ids, candidates)."""
    model = _joined(lm, "block", k, size)[0]
    return {n.name: f"TopK ({n.output[0].split('/')[1]})" for n in model.graph.node
            if n.op_type == "TopK" and n.name.startswith("ts/")}


def profile_split(lm: str, ids: np.ndarray, k: int, size: int, workdir: Path) -> dict[str, dict[str, float]]:
    """ORT's profiler: kernel microseconds a position by op type, of ``topk``, ``block{size}`` (its TopKs apart:
    ``btop`` over the block maxima, ``bsort`` the chosen block ids, ``topk`` over the candidates) and ``extension``."""
    legs = _legs(lm, k, [size], profile=True)
    roles = _topk_roles(lm, k, size)
    out, names = {}, ("topk", f"block{size}", "extension")
    for r in range(len(ids)):  # row by row, the legs in turn: the same load on each
        for name in names:
            legs[name].run(None, {"input_ids": ids[r:r + 1]})
    for name in names:
        path = Path(legs[name].end_profiling())
        events = json.loads(path.read_text())
        path.replace(workdir / path.name)
        split: collections.Counter = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                node = e["name"][:-len("_kernel_time")]
                op = roles.get(node, e["args"]["op_name"]) if name.startswith("block") else e["args"]["op_name"]
                split[op if node.startswith("ts/") else "teacher"] += e["dur"]
        out[name] = {op: round(us / ids.size, 3) for op, us in split.most_common()}
    for name, s in legs.items():
        if name not in out:
            Path(s.end_profiling()).unlink(missing_ok=True)
    return out


def _top1_graph(vocab: int, how: str) -> onnx.ModelProto:
    """logits [b, l, V] -> (maximum, argmax) [b, l, 1], spelled ``how``: one TopK with K = 1 (what the graph uses for
    a member's top-1), ``ArgMax`` beside ``ReduceMax``, or ``ArgMax`` over (logits == maximum) as uint8."""
    g = helper.make_graph([], "top1", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "l", vocab])], [])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    b = lm_graph._Builder(model.graph, 17)
    if how == "topk1":
        top, idx = b.node("TopK", ["z", b.const([1], "K", I64)], "top1", outputs=2, axis=-1)
    else:
        top = b.reduce("ReduceMax", "z", [-1], 1, "max")
        at = "z" if how == "argmax" else b.one("Cast", [b.one("Equal", ["z", top], "eq")], "eq", to=TensorProto.UINT8)
        idx = b.one("ArgMax", [at], "arg", axis=-1, keepdims=1)
    b.output("max", top, TensorProto.FLOAT)
    b.output("arg", idx, TensorProto.INT64)
    return model


def time_top1(lm: str, ids: np.ndarray, rounds: int) -> dict[str, dict]:
    """A member's top-1 three ways over the teacher's logits of each row (fed in, a row a run, interleaved rounds):
    microseconds a position (median) and whether each gives TopK K = 1's maximum and id."""
    z = _session(lm).run(None, {"input_ids": ids})[0]
    legs = {how: _session(_top1_graph(z.shape[-1], how)) for how in ("topk1", "argmax", "equal_argmax")}
    ref = legs["topk1"].run(None, {"z": z})
    secs: dict[str, list[float]] = {how: [] for how in legs}
    for _ in range(rounds):
        for how, s in legs.items():
            t = time.perf_counter()
            for r in range(len(z)):
                s.run(None, {"z": z[r:r + 1]})
            secs[how].append(time.perf_counter() - t)
    return {how: {"us_per_position": round(statistics.median(v) / ids.size * 1e6, 3),
                  "same_as_topk1": all(np.array_equal(a, c) for a, c in zip(legs[how].run(None, {"z": z}), ref))}
            for how, v in secs.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lm", default="data/teachers/lm-teacher.onnx", help="a decoder ONNX (ids -> logits [B, L, V])")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--blocks", default="32,64,128", help="block sizes S of the block TopK, comma separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also ORT's profiler split (first block size)")
    ap.add_argument("--quick", action="store_true", help="a smoke run (2 rows of 16, one round), seconds")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.add_argument("--workdir", default=None, help="where the profiles go")
    a = ap.parse_args(argv)
    if a.quick:
        a.rows, a.seq_len, a.rounds, a.k, a.profile = 2, 16, 1, 4, True
    sizes = [int(s) for s in a.blocks.split(",")]
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="bench_lm_graph-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ids, vocab = lm_ids(a.lm, a.rows, a.seq_len)
    load0 = [round(v, 2) for v in os.getloadavg()]
    exact = check_exact(a.lm, ids, a.k, sizes)
    secs = time_legs(a.lm, ids, a.k, sizes, a.rounds)
    us = {name: statistics.median(v) / ids.size * 1e6 for name, v in secs.items()}
    res = {"lm": a.lm, "rows": a.rows, "seq_len": a.seq_len, "vocab": vocab, "k": a.k, "rounds": a.rounds,
           "us_per_position": {n: round(v, 3) for n, v in us.items()},
           "bare_over_leg": {n: round(us["bare"] / v, 3) for n, v in us.items()},
           "seconds": {n: [round(x, 3) for x in v] for n, v in secs.items()},
           "exact": {str(s): e for s, e in exact.items()}, "loadavg_before": load0, "machine": machine()}
    res["top1"] = time_top1(a.lm, ids, a.rounds)
    if a.profile:
        res["profile_us_per_position"] = profile_split(a.lm, ids, a.k, sizes[0], workdir)
    print(f"{'leg':<14} {'us/position':>12} {'bare/leg':>9}")
    for name in us:
        print(f"{name:<14} {us[name]:>12.2f} {us['bare'] / us[name]:>9.3f}")
    print("block TopK exact (S: held):", res["exact"], " load before:", load0)
    print("a member's top-1 (us/position, same as TopK K = 1):", res["top1"])
    if a.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
