"""`TrainConfig`: everything one `saecache train` run needs, saved exactly as run into every SAE's `cfg.json`.

A run reads the data once and feeds each batch to every SAE in `saes` (a sweep over architecture, width, penalty,
layer). Only `SAESpec` describes an SAE; the rest is about where data comes from and how to train.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from saecache.errors import ConfigError
from saecache.train.spec import SAESpec, check_types  # noqa: F401 (SAESpec re-exported: a run's config holds them)

CONFIG_FORMAT_VERSION = 1  # of --config files and cfg.json's "train"; same numbering as the run dir format
FLAGS = {"stores": "--store", "hook_in": "--hook", "options": "--sae-options"}
"""The `saecache train` flag of a field, where it is not the field's name with dashes (messages use the flags)."""
OLD_FLAGS = {"tokens": ("--total-tokens",), "warmup_steps": ("--warmup",),
             "sparsity_warmup_steps": ("--sparsity-warmup",), "heldout_fraction": ("--heldout",)}
"""Flags that still parse but are no longer shown: the names of fields (or flags) before they became one name."""


def default_dead_tokens(resample_steps: int | None, batch_size: int) -> int:
    """`TrainConfig.dead_tokens_threshold` left unset: half of resample_steps' rows, else 100 steps' rows."""
    return (max(1, resample_steps // 2) if resample_steps else 100) * batch_size


def _rows(window, d: dict):
    """An old `resample_window` (steps; None: the default rule) as today's `dead_tokens_threshold` (rows), resolved
    as a run resolves it, so an old cfg.json compares equal to the record a resumed run writes."""
    batch, every = d.get("batch_size", 4096), d.get("resample_steps")
    if not isinstance(batch, int) or not (every is None or isinstance(every, int)):
        return window  # a bad value: refused by the fields' checks
    if window is None:
        return default_dead_tokens(every, batch)
    return window * batch if isinstance(window, int) and not isinstance(window, bool) else window


RENAMED = {"exclude_bos": ("train_on_bos", lambda v, d: not v if isinstance(v, bool) else v),
           "total_tokens": ("tokens", lambda v, d: v), "resample_window": ("dead_tokens_threshold", _rows)}
"""Old field name of a --config file or cfg.json's "train" -> (today's field, the value's conversion given the
whole object)."""
LOG_BACKENDS = ("none", "tensorboard", "wandb")
AUTOCAST = ("float32", "bfloat16", "float16")


def flag(field_name: str) -> str:
    """The `saecache train` flag of a TrainConfig or SAESpec field, e.g. `batch_size` -> `--batch-size`, `hook_in` ->
    `--hook`."""
    return FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


def upgrade_fields(d: dict) -> dict:
    """A copy of a --config object or cfg.json's "train" with old field names (`RENAMED`) under today's, converted;
    where both are given, today's wins."""
    d = dict(d)
    for old, (new, convert) in RENAMED.items():
        if old in d:
            value = convert(d.pop(old), d)
            d.setdefault(new, value)
    if isinstance(d.get("saes"), list):  # spec fields added since (hooks_in, ...) at their defaults: the old meaning
        defaults = {f.name: f.default for f in dataclasses.fields(SAESpec) if f.default is not dataclasses.MISSING}
        d["saes"] = [{**defaults, **s} if isinstance(s, dict) else s for s in d["saes"]]
    return d


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
    tokens: int | None = None
    """Training length in rows (token positions, as harvest's --tokens counts them), rounded up to whole steps;
    this or --steps is required, not both. Before this name, cfg.json and --config files said `total_tokens`
    (and the flag --total-tokens); they still load."""
    steps: int | None = None
    """Training length in optimizer steps, instead of --tokens."""
    lr: float | None = None
    """Adam learning rate of every SAE; unset: each SAE's architecture-family default. The defaults: 1.2e-3 /
    sqrt(F / 2^14) for the TopK family (its cross-layer dictionaries: 8e-4 / sqrt(F / 2^14)), 1e-3 for relu, 3e-4
    for gated and jumprelu. An `lr` in an SAE entry of a --config's `saes` overrides it for that SAE. The resolved
    rate is recorded in each SAE's spec in cfg.json."""
    warmup_steps: int | None = None
    """Steps of linear LR warm-up from 0 of every SAE; unset: each architecture's default, a tenth of the run, at
    most 1000 steps (the TopK family: at most 100). A `warmup_steps` in an SAE entry of a --config's `saes`
    overrides it for that SAE. The warm-up restarts after every resample, for the SAEs that resample. Each SAE's
    resolved value is recorded in its spec in cfg.json."""
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
    dead_tokens_threshold: int | None = None
    """Training rows without firing after which a feature counts as dead, for resampling and the logged dead
    fraction; unset: half of --resample-steps times --batch-size, else 100 steps' rows. AuxK's (the TopK family) is
    the SAE option of the same name and unit. Before this name, cfg.json and --config files gave `resample_window`
    in steps; they still load (times batch_size)."""
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
    are norm outliers in pretrained LMs (attention sinks; dictionary_learning drops them for Pythia); left out, the
    loader never serves them (every batch still holds --batch-size rows) and evaluate keeps the BOS position clean.
    A store harvested with --no-store-bos has no BOS rows. Before this name, cfg.json and --config files said
    `exclude_bos` (its negation); they still load."""
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
        if (self.tokens is None) == (self.steps is None):
            raise ConfigError("give exactly one training length: --tokens N or --steps N")
        for f in ("batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "partitions", "shuffle_chunks",
                  "shuffle_run"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ConfigError(f"{flag(f)} must be a positive integer, got {getattr(self, f)!r}")
        if (self.steps is not None and self.steps < 1) or (self.tokens is not None and self.tokens < 1):
            raise ConfigError("the training length must be at least one step")
        if self.batch_size % self.partitions:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --partitions {self.partitions}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr!r}")
        if not self.grad_clip >= 0 or self.grad_clip == float("inf"):
            raise ConfigError(f"--grad-clip must be a finite number >= 0 (0 = no clipping), got {self.grad_clip!r}")
        self._resolve_sparsity_warmup()
        if (self.warmup_steps or 0) < 0 or self.sparsity_warmup_steps < 0 or self.reader_threads < 0:
            raise ConfigError("--warmup-steps, --sparsity-warmup-steps and --reader-threads must be >= 0")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.resample_steps is not None and self.resample_steps < 1:
            raise ConfigError(f"--resample-steps must be >= 1, got {self.resample_steps}")
        if self.dead_tokens_threshold is not None and self.dead_tokens_threshold < 1:
            raise ConfigError(f"--dead-tokens-threshold must be >= 1, got {self.dead_tokens_threshold}")
        if self.dead_tokens_threshold is None:  # resolved: cfg.json records the window used
            self.dead_tokens_threshold = default_dead_tokens(self.resample_steps, self.batch_size)
        if self.decay_start is not None and not 0 <= self.decay_start <= self.total_steps:
            raise ConfigError(f"--decay-start must be in [0, {self.total_steps}] (the run's steps = no decay), got "
                              f"{self.decay_start}")
        self.saes = [s.resolved(self.run_defaults()) for s in self.saes]
        names = [name for _, name, _ in self.replicas()]
        if len(set(names)) != len(names):
            raise ConfigError(f"SAE names must be unique, got {names}")
        if self.autocast not in AUTOCAST:
            raise ConfigError(f"--autocast must be one of {', '.join(AUTOCAST)}, got {self.autocast!r}")
        if self.log not in LOG_BACKENDS:
            raise ConfigError(f"--log must be one of {', '.join(LOG_BACKENDS)}, got {self.log!r}")

    def _resolve_sparsity_warmup(self) -> None:
        """The sparsity warm-up left None: a twentieth of the run (`optim.default_schedule`), so the config, and
        cfg.json, say what ran. The LR warm-up is each SAE's, its architecture's default (`SAESpec.resolved`)."""
        from saecache.train.optim import default_schedule  # torch: imported on use, so `train --help` stays light

        if self.sparsity_warmup_steps is None:
            self.sparsity_warmup_steps = default_schedule(self.total_steps, self.batch_size)["sparsity_warmup_steps"]

    def run_defaults(self):
        """What this run gives its SAEs' defaults (`arch.RunDefaults`)."""
        from saecache.train.arch import RunDefaults  # torch: imported on use (`train --help`)
        from saecache.train.optim import default_schedule  # torch: imported on use (`train --help`)

        return RunDefaults(steps=self.total_steps, lr=self.lr, warmup_steps=self.warmup_steps,
                           decay_start=self.decay_start,
                           resample_steps=self.resample_steps,
                           schedule=default_schedule(self.total_steps, self.batch_size))

    def replicas(self) -> list[tuple[SAESpec, str, int]]:
        """(spec, run name, replica index) of every SAE trained: each spec `seeds` times (`seeds` field)."""
        if self.seeds == 1:
            return [(s, s.name, 0) for s in self.saes]
        return [(s, f"{s.name}-seed{r}", r) for s in self.saes for r in range(self.seeds)]

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else -(-self.tokens // self.batch_size)

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
