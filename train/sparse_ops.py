"""Sparse encoder/decoder autograd for the TopK family (TopK, BatchTopK, AuxK).

A TopK SAE keeps K ≪ F latents per row, so after the dense encoder matmul everything can touch only the K selected
latents: the decoder is a gather-and-sum of K decoder rows (`embedding_bag` with per-sample weights), and both
backward passes produce gradients for only the touched rows/columns. Written by hand because PyTorch's autograd
through `topk` + `scatter` + a dense decode would materialise [B, F] gradients and run three more dense matmuls.
Plain PyTorch ops only, so the same code runs on CPU and CUDA.

Shapes: B rows, D width, F features, K selected per row (K may exceed k: BatchTopK candidates, AuxK extras).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor


def _argsort(flat: Tensor) -> Tensor:
    """Any order that sorts `flat` (small non-negative ints). On CPU numpy's vectorised int32 argsort runs on this
    thread in ~2 ms for B·K = 131k entries, while torch.sort's 1-D parallel path takes 30-700 ms when the cores are
    shared (it waits on busy intra-op threads); elsewhere torch.sort."""
    if flat.device.type == "cpu" and flat.numel() and int(flat.max()) < 2**31:
        return torch.from_numpy(np.argsort(flat.to(torch.int32).numpy())).to(torch.long)
    return flat.sort().indices


def _scatter_rows(idx_BK: Tensor, w_BK: Tensor, y_BD: Tensor, n_features: int) -> Tensor:
    """out_FD[f] = Σ over (b, j) with idx_BK[b, j] == f of w_BK[b, j] · y_BD[b]  (= Gᵀ @ y for the sparse G_BF).

    Sorting the B·K entries by feature turns this into one `embedding_bag` over y's rows (bag f = the entries of
    feature f): a single fused gather-scale-sum that writes each output row once. About 2x faster than
    `torch.sparse.mm` on a COO matrix on CPU, and it never materialises the [B·K, D] products."""
    B, K = idx_BK.shape
    flat = idx_BK.reshape(-1)
    order = _argsort(flat)
    offsets = torch.zeros(n_features, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.bincount(flat, minlength=n_features)[:-1].cumsum(0)
    rows = torch.div(order, K, rounding_mode="floor")
    return torch.nn.functional.embedding_bag(rows, y_BD, offsets, mode="sum",
                                             per_sample_weights=w_BK.reshape(-1)[order].to(y_BD.dtype))


def _gather_dot(idx_BK: Tensor, M_FD: Tensor, y_BD: Tensor) -> Tensor:
    """out_BK[b, j] = ⟨M_FD[idx_BK[b, j]], y_BD[b]⟩: the per-sample-weight gradient of `embedding_bag`, whose kernel
    never materialises the [B, K, D] gathered rows (about 3x faster than gather + bmm on CPU)."""
    with torch.enable_grad():
        w_BK = torch.ones(idx_BK.shape, dtype=M_FD.dtype, device=M_FD.device, requires_grad=True)
        out = torch.nn.functional.embedding_bag(idx_BK, M_FD.detach(), per_sample_weights=w_BK, mode="sum")
        return torch.autograd.grad(out, w_BK, y_BD.to(M_FD.dtype))[0]


def _autocast_inputs(*ts: Tensor | None) -> tuple:
    """Under autocast, the dtype the matmul would run in: custom Functions see autocast in forward but not in
    backward, so the forward casts explicitly and saves the cast tensors (the backward then matches them)."""
    dev = next(t for t in ts if t is not None).device.type
    if not torch.is_autocast_enabled(dev):
        return ts
    dt = torch.get_autocast_dtype(dev)
    return tuple(None if t is None else t.to(dt) for t in ts)


class CenteredLinear(torch.autograd.Function):
    """z_BF = (x_BD − b_pre_D) @ W_enc_DF + b_enc_F for the dense architectures.

    Plain autograd would get grad b_pre through grad x_c = G @ W_encᵀ, a full [B, F] × [F, D] matmul. Since
    grad b_pre = −Σ_b grad x_c[b] = −W_enc @ Σ_b G[b], it is a matrix-vector product here: one of the step's six
    big matmuls is saved. x gets a gradient only when it requires one."""

    @staticmethod
    def forward(ctx, x_BD, b_pre_D, W_enc_DF, b_enc_F):
        x_c_BD = x_BD if b_pre_D is None else x_BD - b_pre_D
        x_c_BD, W_enc_DF, b_enc_F = _autocast_inputs(x_c_BD, W_enc_DF, b_enc_F)
        ctx.save_for_backward(x_c_BD, W_enc_DF)
        ctx.has_pre = b_pre_D is not None
        return torch.addmm(b_enc_F, x_c_BD, W_enc_DF)

    @staticmethod
    def backward(ctx, g_BF):
        x_c_BD, W_enc_DF = ctx.saved_tensors
        need_x, need_pre, need_W, need_b = ctx.needs_input_grad
        g_sum_F = g_BF.sum(0) if (need_b or need_pre) else None
        grad_W = (g_BF.t() @ x_c_BD).t() if need_W else None  # [F, D] memory, like the parameter
        grad_pre = -(W_enc_DF @ g_sum_F) if need_pre and ctx.has_pre else None
        grad_x = g_BF @ W_enc_DF.t() if need_x else None
        return grad_x, grad_pre, grad_W, (g_sum_F if need_b else None)


def centered_linear(x_BD, b_pre_D, W_enc_DF, b_enc_F) -> Tensor:
    return CenteredLinear.apply(x_BD, b_pre_D, W_enc_DF, b_enc_F)


class SparseEncode(torch.autograd.Function):
    """vals_BK, idx_BK = relu(z_BF)[selected], z_BF = (x_BD - b_pre_D) @ W_enc_DF + b_enc_F.

    `select(z_BF) -> idx_BK` picks the latents (no gradient through the choice). Backward touches only the selected
    pre-activations: grad W_enc = x_cᵀ @ G with G sparse, grad b_pre = -W_enc @ Σ_b G_b.
    """

    @staticmethod
    def forward(ctx, x_BD, b_pre_D, W_enc_DF, b_enc_F, select: Callable[[Tensor], Tensor]):
        x_c_BD = x_BD if b_pre_D is None else x_BD - b_pre_D
        x_c_BD, W_enc_DF, b_enc_F = _autocast_inputs(x_c_BD, W_enc_DF, b_enc_F)
        z_BF = torch.addmm(b_enc_F, x_c_BD, W_enc_DF)
        idx_BK = select(z_BF)
        vals_BK = z_BF.gather(1, idx_BK).relu_()
        del z_BF
        ctx.save_for_backward(x_c_BD, W_enc_DF, idx_BK, vals_BK)
        ctx.has_pre = b_pre_D is not None
        ctx.mark_non_differentiable(idx_BK)
        return vals_BK, idx_BK

    @staticmethod
    def backward(ctx, g_vals_BK, _g_idx):
        x_c_BD, W_enc_DF, idx_BK, vals_BK = ctx.saved_tensors
        F = W_enc_DF.shape[1]
        g_BK = g_vals_BK * (vals_BK > 0)
        grad_x = grad_pre = grad_W = grad_b = None
        need_x, need_pre, need_W, need_b, _ = ctx.needs_input_grad
        if need_b or need_pre:
            grad_b = torch.zeros(F, dtype=g_BK.dtype, device=g_BK.device)
            grad_b.index_add_(0, idx_BK.reshape(-1), g_BK.reshape(-1))
        if need_W:
            grad_W = _scatter_rows(idx_BK, g_BK, x_c_BD, F).t()
        if need_pre and ctx.has_pre:
            grad_pre = -(W_enc_DF @ grad_b)
        if need_x:
            # Σ_j g_bj · W_enc[:, idx_bj] (rarely needed: inputs carry no grad).
            W_FD = W_enc_DF.t().contiguous()  # free when the parameter is stored feature-major
            grad_x = torch.nn.functional.embedding_bag(idx_BK, W_FD, per_sample_weights=g_BK, mode="sum")
        return grad_x, grad_pre, grad_W, (grad_b if need_b else None), None


class SparseDecode(torch.autograd.Function):
    """x_hat_BD = Σ_j vals_BK[:, j] · W_dec_FD[idx_BK[:, j]] (no bias). Backward touches only the K used rows."""

    @staticmethod
    def forward(ctx, vals_BK, idx_BK, W_dec_FD):
        ctx.save_for_backward(vals_BK, idx_BK, W_dec_FD)
        return torch.nn.functional.embedding_bag(idx_BK, W_dec_FD, per_sample_weights=vals_BK, mode="sum")

    @staticmethod
    def backward(ctx, g_BD):
        vals_BK, idx_BK, W_dec_FD = ctx.saved_tensors
        g_BD = g_BD.contiguous()
        grad_vals = _gather_dot(idx_BK, W_dec_FD, g_BD) if ctx.needs_input_grad[0] else None
        grad_W = _scatter_rows(idx_BK, vals_BK, g_BD, W_dec_FD.shape[0]) if ctx.needs_input_grad[2] else None
        return grad_vals, None, grad_W


def sparse_encode(x_BD, b_pre_D, W_enc_DF, b_enc_F, select) -> tuple[Tensor, Tensor]:
    return SparseEncode.apply(x_BD, b_pre_D, W_enc_DF, b_enc_F, select)


def sparse_decode(vals_BK: Tensor, idx_BK: Tensor, W_dec_FD: Tensor) -> Tensor:
    """Runs in the decoder's dtype (under autocast the codes may be bf16; the K-sparse decode is cheap anyway)."""
    return SparseDecode.apply(vals_BK.to(W_dec_FD.dtype), idx_BK, W_dec_FD)


