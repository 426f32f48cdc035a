"""SAE module family: per-architecture invariants, penalty gradients, the sparse TopK autograd against a dense
reference, scale folding, save/load, schedules, and recovery of a planted dictionary."""

import math

import pytest
import torch
from torch.testing import assert_close

from saecache.errors import ConfigError
from saecache.train import penalties as P
from saecache.train.optim import (LazyAdam, lr_factor, make_optimizer, project_decoder_grad_, renorm_decoder_,
                                  sparsity_warmup_factor)
from saecache.train.sae import ARCHITECTURES, SAE, SAEConfig, load_sae, save_sae
from saecache.train.sparse_ops import batch_topk_select, sparse_decode, sparse_encode, topk_select

D, F, B = 12, 40, 24
VARIANTS = {
    "relu": dict(arch="relu"),
    "relu_entropy": dict(arch="relu", penalty="entropy"),
    "topk": dict(arch="topk", k=5),
    "batchtopk": dict(arch="batchtopk", k=5, threshold_start_step=0),
    "jumprelu": dict(arch="jumprelu", jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.3),
    "gated": dict(arch="gated"),
    "topk_transcoder": dict(arch="topk", k=5, d_out=9),
    "relu_transcoder": dict(arch="relu", transcoder=True),
}


def make(name, dtype=torch.float32, seed=0, **over):
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=D, width=F, **{**VARIANTS[name], **over})
    sae = SAE(cfg).to(dtype)
    x = torch.randn(B, D, dtype=dtype) * 2 + 0.5
    t = x if not cfg.transcoder else torch.randn(B, cfg.d_out, dtype=dtype) + x[:, : cfg.d_out].tanh()
    return sae, x, t


def perturb_(sae, scale=0.1):
    """Give biases and extras non-trivial values so identities are tested away from the zero init."""
    with torch.no_grad():
        for n, p in sae.named_parameters():
            if n != "W_dec_FD" and n != "W_enc_DF":
                p.add_(torch.randn_like(p) * scale)
        if hasattr(sae, "threshold_F"):
            sae.threshold_F.abs_()
        if hasattr(sae, "b_in_D"):
            sae.b_in_D.normal_()


def train_steps(sae, x, t, n=3, lr=1e-2):
    opt = make_optimizer(sae, lr)
    sae.train()
    for _ in range(n):
        out = sae.loss(x, t)
        opt.zero_grad()
        out.total.backward()
        project_decoder_grad_(sae)
        opt.step()
        renorm_decoder_(sae)
    return opt


def test_config_errors_and_defaults():
    with pytest.raises(ConfigError, match="known: relu, topk, batchtopk, jumprelu, gated"):
        SAEConfig("sparsemax", 8, 16)
    with pytest.raises(ConfigError, match="needs 0 < k"):
        SAEConfig("topk", 8, 16)
    with pytest.raises(ConfigError, match="needs 0 < k"):
        SAEConfig("batchtopk", 8, 16, k=17)
    with pytest.raises(ConfigError, match="penalty"):
        SAEConfig("topk", 8, 16, k=2, penalty="l1")
    with pytest.raises(ConfigError, match="unknown fields"):
        SAEConfig.from_dict({"architecture": "relu", "d_in": 8, "n_features": 16, "from_the_future": 1})
    c = SAEConfig("relu", 8, 16, penalty="entropy")
    assert (c.d_out, c.transcoder, c.coeff) == (8, False, ARCHITECTURES["relu"].default_coeff["entropy"])
    assert SAEConfig("relu", 8, 16, d_out=4).transcoder
    assert SAEConfig("jumprelu", 8, 16).target_l0 == 20.0
    assert SAEConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_loss_fields(name):
    sae, x, t = make(name)
    sae.init_from_batch(x, t)
    Do = sae.cfg.d_out
    assert sae.encode(x).shape == (B, F) and sae.decode(sae.encode(x)).shape == (B, Do) and sae(x).shape == (B, Do)
    assert sae.W_enc_DF.shape == (D, F) and sae.W_dec_FD.shape == (F, Do) and sae.b_dec_D.shape == (Do,)
    out = sae.loss(x, t)
    for v in (out.total, out.recon, out.sparsity, out.aux, out.l0):
        assert v.shape == () and torch.isfinite(v)
    assert out.f_BF.shape == (B, F) and out.x_hat_BD.shape == (B, Do)
    assert_close(out.recon, ((out.x_hat_BD - t) ** 2).sum(1).mean())
    assert_close(out.l0, (out.f_BF > 0).sum(1).float().mean())
    if sae.cfg.arch == "topk":
        assert (out.f_BF > 0).sum(1).max() <= sae.cfg.k
    if sae.cfg.arch == "batchtopk":
        assert (out.f_BF > 0).sum() <= sae.cfg.k * B


