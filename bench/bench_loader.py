"""Loader benchmark (issue 4, acceptance 5): training-loader rows/s on Pythia-70m-sized activations (d=512, fp16
storage, batch 4096) against references measured in the same run, in interleaved rounds:

- uncompressed store (codec none) vs a page-cached numpy memmap of the same rows read as random 4096-row blocks
  (target >= 0.5x). Compared twice: both delivering fp16 (the loader with dtype=float16 vs a raw block copy) and both
  delivering the float32 torch batch the trainer consumes (the memmap block converted with the loader's own cast);
- the default compressed store (blosc zstd clevel 3 bitshuffle) vs the codec's single-core decode rate: every inner
  chunk's bytes, already in memory, decoded by numcodecs in one thread into a preallocated buffer (target >= 0.8x);
- the cost of checking each inner chunk's crc32c as it is read (format version 3, issue 23 item 7): the loader as
  shipped (checked) against the same loader on the same store with the check switched off (`*_unchecked`), for the
  compressed store and the uncompressed one (whose zero-copy views are checked too); target >= 0.95x.

The loader runs with its defaults (8 partitions, 4-chunk shuffle windows, 2 reader threads). One measurement = one
epoch's worth of batches from a freshly built loader whose first batch has been served (a training run's steady
state: the one-off first window fill, 1/4 of this small store, is not counted; the epoch boundary inside the timed
stretch is). The memmap reference is also opened afresh for each measurement. The stores are
synthetic (Gaussian rows with per-dimension log-normal scales, a compressibility like real fp16 activations: see
the storage notes) and written through the real store writer; every file is read once before timing (page cache).

Usage: python -m bench.bench_loader [--rows 524288] [--rounds 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

D, BATCH, HOOK = 512, 4096, "mlp_out.3"


def write_store(path: Path, x: np.ndarray, codec: str) -> None:
    """Rows x [N, D] (fp16) as a saecache store with ctx_len 128 (4096-row inner chunks, 65536-row shards)."""
    from saecache.harvest.config import HarvestConfig
    from saecache.harvest.run import build_header
    from saecache.harvest.store import shard_permutation
    from saecache.harvest.store.write import StoreWriter

    cfg = HarvestConfig(out=str(path), model="synthetic", dataset="synthetic", hooks=(HOOK,), ctx_len=128,
                        tokens=len(x), bos=False, dtype="float16", codec=codec)
    info = {"model": {"name": "synthetic", "architecture": "none", "dtype": "float32"}, "tokenizer": {}}
    hook = types.SimpleNamespace(name=HOOK, module="synthetic", io="output", d=D)
    header = build_header(cfg, info, [hook], len(x) // 128, "synthetic")
    w = StoreWriter(str(path), header)
    g = w.geometry
    for s in range(g.n_shards):
        r0, r1 = g.shard_row_range(s)
        c0, c1 = g.shard_contexts(s)
        unperm = np.empty_like(x[r0:r1])
        unperm[shard_permutation(header["seed"], s, r1 - r0)] = x[r0:r1]  # the writer permutes rows back to x
        tokens = 1 + np.arange(c0 * 128, c1 * 128, dtype=np.int32).reshape(c1 - c0, 128) % 50000  # nonzero ids
        w.write_shard(s, {HOOK: unperm}, tokens)
    w.finalize_if_complete()


def warm(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def loader_epoch(url: str, dtype: torch.dtype, checked: bool = True) -> tuple[float, int]:
    """One epoch of the loader; ``checked`` False switches off the shard reader's crc32c check of each inner chunk
    (the bytes read are the same: only the check goes)."""
    from saecache.harvest.store import ShardArray
    from saecache.train.loader import Loader, open_stores

    if not checked:
        ShardArray.verify = False
        try:
            return loader_epoch(url, dtype)
        finally:
            ShardArray.verify = True
    loader = Loader(open_stores([url], [HOOK]), [HOOK], BATCH, seed=0, dtype=dtype)
    n = loader.batches_per_epoch(0)
    next(loader)  # the first window fill: once per run
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(loader)[HOOK]
    dt = time.perf_counter() - t0
    assert b.shape == (BATCH, D) and b.dtype == dtype
    loader.close()
    return dt, n * BATCH


def memmap_epoch(path: Path, to_float32: bool, seed: int) -> tuple[float, int]:
    """Random 4096-row blocks (start aligned to the block size), as many rows as the store holds."""
    from saecache.harvest.store import to_torch  # the loader's own fp16 -> fp32 cast: same cost on both sides

    mm = np.load(path, mmap_mode="c")  # copy-on-write, like the loader's mapping (torch wants writable arrays)
    n_blocks = len(mm) // BATCH
    order = np.random.default_rng(seed).permutation(n_blocks)
    t0 = time.perf_counter()
    for i in order:
        a = mm[i * BATCH:(i + 1) * BATCH]
        b = to_torch(a, "float16", None, torch.float32) if to_float32 else torch.from_numpy(np.array(a))
    dt = time.perf_counter() - t0
    assert b.shape == (BATCH, D)
    return dt, n_blocks * BATCH


def codec_decode_epoch(url: str) -> tuple[float, int]:
    """Single-core decode of every inner chunk of the compressed store, bytes already in memory."""
    import numcodecs
    from numcodecs import blosc

    from saecache.harvest.store import Store

    st = Store.open(url)
    arr = st.chunk_reader(HOOK)
    tail = 4 if arr.layout.chunk_crc else 0  # a chunk's crc32c (format version 3): not the codec's
    blobs = [b[:len(b) - tail] for s in range(st.geometry.n_shards) for i in range(arr.n_inner)
             if (b := arr.raw_chunk(s, i))]
    arr.close()
    codec, out = numcodecs.Blosc(), np.empty((arr.chunk_rows, D), dtype=np.float16)
    prev, blosc.use_threads = blosc.use_threads, False  # one core: no blosc internal threads
    try:
        t0 = time.perf_counter()
        for raw in blobs:
            codec.decode(raw, out=out.reshape(-1).view(np.uint8))
        dt = time.perf_counter() - t0
    finally:
        blosc.use_threads = prev
    return dt, len(blobs) * arr.chunk_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1 << 19)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    scale = (0.25 * rng.lognormal(0.0, 0.5, D)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="saecache-bench-loader-") as tmp:
        root = Path(tmp)
        x = np.empty((args.rows, D), dtype=np.float16)
        for i in range(0, args.rows, 65536):
            x[i:i + 65536] = rng.standard_normal((min(65536, args.rows - i), D), dtype=np.float32) * scale
        np.save(root / "rows.npy", x)
        t0 = time.perf_counter()
        write_store(root / "raw.zarr", x, "none")
        write_store(root / "zstd.zarr", x, "blosc-zstd")
        write_s = time.perf_counter() - t0
        del x
        for p in ("raw.zarr", "zstd.zarr", "rows.npy"):
            warm(root / p)
        raw, zstd = str(root / "raw.zarr"), str(root / "zstd.zarr")
        cands = {
            "memmap_blocks_fp16": lambda r: memmap_epoch(root / "rows.npy", False, r),
            "memmap_blocks_fp32": lambda r: memmap_epoch(root / "rows.npy", True, r),
            "loader_raw_fp16": lambda r: loader_epoch(raw, torch.float16),
            "loader_raw_fp32": lambda r: loader_epoch(raw, torch.float32),
            "codec_decode_1core": lambda r: codec_decode_epoch(zstd),
            "loader_zstd_fp16": lambda r: loader_epoch(zstd, torch.float16),
            "loader_zstd_fp32": lambda r: loader_epoch(zstd, torch.float32),
            "loader_raw_fp16_unchecked": lambda r: loader_epoch(raw, torch.float16, checked=False),
            "loader_raw_fp32_unchecked": lambda r: loader_epoch(raw, torch.float32, checked=False),
            "loader_zstd_fp32_unchecked": lambda r: loader_epoch(zstd, torch.float32, checked=False),
        }
        rate: dict[str, list[float]] = {n: [] for n in cands}
        order_rng = random.Random(0)
        for r in range(args.rounds + 1):  # round 0 warms up and is discarded
            names = list(cands)
            order_rng.shuffle(names)
            for n in names:
                dt, rows = cands[n](r)
                if r:
                    rate[n].append(rows / dt)
            if r:
                print(f"round {r}: " + ", ".join(f"{n} {rate[n][-1] / 1e3:,.0f}k" for n in cands), flush=True)
        compressed_bytes = sum(f.stat().st_size for f in (root / "zstd.zarr" / "acts").rglob("*") if f.is_file())
    med = {n: statistics.median(v) for n, v in rate.items()}
    paired = lambda a, b: round(statistics.median(x / y for x, y in zip(rate[a], rate[b])), 3)  # noqa: E731
    comparisons = [
        ("loader_raw_fp16", "memmap_blocks_fp16", 0.5), ("loader_raw_fp32", "memmap_blocks_fp32", 0.5),
        ("loader_zstd_fp16", "codec_decode_1core", 0.8), ("loader_zstd_fp32", "codec_decode_1core", 0.8),
        ("loader_raw_fp16", "loader_raw_fp16_unchecked", 0.95), ("loader_raw_fp32", "loader_raw_fp32_unchecked", 0.95),
        ("loader_zstd_fp32", "loader_zstd_fp32_unchecked", 0.95),
    ]
    result = {
        "rows": args.rows, "d": D, "batch": BATCH, "rounds": args.rounds, "store_write_s": round(write_s, 2),
        "zstd_ratio": round(args.rows * D * 2 / compressed_bytes, 3), "loadavg_start": os.getloadavg()[0],
        "rows_per_s_median": {n: round(v) for n, v in med.items()},
        "rows_per_s_all": {n: [round(v) for v in vs] for n, vs in rate.items()},
        "ratios": [{"candidate": a, "reference": b, "ratio": paired(a, b), "target": t} for a, b, t in comparisons],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Loader throughput (bench/bench_loader.py)", "",
             f"{args.rows:,} rows x d={D}, fp16 storage, batch {BATCH}, page-cached, {args.rounds} rounds after a "
             f"warm-up round; compressed store ratio {result['zstd_ratio']} (blosc zstd3 bitshuffle). Ratio = median "
             "of per-round paired ratios.", "",
             "| candidate | rows/s (median) |", "|---|---|"]
    lines += [f"| {n} | {v:,.0f} |" for n, v in med.items()]
    lines += ["", "| candidate | reference | ratio | target |", "|---|---|---|---|"]
    lines += [f"| {c['candidate']} | {c['reference']} | {c['ratio']:.2f} | >= {c['target']} |"
              for c in result["ratios"]]
    (out / "loader.md").write_text("\n".join(lines) + "\n")
    print((out / "loader.md").read_text())


if __name__ == "__main__":
    main()
