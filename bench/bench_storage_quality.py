"""What a compact store costs an SAE (issue 13): per storage format, bytes per value, the stored values' error, and
the quality of SAEs trained on it; then how many unique tokens a cache needs for a fixed training budget.

On the demo model (`make demo`'s `saecache-demo/`: 3 layers, d=128), one hook (default mlp_out.1):
1. harvest the hook once in float32 (the exact activations), and write the same rows in float16, bfloat16, int8 and
   nf4 with the harvest's own encoder (`quant.encode`, row by row: the same bytes a direct harvest writes);
2. per format, train TopK (k=32) and ReLU+L1 SAEs (F=1024) together from the store, each in init-seed replicas fed
   the same batches (`TrainConfig.seeds`); the data order is the same in every format (the stores share the seed);
3. score every SAE on the EXACT float32 held-out rows (the last 10 % of contexts, never trained on): FVE, L0, dead %,
   and % loss recovered spliced into the model on held-out contexts (zero-ablation baseline); report each as a delta
   to the float32 store's SAE of the same seed, with the float32 seed-to-seed spread beside it;
4. the loader's rows/s per format, as a ratio to the float16 store, in interleaved rounds;
5. cache size: a fixed budget of training rows (one epoch of the float32 store's training part) drawn from caches of
   1/1, 1/2, 1/4, 1/8 of those unique rows (1, 2, 4, 8 epochs), TopK only, scored the same way.

Usage: python -m bench.bench_storage_quality [--demo saecache-demo] [--tokens 200000] [--seeds 2] [--out DIR]
Sized for a shared 2-core machine (~20-30 CPU-minutes); the sizes used are written into the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FORMATS = ("float32", "float16", "bfloat16", "int8", "nf4")
HELDOUT = 0.1


def harvest_reference(args, root: Path) -> str:
    from saecache.harvest.config import HarvestConfig
    from saecache.harvest.run import run_harvest

    out = str(root / "float32.zarr")
    cpc = max(1, min(4096 // 128, args.tokens // 128 // 64))  # >= 64 inner chunks, as the demo harvests
    run_harvest(HarvestConfig(out=out, model=args.model, dataset=args.dataset, hooks=(args.hook,), ctx_len=128,
                              tokens=args.tokens, dtype="float32", device="cpu", seed=0, ctx_per_chunk=cpc),
                progress=False)
    return out


def transcode(src_url: str, dst: str, fmt: str, n_contexts: int | None = None) -> str:
    """The rows of `src_url` (float32) for contexts [0, n_contexts) as a store in `fmt`, through the writer."""
    from saecache.harvest import quant
    from saecache.harvest.store import Geometry, Store
    from saecache.harvest.store.write import StoreWriter

    src = Store.open(src_url)
    header = json.loads(json.dumps(src.header))
    header["storage"]["dtype"] = header["config"]["dtype"] = fmt
    if n_contexts is not None:
        g = Geometry.from_header({**header, "n_contexts": n_contexts})
        header.update(n_contexts=n_contexts, n_rows=g.n_rows, n_shards=g.n_shards)
    w = StoreWriter(dst, header)
    g, T = w.geometry, header["ctx_len"]
    for s in range(g.n_shards):
        r0, r1 = src.geometry.shard_row_range(s)
        meta = src.read_meta(r0, r1)
        order = np.argsort(meta["context"].astype(np.int64) * T + meta["position"])  # back to unpermuted order
        c0, c1 = g.shard_contexts(s)
        keep = order[meta["context"][order] < c1]
        x = torch.from_numpy(src.read_acts(header_hook(header), r0, r1)[keep])
        stored = quant.encode(x, fmt)
        err = quant.error_sums(x, stored, fmt).tolist()
        w.write_shard(s, {header_hook(header): quant.to_numpy(stored, fmt)}, src.contexts(c0, c1),
                      {header_hook(header): (err[0], err[1])})
    w.finalize_if_complete()
    return dst


def header_hook(header: dict) -> str:
    (hook,) = header["hooks"]
    return hook


def exact_heldout(ref, hook: str, max_rows: int) -> torch.Tensor:
    from saecache.harvest.split import Split

    return torch.cat([b[hook] for b in Split(HELDOUT).heldout_batches(ref, [hook], max_rows=max_rows)])


def train(args, url: str, out: Path, saes: list[dict], heldout: float, total_rows: int) -> dict[tuple, str]:
    """Every SAE of `saes` in `args.seeds` replicas (init seeds; same batches, TrainConfig.seeds), the project's
    default learning rates and schedules; returns {(name, replica): run dir}."""
    from saecache.train.config import TrainConfig
    from saecache.train.trainer import run_training

    steps = max(1, total_rows // args.batch)
    cfg = TrainConfig(stores=[url], out=str(out), saes=saes, seed=0, seeds=args.seeds, batch_size=args.batch,
                      steps=steps, heldout_fraction=heldout, checkpoint_every=steps, device="cpu", progress=False,
                      log_every=max(1, steps // 4), reader_threads=1)
    dirs = run_training(cfg)
    out = {}
    for d in dirs:
        name, _, r = Path(d).name.rpartition("-seed") if args.seeds > 1 else (Path(d).name, "", "0")
        out[(name, int(r))] = d
    return out


def score(run_dirs: dict[str, str], x_ND: torch.Tensor, ref, model, ids_CT: torch.Tensor, hook: str) -> dict:
    """Per run: FVE, L0, dead % on the exact held-out rows; % loss recovered spliced on the held-out contexts."""
    from saecache.evaluate import metrics as M
    from saecache.evaluate.runner import hook_point
    from saecache.evaluate.splice import splice_losses_many
    from saecache.train.rundir import load_run

    out, recons = {}, {}
    for key, run_dir in run_dirs.items():
        sae, _ = load_run(run_dir)
        acc = M.ReconAccumulator(sae.cfg.width)
        with torch.no_grad():
            for i in range(0, len(x_ND), 4096):
                x = x_ND[i:i + 4096]
                f = sae.encode(x)
                acc.update(x, sae.decode(f), f)
        r = acc.result()
        out[key] = {"fve": r["fve"], "l0": r["l0"], "dead_pct": 100 * (1 - r["frac_alive"])}
        recons[key] = (lambda s: (lambda x: s.forward(x.float())))(sae), None
    mean_D = torch.as_tensor(ref.stats(hook)["mean"], dtype=torch.float32)
    with torch.no_grad():
        losses = splice_losses_many(model, ids_CT, hook_point(ref, hook), recons, mean_D,
                                    first_position=ref.header["storage"]["first_position"], batch_size=8)
    for key, sl in losses.items():
        out[key]["pct_loss_recovered"] = 100 * M.fraction_recovered(sl.clean, sl.spliced, sl.zero)
        out[key]["pct_loss_recovered_ci95"] = [100 * v for v in sl.interval("zero")]
        out[key]["ce_clean"], out[key]["ce_zero"] = sl.clean, sl.zero
        out[key]["_per_context"] = sl.per_context
    return out


def paired_delta_ci(a: dict, b: dict, n_boot: int = 2000) -> list[float]:
    """95 % bootstrap interval over contexts of %LR(a) - %LR(b), both spliced on the same contexts (paired)."""
    pa, pb = a["_per_context"], b["_per_context"]
    clean, zero = np.asarray(pa["clean"]), np.asarray(pa["zero"])
    sa, sb = np.asarray(pa["spliced"]), np.asarray(pb["spliced"])
    idx = np.random.default_rng(0).integers(0, len(clean), (n_boot, len(clean)))
    c, z = clean[idx].sum(1), zero[idx].sum(1)
    d = 100 * ((z - sa[idx].sum(1)) - (z - sb[idx].sum(1))) / (z - c)
    return [float(v) for v in np.percentile(d, [2.5, 97.5])]


def stored_fvu(url: str, ref, hook: str) -> float:
    """Σ‖x - x̂‖² / Σ‖x - mean‖² of every stored row against the exact float32 rows."""
    from saecache.harvest.store import Store

    st, n = Store.open(url), ref.geometry.n_rows
    x = ref.read_acts(hook, 0, n).astype(np.float64)
    xh = st.read_acts_torch(hook, 0, n).double().numpy()
    return float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def loader_rates(urls: dict[str, str], hook: str, rounds: int) -> dict[str, list[float]]:
    """Rows/s of one epoch of float32 batches per store, rounds interleaved across formats."""
    from saecache.train.loader import Loader, open_stores

    rates: dict[str, list[float]] = {f: [] for f in urls}
    for r in range(rounds):
        for fmt, url in urls.items():
            loader = Loader(open_stores([url], [hook]), [hook], batch_size=4096, seed=r, heldout_fraction=HELDOUT)
            next(loader)  # the first window fill is not steady state
            n, t0 = loader.batches_per_epoch(0), time.perf_counter()
            for _ in range(n):
                next(loader)
            rates[fmt].append(n * 4096 / (time.perf_counter() - t0))
            loader.close()
    return rates


def spread(values: list[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else float("nan")


def delta_rows(scores: dict, seeds: list[int], arch: str, formats) -> list[dict]:
    """Per format: mean over seeds of (metric - float32 metric of the same seed), and the float32 seed spread."""
    rows = []
    for fmt in formats:
        row = {"format": fmt, "arch": arch}
        for m in ("fve", "l0", "dead_pct", "pct_loss_recovered"):
            vals = [scores[(fmt, s, arch)][m] for s in seeds]
            refs = [scores[("float32", s, arch)][m] for s in seeds]
            row[m] = statistics.mean(vals)
            row[f"d_{m}"] = statistics.mean(v - r for v, r in zip(vals, refs))
            row[f"spread_{m}"] = spread(refs)
        row["d_pct_loss_recovered_ci95_seed0"] = paired_delta_ci(scores[(fmt, seeds[0], arch)],
                                                                 scores[("float32", seeds[0], arch)])
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="saecache-demo", help="`saecache demo` output dir (its model/ and corpus/)")
    p.add_argument("--model"), p.add_argument("--dataset")
    p.add_argument("--hook", default="mlp_out.1")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--seeds", type=int, default=2, help="init-seed replicas of every SAE (same batches)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1", type=float, default=0.06)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--eval-rows", type=int, default=32768)
    p.add_argument("--eval-contexts", type=int, default=64)
    p.add_argument("--loader-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-cache-study", action="store_true")
    p.add_argument("--work", default=None, help="scratch dir for stores and runs (default: a temp dir)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    args.model = args.model or str(Path(args.demo) / "model")
    args.dataset = args.dataset or str(Path(args.demo) / "corpus" / "train.jsonl.zst")
    if not Path(args.model).exists():
        raise SystemExit(f"no demo model at {args.model}: run `make demo` first (or pass --model/--dataset)")
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    from saecache.harvest.inspect import store_size
    from saecache.harvest.model import load_model
    from saecache.harvest.store import Store
    from saecache.harvest.split import heldout_cutoff

    t_start = time.time()
    root = Path(args.work or tempfile.mkdtemp(prefix="bench_storage_quality-"))
    root.mkdir(parents=True, exist_ok=True)
    ref_url = harvest_reference(args, root)
    urls = {"float32": ref_url}
    for fmt in FORMATS[1:]:
        urls[fmt] = transcode(ref_url, str(root / f"{fmt}.zarr"), fmt)
    ref = Store.open(ref_url)
    hook = args.hook
    x_ND = exact_heldout(ref, hook, args.eval_rows)
    model, _, _ = load_model(args.model, device="cpu")
    c0 = heldout_cutoff(ref, HELDOUT)
    ids_CT = torch.from_numpy(ref.contexts(c0, min(ref.geometry.n_contexts, c0 + args.eval_contexts)).astype(np.int64))
    train_rows = c0 * ref.geometry.rows_per_context
    print(f"stores ready ({time.time() - t_start:.0f}s); {train_rows:,} training rows, {len(x_ND):,} held-out rows",
          flush=True)

    storage = {}
    for fmt, url in urls.items():
        st = Store.open(url)
        storage[fmt] = {"bytes_per_value": store_size(url)["bytes_per_value"], "fvu_vs_float32": stored_fvu(url, ref, hook),
                        "rel_mse_recorded": st.final["stats"][hook].get("rel_mse")}
    rates = loader_rates(urls, hook, args.loader_rounds)

    saes = [{"arch": "topk", "hook_in": hook, "width": args.width, "k": args.k, "name": "topk"},
            {"arch": "relu", "hook_in": hook, "width": args.width, "coeff": args.l1, "name": "relu"}]
    run_dirs = {}
    for fmt, url in urls.items():
        for (name, r), d in train(args, url, root / "runs" / fmt, saes, HELDOUT, train_rows).items():
            run_dirs[(fmt, r, name)] = d
        print(f"trained {fmt} ({time.time() - t_start:.0f}s)", flush=True)
    scores = score(run_dirs, x_ND, ref, model, ids_CT, hook)
    fmt_rows = delta_rows(scores, seeds, "topk", FORMATS) + delta_rows(scores, seeds, "relu", FORMATS)

    cache_rows = []
    if not args.no_cache_study:
        n_ctx_train = c0
        cache_dirs = {}
        for j, epochs in enumerate((1, 2, 4, 8)):
            n_ctx = n_ctx_train // epochs
            url = ref_url if j == 0 else transcode(ref_url, str(root / f"cache-{epochs}.zarr"), "float32", n_ctx)
            for (_, r), d in train(args, url, root / "cache-runs" / f"e{epochs}", saes[:1], HELDOUT if j == 0 else 0.0,
                                   train_rows).items():
                cache_dirs[(epochs, r)] = d
            print(f"cache {epochs} epochs trained ({time.time() - t_start:.0f}s)", flush=True)
        cscores = score(cache_dirs, x_ND, ref, model, ids_CT, hook)
        for epochs in (1, 2, 4, 8):
            row = {"epochs": epochs, "unique_rows": (n_ctx_train // epochs) * ref.geometry.rows_per_context}
            for m in ("fve", "l0", "dead_pct", "pct_loss_recovered"):
                vals = [cscores[(epochs, s)][m] for s in seeds]
                row[m], row[f"spread_{m}"] = statistics.mean(vals), spread(vals)
            cache_rows.append(row)

    ce = next(iter(scores.values()))
    result = {
        "setup": {"model": f"demo model ({args.model})", "hook": hook, "harvest_tokens": ref.geometry.n_rows,
                  "train_rows": train_rows, "train_steps": train_rows // args.batch, "batch": args.batch,
                  "lr": "project defaults per architecture", "width": args.width, "k": args.k, "l1": args.l1,
                  "seeds": seeds,
                  "heldout_rows_scored": len(x_ND), "splice_contexts": len(ids_CT), "threads": args.threads,
                  "ce_clean": ce["ce_clean"], "ce_zero_ablation": ce["ce_zero"],
                  "seconds": round(time.time() - t_start)},
        "storage": storage,
        "loader_rows_per_s": rates,
        "loader_ratio_vs_float16": {f: statistics.median(r) / statistics.median(rates["float16"])
                                    for f, r in rates.items()},
        "formats": fmt_rows, "cache_size": cache_rows,
        "scores": {f"{k[0]}-s{k[1]}-{k[2]}": {m: v for m, v in s.items() if not m.startswith("_")}
                   for k, s in scores.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "storage_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "storage_quality.md").write_text(render(result) + "\n")
    print(render(result))


def render(r: dict) -> str:
    s = r["setup"]
    lines = [
        "# Storage formats vs SAE quality, and cache size",
        "",
        f"{s['model'][0].upper() + s['model'][1:]}, hook {s['hook']}: {s['harvest_tokens']:,} harvested rows, "
        f"{s['train_rows']:,} training rows ({s['train_steps']} steps of {s['batch']}, {s['lr']}), SAEs F={s['width']}"
        f" (TopK k={s['k']}; ReLU+L1 coeff {s['l1']}), seeds {s['seeds']}. Scored on {s['heldout_rows_scored']:,} exact "
        f"float32 held-out rows; % loss recovered on {s['splice_contexts']} held-out contexts (clean CE "
        f"{s['ce_clean']:.3f}, zero-ablated {s['ce_zero_ablation']:.3f} nats). {s['threads']} torch threads, "
        f"{s['seconds']} s wall on a shared machine. Δ = mean over seeds of (format − float32, same seed); "
        "± = float32 seed-to-seed spread (max − min).",
        "",
        "| format | bytes/value | FVU stored vs fp32 | loader rows/s vs fp16 |",
        "|---|---|---|---|",
    ]
    for f, st in r["storage"].items():
        lines.append(f"| {f} | {st['bytes_per_value']:.3f} | {st['fvu_vs_float32']:.2e} | "
                     f"{r['loader_ratio_vs_float16'][f]:.2f}× |")
    lines += ["", "| format | SAE | FVE | ΔFVE (± spread) | L0 | ΔL0 (±) | dead % | Δdead (±) | % LR | Δ% LR (±) | "
              "Δ% LR 95 % CI, seed 0 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["formats"]:
        lines.append(
            f"| {row['format']} | {row['arch']} | {row['fve']:.4f} | {row['d_fve']:+.4f} (±{row['spread_fve']:.4f}) | "
            f"{row['l0']:.1f} | {row['d_l0']:+.2f} (±{row['spread_l0']:.2f}) | {row['dead_pct']:.1f} | "
            f"{row['d_dead_pct']:+.1f} (±{row['spread_dead_pct']:.1f}) | {row['pct_loss_recovered']:.2f} | "
            f"{row['d_pct_loss_recovered']:+.2f} (±{row['spread_pct_loss_recovered']:.2f}) | "
            "[{:+.2f}, {:+.2f}] |".format(*row["d_pct_loss_recovered_ci95_seed0"]))
    if r["cache_size"]:
        lines += ["", f"Cache size at a fixed budget of {s['train_rows']:,} training rows (TopK; mean over seeds, "
                  "± = seed spread):", "",
                  "| unique rows | epochs | FVE | L0 | dead % | % LR |", "|---|---|---|---|---|---|"]
        for row in r["cache_size"]:
            lines.append(f"| {row['unique_rows']:,} | {row['epochs']} | {row['fve']:.4f} ±{row['spread_fve']:.4f} | "
                         f"{row['l0']:.1f} ±{row['spread_l0']:.1f} | {row['dead_pct']:.1f} ±{row['spread_dead_pct']:.1f}"
                         f" | {row['pct_loss_recovered']:.2f} ±{row['spread_pct_loss_recovered']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
