"""The reader verifies what it reads (format version 3: a crc32c per inner chunk), older stores still read with one
warning, new stores are version 2's bytes plus those checksums, one chunk reader for local, remote and cached stores,
and one URL redaction."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _store import downgrade_to_v2, strip_chunk_crc
from saecache.errors import StoreError
from saecache.harvest.store import Store, redact_url
from test_store import make_header, write_all

HOOK = "mlp_out.0"


def flip_byte(store: Path, key: str, offset: int = 40) -> None:
    """Flip one bit of a byte inside the data of a shard object (its first inner chunk), the size unchanged."""
    path = store / key
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def train(store, out) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "saecache", "train", "--store", str(store), "--out", str(out), "--hook", HOOK,
         "--arch", "topk", "--width", "64", "--k", "4", "--steps", "3", "--batch-size", "64", "--warmup", "1",
         "--no-progress"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


@pytest.mark.slow
def test_a_flipped_byte_fails_training_in_one_line_naming_the_shard(tiny_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    flip_byte(store, f"acts/{HOOK}/c/2/0")
    r = train(store, tmp_path / "runs")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: shard 2 of ") and "corrupt" in r.stderr and "saecache verify" in r.stderr
    shutil.copytree(tiny_store, tmp_path / "clean.zarr")  # the same command on the intact store trains
    assert train(tmp_path / "clean.zarr", tmp_path / "runs2").returncode == 0


def test_a_changed_cached_chunk_fails_in_one_line_naming_the_shard(tiny_store, tmp_path, monkeypatch):
    """A remote store's chunks are checked against the manifest when fetched into the cache, and again, each inner
    chunk against its crc32c, when read: a cached file changed afterwards is caught too."""
    from saecache.harvest.copy import CopyConfig, copy_store

    monkeypatch.setenv("SAECACHE_CACHE_DIR", str(tmp_path / "cache"))
    url = "memory://checks/tiny.zarr"
    copy_store(CopyConfig(src=str(tiny_store), dst=url))
    store = Store.open(url)
    arr = store.chunk_reader(HOOK)
    good = arr.read_chunk(1, 0).copy()
    cached = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs if "/c/1/" in d + "/"]
    assert len(cached) == 1
    data = bytearray(open(cached[0], "rb").read())
    data[40] ^= 0x10
    open(cached[0], "wb").write(bytes(data))
    with pytest.raises(StoreError, match=r"^shard 1 of acts/mlp_out.0 of memory://checks/tiny.zarr is corrupt.*"
                                         r"saecache verify"):
        Store.open(url).chunk_reader(HOOK).read_chunk(1, 0)
    assert good.any()


def test_uncompressed_views_are_checked_too(tmp_path):
    url = tmp_path / "raw.zarr"
    write_all(str(url), make_header(n_contexts=12, codec="none"))
    arr = Store.open(str(url)).chunk_reader("a.0")
    assert arr.chunk_view(1, 1) is not None
    flip_byte(url, "acts/a.0/c/1/0", offset=arr.chunk_rows * 6 * 2 + 10)  # inside chunk 1 of shard 1
    fresh = Store.open(str(url)).chunk_reader("a.0")
    with pytest.raises(StoreError, match="shard 1 of .* inner chunk 1 does not match its crc32c"):
        fresh.chunk_view(1, 1)
    with pytest.raises(StoreError, match="shard 1 of .* inner chunk 1 does not match its crc32c"):
        fresh.read_chunk(1, 1)
    assert fresh.read_chunk(1, 0).any()  # the other chunk of the shard is intact


def test_version_2_store_reads_the_same_rows_with_one_warning(tiny_store, tmp_path, capfd):
    from saecache.train.chunks import open_stores
    from saecache.train.loader import Loader

    old = downgrade_to_v2(tiny_store, tmp_path / "v2.zarr")
    assert Store.open(str(old)).version == 2 and Store.open(str(old)).fingerprint() != Store.open(
        str(tiny_store)).fingerprint()
    batches = {}
    for name, url in (("v3", tiny_store), ("v2", old)):
        capfd.readouterr()
        hooks = ["mlp_in.0", HOOK]
        loader = Loader(open_stores([str(url)], hooks), [*hooks, "row"], 64, seed=1, partitions=2)
        batches[name] = [next(loader) for _ in range(3)]
        loader2 = Loader(open_stores([str(url)], hooks), hooks, 64, seed=1, partitions=2)
        next(loader2)
        err = capfd.readouterr().err
        batches[name + "-warnings"] = err.count("warning:")
        if name == "v2":
            assert "format version 2" in err and "saecache verify" in err
    assert batches["v3-warnings"] == 0 and batches["v2-warnings"] == 1
    for a, b in zip(batches["v3"], batches["v2"]):
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


# per storage format and codec, a digest of every data object (acts/*, rows/*, contexts) of the store that
# `write_all(make_header(n_contexts=10, dtype=..., codec=...))` made with saecache 97d5ea9 (format version 2)
VERSION_2_OBJECTS = {
    ("float16", "blosc-zstd"): "0c700ce759b4a5103d51c527eea35807",
    ("float16", "none"): "2f4dd89921094ef56400cb48e5efe3d1",
    ("int8", "zstd"): "084f3d023bbcd5d84dda68bb2faea858",
    ("bfloat16", "blosc-lz4"): "937227e54a2202ca148a4ba88cc31315",
}


@pytest.mark.parametrize("fmt", sorted(VERSION_2_OBJECTS))
def test_new_store_is_version_2_bytes_plus_chunk_checksums(fmt, tmp_path):
    """Version 3 changes exactly: the header's format_version, a crc32c codec at the end of each array's inner codec
    chain, and 4 bytes (the crc32c) after each inner chunk (the shard indexes follow). Stripped of those, every data
    object is byte for byte what version 2 wrote."""
    url = tmp_path / "s.zarr"
    header = make_header(n_contexts=10, dtype=fmt[0], codec=fmt[1])
    write_all(str(url), header)
    assert json.loads((url / "zarr.json").read_text())["attributes"]["saecache"] == header
    assert header["format_version"] == 3
    objs = {}
    for root, _, files in os.walk(url):
        for f in files:
            key = os.path.relpath(os.path.join(root, f), url)
            if key.split("/")[0] in ("acts", "rows", "contexts") and "/c/" in "/" + key:
                array = key[:key.index("/c/")]
                meta = json.loads((url / array / "zarr.json").read_text())
                objs[key] = hashlib.sha256(strip_chunk_crc((url / key).read_bytes(), meta)).hexdigest()[:16]
    assert len(objs) == 18
    digest = hashlib.sha256(json.dumps(dict(sorted(objs.items())), sort_keys=True).encode()).hexdigest()[:32]
    assert digest == VERSION_2_OBJECTS[fmt]


def test_one_chunk_reader_for_local_remote_and_cached_stores(tiny_store, tmp_path, monkeypatch):
    from saecache.harvest.copy import CopyConfig, copy_store

    monkeypatch.setenv("SAECACHE_CACHE_DIR", str(tmp_path / "cache"))
    url = "memory://checks/same.zarr"
    copy_store(CopyConfig(src=str(tiny_store), dst=url))
    local, cached, uncached = Store.open(str(tiny_store)), Store.open(url), Store.open(url, cache=None)
    readers = [st.chunk_reader(HOOK) for st in (local, cached, uncached)]
    assert [type(r).__name__ for r in readers] == ["ShardArray", "CachedShardArray", "ObjectArray"]
    g = local.geometry
    for s in (0, 5, g.n_shards - 1):
        for i in range(g.chunks_per_shard):
            want = readers[0].read_chunk(s, i)
            r0 = s * g.shard_rows + i * g.chunk_rows
            assert want.any() and all(np.array_equal(r.read_chunk(s, i), want) for r in readers[1:])
            for st in (local, cached, uncached):
                assert np.array_equal(st.read_acts(HOOK, r0, r0 + g.chunk_rows), want)
    assert cached.cache.misses > 0 and uncached.cache is None


def test_one_redaction_rule_drops_credentials_and_query():
    assert redact_url("s3://user:secret@bucket/stores/a.zarr?token=abc&x=1#frag") == "s3://bucket/stores/a.zarr"
    assert redact_url("https://u:p@host:8080/a/b?sig=XYZ") == "https://host:8080/a/b"
    assert redact_url("gs://bucket/a.zarr") == "gs://bucket/a.zarr"
    assert redact_url("relative/path/store.zarr") == "relative/path/store.zarr"
    from saecache.train import rundir
    assert rundir.redact_url is redact_url  # the run dir records URLs under the same rule
