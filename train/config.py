"""`TrainConfig`: everything one `saecache train` run needs, saved exactly as run into every SAE's `cfg.json`.

A run reads the data once and feeds each batch to every SAE in `saes` (a sweep over architecture, width, penalty,
layer). Only `SAESpec` describes an SAE; the rest is about where data comes from and how to train.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from saecache.errors import ConfigError

CONFIG_FORMAT_VERSION = 1  # of --config files and cfg.json's "train"; same numbering as the run dir format
FLAGS = {"stores": "--store", "total_tokens": "--tokens", "warmup_steps": "--warmup",
         "sparsity_warmup_steps": "--sparsity-warmup", "heldout_fraction": "--heldout", "hook_in": "--hook",
         "options": "--sae-options"}
"""The `saecache train` flag of a field, where it is not the field's name with dashes (messages use the flags)."""
RENAMED = {"exclude_bos": ("train_on_bos", lambda v: not v if isinstance(v, bool) else v)}
"""Old field name of a --config file or cfg.json's "train" -> (today's field, the value's conversion)."""
LOG_BACKENDS = ("none", "tensorboard", "wandb")
AUTOCAST = ("float32", "bfloat16", "float16")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.=+-]+$")
_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
DEFAULT_K = 32  # active features per row of the TopK family when none is given (the peers' default)
def check_types(values: dict, cls, what: str) -> None:
    """One-line error for a JSON value of the wrong type in a scalar field of dataclass `cls` (int, float, bool, str,
    optionally `| None`), so a config typo never surfaces later as a traceback."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in values.items():
        parts = [t.strip() for t in str(types.get(name, "")).split("|")]
        if not parts or any(t not in _SCALARS and t != "None" for t in parts):
            continue  # not a plain scalar field: checked elsewhere
        if value is None and "None" in parts:
            continue
        ok = any(isinstance(value, _SCALARS[t]) and not (t != "bool" and isinstance(value, bool))
                 for t in parts if t in _SCALARS)
        if not ok:
            raise ConfigError(f"{what} field {name} must be {' or '.join(parts)}, got {value!r}")


def flag(field_name: str) -> str:
    """The `saecache train` flag of a TrainConfig or SAESpec field, e.g. `total_tokens` -> `--tokens`."""
    return FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


def upgrade_fields(d: dict) -> dict:
    """A copy of a --config object or cfg.json's "train" with old field names (`RENAMED`) under today's, converted;
    where both are given, today's wins."""
    d = dict(d)
    for old, (new, convert) in RENAMED.items():
        if old in d:
            value = convert(d.pop(old))
            d.setdefault(new, value)
    if isinstance(d.get("saes"), list):  # spec fields added since (hooks_in, ...) at their defaults: the old meaning
        defaults = {f.name: f.default for f in dataclasses.fields(SAESpec) if f.default is not dataclasses.MISSING}
        d["saes"] = [{**defaults, **s} if isinstance(s, dict) else s for s in d["saes"]]
    return d


