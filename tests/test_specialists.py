"""Specialists (Hinton et al. 2015, section 5): folding, clustering, the KL combination and the three commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_transfer_set, read_all_rows
from transferset.cli import main
from transferset.errors import TransferSetError
from transferset.format.recode import recode
from transferset.specialist_combine import active_specialists, combined_objective, kl_combine
from transferset.training.specialists import (fold_counts, fold_labels, fold_log_probs, fold_topk, kmeans_columns,
                                              make_plan, read_plan, select_rows)


def test_fold_log_probs_keeps_the_cluster_and_sums_the_rest():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25], [0.5, 0.0, 0.25, 0.25, 0.0]], dtype=torch.float64)
    got = fold_log_probs(torch.log(p), [3, 1]).exp()
    want = torch.tensor([[0.15, 0.2, 0.65], [0.25, 0.0, 0.75]], dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_fold_topk_spreads_the_tail_evenly_over_the_classes_not_kept():
    # C = 6, K = 2 kept (classes 4 and 0 with 0.5 and 0.2); tail 0.3 over the 4 others: 0.075 each
    index = torch.tensor([[4, 0]])
    log_probs = torch.log(torch.tensor([[0.5, 0.2]]))
    tail = torch.log(torch.tensor([0.3]))
    got = fold_topk(index, log_probs, tail, [0, 2, 3], 6).exp()
    torch.testing.assert_close(got, torch.tensor([[0.2, 0.075, 0.075, 0.5 + 0.075 * 2]]))


def test_fold_counts_and_labels():
    index = torch.tensor([[2, 5, 1, 0], [3, 3, 3, 3]])
    count = torch.tensor([[3, 4, 1, 0], [8, 0, 0, 0]])
    got = fold_counts(index, count, [5, 3]).exp()
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]))
    labels = torch.tensor([5, 3, 0, -1, 2])
    assert fold_labels(labels, [5, 3]).tolist() == [0, 1, 2, -1, 2]


def test_kmeans_finds_the_blocks_of_a_hand_made_covariance():
    # three groups of classes that covary within the group only: {0, 4, 7}, {1, 2, 5, 8}, {3, 6}
    groups = [[0, 4, 7], [1, 2, 5, 8], [3, 6]]
    cov = np.full((9, 9), -0.01)
    for g in groups:
        for i in g:
            for j in g:
                cov[i, j] = 1.0 if i == j else 0.6
    for seed in range(5):
        a = kmeans_columns(cov, 3, seed)
        assert sorted(sorted(np.flatnonzero(a == k).tolist()) for k in range(3)) == sorted(sorted(g) for g in groups)
    with pytest.raises(TransferSetError, match="between 1 and the number of classes"):
        kmeans_columns(cov, 10)


def test_select_rows_takes_the_own_rows_and_a_seeded_share_of_the_others():
    mass = np.array([0.0, 0.5, 0.05, 0.2, 0.0, 0.0, 0.9, 0.01])
    rows = select_rows(mass, 0.1, 1.0, seed=0, index=2)
    assert set([1, 3, 6]) <= set(rows.tolist()) and len(rows) == 6
    assert rows.tolist() == select_rows(mass, 0.1, 1.0, seed=0, index=2).tolist()
    assert select_rows(mass, 0.1, 0.0, 0, 0).tolist() == [1, 3, 6]


def _em_reference(p_g, spec_p, clusters, active, iterations=3000):
    """The same minimum by another road: EM for a distribution observed through coarsenings (numpy).

    Each specialist's dustbin mass is shared out over its non-cluster classes in proportion to q (E step), then
    q is the average of the generalist's and every active specialist's completed distribution (M step). The
    objective is concave in q on the simplex and EM never lowers it, so this converges to the same q.
    """
    q = p_g.copy()
    for _ in range(iterations):
        total = p_g.copy()
        for m, cl in enumerate(clusters):
            on = active[:, m]
            outside = np.ones(p_g.shape[1], bool)
            outside[cl] = False
            part = np.zeros_like(p_g)
            part[:, cl] = spec_p[m][:, :-1]
            share = q * outside / (q * outside).sum(1, keepdims=True)
            part += spec_p[m][:, -1:] * share
            total += np.where(on[:, None], part, 0)
        q = total / (1 + active.sum(1, keepdims=True))
    return q


def test_kl_combination_matches_a_direct_minimisation():
    rng = np.random.default_rng(3)
    n, c = 6, 9
    clusters = [[0, 1, 2], [2, 3, 4, 5], [6, 7]]  # overlapping on class 2
    p_g = rng.dirichlet(np.ones(c), size=n)
    spec_p = [rng.dirichlet(np.ones(len(cl) + 1), size=n) for cl in clusters]
    active = rng.random((n, len(clusters))) < 0.6
    active[0] = False  # a case with no active specialist keeps the generalist
    active[1] = True
    q = np.exp(kl_combine(np.log(p_g), [np.log(s) for s in spec_p], clusters, active))
    ref = _em_reference(p_g, spec_p, clusters, active)
    np.testing.assert_allclose(q, ref, atol=2e-6)
    np.testing.assert_allclose(q[0], p_g[0], atol=1e-9)

    def objective(qq):
        rows, spec = np.nonzero(active)
        member = np.zeros((len(rows), c), bool)
        target = np.full((len(rows), c + 1), -np.inf)
        for k, (r, m) in enumerate(zip(rows, spec)):
            member[k, clusters[m]] = True
            target[k, clusters[m]] = np.log(spec_p[m][r, :-1])
            target[k, c] = np.log(spec_p[m][r, -1])
        return float(combined_objective(torch.log(torch.from_numpy(qq)), torch.log(torch.from_numpy(p_g)),
                                        torch.from_numpy(rows), torch.from_numpy(member), torch.from_numpy(target)))

    assert objective(q) <= objective(ref) + 1e-9
    # a specialist sure of one of its classes pulls q there even against the generalist
    g = np.log(np.array([[0.6, 0.3, 0.1]]))
    sure = np.log(np.array([[0.01, 0.98, 0.01]]))  # classes [0, 1] + dustbin
    q2 = np.exp(kl_combine(g, [sure], [[0, 1]], np.array([[True]])))
    assert q2.argmax() == 1 and abs(q2.sum() - 1) < 1e-9


def test_active_specialists_meet_the_generalists_top_classes():
    lp = np.log(np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]]))
    clusters = [[0, 2], [1], [3]]
    assert active_specialists(lp, clusters, 1).tolist() == [[True, False, False], [False, False, True]]
    assert active_specialists(lp, clusters, 2).tolist() == [[True, True, False], [True, False, True]]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec")
    root = make_transfer_set(tmp / "set", shard_rows=(120, 80), classes=8, temperatures=(1, 4), input_shape=(6,))
    rows = read_all_rows(root)
    np.save(tmp / "x.npy", rows["inputs"].astype(np.float32))
    np.save(tmp / "y.npy", rows["soft_targets"][:, 0].argmax(1))
    return tmp, root


def test_plan_train_and_evaluate_through_the_commands(small_set, capsys):
    tmp, root = small_set
    plan_path = tmp / "plan.json"
    with pytest.raises(SystemExit) as e:
        main(["specialists", "plan", str(root), "--count", "2", "--min-size", "1", "-T", "4", "--out", str(plan_path)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    plan = read_plan(plan_path)
    assert "specialists of 2 k-means clusters" in out and plan["select_temperature"] == 1.0
    assert sorted(c for cl in plan["clusters"] for c in cl["classes"]) == list(range(8))
    assert make_plan(root, 2, min_size=1, temperature=4) == plan  # a pure function of the set and the options
    common = ["--transfer-set", str(root), "--student", "mlp:16", "--epochs", "1", "--device", "cpu", "-q",
              "--batch-size", "32"]
    with pytest.raises(SystemExit) as e:
        main(["train-student", *common, "--out", str(tmp / "gen")])
    assert e.value.code == 0
    runs = []
    for i in range(len(plan["clusters"])):
        run = tmp / f"spec{i}"
        with pytest.raises(SystemExit) as e:
            main(["train-student", *common, "--out", str(run), "--specialist", f"{plan_path}:{i}",
                  "--init-from", str(tmp / "gen" / "student.pt"), "--export-onnx", str(run / "s.onnx")])
        assert e.value.code == 0
        ck = torch.load(run / "student.pt", weights_only=True)
        assert ck["num_classes"] == len(plan["clusters"][i]["classes"]) + 1
        assert json.loads(ck["specialist"])["index"] == i
        runs.append(run)
    gen = torch.load(tmp / "gen" / "student.pt", weights_only=True)["model"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--generalist", str(tmp / "gen" / "student.pt"), "--specialists",
              *[str(r / "student.pt") for r in runs], "--plan", str(plan_path), "--data", str(tmp / "x.npy"),
              "--labels", str(tmp / "y.npy"), "--device", "cpu", "--json"])
    assert e.value.code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 200 and sum(r["cases"] for r in res["by_active"]) == 200
    assert res["by_active"][-1]["active"] >= 1
    # the ONNX exports, given in the plan's order, give the same combination
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--generalist", str(tmp / "gen" / "student.pt"), "--specialists",
              *[str(r / "s.onnx") for r in runs], "--plan", str(plan_path), "--data", str(tmp / "x.npy"),
              "--labels", str(tmp / "y.npy"), "--device", "cpu", "--json"])
    res2 = json.loads(capsys.readouterr().out)
    assert abs(res2["combined_accuracy"] - res["combined_accuracy"]) <= 0.01
    # the whole combination as one ONNX graph (--export-onnx): the same predictions as the L-BFGS combination
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--generalist", str(tmp / "gen" / "student.pt"), "--specialists",
              *[str(r / "student.pt") for r in runs], "--plan", str(plan_path), "--data", str(tmp / "x.npy"),
              "--labels", str(tmp / "y.npy"), "--device", "cpu", "--json", "--export-onnx", str(tmp / "comb.onnx")])
    assert e.value.code == 0
    res3 = json.loads(capsys.readouterr().out)
    assert res3["export_onnx"]["errors"] == res["combined_errors"]
    from transferset.specialist_combine import combine_and_score, specialist_predictions

    p, g, spec_lp, y = specialist_predictions(tmp / "gen" / "student.pt", [r / "student.pt" for r in runs],
                                              plan_path, str(tmp / "x.npy"), str(tmp / "y.npy"), device="cpu")
    shifted = []
    for i, lp in enumerate(spec_lp):
        lp = lp.copy()
        lp[:, -1] += p["clusters"][i]["dustbin_shift"]
        shifted.append(lp - np.logaddexp.reduce(lp, axis=1, keepdims=True))
    clusters = [c["classes"] for c in p["clusters"][:len(runs)]]
    want = np.exp(kl_combine(g, shifted, clusters, active_specialists(g, clusters, 1)))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp / "comb.onnx"), providers=["CPUExecutionProvider"])
    got = np.exp(sess.run(None, {"input": np.load(tmp / "x.npy")})[0])
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert gen  # the generalist's weights exist (init-from read them)
    # specialists in the wrong order are refused in one line
    if len(runs) > 1:
        with pytest.raises(SystemExit) as e:
            main(["evaluate", "--generalist", str(tmp / "gen" / "student.pt"), "--specialists",
                  str(runs[1] / "student.pt"), "--plan", str(plan_path), "--data", str(tmp / "x.npy"),
                  "--labels", str(tmp / "y.npy"), "--device", "cpu"])
        assert e.value.code == 2
        assert "plan's order" in capsys.readouterr().err


def test_specialist_from_a_topk_set_and_refusals(small_set, tmp_path, capsys):
    tmp, root = small_set
    topk = tmp_path / "topk"
    recode(root, topk, "topk:3")
    plan_path = tmp_path / "plan.json"
    with pytest.raises(SystemExit):
        main(["specialists", "plan", str(topk), "--count", "2", "--min-size", "1", "--out", str(plan_path)])
    with pytest.raises(SystemExit) as e:
        main(["train-student", "--transfer-set", str(topk), "--student", "mlp:8", "--epochs", "1", "--device", "cpu",
              "-q", "--out", str(tmp_path / "s0"), "--specialist", f"{plan_path}:0", "-T", "4"])
    assert e.value.code == 0
    capsys.readouterr()
    for bad, msg in ((f"{plan_path}:9", "the plan has 2 clusters"), (f"{plan_path}", "PLAN.json:I"),
                     (f"{tmp_path / 'none.json'}:0", "no such plan file")):
        with pytest.raises(SystemExit) as e:
            main(["train-student", "--transfer-set", str(topk), "--student", "mlp:8", "--device", "cpu", "-q",
                  "--out", str(tmp_path / "s1"), "--specialist", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and err.count("\n") == 1
    # a plan of another set is refused
    with pytest.raises(SystemExit) as e:
        main(["train-student", "--transfer-set", str(root), "--student", "mlp:8", "--device", "cpu", "-q",
              "--out", str(tmp_path / "s2"), "--specialist", f"{plan_path}:0"])
    assert e.value.code == 2 and "another transfer set" in capsys.readouterr().err


def test_shift_bias_moves_one_class_logit_in_a_checkpoint_and_its_onnx_export(small_set, tmp_path, capsys):
    import onnxruntime as ort

    from transferset.evaluate import load_student_checkpoint

    tmp, root = small_set
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["train-student", "--transfer-set", str(root), "--student", "mlp:8", "--epochs", "1", "--device", "cpu",
              "-q", "--out", str(run), "--export-onnx", str(run / "s.onnx")])
    x = np.load(tmp / "x.npy")[:16]
    for src, dst in ((run / "student.pt", tmp_path / "shifted.pt"), (run / "s.onnx", tmp_path / "shifted.onnx")):
        with pytest.raises(SystemExit) as e:
            main(["shift-bias", str(src), "--shift", "3=2.5", "--shift", "all=-1", "--out", str(dst)])
        assert e.value.code == 0
        outs = []
        for path in (src, dst):
            if path.suffix == ".pt":
                with torch.no_grad():
                    outs.append(load_student_checkpoint(path)(torch.from_numpy(x)).numpy())
            else:
                s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                outs.append(s.run(None, {s.get_inputs()[0].name: x})[0])
        want = np.full(8, -1.0)
        want[3] = 1.5
        np.testing.assert_allclose(outs[1] - outs[0], np.broadcast_to(want, outs[0].shape), atol=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["shift-bias", str(run / "student.pt"), "--shift", "9=1", "--out", str(tmp_path / "b.pt")])
    assert e.value.code == 2 and "class 9 does not exist" in capsys.readouterr().err


def test_a_specialist_starts_from_its_generalists_view_of_the_cluster(tmp_path):
    from transferset.training.loop import _init_weights
    from transferset.training.students import create_student

    torch.manual_seed(0)
    gen = create_student("mlp:16", (6,), 8)
    torch.save({"model": gen.state_dict(), "student_spec": gen.student_spec}, tmp_path / "g.pt")
    spec = create_student("mlp:16", (6,), 4)
    _init_weights(spec, str(tmp_path / "g.pt"), "mlp:16", [5, 1, 6])
    x = torch.randn(10, 6)
    gen.eval(), spec.eval()
    with torch.no_grad():
        zg, zs = gen(x), spec(x)
    torch.testing.assert_close(zs[:, :3], zg[:, [5, 1, 6]])
    with pytest.raises(TransferSetError, match="holds a 'mlp:16' student and this run trains 'mlp:8'") as e:
        _init_weights(create_student("mlp:8", (6,), 4), str(tmp_path / "g.pt"), "mlp:8", [0])
    assert e.value.option == "init_from"


def test_init_from_another_student_is_one_line_naming_init_from(small_set, tmp_path, capsys):
    from transferset.training.students import create_student

    _, root = small_set
    gen = create_student("mlp:16", (6,), 8)
    torch.save({"model": gen.state_dict(), "student_spec": gen.student_spec}, tmp_path / "g.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train-student", "--transfer-set", str(root), "--student", "mlp:8", "--epochs", "1", "--device", "cpu",
              "-q", "--init-from", str(tmp_path / "g.pt"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"transferset: error: --init-from {tmp_path / 'g.pt'} holds a 'mlp:16' student and this "
                          "run trains 'mlp:8'") and "--student" not in err


def test_rows_without_a_prediction_are_left_out_of_the_covariance_and_never_selected():
    """A photo set's rows of files that could not be decoded come as NaN predictions (specialists.predictions)."""
    from transferset.training.specialists import class_covariance, select_rows

    p = np.random.default_rng(0).random((50, 4)).astype(np.float32)
    q, keep = p.copy(), np.ones(50, bool)
    q[[3, 7, 40]], keep[[3, 7, 40]] = np.nan, False
    np.testing.assert_allclose(class_covariance(q, block=8), np.cov(p[keep].astype(np.float64).T), rtol=1e-6)
    np.testing.assert_allclose(class_covariance(p, block=8), np.cov(p.astype(np.float64).T), rtol=1e-6)
    rows = select_rows(q[:, :2].sum(1), 0.8, 1.0, 0, 0)
    assert len(rows) and not np.isin([3, 7, 40], rows).any()


