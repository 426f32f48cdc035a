"""Shared-CPU benchmark: wall time of the stages alone and beside competing busy processes, under torch's default
OpenMP wait policy (spinning: the old behaviour) and saecache's thread policy (`saecache/threads.py`), in one run.

Workloads, each a fixed amount of work on the demo's model shape (3 layers, width 128, ctx 128):
- `harvest`: `run_harvest` of mlp_out.0..2 over `--harvest-tokens` tokens into a fresh store;
- `train`: `run_training` of 4 SAEs (ReLU + TopK-32 at widths 512 and 1024, batch 2048) for `--train-steps` steps;
- `evaluate`: `run_evaluation` of those 4 SAEs (statistics, 16 spliced contexts, feature pages, histograms);
- `model`: the demo model's training (`data/tiny_model.train_model`) for `--model-steps` steps (its loop's seconds).

Each (policy, load) cell is a fresh child process, so the policy's environment is in place before torch loads; the
load is L processes running `while True: pass`, spawned by this bench at our niceness. Cells alternate (ABAB,
policies in swapped order each round) and the tables give medians over rounds.

Fair share, precisely: with C cores (our CPU affinity) and L competing busy processes, each of the L+1 processes is
entitled to C/(L+1) cores. A workload that kept u cores busy alone (CPU seconds / wall seconds of the new policy's
alone run, the same work for both policies) needs no more than u cores, so its fair wall time under load is
`alone wall × max(1, u·(L+1)/C)`. `ratio_vs_fair` = wall under load / that fair wall; the target is ≤ 1.5. Each
policy is compared against its own alone run.

On a machine shared with other jobs "alone" still has their load (the 1-minute load average before each cell is
recorded): rerun on a quiet machine for clean figures.

Usage: python -m bench.bench_shared_cpu [--rounds 2] [--load 2] [--out bench/results]
       [--append bench/results/shared_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {"old": {"SAECACHE_THREADS": "torch"}, "new": {"SAECACHE_THREADS": "auto"}}
WORKLOADS = ("harvest", "train", "evaluate", "model")
HOOKS = ("mlp_out.0", "mlp_out.1", "mlp_out.2")
SWEEP = [{"arch": a, "hook_in": "mlp_out.1", "width": w, **({"k": 32} if a == "topk" else {"coeff": 0.06})}
         for w in (512, 1024) for a in ("relu", "topk")]


def make_assets(root: Path, store_tokens: int) -> None:
    """Corpus, tokenizer + demo-shaped model, a store, and 4 briefly trained SAEs under `root`."""
    from saecache.data.corpus import build_pile_corpus
    from saecache.data.tiny_model import init_model, tiny_neox_config
    from saecache.data.tokenizer import train_bpe

    build_pile_corpus(root / "corpus", max_bytes=3_000_000, heldout_fraction=0.05, include=("stdlib",))
    tok = train_bpe([root / "corpus" / "train.jsonl.zst"], 1024)
    init_model(tiny_neox_config(-(-len(tok) // 128) * 128, hidden=128, layers=3, intermediate=512), 0,
               root / "model", tok)
    harvest(root, root / "store.zarr", store_tokens)
    train(root, root / "runs", 4)


def harvest(root: Path, out: Path, tokens: int) -> None:
    from saecache.harvest.config import HarvestConfig
    from saecache.harvest.run import run_harvest

    run_harvest(HarvestConfig(out=str(out), model=str(root / "model"), dataset=str(root / "corpus" / "train.jsonl.zst"),
                              hooks=HOOKS, ctx_len=128, tokens=tokens, ctx_per_chunk=4, device="cpu", seed=0),
                progress=False)


def train(root: Path, out: Path, steps: int) -> list[str]:
    from saecache.train.config import TrainConfig
    from saecache.train.trainer import run_training

    return run_training(TrainConfig(stores=[str(root / "store.zarr")], out=str(out), saes=SWEEP, batch_size=2048,
                                    tokens=2048 * steps, warmup_steps=1, heldout_fraction=0.1,
                                    checkpoint_every=steps, device="cpu", progress=False))


def evaluate(root: Path, out: Path) -> None:
    from saecache.evaluate.config import EvalConfig
    from saecache.evaluate.runner import run_evaluation

    runs = sorted(str(p) for p in (root / "runs").iterdir() if p.is_dir())
    run_evaluation(EvalConfig(run_dirs=runs, store=str(root / "store.zarr"), out=str(out), n_contexts=16,
                              device="cpu", model=str(root / "model"), html_features=2, html_max_rows=2048,
                              progress=False))


def model_seconds(root: Path, out: Path, steps: int) -> float:
    import shutil

    from transformers import AutoTokenizer

    from saecache.data.tiny_model import train_model

    shutil.copytree(root / "model", out)
    r = train_model(out, AutoTokenizer.from_pretrained(str(out)), root / "corpus" / "train.jsonl.zst",
                    root / "corpus" / "val.jsonl.zst", 0, steps=steps)
    return r["train_seconds"]


def child(root: Path, work: Path, args) -> dict:
    """Time every workload once in this process (the policy came with the environment)."""
    out = {}
    for name in WORKLOADS:
        t0, c0 = time.perf_counter(), time.process_time()
        if name == "harvest":
            harvest(root, work / "store.zarr", args.harvest_tokens)
        elif name == "train":
            train(root, work / "runs", args.train_steps)
        elif name == "evaluate":
            evaluate(root, work / "eval")
        else:
            inner = model_seconds(root, work / "model", args.model_steps)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if name == "model":  # only the training loop: the corpus encoding before it is not this workload
            cpu, wall = cpu * inner / wall, inner
        out[name] = {"wall_s": wall, "cpu_s": cpu}
    import torch

    out["torch_threads"] = torch.get_num_threads()
    out["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    return out


def run_cell(root: Path, policy: str, load: int, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SAECACHE_THREADS")}
    env.update(POLICIES[policy])
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        with tempfile.TemporaryDirectory(dir=root) as work:
            load_before = os.getloadavg()[0]
            r = subprocess.run([sys.executable, "-m", "bench.bench_shared_cpu", "--child", str(root), work,
                                *_passthrough(args)], env=env, capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent.parent)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    if r.returncode != 0:
        raise SystemExit(f"bench child failed ({policy}, load {load}):\n{r.stderr[-3000:]}")
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "policy": policy, "load": load,
            "loadavg_before": load_before}


def _passthrough(args) -> list[str]:
    return ["--harvest-tokens", str(args.harvest_tokens), "--train-steps", str(args.train_steps),
            "--model-steps", str(args.model_steps)]


def summarise(cells: list[dict], load: int, cores: int) -> dict:
    med = {(p, L, w): statistics.median(c[w]["wall_s"] for c in cells if c["policy"] == p and c["load"] == L)
           for p in POLICIES for L in (0, load) for w in WORKLOADS}
    rows = {}
    for w in WORKLOADS:
        alone_new = [c[w] for c in cells if c["policy"] == "new" and c["load"] == 0]
        u = min(cores, statistics.median(a["cpu_s"] / a["wall_s"] for a in alone_new))
        fair_factor = max(1.0, u * (load + 1) / cores)
        row = {"cores_used_alone": round(u, 2), "fair_factor": round(fair_factor, 2)}
        for p in POLICIES:
            alone, loaded = med[(p, 0, w)], med[(p, load, w)]
            row[p] = {"alone_s": round(alone, 2), "loaded_s": round(loaded, 2),
                      "slowdown": round(loaded / alone, 2), "ratio_vs_fair": round(loaded / alone / fair_factor, 2)}
        row["new_vs_old_alone"] = round(med[("new", 0, w)] / med[("old", 0, w)], 2)
        row["new_vs_old_loaded"] = round(med[("new", load, w)] / med[("old", load, w)], 2)
        rows[w] = row
    return rows


def write_results(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "shared_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    L, C = result["load"], result["cores"]
    lines = ["# Shared-CPU benchmark", "",
             f"{C} cores, {L} competing busy processes, rounds: {result['rounds']} (ABAB), medians. old = torch's "
             "defaults (OpenMP threads spin while they wait), new = saecache's thread policy (OMP_WAIT_POLICY=PASSIVE "
             "set before torch loads; `saecache/threads.py`). Fair wall = alone × max(1, u·(L+1)/C), u = cores the "
             "workload kept busy alone; target: loaded ≤ 1.5 × fair.", "",
             "| workload | u | fair × | old alone s | old loaded s | old vs fair | new alone s | new loaded s | "
             "new vs fair | new/old alone | new/old loaded |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w, r in result["workloads"].items():
        o, n = r["old"], r["new"]
        lines.append(f"| {w} | {r['cores_used_alone']} | {r['fair_factor']} | {o['alone_s']} | {o['loaded_s']} | "
                     f"{o['ratio_vs_fair']} | {n['alone_s']} | {n['loaded_s']} | {n['ratio_vs_fair']} | "
                     f"{r['new_vs_old_alone']} | {r['new_vs_old_loaded']} |")
    loads = [round(c["loadavg_before"], 1) for c in result["cells"]]
    bg = statistics.median(c["loadavg_before"] for c in result["cells"] if c["load"] == 0)
    lines += ["", f"1-minute load average before each cell (other jobs included): {loads}. {result['note']} "
              f"With B other runnable jobs already there (load average ~{bg:.0f} before the alone cells), the alone "
              f"run gets about C/(B+1) cores and the loaded one C/(B+L+1), so there fair × is about (B+L+1)/(B+1) = "
              f"{(bg + L + 1) / (bg + 1):.2f}; the column above assumes an otherwise idle machine.", ""]
    (out / "shared_cpu.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--load", type=int, default=2, help="competing busy processes in the loaded cells")
    ap.add_argument("--harvest-tokens", type=int, default=8192)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--model-steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--append", type=Path, help="a shared_cpu.json of the same settings whose cells (rounds) to keep: "
                                                 "more rounds in several shorter sittings")
    ap.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args)))
        return
    from saecache.threads import available_cores

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_assets(root, 32768)
        old = json.loads(args.append.read_text()) if args.append else {"cells": [], "rounds": 0}
        cells, first = list(old["cells"]), old["rounds"]
        for r in range(first, first + args.rounds):
            order = list(POLICIES) if r % 2 == 0 else list(POLICIES)[::-1]
            for load in (0, args.load):
                for p in order:
                    cells.append(run_cell(root, p, load, args))
                    c = cells[-1]
                    print(f"round {r} {p} load {load}: " + ", ".join(f"{w} {c[w]['wall_s']:.1f}s" for w in WORKLOADS)
                          + f" (loadavg {c['loadavg_before']:.1f})", file=sys.stderr, flush=True)
    cores = available_cores()
    result = {"cores": cores, "load": args.load, "rounds": first + args.rounds,
              "seconds": round(time.time() - t0) + old.get("seconds", 0),
              "settings": {"harvest_tokens": args.harvest_tokens, "train_steps": args.train_steps,
                           "model_steps": args.model_steps, "saes": SWEEP},
              "workloads": summarise(cells, args.load, cores), "cells": cells,
              "note": "Measured on a machine shared with other agents' jobs: figures are noisy; rerun when quiet."}
    write_results(args.out, result)
    print((args.out / "shared_cpu.md").read_text())


if __name__ == "__main__":
    main()
