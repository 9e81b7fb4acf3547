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

:data:`CODECS` maps a codec's name to its class (a plain dict); :func:`codec_for` turns a manifest's ``codec``
string into the object. Each object carries what every consumer asks of a codec: its shard fields (from
``SHARD_FIELDS``), its encoder, the fields a loss reads as its targets, its export columns and its card text.
Adding a codec is one class here (its fields in ``schema.SHARD_FIELDS``, its name in ``schema.CODEC_FAMILIES``)
and, if no loss reads its fields yet, one loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from typing import ClassVar, Sequence

import numpy as np

from ..targets import cache_rows, logsumexp
from ..errors import TransferSetError
from .schema import SHARD_FIELDS, count_dtype, index_dtype, parse_codec, temperature_axis, temperature_fields

__all__ = ["Codec", "Dense", "TopK", "Sample", "Systematic", "CODECS", "codec_for", "SPARSE_FIELDS",
           "DENSE_BELOW_CLASSES", "SPARSE_DEFAULT", "resolve_codec", "encode", "divergence", "read_field",
           "sample_uniforms", "logsumexp"]

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
        raise TransferSetError(f"{option} keeps {k} classes but the ensemble has {num_classes}; use dense, or a "
                               "K below the number of classes", option="codec")
    return option


def _lowest(temperatures: Sequence[float]) -> int:
    return int(np.argmin(np.asarray(temperatures, dtype=np.float64)))


