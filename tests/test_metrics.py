"""Metrics on small cases whose expected values are worked out by hand in the comments."""

import math

import pytest
import torch

from saecache.evaluate import metrics as M

# x and its reconstruction: residual e = x - x_hat = [[0, 2], [0, -1]]
X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
X_HAT = torch.tensor([[1.0, 0.0], [3.0, 5.0]])
# features: row 0 has two nonzeros (|2| + |-1| = 3), row 1 one nonzero (3)
F = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, 3.0]])


def test_mse_is_per_element():
    # (0 + 4 + 0 + 1) / 4 elements
    assert M.mse(X, X_HAT) == pytest.approx(1.25)


def test_l1_l0_alive_frequencies():
    assert M.l1(F) == pytest.approx(3.0)  # (3 + 3) / 2 rows
    assert M.l0(F) == pytest.approx(1.5)  # (2 + 1) / 2 rows
    counts = M.firing_counts(F)
    assert counts.tolist() == [0, 1, 2]
    assert M.fraction_alive(counts) == pytest.approx(2 / 3)
    assert M.firing_frequencies(counts, 2).tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_fraction_variance_explained():
    # Var over rows: x col0 {1,3} -> 1, col1 {2,4} -> 1, total 2; e col0 {0,0} -> 0, col1 {2,-1} -> 2.25
    assert M.fraction_variance_explained(X, X_HAT) == pytest.approx(1 - 2.25 / 2)
    assert M.fraction_variance_explained(X, X) == pytest.approx(1.0)


def test_cosine_ratio_bias():
    # row 0: <x,y> = 1, |x| = sqrt5, |y| = 1; row 1: <x,y> = 29, |x| = 5, |y| = sqrt34
    cos = (1 / math.sqrt(5) + 29 / (5 * math.sqrt(34))) / 2
    assert M.cosine_similarity(X, X_HAT) == pytest.approx(cos)
    assert M.l2_ratio(X, X_HAT) == pytest.approx((1 / math.sqrt(5) + math.sqrt(34) / 5) / 2)
    # mean |y|^2 = (1 + 34) / 2, mean <x,y> = (1 + 29) / 2
    assert M.relative_reconstruction_bias(X, X_HAT) == pytest.approx(17.5 / 15)
    assert M.cosine_similarity(X, 2 * X) == pytest.approx(1.0)
    assert M.l2_ratio(X, 2 * X) == pytest.approx(2.0)


def test_next_token_ce_and_mask():
    ids = torch.tensor([[0, 1, 0]])
    # position 0: uniform over 2 tokens, predicts id 1 -> ln 2; position 1: p = [3/4, 1/4], predicts id 0 -> ln(4/3)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0]]])
    s, n = M.next_token_ce(logits, ids)
    assert n == 2 and s == pytest.approx(math.log(2) + math.log(4 / 3))
    s, n = M.next_token_ce(logits, ids, torch.tensor([[0, 1, 1]]))
    assert n == 1 and s == pytest.approx(math.log(4 / 3))


def test_kl_clean_to_spliced():
    clean = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    spliced = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0], [9.0, 0.0]]])
    # position 0: KL([1/2,1/2] || [3/4,1/4]) = 1/2 ln(2/3) + 1/2 ln 2; position 1: identical -> 0; last ignored
    s, n = M.kl_clean_to_spliced(clean, spliced)
    assert n == 2 and s == pytest.approx(0.5 * math.log(4 / 3))
    assert M.kl_clean_to_spliced(clean, clean)[0] == 0.0


def test_fraction_recovered():
    assert M.fraction_recovered(clean=2.0, spliced=3.0, ablated=6.0) == pytest.approx(0.75)
    assert M.fraction_recovered(2.0, 2.0, 6.0) == 1.0
    assert M.fraction_recovered(2.0, 6.0, 6.0) == 0.0
    assert math.isnan(M.fraction_recovered(2.0, 3.0, 2.0))


