"""The dictionaries that span hooks: the skip-transcoder (an architecture of the SAE family) and the cross-layer
family (`train/crosslayer.py`: cross-layer transcoders and acausal crosscoders). Gradients against plain-torch dense
references written here from the papers' definitions, scale folding, save/load, and recovery of a planted CLT."""

import pytest
import torch
from torch.testing import assert_close

from saecache.train.optim import make_optimizer
from saecache.train.sae import SAE, SAEConfig, load_sae, save_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D, DO, F, K, B = 12, 10, 48, 4, 64


def _skip_transcoder(dtype=torch.float64):
    torch.manual_seed(0)
    sae = SAE(SAEConfig("skip-transcoder", D, F, d_out=DO, k=K)).to(dtype)
    with torch.no_grad():
        for p in (sae.b_enc_F, sae.b_dec_D, sae.b_in_D, sae.W_skip_DD):
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(B, D, dtype=dtype) + 0.5
    t = torch.randn(B, DO, dtype=dtype) + x[:, :DO]
    return sae, x, t


def test_skip_transcoder_config_and_zero_init():
    c = SAEConfig("skip-transcoder", D, F, d_out=D, k=K)
    assert c.transcoder and c.d_out == D  # always a transcoder, even between hooks of equal width
    sae = SAE(c)
    assert sae.W_skip_DD.shape == (D, D) and not sae.W_skip_DD.any() and sae.b_in_D.shape == (D,)
    with pytest.raises(Exception, match="needs 0 < k"):
        SAEConfig("skip-transcoder", D, F)


def test_skip_transcoder_gradients_equal_dense_reference():
    sae, x, t = _skip_transcoder()
    sae.train()
    out = sae.loss(x, t)
    out.total.backward()
    # reference: TopK transcoder (input centred by b_in) plus x @ W_skipᵀ, through dense autograd
    W_enc, b_enc, W_dec, b_dec, W_skip = (p.detach().clone().requires_grad_() for p in
                                          (sae.W_enc_DF, sae.b_enc_F, sae.W_dec_FD, sae.b_dec_D, sae.W_skip_DD))
    z = ((x - sae.b_in_D) @ W_enc + b_enc).relu()
    top = z.topk(K, dim=1)
    f = torch.zeros_like(z).scatter(1, top.indices, top.values)
    y = f @ W_dec + b_dec + x @ W_skip.t()
    ref = (y - t).pow(2).sum(1).mean()
    ref.backward()
    assert_close(out.total, ref, atol=1e-10, rtol=1e-10)
    for p, r in ((sae.W_enc_DF, W_enc), (sae.b_enc_F, b_enc), (sae.W_dec_FD, W_dec), (sae.b_dec_D, b_dec),
                 (sae.W_skip_DD, W_skip)):
        assert r.grad.abs().max() > 0
        assert_close(p.grad, r.grad, atol=1e-5, rtol=1e-5)


def _steps(sae, x, t, n=3):
    opt = make_optimizer(sae, 1e-2)
    sae.train()
    for _ in range(n):
        out = sae.loss(x, t)
        opt.zero_grad()
        out.total.backward()
        opt.step()
    sae.eval()


