"""Optimizer, schedules (with the default learning rate and warm-ups per architecture family and run length) and the
unit-norm decoder constraint. Schedules are pure functions of the step number, so a resumed run reproduces them
exactly.

Step loop order: loss.backward() → project_decoder_grad_(sae) → clip the gradient norm (TrainConfig.grad_clip) →
optimizer.step() → renorm_decoder_(sae).
"""

from __future__ import annotations

import torch

from saecache.errors import ConfigError
from saecache.train.arch import DEAD_TOKENS_THRESHOLD, architecture

MAX_SPARSITY_WARMUP_STEPS, MAX_THRESHOLD_START_STEP = 2000, 1000


def default_lr(arch: str, width: int, k: int | None = None) -> float:
    """The learning rate of one SAE when none is given: its architecture's (`Architecture.default_lr`: the TopK
    family 1.2e-3 / sqrt(F / 2^14), relu 1e-3, gated and jumprelu 3e-4). `k` changes nothing: only the TopK family
    takes one."""
    return architecture(arch).default_lr(width)


def default_schedule(total_steps: int, batch_size: int) -> dict:
    """Warm-ups that scale with the run (the LR warm-up is each architecture's, `Architecture.max_warmup_steps`): the
    batchtopk threshold starts at a tenth of the run (at most 1000 steps, dictionary_learning's fixed value), the
    sparsity-penalty warm-up at a twentieth (at most 2000). The threshold's EMA decay averages over a tenth of the
    steps after its start (at most 1000: beta 0.999, again dictionary_learning's), so a short run's threshold
    reflects its last activations, not its first ones. AuxK's latents are dead after a hundredth of the run's rows
    without firing (at most 10M, sparsify's fixed value, reached at 1B rows): with the fixed 10M a run shorter than
    that never used AuxK at all."""
    start = min(MAX_THRESHOLD_START_STEP, total_steps // 10)
    window = max(1, min(1000, (total_steps - start) // 10))
    return {"sparsity_warmup_steps": min(MAX_SPARSITY_WARMUP_STEPS, total_steps // 20),
            "threshold_start_step": start, "threshold_beta": 1 - 1 / window if window > 1 else 0.0,
            "dead_tokens_threshold": max(1, min(DEAD_TOKENS_THRESHOLD, total_steps * batch_size // 100))}


def make_optimizer(sae: torch.nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """The module's optimizer (`cfg.optimizer`) over every parameter: `LazyAdam`, or Adam, whose fused kernel is used
    where this torch has it for the device (deterministic, and faster than the per-tensor loop)."""
    params = list(sae.parameters())
    if getattr(sae.cfg, "optimizer", "adam") == "lazy-adam":
        return LazyAdam(params, lr=lr, betas=betas)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas)


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay_start: int | None = None,
              resample_steps: int | None = None) -> float:
    """Multiplier of the base LR at 0-based `step`: linear warmup over `warmup_steps` (step 0 already gets 1/warmup),
    then 1; with `decay_start`, linear decay to 0 at `total_steps` (decay_start = total_steps: none, as a
    resolved `SAESpec.decay_start` says it). With `resample_steps`, the warmup restarts after
    every resample (at multiples of resample_steps), re-warming the LR for the reinitialised neurons. The trainer
    passes resample_steps only for the SAEs that resample (`SAESpec.resample`); the others get the plain schedule."""
    if decay_start is not None and decay_start < total_steps and resample_steps is not None:
        raise ConfigError("LR decay and periodic resampling cannot be combined (choose decay_start or resample_steps)")
    if decay_start is not None and not 0 <= decay_start <= total_steps:
        raise ConfigError(f"decay_start must be in [0, total_steps={total_steps}], got {decay_start}")
    phase = step % resample_steps if resample_steps else step
    factor = min(1.0, (phase + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay_start is not None and step >= decay_start:
        span = total_steps - decay_start
        factor *= max(0.0, (total_steps - step) / span) if span > 0 else 0.0
    return factor


def sparsity_warmup_factor(step: int, sparsity_warmup_steps: int) -> float:
    """Multiplier of the sparsity coefficient: linear 0 → 1 over `sparsity_warmup_steps` (1 when that is 0)."""
    if sparsity_warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / sparsity_warmup_steps)


def project_decoder_grad_(sae) -> None:
    """Remove from each decoder row's gradient its component along the row (call before the optimizer step); the
    module's own rule (`SAE.project_decoder_grad_`, `CrossLayer.project_decoder_grad_`)."""
    sae.project_decoder_grad_()


def renorm_decoder_(sae) -> None:
    """Rescale each decoder row to unit norm (call after the optimizer step); the module's own rule."""
    sae.renorm_decoder_()


class LazyAdam(torch.optim.Optimizer):
    """Adam whose moments, bias corrections and parameters move only where the gradient is non-zero (the TopK
    family's default, `SAEConfig.optimizer`); with a gradient non-zero everywhere it is Adam.

    Why: a latent that fires in none of a batch's rows gets an exactly zero gradient (encoder column, bias, decoder
    row). Plain Adam still steps it: its first moment decays (β1 0.9) while its second moment barely does (β2 0.999),
    so after each batch a rarely firing latent fires in, its momentum moves it on for ~10 more steps, about
    lr / sqrt(p) in all where p is the share of steps it fires in. At TopK's rates that throws rarely firing latents
    below 0 on every row, where nothing (AuxK included) reaches them: on the 20M-token bench 10 % of latents ended
    dead (bench/results/long.md). Here each of a latent's updates is about lr, as for a frequent one: the moments and
    their bias corrections count the latent's own updates (`beta1_power`, `beta2_power`: β^n for its n updates), not the
    run's steps."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 (the Optimizer interface; no closure is used)
        """Per element with g ≠ 0: m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², b1 ← β1·b1, b2 ← β2·b2 (b1, b2: β^n for
        its n updates so far, starting at 1), p ← p − lr · (m / (1 − b1)) / (sqrt(v / (1 − b2)) + eps); elements with
        g = 0 keep all four and their value. In place, without a power or a select per element."""
        for group in self.param_groups:
            (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, st = p.grad, self.state[p]
                if not st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                    st["beta1_power"], st["beta2_power"] = torch.ones_like(p), torch.ones_like(p)
                m, v, b1, b2 = st["exp_avg"], st["exp_avg_sq"], st["beta1_power"], st["beta2_power"]
                live = (g != 0).to(p.dtype)
                w = live * (1 - beta1)
                m.lerp_(g, w)  # m + w·(g − m): β1·m + (1−β1)·g where live, m elsewhere
                b1.mul_(w.neg_().add_(1))  # × β1 where live, × 1 elsewhere
                w = live * (1 - beta2)
                v.lerp_(g * g, w)
                b2.mul_(w.neg_().add_(1))
                # never-updated elements have m = v = 0 and b = 1: clamping 1 − b keeps their update 0, not 0/0
                denom = (v / (1 - b2).clamp_(min=1e-30)).sqrt_().add_(eps)
                p.addcdiv_(m / (1 - b1).clamp_(min=1e-30) * live, denom, value=-lr)
        return None
