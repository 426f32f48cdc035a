"""Sparse encoder/decoder autograd for the TopK family (TopK, BatchTopK, AuxK).

A TopK SAE keeps K ≪ F latents per row, so after the dense encoder matmul everything can touch only the selected
latents: the decoder is a gather-and-sum of decoder rows (`embedding_bag` with per-sample weights), and both backward
passes produce gradients for only the touched rows/columns. Written by hand because PyTorch's autograd through
`topk` + `scatter` + a dense decode would materialise [B, F] gradients and run three more dense matmuls.
Plain PyTorch ops only, so the same code runs on CPU and CUDA.

The selected latents are one flat list of N entries (`SparseCode`: value, latent, row), rows in order. TopK and AuxK
give every row the same count; BatchTopK's rows hold different counts, and the list holds exactly the batch's k·B
winners (no padding), so the decode and both backward passes cost what TopK's do.

Shapes: B rows, D width, F features, N selected entries in the batch (k·B for TopK and BatchTopK), A AuxK latents
per row, M dead latents.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

# A selection maps pre-activations z_BF to the chosen entries (row_N, idx_N), rows nondecreasing within each part.
Select = Callable[[Tensor], tuple[Tensor, Tensor]]


class SparseCode(NamedTuple):
    """A batch's selected latents, row by row: entry n is latent idx_N[n] of row row_N[n] with value vals_N[n]."""
    vals_N: Tensor
    idx_N: Tensor
    row_N: Tensor   # nondecreasing: each row's entries are contiguous (`embedding_bag` bags)
    n_rows: int

    def dense(self, n_features: int) -> Tensor:
        f_BF = torch.zeros(self.n_rows, n_features, dtype=self.vals_N.dtype, device=self.vals_N.device)
        return f_BF.index_put_((self.row_N, self.idx_N), self.vals_N, accumulate=True)

    def split(self, n: int) -> tuple["SparseCode", "SparseCode"]:
        """The first n entries and the rest (the selection and its AuxK extras)."""
        return (SparseCode(self.vals_N[:n], self.idx_N[:n], self.row_N[:n], self.n_rows),
                SparseCode(self.vals_N[n:], self.idx_N[n:], self.row_N[n:], self.n_rows))


def _argsort(flat: Tensor, bound: int) -> Tensor:
    """Any order that sorts `flat` (ints in [0, bound)). On CPU numpy's vectorised int32 argsort, on this thread
    (~2 ms for 131k entries on a quiet core); elsewhere torch.sort. torch.sort's 1-D parallel path was the first
    sign of torch's OpenMP threads spinning on shared cores (`saecache/threads.py`): 131k entries took 510 ms
    beside other jobs and 2.9 s with one more busy process, against 32 ms and 8 ms once its threads wait passively.
    numpy stays: it needs no parallel region at all, so it is also safe where torch loaded before saecache."""
    if flat.device.type == "cpu" and bound <= 2**31:
        return torch.from_numpy(np.argsort(flat.to(torch.int32).numpy())).to(torch.long)
    return flat.sort().indices


def _bag_starts(key_N: Tensor, n_bags: int) -> Tensor:
    """Start of each bag in a list sorted by key (empty bags start where the next one does)."""
    starts = torch.zeros(n_bags, dtype=torch.long, device=key_N.device)
    starts[1:] = torch.bincount(key_N, minlength=n_bags)[:-1].cumsum(0)
    return starts


def _bag_sum(key_N: Tensor, src_N: Tensor, w_N: Tensor, y_SD: Tensor, n_out: int) -> Tensor:
    """out[o] = Σ over entries n with key_N[n] == o of w_N[n] · y_SD[src_N[n]]  (a sparse matrix times y).

    Sorting the entries by key turns this into one `embedding_bag` over y's rows: a single fused gather-scale-sum
    that writes each output row once. About 2x faster than `torch.sparse.mm` on a COO matrix on CPU, and it never
    materialises the [N, D] products."""
    order = _argsort(key_N, n_out)
    return torch.nn.functional.embedding_bag(src_N[order], y_SD, _bag_starts(key_N, n_out), mode="sum",
                                             per_sample_weights=w_N[order].to(y_SD.dtype))


