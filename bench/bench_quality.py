"""Quality at matched training tokens (issue 12): held-out FVE, L0 and dead % of saecache's default TopK and BatchTopK
SAEs against dictionary_learning's and sparsify's own trainers, plus saecache ablations (LR schedule), on one hook of
a harvested store.

- Data: every candidate trains on the same store's training rows (the held-out contexts excluded) for the same number
  of tokens at the same batch size. saecache runs its real trainer (`run_training`, every default left unset); the
  peers read the rows saecache's loader serves (written once to a raw fp16 file in the scratch dir, the store's own
  dtype: lossless), in the same order.
- Peers run in a worker process of their own Python environment (their pins clash with ours; same pattern as
  bench_train.py): dictionary_learning TopKTrainer / BatchTopKTrainer and sparsify's SparseCoder with its trainer's
  update sequence, Adam recipe (2e-4/sqrt(F/2^14), linear warm-up then linear decay to 0) and signum default
  (schedule-free SignSGD, evaluated at its averaged weights). Every library's warm-up and batchtopk threshold start
  are capped at a tenth of the run (their fixed 1000 steps would not end inside a ~1000-step run).
- Evaluation: the held-out rows of the store (`heldout_batches`); each candidate returns its reconstruction and per
  feature firing counts, and this process computes FVE with saecache's one definition
  (`saecache.train.monitor.fraction_variance_explained`, centred), L0 and dead % (never fires on the held-out rows).

Usage: python -m bench.bench_quality [--store saecache-demo/store.zarr] [--hook mlp_out.1] [--peers-python PY]
       [--widths 1024] [--seeds 0 1] [--tokens 1024000] [--batch 1024] [--k 32] [--scratch DIR] [--note TEXT]
       [--out bench/results]
One candidate costs about 1000 steps of its trainer (~0.5-2 CPU-minutes at d=128, F=1024); the worker is this file
run as a script by the peers' interpreter (`<python> bench/bench_quality.py --worker`) and does not import saecache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ABLATIONS = {  # saecache variants: TrainConfig fields on top of the defaults (fractions of the run where noted)
    "saecache": {},
    "saecache-no-decay": {"decay_start": None},
    "saecache-decay-from-0": {"decay_start": 0.0},
    "saecache-lr3e-4": {"lr": 3e-4, "decay_start": None},
}
PEERS = ("dl", "sparsify-adam", "sparsify-signum")


# ---------------------------------------------------------------------------------------------------------- worker
def _peer_train(name: str, arch: str, width: int, k: int, seed: int, data: np.ndarray, steps: int, batch: int):
    """Train one peer SAE on ``data`` rows (steps × batch of them, in order); returns a function x → (x_hat, f)."""
    torch.manual_seed(seed)
    D, warm = data.shape[1], min(1000, steps // 10)
    rows = lambda s: torch.from_numpy(data[s * batch:(s + 1) * batch].astype(np.float32))  # noqa: E731
    if name == "dl":
        if arch == "topk":
            from dictionary_learning.trainers.top_k import TopKTrainer as T
        else:
            from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer as T
        tr = T(steps=steps, activation_dim=D, dict_size=width, k=k, layer=0, lm_name="bench", warmup_steps=warm,
               threshold_start_step=warm, seed=seed, device="cpu")
        for s in range(steps):
            tr.update(s, rows(s))
        ae = tr.ae.eval()
        return lambda x: (lambda f: (ae.decode(f), f))(ae.encode(x))
    if arch != "topk":
        raise KeyError(f"{name} has no {arch}")
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig
    sae = SparseCoder(D, SparseCoderConfig(num_latents=width, k=k), device="cpu", dtype=torch.float32)
    if name == "sparsify-adam":
        from transformers import get_linear_schedule_with_warmup
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (width / 2 ** 14) ** 0.5)
        sched = get_linear_schedule_with_warmup(opt, warm, steps)
    else:
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD
        opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (width / 2 ** 14) ** 0.5}]),
                                  momentum=0.95)
        opt.train()
        sched = None
    for s in range(steps):  # Trainer.fit: b_dec = first batch mean, unit-norm decoder, fvu, project, step
        x = rows(s)
        if s == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    if sched is None:
        opt.eval()  # schedule-free: evaluate at the averaged weights
    sae.set_decoder_norm_to_unit_norm()

    def run(x):
        out = sae(x=x, y=x, dead_mask=None)
        f = torch.zeros(x.shape[0], width).scatter_(1, out.latent_indices, out.latent_acts)
        return out.sae_out, f
    return run


def _evaluate(run, heldout: np.ndarray) -> dict:
    """Reconstruction and firing counts over the held-out rows (the main process computes the metrics)."""
    xs, counts, l0 = [], None, []
    with torch.no_grad():
        for i in range(0, len(heldout), 2048):
            x_hat, f = run(torch.from_numpy(heldout[i:i + 2048]))
            xs.append(x_hat.float().numpy())
            c = (f != 0).sum(0).numpy()
            counts = c if counts is None else counts + c
            l0.append((f != 0).sum(1).numpy())
    return {"x_hat": np.concatenate(xs), "counts": counts, "l0": np.concatenate(l0)}


def worker() -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            data = np.memmap(req["data"], dtype=np.float16, mode="r").reshape(-1, req["d"])
            heldout = np.load(req["heldout"])
            t0 = time.perf_counter()
            run = _peer_train(req["name"], req["arch"], req["width"], req["k"], req["seed"], data, req["steps"],
                              req["batch"])
            seconds = time.perf_counter() - t0
            np.savez(req["result"], **_evaluate(run, heldout))
            ans = {"seconds": seconds}
        except Exception as e:  # report, keep serving
            ans = {"error": f"{type(e).__name__}: {e}"}
        print("@@" + json.dumps(ans), flush=True)


# ------------------------------------------------------------------------------------------------------------ main
def _ours(store: str, hook: str, arch: str, width: int, k: int, seed: int, tokens: int, batch: int, extra: dict,
          out: Path):
    from saecache.train.config import TrainConfig
    from saecache.train.rundir import load_run
    from saecache.train.trainer import run_training

    steps = -(-tokens // batch)
    extra = {key: (round(v * steps) if key == "decay_start" and v is not None else v) for key, v in extra.items()}
    cfg = TrainConfig(stores=[store], out=str(out), saes=[{"arch": arch, "hook_in": hook, "width": width, "k": k}],
                      seed=seed, total_tokens=tokens, batch_size=batch, progress=False, checkpoint_every=10 ** 9,
                      partitions=8, **extra)
    t0 = time.perf_counter()
    (run_dir,) = run_training(cfg)
    seconds = time.perf_counter() - t0
    sae, rec = load_run(run_dir)
    sae.eval()
    return (lambda x: (sae(x), sae.encode(x))), seconds, {"lr": rec["spec"]["lr"],
                                                          "warmup": rec["train"]["warmup_steps"],
                                                          "decay_start": rec["train"]["decay_start"]}


def _dump_training_rows(store: str, hook: str, tokens: int, batch: int, path: Path) -> int:
    """The rows saecache's loader serves for the run (seed 0), as raw fp16, for the peers."""
    from saecache.train.loader import Loader, open_stores

    loader = Loader(open_stores([store], [hook]), [hook], batch, 0, heldout_fraction=0.01, dtype=torch.float16)
    steps = -(-tokens // batch)
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(steps * batch, loader.stores[0].hooks[hook]["d"]))
    for s in range(steps):
        mm[s * batch:(s + 1) * batch] = next(loader)[hook].numpy()
    mm.flush()
    loader.close()
    return mm.shape[1]


