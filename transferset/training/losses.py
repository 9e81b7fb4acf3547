"""Distillation losses and teacher-side maths in torch (each loss states its formula and its paper).

:func:`teacher_log_probs` mirrors :func:`transferset.targets.combine_log_probs` (numpy) so that targets derived
at training time agree with the soft targets stored by stage 1.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TransferSetError
from ..targets import COMBINE_RULES

__all__ = [
    "LOSSES",
    "teacher_log_probs",
    "mean_logits",
    "add_teacher_noise",
    "KDLoss",
    "LogitMSELoss",
    "build_loss",
    "row_masks",
    "masked_mean",
    "hard_term",
]


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise TransferSetError(f"must be a positive number, got {temperature}", option="temperature")


def _weights(weights: Tensor | None, members: int, like: Tensor) -> Tensor:
    if weights is None:
        return torch.full((members,), 1.0 / members, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape != (members,):
        raise TransferSetError(f"has {w.numel()} values but the ensemble has {members} members; "
                               "give one weight per member", option="weights")
    return w / w.sum()


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def teacher_log_probs(logits: Tensor, temperature: float, rule: str = "mean-probs",
                      weights: Tensor | None = None) -> Tensor:
    """Log-probabilities [B, C] of the combined ensemble at ``temperature`` (torch mirror of targets.py).

    With member logits ``z_m`` and weights ``w`` (normalised to sum to 1):

    - ``mean-probs``: ``log sum_m w_m softmax(z_m / T)``, as ``logsumexp_m(log_softmax(z_m / T) + log w_m)``;
    - ``mean-logits``: ``log_softmax(sum_m w_m z_m / T)``;
    - ``geometric``: ``log_softmax(sum_m w_m log_softmax(z_m / T))``.

    Args:
        logits: member logits [B, M, C] (float16 is computed in float32).
        temperature: T > 0.
        rule: one of ``targets.COMBINE_RULES``.
        weights: member weights [M] or None for uniform.
    """
    _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, M, C], got shape {tuple(logits.shape)}")
    z = logits.to(_work_dtype(logits)) / temperature
    w = _weights(weights, z.shape[1], z)
    if rule == "mean-probs":
        # log 0 = -inf for a zero weight; logsumexp ignores it as long as one weight is positive
        lp = F.log_softmax(z, dim=-1) + torch.log(w.clamp_min(torch.finfo(z.dtype).tiny))[None, :, None]
        out = torch.logsumexp(lp, dim=1)
        return out - torch.logsumexp(out, dim=-1, keepdim=True)
    if rule == "mean-logits":
        return F.log_softmax(torch.einsum("bmc,m->bc", z, w), dim=-1)
    if rule == "geometric":
        return F.log_softmax(torch.einsum("bmc,m->bc", F.log_softmax(z, dim=-1), w), dim=-1)
    raise TransferSetError(f"{rule!r} is not a known combination rule; choose one of {', '.join(COMBINE_RULES)}",
                           option="combine")


def mean_logits(logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted mean of the members' logits, ``sum_m w_m z_m`` [B, C], from [B, M, C] (float32 or float64)."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, M, C], got shape {tuple(logits.shape)}")
    z = logits.to(_work_dtype(logits))
    return torch.einsum("bmc,m->bc", z, _weights(weights, z.shape[1], z))


def add_teacher_noise(logits: Tensor, sigma: float, generator: torch.Generator | None = None,
                      relative: bool = False) -> Tensor:
    """Perturb teacher logits with zero-mean Gaussian noise (a noisy teacher, drawn afresh each step).

    Sau & Balasubramanian 2016, "Deep Model Compression: Distilling Knowledge from Noisy Teachers"
    (arXiv:1610.09650): perturbing the teacher's logits with zero-mean Gaussian noise of standard deviation
    ``sigma`` acts like learning from several teachers and regularises the student.

    - default: ``z' = z + sigma * eps``, ``eps ~ N(0, 1)`` per logit;
    - ``relative=True``: ``z' = z * (1 + sigma * eps)``, the noise scaled by each logit.

    Args:
        logits: teacher logits, any shape (typically [B, M, C]).
        sigma: noise standard deviation, >= 0; 0 returns ``logits`` itself.
        generator: seeded generator for reproducible noise (its device is used to draw, then moved).
        relative: multiplicative instead of additive noise.
    """
    if not (math.isfinite(sigma) and sigma >= 0):
        raise TransferSetError(f"must be a non-negative number, got {sigma}", option="teacher_noise")
    if sigma == 0:
        return logits
    dtype = _work_dtype(logits)
    device = generator.device if generator is not None else logits.device
    eps = torch.randn(logits.shape, generator=generator, dtype=dtype, device=device).to(logits.device)
    z = logits.to(dtype)
    return z * (1 + sigma * eps) if relative else z + sigma * eps


def row_masks(batch: int, labels: Tensor | None, mask: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(valid, labelled)`` [B] bool: slots that are real rows (``mask``), and those among them with a label."""
    valid = torch.ones(batch, dtype=torch.bool, device=device) if mask is None else mask.to(device=device, dtype=torch.bool)
    if labels is None:
        return valid, torch.zeros_like(valid)
    return valid, valid & (labels >= 0)


def masked_mean(values: Tensor, rows: Tensor) -> Tensor:
    """Mean of ``values`` [B] over ``rows``; 0 (still in the graph) when no row counts; NaN in other rows ignored."""
    kept = torch.where(rows, values, torch.zeros_like(values))
    return kept.sum() / rows.sum().clamp_min(1).to(values.dtype)


