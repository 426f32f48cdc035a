"""Export to circuit-tracer 0.5.0 (github.com/safety-research/circuit-tracer), the tool that builds attribution
graphs over a replacement model: a per-layer transcoder (PLT) set in its `transcoder_set` layout, a cross-layer
transcoder (CLT) in its `cross_layer_transcoder` layout (`export_clt`: W_enc_{i} / W_dec_{i} files, see `clt_files`).

The layout, as its code reads it (`transcoder/single_layer_transcoder.py` `load_relu_transcoder` /
`load_transcoder_set`, `utils/caching.py` `load_transcoders_from_cache`):

    OUT/config.yaml             model_kind: transcoder_set, model_name, feature_input_hook, feature_output_hook, scan
    OUT/layer_{i}.safetensors   W_enc [F, D], W_dec [F, D], b_enc [F], b_dec [D]  (+ activation_function.threshold [F])

one file per layer i = 0..n-1, every layer present (its `TranscoderSet` asserts it; its replacement model runs a
transcoder at every layer of the model). A layer encodes f = act(x @ W_encᵀ + b_enc), act = ReLU, or JumpReLU
x * (x > threshold) when the threshold key is there, and decodes f @ W_dec + b_dec. So a transcoder exports exactly
when its inference map has that form (`formats.transcoder_threshold_form`: relu, jumprelu, batchtopk's constant
threshold; the input centre folded into b_enc); TopK and gated ones are refused. Run dirs hold weights that act on
raw activations (the training normalisation is folded in when a run finishes), so the export does too.

Hooks: saecache's `mlp_in.i` -> `mlp_out.i` transcoders read the MLP's input after its layer norm, which
circuit-tracer names `mlp.hook_in` / `mlp.hook_out`; `resid_mid.i` -> `mlp_out.i` ones read the residual before it,
`hook_resid_mid` / `hook_mlp_out` (its nnsight backend maps both pairs for Llama, Gemma 2/3, Qwen3 and GPT-OSS).

Loading it (offline): `circuit_tracer.utils.caching.load_transcoders_from_cache(name, cache_dir=parent)` for
OUT = parent/name, or `ReplacementModel.from_pretrained(model_dir, "/absolute/path/OUT", backend="nnsight")`: a local
directory with a config.yaml counts as an already cached transcoder set, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import save_file

from saecache.errors import RunDirError
from saecache.evaluate.formats import from_sae, transcoder_threshold_form
from saecache.evaluate.replacement import read_run
from saecache.evaluate.runner import load_run_checked, run_hooks
from saecache.train.arch import architecture
from saecache.train.rundir import read_cfg

CT_VERSION = "0.5.0"
CONFIG_FILE = "config.yaml"
CT_HOOKS = {("mlp_in", "mlp_out"): ("mlp.hook_in", "mlp.hook_out"),
            ("resid_mid", "mlp_out"): ("hook_resid_mid", "hook_mlp_out")}
"""(our input hook kind, output hook kind) -> circuit-tracer's (feature_input_hook, feature_output_hook)."""


def _kind_layer(hook: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"([a-z_]+)\.(\d+)", hook)
    return (m.group(1), int(m.group(2))) if m else (hook, None)


def plt_tensors(sae) -> dict[str, torch.Tensor]:
    """One layer's file: our transcoder `sae` as circuit-tracer's `SingleLayerTranscoder` state (float32)."""
    t = transcoder_threshold_form(from_sae(sae), f"circuit-tracer {CT_VERSION}")
    out = {"W_enc": t["W_enc_DF"].t().contiguous(), "W_dec": t["W_dec_FD"], "b_enc": t["b_enc_F"],
           "b_dec": t["b_dec_D"]}
    if "threshold_F" in t:
        out["activation_function.threshold"] = t["threshold_F"]
    return out


def write_config(path: str, fields: dict) -> None:
    """config.yaml with one `key: value` line per field; values written as JSON scalars (valid YAML)."""
    with open(path, "w") as f:
        for k, v in fields.items():
            f.write(f"{k}: {json.dumps(v)}\n")


