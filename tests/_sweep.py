"""A small sweep on the tiny store and its evaluation, shared by the frontier and report.html tests: on mlp_out.0,
TopK at two widths (k = 2, 4, 8 at width 64; k = 4 at width 32) and ReLU+L1 at two coefficients; on mlp_out.1 one
TopK SAE. Trained from one read of the store for a few steps; evaluated once per test session (`sweep_eval`)."""

from __future__ import annotations

import functools
from pathlib import Path

HELDOUT = 0.25
N_CONTEXTS = 4
PRUNE_CURVE = (0.5, 0.2, 0.1, 0.05, 0.02)


@functools.lru_cache(maxsize=None)
def sweep_runs(root: Path, store: Path) -> dict[str, str]:
    from saecache.train.config import SAESpec, TrainConfig
    from saecache.train.trainer import run_training

    spec = lambda arch, width, hook, name, **kw: SAESpec(arch=arch, width=width, hook_in=hook, name=name, **kw)  # noqa
    saes = [spec("topk", 64, "mlp_out.0", "topk64-k2", k=2), spec("topk", 64, "mlp_out.0", "topk64-k4", k=4),
            spec("topk", 64, "mlp_out.0", "topk64-k8", k=8), spec("topk", 32, "mlp_out.0", "topk32-k4", k=4),
            spec("relu", 64, "mlp_out.0", "relu64-a", coeff=0.02), spec("relu", 64, "mlp_out.0", "relu64-b", coeff=0.2),
            spec("topk", 64, "mlp_out.1", "topk64-k4-l1", k=4)]
    cfg = TrainConfig(stores=[str(store)], out=str(root / "sweep_runs"), steps=40, batch_size=64, warmup_steps=5,
                      heldout_fraction=HELDOUT, checkpoint_every=1000, progress=False, device="cpu", saes=saes)
    return {p.rsplit("/", 1)[-1]: p for p in run_training(cfg)}


@functools.lru_cache(maxsize=None)
def sweep_eval(root: Path, store: Path) -> Path:
    """The sweep evaluated by `saecache evaluate` (the CLI, in process) into root/sweep_eval: histograms, frontier,
    feature pages, report.html."""
    from saecache.cli import main

    runs = sweep_runs(root, store)
    out = root / "sweep_eval"
    code = 0
    try:
        main(["evaluate", *runs.values(), "--store", str(store), "--out", str(out), "--n-contexts", str(N_CONTEXTS),
              "--threads", "1", "--html-features", "2", "--prune-curve", ",".join(map(str, PRUNE_CURVE))])
    except SystemExit as e:
        code = e.code
    assert code == 0, f"saecache evaluate exited {code}"
    return out
