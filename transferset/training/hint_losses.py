"""Feature-distillation losses from the hints a transfer set stores (``train-student --hint-loss``).

``KIND:HINT=MODULE[:weight=W]``: a forward hook on the student's module MODULE (a name from
``model.named_modules()``, with or without the leading ``body.``) captures its output S on every step; HINT names
the set's hint (``hint_<k>`` or its tensor's name) whose stored rows T it is compared with. Where the shapes
differ, a small regressor (1x1 convolution for maps, linear layer for vectors) is built from them at the start,
trained with the student, saved in the checkpoint and left out of the student's ONNX export. Spatial sizes that
differ are matched by adaptive average pooling of the student's map. Every loss is a mean over the batch's real
rows (``mask``). The kinds (each class states its formula and paper):

- ``fitnet``: L2 between the regressed student map and the teacher's (hint ``none`` or ``avgpool``);
- ``at``: attention transfer (hint ``attention`` or ``none``);
- ``ab``: activation boundaries, a hinge on the regressed pre-activation against the teacher's sign bits
  (hint ``sign`` or ``none``);
- ``rkd``: relational KD, distance plus angle between the rows' embeddings (hint ``avgpool`` or ``none``);
- ``mmd``: neuron selectivity transfer, MMD with a polynomial kernel between channels' maps (hint ``none``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TransferSetError

__all__ = ["HINT_LOSS_KINDS", "HintLossSpec", "parse_hint_loss", "HintLosses", "fitnet_loss", "at_loss",
           "attention_map", "ab_loss", "rkd_loss", "mmd_loss"]

#: kind -> the hint reductions it can use
HINT_LOSS_KINDS = {"fitnet": ("none", "avgpool"), "at": ("attention", "none"), "ab": ("sign", "none"),
                   "rkd": ("avgpool", "none"), "mmd": ("none",)}
#: default weights: at as the authors' code (beta / 2 = 500 on a mean), rkd's own lambdas sit inside the loss
DEFAULT_WEIGHTS = {"fitnet": 1.0, "at": 500.0, "ab": 1.0, "rkd": 1.0, "mmd": 50.0}


@dataclass(frozen=True)
class HintLossSpec:
    """One ``--hint-loss``: the loss kind, the set's hint, the student's module and the term's weight."""

    kind: str
    hint: str
    module: str
    weight: float


def parse_hint_loss(text: str) -> HintLossSpec:
    """``KIND:HINT=MODULE[:weight=W]`` -> :class:`HintLossSpec` (HINT may hold ':' and '/', MODULE may not hold '=')."""
    text = str(text)
    kind, _, rest = text.partition(":")
    if kind not in HINT_LOSS_KINDS:
        raise TransferSetError(f"{text[:200]!r}: kind {kind!r} is not one of {', '.join(HINT_LOSS_KINDS)}; write "
                               "KIND:HINT=MODULE[:weight=W]", option="hint_loss")
    weight = DEFAULT_WEIGHTS[kind]
    head, sep, tail = rest.rpartition(":weight=")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            weight = float("nan")
        rest = head
        if not (math.isfinite(weight) and weight > 0):
            raise TransferSetError(f"{text[:200]!r}: weight must be a positive number, got {tail!r}", option="hint_loss")
    hint, sep, module = rest.rpartition("=")
    if not sep or not hint or not module:
        raise TransferSetError(f"{text[:200]!r}: write KIND:HINT=MODULE[:weight=W] (HINT a hint_<k> of the set or "
                               "its tensor's name, MODULE a module of the student)", option="hint_loss")
    return HintLossSpec(kind, hint, module, weight)


