"""The Python API (saecache/api.py, docs/api.md): open_store (local and S3), batches (determinism, the held-out split,
row-aligned hooks checked against the store's own row reads), load_sae, splice (equal to evaluate's splice), and the
docs page's code blocks executed in order against a tiny store and run dir."""

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import saecache
from _store import TINY_STORE_HOOKS
from saecache.errors import ConfigError, RunDirError, StoreError
from test_remote import BUCKET, boto, s3, use_identity  # noqa: F401 (s3: the loopback server fixture)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
RUN_NAME = "topk-mlp_out.1-4096-k32"  # what the README's first-store `saecache train` names its SAE


@pytest.fixture(scope="module")
def run_dir(tiny_store, tmp_path_factory):
    """`saecache train`'s default SAE (TopK, 4096 features, k=32) on mlp_out.1 of the tiny store, briefly trained."""
    from saecache.train.config import SAESpec, TrainConfig
    from saecache.train.trainer import run_training

    out = tmp_path_factory.mktemp("api_runs")
    cfg = TrainConfig(stores=[str(tiny_store)], out=str(out), steps=20, batch_size=64, warmup_steps=2,
                      checkpoint_every=1000, progress=False, device="cpu", saes=[SAESpec(hook_in="mlp_out.1")])
    (d,) = run_training(cfg)
    assert os.path.basename(d) == RUN_NAME
    return Path(d)


@pytest.fixture(scope="module")
def rows_by_id(tiny_store):
    """(context, position) -> stored row, and every hook's rows as float32, read with the Store itself."""
    from saecache.harvest.store import Store

    st = Store.open(str(tiny_store))
    n = st.geometry.n_rows
    meta = st.read_meta(0, n)
    index = {(int(c), int(p)): r for r, (c, p) in enumerate(zip(meta["context"], meta["position"]))}
    acts = {h: st.read_acts_torch(h, 0, n).float() for h in TINY_STORE_HOOKS}
    return index, acts, meta


def collect(batches) -> list:
    return [tuple(t.clone() for t in b) for b in batches]


# ----------------------------------------------------------------------------------------------------- open_store


def test_open_store_describes_the_store(tiny_store):
    from saecache.harvest.store import Store

    st = Store.open(str(tiny_store))
    store = saecache.open_store(str(tiny_store))
    assert store.hooks == {h: st.hooks[h]["d"] for h in TINY_STORE_HOOKS} and store.hooks["mlp_out.1"] == 64
    assert store.rows == 8192 == store.n_contexts * store.ctx_len and store.ctx_len == 32
    assert store.complete and store.dtype == "float16"
    np.testing.assert_allclose(store.stats["mlp_out.0"]["mean"], st.stats("mlp_out.0")["mean"])
    assert store.provenance["model"]["name"] == st.header["model"]["name"]
    assert store.provenance["hooks"]["mlp_in.0"]["io"] == "input"
    assert list(store.heldout_contexts()) == [253, 254, 255]  # ceil(1 % of 256) contexts: train's default split
    assert torch.equal(store.tokens(3, 5), torch.from_numpy(st.contexts(3, 5).astype(np.int64)))


def test_open_store_refuses_a_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no store at .*zarr.json not found"):
        saecache.open_store(str(tmp_path / "none.zarr"))


# -------------------------------------------------------------------------------------------------------- batches


def test_batches_are_the_train_loaders_batches(tiny_store):
    """split=train serves `saecache train`'s loader order (its defaults: 8 partitions, 1 % held out)."""
    from saecache.harvest.store import Store
    from saecache.train.loader import Loader

    store = saecache.open_store(str(tiny_store))
    got = [b.clone() for b in store.batches("mlp_out.1", batch_size=256, seed=5, steps=6)]
    loader = Loader([Store.open(str(tiny_store))], ["mlp_out.1"], 256, 5, heldout_fraction=0.01)
    want = [next(loader)["mlp_out.1"] for _ in range(6)]
    loader.close()
    assert len(got) == 6 and all(g.shape == (256, 64) and g.dtype == torch.float32 for g in got)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_batches_deterministic_by_seed(tiny_store):
    store = saecache.open_store(str(tiny_store))
    a = collect(store.batches(["context", "position"], batch_size=512, seed=0, steps=4))
    b = collect(store.batches(["context", "position"], batch_size=512, seed=0, steps=4))
    c = collect(store.batches(["context", "position"], batch_size=512, seed=1, steps=4))
    assert all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
    assert not torch.equal(a[0][0], c[0][0])


def test_train_split_never_serves_a_heldout_row(tiny_store):
    """Two epochs and more of the train split: no held-out context; one epoch serves no row twice."""
    store = saecache.open_store(str(tiny_store))
    held = set(store.heldout_contexts(0.1))
    assert len(held) == 26
    seen = []
    for ctx, pos in store.batches(["context", "position"], batch_size=512, seed=2, heldout_fraction=0.1):
        seen += list(zip(ctx.tolist(), pos.tolist()))
    assert len(seen) == len(set(seen)) > 0.5 * (256 - 26) * 32  # one epoch: distinct rows, most of them
    assert not {c for c, _ in seen} & held
    more = torch.cat([ctx for ctx, in store.batches(["context"], batch_size=512, seed=2, heldout_fraction=0.1,
                                                    steps=40)])
    assert len(more) == 40 * 512 > 2 * (256 - 26) * 32 and not set(more.tolist()) & held


