"""The harvest run: the plan's packed contexts → model forward with hooks → on the device: cast to the storage format,
manifest sums, permutation into stored order → host buffers → encode + checksum + write on a thread pool (the next
shard's forward overlaps) → whole shards published in the store.

Resume and scale-out come from the geometry: shard `s` is a pure function of (config, s), so a rerun skips the shards
already in the manifest, and `--worker i/N` takes the shards with `s % N == i`. The text is packed once per store
(`plan.py`); each worker reads only its own shards' contexts. Forward batches are aligned to shard boundaries, so a
shard's bytes do not depend on which process wrote it, when, or how many encode threads ran.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import zarr
from tqdm import tqdm
from zarr.core import sync as zsync

from saecache import __version__
from saecache.errors import ConfigError, DataError
from saecache.harvest import quant
from saecache.harvest.config import HELDOUT_RULE, HarvestConfig, min_store_contexts
from saecache.harvest.hooks import ActivationCapture, resolve_hooks
from saecache.harvest.inspect import store_size
from saecache.harvest.model import load_model
from saecache.harvest.paths import remove_path, topmost_missing
from saecache.harvest.plan import Plan, plan_key
from saecache.harvest.store import (
    CLAIMS_DIR, FORMAT_VERSION, MANIFEST_DIR, PLAN_DIR, Geometry, Location, StoreWriter, probe_store_dir,
    shard_permutation,
)
from saecache.harvest.text import TextSpec
from saecache.threads import stage_threads


def bos_policy(cfg: HarvestConfig) -> str:
    p = ("documents tokenized without special tokens, each followed by EOS, packed into one stream; "
         + ("each context is BOS + the next ctx_len-1 stream tokens" if cfg.bos else "each context is ctx_len stream tokens"))
    return p + ("; every position is stored" if cfg.store_bos else "; position 0 (BOS) is not stored")


def build_header(cfg: HarvestConfig, info: dict, hooks: list, n_contexts: int, dataset_fp: str) -> dict:
    first = 0 if cfg.store_bos else 1
    rpc = cfg.ctx_len - first
    cpc = cfg.ctx_per_chunk or Geometry.default_ctx_per_chunk(rpc)
    geom = Geometry(cfg.ctx_len, first, cpc, cfg.chunks_per_shard, n_contexts)
    model = {k: info["model"].get(k) for k in ("name", "revision", "architecture", "config_hash", "dtype")}
    return {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "model": model,
        "tokenizer": info["tokenizer"],
        "dataset": {"spec": cfg.dataset, "name": cfg.dataset_name, "split": cfg.split, "text_field": cfg.text_field,
                    "fingerprint": dataset_fp},
        "ctx_len": cfg.ctx_len,
        "bos_policy": bos_policy(cfg),
        "seed": cfg.seed,
        "hooks": {h.name.replace("/", "_"): {"module": h.module, "io": h.io, "d": h.d} for h in hooks},
        "storage": {"dtype": cfg.dtype, "codec": cfg.codec, "rows_per_context": rpc, "first_position": first,
                    "ctx_per_chunk": cpc, "chunks_per_shard": cfg.chunks_per_shard, "chunk_rows": geom.chunk_rows,
                    "shard_rows": geom.shard_rows},
        "n_contexts": n_contexts, "n_rows": geom.n_rows, "n_shards": geom.n_shards,
        "nonfinite_policy": cfg.nonfinite,
        "config": cfg.as_recorded(),
    }


def to_storage(x_ND: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, D] float tensor on the model's device → (the stored bits on the device, the block's manifest sums on
    the device: `quant.stored_sums`). Encoding (quantization) runs on the device, before the copy to host; formats in
    `quant.py`. The one place the pipeline decides a storage encoding."""
    stored = quant.encode(x_ND, fmt)
    return stored, quant.stored_sums(x_ND, stored, fmt)


