"""Encoding a shard's zarr objects by hand: the bytes zarr-python writes for the same array and rows (the store tests
write stores both ways and compare them object for object), read back by plain zarr and by `shards.py`.

Why by hand: through `zarr.Array.__setitem__` a 2^16-row shard cost about twice its codec time on top of the codec
(a full permuted copy of the shard, chunk copies on zarr's event loop, the shard's concatenation), and the manifest's
checksum needed the object read back. Here each inner chunk is encoded straight from the rows (already in stored
order, as the harvest hands them over) or gathered from unpermuted rows into one reused buffer, encoded with numcodecs
as zarr's codec would (same configuration, taken from the array's `zarr.json`), and checksummed as it is produced
(crc32c chained over the parts, so the whole object is never concatenated or re-read). The codecs release the GIL,
so `n` writer threads encode on `n` cores; `made_ahead` lets a large object's next chunks be encoded on a helper
thread while the calling thread checksums and writes the previous ones.

Layout (zarr v3 sharding, SPEC.md): the encoded inner chunks in order, then the index, ``n_inner × (offset, nbytes)``
little-endian u64 (2^64-1 for an inner chunk wholly past the array's end, which zarr does not write), then the
crc32c of the index. An inner chunk (or plain chunk) the array's end cuts is padded with the fill value to its full
shape, as zarr does. Handled: the layouts the store writer creates (chunking along rows only; `bytes` + optional
blosc/zstd; index at the end); `ObjectEncoder.for_array` returns None for anything else and the writer uses zarr.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import crc32c
import numpy as np

from saecache.harvest.store.layout import MISSING, ShardLayout, inner_encoder

class ObjectEncoder:
    """Encodes the objects of one array whose chunks (or shards) span whole rows: `encode(rows, perm)` gives the
    object holding rows ``rows[perm]`` (all rows of one chunk/shard, fewer only for the array's last one)."""

    def __init__(self, dtype: np.dtype, row_shape: tuple, object_rows: int, chunk_rows: int, fill_value,
                 codec, sharded: bool, chunk_crc: bool = False):
        self.dtype, self.row_shape, self.fill_value, self.codec = dtype, row_shape, fill_value, codec
        self.object_rows, self.chunk_rows, self.sharded = object_rows, chunk_rows, sharded
        self.chunk_crc = chunk_crc  # format version 3: each chunk's bytes end with their crc32c, as zarr's codec

    @classmethod
    def for_array(cls, meta: dict) -> ObjectEncoder | None:
        """The encoder of an array's objects from its `zarr.json` metadata, or None when the layout is not handled."""
        lay = ShardLayout.parse(meta)
        if lay is None or (lay.sharded and not lay.crc):
            return None
        return cls(lay.dtype, lay.row_shape, lay.shard_rows, lay.chunk_rows, lay.fill_value,
                   inner_encoder(list(lay.codecs)), lay.sharded, lay.chunk_crc)

    def _encode_chunk(self, buf: np.ndarray) -> bytes:
        blob = buf.tobytes() if self.codec is None else self.codec.encode(buf)
        return blob + crc32c.crc32c(blob).to_bytes(4, "little") if self.chunk_crc else blob

    def encode(self, rows: np.ndarray, perm: np.ndarray | None = None) -> Iterator[bytes]:
        """The object's bytes as parts to be concatenated, made one at a time (so a writer can write and drop each
        before the next is made): chunk `k` holds ``rows[perm[k*chunk_rows:...]]`` (``perm`` None: rows in order, a
        whole chunk encoded from the rows where it lies, without a copy)."""
        n = len(rows)
        assert n <= self.object_rows and rows.shape[1:] == self.row_shape, (rows.shape, self.row_shape)
        assert rows.dtype.itemsize == self.dtype.itemsize, (rows.dtype, self.dtype)
        rows = rows.view(self.dtype) if rows.dtype != self.dtype else rows
        buf = None
        index = np.full((self.object_rows // self.chunk_rows, 2), MISSING, dtype="<u8")
        offset = 0
        for k, c0 in enumerate(range(0, n, self.chunk_rows)):
            c1 = min(c0 + self.chunk_rows, n)
            if perm is None and c1 - c0 == self.chunk_rows and rows.flags.c_contiguous:
                chunk = rows[c0:c1]
            else:
                if buf is None:
                    buf = np.empty((self.chunk_rows, *self.row_shape), dtype=self.dtype)
                if perm is None:
                    buf[:c1 - c0] = rows[c0:c1]
                else:
                    np.take(rows, perm[c0:c1], axis=0, out=buf[:c1 - c0], mode="clip")  # clip: no buffering
                buf[c1 - c0:] = self.fill_value
                chunk = buf
            blob = self._encode_chunk(chunk)
            index[k] = offset, len(blob)
            offset += len(blob)
            yield blob
        if self.sharded:
            table = index.tobytes()
            yield table + crc32c.crc32c(table).to_bytes(4, "little")


_END = object()


def made_ahead(parts: Iterable[bytes], depth: int = 2) -> Iterator[bytes]:
    """`parts` in order, the next `depth` of them made on one helper thread while the caller consumes the current one
    (the write thread's checksum and file write then overlap its codec: ~20 % of a shard's CPU besides the codec).
    An exception while making a part is raised here, at that part; if the caller stops early, the parts already asked
    for are finished and dropped."""
    it = iter(parts)
    with ThreadPoolExecutor(1, thread_name_prefix="saecache-encode") as ex:
        pending = deque(ex.submit(next, it, _END) for _ in range(depth))
        while (part := pending.popleft().result()) is not _END:
            pending.append(ex.submit(next, it, _END))
            yield part
