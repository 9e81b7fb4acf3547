"""The transfer-set format, declared once: every shard field, the manifest and its checks, the statistics.

docs/FORMAT.md is the prose form of this module. The writer (labelling), the readers (training), ``verify``,
``info``, the tests' fixture builder and the benchmarks' synthetic writer all take the layout from here; a new
field or codec is added here and nowhere else. Nothing here imports torch or ONNX Runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .. import SCHEMA_VERSION
from ..errors import TransferSetError

__all__ = [
    "FORMAT_NAME", "SCHEMA_VERSION", "MANIFEST_NAME", "FLOAT_DTYPES", "INPUT_DTYPES", "ShardField", "SHARD_FIELDS",
    "FIELD_NAMES", "CODEC_FAMILIES", "DENSE_SCHEMA_VERSION", "parse_codec", "is_systematic", "index_dtype", "count_dtype",
    "schema_version_for", "temperature_fields", "is_frame_set", "POSITIONS_SCHEMA_VERSION", "temperature_axis",
    "held_row_shape",
    "TARGETS_SCHEMA_VERSION",
    "shard_layout", "source_format", "row_bytes", "ShardEntry", "Manifest",
    "HINT_REDUCTIONS", "HINTS_SCHEMA_VERSION", "hint_shape",
    "MAX_TEMPERATURES", "MAX_CLASSES", "MAX_MEMBERS", "MAX_ROW_VALUES", "MAX_ROWS", "MAX_POSITIONS", "MAX_HINTS",
    "MAX_ROW_TOTAL", "row_values_fault", "refuse_past_limits", "MAX_FIELD_ROW_BYTES",
]

FORMAT_NAME = "transferset"
MANIFEST_NAME = "manifest.json"
FLOAT_DTYPES = ("float16", "float32")
#: dtypes a shard's ``inputs`` may have: plain numbers only (no objects, strings or structured types)
INPUT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64", "float16", "float32",
                "float64", "bool")


#: the most a set may declare (a reader's memory is bounded by what one row of one temperature takes): stored
#: temperatures, classes, ensemble members, values per row of any one field, and rows (a count, a shard's first row
#: or its end; 2^48 rows of one byte would be 256 TB)
MAX_TEMPERATURES = 64
MAX_CLASSES = 1 << 20
MAX_MEMBERS = 256
MAX_ROW_VALUES = 1 << 24
MAX_ROWS = 1 << 48
#: positions of a per-position set (tokens, frames) and hint fields a set may declare; every field of a row,
#: hints and positions included, stays within MAX_ROW_VALUES, and all of a row's fields together within
#: MAX_ROW_TOTAL (what one row of every field takes, at float32 about 256 MB)
MAX_POSITIONS = 1 << 20
MAX_HINTS = 64
MAX_ROW_TOTAL = 1 << 26
#: bytes one row of one field may take (a shard's chunk holds at least one row; no chunk may exceed this either)
MAX_FIELD_ROW_BYTES = 64 << 20


@dataclass(frozen=True)
class ShardField:
    """One dataset of every shard: its name, stored dtype and per-row shape, in the manifest's terms.

    ``dtype`` is a numpy dtype name, or ``"float"`` (the manifest's ``dtype``), ``"input"`` (``input.dtype``),
    ``"index"`` (the smallest unsigned integer that holds every class index, :func:`index_dtype`) or ``"count"``
    (the smallest unsigned integer that holds K, :func:`count_dtype`). ``shape`` uses the symbols ``M``
    (members), ``C`` (classes), ``T`` (stored temperatures), ``K`` (the codec's K), ``input`` (the input row's
    shape) and literal sizes (``"4"``). ``codecs`` lists the codec families (``dense``, ``topk``, ``sample``)
    whose shards hold the field; ``optional`` fields are present only when the manifest says so (``inputs``:
    ``input.stored``); ``sources`` lists the source formats whose sets hold the field (None: every set), so photo
    fields never appear in an array set's shards; ``when`` names the augment op a field belongs to (``mixup``).

    The position axis: in a per-position set (a language-model teacher, manifest ``positions`` = P), a field with
    ``per_position`` gains a leading ``P`` axis (position j holds the distribution over token j + 1), fields with
    ``positions_only`` exist only there, and ``members_over_one`` fields only when there are several members
    (with one, ``topk_logits`` equals ``T * (topk_log_probs + member_log_partition)`` at every stored T).
    """

    name: str
    dtype: str
    shape: tuple[str, ...]
    doc: str
    codecs: tuple[str, ...] | None = None  # None: every codec
    optional: bool = False
    when: str | None = None  #: present only when the augment spec uses this op (``mixup``)
    sources: tuple[str, ...] | None = None  # None: every source format
    per_position: bool = False  #: gains a leading positions axis in a per-position set
    positions_only: bool = False  #: present in per-position sets only
    members_over_one: bool = False  #: in a per-position set, present only with more than one member
    values: str | None = None  #: the rule its values obey (None: any value of its dtype; format.verify checks it)


SHARD_FIELDS: tuple[ShardField, ...] = (
    ShardField("logits", "float", ("M", "C"),
               "each member's logits (log-probabilities for a member that outputs probabilities)", ("dense",),
               per_position=True, values="finite"),
    ShardField("soft_targets", "float", ("T", "C"),
               "natural log of the combined soft targets at each stored temperature", ("dense",), per_position=True, values="log"),
    ShardField("topk_index", "index", ("K",),
               "the K classes kept, by falling combined probability at the lowest stored temperature", ("topk",),
               per_position=True, values="distinct-class"),
    ShardField("topk_log_probs", "float", ("T", "K"),
               "natural log of the combined soft targets of the kept classes at each stored temperature", ("topk",),
               per_position=True, values="log"),
    ShardField("tail_log_mass", "float", ("T",),
               "natural log of the combined probability of every class not kept, at each stored temperature",
               ("topk",), per_position=True, values="tail"),
    ShardField("topk_logits", "float", ("M", "K"), "each member's logits at the kept classes", ("topk",),
               per_position=True, members_over_one=True, values="finite"),
    ShardField("member_log_partition", "float", ("M", "T"),
               "each member's log sum_c exp(z_c / T) over all C classes, at each stored temperature", ("topk",),
               per_position=True, values="finite"),
    ShardField("sample_index", "index", ("T", "K"),
               "classes drawn from the combined soft targets at each stored temperature (K draws with "
               "replacement), distinct and ascending, then 0 in unused slots", ("sample",), per_position=True, values="class"),
    ShardField("sample_count", "count", ("T", "K"),
               "how many of the K draws gave each sample_index (0 in unused slots; a row's counts sum to K)",
               ("sample",), per_position=True, values="count-k"),
    ShardField("labels", "label", (), "hard label in [0, C), or -1 where none is known (per position: token j + 1, "
               "-1 at the row's last real position and under padding)", per_position=True, values="label"),
    ShardField("length", "int32", (), "per-position sets: the row's real positions (the rest is padding)",
               positions_only=True),
    ShardField("source_index", "int64", (), "row of the source this row was made from"),
    ShardField("view", "int32", (), "view number: 0 is the clean row, 1.. augmented views"),
    ShardField("aug_seed", "uint64", (), "the augmentation seed of this view (replay)"),
    ShardField("inputs", "input", ("input",), "the row the teachers saw, in the source dtype", optional=True),
    ShardField("mixup_partner", "int64", (), "the source row mixed in (mixup views; the row itself for view 0)",
               when="mixup"),
    ShardField("mixup_weight", "float32", (), "the row's own weight lam in lam * x + (1 - lam) * partner",
               when="mixup"),
    ShardField("photo_box", "int32", ("4",), "photo sets: the view's crop box (left, top, width, height) in upright "
               "source pixels (the whole image for a clean view)", sources=("photos",)),
    ShardField("photo_flip", "uint8", (), "photo sets: 1 when the view was flipped horizontally", sources=("photos",)),
)
FIELD_NAMES = tuple(f.name for f in SHARD_FIELDS)

#: codec name -> the tag its shards' fields carry in SHARD_FIELDS (the one place a codec's stored layout is named):
#: ``systematic:K`` is stored, checked and trained as ``sample:K`` and differs only in how its K draws are made.
#: The behaviour of each (encoder, targets, export columns, card) is its class in :mod:`transferset.format.codecs`.
CODEC_FAMILIES = {"dense": "dense", "topk": "topk", "sample": "sample", "systematic": "sample"}
#: dense sets are written as schema 1, byte for byte as before codecs existed; a sparse set needs schema 2
DENSE_SCHEMA_VERSION = 1
#: a per-position set (manifest ``positions``) is written as schema 3 or later, so a reader without the axis
#: refuses it
POSITIONS_SCHEMA_VERSION = 3
#: every set ``label`` writes since the soft targets, tail masses and log-partitions are computed in float32
#: (before: float64); about 1 in 10,000 stored float16 values differs by one float16 step from what schema 1-3
#: code wrote for the same logits (docs/FORMAT.md, "Schema 4"), so an older reader refuses these sets
TARGETS_SCHEMA_VERSION = 4


def parse_codec(spec: str) -> tuple[str, int | None]:
    """``"dense"`` -> ``("dense", None)``; ``"topk:K"`` / ``"sample:K"`` -> ``(stored layout, K)`` with K >= 1.

    ``"systematic:K"`` gives ``("sample", K)``: the first item names the stored layout (:data:`CODEC_FAMILIES`);
    :func:`transferset.format.codecs.codec_for` gives the codec itself.
    """
    family, _, k = str(spec).partition(":")
    if family == "dense" and not k:
        return "dense", None
    if family in CODEC_FAMILIES and family != "dense" and k.isdigit() and len(k) <= 9 and int(k) >= 1 \
            and k == str(int(k)):
        return CODEC_FAMILIES[family], int(k)
    raise TransferSetError(f"{str(spec)[:100]!r} is not a codec; choose dense, topk:K, sample:K or systematic:K "
                           "(K a whole number >= 1)", option="codec")


def is_systematic(spec: str) -> bool:
    """True for a ``systematic:K`` codec (one uniform offset and K evenly spaced points per row and temperature)."""
    return str(spec).partition(":")[0] == "systematic"


def _smallest_unsigned(largest: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every class index ``0 .. num_classes - 1``."""
    return _smallest_unsigned(max(int(num_classes) - 1, 0))


def count_dtype(k: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds a count up to ``k``."""
    return _smallest_unsigned(int(k))


def schema_version_for(codec: str, positions: int | None = None, hints: bool = False) -> int:
    """The schema version a set of ``codec`` is written with: 4 for every set (TARGETS_SCHEMA_VERSION: float32
    soft-target maths). Sets written before read as they were: 1 dense, 2 sparse, 3 per-position or with hints
    (``codec``, ``positions`` and ``hints`` decided those; the checks still hold each kind to its minimum)."""
    parse_codec(codec)  # refuse what is not a codec, as before
    return TARGETS_SCHEMA_VERSION


#: hints (``label --hint``): extra named tensors per row, fields ``hint_0``, ``hint_1``, ... described by the
#: manifest's ``hints`` list (tensor, member, reduction, the tensor's per-row shape, the stored shape and dtype)
HINT_REDUCTIONS = ("none", "avgpool", "attention", "sign")
HINTS_SCHEMA_VERSION = 3


def hint_shape(reduce: str, tensor_shape: list[int], float_dtype: str) -> tuple[list[int], str]:
    """Stored per-row shape and dtype of a hint: ``none`` the tensor's shape, ``avgpool`` [C] (the tensor's size
    for rank <= 1), ``attention`` [prod of the spatial axes], ``sign`` [ceil(size / 8)] uint8 (packed bits)."""
    size = math.prod(int(d) for d in tensor_shape)
    if reduce == "none":
        return [int(d) for d in tensor_shape], float_dtype
    if reduce == "avgpool":
        return [int(tensor_shape[0]) if len(tensor_shape) >= 2 else size], float_dtype
    if reduce == "attention":
        return [math.prod(int(d) for d in tensor_shape[1:])], float_dtype
    return [(size + 7) // 8], "uint8"


def temperature_fields() -> tuple[str, ...]:
    """Fields whose first per-row axis (after positions) is the stored temperatures (a reader may keep one)."""
    return tuple(f.name for f in SHARD_FIELDS if f.shape[:1] == ("T",))


def temperature_axis(positions: int | None) -> int:
    """The array axis of the temperatures in a block [N, (P,) T, ...] of a temperature field."""
    return 1 if positions is None else 2


def held_row_shape(name: str, shape: tuple, temperature_index: int | None, positions: int | None) -> tuple:
    """A field's per-row ``shape`` as a reader holds it when ``temperature_index`` picks one stored temperature:
    fields with a temperature axis lose it ([T, C] -> [C]; a per-position row [P, T, K] -> [P, K])."""
    if temperature_index is None or name not in temperature_fields():
        return tuple(shape)
    axis = temperature_axis(positions) - 1
    return tuple(shape[:axis]) + tuple(shape[axis + 1:])


def shard_layout(m: "Manifest", *, include_unstored: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-row shape and stored dtype of each shard dataset of ``m``, in declaration order.

    Optional fields the manifest does not store are left out unless ``include_unstored`` (a reader that
    replays ``inputs`` still wants their shape and dtype).
    """
    family, k = parse_codec(m.codec)
    positions = m.positions
    sizes = {"M": m.num_members, "C": m.num_classes, "T": len(m.temperatures), "K": k or 0}
    kinds = {"float": m.dtype, "input": m.input["dtype"], "index": index_dtype(m.num_classes),
             "count": count_dtype(k or 0), "label": "int64" if positions is None else "int32"}
    out = {}
    for f in SHARD_FIELDS:
        if f.codecs is not None and family not in f.codecs:
            continue
        if f.positions_only and positions is None:
            continue
        if f.members_over_one and positions is not None and m.num_members == 1:
            continue
        if f.optional and not (m.input["stored"] or include_unstored):
            continue
        if f.when is not None and not any(isinstance(op, dict) and op.get("op") == f.when
                                          for op in m.augment.get("ops") or []):
            continue
        if f.sources is not None and source_format(m) not in f.sources:
            continue
        shape: tuple[int, ...] = (int(positions),) if f.per_position and positions is not None else ()
        for s in f.shape:
            shape += tuple(int(d) for d in m.input["shape"]) if s == "input" else \
                (int(s),) if s.isdigit() else (sizes[s],)
        out[f.name] = (shape, np.dtype(kinds.get(f.dtype, f.dtype)))
    for h in m.hints or ():
        out[h["field"]] = (tuple(h["shape"]), np.dtype(h["dtype"]))
    return out


def source_format(m: "Manifest") -> str | None:
    """The format of the source a set was labelled from (``photos`` for photo folders and file lists)."""
    fmt = m.source.get("format") if isinstance(m.source, dict) else None
    return fmt if isinstance(fmt, str) else None


def is_frame_set(m: "Manifest | dict") -> bool:
    """A per-position set whose teachers read a float input (image lines, signals: one position a frame), not ids."""
    # a Manifest's own fields (to_json would copy every shard entry: verify asks once per shard)
    positions, teachers = (m.get("positions"), m.get("teachers")) if isinstance(m, dict) else (m.positions, m.teachers)
    teachers = teachers or [{}]
    first = teachers[0] if isinstance(teachers[0], dict) else {}
    return positions is not None and str(first.get("input_dtype", "")).startswith("float")


def row_bytes(layout: dict[str, tuple[tuple[int, ...], np.dtype]], names=None) -> int:
    """Bytes one row takes in the datasets ``names`` (all of ``layout`` when None)."""
    return sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for n, (shape, dt) in layout.items()
               if names is None or n in names)


