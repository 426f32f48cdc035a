"""The seed's resampling question (issue 21 §2): does resampling dead latents late in a run make the spike of
high-frequency features the seed's authors saw, and what removes it?

ReLU + L1 SAEs (saecache's defaults: lr 1e-3, coeff 0.1 for E‖x‖² = 1 inputs) with Anthropic resampling, on one
hook of a store, every setting on the same rows in the same order (saecache's seed-0 data order):

- `none`: no resampling (the control); `none-no-warmup`: the same with `--warmup-steps 0`, the control of the
  settings without re-warm;
- `late`: resampling every 30 % of the run, so at 30, 60 and 90 % (the seed's every 30,000 of 100,000 steps);
- `early`: resampling every third of the run, so at 33 and 67 % and none in the last 20 % (saecache resamples at
  the multiples of --resample-steps before the last step; a period in [T/3, 0.4 T) is the only way to stop before
  the last 20 % without a new option);
- `late-no-rewarm`, `early-no-rewarm`: the same without the LR re-warm. saecache re-warms the LR after each resample
  by restarting its warm-up (`optim.lr_factor`), so "no re-warm" is `--warmup 0`: no initial warm-up either (the
  gradient clip, 0.02, bounds the first steps).

Each run is saecache's own trainer (`run_training`), so it resumes from its checkpoints after a kill; its checkpoint
right after the last resample tells which latents were resampled then (their encoder bias is exactly 0 there and
nowhere else). Measured on the store's held-out rows (BOS rows left out): each latent's firing frequency, FVE, L0,
dead latents (never fire), the count above frequency 0.038 (the seed's pruning threshold) and how many of those were
resampled at the last resample. Each setting's row goes into the results json as soon as it is measured, and a rerun
skips the settings already there.

Usage: python -m bench.bench_resample [--store saecache-demo/bench-long/store.zarr] [--hook mlp_out.1]
       [--width 4096] [--tokens 2048000] [--batch 1024] [--settings none late early ...] [--scratch DIR]
       [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_quality import heldout_rows

THRESHOLD = 0.038  # the seed's pruning threshold on feature frequency
# name -> (resample period as a fraction of the run, None: never; LR warm-up at the start and re-warm after each
# resample, or no warm-up at all)
SETTINGS = {
    "none": (None, True),
    "none-no-warmup": (None, False),
    "late": (0.3, True),
    "early": (1 / 3, True),
    "late-no-rewarm": (0.3, False),
    "early-no-rewarm": (1 / 3, False),
}


def schedule(name: str, steps: int) -> dict:
    """TrainConfig fields of a setting for a run of `steps` steps, and the steps it resamples at."""
    period, warm = SETTINGS[name]
    fields = {} if warm else {"warmup_steps": 0}
    if period is None:
        return {"fields": fields, "resample_at": []}
    every = math.ceil(period * steps)
    return {"fields": {"resample_steps": every, **fields}, "resample_at": list(range(every, steps, every))}


def train(store: str, hook: str, name: str, width: int, tokens: int, batch: int, coeff: float | None,
          lr: float | None, scratch: Path) -> str:
    """Train (or resume, or find finished) one setting's SAE; returns its run dir."""
    from saecache.train.config import TrainConfig
    from saecache.train.trainer import run_training

    steps = -(-tokens // batch)
    plan = schedule(name, steps)
    every = plan["fields"].get("resample_steps", 250)
    cfg = TrainConfig(stores=[store], out=str(scratch / name), seed=0, tokens=tokens, batch_size=batch,
                      saes=[{"hook_in": hook, "arch": "relu", "width": width, "name": "sae",
                             **({} if coeff is None else {"coeff": coeff}), **({} if lr is None else {"lr": lr})}],
                      progress=False,
                      checkpoint_every=every, keep_checkpoints=steps // every + 2, **plan["fields"])
    (run_dir,) = run_training(cfg)
    return run_dir


def resampled_at(run_dir: str, step: int) -> np.ndarray:
    """Mask of the latents resampled at `step`: the checkpoint taken right after it has their encoder bias at 0."""
    from saecache.train.rundir import load_checkpoint

    model, _, _ = load_checkpoint(run_dir, step)
    return (model["b_enc_F"] == 0).numpy()


def measure(run_dir: str, x_held: np.ndarray, resampled: np.ndarray | None) -> dict:
    """Held-out FVE, L0, dead count, firing frequencies and the count above THRESHOLD of a finished run."""
    from saecache.train.monitor import fraction_variance_explained
    from saecache.train.rundir import load_run

    sae, _ = load_run(run_dir)
    sae.eval()
    counts, x_hat = np.zeros(sae.cfg.width, dtype=np.int64), []
    with torch.no_grad():
        for i in range(0, len(x_held), 4096):
            x = torch.from_numpy(np.asarray(x_held[i:i + 4096], dtype=np.float32))
            f = sae.encode(x)
            counts += (f != 0).sum(0).numpy()
            x_hat.append(sae.decode(f).numpy())
    freq = counts / len(x_held)
    high = freq > THRESHOLD
    out = {"fve": round(fraction_variance_explained(torch.from_numpy(np.asarray(x_held, dtype=np.float32)),
                                                    torch.from_numpy(np.concatenate(x_hat))), 5),
           "l0": round(float(counts.sum()) / len(x_held), 2), "dead": int((counts == 0).sum()),
           "above_threshold": int(high.sum()), "freq": [float(f"{v:.4g}") for v in freq]}
    if resampled is not None:
        out["resampled_last"] = int(resampled.sum())
        out["above_threshold_resampled_last"] = int((high & resampled).sum())
        out["resampled_last_median_freq"] = float(f"{np.median(freq[resampled]):.4g}") if resampled.any() else None
    return out


def plot(result: dict, path: Path) -> None:
    """One panel per setting: histogram of log10 feature frequency (dead latents in the leftmost bar), the seed's
    threshold as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.8 * len(rows) + 0.6), sharex=True, squeeze=False)
    floor = math.log10(0.5 / result["heldout_rows"])
    bins = np.linspace(floor, 0, 61)
    for ax, r in zip(axes[:, 0], rows):
        lf = np.log10(np.maximum(np.asarray(r["freq"]), 10 ** floor))
        ax.hist(lf, bins=bins, color="tab:blue")
        ax.axvline(math.log10(THRESHOLD), color="tab:red", lw=1)
        ax.set_ylabel("latents")
        ax.set_title(f"{r['setting']}: {r['above_threshold']} above {THRESHOLD}, {r['dead']} dead, "
                     f"FVE {r['fve']:.4f}", fontsize=9)
    axes[-1, 0].set_xlabel("log10 firing frequency on held-out rows (leftmost bar: never fires)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _warmup(row: dict) -> str:
    if not row["rewarm"]:
        return "none"
    return "at the start and after each resample" if row["resample_at"] else "at the start"


def write_md(result: dict, path: Path) -> None:
    lines = ["# Resampling and the high-frequency spike (bench/bench_resample.py, issue 21 §2)", "",
             f"Store {result['store']} ({result['store_rows']:,} rows), hook {result['hook']} (d={result['d']}); "
             f"ReLU+L1 at saecache's defaults, F={result['width']}, {result['steps']} steps of {result['batch']} "
             f"rows ({result['tokens']:,} tokens, BOS rows left out), seed 0, the same rows in the same order for "
             f"every setting. Measured on {result['heldout_rows']:,} held-out rows. Command: "
             f"`python -m bench.bench_resample {result['command']}`.", "",
             "| setting | resamples at step | LR warm-up | FVE | L0 | dead | above 0.038 | resampled at the last "
             "resample | of those above 0.038 | their median freq | train s |", "|---" * 11 + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {', '.join(map(str, r['resample_at'])) or '–'} | "
                     f"{_warmup(r)} | {r['fve']:.4f} | {r['l0']:.1f} | {r['dead']} | "
                     f"{r['above_threshold']} | {r.get('resampled_last', '–')} | "
                     f"{r.get('above_threshold_resampled_last', '–')} | "
                     f"{r.get('resampled_last_median_freq', '–')} | "
                     f"{r['train_s']} |")
    lines += ["", "Histograms: resample.png (one panel per setting, the red line at 0.038)."]
    if result.get("conclusion"):
        lines += ["", result["conclusion"]]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="saecache-demo/bench-long/store.zarr")
    ap.add_argument("--hook", default="mlp_out.1")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=2_048_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--coeff", type=float, default=None, help="L1 coefficient; unset: saecache's relu default")
    ap.add_argument("--lr", type=float, default=None, help="learning rate; unset: saecache's relu default")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    ap.add_argument("--scratch", default="saecache-demo/bench-resample", help="run dirs (resumable)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--conclusion", default="", help="a closing paragraph for the markdown")
    args = ap.parse_args(argv)
    from saecache.harvest.store import Store

    if not Path(args.store).exists():
        print(f"bench_resample: no store at {args.store}; harvest it first (bench/bench_long.py's docstring) or pass "
              "--store", file=sys.stderr)
        return None
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"bench_resample: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    torch.set_num_threads(1)
    out, scratch = Path(args.out), Path(args.scratch)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "resample.json"
    x_held = heldout_rows(args.store, args.hook)
    steps = -(-args.tokens // args.batch)
    result = {"store": args.store, "store_rows": Store.open(args.store).geometry.n_rows, "hook": args.hook,
              "d": int(x_held.shape[1]), "width": args.width, "tokens": steps * args.batch, "steps": steps,
              "batch": args.batch, "coeff": args.coeff, "lr": args.lr, "heldout_rows": len(x_held),
              "threshold": THRESHOLD, "threads": 1,
              "command": " ".join(a for a in (sys.argv[1:] if argv is None else argv)
                                  if a not in ("--conclusion", args.conclusion)), "rows": []}
    if res_path.exists():  # resume: keep the settings measured on the same run shape
        old = json.loads(res_path.read_text())
        if all(old.get(k) == result[k] for k in ("store", "hook", "width", "tokens", "batch", "coeff", "lr")):
            result["rows"] = old["rows"]
    result["conclusion"] = args.conclusion or (json.loads(res_path.read_text()).get("conclusion", "")
                                               if res_path.exists() else "")
    done = {r["setting"] for r in result["rows"]}
    for name in args.settings:
        if name in done:
            continue
        plan = schedule(name, steps)
        t0 = time.perf_counter()
        run_dir = train(args.store, args.hook, name, args.width, steps * args.batch, args.batch, args.coeff,
                        args.lr, scratch)
        seconds = time.perf_counter() - t0
        last = plan["resample_at"][-1] if plan["resample_at"] else None
        row = {"setting": name, "resample_at": plan["resample_at"], "rewarm": SETTINGS[name][1],
               **measure(run_dir, x_held, None if last is None else resampled_at(run_dir, last)),
               "train_s": round(seconds), "loadavg": round(os.getloadavg()[0], 2)}
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "freq"}), flush=True)
        tmp = res_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(res_path)
    order = list(SETTINGS)
    result["rows"].sort(key=lambda r: order.index(r["setting"]))
    res_path.write_text(json.dumps(result) + "\n")
    write_md(result, out / "resample.md")
    plot(result, out / "resample.png")
    return result


if __name__ == "__main__":
    main()
