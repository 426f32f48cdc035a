"""Architecture objects: the registry, Matryoshka BatchTopK (gradients against dense autograd, selection, nested
prefixes, a planted dictionary), the buffered dense ops against plain autograd, and old cfg.json field names."""

import pytest
import torch
from torch.testing import assert_close

from saecache.errors import ConfigError
from saecache.train import dense_ops as DO
from saecache.train import penalties as P
from saecache.train.arch import ARCHITECTURES, Architecture, default_group_sizes
from saecache.train.optim import make_optimizer, project_decoder_grad_, renorm_decoder_
from saecache.train.sae import SAE, SAEConfig, load_sae, save_sae

D, F, B, K = 12, 40, 24, 5
GROUPS = [4, 6, 10, 20]


def matryoshka(dtype=torch.float64, seed=0, **over):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig("matryoshka", D, F, k=K, group_sizes=GROUPS, threshold_start_step=0, **over)).to(dtype)
    with torch.no_grad():
        for p in (sae.b_enc_F, sae.b_dec_D):
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(B, D, dtype=dtype) * 2 + 0.5
    x[0] *= 6.0  # row 0 holds far more than k winners, other rows fewer
    return sae, x


def test_registry_holds_objects_with_one_interface():
    cross = ["clt", "clt-batchtopk", "clt-jumprelu", "crosscoder", "crosscoder-batchtopk", "crosscoder-jumprelu"]
    assert list(ARCHITECTURES) == ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka", "skip-transcoder",
                                   *cross]
    for name, a in ARCHITECTURES.items():
        assert isinstance(a, Architecture) and a.name == name and a.penalties[0] in a.default_coeff
    assert [n for n, a in ARCHITECTURES.items() if not a.resample] == ["topk", "batchtopk", "matryoshka",
                                                                       "skip-transcoder", *cross]
    assert [n for n, a in ARCHITECTURES.items() if a.cross_layer] == cross


def test_matryoshka_config():
    assert default_group_sizes(1024) == [64, 64, 128, 256, 512]
    assert sum(default_group_sizes(10)) == 10 and min(default_group_sizes(10)) > 0
    c = SAEConfig("matryoshka", 8, 1024, k=4)
    assert c.group_sizes == [64, 64, 128, 256, 512] and c.penalty == "none"
    assert SAEConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="summing to width=16"):
        SAEConfig("matryoshka", 8, 16, k=4, group_sizes=[8, 4])
    with pytest.raises(ConfigError, match="positive integers"):
        SAEConfig("matryoshka", 8, 16, k=4, group_sizes=[20, -4])
    with pytest.raises(ConfigError, match="only for matryoshka"):
        SAEConfig("batchtopk", 8, 16, k=4, group_sizes=[8, 8])
    with pytest.raises(ConfigError, match="needs 0 < k"):
        SAEConfig("matryoshka", 8, 16)


def _dense_matryoshka_loss(sae, x, keep_flat):
    """The definition with plain autograd: batch top-k·B of relu(pre), each prefix decoded densely, summed losses."""
    params = [p.detach().clone().requires_grad_() for p in (sae.W_enc_DF, sae.b_enc_F, sae.W_dec_FD, sae.b_dec_D)]
    W_enc, b_enc, W_dec, b_dec = params
    z = ((x - b_dec) @ W_enc + b_enc).relu()
    f = z * keep_flat.view_as(z)
    losses, end = [], 0
    for size in sae.cfg.group_sizes:
        end += size
        x_hat = f[:, :end] @ W_dec[:end] + b_dec
        losses.append(((x_hat - x) ** 2).sum(1).mean())
    return f, torch.stack(losses), params


