"""The SAE module family: one `SAE` class (weights, dead-latent counters, save/load, scale folding); what differs per
architecture (activation, penalty and auxiliary loss, inference rule, sparse path) is an object in `arch.py`
(relu, topk, batchtopk, jumprelu, gated, matryoshka, skip-transcoder), looked up in `ARCHITECTURES` by `SAEConfig.arch`.

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
from saecache.train import ddp
from saecache.train import dense_ops as DO
from saecache.train import penalties as P
from saecache.train.arch import ARCHITECTURES, DEAD_TOKENS_THRESHOLD, Architecture, Code, architecture  # noqa: F401
from saecache.train.sparse_ops import SparseCode, Workspace, centered_linear, sparse_encode

# cfg.json written before the fields took SAESpec's names (saecache < 0.2): old name -> new name
RENAMED_FIELDS = {"architecture": "arch", "n_features": "width", "sparsity_coeff": "coeff"}


@dataclass(frozen=True)
class SAEConfig:
    """Everything needed to rebuild an SAE (saved as cfg.json beside the weights). Defaults are resolved in
    `__post_init__` by the architecture (`Architecture.resolve`), so the saved config shows the values actually used. Field names are `SAESpec`'s where both have
    one (arch, width, coeff); `from_dict` still reads the old names (architecture, n_features, sparsity_coeff)."""

    arch: str
    """One of ARCHITECTURES: relu, topk, batchtopk, jumprelu, gated, matryoshka, skip-transcoder."""
    d_in: int
    """Input width D_in."""
    width: int
    """Dictionary size F."""
    d_out: int | None = None
    """Output (target) width; None means d_in."""
    transcoder: bool = False
    """Predict a different target than the input (another hook). Forced on when d_out ≠ d_in."""
    k: int | None = None
    """topk/batchtopk/matryoshka: active latents per row (batchtopk, matryoshka: on average over the batch)."""
    penalty: str | None = None
    """relu/gated: "l1" (default) or "entropy"; jumprelu: "l0"; topk family: "none". None picks the default."""
    coeff: float | None = None
    """λ multiplying the penalty; None picks the architecture default (relu/gated: l1 0.1, entropy 0.03;
    jumprelu 1.0; topk family 0, unused)."""
    auxk_alpha: float = 1 / 32
    """topk family: weight of the AuxK loss."""
    dead_tokens_threshold: int = DEAD_TOKENS_THRESHOLD
    """topk family: a latent that has not fired for this many training tokens is dead (for AuxK). A TrainConfig
    resolves it to a hundredth of the run's rows, at most 10M (`optim.default_schedule`)."""
    k_aux: int | None = None
    """topk family: dead latents used per row by AuxK; None means d_out // 2."""
    optimizer: str | None = None
    """`adam` or `lazy-adam` (`optim.LazyAdam`: a latent's moments and weights move only in the steps it fires in);
    None picks the architecture's: lazy-adam for the TopK family, adam for the others. A run dir started before this
    field (its cfg.json has none) trained with adam and resumes with it."""
    threshold_beta: float = 0.999
    """batchtopk, matryoshka: EMA decay of the inference threshold."""
    threshold_start_step: int = 1000
    """batchtopk, matryoshka: training steps before the threshold EMA starts (early activations are not
    representative)."""
    jumprelu_bandwidth: float = 0.001
    """jumprelu: width ε of the rectangle kernel of the pseudo-gradient."""
    jumprelu_init_threshold: float = 0.001
    """jumprelu: initial threshold θ of every feature."""
    target_l0: float | None = None
    """jumprelu: L0 the penalty pulls toward; None means 20."""
    group_sizes: list[int] | None = None
    """matryoshka: sizes of the nested latent groups, summing to width (prefix g = the first g groups); None means
    prefixes of width/16, /8, /4, /2 and width (`arch.default_group_sizes`)."""

    def __post_init__(self):
        arch = architecture(self.arch)
        if self.d_in <= 0 or self.width <= 0 or (self.d_out is not None and self.d_out <= 0):
            raise ConfigError(f"widths must be positive (d_in={self.d_in}, width={self.width}, d_out={self.d_out})")
        for name, value in arch.resolve(asdict(self)).items():  # frozen: the resolved defaults are set once, here
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        """From cfg.json's "sae" (fields written under their old names are read under the new ones)."""
        d = {RENAMED_FIELDS.get(k, k): v for k, v in d.items()}
        d.setdefault("optimizer", "adam")  # written before the field: trained with Adam
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"SAE config has unknown fields {sorted(unknown)} (written by a newer saecache?)")
        return cls(**d)


