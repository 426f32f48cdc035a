"""The activation store: geometry, writer and reader of the format written down in `SPEC.md` (the contract between
stages and teammates).

zarr v3 does the array layout, sharding and codecs. What zarr does not do is written here by hand: whole-shard
publication through a manifest (zarr silently reads unwritten chunks as zeros), per-shard checksums, per-shard
statistics, worker claims and the final record. Local paths use zarr's LocalStore; any other URL goes through fsspec
(`remote.py` turns backend failures into one-line errors). Reads of a remote store go through the bounded local shard
cache (`cache.py`), which checks every object against the manifest, so a damaged store fails loudly, never as zeros.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from saecache import __version__
from saecache.errors import StoreError
from saecache.harvest.quant import FORMATS
from saecache.harvest.remote import _Location, safe_url

FORMAT_VERSION = 2
MANIFEST_DIR = "_manifest"
CLAIMS_DIR = "_claims"
FINAL_DIR = "_final"
BOOKKEEPING_GROUPS = (MANIFEST_DIR, CLAIMS_DIR)  # empty zarr groups made with the store (version >= 2)

# storage format name -> (zarr dtype, logical dtype); the formats themselves (and their decoding) are in quant.py
DTYPES = {name: (f.zarr_dtype, name) for name, f in FORMATS.items()}

# codec name -> factory of the zarr compressor inside the sharding codec (None = uncompressed)
CODECS = {
    "blosc-zstd": lambda: BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
    "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
    "zstd": lambda: ZstdCodec(level=3),
    "none": lambda: None,
}


@dataclass(frozen=True)
class Geometry:
    """Where every context and row lives (SPEC.md "Geometry"). Pure arithmetic, no I/O."""

    ctx_len: int
    first_position: int
    ctx_per_chunk: int
    chunks_per_shard: int
    n_contexts: int

    @property
    def rows_per_context(self) -> int:
        return self.ctx_len - self.first_position

    @property
    def chunk_rows(self) -> int:
        return self.ctx_per_chunk * self.rows_per_context

    @property
    def shard_rows(self) -> int:
        return self.chunks_per_shard * self.chunk_rows

    @property
    def ctx_per_shard(self) -> int:
        return self.ctx_per_chunk * self.chunks_per_shard

    @property
    def n_rows(self) -> int:
        return self.n_contexts * self.rows_per_context

    @property
    def n_shards(self) -> int:
        return -(-self.n_contexts // self.ctx_per_shard)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def shard_contexts(self, s: int) -> tuple[int, int]:
        c0 = s * self.ctx_per_shard
        return c0, min(c0 + self.ctx_per_shard, self.n_contexts)

    def shard_row_range(self, s: int) -> tuple[int, int]:
        c0, c1 = self.shard_contexts(s)
        r0 = s * self.shard_rows
        return r0, r0 + (c1 - c0) * self.rows_per_context

    def chunk_row_range(self, g: int) -> tuple[int, int]:
        """Rows of global inner chunk `g` (chunk `g % chunks_per_shard` of shard `g // chunks_per_shard`)."""
        r0 = g * self.chunk_rows
        return r0, min(r0 + self.chunk_rows, self.n_rows)

    def shard_of_row(self, r: int) -> int:
        return r // self.shard_rows

    @staticmethod
    def default_ctx_per_chunk(rows_per_context: int, target_rows: int = 4096) -> int:
        return max(1, round(target_rows / rows_per_context))

    @classmethod
    def from_header(cls, header: dict) -> Geometry:
        st = header["storage"]
        return cls(header["ctx_len"], st["first_position"], st["ctx_per_chunk"], st["chunks_per_shard"],
                   header["n_contexts"])


def shard_permutation(seed: int, shard: int, n_rows: int) -> np.ndarray:
    """Stored row j of a shard is unpermuted row perm[j] (SPEC.md "Row order inside a shard")."""
    return np.random.default_rng([seed, shard]).permutation(n_rows)


def unpermuted_meta(geom: Geometry, shard: int, contexts_CT: np.ndarray) -> dict[str, np.ndarray]:
    """token/context/position of the shard's rows in unpermuted order; contexts_CT holds the shard's contexts."""
    c0, c1 = geom.shard_contexts(shard)
    n_ctx, rpc, p0 = c1 - c0, geom.rows_per_context, geom.first_position
    return {
        "token": contexts_CT[:, p0:].reshape(-1).astype(np.int32),
        "context": np.repeat(np.arange(c0, c1, dtype=np.int32), rpc),
        "position": np.tile(np.arange(p0, geom.ctx_len, dtype=np.int16), n_ctx),
    }


# ---------------------------------------------------------------------------------------------------------- I/O base


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1).encode()


def shard_object_keys(header: dict, s: int) -> list[str]:
    """Every zarr object written for shard `s` (SPEC.md "Manifest")."""
    keys = [f"acts/{h}/c/{s}/0" for h in sorted(header["hooks"])]
    keys += [f"rows/{name}/c/{s}" for name in ("token", "context", "position")]
    keys.append(f"contexts/c/{s}/0")
    return keys


# Bookkeeping layout (SPEC.md "Manifest", "Final record", "Claims"). Version 1 wrote plain JSON files, which plain zarr
# lists as unknown objects (a warning per file on every tree()/members()); from version 2 every record is a zarr group
# node whose attributes["saecache"] hold the record, written as one object, atomically, as before.


def manifest_key(s: int, version: int = FORMAT_VERSION) -> str:
    return f"{MANIFEST_DIR}/shard-{s:06d}.json" if version == 1 else f"{MANIFEST_DIR}/shard-{s:06d}/zarr.json"


def final_key(version: int = FORMAT_VERSION) -> str:
    return "_final.json" if version == 1 else f"{FINAL_DIR}/zarr.json"


def claim_key(worker: int, n_workers: int, version: int = FORMAT_VERSION) -> str:
    name = f"worker-{worker:05d}-of-{n_workers:05d}"
    return f"{CLAIMS_DIR}/{name}.json" if version == 1 else f"{CLAIMS_DIR}/{name}/zarr.json"


def record_key(prefix: str, name: str, version: int) -> str | None:
    """Key of the record listed as `name` under `prefix` (a file in version 1, a group node after), None if `name`
    is not a record (the prefix's own zarr.json, a temporary file)."""
    if version == 1:
        return f"{prefix}/{name}" if name.endswith(".json") and not name.startswith(".") else None
    return None if "." in name else f"{prefix}/{name}/zarr.json"


def record_bytes(record: dict, version: int = FORMAT_VERSION) -> bytes:
    """The bytes of a bookkeeping record: JSON (version 1) or a zarr group node carrying it as an attribute."""
    if version == 1:
        return _json_bytes(record)
    return _json_bytes({"zarr_format": 3, "node_type": "group", "attributes": {"saecache": record}})


def parse_record(raw: bytes, version: int) -> dict:
    doc = json.loads(raw)
    return doc if version == 1 else doc["attributes"]["saecache"]


# ------------------------------------------------------------------------------------------------------------ reader


_DEFAULT = object()


class Store:
    """Read access to a store. Only shards recorded in the manifest are readable.

    `cache`: the local shard cache used for a remote store's array reads (default: the one configured by the
    environment, see `cache.py`; None reads remote objects directly). Local stores never use it."""

    def __init__(self, loc: _Location, header: dict, cache=None):
        self.loc = loc
        self.header = header
        self.geometry = Geometry.from_header(header)
        self.cache = None if loc.local else cache
        self.version = header["format_version"]
        self._manifest: dict[int, dict] | None = None
        self._objects: dict[str, dict] = {}

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, read_only: bool = True, cache=_DEFAULT) -> Store:
        loc = _Location(url, storage_options, read_only=read_only)
        raw = loc.get("zarr.json")
        if raw is None:
            raise StoreError(f"no store at {safe_url(url)}: zarr.json not found (harvest one with "
                             f"`saecache harvest --out {safe_url(url)}`)")
        try:
            header = json.loads(raw).get("attributes", {}).get("saecache")
        except (ValueError, AttributeError):
            raise StoreError(f"{safe_url(url)}/zarr.json is not valid zarr metadata: the store is damaged") from None
        if header is None:
            raise StoreError(f"{safe_url(url)} is a zarr group but not a saecache store (no 'saecache' attribute)")
        check_format_version(header, safe_url(url))
        if cache is _DEFAULT:
            cache = None
            if not loc.local:
                from saecache.harvest.cache import default_cache

                cache = default_cache()
        return cls(loc, header, cache)

    # -- metadata
    @property
    def url(self) -> str:
        """The URL without credentials (what messages and run dirs show)."""
        return safe_url(self.loc.url)

    @property
    def hooks(self) -> dict[str, dict]:
        return self.header["hooks"]

    @property
    def seed(self) -> int:
        return self.header["seed"]

    @property
    def logical_dtype(self) -> str:
        return DTYPES[self.header["storage"]["dtype"]][1]

    def require_hook(self, hook: str) -> dict:
        if hook not in self.hooks:
            raise StoreError(f"store {self.url} has no hook {hook!r}; it has: {', '.join(sorted(self.hooks))}")
        return self.hooks[hook]

    def manifest(self, refresh: bool = False) -> dict[int, dict]:
        if self._manifest is None or refresh:
            entries = {}
            for name in self.loc.list(MANIFEST_DIR):
                key = record_key(MANIFEST_DIR, name, self.version)
                if name.startswith("shard-") and key is not None:
                    raw = self.loc.get(key)
                    if raw is not None:
                        try:
                            entry = parse_record(raw, self.version)
                            entries[int(entry["shard"])] = entry
                        except (ValueError, KeyError, TypeError):
                            raise StoreError(f"manifest entry {name} of {self.url} is not valid JSON with a shard "
                                             "number: the store is damaged; run `saecache verify`") from None
            self._manifest = entries
            self._objects = {k: v for e in entries.values() for k, v in e["objects"].items()}
        return self._manifest

    def manifest_objects(self) -> dict[str, dict]:
        """Every object the manifest lists, key -> {"nbytes", "crc32c"} (the shards published so far)."""
        self.manifest()
        return self._objects

    def restrict_to_shards(self, shards) -> None:
        """Read only these published shards from now on (a DDP run's ranks agree on rank 0's view of a store that is
        still being harvested); every one must be in this process's manifest."""
        m = self.manifest()
        self._manifest = {s: m[s] for s in shards}
        self._objects = {k: v for e in self._manifest.values() for k, v in e["objects"].items()}

    def complete_shards(self, refresh: bool = False) -> list[int]:
        return sorted(s for s in self.manifest(refresh) if s < self.geometry.n_shards)

    @property
    def is_complete(self) -> bool:
        return len(self.complete_shards()) == self.geometry.n_shards

    @property
    def final(self) -> dict | None:
        raw = self.loc.get(final_key(self.version))
        return None if raw is None else parse_record(raw, self.version)

    def require_complete(self) -> None:
        done, n = len(self.complete_shards()), self.geometry.n_shards
        if done < n:
            raise StoreError(f"store {self.url} is incomplete: {done}/{n} shards written; rerun the harvest command "
                             "to finish it (or the missing workers)")

    # -- arrays
    @cached_property
    def group(self) -> zarr.Group:
        from saecache.harvest.cache import store_cache_id

        zstore = self.loc.zarr_store(self.manifest_objects, self.cache, store_cache_id(self.url))
        return zarr.open_group(store=zstore, mode="r", zarr_format=3)

    def cached_array(self, hook: str):
        """Fast inner-chunk reader of `acts/<hook>` through the shard cache (remote stores with a cache), else None.
        Same `read_rows` contract as the local direct reader of the training loader."""
        if self.loc.local or self.cache is None:
            return None
        from saecache.harvest.cache import CachedShardArray

        return CachedShardArray.open(self, hook, self.cache)

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def _check_rows(self, r0: int, r1: int) -> None:
        if not 0 <= r0 <= r1 <= self.geometry.n_rows:
            raise StoreError(f"rows [{r0}, {r1}) outside the store's {self.geometry.n_rows} rows")
        done = self.manifest()
        for s in range(self.geometry.shard_of_row(r0), self.geometry.shard_of_row(max(r1 - 1, r0)) + 1):
            if r1 > r0 and s not in done:
                raise StoreError(f"shard {s} of {self.url} is not complete (no manifest entry): refusing to read "
                                 "unwritten rows, which zarr would return as zeros")

    def read_acts(self, hook: str, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of a hook as stored: shape [r1-r0, D] in the storage dtype (uint16 bits for bf16), or
        [r1-r0, width] uint8 rows (scale + codes) for a quantized format (SPEC.md "Formats")."""
        self.require_hook(hook)
        self._check_rows(r0, r1)
        return self.array(f"acts/{hook}")[r0:r1]

    def read_acts_torch(self, hook: str, r0: int, r1: int):
        """Rows [r0, r1) as a torch tensor in the logical dtype (float16/float32/bfloat16; float32 dequantized for a
        quantized format)."""
        return to_torch(self.read_acts(hook, r0, r1), self.logical_dtype, self.hooks[hook]["d"])

    def read_meta(self, r0: int, r1: int) -> dict[str, np.ndarray]:
        self._check_rows(r0, r1)
        return {k: self.array(f"rows/{k}")[r0:r1] for k in ("token", "context", "position")}

    def contexts(self, c0: int, c1: int) -> np.ndarray:
        """Token ids of contexts [c0, c1), shape [c1-c0, T]."""
        g = self.geometry
        for s in range(c0 // g.ctx_per_shard, (max(c1, c0 + 1) - 1) // g.ctx_per_shard + 1):
            if c1 > c0 and s not in self.manifest():
                raise StoreError(f"shard {s} of {self.url} is not complete: its contexts are not readable yet")
        return self.array("contexts")[c0:c1]

    # -- statistics and identity
    def stats(self, hook: str) -> dict:
        """{"mean": [D] float64, "mean_sq_norm": float, "count": int, "nonfinite": int} over complete shards."""
        self.require_hook(hook)
        final = self.final
        if final is not None:
            st = final["stats"][hook]
            return {**st, "mean": np.asarray(st["mean"], dtype=np.float64)}
        return aggregate_stats(self.manifest(), hook)

    def fingerprint(self) -> str:
        return compute_fingerprint(self.header, self.manifest())

    def object_keys(self, s: int) -> list[str]:
        return shard_object_keys(self.header, s)


def aggregate_stats(manifest: dict[int, dict], hook: str) -> dict:
    """Per-hook statistics over the given shards; `rel_mse` (quantization error, SPEC.md) when every shard has it."""
    count, total, sq, nonfinite, err = 0, None, 0.0, 0, [0.0, 0.0]
    for s in sorted(manifest):
        st = manifest[s]["stats"][hook]
        count += st["count"]
        sq += st["sum_sq_norm"]
        nonfinite += st["nonfinite"]
        v = np.asarray(st["sum"], dtype=np.float64)
        total = v if total is None else total + v
        if err is not None and "sq_err" in st:
            err = [err[0] + st["sq_err"], err[1] + st["sq_exact"]]
        else:
            err = None
    if count == 0:
        raise StoreError("no complete shards: statistics are not available yet")
    out = {"mean": total / count, "mean_sq_norm": sq / count, "count": count, "nonfinite": nonfinite}
    if err is not None:
        out["rel_mse"] = err[0] / err[1] if err[1] > 0 else 0.0
    return out


def compute_fingerprint(header: dict, manifest: dict[int, dict]) -> str:
    h = hashlib.sha256(_json_bytes(header))
    for s in sorted(manifest):
        h.update(_json_bytes({"shard": s, "objects": manifest[s]["objects"]}))
    return h.hexdigest()


def check_format_version(header: dict, url: str) -> None:
    v = header.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise StoreError(f"store {url} has format version {v}, newer than this saecache ({__version__}) reads "
                         f"(version {FORMAT_VERSION}); upgrade saecache")


def to_torch(a: np.ndarray, logical_dtype: str, d: int | None = None):
    """Stored rows → torch: float formats bit-exact in their own dtype, quantized ones dequantized to float32."""
    from saecache.harvest.quant import decode

    return decode(a, logical_dtype, a.shape[1] if d is None else d, None)


def checksum(data: bytes) -> dict:
    return {"nbytes": len(data), "crc32c": crc32c.crc32c(data)}