def _counts_fault(m: "Manifest") -> str:
    return (f"{m.num_classes} classes, {m.num_members} members and {len(m.temperatures)} temperatures: a set may "
            f"declare at most {MAX_CLASSES} classes, {MAX_MEMBERS} members and {MAX_TEMPERATURES} temperatures")


def row_values_fault(m: "Manifest") -> str | None:
    """What in ``m``'s layout makes a row larger than a reader may hold (any field, hints and the position axis
    included, over MAX_ROW_VALUES values; all fields together over MAX_ROW_TOTAL), or None."""
    layout = shard_layout(m, include_unstored=True)
    total = 0
    for name, (shape, dt) in layout.items():
        n = math.prod(shape)
        total += n
        if n > MAX_ROW_VALUES or n * dt.itemsize > MAX_FIELD_ROW_BYTES:
            return (f"a row of {name!r} would hold {n} values {list(shape)} ({dt.name}); a set may declare at most "
                    f"{MAX_ROW_VALUES} values and {MAX_FIELD_ROW_BYTES >> 20} MB per field and row (fewer positions, "
                    "temperatures or classes, or a sparse codec)")
    if total > MAX_ROW_TOTAL:
        return f"a row would hold {total} values in all; a set may declare at most {MAX_ROW_TOTAL}"
    return None


