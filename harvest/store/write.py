"""Writing a store: create-or-validate the header, claim work, write whole shards, publish them in the manifest,
and write the final record once every shard exists. Format: `SPEC.md`.

Creation is idempotent (the header is a pure function of the config, so concurrent workers write identical bytes) and
never overwrites: a store made from another config is refused. A shard is published by writing its manifest entry
last, after every object of the shard is written; the objects are encoded by hand (`encode.py`, byte for byte what
zarr writes) so that their checksums come from the bytes as they are made, with no read-back.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import numpy as np
import torch
import zarr

from saecache import __version__
from saecache.errors import StoreError
from saecache.harvest.config import differing_flags
from saecache.harvest.quant import FORMATS, SCALE_BYTES, decode, nf4_levels, row_sums, stats_from_sums
from saecache.harvest.model import local_dir
from saecache.harvest.store.encode import ObjectEncoder, made_ahead
from saecache.harvest.store.io import Location, checksum
from saecache.harvest.store.layout import (
    BOOKKEEPING_GROUPS, CLAIMS_DIR, CONTEXTS, META, PLAN_DIR, ROW_FIELDS, ROWS_CODEC, Geometry, acts_array,
    check_format_version, chunk_key, claim_key, compressors, final_key, manifest_key, meta_key, parse_record,
    record_bytes, record_key, rows_array, shard_object_keys, shard_permutation, unpermuted_meta,
)
from saecache.harvest.store.read import aggregate_stats, compute_fingerprint, read_manifest

AHEAD_BYTES = 8 << 20  # objects at least this large are encoded a few chunks ahead of their write (`made_ahead`)
CLAIM_LEASE_SECONDS = 600  # a claim from another host is trusted as live for this long after its last heartbeat


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (what a same-configuration check names)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _identity(header: dict, near: str | None) -> dict:
    """What the same-configuration check compares: the header minus the paths as typed, which stay in the store as
    provenance only. Text is known by its content fingerprint; a local model directory by its config hash (the
    tokenizer by its vocabulary and special ids); a Hub model still by its name and revision."""
    h = json.loads(json.dumps(header))
    h.get("dataset", {}).pop("spec", None)
    h.get("config", {}).pop("dataset", None)
    model = h.get("model", {})
    if local_dir(model.get("name"), near):
        tok = h.get("tokenizer", {})
        if tok.get("name") == model.get("name"):
            tok.pop("name")
        model.pop("name", None)
        h.get("config", {}).pop("model", None)
    return h


class StoreWriter:
    """Writes shards of one store. Several writers (processes, machines) may write disjoint shards concurrently;
    one writer may write several shards at once from several threads (the harvest's encode workers)."""

    hand_encode = True  # shard objects encoded by `encode.py`; False: through zarr (the reference it matches)

    def __init__(self, url: str, header: dict, storage_options: dict | None = None):
        self.loc = Location(url, storage_options, read_only=False)
        self.header = header
        self.geometry = Geometry.from_header(header)
        self._probe_writable()
        self._create_or_validate()
        self.group = zarr.open_group(store=self.loc.zarr_store(), mode="r+", zarr_format=3)
        self.claim_id = uuid.uuid4().hex
        self._encoders: dict[str, ObjectEncoder | None] = {}  # array name -> its object encoder (None: via zarr)

    # -- creation
    def _probe_writable(self) -> None:
        probe_store_dir(self.loc)

    def _create_or_validate(self) -> None:
        raw = self.loc.get(META)
        if raw is None:
            try:
                self._create()
            except zarr.errors.ContainsGroupError:  # another worker won the race; validate below
                pass
            except zarr.errors.ContainsArrayError:
                pass
            raw = self.loc.get(META)
        found = json.loads(raw).get("attributes", {}).get("saecache")
        if found is None:
            raise StoreError(f"{self.loc.url} is a zarr group but not a saecache store; choose a new --out")
        check_format_version(found, self.loc.url)
        if found.get("format_version") != self.header["format_version"]:
            raise StoreError(f"store {self.loc.url} is in format version {found.get('format_version')}, which this "
                             f"saecache reads but does not extend (it writes version {self.header['format_version']}); "
                             "harvest to a new --out")
        if found != self.header:
            near = self.loc.root if self.loc.local else None
            diff = ", ".join(differing_flags(diff_keys(_identity(found, near), _identity(self.header, near)))[:8])
            if diff:
                raise StoreError(f"store {self.loc.url} was harvested with a different configuration (differs in: "
                                 f"{diff}); rerun with the original settings or write to a new --out")
            self.header = found  # the same model and data under other paths: the store keeps its header as created

    def _create(self) -> None:
        h, g = self.header, self.geometry
        zstore = self.loc.zarr_store()
        group = zarr.create_group(store=zstore, zarr_format=3, attributes={"saecache": h}, overwrite=False)
        fmt = FORMATS[h["storage"]["dtype"]]
        version = h["format_version"]
        common = dict(fill_value=0, config={"write_empty_chunks": True}, overwrite=False)
        comp = {"compressors": compressors(h["storage"]["codec"], version) or None}
        for name, info in sorted(h["hooks"].items()):
            w = fmt.width(info["d"])
            group.create_array(acts_array(name), shape=(g.n_rows, w), dtype=fmt.zarr_dtype,
                               chunks=(g.chunk_rows, w), shards=(g.shard_rows, w),
                               attributes={"logical_dtype": fmt.name, "hook": name, "d": info["d"],
                                           **format_attributes(fmt.name)}, **comp, **common)
        for name, dt in zip(ROW_FIELDS, ("int32", "int32", "int16")):
            group.create_array(rows_array(name), shape=(g.n_rows,), dtype=dt, chunks=(g.chunk_rows,),
                               shards=(g.shard_rows,), compressors=compressors(ROWS_CODEC, version), **common)
        group.create_array(CONTEXTS, shape=(g.n_contexts, g.ctx_len), dtype="int32",
                           chunks=(g.ctx_per_shard, g.ctx_len), compressors=compressors(ROWS_CODEC, version), **common)
        for name in BOOKKEEPING_GROUPS:  # so that plain zarr sees the bookkeeping as (empty) groups, not stray objects
            group.create_group(name, overwrite=False)

    # -- claims
    def claim_worker(self, worker: int, n_workers: int) -> None:
        """Refuse if another live process holds the same worker slot, or the store is split with a different N."""
        version = self.header["format_version"]
        for name in self.loc.list(CLAIMS_DIR):
            key = record_key(CLAIMS_DIR, name, version)
            raw = None if key is None or not name.startswith("worker-") else self.loc.get(key)
            if raw is None:
                continue
            c = parse_record(raw, version)
            if c["n_workers"] != n_workers:
                raise StoreError(f"store {self.loc.url} is being harvested as {c['n_workers']} workers (claim by "
                                 f"{c['host']} pid {c['pid']}); every worker of one store must use the same N, "
                                 f"not {n_workers}")
            if c["worker"] == worker and c["id"] != self.claim_id and _claim_is_live(c):
                raise StoreError(f"worker {worker}/{n_workers} of {self.loc.url} is already running on {c['host']} "
                                 f"(pid {c['pid']}, last seen {time.time() - c['time']:.0f}s ago); give this process "
                                 "another --worker index, or wait until that one stops")
        self._worker = (worker, n_workers)
        self.heartbeat()

    def heartbeat(self) -> None:
        worker, n = self._worker
        claim = {"id": self.claim_id, "worker": worker, "n_workers": n, "host": socket.gethostname(),
                 "pid": os.getpid(), "time": time.time()}
        self.loc.put_atomic(claim_key(worker, n), record_bytes(claim))

    def release(self) -> None:
        worker, n = self._worker
        key = claim_key(worker, n)
        try:
            self.loc.fs.rm(self.loc.path(key))
            if self.loc.local:  # the claim's node directory too: plain zarr would list an empty one as a stray object
                node = os.path.dirname(self.loc.path(key))
                for name in os.listdir(node):  # temp files of an earlier holder of this slot killed mid-heartbeat
                    if ".tmp-" in name:
                        os.remove(os.path.join(node, name))
                os.rmdir(node)
        except FileNotFoundError:
            pass

    # -- shards
    def done_shards(self) -> set[int]:
        return {s for s in read_manifest(self.loc, self.header["format_version"]) if s < self.geometry.n_shards}

    def write_shard(self, s: int, acts: dict[str, np.ndarray], contexts_CT: np.ndarray,
                    quant_err: dict[str, tuple[float, float]] | None = None) -> dict:
        """Write shard `s` from unpermuted rows (acts[hook]: [rows, width] in the storage format) and publish it,
        taking its statistics here. `quant_err[hook]` = (Σ‖x - x̂‖², Σ‖x‖²) of the stored values against the exact
        ones, recorded in the entry. The harvest instead permutes and sums on the model's device
        (`write_permuted_shard`)."""
        h = self.header
        stats = {}
        for name in sorted(h["hooks"]):
            stats[name] = shard_stats(acts[name], h["storage"]["dtype"], h["hooks"][name]["d"])
            if quant_err is not None:
                stats[name].update(sq_err=float(quant_err[name][0]), sq_exact=float(quant_err[name][1]))
        r0, r1 = self.geometry.shard_row_range(s)
        return self._publish(s, acts, shard_permutation(h["seed"], s, r1 - r0), contexts_CT, stats)

    def write_permuted_shard(self, s: int, rows: dict[str, np.ndarray], contexts_CT: np.ndarray,
                             stats: dict[str, dict]) -> dict:
        """Write shard `s` from rows already in stored order (``rows[hook] = unpermuted[shard_permutation]``) with
        their manifest statistics taken elsewhere (`quant.stored_sums` → `quant.stats_from_sums`, plus sq_err and
        sq_exact), and publish it. The host's work is then the codec, the checksum and the file write."""
        return self._publish(s, rows, None, contexts_CT, stats)

    def _publish(self, s: int, acts: dict[str, np.ndarray], perm: np.ndarray | None, contexts_CT: np.ndarray,
                 stats: dict[str, dict]) -> dict:
        """Write shard `s`'s objects (acts[hook][perm] in stored order; perm None: already in it) and then its
        manifest entry, which publishes it."""
        g, h = self.geometry, self.header
        r0, r1 = g.shard_row_range(s)
        c0, c1 = g.shard_contexts(s)
        assert contexts_CT.shape == (c1 - c0, g.ctx_len)
        assert sorted(stats) == sorted(h["hooks"]), sorted(stats)
        objects = {}
        for name in sorted(h["hooks"]):
            a = acts[name]
            fmt, d = h["storage"]["dtype"], h["hooks"][name]["d"]
            assert a.shape == (r1 - r0, FORMATS[fmt].width(d)), (a.shape, name)
            assert stats[name]["count"] == r1 - r0, (stats[name]["count"], name)
            objects[chunk_key(acts_array(name), s, 0)] = self._write_object(acts_array(name), (s, 0), r0, a, perm)
        meta_perm = shard_permutation(h["seed"], s, r1 - r0) if perm is None else perm
        for name, v in unpermuted_meta(g, s, contexts_CT).items():
            objects[chunk_key(rows_array(name), s)] = self._write_object(rows_array(name), (s,), r0, v, meta_perm)
        objects[chunk_key(CONTEXTS, s, 0)] = self._write_object(CONTEXTS, (s, 0), c0, contexts_CT.astype(np.int32))
        assert sorted(objects) == sorted(shard_object_keys(h, s))
        worker, n = getattr(self, "_worker", (0, 1))
        entry = {"shard": s, "contexts": [c0, c1], "rows": [r0, r1], "objects": objects,
                 "stats": {name: stats[name] for name in sorted(stats)},
                 "writer": {"worker": f"{worker}/{n}", "host": socket.gethostname(), "pid": os.getpid(),
                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "package_version": __version__}}
        self.loc.put_atomic(manifest_key(s), record_bytes(entry))
        return entry

    def _write_object(self, array: str, coords: tuple[int, ...], start: int, rows: np.ndarray,
                      perm: np.ndarray | None = None) -> dict:
        """Write the object of `array` at chunk coordinates `coords` (`layout.chunk_key`) holding ``rows[perm]`` from
        row `start` on; return its manifest checksum. Encoded by hand (`encode.py`: the bytes zarr writes, checksummed
        as they are made), or through zarr and read back for a layout that module does not write (or when
        `hand_encode` is off)."""
        key = chunk_key(array, *coords)
        if array not in self._encoders:
            meta = json.loads(self.loc.get(meta_key(array)))
            self._encoders[array] = ObjectEncoder.for_array(meta) if self.hand_encode else None
        enc = self._encoders[array]
        if enc is not None:
            parts = enc.encode(rows, perm)
            return self.loc.put(key, made_ahead(parts) if rows.nbytes >= AHEAD_BYTES else parts)
        # zarr skips a chunk equal to the fill value (e.g. rows/context of a one-context shard is all 0): with one
        # inner chunk per shard the shard object would then never be written, so every chunk is written here
        with zarr.config.set({"array.write_empty_chunks": True}):
            self.group[array][start:start + len(rows)] = rows if perm is None else rows[perm]
        data = self.loc.get(key)
        if data is None:
            raise StoreError(f"shard object {key} vanished right after writing it to {self.loc.url}")
        return checksum(data)

    def finalize_if_complete(self) -> bool:
        """Write the final record when every shard is published. Content is a pure function of the manifest."""
        manifest = read_manifest(self.loc, self.header["format_version"])
        if len([s for s in manifest if s < self.geometry.n_shards]) < self.geometry.n_shards:
            return False
        stats = {}
        for hook in sorted(self.header["hooks"]):
            st = aggregate_stats(manifest, hook)
            stats[hook] = {**st, "mean": [float(x) for x in st["mean"]]}
        final = {"complete": True, "n_rows": self.geometry.n_rows, "n_contexts": self.geometry.n_contexts,
                 "stats": stats, "fingerprint": compute_fingerprint(self.header, manifest)}
        self.loc.put_atomic(final_key(), record_bytes(final))
        return True


def format_attributes(fmt: str) -> dict:
    """What a plain-zarr reader needs to decode an `acts/*` array of this format, beyond `logical_dtype`."""
    if not FORMATS[fmt].quantized:
        return {}
    out = {"row_layout": f"bytes 0-{SCALE_BYTES - 1}: float32 little-endian row scale; then the codes",
           "codes": "int8, x = code * scale" if fmt == "int8" else
           "4-bit, two per byte, low nibble first; x = levels[code] * scale"}
    if fmt == "nf4":
        out["levels"] = list(nf4_levels())
    return out


def shard_stats(a: np.ndarray, fmt: str, d: int | None = None, block_rows: int = 4096) -> dict:
    """A manifest entry's statistics of a shard's stored rows (the storage format's zarr dtype, [n, width]):
    {"count", "sum" [D], "sum_sq_norm", "nonfinite"} of the decoded values, in float64 (`quant.row_sums`), decoded a
    block of rows at a time so a whole shard is never held in float64."""
    d = a.shape[1] if d is None else d
    sums = torch.zeros(2 + d, dtype=torch.float64)
    for r0 in range(0, len(a), block_rows):
        sums += row_sums(decode(a[r0:r0 + block_rows], fmt, d))
    return stats_from_sums(sums.tolist(), len(a))


def probe_store_dir(loc: Location) -> None:
    """Refuse (StoreError) a local --out that cannot be written, or that is a non-empty directory and not a store
    (a store's first files are `zarr.json` and the harvest plan's `_plan/`)."""
    if not loc.local:
        return  # a writable remote location was probed with a PUT when it was opened
    if os.path.exists(loc.root) and not os.path.isdir(loc.root):
        raise StoreError(f"cannot write store to {loc.url}: it exists and is not a directory")
    try:
        os.makedirs(loc.root, exist_ok=True)
        probe = os.path.join(loc.root, f".probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise StoreError(f"cannot write store to {loc.url}: {e.strerror or e}; choose a writable --out")
    existing = set(os.listdir(loc.root)) - {META, PLAN_DIR}
    if existing and not os.path.exists(os.path.join(loc.root, META)):
        raise StoreError(f"{loc.url} is a non-empty directory that is not a store; choose a new --out")


def process_is_live(rec: dict, lease_seconds: float) -> bool:
    """A worker record's process ({"host", "pid", "time"}) is running: on this host by its pid, on another host when
    its last heartbeat is younger than `lease_seconds`. Claims and the harvest planner's record both use it."""
    if rec["host"] == socket.gethostname():
        try:
            os.kill(rec["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - rec["time"] < lease_seconds


def _claim_is_live(c: dict) -> bool:
    return process_is_live(c, CLAIM_LEASE_SECONDS)
