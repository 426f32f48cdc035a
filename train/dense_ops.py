"""The training path of the dense architectures (relu, jumprelu, gated): encoder, activation + penalty, decoder as
autograd Functions that write every [B, F] tensor into buffers the SAE keeps between steps (`Workspace`).

Why by hand: on CPU a fresh [B, F] tensor costs more in page faults than the elementwise pass that fills it (4096 ×
32768 floats: ~150 ms of faults against ~50 ms of work), and plain autograd allocates one per op and per gradient.
Here the encoder writes z, the activation writes f (and its penalty and firing counts in the same few passes), the
decoder's backward writes ∂L/∂f, and the activation's backward turns that buffer into ∂L/∂z in place. Masks are
applied with `threshold_backward` (relu's own backward kernel, float in, float out): bool masks, masked_fill and
bool reductions measured 4-10× slower than a float pass on CPU.

Aliasing is safe: outputs are detached aliases of the buffers saved with `save_for_backward`, so a backward through
a graph whose buffers a later forward has overwritten fails with autograd's "modified by an inplace operation"
error instead of returning wrong gradients. Plain PyTorch ops only (CPU and CUDA).

Buffers (`sparse_ops.buffer` keys, views of flat buffers that only grow): z, f, g (∂L/∂f, then ∂L/∂z; the forward's scratch), plus gate and g2 (gated), near (jumprelu).
Shapes: B rows, D width, F features, P entries near a JumpReLU threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saecache.train.sparse_ops import autocast_inputs, buffer

_mask_by = torch.ops.aten.threshold_backward.grad_input  # out = a where b > t else 0, in one float pass


def _owned(g: Tensor | None, ws: dict, key: str) -> Tensor | None:
    """The incoming gradient if it is our buffer (free to overwrite), else a private copy (e.g. autograd summed the
    decoder's gradient with an entropy penalty's)."""
    if g is None or (ws.get(key) is not None and g.data_ptr() == ws[key].data_ptr() and g.is_contiguous()):
        return g
    return g.contiguous().clone()


class EncodeInto(torch.autograd.Function):
    """z_BF = (x_BD − b_pre_D) @ W_enc_DF + b_enc_F into ws["z"]; backward as `sparse_ops.CenteredLinear` (grad b_pre
    is a matrix-vector product), reading ∂L/∂z from wherever the activation left it."""

    @staticmethod
    def forward(ctx, x_BD, b_pre_D, W_enc_DF, b_enc_F, ws: dict):
        x_c_BD = x_BD if b_pre_D is None else x_BD - b_pre_D
        x_c_BD, W_enc_DF, b_enc_F = autocast_inputs(x_c_BD, W_enc_DF, b_enc_F)
        z = buffer(ws, "z", (x_BD.shape[0], W_enc_DF.shape[1]), x_c_BD)
        torch.addmm(b_enc_F, x_c_BD, W_enc_DF, out=z)
        ctx.save_for_backward(x_c_BD, W_enc_DF)
        ctx.has_pre = b_pre_D is not None
        return z.detach()

    @staticmethod
    def backward(ctx, g_BF):
        x_c_BD, W_enc_DF = ctx.saved_tensors
        need_x, need_pre, need_W, need_b, _ = ctx.needs_input_grad
        g_sum_F = g_BF.sum(0) if (need_b or need_pre) else None
        grad_W = (g_BF.t() @ x_c_BD).t() if need_W else None  # [F, D] memory, like the parameter
        grad_pre = -(W_enc_DF @ g_sum_F) if need_pre and ctx.has_pre else None
        grad_x = g_BF @ W_enc_DF.t() if need_x else None
        return grad_x, grad_pre, grad_W, (g_sum_F if need_b else None), None


class DecodeFrom(torch.autograd.Function):
    """x̂_BD = f_BF @ W_dec_FD + b_dec_D; backward writes ∂L/∂f into ws[key] (the decoder's only [B, F] output)."""

    @staticmethod
    def forward(ctx, f_BF, W_dec_FD, b_dec_D, ws: dict, key: str):
        f_BF, W_dec_FD, b_dec_D = autocast_inputs(f_BF, W_dec_FD, b_dec_D)
        ctx.save_for_backward(f_BF, W_dec_FD)
        ctx.ws, ctx.key = ws, key
        return torch.addmm(b_dec_D, f_BF, W_dec_FD)

    @staticmethod
    def backward(ctx, g_BD):
        f_BF, W_dec_FD = ctx.saved_tensors
        need_f, need_W, need_b, _, _ = ctx.needs_input_grad
        g_BD = g_BD.to(W_dec_FD.dtype)
        grad_f = None
        if need_f:
            grad_f = torch.mm(g_BD, W_dec_FD.t(), out=buffer(ctx.ws, ctx.key, f_BF.shape, W_dec_FD)).detach()
        grad_W = f_BF.t() @ g_BD if need_W else None
        return grad_f, grad_W, (g_BD.sum(0) if need_b else None), None, None


def _acc(t: Tensor) -> torch.dtype:
    """Accumulation dtype of a sum over [B, F]: at least float32 (bf16 sums drift), float64 kept."""
    return torch.promote_types(t.dtype, torch.float32)


def _count_active(f_BF: Tensor, ws: dict) -> Tensor:
    """count_F[i] = #rows with f_BF[:, i] > 0 (features are ≥ 0), through the free g buffer: sign → column sums."""
    return torch.sign(f_BF, out=buffer(ws, "g", f_BF.shape, f_BF)).sum(0, dtype=torch.float32)


class ReLUL1(torch.autograd.Function):
    """f = relu(z) into ws["f"] and the L1 penalty Σ_F f / B (features ≥ 0: no abs); stats["count_F"] = firing counts.
    Backward: ∂L/∂z = (∂L/∂f + g_pen / B) where f > 0, written over the incoming gradient buffer."""

    @staticmethod
    def forward(ctx, z_BF, ws: dict, stats: dict):
        f = torch.clamp_min(z_BF, 0, out=buffer(ws, "f", z_BF.shape, z_BF))
        pen = f.sum(dtype=_acc(f)).div(z_BF.shape[0]).to(z_BF.dtype)
        stats["count_F"] = _count_active(f, ws)
        ctx.save_for_backward(f)
        ctx.ws = ws
        return f.detach(), pen

    @staticmethod
    def backward(ctx, g_f_BF, g_pen):
        (f,) = ctx.saved_tensors
        g = _owned(g_f_BF, ctx.ws, "g") if g_f_BF is not None else torch.zeros_like(f)
        if g_pen is not None:
            g.add_(g_pen.to(g.dtype) / f.shape[0])
        return _mask_by(g, f, 0, grad_input=g), None, None


class JumpReLUL0(torch.autograd.Function):
    """(f, L0) of `penalties.JumpReLUWithL0` (same values and pseudo-gradients) on workspace buffers: f = z where
    z > max(θ, 0); the rectangle kernel's support |z − θ| < ε/2 is kept as the flat positions of its P entries
    (few: ε is small), so ∂L/∂θ is a gather over P entries instead of two more [B, F] passes."""

    @staticmethod
    def forward(ctx, z_BF, threshold_F, bandwidth: float, ws: dict, stats: dict):
        B, F = z_BF.shape
        f = buffer(ws, "f", z_BF.shape, z_BF)
        torch.sub(z_BF, threshold_F.clamp_min(0).to(z_BF.dtype), out=f)
        _mask_by(z_BF, f, 0, grad_input=f)  # z where z − max(θ, 0) > 0
        stats["count_F"] = count_F = _count_active(f, ws)
        scratch = buffer(ws, "g", z_BF.shape, z_BF)  # free until the backward
        if bool((threshold_F >= 0).all()):
            n_above = count_F.sum(dtype=torch.float64)
        else:  # a negative θ: z > θ also counts entries f leaves at 0
            n_above = torch.sign(torch.sub(z_BF, threshold_F, out=scratch), out=scratch).clamp_min_(0).sum(
                dtype=torch.float64)
        l0 = n_above.div(B).to(z_BF.dtype)
        near = buffer(ws, "near", z_BF.shape, z_BF, torch.bool)
        torch.lt(torch.sub(z_BF, threshold_F, out=scratch).abs_(), bandwidth / 2, out=near)
        pos_P = near.view(-1).nonzero().squeeze(1)
        ctx.save_for_backward(f, threshold_F, pos_P)
        ctx.bandwidth, ctx.ws = bandwidth, ws
        return f.detach(), l0

    @staticmethod
    def backward(ctx, g_f_BF, g_l0):
        f, threshold_F, pos_P = ctx.saved_tensors
        eps, (B, F) = ctx.bandwidth, f.shape
        col_P = pos_P % F
        grad_t = torch.zeros_like(threshold_F)
        grad_z = None
        if g_f_BF is not None:
            g = _owned(g_f_BF, ctx.ws, "g")
            g_P = g.reshape(-1)[pos_P].to(threshold_F.dtype)  # before the mask: the kernel's entries lie on both sides
            grad_t.index_add_(0, col_P, g_P, alpha=-1.0 / eps)
            grad_t.mul_(threshold_F.relu())
            grad_z = _mask_by(g, f, 0, grad_input=g)
        if g_l0 is not None:
            grad_t.index_add_(0, col_P, torch.full_like(col_P, 1, dtype=threshold_F.dtype),
                              alpha=-float(g_l0) / (eps * B))
        return grad_z, grad_t, None, None, None


class GatedL1(torch.autograd.Function):
    """Gated SAE activation (Rajamanoharan et al. 2024a) from the shared pre-activation z = π_gate (b_gate inside):
    gate = relu(z) into ws["gate"], f = [z > 0] · relu((z − b_gate) · exp(r_mag) + b_mag) into ws["f"], and the L1
    penalty Σ_F gate / B. Backward takes ∂L/∂f (main decoder) and ∂L/∂gate (the frozen-decoder aux loss) and writes
    ∂L/∂z = [z > 0] (∂L/∂gate + g_pen / B) + exp(r_mag) [f > 0] ∂L/∂f into the ∂L/∂gate buffer."""

    @staticmethod
    def forward(ctx, z_BF, b_gate_F, r_mag_F, b_mag_F, ws: dict, stats: dict):
        e_F = r_mag_F.exp().to(z_BF.dtype)
        f = buffer(ws, "f", z_BF.shape, z_BF)
        torch.addcmul((b_mag_F - b_gate_F * r_mag_F.exp()).to(z_BF.dtype), z_BF, e_F, out=f).clamp_min_(0)
        _mask_by(f, z_BF, 0, grad_input=f)  # only where the gate is open
        gate = torch.clamp_min(z_BF, 0, out=buffer(ws, "gate", z_BF.shape, z_BF))
        pen = gate.sum(dtype=_acc(gate)).div(z_BF.shape[0]).to(z_BF.dtype)
        stats["count_F"] = _count_active(f, ws)
        ctx.save_for_backward(f, gate, r_mag_F, b_mag_F)
        ctx.ws = ws
        return f.detach(), gate.detach(), pen

    @staticmethod
    def backward(ctx, g_f_BF, g_gate_BF, g_pen):
        f, gate, r_mag_F, b_mag_F = ctx.saved_tensors
        ws = ctx.ws
        e_F = r_mag_F.exp()
        g_z = _owned(g_gate_BF, ws, "g2") if g_gate_BF is not None else torch.zeros_like(f)
        if g_pen is not None:
            g_z.add_(g_pen.to(g_z.dtype) / f.shape[0])
        _mask_by(g_z, gate, 0, grad_input=g_z)
        grad_r = grad_bg = grad_bm = None
        if g_f_BF is not None:
            g = _owned(g_f_BF, ws, "g")
            g_m = _mask_by(g, f, 0, grad_input=g)  # ∂L/∂π_mag
            grad_bm = g_m.sum(0, dtype=_acc(f)).to(b_mag_F.dtype)
            gf_F = torch.mul(g_m, f, out=buffer(ws, "z", f.shape, f)).sum(0, dtype=_acc(f))  # z is free now
            grad_r = gf_F.to(r_mag_F.dtype) - b_mag_F * grad_bm  # Σ_b ∂L/∂π_mag · (π_mag − b_mag), π_mag = f there
            grad_bg = -e_F * grad_bm
            torch.addcmul(g_z, g_m, e_F.to(g_z.dtype), out=g_z)
        return g_z, grad_bg, grad_r, grad_bm, None, None
