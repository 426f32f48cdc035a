"""`saecache demo --recipe circuits`: the demo's model, a store of every layer's transcoder input and output, a
per-layer transcoder (PLT) set and a cross-layer transcoder (CLT) trained together from one read of it, and both
evaluated as a replacement model (every MLP output replaced at once, `evaluate/replacement.py`).

The two are matched as circuit tracing compares them: the same total latents (the PLT set has `width` features per
layer, one transcoder `resid_mid.i -> mlp_out.i` each; the CLT has `width` features per source layer) and the same
L0 (TopK with k active per layer on both). Everything is cached in `DemoConfig.out` as the demo is: the model and
corpus are the demo's own (`data/demo.py`), the store `circuits.zarr` resumes, finished runs are kept.

On the smollm2 flavour the recipe covers SmolLM2's first `SMOLLM2_LAYERS` blocks (all 30 at d=576 would make a store
of ~9 GB in fp16 at the flavour's 150k tokens); the blocks after them keep their MLPs. No attribution graph is drawn
here, because it is not cheap: circuit-tracer's transcoders encode with ReLU/JumpReLU, so the TopK dictionaries of
this recipe do not export (train `batchtopk` / `clt-batchtopk` instead: their inference threshold exports exactly); a
set should cover every one of the model's 30 layers (uncovered MLPs enter the graph whole, as error nodes); and
circuit-tracer 0.5.0 needs its own virtualenv (it pins transformers <= 4.57.3). The steps: `saecache export RUN_DIR...
--to circuit-tracer --out DIR`, then `ReplacementModel.from_pretrained` and `attribute` in that virtualenv
(docs/circuits.md; tests/ct_roundtrip.py does it for SmolLM2).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from saecache.data.demo import build_model, heldout_fraction, prepare_smollm2, step
from saecache.data.demo_config import DemoConfig
from saecache.errors import ConfigError
from saecache.evaluate.config import ReplacementConfig
from saecache.evaluate.replacement_run import run_replacement
from saecache.harvest.config import HarvestConfig
from saecache.harvest.run import run_harvest
from saecache.train.config import TrainConfig
from saecache.train.trainer import run_training

SMOLLM2_LAYERS = 6
"""Blocks of SmolLM2-135M-Instruct the recipe replaces (its first ones)."""
STORE = "circuits.zarr"
RUNS = "circuits-runs"
EVAL = "circuits-eval"


def n_layers(cfg: DemoConfig, model_dir: Path) -> int:
    """Layers replaced: every block of the tiny model, SmolLM2's first `SMOLLM2_LAYERS`."""
    blocks = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
    return min(blocks, SMOLLM2_LAYERS) if cfg.model == "smollm2" else blocks


