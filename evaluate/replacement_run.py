"""`saecache replacement`: a PLT set's run dirs (one transcoder per layer) or one CLT's run dir evaluated as a
replacement model on a store's held-out contexts (`replacement.replacement_losses` in each input mode, and each layer
spliced alone), written as replacement.md and replacement.json.

BOS follows `saecache evaluate`'s rule (`runner.bos_rule`): when a run left the BOS rows out of training, the BOS
position keeps the model's own activation in every layer and its prediction is not counted, unless
`ReplacementConfig.splice_bos`; the report says which rule ran."""

from __future__ import annotations

import json
import os

import torch

from saecache.errors import RunDirError
from saecache.evaluate import runner as R
from saecache.evaluate.config import ReplacementConfig  # noqa: F401  (with the stage's other configs: light to import)
from saecache.evaluate.replacement import (CrossLayerReplacement, Replacement, TranscoderSet, read_run,
                                           replacement_losses)
from saecache.evaluate.report import BOS_RULES
from saecache.harvest.model import pick_device
from saecache.harvest.split import Split
from saecache.train.arch import architecture


def load_replacement(run_dirs: list[str], store, device) -> tuple[Replacement, tuple[int, int], list[Split]]:
    """The replacement of `run_dirs` (one CLT run dir, or a PLT set: one transcoder per layer) in model order, the
    contexts held out for every one of them, and their splits."""
    first = read_run(run_dirs[0], device)
    if hasattr(first[0].cfg, "kind"):
        return _load_clt(run_dirs, first, store)
    entries, splits = [], []
    c0, c1 = 0, store.geometry.n_contexts
    for run_dir in run_dirs:
        sae, rcfg = read_run(run_dir, device)
        if hasattr(sae.cfg, "kind"):
            raise RunDirError(f"run {run_dir} is a {sae.cfg.kind}: evaluate it alone, not within a transcoder set")
        h_in, h_out = R.run_hooks(rcfg)
        if h_in == h_out:
            raise RunDirError(f"run {run_dir} is an SAE of {h_in} (it reconstructs its own input); a replacement "
                              "model needs transcoders, e.g. trained with --hook mlp_in.i --hook-out mlp_out.i")
        (a, b), _, split = R.heldout_contexts_for(run_dir, rcfg, sae, store)
        c0, c1 = max(c0, a), min(c1, b)
        splits.append(split)
        entries.append((sae, h_in, h_out))
    if c0 >= c1:
        raise RunDirError("the runs share no held-out context of this store (they were trained on different splits)")
    outs = [e[2] for e in entries]
    dupes = sorted({h for h in outs if outs.count(h) > 1})
    if dupes:
        raise RunDirError(f"more than one run writes {', '.join(dupes)}: give one transcoder per layer")
    entries.sort(key=lambda e: int(R.layer_of(e[2])) if R.layer_of(e[2]).isdigit() else 0)
    rep = TranscoderSet([e[0] for e in entries], [R.hook_point(store, e[1]) for e in entries],
                        [R.hook_point(store, e[2]) for e in entries], [R.layer_of(e[2]) for e in entries])
    return rep, (c0, c1), splits


def _load_clt(run_dirs: list[str], loaded, store) -> tuple[Replacement, tuple[int, int], list[Split]]:
    clt, rcfg = loaded
    if len(run_dirs) != 1 or not architecture(clt.cfg.arch).transcoder:
        raise RunDirError(f"run {run_dirs[0]} is a {clt.cfg.kind}: a replacement model takes one cross-layer "
                          "transcoder alone (a crosscoder replaces no MLP)")
    for h, d in [(h, clt.cfg.d_in) for h in clt.cfg.hooks_in] + [(h, clt.cfg.d_out) for h in clt.cfg.hooks_out]:
        if h not in store.hooks or store.hooks[h]["d"] != d:
            raise RunDirError(f"run {run_dirs[0]} reads or writes {h!r} (width {d}) but store {store.url} has "
                              f"{'no such hook' if h not in store.hooks else 'width ' + str(store.hooks[h]['d'])}")
    split = Split.from_cfg(rcfg, store, run_dirs[0])
    rng = split.heldout_contexts(store)
    contexts = rng if rng is not None else (0, store.geometry.n_contexts)
    if contexts[0] >= contexts[1]:
        raise RunDirError(f"store {store.url} holds none of run {run_dirs[0]}'s held-out contexts")
    rep = CrossLayerReplacement(clt, [R.hook_point(store, h) for h in clt.cfg.hooks_in],
                                [R.hook_point(store, h) for h in clt.cfg.hooks_out],
                                [R.layer_of(h) for h in clt.cfg.hooks_out])
    return rep, contexts, [split]


