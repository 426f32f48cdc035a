"""The store format's layout, once (SPEC.md): format version, every key name, the codec chain, the geometry of
contexts/chunks/shards, how an array's `zarr.json` is read, and the within-shard permutation. Pure: no I/O.

Everything that knows where an object lives or how its bytes are laid out imports it from here: the reader
(`read.py`, `shards.py`, `cache.py`), the writer (`write.py`, `encode.py`), `inspect.py`, `copy.py` and the harvest.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from saecache import __version__
from saecache.errors import StoreError
from saecache.harvest.quant import FORMATS

FORMAT_VERSION = 3
"""Version 3 adds a crc32c codec at the end of every inner chunk's codec chain (each chunk carries its checksum)."""
CHUNK_CRC_VERSION = 3  # first format version whose inner chunks carry a crc32c

# -- key names (SPEC.md "Layout")
ACTS_DIR = "acts"
ROWS_DIR = "rows"
CONTEXTS = "contexts"
ROW_FIELDS = ("token", "context", "position")
MANIFEST_DIR = "_manifest"
CLAIMS_DIR = "_claims"
FINAL_DIR = "_final"
PLAN_DIR = "_plan"
BOOKKEEPING_GROUPS = (MANIFEST_DIR, CLAIMS_DIR)  # empty zarr groups made with the store (version >= 2)
META = "zarr.json"  # a zarr v3 node's metadata object; the store group's holds the header in its attributes
FINAL_V1 = "_final.json"  # version 1's final record (a plain JSON file)
TOP_LEVEL = {META, ACTS_DIR, ROWS_DIR, CONTEXTS, MANIFEST_DIR, CLAIMS_DIR, FINAL_V1, FINAL_DIR, PLAN_DIR}
CHUNKS = "c/"  # the default chunk key encoding's prefix: array/c/<shard>[/0]


def meta_key(node: str = "") -> str:
    """The metadata object of node `node` (an array or group path; "": the store's group)."""
    return f"{node}/{META}" if node else META


def chunk_key(array: str, *coords: int) -> str:
    """The object of `array` at chunk-grid coordinates `coords` (one sharded object per shard: `(s, 0)`, or `(s,)`
    for a 1-d array)."""
    return f"{array}/{chunk_name(*coords)}"


def chunk_name(*coords: int) -> str:
    """`chunk_key` relative to its array."""
    return CHUNKS + "/".join(str(c) for c in coords)


def chunk_shard(key: str) -> tuple[str, int]:
    """(array, shard) of a chunk object key `array/c/<shard>[/0]` (`chunk_key`)."""
    array, coords = key.rsplit("/" + CHUNKS, 1)
    return array, int(coords.split("/")[0])


def acts_array(hook: str) -> str:
    return f"{ACTS_DIR}/{hook}"


def rows_array(name: str) -> str:
    return f"{ROWS_DIR}/{name}"


def shard_object_keys(header: dict, s: int) -> list[str]:
    """Every zarr object written for shard `s` (SPEC.md "Manifest")."""
    keys = [chunk_key(acts_array(h), s, 0) for h in sorted(header["hooks"])]
    keys += [chunk_key(rows_array(name), s) for name in ROW_FIELDS]
    keys.append(chunk_key(CONTEXTS, s, 0))
    return keys


def metadata_keys(hooks, version: int) -> list[str]:
    """zarr metadata objects of a store with these hooks, the group's zarr.json excluded."""
    keys = [meta_key(ACTS_DIR), meta_key(ROWS_DIR), meta_key(CONTEXTS)]
    keys += [meta_key(acts_array(h)) for h in sorted(hooks)]
    keys += [meta_key(rows_array(n)) for n in ROW_FIELDS]
    if version >= 2:
        keys += [meta_key(g) for g in BOOKKEEPING_GROUPS]
    return keys