def _gather_dot(c: SparseCode, M_FD: Tensor, y_BD: Tensor) -> Tensor:
    """out_N[n] = ⟨M_FD[idx_N[n]], y_BD[row_N[n]]⟩: the per-sample-weight gradient of `embedding_bag`, whose kernel
    never materialises the [N, D] gathered rows (about 3x faster than gather + bmm on CPU)."""
    with torch.enable_grad():
        w_N = torch.ones(c.idx_N.shape, dtype=M_FD.dtype, device=M_FD.device, requires_grad=True)
        out = torch.nn.functional.embedding_bag(c.idx_N, M_FD.detach(), _bag_starts(c.row_N, c.n_rows),
                                                per_sample_weights=w_N, mode="sum")
        return torch.autograd.grad(out, w_N, y_BD.to(M_FD.dtype))[0]


def autocast_inputs(*ts: Tensor | None) -> tuple:
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
        x_c_BD, W_enc_DF, b_enc_F = autocast_inputs(x_c_BD, W_enc_DF, b_enc_F)
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


class Workspace(dict):
    """Scratch buffers a caller keeps between steps (`buffer`), shareable by SAEs that step one after another (the
    trainer gives one to a whole sweep). Not state: a deep copy (of the SAE holding it) starts empty instead of
    duplicating [B, F] buffers."""

    def __deepcopy__(self, memo) -> "Workspace":
        return Workspace()


