"""Dead-neuron resampling as Anthropic describe it ("Towards Monosemanticity", 2023).

At chosen steps the training loop passes the latents that have not fired over a window of tokens (`SAE.dead_mask`)
and a batch of inputs. Each dead latent gets one input, drawn without replacement with probability ∝ the input's
SQUARED reconstruction loss; its decoder row becomes that input's (target's, for a transcoder) unit direction, its
encoder column the input's unit direction × 0.2 × the mean encoder norm of the alive latents, its encoder bias 0,
and the Adam moments of exactly those rows/columns are zeroed (LazyAdam's β powers set back to 1). The loop then
re-warms that SAE's LR (`optim.lr_factor(..., resample_steps=...)`). Only the SAEs whose `SAESpec.resample` is true
are resampled (by default relu/gated/jumprelu; the topk family has AuxK for its dead latents).

Differences from dictionary_learning's `resample_neurons` (see the reference notes): probabilities use the squared
loss (not the norm), directions are normalised before scaling, optimizer state is found by parameter object (not by
position), and architecture extras (gated magnitude, JumpReLU threshold) are reset too.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sampling_weights(x_hat_BD: Tensor, target_BD: Tensor) -> Tensor:
    """Per-row squared reconstruction loss ‖target − x̂‖², the (unnormalised) resampling probability."""
    return (target_BD - x_hat_BD).pow(2).sum(-1)


def _reset_moments_(optimizer: torch.optim.Optimizer, param: Tensor, index: tuple) -> None:
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            state[key][index] = 0.0
    for key in ("beta1_power", "beta2_power"):  # LazyAdam's per-element bias corrections: a fresh latent's count is 0
        if key in state:
            state[key][index] = 1.0


@torch.no_grad()
def resample_dead_(sae, optimizer: torch.optim.Optimizer, x_BD: Tensor, target_BD: Tensor | None, dead_F: Tensor,
                   generator: torch.Generator | None = None) -> int:
    """Reinitialise (up to B of) the dead latents in place; returns how many were resampled.

    The first min(#dead, B) dead latents in index order are resampled (one distinct input each).
    """
    target_BD = x_BD if target_BD is None else target_BD
    dead_idx = dead_F.nonzero().squeeze(1)
    n = min(dead_idx.numel(), x_BD.shape[0])
    if n == 0:
        return 0
    dead_idx = dead_idx[:n]

    w_B = sampling_weights(sae(x_BD), target_BD).double().cpu()
    if not bool(torch.isfinite(w_B).all()) or float(w_B.sum()) <= 0:
        w_B = torch.ones_like(w_B)
    rows = torch.multinomial(w_B, n, replacement=False, generator=generator).to(x_BD.device)

    x_in = x_BD[rows]
    x_out = target_BD[rows]
    unit_in = x_in / x_in.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit_out = x_out / x_out.norm(dim=1, keepdim=True).clamp_min(1e-12)

    W_enc, W_dec = sae.W_enc_DF, sae.W_dec_FD
    alive = ~dead_F
    enc_norm = float(W_enc[:, alive].norm(dim=0).mean()) if bool(alive.any()) else 1.0

    W_enc[:, dead_idx] = (unit_in * (0.2 * enc_norm)).t().to(W_enc.dtype)
    W_dec[dead_idx] = unit_out.to(W_dec.dtype)
    sae.b_enc_F[dead_idx] = 0.0
    _reset_moments_(optimizer, W_enc, (slice(None), dead_idx))
    _reset_moments_(optimizer, W_dec, (dead_idx,))
    _reset_moments_(optimizer, sae.b_enc_F, (dead_idx,))
    extras = {"r_mag_F": 0.0, "b_mag_F": 0.0, "threshold_F": sae.cfg.jumprelu_init_threshold}
    for name, value in extras.items():
        p = getattr(sae, name, None)
        if isinstance(p, torch.nn.Parameter):
            p[dead_idx] = value
            _reset_moments_(optimizer, p, (dead_idx,))
    sae.tokens_since_fired_F[dead_idx] = 0
    return n
