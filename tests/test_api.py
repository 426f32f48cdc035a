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
def run_dirs(tiny_store, tmp_path_factory):
    """`saecache train`'s default SAE (TopK, 4096 features, k=32) on mlp_out.1 of the tiny store and a ReLU transcoder
    mlp_in.0 -> mlp_out.0 ("tc0"), briefly trained: {name: run dir}."""
    from saecache.train.config import SAESpec, TrainConfig
    from saecache.train.trainer import run_training

    out = tmp_path_factory.mktemp("api_runs")
    cfg = TrainConfig(stores=[str(tiny_store)], out=str(out), steps=20, batch_size=64, warmup_steps=2,
                      checkpoint_every=1000, progress=False, device="cpu",
                      saes=[SAESpec(hook_in="mlp_out.1"),
                            SAESpec(arch="relu", width=64, hook_in="mlp_in.0", hook_out="mlp_out.0", name="tc0")])
    dirs = {os.path.basename(d): Path(d) for d in run_training(cfg)}
    assert set(dirs) == {RUN_NAME, "tc0"}
    return dirs


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


def test_import_saecache_stays_light():
    """`import saecache` and naming the API import neither torch nor a stage package (the CLI's --help stays fast)."""
    import subprocess
    import sys

    code = ("import sys, saecache; names = (saecache.open_store, saecache.load_sae, saecache.splice); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('saecache.harvest', "
            "'saecache.train', 'saecache.evaluate'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'open_sae'"):
        saecache.open_sae


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


def test_batches_refuse_bad_input_at_the_call(tiny_store):
    store = saecache.open_store(str(tiny_store))
    with pytest.raises(StoreError, match="has no hook 'mlp_out.7'; it has: mlp_in.0, mlp_out.0, mlp_out.1"):
        store.batches("mlp_out.7")
    with pytest.raises(ConfigError, match="split 'test' is not one of train, heldout, all"):
        store.batches("mlp_out.0", split="test")
    with pytest.raises(ConfigError, match="heldout_fraction 1.5 must be in"):
        store.batches("mlp_out.0", heldout_fraction=1.5)
    with pytest.raises(ConfigError, match="heldout_fraction 0 holds nothing out; use split='all'"):
        store.batches("mlp_out.0", split="heldout", heldout_fraction=0)
    with pytest.raises(ConfigError, match="batch_size 100 must be a multiple of partitions 8"):
        store.batches("mlp_out.0", batch_size=100)


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


# ---------------------------------------------------------------------------------------------- load_sae, splice


def test_load_sae_is_the_run_dirs_sae(run_dirs, tiny_store):
    from saecache.evaluate.runner import load_run_checked

    sae = saecache.load_sae(str(run_dirs[RUN_NAME]))
    ref, cfg = load_run_checked(str(run_dirs[RUN_NAME]))
    assert isinstance(sae, torch.nn.Module) and not sae.training
    assert (sae.hook_in, sae.hook_out) == ("mlp_out.1", "mlp_out.1") and sae.run_cfg == cfg
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), ref.state_dict().values()))
    x_BD = next(saecache.open_store(str(tiny_store)).batches("mlp_out.1", batch_size=128, split="heldout"))
    f_BF = sae.encode(x_BD)
    assert f_BF.shape == (96, 4096) and ((f_BF != 0).sum(1) <= 32).all()  # the 3 held-out contexts: 96 rows
    torch.testing.assert_close(sae(x_BD), sae.decode(f_BF), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae(x_BD), ref(x_BD))
    tc = saecache.load_sae(str(run_dirs["tc0"]))
    assert (tc.hook_in, tc.hook_out) == ("mlp_in.0", "mlp_out.0")


