"""Codecs: how a shard holds the teachers' view of a row (numpy only, no torch).

``dense`` keeps every member's logits and the combined soft targets at every stored temperature (schema 1).
The sparse codecs (schema 2) keep a few classes per row, for label spaces where dense rows cost too much
(3 members, 5 temperatures and 1,000 classes take 16 KB a row in float16):

- ``topk:K`` keeps the K classes of the combined distribution at the *lowest* stored temperature, and for them,
  exactly: the combined log-probabilities at every stored temperature, each member's logits, and per row the log
  of the tail mass (every class not kept) at every temperature; per member its log-partition
  ``log sum_c exp(z_c / T)`` at every temperature. So each member's log-probability of a kept class at a stored
  temperature is ``z_k / T - logZ_T``, exactly. What is dropped: the logits and probabilities of the other
  C - K classes (only their total survives), and with them any temperature that was not stored.
  The classes are chosen at the lowest stored temperature because that is where the distribution is most
  concentrated, so the K classes carry the most mass where the tail bin would otherwise be coarsest; for
  ``mean-logits`` and ``geometric`` the order is the same at every temperature, for ``mean-probs`` nearly so,
  and the tail bin keeps every temperature exact whichever K are kept.
- ``sample:K`` keeps, at every stored temperature, K draws with replacement from the combined distribution,
  stored as (class, count): the random-sampling estimator of Anshumann et al. (ACL 2025, "Sparse Logit Sampling:
  Accelerating Knowledge Distillation in LLMs") with the teacher itself as the proposal, so ``count / K`` is an
  unbiased estimate of the teacher's probabilities. The draws are seeded by the global row (a counter-based hash,
  splitmix64), so a resumed or recoded run draws the same classes.
- ``systematic:K`` stores exactly what ``sample:K`` stores and trains with the same estimator, but its K points
  are one seeded uniform offset plus K evenly spaced steps through the cumulative distribution (systematic
  sampling): still unbiased, each class's count is floor(K p) or ceil(K p), so the target's variance is far lower
  for the same bytes. On the 1,000-class task of docs/RESULTS.md it halves the accuracy cost of sample:50 at T = 4.

:data:`CODECS` maps a family to its encoder (a plain dict); :func:`encode` is what the writer calls.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..targets import logsumexp
from .schema import (SHARD_FIELDS, count_dtype, index_dtype, is_systematic, parse_codec, temperature_axis,
                     temperature_fields)

__all__ = ["CODECS", "SPARSE_FIELDS", "DENSE_BELOW_CLASSES", "SPARSE_DEFAULT", "resolve_codec", "encode", "divergence", "read_field", "sample_uniforms", "logsumexp"]

#: the fields only sparse codecs hold (a reader hands them on through :func:`read_field`)
SPARSE_FIELDS = tuple(f.name for f in SHARD_FIELDS if f.codecs is not None and "dense" not in f.codecs)
_SALT = np.uint64(0x5EED_C0DE_C0DEC)
_FIXED = 52  # bits of the fixed-point cumulative distribution the draws search (classes below 2^-52 are never drawn)
_PAIRS = 2048  # (row, temperature) pairs searched at once: 2048 << 52 still fits an uint64 key


#: ``label`` writes dense below this many classes unless told otherwise, and :data:`SPARSE_DEFAULT` from it on.
#: Below it a dense row (3 members, 5 temperatures) is under 16 KB, about an image's own size, and keeps every
#: option open (any temperature, recombination, logit matching); from it on the targets outweigh the inputs and
#: grow with every class (ImageNet-1k at 10 views: about 200 GB), while top-k loses little (docs/RESULTS.md).
DENSE_BELOW_CLASSES = 1000
SPARSE_DEFAULT = "topk:20"


def resolve_codec(option: str | None, num_classes: int) -> str:
    """The codec a set is written with: ``option`` when given, else dense below :data:`DENSE_BELOW_CLASSES`."""
    if option is None:
        return "dense" if num_classes < DENSE_BELOW_CLASSES else SPARSE_DEFAULT
    family, k = parse_codec(option)
    if family == "topk" and k >= num_classes:
        from ..errors import TransferSetError  # noqa: PLC0415

        raise TransferSetError(f"{option} keeps {k} classes but the ensemble has {num_classes}; use dense, or a "
                               "K below the number of classes", option="codec")
    return option


def _lowest(temperatures: Sequence[float]) -> int:
    return int(np.argmin(np.asarray(temperatures, dtype=np.float64)))


def top_classes(log_probs: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest classes of each row of ``log_probs`` [N, C], by falling value, ties by lower class."""
    part = np.argpartition(-log_probs, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(log_probs, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _encode_dense(logits, log_probs, rows, temperatures, k, fdtype, log_partition=None) -> dict[str, np.ndarray]:
    return {"logits": logits.astype(fdtype), "soft_targets": log_probs.astype(fdtype)}


def _encode_topk(logits, log_probs, rows, temperatures, k, fdtype, log_partition=None) -> dict[str, np.ndarray]:
    n, t_count, c = log_probs.shape
    idx = top_classes(log_probs[:, _lowest(temperatures)], k)
    kept = np.take_along_axis(log_probs, idx[:, None, :], axis=2)
    tail = np.empty((n, t_count))
    for j in range(t_count):  # one [N, C] copy at a time: the writer already holds [N, T, C]
        rest = log_probs[:, j].copy()
        np.put_along_axis(rest, idx, -np.inf, axis=1)
        tail[:, j] = logsumexp(rest, axis=1)
    z = np.asarray(logits, dtype=np.float64)
    log_z = log_partition if log_partition is not None else \
        np.stack([logsumexp(z / float(t), axis=2) for t in temperatures], axis=2)  # [N, M, T]
    return {"topk_index": idx.astype(index_dtype(c)), "topk_log_probs": kept.astype(fdtype),
            "tail_log_mass": tail.astype(fdtype), "topk_logits": np.take_along_axis(z, idx[:, None, :], 2).astype(fdtype),
            "member_log_partition": log_z.astype(fdtype)}


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(rows: np.ndarray, temperatures: int, k: int) -> np.ndarray:
    """Integers uniform in [0, 2^52), [N, T, K]: a hash of (global row, temperature, draw), nothing else."""
    r = np.asarray(rows, dtype=np.uint64)[:, None, None]
    t = np.arange(temperatures, dtype=np.uint64)[None, :, None]
    d = np.arange(k, dtype=np.uint64)[None, None, :]
    key = (r * np.uint64(temperatures) + t) * np.uint64(k) + d
    return _splitmix64(key ^ _SALT) >> np.uint64(64 - _FIXED)


def systematic_points(rows: np.ndarray, temperatures: int, k: int) -> np.ndarray:
    """Integers in [0, 2^52), [N, T, K]: one uniform offset ``u`` in [0, 2^52 / K) per (row, temperature), hashed
    as :func:`sample_uniforms` hashes its first draw, then ``u + floor(j 2^52 / K)`` for j = 0 .. K-1.

    Systematic sampling: each point is still uniform on [0, 1), so a class's expected count is K p, but the points
    cover the distribution evenly, so a class's count is floor(K p) or ceil(K p): far less variance than K
    independent draws for the same bytes.
    """
    off = sample_uniforms(rows, temperatures, 1) // np.uint64(k)
    step = (np.arange(k, dtype=np.uint64) * np.uint64(1 << _FIXED)) // np.uint64(k)
    return off + step[None, None, :]


def _draw(log_probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Classes [P, K] drawn by inverse CDF from ``log_probs`` [P, C] with integer ``uniforms`` [P, K].

    The cumulative distribution is held in 52-bit fixed point and each (row, temperature) pair is offset by
    ``pair << 52``, so one exact integer ``searchsorted`` serves every pair; a class of probability 0 is never
    drawn.
    """
    p = np.exp(log_probs - log_probs.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    fixed = np.floor(cdf / cdf[:, -1:] * float(1 << _FIXED)).astype(np.uint64)
    fixed[:, -1] = np.uint64(1 << _FIXED)
    off = (np.arange(len(p), dtype=np.uint64) << np.uint64(_FIXED))[:, None]
    pos = np.searchsorted((fixed + off).ravel(), (uniforms + off).ravel(), side="right")
    return (pos.reshape(uniforms.shape) - np.arange(len(p))[:, None] * p.shape[1]).astype(np.int64)


def _counted(draws: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws [P, K] as (distinct classes ascending, then 0; their counts, then 0), each [P, K]."""
    s = np.sort(draws, axis=1)
    first = np.ones_like(s, dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = np.cumsum(first, axis=1) - 1
    index = np.zeros_like(s)
    np.put_along_axis(index, slot, s, axis=1)
    base = np.arange(len(s))[:, None] * k
    counts = np.bincount((base + slot).ravel(), minlength=len(s) * k).reshape(len(s), k)
    return index, counts


def _encode_sample(logits, log_probs, rows, temperatures, k, fdtype, log_partition=None,
                   systematic: bool = False) -> dict[str, np.ndarray]:
    n, t_count, c = log_probs.shape
    flat = log_probs.reshape(n * t_count, c)
    u = (systematic_points if systematic else sample_uniforms)(rows, t_count, k).reshape(n * t_count, k)
    index, counts = np.empty((n * t_count, k), np.int64), np.empty((n * t_count, k), np.int64)
    for a in range(0, n * t_count, _PAIRS):
        index[a:a + _PAIRS], counts[a:a + _PAIRS] = _counted(_draw(flat[a:a + _PAIRS], u[a:a + _PAIRS]), k)
    return {"sample_index": index.reshape(n, t_count, k).astype(index_dtype(c)),
            "sample_count": counts.reshape(n, t_count, k).astype(count_dtype(k))}


#: codec family -> encoder ``(logits [N,M,C], log_probs [N,T,C] float64, rows [N], temperatures, K, float dtype)``
CODECS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "dense": _encode_dense, "topk": _encode_topk, "sample": _encode_sample,
}


def encode(codec: str, logits: np.ndarray, log_probs: np.ndarray, rows: np.ndarray, temperatures: Sequence[float],
           fdtype, log_partition: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The codec's shard fields for a block of rows.

    Args:
        codec: ``dense``, ``topk:K`` or ``sample:K``.
        logits: each member's logits [N, M, C].
        log_probs: the combined soft targets (natural log) [N, T, C], float64, as :func:`transferset.targets.soft_targets`.
        rows: each row's global row number in the set (seeds ``sample``).
        temperatures: the stored temperatures, in the order of ``log_probs``.
        fdtype: the manifest's float dtype.
        log_partition: each member's ``log sum_c exp(z_c / T)`` [N, M, T] when already computed (``soft_targets``
            gives it from the same pass); computed here otherwise.
    """
    family, k = parse_codec(codec)
    extra = {"systematic": True} if is_systematic(codec) else {}
    return CODECS[family](logits, log_probs, rows, [float(t) for t in temperatures], k, np.dtype(fdtype),
                          log_partition, **extra)


def divergence(codec: str, dense_log_probs: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
    """Per row and temperature [N, T], how far the codec's fields are from the dense soft targets.

    ``topk``: KL(dense || decoded), where decoded keeps the stored K log-probabilities and spreads the tail mass
    evenly over the C - K other classes (the most even completion the stored numbers allow).
    ``sample``: KL(dense || count/K) is infinite whenever a class with mass was not drawn, so this returns the
    reverse, KL(count/K || dense), which is finite; callers must say which direction they print.
    """
    lp = np.asarray(dense_log_probs, dtype=np.float64)
    lp = lp - logsumexp(lp, axis=2)[..., None]
    family, k = parse_codec(codec)
    if family == "dense":
        return np.zeros(lp.shape[:2])
    if family == "topk":
        c = lp.shape[2]
        dec = np.repeat((fields["tail_log_mass"].astype(np.float64) - np.log(c - k))[..., None], c, axis=2)
        idx = np.broadcast_to(fields["topk_index"].astype(np.int64)[:, None, :], fields["topk_log_probs"].shape)
        np.put_along_axis(dec, idx, fields["topk_log_probs"].astype(np.float64), axis=2)
        p = np.exp(lp)
        with np.errstate(invalid="ignore"):
            return np.where(p > 0, p * (lp - dec), 0.0).sum(axis=2)
    q = fields["sample_count"].astype(np.float64) / k
    lp_at = np.take_along_axis(lp, fields["sample_index"].astype(np.int64), axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(q > 0, q * (np.log(q) - lp_at), 0.0).sum(axis=2)


def read_field(name: str, values: np.ndarray, temperature_index: int | None,
               positions: int | None = None) -> np.ndarray:
    """A block of a shard field [N, ...] as a reader hands it on: one temperature if asked, torch-ready dtypes.

    Class indices become int64 (for gathers), counts and floats float32. In a per-position set (``positions``)
    the temperatures are the axis after the positions.
    """
    if temperature_index is not None and name in temperature_fields():
        values = np.take(values, temperature_index, axis=temperature_axis(positions))
    if name.endswith("_index"):
        return np.ascontiguousarray(values, dtype=np.int64)
    return np.ascontiguousarray(values, dtype=np.float32)
