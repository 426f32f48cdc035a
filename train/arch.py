"""The architectures of the SAE family as small objects behind one interface (`arch_base.Architecture`), and the
registry `ARCHITECTURES` they fill. Adding an architecture is one class and one registry entry; what each class
attribute and method means is documented on the interface.

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
- clt*, crosscoder*: the dictionaries over several hooks (`crosslayer.py`), present here for what a run resolves.

Shapes: B rows, D width, F features, G Matryoshka groups, N selected entries (`sparse_ops.SparseCode`), M dead latents.
"""

from __future__ import annotations

import torch

from saecache.errors import ConfigError
from saecache.train import dense_ops as DO
from saecache.train import penalties as P
from saecache.train.arch_base import (ARCHITECTURES, DEAD_TOKENS_THRESHOLD, DEFAULT_K, OPTIMIZERS,  # noqa: F401
                                      RUN_OPTIONS, Architecture, Code, RunDefaults, architecture, check_optimizer,
                                      from_dl_class, from_saelens, spec_name)
from saecache.train.ddp import batch_variance
from saecache.train.sparse_ops import (SparseCode, batch_topk_select, dead_topk_select, sparse_decode, topk_select,
                                       with_extra_columns)


def gao_lr(width: int, multiple: float) -> float:
    """`multiple` × the learning rate Gao et al. (2024, "Scaling and evaluating sparse autoencoders") fitted against
    the width, 2e-4 / sqrt(F / 2^14): the default of dictionary_learning and sparsify, and the TopK family's base."""
    return multiple * 2e-4 / (width / 2 ** 14) ** 0.5


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

    def threshold_F(self, threshold, width, target):
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

    def threshold_F(self, threshold, width, target):
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
    sparse, needs_k, resample, optimizer = True, True, False, "lazy-adam"
    dl_classes, saelens_arch = ("AutoEncoderTopK",), "topk"
    decay_fraction = 0.5
    """Decay over the last half: at 3× Gao et al.'s rate, with AuxK on latents silent for a hundredth of the run, it
    halved the latents that fire on no held-out row at an unchanged held-out FVE; over the last 80 % or the whole run
    it cost FVE at 4× (bench/results/quality_lr.md)."""
    max_warmup_steps = 100
    """A tenth of the run, at most 100 steps: on a 20M-token run the peers' 1000-step warm-up left saecache's TopK at
    1M tokens (the end of that warm-up) at 0.9697 held-out FVE against 0.9763 with 100 steps (lazy Adam, 4×), and
    still behind at 3M (0.9827 against 0.9836) (bench/results/long.md's probes). Runs of up to 1000 steps are as
    before (a tenth of the run)."""
    lr_multiple = 6
    """Of Gao et al.'s rate (`gao_lr`, `default_lr`)."""

    def default_lr(self, width: int) -> float:
        """1.2e-3 / sqrt(F / 2^14) (the whole TopK family): Gao et al.'s rate (`gao_lr`) times 6 (`lr_multiple`).
        Their rate has no gradient clip; under saecache's (`TrainConfig.grad_clip`) the early steps are capped, and
        with Adam held-out FVE rose with the multiple up to 4× at every width measured and at 6× at F=4096, with more
        rarely firing latents (bench/results/quality_lr.md). Lazy Adam keeps those latents alive, and at 6× a
        1M-token run beats sparsify's signum, which 4× did not, with 20M-token runs no worse (bench/results/long.md)."""
        return gao_lr(width, self.lr_multiple)

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

    def threshold_F(self, threshold, width, target):
        return torch.full((width,), self.export_threshold(threshold, target), dtype=torch.float32)

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
        self.optimizer = TopK.optimizer if self.needs_k else "adam"

    def default_lr(self, width: int) -> float:
        """The TopK family's rate at 4× Gao et al.'s (its default when bench/results/crosslayer.md ran; the single-
        layer family's 6× and 100-step warm-up are not measured on cross-layer dictionaries, which keep the
        base warm-up)."""
        return gao_lr(width, 4) if self.needs_k else self.lr

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


ARCHITECTURES.update({a.name: a for a in (ReLU(), TopK(), BatchTopK(), JumpReLU(), Gated(), Matryoshka(),
                                          SkipTranscoder())})
ARCHITECTURES.update({a.name: a for a in (CrossLayerFamily(kind, act) for kind in ("clt", "crosscoder")
                                          for act in ("topk", "batchtopk", "jumprelu"))})