def test_load_sae_refuses_a_missing_run_dir(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        saecache.load_sae(str(tmp_path / "runs" / "nothing"))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


@pytest.mark.parametrize("name,first_position", [(RUN_NAME, 0), (RUN_NAME, 1), ("tc0", 0)])
def test_splice_equals_evaluates_splice(run_dirs, tiny_store, model, name, first_position):
    """The CE per context through `saecache.splice` equals what evaluate's `splice_losses` computes for the same
    contexts (an SAE at two first positions, and a transcoder, whose input `splice` takes from sae.hook_in)."""
    from saecache.evaluate import metrics as M
    from saecache.evaluate.runner import hook_point
    from saecache.evaluate.splice import splice_losses
    from saecache.harvest.store import Store

    st = Store.open(str(tiny_store))
    store = saecache.open_store(str(tiny_store))
    sae = saecache.load_sae(str(run_dirs[name]))
    ids_CT = store.tokens(240, 246)
    mean_D = torch.from_numpy(st.stats(sae.hook_out)["mean"]).float()
    ref = splice_losses(model, ids_CT, hook_point(st, sae.hook_out), sae, mean_D,
                        hook_in=hook_point(st, sae.hook_in) if sae.hook_in != sae.hook_out else None,
                        first_position=first_position, batch_size=3)
    mask = torch.zeros(ids_CT.shape, dtype=torch.bool)
    mask[:, first_position:] = True
    with torch.no_grad():
        clean = model(input_ids=ids_CT).logits
        with saecache.splice(model, sae.hook_out, sae, first_position=first_position):
            logits = model(input_ids=ids_CT).logits
        after = model(input_ids=ids_CT).logits
    per_context = [M.next_token_ce(logits[c:c + 1], ids_CT[c:c + 1], mask[c:c + 1])[0] for c in range(6)]
    torch.testing.assert_close(torch.tensor(per_context), torch.tensor(ref.per_context["spliced"]), rtol=1e-6, atol=1e-6)
    total, count = M.next_token_ce(logits, ids_CT, mask)
    assert count == ref.n_predictions and abs(total / count - ref.spliced) < 1e-6
    assert not torch.allclose(logits, clean) and torch.equal(after, clean)  # spliced inside, removed after
    if first_position:
        torch.testing.assert_close(logits[:, 0], clean[:, 0])  # the positions before are the model's own


def test_splice_with_a_callable_equals_zero_ablation(tiny_store, model):
    """Any callable [N, D] -> [N, D] splices: zeros give evaluate's zero-ablated CE."""
    from saecache.evaluate.runner import hook_point
    from saecache.evaluate.splice import splice_losses
    from saecache.evaluate import metrics as M
    from saecache.harvest.store import Store

    st = Store.open(str(tiny_store))
    ids_CT = saecache.open_store(str(tiny_store)).tokens(0, 4)
    ref = splice_losses(model, ids_CT, hook_point(st, "mlp_out.0"), lambda x: x, torch.zeros(64))
    with torch.no_grad(), saecache.splice(model, "mlp_out.0", torch.zeros_like):
        total, count = M.next_token_ce(model(input_ids=ids_CT).logits, ids_CT)
    assert abs(total / count - ref.zero) < 1e-6 and abs(ref.zero - ref.clean) > 1e-3


def test_splice_refuses_an_unknown_hook(model):
    from saecache.errors import ModelError

    with pytest.raises(ModelError, match="unknown hook 'mlp_out.9'"):
        with saecache.splice(model, "mlp_out.9", torch.zeros_like):
            pass


# ---------------------------------------------------------------------------------------------------- the docs


def docs_blocks(info: str) -> list[str]:
    """The code blocks of docs/api.md whose fence reads ```<info>, in page order."""
    return re.findall(rf"^```{re.escape(info)}\n(.*?)^```$", DOCS.read_text(), flags=re.M | re.S)


def docs_folder(root: Path, tiny_store, run_dirs, tiny_model_dir) -> Path:
    """A folder laid out as the page expects: mine.zarr, runs/<the first store's SAE>, saecache-demo/model."""
    shutil.copytree(tiny_store, root / "mine.zarr")
    shutil.copytree(run_dirs[RUN_NAME], root / "runs" / RUN_NAME)
    (root / "saecache-demo").mkdir()
    (root / "saecache-demo" / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    return root


def test_docs_page_runs(tmp_path, monkeypatch, tiny_store, run_dirs, tiny_model_dir, one_torch_thread):
    """Every ```python block of docs/api.md, in order, in one namespace; the custom loop's loss falls."""
    blocks = docs_blocks("python")
    assert len(blocks) >= 6 and any("saecache.splice(" in b for b in blocks)
    monkeypatch.chdir(docs_folder(tmp_path, tiny_store, run_dirs, tiny_model_dir))
    ns: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/api.md block {i + 1}", "exec"), ns)
    losses = ns["losses"]
    assert len(losses) == 150 and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert ns["spliced"] > ns["clean"] > 0
