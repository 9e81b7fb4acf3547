"""Per-position sets: token sources, the extended teacher graph, per-position codecs, losses, the lm: student."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
from dataclasses import replace

import numpy as np
import pytest
import torch

from transferset.errors import TransferSetError
from transferset.format.codecs import encode
from transferset.format.schema import Manifest, shard_layout
from transferset.format.verify import verify_transfer_set
from transferset.labelling.lm_graph import build_token_graph
from transferset.labelling.pipeline import LabelOptions, label
from transferset.inputs.tokens import open_ids, pack_text, token_labels
from transferset.targets import soft_targets
from transferset.training.lm import CausalLM
from transferset.training.token_losses import TokenLoss, divergence_bins

TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "text" / "tokenizer.json"


def _export_lm(path: Path, vocab: int, seed: int, dim: int = 16) -> Path:
    torch.manual_seed(seed)
    model = CausalLM(vocab, 1, dim, 2, 64).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 8, dtype=torch.int64),), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "b", 1: "l"}, "logits": {0: "b", 1: "l"}})
    return path


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    d = tmp_path_factory.mktemp("lms")
    return [_export_lm(d / f"lm{i}.onnx", 40, i) for i in range(2)]


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ids") / "ids.npy"
    np.save(p, np.random.default_rng(0).integers(0, 40, (9, 10)))
    return p


def _full_logits(paths, ids):
    import onnxruntime as ort

    return np.stack([ort.InferenceSession(str(p)).run(None, {"input_ids": ids})[0] for p in paths], axis=2)


@pytest.mark.parametrize("combine", ["mean-probs", "mean-logits"])
def test_graph_reductions_equal_the_numpy_codec(lms, combine):
    import onnxruntime as ort

    ids = np.random.default_rng(1).integers(0, 40, (3, 7))
    temps, weights = [1.0, 3.0], [0.25, 0.75]
    g = build_token_graph(lms, temps, combine, weights, "topk:6")
    got = dict(zip(g.outputs, ort.InferenceSession(g.model_bytes).run(g.outputs, {"input_ids": ids})))
    flat = _full_logits(lms, ids).reshape(-1, 2, 40).astype(np.float64)
    part = np.empty((len(flat), 2, 2))
    st = soft_targets(flat, temps, combine, np.array(weights), part)
    ref = encode("topk:6", flat, st, np.arange(len(flat)), temps, np.float32, part)
    assert g.vocab == 40
    for name, want in ref.items():
        np.testing.assert_allclose(got[name].reshape(want.shape), want, atol=2e-5, err_msg=name)
    # only K values (and per-position scalars) leave the session
    assert got["topk_log_probs"].shape == (3, 7, 2, 6)


def _table_lm(path: Path, table: np.ndarray, vocab_dim: int | str | None = None, opset: int = 17) -> Path:
    """A decoder whose logits after id i are row i of ``table`` [V, V] (one Gather): logits chosen exactly."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)], "table",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "l"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "l", vocab_dim or table.shape[1]])],
        [numpy_helper.from_array(table.astype(np.float32), "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), str(path))
    return path


def _tables(members: int, v: int = 40) -> list[np.ndarray]:
    """Members' tables with the hard rows: a tail of about e^-125 (float32 probabilities underflow), integer logits
    (ties at and across the K-th place), all-equal logits, and a logit offset of 100."""
    rng = np.random.default_rng(7)
    out = []
    for m in range(members):
        t = rng.normal(0, 2, (v, v))
        t[1] = -120.0
        t[1, 3:9] = np.arange(6) - m  # the K = 6 kept ids; the 34 others hold about e^-125
        t[2] = np.round(rng.normal(0, 1.5, v)) if m == 0 else out[0][2] + 1.0  # the same ties in every member
        t[3] = 0.0
        t[4] += 100.0
        out.append(t)
    return out


@pytest.mark.parametrize("members,combine,opset", [(1, "mean-probs", 17), (2, "mean-probs", 17),
                                                   (2, "mean-logits", 17), (2, "mean-probs", 11)])
def test_graph_is_exact_on_tiny_tails_ties_and_offsets(tmp_path, members, combine, opset):
    """The graph's reductions (Softmax, in-place tails, an If that redoes tiny tails in the log domain) against the
    float64 numpy codec, on rows built to break them: ids and their order, log-probs, tails, partitions, entropy;
    opset 11 spells its reductions and Unsqueeze with attributes."""
    import onnxruntime as ort

    tables = _tables(members)
    paths = [_table_lm(tmp_path / f"t{m}.onnx", t, opset=opset) for m, t in enumerate(tables)]
    ids = np.array([[0, 1, 2, 3, 4], [5, 1, 4, 3, 2]])
    temps, weights = [1.0, 3.0], [0.4, 0.6][:members] if members > 1 else [1.0]
    flat = np.stack([t[ids] for t in tables], axis=2).reshape(-1, members, 40).astype(np.float32).astype(np.float64)
    part, ent = np.empty((len(flat), members, 2)), np.empty((len(flat), 2))
    st = soft_targets(flat, temps, combine, np.array(weights), part, entropy=ent)
    for codec in ("topk:6", "dense", "sample:4"):
        g = build_token_graph(paths, temps, combine, weights, codec)
        got = dict(zip(g.outputs, ort.InferenceSession(g.model_bytes).run(g.outputs, {"input_ids": ids})))
        np.testing.assert_allclose(got["entropy"].reshape(ent.shape), ent, atol=2e-5, err_msg=codec)
        np.testing.assert_array_equal(got["member_top1"].reshape(-1, members), flat.argmax(-1))
        if codec != "topk:6":
            np.testing.assert_allclose(got["combined_log_probs"].reshape(st.shape), st, atol=3e-5, rtol=1e-6)
            np.testing.assert_array_equal(got["combined_top1"].reshape(-1), st[:, 0].argmax(-1))
            continue
        ref = encode(codec, flat, st, np.arange(len(flat)), temps, np.float64, part)
        # ONNX TopK's order: by falling value, ties by lower id, also across the K-th place (numpy's argpartition
        # in top_classes picks among ties there freely; the values compared below do not depend on which)
        by_value = np.lexsort((np.broadcast_to(np.arange(40), st[:, 0].shape), -st[:, 0]), axis=1)[:, :6]
        np.testing.assert_array_equal(got["topk_index"].reshape(-1, 6), by_value)
        for name in ("topk_log_probs", "tail_log_mass", "member_log_partition") + ("topk_logits",) * (members > 1):
            np.testing.assert_allclose(got[name].reshape(ref[name].shape), ref[name], atol=2e-5, rtol=1e-6,
                                       err_msg=name)
        assert ref["tail_log_mass"][1, 0] < -100  # the e^-125 tail is there, and came back exact


def test_a_teacher_without_a_fixed_vocabulary_is_refused(tmp_path, ids_file):
    lm = _table_lm(tmp_path / "free.onnx", np.zeros((40, 40)), vocab_dim="v")
    with pytest.raises(TransferSetError, match="no fixed size"):
        label([lm], str(ids_file), tmp_path / "s", LabelOptions(codec="topk:4", quiet=True))


def test_rows_run_a_few_at_a_time_write_the_same_bytes(lms, ids_file, tmp_path, monkeypatch):
    """On a CPU the session runs at most CPU_RUN_BYTES of logits at a time; the set does not depend on it."""
    import transferset.labelling.token_label as token_label

    opts = LabelOptions(codec="topk:5", temperatures=(1.0, 2.0), batch_size=4, quiet=True)
    label(lms, str(ids_file), tmp_path / "whole", opts)
    monkeypatch.setattr(token_label, "CPU_RUN_BYTES", 1)  # one row per run
    label(lms, str(ids_file), tmp_path / "rows", opts)
    assert (tmp_path / "whole" / "shard-00000.h5").read_bytes() == (tmp_path / "rows" / "shard-00000.h5").read_bytes()
    for threads in (1, 2, 3):  # the runs of a few rows in CPU lanes (ensemble.cpu_lanes): lanes 1, 2 and 3
        label(lms, str(ids_file), tmp_path / f"lanes{threads}", replace(opts, threads=threads))
        assert (tmp_path / f"lanes{threads}" / "shard-00000.h5").read_bytes() == \
            (tmp_path / "whole" / "shard-00000.h5").read_bytes()


def test_members_must_share_a_vocabulary(lms, tmp_path, ids_file):
    other = _export_lm(tmp_path / "v41.onnx", 41, 5)
    with pytest.raises(TransferSetError, match="41 ids but the first member's has 40"):
        build_token_graph([lms[0], other], [1.0], "mean-probs", [0.5, 0.5], "topk:4")


def test_label_ids_writes_a_per_position_set(lms, ids_file, tmp_path):
    out = tmp_path / "set"
    opts = LabelOptions(codec="topk:5", temperatures=(1.0, 2.0), shard_size=4, batch_size=3, quiet=True)
    r = label(lms, str(ids_file), out, opts)
    assert r.status == "written"
    m = json.loads((out / "manifest.json").read_text())
    assert (m["schema_version"], m["positions"], m["num_classes"], m["codec"]) == (4, 10, 40, "topk:5")
    assert verify_transfer_set(out) == []
    ids = np.load(ids_file)
    with h5py.File(out / "shard-00000.h5") as f:
        np.testing.assert_array_equal(f["inputs"][:], ids[:4])
        labels = f["labels"][:]
        assert f["topk_index"].shape == (4, 10, 5) and f["topk_log_probs"].shape == (4, 10, 2, 5)
        assert f["topk_logits"].shape == (4, 10, 2, 5) and f["member_log_partition"].shape == (4, 10, 2, 2)
    np.testing.assert_array_equal(labels[:, :-1], ids[:4, 1:])  # position j holds token j + 1
    assert (labels[:, -1] == -1).all()
    again = tmp_path / "again"
    label(lms, str(ids_file), again, opts)
    for k in range(3):  # deterministic: the same command writes the same bytes
        assert (out / f"shard-0000{k}.h5").read_bytes() == (again / f"shard-0000{k}.h5").read_bytes()
    assert label(lms, str(ids_file), out, opts).status == "already-complete"


def test_one_member_topk_costs_under_140_bytes_a_token(lms, ids_file, tmp_path):
    label(lms[:1], str(ids_file), tmp_path / "s", LabelOptions(codec="topk:32", temperatures=(1.0,), quiet=True))
    m = Manifest.from_json(json.loads((tmp_path / "s" / "manifest.json").read_text()))
    assert "topk_logits" not in shard_layout(m)  # one member: T * (log-probs + partition) gives them back
    per_row = sum(int(np.prod(s)) * d.itemsize for s, d in shard_layout(m).values())
    # at V = 40 ids are uint8; at V <= 65,536 (uint16 ids and index) the same layout takes 138 B + 24 B a row
    assert per_row / m.positions < 140


def test_text_is_packed_with_end_of_text_between_documents(tmp_path):
    pytest.importorskip("tokenizers")
    text = tmp_path / "docs.jsonl"
    text.write_text("\n".join(json.dumps({"body": s}) for s in ["The quick brown fox.", "A second document here.",
                                                                  "Third."]) + "\n")
    rows = pack_text(str(text), str(TOKENIZER), 8, text_field="body")
    eot = rows.describe["tokenizer"]["special_ids"]["end_of_text"]
    pad = rows.describe["tokenizer"]["special_ids"]["pad"]
    stream = rows.ids.reshape(-1)[: (rows.rows - 1) * 8 + int(rows.length[-1])]
    assert (stream == eot).sum() == 2 and stream[-1] != eot  # between documents, not after the last
    assert (rows.ids[-1, rows.length[-1]:] == pad).all() and (rows.length[:-1] == 8).all()
    labels = token_labels(rows.ids, rows.length)
    assert (labels[-1, rows.length[-1] - 1:] == -1).all()
    assert rows.describe["tokenizer"]["vocab_size"] == 8192 and len(rows.describe["tokenizer"]["sha256"]) == 64
    with pytest.raises(TransferSetError, match="no string field 'text'"):
        pack_text(str(text), str(TOKENIZER), 8)


def test_tokenizer_and_teacher_must_agree(lms, tmp_path):
    pytest.importorskip("tokenizers")
    text = tmp_path / "t.txt"
    text.write_text("Some text.\n\nMore text here.\n")
    with pytest.raises(TransferSetError, match="8192 ids but the teachers' vocabulary has 40"):
        label(lms, None, tmp_path / "o", LabelOptions(text=str(text), tokenizer=str(TOKENIZER), seq_len=8, quiet=True))


# -- losses ------------------------------------------------------------------------------------------------------
def _dense_reference(kind, p, q, beta=0.5):
    """The divergences written out over every id, in float64 numpy."""
    if kind == "kd":
        return (p * (np.log(p) - np.log(q))).sum(-1)
    if kind == "reverse-kl":
        return (q * (np.log(q) - np.log(p))).sum(-1)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)
    return 0.5 * np.abs(p - q).sum(-1)


def _bins(x, idx):
    kept = np.take_along_axis(x, idx, -1)
    return np.concatenate([kept, 1 - kept.sum(-1, keepdims=True)], -1)


class _Head(torch.nn.Module):
    """A 'student' whose logits are a parameter [B, L, V], with hidden/head so the loss chunks it."""

    def __init__(self, logits):
        super().__init__()
        self.z = torch.nn.Parameter(torch.tensor(logits, dtype=torch.float32))
        self.head = torch.nn.Identity()

    def hidden(self, ids):
        return self.z


@pytest.mark.parametrize("kind", ["kd", "reverse-kl", "jsd", "tvd"])
def test_per_position_losses_equal_a_dense_reference(kind):
    rng = np.random.default_rng(3)
    b, n, v, k, t = 2, 5, 12, 4, 2.0
    teacher_z, student_z = rng.normal(size=(b, n, v)) * 2, rng.normal(size=(b, n, v))
    length = np.array([5, 3])
    labels = rng.integers(0, v, (b, n))
    labels[np.arange(n)[None, :] >= length[:, None] - 1] = -1
    p = np.exp(teacher_z / t) / np.exp(teacher_z / t).sum(-1, keepdims=True)
    q = np.exp(student_z / t) / np.exp(student_z / t).sum(-1, keepdims=True)
    real = np.arange(n)[None, :] < length[:, None]
    ids = torch.zeros(b, n, dtype=torch.long)
    args = (torch.tensor(labels), torch.tensor(length))
    # dense: every id
    dense = TokenLoss(kind, "dense", 1.0, t, chunk=3)(_Head(student_z), ids,
                                                     {"soft_targets": torch.tensor(np.log(p))}, *args)
    want = _dense_reference(kind, p, q)[real].mean()
    assert float(dense["soft"]) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert float(dense["loss"].detach()) == pytest.approx(t * t * want, rel=1e-4, abs=1e-6)
    # topk: K kept ids and one tail bin, by hand
    idx = np.argsort(-p, axis=-1)[..., :k]
    fields = {"topk_index": torch.tensor(idx), "topk_log_probs": torch.tensor(np.log(np.take_along_axis(p, idx, -1))),
              "tail_log_mass": torch.tensor(np.log(1 - np.take_along_axis(p, idx, -1).sum(-1)))}
    sparse = TokenLoss(kind, "topk", 1.0, t, chunk=4)(_Head(student_z), ids, fields, *args)
    want_bins = _dense_reference(kind, _bins(p, idx), _bins(q, idx))[real].mean()
    assert float(sparse["soft"]) == pytest.approx(want_bins, rel=1e-4, abs=1e-6)
    # with the tail one id, the bins are the dense distribution: sparse equals dense
    idx = np.argsort(-p, axis=-1)[..., : v - 1]
    full = {"topk_index": torch.tensor(idx), "topk_log_probs": torch.tensor(np.log(np.take_along_axis(p, idx, -1))),
            "tail_log_mass": torch.tensor(np.log(1 - np.take_along_axis(p, idx, -1).sum(-1)))}
    same = TokenLoss(kind, "topk", 1.0, t)(_Head(student_z), ids, full, *args)
    assert float(same["soft"]) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_topk_tail_of_a_confident_student_is_exact_and_its_gradient_finite():
    """The tail bin comes from log(1 - kept) below 0.99 kept mass and from a masked logsumexp above it: both rows
    equal the scatter-and-logsumexp reference, and a student with almost all mass on the kept ids gets no NaN."""
    from transferset.training.token_losses import _log_tail

    v, k = 50, 4
    z = torch.zeros(3, v, dtype=torch.float32)
    z[0, :k] = 20.0  # kept mass 1 - 2e-7: log(1 - kept) would lose every float32 digit
    z[1, :k] = 3.0   # kept mass ~0.9: the cheap path
    z[2, :k] = 5.0   # kept mass ~0.99...: on the border
    z.requires_grad_(True)
    idx = torch.arange(k).repeat(3, 1)
    lse = torch.logsumexp(z, -1, keepdim=True)
    tail = _log_tail(z, idx, lse, z.gather(1, idx) - lse)
    ref = torch.logsumexp(z.detach().double().scatter(1, idx, float("-inf")), -1) - torch.logsumexp(z.detach().double(), -1)
    torch.testing.assert_close(tail[:, 0].double(), ref, rtol=1e-5, atol=1e-5)
    tail.sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_reported_hard_term_is_the_cross_entropy_at_any_temperature(alpha, t):
    rng = np.random.default_rng(9)
    z, tz = rng.normal(size=(2, 4, 7)), rng.normal(size=(2, 4, 7))
    labels, length = np.array([[1, 2, 3, -1], [4, 0, -1, -1]]), np.array([4, 3])
    lp = tz - np.log(np.exp(tz).sum(-1, keepdims=True))
    idx = np.argsort(-lp, -1)[..., :3]
    kept = np.take_along_axis(lp, idx, -1)
    fields = {"topk_index": torch.tensor(idx), "topk_log_probs": torch.tensor(kept),
              "tail_log_mass": torch.tensor(np.log1p(-np.exp(kept).sum(-1)))}
    res = TokenLoss("kd", "topk", alpha, t)(_Head(z), torch.zeros(2, 4, dtype=torch.long), fields,
                                            torch.tensor(labels), torch.tensor(length))
    zl = z - np.log(np.exp(z).sum(-1, keepdims=True))
    has = labels >= 0
    want = -np.take_along_axis(zl, np.where(has, labels, 0)[..., None], -1)[..., 0][has].mean()
    assert float(res["hard"]) == pytest.approx(want, rel=1e-5)
    assert float(res["loss"].detach()) == pytest.approx(alpha * t * t * float(res["soft"]) + (1 - alpha) * want, rel=1e-5)


def test_topk_kd_moves_the_tail_as_one_bin():
    """The topk kd gradient on an id outside the kept K is q_v (1 - p_tail / q_tail) / (T N): proportional to the
    student's own probability, so the student's spread inside the tail gets no target (lm_task's reading)."""
    rng = np.random.default_rng(6)
    v, k, t = 10, 3, 2.0
    tz, sz = rng.normal(size=(1, 2, v)) * 2, rng.normal(size=(1, 2, v))
    p = np.exp(tz / t) / np.exp(tz / t).sum(-1, keepdims=True)
    q = np.exp(sz / t) / np.exp(sz / t).sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1)[..., :k]
    kept = np.take_along_axis(p, idx, -1)
    fields = {"topk_index": torch.tensor(idx), "topk_log_probs": torch.tensor(np.log(kept)),
              "tail_log_mass": torch.tensor(np.log(1 - kept.sum(-1)))}
    m = _Head(sz)
    res = TokenLoss("kd", "topk", 1.0, t)(m, torch.zeros(1, 2, dtype=torch.long), fields,
                                          torch.tensor([[1, -1]]), torch.tensor([2]))
    res["loss"].backward()
    g = m.z.grad.numpy().astype(np.float64)
    for j in range(2):
        tail = np.setdiff1d(np.arange(v), idx[0, j])
        q_tail, p_tail = q[0, j, tail].sum(), 1 - kept[0, j].sum()
        want = t * t * q[0, j, tail] * (1 - p_tail / q_tail) / t / 2  # T^2 scale, d/dz of softmax(z / T), 2 positions
        np.testing.assert_allclose(g[0, j, tail], want, rtol=1e-4, atol=1e-7)
        ratio = g[0, j, tail] / q[0, j, tail]
        assert np.allclose(ratio, ratio[0], rtol=1e-4)  # one factor for every tail id


