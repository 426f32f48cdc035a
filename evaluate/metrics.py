"""Evaluation metrics as small pure functions, plus streaming accumulators for the ones summed over batches.

Shapes: `x_BD` the SAE target (the hooked activation, or the module output for a transcoder), `x_hat_BD` the
reconstruction, `f_BF` feature activations, `logits_BTV` model logits, `ids_BT` token ids, `mask_BT` which next-token
predictions count. Every reduction is stated in the docstring so figures in reports mean one thing:

- MSE is per element: mean over rows AND activation dimensions of (x - x_hat)^2 (the seed's tables).
- L1 is the mean over rows of the feature vector's L1 norm; L0 the mean over rows of the number of nonzero features.
- Fraction alive is over every row evaluated: a feature is alive when it is nonzero on at least one of them.
- Fraction of variance explained is 1 - sum_d Var(x - x_hat) / sum_d Var(x) with variances over rows (the residual
  is centred, as dictionary_learning does; a constant offset shows up in the relative reconstruction bias instead).
  Defined once, in `saecache.train.monitor` (the training log uses it too); `ReconAccumulator` streams it.
- % loss recovered is (L_ablated - L_spliced) / (L_ablated - L_clean): 1 at the clean loss, 0 at the ablated loss;
  its 95 % interval is a percentile bootstrap over the evaluated contexts.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from saecache.train.monitor import fraction_variance_explained  # noqa: F401 (the one FVE definition; train logs it)

EPS = 1e-12


def mse(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """Per-element mean squared error: mean over B*D entries of (x - x_hat)^2."""
    return float((x_BD.float() - x_hat_BD.float()).pow(2).mean())


def l1(f_BF: torch.Tensor) -> float:
    """Mean over rows of ||f||_1."""
    return float(f_BF.float().abs().sum(-1).mean())


def l0(f_BF: torch.Tensor) -> float:
    """Mean over rows of the number of nonzero features."""
    return float((f_BF != 0).float().sum(-1).mean())


def firing_counts(f_BF: torch.Tensor) -> torch.Tensor:
    """Per-feature number of rows where the feature is nonzero: [F] int64."""
    return (f_BF != 0).sum(0).to(torch.int64)


def firing_frequencies(counts_F: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-feature firing frequency = counts / rows evaluated: [F] float64 in [0, 1]."""
    return counts_F.double() / max(n_rows, 1)


def fraction_alive(counts_F: torch.Tensor) -> float:
    """Fraction of features nonzero on at least one evaluated row."""
    return float((counts_F > 0).double().mean())