@pytest.mark.parametrize("name", VARIANTS)
def test_unit_norm_decoder_after_steps(name):
    sae, x, t = make(name)
    opt = make_optimizer(sae, 1e-2)
    out = sae.loss(x, t)
    out.total.backward()
    project_decoder_grad_(sae)
    assert_close((sae.W_dec_FD.grad * sae.W_dec_FD).sum(1), torch.zeros(F), atol=1e-5, rtol=0)
    opt.step()
    renorm_decoder_(sae)
    before = sae.W_dec_FD.detach().clone()
    train_steps(sae, x, t, n=5)
    assert not torch.equal(before, sae.W_dec_FD)
    assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(F), atol=1e-5, rtol=0)


def _objective_with_stop_gradients_frozen(sae, x, t, frozen):
    """The training loss as a function of the parameters, with every stop-gradient input held at its value for the
    unperturbed parameters (`frozen`), recomputed here from the papers' definitions: the gated aux loss reconstructs
    through a frozen copy of the decoder (W_dec, b_dec), and AuxK's target is the detached residual e = t − x̂."""
    o = sae.loss(x, t, sparsity_scale=0.7)
    total = o.total - o.aux
    if sae.cfg.arch == "gated":
        total = total + P.reconstruction_loss(o.code.gate_BF @ frozen["W_dec"] + frozen["b_dec"], t)
    elif o.code.aux is not None:
        assert torch.equal(o.code.aux.idx_N, frozen["aux_idx"])  # no selection flip under the perturbation
        e_hat = o.code.aux.dense(F) @ sae.W_dec_FD
        e = frozen["e"]  # AuxK: ‖ê − e‖² over the residual's total variance across the batch
        total = total + sae.cfg.auxk_alpha * (e_hat - e).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
    if o.code.sparse is not None:
        assert torch.equal(o.code.sparse.idx_N, frozen["idx"])
    return total.item()


@pytest.mark.parametrize("name", ["relu", "relu_entropy", "gated", "topk", "batchtopk", "topk_transcoder"])
def test_loss_gradient_matches_finite_differences(name):
    """Autograd (incl. the hand-written sparse backward, AuxK and the penalty) vs central differences in float64.

    Stop-gradients (the gated aux loss's frozen decoder, AuxK's detached residual) are part of the definition, so the
    finite differences hold those inputs fixed; a naive difference of `total` would also differentiate through them
    (that mismatch is ~2e-4 relative here and is not a gradient bug)."""
    sae, x, t = make(name, dtype=torch.float64)
    perturb_(sae)
    sae.eval()  # no counter updates between evaluations
    if name in ("topk", "batchtopk"):  # exercise AuxK too: pretend some latents are dead
        sae.tokens_since_fired_F[:10] = sae.cfg.dead_tokens_threshold
    out = sae.loss(x, t, sparsity_scale=0.7)
    if name in ("topk", "batchtopk", "gated"):
        assert out.aux > 0
    frozen = dict(W_dec=sae.W_dec_FD.detach().clone(), b_dec=sae.b_dec_D.detach().clone(),
                  e=(t - out.x_hat_BD).detach(), idx=out.code.sparse and out.code.sparse.idx_N,
                  aux_idx=out.code.aux and out.code.aux.idx_N)
    names = [n for n, _ in sae.named_parameters()]
    grads = torch.autograd.grad(out.total, [p for _, p in sae.named_parameters()])
    gen = torch.Generator().manual_seed(1)
    for n, g in zip(names, grads):
        p = dict(sae.named_parameters())[n]
        for _ in range(3):
            i = torch.randint(p.numel(), (1,), generator=gen).item()
            idx = torch.unravel_index(torch.tensor(i), p.shape)
            h, orig = 1e-6, p.detach()[idx].item()
            with torch.no_grad():
                p[idx] = orig + h
                up = _objective_with_stop_gradients_frozen(sae, x, t, frozen)
                p[idx] = orig - h
                down = _objective_with_stop_gradients_frozen(sae, x, t, frozen)
                p[idx] = orig
            assert g[idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-8), (n, idx)