def test_a_specialists_targets_at_t_are_the_tempered_fold_of_t1(small_set, tmp_path):
    """At T = 4 the targets are softmax(fold(log p_1) / 4), not the fold of the distribution stored at T = 4
    (which would hold the tempered mass of every other class in the dustbin)."""
    from transferset.format.parts import read_manifest
    from transferset.training.specialists import specialist_setup, temper_log_probs, write_plan

    _, root = small_set
    plan = make_plan(root, 2, min_size=1)
    write_plan(plan, tmp_path / "plan.json")
    rows = read_all_rows(root)
    m = read_manifest(root)
    i = 0
    classes = plan["clusters"][i]["classes"]
    got = specialist_setup(f"{tmp_path / 'plan.json'}:{i}", root, m, 4.0, 0.9, None, torch.device("cpu"))
    sel = got.tensors["index"].numpy()
    stored = torch.from_numpy(rows["soft_targets"].astype(np.float64))  # [N, T, C], log-probs at T = 1 and 4
    want = temper_log_probs(fold_log_probs(stored[sel, 0], classes), 4.0)
    naive = fold_log_probs(stored[sel, 1], classes).float()
    assert torch.allclose(got.tensors["soft_targets"], want, atol=2e-3)
    assert not torch.allclose(got.tensors["soft_targets"], naive, atol=2e-3)
    # the dustbin of the tempered fold at T = 1 is the T = 1 fold's: tempering back by 1/4 recovers it
    back = temper_log_probs(got.tensors["soft_targets"].double() * 4.0, 1.0)
    assert torch.allclose(back, fold_log_probs(stored[sel, 0], classes).float(), atol=5e-3)
    assert got.record["fold"] == "tempered"
    one = specialist_setup(f"{tmp_path / 'plan.json'}:{i}", root, m, 1.0, 0.9, None, torch.device("cpu"))
    assert torch.allclose(one.tensors["soft_targets"], fold_log_probs(stored[sel, 0], classes).float(), atol=1e-3)


