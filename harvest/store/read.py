"""Reading a store (SPEC.md): `Store` opens one, by local path or fsspec URL, and reads what its manifest has
published. Only shards recorded in the manifest are readable: zarr silently reads unwritten chunks as zeros.

Reads of a remote store go through the bounded local shard cache (`cache.py`), which checks every object against the
manifest, so a damaged store fails loudly, never as zeros. The format's layout is `layout.py`; the writer `write.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from typing import NamedTuple
from functools import cached_property

import numpy as np
import torch
import zarr

from saecache.errors import StoreError
from saecache.harvest.quant import decode
from saecache.harvest.store.cache import CachedShardArray, default_cache, store_cache_id
from saecache.harvest.store.io import Location, redact_url, remote_errors
from saecache.harvest.store.layout import (
    CHUNK_CRC_VERSION, DTYPES, MANIFEST_DIR, MISSING, Geometry, check_array, check_format_version, check_header,
    final_key, is_count, json_bytes, parse_record, record_key,
    CONTEXTS, META, ROW_FIELDS, ShardLayout, acts_array, chunk_shard, meta_key, rows_array, shard_object_keys,
)
from saecache.harvest.store.shards import ObjectArray, ShardArray, check_chunk_crc

# ------------------------------------------------------------------------------------------------------------ reader


class ShardSpan(NamedTuple):
    """One complete shard of a store: its number, contexts [c0, c1) and rows [r0, r1)."""

    shard: int
    c0: int
    c1: int
    r0: int
    r1: int


_DEFAULT = object()
_WARNED: set[str] = set()  # stores (URLs) whose missing chunk checksums this process has warned about


class Store:
    """Read access to a store. Only shards recorded in the manifest are readable.

    `cache`: the local shard cache used for a remote store's array reads (default: the one configured by the
    environment, see `cache.py`; None reads remote objects directly). Local stores never use it."""

    def __init__(self, loc: Location, header: dict, cache=None):
        self.loc = loc
        self.header = header
        self.geometry = Geometry.from_header(header)
        self.cache = None if loc.local else cache
        self.version = header["format_version"]
        self._readers: dict[str, ShardArray | ObjectArray] = {}  # array name -> its reader (`reader`)
        self._manifest: dict[int, dict] | None = None
        self._objects: dict[str, dict] = {}
        self._layouts: dict[str, ShardLayout] = {}

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, read_only: bool = True, cache=_DEFAULT) -> Store:
        loc = Location(url, storage_options, read_only=read_only)
        raw = loc.get(META)
        if raw is None:
            raise StoreError(f"no store at {redact_url(url)}: zarr.json not found (harvest one with "
                             f"`saecache harvest --out {redact_url(url)}`)")
        try:
            header = json.loads(raw).get("attributes", {}).get("saecache")
        except (ValueError, AttributeError):
            raise StoreError(f"{redact_url(url)}/zarr.json is not valid zarr metadata: the store is damaged") from None
        if header is None:
            raise StoreError(f"{redact_url(url)} is a zarr group but not a saecache store (no 'saecache' attribute)")
        if isinstance(header, dict):
            check_format_version(header, redact_url(url))
        check_header(header, redact_url(url))
        if cache is _DEFAULT:
            cache = None
            if not loc.local:

                cache = default_cache()
        return cls(loc, header, cache)

    # -- metadata
    @property
    def url(self) -> str:
        """The URL without credentials (what messages and run dirs show)."""
        return redact_url(self.loc.url)

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
            entries, g = read_manifest(self.loc, self.version), self.geometry
            for s, e in entries.items():
                if s < g.n_shards and (e.get("rows") != list(g.shard_row_range(s)) or e.get("contexts") != list(
                        g.shard_contexts(s)) or sorted(e["objects"]) != sorted(self.object_keys(s))):
                    raise StoreError(f"manifest entry of shard {s} of {self.url} disagrees with the header (rows, "
                                     "contexts or objects): the store is damaged; re-copy it or re-harvest it")
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

    def shards(self, contexts: tuple[int, int] | None = None) -> Iterator[ShardSpan]:
        """The complete shards in order, as `ShardSpan`s (shard number, its contexts and rows); with ``contexts``
        = (c0, c1) only those holding some context in [c0, c1). The one loop over a store's shards."""
        g = self.geometry
        for s in self.complete_shards():
            c0, c1 = g.shard_contexts(s)
            if contexts is not None and (c1 <= contexts[0] or c0 >= contexts[1]):
                continue
            yield ShardSpan(s, c0, c1, *g.shard_row_range(s))

    @property
    def is_complete(self) -> bool:
        return len(self.complete_shards()) == self.geometry.n_shards

    @property
    def final(self) -> dict | None:
        raw = self.loc.get(final_key(self.version))
        try:
            final = None if raw is None else parse_record(raw, self.version)
        except (ValueError, KeyError, TypeError, AttributeError):
            final = []
        if final is not None and not isinstance(final, dict):
            raise StoreError(f"{self.url}/{final_key(self.version)} is not a final record: the store is damaged; "
                             "re-copy it or re-harvest it")
        return final

    def require_complete(self) -> None:
        done, n = len(self.complete_shards()), self.geometry.n_shards
        if done < n:
            raise StoreError(f"store {self.url} is incomplete: {done}/{n} shards written; rerun the harvest command "
                             "to finish it (or the missing workers)")

    # -- arrays
    @cached_property
    def group(self) -> zarr.Group:
        """The store as plain zarr sees it: what the compatibility tests compare the reader with (saecache itself
        reads rows through `read_acts`, `read_meta`, `contexts` and `chunk_reader`, which go by the manifest)."""
        return zarr.open_group(store=self.loc.zarr_store(), mode="r", zarr_format=3)

    def chunk_reader(self, hook: str) -> ShardArray | ObjectArray:
        """The inner-chunk reader of `acts/<hook>` (`read_chunk`, `read_rows`; `chunk_view` where `mappable`), the
        one choice of transport: a new shard reader over the shard files of a local store or the verified local
        cache of a remote one; byte ranges of a remote store read without the cache (`ObjectArray`, shared with
        `read_acts`). Each inner chunk's crc32c is checked as it is read (format version 3); an older store says
        once that only `verify` checks its chunks."""
        self.require_hook(hook)
        if self.version < CHUNK_CRC_VERSION and self.url not in _WARNED:
            _WARNED.add(self.url)
            print(f"warning: store {self.url} is in format version {self.version}: its chunks carry no checksum, so "
                  "reads do not check them; `saecache verify` checks its shards", file=sys.stderr)
        self.layout(acts_array(hook))
        arr = None
        if self.loc.local:
            arr = ShardArray.open(self.loc.path(acts_array(hook)))
        elif self.cache is not None:
            arr = CachedShardArray.open(self, acts_array(hook), self.cache)
        return self.reader(acts_array(hook)) if arr is None else arr

    def layout(self, name: str) -> ShardLayout:
        """The layout of array `name` (acts/<hook>, rows/<field>, contexts) from its zarr.json, checked against the
        header: a reader never trusts sizes the two disagree on."""
        if name not in self._layouts:
            raw = self.loc.get(meta_key(name))
            try:
                meta = None if raw is None else json.loads(raw)
            except ValueError:
                meta = None
            self._layouts[name] = check_array(meta, name, self.header, self.url)
        return self._layouts[name]

    def object_problem(self, key: str, data: bytes) -> str | None:
        """What the manifest's crc32c of a whole array object cannot see (None: nothing): a shard index rewritten
        with its own valid crc32c leaves the object's crc32c unchanged (the crc32c of bytes followed by their crc32c
        is a constant), so the index is parsed (`in_order`) and, from format 3, each chunk's crc32c checked."""
        name, shard = chunk_shard(key)
        lay = self.layout(name)
        try:
            spans = [(0, len(data))]
            if lay.sharded:
                n = lay.index_bytes()
                idx = lay.parse_index(data[len(data) - n:] if len(data) >= n else b"", key, len(data))
                spans = [(o, b) for o, b in idx.tolist() if o != MISSING]
            for i, (o, b) in enumerate(spans if lay.chunk_crc else []):
                check_chunk_crc(data[o:o + b - 4] if b >= 4 else b"?", data[o + b - 4:o + b], shard, i, key)
        except StoreError as e:
            return f"object {key} is corrupt ({e})"
        return None

    def require_objects(self, names: list[str]) -> None:
        """Every object of these hooks' `acts/*` arrays (or row fields' `rows/*`, a name in `ROW_FIELDS`) that the
        manifest lists exists: a missing local file would read back as zeros, silently. (A remote store's objects
        are checked as they are fetched.)"""
        if not self.loc.local:
            return
        prefixes = tuple(f"{rows_array(n) if n in ROW_FIELDS else acts_array(n)}/" for n in names)
        for s in self.complete_shards():
            for key in self.manifest()[s]["objects"]:
                if key.startswith(prefixes) and not os.path.exists(self.loc.path(key)):
                    raise StoreError(f"store {self.url} is damaged: {key} of complete shard {s} is missing; "
                                     "run `saecache verify` and re-harvest that shard")

    def reader(self, name: str) -> ShardArray | ObjectArray:
        """The reader of array `name` (`acts/<hook>`, `rows/<field>`, `contexts`), made once: the shard reader over
        a local store's files or a remote store's verified cache, else byte ranges of its objects (`ObjectArray`:
        a remote store without the cache, and `contexts`, whose objects are plain chunks)."""
        reader = self._readers.get(name)
        if reader is not None:
            return reader
        lay = self.layout(name)
        if lay.sharded and self.loc.local:
            reader = ShardArray(lay, lambda s: self.loc.path(f"{name}/{lay.key(s)}"), self.loc.path(name),
                                missing=lambda s, path: self._missing(f"{name}/{lay.key(s)}"))
        elif lay.sharded and self.cache is not None:
            reader = CachedShardArray.open(self, name, self.cache)
        if reader is None:
            reader = ObjectArray(lay, lambda s, a, b: self._get_range(f"{name}/{lay.key(s)}", a, b),
                                 lambda s: self._object_size(f"{name}/{lay.key(s)}"), f"{name} of {self.url}")
        self._readers[name] = reader
        return reader

    def _object_size(self, key: str) -> int:
        want = self.manifest_objects().get(key)
        if want is None:
            raise StoreError(f"{key} of {self.url} is not in the manifest: refusing to read unwritten rows")
        return want["nbytes"]

    def _get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object the manifest lists (through the verified cache for a remote store with
        one); a listed object that is missing raises, never reads as zeros."""
        try:
            if self.loc.local:
                with open(self.loc.path(key), "rb") as f:
                    return os.pread(f.fileno(), end - start, start)
            if self.cache is not None:
                return self.cache.read(self.loc, store_cache_id(self.url), key, self.manifest_objects()[key], start,
                                       end)
            with remote_errors(self.loc.url, f"reading {key} of"):
                return self.loc.fs.cat_file(self.loc.path(key), start=start, end=end)
        except FileNotFoundError:
            raise self._missing(key) from None

    def _missing(self, key: str) -> StoreError:
        return StoreError(f"{key} of {self.url} is listed in the manifest but missing from the store: the store is "
                          f"damaged; run `saecache verify {self.url}`")

    def _read_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of array `name` as stored, read chunk by chunk through its reader."""
        reader = self.reader(name)
        out = np.empty((r1 - r0, *reader.layout.row_shape), dtype=reader.dtype)
        step = reader.chunk_rows
        for g in range(r0 // step, -(-r1 // step)):
            a = g * step
            lo, hi = max(r0, a), min(r1, a + step)
            out[lo - r0:hi - r0] = reader.read_chunk(*divmod(g, reader.n_inner))[lo - a:hi - a]
        return out

    def row_format(self, hook: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, numpy dtype) of one stored row of `acts/<hook>`: ``(D,)`` in the storage dtype, or ``(width,)``
        uint8 for a quantized format (scale + codes)."""
        reader = self.reader(acts_array(hook))
        return reader.layout.row_shape, reader.dtype

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
        return self._read_rows(acts_array(hook), r0, r1)

    def read_acts_torch(self, hook: str, r0: int, r1: int):
        """Rows [r0, r1) as a torch tensor in the logical dtype (float16/float32/bfloat16; float32 dequantized for a
        quantized format)."""
        return to_torch(self.read_acts(hook, r0, r1), self.logical_dtype, self.hooks[hook]["d"])

    def read_meta(self, r0: int, r1: int, fields: tuple[str, ...] = ROW_FIELDS) -> dict[str, np.ndarray]:
        """Rows [r0, r1) of `rows/<field>` for each field (token, context, position)."""
        self._check_rows(r0, r1)
        return {k: self._read_rows(rows_array(k), r0, r1) for k in fields}

    def contexts(self, c0: int, c1: int) -> np.ndarray:
        """Token ids of contexts [c0, c1), shape [c1-c0, T]."""
        g = self.geometry
        for s in range(c0 // g.ctx_per_shard, (max(c1, c0 + 1) - 1) // g.ctx_per_shard + 1):
            if c1 > c0 and s not in self.manifest():
                raise StoreError(f"shard {s} of {self.url} is not complete: its contexts are not readable yet")
        return self._read_rows(CONTEXTS, c0, c1)

    # -- statistics and identity
    def stats(self, hook: str) -> dict:
        """{"mean": [D] float64, "mean_sq_norm": float, "count": int, "nonfinite": int} over complete shards."""
        self.require_hook(hook)
        final = self.final
        try:
            if final is not None:
                st = final["stats"][hook]
                st = {**st, "mean": np.asarray(st["mean"], dtype=np.float64)}
            else:
                st = aggregate_stats(self.manifest(), hook)
            ok = st["mean"].shape == (self.hooks[hook]["d"],) and is_count(st["count"], 1) and float(
                st["mean_sq_norm"]) >= 0
        except (KeyError, TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise StoreError(f"the statistics of {hook} in {self.url} are damaged (final record or manifest): "
                             "re-copy the store or re-harvest it")
        return st

    def fingerprint(self) -> str:
        return compute_fingerprint(self.header, self.manifest())

    def object_keys(self, s: int) -> list[str]:
        return shard_object_keys(self.header, s)


def read_manifest(loc: Location, version: int) -> dict[int, dict]:
    """Every manifest entry of the store at `loc`, by shard number (SPEC.md "Manifest"). An entry must name the shard
    its key names and list each object with a byte count and a crc32c."""
    entries = {}
    for name in loc.list(MANIFEST_DIR):
        key = record_key(MANIFEST_DIR, name, version)
        if name.startswith("shard-") and key is not None:
            raw = loc.get(key)
            if raw is not None:
                try:
                    entry = parse_record(raw, version)
                    s, objects = entry["shard"], entry["objects"]
                    ok = f"shard-{s:06d}" == name.removesuffix(".json") and not isinstance(s, bool) and all(
                        isinstance(o, dict) and is_count(o["nbytes"]) and is_count(o["crc32c"]) and o["crc32c"] < 2**32
                        for o in objects.values())
                except (ValueError, KeyError, TypeError, AttributeError):
                    ok = False
                if not ok:
                    raise StoreError(f"manifest entry {name} of {redact_url(loc.url)} is damaged (not a record of "
                                     "that shard with its objects' sizes and checksums): re-copy the store or "
                                     "re-harvest it")
                entries[s] = entry
    return entries


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
    h = hashlib.sha256(json_bytes(header))
    for s in sorted(manifest):
        h.update(json_bytes({"shard": s, "objects": manifest[s]["objects"]}))
    return h.hexdigest()


@contextlib.contextmanager
def single_threaded():
    """Torch CPU ops inside run on the calling thread only (main thread; elsewhere a no-op), the thread count is
    restored after. Casts of stored rows are memory-bound: a second thread gains little on a quiet machine, but
    torch's intra-op pool waits for a busy core, and on a shared 2-core machine one 4096×512 fp16→fp32 cast took
    8 ms through the pool against 0.16 ms on one thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def to_torch(a: np.ndarray, logical_dtype: str, d: int | None = None, dtype: torch.dtype | None = None):
    """Rows as stored (numpy; bfloat16 arrives as 16-bit integers, quantized formats as uint8 rows of scale + codes)
    → a torch ``[N, d]`` tensor on this thread: float formats bit-exact (a view when no cast is needed), quantized ones
    dequantized (`harvest.quant.decode`); ``dtype`` None keeps a float format's own dtype (float32 for a quantized
    one). ``d`` (the hook's width) is needed for quantized formats."""
    with single_threaded():
        return decode(a, logical_dtype, a.shape[-1] if d is None else d, dtype)
