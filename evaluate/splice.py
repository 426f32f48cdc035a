"""% loss recovered: splice an SAE's reconstruction into the model and compare next-token cross-entropy.

For each batch of contexts (token ids read from the store itself, so the text is exactly what the SAE saw) four
forwards run: clean; spliced (the hooked module's output replaced by the reconstruction); zero-ablated (replaced by
zeros); mean-ablated (replaced by the store's per-hook mean from `_final.json`). For a transcoder the reconstruction of
`hook_out` is computed from the activation at `hook_in` (e.g. the MLP's input), captured in the same forward.

BOS / padding policy, matching the store: contexts are fixed length with no padding. When the store keeps position 0
out (`first_position == 1`, the BOS position), the SAE never saw that position, so it is left untouched in every
variant (spliced, zero, mean) and the prediction made AT position 0 is not counted; every prediction made at positions
`first_position .. T-2` counts (targets `first_position+1 .. T-1`). With `first_position == 0` every position is
replaced and every prediction counts. The same positions count for the KL divergence to the clean model. For a run
that never trained on BOS rows, evaluation passes `first_position=1` on a store that keeps position 0 too
(`runner.bos_rule`): the BOS position is then treated as if the store did not hold it.

The hooks themselves are `saecache.harvest.hooks.patch_output` (a forward hook replacing a module's output or input);
the capture for transcoders is an identity patch at `hook_in` that records the tensor it sees.

Every loss is also kept per context, so each % loss recovered comes with a 95 % bootstrap interval over contexts
(`metrics.bootstrap_recovered_interval`): contexts, not tokens, are the independent units.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from saecache.evaluate import metrics as M
from saecache.harvest.hooks import HookPoint, patch_output

Reconstruct = Callable[[torch.Tensor], torch.Tensor]
"""[N, D_in] -> [N, D_out]: the SAE (or any stand-in) mapping flattened activations to their reconstruction."""


@dataclass
class SpliceLosses:
    """Mean next-token cross-entropies (nats per counted prediction) and derived scores."""

    clean: float
    """The unmodified model."""
    spliced: float
    """The hooked module's output replaced by the reconstruction."""
    zero: float
    """The hooked module's output replaced by zeros."""
    mean: float
    """The hooked module's output replaced by the store's mean activation of that hook."""
    kl: float
    """Mean KL(p_clean || p_spliced) per counted position (nats)."""
    n_predictions: int
    """Number of next-token predictions counted."""
    n_contexts: int
    """Number of contexts run."""
    per_context: dict[str, list[float]] | None = None
    """Summed CE per context (the same predictions counted in each) under "clean", "spliced", "zero" and "mean":
    what the bootstrap intervals resample."""

    def interval(self, ablation: str = "zero") -> tuple[float, float]:
        """95 % bootstrap interval over contexts of the loss recovered against `ablation` ("zero" or "mean")."""
        if not self.per_context:
            return math.nan, math.nan
        pc = self.per_context
        return M.bootstrap_recovered_interval(pc["clean"], pc["spliced"], pc[ablation])

    @property
    def recovered_zero(self) -> float:
        """(L_zero - L_spliced) / (L_zero - L_clean)."""
        return M.fraction_recovered(self.clean, self.spliced, self.zero)

    @property
    def recovered_mean(self) -> float:
        """(L_mean - L_spliced) / (L_mean - L_clean)."""
        return M.fraction_recovered(self.clean, self.spliced, self.mean)

    def as_dict(self) -> dict:
        """The figures of a report row, the intervals as recovered_{zero,mean}_{lo,hi}."""
        (z_lo, z_hi), (m_lo, m_hi) = self.interval("zero"), self.interval("mean")
        return {"ce_clean": self.clean, "ce_spliced": self.spliced, "ce_zero": self.zero, "ce_mean": self.mean,
                "recovered_zero": self.recovered_zero, "recovered_zero_lo": z_lo, "recovered_zero_hi": z_hi,
                "recovered_mean": self.recovered_mean, "recovered_mean_lo": m_lo, "recovered_mean_hi": m_hi,
                "kl": self.kl, "n_predictions": self.n_predictions, "n_contexts": self.n_contexts}


def replace_from(first_position: int, new_BTD: Callable[[torch.Tensor], torch.Tensor]):
    """fn for patch_output: positions >= first_position come from new_BTD(t), earlier ones stay as they were."""

    def fn(t_BTD: torch.Tensor) -> torch.Tensor:
        new = new_BTD(t_BTD).to(dtype=t_BTD.dtype, device=t_BTD.device)
        if first_position == 0:
            return new
        out = t_BTD.clone()
        out[:, first_position:] = new[:, first_position:]
        return out

    return fn


def _apply(reconstruct: Reconstruct, src_BTD: torch.Tensor, d_out: int) -> torch.Tensor:
    B, T, D = src_BTD.shape
    return reconstruct(src_BTD.reshape(B * T, D)).reshape(B, T, d_out)


@torch.no_grad()
def model_logits(model: torch.nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids_BT, use_cache=False).logits


