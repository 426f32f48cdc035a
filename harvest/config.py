"""HarvestConfig: everything one `saecache harvest` run needs. The click command only builds it; the store header
records it (minus the worker fields, which do not change the store's content)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from saecache.errors import ConfigError

WORKER_FIELDS = ("worker",)
RUN_FIELDS = ("encode_workers",)  # how this process runs, not what the store holds: not recorded in the header
NONFINITE_POLICIES = ("error", "count")
RECORDED_AS = {"store_bos": ("exclude_bos", lambda v: not v)}
"""Fields the store header records under an older name (and value): renaming them must not change a store's bytes."""
_KEY_FLAGS = {  # a store header's (or harvest plan's) key -> the harvest flag that sets it
    "n_contexts_wanted": "--tokens", "n_contexts": "--tokens", "n_rows": "--tokens", "n_shards": "--tokens",
    "ctx_len": "--ctx-len", "bos": "--bos", "bos_policy": "--bos/--store-bos", "seed": "--seed",
    "nonfinite_policy": "--nonfinite", "ctx_per_shard": "--ctx-per-chunk/--chunks-per-shard",
    "storage.dtype": "--dtype", "storage.codec": "--codec", "storage.rows_per_context": "--store-bos",
    "storage.first_position": "--store-bos", "storage.ctx_per_chunk": "--ctx-per-chunk",
    "storage.chunk_rows": "--ctx-per-chunk", "storage.chunks_per_shard": "--chunks-per-shard",
    "storage.shard_rows": "--chunks-per-shard", "model.revision": "--revision", "model.dtype": "--model-dtype",
    "model.config_hash": "--model (its config)", "model.architecture": "--model (its architecture)",
    "dataset.name": "--dataset-name", "dataset.split": "--split", "dataset.text_field": "--text-field",
    "dataset.fingerprint": "--dataset (its text)", "dataset files": "--dataset (its files)"}
_PREFIX_FLAGS = {"hooks.": "--hooks", "model.": "--model", "tokenizer.": "--model (its tokenizer)",
                 "dataset.": "--dataset"}


def differing_flags(keys: list[str]) -> list[str]:
    """The harvest flags behind the store header's or plan's keys that differ from a rerun's (e.g. `config.tokens`
    or `n_contexts_wanted` -> `--tokens`), once each, in order; a key no flag sets is kept as it is."""
    recorded = {key: name for name, (key, _) in RECORDED_AS.items()}
    out: list[str] = []
    for k in keys:
        if k in _KEY_FLAGS:
            f = _KEY_FLAGS[k]
        elif k.startswith("config."):
            f = "--" + recorded.get(k.split(".")[1], k.split(".")[1]).replace("_", "-")
        else:
            f = next((v for p, v in _PREFIX_FLAGS.items() if k.startswith(p)), k)
        if f not in out:
            out.append(f)
    return out


TRAIN_HELDOUT_DEFAULT = 0.01  # `saecache train --heldout-fraction`'s default (TrainConfig.heldout_fraction; tested)
HELDOUT_RULE = ("training holds out the last ceil(--heldout-fraction x contexts) contexts of a store, "
                f"--heldout-fraction {TRAIN_HELDOUT_DEFAULT:g} by default, and needs at least one more to train on")


def min_store_contexts(heldout_fraction: float = TRAIN_HELDOUT_DEFAULT) -> int:
    """The fewest contexts a store needs so that training keeps at least one after holding out the last
    ``ceil(heldout_fraction * n)`` (harvest/split.py's rule): 2 at the default fraction."""
    n = 1
    while n - math.ceil(heldout_fraction * n) < 1:
        n += 1
    return n


