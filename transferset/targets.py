"""Temperature, ensemble-combination and output-kind maths, shared by both stages.

All functions are numpy-only (no torch) and work on float32/float64 arrays whose last axis is classes.
Soft targets are stored as natural-log probabilities so that tiny probabilities survive fp16.

:func:`soft_targets` computes in float64 by default (the reference that evaluation, reports and tests use) or in
float32 (``dtype=np.float32``: what ``label`` writes since schema 4, at about three times the speed: numpy's
float32 exp is twice as fast and every array half the bytes). Both follow the same steps; each keeps every
finite log-probability (rows with a combined probability below the dtype's safe floor are computed again in the
log domain).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import TransferSetError

__all__ = [
    "COMBINE_RULES",
    "PROB_CLAMP",
    "log_softmax",
    "logsumexp",
    "combine_log_probs",
    "soft_targets",
    "looks_like_probabilities",
    "probabilities_to_logits",
    "entropy_from_log_probs",
    "normalise_weights",
]

COMBINE_RULES = ("mean-probs", "mean-logits", "geometric")

#: Probabilities are clamped to this before the log, so a member's exact 0 becomes a finite (very negative) logit.
PROB_CLAMP = 1e-30


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable ``log softmax(z)`` along ``axis``."""
    z = np.asarray(z)
    m = np.max(z, axis=axis, keepdims=True)
    shifted = z - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def normalise_weights(weights: Sequence[float] | None, members: int) -> np.ndarray:
    """Member weights as a float64 vector summing to 1 (uniform when ``weights`` is None)."""
    if weights is None:
        return np.full(members, 1.0 / members)
    w = np.asarray(list(weights), dtype=np.float64)
    if w.shape != (members,):
        raise TransferSetError(f"has {w.size} values but the ensemble has {members} members; give one weight per member",
                               option="weights")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise TransferSetError("must be finite, non-negative and not all zero", option="weights")
    return w / w.sum()


def combine_log_probs(logits: np.ndarray, temperature: float, rule: str = "mean-probs",
                      weights: np.ndarray | None = None, dtype=np.float64) -> np.ndarray:
    """Log-probabilities of the combined ensemble at one temperature.

    ``logits`` has shape [N, M, C] (M members). With weights ``w`` (summing to 1):

    - ``mean-probs``: ``log sum_m w_m softmax(z_m / T)`` (arithmetic mean of the members' soft targets,
      as Hinton et al. 2015 suggest for ensembles);
    - ``mean-logits``: ``log softmax(sum_m w_m z_m / T)``;
    - ``geometric``: ``log normalise(prod_m softmax(z_m / T) ** w_m)``. Because each member's log-softmax
      differs from ``z_m / T`` by a per-row constant, this equals ``mean-logits`` exactly; it is kept as a
      name users look for, and computed from the log-probabilities independently.
    """
    z, w = _checked(logits, [temperature], weights, dtype)
    if rule == "mean-probs":
        return _mean_probs(z, temperature, w)
    scaled = z / z.dtype.type(temperature)
    if rule == "mean-logits":
        return log_softmax(np.einsum("nmc,m->nc", scaled, w), axis=-1)
    if rule == "geometric":
        return log_softmax(np.einsum("nmc,m->nc", log_softmax(scaled, axis=-1), w), axis=-1)
    raise TransferSetError(f"unknown combination rule {rule!r}; choose one of {', '.join(COMBINE_RULES)}")


