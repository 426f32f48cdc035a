"""A bounded local cache of whole shard objects of remote stores, and the loader's fast reader on top of it.

Training reads random inner chunks many times. From object storage every read is a round trip, so the first touch of
a shard object downloads it whole (one GET), checks it against the crc32c and byte count in the store's manifest,
and keeps it on local disk; later reads are `os.pread` + a decode, as for a local store. Least recently used
objects are evicted once the cache holds more than `max_bytes`.

Integrity comes for free: an object that is missing remotely, or whose bytes disagree with the manifest, raises a
one-line `StoreError` instead of reaching the trainer (zarr alone would return zeros for a missing object).

Why hand-written: fsspec's `filecache`/`blockcache` do not bound the cache in bytes, do not check content against our
manifest, and `blockcache` fetches fixed-size blocks rather than the object (= one shard, the unit we checksum).
`CachedShardArray` is the shard reader of `shards.py` over the cached files (one format reader, one bounded pool of
open files for local and remote stores).

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

from saecache.errors import ConfigError, StoreError
from saecache.harvest.store.files import default_pool
from saecache.harvest.store.io import check_object, checksum, redact_url, write_atomic
from saecache.harvest.store.layout import ShardLayout, meta_key
from saecache.harvest.store.shards import ShardArray


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
                raise StoreError(f"{key} of {redact_url(loc.url)} is listed in the manifest but missing from the "
                                 f"store: the store is damaged; run `saecache verify {redact_url(loc.url)}` and "
                                 "re-copy or re-harvest that shard")
            if check_object(key, data, want) is not None:
                got = checksum(data)
                raise StoreError(f"{key} of {redact_url(loc.url)} does not match its manifest checksum "
                                 f"({got['nbytes']} bytes, crc32c {got['crc32c']} vs {want['nbytes']}, "
                                 f"{want['crc32c']}): the store is corrupt; run "
                                 f"`saecache verify {redact_url(loc.url)}`")
            write_atomic(path, data)
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
            default_pool().forget(p)  # the shard readers' descriptor, so the disk space is freed

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
        return check_object(path, f.read(), want) is None


def store_cache_id(url: str) -> str:
    """Directory name of a store inside the cache: readable tail of the URL + a hash of the whole URL."""
    u = redact_url(url).rstrip("/")
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


class CachedShardArray(ShardArray):
    """Inner-chunk reads of one sharded array (`acts/<hook>`, `rows/<field>`) of a remote store through the shard
    cache: the shard reader of `shards.py` over the cached files. Never returns rows of a shard not in the manifest."""

    mappable = False  # the loader decodes cached chunks into its own buffers (no views of cached files)

    @classmethod
    def open(cls, store, array: str, cache: ShardCache) -> CachedShardArray | None:
        """The cached reader of `array`, or None when its layout is not the one saecache writes."""
        try:
            layout = ShardLayout.parse(json.loads(store.loc.get(meta_key(array))))
        except (TypeError, ValueError):
            return None
        if layout is None or not layout.sharded or layout.separator != "/":
            return None
        store_id = store_cache_id(store.url)

        def locate(shard: int) -> str:
            key = f"{array}/{layout.key(shard)}"
            entry = store.manifest().get(shard)
            if entry is None or key not in entry["objects"]:
                raise StoreError(f"shard {shard} of {redact_url(store.url)} is not complete (no manifest entry): "
                                 "refusing to read unwritten rows")
            return cache.fetch(store.loc, store_id, key, entry["objects"][key])

        def missing(shard: int, path: str) -> Exception:
            return StoreError(f"cannot keep {array}/{layout.key(shard)} of {redact_url(store.url)} in the shard "
                              f"cache {cache.cfg.dir}: it is evicted as soon as it is fetched; raise SAECACHE_CACHE_GB")

        return cls(layout, locate, f"{array} of {redact_url(store.url)}", missing=missing, attempts=3)
