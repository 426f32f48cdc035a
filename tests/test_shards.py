"""The shard reader (harvest/store/shards.py) and its bounded resources (harvest/store/files.py): the file pool's cap
and pinning, maps that keep no file descriptor, readers that never see another reader's stale descriptor, cache
eviction, and every reader of a store with more than 10,000 shard files in a process limited to 128 open files
(RLIMIT_NOFILE, set in a real subprocess)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import crc32c
import numcodecs
import numpy as np
import pytest
import zarr

from saecache.errors import StoreError
from saecache.harvest.store.files import FilePool, map_file
from saecache.harvest.store.shards import ShardArray, ShardLayout
from saecache.harvest.store import (Geometry, checksum, manifest_key, record_bytes, shard_object_keys,
                                    shard_permutation,
                                    unpermuted_meta)
from saecache.harvest.store.write import StoreWriter, shard_stats
from test_store import make_header


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")


# ------------------------------------------------------------------------------------------ a store, written fast


def with_crc(blob: bytes) -> bytes:
    """A chunk's bytes followed by their crc32c, little-endian (zarr's crc32c codec)."""
    return bytes(blob) + crc32c.crc32c(blob).to_bytes(4, "little")


def encode_shard(rows: np.ndarray, chunk_rows: int, codec) -> bytes:
    """A zarr v3 shard written from the spec (an independent check of the reader): the inner chunks' encoded bytes,
    then per chunk (offset, nbytes) as little-endian u64, then the crc32c of that table. Format version 3: each inner
    chunk's encoded bytes end with their own crc32c."""
    blobs = [rows[i:i + chunk_rows] for i in range(0, len(rows), chunk_rows)]
    blobs = [with_crc(np.ascontiguousarray(b).tobytes() if codec is None else codec.encode(np.ascontiguousarray(b)))
             for b in blobs]
    index, off = [], 0
    for b in blobs:
        index += [off, len(b)]
        off += len(b)
    table = np.asarray(index, dtype="<u8").tobytes()
    return b"".join(blobs) + table + crc32c.crc32c(table).to_bytes(4, "little")


def write_many_shards(url: str, n_shards: int, codec: str = "none") -> dict:
    """A valid store of ``n_shards`` shards of 32 rows (2 hooks: 6 shard files per shard), written object by object
    (the store writer goes through zarr, ~10 ms per object: minutes for thousands of shards). Returns the header."""
    header = make_header(n_contexts=4 * n_shards, codec=codec)
    w = StoreWriter(url, header)  # creates the group and the array metadata
    g, root = w.geometry, w.loc.root
    blosc = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
    rng = np.random.default_rng(0)
    os.makedirs(f"{root}/{os.path.dirname(manifest_key(0))}", exist_ok=True)
    for s in range(n_shards):
        r0, r1 = g.shard_row_range(s)
        c0, c1 = g.shard_contexts(s)
        ctx_CT = rng.integers(1, 97, (c1 - c0, g.ctx_len)).astype(np.int32)
        perm = shard_permutation(header["seed"], s, r1 - r0)
        data, stats = {}, {}
        for name, h in sorted(header["hooks"].items()):
            x = rng.standard_normal((r1 - r0, h["d"])).astype(np.float16)
            stats[name] = shard_stats(x, "float16")
            data[f"acts/{name}/c/{s}/0"] = encode_shard(x[perm], g.chunk_rows, None if codec == "none" else blosc)
        for name, v in unpermuted_meta(g, s, ctx_CT).items():
            data[f"rows/{name}/c/{s}"] = encode_shard(v[perm], g.chunk_rows, blosc)
        data[f"contexts/c/{s}/0"] = with_crc(blosc.encode(ctx_CT))
        assert sorted(data) == sorted(shard_object_keys(header, s))
        for key, blob in data.items():
            os.makedirs(os.path.dirname(f"{root}/{key}"), exist_ok=True)
            with open(f"{root}/{key}", "wb") as f:
                f.write(blob)
        entry = {"shard": s, "contexts": [c0, c1], "rows": [r0, r1], "stats": stats,
                 "objects": {k: checksum(v) for k, v in data.items()},
                 "writer": {"worker": "0/1", "host": socket.gethostname(), "pid": os.getpid(),
                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "package_version": "test"}}
        os.makedirs(os.path.dirname(f"{root}/{manifest_key(s)}"), exist_ok=True)
        with open(f"{root}/{manifest_key(s)}", "wb") as f:  # published last, as the writer does
            f.write(record_bytes(entry))
    assert w.finalize_if_complete()
    return header