def hard_term(student_logits: Tensor, labels: Tensor | None, labelled: Tensor) -> Tensor:
    """Cross-entropy with the hard labels, averaged over the ``labelled`` rows (0, in the graph, when none)."""
    if labels is None:
        return student_logits.sum() * 0.0
    safe = torch.where(labelled, labels.long(), torch.zeros_like(labels, dtype=torch.long))
    ce = F.cross_entropy(student_logits.float(), safe, reduction="none")
    return masked_mean(ce, labelled)


class KDLoss(nn.Module):
    """Knowledge distillation loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

    ``L = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1)``

    where ``p_T`` is the teacher distribution at temperature T (given as log-probabilities),
    ``q_T = softmax(s / T)`` the student's, and ``q_1 = softmax(s)``. The ``T^2`` keeps the soft gradient's
    scale independent of T: ``d KL / d s = (q_T - p_T) / T``, which for large T is about
    ``(s - v) / (C T^2)`` for zero-mean logits, so ``T^2`` cancels it.

    KL is summed over classes and averaged over the rows where ``mask`` is true; terms with ``p = 0``
    (log-prob ``-inf``) count as 0. CE is averaged over rows that are valid and labelled (label >= 0). When no
    row of a batch has a label the hard term is 0 and ``alpha`` is *not* renormalised, so such a batch is
    trained on ``alpha * T^2 * KL`` alone. With ``alpha = 0`` no teacher values are needed.
    """

    target_kind = "log_probs"

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_log_probs: Tensor | None, labels: Tensor | None = None,
                mask: Tensor | None = None) -> dict[str, Tensor]:
        """Loss for one batch.

        Args:
            student_logits: [B, C].
            teacher_log_probs: [B, C] combined teacher log-probabilities at this loss's temperature;
                may be None when ``alpha == 0``.
            labels: [B] int64, -1 where unknown; None for no labels.
            mask: [B] bool, False for padding rows; None keeps every row.

        Returns:
            ``{"loss": scalar, "soft": mean KL (detached), "hard": mean CE (detached)}``; ``soft`` and
            ``hard`` are the unweighted terms.
        """
        s = student_logits.float()
        valid, labelled = row_masks(s.shape[0], labels, mask, s.device)
        hard = hard_term(s, labels, labelled)
        if self.alpha > 0:
            if teacher_log_probs is None:
                raise ValueError("KDLoss with alpha > 0 needs teacher_log_probs")
            t = self.temperature
            log_q = F.log_softmax(s / t, dim=-1)
            log_p = teacher_log_probs.to(device=s.device, dtype=torch.float32)
            p = torch.exp(log_p)
            # p log p -> 0 as p -> 0; replacing log p keeps 0 * (-inf) from becoming NaN
            safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
            kl = (p * (safe_log_p - log_q)).sum(dim=-1)
            soft = masked_mean(kl, valid)
            loss = self.alpha * t * t * soft + (1.0 - self.alpha) * hard
        else:
            soft = s.new_zeros(())
            loss = hard
        return {"loss": loss, "soft": soft.detach(), "hard": hard.detach()}


class LogitMSELoss(nn.Module):
    """Logit matching (Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?").

    ``L = alpha * mean_c ((s - mean_c s) - (v - mean_c v))^2 + (1 - alpha) * CE(y, softmax(s))``

    where ``v`` is the teacher's (weighted mean) logits, see :func:`mean_logits`. Centring each row removes the
    per-row constant that softmax ignores (and that log-probability members carry). The squared error is averaged
    over classes and over valid rows; the hard term is as in :class:`KDLoss`. No temperature applies.
    """

    target_kind = "logits"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None = None,
                mask: Tensor | None = None) -> dict[str, Tensor]:
        """Loss for one batch: ``teacher_logits`` [B, C] already combined (None allowed when ``alpha == 0``).

        Returns:
            ``{"loss": scalar, "soft": mean squared error (detached), "hard": mean CE (detached)}``.
        """
        s = student_logits.float()
        valid, labelled = row_masks(s.shape[0], labels, mask, s.device)
        hard = hard_term(s, labels, labelled)
        if self.alpha > 0:
            if teacher_logits is None:
                raise ValueError("LogitMSELoss with alpha > 0 needs teacher_logits")
            v = teacher_logits.to(device=s.device, dtype=torch.float32)
            diff = (s - s.mean(dim=-1, keepdim=True)) - (v - v.mean(dim=-1, keepdim=True))
            soft = masked_mean(diff.pow(2).mean(dim=-1), valid)
            loss = self.alpha * soft + (1.0 - self.alpha) * hard
        else:
            soft = s.new_zeros(())
            loss = hard
        return {"loss": loss, "soft": soft.detach(), "hard": hard.detach()}


#: Loss names -> builders ``(alpha, temperature) -> module`` (a plain dict).
LOSSES: dict[str, Callable[[float, float], nn.Module]] = {
    "kd": lambda alpha, temperature: KDLoss(alpha, temperature),
    "logit-mse": lambda alpha, temperature: LogitMSELoss(alpha),
}


def build_loss(name: str, alpha: float, temperature: float) -> nn.Module:
    """Build a registered loss after validating its options.

    Args:
        name: a key of :data:`LOSSES` (``kd`` or ``logit-mse``).
        alpha: weight of the soft term, in [0, 1] (0 = labels only).
        temperature: T > 0 (``logit-mse`` ignores it).

    Raises:
        TransferSetError: for an unknown name, alpha outside [0, 1] or a non-positive temperature.
    """
    if name not in LOSSES:
        raise TransferSetError(f"{name!r}: unknown loss; choose one of {', '.join(sorted(LOSSES))}", option="loss")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise TransferSetError(f"must be in [0, 1], got {alpha}", option="alpha")
    _check_temperature(temperature)
    return LOSSES[name](float(alpha), float(temperature))