@dataclass(frozen=True)
class HarvestConfig:
    out: str
    """Store location: a local directory or an fsspec URL (s3://bucket/path, gs://…)."""
    model: str = "EleutherAI/pythia-70m-deduped"
    """Hugging Face causal LM name or local directory."""
    revision: str | None = None
    """Model revision (branch, tag or commit) on the Hub."""
    model_dtype: str = "float32"
    """dtype the model runs in: float32, float16 or bfloat16."""
    device: str = "auto"
    """Device the model runs on: auto (CUDA when available), cpu, cuda, cuda:1, …"""
    trust_remote_code: bool = False
    """Allow model code from the Hub (off unless asked)."""
    hooks: tuple[str, ...] = ("mlp_out.3",)
    """Hook points: aliases (mlp_out.i, mlp_in.i, attn_out.i, resid_post.i, embed) or module.path:output|input."""
    dataset: str = "monology/pile-uncopyrighted"
    """Text: .jsonl/.jsonl.zst/.txt files or globs (comma-separated), a local HF dataset dir, or a Hub dataset name."""
    dataset_name: str | None = None
    """Hub dataset config name, if any."""
    split: str = "train"
    """Dataset split."""
    text_field: str = "text"
    """Field holding the document text."""
    ctx_len: int = 128
    """Tokens per context (the seed used 128)."""
    bos: bool = True
    """Start every context with the BOS token (documents are packed, separated by EOS)."""
    store_bos: bool = True
    """Store position 0 (the BOS row) of every context; --no-store-bos leaves it out of the store. The store header
    records this field under its old name, `exclude_bos` (negated), so stores stay byte-identical."""
    tokens: int = 1_000_000
    """Budget of stored rows (token positions); rounded up to whole contexts."""
    batch_size: int = 32
    """Contexts per forward pass."""
    dtype: str = "float16"
    """Storage format: float16, bfloat16, float32, int8 or nf4. bfloat16 is stored as uint16 bits; int8 (≈1 byte
    per value, a float32 scale per row) and nf4 (≈0.5 byte per value) are compact quantized formats. Costs:
    docs/store.md, "Store formats"."""
    codec: str = "blosc-zstd"
    """Compressor inside the sharding codec: blosc-zstd, blosc-lz4, zstd or none."""
    ctx_per_chunk: int | None = None
    """Contexts per inner chunk (the unit of random reads); unset: about 4096 rows."""
    chunks_per_shard: int = 16
    """Inner chunks per shard (the unit of writing and resume); the default makes about 65536 rows."""
    seed: int = 0
    """Seed of the within-shard row permutation."""
    nonfinite: str = "error"
    """NaN/Inf activations: 'error' refuses the shard (nothing published), 'count' stores them and counts them."""
    encode_workers: int | None = None
    """Threads that encode and write finished shards while the next shard is forwarded; unset: the host's cores
    less one, 1 to 16. 0 = write each shard before the next forward. At most this many shards wait, so host
    memory holds at most encode_workers + 1 shards, the device one more. Each thread encodes a large object a few
    inner chunks ahead on a helper thread, so its checksum and file write overlap the codec. Does not change the
    store's bytes."""
    worker: str | None = None
    """This process's share of a harvest run by several processes, 'i/N': the shards s with s % N == i. Unset:
    from the launcher's environment, else 0/1; the environment read is RANK/WORLD_SIZE (torchrun) or
    SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for remote stores (endpoint_url, anon, …). Never written to the store."""

    def __post_init__(self) -> None:
        from saecache.harvest.store import CODECS, DTYPES  # not at import: `saecache harvest --help` loads no zarr

        if self.ctx_len < 2:
            raise ConfigError(f"--ctx-len must be at least 2, got {self.ctx_len}")
        if self.tokens < 1:
            raise ConfigError(f"--tokens must be positive, got {self.tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown storage dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.model_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"unknown model dtype {self.model_dtype!r}; choose float32, float16 or bfloat16")
        if self.codec not in CODECS:
            raise ConfigError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"unknown --nonfinite policy {self.nonfinite!r}; choose error or count")
        if not self.hooks:
            raise ConfigError("no hooks given; pass --hooks, e.g. --hooks mlp_out.3")
        if not self.store_bos and not self.bos:
            raise ConfigError("--no-store-bos needs --bos (position 0 is only a BOS position when contexts start with "
                              "BOS)")
        if self.ctx_per_chunk is not None and self.ctx_per_chunk < 1:
            raise ConfigError("--ctx-per-chunk must be positive")
        if self.chunks_per_shard < 1:
            raise ConfigError("--chunks-per-shard must be positive")
        if self.encode_workers is not None and self.encode_workers < 0:
            raise ConfigError(f"--encode-workers must be 0 or more, got {self.encode_workers}")
        self.worker_slot()  # validates

    def check_tokens(self) -> None:
        """Refuse (ConfigError) a --tokens that harvests too few contexts to train from (`min_store_contexts`).
        `run_harvest` asks after the model's own limits, before anything is written."""
        rpc = self.ctx_len - (0 if self.store_bos else 1)  # stored rows per context
        if math.ceil(self.tokens / rpc) < (need := min_store_contexts()):
            per = f"{rpc} rows per context with --ctx-len {self.ctx_len}" + ("" if self.store_bos else
                                                                             " and --no-store-bos")
            raise ConfigError(f"--tokens {self.tokens} gives {math.ceil(self.tokens / rpc)} context ({per}), but "
                              f"{HELDOUT_RULE}: use --tokens {need * rpc} or more, or a shorter --ctx-len")

    def worker_slot(self) -> tuple[int, int]:
        """(i, N) from --worker, else from the launcher's environment, else (0, 1)."""
        spec = self.worker
        if spec is None:
            env = os.environ
            if "RANK" in env and "WORLD_SIZE" in env:
                spec = f"{env['RANK']}/{env['WORLD_SIZE']}"
            elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
                first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
                spec = f"{int(env['SLURM_ARRAY_TASK_ID']) - first}/{env['SLURM_ARRAY_TASK_COUNT']}"
            else:
                return 0, 1
        try:
            i, n = (int(p) for p in spec.split("/"))
        except ValueError:
            raise ConfigError(f"--worker must look like i/N (e.g. 0/4), got {spec!r}") from None
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"--worker {spec}: need 0 <= i < N")
        return i, n

    def as_recorded(self) -> dict:
        """The config as written into the store header: no worker fields, no storage options (may hold secrets)."""
        d = asdict(self)
        for name, (key, convert) in RECORDED_AS.items():  # in the field's place: the header's bytes do not change
            d = {(key if k == name else k): (convert(v) if k == name else v) for k, v in d.items()}
        for k in (*WORKER_FIELDS, *RUN_FIELDS, "storage_options", "out", "device"):
            d.pop(k)
        d["hooks"] = list(d["hooks"])
        return d


@dataclass(frozen=True)
class CopyConfig:
    """One `saecache copy` run."""

    src: str
    """Store to copy: a local directory or an fsspec URL (s3://bucket/path, gs://…, hf://…)."""
    dst: str
    """Destination: a new location, or an earlier (interrupted) copy of the same store to resume."""
    hooks: tuple[str, ...] | None = None
    """Copy only these hooks (a derived store); unset: every hook, keeping the fingerprint."""
    src_options: dict = field(default_factory=dict)
    """fsspec options of the source (endpoint_url, anon, profile, …). Never written anywhere."""
    dst_options: dict = field(default_factory=dict)
    """fsspec options of the destination. Never written anywhere."""
    threads: int = 4
    """Shards copied concurrently (transfers are I/O bound)."""

    def __post_init__(self):
        if self.threads < 1:
            raise ConfigError(f"--threads must be positive, got {self.threads}")
        if self.hooks is not None and not self.hooks:
            raise ConfigError("--hooks is empty; name at least one hook or leave it out to copy all")
