"""Quality of a cross-layer transcoder (CLT) against a per-layer transcoder (PLT) set at matched tokens, total latents
and L0, evaluated as replacement models (issue 20, "Quality" and "Store" benchmarks).

One store of `resid_mid.i` and `mlp_out.i` for every replaced layer (`data/circuits.py`, the `demo --recipe
circuits` pipeline); from one read of it, `--seeds` init seeds of: a PLT set at TopK k and k/2 per layer, and a TopK
CLT at k and k/2 per layer, all with `--width` features per layer (the same total latents). Each is evaluated as a
replacement model on the same held-out contexts, inputs from the clean run and from the replaced run: CE, % loss
recovered against zero- and mean-ablating every replaced MLP, KL to the clean model. Reported: each dictionary's
mean over seeds with the seed spread (max − min) beside it, and the CLT − PLT deltas at matched L0 and the CLT at k/2
against the PLT set at k (the paper's claim: a CLT reaches the same fidelity at a lower L0).

Peer (`--peers-python`, a virtualenv with eai-sparsify 1.3; see bench/bench_train.py's docstring): sparsify's
SparseCoder as a transcoder (`transcode=True`), one per layer, trained with its own defaults on the same training rows
(`bench/circuits_peer.py`), evaluated through the same replacement code.

Store: bytes/value of the store (fp16) and of the same store harvested with `--dtype nf4`, beside Llamascopium's
4.03-4.26 (its fp32 safetensors cache of the same kind of model, measured by trying Llamascopium 2.0.0b34 here).

Usage: python -m bench.bench_circuits [--model tiny|smollm2] [--demo-dir saecache-demo] [--work DIR]
       [--seeds 2] [--width 512] [--k 32] [--peers-python PY] [--out bench/results]
Results: bench/results/circuits.{json,md}, one section per --model (a later run of the other model adds its section).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = "circuits"
LLAMASCOPIUM_BPV = (4.03, 4.26)


def spread(vals: list[float]) -> dict:
    return {"mean": statistics.fmean(vals), "spread": max(vals) - min(vals), "per_seed": vals}


def summarise(reports: dict[str, list[dict]]) -> dict:
    """Per dictionary and input mode: mean and seed spread of % recovered (zero, mean), KL, CE; mean L0 per layer."""
    out = {}
    for name, reps in reports.items():
        out[name] = {}
        for mode in reps[0]["modes"]:
            rs = [r["modes"][mode] for r in reps]
            out[name][mode] = {key: spread([r[key] for r in rs])
                               for key in ("recovered_zero", "recovered_mean", "kl", "ce_spliced")}
            out[name][mode]["ce_clean"] = rs[0]["ce_clean"]
            out[name][mode]["l0"] = statistics.fmean(x["l0"] for r in rs for x in r["layers"])
            out[name][mode]["fve"] = [statistics.fmean(r["layers"][l]["fve"] for r in rs)
                                      for l in range(len(rs[0]["layers"]))]
    return out


def delta(summary: dict, a: str, b: str, mode: str, key: str) -> dict | None:
    """a − b of `key` per seed (the same seed index: the same read of the store), mean and spread."""
    if a not in summary or b not in summary:
        return None
    va, vb = summary[a][mode][key]["per_seed"], summary[b][mode][key]["per_seed"]
    n = min(len(va), len(vb))
    return spread([va[i] - vb[i] for i in range(n)])


def run(args) -> dict:
    from saecache.data.circuits import (circuit_sweep, clt_name, harvest_circuits, plt_name, prepare, replacement,
                                        train_circuits)
    from saecache.data.demo import DemoConfig
    from saecache.harvest.inspect import store_size

    t0 = time.time()
    cfg = DemoConfig.preset(args.model, out=args.demo_dir, progress=False, device="cpu", k=args.k,
                            widths=(args.width,), eval_contexts=args.eval_contexts,
                            **({"harvest_tokens": args.harvest_tokens} if args.harvest_tokens else {}),
                            **({"train_tokens": args.train_tokens} if args.train_tokens else {}))
    model_dir, info, layers = prepare(cfg)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store, harvest = harvest_circuits(cfg, model_dir, info["corpus_train"], layers, out=str(work / "fp16.zarr"))
    sizes = {"float16": store_size(store)}
    if not args.skip_nf4:
        nf4, _ = harvest_circuits(cfg, model_dir, info["corpus_train"], layers, dtype="nf4",
                                  out=str(work / "nf4.zarr"))
        sizes["nf4"] = store_size(nf4)
    t_harvest = time.time() - t0
    ks = (args.k, args.k // 2)
    runs = train_circuits(cfg, store, circuit_sweep(layers, args.width, ks, ks), seeds=args.seeds,
                          runs=str(work / "runs"))
    t_train = time.time() - t0 - t_harvest
    suffix = (lambda r: f"-seed{r}") if args.seeds > 1 else (lambda r: "")
    reports: dict[str, list[dict]] = {}
    peer_versions = None
    for k in ks:
        for r in range(args.seeds):
            plts = [runs[plt_name(args.width, k, i) + suffix(r)] for i in range(layers)]
            for name, dirs in ((f"PLT set k={k}", plts), (f"CLT k={k}", [runs[clt_name(args.width, k) + suffix(r)]])):
                rep = replacement(cfg, model_dir, store, dirs, str(work / "eval" / f"{name.replace(' ', '_')}-{r}"),
                                  per_layer=False)
                reports.setdefault(name, []).append(rep)
    if args.peers_python:
        from bench.circuits_peer import sparsify_reports
        peer, peer_versions = sparsify_reports(args, cfg, model_dir, store, layers, runs, work)
        reports.update(peer)
    summary = summarise(reports)
    k, h = ks
    deltas = {mode: {f"CLT k={k} − PLT set k={k}": {m: delta(summary, f"CLT k={k}", f"PLT set k={k}", mode, m)
                                                   for m in ("recovered_zero", "kl")},
                     f"CLT k={h} − PLT set k={h}": {m: delta(summary, f"CLT k={h}", f"PLT set k={h}", mode, m)
                                                   for m in ("recovered_zero", "kl")},
                     f"CLT k={h} − PLT set k={k}": {m: delta(summary, f"CLT k={h}", f"PLT set k={k}", mode, m)
                                                   for m in ("recovered_zero", "kl")}}
              for mode in ("clean", "replaced")}
    first = reports[f"CLT k={k}"][0]
    return {"model": args.model, "model_info": {"val_loss": info["val_loss"], "tokenizer": info["tokenizer"]},
            "layers": layers, "width_per_layer": args.width, "k": list(ks), "seeds": args.seeds,
            "harvest_tokens": cfg.harvest_tokens, "train_tokens": cfg.train_tokens, "batch_size": cfg.batch_size,
            "contexts": first["contexts"], "n_contexts": cfg.eval_contexts, "store_rows": harvest.get("rows"),
            "store_bytes_per_value": {d: round(s["bytes_per_value"], 4) for d, s in sizes.items()},
            "store_sizes": sizes, "llamascopium_bytes_per_value": list(LLAMASCOPIUM_BPV),
            "summary": summary, "deltas": deltas, "peer_versions": peer_versions, "reports": reports,
            "seconds": {"harvest": round(t_harvest), "train": round(t_train), "total": round(time.time() - t0)},
            "command": "python -m bench.bench_circuits " + " ".join(sys.argv[1:])}


def verdict(s: dict) -> str:
    """Whether the paper's claim holds here: the CLT at k/2 recovers at least as much loss as the PLT set at k (within
    the seed spread of the paired delta), per input mode."""
    k, h = s["k"]
    parts = []
    for mode, ds in s["deltas"].items():
        d = ds[f"CLT k={h} − PLT set k={k}"]["recovered_zero"]
        holds = d["mean"] + d["spread"] >= 0
        parts.append(f"{mode} inputs: CLT at k={h} {'reaches' if holds else 'does not reach'} the PLT set at k={k} "
                     f"({_pm(d, 100, '+.1f')} points of loss recovered)")
    return "Lower L0 at the same fidelity (the paper's claim): " + "; ".join(parts) + "."


def _pm(v: dict, scale: float = 100, fmt: str = ".1f") -> str:
    """mean ± seed spread, or the one value when there was one seed."""
    m = format(scale * v["mean"], fmt)
    return m if len(v["per_seed"]) < 2 else f"{m} ± {format(scale * v['spread'], fmt.lstrip('+'))}"


def markdown(sections: dict) -> str:
    lines = ["# CLT vs PLT set as replacement models (bench/bench_circuits.py)", "",
             "Matched tokens (every dictionary trained from one read of one store), matched total latents (width per "
             "layer × layers on both) and TopK L0 per layer. Figures: mean over seeds, ± = seed spread (max − min); "
             "Δ columns pair seeds (same init seed index, same rows). `clean` = each transcoder reads the clean run "
             "(circuit tracing's local replacement), `replaced` = the replaced run's own activations.", ""]
    for model, s in sections.items():
        lines += [f"## {model}: {s['layers']} layers replaced, {s['width_per_layer']} features per layer, "
                  f"{s['seeds']} seed(s)", "",
                  f"Store of {s['harvest_tokens']:,} tokens (resid_mid.i and mlp_out.i of every replaced layer); "
                  f"{s['train_tokens']:,} training tokens per dictionary, batch {s['batch_size']}; "
                  f"{s['n_contexts']} held-out contexts (store contexts {s['contexts'][0]}..{s['contexts'][1]}). "
                  f"Wall: harvest {s['seconds']['harvest']} s, training {s['seconds']['train']} s, total "
                  f"{s['seconds']['total']} s (shared 2-core CPU). Command: `{s['command']}`" +
                  (f" ({s['note']})" if s.get("note") else ""), "",
                  "| dictionary | inputs | mean L0/layer | CE (clean "
                  f"{next(iter(s['summary'].values()))['clean']['ce_clean']:.4f}) | % rec. (zero) | % rec. (mean) | KL |", "|---|---|---|---|---|---|---|"]
        for name, by_mode in s["summary"].items():
            for mode, r in by_mode.items():
                lines.append(f"| {name} | {mode} | {r['l0']:.1f} | {r['ce_spliced']['mean']:.4f} | "
                             f"{_pm(r['recovered_zero'])} | {_pm(r['recovered_mean'])} | {_pm(r['kl'], 1, '.4f')} |")
        lines += ["", "| Δ | inputs | Δ % rec. (zero), points | Δ KL |", "|---|---|---|---|"]
        for mode, ds in s["deltas"].items():
            for name, d in ds.items():
                if d["recovered_zero"] is not None:
                    lines.append(f"| {name} | {mode} | {_pm(d['recovered_zero'], 100, '+.1f')} | "
                                 f"{_pm(d['kl'], 1, '+.4f')} |")
        bpv = s["store_bytes_per_value"]
        lines += ["", "Store: " + ", ".join(f"{d} {v:.3f} bytes/value" for d, v in bpv.items()) +
                  f" (activations only, the store's codec), against Llamascopium's {LLAMASCOPIUM_BPV[0]}–"
                  f"{LLAMASCOPIUM_BPV[1]} (fp32 safetensors chunks, measured on the same kind of model).", ""]
        lines += [verdict(s), ""]
        if s.get("peer_versions"):
            lines += ["Peer: sparsify's transcoder (bench/circuits_peer.py: its Trainer.fit defaults, signum, one "
                      "seed) on the rows saecache's seed-0 runs read; " +
                      ", ".join(f"{p} {v}" for p, v in s["peer_versions"].items()) + ". Its L0 is below k where "
                      "ReLU zeroes some of the top k.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
    ap.add_argument("--demo-dir", default=None, help="the demo's directory (its cached corpus and model are reused)")
    ap.add_argument("--work", default=None, help="where the stores and runs go (default: <demo-dir>/bench-circuits)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--width", type=int, default=512, help="features per layer (PLT and CLT alike)")
    ap.add_argument("--k", type=int, default=32, help="TopK per layer; k/2 is run too")
    ap.add_argument("--harvest-tokens", type=int, default=None)
    ap.add_argument("--train-tokens", type=int, default=None)
    ap.add_argument("--eval-contexts", type=int, default=128)
    ap.add_argument("--skip-nf4", action="store_true")
    ap.add_argument("--peers-python", default=os.environ.get("SAECACHE_PEERS_PYTHON"))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = ap.parse_args()
    path = Path(args.out) / f"{RESULTS}.json"
    if args.render:
        (Path(args.out) / f"{RESULTS}.md").write_text(markdown(json.loads(path.read_text())))
        return
    from saecache.data.demo import DemoConfig
    args.demo_dir = args.demo_dir or DemoConfig.preset(args.model).out
    args.work = args.work or str(Path(args.demo_dir) / "bench-circuits")
    section = run(args)
    sections = json.loads(path.read_text()) if path.is_file() else {}
    sections[args.model] = section
    path.write_text(json.dumps(sections, indent=1, default=str) + "\n")
    (Path(args.out) / f"{RESULTS}.md").write_text(markdown(sections))
    print(markdown({args.model: section}))


if __name__ == "__main__":
    main()
