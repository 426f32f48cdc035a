"""The held-out split, in one place: which contexts of a store training never reads and evaluation reads.

Held out = the last ``ceil(fraction * n_contexts)`` contexts by context id. Context ids are a pure function of the
dataset, the tokenizer, the context length and the BOS packing (harvest/text.py), so the split has an identity that
does not depend on which store holds the rows: `dataset_identity` (a hash of exactly those inputs) plus the held-out
context range. Training records `split_record` for every training store in each SAE's cfg.json; evaluation asks
`heldout_range` for the contexts to read from whatever store it is given: the recorded range when that store holds
the same dataset's contexts (the training store itself, the same store after an `--allow-incomplete` run's harvest
finished, a `saecache copy --hooks` subset, a re-harvest with other hooks), every context when it holds another
dataset, and a refusal when it cannot tell (a cfg.json from before split identities, on a store whose fingerprint is
not the recorded one). The range is never widened.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch

RULE = "contexts with id >= n_contexts - ceil(fraction * n_contexts), n_contexts of the store trained on"


def heldout_cutoff(store, heldout_fraction: float) -> int:
    """First held-out context id of ``store``: contexts ``[cutoff, n_contexts)`` are never trained on."""
    n = store.geometry.n_contexts
    return n - (math.ceil(heldout_fraction * n) if heldout_fraction > 0 else 0)


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
        probe = hashlib.sha256(np.ascontiguousarray(store.array("contexts")[0], dtype=np.int64).tobytes()).hexdigest()
    what = {"dataset": [d.get("split"), d.get("text_field"), d.get("name")],
            "content": probe or d.get("fingerprint"),
            "tokenizer": header.get("tokenizer"), "ctx_len": header.get("ctx_len"), "bos": cfg.get("bos", True)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def split_record(store, heldout_fraction: float) -> dict:
    """What cfg.json records per training store: the dataset identity and the held-out context range."""
    return {"dataset": dataset_identity(store),
            "heldout_contexts": [heldout_cutoff(store, heldout_fraction), store.geometry.n_contexts]}


def heldout_range(records: list[dict], store) -> tuple[int, int] | None:
    """Held-out contexts ``(c0, c1)`` of ``store`` for a run that recorded ``records`` (its `split_record`s), clipped
    to the contexts the store has; ``None`` when no record is of this store's dataset (nothing of it was trained
    on). An empty range comes back as is (c0 >= c1): the caller refuses."""
    mine = dataset_identity(store)
    ranges = [r["heldout_contexts"] for r in records if r.get("dataset") == mine]
    if not ranges:
        return None
    c0 = max(a for a, _ in ranges)  # several training stores of one dataset: held out in every one of them
    c1 = min([b for _, b in ranges] + [store.geometry.n_contexts])
    return c0, c1


def context_batches(store, hooks: list[str], c0: int, c1: int, batch_size: int = 4096,
                    dtype: torch.dtype = torch.float32, max_rows: int | None = None):
    """Yield the stored rows of contexts ``[c0, c1)`` in storage order: ``{hook: [b, D] tensor, "context",
    "position", "token": [b] int64}``; only complete shards are read."""
    from saecache.harvest.store import to_torch

    g, served = store.geometry, 0
    for s in store.complete_shards():
        lo_c, hi_c = g.shard_contexts(s)
        if hi_c <= c0 or lo_c >= c1:
            continue
        r0, _ = g.shard_row_range(s)
        meta = store.read_meta(r0, g.shard_row_range(s)[1])
        keep = np.flatnonzero((meta["context"] >= c0) & (meta["context"] < c1))
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
