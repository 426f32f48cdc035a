"""Remote-store loader benchmark (issue 7, acceptance 4): training-loader rows/s from a store on a loopback S3 server
(moto in server mode), first epoch (downloading shards into the local cache) and later epochs (served from the
cache), against the same store on local disk read in the same run. Also: the loader over S3 with the cache turned
off (zarr partial reads, two round trips per inner chunk), and `saecache copy` throughput local -> S3.

The store is synthetic but has the production layout: one hook of width 512, fp16, Blosc zstd3 bitshuffle, inner
chunks of 4096 rows, shards of 65536 rows; activations are Gaussian with per-dimension scales (compress like real
ones, ~1.05x). Each figure is the median of `--repeats` epochs; the local reference alternates with the remote runs
so that machine noise hits both. Figures are indicative: 2 shared CPU cores, loopback network, moto's in-memory
backend (not a real object store's latency or bandwidth).

Usage: python -m bench.bench_remote [--shards 4] [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

D, CTX_LEN, CTX_PER_CHUNK, CHUNKS_PER_SHARD, BATCH = 512, 128, 32, 16, 4096
BUCKET = "bench-bucket"


def make_header(n_contexts: int) -> dict:
    from saecache.harvest.store import FORMAT_VERSION, Geometry

    g = Geometry(CTX_LEN, 0, CTX_PER_CHUNK, CHUNKS_PER_SHARD, n_contexts)
    return {
        "format_version": FORMAT_VERSION, "package_version": "bench",
        "model": {"name": "synthetic", "revision": None, "architecture": "none", "config_hash": "none",
                  "dtype": "float32"},
        "tokenizer": {"name": "none", "vocab_size": 50304, "bos_token_id": 0, "eos_token_id": 0},
        "dataset": {"spec": "gaussian", "name": None, "split": "train", "text_field": "text", "fingerprint": "none"},
        "ctx_len": CTX_LEN, "bos_policy": "synthetic", "seed": 0,
        "hooks": {"acts.0": {"module": "synthetic", "io": "output", "d": D}},
        "storage": {"dtype": "float16", "codec": "blosc-zstd", "rows_per_context": CTX_LEN, "first_position": 0,
                    "ctx_per_chunk": CTX_PER_CHUNK, "chunks_per_shard": CHUNKS_PER_SHARD,
                    "chunk_rows": g.chunk_rows, "shard_rows": g.shard_rows},
        "n_contexts": n_contexts, "n_rows": g.n_rows, "n_shards": g.n_shards, "nonfinite_policy": "error",
        "config": {"synthetic": True},
    }


def write_store(url: str, n_shards: int) -> dict:
    from saecache.harvest.store import Geometry
    from saecache.harvest.store.write import StoreWriter

    header = make_header(n_shards * CTX_PER_CHUNK * CHUNKS_PER_SHARD)
    w = StoreWriter(url, header)
    g, rng = Geometry.from_header(header), np.random.default_rng(0)
    scale_D = np.exp(rng.normal(0, 1, D)).astype(np.float32) * 0.2
    for s in range(g.n_shards):
        r0, r1 = g.shard_row_range(s)
        acts = (rng.standard_normal((r1 - r0, D), dtype=np.float32) * scale_D).astype(np.float16)
        c0, c1 = g.shard_contexts(s)
        ctx = rng.integers(0, 50304, (c1 - c0, CTX_LEN), dtype=np.int32)
        w.write_shard(s, {"acts.0": acts}, ctx)
    w.finalize_if_complete()
    return header


def start_moto() -> tuple[subprocess.Popen, str]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)


def epoch_rows_per_s(loader) -> float:
    n = loader.batches_per_epoch(loader.epoch)
    t0 = time.perf_counter()
    for _ in range(n):
        next(loader)
    return n * BATCH / (time.perf_counter() - t0)


def make_loader(store):
    from saecache.train.loader import Loader

    return Loader([store], ["acts.0"], batch_size=BATCH, seed=0, partitions=8, shuffle_chunks=4, reader_threads=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=4, help="Shards of 65536 rows x 512 (64 MiB fp16 each).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    from saecache.harvest.store.cache import CacheConfig, ShardCache
    from saecache.harvest.copy import CopyConfig, copy_store
    from saecache.harvest.store import Store

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    proc, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            local = f"{tmp}/store.zarr"
            remote = f"s3://{BUCKET}/store.zarr"
            print(f"writing a {args.shards}-shard store ...", flush=True)
            write_store(local, args.shards)
            t0 = time.perf_counter()
            summary = copy_store(CopyConfig(src=local, dst=remote))
            copy_s = time.perf_counter() - t0
            store_bytes = summary["bytes_copied"]
            local_store = Store.open(local)
            n_rows = local_store.geometry.n_rows

            res = {"local": [], "s3_first_epoch": [], "s3_cached": [], "s3_no_cache": []}
            for r in range(args.repeats):
                print(f"repeat {r + 1}/{args.repeats}", flush=True)
                lo = make_loader(Store.open(local))
                epoch_rows_per_s(lo)  # page cache and shard indexes warm, like the cached remote epoch
                res["local"].append(epoch_rows_per_s(lo))
                lo.close()
                cache = ShardCache(CacheConfig(f"{tmp}/cache-{r}", 4 * 2**30))
                rl = make_loader(Store.open(remote, cache=cache))
                res["s3_first_epoch"].append(epoch_rows_per_s(rl))
                res["s3_cached"].append(epoch_rows_per_s(rl))
                rl.close()
                if r == 0:
                    nl = make_loader(Store.open(remote, cache=None))
                    res["s3_no_cache"].append(epoch_rows_per_s(nl))
                    nl.close()
            med = {k: statistics.median(v) for k, v in res.items()}
    finally:
        proc.terminate()
        proc.wait(10)

    out = {
        "what": "training-loader rows/s (batch 4096, 8 partitions, 2 reader threads, fp16 -> fp32 tensors) from a "
                "store on a loopback S3 server (moto) vs the same store on local disk",
        "store": {"rows": n_rows, "d": D, "shards": args.shards, "bytes": store_bytes, "codec": "blosc-zstd",
                  "dtype": "float16", "inner_chunk_rows": CTX_PER_CHUNK * CTX_LEN,
                  "shard_rows": CTX_PER_CHUNK * CTX_LEN * CHUNKS_PER_SHARD},
        "repeats": args.repeats,
        "rows_per_s": {k: round(v) for k, v in med.items()},
        "rows_per_s_all": {k: [round(x) for x in v] for k, v in res.items()},
        "ratio_to_local": {k: round(v / med["local"], 3) for k, v in med.items()},
        "copy_local_to_s3": {"seconds": round(copy_s, 2), "MB_per_s": round(store_bytes / copy_s / 1e6, 1)},
        "machine": "2 shared CPU cores, loopback network, moto in-memory S3; indicative only",
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "remote.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# Loader from a remote (S3) store vs local disk", "",
             f"Store: {n_rows:,} rows x {D} fp16 in {args.shards} shards ({store_bytes / 2**20:.0f} MiB, Blosc zstd); "
             f"loader batch {BATCH}, 8 partitions, 2 reader threads. Median of {args.repeats} epochs; loopback moto "
             "S3 on 2 shared cores (indicative).", "",
             "| source | rows/s | vs local disk |", "|---|---|---|"]
    names = {"local": "local disk (direct reader, page-cached)",
             "s3_first_epoch": "S3, first epoch (downloads into the shard cache)",
             "s3_cached": "S3, later epochs (served from the shard cache)",
             "s3_no_cache": "S3 without the cache (zarr partial reads)"}
    for k, label in names.items():
        lines.append(f"| {label} | {out['rows_per_s'][k]:,} | {out['ratio_to_local'][k]:.2f}x |")
    lines += ["", f"`saecache copy` local -> S3: {out['copy_local_to_s3']['MB_per_s']} MB/s "
              f"({out['copy_local_to_s3']['seconds']} s, checksums verified at both ends).", ""]
    Path(args.out, "remote.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