def test_shards_written_from_the_spec_read_back_through_zarr_and_the_shard_reader(tmp_path):
    """The fast store builder of the big test below makes stores that zarr and the shard reader read alike."""
    from saecache.harvest.inspect import verify_store
    from saecache.harvest.store import Store

    for codec in ("none", "blosc-zstd"):
        url = str(tmp_path / f"{codec}.zarr")
        write_many_shards(url, 5, codec)
        assert verify_store(url) == []
        st = Store.open(url)
        g = st.geometry
        for hook in st.hooks:
            z = np.asarray(zarr.open_group(url, mode="r")[f"acts/{hook}"][:])
            arr = ShardArray.open(st.loc.path(f"acts/{hook}"))
            got = np.concatenate([arr.read_chunk(s, i) for s in range(g.n_shards) for i in range(arr.n_inner)])
            assert got.tobytes() == z.tobytes() and z.any()
            if codec == "none":
                assert np.array_equal(arr.chunk_view(3, 1), z[3 * g.shard_rows + g.chunk_rows:][:g.chunk_rows])
            arr.close()
        ctx = np.asarray(st.array("rows/context")[:])
        assert sorted(ctx.tolist()) == sorted(np.repeat(np.arange(g.n_contexts), g.rows_per_context).tolist())


# ------------------------------------------------------------------------------------------------ pool and maps


