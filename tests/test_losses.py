import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from transferset import targets
from transferset.errors import TransferSetError
from transferset.training.losses import (
    LOSSES,
    KDLoss,
    LogitMSELoss,
    add_teacher_noise,
    build_loss,
    mean_logits,
    teacher_log_probs,
)


def _log(p):
    return torch.log(torch.tensor(p, dtype=torch.float64)).float()


# --- (1) hand-computed KD on 2 rows x 3 classes -------------------------------------------------------------
# student s = [[1, 2, 3], [0, 0, 0]], teacher p = [[.6, .3, .1], [.5, .5, 0]], T = 2, alpha = .5, labels [2, -1]
# row 1: q_T = softmax([.5, 1, 1.5]) = [.18632, .30720, .50648]; KL = sum p log(p / q) = 0.5323239
# row 2: q_T = [1/3]*3; the p = 0 class contributes 0; KL = 2 * .5 log(.5 * 3) = log 1.5 = 0.4054651
# soft = mean = 0.4688945; hard = CE(row 1, class 2) = log(e + e^2 + e^3) - 3 = 0.4076060 (row 2 unlabelled)
# loss = .5 * 2^2 * 0.4688945 + .5 * 0.4076060 = 1.1415920
def _hand_kd():
    z = [0.5, 1.0, 1.5]
    q = [math.exp(a) / sum(math.exp(b) for b in z) for a in z]
    kl1 = sum(pi * math.log(pi / qi) for pi, qi in zip([0.6, 0.3, 0.1], q))
    kl2 = 2 * 0.5 * math.log(0.5 / (1 / 3))
    ce = math.log(math.e + math.e ** 2 + math.e ** 3) - 3
    return kl1, kl2, ce


def test_kd_hand_computed_two_rows():
    kl1, kl2, ce = _hand_kd()
    assert kl1 == pytest.approx(0.5323239, abs=1e-6) and kl2 == pytest.approx(0.4054651, abs=1e-6)
    assert ce == pytest.approx(0.4076060, abs=1e-6)
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = _log([[0.6, 0.3, 0.1], [0.5, 0.5, 0.0]])
    assert torch.isinf(t[1, 2])
    out = KDLoss(alpha=0.5, temperature=2.0)(s, t, torch.tensor([2, -1]))
    assert out["soft"].item() == pytest.approx(0.4688945, abs=1e-6)
    assert out["hard"].item() == pytest.approx(0.4076060, abs=1e-6)
    assert out["loss"].item() == pytest.approx(1.1415920, abs=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * 4 * (kl1 + kl2) / 2 + 0.5 * ce, abs=1e-5)
    out["loss"].backward()
    assert torch.isfinite(s.grad).all()
    assert not out["soft"].requires_grad and not out["hard"].requires_grad


def test_kd_very_negative_teacher_log_probs_are_safe():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.full((4, 5), -1e30)
    t[:, 0] = 0.0
    out = KDLoss(0.7, 3.0)(s, t, None)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(s.grad).all()
    # KL(onehot || q) = -log q_0
    expected = -F.log_softmax(s.detach() / 3.0, -1)[:, 0].mean()
    assert out["soft"].item() == pytest.approx(expected.item(), rel=1e-5)


# --- (2) T^2 keeps the soft gradient's scale ---------------------------------------------------------------
def _soft_grad_norm(temperature, scale_t2):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 10, generator=g).requires_grad_(True)
    teacher = torch.randn(64, 10, generator=g) * 2.0
    out = KDLoss(alpha=1.0, temperature=temperature)(s, teacher_log_probs(teacher[:, None], temperature))
    loss = out["loss"] if scale_t2 else out["loss"] / temperature ** 2
    (grad,) = torch.autograd.grad(loss, s)
    return grad.norm().item()


def test_soft_gradient_scale_is_kept_by_t_squared():
    temps = [2.0, 4.0, 8.0, 20.0]
    with_t2 = [_soft_grad_norm(t, True) for t in temps]
    assert max(with_t2) / min(with_t2) < 2.0
    # high-T limit: grad -> (s - v) / (B C) with zero-mean logits, independent of T
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 10, generator=g)
    v = torch.randn(64, 10, generator=g) * 2.0
    limit = ((s - s.mean(-1, keepdim=True)) - (v - v.mean(-1, keepdim=True))) / (64 * 10)
    assert with_t2[-1] == pytest.approx(limit.norm().item(), rel=0.1)
    without = [_soft_grad_norm(t, False) for t in temps]
    for t, n in zip(temps[1:], without[1:]):
        assert n * t ** 2 / (without[0] * 4.0) == pytest.approx(1.0, abs=0.5)
    assert without[-1] / without[-2] == pytest.approx((8.0 / 20.0) ** 2, rel=0.05)