def cosine_similarity(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """Mean over rows of cos(x, x_hat); a zero row counts as 0."""
    x, y = x_BD.double(), x_hat_BD.double()
    return float(((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(EPS)).mean())


def l2_ratio(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """Mean over rows of ||x_hat|| / ||x||."""
    x, y = x_BD.double(), x_hat_BD.double()
    return float((y.norm(dim=-1) / x.norm(dim=-1).clamp_min(EPS)).mean())


def relative_error_norm(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """||x - x_hat|| / ||x|| over all rows: sqrt(sum_rows ||x - x_hat||^2 / sum_rows ||x||^2) (the size of circuit
    tracing's "error nodes" relative to the activation; 0 = exact, 1 = as large as predicting zeros)."""
    x, y = x_BD.double(), x_hat_BD.double()
    return math.sqrt(float((x - y).pow(2).sum()) / max(float(x.pow(2).sum()), EPS))


def relative_reconstruction_bias(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """mean ||x_hat||^2 / mean <x, x_hat> (Gated SAE paper, eq. 10): 1 means no systematic shrinkage."""
    x, y = x_BD.double(), x_hat_BD.double()
    return float(y.pow(2).sum(-1).mean() / (x * y).sum(-1).mean())


def next_token_ce(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, mask_BT: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) and the number of predictions counted.

    Position t predicts ids[t+1]; `mask_BT[:, t]` says whether the prediction made AT position t counts (the last
    position never does). Returns (sum, count) so callers can add batches; mean = sum / count.
    Per prediction CE = logsumexp(logits) - logit[target], in float32 one row at a time (a [T, V] slice: tens of MB
    for a 50k vocabulary), summed in float64.
    """
    total, count = 0.0, 0
    for b in range(logits_BTV.shape[0]):
        z_TV = logits_BTV[b, :-1].float()
        nll_T = torch.logsumexp(z_TV, dim=-1) - z_TV.gather(-1, ids_BT[b, 1:, None].long()).squeeze(-1)
        keep = torch.ones_like(nll_T, dtype=torch.bool) if mask_BT is None else mask_BT[b, :-1].bool()
        total += float(nll_T[keep].double().sum())
        count += int(keep.sum())
    return total, count


def kl_clean_to_spliced(
    clean_logits_BTV: torch.Tensor, spliced_logits_BTV: torch.Tensor, mask_BT: torch.Tensor | None = None
) -> tuple[float, int]:
    """Summed KL(p_clean || p_spliced) over next-token distributions (nats) and the count of positions counted.

    Same positions as `next_token_ce`. KL = sum_v p_v (z_v - z'_v) - logsumexp(z) + logsumexp(z') with z, z' the
    clean and spliced logits: float32 row by row, summed in float64 (exactly 0 when the logits are equal).
    """
    total, count = 0.0, 0
    for b in range(clean_logits_BTV.shape[0]):
        z, zs = clean_logits_BTV[b, :-1].float(), spliced_logits_BTV[b, :-1].float()
        lse, lse_s = torch.logsumexp(z, dim=-1), torch.logsumexp(zs, dim=-1)
        p = torch.exp(z - lse[:, None])
        kl_T = (p * (z - zs)).sum(-1) - lse + lse_s
        keep = torch.ones_like(kl_T, dtype=torch.bool) if mask_BT is None else mask_BT[b, :-1].bool()
        total += float(kl_T[keep].double().sum())
        count += int(keep.sum())
    return total, count


class CleanReference:
    """What the clean forward contributes to every spliced comparison on one batch, computed once: per counted row
    the clean logits z, their logsumexp and softmax p (float32, [B, T-1, V]). `compare(spliced)` then gives the
    spliced CE and KL(clean || spliced) sums with one logsumexp pass per row instead of three (same formulas as
    `next_token_ce` and `kl_clean_to_spliced`, identical results)."""

    def __init__(self, clean_logits_BTV: torch.Tensor, ids_BT: torch.Tensor, mask_BT: torch.Tensor | None = None):
        self.z = clean_logits_BTV[:, :-1].float()
        self.lse = torch.logsumexp(self.z, dim=-1)
        self.p = torch.exp(self.z - self.lse[..., None])
        self.target = ids_BT[:, 1:, None].long()
        self.keep = (torch.ones_like(self.lse, dtype=torch.bool) if mask_BT is None else mask_BT[:, :-1].bool())
        nll = self.lse - self.z.gather(-1, self.target).squeeze(-1)
        self.ce_sum, self.count = float(nll[self.keep].double().sum()), int(self.keep.sum())

    def compare(self, spliced_logits_BTV: torch.Tensor) -> tuple[float, float]:
        """(summed CE of the spliced logits, summed KL(p_clean || p_spliced)) over the counted predictions."""
        ce, kl = 0.0, 0.0
        for b in range(self.z.shape[0]):
            zs = spliced_logits_BTV[b, :-1].float()
            lse_s = torch.logsumexp(zs, dim=-1)
            keep = self.keep[b]
            ce += float((lse_s - zs.gather(-1, self.target[b]).squeeze(-1))[keep].double().sum())
            kl += float(((self.p[b] * (self.z[b] - zs)).sum(-1) - self.lse[b] + lse_s)[keep].double().sum())
        return ce, kl


def fraction_recovered(clean: float, spliced: float, ablated: float) -> float:
    """(L_ablated - L_spliced) / (L_ablated - L_clean): 1 = clean loss, 0 = ablated loss; NaN if the two coincide."""
    denom = ablated - clean
    return (ablated - spliced) / denom if denom != 0 else math.nan


def bootstrap_recovered_interval(clean_C, spliced_C, ablated_C, level: float = 0.95, n_boot: int = 2000,
                                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `fraction_recovered` over contexts: (low, high) at `level`.

    Inputs are per-context losses [C] summed over the same number of counted predictions per context (so the
    figure is `fraction_recovered` of their sums). Contexts are resampled with replacement `n_boot` times (seeded:
    same inputs, same interval); a resample whose ablated and clean sums coincide is left out. NaN, NaN when fewer
    than two contexts or no resample is defined.
    """
    clean, spliced, ablated = (np.asarray(v, dtype=np.float64) for v in (clean_C, spliced_C, ablated_C))
    if not clean.shape == spliced.shape == ablated.shape or clean.ndim != 1:
        raise ValueError(f"per-context losses must be three [C] arrays, got {clean.shape}, {spliced.shape}, "
                         f"{ablated.shape}")
    if len(clean) < 2:
        return math.nan, math.nan
    idx_NC = np.random.default_rng(seed).integers(0, len(clean), size=(n_boot, len(clean)))
    num_N = (ablated - spliced)[idx_NC].sum(1)
    den_N = (ablated - clean)[idx_NC].sum(1)
    ratio = num_N[den_N != 0] / den_N[den_N != 0]
    if not ratio.size:
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(ratio, [tail, 100 - tail])
    return float(lo), float(hi)


class ReconAccumulator:
    """Streams the reconstruction statistics over batches; `result()` gives the same numbers as the pure functions
    applied to all rows at once (up to float rounding). Sums are kept in float64."""

    def __init__(self, n_features: int):
        self.n = 0
        self.n_features = n_features
        self.sq_err = 0.0  # sum over rows and dims of (x - x_hat)^2
        self.n_elems = 0
        self.l1_sum = 0.0
        self.l0_sum = 0.0
        self.cos_sum = 0.0
        self.ratio_sum = 0.0
        self.hat_sq_sum = 0.0  # sum ||x_hat||^2
        self.dot_sum = 0.0  # sum <x, x_hat>
        self.x_sum_D: torch.Tensor | None = None
        self.x_sq_sum = 0.0
        self.e_sum_D: torch.Tensor | None = None
        self.e_sq_sum = 0.0
        self.counts_F = torch.zeros(n_features, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor) -> None:
        x, y = x_BD.double(), x_hat_BD.double()
        e = x - y
        b = x.shape[0]
        self.n += b
        self.n_elems += x.numel()
        self.sq_err += float(e.pow(2).sum())
        self.l1_sum += float(f_BF.double().abs().sum())
        self.l0_sum += float((f_BF != 0).sum())
        xn, yn = x.norm(dim=-1), y.norm(dim=-1)
        self.cos_sum += float(((x * y).sum(-1) / (xn * yn).clamp_min(EPS)).sum())
        self.ratio_sum += float((yn / xn.clamp_min(EPS)).sum())
        self.hat_sq_sum += float(yn.pow(2).sum())
        self.dot_sum += float((x * y).sum())
        xs, es = x.sum(0).cpu(), e.sum(0).cpu()
        self.x_sum_D = xs if self.x_sum_D is None else self.x_sum_D + xs
        self.e_sum_D = es if self.e_sum_D is None else self.e_sum_D + es
        self.x_sq_sum += float(x.pow(2).sum())
        self.e_sq_sum += float(e.pow(2).sum())
        self.counts_F += firing_counts(f_BF).cpu()

    def result(self) -> dict:
        """Statistics over every row seen: mse, l1, l0, frac_alive, fve, cos, l2_ratio, rel_bias, rel_error, n_rows."""
        n = max(self.n, 1)
        var_x = self.x_sq_sum - float(self.x_sum_D.pow(2).sum()) / n if self.x_sum_D is not None else 0.0
        var_e = self.e_sq_sum - float(self.e_sum_D.pow(2).sum()) / n if self.e_sum_D is not None else 0.0
        return {
            "n_rows": self.n,
            "mse": self.sq_err / max(self.n_elems, 1),
            "l1": self.l1_sum / n,
            "l0": self.l0_sum / n,
            "frac_alive": fraction_alive(self.counts_F),
            "fve": 1.0 - var_e / max(var_x, EPS),
            "cos": self.cos_sum / n,
            "l2_ratio": self.ratio_sum / n,
            "rel_bias": self.hat_sq_sum / self.dot_sum if self.dot_sum else math.nan,
            "rel_error": math.sqrt(self.e_sq_sum / max(self.x_sq_sum, EPS)),
        }

    def frequencies(self) -> torch.Tensor:
        """Per-feature firing frequency over every row seen: [F] float64."""
        return firing_frequencies(self.counts_F, self.n)