def test_hard_term_and_alpha_mix_over_labelled_positions():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(2, 4, 6))
    labels = np.array([[1, 2, 3, -1], [4, -1, -1, -1]])
    length = np.array([4, 2])
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    has = labels >= 0
    want = -np.take_along_axis(lp, np.where(has, labels, 0)[..., None], -1)[..., 0][has].mean()
    res = TokenLoss("kd", "dense", 0.0, 1.0)(_Head(z), torch.zeros(2, 4, dtype=torch.long), {},
                                             torch.tensor(labels), torch.tensor(length))
    assert float(res["hard"]) == pytest.approx(want, rel=1e-5) and float(res["loss"].detach()) == pytest.approx(want, rel=1e-5)


def test_chunked_loss_and_gradient_do_not_depend_on_the_chunk():
    rng = np.random.default_rng(5)
    z, tz = rng.normal(size=(3, 6, 9)), rng.normal(size=(3, 6, 9))
    lp = torch.tensor(tz - np.log(np.exp(tz).sum(-1, keepdims=True)))
    labels, length = torch.tensor(rng.integers(0, 9, (3, 6))), torch.tensor([6, 2, 4])
    grads = []
    for chunk in (1, 5, 1000):
        m = _Head(z)
        res = TokenLoss("jsd", "dense", 0.7, 2.0, beta=0.3, chunk=chunk)(m, torch.zeros(3, 6, dtype=torch.long),
                                                                         {"soft_targets": lp}, labels, length)
        res["loss"].backward()
        grads.append((float(res["loss"]), m.z.grad.clone()))
    for loss, g in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-6)
        torch.testing.assert_close(g, grads[0][1])
    assert (grads[0][1][1, 2:] == 0).all()  # padding positions get no gradient


