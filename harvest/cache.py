"""A bounded local cache of whole shard objects of remote stores, and the loader's fast reader on top of it.

Training reads random inner chunks many times. From object storage every read is a round trip, so the first touch of
a shard object downloads it whole (one GET), checks it against the crc32c and byte count in the store's manifest,
and keeps it on local disk; later reads are `os.pread` + a decode, as for a local store. Least recently used
objects are evicted once the cache holds more than `max_bytes`.

Integrity comes for free: an object that is missing remotely, or whose bytes disagree with the manifest, raises a
one-line `StoreError` instead of reaching the trainer (zarr alone would return zeros for a missing object).

Why hand-written: fsspec's `filecache`/`blockcache` do not bound the cache in bytes, do not check content against our
manifest, and `blockcache` fetches fixed-size blocks rather than the object (= one shard, the unit we checksum).
`CachedShardArray` repeats the few lines of zarr v3 shard-index parsing that `saecache.train.shard_reader` has,
because harvest must not import from train.

Configuration (environment, read when the first remote store is opened; `CacheConfig` documents the fields):
`SAECACHE_CACHE_DIR` (default `$XDG_CACHE_HOME/saecache/shards`, i.e. `~/.cache/saecache/shards`),
`SAECACHE_CACHE_GB` (default 20; 0 turns the cache off). Several processes (e.g. DDP ranks) may share one
directory: files are published by rename, each process re-checks a file against the manifest before its first use,
and a file evicted by one process while another reads it stays readable to the reader (POSIX). Each process counts
the files it found at start plus those it fetched, so with N processes the directory can briefly exceed the bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import crc32c
import numcodecs
import numpy as np

from saecache.errors import ConfigError, StoreError

_MISSING = np.uint64(2**64 - 1)


@dataclass(frozen=True)
class CacheConfig:
    """Where and how much of remote stores is kept locally."""

    dir: str
    """Directory of cached shard objects (one subdirectory per store URL)."""
    max_bytes: int
    """Upper bound of the cache's size on disk; least recently used objects are removed beyond it (0 = no cache)."""

    @classmethod
    def from_env(cls) -> CacheConfig:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.environ.get("SAECACHE_CACHE_DIR") or os.path.join(base, "saecache", "shards")
        try:
            gb = float(os.environ.get("SAECACHE_CACHE_GB", "20"))
        except ValueError:
            raise ConfigError(f"SAECACHE_CACHE_GB must be a number of GiB, got {os.environ['SAECACHE_CACHE_GB']!r}")
        return cls(d, int(gb * 2**30))


