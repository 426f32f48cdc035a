"""`saecache copy`: push or pull a whole store, or some of its hooks, between local paths and fsspec URLs.

The copy follows the store's own publication rule (SPEC.md): array metadata first, then per shard its objects and,
last, its manifest entry; the group's `zarr.json` (what makes the destination a store) after the metadata, and the
final record at the very end. The copy keeps the source's format version. So an interrupted copy is a valid,
incomplete store, and rerunning the command resumes: shards whose manifest entry is already at the destination,
with every object present at the right size, are skipped. Every object read from the source is checked against the
source manifest before it is written, and once all shards are there every destination object is read back and
checked; a shard that fails is copied again once.

Copying a subset of hooks makes a derived store: its header lists only those hooks and records where it came from
(`derived_from`), and its manifest entries, statistics and fingerprint cover only the kept objects.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from saecache.errors import StoreError
from saecache.harvest.config import CopyConfig  # noqa: F401  (defined with the stage's other configs: light to import)
from saecache.harvest.store import (
    ACTS_DIR, META, TOP_LEVEL, Location, Store, aggregate_stats, check_object, compute_fingerprint, final_key,
    manifest_key, metadata_keys, parse_record, record_bytes, redact_url, remote_errors,
)


def _kept(key: str, hooks) -> bool:
    return not key.startswith(f"{ACTS_DIR}/") or key.split("/")[1] in hooks


def derived_header(src: Store, hooks: tuple[str, ...]) -> dict:
    h = dict(src.header)
    h["hooks"] = {k: v for k, v in src.hooks.items() if k in hooks}
    h["derived_from"] = {"url": src.url, "fingerprint": src.fingerprint(), "hooks": sorted(src.hooks),
                         "kept_hooks": sorted(hooks), "made_by": "saecache copy --hooks"}
    return h


def _filter_entry(entry: dict, hooks) -> dict:
    return {**entry, "objects": {k: v for k, v in entry["objects"].items() if _kept(k, hooks)},
            "stats": {k: v for k, v in entry["stats"].items() if k in hooks}}


class _Copier:
    def __init__(self, cfg: CopyConfig):
        self.cfg = cfg
        self.src = Store.open(cfg.src, cfg.src_options, cache=None)
        self.hooks = tuple(sorted(cfg.hooks)) if cfg.hooks else tuple(sorted(self.src.hooks))
        for h in self.hooks:
            self.src.require_hook(h)
        self.full = set(self.hooks) == set(self.src.hooks)
        self.dst = Location(cfg.dst, cfg.dst_options, read_only=False)
        self.header = self.src.header if self.full else derived_header(self.src, self.hooks)
        self.manifest = self.src.manifest(refresh=True)
        self.version = self.src.version  # a copy keeps the source's format (and so its fingerprint)

    def _get_src(self, key: str) -> bytes:
        data = self.src.loc.get(key)
        if data is None:
            raise StoreError(f"{key} is missing from the source {self.src.url}; run `saecache verify "
                             f"{self.src.url}`")
        return data

    def prepare(self) -> None:
        """Check or create the destination's metadata (group zarr.json last)."""
        raw = self.dst.get(META)
        if raw is not None:
            found = json.loads(raw).get("attributes", {}).get("saecache")
            if found != self.header:
                raise StoreError(f"{redact_url(self.cfg.dst)} already holds a different store (its header differs "
                                 "from the one being copied); choose a new destination")
            return
        foreign = sorted(k for k in self.dst.sizes() if k.split("/")[0] not in TOP_LEVEL)
        if foreign:
            raise StoreError(f"{redact_url(self.cfg.dst)} is not empty and not a store (it holds {foreign[0]}); choose "
                             "a new destination")
        for key in metadata_keys(self.hooks, self.version):
            self.dst.put_atomic(key, self._get_src(key))
        group = json.loads(self._get_src(META))
        if self.full:
            self.dst.put_atomic(META, self._get_src(META))
        else:
            group.setdefault("attributes", {})["saecache"] = self.header
            self.dst.put_atomic(META, json.dumps(group, indent=2).encode())

    def entry(self, s: int) -> tuple[dict, bytes]:
        entry = self.manifest[s] if self.full else _filter_entry(self.manifest[s], self.hooks)
        raw = self.src.loc.get(manifest_key(s, self.version)) if self.full else None
        return entry, raw if raw is not None else record_bytes(entry, self.version)

    def copy_shard(self, s: int) -> int:
        entry, raw = self.entry(s)
        n = 0
        for key, want in sorted(entry["objects"].items()):
            data = self._get_src(key)
            if check_object(key, data, want) is not None:
                raise StoreError(f"{key} of the source {self.src.url} does not match its manifest checksum (the "
                                 f"source is corrupt); run `saecache verify {self.src.url}`")
            self.dst.put_atomic(key, data)
            n += len(data)
        self.dst.put_atomic(manifest_key(s, self.version), raw)  # published last
        return n

    def up_to_date(self, s: int, sizes: dict[str, int]) -> bool:
        entry, _ = self.entry(s)
        raw = self.dst.get(manifest_key(s, self.version))
        if raw is None or parse_record(raw, self.version).get("objects") != entry["objects"]:
            return False
        return all(sizes.get(k) == v["nbytes"] for k, v in entry["objects"].items())

    def shard_problem(self, s: int) -> str | None:
        """None if every destination object of shard `s` reads back with the manifest's checksum."""
        for key, want in sorted(self.entry(s)[0]["objects"].items()):
            data = self.dst.get(key)
            if check_object(key, data, want) is not None:
                return f"{key} {'missing' if data is None else 'corrupt'}"
        return None

    def finish(self) -> bool:
        final_raw = self.src.loc.get(final_key(self.version))
        if final_raw is None or len(self.manifest) < self.src.geometry.n_shards:
            return False
        if self.full:
            self.dst.put_atomic(final_key(self.version), final_raw)
            return True
        manifest = {s: self.entry(s)[0] for s in self.manifest}
        stats = {}
        for hook in self.hooks:
            st = aggregate_stats(manifest, hook)
            stats[hook] = {**st, "mean": [float(x) for x in st["mean"]]}
        final = {"complete": True, "n_rows": self.src.geometry.n_rows, "n_contexts": self.src.geometry.n_contexts,
                 "stats": stats, "fingerprint": compute_fingerprint(self.header, manifest)}
        self.dst.put_atomic(final_key(self.version), record_bytes(final, self.version))
        return True


