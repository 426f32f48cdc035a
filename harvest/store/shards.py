"""The store's shard format read by hand: the one reader of inner chunks for every path that reads activations fast
(the training loader on local disk, the verified cache of remote stores), with a bounded number of open files.

Why hand-written: zarr-python 3.1.6 re-reads the shard index on every partial read and adds ~1–1.5 ms per call (see
the storage notes), which caps random-inner-chunk reads at roughly half of the codec's decode rate. This module
follows the zarr v3 sharding spec exactly — shard = concatenated inner-chunk blobs + an index of
``n_inner × (offset u64, nbytes u64)`` (2^64-1 = missing) with an optional crc32c, at the end of the shard object —
caches each shard's index once, and reads one inner chunk with ``os.pread`` + a numcodecs decode into a preallocated
buffer; an uncompressed inner chunk can also be had without any copy, as a view of the memory-mapped shard file.
It handles exactly the layouts the saecache store writes (chunking along rows only, ``bytes`` + optional
``blosc``/``zstd``); for anything else `ShardLayout.parse` returns None and callers read through zarr instead.

Bounded resources (`files.py`): shard files are opened through the process-wide `FilePool` (at most an eighth of
RLIMIT_NOFILE open, however many shard files a store has) and memory-mapped without keeping a descriptor; each array
keeps at most `MAX_MAPS` maps, and a view handed out keeps its own map alive until it is dropped.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager

import crc32c
import numpy as np

from saecache.errors import StoreError
from saecache.harvest.store.files import FilePool, default_pool, map_file
from saecache.harvest.store.layout import META, MISSING, ShardLayout, inner_decoder

MAX_MAPS = 64  # memory-mapped shard files kept per array (address space, not memory: pages are the page cache's)


# ------------------------------------------------------------------------------------------------------ the reader


_OWNERS = itertools.count()


def chunk_entry(layout: ShardLayout, idx: np.ndarray, shard: int, inner: int, where: str) -> tuple[int, int] | None:
    """(offset, nbytes) of an inner chunk in its shard's index; None for a chunk wholly past the array's end (never
    written); a chunk missing from a published shard raises."""
    offset, nbytes = idx[inner].tolist()
    if offset == MISSING:
        if (shard * layout.n_inner + inner) * layout.chunk_rows >= layout.shape[0]:
            return None
        raise StoreError(f"inner chunk {inner} of {where} is missing from its shard although the shard is "
                         "published; run `saecache verify`")
    return offset, nbytes


def check_chunk_crc(payload, stored, shard: int, inner: int, where: str) -> None:
    """Format version 3: an inner chunk's stored bytes end with their crc32c (zarr's crc32c codec)."""
    if crc32c.crc32c(payload) != int.from_bytes(bytes(stored), "little"):
        raise StoreError(f"shard {shard} of {where} is corrupt: inner chunk {inner} does not match its "
                         "crc32c; run `saecache verify` on the store and re-harvest or re-copy that shard")


def decode_chunk(decoder, payload, dst: np.ndarray, shard: int, inner: int, where: str) -> None:
    """Decode an inner chunk's stored bytes (its crc32c already checked and cut off) into ``dst`` (uint8, the
    chunk's full size); bytes that do not decode to exactly that size raise."""
    try:
        if decoder is None:
            if len(payload) != dst.nbytes:
                raise ValueError(f"{len(payload)} bytes for a chunk of {dst.nbytes}")
            dst[:] = np.frombuffer(payload, dtype=np.uint8)
        else:
            decoder.decode(payload, out=dst)
    except (ValueError, RuntimeError, TypeError) as e:
        raise StoreError(f"shard {shard} of {where} is corrupt: inner chunk {inner} does not decode ({e}); run "
                         "`saecache verify` on the store") from None


def _local_missing(shard: int, path: str) -> Exception:
    return StoreError(f"shard file {path} is missing; run `saecache verify` and re-harvest that shard")