# --- (3) mask and (4) unknown labels ------------------------------------------------------------------------
def test_mask_excludes_padding_rows_exactly():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 4, generator=g)
    t = F.log_softmax(torch.randn(6, 4, generator=g), -1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    mask = torch.tensor([True, True, True, True, False, False])
    s_pad, t_pad = s.clone(), t.clone()
    s_pad[4:], t_pad[4:] = 1e4, float("nan")  # padding garbage must not leak in
    loss = KDLoss(0.6, 3.0)
    padded = loss(s_pad, t_pad, labels, mask)
    cut = loss(s[:4], t[:4], labels[:4], None)
    for key in ("loss", "soft", "hard"):
        assert padded[key].item() == pytest.approx(cut[key].item(), abs=1e-6)


def test_unknown_labels_are_excluded_from_cross_entropy():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 3, generator=g)
    labels = torch.tensor([0, -1, 2, -1, 1])
    out = KDLoss(0.0, 1.0)(s, None, labels)
    keep = labels >= 0
    assert out["hard"].item() == pytest.approx(F.cross_entropy(s[keep], labels[keep]).item(), abs=1e-6)


def test_no_labelled_row_gives_zero_hard_term_without_renormalising_alpha():
    s = torch.randn(3, 4, requires_grad=True)
    t = F.log_softmax(torch.randn(3, 4), -1)
    out = KDLoss(0.5, 2.0)(s, t, torch.full((3,), -1))
    assert out["hard"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.5 * 4 * out["soft"].item(), rel=1e-6)
    alone = KDLoss(0.0, 2.0)(s, None, torch.full((3,), -1))
    alone["loss"].backward()  # still a graph, just a zero one
    assert alone["loss"].item() == 0.0


# --- (5) alpha = 0 is plain cross-entropy -------------------------------------------------------------------
def test_alpha_zero_is_plain_cross_entropy_without_teacher():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(8, 6, generator=g)
    labels = torch.randint(0, 6, (8,), generator=g)
    out = build_loss("kd", 0.0, 4.0)(s, None, labels)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(s, labels).item(), abs=1e-6)


# --- (6) logit-mse by hand ----------------------------------------------------------------------------------
# row 1: s = [1, 2, 3] -> centred [-1, 0, 1]; v = [0, 3, 3] -> centred [-2, 1, 1]; diff [1, -1, 0]; mean 2/3
# row 2: s = [0, 0, 0]; v = [1, 1, 4] -> centred [-1, -1, 2]; diff [1, 1, -2]; mean 6/3 = 2
# soft = (2/3 + 2) / 2 = 4/3
def test_logit_mse_hand_computed():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    v = torch.tensor([[0.0, 3.0, 3.0], [1.0, 1.0, 4.0]])
    out = LogitMSELoss()(s, v)
    assert out["soft"].item() == pytest.approx(4 / 3, abs=1e-6)
    assert out["loss"].item() == pytest.approx(4 / 3, abs=1e-6)
    labels = torch.tensor([2, -1])
    mixed = build_loss("logit-mse", 0.25, 1.0)(s, v, labels, torch.tensor([True, True]))
    ce = math.log(math.e + math.e ** 2 + math.e ** 3) - 3
    assert mixed["loss"].item() == pytest.approx(0.25 * 4 / 3 + 0.75 * ce, abs=1e-5)
    only_row2 = LogitMSELoss()(s, v, None, torch.tensor([False, True]))
    assert only_row2["soft"].item() == pytest.approx(2.0, abs=1e-6)


def test_mean_logits_is_weighted_member_mean():
    z = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])
    assert torch.allclose(mean_logits(z), torch.tensor([[2.0, 4.0]]))
    assert torch.allclose(mean_logits(z, torch.tensor([3.0, 1.0])), torch.tensor([[1.5, 3.0]]))


# --- (7) the torch mirror agrees with targets.combine_log_probs ---------------------------------------------
@settings(max_examples=40, deadline=None)
@given(rule=st.sampled_from(targets.COMBINE_RULES), temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0, 20.0]),
       members=st.integers(1, 4), seed=st.integers(0, 2 ** 31 - 1), weighted=st.booleans())
