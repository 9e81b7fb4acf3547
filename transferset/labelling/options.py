"""The options of ``transferset label``, declared once (the CLI builds its flags from :class:`LabelOptions`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import TransferSetError
from ..format.codecs import codec_for
from ..format.schema import FLOAT_DTYPES, MAX_TEMPERATURES
from ..options import option
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
    """Every option of ``transferset label``, declared once: the CLI builds each flag from its field."""

    text: str | None = option(None, "Language-model teachers: raw text (.txt, documents separated by blank lines; "
                              ".jsonl; .parquet[:column]) packed into rows of --seq-len with --tokenizer.")
    tokenizer: str | None = option(None, "The tokenizer.json (tokenizers package) for --text.")
    seq_len: int | None = option(None, "Positions per row of packed --text.")
    text_field: str = option("text", "The document's field in .jsonl.")  #: the column in .parquet
    labels: str | None = option(None, "Hard labels from another file (npy, npz:key, IDX, h5:dataset).")
    limit: int | None = option(None, "Use only the first N source rows.")
    input_name: str | None = option(None, "The models' data input, when they have several.")
    output_name: str | None = option(None, "The models' class-score output, when not found by itself.")
    output_kind: str | None = option(None, "What the models output; auto reads it from the graph (a final Softmax "
                                     "means probabilities).", choices=OUTPUT_KINDS, parse="auto")
    scale: float | None = option(None, "Multiply inputs by this (e.g. 0.00392156862745098 for 1/255).")
    mean: tuple[float, ...] | None = option(None, "Subtract (scalar or one value per channel, comma-separated).",
                                            parse="floats")
    std: tuple[float, ...] | None = option(None, "Divide by (scalar or per channel).", parse="floats")
    layout: str | None = option(None, "The models' image layout (photos: read from the model by default).",
                                choices=LAYOUTS)
    norm: str | None = option(None, "Photos: scale 1/255, ImageNet mean and std.", choices=NORMS)
    resize: int | None = option(None, "Photos: the clean view's shorter side (default crop / 0.875).")
    crop: int | None = option(None, "Photos: centre-crop side (default: the teachers' input size).")
    on_bad_image: str = option("skip", "Photos: leave undecodable files out (recorded in the manifest) or stop.",
                               choices=ON_BAD)
    decode_workers: int | None = option(None, "Photos: decode processes (default: cores - 1).")
    augment: str | None = option(None, "Augmentation ops, e.g. jitter:2 | crop:4,flip | noise:0.1 | munge:0.5; "
                                 "photos: rrc:SIZE[:SMIN:SMAX[:RMIN:RMAX]],flip.")
    views: int = option(0, "Augmented views per source row.")
    clean_view: bool = option(True, "Keep the un-augmented row (view 0).")
    seed: int = option(0, "Base seed of the augmentation.")
    store_inputs: bool | None = option(None, "Store each row's input (default: yes for arrays, no for photos); "
                                       "without, readers replay it from the source.")
    temperatures: Sequence[float] = option(DEFAULT_TEMPERATURES, "Temperatures whose soft targets are stored; any "
                                           "other is recomputed from the stored logits.", parse="floats_tuple",
                                           cli_default="1,2,4,8,20")
    combine: str = option("mean-probs", "How the members' outputs become one soft target: mean of probabilities, of "
                          "logits, or the normalised geometric mean.", choices=COMBINE_RULES)
    weights: Sequence[float] | None = option(None, "Member weights, comma-separated.", parse="floats")
    dtype: str = option("float16", "Storage type of logits and soft targets (float16 costs a KL of about 1e-6 at "
                        "T=1).", choices=FLOAT_DTYPES)
    batch_size: int = option(256, "Rows per ONNX Runtime call.")
    shard_size: int = option(65536, "Rows per shard.")
    # the command line passes "none" as given: a set's definition hash records it, so CLI-made sets keep theirs
    compression: str | None = option(None, "HDF5 compression of the shards (gzip: smaller, about 10x slower to "
                                     "write).", choices=COMPRESSIONS, parse="as_given", cli_default="none")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    threads: int | None = option(None, "ONNX Runtime threads in all (default: all cores; for photos, the cores the "
                                 "decode workers leave). On a CPU, arrays and top-k token sets run min(threads, 4) batches "
                                 "at once, each on threads // that many intra-op threads.")
    overwrite: bool = option(False, "Start over in a folder that holds another transfer set.")
    license: str | None = option(None, "Licence of the labels, for the dataset card (README.md).")
    citation: str | None = option(None, "How to cite the set, for the dataset card.")
    part: tuple[int, int] | None = option(None, "Label part I of N (shards k with k mod N = I-1) into a shared "
                                          "folder; the last part to finish merges. Default: from torchrun "
                                          "(RANK/WORLD_SIZE) or a Slurm array; this flag wins over both.",
                                          metavar="I/N", parse="part")
    claim: bool = option(False, "Claim shards through lease files: start any number of workers with the same "
                         "command, on any machines sharing the folder, at any time; a dead worker's shards are redone "
                         "after its lease expires; the last to finish merges (docs/SCALE_OUT.md).")
    lease_seconds: float = option(60.0, "With --claim: a shard's lease expires this long after its worker last "
                                  "touched it.")
    engine: str = option("local", "ray: one Ray task per shard on a Ray cluster (--ray-address) or a local one; the "
                         "same folder and bytes (pip install 'transferset[ray]').", choices=ENGINES)
    ray_address: str | None = option(None, "With --engine ray: the cluster (default: RAY_ADDRESS, or local).")
    ray_cpus: float = option(1, "With --engine ray: CPUs per task.")
    ray_gpus: float = option(0, "With --engine ray: GPUs per task (a task given none labels on the CPU).")
    ray_resources: str | None = option(None, "With --engine ray: custom Ray resources per task, e.g. shared_fs=1 "
                                       "(only nodes that declare them run tasks).", metavar="NAME=AMOUNT,...")
    ray_wait: float = option(0.0, "With --engine ray: seconds to let a node that can run a task join (an autoscaling "
                             "cluster) before the run is refused; 0: refused at once.")
    ray_retries: int = option(3, "With --engine ray: times Ray runs a failed task again.")
    # None: dense below codecs.DENSE_BELOW_CLASSES classes, else codecs.SPARSE_DEFAULT
    codec: str | None = option(None, "How rows keep the teachers' view (default: dense below 1,000 classes, else "
                               "topk:20; per-token sets topk:32).", metavar="dense|topk:K|sample:K|systematic:K")
    hints: tuple[str, ...] = option((), "Also store this intermediate tensor of member I (default 0) per row, as "
                                    "field hint_<k> (repeat; `transferset inspect MODEL.onnx` lists the tensors).",
                                    flag="--hint", metavar="TENSOR[:member=I][:reduce=none|avgpool|attention|sign]")
    quiet: bool = option(False, "No progress bar.", short="-q")


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
    for wrong, name, message in _option_problems(o):
        if wrong:
            raise TransferSetError(message, option=name)
