"""Distillation losses on sparse transfer sets (``topk:K``, ``sample:K``), and what a sparse set trains with.

A sparse set keeps a few classes per row at its stored temperatures only, so the loss reads the codec: the loop
asks :func:`sparse_training` for the loss and the targets of a set; it answers None for a dense set (and for
``alpha = 0``, which needs no teacher values), and the dense path goes on as before.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TransferSetError
from ..format.codecs import Codec, codec_for
from .losses import hard_term, masked_mean, row_masks, build_loss

__all__ = ["TopKTailKDLoss", "SampledKDLoss", "SPARSE_LOSSES", "SparseTargets", "sparse_training"]


class _SparseKD(nn.Module):
    """``alpha * T^2 * soft + (1 - alpha) * CE``, the soft term per row given by :meth:`soft_term`."""

    def __init__(self, alpha: float, temperature: float) -> None:
        super().__init__()
        self.alpha, self.temperature = float(alpha), float(temperature)

    @abstractmethod
    def soft_term(self, log_q: Tensor, teacher: dict[str, Tensor]) -> Tensor:
        """The soft term of each row, [B], from the student's log-probabilities at T and the codec's fields."""

    def forward(self, student_logits: Tensor, teacher: dict[str, Tensor], labels: Tensor | None = None,
                mask: Tensor | None = None) -> dict[str, Tensor]:
        """Loss for one batch: ``student_logits`` [B, C], ``teacher`` the codec's fields at this temperature,
        ``labels`` [B] (-1 unknown) or None, ``mask`` [B] (False on padding) or None.

        Returns ``{"loss", "soft", "hard"}`` as :class:`~transferset.training.losses.KDLoss` does.
        """
        s = student_logits.float()
        valid, labelled = row_masks(s.shape[0], labels, mask, s.device)
        hard = hard_term(s, labels, labelled)
        t = self.temperature
        soft = masked_mean(self.soft_term(F.log_softmax(s / t, dim=-1), teacher), valid)
        loss = self.alpha * t * t * soft + (1.0 - self.alpha) * hard
        return {"loss": loss, "soft": soft.detach(), "hard": hard.detach()}


class TopKTailKDLoss(_SparseKD):
    """KD on a top-k set: KL over the K kept classes plus one tail bin.

    ``L = alpha * T^2 * [ sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail) ] + (1 - alpha) * CE``

    with ``p`` the teacher's combined probabilities at the stored temperature T (kept classes and the exact tail
    mass ``p_tail = 1 - sum_k p_k``, both stored), ``q = softmax(s / T)`` the student's, and
    ``log q_tail = logsumexp`` of the student's log-probabilities over every class not kept. This is the KL
    between the two distributions coarsened to K + 1 bins (Hinton et al. 2015 on those bins), so it never exceeds
    the dense KL and equals it when the tail is one class or empty. Without the tail bin (top-k renormalised, as
    FKD and ReLabel store) the student is pushed to put no mass on the tail: Anshumann et al. (ACL 2025, "Sparse
    Logit Sampling") show that bias and its cost in calibration. Terms with ``p = 0`` count as 0; rows and labels
    as in :class:`~transferset.training.losses.KDLoss`. ``teacher``: ``index`` [B, K] int64, ``log_probs`` [B, K]
    and ``tail`` [B].
    """

    def soft_term(self, log_q: Tensor, teacher: dict[str, Tensor]) -> Tensor:
        idx = teacher["index"].to(log_q.device).long()
        log_q_tail = torch.logsumexp(log_q.scatter(1, idx, float("-inf")), dim=-1, keepdim=True)
        log_q_bins = torch.cat([log_q.gather(1, idx), log_q_tail], dim=1)
        log_p = torch.cat([teacher["log_probs"], teacher["tail"][:, None]], dim=1).to(log_q.device, torch.float32)
        p = torch.exp(log_p)
        # where p = 0 (an empty tail, say) the term is 0, even when the student's bin is -inf as well
        safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
        safe_log_q = torch.where(p > 0, log_q_bins, torch.zeros_like(log_q_bins))
        return (p * (safe_log_p - safe_log_q)).sum(dim=-1)


class SampledKDLoss(_SparseKD):
    """KD on a sampled set: the random-sampling estimator of Anshumann et al. (ACL 2025, "Sparse Logit Sampling:
    Accelerating Knowledge Distillation in LLMs"), with the teacher as its own proposal.

    ``L = alpha * T^2 * ( - sum_j (n_j / K) log q_T(c_j) ) + (1 - alpha) * CE``

    where ``c_j`` are the distinct classes among K draws (with replacement) from the teacher's ``p_T`` and ``n_j``
    their counts. Since ``E[n_j / K] = p_T(c_j)``, the soft term is an unbiased estimate of the cross-entropy
    ``H(p_T, q_T) = KL(p_T || q_T) + H(p_T)`` and its gradient ``(q_T - n / K) / T`` of the dense KD gradient
    ``(q_T - p_T) / T`` (the student's softmax still runs over every class). The reported ``soft`` is therefore the
    cross-entropy estimate, not a KL: it does not go to 0, and differs from the dense value by the teacher's
    entropy. ``teacher``: ``index`` [B, K] int64 and ``count`` [B, K] (0 in unused slots). A ``systematic:K`` set
    stores the same fields from systematic draws, for which ``E[n_j / K] = p_T(c_j)`` holds too, with less variance.
    """

    def soft_term(self, log_q: Tensor, teacher: dict[str, Tensor]) -> Tensor:
        count = teacher["count"].to(log_q.device, torch.float32)
        picked = log_q.gather(1, teacher["index"].to(log_q.device).long())
        return -(count * picked).sum(dim=-1) / count.sum(dim=-1).clamp_min(1.0)


#: a codec's loss family (``Codec.loss``) -> the loss that trains from its targets (``Codec.targets``)
SPARSE_LOSSES = {"topk": TopKTailKDLoss, "sample": SampledKDLoss}


class SparseTargets:
    """The loop's teacher input for a sparse set: the codec's target fields at the chosen stored temperature,
    under the names its loss reads (:attr:`transferset.format.codecs.Codec.targets`)."""

    generator = None  # no teacher noise on a sparse set

    def __init__(self, codec: Codec, temperature: float) -> None:
        self.names, self.keys = tuple(codec.targets), tuple(codec.targets.values())
        self.fields = ("inputs", *self.names, "labels")
        self.temperature = temperature

    def __call__(self, batch: dict) -> dict[str, Tensor]:
        return {key: batch[name] for key, name in zip(self.keys, self.names)}


def _refuse(o, manifest: dict) -> None:
    codec = manifest["codec"]
    if o.loss != "kd":
        raise TransferSetError(f"{o.loss!r} needs every member's logits over all classes; a {codec} set keeps "
                               "only some classes: use kd, or train from a dense set", option="loss")
    if o.combine not in (None, manifest["combine"]):
        raise TransferSetError(f"{o.combine!r}: a {codec} set keeps the targets combined with "
                               f"{manifest['combine']!r} only; drop it, or train from a dense set", option="combine")
    if o.teacher_noise > 0:
        raise TransferSetError(f"needs every member's logits over all classes; a {codec} set keeps only some "
                               "classes: drop it, or train from a dense set", option="teacher_noise")
    stored = [float(t) for t in manifest["temperatures"]]
    if not any(abs(t - float(o.temperature)) <= 1e-9 for t in stored):
        raise TransferSetError(
            f"{o.temperature:g} is not stored in this {codec} set (stored: {', '.join(f'{t:g}' for t in stored)}): "
            "a sparse set keeps its classes' probabilities and the tail mass at the stored temperatures only, and "
            "the other classes' logits are gone, so targets at another temperature cannot be rebuilt; pick a "
            "stored one, or train from a dense set", option="temperature")


def sparse_training(o, manifest: dict, device: torch.device) -> tuple[nn.Module, SparseTargets] | None:
    """``(loss, targets)`` for a sparse set trained with the options ``o`` (``TrainOptions``); None for a dense
    set or ``alpha = 0`` (the dense path handles those: hard labels need no teacher values).

    Raises:
        TransferSetError: for what a sparse set cannot honour: another loss than kd, another combination
            rule, teacher noise, or a temperature that was not stored.
    """
    codec = codec_for(manifest.get("codec", "dense"))
    if not codec.sparse or o.alpha == 0:
        return None
    build_loss(o.loss, o.alpha, o.temperature)  # the usual checks of alpha and the temperature first
    _refuse(o, manifest)
    return SPARSE_LOSSES[codec.loss](o.alpha, o.temperature), SparseTargets(codec, float(o.temperature))
