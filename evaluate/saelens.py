"""SAELens save dirs (`cfg.json` + `sae_weights.safetensors`): export our dictionaries, read SAELens ones back.

The layout and the architecture mapping are described in `formats.py` (module docstring table); this file only
reads and writes it, through the library-neutral `DictWeights`.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from saecache.errors import RunDirError
from saecache.evaluate.formats import DictWeights, transcoder_threshold_form
from saecache.train.arch import ARCHITECTURES, from_saelens

SAELENS_THRESHOLD, SAELENS_TAKES_K = ("jumprelu",), ("topk",)
"""SAELens architectures whose weights hold a per-feature `threshold`, and those whose cfg holds `k`. Which SAELens
architecture each of ours is written as and read from is the architecture's `saelens_arch`."""
SAELENS_WEIGHTS_FILE, SAELENS_CFG_FILE = "sae_weights.safetensors", "cfg.json"
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens version whose on-disk layout `write_saelens` writes (SAELens >= 6 reads it as its own; older cfgs
without `metadata.sae_lens_version` go through its pre-6.0 converter instead)."""


def write_saelens(w: DictWeights, out: str, meta: dict | None = None) -> None:
    """Write `cfg.json` + `sae_weights.safetensors` as SAELens 6 `SAE.save_model` does: top-level architecture,
    d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations, reshape_activations (+ k and
    rescale_acts_by_decoder_norm for topk), provenance under `metadata` (`sae_lens_training_version` null: not
    trained by SAELens). A transcoder goes to SAELens' transcoder classes (`_write_transcoder`)."""
    if w.transcoder or w.d_in != w.d_out:
        return _write_transcoder(w, out, meta)
    a = w.arch
    if a.saelens_arch is None:
        raise RunDirError(f"architecture {w.arch.name!r} has no SAELens equivalent")
    c = lambda t: t.detach().to(torch.float32).contiguous().cpu()  # noqa: E731
    tensors = {a.saelens_key(name): c(t) for name, t in (("W_enc_DF", w.W_enc_DF), ("W_dec_FD", w.W_dec_FD),
                                                           ("b_dec_D", w.b_dec_D), ("b_enc_F", w.b_enc_F),
                                                           *((n, w.extras[n]) for n in a.extra_F))}
    if a.saelens_arch in SAELENS_THRESHOLD:  # a JumpReLU's own, or the batchtopk family's scalar on every feature
        tensors["threshold"] = c(a.threshold_F(w.threshold, w.width, "SAELens"))
    cfg = {"architecture": a.saelens_arch, "d_in": w.d_in, "d_sae": w.width, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": bool(w.pre_bias), "normalize_activations": "none", "reshape_activations": "none"}
    if a.saelens_arch in SAELENS_TAKES_K:
        cfg.update(k=int(w.k), rescale_acts_by_decoder_norm=False)
    _save(out, tensors, cfg, {**w.meta, **(meta or {})})


def _save(out: str, tensors: dict, cfg: dict, m: dict) -> None:
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
        "model_name": m.get("lm_name"), "hook_name": m.get("hook_name") or m.get("submodule_name"),
        "hook_head_index": None, "context_size": m.get("ctx_len"), "prepend_bos": m.get("prepend_bos", True),
        "dataset_path": m.get("dataset"), "model_from_pretrained_kwargs": {}, "neuronpedia_id": None,
    }
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, SAELENS_WEIGHTS_FILE))
    with open(os.path.join(out, SAELENS_CFG_FILE), "w") as f:
        json.dump(cfg, f, indent=1)


def _write_transcoder(w: DictWeights, out: str, meta: dict | None) -> None:
    """A transcoder as SAELens 6's `transcoder` (ReLU) or `jumprelu_transcoder` (JumpReLU; batchtopk's constant
    threshold): W_enc [D_in, F], b_enc [F], W_dec [F, D_out], b_dec [D_out] (+ threshold [F]), cfg `d_out`, no input
    centring (`apply_b_dec_to_input` false, which SAELens requires of transcoders: ours is folded into b_enc). Its
    input hook goes to metadata.hook_name; SAELens records no output hook, so `d_out` and our provenance say it.
    TopK and gated transcoders have no SAELens class and are refused."""
    t = transcoder_threshold_form(w, "SAELens")
    tensors = {"W_enc": t["W_enc_DF"], "b_enc": t["b_enc_F"], "W_dec": t["W_dec_FD"], "b_dec": t["b_dec_D"]}
    if "threshold_F" in t:
        tensors["threshold"] = t["threshold_F"]
    cfg = {"architecture": "jumprelu_transcoder" if "threshold" in tensors else "transcoder", "d_in": w.d_in,
           "d_sae": w.width, "d_out": w.d_out, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none"}
    _save(out, tensors, cfg, {**w.meta, **(meta or {})})


def read_saelens(src: str) -> DictWeights:
    """A SAELens save dir (`cfg.json` + `sae_weights.safetensors`, the inference architectures above) -> DictWeights.
    A SAELens jumprelu comes back as jumprelu (a batchtopk export is a jumprelu with a constant threshold)."""
    cfg_path, st_path = os.path.join(src, SAELENS_CFG_FILE), os.path.join(src, SAELENS_WEIGHTS_FILE)
    for p in (cfg_path, st_path):
        if not os.path.exists(p):
            raise RunDirError(f"{src}: {os.path.basename(p)} is missing (a SAELens dir has cfg.json and "
                              f"{SAELENS_WEIGHTS_FILE})")
    with open(cfg_path) as f:
        cfg = json.load(f)
    a = from_saelens(cfg.get("architecture", "standard"))
    if a is None:
        known = [b.saelens_arch for b in ARCHITECTURES.values() if from_saelens(b.saelens_arch) is b]
        raise RunDirError(f"{cfg_path}: SAELens architecture {cfg.get('architecture')!r} is not supported; "
                          f"supported: {', '.join(known)}")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise RunDirError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is not supported "
                          "(fold the scaling into the weights first)")
    t = {k: v.to(torch.float32) for k, v in load_file(st_path).items()}
    meta = cfg.get("metadata") or {}  # SAELens 6 keeps provenance here; pre-6.0 cfgs have it at the top level
    missing = sorted({a.saelens_key(n) for n in ("W_enc_DF", "W_dec_FD", "b_dec_D", "b_enc_F", *a.extra_F)}
                     - set(t))
    if missing:
        raise RunDirError(f"{st_path} lacks {', '.join(missing)} of a SAELens {cfg.get('architecture', 'standard')}")
    w = DictWeights(a, t["W_enc"], t["W_dec"], t["b_dec"], t[a.saelens_key("b_enc_F")],
                    pre_bias=bool(cfg.get("apply_b_dec_to_input", True)),
                    meta={"lm_name": cfg.get("model_name", meta.get("model_name")),
                          "hook_name": cfg.get("hook_name", meta.get("hook_name")),
                          "layer": cfg.get("hook_layer"),
                          "ctx_len": cfg.get("context_size", meta.get("context_size"))},
                    extras={n: t[a.saelens_key(n)] for n in a.extra_F})
    if a.needs_k:
        w.k = int(cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k"))
    if a.threshold_key is not None:
        w.threshold = t["threshold"]
    return w
