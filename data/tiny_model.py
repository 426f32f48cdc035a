"""A small GPT-NeoX model in Pythia's architecture, initialised and trained locally (no Hub access needed).

Same block as Pythia (rotary on 25 % of each head, parallel attention + MLP residual, untied unembedding), only
narrower and shallower. `train_model` is a plain next-token loop (AdamW, warmup + cosine) bounded by wall time; it
records the validation loss next to the unigram entropy of the validation tokens, the baseline any real language
model must beat, and reuses a finished run when the recipe hash matches.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerBase

from saecache.data.tokenizer import iter_texts
from saecache.errors import ConfigError, DataError, ModelError
from saecache.threads import stage_threads

RESULT_FILE = "training.json"
"""Written last by `train_model`: the recipe hash, losses and timings. Its presence marks a finished run."""
VAL_CONTEXTS = 96
"""Held-out contexts used for the validation loss (enough to resolve 0.05-nat gaps for % loss recovered)."""


def tiny_neox_config(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 2, intermediate: int = 512,
                     max_pos: int = 2048) -> GPTNeoXConfig:
    """Pythia's architecture at a small size; `bos`/`eos` are token 0 as in Pythia."""
    if hidden % heads:
        raise ConfigError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=max_pos,
                         rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0)


def _seeded_model(config: GPTNeoXConfig, seed: int) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config).eval()