# The harvest plan (SPEC.md "Plan"): files beside the `_plan` node's metadata.
PLAN_FILE = f"{PLAN_DIR}/plan.json"
STATE_FILE = f"{PLAN_DIR}/state.json"
PLANNER_FILE = f"{PLAN_DIR}/planner.json"
# `_plan/` is declared to zarr as an empty array node, so plain zarr lists it as one member and never looks at the
# plan's own files beside this metadata (an undeclared prefix makes `members()`/`tree()` warn for every listing).
PLAN_NODE = {"shape": [0], "data_type": "uint8",
             "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1]}},
             "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
             "fill_value": 0, "codecs": [{"name": "bytes"}], "zarr_format": 3, "node_type": "array",
             "storage_transformers": [],
             "attributes": {"saecache": {"plan": "the harvest plan: packed contexts per shard and its state beside "
                                                 "this metadata (harvest/SPEC.md)"}}}


# Bookkeeping layout (SPEC.md "Manifest", "Final record", "Claims"). Version 1 wrote plain JSON files, which plain zarr
# lists as unknown objects (a warning per file on every tree()/members()); from version 2 every record is a zarr group
# node whose attributes["saecache"] hold the record, written as one object, atomically, as before.


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1).encode()


def manifest_key(s: int, version: int = FORMAT_VERSION) -> str:
    name = f"{MANIFEST_DIR}/shard-{s:06d}"
    return f"{name}.json" if version == 1 else meta_key(name)


def final_key(version: int = FORMAT_VERSION) -> str:
    return FINAL_V1 if version == 1 else meta_key(FINAL_DIR)


def claim_key(worker: int, n_workers: int, version: int = FORMAT_VERSION) -> str:
    name = f"{CLAIMS_DIR}/worker-{worker:05d}-of-{n_workers:05d}"
    return f"{name}.json" if version == 1 else meta_key(name)


def record_key(prefix: str, name: str, version: int) -> str | None:
    """Key of the record listed as `name` under `prefix` (a file in version 1, a group node after), None if `name`
    is not a record (the prefix's own zarr.json, a temporary file)."""
    if version == 1:
        return f"{prefix}/{name}" if name.endswith(".json") and not name.startswith(".") else None
    return None if "." in name else meta_key(f"{prefix}/{name}")


def record_bytes(record: dict, version: int = FORMAT_VERSION) -> bytes:
    """The bytes of a bookkeeping record: JSON (version 1) or a zarr group node carrying it as an attribute."""
    if version == 1:
        return json_bytes(record)
    return json_bytes({"zarr_format": 3, "node_type": "group", "attributes": {"saecache": record}})


def parse_record(raw: bytes, version: int) -> dict:
    doc = json.loads(raw)
    return doc if version == 1 else doc["attributes"]["saecache"]


def check_format_version(header: dict, url: str) -> None:
    v = header.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise StoreError(f"store {url} has format version {v}, newer than this saecache ({__version__}) reads "
                         f"(version {FORMAT_VERSION}); upgrade saecache")


