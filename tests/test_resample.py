"""Dead-latent resampling (Anthropic, "Towards Monosemanticity"): only dead latents change, exactly their Adam moments
are reset, inputs are drawn ∝ squared reconstruction loss, encoder norms are 0.2 × the mean alive norm, decoder rows
unit norm, and the training loop re-warms the LR after each resample. Resampling is per SAE: in a sweep, a relu member
is resampled while a topk member (AuxK, not resampled by default) trains bit-identically to the same SAE alone."""

import copy
import json
from pathlib import Path

import pytest
import torch

from saecache.train import rundir
from saecache.train.config import TrainConfig
from saecache.train.optim import LazyAdam, make_optimizer
from saecache.train.resample import resample_dead_
from saecache.train.sae import SAE, SAEConfig
from saecache.train import trainer as T



pytestmark = pytest.mark.usefixtures("one_torch_thread")

def _trained(arch="relu", d=16, F=40, d_out=None, steps=3, **kw):
    """An SAE with a few Adam steps behind it, so every moment is non-zero."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch, d, F, d_out=d_out, **kw))
    opt = make_optimizer(sae, 1e-2)
    for _ in range(steps):
        x = torch.randn(64, d)
        t = None if d_out is None else torch.randn(64, d_out)
        opt.zero_grad()
        sae.loss(x, t).total.backward()
        opt.step()
    return sae, opt


def _unit(v):
    return v / v.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("arch,kw", [("relu", {}), ("topk", {"k": 4}), ("gated", {}), ("jumprelu", {})])
def test_only_dead_latents_change_and_exactly_their_moments_are_reset(arch, kw):
    sae, opt = _trained(arch, **kw)
    F = sae.cfg.width
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[1, 5, 6, 17, 39]] = True
    alive = ~dead
    params = dict(sae.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in params.items()}
    want_enc_norm = 0.2 * float(sae.W_enc_DF.detach()[:, alive].norm(dim=0).mean())
    x = torch.randn(32, 16)

    n = resample_dead_(sae, opt, x, None, dead, torch.Generator().manual_seed(1))
    assert n == 5
    for name, p in params.items():
        feat_dim = {"W_enc_DF": 1}.get(name, 0)
        per_feature = p.shape[feat_dim] == F if p.dim() else False
        for k, m in opt.state[p].items():
            old = moments[name][k]
            if k == "step":
                assert torch.equal(m, old)  # the step count (bias correction) is not touched
            elif per_feature:
                sel = (slice(None), alive) if feat_dim else (alive,)
                dsel = (slice(None), dead) if feat_dim else (dead,)
                fresh = 1.0 if k.endswith("_power") else 0.0  # LazyAdam's β^n of a latent with n = 0 updates is 1
                assert torch.equal(m[sel], old[sel]), f"{name}.{k} changed for alive latents"
                assert bool((m[dsel] == fresh).all()), f"{name}.{k} not reset"
                if name in ("W_enc_DF", "W_dec_FD"):
                    assert bool((old[dsel] != fresh).any())  # (so the reset is visible)
            else:
                assert torch.equal(m, old), f"{name}.{k} changed"  # e.g. b_dec: not per feature
        if per_feature:
            sel = (slice(None), alive) if feat_dim else (alive,)
            assert torch.equal(p[sel], before[name][sel]), f"{name} changed for alive latents"
        else:
            assert torch.equal(p, before[name]), name

    W_enc_FD, W_dec_FD = sae.W_enc_DF.t()[dead], sae.W_dec_FD[dead]
    torch.testing.assert_close(W_dec_FD.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(W_enc_FD.norm(dim=1), torch.full((5,), want_enc_norm))
    # each dead latent got a distinct input of the batch: encoder and decoder both point along it
    picked = (_unit(W_dec_FD) @ _unit(x).t()).isclose(torch.tensor(1.0), atol=1e-5)
    assert picked.sum(1).tolist() == [1] * 5 and len(set(picked.float().argmax(1).tolist())) == 5
    torch.testing.assert_close(_unit(W_enc_FD), W_dec_FD)
    assert bool((sae.b_enc_F[dead] == 0).all()) and bool((sae.tokens_since_fired_F[dead] == 0).all())
    if arch == "gated":
        assert bool((sae.r_mag_F[dead] == 0).all()) and bool((sae.b_mag_F[dead] == 0).all())
    if arch == "jumprelu":
        assert bool((sae.threshold_F[dead] == sae.cfg.jumprelu_init_threshold).all())


def test_transcoder_decoder_takes_the_target_direction_encoder_the_input_direction():
    sae, opt = _trained("relu", d=16, F=24, d_out=8)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[3] = True
    x, t = torch.randn(1, 16), torch.randn(1, 8)  # one row: it must be the one drawn
    resample_dead_(sae, opt, x, t, dead, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.W_dec_FD[3], _unit(t[0]))
    torch.testing.assert_close(_unit(sae.W_enc_DF[:, 3]), _unit(x[0]))


def test_inputs_are_drawn_proportional_to_squared_loss():
    """With x̂ = 0, row losses are ‖x‖: 1 and 3. Squared loss gives P(row 1) = 9/10, the plain norm would give 3/4;
    rows reconstructed perfectly are never drawn."""
    sae = SAE(SAEConfig("relu", 4, 8))
    with torch.no_grad():
        sae.b_enc_F.fill_(-1e3)  # nothing fires: x̂ = b_dec = 0
    opt = make_optimizer(sae, 1e-3)
    state = copy.deepcopy(sae.state_dict())
    x = torch.tensor([[1.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 0]])
    dead = torch.zeros(8, dtype=torch.bool)
    dead[2] = True
    gen, counts = torch.Generator().manual_seed(0), [0, 0, 0]
    for _ in range(2000):
        sae.load_state_dict(state)
        resample_dead_(sae, opt, x, None, dead, gen)
        counts[int(sae.W_dec_FD[2].abs().argmax())] += 1
    assert counts[2] == 0  # (column 2 would only be hit by the zero row)
    assert 0.87 < counts[1] / 2000 < 0.93


def test_more_dead_latents_than_rows_and_none_dead():
    sae, opt = _trained("relu", F=40)
    before = copy.deepcopy(sae.state_dict())
    assert resample_dead_(sae, opt, torch.randn(8, 16), None, torch.zeros(40, dtype=torch.bool)) == 0
    assert all(torch.equal(v, before[k]) for k, v in sae.state_dict().items())
    dead = torch.ones(40, dtype=torch.bool)
    dead[0] = False
    assert resample_dead_(sae, opt, torch.randn(8, 16), None, dead, torch.Generator().manual_seed(0)) == 8
    changed = (sae.W_dec_FD != before["W_dec_FD"]).any(1)
    assert changed[1:9].all() and not changed[9:].any() and not changed[0]


def test_training_loop_resamples_at_the_chosen_steps_and_rewarms_the_lr(tiny_store, tmp_path, monkeypatch):
    # resample=true is honoured on a topk SAE (not resampled by default)
    cfg = TrainConfig(stores=[str(tiny_store)], out=str(tmp_path), steps=30, batch_size=128, lr=1e-3, warmup_steps=4,
                      resample_steps=10, dead_tokens_threshold=2 * 128, progress=False, train_on_bos=True,  # full 128-row batches
                      saes=[{"arch": "topk", "hook_in": "mlp_out.0", "width": 512, "k": 2, "resample": True}])
    calls = []
    real = T.resample_dead_

    def spy(sae, opt, x, t, dead_F, gen):
        # the loop passes exactly the latents that have not fired for dead_tokens_threshold rows
        assert torch.equal(dead_F, sae.tokens_since_fired_F >= 2 * 128) and x.shape == (128, 64)
        calls.append(int(sae.n_steps))
        return real(sae, opt, x, t, dead_F, gen)

    monkeypatch.setattr(T, "resample_dead_", spy)
    lrs = []
    for cls in (torch.optim.Adam, LazyAdam):  # the topk SAE trains with LazyAdam, its family's default
        monkeypatch.setattr(cls, "step", lambda self, *a, _s=cls.step, **k: (
            lrs.append(self.param_groups[0]["lr"]), _s(self, *a, **k))[1])
    T.run_training(cfg)
    assert calls == [10, 20]  # not at the last step: freshly resampled latents would be saved untrained
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3]) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10:14] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # re-warmed after the resample at step 10
    assert lrs[20:24] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


RELU = {"arch": "relu", "hook_in": "mlp_out.0", "width": 96, "coeff": 0.3, "name": "relu"}
TOPK = {"arch": "topk", "hook_in": "mlp_out.0", "width": 512, "k": 2, "name": "topk"}
LR = 3e-2  # high enough for some relu latents to die within 10 steps


def _run(store, out, saes, **kw) -> dict:
    """Train; {name: run dir}. Checkpoint 10 is the state right after the resample at step 10."""
    cfg = TrainConfig(**{**dict(stores=[str(store)], out=str(out), steps=20, batch_size=128, lr=LR, warmup_steps=4,
                                dead_tokens_threshold=3 * 128, checkpoint_every=10, log_every=1, progress=False, saes=saes), **kw})
    return {Path(d).name: Path(d) for d in T.run_training(cfg)}


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / rundir.METRICS_FILE).read_text().splitlines()]


def _checkpoint(run_dir, step: int) -> tuple[dict, dict]:
    """(parameters and buffers, {parameter name: Adam state}) of a checkpoint."""
    model, extra, _ = rundir.load_checkpoint(run_dir, step)
    names = [n for n, _ in SAE(SAEConfig.from_dict(rundir.read_cfg(run_dir)["sae"])).named_parameters()]
    adam = {n: {k.split(".")[2]: v for k, v in extra.items() if k.startswith(f"optim.{i}.")}
            for i, n in enumerate(names)}
    return model, adam


def test_a_sweep_resamples_its_relu_member_and_leaves_its_topk_member_as_if_trained_alone(tiny_store, tmp_path):
    sweep = _run(tiny_store, tmp_path / "sweep", [RELU, TOPK], resample_steps=10)
    relu_kept = _run(tiny_store, tmp_path / "no", [{**RELU, "resample": False}], resample_steps=10)["relu"]
    topk_alone = _run(tiny_store, tmp_path / "alone", [TOPK])["topk"]  # a run without resampling at all
    assert rundir.read_cfg(sweep["relu"])["spec"]["resample"] is True  # the resolved defaults are recorded
    assert rundir.read_cfg(sweep["topk"])["spec"]["resample"] is False
    assert rundir.read_cfg(relu_kept)["spec"]["resample"] is False
    assert rundir.read_cfg(topk_alone)["spec"]["resample"] is False

    # topk: bit-identical weights and metrics (LR included: plain warmup, no re-warm at step 10) to the solo run
    assert (sweep["topk"] / rundir.WEIGHTS_FILE).read_bytes() == (topk_alone / rundir.WEIGHTS_FILE).read_bytes()
    assert _metrics(sweep["topk"]) == _metrics(topk_alone)
    # (its LR decays to 0 over the last half of the 20 steps; the relu member, which resamples, never decays)
    assert [r["lr"] for r in _metrics(sweep["topk"])] == \
        pytest.approx([min(1, s / 4) * min(1, (21 - s) / 10) * LR for s in range(1, 21)])

    # relu: at step 10 exactly the dead latents were reinitialised, with their Adam moments zeroed; the LR re-warms
    assert [r["lr"] for r in _metrics(sweep["relu"])][9:13] == pytest.approx([LR, LR / 4, LR / 2, LR * 3 / 4])
    assert [r["lr"] for r in _metrics(relu_kept)][9:13] == pytest.approx([LR] * 4)
    (got, got_adam), (ref, ref_adam) = _checkpoint(sweep["relu"], 10), _checkpoint(relu_kept, 10)
    dead_F = ref["tokens_since_fired_F"] >= 3 * 128  # (the same run up to the resample, without it)
    assert 0 < int(dead_F.sum()) < 96
    for name, feature_dim in (("W_dec_FD", 0), ("W_enc_DF", 1), ("b_enc_F", 0)):
        dead = (slice(None), dead_F) if feature_dim else (dead_F,)
        alive = (slice(None), ~dead_F) if feature_dim else (~dead_F,)
        assert torch.equal(got[name][alive], ref[name][alive]), name
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got_adam[name][k][alive], ref_adam[name][k][alive]), f"{name}.{k}"
            assert bool((got_adam[name][k][dead] == 0).all()), f"{name}.{k} not reset"
    assert bool((got["W_dec_FD"][dead_F] != ref["W_dec_FD"][dead_F]).any(1).all())  # every dead latent moved
    assert bool((ref_adam["W_dec_FD"]["exp_avg_sq"][dead_F] != 0).any())  # (so the reset is visible)
    assert (sweep["relu"] / rundir.WEIGHTS_FILE).read_bytes() != (relu_kept / rundir.WEIGHTS_FILE).read_bytes()
