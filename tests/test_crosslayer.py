"""The dictionaries that span hooks: the skip-transcoder (an architecture of the SAE family) and the cross-layer
family (`train/crosslayer.py`: cross-layer transcoders and acausal crosscoders). Gradients against plain-torch dense
references written here from the papers' definitions, scale folding, save/load, and recovery of a planted CLT."""

import pytest
import torch
from torch.testing import assert_close

from saecache.train.optim import make_optimizer
from saecache.train.sae import SAE, SAEConfig, load_sae, save_sae

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
