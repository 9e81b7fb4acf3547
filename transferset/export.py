"""Export a transfer set to Parquet (Arrow / Hugging Face ``datasets``), streaming one row group at a time.

``OUT/data/train-00000-of-00001.parquet`` holds one row per set row, in set order:

- ``soft_targets_T<t>``: list<float32>, the ensemble's soft targets at stored temperature ``t`` as
  **probabilities** (``exp`` of the stored natural-log values, computed in float32);
- ``label`` (int64, -1 where unknown), ``source_index`` (int64), ``view`` (int32), ``aug_seed`` (uint64);
- ``inputs`` (list of the input dtype, flattened row-major) when the set stores inputs; the row shape is in
  the file's metadata;
- ``logits`` (list<list<float32>>, members x classes) when asked for;
- ``hint_<k>`` for each hint the set stores (``label --hint``): list<float32> (float reductions) or list<uint8>
  (``sign``: packed bits), flattened row-major; the metadata's ``hints`` gives each one's tensor, reduction and shape.

Sparse sets (``topk:K``, ``sample:K``) export their own fields in place of ``soft_targets_T<t>`` and ``logits``:
``topk_index`` (list<int32>), ``topk_probs_T<t>`` (list<float32>) and ``tail_mass_T<t>`` (float32), with
``topk_logits`` and ``member_log_partition`` when logits are asked for; ``sample_index_T<t>`` and
``sample_count_T<t>`` (list<int32>, K slots). The metadata's ``codec`` and ``soft_targets`` say which.

The file's schema metadata key ``transferset`` holds JSON: the input shape and dtype, the temperatures, the class
names, the manifest's hash and how to read the columns. ``OUT/README.md`` is the set's card (copied when the set
has one, else rendered from its manifest). Memory is bounded by one row group (``row_group_rows``), never by the
set: shards are read slice by slice with h5py and each slice becomes one row group. The file is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ._io import atomic_write, atomic_write_bytes
from .errors import FAILED, USAGE, TransferSetError
from .format.card import CARD_NAME, write_card
from .format.codecs import codec_for
from .format.manifest import manifest_hash
from .format.parts import read_manifest
from .format.reading import TransferSet
from .format.schema import Manifest, is_frame_set, row_bytes, shard_layout
from .progress import progress_bar

__all__ = ["PARQUET_NAME", "ROW_GROUP_BYTES", "iter_blocks", "export_parquet", "temperature_columns"]

PARQUET_NAME = "data/train-00000-of-00001.parquet"
ROW_GROUP_BYTES = 64 << 20  #: target uncompressed bytes read per row group (bounds memory)


def iter_blocks(root: str | os.PathLike, m: Manifest, names: Sequence[str], block_rows: int
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(global row start, {name: array})`` blocks of at most ``block_rows`` rows, in set order.

    The set is opened as a :class:`~transferset.format.reading.TransferSet`: every shard is checked against the
    manifest first (present, regular file, rows, shapes); a bad one stops the read naming it. Only ``names`` are
    read, one slice at a time. ``m`` is the manifest the caller read (the set's own is checked again here).
    """
    yield from TransferSet(root).blocks(names, block_rows)


def temperature_columns(m: Manifest, temperatures: Sequence[float] | None) -> list[tuple[int, str]]:
    """``(index among stored temperatures, column name)`` for each chosen one (all stored when None)."""
    chosen = list(m.temperatures) if temperatures is None else list(temperatures)
    out = []
    for t in chosen:
        j = m.temperature_index(t)
        if j is None:
            stored = ", ".join(f"{v:g}" for v in m.temperatures)
            raise TransferSetError(f"{t:g} is not a stored temperature; this set stores {stored}", USAGE,
                                   option="temperatures")
        out.append((j, f"soft_targets_T{float(t):g}"))
    return out


def _list_array(pa, values: np.ndarray):
    """A list<...> column of ``values`` [N, K] without going through Python lists."""
    n, k = values.shape[0], int(np.prod(values.shape[1:], dtype=np.int64))
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), flat)


def _nested(pa, values: np.ndarray):
    """A list<list<...>> column of ``values`` [N, A, B]."""
    n, a = values.shape[:2]
    inner = _list_array(pa, values.reshape(n * a, -1))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * a + 1, a, dtype=np.int32)), inner)


def _column(pa, values: np.ndarray):
    """[N] a plain column, [N, K] a list column, [N, A, B] a list of lists (a codec's export columns)."""
    return pa.array(values) if values.ndim == 1 else _list_array(pa, values) if values.ndim == 2 else \
        _nested(pa, values)