def init_model(config: GPTNeoXConfig, seed: int, out_dir: Path, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Save a seeded random-init model (safetensors) and the tokenizer into `out_dir`; loadable with `Auto*`."""
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model vocab is {config.vocab_size}")
    out_dir = Path(out_dir)
    _seeded_model(config, seed).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def encode_file(tokenizer: PreTrainedTokenizerBase, path: Path, progress: bool = False) -> np.ndarray:
    """All documents of a Pile-format file as one int32 token stream, each document followed by EOS (as in Pythia).
    `progress`: a bar with its ETA on stderr."""
    texts = list(iter_texts([path]))
    if not texts:
        raise DataError(f"{path} holds no documents")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    with tqdm(total=len(texts), desc=f"tokenize {Path(path).name}", unit="doc", disable=not progress) as bar:
        for start in range(0, len(texts), 256):
            for doc in tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]:
                ids.extend(doc)
                ids.append(eos)
            bar.update(len(texts[start:start + 256]))
    return np.asarray(ids, dtype=np.int32)


def unigram_entropy(ids: np.ndarray) -> float:
    """Entropy (nats) of the empirical token distribution of `ids`: the best loss a context-free model could get."""
    counts = np.bincount(ids.ravel()).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_xent(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `val_ids` of the add-one smoothed unigram model of `train_ids`."""
    counts = np.bincount(train_ids.ravel(), minlength=vocab_size).astype(np.float64)
    return float(-np.log((counts[val_ids.ravel()] + 1) / (len(train_ids.ravel()) + vocab_size)).mean())


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warmup to `lr`, then cosine decay to 10 % of it at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


@torch.no_grad()
def eval_loss(model: GPTNeoXForCausalLM, ids_BT: torch.Tensor, batch: int = 32, progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over all positions of `ids_BT`; `progress`: a bar on stderr."""
    model.eval()
    total, n = 0.0, 0
    for i in tqdm(range(0, len(ids_BT), batch), desc="validation loss", unit="batch", disable=not progress):
        chunk = ids_BT[i:i + batch]
        total += model(input_ids=chunk, labels=chunk).loss.item() * chunk.numel()
        n += chunk.numel()
    return total / n


def _file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_model(out_dir: Path, tokenizer: PreTrainedTokenizerBase, train_file: Path, val_file: Path, seconds: float,
                ctx_len: int = 128, batch: int = 32, lr: float = 3e-3, seed: int = 0, progress: bool = False,
                steps: int | None = None, threads: int | None = None) -> dict:
    """Train the model in `out_dir` (made by `init_model`) from its seeded init for about `seconds` of wall time.

    The step budget is fixed after timing a few steps, so the warmup + cosine schedule ends when the time does.
    Saves the weights over `out_dir` and writes `training.json` (val loss, unigram entropy of the val tokens, steps,
    tokens, seconds). If `training.json` already records the same recipe hash the cached result is returned as is.
    With `steps` the budget is that many steps instead (deterministic; `seconds` is then ignored). `threads` sets
    torch's intra-op threads for the run only (unset: saecache's thread policy, `saecache/threads.py`).
    """
    if (steps is None and seconds <= 0) or (steps is not None and steps < 1):
        raise ConfigError(f"training budget must be positive: seconds={seconds}, steps={steps}")
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        raise ModelError(f"{out_dir} holds no model config; create it with init_model first")
    config = GPTNeoXConfig.from_pretrained(str(out_dir))
    recipe = {"config": {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"},
              "tokenizer_len": len(tokenizer), "train_sha256": _file_sha(train_file),
              "val_sha256": _file_sha(val_file), "seconds": None if steps else seconds, "steps": steps, "ctx_len": ctx_len, "batch": batch, "lr": lr,
              "seed": seed, "val_contexts": VAL_CONTEXTS}
    recipe_hash = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()
    result_path = out_dir / RESULT_FILE
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        if cached.get("recipe_hash") == recipe_hash:
            return cached
    result_path.unlink(missing_ok=True)  # weights are about to change: the old record no longer describes them

    # data: one token stream per split; val = the first VAL_CONTEXTS non-overlapping contexts
    train_ids = torch.from_numpy(encode_file(tokenizer, train_file, progress).astype(np.int64))
    val_stream = encode_file(tokenizer, val_file, progress)
    n_val = min(VAL_CONTEXTS, len(val_stream) // ctx_len)
    if n_val < 1 or len(train_ids) <= ctx_len:
        raise DataError(f"corpus too small for ctx_len {ctx_len}: {len(train_ids)} train / {len(val_stream)} val tokens")
    val_BT = torch.from_numpy(val_stream[: n_val * ctx_len].astype(np.int64)).view(n_val, ctx_len)
    if int(train_ids.max()) >= config.vocab_size:
        raise ConfigError(f"token id {int(train_ids.max())} exceeds the model vocab {config.vocab_size}")

    with stage_threads(threads):
        return _train(out_dir, config, recipe, recipe_hash, train_ids, val_BT, seconds, ctx_len, batch, lr, seed,
                      progress, steps)


def _train(out_dir, config, recipe, recipe_hash, train_ids, val_BT, seconds, ctx_len, batch, lr, seed, progress,
           steps) -> dict:
    result_path = out_dir / RESULT_FILE
    model = _seeded_model(config, seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0, step, total, warmup = time.perf_counter(), 0, steps, min(100, max(1, (steps or 1000) // 10))
    bar, history = None, []
    eval_steps = set(range(0, steps + 1, max(1, steps // 8))) if steps else set()
    next_eval = seconds / 8 if steps is None else float("inf")
    if steps and progress:
        bar = tqdm(total=total, desc="train tiny model", unit="step")
    while total is None or step < total:
        # batch: random windows of the train stream, a pure function of (seed, step)
        starts = torch.randint(0, len(train_ids) - ctx_len, (batch,), generator=gen)
        ids_BT = torch.stack([train_ids[s:s + ctx_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or 10**9, lr, warmup)
        loss = model(input_ids=ids_BT, labels=ids_BT).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step == 2:  # the first steps are slow (allocation, warm caches): time from here
            t_calib = time.perf_counter()
        if steps is None and step >= 12 and step % 10 == 2:  # (re)fix the step budget from the measured pace, so the schedule
            per_step = (time.perf_counter() - t_calib) / (step - 2)  # ends when the time does even under load
            left = seconds - (time.perf_counter() - t0)
            total = max(step + 1, step + int(left / per_step)) if total is None or left > 0 else step
            if warmup > total // 10 and step < 100:
                warmup = min(100, max(12, total // 10))
            if progress and bar is None:
                bar = tqdm(total=total, initial=step - 1, desc="train tiny model", unit="step")
            elif bar is not None:
                bar.total = total
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.perf_counter() - t0 > next_eval or step in eval_steps:  # a learning curve for the record
            history.append({"seconds": round(time.perf_counter() - t0, 1), "step": step,
                            "val_loss": round(eval_loss(model, val_BT), 4)})
            model.train()
            next_eval += seconds / 8
        if total is None and time.perf_counter() - t0 > seconds:
            break
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t0

    model.eval()
    val_loss = eval_loss(model, val_BT)
    model.save_pretrained(str(out_dir))
    result = {"recipe_hash": recipe_hash, "recipe": recipe, "steps": step, "tokens": step * batch * ctx_len,
              "train_seconds": round(train_seconds, 2), "final_train_loss": round(loss.item(), 4),
              "val_loss": round(val_loss, 4), "unigram_entropy": round(unigram_entropy(val_BT.numpy()), 4),
              "unigram_xent": round(unigram_xent(train_ids.numpy(), val_BT.numpy(), config.vocab_size), 4),
              "val_tokens": int(val_BT.numel()),
              "train_tokens_available": int(len(train_ids)), "history": history}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(result_path)
    return result
