"""The architectures of the SAE family as small objects behind one interface, and their registry `ARCHITECTURES`.

An `Architecture` says what varies between SAEs that share `sae.SAE`'s weights (W_enc_DF, b_enc_F, W_dec_FD, b_dec_D):
its extra state (`add_state`), its training activation + penalty (`encode_train`: the sparse path for the TopK family,
the fused buffered path of `dense_ops` for the dense ones), its inference rule (`encode`), its reconstruction loss
(`reconstruct`: Matryoshka sums nested prefixes), its auxiliary loss (`aux_loss`: AuxK, the gated frozen-decoder
loss) and its per-step bookkeeping (`after_step`: BatchTopK's inference threshold). What the exporters and importers
need is here too: the tensors of its inference map (`threshold_key`, `extra_F`), whether it has a ReLU/JumpReLU form
(`threshold_form`, `threshold_F`), the dictionary_learning and SAELens names it goes by (`dl_classes`,
`saelens_arch`, `saelens_key`) and the one-line refusals. The trainer, the exporters and evaluation read only these
attributes and methods, never an architecture's name; adding an architecture is one class and one registry entry.

- relu:       ReLU + L1 (Anthropic, "Towards Monosemanticity") or the entropy penalty.
- topk:       per-row TopK + AuxK (Gao et al. 2024).
- batchtopk:  batch TopK + AuxK (Bussmann et al. 2024); inference keeps f > threshold (EMA of the batch minimum).
- jumprelu:   JumpReLU + L0 toward target_l0 (Rajamanoharan et al. 2024b); no pre-bias.
- gated:      Gated SAE + frozen-decoder aux loss (Rajamanoharan et al. 2024a).
- skip-transcoder: a TopK transcoder plus a learned linear skip term x @ W_skip_DDᵀ from the raw input to the output
              (sparsify's skip connection; circuit-tracer's `W_skip` layout [D_out, D_in]), initialised to zero.
- matryoshka: Matryoshka BatchTopK (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs"):
              BatchTopK whose latents form nested prefixes (`group_sizes`); every prefix reconstructs the target on
              its own and the loss is the sum of the prefix losses. Inference as BatchTopK.

Shapes: B rows, D width, F features, G Matryoshka groups, N selected entries (`sparse_ops.SparseCode`), M dead latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from saecache.errors import ConfigError, RunDirError
from saecache.train import dense_ops as DO
from saecache.train import penalties as P
from saecache.train.ddp import batch_variance
from saecache.train.sparse_ops import (SparseCode, batch_topk_select, dead_topk_select, sparse_decode, sparse_encode,
                                       topk_select, with_extra_columns)


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

    def dense(self, n_features: int) -> Tensor:
        return self.f_BF if self.f_BF is not None else self.sparse.dense(n_features)


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
    decay_fraction = 0.0
    """Default share of the run, at its end, over which the LR decays linearly to 0 (`SAESpec.decay_start`); 0 = none.
    The SAEs that resample never decay (their LR re-warms after each resample)."""
    lr = 3e-4
    """Default learning rate at E‖x‖² = 1 inputs (`default_lr`); gated and jumprelu keep saecache's earlier default,
    not refitted across widths."""
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

    def threshold_F(self, threshold: Tensor | None, n_features: int, target: str) -> Tensor | None:
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
        decay_start and resample, and the run's defaults apply: k (the peers' 32), name, lr, the batchtopk
        threshold's start and EMA, AuxK's dead threshold, resample and decay_start. Without `run` (a module built
        alone, a cfg.json read back, an import) k must be given. Returns the filled copy; subclasses extend it."""
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
        """The part of `resolve` a run decides (see there): lr, threshold schedule, AuxK dead threshold, resample,
        decay_start; `c["name"]` names the SAE in messages."""
        T, sched, name = run.steps, run.schedule, c["name"]
        if c.get("lr") is None:
            c["lr"] = run.lr if run.lr is not None else self.default_lr(c["width"])
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


class ReLU(Architecture):
    name, description = "relu", "ReLU + L1 or entropy penalty"
    threshold_form, dl_classes, saelens_arch = True, ("AutoEncoder", "AutoEncoderNew"), "standard"
    lr = 1e-3  # dictionary_learning's StandardTrainer rate: with the gradient clip it beat 3e-4 at every L0 measured
    penalties, default_coeff = ("l1", "entropy"), {"l1": 0.1, "entropy": 0.03}

    def encode_train(self, sae, x_BD):
        stats: dict = {}
        f, pen = DO.ReLUL1.apply(sae.pre_acts(x_BD, train=True), sae._workspace, stats)
        return Code(f_BF=f, pen=pen, count_F=stats["count_F"])

    def encode(self, sae, x_BD):
        return Code(f_BF=sae.pre_acts(x_BD).relu())

    def threshold_F(self, threshold, n_features, target):
        return None