def _files(tmp_path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_bytes(np.full(4096, i % 251, dtype=np.uint8).tobytes())
        paths.append(str(p))
    return paths


@needs_proc
def test_pool_keeps_at_most_its_cap_open_and_never_closes_a_pinned_descriptor(tmp_path):
    paths = _files(tmp_path, 40)
    pool = FilePool(max_open=5)
    base = open_fds()
    with pool.fd(paths[0]) as pinned:
        for i, p in enumerate(paths[1:], 1):
            with pool.fd(p) as fd:
                assert os.pread(fd, 1, 0) == bytes([i])
            assert len(pool) <= 5 and open_fds() - base <= 5
        assert os.pread(pinned, 1, 0) == b"\0"  # still open although it is the least recently used
    for p in paths[-4:]:  # the most recently used ones are still open: no new descriptor for them
        with pool.fd(p):
            pass
    assert open_fds() - base == len(pool) <= 5
    pool.close()
    assert open_fds() == base


@needs_proc
def test_maps_keep_no_descriptor_and_outlive_the_reader(tmp_path):
    paths = _files(tmp_path, 30)
    base = open_fds()
    views = []
    for i, p in enumerate(paths):
        fd = os.open(p, os.O_RDONLY)
        views.append(map_file(fd, 4096)[100:200])
        os.close(fd)
    assert open_fds() == base  # CPython's mmap would hold 30 duplicate descriptors here
    assert all((v == i % 251).all() for i, v in enumerate(views))
    views[0][:] = 7  # private: the file keeps its bytes
    assert open(paths[0], "rb").read(1) == b"\0"


POOL_AT_THE_LIMIT = r"""
import os, resource, sys
from saecache.errors import StoreError
from saecache.harvest.store.files import FilePool
resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))
paths = sys.argv[1:]
pool = FilePool(max_open=1000)  # a cap above the process's limit: opening must give back descriptors, not fail
for i, p in enumerate(paths):
    with pool.fd(p) as fd:
        assert os.pread(fd, 1, 0) == bytes([i % 251])
held = [pool.acquire(p) for p in paths[:40]]  # every descriptor pinned: past the limit is a one-line error
"""


@needs_proc
def test_pool_gives_back_descriptors_at_the_process_limit_then_fails_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", POOL_AT_THE_LIMIT, *_files(tmp_path, 60)], capture_output=True,
                          text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("saecache.errors.StoreError: too many open files") and "ulimit -n" in last, proc.stderr


def test_cache_eviction_closes_the_readers_descriptors(tmp_path, monkeypatch):
    """A remote store read through a small shard cache: evicted files are not kept alive (on disk) by descriptors
    the shard readers hold, and every chunk reads back equal to the local store."""
    from saecache.harvest.store.cache import CacheConfig, ShardCache
    from saecache.harvest.copy import CopyConfig, copy_store
    from saecache.harvest.store import Store

    local, url = str(tmp_path / "s.zarr"), "memory://team/evict.zarr"
    write_many_shards(local, 40, codec="blosc-zstd")
    copy_store(CopyConfig(src=local, dst=url))
    shard_bytes = os.path.getsize(f"{local}/acts/a.0/c/0/0")
    cache = ShardCache(CacheConfig(str(tmp_path / "cache"), 6 * shard_bytes))
    remote, want = Store.open(url, cache=cache).chunk_reader("a.0"), ShardArray.open(f"{local}/acts/a.0")
    for s in range(40):
        for i in range(remote.n_inner):
            assert remote.read_chunk(s, i).tobytes() == want.read_chunk(s, i).tobytes()
    assert cache.misses == 40 and cache.nbytes <= 6 * shard_bytes
    if os.path.isdir("/proc/self/fd"):
        held = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                held.append(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:  # the listing's own descriptor
                pass
        assert not [p for p in held if str(tmp_path / "cache") in p and p.endswith("(deleted)")], held


def test_a_reader_opened_after_a_file_changed_never_reads_the_old_descriptor(tmp_path):
    """Descriptors are kept per reader: a reader made after a shard file was replaced (a repaired copy, a re-harvest)
    or removed sees the file as it is, although an older reader still holds the old one open."""
    url = str(tmp_path / "s.zarr")
    write_many_shards(url, 3)
    path = f"{url}/acts/a.0"
    old = ShardArray.open(path)
    before = old.read_chunk(1, 0).copy()
    f = f"{path}/c/1/0"
    data = bytearray(open(f, "rb").read())
    data[:2] = b"\x00\x3c"  # first value = 1.0 in fp16: same size, same index
    nbytes = int(np.frombuffer(bytes(data[-(16 * old.n_inner + 4):-4]), "<u8")[1])  # chunk 0 (at offset 0)
    data[nbytes - 4:nbytes] = crc32c.crc32c(bytes(data[:nbytes - 4])).to_bytes(4, "little")  # its crc, made anew
    with open(f + ".new", "wb") as out:
        out.write(data)
    os.replace(f + ".new", f)
    assert old.read_chunk(1, 0)[0, 0] == before[0, 0]  # the old reader keeps its (old) file
    assert ShardArray.open(path).read_chunk(1, 0)[0, 0] == 1.0
    os.remove(f)
    with pytest.raises(StoreError, match="missing"):
        ShardArray.open(path).read_chunk(1, 0)


def test_a_reader_rereads_the_index_when_the_pool_reopens_a_replaced_file(tmp_path):
    """The pool may close a reader's descriptor (its cap) and reopen the file later: if the file was replaced in
    between, the reader decodes it with its new index, never with offsets remembered from the old file."""
    url = str(tmp_path / "z.zarr")
    write_many_shards(url, 3, codec="blosc-zstd")
    path = f"{url}/acts/a.0"
    reader = ShardArray.open(path, pool=FilePool(max_open=1))
    reader.read_chunk(1, 0)
    reader.read_chunk(0, 0)  # closes shard 1's descriptor (cap 1)
    x = np.random.default_rng(7).standard_normal((reader.shard_rows, 6)).astype(np.float16)
    x[:reader.chunk_rows] = 0  # the first inner chunk compresses to a few bytes: the second one moves
    with open(f"{path}/c/1/0.new", "wb") as f:
        f.write(encode_shard(x, reader.chunk_rows, numcodecs.Blosc(cname="zstd", clevel=3)))
    os.replace(f"{path}/c/1/0.new", f"{path}/c/1/0")
    assert reader.read_chunk(1, 1).tobytes() == x[reader.chunk_rows:].tobytes()


def test_layouts_the_reader_does_not_handle_are_left_to_zarr(tmp_path):
    assert ShardLayout.parse({}) is None
    z = zarr.create_array(str(tmp_path / "plain"), shape=(64, 4), chunks=(16, 4), dtype="float32")
    assert ShardArray.open(str(tmp_path / "plain")) is None and z.shape == (64, 4)


# --------------------------------------------------------------------- >= 10,000 shard files, 128 open files at most

N_SHARDS = 1700  # x 6 shard files (2 hooks x acts, rows/token, rows/context, rows/position, contexts) = 10,200

LIMITED = r"""
import json, os, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
import torch
torch.set_num_threads(1)
store, out, tokenizer = sys.argv[1:4]
os.environ["SAECACHE_CACHE_DIR"] = os.path.join(out, "cache")
from saecache.train.config import SAESpec, TrainConfig
from saecache.train.trainer import run_training

def train(url, name):
    cfg = TrainConfig(stores=[url], out=os.path.join(out, name), steps=20, batch_size=256, warmup_steps=2,
                      heldout_fraction=0.1, checkpoint_every=1000, progress=False, device="cpu",
                      saes=[SAESpec(arch="topk", width=16, hook_in="a.0", k=2, name="topk")])
    return run_training(cfg)[0]

done = {}
def step(name, fn):
    try:
        fn()
        done[name] = "ok"
    except BaseException as e:
        done[name] = f"{type(e).__name__}: {e}"
        traceback.print_exc()

run = {}
step("train", lambda: run.update(dir=train(store, "local")))

def evaluate():
    from saecache.evaluate.config import EvalConfig
    from saecache.evaluate.runner import run_evaluation
    rows = run_evaluation(EvalConfig(run_dirs=[run["dir"]], store=store, out=os.path.join(out, "eval"), splice=False,
                                     histograms=False, html_features=0, max_rows=4500, device="cpu", threads=1))
    assert rows[0]["n_rows"] == 4500, rows[0]["n_rows"]  # 141 of the 170 held-out shards

def features():
    from saecache.evaluate.config import FeaturesConfig
    from saecache.evaluate.features_run import feature_contexts
    res = feature_contexts(FeaturesConfig(run_dir=run["dir"], store=store, features=[0, 1], top=3, max_rows=4500,
                                          tokenizer=tokenizer, device="cpu"))
    assert res["n_rows"] == 4500  # 141 shards

def verify():
    from saecache.harvest.inspect import verify_store
    assert verify_store(store) == []

def copy(dst):
    from saecache.harvest.copy import CopyConfig, copy_store
    assert copy_store(CopyConfig(src=store, dst=dst))["complete"]

step("evaluate", evaluate)
step("features", features)
step("verify", verify)
step("copy", lambda: copy(os.path.join(out, "copy.zarr")))
step("remote", lambda: (copy("memory://team/many.zarr"), train("memory://team/many.zarr", "remote")))
print("RESULT " + json.dumps(done))
"""


@pytest.mark.slow
@needs_proc
def test_every_reader_works_over_10000_shard_files_with_128_open_files(tmp_path, tiny_tokenizer_dir):
    """Training (mapped, uncompressed chunks), evaluation's held-out reads, feature contexts, verify, a local copy and
    training from a remote store through the shard cache, each in a process limited to 128 open files."""
    store = str(tmp_path / "many.zarr")
    write_many_shards(store, N_SHARDS)
    n_files = sum(len(files) for root, _, files in os.walk(store) if f"{os.sep}c{os.sep}" in root + os.sep)
    assert n_files >= 10_000
    assert Geometry.from_header(json.load(open(f"{store}/zarr.json"))["attributes"]["saecache"]).n_shards == N_SHARDS
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(LIMITED), store, str(tmp_path / "out"),
                           str(tiny_tokenizer_dir)], capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    done = json.loads(lines[-1][len("RESULT "):])
    assert done == {k: "ok" for k in ("train", "evaluate", "features", "verify", "copy", "remote")}, \
        (done, proc.stderr[-3000:])
