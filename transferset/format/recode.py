"""``transferset recode``: a dense transfer set turned into a sparse one, shard by shard, in bounded memory.

The sparse set keeps the dense set's rows, shard names and row counts, its trace fields (labels, source index,
view, augmentation seed, stored inputs) and each shard's statistics; the codec's fields are computed from the
stored logits and soft targets exactly as ``label`` computes them from the ensemble (``sample`` draws are seeded
by the same global rows). Because the dense set holds float16 values where ``label`` held float32, a recoded set
is close to, not byte-identical with, one labelled with the codec; its ``definition_sha256`` says it was recoded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import TransferSetError
from .card import write_card
from .codecs import divergence, encode, resolve_codec
from .manifest import manifest_hash, read_manifest, shard_path, write_manifest
from .safety import open_shard, regular_file_inside
from .schema import Manifest, ShardEntry, parse_codec, row_bytes, schema_version_for, shard_layout
from .shards import ShardWriter, layout_chunk_rows

__all__ = ["recode"]

_BLOCK_BYTES = 32 << 20  # float64 working bytes per block of rows


def _sparse_manifest(m: Manifest, codec: str) -> Manifest:
    new = Manifest.from_json(m.to_json())
    origin = m.definition_sha256 or manifest_hash(m)
    new.codec, new.schema_version = codec, schema_version_for(codec, m.positions)
    new.shards, new.complete = [], False
    new.definition_sha256 = hashlib.sha256(json.dumps({"recoded_from": origin, "codec": codec},
                                                      sort_keys=True).encode()).hexdigest()
    largest = max([s.rows for s in m.shards] + [1])
    new.chunk_rows = layout_chunk_rows(shard_layout(new), min(new.shard_size or largest, largest))
    return new


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TransferSetError(f"{out}: exists and is not an empty folder; recode writes a new set, so choose "
                               "another folder", option="out")
    out.mkdir(parents=True, exist_ok=True)


class _Recoder:
    """Recode one dense shard at a time; sums each row's divergence per temperature."""

    def __init__(self, src: Path, m: Manifest, out: Path, new: Manifest) -> None:
        self.src, self.m, self.out, self.new = src, m, out, new
        self.layout = shard_layout(new)
        self.kl_sum = np.zeros(len(m.temperatures))
        self.rows = 0

    def shard(self, entry: ShardEntry, row_start: int) -> ShardEntry:
        path = regular_file_inside(self.src, entry.path, "shard")
        final = shard_path(self.out, entry.path)
        final.parent.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(final, entry.rows, self.layout, self.new.chunk_rows, self.new.compression)
        f = open_shard(path, entry.rows, self.m)
        try:
            m = self.m
            block = max(1, _BLOCK_BYTES // (8 * (m.num_members + len(m.temperatures)) * m.num_classes))
            for r0 in range(0, entry.rows, block):
                r1 = min(entry.rows, r0 + block)
                lp = f["soft_targets"][r0:r1].astype(np.float64)
                z = f["logits"][r0:r1].astype(np.float32)
                rows = np.arange(row_start + r0, row_start + r1, dtype=np.int64)
                if m.positions is not None:  # per position: each (row, position) is encoded as a row of its own
                    n, p = r1 - r0, m.positions
                    lp, z = lp.reshape((n * p,) + lp.shape[2:]), z.reshape((n * p,) + z.shape[2:])
                    rows = (rows[:, None] * p + np.arange(p)[None, :]).reshape(-1)
                arrays = encode(self.new.codec, z, lp, rows, m.temperatures, m.dtype)
                div = divergence(self.new.codec, lp, arrays)
                if m.positions is not None:
                    arrays = {k: v.reshape((r1 - r0, m.positions) + v.shape[1:]) for k, v in arrays.items()}
                    if m.num_members == 1:
                        arrays.pop("topk_logits", None)
                    div = div.reshape(r1 - r0, m.positions, -1).mean(axis=1)
                self.kl_sum += div.sum(axis=0)
                for name in self.layout:
                    if name not in arrays:
                        arrays[name] = f[name][r0:r1]
                writer.write(r0, arrays)
        except BaseException:
            writer.abort()
            raise
        finally:
            f.close()
        self.rows += entry.rows
        digest = writer.finish()
        return ShardEntry(entry.path, entry.rows, digest, row_start=row_start, bytes=final.stat().st_size,
                          stats=entry.stats)


def recode(src: str | os.PathLike, out: str | os.PathLike, codec: str) -> dict:
    """Write the dense set ``src`` as a ``codec`` set into the new folder ``out``.

    Returns ``{"rows", "codec", "row_bytes": {"dense", codec}, "temperatures", "kl", "kl_direction"}`` where
    ``kl`` is the mean over rows, per stored temperature, of :func:`transferset.format.codecs.divergence`
    (KL(dense || decoded) for topk; for sample the finite reverse, KL(count/K || dense)).
    """
    src, out = Path(src), Path(out)
    m = read_manifest(src)
    family, _ = parse_codec(codec)
    if family == "dense" or m.codec != "dense":
        raise TransferSetError(f"recode turns a dense set into a sparse one; {src} is {m.codec} and the codec asked "
                               f"is {codec}", option="codec")
    if not m.complete:
        raise TransferSetError(f"{src}: the transfer set is incomplete; finish it by re-running its label command")
    resolve_codec(codec, m.num_classes)
    _check_out(out)
    new = _sparse_manifest(m, codec)
    rec = _Recoder(src, m, out, new)
    start = 0
    for entry in m.shards:
        row_start = entry.row_start if entry.row_start is not None else start
        new.shards.append(rec.shard(entry, row_start))
        start = row_start + entry.rows
        new.complete = len(new.shards) == len(m.shards)
        new.stats = new.compute_stats() if all(s.stats for s in new.shards) else m.stats
        write_manifest(out, new)
    write_card(out, new)
    dense_b = row_bytes(shard_layout(m))
    return {"rows": rec.rows, "codec": codec, "temperatures": m.temperatures,
            "row_bytes": {"dense": dense_b, codec: row_bytes(rec.layout)},
            "kl": [float(v) / max(rec.rows, 1) for v in rec.kl_sum],
            "kl_direction": "KL(dense || decoded)" if family == "topk" else "KL(count/K || dense)"}