def test_matryoshka_loss_and_grads_match_dense_reference():
    sae, x = matryoshka()
    sae.eval()  # no counter updates, no AuxK (nothing dead)
    out = sae.loss(x)
    z = sae.pre_acts(x).detach()
    keep = torch.zeros(z.numel(), dtype=torch.bool)
    keep[z.flatten().topk(K * B).indices] = True  # z > 0 at every winner here (checked below)
    f, losses, params = _dense_matryoshka_loss(sae, x, keep)
    assert (f[0] > 0).sum() > 2 * K and (z.flatten()[keep] > 0).all()
    assert_close(out.f_BF, f.detach())
    assert_close(out.recon, losses[-1])  # the whole dictionary's loss
    assert_close(out.inner, losses[:-1].sum())
    assert_close(out.total, losses.sum())  # the sum of the prefix losses
    assert len(set(round(v, 6) for v in losses.tolist())) == len(GROUPS)  # prefixes really differ
    mine = torch.autograd.grad(out.total, [sae.W_enc_DF, sae.b_enc_F, sae.W_dec_FD, sae.b_dec_D])
    ref = torch.autograd.grad(losses.sum(), params)
    for a, r in zip(mine, ref):
        assert_close(a, r)


def test_matryoshka_selection_and_threshold():
    sae, x = matryoshka(dtype=torch.float32)
    sae.train()
    out = sae.loss(x)
    c = out.code.sparse
    assert c.vals_N.numel() == K * B and (c.row_N.diff() >= 0).all()
    z = sae.pre_acts(x).detach().flatten()
    assert torch.equal(torch.sort(c.row_N * F + c.idx_N).values, torch.sort(z.topk(K * B).indices).values)
    assert float(sae.threshold) == pytest.approx(float(c.vals_N.detach()[c.vals_N > 0].min()))
    sae.eval()  # inference: f > threshold, as batchtopk
    zz = sae.pre_acts(x)
    assert_close(sae.encode(x), zz.relu() * (zz > sae.threshold))


def test_matryoshka_auxk_reaches_dead_latents_only():
    sae, x = matryoshka(dtype=torch.float32, dead_tokens_threshold=1)
    sae.tokens_since_fired_F[:10] = 5
    sae.train()
    out = sae.loss(x)
    assert out.aux > 0 and out.code.aux is not None
    sae.zero_grad()
    out.aux.backward()
    touched = sae.W_dec_FD.grad.abs().sum(1) > 0
    assert touched[:10].any() and not touched[10:].any()


@pytest.mark.parametrize("export", ["dictionary_learning", "saelens"])
def test_matryoshka_export_keeps_the_inference_map(export, tmp_path):
    from saecache.evaluate import formats as FM
    from saecache.evaluate import saelens as SL

    sae, x = matryoshka(dtype=torch.float32)
    sae.train()
    sae.loss(x)  # sets the threshold
    sae.eval()
    if export == "dictionary_learning":
        FM.write_dictionary_learning(FM.from_sae(sae), str(tmp_path))
        sd = torch.load(tmp_path / "ae.pt", weights_only=True)
        assert sd["group_sizes"].tolist() == GROUPS and int(sd["k"]) == K
        back = FM.to_sae(FM.read_dictionary_learning(str(tmp_path)))
        assert back.cfg.arch == "matryoshka" and back.cfg.group_sizes == GROUPS
    else:
        SL.write_saelens(FM.from_sae(sae), str(tmp_path))
        w = SL.read_saelens(str(tmp_path))
        assert w.arch.name == "jumprelu" and torch.all(w.threshold == sae.threshold)
        back = FM.to_sae(w).eval()
    with torch.no_grad():
        assert_close(back.encode(x), sae.encode(x))
        assert_close(back(x), sae(x))


def test_matryoshka_without_threshold_is_refused_for_export(tmp_path):
    from saecache.errors import RunDirError
    from saecache.evaluate import formats as FM

    sae, _ = matryoshka(dtype=torch.float32)
    with pytest.raises(RunDirError, match="matryoshka SAE to dictionary_learning: it has no inference threshold"):
        FM.write_dictionary_learning(FM.from_sae(sae), str(tmp_path))