def _metrics(x: np.ndarray, res: dict) -> dict:
    from saecache.train.monitor import fraction_variance_explained

    return {"fve": round(fraction_variance_explained(torch.from_numpy(x), torch.from_numpy(res["x_hat"])), 5),
            "l0": round(float(np.mean(res["l0"])), 2), "dead_pct": round(100 * float(np.mean(res["counts"] == 0)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", default="saecache-demo/store.zarr", help="default: the store `make demo` builds")
    ap.add_argument("--hook", default="mlp_out.1")
    ap.add_argument("--peers-python", default=os.environ.get("SAECACHE_PEERS_PYTHON"))
    ap.add_argument("--peers", nargs="*", default=list(PEERS))
    ap.add_argument("--ablations", nargs="*", default=list(ABLATIONS))
    ap.add_argument("--archs", nargs="*", default=["topk", "batchtopk"])
    ap.add_argument("--widths", nargs="*", type=int, default=[1024])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--tokens", type=int, default=1_024_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--scratch", default=None, help="directory for the row dump and runs (default: a temp dir)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--note", default="", help="what the store holds (model, data), written into the results")
    args = ap.parse_args()
    if args.worker:
        return worker()
    from saecache.harvest.store import Store
    from saecache.train.loader import heldout_batches

    if not Path(args.store).exists():
        print(f"bench_quality: no store at {args.store}; run `make demo` first or pass --store", file=sys.stderr)
        return
    torch.set_num_threads(1)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench-quality-"))
    scratch.mkdir(parents=True, exist_ok=True)
    steps = -(-args.tokens // args.batch)
    x_held = torch.cat([b[args.hook] for b in heldout_batches(Store.open(args.store), [args.hook], 0.01)]).numpy()
    np.save(scratch / "heldout.npy", x_held)
    peers = None
    if args.peers_python and args.peers:
        d = _dump_training_rows(args.store, args.hook, args.tokens, args.batch, scratch / "rows.f16")
        peers = subprocess.Popen([args.peers_python, __file__, "--worker"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1)
    result = {"store_rows": Store.open(args.store).geometry.n_rows, "hook": args.hook, "tokens": steps * args.batch,
              "steps": steps, "batch": args.batch, "k": args.k, "heldout_rows": len(x_held), "threads": 1,
              "loadavg_start": os.getloadavg()[0], "note": args.note, "command": " ".join(sys.argv[1:]), "rows": []}
    t_all = time.time()
    try:
        for width in args.widths:
            for seed in args.seeds:
                for arch in args.archs:
                    cands = [("saecache", a) for a in args.ablations] + [("peer", p) for p in args.peers if peers]
                    for kind, name in cands:
                        if kind == "peer" and name.startswith("sparsify") and arch != "topk":
                            continue
                        row = {"width": width, "seed": seed, "arch": arch, "candidate": name}
                        if kind == "saecache":
                            run, sec, info = _ours(args.store, args.hook, arch, width, args.k, seed, args.tokens,
                                                   args.batch, ABLATIONS[name],
                                                   scratch / f"runs-{name}-{arch}-{width}-{seed}")
                            res, row = _evaluate(run, x_held), {**row, **info}
                        else:
                            req = {"name": name, "arch": arch, "width": width, "k": args.k, "seed": seed, "d": d,
                                   "data": str(scratch / "rows.f16"), "heldout": str(scratch / "heldout.npy"),
                                   "steps": steps, "batch": args.batch, "result": str(scratch / "peer.npz")}
                            peers.stdin.write(json.dumps(req) + "\n")
                            ans = next(json.loads(x[2:]) for x in peers.stdout if x.startswith("@@"))
                            if "error" in ans:
                                print(f"{name} {arch}: {ans['error']}", file=sys.stderr)
                                continue
                            res, sec = dict(np.load(scratch / "peer.npz")), ans["seconds"]
                        row.update({**_metrics(x_held, res), "train_s": round(sec, 1)})
                        result["rows"].append(row)
                        print(json.dumps(row), flush=True)
    finally:
        if peers is not None:
            peers.stdin.close()
            peers.wait(timeout=60)
    result["wall_s"] = round(time.time() - t_all)
    write_results(Path(args.out), result)


def write_results(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    groups: dict[tuple, list] = {}
    for r in result["rows"]:
        groups.setdefault((r["width"], r["arch"], r["candidate"]), []).append(r)
    lines = ["# Quality at matched tokens (bench/bench_quality.py)", "",
             f"Hook {result['hook']} of a {result['store_rows']:,}-row store; {result['steps']} steps of "
             f"{result['batch']} rows ({result['tokens']:,} tokens) per SAE, k={result['k']}; held-out FVE (centred, "
             f"saecache's one definition), L0 and dead % (never fires) over {result['heldout_rows']:,} held-out rows; "
             f"mean over seeds (and each seed's). 1 torch thread per trainer, load average at start "
             f"{result['loadavg_start']:.1f}; train seconds are wall time on a shared machine (not comparable).", "",
             f"Store: {result['note'] or 'see the command'}.", "",
             "| width | arch | candidate | FVE (mean) | FVE per seed | L0 | dead % | train s |", "|---|---|---|---|---|---|---|---|"]
    for (w, a, c), rs in groups.items():
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        per_seed = ", ".join(f"{r['fve']:.4f}" for r in rs)
        lines.append(f"| {w} | {a} | {c} | {mean('fve'):.4f} | {per_seed} | {mean('l0'):.1f} | "
                     f"{mean('dead_pct'):.1f} | {mean('train_s'):.0f} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