def test_sampled_estimator_is_unbiased_over_the_whole_vocabulary():
    rng = np.random.default_rng(6)
    v, k, rows = 30, 8, 4000
    lp = np.log(rng.dirichlet(np.ones(v) * 0.3))
    q = rng.normal(size=v)
    log_q = q - np.log(np.exp(q).sum())
    fields = encode("sample:8", None, np.broadcast_to(lp, (rows, 1, v)).copy(), np.arange(rows), [1.0], np.float32)
    res = TokenLoss("kd", "sample", 1.0, 1.0)(
        _Head(np.broadcast_to(q, (rows, 1, v)).copy()), torch.zeros(rows, 1, dtype=torch.long),
        {"sample_index": torch.tensor(fields["sample_index"].astype(np.int64)),  # [rows, T = 1 as L = 1, K]
         "sample_count": torch.tensor(fields["sample_count"].astype(np.float32))},
        torch.full((rows, 1), -1), torch.ones(rows, dtype=torch.long))
    cross_entropy = -(np.exp(lp) * log_q).sum()
    assert float(res["soft"]) == pytest.approx(cross_entropy, rel=0.02)


@pytest.mark.parametrize("codec", ["sample:8", "systematic:8"])
def test_sampled_loss_gradient_is_unbiased_at_alpha_half_with_the_ce_term(codec):
    """At alpha 0.5 and a stored T = 2, the sampled kd loss (``alpha T^2 (-sum (n_i / K) log q(c_i)) + (1 - alpha)
    CE``) has, averaged over positions that share one teacher distribution, the gradient of the dense kd loss with
    the same CE term, on every id of the vocabulary (the ids in the teacher's tail included: what a topk set cannot
    give); its value is the dense one plus ``alpha T^2 H(p)`` (it estimates the cross-entropy, not the KL)."""
    rng = np.random.default_rng(11)
    v, rows, alpha, t = 30, 3000, 0.5, 2.0
    lp = np.log(rng.dirichlet(np.ones(v) * 0.3))  # the teacher at the stored T
    z = np.broadcast_to(rng.normal(size=v) * 2, (rows, 1, v)).copy()
    labels, length = torch.tensor(rng.integers(0, v, (rows, 1))), torch.ones(rows, dtype=torch.long)
    ids = torch.zeros(rows, 1, dtype=torch.long)
    dense_m, sampled_m = _Head(z), _Head(z)
    dense = TokenLoss("kd", "dense", alpha, t)(dense_m, ids, {"soft_targets": torch.tensor(
        np.broadcast_to(lp, (rows, 1, v)).copy(), dtype=torch.float32)}, labels, length)
    fields = encode(codec, None, np.broadcast_to(lp, (rows, 1, v)).copy(), np.arange(rows), [t], np.float32)
    assert (fields["sample_count"].sum(-1) == 8).all()
    sampled = TokenLoss("kd", "sample", alpha, t)(
        sampled_m, ids, {"sample_index": torch.tensor(fields["sample_index"].astype(np.int64)),
                         "sample_count": torch.tensor(fields["sample_count"].astype(np.float32))}, labels, length)
    assert float(sampled["hard"]) == pytest.approx(float(dense["hard"]), rel=1e-6)  # the same CE term
    entropy = -(np.exp(lp) * lp).sum()
    assert float(sampled["loss"].detach()) == pytest.approx(float(dense["loss"].detach()) + alpha * t * t * entropy, rel=0.02)
    dense["loss"].backward()
    sampled["loss"].backward()
    g_dense = dense_m.z.grad.double().sum((0, 1)).numpy()  # d loss / d z, summed over the positions sharing p
    g_sampled = sampled_m.z.grad.double().sum((0, 1)).numpy()
    # the soft term's part of either is alpha T (q - p) (dense) or alpha T (q - n / K) (sampled): the draws'
    # standard error over `rows` positions bounds the difference; a biased target (top-k's tail) is far outside it
    se = alpha * t * np.sqrt(np.exp(lp) * (1 - np.exp(lp)) / (8 * rows))
    assert (np.abs(g_sampled - g_dense) <= 5 * se + 1e-6).all(), (g_sampled - g_dense) / np.maximum(se, 1e-12)
    assert np.abs(g_dense).max() > 50 * se.max()  # a gradient far above the noise: the check can fail