def circuit_hooks(layers: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs): `resid_mid.i` and `mlp_out.i` of layers 0..layers-1."""
    return [f"resid_mid.{i}" for i in range(layers)], [f"mlp_out.{i}" for i in range(layers)]


def plt_name(width: int, k: int, layer: int) -> str:
    return f"plt-{width}-k{k}-L{layer}"


def clt_name(width: int, k: int) -> str:
    return f"clt-{width}-k{k}"


def circuit_sweep(layers: int, width: int, plt_ks: tuple[int, ...], clt_ks: tuple[int, ...]) -> list[dict]:
    """A PLT set per k of `plt_ks` (one TopK transcoder per layer) and a TopK CLT per k of `clt_ks`, all with `width`
    features per layer, as one sweep (they train from one read of the store)."""
    ins, outs = circuit_hooks(layers)
    saes = [{"arch": "topk", "hook_in": ins[i], "hook_out": outs[i], "width": width, "k": k,
             "name": plt_name(width, k, i)} for k in plt_ks for i in range(layers)]
    saes += [{"arch": "clt", "hooks_in": ins, "hooks_out": outs, "width": width, "k": k, "name": clt_name(width, k)}
             for k in clt_ks]
    return saes


def harvest_circuits(cfg: DemoConfig, model_dir: Path, corpus: str, layers: int, dtype: str = "float16",
                     out: str | None = None) -> tuple[str, dict]:
    """(store path, harvest summary) of `resid_mid.i` and `mlp_out.i` for every replaced layer."""
    ins, outs = circuit_hooks(layers)
    store = out or str(Path(cfg.out) / STORE)
    hcfg = HarvestConfig(out=store, model=str(model_dir), dataset=corpus, hooks=tuple(ins + outs),
                         ctx_len=cfg.ctx_len, tokens=cfg.harvest_tokens, device=cfg.device, seed=cfg.seed,
                         dtype=dtype,
                         ctx_per_chunk=max(1, min(4096 // cfg.ctx_len, cfg.harvest_tokens // cfg.ctx_len // 64)))
    return store, run_harvest(hcfg, progress=cfg.progress)


def train_circuits(cfg: DemoConfig, store: str, saes: list[dict], seeds: int = 1, runs: str | None = None) -> dict:
    """Train `saes` from one read of `store`; {run name: run dir}."""
    steps = -(-cfg.train_tokens // cfg.batch_size)
    tcfg = TrainConfig(stores=[store], out=runs or str(Path(cfg.out) / RUNS), saes=saes, seed=cfg.seed, seeds=seeds,
                       batch_size=cfg.batch_size, tokens=cfg.train_tokens, lr=cfg.lr,
                       warmup_steps=max(1, min(200, steps // 10)), heldout_fraction=heldout_fraction(cfg),
                       checkpoint_every=max(1, steps // 4), device=cfg.device, progress=cfg.progress, log_every=20)
    return {Path(d).name: d for d in run_training(tcfg)}


def replacement(cfg: DemoConfig, model_dir: Path, store: str, run_dirs: list[str], out: str,
                per_layer: bool = True) -> dict:
    """The replacement-model report (both input modes, and each layer alone when `per_layer`) of a PLT set or a
    CLT."""
    return run_replacement(ReplacementConfig(run_dirs=run_dirs, store=store, out=out, inputs="both",
                                             n_contexts=cfg.eval_contexts, model=str(model_dir), device=cfg.device,
                                             per_layer=per_layer))


def prepare(cfg: DemoConfig) -> tuple[Path, dict, int]:
    """(model dir, model info, layers replaced): the demo's cached corpus and model (built on the first run)."""
    root = Path(cfg.out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the demo directory {cfg.out}: {e.strerror}; pass a writable --out") from e
    model_dir, info = (prepare_smollm2 if cfg.model == "smollm2" else build_model)(cfg, root, time.time())
    return model_dir, info, n_layers(cfg, model_dir)


def run_circuits(cfg: DemoConfig) -> dict:
    """The recipe: harvest, train a PLT set and a CLT (width `cfg.widths[0]` per layer, TopK `cfg.k` per layer),
    evaluate both as replacement models; returns the summary (also `<out>/circuits_summary.json`)."""
    t0 = time.time()
    model_dir, info, layers = prepare(cfg)
    width, k = cfg.widths[0], cfg.k
    step(f"harvesting resid_mid and mlp_out of {layers} layers over {cfg.harvest_tokens:,} tokens", t0)
    store, harvest = harvest_circuits(cfg, model_dir, info["corpus_train"], layers)
    step(f"training a PLT set ({layers} TopK transcoders, {width} features, k={k}) and a CLT ({width} features "
          f"per layer, k={k} per layer) from one read of the store", t0)
    runs = train_circuits(cfg, store, circuit_sweep(layers, width, (k,), (k,)))
    step(f"evaluating both as replacement models on {cfg.eval_contexts} held-out contexts", t0)
    root = Path(cfg.out) / EVAL
    reports = {"PLT set": replacement(cfg, model_dir, store, [runs[plt_name(width, k, i)] for i in range(layers)],
                                      str(root / "plt")),
               "CLT": replacement(cfg, model_dir, store, [runs[clt_name(width, k)]], str(root / "clt"))}
    summary = {"config": {"model": cfg.model, "layers": layers, "width_per_layer": width, "k_per_layer": k,
                          "harvest_tokens": cfg.harvest_tokens, "train_tokens": cfg.train_tokens},
               "store": store, "harvest": harvest, "runs": runs, "reports": reports,
               "seconds": round(time.time() - t0, 1)}
    (Path(cfg.out) / "circuits_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def circuits_table(reports: dict[str, dict]) -> str:
    """Markdown: one line per (dictionary, input mode) with CE, % loss recovered and KL, then one line per layer with
    each dictionary's L0, FVE and error norm in both modes."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["| dictionary | inputs | CE clean | CE replaced | % rec. (zero) | % rec. (mean) | KL |",
             "|---|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        for mode, r in rep["modes"].items():
            lines.append(f"| {name} | {mode} | {r['ce_clean']:.4f} | {r['ce_spliced']:.4f} | "
                         f"{pct(r['recovered_zero'])} | {pct(r['recovered_mean'])} | {r['kl']:.4f} |")
    names = list(reports)
    modes = list(next(iter(reports.values()))["modes"])
    lines += ["", "| layer | " + " | ".join(f"{n} {m}: L0 / FVE / ‖y−ŷ‖/‖y‖" for n in names for m in modes) + " |",
              "|---" * (1 + len(names) * len(modes)) + "|"]
    for l, layer in enumerate(next(iter(reports.values()))["layers"]):
        cells = [layer["layer"]]
        for n in names:
            for m in modes:
                s = reports[n]["modes"][m]["layers"][l]
                cells.append(f"{s['l0']:.1f} / {s['fve']:.3f} / {s['rel_error']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
