"""Replacement-model evaluation: every MLP replaced at once by a per-layer transcoder set, in both input modes.

On a small GPT-NeoX whose MLPs use ReLU, a ReLU transcoder holding a layer's own MLP weights reproduces it exactly,
so the replaced model IS the clean model: CE equal, KL 0, 100 % recovered, FVE 1, no error, and L0 = the MLP's
active hidden units. Zero transcoders give the zero-ablation loss. Noisy transcoders are checked against forwards
with the MLP modules swapped by hand (no hooks): the clean-input mode equals MLPs that return the prediction made
from the clean run's input; the replaced-input mode equals MLPs that return the prediction from their own input."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from saecache.evaluate import metrics as M
from saecache.evaluate.replacement import TranscoderSet, replacement_losses
from saecache.evaluate.splice import splice_losses
from saecache.harvest.hooks import HookPoint
from saecache.train.sae import SAE, SAEConfig

D, H, V, T, L = 32, 64, 97, 12, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=H,
                        max_position_embeddings=64, hidden_act="relu")
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (6, T), generator=torch.Generator().manual_seed(1))


def hooks(layer):
    mod = f"gpt_neox.layers.{layer}.mlp"
    return (HookPoint(name=f"mlp_in.{layer}", module=mod, io="input", d=D, order=0),
            HookPoint(name=f"mlp_out.{layer}", module=mod, io="output", d=D, order=0))


def transcoder_of(mlp, noise=0.0, seed=0, zero=False) -> SAE:
    """A ReLU transcoder with the MLP's own weights (plus Gaussian noise of std `noise`; zero decoder with `zero`)."""
    sae = SAE(SAEConfig(arch="relu", d_in=D, width=H, transcoder=True)).eval()
    g = torch.Generator().manual_seed(seed)
    W1, b1 = mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias  # [H, D], [H]
    W2, b2 = mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias  # [D, H], [D]
    with torch.no_grad():
        sae.W_enc_DF.copy_(W1.t() + noise * torch.randn(D, H, generator=g))
        sae.b_enc_F.copy_(b1)
        sae.b_in_D.zero_()
        sae.W_dec_FD.copy_(0 * W2.t() if zero else W2.t() + noise * torch.randn(H, D, generator=g))
        sae.b_dec_D.copy_(0 * b2 if zero else b2)
    return sae


def plt_set(model, layers=range(L), **kw) -> TranscoderSet:
    saes = [transcoder_of(model.gpt_neox.layers[i].mlp, seed=i, **kw) for i in layers]
    return TranscoderSet(saes, [hooks(i)[0] for i in layers], [hooks(i)[1] for i in layers], [str(i) for i in layers])


def means(rep):
    return {l: torch.full((D,), 0.1 * (l + 1)) for l in range(len(rep))}


@torch.no_grad()
def ce_of(model, ids, p0):
    logits = model(input_ids=ids).logits
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[:, p0:] = True
    s, n = M.next_token_ce(logits, ids, mask)
    return s / n


class Swapped(torch.nn.Module):
    """Stands in for an MLP: returns new(input) at positions >= p0, the MLP's own output elsewhere."""

    def __init__(self, mlp, new, p0):
        super().__init__()
        self.mlp, self.new, self.p0 = mlp, new, p0

    def forward(self, x):
        out = self.mlp(x).clone()
        out[:, self.p0:] = self.new(x)[:, self.p0:]
        return out


@torch.no_grad()
def manual_ce(model, ids, p0, news):
    """CE with each layer's MLP swapped (layer -> fn(input_BTD) giving its output); no hooks involved."""
    layers = model.gpt_neox.layers
    originals = {i: layers[i].mlp for i in news}
    try:
        for i, fn in news.items():
            layers[i].mlp = Swapped(originals[i], fn, p0)
        return ce_of(model, ids, p0)
    finally:
        for i, m in originals.items():
            layers[i].mlp = m