@dataclass
class SAESpec:
    """One SAE of the sweep."""

    arch: str = "topk"
    """SAE architecture: relu, topk, batchtopk, jumprelu, gated, matryoshka or skip-transcoder; or a dictionary over
    several hooks (given `hooks_in`): clt, clt-batchtopk, clt-jumprelu (cross-layer transcoders), crosscoder,
    crosscoder-batchtopk, crosscoder-jumprelu (acausal crosscoders)."""
    width: int = 4096
    """Number of dictionary features F."""
    hook_in: str = ""
    """Store hook the SAE encodes (e.g. `mlp_out.0`)."""
    hook_out: str | None = None
    """Store hook the SAE reconstructs; unset: the hook it encodes (an SAE). A different hook makes a transcoder."""
    hooks_in: list[str] | None = None
    """Cross-layer dictionaries (clt*, crosscoder*) only, instead of --hook: the store hooks read, one per layer in
    layer order (e.g. `--hooks-in resid_mid.0 --hooks-in resid_mid.1`)."""
    hooks_out: list[str] | None = None
    """clt* only: the store hooks reconstructed, one per layer (e.g. `--hooks-out mlp_out.0 --hooks-out
    mlp_out.1`); unset: the hooks read (a crosscoder reconstructs what it reads)."""
    k: int | None = None
    """Active features per row of topk/batchtopk/matryoshka SAEs; unset: 32 (at most the width), as the peers.
    Only for those architectures."""
    penalty: str | None = None
    """Sparsity penalty: `l1` or `entropy` for relu/gated, `l0` for jumprelu; unset: the architecture's default."""
    coeff: float | None = None
    """Sparsity coefficient λ of the penalty; unset: the architecture's default (for E‖x‖² = 1 inputs)."""
    lr: float | None = None
    """Learning rate of this SAE; unset: the run's --lr, or when that is unset too its architecture family's
    default. The defaults: 8e-4 / sqrt(F / 2^14) for the TopK family, 1e-3 for relu, 3e-4 for gated and jumprelu.
    Resolved before training, and cfg.json records the resolved value."""
    decay_start: int | None = None
    """Step from which this SAE's LR decays linearly to 0 at the last step; unset: the run's --decay-start, or
    when that is unset too the architecture's default. The run's step count means no decay. By default the TopK
    family decays over the last half of the run; relu/gated/jumprelu and every SAE that resamples do not.
    Resolved before training, and cfg.json records the resolved value."""
    resample: bool | None = None
    """Resample this SAE's dead latents every --resample-steps (its LR then re-warms after each resample); unset:
    the architecture's default. On for relu/gated/jumprelu, off for topk/batchtopk/matryoshka (AuxK handles their
    dead latents). Resolved before training (off when the run has no --resample-steps), and cfg.json records the
    resolved value."""
    name: str | None = None
    """Directory name under --out; unset: derived from arch, hook and width (e.g. `topk-mlp_out.0-1024-k16`)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra SAE settings as a JSON object, passed through unchanged (e.g. `{"auxk_alpha": 0.03, "target_l0":
    30}`). They are fields of the `sae` record of cfg.json."""

    def __post_init__(self):
        from saecache.train.arch import ARCHITECTURES  # torch: imported on use, so `train --help` stays light

        check_types(dataclasses.asdict(self), SAESpec, "SAE spec")
        needs_k = self.arch in ARCHITECTURES and ARCHITECTURES[self.arch].needs_k
        if self.k is None and needs_k and isinstance(self.width, int) and self.width >= 1:
            self.k = min(DEFAULT_K, self.width)
        cross = self.arch in ARCHITECTURES and ARCHITECTURES[self.arch].cross_layer
        if cross or self.hooks_in is not None or self.hooks_out is not None:
            self._check_cross_layer_hooks(cross)
        elif not self.hook_in:
            raise ConfigError("every SAE needs --hook (the store hook it reads; `hook_in` in a --config), e.g. "
                              "--hook mlp_out.0")
        if not isinstance(self.width, int) or self.width < 1:
            raise ConfigError(f"--width must be a positive integer, got {self.width!r}")
        if self.k is not None and not (isinstance(self.k, int) and 1 <= self.k <= self.width):
            raise ConfigError(f"--k must be an integer in [1, --width {self.width}], got {self.k!r}")
        if self.coeff is not None and not self.coeff >= 0:
            raise ConfigError(f"--coeff must be >= 0, got {self.coeff}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"an SAE's lr must be > 0, got {self.lr}")
        if self.decay_start is not None and self.decay_start < 0:
            raise ConfigError(f"an SAE's decay_start must be >= 0, got {self.decay_start}")
        self._check_against_sae_config()
        if self.name is None:
            hooks = self.hook_in if self.hook_out in (None, self.hook_in) else f"{self.hook_in}-to-{self.hook_out}"
            if cross:  # first..last hook of each list
                span = lambda hs: f"{hs[0]}..{hs[-1]}" if len(hs) > 1 else hs[0]  # noqa: E731
                hooks = span(self.inputs) if self.targets == self.inputs else \
                    f"{span(self.inputs)}-to-{span(self.targets)}"
            self.name = f"{self.arch}-{hooks}-{self.width}" + (f"-k{self.k}" if self.k is not None else "") + \
                (f"-{self.penalty}" if self.penalty is not None else "") + \
                (f"-c{self.coeff:g}" if self.coeff is not None else "")
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"SAE name {self.name!r} may only use letters, digits and _.=+-")

    @property
    def target_hook(self) -> str:
        return self.hook_out or self.hook_in

    @property
    def inputs(self) -> list[str]:
        """The store hooks this dictionary encodes: hooks_in, or [hook_in]."""
        return list(self.hooks_in) if self.hooks_in else [self.hook_in]

    @property
    def targets(self) -> list[str]:
        """The store hooks it reconstructs: hooks_out (else hooks_in), or [the target hook]."""
        if self.hooks_in:
            return list(self.hooks_out or self.hooks_in)
        return [self.target_hook]

    def _check_cross_layer_hooks(self, cross: bool) -> None:
        """hooks_in/hooks_out belong to the cross-layer architectures, which take no hook_in/hook_out."""
        if not cross:
            raise ConfigError(f"hooks_in/hooks_out are for the cross-layer architectures (clt, crosscoder, ...), not "
                              f"{self.arch}; give it hook_in (--hook)")
        if self.hook_in or self.hook_out:
            raise ConfigError(f"{self.arch} reads hooks_in (one hook per layer), not hook_in/hook_out; e.g. "
                              '"hooks_in": ["resid_mid.0", "resid_mid.1"], "hooks_out": ["mlp_out.0", "mlp_out.1"]')
        for name in ("hooks_in", "hooks_out"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, list) and v and all(isinstance(h, str) and h for h in v)):
                raise ConfigError(f"{name} must be a non-empty list of store hook names, got {v!r}")
        if self.hooks_in is None:
            raise ConfigError(f"{self.arch} needs hooks_in: the store hooks it reads, one per layer, e.g. "
                              '"hooks_in": ["resid_mid.0", "resid_mid.1"]')

    def _check_against_sae_config(self) -> None:
        """Refuse an unknown architecture, k/penalty nonsense or unknown options now, before any store is opened."""
        from saecache.train.arch import ARCHITECTURES
        from saecache.train.sae import SAEConfig

        if not isinstance(self.options, dict):
            raise ConfigError(f"--sae-options must be a JSON object of SAE settings, got {self.options!r}")
        if ARCHITECTURES.get(self.arch) is not None and ARCHITECTURES[self.arch].cross_layer:
            return self._check_against_cross_layer_config(ARCHITECTURES[self.arch])
        check_types(self.options, SAEConfig, "SAE option")
        fixed = {"arch", "d_in", "width", "d_out", "transcoder", "k", "penalty", "coeff"}
        known = {f.name for f in dataclasses.fields(SAEConfig)} - fixed
        bad = sorted(set(self.options) - known)
        if bad:
            raise ConfigError(f"unknown SAE option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        try:
            SAEConfig(arch=self.arch, d_in=1, width=self.width, k=self.k, penalty=self.penalty, coeff=self.coeff,
                      **self.options)
        except TypeError as e:  # e.g. a string where a number belongs
            raise ConfigError(f"bad SAE options {self.options}: {e}") from None

    def _check_against_cross_layer_config(self, arch) -> None:
        from saecache.train.crosslayer import CrossLayerConfig

        check_types(self.options, CrossLayerConfig, "SAE option")
        fixed = {"kind", "activation", "hooks_in", "hooks_out", "d_in", "d_out", "n_features", "n_layers", "k",
                 "coeff"}
        known = {f.name for f in dataclasses.fields(CrossLayerConfig)} - fixed
        bad = sorted(set(self.options) - known)
        if bad:
            raise ConfigError(f"unknown {self.arch} option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        if self.penalty is not None:
            raise ConfigError(f"{self.arch} takes no penalty (jumprelu's is the tanh penalty, weighted by coeff)")
        if self.resample:
            raise ConfigError(f"{self.arch} does not resample dead latents; set resample to false")
        try:
            self.cross_layer_config(1, 1)
        except TypeError as e:
            raise ConfigError(f"bad SAE options {self.options}: {e}") from None

    def cross_layer_config(self, d_in: int, d_out: int):
        """The `CrossLayerConfig` of a cross-layer spec, for hooks of widths d_in and d_out."""
        from saecache.train.arch import ARCHITECTURES
        from saecache.train.crosslayer import CrossLayerConfig

        arch = ARCHITECTURES[self.arch]
        return CrossLayerConfig(**{"kind": arch.kind, "activation": arch.activation, "hooks_in": self.inputs,
                                   "hooks_out": self.targets, "d_in": d_in, "d_out": d_out, "n_features": self.width,
                                   "k": self.k, **({"coeff": self.coeff} if self.coeff is not None else {}),
                                   **self.options})


@dataclass
class TrainConfig:
    """One training run over one or more stores; a sweep of SAEs trained from a single read of the data."""

    stores: list[str]
    """Store paths or URLs to train from (local directories or fsspec URLs). Several stores are mixed into one
    stream; hooks must exist in each."""
    out: str
    """Run root: each SAE writes `<out>/<name>/` (cfg.json, sae.safetensors, metrics.jsonl, checkpoints/)."""
    saes: list[SAESpec]
    """The SAEs to train; every batch is fed to each of them."""
    seed: int = 0
    """Seeds SAE initialisation, the data order and resampling. Same store + config + seed → identical weights."""
    seeds: int = 1
    """Replicas of every SAE, differing only in their init seed; evaluate reports mean ± sd across them. They are
    fed the same batches (one read of the data), and the init seed also seeds their resampling draws. With
    --seeds > 1 SAE `name` trains as `name-seed0`, `name-seed1`, ... (`name-seed0` is bit-identical to `name`
    trained with --seeds 1)."""
    batch_size: int = 4096
    """Global batch (rows per optimizer step, summed over DDP ranks)."""
    total_tokens: int | None = None
    """Training length in rows, rounded up to whole steps (this or --steps is required). Exactly one of --tokens
    / --steps is set."""
    steps: int | None = None
    """Training length in optimizer steps, instead of --tokens."""
    lr: float | None = None
    """Adam learning rate of every SAE; unset: each SAE's architecture-family default. The defaults: 8e-4 /
    sqrt(F / 2^14) for the TopK family, 1e-3 for relu, 3e-4 for gated and jumprelu. An `lr` in an SAE entry of a
    --config's `saes` overrides it for that SAE. The resolved rate is recorded in each SAE's spec in cfg.json."""
    warmup_steps: int | None = None
    """Steps of linear LR warmup from 0; unset: a tenth of the run, at most 1000. The warmup restarts after every
    resample, for the SAEs that resample. The value used is resolved before training, so cfg.json records it."""
    decay_start: int | None = None
    """Step from which every SAE's LR decays linearly to 0 at the last step; unset: each architecture's default.
    By default the TopK family decays over the last half of the run and the others do not; the run's step count
    means no decay. A `decay_start` in an SAE entry of a --config's `saes` overrides it for that SAE. Refused
    when an SAE of the run resamples (its LR re-warms after each resample)."""
    sparsity_warmup_steps: int | None = None
    """Steps of linear warmup of the sparsity penalty's coefficient from 0 to 1; unset: a twentieth of the run,
    at most 2000. Resolved before training, so cfg.json records it. The batchtopk inference threshold's start
    (`threshold_start_step`, an SAE option) is likewise resolved to a tenth of the run, at most 1000, unless the
    SAE's options set it."""
    grad_clip: float = 0.02
    """Clip each SAE's gradient to this global L2 norm before its Adam step; 0 = off. The clip applies after the
    decoder gradient's radial part is removed, as dictionary_learning and SAELens order it. In the units the SAE
    trains in: with `normalize` (the default) inputs have E‖x‖² = 1 and the value is independent of the
    activations' scale. Why: the gradient norm falls ~40× over the first few hundred steps (the tied init
    over-reconstructs), and unclipped, Adam's second moment (β2 0.999, a ~1000-step memory) keeps the early
    gradients' size and shrinks every later step by about as much; clipping caps what it remembers. Measured on
    the demo store (d=128, F=1024, 1000 steps of 1024 rows): TopK k=32 held-out FVE 0.941 → 0.959, ReLU+L1 at L0
    32 0.61 → 0.91 (see docs/recipes.md)."""
    resample_steps: int | None = None
    """Resample dead features every this many steps; unset: never. Only the SAEs whose `resample` is on are
    resampled (by default relu/gated/jumprelu, not the TopK family), by Anthropic's procedure."""
    resample_window: int | None = None
    """Steps without firing after which a feature counts as dead; unset: half of --resample-steps, else 100.
    Counted in rows (steps × batch size), so with BOS rows left out it spans about 1/ctx_len more steps. Also the
    window of the logged dead fraction."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (weights + optimizer + loader + RNG state)."""
    keep_checkpoints: int = 2
    """Checkpoints kept per SAE (older ones are deleted after a newer one is written)."""
    heldout_fraction: float = 0.01
    """Fraction of every store's contexts, the last by context id, never trained on; evaluate reads them."""
    allow_incomplete: bool = False
    """Train on the complete shards of a store that is still being harvested."""
    train_on_bos: bool = False
    """Also train on the BOS rows (position 0 of every store whose contexts start with BOS); off by default. BOS rows
    are norm outliers in pretrained LMs (attention sinks; dictionary_learning drops them for Pythia); left out, a
    batch trains on its other rows, about batch_size * (1 - 1/ctx_len). A store harvested with --no-store-bos has no
    BOS rows. Before this name, cfg.json and --config files said `exclude_bos` (its negation); they still load."""
    normalize: bool = True
    """Scale inputs (and targets) by 1/sqrt(mean squared norm) from the store's statistics; folded back at save."""
    partitions: int = 8
    """Canonical data partitions: fixes the data order independent of DDP ranks; must be a multiple of world size."""
    shuffle_chunks: int = 4
    """Inner chunks per shuffle window per partition; each batch draws from partitions × shuffle_chunks chunks."""
    shuffle_run: int = 128
    """Adjacent stored rows served together from a shuffle window (already shuffled within their shard); 1 =
    single rows. Capped at a quarter of a partition's share of the batch; single rows are slower (random rows are
    latency-bound)."""
    reader_threads: int = 2
    """Threads decoding chunks ahead of use; they do not change the batches."""
    autocast: str = "float32"
    """Autocast dtype of the SAE forward: float32 (off), bfloat16 or float16."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`..."""
    log: str = "none"
    """Extra metrics backend: none, tensorboard or wandb; metrics.jsonl is always written."""
    log_every: int = 10
    """Steps between metric records."""
    wandb_project: str = "saecache"
    """W&B project with --log wandb."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""

    def __post_init__(self):
        if isinstance(self.stores, (str, os.PathLike)):
            self.stores = [self.stores]
        if isinstance(self.stores, (list, tuple)):  # Path objects are fine from Python; cfg.json needs strings
            self.stores = [os.fspath(s) if isinstance(s, os.PathLike) else s for s in self.stores]
        if isinstance(self.out, os.PathLike):
            self.out = os.fspath(self.out)
        if not isinstance(self.stores, list) or not all(isinstance(s, str) for s in self.stores):
            raise ConfigError(f"stores must be a list of store paths or URLs, got {self.stores!r}")
        check_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, TrainConfig, "config")
        if not isinstance(self.saes, list):
            raise ConfigError("saes must be a list of SAE specs (objects with arch, width, hook_in, ...)")
        spec_fields = {f.name for f in dataclasses.fields(SAESpec)}
        for s in self.saes:
            if not isinstance(s, (SAESpec, dict)):
                raise ConfigError(f"each SAE spec must be an object, got {s!r}")
            bad = sorted(set(s) - spec_fields) if isinstance(s, dict) else []
            if bad:
                raise ConfigError(f"unknown SAE spec field(s) {', '.join(bad)}; "
                                  f"known: {', '.join(sorted(spec_fields))}")
        self.saes = [s if isinstance(s, SAESpec) else SAESpec(**s) for s in self.saes]
        if not self.stores:
            raise ConfigError("no store given: pass --store PATH (harvest one with `saecache harvest`)")
        if not self.saes:
            raise ConfigError("no SAE to train: pass --hook/--arch/--width or a --config with `saes`")
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or self.seeds < 1:
            raise ConfigError(f"--seeds must be a positive integer (replicas per SAE), got {self.seeds!r}")
        names = [name for _, name, _ in self.replicas()]
        if len(set(names)) != len(names):
            raise ConfigError(f"SAE names must be unique, got {names}")
        if (self.total_tokens is None) == (self.steps is None):
            raise ConfigError("give exactly one training length: --tokens N or --steps N")
        for f in ("batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "partitions", "shuffle_chunks",
                  "shuffle_run"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ConfigError(f"{flag(f)} must be a positive integer, got {getattr(self, f)!r}")
        if (self.steps is not None and self.steps < 1) or (self.total_tokens is not None and self.total_tokens < 1):
            raise ConfigError("the training length must be at least one step")
        if self.batch_size % self.partitions:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --partitions {self.partitions}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr!r}")
        if not self.grad_clip >= 0 or self.grad_clip == float("inf"):
            raise ConfigError(f"--grad-clip must be a finite number >= 0 (0 = no clipping), got {self.grad_clip!r}")
        self._resolve_schedule()
        if self.warmup_steps < 0 or self.sparsity_warmup_steps < 0 or self.reader_threads < 0:
            raise ConfigError("--warmup, --sparsity-warmup and --reader-threads must be >= 0")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"--heldout must be in [0, 1), got {self.heldout_fraction}")
        if self.resample_steps is not None and self.resample_steps < 1:
            raise ConfigError(f"--resample-steps must be >= 1, got {self.resample_steps}")
        self._resolve_resample()
        if self.resample_window is not None and self.resample_window < 1:
            raise ConfigError(f"--resample-window must be >= 1, got {self.resample_window}")
        self._resolve_decay()
        if self.autocast not in AUTOCAST:
            raise ConfigError(f"--autocast must be one of {', '.join(AUTOCAST)}, got {self.autocast!r}")
        if self.log not in LOG_BACKENDS:
            raise ConfigError(f"--log must be one of {', '.join(LOG_BACKENDS)}, got {self.log!r}")

    def _resolve_schedule(self) -> None:
        """Fill in what was left None with the rules above (an explicit value always wins), so the config, and
        cfg.json, say what ran: each spec's lr, the warm-ups, and each batchtopk spec's threshold_start_step."""
        from saecache.train.arch import ARCHITECTURES
        from saecache.train.optim import default_lr, default_schedule

        sched = default_schedule(self.total_steps, self.batch_size)
        for name in ("warmup_steps", "sparsity_warmup_steps"):
            if getattr(self, name) is None:
                setattr(self, name, sched[name])
        specs = []
        for s in self.saes:
            lr = s.lr if s.lr is not None else self.lr if self.lr is not None else default_lr(s.arch, s.width, s.k)
            options = dict(s.options)
            if ARCHITECTURES[s.arch].threshold:  # batchtopk, matryoshka
                options.setdefault("threshold_start_step", sched["threshold_start_step"])
                options.setdefault("threshold_beta", sched["threshold_beta"])
                if options["threshold_start_step"] >= self.total_steps:
                    raise ConfigError(f"SAE {s.name}: threshold_start_step {options['threshold_start_step']} is not "
                                      f"below the run's {self.total_steps} steps, so it would be saved without an "
                                      "inference threshold; lower threshold_start_step or train longer")
            if ARCHITECTURES[s.arch].sparse:  # the TopK family's AuxK
                options.setdefault("dead_tokens_threshold", sched["dead_tokens_threshold"])
            specs.append(dataclasses.replace(s, lr=lr, options=options))
        self.saes = specs

    def _resolve_resample(self) -> None:
        """Replace each spec's `resample=None` by the architecture default (False without resample_steps), so the
        specs, and the cfg.json records built from them, say which SAEs are resampled."""
        from saecache.train.arch import ARCHITECTURES

        for s in self.saes:
            if s.resample and self.resample_steps is None:
                raise ConfigError(f"SAE {s.name} is to be resampled (--resample) but the run has no --resample-steps "
                                  "(set it, e.g. --resample-steps 25000)")
        self.saes = [s if s.resample is not None else dataclasses.replace(
            s, resample=self.resample_steps is not None and ARCHITECTURES[s.arch].resample) for s in self.saes]

    def _resolve_decay(self) -> None:
        """Replace each spec's `decay_start=None` by the run's, else its architecture's default (after
        `_resolve_resample`: an SAE that resamples does not decay); refuse a decay beyond the run or beside
        resampling (the run's decay_start naming every resampled SAE, a spec's its own)."""
        from saecache.train.arch import ARCHITECTURES

        T, specs = self.total_steps, []
        if self.decay_start is not None and not 0 <= self.decay_start <= T:
            raise ConfigError(f"--decay-start must be in [0, {T}] (the run's steps = no decay), got {self.decay_start}")
        both = [s.name for s in self.saes if s.resample]
        if self.decay_start is not None and self.decay_start < T and both:
            raise ConfigError(f"--decay-start cannot be combined with resampling (the LR re-warms after each "
                              f"resample); resampled SAE(s): {', '.join(both)}; pass --no-resample or drop "
                              "--decay-start")
        for s in self.saes:
            start = s.decay_start if s.decay_start is not None else self.decay_start
            if start is None:
                start = T if s.resample else T - round(ARCHITECTURES[s.arch].decay_fraction * T)
            if not 0 <= start <= T:
                raise ConfigError(f"SAE {s.name}: decay_start must be in [0, {T}] (the run's steps = no decay), "
                                  f"got {start}")
            if s.resample and start < T:
                raise ConfigError(f"SAE {s.name} resamples (its LR re-warms after each resample), so it cannot "
                                  f"decay from step {start}; set its resample to false or drop its decay_start")
            specs.append(dataclasses.replace(s, decay_start=start))
        self.saes = specs

    def replicas(self) -> list[tuple[SAESpec, str, int]]:
        """(spec, run name, replica index) of every SAE trained: each spec `seeds` times (`seeds` field)."""
        if self.seeds == 1:
            return [(s, s.name, 0) for s in self.saes]
        return [(s, f"{s.name}-seed{r}", r) for s in self.saes for r in range(self.seeds)]

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else -(-self.total_tokens // self.batch_size)

    @property
    def dead_window_steps(self) -> int:
        if self.resample_window is not None:
            return self.resample_window
        return max(1, self.resample_steps // 2) if self.resample_steps else 100

    @property
    def hooks(self) -> list[str]:
        """Every store hook the sweep reads, in first-use order."""
        out: list[str] = []
        for s in self.saes:
            for h in (*s.inputs, *s.targets):
                if h not in out:
                    out.append(h)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a JSON object (a --config file or cfg.json's "train"); an optional `format_version` newer than
        this saecache's is refused."""
        d = upgrade_fields(d)
        v = d.pop("format_version", CONFIG_FORMAT_VERSION)
        if not isinstance(v, int) or v > CONFIG_FORMAT_VERSION:
            raise ConfigError(f"the config has format_version {v!r}, newer than this saecache reads "
                              f"({CONFIG_FORMAT_VERSION}); upgrade saecache")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training config field(s): {', '.join(unknown)} (written by a newer saecache? "
                              "upgrade it, or remove them)")
        try:
            return cls(**d)
        except TypeError as e:  # a value of the wrong type, e.g. "steps": "ten"
            raise ConfigError(f"bad config value: {e}") from None