class JumpReLU(Architecture):
    name, description = "jumprelu", "JumpReLU + L0 toward target_l0"
    pre_bias, penalties, default_coeff = False, ("l0",), {"l0": 1.0}
    feature_threshold, threshold_form, dl_classes, saelens_arch = True, True, ("JumpReluAutoEncoder",), "jumprelu"

    def resolve(self, c, run=None):
        c = {**c, "target_l0": 20.0 if c.get("target_l0") is None else c["target_l0"]}
        return super().resolve(c, run)

    def add_state(self, sae):
        sae.threshold_F = torch.nn.Parameter(torch.full((sae.cfg.width,), sae.cfg.jumprelu_init_threshold))

    def encode_train(self, sae, x_BD):
        stats: dict = {}
        f, l0 = DO.JumpReLUL0.apply(sae.pre_acts(x_BD, train=True), sae.threshold_F, sae.cfg.jumprelu_bandwidth,
                                    sae._workspace, stats)
        return Code(f_BF=f, pen=l0, count_F=stats["count_F"])

    def encode(self, sae, x_BD):
        z = sae.pre_acts(x_BD)
        return Code(f_BF=z * (z > sae.threshold_F.clamp_min(0)))

    def penalty(self, sae, code):
        return P.l0_toward_target(code.pen, sae.cfg.target_l0)

    def threshold_F(self, threshold, n_features, target):
        return threshold


class Gated(Architecture):
    """b_enc_F is the gate bias (b_gate); the magnitude path shares W_enc, scaled by exp(r_mag), with bias b_mag_F."""
    name, description = "gated", "Gated SAE + aux loss"
    penalties, default_coeff = ("l1", "entropy"), {"l1": 0.1, "entropy": 0.03}
    extra_F, dl_classes, saelens_arch, saelens_names = ("r_mag_F", "b_mag_F"), ("GatedAutoEncoder",), "gated", \
        {"b_enc_F": "b_gate"}

    def move_pre_bias(self, b_enc_F, extras, shift_F):
        """The gate bias moves by shift_F, the magnitude bias by shift_F · exp(r_mag)."""
        b_mag = extras["b_mag_F"]
        b_mag = (b_mag.double() + shift_F * extras["r_mag_F"].double().exp()).to(b_mag.dtype)
        return (b_enc_F.double() + shift_F).to(b_enc_F.dtype), {**extras, "b_mag_F": b_mag}

    def add_state(self, sae):
        sae.r_mag_F = torch.nn.Parameter(torch.zeros(sae.cfg.width))
        sae.b_mag_F = torch.nn.Parameter(torch.zeros(sae.cfg.width))

    def encode_train(self, sae, x_BD):
        stats: dict = {}
        f, gate, pen = DO.GatedL1.apply(sae.pre_acts(x_BD, train=True), sae.b_enc_F, sae.r_mag_F, sae.b_mag_F,
                                        sae._workspace, stats)
        return Code(f_BF=f, gate_BF=gate, pen=pen, count_F=stats["count_F"])

    def encode(self, sae, x_BD):
        pi_gate = sae.pre_acts(x_BD)
        pi_mag = (pi_gate - sae.b_enc_F) * sae.r_mag_F.exp() + sae.b_mag_F
        return Code(f_BF=(pi_gate > 0) * pi_mag.relu(), gate_BF=pi_gate.relu())

    def aux_loss(self, sae, code, x_hat_BD, target_BD):
        """Reconstruction from relu(π_gate) through a frozen copy of the decoder (gradient to the gate path only)."""
        if torch.is_grad_enabled() and code.count_F is not None:
            frozen = DO.DecodeFrom.apply(code.gate_BF, sae.W_dec_FD.detach(), sae.b_dec_D.detach(), sae._workspace,
                                         "g2")
        else:
            frozen = torch.addmm(sae.b_dec_D.detach(), code.gate_BF, sae.W_dec_FD.detach())
        return P.reconstruction_loss(frozen, target_BD)