@pytest.mark.parametrize("p0", [0, 1])
def test_the_models_own_mlps_as_transcoders_replace_it_exactly(model, ids, p0):
    rep = plt_set(model)
    res = replacement_losses(model, ids, rep, list(range(L)), means(rep), first_position=p0, batch_size=4)
    acts = {}  # the MLPs' hidden activations, independently of the evaluation
    handles = [model.gpt_neox.layers[i].mlp.act.register_forward_hook(
        lambda m, a, o, i=i: acts.__setitem__(i, o.detach())) for i in range(L)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    for mode in ("clean", "replaced"):
        r = res[mode]
        assert r.losses.spliced == pytest.approx(r.losses.clean, abs=1e-5)
        assert abs(r.losses.kl) < 1e-5
        assert r.losses.recovered_zero == pytest.approx(1.0, abs=1e-4)
        assert r.losses.recovered_mean == pytest.approx(1.0, abs=1e-4)
        assert r.losses.zero > r.losses.clean and r.losses.n_contexts == 6
        for i, layer in enumerate(r.layers):
            assert layer["fve"] == pytest.approx(1.0, abs=1e-5) and layer["rel_error"] < 1e-5
            assert layer["n_rows"] == 6 * (T - p0)
            assert layer["l0"] == pytest.approx(float((acts[i][:, p0:] > 0).sum()) / (6 * (T - p0)))


def test_zero_transcoders_give_the_zero_ablation_loss_and_a_full_error(model, ids):
    rep = plt_set(model, zero=True)
    res = replacement_losses(model, ids, rep, list(range(L)), means(rep), batch_size=4)
    for r in res.values():
        assert r.losses.spliced == pytest.approx(r.losses.zero, abs=1e-6)
        assert r.losses.recovered_zero == pytest.approx(0.0, abs=1e-6)
        assert all(layer["rel_error"] == pytest.approx(1.0, abs=1e-6) for layer in r.layers)


def test_each_mode_equals_the_mlps_swapped_by_hand(model, ids):
    p0 = 1
    rep = plt_set(model, noise=0.005)
    res = replacement_losses(model, ids, rep, list(range(L)), means(rep), first_position=p0, batch_size=4)
    clean_in = {}  # every MLP's input in the clean run
    handles = [model.gpt_neox.layers[i].mlp.register_forward_pre_hook(
        lambda m, a, i=i: clean_in.__setitem__(i, a[0].detach())) for i in range(L)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()

    def pred(i, x):
        return rep.saes[i](x.reshape(-1, D)).reshape(x.shape)

    replaced_own = manual_ce(model, ids, p0, {i: (lambda x, i=i: pred(i, x)) for i in range(L)})
    replaced_clean = manual_ce(model, ids, p0, {i: (lambda x, i=i: pred(i, clean_in[i])) for i in range(L)})
    assert res["replaced"].losses.spliced == pytest.approx(replaced_own, abs=1e-5)
    assert res["clean"].losses.spliced == pytest.approx(replaced_clean, abs=1e-5)
    assert abs(replaced_own - replaced_clean) > 1e-4  # the modes differ: errors compound through the layers
    zero = manual_ce(model, ids, p0, {i: torch.zeros_like for i in range(L)})
    assert res["clean"].losses.zero == pytest.approx(zero, abs=1e-5)
    assert res["clean"].losses.clean == pytest.approx(ce_of(model, ids, p0), abs=1e-5)
    for mode in ("clean", "replaced"):
        assert res[mode].losses.kl > 0 and 0 < res[mode].losses.recovered_zero < 1
        assert all(0 < layer["rel_error"] < 1 for layer in res[mode].layers)
    # the first layer reads the same (clean) input in both modes; deeper layers do not
    assert res["clean"].layers[0]["fve"] == pytest.approx(res["replaced"].layers[0]["fve"], abs=1e-9)
    assert res["clean"].layers[2]["fve"] != pytest.approx(res["replaced"].layers[2]["fve"], abs=1e-9)


@pytest.mark.parametrize("layer", [0, 2])
def test_one_layer_alone_agrees_across_modes_and_with_evaluates_splice(model, ids, layer):
    rep = plt_set(model, noise=0.005)
    res = replacement_losses(model, ids, rep, [layer], means(rep), first_position=1, batch_size=4)
    h_in, h_out = hooks(layer)
    ref = splice_losses(model, ids, h_out, rep.saes[layer].forward, means(rep)[layer], hook_in=h_in,
                        first_position=1, batch_size=4)
    for mode in ("clean", "replaced"):
        got = res[mode].losses
        assert got.spliced == pytest.approx(ref.spliced, abs=1e-6) and got.kl == pytest.approx(ref.kl, abs=1e-6)
        assert got.zero == pytest.approx(ref.zero, abs=1e-6) and got.mean == pytest.approx(ref.mean, abs=1e-6)
    assert res["clean"].layers[0]["fve"] == pytest.approx(res["replaced"].layers[0]["fve"], abs=1e-9)