def test_matryoshka_save_load_and_fold(tmp_path):
    sae, x = matryoshka(dtype=torch.float32)
    sae.train()
    sae.loss(x)
    sae.eval()
    save_sae(sae, tmp_path / "sae.safetensors")
    back = load_sae(sae.cfg, tmp_path / "sae.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(back(x), sae(x))
        f_scaled, out_scaled = sae.encode(x / 3.0), sae(x / 3.0) * 3.0
        sae.fold_scale(3.0, 3.0)
        assert_close(sae.encode(x), f_scaled) and assert_close(sae(x), out_scaled, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_matryoshka_recovers_planted_dictionary_with_frequent_atoms_first():
    """Planted atoms, the first 8 far more frequent than the rest. Matryoshka learns most atoms, and its first
    prefix (which must reconstruct alone) holds the frequent ones."""
    torch.manual_seed(0)
    d, n_atoms, k, n_rows = 32, 48, 3, 4096
    atoms = torch.randn(n_atoms, d)
    atoms /= atoms.norm(dim=1, keepdim=True)
    weight = torch.ones(n_atoms)
    weight[:8] = 12.0
    idx = torch.multinomial(weight.expand(n_rows, -1), k)
    data = torch.zeros(n_rows, n_atoms).scatter(1, idx, torch.rand(n_rows, k) + 0.5) @ atoms
    sae = SAE(SAEConfig("matryoshka", d, 2 * n_atoms, k=k, group_sizes=[8, 2 * n_atoms - 8]))
    sae.init_from_batch(data[:512])
    opt = make_optimizer(sae, 3e-3)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(1500):
            out = sae.loss(data[torch.randint(n_rows, (256,), generator=gen)])
            opt.zero_grad()
            out.total.backward()
            project_decoder_grad_(sae)
            opt.step()
            renorm_decoder_(sae)
    finally:
        torch.set_num_threads(threads)
    cos_AF = atoms @ sae.W_dec_FD.detach().t()
    assert (cos_AF.max(1).values >= 0.9).float().mean() >= 0.8
    assert (cos_AF[:8, :8].max(1).values >= 0.9).float().mean() >= 0.75  # frequent atoms live in the first prefix


# ---- the buffered dense ops against plain autograd ----

def _grads(fn, leaves, g_outs):
    outs = fn()
    return [o.detach().clone() for o in outs], torch.autograd.grad(outs, leaves, g_outs, allow_unused=True)


def test_relu_l1_op_matches_autograd():
    torch.manual_seed(1)
    z = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    g_f, g_pen = torch.randn(9, 7, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    stats = {}
    mine = _grads(lambda: DO.ReLUL1.apply(z * 1, {}, stats), [z], (g_f, g_pen))
    ref = _grads(lambda: (z.relu(), P.l1_penalty(z.relu(), nonneg=True)), [z], (g_f, g_pen))
    for a, r in zip(mine[0] + list(mine[1]), ref[0] + list(ref[1])):
        assert_close(a, r)
    assert torch.equal(stats["count_F"], (z > 0).sum(0).float())


@pytest.mark.parametrize("negative_threshold", [False, True])
def test_jumprelu_l0_op_matches_the_reference_op(negative_threshold):
    torch.manual_seed(7)
    eps = 0.3
    z = (torch.randn(40, 16, dtype=torch.float64) * 0.6).requires_grad_()
    theta = (torch.rand(16, dtype=torch.float64) * 0.5 - (0.3 if negative_threshold else 0.0)).requires_grad_()
    g_f, g_l0 = torch.randn(40, 16, dtype=torch.float64), torch.tensor(0.37, dtype=torch.float64)
    mine = _grads(lambda: DO.JumpReLUL0.apply(z * 1, theta, eps, {}, {}), [z, theta], (g_f, g_l0))
    ref = _grads(lambda: P.JumpReLUWithL0.apply(z * 1, theta, eps), [z, theta], (g_f, g_l0))
    assert ref[1][1].abs().sum() > 0
    for a, r in zip(mine[0] + list(mine[1]), ref[0] + list(ref[1])):
        assert_close(a, r)


def test_gated_op_matches_autograd():
    torch.manual_seed(2)
    z = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    b_gate, r_mag, b_mag = (torch.randn(6, dtype=torch.float64, requires_grad=True) * 1 for _ in range(3))
    leaves = [z, b_gate, r_mag, b_mag]
    g = [torch.randn(11, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64),
         torch.tensor(0.8, dtype=torch.float64)]

    def ref():
        pi_mag = (z - b_gate) * r_mag.exp() + b_mag
        return (z > 0) * pi_mag.relu(), z.relu(), z.relu().sum(1).mean()

    mine = _grads(lambda: DO.GatedL1.apply(z * 1, b_gate, r_mag, b_mag, {}, {}), leaves, g)
    expected = _grads(ref, leaves, g)
    for a, r in zip(mine[0] + list(mine[1]), expected[0] + list(expected[1])):
        assert_close(a, r)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated"])
def test_dense_training_reuses_buffers_and_refuses_a_stale_backward(arch):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch, D, F)).train()
    x = torch.randn(B, D)
    sae.loss(x).total.backward()
    ptrs = {k: v.data_ptr() for k, v in sae._workspace.items()}
    assert {"z", "f", "g"} <= set(ptrs)
    first = sae.loss(x)
    sae.loss(x * 2)  # overwrites the buffers `first` saved
    assert {k: v.data_ptr() for k, v in sae._workspace.items()} == ptrs
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.total.backward()


def test_old_cfg_json_field_names_are_read():
    old = {"architecture": "topk", "d_in": 8, "n_features": 32, "k": 4, "sparsity_coeff": None}
    # a record written before `optimizer` trained with Adam
    assert SAEConfig.from_dict(old) == SAEConfig(arch="topk", d_in=8, width=32, k=4, optimizer="adam")
    assert {"arch", "width", "coeff"} <= set(SAEConfig("relu", 4, 8).to_dict())
    assert not {"architecture", "n_features", "sparsity_coeff"} & set(SAEConfig("relu", 4, 8).to_dict())


def test_buffers_grow_only_and_serve_smaller_batches_in_place():
    torch.manual_seed(0)
    sae = SAE(SAEConfig("relu", D, F)).train()
    x = torch.randn(B, D)
    sae.loss(x).total.backward()
    ptr = sae._workspace["f"].data_ptr()
    sae.loss(x[:B - 3]).total.backward()  # a batch a few rows short (e.g. BOS rows left out)
    assert sae._workspace["f"].shape == (B - 3, F) and sae._workspace["f"].data_ptr() == ptr
    sae.loss(torch.randn(2 * B, D)).total.backward()
    assert sae._workspace["f"].shape == (2 * B, F)


def test_saes_sharing_one_workspace_train_as_if_alone():
    """The trainer gives a sweep one Workspace: SAEs of other widths and architectures stepping in between change
    nothing (each backward runs before the next SAE's forward)."""
    from saecache.train.sparse_ops import Workspace

    def run(shared: bool):
        torch.manual_seed(0)
        saes = [SAE(SAEConfig(a, D, w, k=K if ARCHITECTURES[a].needs_k else None)).train()
                for a, w in (("relu", F), ("gated", 2 * F), ("topk", 3 * F), ("jumprelu", F), ("matryoshka", F))]
        if shared:
            ws = Workspace()
            for s in saes:
                s._workspace = ws
        opts = [make_optimizer(s, 1e-2) for s in saes]
        gen = torch.Generator().manual_seed(1)
        for step in range(3):
            x = torch.randn(B - step, D, generator=gen)
            for s, o in zip(saes, opts):
                out = s.loss(x)
                o.zero_grad()
                out.total.backward()
                o.step()
        return [torch.cat([p.detach().flatten() for p in s.parameters()]) for s in saes]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
