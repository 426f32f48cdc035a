"""The harvest stage end to end on the tiny fixture model: stored values agree with a fresh forward pass, kill -9 at
random moments + rerun gives byte-identical arrays, N workers equal one, claims refuse double work."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from _store import TINY_STORE_HOOKS, harvest_tiny, tiny_harvest_config

from saecache.errors import StoreError
from saecache.harvest.inspect import verify_store
from saecache.harvest.store import Geometry, Store, record_bytes
from saecache.harvest.store.write import StoreWriter


def _shard_records(mdir: Path) -> list[str]:
    """Published manifest entries of a local store (its `_manifest` node also holds the group's own zarr.json)."""
    return [n for n in os.listdir(mdir) if n.startswith("shard-")] if mdir.exists() else []


def array_snapshot(url) -> dict:
    """Every array's values plus every manifest's object checksums (the bytes of each shard object)."""
    g = zarr.open_group(str(url), mode="r")
    snap = {name: g[name][:] for name in [f"acts/{h}" for h in g.attrs["saecache"]["hooks"]]
            + ["rows/token", "rows/context", "rows/position", "contexts"]}
    st = Store.open(str(url))
    snap["_objects"] = {s: e["objects"] for s, e in st.manifest().items()}
    return snap


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if k == "_objects":
            assert a[k] == b[k]
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_store_agrees_with_fresh_forward(tiny_store, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    g = zarr.open_group(str(tiny_store), mode="r")  # plain zarr
    header = g.attrs["saecache"]
    assert set(header["hooks"]) == set(TINY_STORE_HOOKS)
    geom = Geometry.from_header(header)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    captured = {}

    def keep(name, io):
        def hook(mod, args, out):
            captured[name] = (args[0] if io == "input" else out).detach()
        return hook

    # independent capture: plain forward hooks on the modules named in the header, full forward (no early stop)
    handles = [model.get_submodule(h["module"]).register_forward_hook(keep(n, h["io"]))
               for n, h in header["hooks"].items()]
    r0, r1 = geom.shard_row_range(2)
    tok, cid, pos = (g[f"rows/{k}"][r0:r1] for k in ("token", "context", "position"))
    contexts = g["contexts"][:]
    np.testing.assert_array_equal(contexts[cid, pos], tok)
    ids = np.unique(cid)
    with torch.no_grad():
        model(torch.from_numpy(contexts[ids].astype(np.int64)))
    for h in handles:
        h.remove()
    row_of = {c: i for i, c in enumerate(ids)}
    for name in header["hooks"]:
        want = captured[name][[row_of[c] for c in cid], pos].numpy()
        got = g[f"acts/{name}"][r0:r1].astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # fp16 storage rounding
    st = Store.open(str(tiny_store))
    assert st.is_complete and verify_store(str(tiny_store)) == []
    # the BOS policy: every context starts with BOS
    assert (contexts[:, 0] == header["tokenizer"]["bos_token_id"]).all()


def _cli_args(out, model_dir, corpus, **extra):
    cfg = tiny_harvest_config(out, model_dir, corpus, **extra)
    args = ["--out", cfg.out, "--model", cfg.model, "--dataset", cfg.dataset, "--hooks", ",".join(cfg.hooks),
            "--ctx-len", str(cfg.ctx_len), "--tokens", str(cfg.tokens), "--batch-size", str(cfg.batch_size),
            "--ctx-per-chunk", str(cfg.ctx_per_chunk), "--chunks-per-shard", str(cfg.chunks_per_shard),
            "--device", "cpu", "--dtype", cfg.dtype, "--quiet"]
    if cfg.worker:
        args += ["--worker", cfg.worker]
    return args


def _run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "saecache", "harvest", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_kill9_at_random_moments_then_rerun_is_byte_identical(tmp_path, tiny_model_dir, tiny_corpus, dtype):
    small = dict(ctx_per_chunk=1, chunks_per_shard=2, tokens=16384, dtype=dtype)  # 256 shards: the kills land mid-run
    ref = tmp_path / "ref.zarr"
    p = _run_cli(_cli_args(ref, tiny_model_dir, tiny_corpus, **small))
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    out = tmp_path / "killed.zarr"
    rng = random.Random(1234)
    kills = 0
    for _ in range(3):
        p = _run_cli(_cli_args(out, tiny_model_dir, tiny_corpus, **small))
        mdir = out / "_manifest"
        before = len(_shard_records(mdir))
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:  # wait until it is writing shards
            if len(_shard_records(mdir)) > before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 2
    assert not Store.open(str(out)).is_complete  # the kills really interrupted it
    p = _run_cli(_cli_args(out, tiny_model_dir, tiny_corpus, **small))
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert_same(array_snapshot(ref), array_snapshot(out))
    assert verify_store(str(out)) == []


def test_two_workers_equal_one(tmp_path, tiny_model_dir, tiny_corpus):
    one = harvest_tiny(tmp_path / "one.zarr", tiny_model_dir, tiny_corpus, tokens=2048)
    two = tmp_path / "two.zarr"
    harvest_tiny(two, tiny_model_dir, tiny_corpus, tokens=2048, worker="1/2")
    st = Store.open(str(two))
    assert st.complete_shards() == [s for s in range(st.geometry.n_shards) if s % 2 == 1] and st.final is None
    harvest_tiny(two, tiny_model_dir, tiny_corpus, tokens=2048, worker="0/2")
    assert Store.open(str(two)).final is not None
    assert_same(array_snapshot(one), array_snapshot(two))
    assert Store.open(str(one)).fingerprint() == Store.open(str(two)).fingerprint()


def test_worker_slot_from_launcher_environment(monkeypatch, tmp_path):
    from saecache.harvest.config import HarvestConfig

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert HarvestConfig(out=str(tmp_path)).worker_slot() == (1, 3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert HarvestConfig(out=str(tmp_path)).worker_slot() == (1, 2)


def test_same_worker_slot_claimed_twice_is_refused(tmp_path, tiny_model_dir, tiny_corpus):
    out = tmp_path / "s.zarr"
    harvest_tiny(out, tiny_model_dir, tiny_corpus, tokens=1024, worker="1/2")
    # a live process on this host holds slot 0/2: a real second process, its claim written as the writer does
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim = {"id": "other", "worker": 0, "n_workers": 2, "host": os.uname().nodename, "pid": holder.pid,
                 "time": time.time()}
        (out / "_claims" / "worker-00000-of-00002").mkdir()
        (out / "_claims" / "worker-00000-of-00002" / "zarr.json").write_bytes(record_bytes(claim))
        with pytest.raises(StoreError, match="worker 0/2 .* already running"):
            harvest_tiny(out, tiny_model_dir, tiny_corpus, tokens=1024, worker="0/2")
        with pytest.raises(StoreError, match="same N"):
            harvest_tiny(out, tiny_model_dir, tiny_corpus, tokens=1024, worker="0/3")
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its stale claim is taken over and the store completes
    harvest_tiny(out, tiny_model_dir, tiny_corpus, tokens=1024, worker="0/2")
    assert Store.open(str(out)).is_complete


@pytest.mark.parametrize("dtype,codec", [("bfloat16", "zstd"), ("float32", "none")])
def test_other_dtypes_and_codecs_hold_the_same_values(tmp_path, tiny_store, tiny_model_dir, tiny_corpus, dtype, codec):
    other = harvest_tiny(tmp_path / "o.zarr", tiny_model_dir, tiny_corpus, dtype=dtype, codec=codec, tokens=1024)
    a, b = Store.open(str(tiny_store)), Store.open(str(other))
    ta = a.read_acts_torch("mlp_out.0", 0, 512).float()
    tb = b.read_acts_torch("mlp_out.0", 0, 512).float()
    torch.testing.assert_close(ta, tb, rtol=1e-2, atol=1e-2)
    assert b.array("acts/mlp_out.0").attrs["logical_dtype"] == dtype


def test_ctrl_c_leaves_a_resumable_store(tmp_path, tiny_model_dir, tiny_corpus):
    """SIGINT (Ctrl-C) mid-harvest: one line, exit 130, published shards kept; rerunning completes the same store."""
    small = dict(ctx_per_chunk=1, chunks_per_shard=2, tokens=16384)  # 256 shards: the signal lands mid-run
    ref = tmp_path / "ref.zarr"
    p = _run_cli(_cli_args(ref, tiny_model_dir, tiny_corpus, **small))
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    out = tmp_path / "interrupted.zarr"
    # a Ctrl-C-able child even when this test runs as a background job (shells start those with SIGINT ignored, and
    # an ignored signal stays ignored across exec)
    p = _run_cli(_cli_args(out, tiny_model_dir, tiny_corpus, **small),
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    mdir = out / "_manifest"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not _shard_records(mdir):
        time.sleep(0.01)
    assert p.poll() is None, "the harvest finished before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130
    lines = [line for line in err.decode().splitlines() if line.strip() and "harvest" not in line[:12]]
    assert lines and "rerun the same command to resume" in lines[-1] and "Traceback" not in err.decode()
    assert not Store.open(str(out)).is_complete
    p = _run_cli(_cli_args(out, tiny_model_dir, tiny_corpus, **small))
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert_same(array_snapshot(ref), array_snapshot(out))
    assert verify_store(str(out)) == []


def _objects_digest(url) -> str:
    import hashlib

    m = Store.open(str(url)).manifest()
    return hashlib.sha256(json.dumps({str(s): m[s]["objects"] for s in sorted(m)}, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("name,extra", [("default", {}), ("bf16-lz4-nobos", dict(dtype="bfloat16", codec="blosc-lz4",
                                                                                 store_bos=False, tokens=6000))])
def test_pipelined_stores_are_byte_identical_to_the_serial_writer(tmp_path, tiny_model_dir, tiny_corpus, name, extra,
                                                                  monkeypatch):
    """The pipeline (3 encode workers) and the hand-encoded shard objects write the bytes the serial writer writes
    through zarr itself (the writer before both). Compared within one run, not against pinned digests: the
    activations' low bits follow the CPU's matmul kernels, so a digest pinned on one machine fails on another."""
    digests = {w: _objects_digest(harvest_tiny(tmp_path / f"w{w}.zarr", tiny_model_dir, tiny_corpus,
                                               encode_workers=w, **extra)) for w in (0, 3)}
    monkeypatch.setattr(StoreWriter, "hand_encode", False)
    zarr_written = _objects_digest(harvest_tiny(tmp_path / "zarr.zarr", tiny_model_dir, tiny_corpus, encode_workers=0,
                                                **extra))
    assert digests[0] == digests[3] == zarr_written


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_statistics_taken_on_the_device_equal_the_stored_rows(tmp_path, tiny_model_dir, tiny_corpus, dtype):
    """The harvest takes each shard's manifest statistics on the model's device (so the write threads only encode);
    they must be those of the rows the shard object holds, as `shard_stats` computes them from the file."""
    from saecache.harvest.store.write import shard_stats

    out = harvest_tiny(tmp_path / "s.zarr", tiny_model_dir, tiny_corpus, dtype=dtype)
    st = Store.open(str(out))
    g = zarr.open_group(str(out), mode="r")
    assert len(st.manifest()) >= 2
    for s, entry in st.manifest().items():
        r0, r1 = entry["rows"]
        for hook, info in st.header["hooks"].items():
            want = shard_stats(g[f"acts/{hook}"][r0:r1], dtype, info["d"])
            got = entry["stats"][hook]
            assert got["count"] == want["count"] == r1 - r0 and got["nonfinite"] == want["nonfinite"] == 0
            np.testing.assert_allclose(got["sum"], want["sum"], rtol=1e-9, atol=1e-9)
            assert got["sum_sq_norm"] == pytest.approx(want["sum_sq_norm"], rel=1e-9)
            assert got["sq_exact"] > 0 and 0 < got["sq_err"] < 1e-3 * got["sq_exact"]  # rounding to the format


def test_a_claim_left_half_written_by_a_kill_does_not_block_the_rerun(tmp_path, tiny_model_dir, tiny_corpus):
    out = harvest_tiny(tmp_path / "s.zarr", tiny_model_dir, tiny_corpus, tokens=1024, worker="1/2")
    (out / "_claims" / "worker-00000-of-00002.json.tmp-4242").write_bytes(b"")  # killed between open and write
    harvest_tiny(out, tiny_model_dir, tiny_corpus, tokens=1024, worker="0/2")
    assert Store.open(str(out)).is_complete