def test_l1_and_entropy_gradients_hand_computed():
    f = torch.tensor([[0.0, 1.0, 3.0, 0.5], [2.0, 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(P.l1_penalty(f), f)
    assert_close(g, torch.sign(f.detach()) / 2)
    (g,) = torch.autograd.grad(P.entropy_penalty(f), f)
    a = f.detach()
    s = a.sum(1, keepdim=True)
    p = a / s
    H = -(torch.where(p > 0, p * p.log(), 0)).sum(1, keepdim=True)
    active = a > 0  # the gradient is defined (and used: ReLU features) only at active entries
    expected = -(torch.log(p[active]) + H.expand_as(p)[active]) / s.expand_as(p)[active]
    assert_close(g[active], expected / 2)  # the penalty is the mean over 2 rows
    assert P.entropy_penalty(torch.tensor([[0.0, 5.0, 0.0]])).item() == pytest.approx(0.0)
    assert P.entropy_penalty(torch.tensor([[2.0, 2.0, 2.0, 0.0]])).item() == pytest.approx(math.log(3))


def test_jumprelu_pseudo_gradients_hand_computed():
    eps, theta = 0.2, torch.tensor([0.5, 1.0], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([[0.55, 0.0], [0.45, 1.05], [0.7, 2.0]], dtype=torch.float64, requires_grad=True)
    # L0 step: d/dθ_i Σ_b H(z_bi − θ_i) = −(1/ε) #{b : |z_bi − θ_i| < ε/2}; no gradient to z.
    l0 = P.Step.apply(z, theta, eps)
    assert_close(l0.detach(), torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.float64))
    g_t, = torch.autograd.grad(l0.sum(), theta)
    assert_close(g_t, torch.tensor([-2 / eps, -1 / eps], dtype=torch.float64))
    # JumpReLU: d/dθ_i = −(θ_i/ε) #{…}; d/dz = H(z − θ).
    f = P.JumpReLU.apply(z, theta, eps)
    assert_close(f.detach(), torch.tensor([[0.55, 0], [0, 1.05], [0.7, 2.0]], dtype=torch.float64))
    g_z, g_t = torch.autograd.grad(f.sum(), (z, theta))
    assert_close(g_t, torch.tensor([-0.5 * 2 / eps, -1.0 / eps], dtype=torch.float64))
    assert_close(g_z, torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.float64))
    # through the module: the L0 penalty pulls the thresholds up when L0 is above target
    sae, x, _ = make("jumprelu", target_l0=1.0)
    out = sae.loss(x)
    (g,) = torch.autograd.grad(out.sparsity, sae.threshold_F)
    assert out.l0 > 1 and (g <= 0).all() and (g < 0).any()


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_equals_decode_encode_at_inference(name):
    sae, x, t = make(name)
    perturb_(sae)
    train_steps(sae, x, t, n=2)
    sae.eval()
    if sae.cfg.arch == "batchtopk":
        assert sae.threshold >= 0  # estimated during the steps above; inference uses it
        z = sae.pre_acts(x)
        assert_close(sae.encode(x), z.relu() * (z > sae.threshold))
    with torch.no_grad():
        assert_close(sae(x), sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_fold_scale_maps_raw_to_raw(name):
    sae, x, t = make(name, dtype=torch.float64)
    perturb_(sae)
    train_steps(sae, x, t, n=2)
    sae.eval()
    s_in, s_out = 3.7, (3.7 if not sae.cfg.transcoder else 0.45)
    with torch.no_grad():
        f_scaled = sae.encode(x / s_in)
        out_scaled = sae(x / s_in) * s_out
        sae.fold_scale(s_in, s_out)
        assert_close(sae.encode(x), f_scaled)
        assert_close(sae(x), out_scaled)
    if not sae.cfg.transcoder and sae.arch.pre_bias:
        with pytest.raises(ConfigError):
            sae.fold_scale(2.0, 3.0)


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_round_trip(name, tmp_path):
    sae, x, t = make(name)
    perturb_(sae)
    train_steps(sae, x, t, n=2)
    sae.eval()
    save_sae(sae, tmp_path / "sae.safetensors")
    back = load_sae(sae.cfg, tmp_path / "sae.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(back(x), sae(x)) and torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back.tokens_since_fired_F, sae.tokens_since_fired_F)
    wrong = SAEConfig(**{**sae.cfg.to_dict(), "width": F + 1})
    with pytest.raises(ConfigError, match="do not match"):
        load_sae(wrong, tmp_path / "sae.safetensors")


def test_sparse_topk_encode_decode_match_dense_reference():
    torch.manual_seed(3)
    Bt, Dt, Ft, k = 16, 10, 50, 6
    x = torch.randn(Bt, Dt, dtype=torch.float64, requires_grad=True)
    b_pre = torch.randn(Dt, dtype=torch.float64, requires_grad=True)
    W = torch.randn(Dt, Ft, dtype=torch.float64, requires_grad=True)
    b = torch.randn(Ft, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(Ft, 7, dtype=torch.float64, requires_grad=True)
    g_out = torch.randn(Bt, 7, dtype=torch.float64)
    # sparse path
    code = sparse_encode(x, b_pre, W, b, topk_select(k))
    y = sparse_decode(code, W_dec)
    sparse_grads = torch.autograd.grad(y, (x, b_pre, W, b, W_dec), g_out)
    # dense reference: plain autograd through topk + scatter + matmul
    z = (x - b_pre) @ W + b
    v_ref, i_ref = z.topk(k, dim=1)
    f = torch.zeros_like(z).scatter(1, i_ref, v_ref.relu())
    y_ref = f @ W_dec
    dense_grads = torch.autograd.grad(y_ref, (x, b_pre, W, b, W_dec), g_out)
    assert_close(y, y_ref)
    assert torch.equal(code.idx_N.view(Bt, k).sort(1).values, i_ref.sort(1).values)
    for gs, gd in zip(sparse_grads, dense_grads):
        assert_close(gs, gd)


def test_batchtopk_loss_and_grads_match_dense_reference():
    """BatchTopK through the sparse path (rows holding very different numbers of winners) equals plain autograd on
    the dense definition: keep the batch's k·B largest relu pre-activations, decode densely."""
    sae, x, t = make("batchtopk", dtype=torch.float64)
    perturb_(sae)
    x = x.clone()
    x[0] *= 8.0  # row 0 alone holds far more than 2k winners, the other rows fewer than k
    sae.eval()
    out = sae.loss(x)
    grads = torch.autograd.grad(out.recon, [sae.W_enc_DF, sae.b_enc_F, sae.W_dec_FD, sae.b_dec_D])
    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_() for p in
                                  (sae.W_enc_DF, sae.b_enc_F, sae.W_dec_FD, sae.b_dec_D))
    z = ((x - b_dec) @ W_enc + b_enc).relu()
    keep = torch.zeros(z.numel(), dtype=torch.bool)
    keep[z.detach().flatten().topk(sae.cfg.k * B).indices] = True
    f = z * keep.view_as(z)
    assert (f[0] > 0).sum() > 2 * sae.cfg.k
    recon = ((f @ W_dec + b_dec - x) ** 2).sum(1).mean()
    ref = torch.autograd.grad(recon, [W_enc, b_enc, W_dec, b_dec])
    assert_close(out.f_BF, f.detach())
    assert_close(out.recon, recon)
    for g, r in zip(grads, ref):
        assert_close(g, r)


def test_centered_linear_matches_autograd():
    from saecache.train.sparse_ops import centered_linear

    torch.manual_seed(6)
    x, b_pre = torch.randn(9, 5, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64)
    W_FD, b = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    leaves = [x, b_pre.requires_grad_(), W_FD.requires_grad_(), b.requires_grad_()]
    g = torch.randn(9, 7, dtype=torch.float64)
    mine = torch.autograd.grad(centered_linear(x, b_pre, W_FD.t(), b), leaves, g)
    ref = torch.autograd.grad((x - b_pre) @ W_FD.t() + b, leaves, g)
    for a, r in zip(mine, ref):
        assert_close(a, r)
    assert mine[2].stride() == W_FD.stride()  # the gradient has the parameter's feature-major layout


def test_batch_topk_selection_is_exact():
    torch.manual_seed(4)
    z = torch.randn(32, 200)
    z[0] += 5.0  # one row owns far more than 2k winners
    info = {}
    row, idx = batch_topk_select(4, info)(z)
    chosen = torch.zeros_like(z, dtype=torch.bool)
    chosen[row, idx] = True
    top = z.flatten().topk(4 * 32)
    ref = torch.zeros(z.numel(), dtype=torch.bool)
    ref[top.indices] = True
    assert torch.equal(chosen.flatten(), ref) and row.numel() == 4 * 32 and chosen[0].sum() > 8
    assert (row.diff() >= 0).all() and info["threshold"] == top.values.min()


def test_dead_counters_and_auxk_reach_dead_latents():
    sae, x, t = make("topk", dead_tokens_threshold=2 * B)
    sae.train()
    out = sae.loss(x)
    assert out.aux == 0
    fired = out.f_BF.gt(0).any(0)
    assert (sae.tokens_since_fired_F[fired] == 0).all() and (sae.tokens_since_fired_F[~fired] == B).all()
    sae.loss(x)
    dead = sae.dead_mask(2 * B)
    assert torch.equal(dead, ~fired) and dead.any()
    out = sae.loss(x)
    assert out.aux > 0
    out.aux.backward()
    touched = sae.W_dec_FD.grad.abs().sum(1) > 0
    assert touched.any() and not touched[~dead].any()


def test_lazy_adam_is_adam_on_dense_gradients_and_still_where_a_gradient_is_zero():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(6, 3)), None
    b = torch.nn.Parameter(a.detach().clone())
    lazy, adam = LazyAdam([a], lr=0.01), torch.optim.Adam([b], lr=0.01)
    for _ in range(5):  # dense gradients: Adam, step for step
        g = torch.randn(6, 3)
        a.grad, b.grad = g.clone(), g.clone()
        lazy.step()
        adam.step()
        assert_close(a, b)
    g = torch.zeros(6, 3)
    g[0] = 1.0  # row 0 fires; rows 1-5 (latents silent this batch) get an exact 0
    a.grad, b.grad = g.clone(), g.clone()
    before_a, before_b = a.detach().clone(), b.detach().clone()
    lazy.step()
    adam.step()
    assert torch.equal(a.detach()[1:], before_a[1:])  # lazy: silent rows do not move
    assert (b.detach()[1:] != before_b[1:]).all()  # Adam's momentum moves them on
    assert (a.detach()[0] != before_a[0]).all()
    assert_close(lazy.state[a]["beta1_power"][0], torch.full((3,), 0.9 ** 6))
    assert_close(lazy.state[a]["beta1_power"][1], torch.full((3,), 0.9 ** 5))


def test_lazy_adam_follows_its_definition_per_element_on_sparse_gradients():
    """Against the definition written out per element with selects and powers (each element's own count n of
    non-zero gradients): 60 steps of gradients whose rows are zero at random, some rows never non-zero."""
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(20, 4, dtype=torch.float64))
    ref, m, v, n = p.detach().clone(), torch.zeros(20, 4, dtype=torch.float64), \
        torch.zeros(20, 4, dtype=torch.float64), torch.zeros(20, 4, dtype=torch.float64)
    opt, (b1, b2), lr, eps = LazyAdam([p], lr=0.01), (0.9, 0.999), 0.01, 1e-8
    for _ in range(60):
        g = torch.randn(20, 4, dtype=torch.float64) * (torch.rand(20, 1) < 0.2)
        g[:3] = 0  # never fire
        p.grad = g.clone()
        opt.step()
        live = g != 0
        m = torch.where(live, b1 * m + (1 - b1) * g, m)
        v = torch.where(live, b2 * v + (1 - b2) * g * g, v)
        n = n + live
        n1 = n.clamp(min=1)
        ref = torch.where(live, ref - lr * (m / (1 - b1 ** n1)) / ((v / (1 - b2 ** n1)).sqrt() + eps), ref)
    assert_close(p.detach(), ref, rtol=1e-10, atol=1e-12)
    assert (n[3:].amax(1) > 0).all() and (n[3:].amax(1) < 30).all()  # every other row fired, none in most steps


def test_lazy_adam_steps_a_rare_latent_by_about_lr_where_adam_steps_it_by_lr_over_sqrt_p():
    """A parameter whose gradient is non-zero in one step of 100: after 1000 steps Adam's per-event movement is
    several lr (its momentum runs on against a second moment averaged over the silent steps); LazyAdam's is ~lr."""
    moved = {}
    for name, cls in (("lazy", LazyAdam), ("adam", torch.optim.Adam)):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = cls([p], lr=1e-3)
        for step in range(1000):
            p.grad = torch.ones(1) if step % 100 == 0 else torch.zeros(1)
            opt.step()
        moved[name] = -float(p.detach()) / 10 / 1e-3  # per event, in lr
    assert 0.9 < moved["lazy"] < 1.1, moved
    assert moved["adam"] > 2.5, moved


def test_optimizer_defaults_by_architecture_and_old_records_mean_adam():
    assert SAEConfig("topk", 8, 16, k=4).optimizer == "lazy-adam"
    assert SAEConfig("matryoshka", 8, 16, k=4).optimizer == "lazy-adam"
    assert SAEConfig("relu", 8, 16).optimizer == "adam"
    assert SAEConfig("topk", 8, 16, k=4, optimizer="adam").optimizer == "adam"
    old = {k: v for k, v in SAEConfig("topk", 8, 16, k=4).to_dict().items() if k != "optimizer"}
    assert SAEConfig.from_dict(old).optimizer == "adam"  # a cfg.json written before the field: trained with Adam
    assert isinstance(make_optimizer(SAE(SAEConfig("topk", 8, 16, k=4)), 1e-3), LazyAdam)
    assert not isinstance(make_optimizer(SAE(SAEConfig("topk", 8, 16, k=4, optimizer="adam")), 1e-3), LazyAdam)
    with pytest.raises(ConfigError, match="optimizer must be one of adam, lazy-adam"):
        SAEConfig("topk", 8, 16, k=4, optimizer="sgd")


def test_schedules():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == 1.0
    assert lr_factor(50, 10, 100, decay_start=80) == 1.0
    assert lr_factor(90, 10, 100, decay_start=80) == pytest.approx(0.5) and lr_factor(100, 10, 100, 80) == 0.0
    assert lr_factor(30, 10, 100, resample_steps=30) == pytest.approx(0.1)  # re-warm after a resample
    assert lr_factor(35, 10, 100, resample_steps=30) == pytest.approx(0.6)
    assert lr_factor(5, 0, 100) == 1.0
    with pytest.raises(ConfigError):
        lr_factor(1, 10, 100, decay_start=50, resample_steps=20)
    assert sparsity_warmup_factor(0, 4) == 0.25 and sparsity_warmup_factor(10, 4) == 1.0
    assert sparsity_warmup_factor(3, 0) == 1.0


def test_geometric_median_resists_outliers():
    torch.manual_seed(5)
    pts = torch.randn(200, 3) * 0.1 + torch.tensor([1.0, -2.0, 0.5])
    pts[:20] = 1000.0
    gm = P.geometric_median(pts)
    assert (gm - torch.tensor([1.0, -2.0, 0.5])).norm() < 0.2 < (pts.mean(0) - gm).norm()


def test_topk_recovers_planted_dictionary():
    """Synthetic data: unit-norm planted atoms, k-sparse non-negative codes. A TopK SAE learns most atoms."""
    torch.manual_seed(0)
    d, n_atoms, k, n_rows = 32, 48, 3, 4096
    atoms = torch.randn(n_atoms, d)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n_rows, n_atoms).topk(k, dim=1).indices
    codes = torch.zeros(n_rows, n_atoms).scatter(1, idx, torch.rand(n_rows, k) + 0.5)
    data = codes @ atoms
    sae = SAE(SAEConfig("topk", d, 2 * n_atoms, k=k))
    sae.init_from_batch(data[:512])
    opt = make_optimizer(sae, 3e-3)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than the work (10x+ on a busy machine)
    try:
        for step in range(1500):
            x = data[torch.randint(n_rows, (256,), generator=gen)]
            out = sae.loss(x)
            opt.zero_grad()
            out.total.backward()
            project_decoder_grad_(sae)
            opt.step()
            renorm_decoder_(sae)
    finally:
        torch.set_num_threads(threads)
    cos = (atoms @ sae.W_dec_FD.detach().t()).max(1).values
    assert (cos >= 0.9).float().mean() >= 0.8, cos


@pytest.mark.parametrize("name", ["relu", "topk", "batchtopk", "jumprelu", "gated", "topk_transcoder"])
def test_bf16_autocast_loss_and_grads_track_float32(name):
    """Optional bf16 autocast: the hand-written Functions cast their saved inputs, so backward runs; the loss and the
    fp32 parameter gradients stay close to the fp32 computation."""
    sae, x, t = make(name)
    perturb_(sae)
    sae.eval()
    if sae.cfg.arch == "topk":
        sae.tokens_since_fired_F[:10] = sae.cfg.dead_tokens_threshold  # AuxK on
    ref = sae.loss(x, t)
    ref_g = torch.autograd.grad(ref.total, list(sae.parameters()), allow_unused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.loss(x, t)
    g = torch.autograd.grad(out.total, list(sae.parameters()), allow_unused=True)
    assert out.total.dtype == torch.float32 and out.total.item() == pytest.approx(ref.total.item(), rel=0.05)
    for (n, p), a, r in zip(sae.named_parameters(), g, ref_g):
        assert (a is None) == (r is None), n
        if r is not None and r.abs().sum() > 0:
            assert a.dtype == p.dtype
            assert torch.nn.functional.cosine_similarity(a.flatten(), r.flatten(), dim=0) > 0.98, n


@pytest.mark.parametrize("negative_threshold", [False, True])
def test_fused_jumprelu_equals_jumprelu_and_step(negative_threshold):
    """The SAE's fused JumpReLU + L0 op gives the values and pseudo-gradients of the two hand-checked ops composed."""
    torch.manual_seed(7)
    eps = 0.3
    z = (torch.randn(40, 16, dtype=torch.float64) * 0.6).requires_grad_()
    theta = (torch.rand(16, dtype=torch.float64) * 0.5 - (0.3 if negative_threshold else 0.0)).requires_grad_()
    g_f, g_l0 = torch.randn(40, 16, dtype=torch.float64), 0.37
    f, l0 = P.JumpReLUWithL0.apply(z, theta, eps)
    mine = torch.autograd.grad((f * g_f).sum() + g_l0 * l0, (z, theta))
    f_ref = P.JumpReLU.apply(z, theta, eps)
    l0_ref = P.Step.apply(z, theta, eps).sum(-1).mean()
    ref = torch.autograd.grad((f_ref * g_f).sum() + g_l0 * l0_ref, (z, theta))
    assert_close(f, f_ref)
    assert_close(l0, l0_ref)
    assert (theta < 0).any() == negative_threshold and ref[1].abs().sum() > 0
    for a, r in zip(mine, ref):
        assert_close(a, r)
