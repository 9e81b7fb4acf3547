"""Per-position distillation losses for language-model students, on per-position sets of any codec.

With ``p`` the teacher's next-token distribution at position j and temperature T (from the set), ``q`` the
student's ``softmax(s_j / T)``, the soft term of one position is one of

- ``kd``: forward KL, ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` (Hinton et al. 2015);
- ``reverse-kl``: ``KL(q || p)``, mode-seeking (MiniLLM, Gu et al. 2024);
- ``jsd``: the generalized Jensen-Shannon divergence with ``beta``, ``beta KL(p || m) + (1 - beta) KL(q || m)``
  with ``m = beta p + (1 - beta) q`` (GKD, Agarwal et al. 2024);
- ``tvd``: total variation, ``1/2 sum_v |p_v - q_v|`` (DistiLLM-style bounded loss, Wen et al. 2023);

and the loss of a batch is ``alpha * T^2 * mean over real positions (soft) + (1 - alpha) * mean over labelled
positions (CE of s_j against token j + 1)``. Real positions are ``j < length`` of the row (padding never counts);
a labelled one also has a next token (the row's last real position has none: its label is -1).

Sparse forms, on what each codec keeps:

- ``topk:K``: each divergence between the two distributions coarsened to K + 1 bins, the kept ids and one tail
  bin holding the teacher's exact tail mass (stored) and the student's ``logsumexp`` over every id not kept. The
  bins never renormalise the teacher over its top K (the bug behind MaxText #4056); with no tail the value equals
  the dense one, and by the data-processing inequality it never exceeds it.
- ``sample:K`` / ``systematic:K``: ``kd`` only, as the cross-entropy estimate ``-sum_i (n_i / K) log q(c_i)``,
  unbiased for ``H(p, q) = KL(p || q) + H(p)`` over the whole vocabulary (Anshumann et al., ACL 2025). Reverse KL,
  JSD and TVD need the teacher's probability at the ids the *student* puts mass on, which draws from p do not
  give; they are refused on sampled sets.
- ``dense``: every id.

Memory: the student's output layer runs on one chunk of positions at a time (``chunk`` rows of [chunk, V] float32)
under activation checkpointing, so [B, L, V] float32 logits are never whole, forward or backward (for a student
that exposes ``hidden`` and ``head``, as ``lm:`` does; any other student's logits are only sliced).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..errors import TransferSetError
from ..format.schema import parse_codec

__all__ = ["TOKEN_LOSSES", "TokenLoss", "TokenTargets", "token_training", "divergence_bins"]

TOKEN_LOSSES = ("kd", "reverse-kl", "jsd", "tvd")
_LOG_FLOOR = -1e4  # a teacher log-probability of -inf (fp16 underflow) as a finite floor where q may be > 0

#: codec family -> (batch fields read, loss-input names)
_FIELDS = {
    "topk": (("topk_index", "topk_log_probs", "tail_log_mass"), ("index", "log_probs", "tail")),
    "sample": (("sample_index", "sample_count"), ("index", "count")),
    "dense": (("soft_targets",), ("log_probs",)),
}


def divergence_bins(kind: str, log_p: Tensor, log_q: Tensor, beta: float = 0.5) -> Tensor:
    """``kind`` between distributions given as log-probabilities [..., bins]; summed over the last axis.

    Terms where the weighting distribution is 0 count as 0 (``0 log 0 = 0``).
    """
    if kind == "kd":
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - torch.where(p > 0, log_q, torch.zeros_like(log_q))),
                           torch.zeros_like(p)).sum(-1)
    log_p = log_p.clamp_min(_LOG_FLOOR)
    if kind == "reverse-kl":
        q = log_q.exp()
        return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
    if kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        p, q = log_p.exp(), log_q.exp()
        kl_pm = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p)).sum(-1)
        kl_qm = torch.where(q > 0, q * (log_q - log_m), torch.zeros_like(q)).sum(-1)
        return beta * kl_pm + (1 - beta) * kl_qm
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(kind)


#: kept student mass above which the tail is taken by a second, masked log-sum-exp instead of ``log(1 - kept)``
_CONFIDENT = 0.99


def _log_tail(z: Tensor, idx: Tensor, lse: Tensor, log_q_kept: Tensor) -> Tensor:
    """[n, 1]: the student's log-probability of every id not in ``idx``, from scores ``z`` [n, V].

    ``log(1 - sum of the kept probabilities)`` (summed in float64) wherever the kept ids hold at most
    ``_CONFIDENT`` of the mass, so no second pass over V; the rows above it, where that difference would lose
    float32 digits, take the exact ``logsumexp`` over the ids not kept.
    """
    kept = log_q_kept.double().exp().sum(-1)
    tail = torch.log1p(-kept.clamp(max=_CONFIDENT)).float()
    rows = (kept.detach() > _CONFIDENT).nonzero().squeeze(1)
    if len(rows):
        masked = z.index_select(0, rows).scatter(1, idx.index_select(0, rows), float("-inf"))
        exact = torch.logsumexp(masked, dim=-1) - lse.index_select(0, rows).squeeze(1)
        tail = tail.index_put((rows,), exact)
    return tail[:, None]


class TokenLoss:
    """``alpha * T^2 * soft + (1 - alpha) * CE`` per position (see the module docstring).

    Args:
        kind: one of :data:`TOKEN_LOSSES`.
        family: the set's codec family (``dense``, ``topk``, ``sample``).
        alpha: weight of the soft term in [0, 1].
        temperature: a stored temperature T.
        beta: the generalized JSD's weight in (0, 1).
        chunk: positions per chunk of the output layer.
    """

    def __init__(self, kind: str, family: str, alpha: float, temperature: float, beta: float = 0.5,
                 chunk: int = 1024) -> None:
        self.kind, self.family, self.alpha, self.t = kind, family, float(alpha), float(temperature)
        self.beta, self.chunk = float(beta), int(chunk)

    def _chunk_terms(self, logits: Tensor, labels: Tensor, *teacher: Tensor) -> Tensor:
        """[2]: the chunk's summed soft term and summed CE (labels < 0 excluded).

        The sparse codecs touch the student's [n, V] scores once: one ``logsumexp`` (whose backward is the one
        softmax a plain CE also writes) and gathers at the kept ids; the CE reuses that ``logsumexp`` at T = 1,
        and at ``alpha`` 1 it is only reported, so it is computed without a graph.
        """
        s = logits.float()
        labelled = labels >= 0
        safe = torch.where(labelled, labels.long(), torch.zeros_like(labels.long()))[:, None]
        if self.alpha == 0:
            ce = torch.logsumexp(s, dim=-1) - s.gather(1, safe).squeeze(1)
            hard = torch.where(labelled, ce, torch.zeros_like(ce)).sum()
            return torch.stack([hard * 0.0, hard])
        z = s if self.t == 1.0 else s / self.t
        t = dict(zip(_FIELDS[self.family][1], teacher))
        if self.family == "dense":
            log_q = F.log_softmax(z, dim=-1)
            lse = None
            soft = divergence_bins(self.kind, t["log_probs"].float(), log_q, self.beta)
        else:
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            idx = t["index"].long()
            log_q_kept = z.gather(1, idx) - lse
            if self.family == "sample":
                count = t["count"].float()
                soft = -(count * log_q_kept).sum(-1) / count.sum(-1).clamp_min(1.0)
            else:
                log_q_bins = torch.cat([log_q_kept, _log_tail(z, idx, lse, log_q_kept)], dim=1)
                log_p_bins = torch.cat([t["log_probs"].float(), t["tail"].float()[:, None]], dim=1)
                soft = divergence_bins(self.kind, log_p_bins, log_q_bins, self.beta)
        if self.t == 1.0:
            ce = (lse.squeeze(1) - z.gather(1, safe).squeeze(1)) if lse is not None else -log_q.gather(1, safe).squeeze(1)
        elif self.alpha < 1.0:
            ce = torch.logsumexp(s, dim=-1) - s.gather(1, safe).squeeze(1)
        else:  # reported, not trained on
            with torch.no_grad():
                ce = torch.logsumexp(s, dim=-1) - s.gather(1, safe).squeeze(1)
        hard = torch.where(labelled, ce, torch.zeros_like(ce)).sum()
        return torch.stack([soft.sum(), hard])

    def __call__(self, model, inputs: Tensor, teacher: dict[str, Tensor], labels: Tensor, length: Tensor,
                 mask: Tensor | None = None) -> dict[str, Tensor]:
        """The batch's loss: ``inputs`` [B, ...] (ids [B, L], image lines, signals), ``teacher`` the codec's fields [B, L, ...] at T, ``labels``
        [B, L] (-1: no next token), ``length`` [B] real positions, ``mask`` [B] (False: a padding row)."""
        b, n = labels.shape[:2]  # positions: tokens of an id row, frames of an image line or a signal
        dev = inputs.device
        real = torch.arange(n, device=dev)[None, :] < length.to(dev).long()[:, None]
        if mask is not None:
            real &= mask.to(dev, torch.bool)[:, None]
        labels = torch.where(real, labels.to(dev).long(), torch.full_like(labels, -1, dtype=torch.long))
        body = getattr(model, "body", model)
        if hasattr(body, "hidden") and hasattr(body, "head"):
            states, head = body.hidden(inputs), body.head
        else:
            states, head = model(inputs), None
        flat = real.reshape(-1).nonzero().squeeze(1)
        states = states.reshape(b * n, -1).index_select(0, flat)
        lab = labels.reshape(-1).index_select(0, flat)
        names = _FIELDS[self.family][0] if self.alpha > 0 else ()
        fields = [teacher[k].to(dev).reshape((b * n,) + teacher[k].shape[2:]).index_select(0, flat) for k in names]
        # tied to the graph even when the batch has no real position (rows of length 0): a zero gradient, not an error
        sums = states.new_zeros(2, dtype=torch.float32) + states.sum().float() * 0
        for a in range(0, len(flat), self.chunk):
            part = [f[a:a + self.chunk] for f in fields]
            if head is None:
                sums = sums + self._chunk_terms(states[a:a + self.chunk], lab[a:a + self.chunk], *part)
            else:
                sums = sums + checkpoint(self._head_terms, head, states[a:a + self.chunk], lab[a:a + self.chunk],
                                         *part, use_reentrant=False)
        n_real = max(int(len(flat)), 1)
        n_lab = max(int((lab >= 0).sum()), 1)
        soft, hard = sums[0] / n_real, sums[1] / n_lab
        loss = self.alpha * self.t * self.t * soft + (1.0 - self.alpha) * hard
        return {"loss": loss, "soft": soft.detach(), "hard": hard.detach(), "positions": n_real}

    def _head_terms(self, head, h: Tensor, labels: Tensor, *teacher: Tensor) -> Tensor:
        return self._chunk_terms(head(h), labels, *teacher)


class TokenTargets:
    """The loop's teacher input for a per-position set: the codec's fields at the chosen stored temperature."""

    generator = None

    def __init__(self, family: str, temperature: float, alpha: float) -> None:
        self.names, self.keys = _FIELDS[family] if alpha > 0 else ((), ())
        self.fields = ("inputs", *self.names, "labels", "length")
        self.temperature = temperature if self.names else None

    def __call__(self, batch: dict) -> dict[str, Tensor]:
        return {name: batch[name] for name in self.names}


def token_training(o, manifest: dict) -> tuple[TokenLoss, TokenTargets]:
    """``(loss, targets)`` for a per-position set trained with the options ``o`` (``TrainOptions``).

    Raises:
        TransferSetError: for a loss the codec cannot honour, a temperature that was not stored, another
            combination rule or teacher noise (the set keeps the combined targets only at stored temperatures).
    """
    family, _ = parse_codec(manifest.get("codec", "dense"))
    codec = manifest.get("codec", "dense")
    if o.loss not in TOKEN_LOSSES:
        raise TransferSetError(f"{o.loss!r}: per-position sets train with {', '.join(TOKEN_LOSSES)}", option="loss")
    if not (0.0 <= o.alpha <= 1.0):
        raise TransferSetError(f"must be in [0, 1], got {o.alpha}", option="alpha")
    if family == "sample" and o.loss != "kd" and o.alpha > 0:
        raise TransferSetError(f"{o.loss!r} needs the teacher's probability at the ids the student predicts; a "
                               f"{codec} set holds draws from the teacher only: use kd (unbiased over the whole "
                               "vocabulary), or a topk or dense set", option="loss")
    if o.loss == "jsd" and not 0.0 < o.beta < 1.0:
        raise TransferSetError(f"must be in (0, 1) for jsd, got {o.beta}", option="beta")
    if o.combine not in (None, manifest["combine"]) or o.teacher_noise > 0:
        raise TransferSetError("a per-position set keeps the combined targets only; drop combine and "
                               "teacher_noise", option="combine" if o.teacher_noise == 0 else "teacher_noise")
    stored = [float(t) for t in manifest["temperatures"]]
    if o.alpha > 0 and not any(abs(t - float(o.temperature)) <= 1e-9 for t in stored):
        raise TransferSetError(f"{o.temperature:g} is not stored in this set (stored: "
                               f"{', '.join(f'{t:g}' for t in stored)}); pick a stored one", option="temperature")
    return (TokenLoss(o.loss, family, o.alpha, o.temperature, o.beta, o.loss_chunk),
            TokenTargets(family, float(o.temperature), o.alpha))
