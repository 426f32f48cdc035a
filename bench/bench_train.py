"""Training-step benchmark (issue 4, acceptance 5 and 6): tokens/s of one SAE optimizer step per architecture, on
Pythia-70m-sized activations (d=512), at widths 8192 and 32768, batch 4096, k=32, against a bare dense step measured
in the same run, and against the peer libraries when they are installed.

- Our step is exactly the trainer's: `sae.loss` → zero_grad → backward → project_decoder_grad_ → Adam → renorm.
- The bare dense step is the reference: x @ W_enc + b → relu → @ W_dec + b → squared error → backward → Adam; nothing
  else (no pre-bias, no penalty, no decoder constraint). "ratio" = reference seconds / candidate seconds, i.e. the
  candidate's tokens/s relative to the dense step's (> 1 is faster).
- Peers (dictionary_learning TopK and standard ReLU+L1 trainers, SAELens TopK, sparsify TopK) run their own training
  step (their trainer's update sequence, Adam) in a worker process of a separate Python environment, because their
  pins clash with ours. The main process sends the worker one "run one step of X" request at a time, so every
  candidate (ours, the reference, the peers) runs in the same interleaved rounds and shares the machine's noise.
- Each round runs every candidate once in a fresh order; the figure per candidate is the median over rounds of its
  step time, and the median over rounds of the paired ratio to that round's reference step.

Peer environment (anywhere outside the repository, e.g. PEERS=$HOME/saecache-peers; mkdir -p $PEERS):

    python3 -m venv $PEERS/venv
    $PEERS/venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > $PEERS/constraints.txt      # else pip may swap in a multi-GB CUDA build
    $PEERS/venv/bin/pip install -c $PEERS/constraints.txt sae-lens dictionary-learning eai-sparsify
    $PEERS/venv/bin/pip uninstall -y torchvision     # nnsight's CUDA-linked torchvision breaks transformers

Usage: python -m bench.bench_train [--peers-python $PEERS/venv/bin/python] [--widths 8192 32768]
       [--rounds 2] [--out bench/results]
Without --peers-python (or $SAECACHE_PEERS_PYTHON, which `make bench` picks up) only saecache is measured.
Targets of issue 15 (every architecture ≥ 0.8× the dense step, Matryoshka ≥ 0.8× our BatchTopK, TopK/BatchTopK
≥ 1.5× sparsify's TopK) are computed from the same paired rounds and listed under the table.
Wall time: one round costs the sum of every candidate's step, ~1.5 min at width 32768 on 2 free cores (the dense
ReLU-style steps dominate); a busy machine stretches that several-fold.
The worker is this same file run as a script by that interpreter (`<python> bench/bench_train.py --worker`); it does
not import saecache.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

D, BATCH, K = 512, 4096, 32
OURS = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")
PEERS = ("dl_standard", "dl_topk", "saelens_topk", "sparsify_topk")


def _adam(params, lr=1e-4):
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def dense_step_factory(width: int):
    """The bare dense step: the same two matmuls forward (and their backward) + Adam, nothing else."""
    g = torch.Generator().manual_seed(0)
    W_enc = torch.nn.Parameter(torch.randn(D, width, generator=g) / D ** 0.5)
    W_dec = torch.nn.Parameter(torch.randn(width, D, generator=g) / width ** 0.5)
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(width)), torch.nn.Parameter(torch.zeros(D))
    opt = _adam([W_enc, b_enc, W_dec, b_dec])

    def step(x):
        x_hat = torch.addmm(b_dec, torch.addmm(b_enc, x, W_enc).relu(), W_dec)
        loss = (x_hat - x).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def encoder_gemm_factory(width: int):
    """The encoder product alone, into a reused buffer: a floor for any exact TopK step (ours and sparsify's both
    compute every pre-activation before selecting), shown to size the TopK-vs-sparsify target."""
    g = torch.Generator().manual_seed(0)
    W_enc, b_enc = torch.randn(D, width, generator=g) / D ** 0.5, torch.zeros(width)
    z = torch.empty(BATCH, width)

    def step(x):
        torch.addmm(b_enc, x, W_enc, out=z)
    return step


def ours_step_factory(arch: str, width: int, device: str = "cpu", k: int = K):
    from saecache.train.config import TrainConfig
    from saecache.train.optim import make_optimizer, project_decoder_grad_, renorm_decoder_
    from saecache.train.sae import ARCHITECTURES, SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch, D, width, k=k if ARCHITECTURES[arch].needs_k else None)).to(device).train()
    opt = make_optimizer(sae, 1e-4)

    clip = TrainConfig.grad_clip  # the trainer's default gradient clip, as train_step applies it

    def step(x):
        out = sae.loss(x)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        project_decoder_grad_(sae)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
        opt.step()
        renorm_decoder_(sae)
    return step


def peer_step_factory(name: str, width: int):
    """One training step of a peer, following its own trainer's update sequence (Adam everywhere)."""
    torch.manual_seed(0)
    if name in ("dl_topk", "dl_standard"):
        if name == "dl_topk":
            from dictionary_learning.trainers.top_k import TopKTrainer as T
            trainer = T(steps=10**6, activation_dim=D, dict_size=width, k=K, layer=0, lm_name="bench", device="cpu")
        else:
            from dictionary_learning.trainers.standard import StandardTrainer as T
            trainer = T(steps=10**6, activation_dim=D, dict_size=width, layer=0, lm_name="bench", device="cpu")
        n = [1]  # step 0 initialises b_dec from a geometric median: not part of the steady-state step

        def step(x):
            trainer.update(n[0], x)
            n[0] += 1
        return step
    if name == "saelens_topk":
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=width, k=K, device="cpu"))
        opt = _adam(sae.parameters())
        dead = torch.zeros(width, dtype=torch.bool)

        def step(x):  # SAETrainer._train_step: forward pass, fired stats, backward, clip, Adam
            sae.train()
            out = sae.training_forward_pass(step_input=TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=1, is_logging_step=False))
            with torch.no_grad():
                out.feature_acts.bool().float().sum(-2).bool()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        return step
    if name == "sparsify_topk":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
        from sparsify import SparseCoder, SparseCoderConfig
        sae = SparseCoder(D, SparseCoderConfig(num_latents=width, k=K))
        opt = _adam(sae.parameters())

        from quality_peers import sparsify_step  # this worker runs as a script from bench/ (the peers' Python)

        return lambda x: sparsify_step(sae, x, opt)
    raise KeyError(name)


