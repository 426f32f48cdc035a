"""The harvest run: text → packed contexts → model forward with hooks → whole shards → store.

Resume and scale-out come from the geometry: shard `s` is a pure function of (config, s), so a rerun skips the shards
already in the manifest, and `--worker i/N` takes the shards with `s % N == i`. Forward batches are aligned to shard
boundaries, so a shard's bytes do not depend on which process wrote it or when.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from saecache import __version__
from saecache.errors import ConfigError, DataError
from saecache.harvest import quant
from saecache.harvest.config import HarvestConfig
from saecache.harvest.store import FORMAT_VERSION, Geometry, _Location
from saecache.harvest.writer import StoreWriter


def bos_policy(cfg: HarvestConfig) -> str:
    p = ("documents tokenized without special tokens, each followed by EOS, packed into one stream; "
         + ("each context is BOS + the next ctx_len-1 stream tokens" if cfg.bos else "each context is ctx_len stream tokens"))
    return p + ("; position 0 (BOS) is not stored" if cfg.exclude_bos else "; every position is stored")


def build_header(cfg: HarvestConfig, info: dict, hooks: list, n_contexts: int, dataset_fp: str) -> dict:
    first = 1 if cfg.exclude_bos else 0
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


def to_storage(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, torch.Tensor]:
    """[rows, D] float tensor on the model's device → (host numpy rows in the storage format, error sums on the
    device: Σ‖x - x̂‖², Σ‖x‖², non-finite stored values). Encoding (quantization) runs on the device, before the copy
    to host; formats in `quant.py`."""
    stored = quant.encode(x, dtype)
    return quant.to_numpy(stored, dtype), quant.error_sums(x, stored, dtype)


def harvest_shard(capture, cfg: HarvestConfig, header: dict, geom: Geometry, s: int, contexts_CT: np.ndarray,
                  device: torch.device) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]]]:
    """Forward the shard's contexts in fixed batches; return unpermuted rows per hook in the storage format and
    per hook (Σ‖x - x̂‖², Σ‖x‖²), the storage error against the exact activations."""
    p0 = geom.first_position
    parts: dict[str, list[np.ndarray]] = {h: [] for h in header["hooks"]}
    sums: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for b0 in range(0, len(contexts_CT), cfg.batch_size):
            ids_BT = torch.from_numpy(contexts_CT[b0:b0 + cfg.batch_size].astype(np.int64)).to(device)
            out = capture(ids_BT)
            for name, acts_BTD in out.items():
                key = name.replace("/", "_")
                rows, err = to_storage(acts_BTD[:, p0:].reshape(-1, acts_BTD.shape[-1]), cfg.dtype)
                parts[key].append(rows)
                sums[key] = err if key not in sums else sums[key] + err
    acts = {h: np.concatenate(v) for h, v in parts.items()}
    err = {h: sums[h].tolist() for h in acts}
    if cfg.nonfinite == "error":
        for h, a in acts.items():
            bad = int(err[h][2])
            if bad:
                c0, c1 = geom.shard_contexts(s)
                raise DataError(f"hook {h} produced {bad} NaN/Inf values in shard {s} (contexts {c0}..{c1 - 1}) in "
                                f"{cfg.dtype}; nothing of that shard was published. Store float32/bfloat16 (--dtype) "
                                "if fp16 overflows, or pass --nonfinite count to store and count them")
    return acts, {h: (e[0], e[1]) for h, e in err.items()}


def run_harvest(cfg: HarvestConfig, progress: bool = True) -> dict:
    """Harvest this worker's shards of `cfg.out`; return a summary dict. Safe to rerun: finished shards are skipped."""
    from saecache.harvest.hooks import ActivationCapture, resolve_hooks
    from saecache.harvest.model import load_model
    from saecache.harvest.text import TextSpec, fingerprint, iter_documents, pack_contexts

    worker, n_workers = cfg.worker_slot()
    t_start = time.time()
    _Location(cfg.out, cfg.storage_options, read_only=False)  # parses the URL early
    model, tokenizer, info = load_model(cfg.model, cfg.revision, cfg.model_dtype, cfg.device, cfg.trust_remote_code)
    max_pos = info["model"].get("max_positions")
    if max_pos is not None and cfg.ctx_len > max_pos:
        raise ConfigError(f"--ctx-len {cfg.ctx_len} is above the model's maximum context of {max_pos} tokens; "
                          f"use --ctx-len {max_pos} or less")
    hooks = resolve_hooks(model, list(cfg.hooks))
    spec = TextSpec(source=cfg.dataset, text_field=cfg.text_field, split=cfg.split, name=cfg.dataset_name)
    rpc = cfg.ctx_len - (1 if cfg.exclude_bos else 0)
    want_ctx = math.ceil(cfg.tokens / rpc)
    contexts = pack_contexts(iter_documents(spec), tokenizer, cfg.ctx_len, bos=cfg.bos, max_contexts=want_ctx)
    if len(contexts) == 0:
        raise DataError(f"dataset {cfg.dataset} yields no complete context of {cfg.ctx_len} tokens; "
                        "use more text or a smaller --ctx-len")
    header = build_header(cfg, info, hooks, len(contexts), fingerprint(spec))
    writer = StoreWriter(cfg.out, header, cfg.storage_options)
    writer.claim_worker(worker, n_workers)
    geom = writer.geometry
    mine = [s for s in range(geom.n_shards) if s % n_workers == worker]
    todo = [s for s in mine if s not in writer.done_shards()]
    device = next(model.parameters()).device
    bar = tqdm(total=sum(geom.shard_row_range(s)[1] - geom.shard_row_range(s)[0] for s in todo), unit="tok",
               unit_scale=True, desc=f"harvest {worker}/{n_workers}", disable=not progress, smoothing=0.1)
    t_loop = time.time()
    try:
        with ActivationCapture(model, hooks) as capture:
            for s in todo:
                c0, c1 = geom.shard_contexts(s)
                acts, quant_err = harvest_shard(capture, cfg, header, geom, s, contexts[c0:c1], device)
                writer.write_shard(s, acts, contexts[c0:c1], quant_err)
                writer.heartbeat()
                bar.update(geom.shard_row_range(s)[1] - geom.shard_row_range(s)[0])
    finally:
        bar.close()
    loop_seconds = time.time() - t_loop
    complete = writer.finalize_if_complete()
    writer.release()
    from saecache.harvest.inspect import store_size

    return {"store": cfg.out, "shards_written": len(todo), "shards_of_this_worker": len(mine), "complete": complete,
            "seconds": time.time() - t_start, "loop_seconds": loop_seconds, **store_size(cfg.out, cfg.storage_options)}