def harvest_shard(capture, cfg: HarvestConfig, header: dict, geom: Geometry, s: int, contexts_CT: np.ndarray,
                  device: torch.device, staging: dict[str, torch.Tensor] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], object, dict[str, dict]]:
    """Forward the shard's contexts in fixed batches, encode each batch to the storage format and take its manifest
    sums on the device, then permute the shard's rows into stored order on the device (`store.shard_permutation`) and
    copy them to host buffers (pinned, non-blocking on CUDA). What is left for the host's write threads is the codec,
    the checksum and the file write. Returns (host rows per hook in stored order, CUDA event or None, the manifest
    statistics per hook incl. sq_err/sq_exact): the buffers are complete once the event has completed. `staging`
    (hook → device tensor) keeps the unpermuted device buffers from one shard to the next."""
    p0, rpc = geom.first_position, geom.rows_per_context
    n_rows = len(contexts_CT) * rpc
    staging = {} if staging is None else staging
    sums: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for b0 in range(0, len(contexts_CT), cfg.batch_size):
            ids_BT = torch.from_numpy(contexts_CT[b0:b0 + cfg.batch_size].astype(np.int64)).to(device)
            out = capture(ids_BT)
            r0 = b0 * rpc
            for name, acts_BTD in out.items():
                key = name.replace("/", "_")
                x = acts_BTD[:, p0:].reshape(-1, acts_BTD.shape[-1])
                stored, blk = to_storage(x, cfg.dtype)
                sums[key] = blk if key not in sums else sums[key] + blk
                if key not in staging:  # the stored width (quantized formats add a scale) is known from the first batch
                    staging[key] = torch.empty((geom.shard_rows, stored.shape[1]), dtype=stored.dtype, device=device)
                staging[key][r0:r0 + len(stored)] = stored
    host, event, stats = shard_to_host(staging, sums, header["seed"], s, n_rows, device)
    if cfg.nonfinite == "error":
        for h in host:
            if n := stats[h]["nonfinite"]:
                c0, c1 = geom.shard_contexts(s)
                raise DataError(f"hook {h} produced {n} NaN/Inf values in shard {s} (contexts {c0}..{c1 - 1}) in "
                                f"{cfg.dtype}; nothing of that shard was published. Store float32/bfloat16 (--dtype) "
                                "if fp16 overflows, or pass --nonfinite count to store and count them")
    return host, event, stats


def shard_to_host(staging: dict[str, torch.Tensor], sums: dict[str, torch.Tensor], seed: int, s: int, n_rows: int,
                  device: torch.device) -> tuple[dict[str, torch.Tensor], object, dict[str, dict]]:
    """The end of a shard on the device: its unpermuted stored rows (`staging[hook][:n_rows]`) gathered into stored
    order and copied to host (pinned, non-blocking on CUDA), its summed `quant.stored_sums` turned into manifest
    statistics. Returns (host rows per hook, CUDA event or None, statistics per hook)."""
    cuda = device.type == "cuda"
    with torch.inference_mode():
        perm = torch.from_numpy(shard_permutation(seed, s, n_rows)).to(device)
        host: dict[str, torch.Tensor] = {}
        for key in sums:
            rows = staging[key][:n_rows].index_select(0, perm)
            if cuda:
                host[key] = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
                host[key].copy_(rows, non_blocking=True)
            else:
                host[key] = rows
    event = None
    if cuda:
        event = torch.cuda.Event()
        event.record()
    got = {h: sums[h].tolist() for h in host}
    return host, event, {h: {**quant.stats_from_sums(v[2:], n_rows), "sq_err": v[0], "sq_exact": v[1]}
                         for h, v in got.items()}


class WritePipeline:
    """Encode and write finished shards on `workers` threads while the caller forwards the next one.

    At most `workers` shards wait or are being written, so host memory holds at most `workers + 1` shards'
    activations (the one being gathered included), and the device one more (the shard being forwarded, unpermuted).
    `workers=0` writes each shard on the calling thread before the next forward (the serial path). Either way the
    store's bytes are the same: a shard's objects depend only on its contents. Rows arrive in stored order with their
    statistics (`harvest_shard` permutes and sums on the device), so each thread only encodes, checksums and writes
    its own shard (`store/encode.py`; the codecs release the GIL), and `workers` is also the encode parallelism. Objects
    the writer leaves to zarr (a layout `store/encode.py` does not write) are encoded on zarr's event-loop executor,
    given `workers` threads while the pipeline is open."""

    def __init__(self, writer: StoreWriter, workers: int, on_done: Callable[[int], None]):
        self.writer, self.workers, self.on_done = writer, workers, on_done
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="saecache-write") if workers else None
        self.pending: deque = deque()
        self._restore = _set_codec_threads(max(1, workers))
        keep_freed_heap()
        # the zarr path of write_shard sets this per call; held for the pipeline's life so that no thread's exit can
        # unset it mid-write
        self._config = zarr.config.set({"array.write_empty_chunks": True})
        self._config.__enter__()

    def _write(self, s: int, host: dict[str, torch.Tensor], event, contexts_CT: np.ndarray, stats) -> int:
        if event is not None:
            event.synchronize()
        fmt = self.writer.header["storage"]["dtype"]
        self.writer.write_permuted_shard(s, {h: quant.to_numpy(t, fmt) for h, t in host.items()}, contexts_CT, stats)
        return s

    def submit(self, s: int, host: dict[str, torch.Tensor], event, contexts_CT: np.ndarray,
               stats: dict[str, dict]) -> None:
        """Write shard `s` from `harvest_shard`'s output: rows in stored order and their manifest statistics."""
        if self.pool is None:
            self.on_done(self._write(s, host, event, contexts_CT, stats))
            return
        while len(self.pending) >= self.workers:
            self.on_done(self.pending.popleft().result())
        self.pending.append(self.pool.submit(self._write, s, host, event, contexts_CT, stats))

    def close(self, wait: bool = True) -> None:
        """Finish (wait=True) or abandon the shards in flight; abandoned ones stay unpublished."""
        try:
            if wait:
                while self.pending:
                    self.on_done(self.pending.popleft().result())
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            self._restore()
            self._config.__exit__(None, None, None)


