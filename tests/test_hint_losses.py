"""The feature-distillation losses (issue 23), each against a hand computation; parsing; hooks and regressors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from transferset.errors import TransferSetError
from transferset.training.hint_losses import (HintLosses, ab_loss, at_loss, attention_map, fitnet_loss, mmd_loss,
                                              parse_hint_loss, rkd_loss)
from transferset.training.students import create_student


def test_fitnet_by_hand():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # row 0: (1 + 4) / 2 = 2.5; row 1: (9 + 16) / 2 = 12.5; mean 7.5
    assert fitnet_loss(s, t).item() == pytest.approx(7.5)


def test_attention_transfer_by_hand():
    a = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, 0.0]]]])  # [1, 2, 2, 2]
    amap = np.array([2.0, 1.0, 0.0, 4.0])
    q = amap / np.linalg.norm(amap)
    np.testing.assert_allclose(attention_map(a).numpy(), [q], rtol=1e-6)
    other = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    assert at_loss(attention_map(a), other).item() == pytest.approx(float(((q - 0.5) ** 2).mean()), rel=1e-6)


def test_activation_boundary_by_hand():
    s = torch.tensor([[-2.0, -0.5, 0.5, 2.0]])
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    # t=1 at -2: (1 - -2)^2 = 9 (since -2 <= 1); t=0 at -0.5: (1 + -0.5)^2 = 0.25 (-0.5 > -1);
    # t=1 at 0.5: (1 - 0.5)^2 = 0.25; t=0 at 2: (1 + 2)^2 = 9; mean 18.5 / 4
    assert ab_loss(s, t).item() == pytest.approx(18.5 / 4)
    # beyond the margin on the right side: no loss
    assert ab_loss(torch.tensor([[3.0, -3.0]]), torch.tensor([[1.0, 0.0]])).item() == 0.0


def _huber(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


def test_rkd_by_hand():
    s = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    t = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    n = len(s)

    def dist(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / d[d > 0].mean()

    def angle(e):
        out = []
        for j, i, k in itertools.product(range(n), repeat=3):
            u, v = e[i] - e[j], e[k] - e[j]
            nu, nv = np.linalg.norm(u), np.linalg.norm(v)
            out.append(0.0 if nu == 0 or nv == 0 else float(u @ v / nu / nv))
        return np.array(out)

    dd = np.mean([_huber(x) for x in (dist(s) - dist(t)).ravel()])
    aa = np.mean([_huber(x) for x in angle(s) - angle(t)])
    got = rkd_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)).item()
    assert got == pytest.approx(25 * dd + 50 * aa, rel=1e-4)


def test_mmd_by_hand():
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, C=2, 1, 2]: two channel maps, unit already
    t = torch.tensor([[[[3.0, 4.0]]]])  # [1, C=1, 1, 2] -> normalised (0.6, 0.8)
    # k = (x.y)^2: tt = 1; ss = (1 + 0 + 0 + 1) / 4 = 0.5; st = (0.36 + 0.64) / 2 = 0.5 -> 1 + 0.5 - 1 = 0.5
    assert mmd_loss(s, t).item() == pytest.approx(0.5)
    assert mmd_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_parse_hint_loss():
    h = parse_hint_loss("fitnet:/features/x:0=body.3:weight=0.5")
    assert (h.kind, h.hint, h.module, h.weight) == ("fitnet", "/features/x:0", "body.3", 0.5)
    assert parse_hint_loss("at:hint_1=body.4").weight == 500.0
    for bad, what in (("kl:hint_0=body.1", "kind 'kl'"), ("fitnet:hint_0", "KIND:HINT=MODULE"),
                      ("ab:hint_0=body.1:weight=-1", "positive")):
        with pytest.raises(TransferSetError, match=what):
            parse_hint_loss(bad)


def _hints():
    return [{"field": "hint_0", "tensor": "t/map", "member": 0, "reduce": "none", "tensor_shape": [6, 4, 4],
             "shape": [6, 4, 4], "dtype": "float16"},
            {"field": "hint_1", "tensor": "t/fc", "member": 0, "reduce": "sign", "tensor_shape": [12],
             "shape": [2], "dtype": "uint8"}]


def test_hooks_regressors_and_sign_unpacking():
    torch.manual_seed(0)
    model = create_student("cnn:4,8,fc=16", (8, 8), 5)  # body.4 conv [8, 4, 4]; body.7 flatten; body.8 fc [16]
    specs = [parse_hint_loss("fitnet:hint_0=body.4"), parse_hint_loss("ab:t/fc=8")]
    hl = HintLosses(specs, _hints(), model, (8, 8), "float32")
    assert isinstance(hl.regressors[0], torch.nn.Conv2d) and hl.regressors[0].kernel_size == (1, 1)
    assert isinstance(hl.regressors[1], torch.nn.Linear) and hl.regressors[1].out_features == 12
    x = torch.rand(3, 8, 8)
    model(x)
    bits = np.packbits(np.array([[1] * 12, [0] * 12, [1, 0] * 6], bool), axis=1)
    batch = {"hint_0": torch.randn(3, 6, 4, 4).half(), "hint_1": torch.from_numpy(bits),
             "mask": torch.tensor([True, True, False])}
    loss = hl(batch)
    feats = {}
    model.body[4].register_forward_hook(lambda m, a, o: feats.__setitem__("map", o.clone()))
    model.body[8].register_forward_hook(lambda m, a, o: feats.__setitem__("fc", o.clone()))
    model(x)
    want = fitnet_loss(hl.regressors[0](feats["map"])[:2], batch["hint_0"][:2].float()) + ab_loss(
        hl.regressors[1](feats["fc"])[:2], torch.tensor([[1.0] * 12, [0.0] * 12]))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert hl.regressors[0].weight.grad is not None and model.body[1].weight.grad is not None


def test_unknown_module_hint_and_reduction_are_one_line():
    model = create_student("cnn:4,8,fc=16", (8, 8), 5)
    for spec, what in (("fitnet:hint_0=body.99", "no module named 'body.99'"), ("fitnet:hint_7=body.4", "not a hint"),
                       ("mmd:hint_1=body.4", "reduce none"), ("at:hint_1=body.8", "reduce attention or none")):
        with pytest.raises(TransferSetError, match=what):
            HintLosses([parse_hint_loss(spec)], _hints(), model, (8, 8), "float32")


def test_rkd_gradient_is_finite_with_repeated_rows():
    s = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [3.0, 0.0]], requires_grad=True)
    rkd_loss(s, torch.randn(4, 3)).backward()
    assert torch.isfinite(s.grad).all()