def refuse_past_limits(m: "Manifest") -> None:
    """Refuse, in one line, a manifest ``label`` is about to write that declares more than a reader may hold
    (classes, members, temperatures, hints, values a row): label refuses what every reader would refuse."""
    if m.num_classes > MAX_CLASSES or m.num_members > MAX_MEMBERS or len(m.temperatures) > MAX_TEMPERATURES:
        fault = _counts_fault(m)
    elif m.hints and len(m.hints) > MAX_HINTS:
        fault = f"{len(m.hints)} hints: a set may declare at most {MAX_HINTS}"
    else:
        fault = row_values_fault(m)
    if fault:
        raise TransferSetError(f"cannot label this set: {fault} (docs/FORMAT.md, 'Bounded rows and chunks')")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 2 ** 63 and math.isfinite(v)


def _is_count(v) -> bool:
    """A whole number of rows (or a row offset) a reader can hold in int64 with room to add: 0..MAX_ROWS."""
    return _is_int(v) and 0 <= v <= MAX_ROWS


def _nums(v, n: int | None = None, whole: bool = False) -> bool:
    """A list of ``n`` (any number when None) finite numbers, whole non-negative ones when ``whole``."""
    return isinstance(v, list) and (n is None or len(v) == n) \
        and all(_is_count(x) if whole else _is_num(x) for x in v)


