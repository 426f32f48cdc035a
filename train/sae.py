"""The SAE module family: one `SAE` class whose architectures differ only in activation and sparsity penalty.

- relu:      ReLU + L1 (Anthropic, "Towards Monosemanticity": untied weights, unit-norm decoder rows, b_dec subtracted
             from the input), or the entropy penalty (`penalties.entropy_penalty`) as the alternative to L1.
- topk:      per-row TopK (Gao et al. 2024) with the AuxK loss on dead latents; sparse decoder (`sparse_ops`).
- batchtopk: top k·B over the whole batch (Bussmann et al. 2024); at inference a single threshold (EMA of the batch's
             smallest kept activation) replaces the batch selection.
- jumprelu:  JumpReLU with rectangle-kernel straight-through gradients and an L0 penalty toward `target_l0`
             (Rajamanoharan et al. 2024b); no pre-bias, as in the paper.
- gated:     Gated SAE (Rajamanoharan et al. 2024a): gate and magnitude paths share W_enc (magnitude scaled by
             exp(r_mag)); L1 on relu(π_gate) plus the auxiliary reconstruction through a frozen decoder.
             Here b_enc_F is the gate bias (b_gate), b_mag_F the magnitude bias.

A transcoder (d_out ≠ d_in, or `transcoder=True` for a different target hook of equal width) predicts a target from
another input. b_dec_D is then an output bias only; the input is centred by a fixed buffer b_in_D (geometric median of
the first input batch, set by `init_from_batch`), which plays the pre-bias role for the architectures that use one.

Scale convention: the default penalty coefficients assume inputs (and targets) normalised to E‖x‖² = 1; `fold_scale`
rewrites the weights afterwards so the saved module maps raw activations to raw targets.
Shapes: B rows, D width (D_in/D_out), F features, N selected entries in the batch (`sparse_ops.SparseCode`), M dead
latents.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saecache.errors import ConfigError
from saecache.train import penalties as P
from saecache.train.sparse_ops import (SparseCode, Workspace, batch_topk_select, centered_linear, dead_topk_select,
                                       sparse_decode, sparse_encode, topk_select, with_extra_columns)


@dataclass(frozen=True)
class Architecture:
    """What distinguishes one architecture of the family; the code paths in `SAE` key off these flags."""
    description: str
    sparse: bool          # codes are (values, indices) of K latents per row; decoder and its backward are sparse
    pre_bias: bool        # subtract b_dec (SAE) / b_in_D (transcoder) from the input before the encoder
    needs_k: bool
    penalties: tuple[str, ...]              # allowed `penalty` values
    default_coeff: dict[str, float]         # penalty -> default sparsity_coeff


ARCHITECTURES: dict[str, Architecture] = {
    "relu": Architecture("ReLU + L1 or entropy penalty", False, True, False, ("l1", "entropy"),
                         {"l1": 0.1, "entropy": 0.03}),
    "topk": Architecture("per-row TopK + AuxK", True, True, True, ("none",), {"none": 0.0}),
    "batchtopk": Architecture("batch TopK + AuxK, threshold at inference", True, True, True, ("none",), {"none": 0.0}),
    "jumprelu": Architecture("JumpReLU + L0 toward target_l0", False, False, False, ("l0",), {"l0": 1.0}),
    "gated": Architecture("Gated SAE + aux loss", False, True, False, ("l1", "entropy"), {"l1": 0.1, "entropy": 0.03}),
}


@dataclass(frozen=True)
class SAEConfig:
    """Everything needed to rebuild an SAE (saved as cfg.json beside the weights). Defaults are resolved in
    `__post_init__`, so the saved config shows the values actually used."""

    architecture: str
    """One of ARCHITECTURES: relu, topk, batchtopk, jumprelu, gated."""
    d_in: int
    """Input width D_in."""
    n_features: int
    """Dictionary size F."""
    d_out: int | None = None
    """Output (target) width; None means d_in."""
    transcoder: bool = False
    """Predict a different target than the input (another hook). Forced on when d_out ≠ d_in."""
    k: int | None = None
    """topk/batchtopk: active latents per row (batchtopk: on average over the batch)."""
    penalty: str | None = None
    """relu/gated: "l1" (default) or "entropy"; jumprelu: "l0"; topk family: "none". None picks the default."""
    sparsity_coeff: float | None = None
    """λ multiplying the penalty; None picks the architecture default (relu/gated: l1 0.1, entropy 0.03;
    jumprelu 1.0; topk family 0, unused)."""
    auxk_alpha: float = 1 / 32
    """topk family: weight of the AuxK loss."""
    dead_tokens_threshold: int = 10_000_000
    """topk family: a latent that has not fired for this many training tokens is dead (for AuxK)."""
    k_aux: int | None = None
    """topk family: dead latents used per row by AuxK; None means d_out // 2."""
    threshold_beta: float = 0.999
    """batchtopk: EMA decay of the inference threshold."""
    threshold_start_step: int = 1000
    """batchtopk: training steps before the threshold EMA starts (early activations are not representative)."""
    jumprelu_bandwidth: float = 0.001
    """jumprelu: width ε of the rectangle kernel of the pseudo-gradient."""
    jumprelu_init_threshold: float = 0.001
    """jumprelu: initial threshold θ of every feature."""
    target_l0: float | None = None
    """jumprelu: L0 the penalty pulls toward; None means 20."""

    def __post_init__(self):
        arch = ARCHITECTURES.get(self.architecture)
        if arch is None:
            raise ConfigError(f"unknown SAE architecture {self.architecture!r}; known: {', '.join(ARCHITECTURES)}")
        if self.d_in <= 0 or self.n_features <= 0 or (self.d_out is not None and self.d_out <= 0):
            raise ConfigError(f"widths must be positive (d_in={self.d_in}, n_features={self.n_features}, "
                              f"d_out={self.d_out})")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: resolve defaults)
        if self.d_out is None:
            set_("d_out", self.d_in)
        if self.d_out != self.d_in:
            set_("transcoder", True)
        penalty = self.penalty if self.penalty is not None else arch.penalties[0]
        if penalty not in arch.penalties:
            raise ConfigError(f"penalty {penalty!r} not available for {self.architecture}; use {arch.penalties}")
        set_("penalty", penalty)
        if self.sparsity_coeff is None:
            set_("sparsity_coeff", arch.default_coeff[penalty])
        if self.sparsity_coeff < 0:
            raise ConfigError(f"sparsity_coeff must be ≥ 0, got {self.sparsity_coeff}")
        if arch.needs_k and (self.k is None or not 0 < self.k <= self.n_features):
            raise ConfigError(f"{self.architecture} needs 0 < k ≤ n_features ({self.n_features}), got k={self.k}")
        if not arch.needs_k and self.k is not None:
            raise ConfigError(f"k is only for topk/batchtopk, not {self.architecture}")
        if self.k_aux is None:
            set_("k_aux", max(1, self.d_out // 2))
        if self.architecture == "jumprelu" and self.target_l0 is None:
            set_("target_l0", 20.0)
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise ConfigError(f"target_l0 must be > 0, got {self.target_l0}")
        if self.jumprelu_bandwidth <= 0 or not 0 <= self.threshold_beta < 1 or self.dead_tokens_threshold <= 0:
            raise ConfigError("need jumprelu_bandwidth > 0, 0 ≤ threshold_beta < 1, dead_tokens_threshold > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"SAE config has unknown fields {sorted(unknown)} (written by a newer saecache?)")
        return cls(**d)


@dataclass
class Code:
    """Post-activation features in whichever form the architecture produces."""
    f_BF: Tensor | None = None          # dense features (relu, jumprelu, gated, dense inference)
    sparse: SparseCode | None = None    # topk family: the selected latents (values, latents, rows)
    gate_BF: Tensor | None = None       # gated: relu(π_gate), for the penalty and aux loss
    aux: SparseCode | None = None       # topk family: AuxK codes over dead latents
    l0_pen: Tensor | None = None        # jumprelu: differentiable mean L0

    def dense(self, n_features: int) -> Tensor:
        return self.f_BF if self.f_BF is not None else self.sparse.dense(n_features)


@dataclass
class LossOutput:
    total: Tensor        # recon + λ·scale·sparsity + aux: what to backpropagate
    recon: Tensor        # Σ_D (x̂ − target)², mean over B
    sparsity: Tensor     # the unweighted penalty (0 for the topk family)
    aux: Tensor          # weighted auxiliary loss (AuxK, gated aux), 0 if none
    x_hat_BD: Tensor
    l0: Tensor           # mean number of active latents per row (no grad)
    code: Code
    n_features: int

    @property
    def f_BF(self) -> Tensor:
        """Dense features (materialised on demand: [B, F] is large for the sparse architectures)."""
        return self.code.dense(self.n_features).detach()


def normalisation_scale(mean_sq_norm: float) -> float:
    """Divide activations by this to get E‖x‖² = 1, the scale the default coefficients assume."""
    return float(mean_sq_norm) ** 0.5 if mean_sq_norm > 0 else 1.0


class SAE(nn.Module):
    """Encoder z = (x − b_pre) @ W_enc_DF + b_enc_F, an architecture's activation, decoder f @ W_dec_FD + b_dec_D."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg, self.arch = cfg, ARCHITECTURES[cfg.architecture]
        D, F, Do = cfg.d_in, cfg.n_features, cfg.d_out
        W_dec = torch.randn(F, Do)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc_FD = W_dec.clone() if D == Do else torch.randn(F, D) / D ** 0.5
        # W_enc_DF is stored feature-major ([F, D] memory, viewed as [D, F]): the sparse backward writes rows of it.
        self.W_enc_DF = nn.Parameter(W_enc_FD.contiguous().t())
        self.b_enc_F = nn.Parameter(torch.zeros(F))
        self.W_dec_FD = nn.Parameter(W_dec)
        self.b_dec_D = nn.Parameter(torch.zeros(Do))
        if cfg.transcoder:
            self.register_buffer("b_in_D", torch.zeros(D))
        if cfg.architecture == "jumprelu":
            self.threshold_F = nn.Parameter(torch.full((F,), cfg.jumprelu_init_threshold))
        if cfg.architecture == "gated":
            self.r_mag_F = nn.Parameter(torch.zeros(F))
            self.b_mag_F = nn.Parameter(torch.zeros(F))
        if cfg.architecture == "batchtopk":
            self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet
        self.register_buffer("tokens_since_fired_F", torch.zeros(F, dtype=torch.long))
        self.register_buffer("n_steps", torch.zeros((), dtype=torch.long))
        self._workspace = Workspace()  # topk family, training: the reused [B, F] pre-activation buffer

    # ---- pieces ----
    def _pre_bias(self) -> Tensor | None:
        if not self.arch.pre_bias:
            return None
        return self.b_in_D if self.cfg.transcoder else self.b_dec_D

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return centered_linear(x_BD, self._pre_bias(), self.W_enc_DF, self.b_enc_F)

    def _gated(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        pi_gate = self.pre_acts(x_BD)  # the gate bias is b_enc_F; the magnitude path shares the product with it
        pi_mag = (pi_gate - self.b_enc_F) * self.r_mag_F.exp() + self.b_mag_F
        return (pi_gate > 0) * pi_mag.relu(), pi_gate.relu()

    def _code(self, x_BD: Tensor, train: bool) -> Code:
        cfg, name = self.cfg, self.cfg.architecture
        if name == "relu":
            return Code(f_BF=self.pre_acts(x_BD).relu())
        if name == "gated":
            f, gate = self._gated(x_BD)
            return Code(f_BF=f, gate_BF=gate)
        if name == "jumprelu":
            f, l0 = P.JumpReLUWithL0.apply(self.pre_acts(x_BD), self.threshold_F, cfg.jumprelu_bandwidth)
            return Code(f_BF=f, l0_pen=l0 if train else None)
        # topk family
        if name == "batchtopk" and not train and float(self.threshold) >= 0:
            z = self.pre_acts(x_BD)
            return Code(f_BF=z.relu() * (z > self.threshold))
        select = topk_select(cfg.k) if name == "topk" else batch_topk_select(cfg.k)
        dead_M = (self.tokens_since_fired_F >= cfg.dead_tokens_threshold).nonzero().squeeze(1) if train else None
        n_aux = 0 if dead_M is None else min(cfg.k_aux, dead_M.numel())
        if n_aux:
            select = with_extra_columns(select, dead_topk_select(dead_M, n_aux))
        sparse = sparse_encode(x_BD, self._pre_bias(), self.W_enc_DF, self.b_enc_F, select,
                               self._workspace if train else None)
        if not n_aux:
            return Code(sparse=sparse)
        main, aux = sparse.split(sparse.vals_N.numel() - x_BD.shape[0] * n_aux)  # the extras come last
        return Code(sparse=main, aux=aux)

    def _decode_code(self, code: Code) -> Tensor:
        if code.f_BF is not None:
            return self.decode(code.f_BF)
        return sparse_decode(code.sparse, self.W_dec_FD) + self.b_dec_D

    # ---- public API ----
    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense post-activation features f_BF, inference behaviour."""
        return self._code(x_BD, train=False).dense(self.cfg.n_features)

    def decode(self, f_BF: Tensor) -> Tensor:
        return torch.addmm(self.b_dec_D, f_BF, self.W_dec_FD)

    def forward(self, x_BD: Tensor) -> Tensor:
        """Reconstruction (inference behaviour); equals decode(encode(x)) up to float rounding."""
        return self._decode_code(self._code(x_BD, train=False))

    def loss(self, x_BD: Tensor, target_BD: Tensor | None = None, sparsity_scale: float = 1.0) -> LossOutput:
        """Training loss. In training mode this also updates the dead-latent counters (and batchtopk's threshold)."""
        cfg, name = self.cfg, self.cfg.architecture
        target_BD = x_BD if target_BD is None else target_BD
        code = self._code(x_BD, train=True)
        x_hat = self._decode_code(code)
        recon = P.reconstruction_loss(x_hat, target_BD)
        zero = recon.new_zeros(())
        sparsity, aux = zero, zero
        if name in ("relu", "gated"):
            acts = code.f_BF if name == "relu" else code.gate_BF
            sparsity = P.l1_penalty(acts, nonneg=True) if cfg.penalty == "l1" else P.entropy_penalty(acts)
        if name == "gated":
            frozen = torch.addmm(self.b_dec_D.detach(), code.gate_BF, self.W_dec_FD.detach())
            aux = P.reconstruction_loss(frozen, target_BD)
        if name == "jumprelu":
            sparsity = P.l0_toward_target(code.l0_pen, cfg.target_l0)
        if code.aux is not None:
            e_hat = sparse_decode(code.aux, self.W_dec_FD)
            aux = cfg.auxk_alpha * P.auxk_loss(e_hat, (target_BD - x_hat).detach())
        total = recon + cfg.sparsity_coeff * sparsity_scale * sparsity + aux
        with torch.no_grad():
            if code.f_BF is not None:  # features are ≥ 0: sign() is the activity indicator (cheapest [B, F] pass)
                count_F = code.f_BF.sign().sum(0, dtype=torch.float32)
                l0, fired_F = (count_F.double().sum() / code.f_BF.shape[0]).float(), count_F > 0
            else:
                active_N = code.sparse.vals_N > 0
                l0 = active_N.sum().float() / x_BD.shape[0]
                fired_F = torch.zeros(cfg.n_features, dtype=torch.bool, device=x_BD.device)
                fired_F[code.sparse.idx_N[active_N]] = True
            if self.training:
                self._update_stats(code, fired_F, x_BD.shape[0])
        return LossOutput(total, recon, sparsity, aux, x_hat, l0, code, cfg.n_features)

    @torch.no_grad()
    def _update_stats(self, code: Code, fired_F: Tensor, n_rows: int) -> None:
        self.tokens_since_fired_F += n_rows
        self.tokens_since_fired_F[fired_F] = 0
        self.n_steps += 1
        if self.cfg.architecture == "batchtopk" and int(self.n_steps) > self.cfg.threshold_start_step:
            kept = code.sparse.vals_N[code.sparse.vals_N > 0]
            if kept.numel():
                m, beta = kept.min(), self.cfg.threshold_beta
                self.threshold.copy_(m if float(self.threshold) < 0 else beta * self.threshold + (1 - beta) * m)

    def dead_mask(self, window_tokens: int) -> Tensor:
        """Latents that have not fired in the last `window_tokens` training tokens."""
        return self.tokens_since_fired_F >= window_tokens

    @torch.no_grad()
    def init_from_batch(self, x_BD: Tensor, target_BD: Tensor | None = None) -> None:
        """b_dec = geometric median of the targets (Weiszfeld); a transcoder's input centre b_in_D = that of x."""
        self.b_dec_D.copy_(P.geometric_median(x_BD if target_BD is None else target_BD))
        if self.cfg.transcoder:
            self.b_in_D.copy_(P.geometric_median(x_BD))

    @torch.no_grad()
    def fold_scale(self, in_scale: float, out_scale: float) -> None:
        """Training saw x / in_scale and predicted target / out_scale. Rewrite the weights so the module maps raw x to
        raw targets with the same features f. Decoder rows then have norm out_scale (stop renormalising)."""
        if not self.cfg.transcoder and self.arch.pre_bias and in_scale != out_scale:
            raise ConfigError("an SAE whose b_dec is also the pre-bias needs in_scale == out_scale")
        self.W_enc_DF.div_(in_scale)
        if self.cfg.transcoder:
            self.b_in_D.mul_(in_scale)
        self.W_dec_FD.mul_(out_scale)
        self.b_dec_D.mul_(out_scale)

    def state_for_save(self) -> dict[str, Tensor]:
        """Parameters and buffers (dead counters included, so a checkpoint resumes exactly), contiguous, on CPU."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_state(cls, cfg: SAEConfig, tensors: dict[str, Tensor]) -> "SAE":
        sae = cls(cfg)
        expected = sae.state_dict()
        missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
        bad = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
        if missing or unexpected or bad:
            raise ConfigError(f"SAE weights do not match the config ({cfg.architecture}, d_in={cfg.d_in}, "
                              f"F={cfg.n_features}, d_out={cfg.d_out}): missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)}, wrong shape {bad}")
        with torch.no_grad():
            for k, v in sae.state_dict().items():
                v.copy_(tensors[k])
        return sae


def save_sae(sae: SAE, path) -> None:
    """Weights as safetensors; the config rides along in the metadata for inspection (cfg.json is authoritative)."""
    save_file(sae.state_for_save(), str(path), metadata={"saecache_sae_config": json.dumps(sae.cfg.to_dict())})


def load_sae(cfg: SAEConfig, path, device: str | torch.device = "cpu") -> SAE:
    return SAE.from_state(cfg, load_file(str(path))).to(device)
