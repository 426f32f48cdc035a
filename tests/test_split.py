"""The held-out split object (`harvest.split.Split`) and the one place BOS rows are dropped: the loader's row
selection. Real harvested stores; rows checked against the store's own rows/position and rows/context read with zarr."""

import json

import numpy as np
import pytest
import torch
import zarr

from saecache.errors import RunDirError
from saecache.harvest.split import IMPORTED, Split, dataset_identity, has_bos_rows, heldout_cutoff
from saecache.harvest.store import Store
from saecache.train.loader import Loader


def _meta(path):
    g = zarr.open_group(str(path), mode="r")
    return {k: np.asarray(g[f"rows/{k}"][:]) for k in ("context", "position")}


def test_bos_rows_from_the_permutation_are_the_stored_position_0_rows(tiny_store):
    """`Split.bos_rows` computes a shard's BOS rows from the format's permutation, without reading: they must be
    exactly the rows whose stored position (rows/position, read with plain zarr) is 0."""
    st = Store.open(str(tiny_store))
    meta = _meta(tiny_store)
    split = Split(0.1, train_on_bos=False)
    assert has_bos_rows(st) and split.drops_bos(st) and not Split(0.1).drops_bos(st)
    for s in st.complete_shards():
        r0, r1 = st.geometry.shard_row_range(s)
        assert np.array_equal(split.bos_rows(st, s), np.flatnonzero(meta["position"][r0:r1] == 0))
    assert Split(0.1).bos_rows(st, 0) is None


@pytest.mark.parametrize("world", [1, 2])
def test_a_batch_never_holds_a_bos_row_and_keeps_its_size(tiny_store, world):
    """With BOS rows left out, no batch (every rank's, over two epochs and more) holds a position-0 row or a held-out
    context, every batch has the configured size, and one epoch serves training rows (non-BOS rows of the training
    contexts) each at most once, most of them."""
    st = Store.open(str(tiny_store))
    meta = _meta(tiny_store)
    split = Split.for_training([st], 0.1, train_on_bos=False)
    cut = heldout_cutoff(st, 0.1)
    want = {(int(c), int(p)) for c, p in zip(meta["context"], meta["position"]) if c < cut and p != 0}
    loaders = [Loader([st], ["mlp_out.0", "context", "position"], 256, 3, split=split, rank=r, world_size=world)
               for r in range(world)]
    per_epoch = loaders[0].batches_per_epoch(0)
    assert 0.8 * len(want) / 256 < per_epoch <= len(want) / 256  # partitions hold slightly different row counts
    seen = []
    for step in range(2 * per_epoch + 3):
        for ld in loaders:
            b = next(ld)
            assert b["mlp_out.0"].shape[0] == 256 // world == len(b["position"])
            assert bool((b["position"] != 0).all()) and bool((b["context"] < cut).all())
            if step < per_epoch:
                seen += list(zip(b["context"].tolist(), b["position"].tolist()))
    for ld in loaders:
        ld.close()
    assert len(seen) == len(set(seen)) == per_epoch * 256 and set(seen) <= want


def test_a_store_without_bos_rows_is_read_as_before(tiny_store, tmp_path, tiny_model_dir, tiny_corpus):
    """A store harvested with --no-store-bos holds no BOS rows: the run's split drops nothing, so its loader serves
    exactly the batches of a loader given only the held-out fraction (the order of 97d5ea9's trainer)."""
    from _store import harvest_tiny

    path = harvest_tiny(tmp_path / "nobos.zarr", tiny_model_dir, tiny_corpus, store_bos=False, tokens=4096)
    st = Store.open(str(path))
    split = Split.for_training([st], 0.05, train_on_bos=False)
    assert not has_bos_rows(st) and not split.drops_bos(st) and split.bos_rows(st, 0) is None
    a = Loader([st], ["mlp_out.0"], 128, 1, split=split)
    b = Loader([st], ["mlp_out.0"], 128, 1, heldout_fraction=0.05)
    assert all(torch.equal(next(a)["mlp_out.0"], next(b)["mlp_out.0"]) for _ in range(10))
    a.close()
    b.close()


def test_the_record_round_trips_and_old_records_map_once(tiny_store, tmp_path):
    """cfg.json's "split" rebuilds the same Split; the two records of a run dir from before it (top-level "heldout",
    per-store "split" and "heldout_from_context", train.train_on_bos or the older exclude_bos) map to it, once."""
    st = Store.open(str(tiny_store))
    split = Split.for_training([st], 0.1, train_on_bos=False)
    rec = json.loads(json.dumps(split.record()))  # as cfg.json holds it
    assert Split.from_cfg({"split": rec}, st) == split
    cut, n = heldout_cutoff(st, 0.1), st.geometry.n_contexts
    assert split.heldout_contexts(st) == (cut, n) and rec["stores"] == [{"dataset": dataset_identity(st),
                                                                        "heldout_contexts": [cut, n]}]
    old_store = {"url": str(tiny_store), "fingerprint": st.fingerprint(), "heldout_from_context": cut}
    old = {"heldout": {"fraction": 0.1, "rule": "..."}, "train": {"train_on_bos": False},
           "stores": [{**old_store, "split": rec["stores"][0]}]}
    assert Split.from_cfg(old, st) == split
    older = {"heldout": {"fraction": 0.1}, "train": {"exclude_bos": True}, "stores": [old_store]}
    assert Split.from_cfg(older, st) == split  # rebuilt from the store's header (same fingerprint)
    assert Split.from_cfg({**older, "train": {}}, st).train_on_bos  # before BOS was ever left out
    imported = Split.from_cfg({"heldout": {"fraction": IMPORTED}, "stores": []}, st)
    assert imported.imported and imported.train_on_bos and imported.heldout_contexts(st) == (0, n)
    lost = {**older, "stores": [{**old_store, "fingerprint": "other", "url": str(tmp_path / "gone.zarr")}]}
    with pytest.raises(RunDirError, match="records no held-out split identity") as e:
        Split.from_cfg(lost, st, "RUN")
    assert "\n" not in str(e.value)


def test_from_run_reads_the_run_dir(tiny_store, tmp_path):
    st = Store.open(str(tiny_store))
    split = Split.for_training([st], 0.2, train_on_bos=True)
    (tmp_path / "cfg.json").write_text(json.dumps({"split": split.record()}))
    assert Split.from_run(str(tmp_path), st) == split
    with pytest.raises(RunDirError, match="cfg.json is missing"):
        Split.from_run(str(tmp_path / "nothing"), st)


def test_heldout_batches_leave_bos_rows_out_only_when_the_run_did(tiny_store):
    """The held-out rows, each once, in storage order; without BOS rows for a run that left them out."""
    st = Store.open(str(tiny_store))
    meta = _meta(tiny_store)
    cut = heldout_cutoff(st, 0.1)
    held = (meta["context"] >= cut)
    for split, want in ((Split(0.1), held), (Split.for_training([st], 0.1, False), held & (meta["position"] != 0))):
        got = list(split.heldout_batches(st, ["mlp_out.0"], batch_size=100))
        pairs = [p for b in got for p in zip(b["context"].tolist(), b["position"].tolist())]
        assert pairs == list(zip(meta["context"][want].tolist(), meta["position"][want].tolist()))
        assert all(len(b["context"]) <= 100 for b in got)
