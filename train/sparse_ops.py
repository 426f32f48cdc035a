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

import torch
from torch import Tensor


def _scatter_matmul(idx_BK: Tensor, w_BK: Tensor, y_BD: Tensor, n_features: int) -> Tensor:
    """out_FD[f] = Σ over (b, j) with idx_BK[b, j] == f of w_BK[b, j] · y_BD[b]  (= Gᵀ @ y for the sparse G_BF)."""
    B, K = idx_BK.shape
    rows = torch.arange(B, device=idx_BK.device).repeat_interleave(K)
    G_FB = torch.sparse_coo_tensor(
        torch.stack([idx_BK.reshape(-1), rows]), w_BK.reshape(-1), (n_features, B), check_invariants=False
    )
    return torch.sparse.mm(G_FB, y_BD)


def _gather_dot(idx_BK: Tensor, M_FD: Tensor, y_BD: Tensor, chunk: int = 512) -> Tensor:
    """out_BK[b, j] = ⟨M_FD[idx_BK[b, j]], y_BD[b]⟩, in row chunks so the gathered rows stay cache-sized."""
    out_BK = torch.empty(idx_BK.shape, dtype=y_BD.dtype, device=y_BD.device)
    for s in range(0, idx_BK.shape[0], chunk):
        rows_BKD = M_FD[idx_BK[s : s + chunk]]
        out_BK[s : s + chunk] = torch.bmm(rows_BKD, y_BD[s : s + chunk, :, None]).squeeze(-1)
    return out_BK


class SparseEncode(torch.autograd.Function):
    """vals_BK, idx_BK = relu(z_BF)[selected], z_BF = (x_BD - b_pre_D) @ W_enc_DF + b_enc_F.

    `select(z_BF) -> idx_BK` picks the latents (no gradient through the choice). Backward touches only the selected
    pre-activations: grad W_enc = x_cᵀ @ G with G sparse, grad b_pre = -W_enc @ Σ_b G_b.
    """

    @staticmethod
    def forward(ctx, x_BD, b_pre_D, W_enc_DF, b_enc_F, select: Callable[[Tensor], Tensor]):
        x_c_BD = x_BD if b_pre_D is None else x_BD - b_pre_D
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
            grad_W = _scatter_matmul(idx_BK, g_BK, x_c_BD, F).t()
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
        grad_W = _scatter_matmul(idx_BK, vals_BK, g_BD, W_dec_FD.shape[0]) if ctx.needs_input_grad[2] else None
        return grad_vals, None, grad_W


def sparse_encode(x_BD, b_pre_D, W_enc_DF, b_enc_F, select) -> tuple[Tensor, Tensor]:
    return SparseEncode.apply(x_BD, b_pre_D, W_enc_DF, b_enc_F, select)


def sparse_decode(vals_BK: Tensor, idx_BK: Tensor, W_dec_FD: Tensor) -> Tensor:
    return SparseDecode.apply(vals_BK, idx_BK, W_dec_FD)


def topk_select(k: int) -> Callable[[Tensor], Tensor]:
    """Per-row top-k."""
    return lambda z_BF: z_BF.topk(k, dim=1, sorted=False).indices


def batch_topk_select(k: int, out: dict) -> Callable[[Tensor], Tensor]:
    """Candidates for the batch-wide top (k·B): each row's top-m for the smallest m ≥ 2k that provably contains every
    winner (no row has all m candidates above the batch threshold). The threshold is stored in out["threshold"];
    callers zero candidates below it."""

    def select(z_BF: Tensor) -> Tensor:
        B, F = z_BF.shape
        m = min(F, 2 * k)
        while True:
            v_BM, i_BM = z_BF.topk(m, dim=1, sorted=False)
            flat = v_BM.reshape(-1)
            thr = flat.kthvalue(flat.numel() - k * B + 1).values
            if m == F or not bool((v_BM.min(1).values >= thr).any()):
                break
            m = min(F, 4 * m)
        out["threshold"] = thr
        return i_BM

    return select


def with_extra_columns(select, extra: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Append more selected columns per row (AuxK candidates) computed from the same pre-activations."""
    return lambda z_BF: torch.cat([select(z_BF), extra(z_BF)], dim=1)


def dead_topk_select(dead_idx_N: Tensor, k_aux: int) -> Callable[[Tensor], Tensor]:
    """Per-row top-k_aux among the dead latents only (AuxK)."""
    return lambda z_BF: dead_idx_N[z_BF[:, dead_idx_N].topk(k_aux, dim=1, sorted=False).indices]