def make_batch(seed: int = 0) -> torch.Tensor:
    """Rows with E‖x‖² = 1 (the scale the trainer normalises to)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, D, generator=g) / D ** 0.5


def worker() -> None:
    """Peer worker: reads JSON requests on stdin, answers on stdout lines starting with '@@' (peers print)."""
    x, steps = make_batch(), {}
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "versions":
                from importlib.metadata import version
                ans = {p: version(p) for p in ("torch", "dictionary-learning", "sae-lens", "eai-sparsify")}
            elif req["op"] == "setup":
                steps = {n: peer_step_factory(n, req["width"]) for n in req["names"]}
                ans = {"ok": True}
            else:
                t0 = time.perf_counter()
                steps[req["name"]](x)
                ans = {"seconds": time.perf_counter() - t0}
        except Exception as e:  # report, keep serving
            ans = {"error": f"{type(e).__name__}: {e}"}
        print("@@" + json.dumps(ans), flush=True)


class PeerWorker:
    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError("peer worker exited")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# (candidate, reference, target): candidate's speed / reference's speed, median of per-round paired ratios
TARGETS = [(a, "dense", 0.8) for a in OURS] + [("matryoshka", "batchtopk", 0.8), ("topk", "sparsify_topk", 1.5),
                                              ("batchtopk", "sparsify_topk", 1.5)]


def paired_ratio(times: dict[str, list[float]], candidate: str, reference: str) -> float | None:
    """Median over rounds of reference step time / candidate step time (> 1: the candidate is faster)."""
    if not times.get(candidate) or not times.get(reference):
        return None
    return round(statistics.median(r / c for r, c in zip(times[reference], times[candidate])), 3)


def bench_width(width: int, rounds: int, peers: PeerWorker | None, peer_names: list[str],
                ours: tuple[str, ...] = OURS) -> tuple[list[dict], list[dict]]:
    x = make_batch()
    local = {"dense": dense_step_factory(width), "encoder_gemm": encoder_gemm_factory(width),
             **{a: ours_step_factory(a, width) for a in ours}}
    remote = []
    if peers is not None:
        ans = peers.ask(op="setup", width=width, names=peer_names)
        remote = list(peer_names) if ans.get("ok") else []
        if not remote:
            print(f"peers unavailable at width {width}: {ans}", file=sys.stderr)
    names = list(local) + remote
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(width)
    for r in range(rounds + 1):  # round 0 warms up (allocations, first-touch) and is discarded
        order = names[:]
        rng.shuffle(order)
        for n in order:
            if n in local:
                t0 = time.perf_counter()
                local[n](x)
                dt = time.perf_counter() - t0
            else:
                ans = peers.ask(op="step", name=n)
                if "error" in ans:
                    raise RuntimeError(f"{n}: {ans['error']}")
                dt = ans["seconds"]
            if r:
                times[n].append(dt)
        print(f"width {width} round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names if r), flush=True)
    rows = []
    for n in names:
        paired = [d / t for d, t in zip(times["dense"], times[n])]
        rows.append({"width": width, "candidate": n, "library": "saecache" if n in local else n.split("_")[0],
                     "step_s_median": round(statistics.median(times[n]), 4),
                     "tokens_per_s": round(BATCH / statistics.median(times[n])),
                     "ratio_vs_dense": round(statistics.median(paired), 3), "step_s_all": [round(t, 4) for t in times[n]]})
    targets = []
    for cand, ref, target in TARGETS:
        ratio = paired_ratio(times, cand, ref)
        if ratio is not None:
            targets.append({"width": width, "candidate": cand, "reference": ref, "ratio": ratio, "target": target,
                            "met": ratio >= target})
    return rows, targets


def write_results(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Training step speed (bench/bench_train.py)", "",
             f"d={D}, batch {BATCH}, k={K} (topk/batchtopk), CPU, torch {torch.__version__}, "
             f"{result['threads']} threads, {result['rounds']} rounds after 1 warm-up round, load average at start "
             f"{result['loadavg_start']}. ratio = bare dense step time / candidate step time (median of paired "
             f"per-round ratios); > 1 is faster than the dense step.", ""]
    if result.get("peer_versions"):
        lines += ["Peers: " + ", ".join(f"{k} {v}" for k, v in result["peer_versions"].items()), ""]
    lines += ["| width | candidate | step s (median) | tokens/s | ratio vs dense |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['width']} | {r['candidate']} | {r['step_s_median']:.3f} | {r['tokens_per_s']:,} | "
                     f"{r['ratio_vs_dense']:.2f} |")
    if result.get("targets"):
        lines += ["", "Targets (issue 15): speed of candidate / speed of reference, median of paired per-round ratios.",
                  "", "| width | candidate | reference | ratio | target | met |", "|---|---|---|---|---|---|"]
        lines += [f"| {t['width']} | {t['candidate']} | {t['reference']} | {t['ratio']:.2f} | ≥ {t['target']} | "
                  f"{'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    if result.get("note"):
        lines += ["", result["note"]]
    (out / "train.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peers-python", default=os.environ.get("SAECACHE_PEERS_PYTHON"),
                    help="python of the peer environment (default: $SAECACHE_PEERS_PYTHON; see module docstring)")
    ap.add_argument("--peers", nargs="*", default=list(PEERS))
    ap.add_argument("--widths", nargs="*", type=int, default=[8192, 32768])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--ours", nargs="*", default=list(OURS), help="our architectures to measure (default: all)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--note", help="a sentence for the results file (e.g. the machine was shared)")
    args = ap.parse_args()
    if args.worker:
        return worker()
    peers, versions = None, {}
    if args.peers_python:
        peers = PeerWorker(args.peers_python)
        versions = peers.ask(op="versions")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"threads": torch.get_num_threads(), "rounds": args.rounds, "loadavg_start": os.getloadavg()[0],
              "peer_versions": versions, "rows": [], "targets": [], "note": args.note}
    t0 = time.time()
    try:
        for w in args.widths:
            rows, targets = bench_width(w, args.rounds, peers, args.peers, tuple(args.ours))
            result["rows"] += rows
            result["targets"] += targets
    finally:
        if peers is not None:
            peers.close()
    result["wall_s"] = round(time.time() - t0, 1)
    write_results(Path(args.out), result)
    print((Path(args.out) / "train.md").read_text())


if __name__ == "__main__":
    main()
