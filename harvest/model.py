"""Load a Hugging Face causal LM and its tokenizer for harvesting, and describe them for the store header.

Thin on purpose: transformers does the loading (`AutoModelForCausalLM` / `AutoTokenizer`); this module only picks the
device, maps the dtype name, turns loading failures into one-line `ModelError`s, and computes the provenance dict the
store header records (`model_info`). `trust_remote_code` stays off unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from saecache.errors import ConfigError, ModelError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str = "auto") -> torch.device:
    """`"auto"` -> CUDA when available, else CPU; anything else is passed to `torch.device` (e.g. `"cuda:1"`)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available here: use --device auto or cpu")
    return dev


# config keys that say how/where the model was loaded, not what it is: left out of the hash
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "_commit_hash", "dtype", "torch_dtype", "transformers_version")


def config_hash(config: Any) -> str:
    """sha256 of the model config as sorted-key JSON (`PretrainedConfig.to_json_string`), without the keys that
    depend on how it was loaded (local path, load dtype, transformers version): same model -> same hash."""
    cfg = json.loads(config.to_json_string(use_diff=False))
    for key in _VOLATILE_CONFIG_KEYS:
        cfg.pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def max_positions(config: Any) -> int | None:
    """The model's maximum context length from its config, or None when the config does not say."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def local_dir(name: str | None, near: str | None = None) -> str | None:
    """The local directory a model or tokenizer name recorded in a store header refers to, or None (a Hub name, or
    gone). A header keeps the path as it was typed, relative to wherever the harvest ran: it is tried from here, then
    under the directory `near` (the store's own, when local) and each of its parents."""
    if not name:
        return None
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return os.path.abspath(path)
    d = os.path.abspath(near) if near and not os.path.isabs(path) else None
    while d:
        if os.path.isdir(os.path.join(d, path)):
            return os.path.join(d, path)
        d = os.path.dirname(d) if os.path.dirname(d) != d else None
    return None


def _looks_like_path(name: str) -> bool:
    """Hub names are `name` or `owner/name`; anything else (./x, /x, ~/x, a/b/c, a\\b) can only be a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _load_error(what: str, name: str, exc: Exception) -> ModelError:
    """One line, no traceback text: what was asked, why it failed, what to do."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(
        f"cannot load {what} {name!r}: not found as a local directory, and the Hugging Face Hub is unreachable or has "
        f"no such name/revision ({type(exc).__name__}: {first[:200]}); pass an existing local model directory, check "
        f"the name and --revision, or connect to the Hub once to fill the cache"
    )


def load_model(
    name_or_path: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> tuple[Any, Any, dict]:
    """Load `name_or_path` (Hub name or local directory) as a causal LM in eval mode on `device`, plus its tokenizer.

    Returns `(model, tokenizer, info)` with `info = {"model": {...}, "tokenizer": {...}}`, the provenance the store header
    records. `gguf_file` (optional) loads a GGUF checkpoint inside the directory (transformers needs `gguf` installed).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes"):
        hf_logging.disable_progress_bar()  # transformers reads the variable only at its import: honour it when set later
    if dtype not in DTYPES:
        raise ConfigError(f"unknown model dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    dev = pick_device(device)
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        name_or_path = expanded
    elif os.path.exists(expanded):
        raise ModelError(f"model path {name_or_path!r} is a file, not a model directory: pass the directory holding "
                         f"config.json and the weights")
    elif _looks_like_path(name_or_path):
        raise ModelError(f"model directory {name_or_path!r} does not exist: check the path")
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, revision=revision, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, EnvironmentError) as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"model {name_or_path!r} needs custom code from its repository: pass --trust-remote-code "
                             f"only if you trust it") from e
        raise _load_error("model", name_or_path, e) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, EnvironmentError) as e:
        raise _load_error("tokenizer", name_or_path, e) from e
    model.eval()
    model.to(dev)

    cfg = model.config
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    info = {
        "model": {
            "name": name_or_path,
            "revision": revision if revision is not None else getattr(cfg, "_commit_hash", None),
            "architecture": archs[0],
            "config_hash": config_hash(cfg),
            "dtype": dtype,
            "max_positions": max_positions(cfg),
        },
        "tokenizer": tokenizer_info(tokenizer, name_or_path),
    }
    return model, tokenizer, info


def tokenizer_info(tokenizer: Any, name: str) -> dict:
    """The tokenizer part of the store header: name, vocab size (with added tokens), BOS and EOS ids."""
    return {
        "name": name,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