def _set_codec_threads(n: int) -> Callable[[], None]:
    """Give zarr's event loop a default executor of `n` threads (where its codecs encode objects the writer leaves to
    zarr); returns the undo."""
    zsync._get_executor()  # zarr's own executor exists (and is the loop's default) before we swap it
    loop = zsync._get_loop()
    ours = ThreadPoolExecutor(n, thread_name_prefix="saecache-codec")
    loop.set_default_executor(ours)

    def undo() -> None:
        loop.set_default_executor(zsync._get_executor())
        ours.shutdown(wait=False)
    return undo


@functools.cache
def keep_freed_heap() -> None:
    """Have glibc's malloc keep freed memory for reuse (blocks up to 64 MB from the heap, up to 256 MB of free heap
    kept) instead of mapping fresh pages for every codec buffer and returning them at once. Each inner chunk's encode
    allocates a few MB; with glibc's defaults those come as new mappings, and their page faults cost ~25 % of the
    codec's CPU (15k faults per 65,536-row shard, measured by bench_write: +25 % store rows/s). Process-wide, once;
    does nothing where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 64 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)


def default_encode_workers() -> int:
    """Encode threads when --encode-workers is not given: the host's cores less one for the forward, 1 to 16."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def run_harvest(cfg: HarvestConfig, progress: bool = True) -> dict:
    """`_run_harvest` under saecache's thread policy (`saecache/threads.py`)."""
    with stage_threads():
        return _run_harvest(cfg, progress)


def _run_harvest(cfg: HarvestConfig, progress: bool = True) -> dict:
    """Harvest this worker's shards of `cfg.out`; return a summary dict. Safe to rerun: finished shards are skipped."""
    worker, n_workers = cfg.worker_slot()
    t_start = time.time()
    loc = Location(cfg.out, cfg.storage_options, read_only=False)  # parses the URL early
    fresh = new_local_dir(loc)
    if fresh is None or not os.access(os.path.dirname(fresh[0]), os.W_OK):
        probe_store_dir(loc)  # an --out that is not a store or cannot be made is refused before the model loads
    model, tokenizer, info = load_model(cfg.model, cfg.revision, cfg.model_dtype, cfg.device, cfg.trust_remote_code)
    max_pos = info["model"].get("max_positions")
    if max_pos is not None and cfg.ctx_len > max_pos:
        raise ConfigError(f"--ctx-len {cfg.ctx_len} is above the model's maximum context of {max_pos} tokens; "
                          f"use --ctx-len {max_pos} or less")
    cfg.check_tokens()
    hooks = resolve_hooks(model, list(cfg.hooks))
    try:
        if fresh is not None:
            probe_store_dir(loc)  # creates --out: only once the model and the hooks are known to be good
        return _harvest(cfg, loc, model, tokenizer, info, hooks, worker, n_workers, t_start, progress)
    except Exception:
        # a failed harvest of a new store leaves nothing it created; published shards (a resumable store) and
        # other workers' stores are kept, and so is everything on a stop (Ctrl-C): a rerun resumes
        if fresh is not None and n_workers == 1:
            remove_unpublished(loc, fresh)
        raise