def test_sampled_sets_refuse_losses_they_cannot_estimate(tmp_path, lms, ids_file):
    from transferset.training.loop import TrainOptions, train_student

    label(lms[:1], str(ids_file), tmp_path / "s", LabelOptions(codec="systematic:4", temperatures=(1.0,), quiet=True))
    with pytest.raises(TransferSetError, match="draws from the teacher only"):
        train_student(tmp_path / "s", tmp_path / "run", TrainOptions(student="lm:1,8,2", loss="tvd", temperature=1.0))


def test_lm_student_trains_exports_and_evaluates(tmp_path, lms, ids_file):
    import onnxruntime as ort

    from transferset.training.loop import TrainOptions, train_student

    label(lms, str(ids_file), tmp_path / "s", LabelOptions(codec="topk:5", temperatures=(1.0, 2.0), quiet=True))
    onnx_path = tmp_path / "student.onnx"
    r = train_student(tmp_path / "s", tmp_path / "run", TrainOptions(
        student="lm:1,16,2", loss="kd", temperature=2.0, alpha=0.5, epochs=1, batch_size=4, quiet=True,
        eval_data=str(ids_file), reference=str(lms[0]), export_onnx=str(onnx_path)))
    last = r.metrics[-1]
    assert last["eval_perplexity"] > 1 and 0 <= last["eval_reference_agreement"] <= 1
    assert last["eval_kl_to_reference"] >= 0
    sess = ort.InferenceSession(str(onnx_path))
    for shape in ((2, 10), (1, 3)):  # dynamic batch and length
        out = sess.run(None, {"input_ids": np.zeros(shape, dtype=np.int64)})[0]
        assert out.shape == shape + (40,)