def test_teacher_log_probs_matches_numpy(rule, temperature, members, seed, weighted):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((7, members, 5)) * 4).astype(np.float32)
    w = targets.normalise_weights(rng.uniform(0.1, 1.0, members) if weighted else None, members)
    expected = targets.combine_log_probs(z, temperature, rule, w)
    got = teacher_log_probs(torch.from_numpy(z), temperature, rule, torch.from_numpy(w))
    assert got.shape == (7, 5)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_teacher_log_probs_zero_weight_and_fp16():
    z = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float16)
    w = np.array([1.0, 0.0])
    got = teacher_log_probs(torch.from_numpy(z), 2.0, "mean-probs", torch.from_numpy(w))
    np.testing.assert_allclose(got.numpy(), targets.combine_log_probs(z.astype(np.float32), 2.0, "mean-probs", w),
                               atol=1e-5)


def test_mean_probs_keeps_log_probabilities_that_underflow_float64():
    # class 1 sits 2005 and 1503 below each member's top class: exp underflows in float64 (below ~1e-308), so
    # the fast probability-space path cannot see it; the row is redone in the log domain. Hand computation:
    # log(.5 e^a + .5 e^b) with a, b each member's log-softmax of class 1.
    z = np.array([[[0.0, -2000.0, 5.0], [0.0, -1500.0, 3.0]], [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]])

    def lse(v):
        m = max(v)
        return m + math.log(sum(math.exp(x - m) for x in v))

    a, b = -2000.0 - lse(z[0, 0]), -1500.0 - lse(z[0, 1])
    want1 = max(a, b) + math.log(0.5) + math.log1p(math.exp(min(a, b) - max(a, b)))
    got = targets.soft_targets(z, [1.0, 400.0])
    assert np.all(np.isfinite(got))
    assert got[0, 0, 1] == pytest.approx(want1, abs=1e-9)
    for row in range(2):  # every row and temperature against the plain formula in the log domain
        for j, t in enumerate([1.0, 400.0]):
            lp = [[x / t - lse([y / t for y in member]) for x in member] for member in z[row]]
            want = [lse([math.log(0.5) + lp[0][c], math.log(0.5) + lp[1][c]]) for c in range(3)]
            np.testing.assert_allclose(got[row, j], want, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(targets.combine_log_probs(z[row:row + 1], t)[0], want, rtol=1e-12, atol=1e-12)


# --- (8) noise ----------------------------------------------------------------------------------------------
def test_teacher_noise_zero_is_identity_and_seeded_noise_reproduces():
    z = torch.randn(4, 3, 5)
    assert add_teacher_noise(z, 0.0, None) is z
    a = add_teacher_noise(z, 0.5, torch.Generator().manual_seed(7))
    b = add_teacher_noise(z, 0.5, torch.Generator().manual_seed(7))
    c = add_teacher_noise(z, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    big = add_teacher_noise(torch.zeros(200, 4, 50), 0.5, torch.Generator().manual_seed(0))
    assert big.mean().item() == pytest.approx(0.0, abs=0.02) and big.std().item() == pytest.approx(0.5, rel=0.03)
    rel = add_teacher_noise(torch.zeros(2, 2, 3), 0.5, torch.Generator().manual_seed(0), relative=True)
    assert torch.equal(rel, torch.zeros(2, 2, 3))


# --- options ------------------------------------------------------------------------------------------------
def test_build_loss_validates_options():
    assert set(LOSSES) == {"kd", "logit-mse"}
    assert isinstance(build_loss("kd", 0.9, 4.0), KDLoss)
    # the library names the option as data; the CLI spells it as its flag (--alpha, --temperature, ...)
    with pytest.raises(TransferSetError, match="alpha must be in") as e:
        build_loss("kd", 1.5, 4.0)
    assert e.value.option == "alpha"
    with pytest.raises(TransferSetError, match="temperature must be a positive") as e:
        build_loss("kd", 0.5, 0.0)
    assert e.value.option == "temperature"
    with pytest.raises(TransferSetError, match="kd, logit-mse"):
        build_loss("fitnet", 0.5, 4.0)
    with pytest.raises(TransferSetError, match="teacher_noise must be") as e:
        add_teacher_noise(torch.zeros(1, 1, 2), -1.0, None)
    assert e.value.option == "teacher_noise"
    with pytest.raises(TransferSetError, match="combination rule"):
        teacher_log_probs(torch.zeros(1, 1, 2), 1.0, "median")