def _check_plt_set(loaded: list[tuple[str, object, dict]]) -> tuple[list, tuple[str, str]]:
    """[(run_dir, sae, cfg)] -> [(run_dir, sae)] in layer order and circuit-tracer's hook pair; else RunDirError."""
    by_layer, pairs = {}, set()
    for run_dir, sae, cfg in loaded:
        h_in, h_out = run_hooks(cfg)
        (k_in, l_in), (k_out, l_out) = _kind_layer(h_in), _kind_layer(h_out)
        if (k_in, k_out) not in CT_HOOKS or l_in != l_out:
            known = ", ".join(f"{a}.i -> {b}.i" for a, b in CT_HOOKS)
            raise RunDirError(f"run {run_dir} maps {h_in} -> {h_out}; circuit-tracer's transcoder sets read and "
                              f"write one layer's MLP: {known}")
        if l_out in by_layer:
            raise RunDirError(f"runs {by_layer[l_out][0]} and {run_dir} both write {h_out}: give one run per layer")
        by_layer[l_out] = (run_dir, sae)
        pairs.add((k_in, k_out))
    if len(pairs) > 1:
        raise RunDirError(f"the runs read different hooks ({', '.join(sorted(a for a, _ in pairs))}): "
                          "circuit-tracer's set has one input hook for every layer")
    missing = sorted(set(range(max(by_layer) + 1)) - set(by_layer))
    if missing:
        raise RunDirError(f"circuit-tracer needs a transcoder for every layer from 0 up; missing layer(s) "
                          f"{', '.join(map(str, missing))}")
    ordered = [by_layer[i] for i in range(len(by_layer))]
    widths = {s.cfg.width for _, s in ordered}
    if len(widths) > 1:
        raise RunDirError(f"the runs have different widths ({', '.join(map(str, sorted(widths)))}): circuit-tracer's "
                          "transcoder set needs one width for every layer")
    return ordered, CT_HOOKS[pairs.pop()]


def clt_files(clt) -> dict[str, dict[str, torch.Tensor]]:
    """A CLT (`train.crosslayer.CrossLayer`, kind clt) as circuit-tracer's files: W_enc_{i}.safetensors with W_enc_{i}
    [F, D_in], b_enc_{i}, b_dec_{i} (+ threshold_{i} [F]); W_dec_{i}.safetensors with W_dec_{i} [F, L-i, D_out]."""
    cfg, arch = clt.cfg, architecture(clt.cfg.arch)
    target = f"circuit-tracer {CT_VERSION}"
    if not arch.transcoder:
        raise RunDirError(f"cannot export a {cfg.kind} to {target}: it holds per-layer and cross-layer transcoders "
                          "only")
    if not arch.threshold_form:
        raise RunDirError(f"cannot export a TopK CLT to {target}: its CLTs encode with ReLU or JumpReLU only; train "
                          "clt-jumprelu or clt-batchtopk (its inference threshold is a JumpReLU)")
    c = lambda t: t.detach().to(torch.float32).contiguous().cpu()  # noqa: E731
    files = {}
    for i in range(cfg.n_layers):
        th = getattr(clt, f"threshold_{i}")
        if arch.threshold and float(th.min()) < 0:
            raise RunDirError(f"cannot export this batchtopk CLT to {target}: source {i} has no inference threshold "
                              "yet (train past the threshold start so encode does not depend on the batch)")
        # ours: relu(z) * (z > θ); circuit-tracer's JumpReLU: z * (z > θ) — the same for θ >= 0
        files[f"W_enc_{i}.safetensors"] = {f"W_enc_{i}": c(getattr(clt, f"W_enc_{i}")),
                                           f"b_enc_{i}": c(getattr(clt, f"b_enc_{i}")),
                                           f"b_dec_{i}": c(clt.b_dec_LD[i]), f"threshold_{i}": c(th.clamp_min(0))}
        files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": c(getattr(clt, f"W_dec_{i}").view(
            cfg.n_features, cfg.n_layers - i, cfg.d_out))}
    return files