def _token_table(pa, block: dict[str, np.ndarray], temps, logits: bool, m: Manifest):
    """A per-position set: one Parquet row per set row, per-token list columns (the DistillKit / Axolotl shape):
    ``input_ids`` [L] (a per-frame set: ``inputs``, the row flattened, when stored), ``length``, ``labels`` [L] (token j + 1, -1 at the row's end and under padding), then per
    codec ``topk_index`` [L][K] with ``topk_log_probs_T<t>`` [L][K] and ``tail_log_mass_T<t>`` [L],
    ``sample_index_T<t>`` / ``sample_count_T<t>`` [L][K], or ``log_probs_T<t>`` [L][V] (dense)."""
    family = codec_for(m.codec).stored_as
    if is_frame_set(m):  # per-frame rows: the input (an image line, a signal) flattened, in its own dtype
        cols = {"inputs": _list_array(pa, block["inputs"])} if "inputs" in block else {}
    else:
        cols = {"input_ids": _list_array(pa, block["inputs"].astype(np.int32))}
    cols.update(length=pa.array(block["length"].astype(np.int32)),
                labels=_list_array(pa, block["labels"].astype(np.int32)))
    if family == "topk":
        cols["topk_index"] = _nested(pa, block["topk_index"].astype(np.int32))
    for j, name in temps:
        t = name[len("soft_targets_"):]
        if family == "topk":
            cols[f"topk_log_probs_{t}"] = _nested(pa, block["topk_log_probs"][:, :, j].astype(np.float32))
            cols[f"tail_log_mass_{t}"] = _list_array(pa, block["tail_log_mass"][:, :, j].astype(np.float32))
        elif family == "dense":
            cols[f"log_probs_{t}"] = _nested(pa, block["soft_targets"][:, :, j].astype(np.float32))
        else:
            cols[f"sample_index_{t}"] = _nested(pa, block["sample_index"][:, :, j].astype(np.int32))
            cols[f"sample_count_{t}"] = _nested(pa, block["sample_count"][:, :, j].astype(np.int32))
    if logits and family == "topk":
        cols["member_log_partition"] = _nested(pa, block["member_log_partition"].reshape(
            len(block["inputs"]), m.positions, -1).astype(np.float32))
    cols["source_index"] = pa.array(block["source_index"].astype(np.int64))
    return pa.table(cols)


def _table(pa, block: dict[str, np.ndarray], temps, logits: bool, inputs: bool, m: Manifest):
    if m.positions is not None:
        return _token_table(pa, block, temps, logits, m)
    at = [(j, name[len("soft_targets_"):]) for j, name in temps]
    targets, members = codec_for(m.codec).export_columns(block, at, logits)
    cols = {name: _column(pa, v) for name, v in targets.items()}
    cols["label"] = pa.array(block["labels"].astype(np.int64))
    cols["source_index"] = pa.array(block["source_index"].astype(np.int64))
    cols["view"] = pa.array(block["view"].astype(np.int32))
    cols["aug_seed"] = pa.array(block["aug_seed"].astype(np.uint64))
    if inputs:
        cols["inputs"] = _list_array(pa, block["inputs"].reshape(len(block["inputs"]), int(np.prod(m.input["shape"]))))
    for h in m.hints or ():
        v = block[h["field"]]
        cols[h["field"]] = _list_array(pa, v.reshape(len(v), -1).astype(np.uint8 if h["reduce"] == "sign" else np.float32))
    return pa.table({**cols, **{name: _column(pa, v) for name, v in members.items()}})


def _metadata(m: Manifest, temps, logits: bool, inputs: bool) -> dict:
    codec = codec_for(m.codec)
    return {
        "codec": m.codec,
        "format": "transferset-parquet", "version": 1, "manifest_hash": manifest_hash(m),
        "num_classes": m.num_classes, "class_names": m.class_names, "num_members": m.num_members,
        "combine": m.combine, "weights": m.weights,
        "temperatures": {name: float(m.temperatures[j]) for j, name in temps},
        "soft_targets": codec.export_doc,
        "input": {"shape": m.input["shape"], "dtype": m.input["dtype"], "exported": inputs,
                  "layout": "flattened row-major; reshape each row to shape"},
        "logits": codec.member_doc if logits else None,
        "teachers": [{"file": t.get("file"), "sha256": t.get("sha256")} for t in m.teachers],
        "hints": [{**h, "layout": "flattened row-major" + ("; packed bits (np.packbits, big bit order)"
                                                           if h["reduce"] == "sign" else "; float32")}
                  for h in m.hints or ()],
    }


