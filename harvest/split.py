"""The held-out split of a run, one object: which rows of a store training reads and evaluation reads.

`Split` owns the rule, its record in cfg.json, the rows on each side and the held-out batches. train builds one from
its config (`Split.for_training`), writes `record()` into every SAE's cfg.json ONCE (key "split") and hands it to the
loader, which asks it, per store, for the first held-out context (`cutoff`) and whether BOS rows are left out
(`drops_bos`). evaluate, `saecache replacement` and the Python API get theirs from the run (`Split.from_run` /
`from_cfg`, which also map the records of older run dirs) or from a fraction alone.

The rule. Held out = the last ``ceil(fraction * n_contexts)`` contexts by context id. Context ids are a pure function of
the dataset, the tokenizer, the context length and the BOS packing (harvest/text.py), so the split has an identity that
does not depend on which store holds the rows: `dataset_identity` (a hash of exactly those inputs) plus the held-out
context range, recorded per training store. Evaluation asks `heldout_contexts(store)` for the contexts to read from
whatever store it is given: the recorded range when that store holds the same dataset's contexts (the training store
itself, the same store after an `--allow-incomplete` run's harvest finished, a `saecache copy --hooks` subset, a
re-harvest with other hooks), every context when it holds another dataset (``None``), and a refusal when it cannot
tell (a cfg.json from before split identities, on a store whose fingerprint is not the recorded one). The range is
never widened.

BOS rows (position 0 of a store whose contexts start with BOS: `has_bos_rows`) are on neither side unless the run
trained on them (`train_on_bos`): the loader never serves them, the held-out statistics leave them out, and evaluation
splices them with the clean activation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import numpy as np
import torch

from saecache.errors import ConfigError, RunDirError, StoreError
from saecache.harvest.store import Store, shard_permutation, to_torch

RULE = "contexts with id >= n_contexts - ceil(fraction * n_contexts), n_contexts of the store trained on"
IMPORTED = 1.0
"""The held-out fraction recorded for an SAE imported from another format: never trained on a saecache store, so every
row of any store is held out."""
CFG_FILE = "cfg.json"  # the run dir's record (train/RUNDIR.md)


def heldout_cutoff(store, heldout_fraction: float) -> int:
    """First held-out context id of ``store``: contexts ``[cutoff, n_contexts)`` are never trained on."""
    n = store.geometry.n_contexts
    return n - (math.ceil(heldout_fraction * n) if heldout_fraction > 0 else 0)


def has_bos_rows(store) -> bool:
    """Whether ``store`` holds BOS rows: position 0 is stored (``first_position == 0``) and its contexts start with
    BOS (the harvest's ``bos``, true unless a store says otherwise)."""
    return store.geometry.first_position == 0 and bool((store.header.get("config") or {}).get("bos", True))


def dataset_identity(store) -> str:
    """Hash of what fixes a store's context ids: the text settings (split, text field, config name), tokenizer,
    context length, BOS packing, and the token ids of context 0 as a content probe. Stores with the same identity
    hold the same tokens under the same context id (which positions and hooks they store may differ).

    Not the dataset fingerprint: it covers exactly the documents a harvest consumed, so a shorter harvest of the same
    text (whose contexts are a prefix of the longer one's) has another fingerprint yet holds training contexts. A store
    without its shard 0 falls back to the fingerprint (a different identity only widens to "another dataset" when
    the fingerprints differ, which a partial store of the same harvest does not)."""
    header = store.header
    d, cfg = header.get("dataset") or {}, header.get("config") or {}
    probe = None
    if 0 in store.manifest():
        probe = hashlib.sha256(np.ascontiguousarray(store.contexts(0, 1)[0], dtype=np.int64).tobytes()).hexdigest()
    what = {"dataset": [d.get("split"), d.get("text_field"), d.get("name")],
            "content": probe or d.get("fingerprint"),
            "tokenizer": header.get("tokenizer"), "ctx_len": header.get("ctx_len"), "bos": cfg.get("bos", True)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Split:
    """Which rows of a store are trained on and which are held out, for one run (cfg.json's "split")."""

    heldout_fraction: float
    """Fraction of each training store's contexts, the last by context id, never trained on (`IMPORTED`: every row
    of any store is held out)."""
    train_on_bos: bool = True
    """BOS rows are trained on and evaluated like any other (a split from a fraction alone); off (`saecache train`'s
    default, `for_training` passes it): they are left out of training and of the held-out statistics, and spliced
    with the clean activation."""
    stores: tuple | None = None
    """Per training store, in the run's order: ``{"dataset": dataset_identity, "heldout_contexts": [c0, c1]}``;
    None for a split from a fraction alone (the rule applies to whatever store it is given)."""

    # -- training side
    @classmethod
    def for_training(cls, stores, heldout_fraction: float, train_on_bos: bool) -> Split:
        """The split a run over ``stores`` trains under, with each store's record."""
        return cls(heldout_fraction, train_on_bos,
                   tuple({"dataset": dataset_identity(st),
                          "heldout_contexts": [heldout_cutoff(st, heldout_fraction), st.geometry.n_contexts]}
                         for st in stores))

    def cutoff(self, store) -> int:
        """First held-out context of a store trained on (the rule applied to it)."""
        return heldout_cutoff(store, self.heldout_fraction)

    def drops_bos(self, store) -> bool:
        """Whether this run leaves the BOS rows of ``store`` out (training, held-out statistics, splicing)."""
        return not self.train_on_bos and has_bos_rows(store)

    def bos_rows(self, store, shard: int) -> np.ndarray | None:
        """Offsets (ascending) of the stored rows of ``shard`` that are BOS rows this run leaves out; None when it
        leaves none out of ``store``. Computed from the shard's permutation (harvest/SPEC.md: stored row j is
        unpermuted row perm[j], at position perm[j] % rows_per_context when position 0 is stored), so nothing is
        read: about 1.5 ms per 2^16-row shard, once per training start."""
        if not self.drops_bos(store):
            return None
        g = store.geometry
        r0, r1 = g.shard_row_range(shard)
        return np.flatnonzero(shard_permutation(store.header["seed"], shard, r1 - r0) % g.rows_per_context == 0)

    def record(self) -> dict:
        """What cfg.json records, once, under "split"."""
        return {"heldout_fraction": self.heldout_fraction, "rule": RULE, "train_on_bos": self.train_on_bos,
                "stores": [dict(s) for s in self.stores or ()]}

    # -- evaluation side
    @classmethod
    def from_run(cls, run_dir: str, store) -> Split:
        """The split a run dir trained under (`from_cfg` on its cfg.json), for evaluating it on ``store``."""
        path = os.path.join(run_dir, CFG_FILE)
        if not os.path.exists(path):
            raise RunDirError(f"{run_dir} is not a run dir: {CFG_FILE} is missing (train one with `saecache train`)")
        with open(path) as f:
            return cls.from_cfg(json.load(f), store, run_dir)

    @classmethod
    def from_cfg(cls, cfg: dict, store, run_dir: str = "the run") -> Split:
        """The split of a run's cfg.json. Older records are mapped here, once: "heldout" {fraction} beside a per-store
        "split" (or, older still, only "heldout_from_context", rebuilt from the training store's header when it opens;
        a store that cannot be opened must be the one evaluated, same fingerprint, else this refuses rather than
        guess); "train_on_bos" from the train config (`exclude_bos` before it, and every row before that); an
        imported SAE counts as trained on BOS (evaluated at every position, as before)."""
        if "split" in cfg:
            r = cfg["split"]
            return cls(float(r["heldout_fraction"]), bool(r["train_on_bos"]), tuple(r.get("stores") or ()))
        fraction = float((cfg.get("heldout") or {}).get("fraction", 0.0))
        train = cfg.get("train")
        # trained on BOS: imported (not trained by saecache), or older than `exclude_bos` (then every row was trained)
        bos = True if train is None else bool(train.get("train_on_bos", not train.get("exclude_bos", False)))
        if fraction >= IMPORTED:
            return cls(fraction, bos)
        records = []
        for s in cfg.get("stores") or []:
            if "split" in s:
                records.append(s["split"])
                continue
            if s.get("fingerprint") == store.fingerprint():
                trained = store
            else:
                try:
                    trained = Store.open(s["url"])
                except (StoreError, OSError):
                    raise RunDirError(f"run {run_dir} records no held-out split identity (an older saecache) and its "
                                      f"training store {s.get('url')} cannot be opened, so which rows of {store.url} "
                                      "were held out is unknown; evaluate on the training store itself") from None
            records.append({"dataset": dataset_identity(trained),
                            "heldout_contexts": [int(s.get("heldout_from_context", trained.geometry.n_contexts)),
                                                 trained.geometry.n_contexts]})
        return cls(fraction, bos, tuple(records))

    @property
    def imported(self) -> bool:
        """An SAE never trained on a saecache store: every row of any store is held out."""
        return self.heldout_fraction >= IMPORTED

    def heldout_contexts(self, store) -> tuple[int, int] | None:
        """Held-out contexts ``(c0, c1)`` of ``store``, clipped to the contexts it has; ``None`` when no record is of
        this store's dataset (nothing of it was trained on). An empty range comes back as is (c0 >= c1): the caller
        refuses. A split from a fraction alone (`stores` None) applies the rule to ``store``."""
        n = store.geometry.n_contexts
        if self.imported:
            return 0, n
        if self.stores is None:
            return self.cutoff(store), n
        mine = dataset_identity(store)
        ranges = [r["heldout_contexts"] for r in self.stores if r.get("dataset") == mine]
        if not ranges:
            return None
        c0 = max(a for a, _ in ranges)  # several training stores of one dataset: held out in every one of them
        c1 = min([b for _, b in ranges] + [n])
        return c0, c1

    def heldout_batches(self, store, hooks: list[str], batch_size: int = 4096, dtype: torch.dtype = torch.float32,
                        max_rows: int | None = None, contexts: tuple[int, int] | None = None):
        """The held-out rows of ``store`` in storage order (`context_batches`; BOS rows out when `drops_bos`), of
        ``contexts`` (default: `heldout_contexts`, every context of another dataset's store)."""
        if contexts is None:
            contexts = self.heldout_contexts(store) or (0, store.geometry.n_contexts)
        if contexts[0] >= contexts[1]:
            raise ConfigError("heldout_fraction is 0: the run has no held-out rows; evaluate on another store")
        yield from context_batches(store, hooks, *contexts, batch_size, dtype, max_rows, self.drops_bos(store))


def context_batches(store, hooks: list[str], c0: int, c1: int, batch_size: int = 4096,
                    dtype: torch.dtype = torch.float32, max_rows: int | None = None, drop_bos: bool = False):
    """Yield the stored rows of contexts ``[c0, c1)`` in storage order (without position 0 with ``drop_bos``):
    ``{hook: [b, D] tensor, "context", "position", "token": [b] int64}``; only complete shards are read."""
    served = 0
    for _, _, _, r0, r1 in store.shards((c0, c1)):
        meta = store.read_meta(r0, r1)
        sel = (meta["context"] >= c0) & (meta["context"] < c1)
        if drop_bos:
            sel &= meta["position"] != 0
        keep = np.flatnonzero(sel)
        for i in range(0, len(keep), batch_size):
            idx = keep[i:i + batch_size]
            if max_rows is not None:
                idx = idx[:max_rows - served]
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            out = {h: to_torch(store.read_acts(h, r0 + lo, r0 + hi)[idx - lo], store.logical_dtype,
                               store.hooks[h]["d"]).to(dtype) for h in hooks}
            out.update({k: torch.from_numpy(meta[k][idx].astype(np.int64)) for k in ("context", "position", "token")})
            yield out
            served += len(idx)
            if max_rows is not None and served >= max_rows:
                return