def _checked(logits: np.ndarray, temperatures: Sequence[float], weights: np.ndarray | None,
             dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, M, C] and member weights in ``dtype``, after checking the temperatures and the shape."""
    for t in temperatures:
        if t <= 0 or not np.isfinite(t):
            raise TransferSetError(f"temperature must be a positive number, got {t}")
    z = np.asarray(logits, dtype=dtype)
    if z.ndim != 3:
        raise ValueError(f"logits must be [N, M, C], got shape {z.shape}")
    w = normalise_weights(None, z.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    return z, w.astype(dtype)


#: Below this a combined probability is computed again in the log domain: float64 exp underflows near 1e-308,
#: float32 near 1e-38 (subnormals from 1.2e-38 lose digits), so each keeps a margin of about 8 decades or more.
_TINY = {np.dtype(np.float64): 1e-280, np.dtype(np.float32): 1e-30}


def _shift(z: np.ndarray) -> np.ndarray:
    """``z`` less each member's largest value: softmax at any temperature is unchanged and exp cannot overflow."""
    return z - np.max(z, axis=-1, keepdims=True)


def _mean_probs(z: np.ndarray, temperature: float, w: np.ndarray, shifted: np.ndarray | None = None,
                log_sums: np.ndarray | None = None, entropy: np.ndarray | None = None,
                work: np.ndarray | None = None) -> np.ndarray:
    """``log sum_m w_m softmax(z_m / T)`` for ``z`` [N, M, C] in its own dtype (``shifted``: ``_shift(z)`` if
    known).

    ``log_sums`` [N, M], when given, receives each member's ``log sum_c exp(shifted / T)`` (its log-partition at
    T less ``max / T``), a by-product the top-k codec stores; ``entropy`` [N], when given, receives each row's
    ``-sum_c p log p`` from the same pass. ``work``, an array like ``z``, is used for the exponentials (a fresh
    array of that size per temperature costs page faults as large as the maths).

    Computed in probability space (one exp per value: this runs on every labelled row, beside ONNX Runtime);
    rows where a combined probability falls below ``_TINY``, whose exp may have underflowed, are computed again
    in the log domain, so every finite log-probability survives.
    """
    e = np.multiply(_shift(z) if shifted is None else shifted, z.dtype.type(1.0 / temperature), out=work)
    np.exp(e, out=e)
    # einsum: numpy's sum over a short last axis is several times slower
    sums = np.einsum("nmc->nm", e)
    if log_sums is not None:
        log_sums[...] = np.log(sums)  # >= 1: the largest value contributes exp(0)
    p = np.einsum("nmc,nm->nc", e, w[None, :] / sums)
    p /= np.einsum("nc->n", p)[:, None]  # sums to 1 up to rounding; make it exact before the log
    tiny = np.min(p, axis=-1) < _TINY[z.dtype]
    with np.errstate(divide="ignore"):
        out = np.log(p)
    if entropy is not None:  # p > 0 but in rows computed again below
        with np.errstate(invalid="ignore"):
            entropy[...] = -np.einsum("nc,nc->n", p, out)
    if tiny.any():
        out[tiny] = _mean_probs_log_domain(z[tiny], temperature, w)
        if entropy is not None:
            entropy[tiny] = entropy_from_log_probs(out[tiny])
    return out


def _mean_probs_log_domain(z: np.ndarray, temperature: float, w: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):  # a member of weight 0 contributes log 0 = -inf: exp(-inf) = 0
        lp = log_softmax(z * z.dtype.type(1.0 / temperature), axis=-1) + np.log(w)[None, :, None]
    m = np.max(lp, axis=1, keepdims=True)
    out = (m + np.log(np.sum(np.exp(lp - m), axis=1, keepdims=True)))[:, 0, :]
    # renormalise against rounding
    return out - np.log(np.sum(np.exp(out), axis=-1, keepdims=True))