def top_classes(log_probs: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest classes of each row of ``log_probs`` [N, C], by falling value, ties by lower class (at
    the k-th place too, as ONNX's TopK and a stable sort choose)."""
    part = np.argpartition(-log_probs, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(log_probs, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    top = np.take_along_axis(part, order, axis=1)
    # argpartition picks freely among values tied with the k-th: rows where such a tie reaches past the k kept
    # (more classes hold the k-th value than were kept) take their classes again from a stable sort
    kth = np.take_along_axis(vals, order[:, -1:], axis=1)
    tied = np.count_nonzero(log_probs == kth, axis=1) > np.count_nonzero(vals == kth, axis=1)
    if tied.any():
        top[tied] = np.argsort(-log_probs[tied], axis=1, kind="stable")[:, :k]
    return top


def _along_last(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[n, x, idx[n]]`` for ``a`` [N, X, C] and ``idx`` [N, K]: [N, X, K], the values of
    ``np.take_along_axis(a, idx[:, None, :], 2)`` by one flat ``take`` (a third of its time at 1,000 classes)."""
    n, x, c = a.shape
    flat = (np.arange(n * x, dtype=np.intp) * c).reshape(n, x, 1) + idx[:, None, :]
    return np.ascontiguousarray(a).reshape(-1).take(flat)


def _encode_topk(logits, log_probs, rows, temperatures, k, fdtype, log_partition=None) -> dict[str, np.ndarray]:
    n, t_count, c = log_probs.shape
    idx = top_classes(log_probs[:, _lowest(temperatures)], k)
    kept = _along_last(log_probs, idx)
    if log_partition is None:
        z = np.asarray(logits, dtype=np.float64)
        log_partition = np.stack([logsumexp(z / float(t), axis=2) for t in temperatures], axis=2)  # [N, M, T]
    # the kept logits: float32 logits taken as they are (going through float64 would give the same values)
    zk = _along_last(np.asarray(logits), idx)
    return {"topk_index": idx.astype(index_dtype(c)), "topk_log_probs": kept.astype(fdtype),
            "tail_log_mass": _tail_log_mass(log_probs, idx).astype(fdtype),
            "topk_logits": zk.astype(fdtype) if zk.dtype.kind == "f" else zk.astype(np.float64).astype(fdtype),
            "member_log_partition": log_partition.astype(fdtype)}


def _tail_log_mass(log_probs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``log sum`` of each row's classes outside ``idx`` at every temperature [N, T] (float64 out), every
    temperature of a block of rows at once, in blocks that stay in the CPU's cache; each row and temperature is
    summed alone along its classes (the same order whatever the block), so the block size changes no value."""
    n, t_count, c = log_probs.shape
    tail = np.empty((n, t_count))
    step = cache_rows(t_count * c * log_probs.itemsize)
    for a in range(0, n, step):
        rest = log_probs[a:a + step].copy()
        rows = len(rest)
        rest.reshape(-1)[(np.arange(rows * t_count, dtype=np.intp) * c).reshape(rows, t_count, 1)
                         + idx[a:a + step, None, :]] = -np.inf
        tail[a:a + step] = logsumexp(rest, axis=2)
    return tail


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
    log_probs = np.asarray(log_probs, dtype=np.float64)  # the 52-bit cumulative sums want float64 whatever came in
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


def _encode_sample(log_probs: np.ndarray, points: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """``sample_index`` and ``sample_count`` [N, T, K] from ``log_probs`` [N, T, C] and integer ``points``
    [N, T, K] (:func:`sample_uniforms` or :func:`systematic_points`)."""
    n, t_count, c = log_probs.shape
    flat = log_probs.reshape(n * t_count, c)
    u = points.reshape(n * t_count, k)
    index, counts = np.empty((n * t_count, k), np.int64), np.empty((n * t_count, k), np.int64)
    for a in range(0, n * t_count, _PAIRS):
        index[a:a + _PAIRS], counts[a:a + _PAIRS] = _counted(_draw(flat[a:a + _PAIRS], u[a:a + _PAIRS]), k)
    return {"sample_index": index.reshape(n, t_count, k).astype(index_dtype(c)),
            "sample_count": counts.reshape(n, t_count, k).astype(count_dtype(k))}


# -- the codecs as objects ------------------------------------------------------------------------------------
class Codec(ABC):
    """One way a shard holds the teachers' view of a row; :func:`codec_for` builds one from a manifest's string.

    A subclass sets ``name`` (the family in the ``codec`` string), ``stored_as`` (the tag of its fields in
    ``schema.SHARD_FIELDS``), ``targets`` (shard field -> the name a loss reads it under), ``members`` (the
    per-member fields, exported with ``--logits``) and ``loss`` (the loss family that trains from ``targets``;
    None: the dense path), and defines :meth:`encode_block`, :meth:`export_columns` and :meth:`card_text`.
    """

    name: ClassVar[str]
    stored_as: ClassVar[str]
    targets: ClassVar[dict[str, str]]
    members: ClassVar[tuple[str, ...]] = ()
    loss: ClassVar[str | None] = None
    #: what :meth:`divergence` measures (callers print it)
    divergence_direction: ClassVar[str] = "none"
    #: the Parquet metadata's description of the target columns and of the member columns
    export_doc: ClassVar[str] = ""
    member_doc: ClassVar[str] = ""

    def __init__(self, spec: str, k: int | None) -> None:
        self.spec, self.k = spec, k

    def __repr__(self) -> str:
        return f"codec {self.spec}"

    @property
    def fields(self) -> tuple[str, ...]:
        """The shard fields only this codec's sets hold, in declaration order (``schema.SHARD_FIELDS``)."""
        return tuple(f.name for f in SHARD_FIELDS if f.codecs is not None and self.stored_as in f.codecs)

    @property
    def sparse(self) -> bool:
        return self.loss is not None

    def encode(self, logits: np.ndarray, log_probs: np.ndarray, rows: np.ndarray, temperatures: Sequence[float],
               fdtype, log_partition: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """This codec's shard fields for a block of rows (see :func:`encode` for the arguments)."""
        return self.encode_block(logits, log_probs, rows, [float(t) for t in temperatures], np.dtype(fdtype),
                                 log_partition)

    @abstractmethod
    def encode_block(self, logits, log_probs, rows, temperatures, fdtype, log_partition) -> dict[str, np.ndarray]:
        """:meth:`encode` with its arguments normalised."""

    @property
    def wants_log_partition(self) -> bool:
        """Whether :meth:`encode` uses each member's log-partition (the writer then has the soft targets' pass
        compute it)."""
        return "member_log_partition" in self.fields

    def divergence(self, dense_log_probs: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        """Per row and temperature [N, T], how far the fields are from the dense soft targets (0 for dense)."""
        return np.zeros(np.shape(dense_log_probs)[:2])

    @abstractmethod
    def export_columns(self, block: dict[str, np.ndarray], temps: Sequence[tuple[int, str]],
                       logits: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The export's target columns of one block, and the member columns that go last, as numpy arrays:
        [N] a scalar column, [N, K] a list column, [N, A, B] a list of lists. ``temps``: ``(stored index,
        "T<t>")`` per exported temperature."""

    @abstractmethod
    def card_text(self) -> str:
        """What the card says the set keeps."""

    @abstractmethod
    def top1(self, s: dict[str, np.ndarray], j: int) -> tuple[np.ndarray, np.ndarray, str]:
        """``(confidence, predicted class, note)`` of each row of ``s`` at stored temperature ``j``."""

    def kept(self, s: dict[str, np.ndarray]) -> tuple[np.ndarray, str, str, str, str] | None:
        """What a sparse codec kept per row and stored temperature [N, T], for the report: ``(values, what,
        short name, png name, what good looks like)``; None for dense."""
        return None


class Dense(Codec):
    """Every member's logits and the combined soft targets at every stored temperature (schema 1)."""

    name = stored_as = "dense"
    targets = {"soft_targets": "log_probs"}
    members = ("logits",)
    export_doc = ("soft_targets_T<t>: probabilities over all classes (exp of the set's stored natural-log soft "
                  "targets), float32")
    member_doc = "logits: members x classes, float32 (from the stored dtype)"

    def encode_block(self, logits, log_probs, rows, temperatures, fdtype, log_partition):
        return {"logits": logits.astype(fdtype, copy=False), "soft_targets": log_probs.astype(fdtype, copy=False)}

    def export_columns(self, block, temps, logits):
        cols = {f"soft_targets_{t}": np.exp(block["soft_targets"][:, j].astype(np.float32)) for j, t in temps}
        return cols, ({"logits": block["logits"].astype(np.float32)} if logits else {})

    def card_text(self) -> str:
        return "every member's raw logits are stored too."

    def top1(self, s, j):
        lp = s["soft_targets"][:, j].astype(np.float64)
        return np.exp(lp.max(-1)), lp.argmax(-1), ""


class TopK(Codec):
    """The K classes of the combined distribution at the lowest stored temperature, exactly (module docstring)."""

    name = stored_as = loss = "topk"
    targets = {"topk_index": "index", "topk_log_probs": "log_probs", "tail_log_mass": "tail"}
    members = ("topk_logits", "member_log_partition")
    divergence_direction = "KL(dense || decoded)"
    export_doc = ("topk_index: the K kept classes (int32); topk_probs_T<t>: their probabilities (exp of the stored "
                  "log-probabilities), float32; tail_mass_T<t>: the combined probability of every other class")
    member_doc = ("topk_logits: members x K, each member's logits at the kept classes; member_log_partition: "
                  "members x stored temperatures, log sum_c exp(z_c / T) over all classes; float32")

    def encode_block(self, logits, log_probs, rows, temperatures, fdtype, log_partition):
        return _encode_topk(logits, log_probs, rows, temperatures, self.k, fdtype, log_partition)

    def divergence(self, dense_log_probs, fields):
        """KL(dense || decoded), where decoded keeps the stored K log-probabilities and spreads the tail mass
        evenly over the C - K other classes (the most even completion the stored numbers allow)."""
        lp = _normalised(dense_log_probs)
        c = lp.shape[2]
        dec = np.repeat((fields["tail_log_mass"].astype(np.float64) - np.log(c - self.k))[..., None], c, axis=2)
        idx = np.broadcast_to(fields["topk_index"].astype(np.int64)[:, None, :], fields["topk_log_probs"].shape)
        np.put_along_axis(dec, idx, fields["topk_log_probs"].astype(np.float64), axis=2)
        p = np.exp(lp)
        with np.errstate(invalid="ignore"):
            return np.where(p > 0, p * (lp - dec), 0.0).sum(axis=2)

    def export_columns(self, block, temps, logits):
        cols = {"topk_index": block["topk_index"].astype(np.int32)}
        for j, t in temps:
            cols[f"topk_probs_{t}"] = np.exp(block["topk_log_probs"][:, j].astype(np.float32))
            cols[f"tail_mass_{t}"] = np.exp(block["tail_log_mass"][:, j].astype(np.float32))
        last = {n: block[n].astype(np.float32) for n in self.members} if logits else {}
        return cols, last

    def card_text(self) -> str:
        return (f"codec `{self.spec}`: only the top classes per row, with their exact log-probabilities and "
                "members' logits, the log tail mass and each member's log-partition (docs/FORMAT.md).")

    def top1(self, s, j):
        lp = s["topk_log_probs"][:, j].astype(np.float64)  # exact: the kept classes hold the top one
        best = lp.argmax(-1)
        return np.exp(lp.max(-1)), s["topk_index"][np.arange(len(lp)), best].astype(np.int64), ""

    def kept(self, s):
        return (np.exp(s["tail_log_mass"].astype(np.float64)), f"probability outside the {self.k} kept classes",
                "tail mass", "tail_mass_vs_temperature.png",
                "Good: a small tail at the temperatures you train at; a tail near 1 means K is too small for that T.")


class Sample(Codec):
    """K draws with replacement from the combined distribution per temperature, as (class, count)."""

    name = stored_as = loss = "sample"
    targets = {"sample_index": "index", "sample_count": "count"}
    divergence_direction = "KL(count/K || dense)"
    export_doc = ("sample_index_T<t> and sample_count_T<t> (int32, K slots): the distinct classes drawn K times "
                  "from the soft targets at t (independently for sample:K, systematically for systematic:K), and "
                  "how often each was drawn (count 0 in unused slots)")
    member_doc = "a sample set stores no member logits"

    def points(self, rows: np.ndarray, temperatures: int) -> np.ndarray:
        """The K integer points in [0, 2^52) per (row, temperature) that pick the classes: independent draws."""
        return sample_uniforms(rows, temperatures, self.k)

    def encode_block(self, logits, log_probs, rows, temperatures, fdtype, log_partition):
        return _encode_sample(log_probs, self.points(rows, log_probs.shape[1]), self.k)

    def divergence(self, dense_log_probs, fields):
        """KL(dense || count/K) is infinite whenever a class with mass was not drawn, so this is the reverse,
        KL(count/K || dense), which is finite."""
        lp = _normalised(dense_log_probs)
        q = fields["sample_count"].astype(np.float64) / self.k
        lp_at = np.take_along_axis(lp, fields["sample_index"].astype(np.int64), axis=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(q > 0, q * (np.log(q) - lp_at), 0.0).sum(axis=2)

    def export_columns(self, block, temps, logits):
        cols = {}
        for j, t in temps:
            cols[f"sample_index_{t}"] = block["sample_index"][:, j].astype(np.int32)
            cols[f"sample_count_{t}"] = block["sample_count"][:, j].astype(np.int32)
        return cols, {}

    def card_text(self) -> str:
        return (f"codec `{self.spec}`: per row and temperature, K draws from the combined distribution "
                "as (class, count) (docs/FORMAT.md).")

    def top1(self, s, j):
        counts = s["sample_count"][:, j].astype(np.int64)
        best = counts.argmax(-1)
        return (counts.max(-1) / self.k, s["sample_index"][:, j][np.arange(len(counts)), best].astype(np.int64),
                f", estimated from {self.k} draws")

    def kept(self, s):
        return ((s["sample_count"] > 0).sum(-1).astype(np.float64), f"distinct classes among the {self.k} draws",
                "classes drawn", "sample_classes_vs_temperature.png",
                "Good: more distinct classes at higher T (the targets spread, so the draws do too), and at the T you "
                "train at, fewer distinct classes than draws (the draws find where the mass is).")


class Systematic(Sample):
    """Stored and trained as :class:`Sample`; its K points are one seeded offset and K even steps."""

    name = "systematic"

    def points(self, rows: np.ndarray, temperatures: int) -> np.ndarray:
        return systematic_points(rows, temperatures, self.k)

    def card_text(self) -> str:
        return (f"codec `{self.spec}`: per row and temperature, K systematic draws (one random offset, "
                "K evenly spaced points) from the combined distribution as (class, count) (docs/FORMAT.md).")


#: codec name (the family in the ``codec`` string) -> its class
CODECS: dict[str, type[Codec]] = {c.name: c for c in (Dense, TopK, Sample, Systematic)}


def codec_for(spec: str) -> Codec:
    """The codec object of a ``codec`` string (``dense``, ``topk:K``, ``sample:K``, ``systematic:K``)."""
    _, k = parse_codec(spec)
    name = str(spec).partition(":")[0]
    if name not in CODECS:
        raise TransferSetError(f"{str(spec)[:100]!r} is not a codec this version writes", option="codec")
    return CODECS[name](str(spec), k)


def _normalised(dense_log_probs: np.ndarray) -> np.ndarray:
    lp = np.asarray(dense_log_probs, dtype=np.float64)
    return lp - logsumexp(lp, axis=2)[..., None]


def encode(codec: str, logits: np.ndarray, log_probs: np.ndarray, rows: np.ndarray, temperatures: Sequence[float],
           fdtype, log_partition: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The codec's shard fields for a block of rows.

    Args:
        codec: ``dense``, ``topk:K``, ``sample:K`` or ``systematic:K``.
        logits: each member's logits [N, M, C].
        log_probs: the combined soft targets (natural log) [N, T, C], float64, as :func:`transferset.targets.soft_targets`.
        rows: each row's global row number in the set (seeds ``sample``).
        temperatures: the stored temperatures, in the order of ``log_probs``.
        fdtype: the manifest's float dtype.
        log_partition: each member's ``log sum_c exp(z_c / T)`` [N, M, T] when already computed (``soft_targets``
            gives it from the same pass); computed here otherwise.
    """
    return codec_for(codec).encode(logits, log_probs, rows, temperatures, fdtype, log_partition)


def divergence(codec: str, dense_log_probs: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
    """Per row and temperature [N, T], :meth:`Codec.divergence` of ``codec``: KL(dense || decoded) for topk, the
    finite reverse KL(count/K || dense) for sample and systematic; callers print ``divergence_direction``."""
    return codec_for(codec).divergence(dense_log_probs, fields)


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
