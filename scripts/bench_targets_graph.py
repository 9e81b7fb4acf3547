"""Would the soft targets cost less inside ONNX Runtime? The writer's numpy maths against one ONNX graph doing the same.

Issue 25 asks for label at >= 0.85 of ONNX Runtime alone at 1,000 classes, and names computing the soft targets in an
ONNX graph as one way. This script measures what that would save before any format changes: per batch of member
logits [B, M, C] (random, ``--scale`` wide), in thread CPU seconds over ``--rows`` rows:

1. ``numpy``: what ``label``'s writer runs today for the codec (``targets.soft_targets`` in float32 with the
   entropies and, for top-k, the members' log-partitions; ``codec.encode``; the float16 casts);
2. ``graph``: one ONNX graph (one intra-op thread, as a lane) computing the same fields: per temperature a Mul, a
   Softmax per member, the members' weighted sum (MatMul), its Log and entropy, each member's log-partition
   (max z / T less the log of its largest probability), the float16 Casts; for ``topk:K`` the TopK at the lowest
   temperature, the kept values (GatherElements) and the tail mass (the kept classes zeroed by ScatterElements,
   then a sum). Probability space throughout, like the numpy path's fast case (it has no log-domain fallback).

It also reports how many stored float16 values differ between the two (the graph's float32 rounding differs from
numpy's, so using it would change the bytes: a new schema version). Usage::

    python scripts/bench_targets_graph.py --classes 1000 --codec topk:20
    python scripts/bench_targets_graph.py --classes 1000 --codec dense
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import machine  # noqa: E402

import numpy as np  # noqa: E402

from transferset.format.codecs import codec_for  # noqa: E402
from transferset.labelling.ensemble import session_options  # noqa: E402
from transferset.labelling.half import to_float16  # noqa: E402
from transferset.targets import soft_targets  # noqa: E402

TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)


def build_graph(members: int, classes: int, temps, k: int | None) -> bytes:
    """The graph of leg 2 (module docstring); outputs named like the codec's fields, one per temperature."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    f32 = TP.FLOAT
    inits = [h.make_tensor("w", f32, [1, 1, members], [1.0 / members] * members),
             h.make_tensor("axis_c", TP.INT64, [1], [-1]), h.make_tensor("zero", f32, [], [0.0])]
    nodes, outs = [], []
    if k is not None:
        inits += [h.make_tensor("k", TP.INT64, [1], [k]), h.make_tensor("tile_m", TP.INT64, [3], [1, members, 1])]
    else:  # dense stores every member's logits in float16 too
        nodes.append(h.make_node("Cast", ["z"], ["logits"], to=TP.FLOAT16))
        outs.append(("logits", TP.FLOAT16))
    low = int(np.argmin(temps))
    order = [low] + [j for j in range(len(temps)) if j != low]  # the kept classes come from the lowest temperature
    for j in order:
        inits.append(h.make_tensor(f"inv{j}", f32, [], [1.0 / temps[j]]))
        nodes += [h.make_node("Mul", ["z", f"inv{j}"], [f"zs{j}"]),
                  h.make_node("Softmax", [f"zs{j}"], [f"p{j}"], axis=-1),
                  h.make_node("MatMul", ["w", f"p{j}"], [f"pc{j}"]),
                  h.make_node("Log", [f"pc{j}"], [f"lp{j}"]),
                  h.make_node("Mul", [f"pc{j}", f"lp{j}"], [f"plp{j}"]),
                  h.make_node("ReduceSum", [f"plp{j}", "axis_c"], [f"entropy{j}"], keepdims=0)]
        outs.append((f"entropy{j}", f32))
        if k is None:
            nodes.append(h.make_node("Cast", [f"lp{j}"], [f"soft_targets{j}"], to=TP.FLOAT16))
            outs.append((f"soft_targets{j}", TP.FLOAT16))
            continue
        nodes += [h.make_node("ReduceMax", [f"zs{j}", "axis_c"], [f"mz{j}"], keepdims=0),
                  h.make_node("ReduceMax", [f"p{j}", "axis_c"], [f"mp{j}"], keepdims=0),
                  h.make_node("Log", [f"mp{j}"], [f"lmp{j}"]),
                  h.make_node("Sub", [f"mz{j}", f"lmp{j}"], [f"lse{j}"]),
                  h.make_node("Cast", [f"lse{j}"], [f"member_log_partition{j}"], to=TP.FLOAT16)]
        if j == low:
            nodes += [h.make_node("TopK", [f"lp{j}", "k"], ["top_values", "topk_index"], axis=-1),
                      h.make_node("Tile", ["topk_index", "tile_m"], ["member_index"]),
                      h.make_node("GatherElements", ["z", "member_index"], ["kept_logits"], axis=-1),
                      h.make_node("Cast", ["kept_logits"], ["topk_logits"], to=TP.FLOAT16)]
            outs += [("topk_index", TP.INT64), ("topk_logits", TP.FLOAT16)]
        nodes += [h.make_node("GatherElements", [f"lp{j}", "topk_index"], [f"kept{j}"], axis=-1),
                  h.make_node("Cast", [f"kept{j}"], [f"topk_log_probs{j}"], to=TP.FLOAT16),
                  h.make_node("GatherElements", [f"pc{j}", "topk_index"], [f"kept_p{j}"], axis=-1),
                  h.make_node("Mul", [f"kept_p{j}", "zero"], [f"zeros{j}"]),
                  h.make_node("ScatterElements", [f"pc{j}", "topk_index", f"zeros{j}"], [f"rest{j}"], axis=-1),
                  h.make_node("ReduceSum", [f"rest{j}", "axis_c"], [f"tail{j}"], keepdims=0),
                  h.make_node("Log", [f"tail{j}"], [f"log_tail{j}"]),
                  h.make_node("Cast", [f"log_tail{j}"], [f"tail_log_mass{j}"], to=TP.FLOAT16)]
        outs += [(f"member_log_partition{j}", TP.FLOAT16), (f"topk_log_probs{j}", TP.FLOAT16),
                 (f"tail_log_mass{j}", TP.FLOAT16)]
    graph = h.make_graph(nodes, "soft_targets", [h.make_tensor_value_info("z", f32, ["N", members, classes])],
                         [h.make_tensor_value_info(n, t, None) for n, t in outs], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def numpy_fields(z: np.ndarray, codec, temps, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The fields label's writer stores for these logits (assembler._write_rows), float16 where stored so."""
    part = np.empty(z.shape[:2] + (len(temps),), np.float32) if codec.wants_log_partition else None
    ent = np.empty((len(z), len(temps)), np.float32)
    st = soft_targets(z, temps, "mean-probs", None, part, dtype=np.float32, entropy=ent)
    enc = codec.encode(z, st, rows, temps, np.float32, part)
    return {n: to_float16(v) if v.dtype == np.float32 else v for n, v in enc.items()} | {"entropy": ent}


def graph_fields(sess, z: np.ndarray, temps, k: int | None) -> dict[str, np.ndarray]:
    """The graph's outputs stacked per temperature like the codec's fields."""
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"z": z})))
    js = range(len(temps))
    out = {"entropy": -np.stack([got[f"entropy{j}"][:, 0] for j in js], 1)}
    if k is None:
        out["logits"] = got["logits"]
        out["soft_targets"] = np.stack([got[f"soft_targets{j}"][:, 0] for j in js], 1)
        return out
    out["topk_index"], out["topk_logits"] = got["topk_index"][:, 0], got["topk_logits"]
    for name in ("topk_log_probs", "tail_log_mass"):
        out[name] = np.stack([got[f"{name}{j}"][:, 0] for j in js], 1)
    out["member_log_partition"] = np.stack([got[f"member_log_partition{j}"] for j in js], -1)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--codec", default="topk:20", help="dense or topk:K")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--scale", type=float, default=3.0, help="the logits' standard deviation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workdir", default=None, help="unused (the common benchmark flag)")
    a = ap.parse_args(argv)
    if a.quick:
        a.rows, a.classes, a.repeats = 512, min(a.classes, 50), 1
    import onnxruntime as ort

    codec = codec_for(a.codec)
    k = codec.k if codec.name == "topk" else None
    temps = list(TEMPERATURES)
    sess = ort.InferenceSession(build_graph(a.members, a.classes, temps, k), session_options(1),
                                providers=["CPUExecutionProvider"])
    z = (np.random.default_rng(0).normal(size=(a.rows, a.members, a.classes)) * a.scale).astype(np.float32)
    spans = [(r0, min(r0 + a.batch_size, a.rows)) for r0 in range(0, a.rows, a.batch_size)]
    legs = {
        "numpy": lambda r0, r1: numpy_fields(z[r0:r1], codec, temps, np.arange(r0, r1)),
        "graph": lambda r0, r1: graph_fields(sess, z[r0:r1], temps, k),
    }
    cpu: dict[str, list] = {n: [] for n in legs}
    for _ in range(a.repeats):
        for name, leg in legs.items():
            t = time.thread_time()
            for r0, r1 in spans:
                leg(r0, r1)
            cpu[name].append(time.thread_time() - t)
    r0, r1 = spans[0]
    ref, got = legs["numpy"](r0, r1), legs["graph"](r0, r1)
    differ = {}
    for name, v in ref.items():
        if name in got and v.dtype == np.float16:
            differ[name] = float(np.mean(v.view(np.uint16) != got[name].view(np.uint16)))
    same_index = None if k is None else bool(np.array_equal(ref["topk_index"], got["topk_index"]))
    entropy_gap = float(np.abs(ref["entropy"] - got["entropy"]).max())
    sec = {n: statistics.median(v) for n, v in cpu.items()}
    res = {"rows": a.rows, "classes": a.classes, "members": a.members, "codec": a.codec, "batch_size": a.batch_size,
           "temperatures": temps, "repeats": a.repeats, "cpu_seconds": {n: [round(x, 4) for x in v] for n, v in cpu.items()},
           "us_per_row": {n: round(s / a.rows * 1e6, 3) for n, s in sec.items()},
           "numpy_over_graph": round(sec["numpy"] / sec["graph"], 3), "float16_values_differing": differ,
           "same_topk_index": same_index, "entropy_max_abs_gap": entropy_gap, "machine": machine()}
    if not a.json:
        print(f"{a.rows} rows x {a.members} members x {a.classes} classes, {a.codec}, {len(temps)} temperatures, "
              f"batches of {a.batch_size}, thread CPU, median of {a.repeats}:")
        for n, s in sec.items():
            print(f"  {n:<6} {s:7.3f} s  ({s / a.rows * 1e6:.2f} us a row)")
        print(f"numpy / graph = {res['numpy_over_graph']:.2f}; float16 values that would change: {differ}")
    else:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