class ShardCache:
    """Whole objects of remote stores on local disk, verified against the manifest, bounded in bytes (LRU)."""

    def __init__(self, cfg: CacheConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # path -> bytes, least recently used first
        self._checked: set[str] = set()  # files verified against the manifest by this process
        self._inflight: dict[str, threading.Event] = {}
        self.hits = self.misses = self.bytes_fetched = 0
        self._scan()

    def _scan(self) -> None:
        """Account for files left by earlier processes (oldest first), so the bound holds across runs."""
        found = []
        for dirpath, _, files in os.walk(self.cfg.dir):
            for f in files:
                if ".tmp-" in f:
                    continue
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                found.append((st.st_mtime, p, st.st_size))
        for _, p, n in sorted(found):
            self._entries[p] = n

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._entries.values())

    def local_path(self, store_id: str, key: str, want: dict) -> str:
        return os.path.join(self.cfg.dir, store_id, f"{key}.{want['crc32c']:08x}")

    def fetch(self, loc, store_id: str, key: str, want: dict) -> str:
        """Local path of object `key` of the store at `loc`, downloaded and checked against `want`
        (its manifest entry: nbytes, crc32c) unless already cached."""
        path = self.local_path(store_id, key, want)
        while True:
            with self._lock:
                if path in self._entries and os.path.exists(path):
                    self._entries.move_to_end(path)
                    if path in self._checked:
                        self.hits += 1
                        return path
                ev = self._inflight.get(path)
                if ev is None:
                    self._inflight[path] = threading.Event()
                    break
            ev.wait()
        try:
            if os.path.exists(path) and _matches(path, want):  # left by an earlier run or another process
                with self._lock:
                    self._entries[path] = want["nbytes"]
                    self._entries.move_to_end(path)
                    self._checked.add(path)
                    self.hits += 1
                    self._evict(keep=path)
                return path
            data = loc.get(key)
            if data is None:
                raise StoreError(f"{key} of {_safe(loc.url)} is listed in the manifest but missing from the store: "
                                 f"the store is damaged; run `saecache verify {_safe(loc.url)}` and re-copy or "
                                 "re-harvest that shard")
            got = {"nbytes": len(data), "crc32c": crc32c.crc32c(data)}
            if got != {"nbytes": want["nbytes"], "crc32c": want["crc32c"]}:
                raise StoreError(f"{key} of {_safe(loc.url)} does not match its manifest checksum ({got['nbytes']} "
                                 f"bytes, crc32c {got['crc32c']} vs {want['nbytes']}, {want['crc32c']}): the store is "
                                 f"corrupt; run `saecache verify {_safe(loc.url)}`")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            with self._lock:
                self.misses += 1
                self.bytes_fetched += len(data)
                self._entries[path] = len(data)
                self._entries.move_to_end(path)
                self._checked.add(path)
                self._evict(keep=path)
            return path
        finally:
            with self._lock:
                self._inflight.pop(path).set()

    def _evict(self, keep: str) -> None:
        total = sum(self._entries.values())
        while total > self.cfg.max_bytes and len(self._entries) > 1:
            p, n = next(iter(self._entries.items()))
            if p == keep:
                self._entries.move_to_end(p)
                continue
            del self._entries[p]
            self._checked.discard(p)
            total -= n
            try:  # readers holding the file open keep reading it (POSIX); the next fetch downloads it again
                os.remove(p)
            except FileNotFoundError:
                pass

    def open(self, loc, store_id: str, key: str, want: dict) -> int:
        """An open read-only file descriptor of the cached object (caller closes it)."""
        for _ in range(3):
            path = self.fetch(loc, store_id, key, want)
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # evicted by another thread or process in between: fetch again
                with self._lock:
                    self._entries.pop(path, None)
                    self._checked.discard(path)
        raise StoreError(f"cannot keep {key} in the shard cache {self.cfg.dir}: it is evicted as soon as it is "
                         "fetched; raise SAECACHE_CACHE_GB")

    def read(self, loc, store_id: str, key: str, want: dict, start: int = 0, end: int | None = None) -> bytes:
        fd = self.open(loc, store_id, key, want)
        try:
            end = want["nbytes"] if end is None else end
            return os.pread(fd, max(0, end - start), start)
        finally:
            os.close(fd)


def _matches(path: str, want: dict) -> bool:
    with open(path, "rb") as f:
        data = f.read()
    return len(data) == want["nbytes"] and crc32c.crc32c(data) == want["crc32c"]


def _safe(url: str) -> str:
    from saecache.harvest.remote import safe_url

    return safe_url(url)


def store_cache_id(url: str) -> str:
    """Directory name of a store inside the cache: readable tail of the URL + a hash of the whole URL."""
    from saecache.harvest.remote import safe_url

    u = safe_url(url).rstrip("/")
    tail = "".join(c if c.isalnum() or c in "-_." else "_" for c in u.rsplit("/", 1)[-1])[:40]
    return f"{tail}-{hashlib.sha256(u.encode()).hexdigest()[:16]}"


_CACHES: dict[CacheConfig, ShardCache] = {}
_CACHES_LOCK = threading.Lock()


def default_cache() -> ShardCache | None:
    """The process-wide cache configured by the environment (None when SAECACHE_CACHE_GB=0)."""
    cfg = CacheConfig.from_env()
    if cfg.max_bytes <= 0:
        return None
    with _CACHES_LOCK:
        if cfg not in _CACHES:
            _CACHES[cfg] = ShardCache(cfg)
        return _CACHES[cfg]