def test_accumulator_over_batches_matches_hand_values():
    acc = M.ReconAccumulator(n_features=3)
    acc.update(X[:1], X_HAT[:1], F[:1])
    acc.update(X[1:], X_HAT[1:], F[1:])
    r = acc.result()
    assert r["n_rows"] == 2
    assert r["mse"] == pytest.approx(1.25)
    assert r["l1"] == pytest.approx(3.0)
    assert r["l0"] == pytest.approx(1.5)
    assert r["frac_alive"] == pytest.approx(2 / 3)
    assert r["fve"] == pytest.approx(1 - 2.25 / 2)
    assert r["rel_bias"] == pytest.approx(17.5 / 15)
    assert r["cos"] == pytest.approx((1 / math.sqrt(5) + 29 / (5 * math.sqrt(34))) / 2)
    assert acc.frequencies().tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_accumulator_equals_one_shot_on_random_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) + 3.0
    y = x + 0.3 * torch.randn(50, 6, generator=g)
    f = torch.relu(torch.randn(50, 10, generator=g))
    acc = M.ReconAccumulator(10)
    for i in range(0, 50, 7):
        acc.update(x[i : i + 7], y[i : i + 7], f[i : i + 7])
    r = acc.result()
    assert r["fve"] == pytest.approx(M.fraction_variance_explained(x, y), rel=1e-9)
    assert r["mse"] == pytest.approx(M.mse(x, y), rel=1e-6)
    assert r["l2_ratio"] == pytest.approx(M.l2_ratio(x, y), rel=1e-9)


def test_ce_and_kl_match_float64_references_on_a_large_vocabulary():
    """The float32 row-by-row forms agree with float64 torch references (cross_entropy, kl_div) to 1e-5."""
    g = torch.Generator().manual_seed(0)
    V = 5000
    clean = torch.randn(3, 7, V, generator=g) * 4
    spliced = clean + torch.randn(3, 7, V, generator=g) * 0.3
    ids = torch.randint(0, V, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 0] = False
    s, n = M.next_token_ce(clean, ids, mask)
    ref = torch.nn.functional.cross_entropy(clean[:, 1:-1].reshape(-1, V).double(), ids[:, 2:].reshape(-1),
                                            reduction="sum")
    assert n == 3 * 5 and s == pytest.approx(float(ref), rel=1e-5)
    s, n = M.kl_clean_to_spliced(clean, spliced, mask)
    lp = torch.log_softmax(clean[:, 1:-1].double(), -1)
    lq = torch.log_softmax(spliced[:, 1:-1].double(), -1)
    ref = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="sum")
    assert n == 15 and s == pytest.approx(float(ref), rel=1e-5)


def test_clean_reference_gives_the_same_sums_as_the_separate_functions():
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(2, 6, 300, generator=g) * 3
    spliced = clean + torch.randn(2, 6, 300, generator=g) * 0.5
    ids = torch.randint(0, 300, (2, 6), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    ref = M.CleanReference(clean, ids, mask)
    assert (ref.ce_sum, ref.count) == pytest.approx(M.next_token_ce(clean, ids, mask), rel=1e-12)
    ce, kl = ref.compare(spliced)
    assert ce == pytest.approx(M.next_token_ce(spliced, ids, mask)[0], rel=1e-12)
    assert kl == pytest.approx(M.kl_clean_to_spliced(clean, spliced, mask)[0], rel=1e-12)
    assert ref.compare(clean) == (ref.ce_sum, 0.0)


def test_training_log_and_evaluation_share_one_centred_fve():
    """A reconstruction off by a constant vector explains all the variance under the centred definition; the training
    monitor used to leave the residual uncentred and logged less than evaluation reported for the same rows."""
    from types import SimpleNamespace

    from saecache.train.monitor import step_metrics

    g = torch.Generator().manual_seed(0)
    t = torch.randn(256, 8, generator=g) + 3.0
    x_hat = t + torch.linspace(-1, 1, 8)  # a constant offset per dimension
    out = SimpleNamespace(total=torch.tensor(1.0), recon=torch.tensor(1.0), l0=torch.tensor(4.0), x_hat_BD=x_hat)
    rec = step_metrics(out, t, torch.zeros(4, dtype=torch.bool), 1, 256)
    assert rec["fve"] == pytest.approx(1.0) == pytest.approx(M.fraction_variance_explained(t, x_hat))
    noisy = t + 0.5 * torch.randn(256, 8, generator=g)
    rec = step_metrics(SimpleNamespace(**{**vars(out), "x_hat_BD": noisy}), t, torch.zeros(4, dtype=torch.bool), 1, 256)
    acc = M.ReconAccumulator(4)
    acc.update(t, noisy, torch.zeros(256, 4))
    assert rec["fve"] == pytest.approx(acc.result()["fve"], rel=1e-9)
    assert 0 < rec["fve"] < 0.99