def test_skip_transcoder_fold_scale_save_load_and_decode(tmp_path):
    sae, x, t = _skip_transcoder()
    before = sae.W_skip_DD.detach().clone()
    _steps(sae, x, t)
    assert not torch.equal(sae.W_skip_DD, before)  # the skip term is learned
    with torch.no_grad():
        assert_close(sae(x), sae.decode(sae.encode(x), x))
        with pytest.raises(ValueError, match="needs the input"):
            sae.decode(sae.encode(x))
        s_in, s_out = 3.7, 0.45
        f_scaled, y_scaled = sae.encode(x / s_in), sae(x / s_in) * s_out
        sae.fold_scale(s_in, s_out)
        assert_close(sae.encode(x), f_scaled)
        assert_close(sae(x), y_scaled)
    sae = sae.float()
    save_sae(sae, tmp_path / "sae.safetensors")
    back = load_sae(sae.cfg, tmp_path / "sae.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(back.W_skip_DD, sae.W_skip_DD) and torch.equal(back(x.float()), sae(x.float()))


# ---- the cross-layer family ----

from saecache.train.crosslayer import (CrossLayer, CrossLayerConfig, KIND_OBJECTS, load_crosslayer,  # noqa: E402
                                       save_crosslayer)

L, DI, DX, FL, KL = 3, 8, 6, 16, 3
FAMILIES = [(kind, act) for kind in ("clt", "crosscoder") for act in ("topk", "batchtopk", "jumprelu")]


def _cross(kind, act, dtype=torch.float64, seed=0, **over):
    torch.manual_seed(seed)
    hooks_in = [f"resid_mid.{i}" for i in range(L)]
    kw = dict(kind=kind, activation=act, hooks_in=hooks_in, d_in=DI, n_features=FL,
              k=None if act == "jumprelu" else KL, threshold_start_step=0)
    if kind == "clt":
        kw.update(hooks_out=[f"mlp_out.{i}" for i in range(L)], d_out=DX)
    if act == "jumprelu":
        kw.update(jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.3, coeff=0.05, tanh_c=2.0, pre_act_coeff=0.01)
    m = CrossLayer(CrossLayerConfig(**{**kw, **over})).to(dtype)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith(("b_", "threshold_")):
                p.add_(torch.randn_like(p) * 0.1)
    d_out = m.cfg.d_out
    xs = [torch.randn(B, DI, dtype=dtype) + 0.3 for _ in range(L)]
    ts = [torch.randn(B, d_out, dtype=dtype) + xs[i][:, :d_out].tanh() for i in range(L)]
    return m, xs, ts


def _rect(u):
    return (u.abs() < 0.5).to(u.dtype)


def _reference_loss(cfg, w, xs, ts):
    """The definitions in plain torch over the saved (circuit-tracer) layout `w`: dense pre-activations, the
    activation by its textbook formula, every (source, target) decoder as its own matmul."""
    L_, srcs = cfg.n_layers, KIND_OBJECTS[cfg.kind].sources(cfg.n_layers)
    pen = 0.0
    fs = []
    for s in range(len(srcs)):
        if cfg.kind == "clt":
            z = xs[s] @ w[f"W_enc_{s}"].t() + w[f"b_enc_{s}"]
        else:
            z = sum(xs[h] @ w[f"W_enc_{h}"].t() for h in range(L_)) + w["b_enc"]
        a = z.relu()
        if cfg.activation == "topk":
            top = a.topk(cfg.k, dim=1)
            f = torch.zeros_like(a).scatter(1, top.indices, top.values)
        elif cfg.activation == "batchtopk":
            keep = torch.zeros(a.numel(), dtype=a.dtype)
            keep[a.flatten().topk(cfg.k * a.shape[0]).indices] = 1
            f = a * keep.view_as(a)
        else:
            th = w[f"threshold_{s}"] if cfg.kind == "clt" else w["threshold"]
            eps = cfg.jumprelu_bandwidth
            # value relu(z)·H(z − θ); pseudo-gradient to θ: −(relu(θ)/ε) K((z − θ)/ε)
            f = a * (z > th) + (th - th.detach()) * (-(th.detach().relu() / eps) * _rect((z - th) / eps)).detach()
            if cfg.kind == "clt":
                norm = w[f"W_dec_{s}"].flatten(1).norm(dim=1)
            else:
                norm = torch.cat([w[f"W_dec_{h}"] for h in range(L_)], dim=1).norm(dim=1)
            pen = pen + cfg.coeff * torch.tanh(cfg.tanh_c * f * norm).sum(1).mean() \
                + cfg.pre_act_coeff * ((th - z).relu() * norm).sum(1).mean()
        fs.append(f)
    recon = 0.0
    for l in range(L_):
        if cfg.kind == "clt":
            y = w[f"b_dec_{l}"] + sum(fs[i] @ w[f"W_dec_{i}"][:, l - i] for i in range(l + 1))
        else:
            y = w[f"b_dec_{l}"] + fs[0] @ w[f"W_dec_{l}"]
        recon = recon + (y - ts[l]).pow(2).sum(1).mean()
    return recon + pen


@pytest.mark.parametrize("kind,act", FAMILIES)
def test_cross_layer_gradients_equal_dense_reference(kind, act):
    m, xs, ts = _cross(kind, act)
    m.train()
    out = m.loss(xs, ts)
    out.total.backward()
    w = {k: v.clone().requires_grad_() for k, v in m.state_for_save().items() if v.is_floating_point()}
    ref = _reference_loss(m.cfg, w, xs, ts)
    ref.backward()
    assert_close(out.total, ref, atol=1e-10, rtol=1e-10)
    grads = {k: v.grad for k, v in w.items() if v.grad is not None}  # (batchtopk's threshold is a buffer)
    ref_grads = KIND_OBJECTS[kind].from_saved(m.cfg, grads)
    params = dict(m.named_parameters())
    assert set(ref_grads) == set(params)
    for n, p in params.items():
        assert ref_grads[n].abs().max() > 0, n  # every parameter takes part (thresholds included)
        assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-5, msg=n)
    assert out.l0 > 0 and out.x_hat_BD.shape == (B, L * m.cfg.d_out)


