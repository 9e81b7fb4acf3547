"""targets.py's float32 path (what label writes since schema 4) against hand computation and the float64
reference; half.py's float16 cast bit for bit against numpy's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transferset.labelling.half import cast_stored, to_float16
from transferset.targets import combine_log_probs, entropy_from_log_probs, soft_targets

# member A: logits [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2] at T = 1; member B: [ln 3, 0, 0] -> [3/5, 1/5, 1/5]
Z = np.array([[[0.0, 0.0, math.log(2)], [math.log(3), 0.0, 0.0]]])
R2, R3 = math.sqrt(2), math.sqrt(3)  # at T = 2 the exps are square roots


def _by_hand() -> dict:
    a1, b1 = np.array([1, 1, 2]) / 4, np.array([3, 1, 1]) / 5
    a2, b2 = np.array([1, 1, R2]) / (2 + R2), np.array([R3, 1, 1]) / (2 + R3)
    mean = np.stack([(a1 + b1) / 2, (a2 + b2) / 2])  # mean-probs, equal weights [T, C]
    zbar = np.array([R3, 1, R2])  # exp of (z_A + z_B) / 2 at T = 1: [ln 3 / 2, 0, ln 2 / 2]
    logits_rule = np.stack([zbar / zbar.sum(), np.sqrt(zbar) / np.sqrt(zbar).sum()])
    parts = np.log([[4, 2 + R2], [5, 2 + R3]])  # each member's log sum_c exp(z_c / T) [M, T]
    return {"mean-probs": mean, "mean-logits": logits_rule, "partition": parts}


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-7)])
def test_soft_targets_match_hand_computation(dtype, tol):
    want = _by_hand()
    for rule in ("mean-probs", "mean-logits", "geometric"):
        part = np.empty((1, 2, 2), dtype)
        ent = np.empty((1, 2), dtype)
        lp = soft_targets(Z, [1.0, 2.0], rule, log_partition=part, dtype=dtype, entropy=ent)
        p = want["mean-logits" if rule == "geometric" else rule]
        assert lp.dtype == dtype and lp.shape == (1, 2, 3)
        np.testing.assert_allclose(lp[0], np.log(p), rtol=0, atol=tol * 4)
        np.testing.assert_allclose(ent[0], -(p * np.log(p)).sum(-1), rtol=0, atol=tol * 4)
        np.testing.assert_allclose(part[0], want["partition"], rtol=0, atol=tol * 4)
    np.testing.assert_allclose(combine_log_probs(Z, 2.0, dtype=dtype)[0], np.log(want["mean-probs"][1]), atol=tol * 4)
    np.testing.assert_allclose(entropy_from_log_probs(np.log(want["mean-probs"]).astype(dtype)),
                               -(want["mean-probs"] * np.log(want["mean-probs"])).sum(-1), atol=tol * 4)


def test_float32_keeps_every_finite_log_probability():
    """A probability under float32's floor (e^-200) is computed again in the log domain, not lost to -inf; a
    member of weight 0 changes nothing."""
    z = np.array([[[0.0, -200.0, -150.0], [0.0, -200.0, -150.0], [5.0, 0.0, 0.0]]])
    ent = np.empty((1, 1), np.float32)
    lp = soft_targets(z, [1.0], "mean-probs", np.array([0.5, 0.5, 0.0]), dtype=np.float32, entropy=ent)
    assert np.isfinite(lp).all()
    np.testing.assert_allclose(lp[0, 0], [0.0, -200.0, -150.0], atol=1e-5)
    assert abs(ent[0, 0]) < 1e-30


def test_float32_agrees_with_the_float64_reference_to_one_float16_step():
    """What label stores: float32 maths rounded to float16 is the float64 reference's float16 value, or the next
    one (about 1 value in 10,000 at 1,000 classes; docs/FORMAT.md 'Schema 4')."""
    rng = np.random.default_rng(0)
    temps = [1.0, 2.0, 4.0, 8.0, 20.0]
    for scale in (1.0, 5.0, 20.0):
        z = (rng.normal(size=(64, 4, 1000)) * scale).astype(np.float32)
        w = np.array([0.1, 0.2, 0.3, 0.4])
        p64, p32 = np.empty((64, 4, 5)), np.empty((64, 4, 5), np.float32)
        ref = soft_targets(z, temps, "mean-probs", w, p64)
        got = soft_targets(z, temps, "mean-probs", w, p32, dtype=np.float32)
        assert np.abs(got - ref).max() < 1e-4 and np.abs(p32 - p64).max() < 1e-4
        a, b = ref.astype(np.float16), to_float16(got)
        step = np.spacing(np.maximum(np.abs(a), np.abs(b)))
        assert (np.abs(a.astype(np.float64) - b.astype(np.float64)) <= step.astype(np.float64)).all()
        assert (a != b).mean() < 1e-3


def test_to_float16_rounds_exactly_as_numpy():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=1 << 16) * 2.0 ** rng.integers(-30, 20, 1 << 16)).astype(np.float32)
    x[:8] = [np.inf, -np.inf, np.nan, 65504.0, 65520.0, 1e-8, -0.0, 2.0 ** -24 * 1.5]
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    got = to_float16(x)
    assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16), want.view(np.uint16))
    layout = {"soft_targets": ((4,), np.dtype(np.float16)), "labels": ((), np.dtype(np.int64))}
    out = cast_stored({"soft_targets": x[8:16].reshape(2, 4), "labels": np.array([1, 2], np.int32)}, layout)
    assert out["soft_targets"].dtype == np.float16 and out["labels"].dtype == np.int64


def test_blocked_soft_targets_equal_each_row_computed_alone():
    """soft_targets and the top-k tail work in cache-sized blocks of rows; no value may depend on the block."""
    from transferset.format.codecs import _tail_log_mass, top_classes
    from transferset.targets import _block_rows

    rng = np.random.default_rng(3)
    z = (rng.normal(0, 3, (300, 3, 1000)) * rng.choice([1.0, 40.0], (300, 1, 1))).astype(np.float32)
    temps = [1.0, 2.5, 8.0]
    assert _block_rows(z) < len(z)  # more than one block
    part, ent = np.empty((300, 3, 3), np.float32), np.empty((300, 3), np.float32)
    got = soft_targets(z, temps, "mean-probs", np.array([1.0, 2.0, 3.0]), part, dtype=np.float32, entropy=ent)
    for i in (0, 1, 77, 299):
        p1, e1 = np.empty((1, 3, 3), np.float32), np.empty((1, 3), np.float32)
        one = soft_targets(z[i:i + 1], temps, "mean-probs", np.array([1.0, 2.0, 3.0]), p1, dtype=np.float32, entropy=e1)
        assert one.tobytes() == got[i:i + 1].tobytes()
        assert p1.tobytes() == part[i:i + 1].tobytes() and e1.tobytes() == ent[i:i + 1].tobytes()
    idx = top_classes(got[:, 0], 20)
    tail = _tail_log_mass(got, idx)
    for i in (0, 150, 299):
        assert _tail_log_mass(got[i:i + 1], idx[i:i + 1]).tobytes() == tail[i:i + 1].tobytes()


def test_top_k_gathers_and_tail_equal_the_plain_numpy_way_bit_for_bit():
    """The top-k encoder gathers by one flat take and sums every temperature's tail at once; each value must be
    what take_along_axis and a per-temperature masked logsumexp give (ties, -inf, float64 and float32 inputs)."""
    from transferset.format.codecs import _encode_topk, top_classes
    from transferset.targets import logsumexp

    rng = np.random.default_rng(11)
    for trial in range(60):
        n, m, c, k = int(rng.integers(1, 70)), int(rng.integers(1, 4)), int(rng.integers(2, 400)), 0
        k = int(rng.integers(1, c))
        temps = [float(t) for t in rng.choice([0.5, 1.0, 2.0, 4.0, 20.0], int(rng.integers(1, 4)), replace=False)]
        z = (rng.integers(-3, 3, (n, m, c)) if trial % 3 == 0 else rng.normal(0, 30, (n, m, c))).astype(np.float32)
        lp = soft_targets(z, temps, "mean-probs", None, None, dtype=np.float32 if trial % 2 else np.float64)
        if trial % 4 == 1:
            lp[rng.random(lp.shape) < 0.2] = -np.inf
        part = rng.normal(size=(n, m, len(temps))).astype(np.float32)
        got = _encode_topk(z, lp, None, temps, k, np.dtype(np.float16), part)
        idx = top_classes(lp[:, int(np.argmin(temps))], k)
        rest = lp.copy()
        np.put_along_axis(rest, np.broadcast_to(idx[:, None, :], (n, len(temps), k)), -np.inf, axis=2)
        want = {"topk_index": idx, "topk_log_probs": np.take_along_axis(lp, idx[:, None, :], 2),
                "topk_logits": np.take_along_axis(z, idx[:, None, :], 2), "member_log_partition": part,
                "tail_log_mass": np.stack([logsumexp(rest[:, j], axis=1) for j in range(len(temps))], axis=1)}
        for name, w in want.items():
            dt = got[name].dtype
            assert got[name].tobytes() == w.astype(np.float64 if dt == np.float16 and w.dtype == np.float64
                                                   else w.dtype).astype(dt).tobytes(), (trial, name)


def test_the_embedded_cast_model_is_what_onnx_helper_builds():
    # half.py keeps the Cast model as bytes so that labelling never imports onnx; they must stay that model
    from onnx import TensorProto, helper

    from transferset.labelling.half import CAST_MODEL

    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)], "half",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    assert CAST_MODEL == model.SerializeToString()