def test_heldout_split_gives_exactly_the_heldout_rows(tiny_store):
    store = saecache.open_store(str(tiny_store))
    got = collect(store.batches(["context", "position"], batch_size=100, split="heldout", heldout_fraction=0.1))
    pairs = [p for ctx, pos in got for p in zip(ctx.tolist(), pos.tolist())]
    want = {(c, p) for c in range(230, 256) for p in range(32)}
    assert len(pairs) == len(want) and set(pairs) == want
    assert all(len(ctx) <= 100 for ctx, _ in got)


def test_all_split_covers_every_context(tiny_store):
    store = saecache.open_store(str(tiny_store))
    ctx = torch.cat([c for c, in store.batches(["context"], batch_size=512, split="all", seed=0)])
    assert set(ctx.tolist()) == set(range(256))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_several_hooks_are_row_aligned(tiny_store, rows_by_id, split):
    """Row i of every hook's tensor is the store's row of the same (context, position), read with Store itself."""
    index, acts, meta = rows_by_id
    store = saecache.open_store(str(tiny_store))
    hooks = ["mlp_in.0", "mlp_out.0", "mlp_out.1", "context", "position", "token"]
    n = 0
    for x_in, x_out0, x_out1, ctx, pos, tok in store.batches(hooks, batch_size=256, split=split, steps=3,
                                                              heldout_fraction=0.05):
        rows = torch.tensor([index[(c, p)] for c, p in zip(ctx.tolist(), pos.tolist())])
        assert torch.equal(x_in, acts["mlp_in.0"][rows]) and torch.equal(x_out0, acts["mlp_out.0"][rows])
        assert torch.equal(x_out1, acts["mlp_out.1"][rows])
        assert torch.equal(tok, torch.from_numpy(meta["token"][rows.numpy()].astype(np.int64)))
        n += len(rows)
    assert n == (3 * 256 if split == "train" else 13 * 32)


def test_normalize_uses_the_store_statistics(tiny_store):
    store = saecache.open_store(str(tiny_store))
    raw = next(store.batches("mlp_out.0", batch_size=256, seed=0, steps=1))
    norm = next(store.batches("mlp_out.0", batch_size=256, seed=0, steps=1, normalize=True))
    scale = store.stats["mlp_out.0"]["mean_sq_norm"] ** 0.5
    torch.testing.assert_close(norm, raw / scale)
    assert 0.5 < norm.pow(2).sum(1).mean().item() < 2  # about unit mean squared norm, as training sees it


def test_batches_refuse_bad_input(tiny_store):
    store = saecache.open_store(str(tiny_store))
    with pytest.raises(StoreError, match="has no hook 'mlp_out.7'; it has: mlp_in.0, mlp_out.0, mlp_out.1"):
        next(store.batches("mlp_out.7"))
    with pytest.raises(ConfigError, match="split 'test' is not one of train, heldout, all"):
        next(store.batches("mlp_out.0", split="test"))
    with pytest.raises(ConfigError, match="heldout_fraction 1.5 must be in"):
        next(store.batches("mlp_out.0", heldout_fraction=1.5))


# ------------------------------------------------------------------------------------------------------------ S3


def test_open_store_on_s3_with_storage_options(s3, tiny_store, tmp_path, monkeypatch):
    """The tiny store's files uploaded to the loopback S3 server; opened with the reader's credentials given only as
    storage_options (none in the environment); attributes and batches equal the local store's."""
    client = boto(s3, "writer")
    for f in sorted(Path(tiny_store).rglob("*")):
        if f.is_file():
            client.put_object(Bucket=BUCKET, Key=f"api/mine.zarr/{f.relative_to(tiny_store)}", Body=f.read_bytes())
    use_identity(monkeypatch, s3, None, tmp_path / "cache")  # no credentials in the environment
    url = f"s3://{BUCKET}/api/mine.zarr"
    with pytest.raises(StoreError):
        saecache.open_store(url)
    opts = {"key": s3["reader"][0], "secret": s3["reader"][1], "endpoint_url": s3["endpoint"]}
    remote, local = saecache.open_store(url, storage_options=opts), saecache.open_store(str(tiny_store))
    assert remote.hooks == local.hooks and remote.rows == local.rows and remote.url == url
    for split in ("train", "heldout"):
        kw = dict(batch_size=256, seed=3, split=split, steps=3)
        a = collect(remote.batches(["mlp_out.1", "context"], **kw))
        b = collect(local.batches(["mlp_out.1", "context"], **kw))
        assert len(a) == len(b) > 0 and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