def copy_store(cfg: CopyConfig, progress=None) -> dict:
    """Copy (or resume copying) `cfg.src` to `cfg.dst`; returns a summary. `progress(n)` is called per shard."""
    t0 = time.time()
    c = _Copier(cfg)
    c.prepare()
    shards = sorted(s for s in c.manifest if s < c.src.geometry.n_shards)
    sizes = c.dst.sizes()
    todo = [s for s in shards if not c.up_to_date(s, sizes)]
    skipped = len(shards) - len(todo)
    if progress:
        progress(skipped)
    nbytes, repaired = 0, []
    for attempt in range(2):
        with ThreadPoolExecutor(cfg.threads) as pool:
            for n in pool.map(c.copy_shard, todo):
                nbytes += n
                if progress:
                    progress(1)
        with ThreadPoolExecutor(cfg.threads) as pool:  # the end-to-end check: every destination object read back
            bad = {s: p for s, p in zip(shards, pool.map(c.shard_problem, shards)) if p is not None}
        if not bad:
            break
        if attempt == 1:
            first = next(iter(bad.items()))
            raise StoreError(f"{len(bad)} shard(s) of {redact_url(cfg.dst)} do not match their checksums after copying "
                             f"twice (e.g. shard {first[0]}: {first[1]}); check the destination storage")
        for s in bad:
            try:
                with remote_errors(cfg.dst, "unpublishing a damaged shard of"):
                    c.dst.fs.rm(c.dst.path(manifest_key(s, c.version)))  # unpublish before rewriting
            except FileNotFoundError:
                pass
        todo, repaired = sorted(bad), sorted(bad)
    complete = c.finish()
    dst = Store.open(cfg.dst, cfg.dst_options, cache=None)
    return {"src": c.src.url, "dst": dst.url, "hooks": list(c.hooks), "shards": len(shards),
            "shards_total": c.src.geometry.n_shards, "shards_copied": len(shards) - skipped + len(repaired),
            "shards_skipped": skipped, "shards_repaired": repaired, "bytes_copied": nbytes, "complete": complete,
            "fingerprint": dst.fingerprint(), "seconds": time.time() - t0, "verified": True}

