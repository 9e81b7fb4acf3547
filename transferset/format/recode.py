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
from .codecs import codec_for, resolve_codec
from .manifest import manifest_hash, shard_path, write_manifest
from .reading import TransferSet
from .schema import Manifest, ShardEntry, row_bytes, schema_version_for, shard_layout
from .shards import ShardWriter, layout_chunk_rows

__all__ = ["recode"]

_BLOCK_BYTES = 32 << 20  # float64 working bytes per block of rows


def _sparse_manifest(m: Manifest, codec: str) -> Manifest:
    new = Manifest.from_json(m.to_json())
    origin = m.definition_sha256 or manifest_hash(m)
    new.codec, new.schema_version = codec, schema_version_for(codec, m.positions, hints=bool(m.hints))  # hints are copied as they are
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

    def __init__(self, ts: TransferSet, out: Path, new: Manifest) -> None:
        self.ts, self.m, self.out, self.new = ts, ts.manifest, out, new
        self.codec = codec_for(new.codec)
        self.layout = shard_layout(new)
        self.kl_sum = np.zeros(len(self.m.temperatures))
        self.rows = 0

    def shard(self, k: int, row_start: int) -> ShardEntry:
        entry, m = self.m.shards[k], self.m
        final = shard_path(self.out, entry.path)
        final.parent.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(final, entry.rows, self.layout, self.new.chunk_rows, self.new.compression)
        kept = [n for n in self.layout if n not in self.codec.fields]  # trace fields, copied as they are
        source = self.ts.codec.fields  # the dense fields the codec is computed from
        block = max(1, _BLOCK_BYTES // (8 * (m.num_members + len(m.temperatures)) * m.num_classes))
        try:
            for r0 in range(0, entry.rows, block):
                r1 = min(entry.rows, r0 + block)
                got = self.ts.read(k, r0, r1, list(source) + kept)
                lp = got["soft_targets"].astype(np.float64)
                z = got["logits"].astype(np.float32)
                rows = np.arange(row_start + r0, row_start + r1, dtype=np.int64)
                if m.positions is not None:  # per position: each (row, position) is encoded as a row of its own
                    n, p = r1 - r0, m.positions
                    lp, z = lp.reshape((n * p,) + lp.shape[2:]), z.reshape((n * p,) + z.shape[2:])
                    rows = (rows[:, None] * p + np.arange(p)[None, :]).reshape(-1)
                arrays = self.codec.encode(z, lp, rows, m.temperatures, m.dtype)
                div = self.codec.divergence(lp, arrays)
                if m.positions is not None:
                    arrays = {k: v.reshape((r1 - r0, m.positions) + v.shape[1:]) for k, v in arrays.items()}
                    div = div.reshape(r1 - r0, m.positions, -1).mean(axis=1)
                self.kl_sum += div.sum(axis=0)
                writer.write(r0, {name: arrays[name] if name in arrays else got[name] for name in self.layout})
        except BaseException:
            writer.abort()
            raise
        finally:
            self.ts.close()
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
    target = codec_for(codec)
    ts = TransferSet(src)
    m = ts.manifest
    if not target.sparse or ts.codec.sparse:
        raise TransferSetError(f"recode turns a dense set into a sparse one; {src} is {m.codec} and the codec asked "
                               f"is {codec}", option="codec")
    if not m.complete:
        raise TransferSetError(f"{src}: the transfer set is incomplete; finish it by re-running its label command")
    resolve_codec(codec, m.num_classes)
    _check_out(out)
    new = _sparse_manifest(m, codec)
    rec = _Recoder(ts, out, new)
    for k in range(len(m.shards)):
        new.shards.append(rec.shard(k, int(ts.row_starts[k])))
        new.complete = len(new.shards) == len(m.shards)
        new.stats = new.compute_stats() if all(s.stats for s in new.shards) else m.stats
        write_manifest(out, new)
    write_card(out, new)
    dense_b = row_bytes(shard_layout(m))
    return {"rows": rec.rows, "codec": codec, "temperatures": m.temperatures,
            "row_bytes": {"dense": dense_b, codec: row_bytes(rec.layout)},
            "kl": [float(v) / max(rec.rows, 1) for v in rec.kl_sum],
            "kl_direction": target.divergence_direction}