@dataclass
class LossOutput:
    total: Tensor        # recon + inner + λ·scale·sparsity + aux: what to backpropagate
    recon: Tensor        # Σ_D (x̂ − target)², mean over B
    sparsity: Tensor     # the unweighted penalty (0 for the topk family)
    aux: Tensor          # weighted auxiliary loss (AuxK, gated aux), 0 if none
    x_hat_BD: Tensor
    l0: Tensor           # mean number of active latents per row (no grad)
    code: Code
    width: int
    inner: Tensor | None = None  # matryoshka: the inner prefixes' reconstruction losses, summed (in total)

    @property
    def f_BF(self) -> Tensor:
        """Dense features (materialised on demand: [B, F] is large for the sparse architectures)."""
        return self.code.dense(self.width).detach()


def normalisation_scale(mean_sq_norm: float) -> float:
    """Divide activations by this to get E‖x‖² = 1, the scale the default coefficients assume."""
    return float(mean_sq_norm) ** 0.5 if mean_sq_norm > 0 else 1.0


class SAE(nn.Module):
    """Encoder z = (x − b_pre) @ W_enc_DF + b_enc_F, an architecture's activation, decoder f @ W_dec_FD + b_dec_D."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg, self.arch = cfg, ARCHITECTURES[cfg.arch]
        D, F, Do = cfg.d_in, cfg.width, cfg.d_out
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
        self.arch.add_state(self)
        self.register_buffer("tokens_since_fired_F", torch.zeros(F, dtype=torch.long))
        self.register_buffer("n_steps", torch.zeros((), dtype=torch.long))
        self._workspace = Workspace()  # training: the reused [B, F] buffers (sparse_ops, dense_ops)

    # ---- pieces the architectures use ----
    def _pre_bias(self) -> Tensor | None:
        if not self.arch.pre_bias:
            return None
        return self.b_in_D if self.cfg.transcoder else self.b_dec_D

    def pre_acts(self, x_BD: Tensor, train: bool = False) -> Tensor:
        """Pre-activations z_BF; `train` writes them into the workspace (`dense_ops.EncodeInto`)."""
        if train:
            return DO.EncodeInto.apply(x_BD, self._pre_bias(), self.W_enc_DF, self.b_enc_F, self._workspace)
        return centered_linear(x_BD, self._pre_bias(), self.W_enc_DF, self.b_enc_F)

    def sparse_encode(self, x_BD: Tensor, select, train: bool = False) -> SparseCode:
        return sparse_encode(x_BD, self._pre_bias(), self.W_enc_DF, self.b_enc_F, select,
                             self._workspace if train else None)

    def skip(self, x_BD: Tensor) -> Tensor | None:
        """The skip-transcoder's linear term x @ W_skip_DDᵀ (None for the other architectures)."""
        W = getattr(self, "W_skip_DD", None)
        return None if W is None else x_BD @ W.t()

    # ---- public API ----
    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense post-activation features f_BF, inference behaviour."""
        return self.arch.encode(self, x_BD).dense(self.cfg.width)

    def decode(self, f_BF: Tensor, x_BD: Tensor | None = None) -> Tensor:
        """f_BF @ W_dec_FD + b_dec_D; a skip-transcoder adds its skip term of the input `x_BD`, which it needs."""
        out = torch.addmm(self.b_dec_D, f_BF, self.W_dec_FD)
        skip = None if x_BD is None else self.skip(x_BD)
        if skip is None and hasattr(self, "W_skip_DD"):
            raise ValueError("a skip-transcoder's decode needs the input x_BD (its skip term reads it)")
        return out if skip is None else out + skip

    def forward(self, x_BD: Tensor) -> Tensor:
        """Reconstruction (inference behaviour); equals decode(encode(x)) up to float rounding."""
        return self.arch.decode(self, self.arch.encode(self, x_BD))

    def loss(self, x_BD: Tensor, target_BD: Tensor | None = None, sparsity_scale: float = 1.0) -> LossOutput:
        """Training loss. In training mode this also updates the dead-latent counters (and batchtopk's threshold).
        The dense architectures' [B, F] tensors live in reused buffers: backpropagate a loss before the next one."""
        cfg, arch = self.cfg, self.arch
        target_BD = x_BD if target_BD is None else target_BD
        code = arch.encode_train(self, x_BD)
        x_hat, recon, inner = arch.reconstruct(self, code, target_BD)
        zero = recon.new_zeros(())
        sparsity = arch.penalty(self, code)
        sparsity = zero if sparsity is None else sparsity
        aux = arch.aux_loss(self, code, x_hat, target_BD)
        aux = zero if aux is None else aux
        total = recon + cfg.coeff * sparsity_scale * sparsity + aux
        if inner is not None:
            total = total + inner
        with torch.no_grad():
            if code.f_BF is not None:
                count_F = code.count_F if code.count_F is not None else code.f_BF.sign().sum(0, dtype=torch.float32)
                l0, fired_F = (count_F.double().sum() / code.f_BF.shape[0]).float(), count_F > 0
            else:
                active_N = code.sparse.vals_N > 0
                l0 = active_N.sum().float() / x_BD.shape[0]
                fired_F = torch.zeros(cfg.width, dtype=torch.bool, device=x_BD.device)
                fired_F[code.sparse.idx_N[active_N]] = True
            if self.training:
                self._update_stats(code, fired_F, x_BD.shape[0])
        return LossOutput(total, recon, sparsity, aux, x_hat, l0, code, cfg.width, inner)

    @torch.no_grad()
    def _update_stats(self, code: Code, fired_F: Tensor, n_rows: int) -> None:
        self.tokens_since_fired_F += n_rows
        self.tokens_since_fired_F[fired_F] = 0
        self.n_steps += 1
        self.arch.after_step(self, code)

    def dead_mask(self, window_tokens: int) -> Tensor:
        """Latents that have not fired in the last `window_tokens` training tokens."""
        return self.tokens_since_fired_F >= window_tokens

    # ---- the trainer's constraints and DDP counters: the same interface as `crosslayer.CrossLayer` ----
    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from each decoder row's gradient its component along the row (before the optimizer step)."""
        W, g = self.W_dec_FD, self.W_dec_FD.grad
        if g is None:
            return
        w_hat = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g.sub_((g * w_hat).sum(1, keepdim=True) * w_hat)

    @torch.no_grad()
    def renorm_decoder_(self) -> None:
        """Rescale each decoder row to unit norm (after the optimizer step)."""
        W = self.W_dec_FD
        W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def counters(self) -> list[Tensor]:
        """The dead-latent counters, as a list (one per feature set) like a cross-layer dictionary's."""
        return [self.tokens_since_fired_F]

    def sync_stats_(self, since_before: list[Tensor], global_batch: int) -> None:
        """DDP: the global batch's counters (and threshold) on every rank (`ddp.sync_sae_stats_`)."""
        ddp.sync_sae_stats_(self, since_before[0], global_batch)

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
        if hasattr(self, "W_skip_DD"):  # t/out = (x/in) W_skipᵀ  →  t = x (W_skip · out/in)ᵀ
            self.W_skip_DD.mul_(out_scale / in_scale)

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
            raise ConfigError(f"SAE weights do not match the config ({cfg.arch}, d_in={cfg.d_in}, "
                              f"F={cfg.width}, d_out={cfg.d_out}): missing {sorted(missing)}, "
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