def stats_fault(stats: Any, members: int, temperatures: int) -> str | None:
    """What in a manifest's ``stats`` (the set's statistics, summed from its shards') is not a number where the
    format puts one, or None. Keys this version does not know are left alone."""
    if not isinstance(stats, dict):
        return "stats must be an object"
    for key in ("rows", "labelled_rows", "skipped_files"):
        if key in stats and not _is_count(stats[key]):
            return f"stats.{key} must be a whole number of rows"
    acc = stats.get("member_accuracy")
    if acc is not None and not _nums(acc, members):
        return f"stats.member_accuracy must be null or {members} numbers"
    if stats.get("ensemble_accuracy") is not None and not _is_num(stats["ensemble_accuracy"]):
        return "stats.ensemble_accuracy must be null or a number"
    ent = stats.get("mean_entropy")
    if ent is not None and not (isinstance(ent, dict) and len(ent) <= temperatures
                                and all(_is_num(v) for v in ent.values())):
        return "stats.mean_entropy must map each stored temperature to a number"
    return None


def shard_stats_fault(stats: Any, members: int, temperatures: int) -> str | None:
    """What in one shard entry's ``stats`` (what ``merge`` sums) is not a number where one goes, or None."""
    if stats is None:
        return None
    for key in ("labelled", "ensemble_correct"):
        if key in stats and not _is_count(stats[key]):
            return f"stats.{key} must be a whole number"
    if "member_correct" in stats and not _nums(stats["member_correct"], members, whole=True):
        return f"stats.member_correct must be {members} whole numbers"
    if "entropy_sum" in stats and not _nums(stats["entropy_sum"], temperatures):
        return f"stats.entropy_sum must be {temperatures} numbers"
    skipped = stats.get("skipped")
    if skipped is not None and not (isinstance(skipped, list) and all(
            isinstance(e, list) and len(e) == 3 and _is_count(e[0]) for e in skipped)):
        return "stats.skipped must list [source row, path, reason] entries"
    return None