def inner_decoder(codecs: list[dict]):
    """numcodecs decoder of the inner codec chain (None for raw bytes); KeyError when we do not handle it."""
    names = [c["name"] for c in codecs]
    if names[0] != "bytes" or codecs[0].get("configuration", {}).get("endian", "little") != "little":
        raise KeyError("inner codecs must start with little-endian bytes")
    if len(codecs) == 1:
        return None
    if len(codecs) == 2 and names[1] == "blosc":
        return numcodecs.Blosc()
    if len(codecs) == 2 and names[1] == "zstd":
        return numcodecs.Zstd()
    raise KeyError(f"unsupported codec chain {names}")


class CachedShardArray:
    """Inner-chunk reads of one `acts/<hook>` array of a remote store through the shard cache. Same `read_rows`
    contract as `saecache.train.shard_reader.DirectArray`; never returns rows of a shard not in the manifest."""

    def __init__(self, store, hook: str, cache: ShardCache, meta: dict):
        shard = meta["codecs"][0]["configuration"]
        self.store, self.hook, self.cache = store, hook, cache
        self.store_id = store_cache_id(store.url)
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.shard_rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        self.chunk_rows = shard["chunk_shape"][0]
        self.n_inner = self.shard_rows // self.chunk_rows
        self._decode = inner_decoder(shard["codecs"])
        self._crc = any(c["name"] == "crc32c" for c in shard["index_codecs"])
        self._index: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, store, hook: str, cache: ShardCache) -> CachedShardArray | None:
        """The cached reader of `acts/<hook>`, or None when its layout is not the one saecache writes."""
        raw = store.loc.get(f"acts/{hook}/zarr.json")
        try:
            meta = json.loads(raw)
            codecs = meta["codecs"]
            if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
                return None
            conf = codecs[0]["configuration"]
            if (len(meta["shape"]) != 2 or conf["chunk_shape"][1] != meta["shape"][1]
                    or conf.get("index_location", "end") != "end" or meta["chunk_key_encoding"]["name"] != "default"
                    or meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") != "/"
                    or [c["name"] for c in conf["index_codecs"]] not in (["bytes"], ["bytes", "crc32c"])):
                return None
            return cls(store, hook, cache, meta)
        except (KeyError, TypeError, ValueError):
            return None

    def _want(self, shard: int) -> tuple[str, dict]:
        key = f"acts/{self.hook}/c/{shard}/0"
        entry = self.store.manifest().get(shard)
        if entry is None or key not in entry["objects"]:
            raise StoreError(f"shard {shard} of {_safe(self.store.url)} is not complete (no manifest entry): refusing "
                             "to read unwritten rows")
        return key, entry["objects"][key]

    def read_chunk(self, shard: int, inner: int) -> np.ndarray:
        """Decoded inner chunk `inner` of shard `shard`, shape [chunk_rows, D]."""
        key, want = self._want(shard)
        fd = self.cache.open(self.store.loc, self.store_id, key, want)
        try:
            idx = self._index.get(shard)
            if idx is None:
                n = self.n_inner * 16 + (4 if self._crc else 0)
                raw = os.pread(fd, n, want["nbytes"] - n)
                if self._crc and crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                    raise StoreError(f"corrupt shard index in {key} of {_safe(self.store.url)}")
                idx = np.frombuffer(raw[:self.n_inner * 16], dtype="<u8").reshape(self.n_inner, 2)
                self._index[shard] = idx
            out = np.empty((self.chunk_rows, self.shape[1]), dtype=self.dtype)
            offset, nbytes = idx[inner]
            if offset == _MISSING:  # written with write_empty_chunks, so only a damaged store has holes
                raise StoreError(f"inner chunk {inner} of {key} in {_safe(self.store.url)} is missing from its "
                                 "shard although the manifest lists the shard; run `saecache verify`")
            raw = os.pread(fd, int(nbytes), int(offset))
        finally:
            os.close(fd)
        if self._decode is None:
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
        else:
            self._decode.decode(raw, out=out.reshape(-1).view(np.uint8))
        return out

    def read_rows(self, row0: int, n: int) -> np.ndarray:
        """Rows [row0, row0+n) lying inside one inner chunk (aligned to chunk_rows)."""
        shard, rem = divmod(row0, self.shard_rows)
        inner, start = divmod(rem, self.chunk_rows)
        assert start + n <= self.chunk_rows, "read_rows spans more than one inner chunk"
        return self.read_chunk(shard, inner)[start:start + n]