def test_open_ids_refuses_what_is_not_ids(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(TransferSetError, match="token ids must be integers"):
        open_ids(str(tmp_path / "f.npy"))
    np.save(tmp_path / "neg.npy", -np.ones((3, 4), np.int64))
    with pytest.raises(TransferSetError, match="negative token id"):
        open_ids(str(tmp_path / "neg.npy"))


def test_export_recode_report_and_verify_cover_per_position_sets(lms, ids_file, tmp_path):
    pa = pytest.importorskip("pyarrow.parquet")
    from transferset.export import export_parquet
    from transferset.format.recode import recode

    dense = tmp_path / "dense"
    label(lms, str(ids_file), dense, LabelOptions(codec="dense", temperatures=(1.0, 2.0), shard_size=5, quiet=True))
    res = recode(dense, tmp_path / "topk", "topk:4")
    assert res["codec"] == "topk:4" and all(k >= 0 for k in res["kl"])
    assert verify_transfer_set(tmp_path / "topk") == []
    with h5py.File(dense / "shard-00000.h5") as f, h5py.File(tmp_path / "topk" / "shard-00000.h5") as g:
        lp = f["soft_targets"][:].astype(np.float64)  # [N, L, T, V]
        kept = np.take_along_axis(lp[:, :, 0], g["topk_index"][:].astype(np.int64), -1)  # the 4 largest, per position
        np.testing.assert_array_equal(kept, -np.sort(-lp[:, :, 0], axis=-1)[..., :4])
    export_parquet(tmp_path / "topk", tmp_path / "exp")
    t = pa.read_table(tmp_path / "exp" / "data" / "train-00000-of-00001.parquet")
    ids = np.load(ids_file)
    assert t.num_rows == 9 and t.column("input_ids")[0].as_py() == ids[0].tolist()
    assert len(t.column("topk_index")[0].as_py()) == 10 and len(t.column("topk_log_probs_T2")[0].as_py()[3]) == 4
    assert t.column("labels")[0].as_py()[:-1] == ids[0, 1:].tolist()
    pytest.importorskip("matplotlib")
    from transferset.report import report

    report(tmp_path / "topk", tmp_path / "rep")
    assert (tmp_path / "rep" / "positions.png").is_file()


def test_verify_names_a_bad_position(lms, ids_file, tmp_path):
    from transferset._io import sha256_file

    out = tmp_path / "s"
    label(lms, str(ids_file), out, LabelOptions(codec="topk:4", temperatures=(1.0,), quiet=True))
    with h5py.File(out / "shard-00000.h5", "r+") as f:
        idx = f["topk_index"][:]
        idx[2, 7, 1] = idx[2, 7, 0]  # a repeated id at one position of row 2
        f["topk_index"][:] = idx
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][0].update(sha256=sha256_file(out / "shard-00000.h5"), bytes=(out / "shard-00000.h5").stat().st_size)
    (out / "manifest.json").write_text(json.dumps(m))
    assert verify_transfer_set(out) == [("shard-00000.h5", "row 2: topk_index outside [0, C) or repeated")]