def new_local_dir(loc: Location) -> tuple[str, bool] | None:
    """What this harvest will create for a local --out, which a failed harvest may remove: (its topmost missing
    ancestor, False), or (the store dir, True) when that exists and is empty (then only its contents are ours);
    None for an existing store (a resume) or a remote one."""
    if not loc.local:
        return None
    if os.path.isdir(loc.root) and not os.listdir(loc.root):
        return loc.root, True
    top = topmost_missing(loc.root)
    return (top, False) if top else None


def remove_unpublished(loc: Location, fresh: tuple[str, bool]) -> None:
    """Remove what this harvest created (`new_local_dir`) unless the store holds a published shard by now, or
    another process works on it (a claim or a planner record left after this one released its own)."""
    def names(d: str) -> list[str]:
        return os.listdir(os.path.join(loc.root, d)) if os.path.isdir(os.path.join(loc.root, d)) else []

    if (any(n.startswith("shard-") for n in names(MANIFEST_DIR))
            or any(n.startswith("worker-") for n in names(CLAIMS_DIR)) or "planner.json" in names(PLAN_DIR)):
        return
    path, keep_dir = fresh
    doomed = [path] if not keep_dir else [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else []
    for p in doomed:
        remove_path(p)


def _harvest(cfg: HarvestConfig, loc: Location, model, tokenizer, info: dict, hooks: list, worker: int,
             n_workers: int, t_start: float, progress: bool) -> dict:
    spec = TextSpec(source=cfg.dataset, text_field=cfg.text_field, split=cfg.split, name=cfg.dataset_name)
    rpc = cfg.ctx_len - (0 if cfg.store_bos else 1)
    per_shard = (cfg.ctx_per_chunk or Geometry.default_ctx_per_chunk(rpc)) * cfg.chunks_per_shard
    plan = Plan(loc, plan_key(spec, info["tokenizer"], cfg.ctx_len, cfg.bos, math.ceil(cfg.tokens / rpc), per_shard),
                spec)
    planned = plan.ensure(spec, tokenizer, log=(lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None),
                          progress=progress)
    if planned["n_contexts"] < (need := min_store_contexts()):
        raise DataError(f"dataset {cfg.dataset} yields only {planned['n_contexts']} context(s) of {cfg.ctx_len} tokens "
                        f"and training needs {need} ({HELDOUT_RULE}); use more text or a smaller --ctx-len")
    header = build_header(cfg, info, hooks, planned["n_contexts"], planned["fingerprint"])
    writer = StoreWriter(cfg.out, header, cfg.storage_options)
    writer.claim_worker(worker, n_workers)
    geom = writer.geometry
    mine = [s for s in range(geom.n_shards) if s % n_workers == worker]
    todo = [s for s in mine if s not in writer.done_shards()]
    device = next(model.parameters()).device
    bar = tqdm(total=sum(geom.shard_row_range(s)[1] - geom.shard_row_range(s)[0] for s in todo), unit="tok",
               unit_scale=True, desc=f"harvest {worker}/{n_workers}", disable=not progress, smoothing=0.1)

    def done(s: int) -> None:
        bar.update(geom.shard_row_range(s)[1] - geom.shard_row_range(s)[0])

    workers = cfg.encode_workers if cfg.encode_workers is not None else default_encode_workers()
    t_loop = time.time()
    pipe = WritePipeline(writer, workers, done)
    ok = False
    try:
        try:
            with ActivationCapture(model, hooks) as capture:
                staging: dict[str, torch.Tensor] = {}
                for s in todo:
                    contexts_CT = plan.read(s)
                    host, event, stats = harvest_shard(capture, cfg, header, geom, s, contexts_CT, device, staging)
                    pipe.submit(s, host, event, contexts_CT, stats)
                    writer.heartbeat()
            ok = True
        finally:
            pipe.close(wait=ok)
            bar.close()
        loop_seconds = time.time() - t_loop
        complete = writer.finalize_if_complete()
    finally:
        writer.release()  # also when stopped: a rerun in this same process may take the slot at once
    return {"store": cfg.out, "shards_written": len(todo), "shards_of_this_worker": len(mine), "complete": complete,
            "seconds": time.time() - t_start, "loop_seconds": loop_seconds, "encode_workers": workers,
            "plan": {k: planned[k] for k in ("n_contexts", "documents", "tokens")},
            **store_size(cfg.out, cfg.storage_options)}