def test_em_combination_for_the_graph_matches_lbfgs_with_clusters_in_any_order():
    from transferset.specialist_combine import em_combine, scatter_matrix

    rng = np.random.default_rng(5)
    n, c = 60, 9
    clusters = [[2, 0, 1], [5, 3, 4, 2], [7, 6]]  # outputs in the plan's order, not sorted; overlapping on 2
    p_g = rng.dirichlet(np.ones(c) * 0.3, size=n)
    spec_p = [rng.dirichlet(np.ones(len(cl) + 1) * 0.3, size=n) for cl in clusters]
    active = rng.random((n, len(clusters))) < 0.6
    active[0], active[1] = False, True
    want = np.exp(kl_combine(np.log(p_g), [np.log(s) for s in spec_p], clusters, active))
    padded = np.full((n, len(clusters), 5), -np.inf)
    for m, cl in enumerate(clusters):
        padded[:, m, :len(cl)], padded[:, m, -1] = np.log(spec_p[m][:, :-1]), np.log(spec_p[m][:, -1])
    got = em_combine(torch.log(torch.tensor(p_g, dtype=torch.float32)), torch.tensor(padded, dtype=torch.float32),
                     scatter_matrix(clusters, c), torch.tensor(active, dtype=torch.float32)).exp().numpy()
    # L-BFGS stops within its tolerance (1.25e-5 here, on these peaked rows); EM run long in float64 is the
    # sharper reference, and the graph's 200 float32 steps sit within 1e-7 of it
    np.testing.assert_allclose(got, want, atol=5e-5)
    np.testing.assert_allclose(got, _em_reference(p_g, spec_p, clusters, active, 5000), atol=1e-6)
    np.testing.assert_allclose(got[0], p_g[0], atol=1e-6)


def test_export_of_the_combination_refuses_onnx_files_and_a_lone_model_in_one_line(small_set, tmp_path, capsys):
    tmp, root = small_set
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model", str(tmp_path / "m.pt"), "--data", str(tmp / "x.npy"), "--export-onnx",
              str(tmp_path / "c.onnx")])
    assert e.value.code == 2 and "--specialists" in capsys.readouterr().err
    from transferset.specialist_combine import export_combined_onnx

    with pytest.raises(TransferSetError, match="student checkpoints"):
        export_combined_onnx(tmp_path / "g.pt", [tmp_path / "s.onnx"], tmp_path / "plan.json", tmp_path / "c.onnx",
                             "uint8")
