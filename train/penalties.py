"""Sparsity penalties and auxiliary losses as small pure functions, plus the JumpReLU straight-through pieces and the
geometric median used to initialise the decoder bias.

Conventions: every penalty returns a scalar averaged over the B rows of the batch; reconstruction errors are summed
over D and averaged over B (so they match `SAE.loss`'s `recon`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def reconstruction_loss(x_hat_BD: Tensor, target_BD: Tensor) -> Tensor:
    """Σ_D (x̂ − target)², mean over B."""
    return (x_hat_BD - target_BD).pow(2).sum(-1).mean()


def l1_penalty(f_BF: Tensor, nonneg: bool = False) -> Tensor:
    """Σ_F |f|, mean over B. With unit-norm decoder rows this equals the decoder-norm-weighted L1. `nonneg=True`
    (features known to be ≥ 0, e.g. after a ReLU) skips the abs: same value, and the same gradient wherever the
    feature is active, one [B, F] pass cheaper."""
    return (f_BF if nonneg else f_BF.abs()).sum(-1).mean()


def entropy_penalty(f_BF: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean over rows of the Shannon entropy (nats) of the row's normalised activation mass p_i = |f_i| / Σ_j |f_j|.

    H is 0 for a one-hot row and log(n) for n equal active features, so exp(H) is an "effective L0". It is
    scale-free: it concentrates mass on few features without shrinking magnitudes (unlike L1). All-zero rows count 0.
    d H / d|f_i| = −(log p_i + H) / Σ|f| for active i: small activations are pushed down, large ones up.
    """
    a_BF = f_BF.abs()
    s_B1 = a_BF.sum(-1, keepdim=True)
    p_BF = a_BF / s_B1.clamp_min(eps)
    h_B = -(p_BF * p_BF.clamp_min(eps).log()).sum(-1)  # clamp: 0·log 0 = 0 with a finite gradient
    return h_B.mean()


def auxk_loss(e_hat_BD: Tensor, e_BD: Tensor, var: Tensor) -> Tensor:
    """AuxK (Gao et al. 2024): squared error of the dead latents' reconstruction ê of the residual e = target − x̂
    (e detached by the caller), normalised by `var`, the residual's total variance over the batch (over every DDP
    rank's rows: `ddp.batch_variance`). 0 when that is 0."""
    err = (e_hat_BD - e_BD).pow(2).sum(-1).mean()
    return torch.where(var > 0, err / var.clamp_min(1e-30), torch.zeros_like(err))


