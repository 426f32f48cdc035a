"""The cost of the TopK family's optimizer (issue 21): one training step of a TopK SAE with lazy Adam
(`optim.LazyAdam`, the default) against the same step with Adam (fused where this torch has it), alternating the two
in one process so both see the same machine, at the long bench's size (d=128, F=4096, 1024 rows) and at the seed's
(d=512, F=8192... 32768, 4096 rows). Writes bench/results/optimizer.{json,md}: per size the median seconds of the
whole step (loss, backward, optimizer) and of the optimizer step alone, and their ratios lazy / Adam.

Usage: python -m bench.bench_optimizer [--repeats 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from saecache.train.optim import make_optimizer
from saecache.train.sae import SAE, SAEConfig

SIZES = ((128, 4096, 1024), (512, 8192, 4096), (512, 32768, 4096))  # (d, F, batch rows)


def time_step(optimizer: str, d: int, width: int, batch: int) -> tuple[float, float]:
    """Seconds of one whole training step and of its optimizer step, after one warm-up step."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig("topk", d, width, k=32, optimizer=optimizer))
    sae.train()
    opt = make_optimizer(sae, 1e-3)
    x = torch.randn(batch, d)

    def step() -> float:
        out = sae.loss(x)
        opt.zero_grad()
        out.total.backward()
        t = time.perf_counter()
        opt.step()
        return time.perf_counter() - t

    step()
    t0 = time.perf_counter()
    t_opt = step()
    return time.perf_counter() - t0, t_opt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for d, width, batch in SIZES:
        times: dict[str, list[tuple[float, float]]] = {"adam": [], "lazy-adam": []}
        for _ in range(args.repeats):
            for name in times:
                times[name].append(time_step(name, d, width, batch))
        med = {n: (statistics.median(t for t, _ in v), statistics.median(o for _, o in v)) for n, v in times.items()}
        rows.append({"d": d, "width": width, "batch": batch, "step_s_adam": med["adam"][0],
                     "step_s_lazy": med["lazy-adam"][0], "opt_s_adam": med["adam"][1],
                     "opt_s_lazy": med["lazy-adam"][1], "step_ratio": med["lazy-adam"][0] / med["adam"][0],
                     "opt_ratio": med["lazy-adam"][1] / med["adam"][1]})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats, "device": "cpu"}
    (out / "optimizer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Optimizer cost: lazy Adam against Adam (bench/bench_optimizer.py)", "",
             f"One TopK (k=32) training step on CPU, {args.threads} torch thread, median of {args.repeats} "
             "alternating repeats in one process (torch " + torch.__version__ + "). Adam is torch's fused kernel; "
             "lazy Adam (`optim.LazyAdam`, the TopK family's default) is a dozen in-place passes over each "
             "parameter.", "",
             "| d | F | rows | step, Adam (s) | step, lazy (s) | ratio | optimizer, Adam (s) | optimizer, lazy (s) | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['d']} | {r['width']} | {r['batch']} | {r['step_s_adam']:.3f} | {r['step_s_lazy']:.3f} | "
                     f"{r['step_ratio']:.2f} | {r['opt_s_adam']:.3f} | {r['opt_s_lazy']:.3f} | {r['opt_ratio']:.1f} |")
    (out / "optimizer.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