# -- the losses (pure functions of tensors; rows already masked) -------------------------------------------------
def fitnet_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    ``L = 1/N sum_n 1/D ||r(S_n) - T_n||_2^2``: the regressed student map r(S) against the teacher's hint T, both
    of D values a row (the paper's 1/2 is folded into the weight).
    """
    return (student.float() - teacher.float()).pow(2).flatten(1).mean(1).mean()


def attention_map(features: Tensor) -> Tensor:
    """``Q = vec(sum_c A_c^2) / ||vec(sum_c A_c^2)||_2`` per row of a [N, C, ...] map (p = 2)."""
    a = features.float().pow(2).sum(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)


def at_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    ``L = 1/N sum_n 1/(HW) ||Q_S,n - Q_T,n||_2^2`` with Q the normalised attention maps of :func:`attention_map`;
    the mean over positions follows the authors' code, whose beta = 1000 gives the default weight beta / 2.
    """
    return (student_map.float() - teacher_map.float()).pow(2).mean(1).mean()


def ab_loss(pre_activation: Tensor, teacher_bits: Tensor, margin: float = 1.0) -> Tensor:
    """Activation-boundary loss (Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed
    by Hidden Neurons", AAAI 2019): the alternative hinge on the regressed student pre-activation r(S), per neuron

    ``l = (m + r(S))^2 [r(S) > -m] (1 - t) + (m - r(S))^2 [r(S) <= m] t``, with t = 1 where the teacher neuron is
    active (its stored sign bit) and margin m = 1; L is the mean over the neurons and the rows.
    """
    s, t = pre_activation.float().flatten(1), teacher_bits.float().flatten(1)
    off = (margin + s).pow(2) * (s > -margin).float() * (1 - t)
    on = (margin - s).pow(2) * (s <= margin).float() * t
    return (off + on).mean(1).mean()


def _pdist(e: Tensor) -> Tensor:
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp_min(1e-12).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _angles(e: Tensor) -> Tensor:
    """``<unit(e_i - e_j), unit(e_k - e_j)>`` for every (j, i, k), 0 where i = j or k = j, from the Gram matrix G:
    the dot product is ``G_ik - G_ij - G_kj + G_jj``, so the cost is B^3, not B^3 x dims (8x faster at B = 128)."""
    g = e @ e.t()
    d = g.diagonal()
    dot = g[None, :, :] - g[:, :, None] - g[:, None, :] + d[:, None, None]
    n = (d[None, :] - 2 * g + d[:, None]).clamp_min(1e-12).sqrt()  # n[j, i] = ||e_i - e_j||; finite gradient at 0
    ok = (n > 1e-6) & ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    n = torch.where(ok, n, torch.ones_like(n))  # finite everywhere, so the masked entries pass no NaN gradient
    cos = dot / (n[:, :, None] * n[:, None, :])
    return torch.where(ok[:, :, None] & ok[:, None, :], cos, torch.zeros_like(cos)).flatten()


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    """Relational KD, distance and angle (Park et al., "Relational Knowledge Distillation", CVPR 2019).

    ``psi_D(i, j) = ||e_i - e_j|| / mu`` (mu: the mean distance over the batch's pairs), ``psi_A(i, j, k) =
    <(e_i - e_j)/||e_i - e_j||, (e_k - e_j)/||e_k - e_j||>``; ``L = 25 huber(psi_D^S - psi_D^T) + 50 huber(psi_A^S -
    psi_A^T)``, each a mean over pairs or triplets (the paper's lambdas), on the rows' embedding vectors.
    """
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    if len(s) < 3:
        return s.sum() * 0.0
    with torch.no_grad():
        td = _pdist(t)
        td = td / td[td > 0].mean().clamp_min(1e-12)
        ta = _angles(t)
    sd = _pdist(s)
    sd = sd / sd[sd > 0].mean().clamp_min(1e-12)
    return distance_weight * F.smooth_l1_loss(sd, td) + angle_weight * F.smooth_l1_loss(_angles(s), ta)


def mmd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
    Transfer", 2017): per row, each channel's spatial map f (L2-normalised) is a sample; with the polynomial kernel
    ``k(x, y) = (x^T y)^2``, ``MMD^2 = 1/C_T^2 sum k(t_i, t_i') + 1/C_S^2 sum k(s_j, s_j') - 2/(C_S C_T) sum k(s_j, t_i)``;
    L is its mean over the rows. The spatial sizes must agree (the student's map is pooled to the teacher's).
    """
    s = F.normalize(student.float().flatten(2), dim=2)
    t = F.normalize(teacher.float().flatten(2), dim=2)
    k = lambda a, b: torch.bmm(a, b.transpose(1, 2)).pow(2).mean((1, 2))  # noqa: E731
    return (k(t, t) + k(s, s) - 2 * k(s, t)).mean()


# -- the student side: hooks, regressors, the terms --------------------------------------------------------------
def _find_module(model: nn.Module, name: str) -> nn.Module:
    mods = dict(model.named_modules())
    for candidate in (name, f"body.{name}"):
        if candidate and candidate in mods:
            return mods[candidate]
    names = [n for n in mods if n]
    raise TransferSetError(f"the student has no module named {name!r}; its modules: "
                           f"{', '.join(names[:40])}{' ...' if len(names) > 40 else ''}", option="hint_loss")


def _hint_entry(hints: Sequence[dict], name: str) -> dict:
    got = [h for h in hints if h.get("field") == name] or [h for h in hints if h.get("tensor") == name]
    if len(got) != 1:
        have = ", ".join(f"{h['field']} ({h['tensor']}, {h['reduce']})" for h in hints) or "none"
        raise TransferSetError(f"{name!r} is not {'one hint' if got else 'a hint'} of the set; its hints: {have}",
                               option="hint_loss")
    return got[0]


def _unpacked(values: Tensor, entry: dict) -> Tensor:
    """A batch of one stored hint as float32 ``[N, *tensor_shape]`` (sign bits unpacked) or its stored shape."""
    if entry["reduce"] != "sign":
        return values.float()
    n, size = values.shape[0], math.prod(entry["tensor_shape"])
    bits = (values.to(torch.int32)[:, :, None] >> torch.arange(7, -1, -1, device=values.device)) & 1
    return bits.flatten(1)[:, :size].float().reshape((n, *entry["tensor_shape"]))


def _teacher_target(kind: str, entry: dict, values: Tensor) -> Tensor:
    t = _unpacked(values, entry)
    r = entry["reduce"]
    if kind == "at" and r == "none":
        return attention_map(t)
    if kind == "ab" and r == "none":
        return (t > 0).float()
    if kind == "rkd" and r == "none":
        return t.flatten(2).mean(2) if t.dim() > 2 else t
    return t


def _student_view(kind: str, entry: dict, s: Tensor) -> Tensor:
    """The student's map brought to what the loss compares with the teacher's target (before any regressor)."""
    ts = entry["tensor_shape"]
    if kind == "at":
        if len(ts) >= 3 and s.dim() == len(ts) + 1 and tuple(s.shape[2:]) != tuple(ts[1:]):
            s = F.adaptive_avg_pool2d(s, tuple(ts[1:])) if s.dim() == 4 else s
        return attention_map(s)
    if kind == "rkd" or (kind == "fitnet" and entry["reduce"] == "avgpool"):
        return s.flatten(2).mean(2) if s.dim() > 2 else s.flatten(1)
    if s.dim() == 4 and len(ts) == 3 and tuple(s.shape[2:]) != tuple(ts[1:]):
        s = F.adaptive_avg_pool2d(s, tuple(ts[1:]))
    return s


def _regressor(kind: str, entry: dict, view: Tensor) -> nn.Module | None:
    """A 1x1 convolution (maps) or linear layer (vectors) from the student's channels to the teacher's, when the
    loss compares values one to one (fitnet, ab) and the shapes differ; None otherwise."""
    if kind not in ("fitnet", "ab"):
        return None
    target = entry["shape"] if entry["reduce"] == "avgpool" else entry["tensor_shape"]
    if list(view.shape[1:]) == list(target):
        return None
    if view.dim() == 4 and len(target) == 3 and list(view.shape[2:]) == list(target[1:]):
        return nn.Conv2d(view.shape[1], target[0], 1)
    if view.dim() == 2 and len(target) == 1:
        return nn.Linear(view.shape[1], target[0])
    raise TransferSetError(f"{kind}: the student's map {list(view.shape[1:])} cannot be brought to the hint's "
                           f"{list(target)} by a 1x1 convolution or a linear layer; choose another module",
                           option="hint_loss")


_LOSSES = {"fitnet": fitnet_loss, "at": at_loss, "ab": ab_loss, "rkd": rkd_loss, "mmd": mmd_loss}


class HintLosses(nn.Module):
    """The ``--hint-loss`` terms of a run: hooks on the student, the regressors (this module's parameters) and
    ``forward(batch)``, the weighted sum of every term on the rows of the student's last forward pass."""

    def __init__(self, specs: Sequence[HintLossSpec], hints: Sequence[dict], model: nn.Module,
                 input_shape: Sequence[int], input_dtype: str) -> None:
        super().__init__()
        self.specs = list(specs)
        self.entries = []
        for s in self.specs:
            entry = _hint_entry(hints, s.hint)
            if entry["reduce"] not in HINT_LOSS_KINDS[s.kind]:
                raise TransferSetError(f"{s.kind} needs a hint stored with reduce "
                                       f"{' or '.join(HINT_LOSS_KINDS[s.kind])}; {entry['field']} was stored with "
                                       f"{entry['reduce']}", option="hint_loss")
            self.entries.append(entry)
        self.fields = tuple(dict.fromkeys(e["field"] for e in self.entries))
        self._captured: dict[int, Tensor] = {}
        self._handles = [_find_module(model, s.module).register_forward_hook(self._hook(i))
                         for i, s in enumerate(self.specs)]
        self.regressors = nn.ModuleList(self._build(model, input_shape, input_dtype))

    def _hook(self, i: int):
        def hook(module, args, output):  # a copy: an in-place ReLU after this module would change the output
            self._captured[i] = (output[0] if isinstance(output, tuple) else output).clone()
        return hook

    def _build(self, model: nn.Module, input_shape: Sequence[int], input_dtype: str) -> list[nn.Module]:
        was = model.training
        model.eval()
        with torch.no_grad():
            p = next(model.parameters(), None)
            model(torch.zeros((2, *input_shape), dtype=getattr(torch, input_dtype, torch.float32),
                              device=p.device if p is not None else "cpu"))
        model.train(was)
        regs = []
        for i, (s, e) in enumerate(zip(self.specs, self.entries)):
            view = _student_view(s.kind, e, self._captured[i])
            if s.kind == "mmd" and (view.dim() < 3 or list(view.shape[2:]) != list(e["tensor_shape"][1:])):
                raise TransferSetError(f"mmd needs a student map of the hint's spatial size "
                                       f"{e['tensor_shape'][1:]}; {s.module} gives {list(view.shape[1:])}",
                                       option="hint_loss")
            if s.kind == "at" and view.shape[1] != math.prod(e["tensor_shape"][1:]):
                raise TransferSetError(f"at: the student's attention map has {view.shape[1]} positions, the hint "
                                       f"{math.prod(e['tensor_shape'][1:])}; choose a module with a map of that size "
                                       "or larger", option="hint_loss")
            regs.append(_regressor(s.kind, e, view) or nn.Identity())
        self._captured.clear()
        return regs

    def forward(self, batch: dict) -> Tensor:
        rows = batch["mask"].bool()
        total = None
        for i, (s, e) in enumerate(zip(self.specs, self.entries)):
            view = self.regressors[i](_student_view(s.kind, e, self._captured[i].float()))
            target = _teacher_target(s.kind, e, batch[e["field"]])
            term = s.weight * _LOSSES[s.kind](view[rows], target[rows])
            total = term if total is None else total + term
        self._captured.clear()
        return total

    def remove(self) -> None:
        """Take the hooks off the student (before its export)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def hint_row_bytes(hints: Sequence[dict]) -> dict[str, int]:
    """Bytes one row of each hint field takes on disk."""
    return {h["field"]: int(np.prod(h["shape"])) * np.dtype(h["dtype"]).itemsize for h in hints}