class TopK(Architecture):
    name, description = "topk", "per-row TopK + AuxK"
    sparse, needs_k, resample = True, True, False
    dl_classes, saelens_arch = ("AutoEncoderTopK",), "topk"
    decay_fraction = 0.5
    """Decay over the last half: at 3× Gao et al.'s rate, with AuxK on latents silent for a hundredth of the run, it
    halved the latents that fire on no held-out row at an unchanged held-out FVE; over the last 80 % or the whole run
    it cost FVE at 4× (bench/results/quality_lr.md)."""

    def default_lr(self, width: int) -> float:
        """8e-4 / sqrt(F / 2^14) (the whole TopK family): the width scaling Gao et al. (2024, "Scaling and evaluating
        sparse autoencoders") fitted, 2e-4 / sqrt(F / 2^14) and the default of dictionary_learning and sparsify, times
        4. Their rate has no gradient clip; under saecache's (`TrainConfig.grad_clip`) the early steps are capped, and
        held-out FVE rose with the multiple up to 4× (6× still higher at F=4096, with more rarely firing latents) at
        every width measured, with decay over the last half (bench/results/quality_lr.md: the demo model at F=1024
        and 4096, SmolLM2-135M-Instruct's layer-3 MLP output at 4608)."""
        return 8e-4 / (width / 2 ** 14) ** 0.5

    def select(self, cfg):
        return topk_select(cfg.k)

    def encode_train(self, sae, x_BD):
        cfg = sae.cfg
        select = self.select(cfg)
        dead_M = (sae.tokens_since_fired_F >= cfg.dead_tokens_threshold).nonzero().squeeze(1)
        n_aux = min(cfg.k_aux, dead_M.numel())
        if n_aux:
            select = with_extra_columns(select, dead_topk_select(dead_M, n_aux))
        sparse = sae.sparse_encode(x_BD, select, train=True)
        if not n_aux:
            return Code(sparse=sparse)
        main, aux = sparse.split(sparse.vals_N.numel() - x_BD.shape[0] * n_aux)  # the extras come last
        return Code(sparse=main, aux=aux)

    def encode(self, sae, x_BD):
        return Code(sparse=sae.sparse_encode(x_BD, self.select(sae.cfg)))

    def aux_loss(self, sae, code, x_hat_BD, target_BD):
        if code.aux is None:
            return None
        e_hat = sparse_decode(code.aux, sae.W_dec_FD)
        e_BD = (target_BD - x_hat_BD).detach()
        return sae.cfg.auxk_alpha * P.auxk_loss(e_hat, e_BD, batch_variance(e_BD))


class BatchTopK(TopK):
    name, description = "batchtopk", "batch TopK + AuxK, threshold at inference"
    threshold, threshold_form, dl_classes, saelens_arch, saelens_as_threshold = True, True, ("BatchTopKSAE",), \
        "jumprelu", True

    def threshold_F(self, threshold, n_features, target):
        return torch.full((n_features,), self.export_threshold(threshold, target), dtype=torch.float32)

    def select(self, cfg):
        return batch_topk_select(cfg.k)

    def add_state(self, sae):
        sae.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    def encode(self, sae, x_BD):
        if float(sae.threshold) < 0:  # no threshold yet: the batch selection
            return super().encode(sae, x_BD)
        z = sae.pre_acts(x_BD)
        return Code(f_BF=z.relu() * (z > sae.threshold))

    @torch.no_grad()
    def after_step(self, sae, code):
        """Inference threshold: EMA of the smallest kept activation, from `threshold_start_step` on."""
        if int(sae.n_steps) <= sae.cfg.threshold_start_step:
            return
        kept = code.sparse.vals_N[code.sparse.vals_N > 0]
        if kept.numel():
            m, beta = kept.min(), sae.cfg.threshold_beta
            sae.threshold.copy_(m if float(sae.threshold) < 0 else beta * sae.threshold + (1 - beta) * m)


class SkipTranscoder(TopK):
    """A TopK transcoder whose output adds a linear map of the raw input, `x @ W_skip_DDᵀ` (W_skip_DD is [D_out,
    D_in], nn.Linear's and circuit-tracer's layout), learned with the rest and initialised to zero (sparsify's
    `skip_connection`): the linear part of the MLP costs no latents, which lowers the error at a given L0. Always a
    transcoder (input centred by b_in_D, b_dec_D an output bias)."""
    name, description = "skip-transcoder", "TopK transcoder + learned linear skip term W_skip x"
    dl_classes, saelens_arch = (), None

    def resolve(self, c, run=None):
        return super().resolve({**c, "transcoder": True}, run)

    def add_state(self, sae):
        sae.W_skip_DD = torch.nn.Parameter(torch.zeros(sae.cfg.d_out, sae.cfg.d_in))

    def encode_train(self, sae, x_BD):
        code = super().encode_train(sae, x_BD)
        code.skip_BD = sae.skip(x_BD)
        return code

    def encode(self, sae, x_BD):
        code = super().encode(sae, x_BD)
        code.skip_BD = sae.skip(x_BD)
        return code