def _rect(u: Tensor) -> Tensor:
    """Rectangle kernel K(u) = 1 for |u| < 1/2, else 0."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """f = relu(z) · H(z − θ). Gradient wrt z: H(z − θ) (where z > 0); wrt θ: −(relu(θ)/ε) K((z − θ)/ε) (the
    rectangle-kernel pseudo-derivative of Rajamanoharan et al. 2024b; relu(θ) keeps a negative θ from acting)."""

    @staticmethod
    def forward(ctx, z_BF, threshold_F, bandwidth: float):
        ctx.save_for_backward(z_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return z_BF.relu() * (z_BF > threshold_F)

    @staticmethod
    def backward(ctx, g_BF):
        z_BF, threshold_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = g_BF * ((z_BF > threshold_F) & (z_BF > 0))
        grad_t = -(threshold_F.relu() / eps) * _rect((z_BF - threshold_F) / eps) * g_BF
        return grad_z, grad_t.sum(0), None


class Step(torch.autograd.Function):
    """H(z − θ) with no gradient to z and the pseudo-derivative −(1/ε) K((z − θ)/ε) to θ (for the L0 penalty)."""

    @staticmethod
    def forward(ctx, z_BF, threshold_F, bandwidth: float):
        ctx.save_for_backward(z_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return (z_BF > threshold_F).to(z_BF.dtype)

    @staticmethod
    def backward(ctx, g_BF):
        z_BF, threshold_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = -(1.0 / eps) * _rect((z_BF - threshold_F) / eps) * g_BF
        return None, grad_t.sum(0), None


class JumpReLUWithL0(torch.autograd.Function):
    """(JumpReLU(z, θ), mean_b Σ_F Step(z, θ)) in one pass set: the same values and pseudo-gradients as `JumpReLU` and
    `Step` composed, with the [B, F] work fused (about 9 full passes instead of ~25). f = z where z > max(θ, 0)."""

    @staticmethod
    def forward(ctx, z_BF, threshold_F, bandwidth: float):
        active_BF = z_BF > threshold_F.clamp_min(0)
        f_BF = z_BF * active_BF
        above = active_BF if bool((threshold_F >= 0).all()) else z_BF > threshold_F
        l0 = above.sum(dtype=torch.float64).div(z_BF.shape[0]).to(z_BF.dtype)
        ctx.save_for_backward(z_BF, threshold_F, active_BF)
        ctx.bandwidth = bandwidth
        return f_BF, l0

    @staticmethod
    def backward(ctx, g_f_BF, g_l0):
        z_BF, threshold_F, active_BF = ctx.saved_tensors
        eps, B = ctx.bandwidth, z_BF.shape[0]
        near_BF = (z_BF - threshold_F).abs_() < eps / 2  # rectangle kernel K((z − θ)/ε)
        grad_t = torch.zeros_like(threshold_F)
        grad_z = None
        if g_f_BF is not None:
            grad_z = g_f_BF * active_BF
            grad_t -= threshold_F.relu() / eps * (g_f_BF * near_BF).sum(0)
        if g_l0 is not None:
            grad_t -= g_l0 / (eps * B) * near_BF.sum(0, dtype=threshold_F.dtype)
        return grad_z, grad_t, None


def l0_toward_target(l0_mean: Tensor, target_l0: float) -> Tensor:
    """(L0 / target − 1)²: the normalised L0 penalty dictionary_learning uses for JumpReLU (0 at the target)."""
    return (l0_mean / target_l0 - 1.0).pow(2)


@torch.no_grad()
def geometric_median(x_ND: Tensor, iters: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld's algorithm: the point minimising Σ_n ‖x_n − m‖, started at the mean."""
    x = x_ND.float()
    m_D = x.mean(0)
    for _ in range(iters):
        w_N = 1.0 / (x - m_D).norm(dim=-1).clamp_min(1e-8)
        new = (w_N[:, None] * x).sum(0) / w_N.sum()
        done = (new - m_D).norm() <= tol * max(1.0, float(m_D.norm()))
        m_D = new
        if done:
            break
    return m_D.to(x_ND.dtype)


class NestedPrefixLosses(torch.autograd.Function):
    """Matryoshka's prefix losses: err_G[g] = mean_b ‖b_dec_D + Σ_{h≤g} parts_BGD[b, h] − target_BD[b]‖², where
    parts_BGD[:, h] is group h's decode. Returns (err_G, x̂_BD of the whole dictionary, no grad).

    Written out so the [B, G, D] residuals live in one buffer the caller keeps (`ws["r"]`): the running sums over
    groups and, backward, the reverse running sums of (2/B)·∂L/∂err_g · r_g are G − 1 in-place adds of [B, D] slices,
    where plain autograd allocated some ten [B, G, D] tensors per step (BatchTopK + 70% on CPU)."""

    @staticmethod
    def forward(ctx, parts_BGD, b_dec_D, target_BD, ws: dict):
        B, G, D = parts_BGD.shape
        r = ws.get("r")
        if r is None or r.shape != parts_BGD.shape or r.dtype != parts_BGD.dtype or r.device != parts_BGD.device:
            ws.pop("r", None)
            r = ws["r"] = torch.empty_like(parts_BGD)
        r.copy_(parts_BGD)
        for g in range(1, G):
            r[:, g] += r[:, g - 1]
        r.add_(b_dec_D.to(r.dtype)).sub_(target_BD.to(r.dtype).unsqueeze(1))
        err_G = torch.linalg.vector_norm(r, dim=(0, 2)).pow(2).div(B)
        x_hat_BD = r[:, -1] + target_BD
        ctx.save_for_backward(r)
        ctx.mark_non_differentiable(x_hat_BD)
        return err_G, x_hat_BD

    @staticmethod
    def backward(ctx, g_err_G, _g_x_hat):
        (r,) = ctx.saved_tensors
        B, G, _ = r.shape
        r.mul_((2.0 / B) * g_err_G.to(r.dtype)[None, :, None])
        for g in range(G - 2, -1, -1):  # ∂L/∂parts[:, h] = Σ_{g ≥ h} (2/B) ∂L/∂err_g · r_g
            r[:, g] += r[:, g + 1]
        need_parts, need_b, need_t, _ = ctx.needs_input_grad
        grad_b = r[:, 0].sum(0) if need_b else None
        grad_t = -r[:, 0] if need_t else None
        return (r.detach() if need_parts else None), grad_b, grad_t, None
