"""Splicing: identity -> clean loss, zero -> zero-ablation loss, and the spliced loss equals a manual forward where the
MLP module is swapped for one that returns the reconstruction (no hooks involved), for SAEs and transcoders."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from saecache.evaluate import metrics as M
from saecache.evaluate.splice import splice_losses
from saecache.harvest.hooks import HookPoint

D, V, T, LAYER = 32, 97, 12, 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64)
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (6, T), generator=torch.Generator().manual_seed(1))


MLP_OUT = HookPoint(name="mlp_out.1", module=f"gpt_neox.layers.{LAYER}.mlp", io="output", d=D, order=0)
MLP_IN = HookPoint(name="mlp_in.1", module=f"gpt_neox.layers.{LAYER}.mlp", io="input", d=D, order=0)


def small_sae(seed=2, f=48):
    g = torch.Generator().manual_seed(seed)
    W_enc, b_enc = torch.randn(D, f, generator=g) * 0.3, torch.randn(f, generator=g) * 0.1
    W_dec, b_dec = torch.randn(f, D, generator=g) * 0.3, torch.randn(D, generator=g) * 0.1
    return lambda x: torch.relu(x @ W_enc + b_enc) @ W_dec + b_dec


class Swapped(torch.nn.Module):
    """Stands in for the MLP: output = new(input, original output) at positions >= p0, the original elsewhere."""

    def __init__(self, mlp, new, p0):
        super().__init__()
        self.mlp, self.new, self.p0 = mlp, new, p0

    def forward(self, x):
        y = self.mlp(x)
        out = y.clone()
        out[:, self.p0:] = self.new(x, y)[:, self.p0:]
        return out


def manual_ce(model, ids, p0, new=None):
    """Mean CE of predictions made at positions p0..T-2, with layer LAYER's MLP swapped when `new` is given."""
    layer = model.gpt_neox.layers[LAYER]
    original = layer.mlp
    if new is not None:
        layer.mlp = Swapped(original, new, p0)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        layer.mlp = original
    return float(Fn.cross_entropy(logits[:, p0:-1].reshape(-1, V).double(), ids[:, p0 + 1:].reshape(-1)))


def flat(fn):
    return lambda x_BTD: fn(x_BTD.reshape(-1, D)).reshape(x_BTD.shape)


@pytest.mark.parametrize("p0", [0, 1])
def test_identity_recovers_everything_and_zero_nothing(model, ids, p0):
    mean = torch.randn(D)
    ident = splice_losses(model, ids, MLP_OUT, lambda x: x, mean, first_position=p0, batch_size=4)
    assert ident.spliced == ident.clean
    assert ident.recovered_zero == 1.0 and ident.recovered_mean == 1.0
    assert ident.kl == pytest.approx(0.0, abs=1e-12)
    assert ident.n_predictions == ids.shape[0] * (T - 1 - p0)
    zero = splice_losses(model, ids, MLP_OUT, torch.zeros_like, mean, first_position=p0, batch_size=4)
    assert zero.spliced == zero.zero
    assert zero.recovered_zero == 0.0
    assert zero.zero != zero.clean and zero.kl > 0


@pytest.mark.parametrize("p0", [0, 1])
def test_spliced_equals_manual_module_swap(model, ids, p0):
    sae = small_sae()
    mean = torch.randn(D, generator=torch.Generator().manual_seed(3))
    res = splice_losses(model, ids, MLP_OUT, sae, mean, first_position=p0, batch_size=6)
    assert res.clean == pytest.approx(manual_ce(model, ids, p0), rel=1e-6)
    assert res.spliced == pytest.approx(manual_ce(model, ids, p0, lambda x, y: flat(sae)(y)), rel=1e-6)
    assert res.zero == pytest.approx(manual_ce(model, ids, p0, lambda x, y: torch.zeros_like(y)), rel=1e-6)
    assert res.mean == pytest.approx(manual_ce(model, ids, p0, lambda x, y: mean.expand_as(y)), rel=1e-6)
    assert res.spliced != pytest.approx(res.clean)
    want = (res.zero - res.spliced) / (res.zero - res.clean)
    assert res.recovered_zero == pytest.approx(want)


def test_transcoder_reconstructs_output_from_module_input(model, ids):
    tc = small_sae(seed=5)
    res = splice_losses(model, ids, MLP_OUT, tc, torch.zeros(D), hook_in=MLP_IN, first_position=1, batch_size=6)
    assert res.spliced == pytest.approx(manual_ce(model, ids, 1, lambda x, y: flat(tc)(x)), rel=1e-6)
    # and it differs from treating the output as the input
    assert res.spliced != pytest.approx(manual_ce(model, ids, 1, lambda x, y: flat(tc)(y)), rel=1e-6)


def test_many_reconstructions_share_baselines_and_match_single_runs(model, ids):
    """splice_losses_many (clean/zero/mean once per batch, one spliced forward per reconstruction) gives each
    reconstruction exactly what a run of its own gives."""
    from saecache.evaluate.splice import splice_losses_many

    mean = torch.randn(D, generator=torch.Generator().manual_seed(4))
    sae, tc = small_sae(seed=2), small_sae(seed=5)
    many = splice_losses_many(model, ids, MLP_OUT, {"sae": (sae, None), "tc": (tc, MLP_IN), "id": (lambda x: x, None)},
                              mean, first_position=1, batch_size=4)
    for label, (fn, hook_in) in (("sae", (sae, None)), ("tc", (tc, MLP_IN))):
        one = splice_losses(model, ids, MLP_OUT, fn, mean, hook_in=hook_in, first_position=1, batch_size=4)
        assert many[label] == one, label
    assert many["id"].spliced == many["id"].clean and many["id"].kl == 0.0
    assert len({many[k].spliced for k in many}) == 3


