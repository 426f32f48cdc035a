"""Compact store formats (harvest/quant.py, SPEC.md "Formats"): round trips within the documented bound on adversarial
rows, plain-zarr decoding by the SPEC's numpy lines equal to saecache's reader, the quantization error recorded at
harvest time against the exact activations, the loader's decode, and stores of format version 1 still served."""

import warnings

import numpy as np
import pytest
import torch
import zarr
from _store import downgrade_to_v1, harvest_tiny

from saecache.errors import StoreError
from saecache.harvest import quant
from saecache.harvest.inspect import format_info, store_info
from saecache.harvest.store import Store
from saecache.harvest.store import to_torch
from saecache.train.loader import Loader, open_stores

QUANTIZED = ("int8", "nf4")


def adversarial_rows(d: int = 33) -> torch.Tensor:
    """Rows a quantizer gets wrong first: zeros, one huge outlier, subnormals, huge and tiny magnitudes, negatives
    only, a lone value, ordinary gaussians; an odd width (nf4 pads its last byte)."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.zeros(d), torch.full((d,), 0.5)]
    out = torch.randn(d, generator=g) * 0.1
    out[7] = 1e4
    rows.append(out)
    rows += [torch.full((d,), 1e-40), torch.randn(d, generator=g) * 1e-39, torch.randn(d, generator=g) * 1e-30]
    rows += [torch.randn(d, generator=g) * 3e37, -torch.rand(d, generator=g), torch.eye(d)[3] * -2.5]
    rows += list(torch.randn(24, d, generator=g) * torch.logspace(-3, 3, 24)[:, None])
    return torch.stack(rows).float()


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_quantized_round_trip_within_the_documented_bound(fmt):
    x = adversarial_rows()
    a = quant.to_numpy(quant.encode(x, fmt), fmt)
    assert a.shape == (len(x), quant.FORMATS[fmt].width(x.shape[1])) and a.dtype == np.uint8
    xh = quant.decode(a, fmt, x.shape[1])
    f = quant.FORMATS[fmt]
    for i in range(len(x)):
        absmax = float(x[i].abs().max())
        err = float((x[i].double() - xh[i].double()).abs().max())
        assert err <= f.bound(absmax), (fmt, i, err, f.bound(absmax))
    assert torch.equal(xh[0], torch.zeros(x.shape[1]))  # an all-zero row stays exactly zero (scale 0, no NaN)
    assert float(xh[2, 7]) == pytest.approx(1e4, rel=1e-6)  # the outlier sets the scale and is kept exactly
    # bound is tight enough to mean something: gaussian rows lose well under the step size on average
    rel = ((x[9:] - xh[9:]) ** 2).sum() / (x[9:] ** 2).sum()
    assert rel < (1e-4 if fmt == "int8" else 2e-2)


@pytest.mark.parametrize("fmt", ("float32", "float16", "bfloat16", *QUANTIZED))
def test_nonfinite_rows_follow_the_policy_and_are_counted(fmt):
    x = adversarial_rows()
    x[1, 4], x[2, 0], x[5, 9] = float("nan"), float("inf"), float("-inf")
    stored = quant.encode(x, fmt)
    xh = quant.decode(quant.to_numpy(stored, fmt), fmt, x.shape[1], torch.float32)
    sq_err, sq_exact, nonfinite = quant.error_sums(x, stored, fmt).tolist()
    bad = ~torch.isfinite(xh)
    assert nonfinite == int(bad.sum()) and {int(r) for r in bad.nonzero()[:, 0]} >= {1, 2, 5}
    if quant.FORMATS[fmt].quantized:  # a row holding a non-finite value decodes as all NaN; other rows untouched
        assert bad[1].all() and bad[2].all() and bad[5].all() and int(bad.sum()) == 3 * x.shape[1]
    else:
        assert int(bad.sum()) == 3 + (fmt == "float16") * int(((x.abs() > 65504) & torch.isfinite(x)).sum())
    assert np.isfinite(sq_err) and np.isfinite(sq_exact)


def test_nf4_levels_are_sorted_symmetric_ended_and_hold_zero():
    lv = np.asarray(quant.nf4_levels())
    assert len(lv) == 16 and lv[0] == -1 and lv[-1] == 1 and 0.0 in lv and np.all(np.diff(lv) > 0)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model_dir, tiny_corpus):
    """The same harvest (config, seed, contexts) in float32 (exact) and in each quantized format."""
    root = tmp_path_factory.mktemp("quant")
    return {fmt: harvest_tiny(root / f"{fmt}.zarr", tiny_model_dir, tiny_corpus, dtype=fmt, tokens=4096)
            for fmt in ("float32", *QUANTIZED)}


def spec_numpy_decode(group, hook: str) -> np.ndarray:
    """SPEC.md's plain-numpy dequantization, from plain zarr and the array's attributes only."""
    arr = group[f"acts/{hook}"]
    a, at = arr[:], dict(arr.attrs)
    scale = a[:, :4].copy().view("<f4")
    if at["logical_dtype"] == "int8":
        return a[:, 4:].view(np.int8).astype(np.float32) * scale
    codes = np.stack([a[:, 4:] & 15, a[:, 4:] >> 4], -1).reshape(len(a), -1)[:, :at["d"]]
    return np.asarray(at["levels"], dtype=np.float32)[codes] * scale


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_plain_zarr_spec_decode_equals_the_reader_and_tracks_exact_values(stores, fmt):
    g = zarr.open_group(str(stores[fmt]), mode="r")
    st, exact = Store.open(str(stores[fmt])), Store.open(str(stores["float32"]))
    n = st.geometry.n_rows
    for hook in st.hooks:
        plain = spec_numpy_decode(g, hook)
        ours = st.read_acts_torch(hook, 0, n)
        assert ours.dtype == torch.float32 and np.array_equal(plain, ours.numpy())
        assert np.array_equal(to_torch(st.read_acts(hook, 0, n), fmt, st.hooks[hook]["d"], torch.float32).numpy(),
                              plain)
        # the same rows as the exact store (same seed, same permutation), within the format's bound
        x = exact.read_acts(hook, 0, n).astype(np.float64)
        bound = np.array([quant.FORMATS[fmt].bound(v) for v in np.abs(x).max(1)])
        ratio = np.abs(x - plain).max(1) / bound
        assert np.all(ratio <= 1), (ratio.max(), np.argmax(ratio), np.abs(x).max(1)[np.argmax(ratio)])


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_relative_mse_recorded_at_harvest_matches_the_exact_store_and_info_shows_it(stores, fmt):
    st, exact = Store.open(str(stores[fmt])), Store.open(str(stores["float32"]))
    n = st.geometry.n_rows
    info = store_info(str(stores[fmt]))
    for hook in st.hooks:
        x = exact.read_acts(hook, 0, n).astype(np.float64)
        xh = st.read_acts_torch(hook, 0, n).double().numpy()
        want = ((x - xh) ** 2).sum() / (x ** 2).sum()
        assert st.final["stats"][hook]["rel_mse"] == pytest.approx(want, rel=1e-6)
        assert info["quant_error"][hook] == pytest.approx(want, rel=1e-6)
        assert 0 < want < (1e-3 if fmt == "int8" else 5e-2)
        for entry in st.manifest().values():
            assert entry["stats"][hook]["sq_err"] >= 0 and entry["stats"][hook]["sq_exact"] > 0
    text = format_info(info)
    assert f"format       {fmt}" in text and "relative MSE" in text
    assert all(hook in text.split("relative MSE")[1] for hook in st.hooks)
    assert Store.open(str(stores["float32"])).final["stats"]["mlp_out.0"]["rel_mse"] == 0.0


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_loader_batches_are_the_decoded_stored_rows(stores, fmt):
    st = Store.open(str(stores[fmt]))
    hooks = ["mlp_out.0", "row"]
    loader = Loader(open_stores([str(stores[fmt])], hooks), hooks, batch_size=128, seed=1, heldout_fraction=0.1,
                    shuffle_chunks=2, partitions=2)
    want = st.read_acts_torch("mlp_out.0", 0, st.geometry.n_rows)
    for _ in range(3):
        b = next(loader)
        assert b["mlp_out.0"].dtype == torch.float32 and b["mlp_out.0"].shape == (128, st.hooks["mlp_out.0"]["d"])
        assert torch.equal(b["mlp_out.0"], want[b["row"]])
    loader.close()


def test_plain_zarr_lists_a_store_without_warnings_or_tracebacks(stores, tiny_model_dir, tiny_corpus, tmp_path,
                                                                 capfd):
    import gc

    from saecache.harvest.store.write import StoreWriter

    # an incomplete store with a live claim, next to complete ones: bookkeeping of every kind is present
    part = harvest_tiny(tmp_path / "part.zarr", tiny_model_dir, tiny_corpus, dtype="int8", tokens=4096, worker="0/2")
    w = StoreWriter(str(part), Store.open(str(part)).header)
    w.claim_worker(1, 2)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in (part, stores["int8"], stores["float32"]):
            g = zarr.open_group(str(path), mode="r")
            members = dict(g.members(max_depth=None))
            str(g.tree())
            assert "acts/mlp_out.0" in members and "_manifest" in members
        gc.collect()
    out, err = capfd.readouterr()
    assert not caught, [str(w.message) for w in caught]
    assert "Traceback" not in err + out and "Task exception" not in err + out and "KeyError" not in err + out
    # the bookkeeping records are readable as plain zarr attributes
    g = zarr.open_group(str(part), mode="r")
    assert g["_manifest/shard-000000"].attrs["saecache"] == Store.open(str(part)).manifest()[0]
    assert g["_claims/worker-00001-of-00002"].attrs["saecache"]["worker"] == 1
    w.release()
    assert "worker-00001-of-00002" not in dict(zarr.open_group(str(part), mode="r")["_claims"].members())


def test_version_1_store_still_opens_trains_and_evaluates(tiny_store, tiny_model_dir, tiny_corpus, tmp_path):
    from saecache.evaluate.config import EvalConfig
    from saecache.evaluate.runner import run_evaluation
    from saecache.train.config import TrainConfig
    from saecache.train.trainer import run_training

    v2 = Store.open(str(tiny_store))
    old = downgrade_to_v1(tiny_store, tmp_path / "v1.zarr")
    st = Store.open(str(old))
    assert st.header["format_version"] == 1 and st.is_complete
    assert st.final["fingerprint"] == st.fingerprint() and st.stats("mlp_out.0")["count"] == v2.geometry.n_rows
    assert np.array_equal(st.read_acts("mlp_out.1", 0, 100), v2.read_acts("mlp_out.1", 0, 100))
    assert "format v1" in format_info(store_info(str(old)))
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    with pytest.raises(StoreError, match="format version 1, which this saecache reads but does not extend"):
        harvest_tiny(old, tiny_model_dir, tiny_corpus)
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before
    cfg = TrainConfig(stores=[str(old)], out=str(tmp_path / "run"), saes=[dict(arch="topk", hook_in="mlp_out.0",
                      width=128, k=4)], steps=8, batch_size=128, warmup_steps=2, log_every=4, heldout_fraction=0.1,
                      progress=False)
    (run_dir,) = run_training(cfg)
    rows = run_evaluation(EvalConfig(run_dirs=[str(run_dir)], store=str(old), out=str(tmp_path / "eval"),
                                     n_contexts=4, histograms=False, html_features=0, device="cpu"))
    assert rows[0]["n_rows"] > 0 and np.isfinite(rows[0]["fve"]) and np.isfinite(rows[0]["ce_spliced"])