def _cross_steps(m, xs, ts, n=3):
    opt = make_optimizer(m, 1e-2)
    m.train()
    for _ in range(n):
        out = m.loss(xs, ts)
        opt.zero_grad()
        out.total.backward()
        m.project_decoder_grad_()
        opt.step()
        m.renorm_decoder_()
    m.eval()


@pytest.mark.parametrize("kind,act", FAMILIES)
def test_cross_layer_fold_scale_and_save_load(kind, act, tmp_path):
    m, xs, ts = _cross(kind, act)
    _cross_steps(m, xs, ts)
    if act == "batchtopk":
        assert float(m.threshold_0[0]) > 0  # estimated during the steps; inference uses it
    ins, outs = [3.0, 0.5, 7.0], [0.2, 4.0, 1.5]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(m(xs), m.decode(m.encode(xs))))
        f_scaled = [c if torch.is_tensor(c) else c.dense(FL) for c in m.encode([x / s for x, s in zip(xs, ins)])]
        y_scaled = [y * s for y, s in zip(m([x / s for x, s in zip(xs, ins)]), outs)]
        m.fold_scale(ins, outs)
        f = [c if torch.is_tensor(c) else c.dense(FL) for c in m.encode(xs)]
        for a, b in zip(f + m(xs), f_scaled + y_scaled):
            assert_close(a, b)
    m = m.float()
    save_crosslayer(m, tmp_path / "w.safetensors")
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "w.safetensors")
    if kind == "clt":  # circuit-tracer's layout
        assert saved["W_enc_1"].shape == (FL, DI) and saved["W_dec_0"].shape == (FL, L, DX)
        assert saved["W_dec_2"].shape == (FL, 1, DX) and saved["b_dec_2"].shape == (DX,)
        assert (f"threshold_{L - 1}" in saved) == (act != "topk")
    else:
        assert saved["W_enc_2"].shape == (FL, DI) and saved["W_dec_1"].shape == (FL, DI) and saved["b_enc"].shape == (FL,)
    back = load_crosslayer(CrossLayerConfig.from_dict(m.cfg.to_dict()), tmp_path / "w.safetensors").eval()
    xf = [x.float() for x in xs]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(back(xf), m(xf)))
    wrong = CrossLayerConfig.from_dict({**m.cfg.to_dict(), "n_features": FL + 1})
    with pytest.raises(Exception, match="do not match"):
        load_crosslayer(wrong, tmp_path / "w.safetensors")


def test_cross_layer_config_checks():
    base = dict(kind="clt", hooks_in=["a", "b"], hooks_out=["c", "d"], d_in=4, n_features=8, k=2)
    c = CrossLayerConfig(**base)
    assert c.n_layers == 2 and c.d_out == 4 and c.arch == "clt" and c.width == 16
    assert CrossLayerConfig(**{**base, "kind": "crosscoder", "hooks_out": None}).width == 8
    for bad, match in (({"hooks_out": ["c"]}, "equal, non-zero length"), ({"k": None}, "needs 0 < k"),
                       ({"kind": "crosscoder"}, "reconstructs the hooks it reads"), ({"activation": "relu"}, "unknown"),
                       ({"activation": "jumprelu"}, "k is only")):
        with pytest.raises(Exception, match=match):
            CrossLayerConfig(**{**base, **bad})
    with pytest.raises(Exception, match="several hooks"):
        SAEConfig("clt", 4, 8, k=2)