@dataclass
class ShardEntry:
    """One shard as the manifest lists it."""

    path: str
    rows: int
    sha256: str
    row_start: int | None = None
    bytes: int | None = None
    stats: dict | None = None

    @classmethod
    def from_json(cls, obj: Any, i: int, bad) -> "ShardEntry":
        if not isinstance(obj, dict) or not _is_count(obj.get("rows")) \
                or not isinstance(obj.get("sha256"), str) or not isinstance(obj.get("path"), str) \
                or ("bytes" in obj and not (_is_int(obj["bytes"]) and 0 <= obj["bytes"] < 1 << 62)) \
                or ("row_start" in obj and not _is_count(obj["row_start"])) \
                or ("stats" in obj and not isinstance(obj["stats"], dict)):
            bad(f"shard entry {i} needs path, rows and sha256 (and whole-number bytes and row_start; rows and "
                f"row_start in 0..2^48)")
        return cls(obj["path"], obj["rows"], obj["sha256"], obj.get("row_start"), obj.get("bytes"), obj.get("stats"))

    def to_json(self) -> dict:
        out = {"path": self.path, "rows": self.rows, "sha256": self.sha256}
        for key in ("row_start", "bytes", "stats"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


#: manifest keys written even when their value is null (every set ``label`` makes has them)
_ALWAYS = ("tool_version", "class_names", "preprocess", "batch_size", "shard_size", "chunk_rows", "compression",
           "expected_rows", "device", "definition_sha256", "stats")


@dataclass
class Manifest:
    """A transfer set's ``manifest.json``, checked. Build one with :meth:`from_json`; write :meth:`to_json`.

    Keys this version does not know are kept in ``extra`` and written back unchanged.
    """

    num_classes: int
    num_members: int
    teachers: list[dict]
    temperatures: list[float]
    combine: str
    weights: list[float]
    dtype: str
    input: dict
    augment: dict
    source: dict
    shards: list[ShardEntry] = field(default_factory=list)
    complete: bool = False
    schema_version: int = DENSE_SCHEMA_VERSION
    format: str = FORMAT_NAME
    codec: str = "dense"
    positions: int | None = None  #: per-position sets: the positions of a row (tokens); None for one per row
    tool_version: str | None = None
    class_names: list[str] | None = None
    preprocess: dict | None = None
    batch_size: int | None = None
    shard_size: int | None = None
    chunk_rows: int | None = None
    compression: str | None = None
    expected_rows: int | None = None
    device: str | None = None
    definition_sha256: str | None = None
    hints: list[dict] | None = None
    stats: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    # -- reading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, obj: Any, where: str = MANIFEST_NAME) -> "Manifest":
        """Check every field a reader relies on and build the manifest; raise one TransferSetError naming it."""
        def bad(what: str) -> None:
            raise TransferSetError(f"{where}: {what}; the manifest was edited or damaged (relabel, or restore it)")

        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise TransferSetError(f"{where}: not a transferset manifest (missing \"format\": \"{FORMAT_NAME}\")")
        v = obj.get("schema_version")
        if not _is_int(v) or v > SCHEMA_VERSION or v < 1:
            from .. import __version__  # noqa: PLC0415 (the package is loaded by now)

            raise TransferSetError(f"{where}: schema_version {v!r} is not supported by transferset {__version__} "
                                   f"(it reads up to {SCHEMA_VERSION}); upgrade transferset to read this set")
        required = {"num_classes": int, "num_members": int, "temperatures": list, "combine": str, "weights": list,
                    "dtype": str, "input": dict, "teachers": list, "shards": list, "augment": dict,
                    "source": dict, "complete": bool}
        for key, typ in required.items():
            if not isinstance(obj.get(key), typ) or (typ is int and not _is_int(obj[key])):
                bad(f"field {key!r} is missing or not a {typ.__name__}")
        kw = {k: obj[k] for k in required}
        known = {f.name for f in fields(cls)} - {"extra", "shards"}
        for key in known - set(required):
            if key in obj:
                kw[key] = obj[key]
        kw["shards"] = [ShardEntry.from_json(s, i, bad) for i, s in enumerate(obj["shards"])]
        kw["extra"] = {k: v for k, v in obj.items() if k not in known and k != "shards"}
        m = cls(**kw)
        m._check(bad)
        return m

    def _check(self, bad) -> None:
        if self.num_classes < 1 or self.num_members < 1 or len(self.teachers) != self.num_members:
            bad("num_classes/num_members/teachers disagree")
        if self.num_classes > MAX_CLASSES or self.num_members > MAX_MEMBERS \
                or len(self.temperatures) > MAX_TEMPERATURES:
            bad(_counts_fault(self))
        if not all(isinstance(t, dict) for t in self.teachers):
            bad("teachers must be a list of objects")
        temps = self.temperatures
        if not temps or not all(_is_num(t) and t > 0 for t in temps):
            raise TransferSetError(f"{MANIFEST_NAME}: temperatures must be positive numbers, got {temps!r}")
        if self.dtype not in FLOAT_DTYPES:
            bad(f"dtype {self.dtype!r} is not float16 or float32")
        self._check_codec(bad)
        self._check_hints(bad)
        inp = self.input
        if not isinstance(inp.get("shape"), list) or len(inp["shape"]) > 8 \
                or not all(_is_int(d) and 0 <= d <= MAX_ROW_VALUES for d in inp["shape"]):
            bad("input.shape must be a list of at most 8 whole numbers")
        if inp.get("dtype") not in INPUT_DTYPES:
            bad(f"input.dtype {inp.get('dtype')!r} is not one of {', '.join(INPUT_DTYPES)}")
        if not isinstance(inp.get("stored"), bool):
            bad("input.stored must be true or false")
        if len(self.weights) != self.num_members or not all(_is_num(v) and v >= 0 for v in self.weights) \
                or not sum(self.weights) > 0:
            bad(f"weights must be {self.num_members} non-negative numbers, not all zero")
        names = self.class_names
        if names is not None and (not isinstance(names, list) or len(names) != self.num_classes
                                  or not all(isinstance(n, str) for n in names)):
            bad(f"class_names must be null or {self.num_classes} strings")
        fault = stats_fault(self.stats, self.num_members, len(self.temperatures))
        if fault:
            bad(fault)
        self._check_preprocess(bad)
        aug = self.augment
        if "views_per_row" in aug and not (_is_int(aug["views_per_row"]) and aug["views_per_row"] >= 1):
            bad("augment.views_per_row must be a whole number >= 1")
        if "seed" in aug and not _is_int(aug["seed"]):
            bad("augment.seed must be a whole number")
        if aug.get("ops") is not None and not isinstance(aug["ops"], (list, dict)):
            bad("augment.ops must be a list (a photo set's an object)")
        for key in ("chunk_rows", "batch_size", "shard_size"):
            v = getattr(self, key)
            if v is not None and not (_is_count(v) and v >= 1):
                bad(f"{key} must be a whole number in 1..2^48")
        if self.expected_rows is not None and not _is_count(self.expected_rows):
            bad("expected_rows must be a whole number in 0..2^48")
        self._check_rows(bad)
        self._check_row_values(bad)

    def _check_rows(self, bad) -> None:
        """Each shard listed once, its statistics numbers, its rows within 2^48 (``verify`` checks that each starts
        where the shards before it end)."""
        seen = set()
        total = 0
        for i, s in enumerate(self.shards):
            if s.path in seen:
                raise TransferSetError(f"{MANIFEST_NAME}: shard {s.path} is listed twice")
            seen.add(s.path)
            fault = shard_stats_fault(s.stats, self.num_members, len(self.temperatures))
            if fault:
                bad(f"shard entry {i}: {fault}")
            total += s.rows
            if total > MAX_ROWS or (s.row_start or 0) + s.rows > MAX_ROWS:
                bad(f"shard entry {i} ({s.path[:100]}) ends past row 2^48")

    def _check_row_values(self, bad) -> None:
        """What a reader holds per row is bounded: see :func:`row_values_fault`."""
        fault = row_values_fault(self)
        if fault:
            bad(fault)

    def _check_codec(self, bad) -> None:
        if not isinstance(self.codec, str):
            bad("codec must be a string")
        try:
            family, k = parse_codec(self.codec)
        except TransferSetError:
            bad(f"codec {self.codec[:100]!r} is not one this version reads (dense, topk:K, sample:K)")
        if family != "dense" and self.schema_version < 2:
            bad(f"codec {self.codec!r} needs schema_version 2, the manifest says {self.schema_version}")
        if family == "topk" and k >= self.num_classes:
            bad(f"codec {self.codec!r} keeps K >= num_classes ({self.num_classes}) classes")
        if self.positions is not None:
            if not (_is_int(self.positions) and 1 <= self.positions <= MAX_POSITIONS):
                bad("positions must be null or a whole number in [1, 2^20]")
            if self.schema_version < POSITIONS_SCHEMA_VERSION:
                bad(f"a per-position set needs schema_version {POSITIONS_SCHEMA_VERSION}, the manifest says "
                    f"{self.schema_version}")

    def _check_hints(self, bad) -> None:
        """Each hint entry: field ``hint_<k>`` in order, a member of the set, a known reduction, a whole-number
        tensor shape, and the stored shape and dtype that reduction gives (so a reader sizes nothing on trust)."""
        if self.hints is None:
            return
        if not isinstance(self.hints, list) or self.schema_version < HINTS_SCHEMA_VERSION:
            bad(f"hints must be a list, in a set of schema_version {HINTS_SCHEMA_VERSION} or later")
        if len(self.hints) > MAX_HINTS:
            bad(f"{len(self.hints)} hints: a set may declare at most {MAX_HINTS}")
        for k, h in enumerate(self.hints):
            if not isinstance(h, dict) or h.get("field") != f"hint_{k}" or not isinstance(h.get("tensor"), str) \
                    or not _is_int(h.get("member")) or not 0 <= h["member"] < self.num_members \
                    or h.get("reduce") not in HINT_REDUCTIONS or not isinstance(h.get("tensor_shape"), list) \
                    or not h["tensor_shape"] or len(h["tensor_shape"]) > 8 \
                    or not all(_is_int(d) and d >= 1 for d in h["tensor_shape"]) \
                    or math.prod(h["tensor_shape"]) > 1 << 31:
                bad(f"hints[{k}] needs field hint_{k}, tensor, a member below {self.num_members}, reduce "
                    f"({', '.join(HINT_REDUCTIONS)}) and a tensor_shape of whole numbers")
            if h["reduce"] == "attention" and len(h["tensor_shape"]) < 2:
                bad(f"hints[{k}]: reduce attention needs a tensor of rank 2 or more a row")
            if [h.get("shape"), h.get("dtype")] != list(hint_shape(h["reduce"], h["tensor_shape"], self.dtype)):
                bad(f"hints[{k}]: shape and dtype disagree with its reduction and tensor_shape")

    def _check_preprocess(self, bad) -> None:
        """The preprocessing a student's input normalisation is built from: numbers where numbers go."""
        for where, pre in [("preprocess", self.preprocess)] + [(f"teachers[{i}].preprocess", t.get("preprocess"))
                                                                for i, t in enumerate(self.teachers)]:
            if pre is None:
                continue
            if not isinstance(pre, dict):
                bad(f"{where} must be an object")
            scale = pre.get("scale")
            if scale is not None and not (_is_num(scale) and scale != 0):
                bad(f"{where}.scale must be a non-zero number")
            for key in ("mean", "std"):
                v = pre.get(key)
                vals = v if isinstance(v, list) else [v] if v is not None else []
                if not all(_is_num(x) and (key == "mean" or x != 0) for x in vals):
                    bad(f"{where}.{key} must be a number or a list of numbers" + (" (not zero)" if key == "std" else ""))
            if pre.get("layout") not in (None, "nchw", "nhwc"):
                bad(f"{where}.layout must be null, nchw or nhwc")

    # -- writing ---------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The manifest as JSON-ready data (the writer sorts keys)."""
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name in ("extra", "shards"):
                continue
            v = getattr(self, f.name)
            if v is None and f.name not in _ALWAYS:
                continue
            if f.name == "codec" and v == "dense":  # schema 1: dense is implied, so old readers keep reading
                continue
            out[f.name] = v
        out["shards"] = [s.to_json() for s in self.shards]
        return out

    def list_shards(self, entries: list[ShardEntry], complete: bool) -> None:
        """List ``entries`` in row order and sum the set's statistics from them, in that order.

        The one way a manifest gets its shards, for a single run after each shard and for ``merge``: so a set
        merged from parts has the same entries, statistics (floats summed in the same order) and bytes.
        """
        self.shards = sorted(entries, key=lambda s: s.row_start if s.row_start is not None else 0)
        self.complete = complete
        self.stats = self.compute_stats()

    # -- derived ---------------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows in the listed shards."""
        return sum(s.rows for s in self.shards)

    @property
    def views_per_row(self) -> int:
        return int(self.augment.get("views_per_row", 1))

    def temperature_index(self, temperature: float) -> int | None:
        """Index of ``temperature`` among the stored ones (within 1e-9), or None."""
        for i, t in enumerate(self.temperatures):
            if abs(float(t) - float(temperature)) <= 1e-9:
                return i
        return None

    def compute_stats(self) -> dict:
        """The set's statistics, summed from each shard's: rows, accuracies on labelled rows, mean entropy."""
        shards = self.shards
        rows = self.rows
        labelled = sum(s.stats["labelled"] for s in shards)
        out: dict[str, Any] = {"rows": rows, "labelled_rows": labelled, "member_accuracy": None,
                               "ensemble_accuracy": None, "mean_entropy": {}}
        if labelled:
            out["member_accuracy"] = [sum(s.stats["member_correct"][i] for s in shards) / labelled
                                      for i in range(self.num_members)]
            out["ensemble_accuracy"] = sum(s.stats["ensemble_correct"] for s in shards) / labelled
        if rows:
            for j, t in enumerate(self.temperatures):
                out["mean_entropy"][f"{t:g}"] = sum(s.stats["entropy_sum"][j] for s in shards) / rows
        if source_format(self) == "photos":  # files that could not be decoded (listed by each shard's entry)
            out["skipped_files"] = len(self.skipped_files())
        return out

    def summary(self) -> dict:
        """The short, human-facing summary ``transferset info`` prints."""
        st = self.stats
        return {
            "schema_version": self.schema_version, "tool_version": self.tool_version, "complete": self.complete,
            "codec": self.codec, "rows": st.get("rows", self.rows), "expected_rows": self.expected_rows,
            "shards": len(self.shards), "members": [t.get("file") for t in self.teachers],
            "output_kinds": [t.get("output_kind") for t in self.teachers], "num_classes": self.num_classes,
            "class_names": self.class_names, "input": self.input, "temperatures": self.temperatures,
            "combine": self.combine, "dtype": self.dtype, "augment": self.augment, "source": self.source,
            "member_accuracy": st.get("member_accuracy"), "ensemble_accuracy": st.get("ensemble_accuracy"),
            "mean_entropy": st.get("mean_entropy"),
            **({"hints": [f"{h['field']}: {h['tensor']} (member {h['member']}, {h['reduce']}) {h['shape']} "
                          f"{h['dtype']}" for h in self.hints]} if self.hints else {}),
            **({"skipped_files": self.skipped_files()} if source_format(self) == "photos" else {}),
        }

    def skipped_rows(self) -> np.ndarray:
        """The rows of the files listed as skipped, sorted (int64), in a photo set whose bad files keep their rows
        (``source.bad_files`` is ``kept``); none in any other set (older photo sets left those rows out)."""
        if source_format(self) != "photos" or self.source.get("bad_files") != "kept":
            return np.zeros(0, np.int64)
        vpr, total = max(1, self.views_per_row), self.rows
        spans = [np.arange(s * vpr, min((s + 1) * vpr, total), dtype=np.int64)
                 for s in (int(e["source_index"]) for e in self.skipped_files()) if 0 <= s * vpr < total]
        return np.unique(np.concatenate(spans)) if spans else np.zeros(0, np.int64)

    def skipped_files(self) -> list[dict]:
        """Photo sets: the files label left out (undecodable), ``{"source_index", "path", "reason"}`` each."""
        seen: dict = {}
        for s in self.shards:
            got = (s.stats or {}).get("skipped", [])
            for e in got if isinstance(got, list) else []:
                if isinstance(e, list) and len(e) == 3 and _is_int(e[0]) and e[0] not in seen:
                    seen[e[0]] = {"source_index": e[0], "path": str(e[1]), "reason": str(e[2])}
        return [seen[k] for k in sorted(seen)]
