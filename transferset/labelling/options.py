"""The options of ``transferset label``, declared once (the CLI builds its flags from :class:`LabelOptions`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import TransferSetError
from ..format.codecs import codec_for
from ..format.schema import FLOAT_DTYPES, MAX_TEMPERATURES
from ..targets import COMBINE_RULES

__all__ = ["LabelOptions", "validate_options", "DEFAULT_TEMPERATURES", "LAYOUTS", "COMPRESSIONS", "ENGINES", "NORMS",
           "ON_BAD", "OUTPUT_KINDS"]

DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)
#: the choices of the options that take one (the CLI's choices come from here)
LAYOUTS = ("nchw", "nhwc")
COMPRESSIONS = ("none", "lzf", "gzip")
ENGINES = ("local", "ray")
NORMS = ("imagenet",)
ON_BAD = ("skip", "fail")
OUTPUT_KINDS = ("logits", "probabilities")


@dataclass
class LabelOptions:
    """Every option of ``transferset label`` (the CLI maps its flags onto this one to one)."""

    labels: str | None = None
    limit: int | None = None
    input_name: str | None = None
    output_name: str | None = None
    output_kind: str | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None
    augment: str | None = None
    views: int = 0
    clean_view: bool = True
    seed: int = 0
    store_inputs: bool | None = None  #: None: stored for arrays, replayed for photos
    resize: int | None = None  #: photos: the clean view's shorter side
    crop: int | None = None  #: photos: the square the teachers see (default: their input size)
    norm: str | None = None  #: photos: "imagenet" sets scale, mean and std
    on_bad_image: str = "skip"  #: photos: "skip" (record and leave out) or "fail"
    decode_workers: int | None = None  #: photos: decode processes (default: cores - 1)
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES
    combine: str = "mean-probs"
    weights: Sequence[float] | None = None
    dtype: str = "float16"
    batch_size: int = 256
    shard_size: int = 65536
    compression: str | None = None
    device: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    quiet: bool = False
    license: str | None = None
    citation: str | None = None
    part: tuple[int, int] | None = None  #: ``(I, N)``: label part I of N (default: from torchrun or a Slurm array)
    claim: bool = False  #: take shards through lease files, with any number of workers sharing the folder
    lease_seconds: float = 60.0  #: a claimed shard's lease expires this long after its worker last touched it
    engine: str = "local"  #: "local" (this process, or its part) or "ray" (one Ray task per shard)
    ray_address: str | None = None  #: the Ray cluster (None: RAY_ADDRESS, or a local cluster for this run)
    ray_cpus: float = 1  #: CPUs each Ray task asks for (its ONNX Runtime threads)
    ray_gpus: float = 0  #: GPUs each Ray task asks for
    ray_retries: int = 3  #: times Ray runs a failed task again
    codec: str | None = None  # None: dense below codecs.DENSE_BELOW_CLASSES classes, else codecs.SPARSE_DEFAULT
    text: str | None = None  #: language-model teachers: raw text (.txt, .jsonl, .parquet) packed into rows
    tokenizer: str | None = None  #: the tokenizer.json that tokenizes ``text``
    seq_len: int | None = None  #: positions per row of packed ``text``
    text_field: str = "text"  #: the document's field in .jsonl (column in .parquet)
    hints: tuple[str, ...] = ()  #: ``TENSOR[:member=I][:reduce=R]`` each (labelling.hints)


def _option_problems(o: LabelOptions) -> list[tuple[bool, str, str]]:
    """``(wrong, option, message)`` for every check of the options, in the order they are reported."""
    temps = list(o.temperatures)
    bad_t = next((t for t in temps if not (isinstance(t, (int, float)) and np.isfinite(t) and t > 0)), None)
    return [
        (o.views < 0, "views", f"must be >= 0, got {o.views}"),
        (o.views == 0 and not o.clean_view, "views", "0 without the clean view leaves no rows; ask for views"),
        (o.views > 0 and not o.augment, "augment", "is needed for views (a spec such as jitter:2)"),
        (o.batch_size < 1, "batch_size", f"must be >= 1, got {o.batch_size}"),
        (o.shard_size < 1, "shard_size", f"must be >= 1, got {o.shard_size}"),
        (o.limit is not None and o.limit < 1, "limit", f"must be >= 1, got {o.limit}"),
        (not temps, "temperatures", "needs at least one value"),
        (bad_t is not None, "temperatures", f"must be positive numbers, got {bad_t!r}"),
        (len(set(temps)) != len(temps), "temperatures", f"has repeated values: {temps}"),
        (o.claim and not (np.isfinite(o.lease_seconds) and o.lease_seconds > 0), "lease_seconds",
         f"must be a positive number of seconds, got {o.lease_seconds}"),
        (len(temps) > MAX_TEMPERATURES, "temperatures", f"has {len(temps)} values; a set stores at most "
                                                        f"{MAX_TEMPERATURES} (docs/FORMAT.md)"),
        (o.combine not in COMBINE_RULES, "combine", f"{o.combine!r}: choose one of {', '.join(COMBINE_RULES)}"),
        (o.dtype not in FLOAT_DTYPES, "dtype", f"{o.dtype!r}: choose {' or '.join(FLOAT_DTYPES)}"),
        (o.layout not in (None,) + LAYOUTS, "layout", f"{o.layout!r}: choose {' or '.join(LAYOUTS)}"),
        (o.compression not in (None,) + COMPRESSIONS, "compression",
         f"{o.compression!r}: choose {', '.join(COMPRESSIONS[:-1])} or {COMPRESSIONS[-1]}"),
        (o.scale is not None and not np.isfinite(o.scale), "scale", "must be a finite number"),
        (o.std is not None and any((not np.isfinite(s)) or s == 0 for s in o.std), "std",
         "values must be finite and non-zero"),
        (o.engine not in ENGINES, "engine", f"{o.engine!r}: choose {' or '.join(ENGINES)}"),
    ]


def validate_options(o: LabelOptions) -> None:
    """Refuse the first wrong option, naming it (as data: the CLI spells the flag)."""
    if o.codec is not None:
        codec_for(o.codec)
    for wrong, option, message in _option_problems(o):
        if wrong:
            raise TransferSetError(message, option=option)