def soft_targets(logits: np.ndarray, temperatures: Sequence[float], rule: str = "mean-probs",
                 weights: np.ndarray | None = None, log_partition: np.ndarray | None = None, *,
                 dtype=np.float64, entropy: np.ndarray | None = None) -> np.ndarray:
    """Stack of combined log-probabilities, shape [N, len(temperatures), C], in ``dtype`` (float64 or float32).

    ``log_partition`` [N, M, T], when given, receives each member's ``log sum_c exp(z_c / T)`` at every
    temperature, and ``entropy`` [N, T] each row's ``-sum_c p log p`` (with ``mean-probs`` both from the same
    pass; other rules compute them apart).
    """
    dtype = np.dtype(dtype)
    if rule != "mean-probs":
        z = np.asarray(logits, dtype=dtype)
        if log_partition is not None:
            for j, t in enumerate(temperatures):
                log_partition[:, :, j] = logsumexp(z * dtype.type(1.0 / float(t)))
        out = np.stack([combine_log_probs(z, t, rule, weights, dtype) for t in temperatures], axis=1)
        if entropy is not None:
            entropy[...] = entropy_from_log_probs(out)
        return out
    z, w = _checked(logits, temperatures, weights, dtype)
    out = np.empty((z.shape[0], len(temperatures), z.shape[2]), dtype)
    step = _block_rows(z)
    for a in range(0, len(z), step):
        b = min(a + step, len(z))
        _mean_probs_block(z[a:b], temperatures, w, out[a:b], None if log_partition is None else log_partition[a:b],
                          None if entropy is None else entropy[a:b])
    return out


#: Bytes of one member-logits block that ``soft_targets`` works on at a time: its exponentials and sums then stay
#: in the CPU's cache. Every row's values are computed alone, so the result does not depend on the block size.
_BLOCK_BYTES = 1 << 20


def cache_rows(row_bytes: int) -> int:
    """Rows of ``row_bytes`` each that one cache-sized block of work holds (at least 16)."""
    return max(16, _BLOCK_BYTES // max(1, int(row_bytes)))


def _block_rows(z: np.ndarray) -> int:
    return int(min(cache_rows(z[0].size * z.itemsize if len(z) else 1), max(1, len(z))))


def _mean_probs_block(z: np.ndarray, temperatures: Sequence[float], w: np.ndarray, out: np.ndarray,
                      log_partition: np.ndarray | None, entropy: np.ndarray | None) -> None:
    """``soft_targets`` with ``mean-probs`` for a block of rows, into ``out`` and the optional outputs."""
    top = np.max(z, axis=-1, keepdims=True)
    shifted = z - top  # once for every temperature (as _shift)
    sums = None if log_partition is None else np.empty(z.shape[:2], z.dtype)
    ent = None if entropy is None else np.empty(z.shape[0], z.dtype)
    work = np.empty_like(z)
    for j, t in enumerate(temperatures):
        out[:, j] = _mean_probs(z, t, w, shifted, sums, ent, work)
        if sums is not None:
            log_partition[:, :, j] = sums + top[:, :, 0] * z.dtype.type(1.0 / float(t))
        if ent is not None:
            entropy[:, j] = ent


def logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log sum exp`` along ``axis``, -inf where every value is -inf (float64)."""
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m, axis=axis)


def looks_like_probabilities(outputs: np.ndarray, atol: float = 1e-3) -> bool:
    """True when every row is non-negative and sums to 1 (a softmax, with or without a Softmax node)."""
    x = np.asarray(outputs, dtype=np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)):
        return False
    return bool(np.all(x >= 0) and np.allclose(x.sum(axis=-1), 1.0, atol=atol))


def probabilities_to_logits(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities, clamped at ``PROB_CLAMP``: logits up to a per-row constant that softmax ignores."""
    return np.log(np.maximum(np.asarray(probs, dtype=np.float32), np.float32(PROB_CLAMP)))


def entropy_from_log_probs(log_probs: np.ndarray) -> np.ndarray:
    """Per-row entropy in nats, ``-sum p log p``, from log-probabilities [..., C]."""
    lp = np.asarray(log_probs)
    lp = lp if lp.dtype == np.float32 else lp.astype(np.float64)
    return -np.sum(np.exp(lp) * np.where(np.isneginf(lp), 0, lp), axis=-1)  # 0 log 0 = 0