def run_replacement(cfg: ReplacementConfig) -> dict:
    """Evaluate `cfg.run_dirs` as a replacement model; writes cfg.out/replacement.{md,json}; returns the report."""
    device = pick_device(cfg.device)
    store = R.open_store(cfg.store)
    rep, contexts, splits = load_replacement(cfg.run_dirs, store, device)
    # one rule for the whole replacement: the BOS position stays clean when any run never trained on it
    rules = [R.bos_rule(s, store, cfg) for s in splits]
    bos = "clean" if "clean" in rules else rules[0]
    model = R.load_store_model(store, cfg)
    ids = R.splice_contexts(store, contexts, cfg.n_contexts)
    means = {l: torch.as_tensor(store.stats(h.name)["mean"], dtype=torch.float32) for l, h in enumerate(rep.hooks_out)}
    first = R.splice_first_position(store, bos)
    every = list(range(len(rep)))
    res = replacement_losses(model, ids, rep, every, means, first, cfg.ctx_batch_size, cfg.modes)
    alone = [replacement_losses(model, ids, rep, [l], means, first, cfg.ctx_batch_size, ("clean",))["clean"]
             for l in every] if cfg.per_layer else []
    report = {"store": cfg.store, "contexts": list(contexts), "first_position": first, "bos": bos,
              "modes": {m: {**r.losses.as_dict(), "layers": r.layers} for m, r in res.items()},
              "layers": [{"layer": rep.layer_names[l], "hook_in": rep.hooks_in[l].name,
                          "hook_out": rep.hooks_out[l].name, "width": rep.widths[l],
                          **({"alone": alone[l].losses.as_dict()} if alone else {})} for l in every]}
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "replacement.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(cfg.out, "replacement.md"), "w") as f:
        f.write(markdown(report))
    return report


def markdown(report: dict) -> str:
    """The replacement-model table (one row per input mode) and the per-layer table."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["Every MLP output replaced at once. inputs: `clean` = each transcoder reads the clean model's activation "
             "(circuit tracing's local replacement); `replaced` = the replaced model's own, layer by layer. "
             f"BOS: {bos_clause(report)}", "",
             "| inputs | CE clean | CE replaced | CE all MLPs zero | CE all MLPs mean | % rec. (zero) | "
             "% rec. (mean) | KL |", "|---|---|---|---|---|---|---|---|"]
    for m, r in report["modes"].items():
        lines.append(f"| {m} | {r['ce_clean']:.4f} | {r['ce_spliced']:.4f} | {r['ce_zero']:.4f} | {r['ce_mean']:.4f} "
                     f"| {pct(r['recovered_zero'])} | {pct(r['recovered_mean'])} | {r['kl']:.4f} |")
    modes = list(report["modes"])
    head = "| layer | hooks | F | " + " | ".join(f"L0 ({m}) | FVE ({m}) | ‖y−ŷ‖/‖y‖ ({m})" for m in modes)
    alone = "alone" in report["layers"][0]
    lines += ["", head + (" | alone: % rec. (zero) | alone: KL |" if alone else " |"),
              "|---" * (3 + 3 * len(modes) + 2 * alone) + "|"]
    for l, layer in enumerate(report["layers"]):
        cells = [layer["layer"], f"{layer['hook_in']} → {layer['hook_out']}", str(layer["width"])]
        for m in modes:
            s = report["modes"][m]["layers"][l]
            cells += [f"{s['l0']:.1f}", f"{s['fve']:.3f}", f"{s['rel_error']:.3f}"]
        if alone:
            cells += [pct(layer["alone"]["recovered_zero"]), f"{layer['alone']['kl']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bos_clause(report: dict) -> str:
    """The report's BOS rule in words (`runner.bos_rule`)."""
    rule = report.get("bos")
    if rule == "not stored" or (rule is None and report["first_position"]):
        return (f"positions before {report['first_position']} (not in the store) are never replaced and their "
                "predictions not counted.")
    if rule == "clean":
        return ("the BOS position (position 0) keeps the model's own activation in every layer and variant and its "
                "prediction is not counted, as the runs never trained on BOS rows (--splice-bos replaces it too).")
    return BOS_RULES[rule or "replaced"] + "."
