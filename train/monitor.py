"""Training metrics as small pure functions, plus the progress bar and the optional TensorBoard / W&B backends.

`metrics.jsonl` (one record per SAE per logged step) is always written by the trainer; the backends here are extra
and imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from tqdm import tqdm

from saecache.errors import ConfigError


def fraction_variance_explained(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """FVE, saecache's one definition (training log, progress bar, evaluation report): 1 - Σ_d Var_B(x - x̂) /
    Σ_d Var_B(x), variances over the rows (population form; the factor cancels). The residual is centred as the
    target is, as dictionary_learning and SAEBench do: a constant offset shows in the relative reconstruction bias
    instead. NaN when the target has no variance."""
    x, e = x_BD.double(), x_BD.double() - x_hat_BD.double()
    var_x = x.var(0, unbiased=False).sum()
    return 1.0 - float(e.var(0, unbiased=False).sum() / var_x) if var_x > 0 else float("nan")


def step_metrics(out, target_BD: torch.Tensor, dead_F: torch.Tensor, step: int, batch: int) -> dict:
    """One metrics.jsonl record from a LossOutput (normalised space); dead_F marks features dead over the window."""
    rec = {"step": step, "tokens": step * batch, "loss": float(out.total.detach()), "recon": float(out.recon.detach()),
           "l0": float(out.l0), "fve": fraction_variance_explained(target_BD, out.x_hat_BD.detach()),
           "dead_frac": float(dead_F.float().mean())}
    for name in ("sparsity", "aux"):
        v = getattr(out, name, None)
        if v is not None:
            rec[name] = float(v.detach()) if torch.is_tensor(v) else float(v)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def check_backend(log: str) -> None:
    """Fail early (before any run dir is written) when the requested metrics backend is not installed."""
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(log)
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(f"--log {log} needs the {module} package: pip install {module} (or use --log none)")


class Logger:
    """tqdm progress bar (tokens/s, L0, FVE, dead %) and the optional tensorboard/wandb backends; rank 0 only."""

    def __init__(self, cfg, names: list[str], start: int, total: int, enabled: bool = True):
        self.names, self.enabled, self.bar, self.tb, self.wandb = names, enabled, None, None, None
        if not enabled:
            return
        if cfg.progress:
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="train")
        if cfg.log == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("log=tensorboard needs tensorboard: pip install tensorboard") from e
            self.tb = {n: SummaryWriter(f"{cfg.out}/{n}/tensorboard") for n in names}
        elif cfg.log == "wandb":
            try:
                import wandb  # pyright: ignore[reportMissingImports]  (optional: not in any extra)
            except ImportError as e:
                raise ImportError("log=wandb needs wandb: pip install wandb") from e
            self.wandb = wandb.init(project=cfg.wandb_project, config=cfg.to_dict(), resume="allow")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, recs: list[dict], tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None and recs:
            r = recs[0]
            self.bar.set_postfix({"tok/s": f"{tokens_per_s:,.0f}", "L0": f"{r['l0']:.1f}",
                                  "FVE": f"{r['fve'] if r['fve'] is not None else float('nan'):.3f}",
                                  "dead": f"{100 * r['dead_frac']:.1f}%"},
                                 refresh=False)
        for n, r in zip(self.names, recs):
            nums = {k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}
            if self.tb is not None:
                for k, v in nums.items():
                    self.tb[n].add_scalar(k, v, step)
            if self.wandb is not None:
                self.wandb.log({f"{n}/{k}": v for k, v in nums.items()}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for w in (self.tb or {}).values():
            w.close()
        if self.wandb is not None:
            self.wandb.finish()
