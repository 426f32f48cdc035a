"""`EvalConfig`: everything one `saecache evaluate` run needs, saved as `eval_config.json` beside the report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from saecache.errors import ConfigError

MODES = ("clean", "replaced")
"""The replacement model's input modes: each replaced layer reads the clean model's activations, or the replaced
upstream layers' outputs (`replacement.Replacement`)."""

PRUNE_CURVE = (0.1, 0.03, 0.01, 0.003)
"""Default pruning-curve thresholds: half-decade steps from a tenth of all tokens into the range of the seed's 8192-
and 32768-feature dictionaries (it pruned above 0.038 at an L0 near 40). Four, because each threshold adds a spliced
forward per SAE: six took the demo's evaluation (12 SAEs, 256 contexts) from 108 s to 481 s on a loaded 2-core
machine."""


@dataclass
class EvalConfig:
    """Evaluate one or more run dirs against one store: reconstruction statistics on the store's held-out rows and
    % loss recovered by splicing the reconstruction into the model on held-out contexts."""

    run_dirs: list[str]
    """Run directories (cfg.json + sae.safetensors), trained by `saecache train` or made by `saecache import`."""
    store: str
    """Store URL: the store the runs were trained on, or another store of the same model and hooks. Of the store
    the runs were trained on, its held-out contexts are used; of another store, every row (none of it was trained
    on)."""
    out: str = "eval"
    """Output directory: report.md/.json/.csv, one histogram PNG per SAE, eval_config.json."""
    prune_above: float | None = None
    """Also report every statistic with the features firing more often than this (held-out frequency) dropped.
    Dropped means set to zero after encoding; the seed killed features above 0.038."""
    prune_curve: tuple[float, ...] = PRUNE_CURVE
    """Frequency thresholds of the pruning curves beside the frontier; '' = none. Each SAE is measured again (L0,
    FVE, % loss recovered; spliced in the same forwards as the SAE) with the features firing more often than each
    threshold dropped; a threshold dropping no feature beyond a higher one's is left out."""
    frontier: bool = True
    """Draw the sparsity–fidelity frontier, one PNG per hook. L0 against % loss recovered and against FVE, and the
    pruning curves; the numbers go to frontier.json either way."""
    n_contexts: int = 64
    """Held-out contexts run through the model for the loss figures (fewer if the store has fewer)."""
    max_rows: int | None = 65536
    """Cap on the held-out rows read for the reconstruction statistics and firing frequencies; `none` = all."""
    batch_size: int = 2048
    """Rows per SAE batch when reading the store."""
    ctx_batch_size: int = 8
    """Contexts per model forward when splicing."""
    model: str | None = None
    """Model directory or Hub name; unset: the one named in the store header (its config hash must match)."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`..."""
    histograms: bool = True
    """Write the log10 feature-frequency histogram PNG per SAE (needs matplotlib)."""
    splice: bool = True
    """Run the model for the loss figures (turn off for a statistics-only report without loading the model)."""
    splice_bos: bool = False
    """For a run that left BOS rows out of training (`saecache train`'s default): replace the BOS position too and
    count its rows and predictions (the figures evaluate gave before it followed the training rule). Off: the BOS
    position keeps the model's own activation, and the statistics and losses count every other position (the rule
    the run trained under)."""
    hist_bins: int = 50
    """Bins of the frequency histograms."""
    html_features: int = 6
    """Features shown on a static HTML page per SAE (`features-<run>.html`); 0 = no pages (and no tokenizer
    needed). The page shows each feature's top-activating contexts with the firing token marked, read from the
    store; the features are picked evenly along the ranking of the alive features by frequency, most frequent
    first."""
    html_top: int = 8
    """Contexts shown per feature on those pages."""
    html_max_rows: int = 16384
    """Rows scanned (from the start of the store, in storage order) for those contexts."""
    tokenizer: str | None = None
    """Tokenizer for the HTML pages; unset: the one named in the store header, else --model when that fails."""
    threads: int | None = None
    """torch CPU threads during the evaluation; unset: saecache's thread policy. Restored afterwards. The policy
    (`saecache/threads.py`) uses every core, its threads waiting passively, so a busy machine costs its fair share."""
    progress: bool = True
    """Show each phase's progress (statistics, splicing, feature pages) with its ETA on stderr."""
    extra: dict = field(default_factory=dict)
    """Free-form notes recorded with the config (e.g. the command line)."""

    def __post_init__(self):
        if not self.run_dirs:
            raise ConfigError("no run dir given: saecache evaluate RUN_DIR... --store STORE")
        if not self.store:
            raise ConfigError("no store given: pass --store (the store the runs were trained on)")
        if self.prune_above is not None and not 0 < self.prune_above <= 1:
            raise ConfigError(f"--prune-above is a firing frequency in (0, 1], got {self.prune_above}")
        self.prune_curve = tuple(self.prune_curve)
        bad = [t for t in self.prune_curve if not (isinstance(t, (int, float)) and 0 < t <= 1)]
        if bad:
            raise ConfigError(f"--prune-curve takes firing frequencies in (0, 1], comma-separated, got {bad[0]}")
        for name in ("n_contexts", "batch_size", "ctx_batch_size", "hist_bins", "html_top", "html_max_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"--max-rows must be a positive integer or none (all rows), got {self.max_rows}")
        if not isinstance(self.html_features, int) or self.html_features < 0:
            raise ConfigError(f"--html-features must be an integer >= 0, got {self.html_features!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"--threads must be a positive integer, got {self.threads!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FeaturesConfig:
    """`saecache features`: top-activating contexts of some features of one SAE, read from the store."""

    run_dir: str
    """The SAE's run directory."""
    store: str
    """Store to scan (token ids -> text via the store's tokenizer or --tokenizer)."""
    features: list[int]
    """Feature indices to show."""
    top: int = 20
    """Contexts shown per feature."""
    max_rows: int | None = 262144
    """Rows scanned (from the start of the store, in storage order); `none` = all."""
    window: int = 16
    """Tokens of context shown before the firing token (4 after)."""
    tokenizer: str | None = None
    """Tokenizer directory or Hub name; unset: the one named in the store header."""
    html: str | None = None
    """Also write a static HTML page with the features to this path."""
    batch_size: int = 2048
    """Rows per SAE batch."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`..."""

    def __post_init__(self):
        if not self.features:
            raise ConfigError("no feature given: pass --feature N (several allowed)")
        if any(f < 0 for f in self.features):
            raise ConfigError(f"feature indices must be >= 0, got {self.features}")
        if self.top < 1 or self.window < 0 or self.batch_size < 1:
            raise ConfigError("--top and --batch-size must be >= 1 and --window >= 0")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"--max-rows must be a positive integer or none (all rows), got {self.max_rows}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ReplacementConfig:
    """`saecache replacement`: a PLT set (one transcoder run dir per replaced layer) or a cross-layer transcoder
    evaluated as a replacement model on a store's held-out contexts; writes replacement.md and replacement.json."""

    run_dirs: list[str]
    """Transcoder run dirs, one per replaced layer (each maps an input hook, e.g. mlp_in.i, to mlp_out.i), or one
    cross-layer transcoder's run dir."""
    store: str
    """Store the runs were trained on (its held-out contexts are used) or another store of the same model and hooks."""
    out: str = "replacement"
    """Output directory for replacement.md and replacement.json."""
    inputs: str = "both"
    """Where each transcoder reads its input: `clean` (the clean model's run), `replaced` (the replaced model's own
    run, layer by layer) or `both`."""
    per_layer: bool = True
    """Also splice each layer alone (as `saecache evaluate` does), for its % loss recovered and KL."""
    splice_bos: bool = False
    """For runs that left BOS rows out of training: replace the BOS position too and count its predictions (as
    `saecache evaluate --splice-bos`). Off: the BOS position keeps the model's own activation."""
    n_contexts: int = 64
    """Held-out contexts run through the model (fewer if the store has fewer)."""
    ctx_batch_size: int = 8
    """Contexts per model forward."""
    model: str | None = None
    """Model directory or Hub name; unset: the one named in the store header (its config hash must match)."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`..."""

    def __post_init__(self):
        if not self.run_dirs:
            raise ConfigError("no run dir given: saecache replacement RUN_DIR... --store STORE (one per layer)")
        if self.inputs not in (*MODES, "both"):
            raise ConfigError(f"--inputs is clean, replaced or both, got {self.inputs!r}")
        for name in ("n_contexts", "ctx_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, "
                                  f"got {getattr(self, name)!r}")

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.inputs == "both" else (self.inputs,)