def test_planted_clt_is_recovered():
    """Targets made by a known sparse CLT: layer i's k-sparse features f_i (random latents and values) give the input
    x_i = f_i A_i and write y_l = Σ_{i ≤ l} f_i W_i[:, l − i]. A TopK CLT trained on (x, y) learns decoders at cosine
    ≥ 0.9 to the planted ones for every (source, target) pair, after matching each planted feature to the learned
    feature of its layer whose decoders (over all targets) are closest."""
    Lp, Di, Do, Fp, k, Bp = 3, 32, 24, 16, 3, 256
    g = torch.Generator().manual_seed(0)
    A = [torch.nn.functional.normalize(torch.randn(Fp, Di, generator=g), dim=1) for _ in range(Lp)]
    W = [torch.nn.functional.normalize(torch.randn(Fp, Lp - i, Do, generator=g), dim=2) for i in range(Lp)]

    def batch():
        fs = []
        for _ in range(Lp):
            idx = torch.rand(Bp, Fp, generator=g).argsort(1)[:, :k]
            fs.append(torch.zeros(Bp, Fp).scatter(1, idx, 0.5 + torch.rand(Bp, k, generator=g)))
        return [f @ a for f, a in zip(fs, A)], [sum(fs[i] @ W[i][:, l - i] for i in range(l + 1)) for l in range(Lp)]

    torch.manual_seed(1)
    m = CrossLayer(CrossLayerConfig(kind="clt", hooks_in=["x0", "x1", "x2"], hooks_out=["y0", "y1", "y2"], d_in=Di,
                                    d_out=Do, n_features=2 * Fp, k=k))
    opt = make_optimizer(m, 3e-3)
    m.train()
    for _ in range(1000):
        xs, ys = batch()
        out = m.loss(xs, ys)
        opt.zero_grad()
        out.total.backward()
        m.project_decoder_grad_()
        opt.step()
        m.renorm_decoder_()
    w = m.state_for_save()
    for i in range(Lp):
        planted = torch.nn.functional.normalize(W[i].flatten(1), dim=1)
        learned = torch.nn.functional.normalize(w[f"W_dec_{i}"].flatten(1), dim=1)
        match = (planted @ learned.t()).argmax(1)
        for j in range(Lp - i):
            cos = torch.nn.functional.cosine_similarity(W[i][:, j], w[f"W_dec_{i}"][match, j], dim=1)
            assert cos.min() >= 0.9, (i, i + j, cos)


@pytest.mark.parametrize("act", ["topk", "jumprelu"])
def test_cross_layer_decoder_constraint(act):
    """TopK family: each feature's decoders over all its targets keep unit norm (the gradient loses its radial part
    before the step, the rows are renormalised after it); jumprelu's decoders are free (its penalty reads their
    norms)."""
    m, xs, ts = _cross("clt", act)
    m.train()
    m.loss(xs, ts).total.backward()
    before = [W.grad.clone() for W in m.decoders()]
    m.project_decoder_grad_()
    for W, g0 in zip(m.decoders(), before):
        if act == "jumprelu":
            assert torch.equal(W.grad, g0)
            continue
        w_hat = W / W.norm(dim=1, keepdim=True)
        assert_close(W.grad, g0 - (g0 * w_hat).sum(1, keepdim=True) * w_hat)
        assert (g0 * w_hat).sum(1).abs().max() > 1e-3 and (W.grad * w_hat).sum(1).abs().max() < 1e-10
    _cross_steps(m, xs, ts)
    norms = torch.cat([W.norm(dim=1) for W in m.decoders()])
    if act == "topk":
        assert_close(norms, torch.ones_like(norms))
    else:
        assert (norms - 1).abs().max() > 1e-3


def test_bench_dense_reference_is_the_same_math():
    """bench_crosslayer's dense reference step computes the loss of the CLT it is compared with."""
    from bench.bench_crosslayer import DenseCLT, _clt

    m = _clt(3, 8, 16, 3)
    ref = DenseCLT(m)
    xs, ts = [torch.randn(32, 8) for _ in range(3)], [torch.randn(32, 8) for _ in range(3)]
    assert_close(ref.loss(xs, ts), m.loss(xs, ts).total)


def test_cross_layer_auxk_trains_dead_latents_on_the_residual_of_their_targets():
    m, xs, ts = _cross("clt", "topk", dead_tokens_threshold=1)
    with torch.no_grad():
        m.tokens_since_fired_0[:6] = 5  # six dead latents, in source 0 only
    m.train()
    out = m.loss(xs, ts)
    # reference: each row's top k_aux (= d_out // 2) dead latents of source 0 predict the residual of layers 0..L-1
    z = (xs[0] @ m.W_enc_0.t() + m.b_enc_0).relu().detach()
    top = z[:, :6].topk(DX // 2, dim=1)
    f_aux = torch.zeros_like(z).scatter(1, top.indices, top.values)
    e = (torch.cat(ts, 1) - out.x_hat_BD).detach()
    e_hat = f_aux @ m.W_dec_0
    ref = m.cfg.auxk_alpha * (e_hat - e).pow(2).sum(1).mean() / (e - e.mean(0)).pow(2).sum(1).mean()
    assert out.aux > 0
    assert_close(out.aux, ref)
    m.zero_grad()
    out.aux.backward()
    touched = m.W_dec_0.grad.abs().sum(1) > 0
    assert touched[:6].any() and not touched[6:].any()
    assert all(getattr(m, f"W_dec_{s}").grad is None or not getattr(m, f"W_dec_{s}").grad.any() for s in (1, 2))
