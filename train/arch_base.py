"""The interface every SAE architecture implements (`Architecture`), the one place an SAE's defaults are resolved
(`Architecture.resolve`, with what a run gives them: `RunDefaults`), and the registry `ARCHITECTURES` with its
lookups. The architectures themselves are in `arch.py`, which fills the registry; import them from there.

An `Architecture` says what varies between SAEs that share `sae.SAE`'s weights (W_enc_DF, b_enc_F, W_dec_FD, b_dec_D):
its extra state (`add_state`), its training activation + penalty (`encode_train`: the sparse path for the TopK family,
the fused buffered path of `dense_ops` for the dense ones), its inference rule (`encode`), its reconstruction loss
(`reconstruct`: Matryoshka sums nested prefixes), its auxiliary loss (`aux_loss`: AuxK, the gated frozen-decoder
loss), its per-step bookkeeping (`after_step`: BatchTopK's inference threshold) and its defaults (`resolve`). What
the exporters and importers need is here too: the tensors of its inference map (`threshold_key`, `extra_F`), whether
it has a ReLU/JumpReLU form (`threshold_form`, `threshold_F`), the dictionary_learning and SAELens names it goes by
(`dl_classes`, `saelens_arch`, `saelens_key`) and the one-line refusals. The trainer, the exporters and evaluation
read only these attributes and methods, never an architecture's name.

Shapes: B rows, D width, F features, N selected entries (`sparse_ops.SparseCode`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from saecache.errors import ConfigError, RunDirError
from saecache.train import dense_ops as DO
from saecache.train import penalties as P
from saecache.train.sparse_ops import SparseCode, sparse_decode


DEFAULT_K = 32  # active features per row of the TopK family when none is given (the peers' default)
DEAD_TOKENS_THRESHOLD = 10_000_000  # sparsify's AuxK dead threshold; a run scales it down (`optim.default_schedule`)
RUN_OPTIONS = ("threshold_start_step", "threshold_beta", "dead_tokens_threshold")
"""Module settings a run resolves from its length; a spec records them in its options (cfg.json's spec)."""


@dataclass(frozen=True)
class RunDefaults:
    """What a training run gives its SAEs' defaults (`TrainConfig.run_defaults`)."""
    steps: int
    """The run's optimizer steps."""
    lr: float | None = None
    """The run's --lr (None: each architecture's default)."""
    warmup_steps: int | None = None
    """The run's --warmup-steps (None: each architecture's default)."""
    decay_start: int | None = None
    """The run's --decay-start (None: each architecture's default)."""
    resample_steps: int | None = None
    """The run's --resample-steps (None: nothing resamples)."""
    schedule: dict = field(default_factory=dict)
    """`optim.default_schedule` of the run: threshold_start_step, threshold_beta, dead_tokens_threshold."""


def spec_name(c: dict) -> str:
    """A spec's default run name, from its arch, hooks, width and the k / penalty / coeff it was given (e.g.
    `topk-mlp_out.0-1024-k16`, `clt-resid_mid.0..resid_mid.5-to-mlp_out.0..mlp_out.5-4096-k32`)."""
    if c.get("hooks_in"):  # first..last hook of each list
        span = lambda hs: f"{hs[0]}..{hs[-1]}" if len(hs) > 1 else hs[0]  # noqa: E731
        outs = c.get("hooks_out") or c["hooks_in"]
        hooks = span(c["hooks_in"]) if outs == c["hooks_in"] else f"{span(c['hooks_in'])}-to-{span(outs)}"
    else:
        hooks = c["hook_in"] if c.get("hook_out") in (None, c["hook_in"]) else f"{c['hook_in']}-to-{c['hook_out']}"
    return f"{c['arch']}-{hooks}-{c['width']}" + (f"-k{c['k']}" if c.get("k") is not None else "") + \
        (f"-{c['penalty']}" if c.get("penalty") is not None else "") + \
        (f"-c{c['coeff']:g}" if c.get("coeff") is not None else "")


@dataclass
class Code:
    """Post-activation features in whichever form the architecture produces."""
    f_BF: Tensor | None = None          # dense features (relu, jumprelu, gated, dense inference)
    sparse: SparseCode | None = None    # topk family: the selected latents (values, latents, rows)
    gate_BF: Tensor | None = None       # gated: relu(π_gate), for the penalty and aux loss
    aux: SparseCode | None = None       # topk family: AuxK codes over dead latents
    pen: Tensor | None = None           # the unweighted penalty computed with the activation (l1, jumprelu's l0)
    count_F: Tensor | None = None       # dense training path: rows in which each feature fired
    skip_BD: Tensor | None = None       # skip-transcoder: the skip term x @ W_skip_DDᵀ, added to the decode

    def dense(self, width: int) -> Tensor:
        """[B, F] features, F = width."""
        return self.f_BF if self.f_BF is not None else self.sparse.dense(width)


OPTIMIZERS = ("adam", "lazy-adam")


def check_optimizer(value, default: str) -> str:
    """An SAE's optimizer (`SAEConfig.optimizer`), `default` when unset."""
    value = default if value is None else value
    if value not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {value!r}")
    return value


class Architecture:
    """Base: a dense architecture with a pre-bias and no extra state. Subclasses override what differs."""

    name = ""
    description = ""
    sparse = False
    """Codes are `SparseCode`s (K latents per row); decoder and its backward are sparse."""
    pre_bias = True
    """Subtract b_dec (SAE) / b_in_D (transcoder) from the input before the encoder."""
    needs_k = False
    penalties: tuple[str, ...] = ("none",)
    """Allowed `penalty` values; the first is the default."""
    default_coeff: dict[str, float] = {"none": 0.0}
    resample = True
    """Default of `SAESpec.resample`: dead latents are resampled (the AuxK architectures keep theirs alive)."""
    threshold = False
    """Inference uses a scalar threshold buffer estimated in training (the BatchTopK family)."""
    max_warmup_steps = 1000
    """Default LR warm-up of an SAE (`SAESpec.warmup_steps`): a tenth of the run, at most this many steps
    (dictionary_learning's and sparsify's fixed 1000)."""
    decay_fraction = 0.0
    """Default share of the run, at its end, over which the LR decays linearly to 0 (`SAESpec.decay_start`); 0 = none.
    The SAEs that resample never decay (their LR re-warms after each resample)."""
    lr = 3e-4
    """Default learning rate at E‖x‖² = 1 inputs (`default_lr`); gated and jumprelu keep saecache's earlier default,
    not refitted across widths."""
    optimizer = "adam"
    """Default of `SAEConfig.optimizer` (the TopK family: "lazy-adam", `optim.LazyAdam`)."""
    nested = False
    """Latents form nested prefixes, `group_sizes` (matryoshka)."""
    cross_layer = False
    """A dictionary over several hooks (`crosslayer.CrossLayer`, built from a spec's hooks_in/hooks_out), not an
    `SAE`."""

    # ---- what the exporters and importers read (evaluate/formats.py, saelens.py, circuit_tracer.py, convert.py) ----
    feature_threshold = False
    """Inference keeps z > θ_F, a learned per-feature threshold `threshold_F` (jumprelu)."""
    extra_F: tuple[str, ...] = ()
    """Per-feature parameters of the inference map beyond W_enc_DF, b_enc_F, W_dec_FD, b_dec_D (gated: r_mag_F,
    b_mag_F)."""
    threshold_form = False
    """The inference map is f = z·(z > θ_F) with θ ≥ 0 on the pre-activation z (θ = 0: ReLU), the one form
    circuit-tracer's and SAELens' transcoder classes encode with (`threshold_F`). TopK's per-row selection and the
    gated SAE's two paths have none."""
    dl_classes: tuple[str, ...] = ()
    """dictionary_learning classes read as this architecture; the first is the one it is written as (none: not
    exportable to dictionary_learning)."""
    saelens_arch: str | None = None
    """SAELens `architecture` it is written as (None: none). The batchtopk family goes as `jumprelu` with its scalar
    threshold on every feature, the same inference map (`saelens_as_threshold`), and reads back as jumprelu."""
    saelens_as_threshold = False
    """Written to SAELens as the JumpReLU of `threshold_F`, not as itself."""
    saelens_names: dict[str, str] = {}
    """Tensors SAELens names otherwise than our name without its shape suffix (gated: b_enc_F is its `b_gate`)."""

    @property
    def threshold_key(self) -> str | None:
        """The module's tensor holding the inference threshold: threshold_F (per feature), threshold (the batchtopk
        family's scalar EMA) or None."""
        return "threshold_F" if self.feature_threshold else "threshold" if self.threshold else None

    def saelens_key(self, ours: str) -> str:
        """SAELens' name of our tensor `ours` (W_enc_DF -> W_enc, gated's b_enc_F -> b_gate)."""
        return self.saelens_names.get(ours, ours.rsplit("_", 1)[0])

    def export_threshold(self, threshold: Tensor | None, target: str) -> float:
        """The scalar inference threshold (the batchtopk family), refused in one line when training never estimated
        it (encode would then depend on the batch)."""
        t = float(threshold) if threshold is not None else -1.0
        if t < 0:
            raise RunDirError(f"cannot export this {self.name} SAE to {target}: it has no inference threshold yet "
                              "(train past the threshold start so encode does not depend on the batch)")
        return t

    def threshold_F(self, threshold: Tensor | None, width: int, target: str) -> Tensor | None:
        """θ_F of the inference map written as f = z·(z > θ_F) (`threshold_form`); None means θ = 0 (a ReLU).
        `threshold` is what the module holds at `threshold_key`."""
        raise RunDirError(f"{self.name} has no ReLU/JumpReLU form for {target}")

    def move_pre_bias(self, b_enc_F: Tensor, extras: dict[str, Tensor], shift_F: Tensor):
        """(b_enc_F, extras) of the same map after the pre-bias convention changed the pre-activation by shift_F
        (float64); see `evaluate.formats.DictWeights.with_pre_bias`."""
        return (b_enc_F.double() + shift_F).to(b_enc_F.dtype), extras

    def default_lr(self, width: int) -> float:
        """The learning rate of an SAE of `width` features when none is given."""
        return self.lr

    def resolve(self, c: dict, run: RunDefaults | None = None) -> dict:
        """Every default of one SAE of this architecture, filled in and checked: the one place they are resolved.

        `c` holds the SAE's settings by `sae.SAEConfig` field name (None = unset; `d_in` absent while the run's
        stores are not open). From a spec of a run (`run` given) it also holds the spec's hooks, name, lr,
        warmup_steps, decay_start and resample, and the run's defaults apply: k (the peers' 32), name, lr, LR
        warm-up, the batchtopk threshold's start and EMA, AuxK's dead threshold, resample and decay_start. Without
        `run` (a module built alone, a cfg.json read back, an import) k must be given. Returns the filled copy;
        subclasses extend it."""
        c = dict(c)
        width = c["width"]
        if run is not None and self.needs_k and c.get("k") is None:
            c["k"] = min(DEFAULT_K, width)
        if run is not None and c.get("name") is None:
            c["name"] = spec_name(c)
        penalty = c.get("penalty") if c.get("penalty") is not None else self.penalties[0]
        if penalty not in self.penalties:
            raise ConfigError(f"penalty {penalty!r} not available for {self.name}; use {self.penalties}")
        c["penalty"] = penalty
        c["optimizer"] = check_optimizer(c.get("optimizer"), self.optimizer)
        if c.get("coeff") is None:
            c["coeff"] = self.default_coeff[penalty]
        if c["coeff"] < 0:
            raise ConfigError(f"coeff must be ≥ 0, got {c['coeff']}")
        if self.needs_k and (c.get("k") is None or not 0 < c["k"] <= width):
            raise ConfigError(f"{self.name} needs 0 < k ≤ width ({width}), got k={c.get('k')}")
        if not self.needs_k and c.get("k") is not None:
            k_archs = "/".join(n for n, a in ARCHITECTURES.items() if a.needs_k)
            raise ConfigError(f"k is only for {k_archs}, not {self.name}")
        if c.get("group_sizes") is not None and not self.nested:
            raise ConfigError(f"group_sizes is only for matryoshka, not {self.name}")
        if c.get("d_in") is not None:  # the module's widths, once the store gave d_in
            if c.get("d_out") is None:
                c["d_out"] = c["d_in"]
            if c["d_out"] != c["d_in"]:
                c["transcoder"] = True
            if c.get("k_aux") is None:
                c["k_aux"] = max(1, c["d_out"] // 2)
        if c.get("target_l0") is not None and c["target_l0"] <= 0:
            raise ConfigError(f"target_l0 must be > 0, got {c['target_l0']}")
        if c.get("jumprelu_bandwidth", 1) <= 0 or not 0 <= c.get("threshold_beta", 0) < 1 \
                or c.get("dead_tokens_threshold", 1) <= 0:
            raise ConfigError("need jumprelu_bandwidth > 0, 0 ≤ threshold_beta < 1, dead_tokens_threshold > 0")
        return c if run is None else self.resolve_for_run(c, run)

    def resolve_for_run(self, c: dict, run: RunDefaults) -> dict:
        """The part of `resolve` a run decides (see there): lr, LR warm-up, threshold schedule, AuxK dead threshold,
        resample, decay_start; `c["name"]` names the SAE in messages."""
        T, sched, name = run.steps, run.schedule, c["name"]
        if c.get("lr") is None:
            c["lr"] = run.lr if run.lr is not None else self.default_lr(c["width"])
        if c.get("warmup_steps") is None:
            c["warmup_steps"] = run.warmup_steps if run.warmup_steps is not None else \
                min(self.max_warmup_steps, T // 10)
        if self.threshold:  # batchtopk, matryoshka
            for key in ("threshold_start_step", "threshold_beta"):
                if c.get(key) is None:
                    c[key] = sched[key]
            if c["threshold_start_step"] >= T:
                raise ConfigError(f"SAE {name}: threshold_start_step {c['threshold_start_step']} is not below the "
                                  f"run's {T} steps, so it would be saved without an inference threshold; lower "
                                  "threshold_start_step or train longer")
        if self.sparse and c.get("dead_tokens_threshold") is None:  # the TopK family's AuxK
            c["dead_tokens_threshold"] = sched["dead_tokens_threshold"]
        if c.get("resample") and run.resample_steps is None:
            raise ConfigError(f"SAE {name} is to be resampled (--resample) but the run has no --resample-steps "
                              "(set it, e.g. --resample-steps 25000)")
        if c.get("resample") is None:
            c["resample"] = run.resample_steps is not None and self.resample
        start = c.get("decay_start")
        if start is None and run.decay_start is not None:
            if c["resample"] and run.decay_start < T:
                raise ConfigError(f"--decay-start cannot be combined with resampling (the LR re-warms after each "
                                  f"resample); resampled SAE(s): {name}; pass --no-resample or drop --decay-start")
            start = run.decay_start
        if start is None:
            start = T if c["resample"] else T - round(self.decay_fraction * T)
        if not 0 <= start <= T:
            raise ConfigError(f"SAE {name}: decay_start must be in [0, {T}] (the run's steps = no decay), got {start}")
        if c["resample"] and start < T:
            raise ConfigError(f"SAE {name} resamples (its LR re-warms after each resample), so it cannot decay from "
                              f"step {start}; set its resample to false or drop its decay_start")
        c["decay_start"] = start
        return c

    def add_state(self, sae) -> None:
        """Register extra parameters and buffers on a fresh `SAE`."""

    def encode_train(self, sae, x_BD: Tensor) -> Code:
        raise NotImplementedError

    def encode(self, sae, x_BD: Tensor) -> Code:
        """The inference rule."""
        raise NotImplementedError

    def decode(self, sae, code: Code) -> Tensor:
        if code.f_BF is None:
            out = sparse_decode(code.sparse, sae.W_dec_FD) + sae.b_dec_D
        elif torch.is_grad_enabled() and code.count_F is not None:  # the training path: ∂L/∂f into a buffer
            out = DO.DecodeFrom.apply(code.f_BF, sae.W_dec_FD, sae.b_dec_D, sae._workspace, "g")
        else:
            out = torch.addmm(sae.b_dec_D, code.f_BF, sae.W_dec_FD)
        return out if code.skip_BD is None else out + code.skip_BD

    def reconstruct(self, sae, code: Code, target_BD: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x̂_BD, reconstruction loss Σ_D (x̂ − t)² mean over B, extra reconstruction losses or None)."""
        x_hat = self.decode(sae, code)
        return x_hat, P.reconstruction_loss(x_hat, target_BD), None

    def penalty(self, sae, code: Code) -> Tensor | None:
        """The unweighted sparsity penalty (None: none)."""
        if sae.cfg.penalty == "entropy":
            return P.entropy_penalty(code.gate_BF if code.gate_BF is not None else code.f_BF)
        return code.pen

    def aux_loss(self, sae, code: Code, x_hat_BD: Tensor, target_BD: Tensor) -> Tensor | None:
        """The weighted auxiliary loss (None: none)."""
        return None

    def after_step(self, sae, code: Code) -> None:
        """Training-mode bookkeeping after a loss (dead counters are the SAE's)."""


ARCHITECTURES: dict[str, Architecture] = {}
"""Every architecture by name (`arch` of a spec, an SAEConfig and cfg.json); filled by `arch.py`."""


def architecture(name: str) -> Architecture:
    """The architecture named `name` (cfg.json's and a spec's `arch`); one-line ConfigError for an unknown name."""
    arch = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if arch is None:
        raise ConfigError(f"unknown SAE architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return arch


def from_dl_class(dict_class: str) -> Architecture | None:
    """The architecture a dictionary_learning class is read as (None: not supported)."""
    return next((a for a in ARCHITECTURES.values() if dict_class in a.dl_classes), None)


def from_saelens(saelens_arch: str) -> Architecture | None:
    """The architecture a SAELens `architecture` is read as (None: not supported); its `jumprelu` is our jumprelu."""
    return next((a for a in ARCHITECTURES.values() if a.saelens_arch == saelens_arch and not a.saelens_as_threshold),
                None)
