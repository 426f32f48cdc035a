"""Quality at matched training tokens (issue 12): held-out FVE, L0 and dead % of saecache's default TopK and BatchTopK
SAEs against dictionary_learning's, SAELens' and sparsify's own trainers, saecache's ReLU+L1 against
dictionary_learning's StandardTrainer at matched L0, plus saecache ablations (LR schedule), on one hook of a store.

- Data: every candidate trains on the same store's training rows (the held-out contexts excluded) for the same number
  of steps at the same batch size. saecache runs its real trainer (`run_training`, every default left unset; it leaves
  the BOS rows out: `train_on_bos` off); the peers read the rows saecache's loader serves its seed-0 run, BOS
  rows left out the same way (written once to a raw fp16 file in the scratch dir, lossless for a float16 store), in
  the same order and the same per-step batches. saecache's seeds 1, 2... also reshuffle its data order; the peers'
  seeds only change their init.
- Peers run in a worker process of their own Python environment (bench/quality_peers.py, whose docstring gives each
  peer's recipe): dictionary_learning TopK/BatchTopK/Standard trainers, SAELens' SAETrainer, sparsify's Adam and
  signum recipes, each with its own defaults; warm-ups capped at a tenth of the run.
- ReLU+L1 at matched L0: saecache `arch=relu` at `--relu-coeffs` (the `coeff` of its spec, for inputs normalised to
  E‖x‖² = 1) and dictionary_learning's StandardTrainer at `--dl-l1` (its l1_penalty on raw activations; default:
  `--dl-l1-rms` times the rows' RMS norm sqrt(E‖x‖²): λ·RMS in raw units is the penalty λ on normalised inputs,
  but at equal λ its trainer ends at about half saecache's L0, so its default sweep is half ours). Per library, FVE
  at a common L0 (`--match-l0`, default k, else the log-midpoint of the overlap of the two L0 ranges) by linear
  interpolation of FVE against log L0 between the bracketing coefficients; "no crossing" when the ranges do not overlap.
- Evaluation: the held-out rows of the store (`Split.heldout_batches`, BOS rows left out as in training); each candidate
  returns its reconstruction and per-feature firing counts, and this process computes FVE with saecache's one
  definition (`saecache.train.monitor.fraction_variance_explained`, centred), L0 and dead % (never fires on them);
  and "dead % train": never fires on the last `TRAIN_SAMPLE_ROWS` of the training rows every trainer saw (the dead
  of sparsify and Gao et al.; the held-out rows are too few to tell a dead latent from a rare one).
- Target (issue 12) per width and TopK-family arch: saecache's default FVE ≥ the best peer's, and both its dead %
  ≤ dictionary_learning's.

Usage: python -m bench.bench_quality [--store saecache-demo/store.zarr] [--hook mlp_out.1] [--peers-python PY]
       [--peers dl sparsify-adam sparsify-signum saelens] [--archs topk batchtopk relu] [--widths 1024]
       [--seeds 0 1] [--tokens 1024000] [--batch 1024] [--k 32] [--relu-coeffs 0.1 0.2 0.4]
       [--dl-l1-rms 0.05 0.1 0.2 | --dl-l1 L1 ...] [--match-l0 L0] [--ablations ...] [--scratch DIR] [--note TEXT]
       [--out bench/results]
One candidate costs about 1000 steps of its trainer (~0.5-2 CPU-minutes at d=128, F=1024). Nothing assumes the
activation width: a SmolLM2 store (d=576) works unchanged (choose --relu-coeffs that bracket the L0 wanted there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.quality_peers import ARCHS as PEER_ARCHS
from bench.quality_peers import evaluate
from bench.quality_report import matched_l0, summarise, targets, write_results

def _before(extra: dict | None = None, dead: int = 10_000_000) -> dict:
    """An ablation on top of the TopK defaults the study of bench/results/quality_lr.md started from (3x Gao et al.'s
    rate, no decay, AuxK dead after 10M rows, i.e. never in 1000 steps), so their names keep their meaning there."""
    extra = dict(extra or {})
    options = {"dead_tokens_threshold": dead, **extra.pop("options", {})}
    rate = {} if "lr" in extra else {"lr_gao": 3.0}
    return {"decay_start": 1.0, **rate, **extra, "options": options}


ABLATIONS = {  # saecache variants: TrainConfig fields on top of the defaults (fractions of the run where noted)
    "saecache": {},
    "saecache-no-decay": {"decay_start": 1.0},
    "saecache-adam": {"lr_gao": 4.0, "options": {"optimizer": "adam"}},  # the TopK family's recipe before issue 21
    "saecache-gao4x": {"lr_gao": 4.0},  # lazy Adam at the TopK family's rate before issue 21's 6x
    "saecache-decay-from-0": {"decay_start": 0.0},
    "saecache-decay-last-20": {"decay_start": 0.8},  # dictionary_learning's TopK schedule: linear decay over the last 20 %
    "saecache-raw": {"normalize": False},  # the peers train on raw activations (no scaling to E‖x‖² = 1)
    "saecache-lr1e-3": {"lr": 1e-3},  # dictionary_learning's StandardTrainer rate (saecache's ReLU default now)
    "saecache-lr3e-4": _before({"lr": 3e-4}),  # the TopK default before issue 12
    "saecache-gao3x": {"lr_gao": 3.0},  # the TopK rate before its last change (4x is the default now)
    "saecache-gao4x-decay-last-80": {"lr_gao": 4.0, "decay_start": 0.2},
    "saecache-gao4x-decay-from-0": {"lr_gao": 4.0, "decay_start": 0.0},
    # the study of quality_lr.md, on top of the defaults it started from (_before): the TopK family's rate as multiples
    # of Gao et al.'s fit 2e-4 / sqrt(F / 2^14), decay over the last half, AuxK for latents silent over 100 / 10 / 4 /
    # 2 steps of 1024 rows and auxk_alpha above its default 1/32
    "saecache-before": _before(),
    "saecache-gao1x": _before({"lr_gao": 1.0}),
    "saecache-gao2x": _before({"lr_gao": 2.0}),
    "saecache-gao1x-decay-last-50": _before({"lr_gao": 1.0, "decay_start": 0.5}),
    "saecache-decay-last-50": _before({"decay_start": 0.5}),
    "saecache-dead100k": _before(dead=100_000),
    "saecache-dead10k": _before(dead=10_000),
    "saecache-dead4k": _before(dead=4_000),
    "saecache-decay-last-50-dead10k": _before({"decay_start": 0.5}, dead=10_000),
    "saecache-dead10k-auxk0.125": _before({"options": {"auxk_alpha": 0.125}}, dead=10_000),
    "saecache-dead10k-auxk0.5": _before({"options": {"auxk_alpha": 0.5}}, dead=10_000),
    "saecache-decay-last-50-dead10k-auxk0.25": _before({"decay_start": 0.5, "options": {"auxk_alpha": 0.25}},
                                                       dead=10_000),
    "saecache-gao4x-decay-last-50-dead10k": _before({"lr_gao": 4.0, "decay_start": 0.5}, dead=10_000),
    "saecache-gao6x-decay-last-50-dead10k": _before({"lr_gao": 6.0, "decay_start": 0.5}, dead=10_000),
    "saecache-decay-last-50-dead2k": _before({"decay_start": 0.5}, dead=2_000),
}
PEERS = ("dl", "sparsify-adam", "sparsify-signum", "saelens")
# relu sweeps bracketing L0 ≈ 32 on the demo's mlp_out.1 (d=128, 1000 steps of 1024 rows, width 1024): saecache's
# coeff 0.1/0.2/0.4 gave L0 71/37/17; dictionary_learning's l1_penalty 1, 2, 4 × RMS gave 34/17/8, hence half that
RELU_COEFFS = (0.1, 0.2, 0.4)
DL_L1_PER_RMS = (0.05, 0.1, 0.2)  # dictionary_learning's l1_penalty in units of the training rows' RMS norm
TRAIN_SAMPLE_ROWS = 100_000  # rows every trainer trained on, over which "dead on training rows" is counted


# ------------------------------------------------------------------------------------------------------------ runs
def _ours(store: str, hook: str, spec: dict, seed: int, tokens: int, batch: int, extra: dict, out: Path):
    from saecache.train.arch import gao_lr
    from saecache.train.config import TrainConfig
    from saecache.train.rundir import load_run
    from saecache.train.trainer import run_training

    steps = -(-tokens // batch)
    extra = {key: (round(v * steps) if key == "decay_start" and v is not None else v) for key, v in extra.items()}
    if "lr_gao" in extra:  # a multiple of Gao et al.'s TopK rate 2e-4 / sqrt(F / 2^14)
        extra["lr"] = gao_lr(spec["width"], extra.pop("lr_gao"))
    if "options" in extra:  # SAEConfig fields of the one SAE (SAESpec.options)
        spec = {**spec, "options": {**spec.get("options", {}), **extra.pop("options")}}
    cfg = TrainConfig(stores=[store], out=str(out), saes=[{"hook_in": hook, **spec}], seed=seed, tokens=tokens,
                      batch_size=batch, progress=False, checkpoint_every=10 ** 9, partitions=8, **extra)
    t0 = time.perf_counter()
    (run_dir,) = run_training(cfg)
    seconds = time.perf_counter() - t0
    sae, rec = load_run(run_dir)
    sae.eval()
    return (lambda x: (sae(x), sae.encode(x))), seconds, {"lr": rec["spec"]["lr"],
                                                          "warmup": rec["spec"]["warmup_steps"],
                                                          "decay_start": rec["spec"]["decay_start"]}


def dump_training_rows(store: str, hook: str, tokens: int, batch: int, scratch: Path) -> tuple[int, float]:
    """The batches saecache's loader serves its seed-0 run, BOS rows left out as its trainer does, as raw fp16
    (rows.f16) with each step's row offsets (offsets.npy), for the peers; the last `TRAIN_SAMPLE_ROWS` of them
    (train_sample.npy) for the dead count over training rows. Returns (d, E‖x‖² over those rows)."""
    from saecache.harvest.split import Split
    from saecache.train.loader import Loader, open_stores

    stores = open_stores([store], [hook])
    loader = Loader(stores, [hook], batch, 0, split=Split.for_training(stores, 0.01, train_on_bos=False),
                    dtype=torch.float16)
    offsets, sq = [0], 0.0
    with open(scratch / "rows.f16", "wb") as fh:
        for _ in range(-(-tokens // batch)):
            b = next(loader)
            x = b[hook].numpy()
            fh.write(x.tobytes())
            offsets.append(offsets[-1] + len(x))
            sq += float(np.square(x, dtype=np.float32).sum())
    loader.close()
    np.save(scratch / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    n = offsets[-1]
    rows = np.memmap(scratch / "rows.f16", dtype=np.float16, mode="r", shape=(n, x.shape[1]))
    np.save(scratch / "train_sample.npy", np.asarray(rows[n - min(n, TRAIN_SAMPLE_ROWS):]))
    return x.shape[1], sq / n


def heldout_rows(store: str, hook: str) -> np.ndarray:
    from saecache.harvest.store import Store
    from saecache.harvest.split import Split

    st = Store.open(store)
    return torch.cat([b[hook] for b in Split.for_training([st], 0.01, train_on_bos=False).heldout_batches(st, [hook])
                      ]).numpy()


def metrics(x: np.ndarray, res: dict) -> dict:
    from saecache.train.monitor import fraction_variance_explained

    out = {"fve": round(fraction_variance_explained(torch.from_numpy(x), torch.from_numpy(res["x_hat"])), 5),
           "l0": round(float(np.mean(res["l0"])), 2), "dead_pct": round(100 * float(np.mean(res["counts"] == 0)), 1)}
    if "train_counts" in res:
        out["dead_train_pct"] = round(100 * float(np.mean(res["train_counts"] == 0)), 1)
    return out


def candidates(arch: str, ablations: list[str], peers: list[str], relu_coeffs: list[float],
               dl_l1: list[float]) -> list[tuple[str, float | None]]:
    """(candidate, coeff) pairs for one arch: saecache's ablations and the peers that have it; relu: the sweeps (one
    per saecache ablation)."""
    if arch == "relu":
        return [(a, c) for a in ablations for c in relu_coeffs] + ([("dl", c) for c in dl_l1] if "dl" in peers else [])
    return [(a, None) for a in ablations] + [(p, None) for p in peers if arch in PEER_ARCHS[p]]


def _logged_rows(paths: list[str]) -> list[dict]:
    """The result rows this bench printed (one JSON object per line, among other output) in the given logs."""
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.startswith("{") and '"candidate"' in line and '"fve"' in line:
                rows.append(json.loads(line))
    return rows


def _peer_versions(python: str) -> dict:
    out = subprocess.run([python, str(Path(__file__).with_name("quality_peers.py"))], input='{"op": "versions"}\n',
                         capture_output=True, text=True, timeout=300).stdout
    return next((json.loads(x[2:]) for x in out.splitlines() if x.startswith("@@")), {})


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="saecache-demo/store.zarr", help="default: the store `make demo` builds")
    ap.add_argument("--hook", default="mlp_out.1")
    ap.add_argument("--peers-python", default=os.environ.get("SAECACHE_PEERS_PYTHON"))
    ap.add_argument("--peers", nargs="*", default=list(PEERS))
    ap.add_argument("--ablations", nargs="*", default=["saecache"],
                    help=f"saecache variants to train (default: its defaults only): {', '.join(ABLATIONS)}")
    ap.add_argument("--archs", nargs="*", default=["topk", "batchtopk", "relu"])
    ap.add_argument("--widths", nargs="*", type=int, default=[1024])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--tokens", type=int, default=1_024_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--relu-coeffs", nargs="*", type=float, default=list(RELU_COEFFS),
                    help="saecache relu L1 coefficients (inputs normalised to E|x|^2 = 1)")
    ap.add_argument("--dl-l1", nargs="*", type=float, default=None,
                    help="dictionary_learning StandardTrainer l1_penalty values (raw activations); default: "
                         "--dl-l1-rms times the training rows' RMS norm")
    ap.add_argument("--dl-l1-rms", nargs="*", type=float, default=list(DL_L1_PER_RMS),
                    help="dictionary_learning's l1_penalty sweep in units of the training rows' RMS norm")
    ap.add_argument("--match-l0", type=float, default=None, help="L0 of the relu comparison (default: --k)")
    ap.add_argument("--scratch", default=None, help="directory for the row dump and runs (default: a temp dir)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--note", default="", help="what the store holds (model, data), written into the results")
    ap.add_argument("--rows", nargs="*", default=None, metavar="LOG",
                    help="train nothing: build the results from the row lines (JSON) earlier runs of this bench "
                         "printed, e.g. the logs of runs stopped before their end or run in parallel on one store")
    args = ap.parse_args(argv)
    from saecache.harvest.store import Store

    if not Path(args.store).exists():
        print(f"bench_quality: no store at {args.store}; run `make demo` first or pass --store", file=sys.stderr)
        return None
    unknown = sorted(set(args.peers) - set(PEERS)) + sorted(set(args.ablations) - set(ABLATIONS))
    if unknown:
        raise SystemExit(f"bench_quality: unknown peer/ablation {', '.join(unknown)}")
    torch.set_num_threads(1)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench-quality-"))
    scratch.mkdir(parents=True, exist_ok=True)
    steps = -(-args.tokens // args.batch)
    x_held = heldout_rows(args.store, args.hook)
    np.save(scratch / "heldout.npy", x_held)
    peers, rms, dl_l1 = None, None, []
    logged = None if args.rows is None else _logged_rows(args.rows)
    if logged is not None:
        args.peers = sorted({r["candidate"] for r in logged if not r["candidate"].startswith("saecache")})
        dl_l1 = sorted({r["coeff"] for r in logged if r["candidate"] == "dl" and r["arch"] == "relu"})
    if logged is None:
        d, ms = dump_training_rows(args.store, args.hook, args.tokens, args.batch, scratch)
        x_train = np.load(scratch / "train_sample.npy", mmap_mode="r")
        rms = math.sqrt(ms)
        dl_l1 = args.dl_l1 if args.dl_l1 is not None else [float(f"{c * rms:.4g}") for c in args.dl_l1_rms]
    if args.peers_python and args.peers and logged is None:
        peers = subprocess.Popen([args.peers_python, str(Path(__file__).with_name("quality_peers.py"))],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                 env={**os.environ, "TQDM_DISABLE": "1"})  # SAELens' fit draws a progress bar

    def ask(req: dict) -> dict:
        peers.stdin.write(json.dumps(req) + "\n")
        ans = next((json.loads(x[2:]) for x in peers.stdout if x.startswith("@@")), None)
        if ans is None:
            raise RuntimeError(f"the peers' worker ({args.peers_python}) exited; its stderr is above")
        return ans

    result = {"store": args.store, "store_rows": Store.open(args.store).geometry.n_rows, "hook": args.hook,
              "d": int(x_held.shape[1]), "tokens": steps * args.batch, "steps": steps, "batch": args.batch,
              "k": args.k, "heldout_rows": len(x_held),
              "train_sample_rows": TRAIN_SAMPLE_ROWS if logged else len(x_train), "threads": 1,
              "loadavg_start": os.getloadavg()[0],
              "note": args.note, "command": " ".join(sys.argv[1:] if argv is None else argv),
              "relu_coeffs": args.relu_coeffs, "dl_l1": dl_l1, "train_rms": rms,
              "match_l0": args.match_l0 or args.k, "rows": []}
    t_all, cpu0 = time.time(), os.times()
    if logged is not None:
        result.update(rows=logged, from_logs=args.rows, relu_coeffs=sorted({r["coeff"] for r in logged if r[
            "arch"] == "relu" and r["candidate"].startswith("saecache")}))
        if args.peers_python and args.peers:
            result["peer_versions"] = _peer_versions(args.peers_python)
        args.widths = sorted({r["width"] for r in logged})
    try:
        if peers is not None:
            result["peer_versions"] = ask({"op": "versions"})
        for width in (args.widths if logged is None else []):
            for seed in args.seeds:
                for arch in args.archs:
                    for name, coeff in candidates(arch, args.ablations, list(args.peers) if peers else [],
                                                  args.relu_coeffs, dl_l1):
                        row = {"width": width, "seed": seed, "arch": arch, "candidate": name,
                               **({"coeff": coeff} if coeff is not None else {})}
                        if name.startswith("saecache"):
                            spec = {"arch": arch, "width": width,
                                    **({"coeff": coeff} if arch == "relu" else {"k": args.k})}
                            run, sec, info = _ours(args.store, args.hook, spec, seed, args.tokens, args.batch,
                                                   ABLATIONS[name], scratch / f"runs-{name}-{arch}-{width}-{seed}")
                            res, row = evaluate(run, x_held), {**row, **info}
                            res["train_counts"] = evaluate(run, x_train, counts_only=True)["counts"]
                        else:
                            ans = ask({"name": name, "arch": arch, "width": width, "k": args.k, "seed": seed,
                                       "coeff": coeff, "d": result["d"], "batch": args.batch,
                                       "data": str(scratch / "rows.f16"), "offsets": str(scratch / "offsets.npy"),
                                       "heldout": str(scratch / "heldout.npy"), "result": str(scratch / "peer.npz"),
                                       "train_sample": str(scratch / "train_sample.npy")})
                            if "error" in ans:
                                print(f"{name} {arch}: {ans['error']}", file=sys.stderr)
                                continue
                            res, sec = dict(np.load(scratch / "peer.npz")), ans["seconds"]
                        row.update({**metrics(x_held, res), "train_s": round(sec, 1)})
                        result["rows"].append(row)
                        print(json.dumps(row), flush=True)
    finally:
        if peers is not None:
            peers.stdin.close()
            peers.wait(timeout=60)
    cpu = os.times()
    result["wall_s"] = round(time.time() - t_all) if logged is None else sum(r["train_s"] for r in logged)
    result["cpu_s"] = round(sum(cpu[:4]) - sum(cpu0[:4])) if logged is None else None
    result["summary"] = summarise(result["rows"])
    result["targets"] = targets(result["summary"])
    result["matched_l0"] = [matched_l0(result["rows"], w, result["match_l0"]) for w in args.widths
                            if any(r["arch"] == "relu" and r["width"] == w for r in result["rows"])]
    write_results(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
