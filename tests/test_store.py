"""The store format (harvest/SPEC.md) through the writer and plain zarr: geometry, permutation, manifest gating,
verify, refusal of foreign configs and newer formats. Synthetic activations, no model."""

import json
import os

import numpy as np
import pytest
import torch
import zarr

from saecache.errors import StoreError
from saecache.harvest import quant
from saecache.harvest.inspect import store_info, verify_store
from saecache.harvest.store import FORMAT_VERSION, Geometry, Store, shard_permutation
from saecache.harvest.store.write import StoreWriter


def make_header(n_contexts=10, ctx_len=8, first=0, dtype="float16", codec="blosc-zstd", d=6, seed=3):
    rpc = ctx_len - first
    return {
        "format_version": FORMAT_VERSION, "package_version": "test",
        "model": {"name": "m", "revision": None, "architecture": "X", "config_hash": "h", "dtype": "float32"},
        "tokenizer": {"name": "t", "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0},
        "dataset": {"spec": "d", "name": None, "split": "train", "text_field": "text", "fingerprint": "f"},
        "ctx_len": ctx_len, "bos_policy": "p", "seed": seed,
        "hooks": {"a.0": {"module": "m.a", "io": "output", "d": d}, "b.1": {"module": "m.b", "io": "input", "d": d + 1}},
        "storage": {"dtype": dtype, "codec": codec, "rows_per_context": rpc, "first_position": first,
                    "ctx_per_chunk": 2, "chunks_per_shard": 2, "chunk_rows": 2 * rpc, "shard_rows": 4 * rpc},
        "n_contexts": n_contexts, "n_rows": n_contexts * rpc, "n_shards": -(-n_contexts // 4),
        "nonfinite_policy": "error", "config": {},
    }


def fake_acts(header, s, rng):
    g = Geometry.from_header(header)
    r0, r1 = g.shard_row_range(s)
    out = {}
    for name, h in header["hooks"].items():
        x = rng.standard_normal((r1 - r0, h["d"])).astype(np.float32)
        fmt = header["storage"]["dtype"]
        out[name] = quant.to_numpy(quant.encode(torch.from_numpy(x), fmt), fmt)
    c0, c1 = g.shard_contexts(s)
    ctx = (np.arange(c0 * g.ctx_len, c1 * g.ctx_len) % 97).reshape(c1 - c0, g.ctx_len).astype(np.int32)
    return out, ctx


def write_all(url, header, shards=None):
    w = StoreWriter(url, header)
    rng = np.random.default_rng(0)
    written = {}
    for s in range(w.geometry.n_shards):
        acts, ctx = fake_acts(header, s, rng)
        if shards is None or s in shards:
            w.write_shard(s, acts, ctx)
            written[s] = (acts, ctx)
    w.finalize_if_complete()
    return written


def test_geometry_covers_every_context_once():
    g = Geometry(ctx_len=8, first_position=1, ctx_per_chunk=3, chunks_per_shard=2, n_contexts=20)
    seen = []
    for s in range(g.n_shards):
        c0, c1 = g.shard_contexts(s)
        r0, r1 = g.shard_row_range(s)
        assert r1 - r0 == (c1 - c0) * 7 and r0 == s * g.shard_rows
        seen += range(c0, c1)
    assert seen == list(range(20)) and g.n_shards == 4


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_rows_readable_with_plain_zarr_and_permuted_per_spec(tmp_path, dtype):
    header = make_header(dtype=dtype)
    url = str(tmp_path / "s.zarr")
    written = write_all(url, header)
    g = zarr.open_group(url, mode="r")  # plain zarr, no saecache code
    attrs = g.attrs["saecache"]
    geom = Geometry.from_header(attrs)
    for s, (acts, ctx) in written.items():
        r0, r1 = geom.shard_row_range(s)
        perm = np.random.default_rng([attrs["seed"], s]).permutation(r1 - r0)
        for name in attrs["hooks"]:
            stored = g[f"acts/{name}"][r0:r1]
            assert g[f"acts/{name}"].attrs["logical_dtype"] == dtype
            np.testing.assert_array_equal(stored, acts[name][perm])
        # every row maps back to its token through contexts + context id + position
        tok, cid, pos = (g[f"rows/{k}"][r0:r1] for k in ("token", "context", "position"))
        contexts = g["contexts"][:]
        np.testing.assert_array_equal(contexts[cid, pos], tok)
        c0, c1 = geom.shard_contexts(s)
        np.testing.assert_array_equal(contexts[c0:c1], ctx)
    np.testing.assert_array_equal(shard_permutation(3, 1, 32), np.random.default_rng([3, 1]).permutation(32))


def test_bf16_roundtrip_exact_through_reader(tmp_path):
    header = make_header(dtype="bfloat16")
    url = str(tmp_path / "s.zarr")
    written = write_all(url, header)
    st = Store.open(url)
    t = st.read_acts_torch("a.0", 0, 32)
    assert t.dtype == torch.bfloat16
    perm = shard_permutation(3, 0, 32)
    expect = torch.from_numpy(written[0][0]["a.0"][perm].view(np.int16)).view(torch.bfloat16)
    assert torch.equal(t, expect)


def test_unpublished_shard_is_refused_not_zeros(tmp_path):
    header = make_header()
    url = str(tmp_path / "s.zarr")
    write_all(url, header, shards={0, 2})
    st = Store.open(url)
    assert st.complete_shards() == [0, 2] and not st.is_complete and st.final is None
    st.read_acts("a.0", 0, 32)
    with pytest.raises(StoreError, match="shard 1 .*not complete"):
        st.read_acts("a.0", 32, 40)
    with pytest.raises(StoreError, match="incomplete: 2/3"):
        st.require_complete()


def test_stats_match_numpy_and_final_record(tmp_path):
    header = make_header(dtype="float32")
    url = str(tmp_path / "s.zarr")
    written = write_all(url, header)
    x = np.concatenate([written[s][0]["b.1"] for s in sorted(written)]).astype(np.float64)
    st = Store.open(url).stats("b.1")
    # float64 sums (quant.row_sums) in another order than numpy's: equal to ~1e-12
    np.testing.assert_allclose(st["mean"], x.mean(0), rtol=0, atol=1e-12 * np.abs(x).mean(0).max())
    np.testing.assert_allclose(st["mean_sq_norm"], (x ** 2).sum(1).mean(), rtol=1e-12)
    assert Store.open(url).final["fingerprint"] == Store.open(url).fingerprint()


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_verify_flags_flipped_byte_and_missing_shard(tmp_path, dtype):
    header = make_header(dtype=dtype)
    url = str(tmp_path / "s.zarr")
    write_all(url, header)
    assert verify_store(url) == []
    fp0 = Store.open(url).fingerprint()
    path = tmp_path / "s.zarr" / "acts" / "a.0" / "c" / "1" / "0"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify_store(url)
    assert len(problems) == 1 and "shard 1" in problems[0] and "corrupt" in problems[0]
    os.remove(tmp_path / "s.zarr" / "_manifest" / "shard-000002" / "zarr.json")
    problems = verify_store(url)
    assert any("shard 2: missing" in p for p in problems)
    assert Store.open(url).fingerprint() != fp0


def test_other_config_refused_and_nothing_damaged(tmp_path):
    url = str(tmp_path / "s.zarr")
    write_all(url, make_header())
    before = {p: p.read_bytes() for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match="different configuration.*--ctx-len"):
        StoreWriter(url, make_header(ctx_len=16))
    after = {p: p.read_bytes() for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    assert before == after


def test_newer_format_refused(tmp_path):
    url = str(tmp_path / "s.zarr")
    write_all(url, make_header())
    meta = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    meta["attributes"]["saecache"]["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "s.zarr" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="newer than this saecache"):
        Store.open(url)


def test_info_reports_provenance(tmp_path):
    url = str(tmp_path / "s.zarr")
    write_all(url, make_header())
    d = store_info(url)
    assert d["complete"] and d["shards"] == {"complete": 3, "total": 3}
    assert d["rows"] == 80 and d["model"]["name"] == "m" and len(d["fingerprint"]) == 64
    assert d["bytes_per_value"] > 0