def test_text_to_student_from_the_command_line(tmp_path):
    """label --text, train-student --eval-data text --reference, evaluate: each one line, exit 0."""
    pytest.importorskip("tokenizers")
    from click.testing import CliRunner

    from transferset.cli import cli

    teacher = _export_lm(tmp_path / "t.onnx", 8192, 0, dim=8)
    text = tmp_path / "docs.txt"
    text.write_text("The module defines a class.\n\nIt returns a list of names.\n\nThe function takes two "
                    "arguments and returns their sum.\n")

    def run(*args):
        res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    run("label", "--ensemble", str(teacher), "--text", str(text), "--tokenizer", str(TOKENIZER), "--seq-len", "8",
        "--temperatures", "1", "--out", str(tmp_path / "set"), "-q")
    m = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert m["codec"] == "topk:32" and m["source"]["tokenizer"]["vocab_size"] == 8192
    out = run("train-student", "--transfer-set", str(tmp_path / "set"), "--student", "lm:1,8,2", "--out",
              str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2", "-T", "1", "--loss", "jsd",
              "--eval-data", str(text), "--tokenizer", str(TOKENIZER), "--reference", str(teacher), "-q")
    assert "eval perplexity" in out
    out = run("evaluate", "--model", str(tmp_path / "run" / "student.pt"), "--text", str(text), "--tokenizer",
              str(TOKENIZER), "--seq-len", "8", "--reference", str(teacher))
    assert "perplexity" in out and "KL(reference || model)" in out