def topk_select(k: int) -> Callable[[Tensor], Tensor]:
    """Per-row top-k."""
    return lambda z_BF: z_BF.topk(k, dim=1, sorted=False).indices


def batch_topk_select(k: int, out: dict) -> Callable[[Tensor], Tensor]:
    """Candidates for the batch-wide top (k·B), exactly: every row's top-2k, then only the rows whose candidates all
    reach the provisional threshold (they may hold more winners) are widened, 4x at a time, until no row can hide a
    winner. The final threshold (the k·B-th largest candidate) is stored in out["threshold"]; callers zero
    candidates below it. Rows narrower than the widest are padded with their smallest candidate, which lies below
    the threshold, so padding is always zeroed. Finally the candidates are compacted to the number of winners of
    the fullest row, so the sparse decoder and backward see B × (most winners in a row) entries, not B × (widest
    candidate list)."""

    def select(z_BF: Tensor) -> Tensor:
        B, F = z_BF.shape
        m = min(F, 2 * k)
        v_BM, i_BM = z_BF.topk(m, dim=1, sorted=False)
        width_B = torch.full((B,), m, device=z_BF.device)  # real candidates per row (the rest is padding)
        while True:
            real_BM = torch.arange(v_BM.shape[1], device=z_BF.device) < width_B[:, None]
            flat = v_BM.masked_fill(~real_BM, float("-inf")).reshape(-1)
            thr = flat.kthvalue(flat.numel() - k * B + 1).values
            row_min = v_BM.masked_fill(~real_BM, float("inf")).min(1).values
            grow = ((row_min >= thr) & (width_B < F)).nonzero().squeeze(1)
            if grow.numel() == 0:
                break
            m_new = min(F, 4 * int(width_B[grow].max()))
            v_new, i_new = z_BF[grow].topk(m_new, dim=1, sorted=False)
            if m_new > v_BM.shape[1]:  # pad every row to m_new with its smallest candidate
                pad = m_new - v_BM.shape[1]
                low = v_BM.masked_fill(~real_BM, float("inf")).argmin(1, keepdim=True)
                v_BM = torch.cat([v_BM, v_BM.gather(1, low).expand(B, pad)], 1)
                i_BM = torch.cat([i_BM, i_BM.gather(1, low).expand(B, pad)], 1)
            v_BM[grow], i_BM[grow], width_B[grow] = v_new, i_new, m_new
        out["threshold"] = thr
        # compact: keep only as many columns as the row with the most winners needs (every row's best candidates)
        real_BM = torch.arange(v_BM.shape[1], device=z_BF.device) < width_B[:, None]
        v_BM = v_BM.masked_fill(~real_BM, float("-inf"))
        K_out = max(1, int((v_BM >= thr).sum(1).max()))
        if K_out < v_BM.shape[1]:
            i_BM = i_BM.gather(1, v_BM.topk(K_out, dim=1, sorted=False).indices)
        return i_BM

    return select


def with_extra_columns(select, extra: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Append more selected columns per row (AuxK candidates) computed from the same pre-activations."""
    return lambda z_BF: torch.cat([select(z_BF), extra(z_BF)], dim=1)


def dead_topk_select(dead_idx_N: Tensor, k_aux: int) -> Callable[[Tensor], Tensor]:
    """Per-row top-k_aux among the dead latents only (AuxK)."""
    return lambda z_BF: dead_idx_N[z_BF[:, dead_idx_N].topk(k_aux, dim=1, sorted=False).indices]