def buffer(ws: dict, key: str, shape: tuple, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """ws[key]: a `shape` view of a flat buffer that only grows (kept under ("flat", key)), so batches of varying
    size and SAEs of different widths sharing `ws` reuse one allocation: the largest B·F seen. Reallocated when the
    dtype or device change."""
    dtype = dtype or like.dtype
    n = math.prod(shape)
    flat = ws.get(("flat", key))
    if flat is None or flat.numel() < n or flat.dtype != dtype or flat.device != like.device:
        ws.pop(key, None)
        ws.pop(("flat", key), None)  # drop the old buffer before allocating the new one
        flat = ws[("flat", key)] = torch.empty(n, dtype=dtype, device=like.device)
    view = ws[key] = flat[:n].view(shape)
    return view


def _workspace_BF(workspace: dict | None, like_BD: Tensor, F: int) -> Tensor | None:
    """The caller's reusable [B, F] buffer for z (allocated or replaced when the shape, dtype or device changes).
    Writing z into memory the process already holds saves the page faults of a fresh [B, F] tensor every step,
    ~40 ms at 4096 × 8192 and ~150 ms at 4096 × 32768 on CPU (10-15% of a TopK step). z never outlives the
    forward (the codes are copies), so one buffer serves every step."""
    if workspace is None:
        return None
    return buffer(workspace, "z_BF", (like_BD.shape[0], F), like_BD)


class SparseEncode(torch.autograd.Function):
    """vals_N = relu(z_BF[row_N, idx_N]) for the entries `select(z_BF)` picks, z_BF = (x_BD − b_pre_D) @ W_enc_DF +
    b_enc_F. No gradient through the choice; backward touches only the selected pre-activations:
    grad W_enc = x_cᵀ @ G with G sparse, grad b_pre = −W_enc @ Σ_b G_b."""

    @staticmethod
    def forward(ctx, x_BD, b_pre_D, W_enc_DF, b_enc_F, select: Select, workspace: dict | None):
        x_c_BD = x_BD if b_pre_D is None else x_BD - b_pre_D
        x_c_BD, W_enc_DF, b_enc_F = autocast_inputs(x_c_BD, W_enc_DF, b_enc_F)
        z_BF = torch.addmm(b_enc_F, x_c_BD, W_enc_DF, out=_workspace_BF(workspace, x_c_BD, W_enc_DF.shape[1]))
        row_N, idx_N = select(z_BF)
        vals_N = z_BF[row_N, idx_N].relu_()
        del z_BF
        ctx.save_for_backward(x_c_BD, W_enc_DF, row_N, idx_N, vals_N)
        ctx.has_pre = b_pre_D is not None
        ctx.mark_non_differentiable(row_N, idx_N)
        return vals_N, idx_N, row_N

    @staticmethod
    def backward(ctx, g_vals_N, _g_idx, _g_row):
        x_c_BD, W_enc_DF, row_N, idx_N, vals_N = ctx.saved_tensors
        (B, D), F = x_c_BD.shape, W_enc_DF.shape[1]
        g_N = g_vals_N * (vals_N > 0)
        grad_x = grad_pre = grad_W = grad_b = None
        need_x, need_pre, need_W, need_b, _, _ = ctx.needs_input_grad
        if need_b or need_pre:
            grad_b = torch.zeros(F, dtype=g_N.dtype, device=g_N.device).index_add_(0, idx_N, g_N)
        if need_W:
            grad_W = _bag_sum(idx_N, row_N, g_N, x_c_BD, F).t()
        if need_pre and ctx.has_pre:
            grad_pre = -(W_enc_DF @ grad_b)
        if need_x:  # Σ_n g_n · W_enc[:, idx_n] into row_n (rarely needed: inputs carry no grad)
            W_FD = W_enc_DF.t().contiguous()  # free when the parameter is stored feature-major
            grad_x = _bag_sum(row_N, idx_N, g_N, W_FD, B)
        return grad_x, grad_pre, grad_W, (grad_b if need_b else None), None, None


class SparseDecode(torch.autograd.Function):
    """x_hat_BD[b] = Σ over row b's entries n of vals_N[n] · W_dec_FD[idx_N[n]] (no bias). Backward touches only the
    used decoder rows."""

    @staticmethod
    def forward(ctx, vals_N, idx_N, row_N, n_rows: int, W_dec_FD):
        ctx.save_for_backward(vals_N, idx_N, row_N, W_dec_FD)
        ctx.n_rows = n_rows
        return torch.nn.functional.embedding_bag(idx_N, W_dec_FD, _bag_starts(row_N, n_rows),
                                                 per_sample_weights=vals_N, mode="sum")

    @staticmethod
    def backward(ctx, g_BD):
        vals_N, idx_N, row_N, W_dec_FD = ctx.saved_tensors
        g_BD = g_BD.contiguous()
        c = SparseCode(vals_N, idx_N, row_N, ctx.n_rows)
        grad_vals = _gather_dot(c, W_dec_FD, g_BD) if ctx.needs_input_grad[0] else None
        grad_W = _bag_sum(idx_N, row_N, vals_N, g_BD, W_dec_FD.shape[0]) if ctx.needs_input_grad[4] else None
        return grad_vals, None, None, None, grad_W


def sparse_encode(x_BD, b_pre_D, W_enc_DF, b_enc_F, select: Select, workspace: dict | None = None) -> SparseCode:
    """`workspace`: a dict the caller keeps between calls, to hold the reused z buffer (`_workspace_BF`)."""
    vals_N, idx_N, row_N = SparseEncode.apply(x_BD, b_pre_D, W_enc_DF, b_enc_F, select, workspace)
    return SparseCode(vals_N, idx_N, row_N, x_BD.shape[0])


def sparse_decode(c: SparseCode, W_dec_FD: Tensor) -> Tensor:
    """Runs in the decoder's dtype (under autocast the codes may be bf16; the sparse decode is cheap anyway)."""
    return SparseDecode.apply(c.vals_N.to(W_dec_FD.dtype), c.idx_N, c.row_N, c.n_rows, W_dec_FD)


def _per_row(idx_BK: Tensor) -> tuple[Tensor, Tensor]:
    """(row_N, idx_N) of the same number of latents per row."""
    B, K = idx_BK.shape
    return torch.arange(B, device=idx_BK.device).repeat_interleave(K), idx_BK.reshape(-1)


def topk_select(k: int) -> Select:
    """Per-row top-k."""
    return lambda z_BF: _per_row(z_BF.topk(k, dim=1, sorted=False).indices)


def _sample_stride(n_keep: int, B: int, F: int) -> int:
    """Stride of the threshold sample of the row-major z_BF: about 1024 sample points above the threshold, fewer when
    that would take more than ~2^18 sample points (a kthvalue over more costs more than it saves). Coprime to F so
    the sample visits every column (a stride dividing F would see the same few features in every row)."""
    s = max(1, n_keep // 1024, (B * F) >> 18)
    while math.gcd(s, F) != 1:
        s += 1
    return s


def _positions_at_least(z_BF: Tensor, t: Tensor | float, block: int = 1 << 23) -> Tensor:
    """Flat row-major positions of the entries ≥ t. On CPU in blocks of rows (~`block` entries) sharing one mask
    buffer: a fresh [B, F] mask costs more in page faults than the comparison itself."""
    B, F = z_BF.shape
    if z_BF.device.type != "cpu":
        return (z_BF >= t).view(-1).nonzero().squeeze(1)
    R = max(1, block // F)
    mask = torch.empty(min(B, R) * F, dtype=torch.bool)
    parts = []
    for r0 in range(0, B, R):
        z_chunk = z_BF[r0:r0 + R].reshape(-1)
        parts.append(torch.ge(z_chunk, t, out=mask[:z_chunk.numel()]).nonzero().squeeze(1) + r0 * F)
    return torch.cat(parts)


def batch_topk_select(k: int, out: dict | None = None) -> Select:
    """Exactly the batch-wide top k·B pre-activations, as entries row by row; the threshold (the k·B-th largest) is
    stored in out["threshold"] when `out` is given.

    A strided sample of z gives a provisional threshold t, chosen so a little more than k·B entries of z reach it.
    One pass collects every entry ≥ t; if they are at least k·B, they hold all the winners (everything else is below
    them) and the k·B-th largest among them is the exact threshold. An unlucky sample (fewer than k·B reach t)
    lowers t and retries, down to taking all of z. Ties at the threshold are cut so exactly k·B entries are kept."""

    def select(z_BF: Tensor) -> tuple[Tensor, Tensor]:
        B, F = z_BF.shape
        n_keep = k * B
        z_N = z_BF.reshape(-1)
        s = _sample_stride(n_keep, B, F)
        sample = z_N[::s]
        expected = n_keep / s  # sample points above the true threshold; 5 sd of margin (plus 10%) on top
        rank = math.ceil(1.1 * expected + 5 * math.sqrt(expected))  # the rank-th largest sample point is t
        while True:
            everything = rank > sample.numel()
            t = -math.inf if everything else sample.kthvalue(sample.numel() - rank + 1).values
            pos_N = _positions_at_least(z_BF, t)  # row-major: rows stay in order
            if pos_N.numel() >= n_keep or everything:
                break
            rank *= 4
        v_N = z_N[pos_N]
        n_keep = min(n_keep, v_N.numel())  # fewer only if z holds NaN
        thr = v_N.kthvalue(v_N.numel() - n_keep + 1).values
        keep_N = v_N >= thr
        surplus = int(keep_N.sum()) - n_keep
        if surplus > 0:  # ties at the threshold
            keep_N[(v_N == thr).nonzero().squeeze(1)[:surplus]] = False
        if out is not None:
            out["threshold"] = thr
        pos_N = pos_N[keep_N]
        row_N = torch.div(pos_N, F, rounding_mode="floor")
        return row_N, pos_N - row_N * F

    return select


def with_extra_columns(select: Select, extra: Callable[[Tensor], Tensor]) -> Select:
    """Append A more latents per row (AuxK candidates, `extra(z_BF) -> idx_BA`) after the selection's entries,
    computed from the same pre-activations."""

    def both(z_BF: Tensor) -> tuple[Tensor, Tensor]:
        (row_N, idx_N), (aux_row_N, aux_idx_N) = select(z_BF), _per_row(extra(z_BF))
        return torch.cat([row_N, aux_row_N]), torch.cat([idx_N, aux_idx_N])

    return both


def dead_topk_select(dead_idx_M: Tensor, k_aux: int) -> Callable[[Tensor], Tensor]:
    """Per-row top-k_aux among the dead latents only (AuxK): idx_BA."""
    return lambda z_BF: dead_idx_M[z_BF[:, dead_idx_M].topk(k_aux, dim=1, sorted=False).indices]