def _hook_pair(hooks_in: list[str], hooks_out: list[str], what: str) -> tuple[str, str]:
    kinds = {(_kind_layer(a)[0], _kind_layer(b)[0]) for a, b in zip(hooks_in, hooks_out)}
    layers_ok = all(_kind_layer(a)[1] == _kind_layer(b)[1] == i for i, (a, b) in enumerate(zip(hooks_in, hooks_out)))
    if len(kinds) != 1 or next(iter(kinds)) not in CT_HOOKS or not layers_ok:
        known = ", ".join(f"{a}.i -> {b}.i" for a, b in CT_HOOKS)
        raise RunDirError(f"{what} maps {hooks_in[0]}.. -> {hooks_out[0]}..; circuit-tracer needs layer i's input and "
                          f"MLP output for every layer i = 0..n-1: {known}")
    return CT_HOOKS[kinds.pop()]


def export_clt(run_dir: str, out: str, model_name: str | None = None) -> str:
    """Write the CLT of `run_dir` into `out` in circuit-tracer's cross_layer_transcoder layout (`load_clt`), with a
    config.yaml naming its hooks; written into a temporary directory renamed into place."""
    clt, cfg = read_run(run_dir)
    files = clt_files(clt)  # refuses a crosscoder or a TopK CLT first
    hook_in, hook_out = _hook_pair(clt.cfg.hooks_in, clt.cfg.hooks_out, f"run {run_dir}")
    tmp = _fresh_out(out)
    try:
        for name, tensors in files.items():
            save_file(tensors, os.path.join(tmp, name))
        write_config(os.path.join(tmp, CONFIG_FILE),
                     {"model_kind": "cross_layer_transcoder",
                      "model_name": model_name or (cfg.get("model") or {}).get("name"),
                      "feature_input_hook": hook_in, "feature_output_hook": hook_out,
                      "scan": os.path.basename(os.path.normpath(out))})
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export(run_dirs: list[str], out: str) -> str:
    """`saecache export --to circuit-tracer`: one CLT run dir, or a PLT set (one transcoder run dir per layer)."""
    if len(run_dirs) == 1 and os.path.isdir(run_dirs[0]) and "kind" in (read_cfg(run_dirs[0]).get("sae") or {}):
        return export_clt(run_dirs[0], out)
    return export_transcoder_set(run_dirs, out)


def _fresh_out(out: str) -> str:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise RunDirError(f"{out} already exists and is not empty; choose another --out")
    tmp = f"{os.path.normpath(out)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _publish(tmp: str, out: str) -> None:
    if os.path.isdir(out):
        os.rmdir(out)  # empty, checked before writing
    os.replace(tmp, out)


def export_transcoder_set(run_dirs: list[str], out: str, model_name: str | None = None) -> str:
    """Write the PLT set of `run_dirs` (one transcoder per layer 0..n-1) into `out` in circuit-tracer's
    `transcoder_set` layout. `model_name` for config.yaml defaults to the model the runs' store was harvested from.
    Everything is written into a temporary directory renamed into place, so a refusal or failure leaves no `out`."""
    if not run_dirs:
        raise RunDirError("no run dir given: pass one transcoder run dir per layer")
    loaded = [(r, *load_run_checked(r)) for r in run_dirs]
    ordered, (hook_in, hook_out) = _check_plt_set(loaded)
    files = [plt_tensors(s) for _, s in ordered]  # refusals (TopK, no threshold) before anything is written
    name = model_name or (loaded[0][2].get("model") or {}).get("name")
    tmp = _fresh_out(out)
    try:
        for i, ((run_dir, _), tensors) in enumerate(zip(ordered, files)):
            save_file(tensors, os.path.join(tmp, f"layer_{i}.safetensors"),
                      metadata={"saecache_run": os.path.basename(os.path.normpath(run_dir))})
        write_config(os.path.join(tmp, CONFIG_FILE),
                     {"model_kind": "transcoder_set", "model_name": name, "feature_input_hook": hook_in,
                      "feature_output_hook": hook_out, "scan": os.path.basename(os.path.normpath(out))})
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