def is_count(v, lo: int = 0) -> bool:
    """A JSON integer (not a bool) in [lo, 2**53): a count or size a reader may compute with."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < 2**53


def check_header(header, url: str) -> None:
    """Refuse (StoreError) a header that is not a saecache store's: geometry of wrong types or out of range, derived
    sizes that disagree with it (SPEC.md "Geometry"), an unknown storage format, hooks without a width."""
    def bad(what: str):
        raise StoreError(f"store {url} has a damaged header (zarr.json attributes['saecache']): {what}; re-harvest or "
                         "re-copy the store")

    if not isinstance(header, dict) or not isinstance(header.get("storage"), dict):
        bad("it is not an object with a 'storage' object")
    st, hooks = header["storage"], header.get("hooks")
    counts = (header.get("ctx_len"), st.get("ctx_per_chunk"), st.get("chunks_per_shard"))
    if not (all(is_count(v, 1) for v in counts) and is_count(header.get("n_contexts")) and is_count(header.get("seed"))
            and is_count(st.get("first_position")) and st["first_position"] < min(2, header["ctx_len"])):
        bad("ctx_len, storage.first_position, ctx_per_chunk, chunks_per_shard, n_contexts and seed must be counts")
    g = Geometry.from_header(header)
    derived = {"storage.rows_per_context": (st.get("rows_per_context"), g.rows_per_context),
               "storage.chunk_rows": (st.get("chunk_rows"), g.chunk_rows),
               "storage.shard_rows": (st.get("shard_rows"), g.shard_rows),
               "n_rows": (header.get("n_rows"), g.n_rows), "n_shards": (header.get("n_shards"), g.n_shards)}
    for key, (got, want) in derived.items():
        if not is_count(got) or got != want:
            bad(f"{key} is {got!r} but the geometry gives {want}")
    if not isinstance(st.get("dtype"), str) or st["dtype"] not in DTYPES:
        bad(f"storage.dtype {st.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(hooks, dict) or not hooks or not all(
            isinstance(h, dict) and is_count(h.get("d"), 1) for h in hooks.values()):
        bad("hooks must map each hook name to an object with its width d")


def check_array(meta, name: str, header: dict, url: str) -> ShardLayout:
    """The layout of array `name` (acts/<hook>, rows/<field>, contexts) from its zarr.json, refused (StoreError) unless
    it is the one the header describes: shape, shards, inner chunks, dtype and the codec chains saecache writes."""
    g, lay = Geometry.from_header(header), ShardLayout.parse(meta) if isinstance(meta, dict) else None
    if name == CONTEXTS:
        want = ((g.n_contexts, header["ctx_len"]), np.dtype("<i4"), g.ctx_per_shard, g.ctx_per_shard, False)
    elif name.startswith(f"{ROWS_DIR}/"):
        dtype = np.dtype("<i2") if name.endswith("/position") else np.dtype("<i4")
        want = ((g.n_rows,), dtype, g.shard_rows, g.chunk_rows, True)
    else:
        fmt = FORMATS[header["storage"]["dtype"]]
        width = fmt.width(header["hooks"][name.split("/", 1)[1]]["d"])
        want = ((g.n_rows, width), np.dtype(fmt.zarr_dtype).newbyteorder("<"), g.shard_rows, g.chunk_rows, True)
    got = None if lay is None else (lay.shape, lay.dtype, lay.shard_rows, lay.chunk_rows, lay.sharded)
    if (got != want or not all(type(v) is int for v in (*lay.shape, lay.shard_rows, lay.chunk_rows))
            or lay.separator != "/" or lay.fill_value != 0 or isinstance(lay.fill_value, bool)
            or (lay.sharded and not lay.crc) or lay.chunk_crc != (header["format_version"] >= CHUNK_CRC_VERSION)):
        raise StoreError(f"{url}/{name}/zarr.json does not describe the array the header does (shape, dtype, shards, "
                         f"chunks, codecs): {got} vs {want}; the store is damaged: re-harvest or re-copy it")
    return lay


# -- formats and the codec chain (SPEC.md "Formats and codecs")

# storage format name -> (zarr dtype, logical dtype); the formats themselves (and their decoding) are in quant.py
DTYPES = {name: (f.zarr_dtype, name) for name, f in FORMATS.items()}

# codec name -> factory of the zarr compressor inside the sharding codec (None = uncompressed)
CODECS = {
    "blosc-zstd": lambda: BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
    "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
    "zstd": lambda: ZstdCodec(level=3),
    "none": lambda: None,
}
ROWS_CODEC = "blosc-zstd"  # rows/* and contexts, whatever the activations' codec


def compressors(codec: str, version: int = FORMAT_VERSION) -> list:
    """zarr's `compressors` (bytes-to-bytes codecs after `bytes`) of an array in this codec: the compressor, then
    (version >= 3) the crc32c each inner chunk carries."""
    comp = CODECS[codec]()
    return ([] if comp is None else [comp]) + ([Crc32cCodec()] if version >= CHUNK_CRC_VERSION else [])


MISSING = 2**64 - 1  # shard index entry of an inner chunk that was never written
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _split_chain(codecs: list[dict]) -> tuple[dict | None, bool]:
    """(the compressor's metadata or None, whether the chain ends with crc32c) of a `bytes` [+ blosc/zstd]
    [+ crc32c] chain; KeyError for any other chain."""
    names = [c["name"] for c in codecs]
    if names[0] != "bytes" or codecs[0].get("configuration", {}).get("endian", "little") != "little":
        raise KeyError("inner codecs must start with little-endian bytes")
    crc = names[-1] == "crc32c"
    rest = codecs[1:len(codecs) - crc]
    if len(rest) > 1 or (rest and rest[0]["name"] not in ("blosc", "zstd")):
        raise KeyError(f"unsupported codec chain {names}")
    return (rest[0] if rest else None), crc


def inner_decoder(codecs: list[dict]):
    """numcodecs decoder of an inner codec chain's compressor (None for raw bytes); KeyError when not handled."""
    comp, _ = _split_chain(codecs)
    return None if comp is None else numcodecs.Blosc() if comp["name"] == "blosc" else numcodecs.Zstd()


def inner_encoder(codecs: list[dict]):
    """numcodecs encoder of a chain's compressor, configured as zarr configures its own (None: raw bytes); KeyError
    for a chain this package does not write."""
    comp, _ = _split_chain(codecs)
    if comp is None:
        return None
    conf = comp.get("configuration", {})
    if comp["name"] == "blosc":
        return numcodecs.Blosc(cname=conf["cname"], clevel=conf["clevel"], shuffle=_SHUFFLE[conf["shuffle"]],
                               blocksize=conf.get("blocksize", 0), typesize=conf["typesize"])
    return numcodecs.Zstd(level=conf["level"], checksum=conf.get("checksum", False))


def chain_has_crc(codecs: list[dict]) -> bool:
    """Whether each chunk of this codec chain ends with its crc32c (format version 3)."""
    return _split_chain(codecs)[1]


# -- geometry (SPEC.md "Geometry")


@dataclass(frozen=True)
class Geometry:
    """Where every context and row lives, from the header. Pure arithmetic, no I/O. Each array's `ShardLayout`
    (from its zarr.json) must agree with it (`ShardLayout.check`)."""

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


def in_order(entries: list[list[int]], data_end: int) -> bool:
    """Whether a shard index's (offset, nbytes) entries are the layout zarr and saecache write: the written inner
    chunks first, in order, back to back from byte 0 up to the index at `data_end`; unwritten ones (both fields
    MISSING, only past the array's end) after them. An index that passes its crc32c but not this is damaged."""
    end = 0
    for i, (offset, nbytes) in enumerate(entries):
        if offset == MISSING:
            return end == data_end and all(e == [MISSING, MISSING] for e in entries[i:])
        if offset != end:
            return False
        end += nbytes
    return end == data_end


def shard_permutation(seed: int, shard: int, n_rows: int) -> np.ndarray:
    """Stored row j of a shard is unpermuted row perm[j] (SPEC.md "Row order inside a shard"). Computed once per
    shard: the harvest (which permutes the activations on the device) and the writer (which permutes the rows/*
    arrays) get copies of the same array."""
    return _permutation(seed, shard, n_rows).copy()


@functools.lru_cache(maxsize=32)  # a few shards in flight per process (the write pipeline's depth)
def _permutation(seed: int, shard: int, n_rows: int) -> np.ndarray:
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


# -- an array's zarr.json (zarr v3 sharding spec)


@dataclass(frozen=True)
class ShardLayout:
    """Where the inner chunks of an array ``[N, *row]`` live, from its ``zarr.json``: a sharded array (shard =
    concatenated inner-chunk blobs + an index of ``n_inner × (offset u64, nbytes u64)`` at its end), or a plain
    chunked one (`sharded` False: one chunk per object, as `contexts`)."""

    shape: tuple[int, ...]
    """Array shape; axis 0 = rows, inner chunks and shards span every other axis whole."""
    dtype: np.dtype
    """Element type as stored (little-endian)."""
    shard_rows: int
    """Rows per object (the chunk grid along axis 0)."""
    chunk_rows: int
    """Rows per inner chunk (the unit of a read)."""
    separator: str
    """Chunk key separator ("/" in every store saecache writes)."""
    fill_value: float
    """Value of rows beyond the array's end inside the last inner chunk."""
    codecs: tuple = field(repr=False)
    """The inner codec chain (zarr metadata): `bytes` [+ blosc/zstd] [+ crc32c]."""
    crc: bool
    """Whether the shard index ends with a crc32c."""
    sharded: bool = True
    """False for a plain chunked array (no index; the object is one chunk)."""

    @classmethod
    def parse(cls, meta: dict) -> ShardLayout | None:
        """The layout of an array's metadata, or None when it is not one this package reads and writes."""
        try:
            codecs = meta["codecs"]
            shape = list(meta["shape"])
            outer = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
            if (not shape or outer[1:] != shape[1:] or meta["chunk_key_encoding"]["name"] != "default"
                    or meta.get("storage_transformers") or outer[0] <= 0):
                return None
            dtype = np.dtype(meta["data_type"]).newbyteorder("<")
            sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
            if codecs[0]["name"] != "sharding_indexed":
                _split_chain(codecs)  # raises KeyError for chains we do not handle
                return cls(tuple(shape), dtype, outer[0], outer[0], sep, meta.get("fill_value", 0), tuple(codecs),
                           False, sharded=False)
            conf = codecs[0]["configuration"]
            inner = list(conf["chunk_shape"])
            if (len(codecs) != 1 or inner[1:] != shape[1:] or inner[0] <= 0 or outer[0] % inner[0]
                    or conf.get("index_location", "end") != "end"
                    or [c["name"] for c in conf["index_codecs"]] not in (["bytes"], ["bytes", "crc32c"])):
                return None
            _split_chain(conf["codecs"])
            return cls(tuple(shape), dtype, outer[0], inner[0], sep, meta.get("fill_value", 0), tuple(conf["codecs"]),
                       any(c["name"] == "crc32c" for c in conf["index_codecs"]))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            return None

    @property
    def n_inner(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def chunk_crc(self) -> bool:
        """Whether each inner chunk ends with its own crc32c (format version 3)."""
        return chain_has_crc(list(self.codecs))

    def key(self, shard: int) -> str:
        """Object key of shard ``shard``, relative to the array (``c/<shard>/0`` for a 2-D array)."""
        parts = ["c", str(shard)] + ["0"] * (len(self.shape) - 1)
        return self.separator.join(parts)

    def index_bytes(self) -> int:
        return self.n_inner * 16 + (4 if self.crc else 0)

    def parse_index(self, raw: bytes, where: str, size: int | None = None) -> np.ndarray:
        """The ``[n_inner, 2]`` (offset, nbytes) table from a shard's trailing index bytes; checks the crc32c and,
        given the object's `size`, that the table is `in_order` (so no entry points outside the chunks' bytes)."""
        if len(raw) != self.index_bytes():
            raise StoreError(f"short shard file {where}: no room for its index; run `saecache verify`")
        if self.crc and crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise StoreError(f"corrupt shard index (crc32c mismatch) in {where}; run `saecache verify`")
        idx = np.frombuffer(raw[:self.n_inner * 16], dtype="<u8").reshape(self.n_inner, 2)
        if size is not None and not in_order(idx.tolist(), size - self.index_bytes()):
            raise StoreError(f"corrupt shard index in {where}: its entries do not lay the inner chunks out in order, "
                             "back to back, before the index; run `saecache verify`")
        return idx
