"""What the training loader reads: stores → units (inner chunks, held-out contexts removed) → row sources.

A unit is one inner chunk of one complete shard. The loader copies a unit's rows from, per hook, either a zero-copy
view of the memory-mapped shard file (`ChunkReader.views`: uncompressed local store) or its window buffer, into which
`ChunkReader.read` decodes the chunk (the store's `chunk_reader`, which checks each chunk's crc32c; a remote store
without the shard cache through `Store.read_acts`). Transport and manifest are the store's business: this module uses
its public reader API only. Also here: opening and checking the stores, and the row selection the run's `Split` asks
for (the held-out cut, and the BOS rows left out: the one place they are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saecache.errors import StoreError
from saecache.harvest.split import Split
from saecache.harvest.store import Store, single_threaded, to_torch  # noqa: F401 (the loader's casts)

# per-row metadata that can be requested like a hook (int64 tensors): the store's rows/* arrays, plus "row" (the row
# index inside its store) and "store" (the index of its store in the loader's list)
META = ("context", "position", "token", "row", "store")

# gathers move storage bits: an integer type of the element's width (so quantized rows, bf16, fp16, fp32 and int64
# all gather alike)
BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int64": torch.int64}


@dataclass(frozen=True)
class Unit:
    """One inner chunk to read: rows ``[row0, row0 + n)`` of store ``src``; ``keep`` (the offsets read: a shard
    straddling the held-out cut) or ``drop`` (the offsets left out, the BOS rows: 1/ctx_len of them, so a store's units
    stay small in memory) filter its rows."""

    src: int
    row0: int
    n: int
    keep: np.ndarray | None = None
    drop: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.keep) if self.keep is not None else self.n - (0 if self.drop is None else len(self.drop))

    def kept(self) -> np.ndarray | None:
        """Offsets of the rows read, ascending; None: every row."""
        if self.drop is None:
            return self.keep
        mask = np.ones(self.n, dtype=bool)
        mask[self.drop] = False
        return np.flatnonzero(mask)


def open_stores(urls: list[str], hooks: list[str], require_complete: bool = True) -> list[Store]:
    """Open and check stores: hooks exist with one width across stores, completeness, one storage dtype."""
    stores = [Store.open(u) for u in urls]
    for st in stores:
        for h in hooks:
            if h in META:
                continue
            st.require_hook(h)
            d0 = stores[0].hooks[h]["d"]
            if st.hooks[h]["d"] != d0:
                raise StoreError(f"hook {h} has width {st.hooks[h]['d']} in {st.url} but {d0} in {stores[0].url}")
        if require_complete:
            st.require_complete()
        elif not st.complete_shards():
            raise StoreError(f"store {st.url} has no complete shard yet; wait for the harvest to publish one")
        if st.logical_dtype != stores[0].logical_dtype:
            raise StoreError(f"stores mix dtypes ({st.logical_dtype} vs {stores[0].logical_dtype}); use one dtype")
    return stores


def training_units(stores: list[Store], split: Split) -> list[Unit]:
    """Every readable inner chunk of the complete shards, with the rows `split` trains on: held-out contexts removed
    (`Split.cutoff`), and the BOS rows when the split leaves them out (`Split.bos_rows`)."""
    units = []
    for i, st in enumerate(stores):
        g, cut = st.geometry, split.cutoff(st)
        for s, c0, c1, r0, r1 in st.shards((0, cut)):
            ctx = st.read_meta(r0, r1, ("context",))["context"] if c1 > cut else None
            bos = split.bos_rows(st, s)  # offsets in the shard, ascending; None: none left out
            for c in range(g.chunks_per_shard):
                a, b = r0 + c * g.chunk_rows, min(r0 + (c + 1) * g.chunk_rows, r1)
                if a >= b:
                    break
                drop = None if bos is None else bos[(bos >= a - r0) & (bos < b - r0)] - (a - r0)
                if ctx is not None:
                    mask = ctx[a - r0:b - r0] < cut
                    if drop is not None:
                        mask[drop] = False
                    keep = np.flatnonzero(mask)
                    if len(keep):
                        units.append(Unit(i, a, b - a, keep))
                elif drop is None or len(drop) < b - a:
                    units.append(Unit(i, a, b - a, None, drop if drop is not None and len(drop) else None))
    return units


def split_units(units: list[Unit], pieces: int) -> list[Unit]:
    """Each unit cut into ``pieces`` runs of adjacent rows (the last pieces may be shorter or absent): what lets a
    small store, with fewer inner chunks than a batch's partitions need, still feed every partition. A piece still
    decodes its whole inner chunk, so this is only for stores too small to train otherwise."""
    out = []
    for u in units:
        step = -(-u.n // pieces)
        for a in range(0, u.n, step):
            b = min(a + step, u.n)
            if u.keep is not None:
                keep = u.keep[(u.keep >= a) & (u.keep < b)] - a
                if len(keep):
                    out.append(Unit(u.src, u.row0 + a, b - a, keep))
            elif u.drop is not None:
                drop = u.drop[(u.drop >= a) & (u.drop < b)] - a
                if len(drop) < b - a:
                    out.append(Unit(u.src, u.row0 + a, b - a, None, drop if len(drop) else None))
            else:
                out.append(Unit(u.src, u.row0 + a, b - a))
    return out


class ChunkReader:
    """Reads units of one store for a set of hooks: per hook the store's `chunk_reader` (local shard files or the
    remote store's verified cache), else `Store.read_acts`; `rows/*` through `Store.read_meta`."""

    def __init__(self, store: Store, hooks: list[str], direct: bool):
        self.store = store
        self.direct = {h: None if h in META or not direct else store.chunk_reader(h) for h in hooks}
        store.require_objects(hooks)

    @staticmethod
    def _whole_chunk(unit: Unit, arr) -> tuple[int, int] | None:
        """(shard, inner chunk) when ``unit`` is one whole inner chunk of a shard-read array, else None."""
        if unit.keep is not None or unit.drop is not None or arr is None or unit.n != arr.chunk_rows:
            return None
        shard, rem = divmod(unit.row0, arr.shard_rows)
        return shard, rem // arr.chunk_rows

    def views(self, unit: Unit, check: bool = True) -> dict[str, np.ndarray]:
        """Hooks whose rows of ``unit`` need no copy: views of the mapped shard file (uncompressed local store, a
        whole chunk). Cheap with ``check`` False: nothing is read here, and `check_views` (one pass over the pages:
        each chunk's crc32c) is left to the caller's reader thread."""
        out = {}
        for h, arr in self.direct.items():
            where = self._whole_chunk(unit, arr) if arr is not None and arr.mappable else None
            view = arr.chunk_view(*where, check=check) if where else None
            if view is not None:
                out[h] = view
        return out

    def check_views(self, unit: Unit, views: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check `views(unit, check=False)` against their chunks' crc32c (a damaged chunk raises); returns them."""
        for h, view in views.items():
            self.direct[h].check_view(*self._whole_chunk(unit, self.direct[h]), view)
        return views

    def read(self, unit: Unit, bufs: dict[str, np.ndarray], off: int, skip=()) -> None:
        """Write the unit's rows of every hook not in ``skip`` into rows ``[off, off + unit.rows)`` of the hook's
        window buffer (a whole local inner chunk is decoded straight into it)."""
        sl, kept = slice(off, off + unit.rows), unit.kept()
        for h, arr in self.direct.items():
            if h in skip:
                continue
            dst = bufs[h]
            where = self._whole_chunk(unit, arr)
            if where:
                arr.read_chunk(*where, out=dst[sl])
            elif h == "row":
                dst[sl] = np.arange(unit.row0, unit.row0 + unit.n, dtype=np.int64) if kept is None else \
                    unit.row0 + kept
            elif h == "store":
                dst[sl] = unit.src
            else:
                if h in META:
                    a = self.store.read_meta(unit.row0, unit.row0 + unit.n, (h,))[h]
                elif arr is not None:
                    a = arr.read_rows(unit.row0, unit.n)
                else:
                    a = self.store.read_acts(h, unit.row0, unit.row0 + unit.n)
                dst[sl] = a if kept is None else a[kept]