def _group_rows(m: Manifest, names: Sequence[str], row_group_rows: int | None) -> int:
    if row_group_rows is not None:
        if row_group_rows < 1:
            raise TransferSetError("must be >= 1", USAGE, option="row_group_rows")
        return int(row_group_rows)
    per_row = max(row_bytes(shard_layout(m), names), 1) * 2  # stored bytes plus the float32 copy
    return int(max(1, min(1 << 20, ROW_GROUP_BYTES // per_row)))


def _write_groups(tmp: Path, root: Path, m: Manifest, names: list[str], group: int, temps, logits: bool,
                  inputs: bool, meta: str, quiet: bool) -> dict:
    """Stream the set into one Parquet file at ``tmp``: one row group per block read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = {"rows": 0, "row_groups": 0, "columns": None}
    writer = None
    bar = progress_bar(m.rows, desc="export", quiet=quiet)
    try:
        for _, block in iter_blocks(root, m, names, group):
            table = _table(pa, block, temps, logits, inputs, m)
            if writer is None:
                writer = pq.ParquetWriter(str(tmp), table.schema.with_metadata({"transferset": meta}),
                                          compression="zstd")
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata), row_group_size=group)
            info["rows"] += table.num_rows
            info["row_groups"] += 1
            info["columns"] = table.column_names
            if bar:
                bar.update(table.num_rows)
        if writer is None:  # an empty set still gets a valid, empty file with the right columns
            empty = {n: np.zeros((0,) + shape, dt) for n, (shape, dt) in shard_layout(m).items()}
            table = _table(pa, empty, temps, logits, inputs, m)
            writer = pq.ParquetWriter(str(tmp), table.schema.with_metadata({"transferset": meta}))
            info["columns"] = table.column_names
    finally:
        if writer is not None:
            writer.close()
        if bar:
            bar.close()
    return info


def export_parquet(root: str | os.PathLike, out: str | os.PathLike, *, temperatures: Sequence[float] | None = None,
                   include_logits: bool = False, include_inputs: bool = True, row_group_rows: int | None = None,
                   quiet: bool = True) -> dict:
    """Write the transfer set ``root`` as ``out/data/train-00000-of-00001.parquet`` plus ``out/README.md``.

    Args:
        root: the transfer-set folder (complete).
        out: the output folder (created; an existing export in it is replaced).
        temperatures: stored temperatures to export (default: all stored).
        include_logits: also export every member's logits.
        include_inputs: export ``inputs`` when the set stores them.
        row_group_rows: rows per row group (default: about 64 MiB of data read per group).
        quiet: no progress bar.

    Returns:
        ``{"path", "rows", "row_groups", "columns", "card"}``.

    Raises:
        TransferSetError: pyarrow missing, an incomplete set, a temperature that is not stored, a bad shard.
    """
    try:
        import pyarrow.parquet  # noqa: F401  (fail here, with the install hint)
    except ImportError:
        raise TransferSetError("Parquet export needs pyarrow: pip install 'transferset[parquet]'") from None
    root, out = Path(root), Path(out)
    m = read_manifest(root)
    if not m.complete:
        raise TransferSetError(f"{root}: the transfer set is incomplete ({m.rows} of {m.expected_rows} rows); "
                               "finish it by re-running the same label command, then export")
    temps = temperature_columns(m, temperatures)
    inputs = bool(include_inputs and m.input["stored"])
    codec = codec_for(m.codec)
    names = list(codec.targets) + ["labels", "source_index", "view", "aug_seed"] + (["inputs"] if inputs else []) \
        + (list(codec.members) if include_logits else []) + [h["field"] for h in m.hints or ()]
    frames = m.positions is not None and is_frame_set(m)
    if m.positions is not None:  # token ids are the rows' input: always exported, with each row's length
        names = list(codec.targets) + ["labels", "source_index", "length"] + \
            (["inputs"] if inputs or not frames else []) + \
            (["member_log_partition"] if include_logits and "member_log_partition" in codec.members else [])
    group = _group_rows(m, names, row_group_rows)
    path = out / PARQUET_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TransferSetError(f"cannot create {path.parent}: {e.strerror or e}", FAILED) from None
    meta = json.dumps(_metadata(m, temps, include_logits, inputs), sort_keys=True)
    info: dict = {}
    atomic_write(path, lambda tmp: info.update(_write_groups(tmp, root, m, names, group, temps, include_logits,
                                                             inputs, meta, quiet)))
    card = out / CARD_NAME
    if (root / CARD_NAME).is_file() and not (root / CARD_NAME).is_symlink():
        atomic_write_bytes(card, (root / CARD_NAME).read_bytes())
    else:
        write_card(out, m)
    return {"path": str(path), "card": str(card), **info}
