"""Dictionaries over several hooks at once: cross-layer transcoders (CLT) and acausal crosscoders, one module family
(`CrossLayer`) whose kinds and activations are small objects.

- **clt** (Anthropic 2025, "Circuit Tracing"): layer i's features read hook_in i and write every target layer
  l' ≥ i, one decoder per (i, l') pair; layer l' is reconstructed by the sum over sources i ≤ l':
  ŷ_l' = Σ_{i ≤ l'} f_i W_dec_i[:, l' − i] + b_dec_l'.
- **crosscoder** (Anthropic 2024, "Sparse Crosscoders"): one feature set reads every hook (its encoder slices are
  summed before the activation) and writes every hook, one decoder per hook; hooks_out == hooks_in.

Both are "sources" (a set of F features, one encoder over the concatenation of their input hooks, one decoder over the
concatenation of their target hooks): a CLT has L sources (source i: input i, targets i..L-1), a crosscoder one
(inputs and targets all hooks). So one code path trains both: a TopK source is one `sparse_ops.sparse_encode` and one
`sparse_ops.sparse_decode` through its decoder viewed as [F, T·D_out], so a decode touches k decoder rows per (source,
target) pair and never a dense [B, F] matrix; JumpReLU sources decode densely (one matmul per source).

Activations (`ACTIVATIONS`): topk (k per source and row), batchtopk (top k·B per source over the batch; inference keeps
z > threshold, an EMA of the smallest kept value per source, as `arch.BatchTopK`), jumprelu (`penalties.JumpReLU`,
the paper's penalty λ Σ_i tanh(c · a_i · ‖W_dec,i‖) with ‖W_dec,i‖ the norm of feature i's decoders over all its
targets, plus the optional pre-activation penalty λ_p Σ_i relu(θ_i − z_i) ‖W_dec,i‖ against dead features).
No pre-bias (circuit-tracer's CLT encodes x @ W_encᵀ + b_enc). Inputs and targets are normalised per hook by the
store's statistics in training; `fold_scale` folds each hook's scale back.

Saved tensors (`state_for_save`, circuit-tracer's layout): CLT `W_enc_{i}` [F, D_in], `b_enc_{i}` [F], `W_dec_{i}`
[F, L−i, D_out], `b_dec_{i}` [D_out], `threshold_{i}` [F] (jumprelu, batchtopk); crosscoder `W_enc_{h}` [F, D_in],
`b_enc` [F], `W_dec_{h}` [F, D_out], `b_dec_{h}` [D_out], `threshold` [F]; plus the training counters
`tokens_since_fired_{s}` [F] and `n_steps`. Shapes: B rows, D width, F features per source, L hooks, T targets of a
source, N selected entries (`SparseCode`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saecache.errors import ConfigError
from saecache.train import ddp
from saecache.train import penalties as P
from saecache.train.arch import ARCHITECTURES, DEAD_TOKENS_THRESHOLD, check_optimizer
from saecache.train.ddp import batch_variance
from saecache.train.crosslayer_acts import ACTIVATIONS, SourceCode  # noqa: F401 (re-exported)
from saecache.train.sae import SAE, SAEConfig
from saecache.train.sparse_ops import SparseCode, Workspace, sparse_decode

KINDS = ("clt", "crosscoder")


@dataclass(frozen=True)
class CrossLayerConfig:
    """Everything needed to rebuild a cross-layer dictionary (cfg.json's "sae"); defaults resolved in __post_init__."""

    kind: str
    """"clt" (cross-layer transcoder) or "crosscoder" (acausal, one feature set over every hook)."""
    hooks_in: list[str]
    """Store hooks read, one per layer in layer order (e.g. resid_mid.0 .. resid_mid.5)."""
    d_in: int
    """Width of every input hook."""
    n_features: int
    """Features F per source: per layer for a CLT, the one shared set for a crosscoder."""
    activation: str = "topk"
    """topk, batchtopk or jumprelu."""
    hooks_out: list[str] | None = None
    """Store hooks reconstructed, one per layer (a CLT: e.g. mlp_out.0 .. mlp_out.5); None = hooks_in (a crosscoder
    must have hooks_out == hooks_in)."""
    d_out: int | None = None
    """Width of every target hook; None = d_in."""
    n_layers: int | None = None
    """L = len(hooks_in) (resolved)."""
    k: int | None = None
    """topk: active features per row of each source; batchtopk: per row on average over the batch."""
    coeff: float = 1e-3
    """jumprelu: λ of the tanh sparsity penalty (per row, summed over sources; inputs at E‖x‖² = 1)."""
    tanh_c: float = 1.0
    """jumprelu: c inside tanh(c · a · ‖W_dec‖)."""
    pre_act_coeff: float = 0.0
    """jumprelu: λ_p of the pre-activation penalty relu(θ − z) ‖W_dec‖ against dead features; 0 = off."""
    jumprelu_bandwidth: float = 0.001
    """jumprelu: width ε of the rectangle kernel of the threshold's pseudo-gradient."""
    jumprelu_init_threshold: float = 0.001
    """jumprelu: initial threshold θ of every feature."""
    threshold_beta: float = 0.999
    """batchtopk: EMA decay of the inference threshold."""
    threshold_start_step: int = 1000
    """batchtopk: training steps before the threshold EMA starts."""
    auxk_alpha: float = 1 / 32
    """topk/batchtopk: weight of the AuxK loss (0 = off)."""
    k_aux: int | None = None
    """topk/batchtopk: dead latents per row and source used by AuxK; None means d_out // 2."""
    dead_tokens_threshold: int = DEAD_TOKENS_THRESHOLD
    """topk/batchtopk: a latent silent for this many training rows is dead (for AuxK); a TrainConfig resolves it to
    a hundredth of the run's rows, at most 10M, as for the SAEs."""
    optimizer: str | None = None
    """As `SAEConfig.optimizer`: None picks lazy-adam for topk/batchtopk, adam for jumprelu."""

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: resolve defaults)
        if self.kind not in KINDS:
            raise ConfigError(f"unknown cross-layer kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r} for a {self.kind}; known: "
                              f"{', '.join(ACTIVATIONS)}")
        hooks_in = list(self.hooks_in or [])
        hooks_out = list(self.hooks_out) if self.hooks_out is not None else list(hooks_in)
        set_("hooks_in", hooks_in)
        set_("hooks_out", hooks_out)
        if not hooks_in or len(hooks_out) != len(hooks_in):
            raise ConfigError(f"a {self.kind} needs hooks_in and hooks_out of equal, non-zero length (one per "
                              f"layer), got {len(hooks_in)} and {len(hooks_out)}")
        if len(set(hooks_in)) != len(hooks_in) or len(set(hooks_out)) != len(hooks_out):
            raise ConfigError(f"{self.kind} hooks must not repeat: {hooks_in} -> {hooks_out}")
        if KIND_OBJECTS[self.kind].reads_its_targets and hooks_out != hooks_in:
            raise ConfigError("a crosscoder reconstructs the hooks it reads: leave hooks_out unset (= hooks_in)")
        if self.n_layers not in (None, len(hooks_in)):
            raise ConfigError(f"n_layers={self.n_layers} but {len(hooks_in)} hooks_in")
        set_("n_layers", len(hooks_in))
        if self.d_out is None:
            set_("d_out", self.d_in)
        if self.k_aux is None:
            set_("k_aux", max(1, self.d_out // 2))
        if min(self.d_in, self.d_out, self.n_features) <= 0:
            raise ConfigError(f"widths must be positive (d_in={self.d_in}, d_out={self.d_out}, "
                              f"n_features={self.n_features})")
        needs_k = ACTIVATIONS[self.activation].needs_k
        set_("optimizer", check_optimizer(self.optimizer, ARCHITECTURES[self.arch].optimizer))
        if needs_k and (self.k is None or not 0 < self.k <= self.n_features):
            raise ConfigError(f"{self.activation} needs 0 < k ≤ n_features ({self.n_features}), got k={self.k}")
        if not needs_k and self.k is not None:
            raise ConfigError(f"k is only for topk/batchtopk, not {self.activation}")
        if min(self.coeff, self.tanh_c, self.pre_act_coeff) < 0 or self.jumprelu_bandwidth <= 0 \
                or not 0 <= self.threshold_beta < 1 or self.auxk_alpha < 0 or self.k_aux < 1 \
                or self.dead_tokens_threshold < 1:
            raise ConfigError("need coeff, tanh_c, pre_act_coeff, auxk_alpha ≥ 0, jumprelu_bandwidth > 0, "
                              "0 ≤ threshold_beta < 1, k_aux ≥ 1, dead_tokens_threshold ≥ 1")

    @property
    def arch(self) -> str:
        """The `--arch` name (`arch.ARCHITECTURES`): kind, or kind-activation for batchtopk and jumprelu."""
        return next(a.name for a in ARCHITECTURES.values()
                    if a.cross_layer and (a.kind, a.activation) == (self.kind, self.activation))

    @property
    def width(self) -> int:
        """Total latents: n_features per source times the sources."""
        return self.n_features * len(KIND_OBJECTS[self.kind].sources(self.n_layers))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CrossLayerConfig":
        d = {"optimizer": "adam", **d}  # written before the field: trained with Adam
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"cross-layer config has unknown fields {sorted(unknown)} (written by a newer saecache?)")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Source:
    """One feature set: reads the concatenation of hooks `ins`, writes the concatenation of targets `outs`."""
    ins: list[int]
    outs: list[int]


class CLT:
    """Source i reads layer i's input and writes layers i..L-1."""
    name, reads_its_targets = "clt", False

    def sources(self, L: int) -> list[Source]:
        return [Source([i], list(range(i, L))) for i in range(L)]

    def to_saved(self, m: "CrossLayer") -> dict[str, Tensor]:
        cfg, out = m.cfg, {}
        for i in range(cfg.n_layers):
            out[f"W_enc_{i}"] = getattr(m, f"W_enc_{i}")
            out[f"b_enc_{i}"] = getattr(m, f"b_enc_{i}")
            out[f"W_dec_{i}"] = getattr(m, f"W_dec_{i}").view(cfg.n_features, cfg.n_layers - i, cfg.d_out)
            out[f"b_dec_{i}"] = m.b_dec_LD[i]
            if hasattr(m, f"threshold_{i}"):
                out[f"threshold_{i}"] = getattr(m, f"threshold_{i}")
        return out

    def from_saved(self, cfg: CrossLayerConfig, t: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for i in range(cfg.n_layers):
            for name in (f"W_enc_{i}", f"b_enc_{i}", f"threshold_{i}"):
                if name in t:
                    out[name] = t[name]
            if f"W_dec_{i}" in t:
                out[f"W_dec_{i}"] = t[f"W_dec_{i}"].reshape(cfg.n_features, -1)
        if all(f"b_dec_{i}" in t for i in range(cfg.n_layers)):
            out["b_dec_LD"] = torch.stack([t[f"b_dec_{i}"] for i in range(cfg.n_layers)])
        return out


class Crosscoder:
    """One source reading every hook (encoder slices summed) and writing every hook."""
    name, reads_its_targets = "crosscoder", True  # hooks_out == hooks_in

    def sources(self, L: int) -> list[Source]:
        return [Source(list(range(L)), list(range(L)))]

    def to_saved(self, m: "CrossLayer") -> dict[str, Tensor]:
        cfg, out = m.cfg, {"b_enc": m.b_enc_0}
        for h in range(cfg.n_layers):
            out[f"W_enc_{h}"] = m.W_enc_0[:, h * cfg.d_in:(h + 1) * cfg.d_in]
            out[f"W_dec_{h}"] = m.W_dec_0[:, h * cfg.d_out:(h + 1) * cfg.d_out]
            out[f"b_dec_{h}"] = m.b_dec_LD[h]
        if hasattr(m, "threshold_0"):
            out["threshold"] = m.threshold_0
        return out

    def from_saved(self, cfg: CrossLayerConfig, t: dict[str, Tensor]) -> dict[str, Tensor]:
        L, out = cfg.n_layers, {}
        for name, new in (("b_enc", "b_enc_0"), ("threshold", "threshold_0")):
            if name in t:
                out[new] = t[name]
        for key, new in (("W_enc", "W_enc_0"), ("W_dec", "W_dec_0"), ("b_dec", "b_dec_LD")):
            parts = [t.get(f"{key}_{h}") for h in range(L)]
            if all(p is not None for p in parts):
                out[new] = torch.stack(parts) if key == "b_dec" else torch.cat(parts, dim=1)
        return out


KIND_OBJECTS = {k.name: k for k in (CLT(), Crosscoder())}


# ---------------------------------------------------------------------------------------------------- the module


@dataclass
class CrossLayerLoss:
    """What `CrossLayer.loss` returns; the fields the trainer's metrics read are `LossOutput`'s."""
    total: Tensor        # recon + sparsity_scale · penalty + aux
    recon: Tensor        # Σ over layers of Σ_D (ŷ − t)², mean over B
    sparsity: Tensor     # the weighted penalty (jumprelu), 0 for topk/batchtopk
    aux: Tensor          # weighted AuxK loss (topk, batchtopk), 0 if none
    x_hat_BD: Tensor     # every layer's reconstruction side by side, [B, L·D_out] (detached)
    l0: Tensor           # active features per row, summed over sources
    l0_S: list[float] = field(default_factory=list)  # per source
    codes: list[SourceCode] = field(default_factory=list)


class CrossLayer(nn.Module):
    """A cross-layer transcoder or crosscoder (`CrossLayerConfig.kind`) with one activation for every source."""

    def __init__(self, cfg: CrossLayerConfig):
        super().__init__()
        self.cfg, self.kind, self.act = cfg, KIND_OBJECTS[cfg.kind], ACTIVATIONS[cfg.activation]
        self.sources = self.kind.sources(cfg.n_layers)
        F = cfg.n_features
        for s, src in enumerate(self.sources):
            d_in, n_out = len(src.ins) * cfg.d_in, len(src.outs) * cfg.d_out
            W_dec = torch.randn(F, n_out)
            W_dec /= W_dec.norm(dim=1, keepdim=True)  # unit norm over all of a feature's targets
            setattr(self, f"W_enc_{s}", nn.Parameter(torch.randn(F, d_in) / d_in ** 0.5))  # [F, D_in]
            setattr(self, f"b_enc_{s}", nn.Parameter(torch.zeros(F)))
            setattr(self, f"W_dec_{s}", nn.Parameter(W_dec))  # [F, T·D_out], targets in order
            self.act.add_state(self, s)
            self.register_buffer(f"tokens_since_fired_{s}", torch.zeros(F, dtype=torch.long))
        self.b_dec_LD = nn.Parameter(torch.zeros(cfg.n_layers, cfg.d_out))
        self.register_buffer("n_steps", torch.zeros((), dtype=torch.long))
        self._workspace = Workspace()

    def encoder(self, s: int) -> tuple[Tensor, Tensor]:
        """(W_enc_DF, b_enc_F) of source s: the [D_in, F] view of the feature-major parameter."""
        return getattr(self, f"W_enc_{s}").t(), getattr(self, f"b_enc_{s}")

    def _inputs(self, xs: list[Tensor]) -> list[Tensor]:
        if len(xs) != self.cfg.n_layers:
            raise ValueError(f"{self.cfg.kind} takes {self.cfg.n_layers} inputs (one per hook), got {len(xs)}")
        return [xs[src.ins[0]] if len(src.ins) == 1 else torch.cat([xs[h] for h in src.ins], dim=1)
                for src in self.sources]

    def _encode(self, xs: list[Tensor], train: bool) -> list[SourceCode]:
        enc = self.act.encode_train if train else self.act.encode
        return [enc(self, s, x) for s, x in enumerate(self._inputs(xs))]

    def _decode(self, codes: list[SourceCode]) -> Tensor:
        """ŷ [B, L, D_out]: b_dec plus every source's decode added into its targets."""
        first = codes[0].public()
        B = first.n_rows if isinstance(first, SparseCode) else first.shape[0]
        L, D = self.cfg.n_layers, self.cfg.d_out
        y_BLD = self.b_dec_LD.expand(B, L, D).clone()
        for s, (src, c) in enumerate(zip(self.sources, codes)):
            W = getattr(self, f"W_dec_{s}")
            out = sparse_decode(c.sparse, W) if c.sparse is not None else c.f_BF @ W
            y_BLD[:, src.outs[0]:src.outs[-1] + 1] += out.view(B, len(src.outs), D)  # targets are contiguous
        return y_BLD

    # ---- public API (the contract the evaluation and exporters code against) ----
    def encode(self, xs: list[Tensor]) -> list[SparseCode | Tensor]:
        """Inference features per source: a SparseCode (topk, batchtopk before its threshold) or dense f_BF."""
        return [c.public() for c in self._encode(xs, train=False)]

    def decode(self, codes: list[SparseCode | Tensor]) -> list[Tensor]:
        """ŷ_BD per target layer l' = Σ over sources writing l' of f_s W_dec_s[:, l'] + b_dec_l'."""
        wrapped = [SourceCode(sparse=c) if isinstance(c, SparseCode) else SourceCode(f_BF=c) for c in codes]
        return list(self._decode(wrapped).unbind(1))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return list(self._decode(self._encode(xs, train=False)).unbind(1))

    def loss(self, xs: list[Tensor], ts: list[Tensor] | None = None, sparsity_scale: float = 1.0) -> CrossLayerLoss:
        """Training loss over every layer; in training mode it also updates the firing counters (and batchtopk's
        thresholds)."""
        ts = xs if ts is None else ts
        codes = self._encode(xs, train=True)
        y_BLD = self._decode(codes)
        t_BLD = torch.stack(ts, dim=1)
        recon = (y_BLD - t_BLD).pow(2).sum((1, 2)).mean()
        pens = [c.pen for c in codes if c.pen is not None]
        sparsity = torch.stack(pens).sum() if pens else recon.new_zeros(())
        aux = self._aux_loss(codes, y_BLD, t_BLD)
        total = recon + sparsity_scale * sparsity + aux
        B = t_BLD.shape[0]
        with torch.no_grad():
            l0_S = [float(c.active()) / B for c in codes]
            if self.training:
                for s, c in enumerate(codes):
                    since = getattr(self, f"tokens_since_fired_{s}")
                    since += B
                    since[c.fired(self.cfg.n_features)] = 0
                self.n_steps += 1
                for s, c in enumerate(codes):
                    self.act.after_step(self, s, c)
        return CrossLayerLoss(total, recon, sparsity, aux, y_BLD.detach().flatten(1),
                              torch.tensor(sum(l0_S)), l0_S, codes)

    def _aux_loss(self, codes: list[SourceCode], y_BLD: Tensor, t_BLD: Tensor) -> Tensor:
        """AuxK summed over sources: a source's dead-latent picks decode (through its decoders) the residual error
        e = t − ŷ of the targets it writes, normalised by e's variance over the batch (`penalties.auxk_loss`)."""
        total = y_BLD.new_zeros(())
        for s, (src, c) in enumerate(zip(self.sources, codes)):
            if c.aux is None:
                continue
            e_BD = (t_BLD - y_BLD)[:, src.outs[0]:src.outs[-1] + 1].detach().flatten(1)
            e_hat_BD = sparse_decode(c.aux, getattr(self, f"W_dec_{s}"))
            total = total + self.cfg.auxk_alpha * P.auxk_loss(e_hat_BD, e_BD, batch_variance(e_BD))
        return total

    def dead_mask(self, window_tokens: int) -> Tensor:
        """[S·F] features (source by source) that have not fired in the last `window_tokens` training rows."""
        return torch.cat(self.counters()) >= window_tokens

    def counters(self) -> list[Tensor]:
        """Each source's [F] rows-since-fired counter."""
        return [getattr(self, f"tokens_since_fired_{s}") for s in range(len(self.sources))]

    @torch.no_grad()
    def sync_stats_(self, since_before: list[Tensor], global_batch: int) -> None:
        """DDP: counters (and batchtopk's thresholds) of the global batch on every rank, as `ddp.sync_sae_stats_`."""
        for s, (since, before) in enumerate(zip(self.counters(), since_before)):
            fired = ddp.all_reduce_max((since == 0).to(torch.int64)) > 0
            since.copy_(torch.where(fired, 0, before + global_batch))
            if ARCHITECTURES[self.cfg.arch].threshold:  # batchtopk: the per-source thresholds
                thr = getattr(self, f"threshold_{s}")
                t = thr.clone()
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                thr.copy_(t / dist.get_world_size())

    # ---- training constraints (the trainer's project → step → renorm) ----
    def decoders(self) -> list[Tensor]:
        return [getattr(self, f"W_dec_{s}") for s in range(len(self.sources))]

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """topk/batchtopk: remove from each feature's decoder gradient (over all its targets) its radial part."""
        if not self.act.unit_decoders:
            return
        for W in self.decoders():  # g −= (g·w) w / ‖w‖², with no [F, T·D] temporary (the decoders are large)
            if W.grad is not None:
                dot_F = torch.linalg.vecdot(W.grad, W, dim=1)
                sq_F = torch.linalg.vector_norm(W, dim=1).square_().clamp_min_(1e-24)
                W.grad.addcmul_(W, (dot_F / sq_F).unsqueeze(1), value=-1)

    @torch.no_grad()
    def renorm_decoder_(self) -> None:
        """topk/batchtopk: each feature's decoders over all its targets together have unit norm."""
        if self.act.unit_decoders:
            for W in self.decoders():
                W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def init_from_batch(self, xs: list[Tensor], ts: list[Tensor] | None = None) -> None:
        """b_dec of every layer = geometric median of its targets."""
        for l, t in enumerate(xs if ts is None else ts):
            self.b_dec_LD[l].copy_(P.geometric_median(t))

    @torch.no_grad()
    def fold_scale(self, in_scales: list[float], out_scales: list[float]) -> None:
        """Training saw x_h / in_scales[h] and predicted t_l / out_scales[l] (each hook by its own statistics).
        Rewrite the weights so the module maps raw inputs to raw targets with the same features."""
        cfg = self.cfg
        for s, src in enumerate(self.sources):
            W_enc, W_dec = getattr(self, f"W_enc_{s}"), getattr(self, f"W_dec_{s}")
            for j, h in enumerate(src.ins):
                W_enc[:, j * cfg.d_in:(j + 1) * cfg.d_in] /= in_scales[h]
            for j, l in enumerate(src.outs):
                W_dec[:, j * cfg.d_out:(j + 1) * cfg.d_out] *= out_scales[l]
        self.b_dec_LD.mul_(torch.tensor(out_scales, dtype=self.b_dec_LD.dtype,
                                        device=self.b_dec_LD.device).unsqueeze(1))

    # ---- save / load (circuit-tracer's names and shapes; see the module docstring) ----
    def _counters(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in tensors.items() if k.startswith("tokens_since_fired_") or k == "n_steps"}

    def state_for_save(self) -> dict[str, Tensor]:
        out = {**self.kind.to_saved(self), **self._counters(dict(self.named_buffers()))}
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads the saved layout (`state_for_save`) as well as the module's own `state_dict()`."""
        if "b_dec_LD" not in state_dict:
            state_dict = {**self.kind.from_saved(self.cfg, state_dict), **self._counters(state_dict)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_state(cls, cfg: CrossLayerConfig, tensors: dict[str, Tensor]) -> "CrossLayer":
        m = cls(cfg)
        expected = {k: v.shape for k, v in m.state_for_save().items()}
        missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
        bad = [k for k in expected if k in tensors and tensors[k].shape != expected[k]]
        if missing or unexpected or bad:
            raise ConfigError(f"{cfg.kind} weights do not match the config (L={cfg.n_layers}, d_in={cfg.d_in}, "
                              f"F={cfg.n_features}, d_out={cfg.d_out}): missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)}, wrong shape {bad}")
        m.load_state_dict(tensors)
        return m


def save_crosslayer(m: CrossLayer, path) -> None:
    save_file(m.state_for_save(), str(path), metadata={"saecache_crosslayer_config": json.dumps(m.cfg.to_dict())})


def load_crosslayer(cfg: CrossLayerConfig, path, device: str | torch.device = "cpu") -> CrossLayer:
    return CrossLayer.from_state(cfg, load_file(str(path))).to(device)


def is_cross_layer(arch: str) -> bool:
    return getattr(ARCHITECTURES.get(arch), "cross_layer", False)


def config_from_dict(d: dict[str, Any]):
    """The module config a run dir's cfg.json "sae" record holds: a CrossLayerConfig (it has a `kind`) or an
    SAEConfig."""
    return CrossLayerConfig.from_dict(d) if "kind" in d else SAEConfig.from_dict(d)


def build_module(cfg) -> nn.Module:
    """A fresh module for a config of either family."""
    return CrossLayer(cfg) if isinstance(cfg, CrossLayerConfig) else SAE(cfg)