def test_streamed_per_position_rows_hold_the_chosen_temperature(tmp_path, lms, ids_file):
    """The streaming reader holds one temperature of a per-position field [P, T, K] as [P, K] (it made room for
    [T, K]: a set of two temperatures failed to train streamed at T = 2, seen by the LM crash test); every row it
    gives equals the stored values at that temperature, and a streamed run trains."""
    from transferset.training.loop import TrainOptions, train_student
    from transferset.training.reader import TransferSetDataset

    label(lms, str(ids_file), tmp_path / "s", LabelOptions(codec="topk:5", temperatures=(1.0, 2.0), shard_size=6,
                                                           quiet=True))
    stored = {}
    for shard in sorted((tmp_path / "s").glob("shard-*.h5")):
        with h5py.File(shard) as f:
            stored.setdefault("lp", []).append(f["topk_log_probs"][:, :, 1].astype(np.float32))
            stored.setdefault("tail", []).append(f["tail_log_mass"][:, :, 1].astype(np.float32))
    lp, tail = np.concatenate(stored["lp"]), np.concatenate(stored["tail"])
    seen = set()
    for batch in TransferSetDataset(tmp_path / "s", fields=("topk_log_probs", "tail_log_mass"), temperature=2.0,
                                    batch_size=4):
        rows = batch["index"].numpy()
        np.testing.assert_array_equal(batch["topk_log_probs"].numpy(), lp[rows])
        np.testing.assert_array_equal(batch["tail_log_mass"].numpy(), tail[rows])
        seen.update(rows.tolist())
    assert seen == set(range(len(lp)))
    r = train_student(tmp_path / "s", tmp_path / "run", TrainOptions(
        student="lm:1,16,2", loss="kd", temperature=2.0, alpha=0.7, epochs=1, batch_size=4, quiet=True,
        in_memory="no", device="cpu"))
    assert np.isfinite(r.metrics[-1]["loss"])


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def test_token_rows_labelled_in_parts_merge_into_the_bytes_of_one_process(lms, ids_file, tmp_path, monkeypatch):
    """--part I/N (and torchrun's RANK / WORLD_SIZE) for token rows: each part its shards and manifest, the last
    one merges; the folder then holds the files of one process, and a part run again has nothing to do."""
    opts = LabelOptions(codec="topk:5", temperatures=(1.0, 2.0), batch_size=2, shard_size=2, quiet=True)
    label(lms, str(ids_file), tmp_path / "one", opts)
    idle = label(lms, str(ids_file), tmp_path / "many", replace(opts, part=(7, 7)))  # 5 shards: part 7 owns none
    assert idle.status == "already-complete" and idle.rows_written == 0 and not idle.extra["merged"]
    first = label(lms, str(ids_file), tmp_path / "parts", replace(opts, part=(2, 3)))
    assert first.status == "written" and not first.extra["merged"] and "waiting" in first.summary_line()
    assert "parts 1, 3 of 3 missing (2 of 5 shards written)" in first.summary_line() and not (tmp_path / "parts" / "manifest.json").exists()
    label(lms, str(ids_file), tmp_path / "parts", replace(opts, part=(3, 3)))
    monkeypatch.setenv("RANK", "0")  # part 1 of 3 as torchrun's rank 0 of 3
    monkeypatch.setenv("WORLD_SIZE", "3")
    import transferset.labelling.position_writer as pw

    real, calls = pw._write_shard, []

    def dying(*args):  # part 1 (shards 0 and 3) killed after its first shard
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pw, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        label(lms, str(ids_file), tmp_path / "parts", opts)
    monkeypatch.setattr(pw, "_write_shard", real)
    last = label(lms, str(ids_file), tmp_path / "parts", opts)
    assert last.status == "resumed" and last.rows_written == 2
    assert last.extra["merged"] and last.extra["merged_here"] and "the set is complete" in last.summary_line()
    assert _files(tmp_path / "parts") == _files(tmp_path / "one")
    again = label(lms, str(ids_file), tmp_path / "parts", opts)
    assert again.status == "already-complete" and again.rows_written == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(TransferSetError, match="claim"):
        label(lms, str(ids_file), tmp_path / "c", replace(opts, claim=True))
    with pytest.raises(TransferSetError, match="other ensemble"):  # another definition into the same parts
        label(lms, str(ids_file), tmp_path / "parts2", replace(opts, part=(1, 3)))
        label(lms, str(ids_file), tmp_path / "parts2", replace(opts, part=(2, 3), temperatures=(1.0,)))


def test_per_frame_rows_labelled_in_parts_merge_into_the_bytes_of_one_process(tmp_path):
    from test_frames import _frame_teacher

    x = np.random.default_rng(0).integers(0, 256, (9, 1, 12, 32), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    teachers = [_frame_teacher(tmp_path / f"t{i}.onnx", seed=i) for i in range(2)]
    opts = LabelOptions(codec="topk:3", batch_size=2, shard_size=3, scale=1 / 255, quiet=True)
    label(teachers, str(tmp_path / "x.npy"), tmp_path / "one", opts)
    for i in (2, 1):
        res = label(teachers, str(tmp_path / "x.npy"), tmp_path / "parts", replace(opts, part=(i, 2)))
    assert res.extra["merged"] and _files(tmp_path / "parts") == _files(tmp_path / "one")