class CrossLayerFamily(Architecture):
    """The cross-layer dictionaries (`crosslayer.py`): `kind` clt or crosscoder, with one `activation` (topk,
    batchtopk, jumprelu). Named `kind` for TopK, `kind-activation` otherwise. These objects carry what the
    TrainConfig resolves per architecture (k, learning rate, decay, batchtopk threshold); the module itself is
    `crosslayer.CrossLayer`, and an `SAE` refuses them."""
    cross_layer, resample = True, False

    def __init__(self, kind: str, activation: str):
        self.kind, self.activation = kind, activation
        self.name = kind if activation == "topk" else f"{kind}-{activation}"
        what = {"clt": "cross-layer transcoder", "crosscoder": "acausal crosscoder"}[kind]
        self.description = f"{what}, {activation}"
        self.needs_k = self.sparse = activation != "jumprelu"  # sparse: AuxK's dead threshold is resolved by the run
        self.threshold = activation == "batchtopk"
        self.threshold_form = activation != "topk"  # circuit-tracer's CLTs encode with JumpReLU
        self.transcoder = kind == "clt"
        """Reconstructs other hooks than it reads, layer by layer (circuit-tracer's cross-layer transcoders)."""
        self.decay_fraction = TopK.decay_fraction if self.needs_k else 0.0

    def default_lr(self, width: int) -> float:
        return TopK().default_lr(width) if self.needs_k else self.lr

    def resolve(self, c, run=None):
        """A spec's run defaults (k, lr, decay, batchtopk threshold, AuxK dead threshold); `CrossLayerConfig`
        resolves the module's widths. An `SAE`'s config refuses it."""
        if run is None or not c.get("hooks_in"):
            raise ConfigError(f"{self.name} is a dictionary over several hooks: give its spec hooks_in (and "
                              "hooks_out), not hook_in")
        c = dict(c)
        if c.get("penalty") is not None:
            raise ConfigError(f"{self.name} takes no penalty (jumprelu's is the tanh penalty, weighted by coeff)")
        if c.get("resample"):
            raise ConfigError(f"{self.name} does not resample dead latents; set resample to false")
        if self.needs_k and c.get("k") is None:
            c["k"] = min(DEFAULT_K, c["width"])
        if self.needs_k and not 0 < c["k"] <= c["width"]:
            raise ConfigError(f"{self.activation} needs 0 < k ≤ n_features ({c['width']}), got k={c['k']}")
        if not self.needs_k and c.get("k") is not None:
            raise ConfigError(f"k is only for topk/batchtopk, not {self.activation}")
        if c.get("name") is None:
            c["name"] = spec_name(c)
        return self.resolve_for_run(c, run)


def default_group_sizes(width: int) -> list[int]:
    """Nested prefixes of width/16, /8, /4, /2 and the whole dictionary (fewer when width is small)."""
    ends = sorted({max(1, width >> s) for s in (4, 3, 2, 1)} | {width})
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


class Matryoshka(BatchTopK):
    name, description = "matryoshka", "Matryoshka BatchTopK: nested prefixes, sum of prefix losses"
    nested, dl_classes = True, ("MatryoshkaBatchTopKSAE",)

    def resolve(self, c, run=None):
        width, given = c["width"], c.get("group_sizes")
        sizes = default_group_sizes(width) if given is None else list(given)
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes) \
                or sum(sizes) != width:
            raise ConfigError(f"group_sizes must be positive integers summing to width={width}, got {given}; e.g. "
                              f"{default_group_sizes(width)}")
        return super().resolve({**c, "group_sizes": sizes}, run)

    def reconstruct(self, sae, code, target_BD):
        """x̂_g = b_dec + the decode of the latents below prefix end g, for every g at once: one sparse decode into
        [B·G, D] bags (an entry's bag is row·G + its group; entries are row-major, so bags stay sorted), then a
        cumulative sum over groups. recon is the whole dictionary's loss; the inner prefixes' losses are returned
        as the extra term (the training loss is their sum)."""
        c = code.sparse
        if c is None:  # thresholded dense inference code
            return super().reconstruct(sae, code, target_BD)
        B, G = c.n_rows, len(sae.cfg.group_sizes)
        ends = torch.tensor(sae.cfg.group_sizes, device=c.idx_N.device).cumsum(0)
        group_N = torch.bucketize(c.idx_N, ends, right=True)
        bag_N = c.row_N * G + group_N
        parts_BGD = sparse_decode(SparseCode(c.vals_N, c.idx_N, bag_N, B * G), sae.W_dec_FD).view(B, G, -1)
        err_G, x_hat_BD = P.NestedPrefixLosses.apply(parts_BGD, sae.b_dec_D, target_BD, sae._workspace)
        return x_hat_BD, err_G[-1], err_G[:-1].sum()


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (ReLU(), TopK(), BatchTopK(), JumpReLU(), Gated(),
                                                              Matryoshka(), SkipTranscoder())}
ARCHITECTURES.update({a.name: a for a in (CrossLayerFamily(kind, act) for kind in ("clt", "crosscoder")
                                          for act in ("topk", "batchtopk", "jumprelu"))})


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
