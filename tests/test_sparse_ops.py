"""Sparse TopK-family autograd (`saecache.train.sparse_ops`): the flat row-by-row entries (TopK, BatchTopK with rows
of very different sizes, AuxK extras) against plain autograd through dense ops, and the BatchTopK selection against the
brute-force batch top k·B, including inputs that defeat its sampled provisional threshold."""

import copy

import pytest
import torch
from torch.testing import assert_close

from saecache.train.sparse_ops import (Workspace, _positions_at_least, _sample_stride, batch_topk_select,
                                       dead_topk_select, sparse_decode, sparse_encode, topk_select, with_extra_columns)

B, D, F, D_OUT, K, A = 16, 10, 50, 7, 4, 3
DEAD = torch.tensor([1, 5, 7, 20, 33, 41])


def _reference_mask(z_BF, kind):
    """Which entries the definition keeps: each row's top K, or the batch's top K·B."""
    if kind == "topk":
        return torch.zeros_like(z_BF, dtype=torch.bool).scatter(1, z_BF.topk(K, dim=1).indices, True)
    mask = torch.zeros(z_BF.numel(), dtype=torch.bool)
    mask[z_BF.flatten().topk(K * B).indices] = True
    return mask.view_as(z_BF)


@pytest.mark.parametrize("aux", [False, True], ids=["plain", "auxk"])
@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_encode_decode_and_grads_match_dense_autograd(kind, aux):
    torch.manual_seed(3)
    b_pre = torch.randn(D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(D, F, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(F, dtype=torch.float64) * 0.01).requires_grad_()
    W_dec = torch.randn(F, D_OUT, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, D, dtype=torch.float64)
    x[0] *= 6.0  # row 0 holds far more than K batch winners ...
    x[[5, B - 1]] = b_pre.detach()  # ... rows 5 and the last get none (z = b ≈ 0): empty bags, one of them trailing
    x.requires_grad_()
    g_BD, g_aux_BD = torch.randn(B, D_OUT, dtype=torch.float64), torch.randn(B, D_OUT, dtype=torch.float64)
    leaves = (x, b_pre, W, b, W_dec)

    select = topk_select(K) if kind == "topk" else batch_topk_select(K)
    if aux:
        select = with_extra_columns(select, dead_topk_select(DEAD, A))
    code = sparse_encode(x, b_pre, W, b, select)
    main, extra = code.split(code.vals_N.numel() - B * A) if aux else (code, None)
    loss = (sparse_decode(main, W_dec) * g_BD).sum()
    if aux:
        loss = loss + (sparse_decode(extra, W_dec) * g_aux_BD).sum()
    grads = torch.autograd.grad(loss, leaves)

    z = (x - b_pre) @ W + b
    f = z.relu() * _reference_mask(z.detach(), kind)
    ref_loss = ((f @ W_dec) * g_BD).sum()
    if aux:
        dead_mask = torch.zeros(B, F, dtype=torch.bool)
        dead_mask[:, DEAD] = torch.zeros(B, len(DEAD), dtype=torch.bool).scatter(1, z[:, DEAD].topk(A, 1).indices, 1)
        ref_loss = ref_loss + (((z.relu() * dead_mask) @ W_dec) * g_aux_BD).sum()
    ref = torch.autograd.grad(ref_loss, leaves)

    per_row = torch.bincount(main.row_N, minlength=B)
    assert main.vals_N.numel() == K * B and (main.row_N.diff() >= 0).all()
    if kind == "batchtopk":
        assert per_row[0] > 2 * K and per_row[5] == 0 and per_row[-1] == 0
    assert_close(main.dense(F), f.detach())
    if aux:
        assert torch.equal(torch.bincount(extra.row_N, minlength=B), torch.full((B,), A))
        assert_close(extra.dense(F), (z.relu() * dead_mask).detach())
    for name, mine, r in zip(["x", "b_pre", "W_enc", "b_enc", "W_dec"], grads, ref):
        assert_close(mine, r, msg=name)


def _batch(case):
    """(z_BF, k) with k·B large enough that the selection samples z (stride > 1)."""
    g = torch.Generator().manual_seed(5)
    if case == "ties":  # four distinct values only: thousands of entries tie at the threshold
        return torch.randint(0, 4, (128, 512), generator=g).float(), 32
    Bz, Fz, k = (64, 256, 128) if case == "sample_short_of_k_B" else (128, 512, 32)
    z = torch.randn(Bz, Fz, generator=g) * torch.rand(Bz, 1, generator=g) * 3  # rows of very different scales
    s = _sample_stride(k * Bz, Bz, Fz)
    assert s > 1
    if case != "random":  # every sampled point above all others: the first provisional threshold admits only
        z.view(-1)[::s] += 20.0  # ~1.1·k·B/s + 5 sd < k·B entries, too few: the selection must lower it and retry
    if case == "sample_short_of_k_B":  # ... and even the whole sample is fewer than k·B points: take all of z
        assert z.numel() // s < k * Bz
    return z, k


@pytest.mark.parametrize("case", ["random", "misleading_sample", "sample_short_of_k_B", "ties"])
def test_batch_topk_selection_equals_brute_force(case):
    z, k = _batch(case)
    n_keep = k * z.shape[0]
    info = {}
    row_N, idx_N = batch_topk_select(k, info)(z)
    chosen = torch.zeros_like(z, dtype=torch.bool)
    chosen[row_N, idx_N] = True
    top = z.flatten().topk(n_keep)
    assert row_N.numel() == n_keep == int(chosen.sum())  # exactly k·B distinct entries, even with ties
    assert (row_N.diff() >= 0).all() and info["threshold"] == top.values.min()
    if case == "ties":  # any top-k·B set is right: nothing kept lies below anything dropped
        assert z[chosen].min() >= info["threshold"] >= z[~chosen].max()
    else:
        ref = torch.zeros(z.numel(), dtype=torch.bool)
        ref[top.indices] = True
        assert torch.equal(chosen.flatten(), ref)


@pytest.mark.parametrize("block", [1, 3 * 40, 7 * 40 + 5, 1 << 22], ids=["row", "3_rows", "7_rows_ragged_end", "one"])
def test_blocked_threshold_pass_equals_one_pass(block):
    z = torch.randn(50, 40, generator=torch.Generator().manual_seed(8))
    assert torch.equal(_positions_at_least(z, 0.7, block), (z >= 0.7).flatten().nonzero().squeeze(1))


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_workspace_is_reused_and_codes_never_alias_it(kind):
    """The reused z buffer: the second call writes into the same memory, yet the first call's codes and gradients
    are those of a call without a workspace; a different batch size replaces the buffer."""
    torch.manual_seed(9)
    W = torch.randn(D, F, dtype=torch.float64, requires_grad=True)
    b = torch.randn(F, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(F, D_OUT, dtype=torch.float64)
    x1, x2 = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)
    select = topk_select(K) if kind == "topk" else batch_topk_select(K)
    ws = Workspace()
    first = sparse_encode(x1, None, W, b, select, ws)
    assert copy.deepcopy(ws) == {} and "z_BF" in ws  # a copied SAE does not duplicate the buffer
    ptr = ws["z_BF"].data_ptr()
    sparse_encode(x2, None, W, b, select, ws)
    assert ws["z_BF"].data_ptr() == ptr
    ref = sparse_encode(x1, None, W, b, select)
    assert torch.equal(first.idx_N, ref.idx_N) and torch.equal(first.vals_N, ref.vals_N)
    mine = torch.autograd.grad(sparse_decode(first, W_dec).sum(), (W, b))
    for m, r in zip(mine, torch.autograd.grad(sparse_decode(ref, W_dec).sum(), (W, b))):
        assert_close(m, r)
    sparse_encode(x1[:5], None, W, b, select, ws)
    assert ws["z_BF"].shape == (5, F)
