"""saecache's real training step (`trainer.train_step`) against a plain-torch reference step written here from the
published recipe (dictionary_learning's TopKTrainer / StandardTrainer order: loss → backward → remove the decoder
gradient's radial part → clip the global gradient norm → Adam → renormalise decoder rows), from identical parameters
on identical rows. The hand-written sparse/dense autograd Functions, the schedule and the clip must give the same
gradients, Adam state and parameters as autograd through the textbook formulas."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from saecache.train.config import TrainConfig
from saecache.train.optim import lr_factor, make_optimizer, sparsity_warmup_factor
from saecache.train.penalties import geometric_median
from saecache.train.sae import SAE
from saecache.train.trainer import Member, _sae_config, train_step

D, F, K, B = 16, 64, 4, 128
NO_AUTOCAST = {"device_type": "cpu", "dtype": torch.float32, "enabled": False}


def _cfg(arch: str, tmp_path, **kw) -> TrainConfig:
    spec = {"hook_in": "h", "arch": arch, "width": F, **({"k": K} if arch == "topk" else {}), "lr": 1e-2}
    return TrainConfig(stores=["unused"], out=str(tmp_path), saes=[spec], steps=8, batch_size=B, partitions=1,
                       warmup_steps=3, sparsity_warmup_steps=2, **kw)


def _member(cfg: TrainConfig) -> Member:
    spec = cfg.saes[0]
    torch.manual_seed(0)
    sae = SAE(_sae_config(spec, D, D))
    return Member(spec, sae, make_optimizer(sae, spec.lr), str(cfg.out), 1.0, 1.0, torch.Generator(), spec.lr)


class Reference(torch.nn.Module):
    """Textbook SAE in plain torch (dictionary_learning's layouts: encoder [F, D], decoder [D, F])."""

    def __init__(self, sae: SAE, arch: str, coeff: float):
        super().__init__()
        self.arch, self.coeff = arch, coeff
        self.W_enc = torch.nn.Parameter(sae.W_enc_DF.detach().t().clone())
        self.b_enc = torch.nn.Parameter(sae.b_enc_F.detach().clone())
        self.W_dec = torch.nn.Parameter(sae.W_dec_FD.detach().t().clone())
        self.b_dec = torch.nn.Parameter(sae.b_dec_D.detach().clone())

    def loss(self, x, sparsity_scale: float):
        pre = torch.relu((x - self.b_dec) @ self.W_enc.t() + self.b_enc)
        if self.arch == "topk":
            top = pre.topk(K, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        else:
            f = pre
        x_hat = f @ self.W_dec.t() + self.b_dec
        loss = (x - x_hat).pow(2).sum(-1).mean()
        if self.arch == "relu":
            loss = loss + self.coeff * sparsity_scale * f.abs().sum(-1).mean()
        return loss

    def params(self) -> dict:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}


def _ours(sae: SAE) -> dict:
    return {"W_enc": sae.W_enc_DF.t(), "b_enc": sae.b_enc_F, "W_dec": sae.W_dec_FD.t(), "b_dec": sae.b_dec_D}


def _params(sae: SAE) -> dict:
    return {"W_enc": sae.W_enc_DF, "b_enc": sae.b_enc_F, "W_dec": sae.W_dec_FD, "b_dec": sae.b_dec_D}


def _reference_run(ref: Reference, opt, xs, cfg: TrainConfig, total: int, lr: float, norms: list):
    for step, x in enumerate(xs):
        if step == 0:
            with torch.no_grad():
                ref.b_dec.copy_(geometric_median(x))
        loss = ref.loss(x, sparsity_warmup_factor(step, cfg.sparsity_warmup_steps))
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            W, g = ref.W_dec, ref.W_dec.grad  # [D, F]: columns are the decoder directions
            w_hat = W / W.norm(dim=0, keepdim=True)
            g -= (g * w_hat).sum(0, keepdim=True) * w_hat
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)))
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, cfg.warmup_steps, total)
        opt.step()
        with torch.no_grad():
            ref.W_dec /= ref.W_dec.norm(dim=0, keepdim=True)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_training_steps_match_plain_torch_reference(arch, tmp_path):
    cfg = _cfg(arch, tmp_path)
    assert cfg.grad_clip > 0  # the default recipe clips
    m = _member(cfg)
    ref = Reference(m.sae, arch, m.sae.cfg.coeff)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=m.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(B, D, generator=gen) * 3 + 1 for _ in range(5)]
    norms: list[float] = []
    _reference_run(ref, ref_opt, xs, cfg, cfg.total_steps, m.lr, norms)
    assert max(norms) > cfg.grad_clip  # the clip acted on these steps
    for step, x in enumerate(xs):
        train_step(m, {"h": x}, step, cfg, cfg.total_steps, NO_AUTOCAST, 1)
    ours, theirs = _ours(m.sae), ref.params()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=f"{arch} {name}")
        p_ours, p_ref = _params(m.sae)[name], theirs[name]
        for key in ("exp_avg", "exp_avg_sq"):
            a = m.opt.state[p_ours][key]
            a = a.t() if name.startswith("W_") else a
            torch.testing.assert_close(a, ref_opt.state[p_ref][key], rtol=1e-3, atol=1e-8,
                                       msg=f"{arch} {name} {key}")


def test_grad_clip_zero_turns_clipping_off(tmp_path):
    """grad_clip=0 reproduces the unclipped step: identical to a reference whose clip never binds."""
    cfg = _cfg("topk", tmp_path, grad_clip=0.0)
    m = _member(cfg)
    ref = Reference(m.sae, "topk", 0.0)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=m.lr)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(2)) * 3
    no_clip = SimpleNamespace(grad_clip=float("inf"), sparsity_warmup_steps=cfg.sparsity_warmup_steps,
                              warmup_steps=cfg.warmup_steps)
    _reference_run(ref, ref_opt, [x], no_clip, cfg.total_steps, m.lr, [])
    train_step(m, {"h": x}, 0, cfg, cfg.total_steps, NO_AUTOCAST, 1)
    torch.testing.assert_close(_ours(m.sae)["W_enc"], ref.W_enc, rtol=1e-4, atol=1e-6)


def test_grad_clip_must_be_nonnegative(tmp_path):
    from saecache.errors import ConfigError
    with pytest.raises(ConfigError, match="--grad-clip"):
        _cfg("topk", tmp_path, grad_clip=-1.0)