class ShardArray:
    """Inner-chunk reads of one sharded array whose shard objects are local files (a local store, or a remote one's
    verified cache): ``locate(shard)`` gives the file of a shard (fetching it first if need be). Thread-safe."""

    mappable = True  # `chunk_view` may hand out views of the shard files (a local store)
    verify = True  # check each inner chunk's crc32c (format version 3); bench/bench_loader.py turns it off to cost it

    def __init__(self, layout: ShardLayout, locate: Callable[[int], str], where: str,
                 missing: Callable[[int, str], Exception] = _local_missing, attempts: int = 1,
                 pool: FilePool | None = None):
        self.layout, self.where, self._locate, self._missing, self._attempts = layout, where, locate, missing, attempts
        self.shape, self.dtype = layout.shape, layout.dtype
        self.shard_rows, self.chunk_rows, self.n_inner = layout.shard_rows, layout.chunk_rows, layout.n_inner
        self._decode = inner_decoder(list(layout.codecs))
        self._crc_bytes = 4 if layout.chunk_crc else 0  # format version 3: each inner chunk ends with its crc32c
        self._chunk_shape = (layout.chunk_rows, *layout.row_shape)
        self._chunk_nbytes = math.prod(self._chunk_shape) * layout.dtype.itemsize
        self._pool = pool if pool is not None else default_pool()  # (an empty pool is falsy: it has a length)
        self._owner = next(_OWNERS)  # this reader's descriptors in the pool: closed with it, or when it is collected
        weakref.finalize(self, self._pool.drop, self._owner)
        self._index: dict[int, tuple] = {}  # shard -> (opening, [n_inner, 2] index): 16 B per inner chunk
        self._maps: OrderedDict[int, tuple] = OrderedDict()  # shard -> (map, its index)
        self._scratch = threading.local()  # per reader thread: a reused buffer for compressed bytes (no page faults)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str, pool: FilePool | None = None) -> ShardArray | None:
        """The reader of the array in local directory ``path``, or None if its layout is not one we handle."""
        try:
            with open(os.path.join(path, META)) as f:
                layout = ShardLayout.parse(json.load(f))
        except (OSError, ValueError):
            return None
        if layout is None or not layout.sharded:
            return None
        return cls(layout, lambda s: os.path.join(path, layout.key(s)), path, pool=pool)

    @contextmanager
    def _file(self, shard: int):
        """(descriptor, path, opening number) of the shard's file, pinned in the pool for the block; a missing file
        raises (zarr would read it back as zeros, silently)."""
        for _ in range(self._attempts):
            path = self._locate(shard)
            try:
                entry = self._pool.acquire(path, self._owner)
                break
            except FileNotFoundError:  # a cache may have evicted it in between: locate (fetch) again
                continue
        else:
            raise self._missing(shard, path)
        try:
            yield entry[0], path, entry[2]
        finally:
            self._pool.release(path, entry, self._owner)

    def _shard_index(self, shard: int, fd: int, path: str, opened: int) -> np.ndarray:
        """The shard's index, read again whenever the pool reopened the file (it may have been replaced since)."""
        got = self._index.get(shard)
        if got is None or got[0] != opened:
            n = self.layout.index_bytes()
            size = os.fstat(fd).st_size
            got = self._index[shard] = (opened, self.layout.parse_index(
                os.pread(fd, n, size - n) if size >= n else b"", path, size))
        return got[1]

    def _entry(self, shard: int, inner: int, idx: np.ndarray, path: str) -> tuple[int, int] | None:
        return chunk_entry(self.layout, idx, shard, inner, path)

    def read_chunk(self, shard: int, inner: int, out: np.ndarray | None = None) -> np.ndarray:
        """Decode inner chunk ``inner`` of shard ``shard`` into ``out`` (shape ``[chunk_rows, *row]``; allocated when
        None) and return it. Rows past the array end hold the fill value, exactly as zarr would pad them."""
        if out is None:
            out = np.empty(self._chunk_shape, dtype=self.dtype)
        with self._file(shard) as (fd, path, opened):
            entry = self._entry(shard, inner, self._shard_index(shard, fd, path, opened), path)
            if entry is None:
                out.fill(self.layout.fill_value)
                return out
            offset, nbytes = entry
            dst = out.reshape(-1).view(np.uint8)
            if self._decode is None and dst.nbytes + self._crc_bytes == nbytes:  # raw: straight into the caller's
                parts = [dst, self._scratch_buf(4)[:4]] if self._crc_bytes else [dst]  # buffer (+ its crc32c)
                raw = dst
            else:
                raw = self._scratch_buf(nbytes)[:nbytes]
                parts = [raw]
            got = os.preadv(fd, parts, offset)
        if got != nbytes:
            raise StoreError(f"short read ({got} of {nbytes} bytes) in {path}; run `saecache verify`")
        payload = raw if raw is dst or not self._crc_bytes else raw[:-4]
        if self._crc_bytes and self.verify:
            check_chunk_crc(payload, parts[-1][-4:], shard, inner, self.where)
        if raw is not dst:
            decode_chunk(self._decode, payload, dst, shard, inner, self.where)
        return out

    def _scratch_buf(self, n: int) -> memoryview:
        """This thread's reused buffer for stored bytes, at least ``n`` long (no page faults after the first)."""
        buf = getattr(self._scratch, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._scratch.buf = bytearray(max(n, 4))
        return memoryview(buf)

    def chunk_view(self, shard: int, inner: int, check: bool = True) -> np.ndarray | None:
        """Uncompressed arrays only: inner chunk ``inner`` of shard ``shard`` as a ``[chunk_rows, *row]`` view of the
        memory-mapped shard file (no copy; the page cache is the buffer). None when the array is compressed or the
        chunk is not a whole stored chunk. The mapping is private: writing into the view never changes the file.
        Pages are read (and mapped) on first touch, by the kernel's fault-around and read-around (no madvise: even
        MADV_WILLNEED on cached pages cost 0.07-0.28 ms per 4 MB here, more than copying them). In format version 3
        the chunk's crc32c is checked over the view before it is handed out (one pass over its pages); ``check``
        False leaves that to the caller's `check_view` (the loader runs it on a reader thread)."""
        if self._decode is not None:
            return None
        with self._lock:
            m = self._maps.get(shard)
            if m is not None:
                self._maps.move_to_end(shard)
        if m is None:
            with self._file(shard) as (fd, path, opened):
                m = (map_file(fd, os.fstat(fd).st_size), self._shard_index(shard, fd, path, opened))
            with self._lock:
                self._maps[shard] = m
                while len(self._maps) > MAX_MAPS:
                    self._maps.popitem(last=False)  # views handed out keep their own map alive
        m, idx = m  # a map and the index of the same opening of the file
        entry = self._entry(shard, inner, idx, self.where)
        if entry is None or entry[1] != self._chunk_nbytes + self._crc_bytes:
            return None
        offset, nbytes = entry
        if offset + nbytes > len(m):
            raise StoreError(f"short shard file in {self.where} shard {shard}: chunk {inner} ends past the file")
        view = np.frombuffer(m, self.dtype, self._chunk_nbytes // self.dtype.itemsize, offset)
        if check:
            self.check_view(shard, inner, view)
        return view.reshape(self._chunk_shape)

    def check_view(self, shard: int, inner: int, view: np.ndarray) -> None:
        """Check a `chunk_view` against the crc32c stored right after it in the same mapping (format version 3)."""
        if not (self._crc_bytes and self.verify):
            return
        whole = np.frombuffer(view.base, np.uint8)  # the mapping the view lives in
        end = view.ctypes.data - whole.ctypes.data + self._chunk_nbytes
        check_chunk_crc(view, whole[end:end + 4], shard, inner, self.where)

    def raw_chunk(self, shard: int, inner: int) -> bytes:
        """The stored (encoded) bytes of an inner chunk, b"" for one past the array's end."""
        with self._file(shard) as (fd, path, opened):
            entry = self._entry(shard, inner, self._shard_index(shard, fd, path, opened), path)
            return b"" if entry is None else os.pread(fd, entry[1], entry[0])

    def read_rows(self, row0: int, n: int) -> np.ndarray:
        """Rows ``[row0, row0+n)`` lying inside one inner chunk (aligned to ``chunk_rows``): a view of a freshly
        allocated chunk buffer that nothing else references, so callers may keep it without copying."""
        shard, rem = divmod(row0, self.shard_rows)
        inner, start = divmod(rem, self.chunk_rows)
        assert start + n <= self.chunk_rows, "read_rows spans more than one inner chunk"
        return self.read_chunk(shard, inner)[start:start + n]

    def close(self) -> None:
        """Close this reader's descriptors and drop its maps (views handed out keep theirs)."""
        with self._lock:
            self._maps.clear()
        self._pool.drop(self._owner)


class ObjectArray:
    """Inner-chunk reads of an array through byte ranges of its objects: ``get(shard, start, end)`` gives bytes
    ``[start, end)`` of a shard's object (a plain chunk for `contexts`), ``size(shard)`` its length from the manifest.
    For what has no shard file to map: a remote store read without the shard cache (a range GET per chunk, the shard
    index fetched once), and plain-chunked arrays. Same `read_chunk` contract and checks as `ShardArray`."""

    mappable = False
    verify = True

    def __init__(self, layout: ShardLayout, get: Callable[[int, int, int], bytes], size: Callable[[int], int],
                 where: str):
        self.layout, self.where, self._get, self._size = layout, where, get, size
        self.shape, self.dtype = layout.shape, layout.dtype
        self.shard_rows, self.chunk_rows, self.n_inner = layout.shard_rows, layout.chunk_rows, layout.n_inner
        self._decode = inner_decoder(list(layout.codecs))
        self._crc_bytes = 4 if layout.chunk_crc else 0
        self._chunk_shape = (layout.chunk_rows, *layout.row_shape)
        self._index: dict[int, np.ndarray] = {}  # shard -> [n_inner, 2] index: 16 B per inner chunk

    def _span(self, shard: int, inner: int) -> tuple[int, int] | None:
        size = self._size(shard)
        if not self.layout.sharded:
            return 0, size
        idx = self._index.get(shard)
        if idx is None:
            n = self.layout.index_bytes()
            idx = self._index[shard] = self.layout.parse_index(
                self._get(shard, size - n, size) if size >= n else b"", f"{self.where} shard {shard}", size)
        span = chunk_entry(self.layout, idx, shard, inner, f"{self.where} shard {shard}")
        if span is not None and span[0] + span[1] > size:
            raise StoreError(f"short shard object in {self.where} shard {shard}: chunk {inner} ends past it; run "
                             "`saecache verify`")
        return span

    def read_chunk(self, shard: int, inner: int, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty(self._chunk_shape, dtype=self.dtype)
        span = self._span(shard, inner)
        if span is None:
            out.fill(self.layout.fill_value)
            return out
        raw = self._get(shard, span[0], span[0] + span[1])
        if len(raw) != span[1]:
            raise StoreError(f"short read ({len(raw)} of {span[1]} bytes) in {self.where} shard {shard}; run "
                             "`saecache verify`")
        payload = memoryview(raw)[:len(raw) - self._crc_bytes]
        if self._crc_bytes and self.verify:
            check_chunk_crc(payload, raw[-4:], shard, inner, self.where)
        decode_chunk(self._decode, payload, out.reshape(-1).view(np.uint8), shard, inner, self.where)
        return out

    def read_rows(self, row0: int, n: int) -> np.ndarray:
        shard, rem = divmod(row0, self.shard_rows)
        inner, start = divmod(rem, self.chunk_rows)
        return self.read_chunk(shard, inner)[start:start + n]

    def close(self) -> None:
        self._index.clear()
