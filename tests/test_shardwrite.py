"""The store writer's hand-made shard objects (harvest/store/encode.py) and its shard statistics (write.shard_stats,
quant.row_sums): byte for byte what zarr writes for the same rows, and statistics equal to a float64 numpy reference,
with NaN/Inf values counted and left out."""

import os

import numpy as np
import pytest
import torch
import zarr

from saecache.harvest import quant
from saecache.harvest.store import Store
from saecache.harvest.store.write import StoreWriter, shard_stats
from test_store import fake_acts, make_header, write_all


def _objects(root) -> dict[str, bytes]:
    """Every file of a store but the bookkeeping (whose manifest entries carry a writer time)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not rel.startswith(("_manifest", "_final", "_claims", "_plan")):
                out[rel] = open(os.path.join(dirpath, name), "rb").read()
    return out


@pytest.mark.parametrize("codec", ["blosc-zstd", "blosc-lz4", "zstd", "none"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "nf4"])
@pytest.mark.parametrize("n_contexts", [12, 10, 1])  # full shards; a last shard of one inner chunk; one partial chunk
def test_hand_encoded_objects_are_the_bytes_zarr_writes(tmp_path, monkeypatch, codec, dtype, n_contexts):
    header = make_header(n_contexts=n_contexts, first=1, dtype=dtype, codec=codec)
    hand = write_all(str(tmp_path / "hand.zarr"), header)
    monkeypatch.setattr(StoreWriter, "hand_encode", False)  # the reference: every object through zarr
    write_all(str(tmp_path / "zarr.zarr"), header)
    a, b = _objects(tmp_path / "hand.zarr"), _objects(tmp_path / "zarr.zarr")
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    st = Store.open(str(tmp_path / "hand.zarr"))
    for s in hand:  # the manifest's checksums (taken from the parts as written) match the files
        for key, ck in st.manifest()[s]["objects"].items():
            assert ck["nbytes"] == len(a[key])
    g = zarr.open_group(str(tmp_path / "hand.zarr"), mode="r")  # and plain zarr reads the rows back
    assert g["rows/position"][:].max() == header["ctx_len"] - 1


def test_hand_encoding_is_used_for_every_array_the_writer_creates(tmp_path):
    w = StoreWriter(str(tmp_path / "s.zarr"), make_header(codec="blosc-lz4", dtype="int8"))
    w.write_shard(0, *fake_acts(w.header, 0, np.random.default_rng(0)))
    assert w._encoders and all(e is not None for e in w._encoders.values()), w._encoders


def _reference(x64: np.ndarray) -> tuple[np.ndarray, float, int]:
    finite = np.isfinite(x64)
    x = np.where(finite, x64, 0.0)
    return x.sum(0), float((x * x).sum()), int((~finite).sum())


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "float32", "int8"])
def test_stats_equal_a_float64_reference(fmt):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((20000, 96)).astype(np.float32) * 3 + 0.5)
    stored = quant.to_numpy(quant.encode(x, fmt), fmt)
    decoded = quant.decode(stored, fmt, 96).double().numpy()  # the values the statistics are of
    st = shard_stats(stored, fmt, 96)
    want_sum, want_sq, _ = _reference(decoded)
    assert st["count"] == 20000 and st["nonfinite"] == 0
    np.testing.assert_allclose(st["sum"], want_sum, rtol=0, atol=1e-12 * np.abs(decoded).sum(0).max())
    assert st["sum_sq_norm"] == pytest.approx(want_sq, rel=1e-12)


@pytest.mark.parametrize("fmt", ["float16", "float32", "int8"])
def test_nonfinite_values_are_counted_and_left_out(fmt):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9000, 40)).astype(np.float32)
    x[7, 3], x[4100, 0], x[8999, 39] = np.inf, -np.inf, np.nan  # in different blocks of 4096 rows
    x[5000] = np.nan  # a whole NaN row
    stored = quant.to_numpy(quant.encode(torch.from_numpy(x), fmt), fmt)
    decoded = quant.decode(stored, fmt, 40).double().numpy()  # int8: a row with any NaN/Inf decodes all NaN
    st = shard_stats(stored, fmt, 40)
    want_sum, want_sq, want_bad = _reference(decoded)
    assert want_bad >= 43 and st["nonfinite"] == want_bad and st["count"] == 9000
    np.testing.assert_allclose(st["sum"], want_sum, rtol=0, atol=1e-12 * np.abs(np.nan_to_num(decoded)).sum(0).max())
    assert st["sum_sq_norm"] == pytest.approx(want_sq, rel=1e-12)


def test_float32_squares_that_would_overflow_float32_are_summed_exactly():
    x = np.ones((10, 4), dtype=np.float32)
    x[3, 1] = 3e20  # finite, but its square overflows float32
    st = shard_stats(x, "float32")
    big = float(np.float32(3e20))
    assert st["nonfinite"] == 0 and st["sum_sq_norm"] == pytest.approx(big * big + 39, rel=1e-12)


def test_parts_made_ahead_keep_their_order_and_raise_where_they_fail():
    import threading

    from saecache.harvest.store.encode import made_ahead

    makers = set()

    def parts(n, fail_at=None):
        for i in range(n):
            makers.add(threading.current_thread().name)
            if i == fail_at:
                raise ValueError(f"part {i}")
            yield bytes([i])

    assert list(made_ahead(parts(7))) == [bytes([i]) for i in range(7)]
    assert threading.current_thread().name not in makers  # made on the helper thread
    got = []
    with pytest.raises(ValueError, match="part 4"):
        for p in made_ahead(parts(9, fail_at=4)):
            got.append(p)
    assert got == [bytes([i]) for i in range(4)]
    it = made_ahead(parts(100))  # a consumer that stops early (e.g. its file write failed) leaves no thread behind
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("saecache-encode")]