@torch.no_grad()
def splice_losses_many(
    model: torch.nn.Module,
    ids_CT: torch.Tensor,
    hook_out: HookPoint,
    reconstructions: dict[str, tuple[Reconstruct, HookPoint | None]],
    mean_D: torch.Tensor,
    first_position: int = 0,
    batch_size: int = 8,
    on_batch: Callable[[int], object] | None = None,
) -> dict[str, SpliceLosses]:
    """`splice_losses` for several reconstructions of the same hook on the same contexts: {label: (reconstruct,
    hook_in)} -> {label: SpliceLosses}. Per batch of contexts the clean, zero- and mean-ablated forwards run once and
    each reconstruction adds one spliced forward (n + 3 forwards instead of 4n). `on_batch(n)` is called after each
    batch of n contexts (progress)."""
    device = next(model.parameters()).device
    base: dict[str, list[float]] = {"clean": [], "zero": [], "mean": []}  # per context
    spliced_C: dict[str, list[float]] = {label: [] for label in reconstructions}
    kl_sum = {label: 0.0 for label in reconstructions}
    count = 0
    for c0 in range(0, ids_CT.shape[0], batch_size):
        ids = ids_CT[c0 : c0 + batch_size].to(device=device, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        mask[:, first_position:] = True

        clean = model_logits(model, ids)
        base["clean"] += ce_per_context(clean, ids, mask)
        ref = M.CleanReference(clean, ids, mask)
        del clean
        count += ref.count
        with patch_output(model, hook_out, replace_from(first_position, torch.zeros_like)):
            base["zero"] += ce_per_context(model_logits(model, ids), ids, mask)
        with patch_output(model, hook_out,
                          replace_from(first_position, lambda t: mean_D.to(t.device, t.dtype).expand_as(t))):
            base["mean"] += ce_per_context(model_logits(model, ids), ids, mask)

        for label, (reconstruct, hook_in) in reconstructions.items():
            spliced = _spliced_logits(model, ids, hook_out, reconstruct, hook_in, first_position)
            spliced_C[label] += ce_per_context(spliced, ids, mask)
            kl_sum[label] += ref.compare(spliced)[1]
        if on_batch is not None:
            on_batch(ids.shape[0])

    n = max(count, 1)
    mean_of = {k: sum(v) / n for k, v in base.items()}
    return {label: SpliceLosses(clean=mean_of["clean"], spliced=sum(spliced_C[label]) / n, zero=mean_of["zero"],
                                mean=mean_of["mean"], kl=kl_sum[label] / n, n_predictions=count,
                                n_contexts=int(ids_CT.shape[0]), per_context={**base, "spliced": spliced_C[label]})
            for label in reconstructions}


def ce_per_context(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> list[float]:
    """Summed next-token CE of each context of the batch (`metrics.next_token_ce` row by row)."""
    return [M.next_token_ce(logits_BTV[b : b + 1], ids_BT[b : b + 1], mask_BT[b : b + 1])[0]
            for b in range(ids_BT.shape[0])]


def _spliced_logits(model, ids, hook_out: HookPoint, reconstruct: Reconstruct, hook_in: HookPoint | None,
                    first_position: int) -> torch.Tensor:
    """Logits with hook_out's tensor replaced by the reconstruction (of the tensor at hook_in for a transcoder)."""
    with spliced(model, hook_out, reconstruct, hook_in, first_position):
        return model_logits(model, ids)


@contextlib.contextmanager
def spliced(model: torch.nn.Module, hook_out: HookPoint, reconstruct: Reconstruct, hook_in: HookPoint | None = None,
            first_position: int = 0) -> Iterator[None]:
    """Within the block, every forward of `model` runs with hook_out's tensor replaced by the reconstruction (of the
    tensor at hook_in for a transcoder) at positions >= first_position: the splice every loss figure here uses, and
    `saecache.splice` (the Python API) too."""
    if hook_in is not None and (hook_in.module, hook_in.io) != (hook_out.module, hook_out.io):
        seen: dict[str, torch.Tensor] = {}

        def record(t: torch.Tensor) -> torch.Tensor:
            seen.setdefault("x", t)  # a module called several times in one forward: its first call
            return t

        fresh = model.register_forward_pre_hook(lambda *_: seen.clear())  # each forward captures anew
        try:
            with patch_output(model, hook_in, record), patch_output(
                model, hook_out, replace_from(first_position, lambda t: _apply(reconstruct, seen["x"], t.shape[-1]))
            ):
                yield
        finally:
            fresh.remove()
        return
    with patch_output(model, hook_out, replace_from(first_position, lambda t: _apply(reconstruct, t, t.shape[-1]))):
        yield


def splice_losses(
    model: torch.nn.Module,
    ids_CT: torch.Tensor,
    hook_out: HookPoint,
    reconstruct: Reconstruct,
    mean_D: torch.Tensor,
    hook_in: HookPoint | None = None,
    first_position: int = 0,
    batch_size: int = 8,
) -> SpliceLosses:
    """Clean / spliced / zero / mean-ablated CE and KL over contexts `ids_CT` [C, T] (see the module docstring).

    `hook_in` is None for an ordinary SAE (input = the replaced tensor itself) or the transcoder's input hook.
    `mean_D` is the mean of `hook_out`'s activation (the mean-ablation value).
    """
    return splice_losses_many(model, ids_CT, hook_out, {"": (reconstruct, hook_in)}, mean_D, first_position,
                              batch_size)[""]
