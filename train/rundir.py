"""Run directories (layout in `RUNDIR.md`): `cfg.json`, `sae.safetensors`, `metrics.jsonl`, `checkpoints/`.

Everything is JSON or safetensors — never pickle. Checkpoints are written to a temporary directory and renamed into
place (atomic on POSIX), so a `kill -9` at any moment leaves either the previous or the new checkpoint, never half of
one. `load_run` is the entry point for evaluate and other consumers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saecache.errors import RunDirError
from saecache.harvest.store import redact_url, write_atomic  # noqa: F401 (redact_url: the one rule, for run dirs)
from saecache.harvest.paths import remove_path, topmost_missing
from saecache.train.crosslayer import CrossLayerConfig, config_from_dict, load_crosslayer
from saecache.train.sae import load_sae

FORMAT_VERSION = 1
CFG_FILE, WEIGHTS_FILE, METRICS_FILE, CKPT_DIR = "cfg.json", "sae.safetensors", "metrics.jsonl", "checkpoints"
_STEP_RE = re.compile(r"^step-(\d{9})$")


def write_json_atomic(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode(), fsync=True)


def read_cfg(run_dir: str) -> dict:
    path = os.path.join(run_dir, CFG_FILE)
    if not os.path.exists(path):
        raise RunDirError(f"{run_dir} is not a run dir: {CFG_FILE} is missing (train one with `saecache train`)")
    with open(path) as f:
        cfg = json.load(f)
    v = cfg.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise RunDirError(f"{path} has format version {v}, newer than this saecache reads ({FORMAT_VERSION}); "
                          "upgrade saecache")
    return cfg


def load_run(run_dir: str, device: str | torch.device = "cpu"):
    """Rebuild a trained SAE from its run dir: returns ``(sae, cfg)``; weights take raw (unnormalised) activations.
    A cross-layer run dir (cfg.json's "sae" has a `kind`) gives a `crosslayer.CrossLayer`."""
    cfg = read_cfg(run_dir)
    path = os.path.join(run_dir, WEIGHTS_FILE)
    if not os.path.exists(path):
        ckpts = list_checkpoints(run_dir)
        hint = f"; latest checkpoint: step {ckpts[-1]} (rerun the train command to finish)" if ckpts else ""
        raise RunDirError(f"{run_dir} has no {WEIGHTS_FILE}: training did not finish{hint}")
    mcfg = config_from_dict(cfg["sae"])
    load = load_crosslayer if isinstance(mcfg, CrossLayerConfig) else load_sae
    return load(mcfg, path, device), cfg


# -------------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(run_dir: str) -> list[int]:
    """Steps of the complete checkpoints in a run dir, ascending."""
    d = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(d):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(d) if (m := _STEP_RE.match(n)))


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CKPT_DIR, f"step-{step:09d}")


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in rest["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
    # safetensors stores contiguous tensors; give every moment its parameter's memory layout again (W_enc_DF is a
    # transposed view). The fused Adam kernel walks param and moments as flat memory, so a layout mismatch would
    # silently pair each weight with another element's moments and a resumed run would drift.
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(v)


def save_checkpoint(run_dir: str, step: int, model_tensors: dict[str, torch.Tensor],
                    extra_tensors: dict[str, torch.Tensor], state: dict, keep: int) -> str:
    """Write ``checkpoints/step-XXXXXXXXX/`` atomically (tmp dir + rename), then prune to the newest ``keep``."""
    final = checkpoint_path(run_dir, step)
    tmp = os.path.join(run_dir, CKPT_DIR, f".tmp-{step:09d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_tensors.items()},
              os.path.join(tmp, "model.safetensors"))
    save_file(extra_tensors, os.path.join(tmp, "state.safetensors"))
    write_json_atomic(os.path.join(tmp, "state.json"), state)
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(final):  # a rerun reached the same step again: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:  # rename first: a kill mid-delete leaves no half checkpoint
        doomed = os.path.join(run_dir, CKPT_DIR, f".tmp-del-{old:09d}-{os.getpid()}")
        os.rename(checkpoint_path(run_dir, old), doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def load_checkpoint(run_dir: str, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    p = checkpoint_path(run_dir, step)
    with open(os.path.join(p, "state.json")) as f:
        state = json.load(f)
    v = state.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise RunDirError(f"checkpoint {p} has format version {v}, newer than this saecache reads ({FORMAT_VERSION}); "
                          "upgrade saecache")
    return load_file(os.path.join(p, "model.safetensors")), load_file(os.path.join(p, "state.safetensors")), state


def clean_tmp(run_dir: str) -> None:
    """Remove half-written files left by a killed process: checkpoint directories and the temporaries of atomic
    writes (``cfg.json.tmp-<pid>``, ``metrics.jsonl.tmp-<pid>``, ``.tmp-sae.safetensors``)."""
    for d in (os.path.join(run_dir, CKPT_DIR), run_dir):
        if os.path.isdir(d):
            for n in os.listdir(d):
                if n.startswith(".tmp-") or ".tmp-" in n:
                    remove_path(os.path.join(d, n))


# ------------------------------------------------------------------------------------------ what a failure removes


def snapshot(out: str, run_dirs: list[str]) -> dict:
    """What exists before a train command writes anything: the topmost missing ancestor of `out` (None when `out`
    exists) and, per run dir, the names in it (None when it does not exist). `remove_new` takes it."""
    return {"top": topmost_missing(out),
            "runs": {d: (set(os.listdir(d)) if os.path.isdir(d) else None) for d in run_dirs}}


def remove_new(before: dict) -> None:
    """After a failed train command: remove what it created (`snapshot` taken before) in each run dir that holds
    no checkpoint (a run dir with one is resumable and stays as it is): a run dir it made goes whole; in one that
    existed, only the names it added. Then `out` itself (and the parents it made) when nothing is left in them."""
    for d, names in before["runs"].items():
        if not os.path.isdir(d) or list_checkpoints(d):
            continue
        for p in [d] if names is None else [os.path.join(d, n) for n in set(os.listdir(d)) - names]:
            remove_path(p)
    top = before["top"]
    if top and os.path.isdir(top) and not any(files for _, _, files in os.walk(top)):
        shutil.rmtree(top, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- metrics


def truncate_metrics(run_dir: str, step: int) -> None:
    """Drop metric records after ``step`` (written before a crash, replayed after resume) and any torn last line."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(keep).encode())


def append_metrics(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, METRICS_FILE), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def rng_to_tensor(state: torch.Tensor) -> torch.Tensor:
    """torch RNG states are uint8 tensors already; copy so safetensors owns contiguous memory."""
    return state.detach().cpu().clone().contiguous()
