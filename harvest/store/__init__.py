"""The store format, in one package (SPEC.md): `layout` (format version, key names, codec chain, geometry, array
metadata, the within-shard permutation: pure), `io` (a store root, the one atomic write, checksums, URL redaction,
remote errors), `read` (`Store`), `shards` (the hand-written shard reader), `cache` (the verified local cache of remote
shards), `files` (bounded open files and maps), `encode` (shard objects encoded by hand) and `write` (`StoreWriter`).

Imports run one way inside: layout, io, files ← shards ← cache ← read ← encode, write. The names below are the
package's public API; `from saecache.harvest.store import Store` is what the other stages use.
"""

from saecache.harvest.store.cache import CacheConfig, CachedShardArray, ShardCache, default_cache, store_cache_id
from saecache.harvest.store.encode import ObjectEncoder, made_ahead
from saecache.harvest.store.files import FilePool, default_pool, map_file
from saecache.harvest.store.io import (
    Location, check_object, checksum, describe_error, open_filesystem, redact_url, remote_errors, write_atomic,
)
from saecache.harvest.store.layout import (
    ACTS_DIR, BOOKKEEPING_GROUPS, CLAIMS_DIR, CODECS, CONTEXTS, DTYPES, FINAL_DIR, FORMAT_VERSION, MANIFEST_DIR, META,
    PLAN_DIR, PLAN_FILE, PLAN_NODE, PLANNER_FILE, ROW_FIELDS, STATE_FILE, TOP_LEVEL, Geometry, ShardLayout, acts_array,
    check_format_version, chunk_key, chunk_shard, claim_key, final_key, json_bytes, manifest_key, meta_key,
    metadata_keys, parse_record, record_bytes, record_key, rows_array, shard_object_keys, shard_permutation,
    unpermuted_meta,
)
from saecache.harvest.store.read import (
    ShardSpan, Store, aggregate_stats, compute_fingerprint, read_manifest, single_threaded, to_torch,
)
from saecache.harvest.store.shards import ShardArray
from saecache.harvest.store.write import StoreWriter, diff_keys, probe_store_dir, process_is_live

__all__ = [
    "ACTS_DIR", "BOOKKEEPING_GROUPS", "CLAIMS_DIR", "CODECS", "CONTEXTS", "CacheConfig", "CachedShardArray", "DTYPES",
    "FINAL_DIR", "FORMAT_VERSION", "FilePool", "Geometry", "Location", "MANIFEST_DIR", "ObjectEncoder", "PLAN_DIR",
    "ROW_FIELDS", "ShardArray", "ShardCache", "ShardLayout", "ShardSpan", "Store", "StoreWriter", "TOP_LEVEL",
    "acts_array", "aggregate_stats", "check_format_version", "check_object", "checksum", "claim_key",
    "compute_fingerprint", "default_cache", "default_pool", "describe_error", "diff_keys", "final_key", "json_bytes",
    "made_ahead", "manifest_key", "map_file", "metadata_keys", "open_filesystem", "parse_record", "probe_store_dir",
    "process_is_live", "read_manifest", "record_bytes", "record_key", "redact_url", "remote_errors", "rows_array",
    "shard_object_keys", "shard_permutation", "single_threaded", "store_cache_id", "to_torch", "unpermuted_meta",
    "write_atomic",
    # key names (layout.py)
    "META", "PLAN_FILE", "PLAN_NODE", "PLANNER_FILE", "STATE_FILE", "chunk_key", "chunk_shard", "meta_key",
]
