"""Write-path ceiling: store rows/s of the harvest's write pipeline fed by an instant producer (precomputed
activations, no model), with 1 and 2 encode workers, against the codec's single-core encode rate measured in the same
run, in interleaved rounds. Target: pipeline >= 0.8 x workers x single-core rate (issue 11). Also the codec's share of
the pipeline's CPU time (codec CPU-seconds per row / the process's CPU-seconds per row), the figure that other load on
the machine does not distort: what the wall-clock ratio reaches when the workers have their cores to themselves.

The producer hands over what `harvest_shard` hands the write pipeline: rows in stored order and their manifest
statistics, both made on the model's device (`run.shard_to_host`). That device-side step is timed apart, on this CPU
(on a GPU it is a gather and a few reductions, well under a millisecond per shard at these sizes).

Data: fp16 N(0, 0.3^2) activations of one d=512 hook (the shape of Pythia-70m's MLP output; bitshuffle + zstd
compress such noise about as well as real fp16 activations: 1.12x here, 1.05-1.25x measured on real models).

    python -m bench.bench_write [--shards 4] [--rounds 2] [--codecs blosc-zstd,blosc-lz4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

D = 512
CHUNK_ROWS = 4096
CHUNKS_PER_SHARD = 16


def make_header(codec: str, n_shards: int) -> dict:
    from saecache.harvest.config import HarvestConfig
    from saecache.harvest.run import build_header

    cfg = HarvestConfig(out="unused", model="bench", dataset="bench", hooks=("mlp_out.0",), ctx_len=129,
                        store_bos=False, ctx_per_chunk=CHUNK_ROWS // 128, chunks_per_shard=CHUNKS_PER_SHARD,
                        tokens=n_shards * CHUNK_ROWS * CHUNKS_PER_SHARD, codec=codec)
    info = {"model": {"name": "bench"}, "tokenizer": {"name": "bench"}}
    hooks = [SimpleNamespace(name="mlp_out.0", module="layers.0.mlp", io="output", d=D)]
    n_ctx = n_shards * CHUNKS_PER_SHARD * (CHUNK_ROWS // 128)
    return build_header(cfg, info, hooks, n_ctx, "bench")


def prepare(shard_FD: np.ndarray, seed: int, s: int) -> tuple[dict, dict, float]:
    """What the device hands the write pipeline for shard `s` of these (unpermuted, stored) rows, and the CPU seconds
    that device-side step took here: the manifest sums (`quant.stored_sums`) and the gather into stored order."""
    from saecache.harvest import quant
    from saecache.harvest.run import shard_to_host

    c0 = time.thread_time()
    x = torch.from_numpy(shard_FD)
    sums = {"mlp_out.0": quant.stored_sums(x.float(), x, "float16")}
    host, _, stats = shard_to_host({"mlp_out.0": x}, sums, seed, s, len(x), torch.device("cpu"))
    return host, stats, time.thread_time() - c0


def pipeline_rows_per_s(root: Path, tag: str, codec: str, shard_FD: np.ndarray, n_shards: int,
                        workers: int) -> tuple[float, float]:
    """(rows/s, rows per CPU-second of the whole process) of the write pipeline."""
    from saecache.harvest.run import WritePipeline
    from saecache.harvest.store.write import StoreWriter

    header = make_header(codec, n_shards)
    writer = StoreWriter(str(root / f"{tag}.zarr"), header)
    writer.claim_worker(0, 1)
    ctx = np.zeros((writer.geometry.ctx_per_shard, writer.geometry.ctx_len), dtype=np.int32)
    ready = [prepare(shard_FD, header["seed"], s)[:2] for s in range(n_shards)]  # the instant producer's output
    t0, c0 = time.perf_counter(), time.process_time()
    pipe = WritePipeline(writer, workers, lambda s: None)
    for s in range(n_shards):
        pipe.submit(s, ready[s][0], None, ctx, ready[s][1])
    pipe.close()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    writer.release()
    return n_shards * len(shard_FD) / dt, n_shards * len(shard_FD) / cpu


def codec_rows_per_s(codec: str, shard_FD: np.ndarray) -> tuple[float, float, float]:
    """Single-core encode rate (rows/s) of the store's codec on the shard's inner chunks, run on one non-main thread
    (where blosc uses no internal threads, as on the write pipeline's threads); the same per CPU-second of that
    thread; and the compression ratio."""
    from saecache.harvest.store import CODECS

    c = CODECS[codec]()
    from numcodecs import Blosc

    shuffle = {"bitshuffle": Blosc.BITSHUFFLE, "shuffle": Blosc.SHUFFLE, "noshuffle": Blosc.NOSHUFFLE}
    enc = Blosc(cname=c.cname.value, clevel=c.clevel, shuffle=shuffle[c.shuffle.value], typesize=2)
    chunks = [shard_FD[i:i + CHUNK_ROWS] for i in range(0, len(shard_FD), CHUNK_ROWS)]

    def run() -> tuple[float, float, int]:
        t0, c0 = time.perf_counter(), time.thread_time()
        n = sum(len(enc.encode(ch)) for ch in chunks)
        return time.perf_counter() - t0, time.thread_time() - c0, n

    with ThreadPoolExecutor(1) as ex:
        dt, cpu, nbytes = ex.submit(run).result()
    return len(shard_FD) / dt, len(shard_FD) / cpu, shard_FD.nbytes / nbytes


def _filesystem(path: str) -> str:
    """The type of the filesystem holding `path` (Linux /proc/mounts; "unknown" elsewhere)."""
    best, fs = "", "unknown"
    try:
        for line in open("/proc/mounts"):
            mnt, typ = line.split()[1], line.split()[2]
            if os.path.realpath(path).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, typ
    except OSError:
        pass
    return fs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=4, help="shards of 65536 x 512 fp16 per pipeline measurement")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--codecs", default="blosc-zstd,blosc-lz4")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--dir", default=None, help="where the stores are written (default: the system's temp dir); "
                    "a tmpfs such as /dev/shm leaves the disk's writeback out of the figures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from saecache.harvest.run import keep_freed_heap

    keep_freed_heap()  # as the write pipeline does; set first, so the codec's reference runs under it as well
    rng = np.random.default_rng(0)
    shard_FD = (rng.standard_normal((CHUNK_ROWS * CHUNKS_PER_SHARD, D), dtype=np.float32) * 0.3).astype(np.float16)
    result = {"rows_per_shard": len(shard_FD), "d": D, "dtype": "float16", "shards_per_measurement": args.shards,
              "rounds": args.rounds, "cpus": os.cpu_count(), "load_avg_1m_before": round(os.getloadavg()[0], 2),
              "codecs": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result["store_filesystem"] = _filesystem(tmp)
        root = Path(tmp)
        for codec in args.codecs.split(","):
            rec = {"single_core_rows_per_s": [], "w1_rows_per_s": [], "w2_rows_per_s": [],
                   "codec_rows_per_cpu_s": [], "w1_rows_per_cpu_s": [], "w2_rows_per_cpu_s": []}
            for r in range(args.rounds):  # interleaved: reference, 1 worker, 2 workers, per round
                ref, ref_cpu, ratio = codec_rows_per_s(codec, shard_FD)
                rec["single_core_rows_per_s"].append(round(ref))
                rec["codec_rows_per_cpu_s"].append(round(ref_cpu))
                for w in (1, 2):
                    rate, per_cpu = pipeline_rows_per_s(root, f"{codec}-{r}-{w}", codec, shard_FD, args.shards, w)
                    rec[f"w{w}_rows_per_s"].append(round(rate))
                    rec[f"w{w}_rows_per_cpu_s"].append(round(per_cpu))
                rec["compression_ratio"] = round(ratio, 3)
            for w in (1, 2):
                rec[f"w{w}_vs_single_core"] = round(statistics.median(
                    a / b for a, b in zip(rec[f"w{w}_rows_per_s"], rec["single_core_rows_per_s"])), 3)
                # the load-independent share: codec CPU per row / pipeline CPU per row (1.0 = nothing but the codec)
                rec[f"w{w}_cpu_share_of_codec"] = round(statistics.median(
                    a / b for a, b in zip(rec[f"w{w}_rows_per_cpu_s"], rec["codec_rows_per_cpu_s"])), 3)
            result["codecs"][codec] = rec
    result["device_prep_cpu_ms_per_shard"] = round(1000 * statistics.median(
        prepare(shard_FD, 0, s)[2] for s in range(3)), 1)
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "write.json").write_text(json.dumps(result, indent=1))
    lines = ["# Write-path ceiling", "",
             f"Instant producer: {args.shards} shards of {len(shard_FD)} x {D} fp16 N(0, 0.3^2) per measurement, "
             f"{args.rounds} interleaved rounds; single-core = the codec alone on one thread, same data, same run. "
             "Target: pipeline >= 0.8 x workers x single-core. The producer hands over rows in stored order with "
             "their statistics, as the harvest's device does; that step costs "
             f"{result['device_prep_cpu_ms_per_shard']} CPU-ms per shard on this machine's CPU (on a GPU, a gather and "
             "a few reductions).",
             f"Stores written to a {result['store_filesystem']} filesystem. "
             f"Machine: {result['cpus']} CPUs, 1-minute load average {result['load_avg_1m_before']} before and "
             f"{result['load_avg_1m_after']} after (other work on the machine takes cores from every figure).", "",
             "| codec | ratio | single-core rows/s | 1 worker rows/s | x single | 2 workers rows/s | x single "
             "| codec share of CPU, 1 / 2 workers |",
             "|---|---|---|---|---|---|---|---|"]
    for codec, r in result["codecs"].items():
        lines.append(f"| {codec} | {r['compression_ratio']} | {statistics.median(r['single_core_rows_per_s']):,.0f} | "
                     f"{statistics.median(r['w1_rows_per_s']):,.0f} | {r['w1_vs_single_core']} | "
                     f"{statistics.median(r['w2_rows_per_s']):,.0f} | {r['w2_vs_single_core']} | "
                     f"{r['w1_cpu_share_of_codec']} / {r['w2_cpu_share_of_codec']} |")
    (out / "write.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
