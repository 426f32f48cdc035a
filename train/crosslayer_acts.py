"""The activations of the cross-layer family (`crosslayer.CrossLayer`), one small object each, applied per source
(a CLT's layer, a crosscoder's one feature set): topk, batchtopk, jumprelu (definitions in `crosslayer`'s docstring).

Each object registers its per-source state (`add_state`), encodes a source's input in training (`encode_train`: the
sparse path of `sparse_ops` for the TopK family, dense pre-activations and the Circuit Tracing penalty for jumprelu)
and at inference (`encode`), and keeps its bookkeeping after a step (`after_step`: batchtopk's threshold).
Shapes: B rows, D width, F features per source, N selected entries (`SparseCode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from saecache.train import penalties as P
from saecache.train.sparse_ops import (SparseCode, batch_topk_select, centered_linear, dead_topk_select, sparse_encode,
                                       topk_select, with_extra_columns)

if TYPE_CHECKING:
    from saecache.train.crosslayer import CrossLayer, CrossLayerConfig


@dataclass
class SourceCode:
    """One source's post-activation features: selected entries (topk, batchtopk) or dense f_BF."""
    sparse: SparseCode | None = None
    f_BF: Tensor | None = None
    pen: Tensor | None = None   # jumprelu: this source's weighted penalty (tanh + pre-activation)
    aux: SparseCode | None = None  # topk family in training: AuxK's picks among the source's dead latents

    def public(self) -> SparseCode | Tensor:
        return self.sparse if self.sparse is not None else self.f_BF

    def fired(self, n_features: int) -> Tensor:
        """[F] bool: features active in at least one row."""
        if self.f_BF is not None:
            return (self.f_BF > 0).any(0)
        fired = torch.zeros(n_features, dtype=torch.bool, device=self.sparse.idx_N.device)
        fired[self.sparse.idx_N[self.sparse.vals_N > 0]] = True
        return fired

    def active(self) -> Tensor:
        """Number of active (row, feature) entries."""
        v = self.f_BF if self.f_BF is not None else self.sparse.vals_N
        return (v > 0).sum()


class TopKAct:
    """Per-row top k of relu(z) per source; sparse encode and decode (`sparse_ops`). In training, AuxK (Gao et al.
    2024) as the SAE's: each row also picks its top k_aux among the source's dead latents (silent for
    dead_tokens_threshold rows), which the loss trains to predict the residual error of the source's targets."""
    name, needs_k, unit_decoders = "topk", True, True

    def add_state(self, m: "CrossLayer", s: int) -> None:
        pass

    def select(self, cfg: CrossLayerConfig):
        return topk_select(cfg.k)

    def encode_train(self, m: "CrossLayer", s: int, x_BD: Tensor) -> SourceCode:
        cfg, (W, b) = m.cfg, m.encoder(s)
        select = self.select(cfg)
        dead_M = (getattr(m, f"tokens_since_fired_{s}") >= cfg.dead_tokens_threshold).nonzero().squeeze(1)
        n_aux = min(cfg.k_aux, dead_M.numel()) if cfg.auxk_alpha > 0 else 0
        if n_aux:
            select = with_extra_columns(select, dead_topk_select(dead_M, n_aux))
        sparse = sparse_encode(x_BD, None, W, b, select, m._workspace)
        if not n_aux:
            return SourceCode(sparse=sparse)
        main, aux = sparse.split(sparse.vals_N.numel() - x_BD.shape[0] * n_aux)  # the extras come last
        return SourceCode(sparse=main, aux=aux)

    def encode(self, m: "CrossLayer", s: int, x_BD: Tensor) -> SourceCode:
        W, b = m.encoder(s)
        return SourceCode(sparse=sparse_encode(x_BD, None, W, b, self.select(m.cfg)))

    def after_step(self, m: "CrossLayer", s: int, code: SourceCode) -> None:
        pass


class BatchTopKAct(TopKAct):
    """Top k·B of relu(z) per source over the batch; inference keeps z > threshold_s (EMA of the smallest kept
    value from `threshold_start_step` on, < 0 until then: the batch selection)."""
    name = "batchtopk"

    def add_state(self, m, s):
        m.register_buffer(f"threshold_{s}", torch.full((m.cfg.n_features,), -1.0))

    def select(self, cfg):
        return batch_topk_select(cfg.k)

    def encode(self, m, s, x_BD):
        thr = getattr(m, f"threshold_{s}")
        if float(thr[0]) < 0:
            return super().encode(m, s, x_BD)
        z = centered_linear(x_BD, None, *m.encoder(s))
        return SourceCode(f_BF=z.relu() * (z > thr))

    @torch.no_grad()
    def after_step(self, m, s, code):
        if int(m.n_steps) <= m.cfg.threshold_start_step:
            return
        kept = code.sparse.vals_N[code.sparse.vals_N > 0]
        if kept.numel():
            thr, beta = getattr(m, f"threshold_{s}"), m.cfg.threshold_beta
            thr.copy_(kept.min().expand_as(thr) if float(thr[0]) < 0 else beta * thr + (1 - beta) * kept.min())


class JumpReLUAct:
    """f = relu(z) · H(z − θ) (`penalties.JumpReLU`, rectangle-kernel pseudo-gradient for θ) with the Circuit
    Tracing penalty λ Σ_i tanh(c · f_i · ‖W_dec,i‖) + λ_p Σ_i relu(θ_i − z_i) ‖W_dec,i‖, each a mean over rows.
    Decoders are not normalised (the penalty reads their norms)."""
    name, needs_k, unit_decoders = "jumprelu", False, False

    def add_state(self, m, s):
        setattr(m, f"threshold_{s}", nn.Parameter(torch.full((m.cfg.n_features,), m.cfg.jumprelu_init_threshold)))

    def encode_train(self, m, s, x_BD):
        cfg, thr = m.cfg, getattr(m, f"threshold_{s}")
        z = centered_linear(x_BD, None, *m.encoder(s))
        f = P.JumpReLU.apply(z, thr, cfg.jumprelu_bandwidth)
        norm_F = getattr(m, f"W_dec_{s}").norm(dim=1)
        pen = cfg.coeff * torch.tanh(cfg.tanh_c * f * norm_F).sum(1).mean()
        if cfg.pre_act_coeff > 0:
            pen = pen + cfg.pre_act_coeff * ((thr - z).relu() * norm_F).sum(1).mean()
        return SourceCode(f_BF=f, pen=pen)

    def encode(self, m, s, x_BD):
        z = centered_linear(x_BD, None, *m.encoder(s))
        return SourceCode(f_BF=z.relu() * (z > getattr(m, f"threshold_{s}")))

    def after_step(self, m, s, code):
        pass


ACTIVATIONS = {a.name: a for a in (TopKAct(), BatchTopKAct(), JumpReLUAct())}