def test_per_context_losses_add_up_and_the_interval_brackets_the_figure(model, ids):
    res = splice_losses(model, ids, MLP_OUT, small_sae(), torch.randn(D), first_position=1, batch_size=4)
    pc = res.per_context
    assert {k: len(v) for k, v in pc.items()} == {k: ids.shape[0] for k in ("clean", "zero", "mean", "spliced")}
    for key, mean in (("clean", res.clean), ("spliced", res.spliced), ("zero", res.zero), ("mean", res.mean)):
        assert sum(pc[key]) / res.n_predictions == pytest.approx(mean, rel=1e-12)
    row = res.as_dict()
    for key in ("recovered_zero", "recovered_mean"):
        assert row[f"{key}_lo"] < row[key] < row[f"{key}_hi"]


# ---- the bootstrap interval of % loss recovered, on hand-made numbers ----

def test_bootstrap_two_contexts_matches_the_enumerated_resamples():
    """Two contexts, recovered 1/2 and 3/2 of an equal gap: resamples give 0.5 (p 1/4), 1.0 (p 1/2), 1.5 (p 1/4)."""
    clean, zero, spliced = [1.0, 1.0], [3.0, 3.0], [2.0, 0.0]
    assert M.bootstrap_recovered_interval(clean, spliced, zero) == (0.5, 1.5)
    assert M.bootstrap_recovered_interval(clean, spliced, zero, level=0.4) == (1.0, 1.0)  # 30th..70th percentile


def test_bootstrap_collapses_when_every_context_recovers_the_same_share():
    clean = [1.0, 2.0, 3.0, 4.0]
    zero = [2.0, 4.0, 6.0, 8.0]
    spliced = [c + 0.1 * (z - c) for c, z in zip(clean, zero)]  # 90 % recovered in each context
    lo, hi = M.bootstrap_recovered_interval(clean, spliced, zero)
    assert lo == pytest.approx(0.9) and hi == pytest.approx(0.9)


def test_bootstrap_narrows_with_more_contexts_and_is_seeded():
    g = np.random.default_rng(7)

    def contexts(n):
        clean = g.normal(4.0, 0.3, n)
        zero = clean + g.normal(0.2, 0.1, n)
        return clean, clean + g.normal(0.02, 0.05, n), zero

    few, many = contexts(100), contexts(400)
    (lo1, hi1), (lo4, hi4) = M.bootstrap_recovered_interval(*few), M.bootstrap_recovered_interval(*many)
    assert 1.5 < (hi1 - lo1) / (hi4 - lo4) < 2.7  # width ~ 1/sqrt(n): 4x the contexts, about half the width
    assert lo4 < M.fraction_recovered(many[0].sum(), many[1].sum(), many[2].sum()) < hi4
    assert M.bootstrap_recovered_interval(*few) == (lo1, hi1)
    assert M.bootstrap_recovered_interval(*few, seed=1) != (lo1, hi1)


def test_bootstrap_undefined_cases():
    assert all(math.isnan(v) for v in M.bootstrap_recovered_interval([1.0], [1.5], [2.0]))
    assert all(math.isnan(v) for v in M.bootstrap_recovered_interval([1.0, 2.0], [1.0, 2.0], [1.0, 2.0]))
    with pytest.raises(ValueError, match="three"):
        M.bootstrap_recovered_interval([1.0, 2.0], [1.0], [1.0, 2.0])


def test_report_tables_show_intervals_and_the_markdown_flags_wide_ones():
    from saecache.evaluate.report import markdown, tables

    base = {"layer": "0", "hook_in": "mlp_out.0", "hook_out": "mlp_out.0", "arch": "topk",
            "width": 512, "k": 32, "mse": 0.1, "l1": 1.0, "l0": 32.0, "frac_alive": 0.9, "n_rows": 100,
            "rows": "held-out", "n_contexts": 96}
    rows = [{**base, "run": "a", "recovered_zero": 0.9731, "recovered_zero_lo": 0.9612, "recovered_zero_hi": 0.9825,
             "recovered_mean": 0.95, "recovered_mean_lo": 0.90, "recovered_mean_hi": 0.97},
            {**base, "run": "b", "layer": "1", "recovered_zero": 0.5, "recovered_zero_lo": float("nan"),
             "recovered_zero_hi": float("nan")}]
    table = tables(rows)
    assert "| 97.3 [96.1, 98.2] | 95.0 [90.0, 97.0] |" in table
    assert "| 50.0 | — |" in table  # no interval to show: the figure alone
    header = {"store": "s", "model": "m", "fingerprint": "0" * 16, "first_position": 0}
    md = markdown(rows, header)
    assert "Intervals wider than ±2 points: a recovered_mean ±3.5" in md
    rows[0].update(recovered_mean_lo=0.94, recovered_mean_hi=0.96)
    assert "Every % loss recovered interval is within ±2 points" in markdown(rows, header)
