"""The transfer-set format: schema (every field, the manifest), the shard writer, manifest I/O and verify."""

from .manifest import MANIFEST_NAME, manifest_hash, shard_path, write_manifest
from .parts import load_manifest, read_manifest
from .schema import SCHEMA_VERSION, SHARD_FIELDS, Manifest, ShardEntry, ShardField, shard_layout
from .verify import check_shard, value_fault, verify_transfer_set

__all__ = ["MANIFEST_NAME", "SCHEMA_VERSION", "SHARD_FIELDS", "Manifest", "ShardEntry", "ShardField",
           "shard_layout", "read_manifest", "load_manifest", "write_manifest", "shard_path", "manifest_hash",
           "check_shard", "verify_transfer_set"]
