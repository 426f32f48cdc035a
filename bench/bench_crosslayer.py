"""Cross-layer transcoder step benchmark (issue 20): the CLT TopK training step against a dense reference CLT step
(the same math through dense autograd), and a CLT's tokens/s against a per-layer transcoder (PLT) set with the same
total latents, all measured in the same interleaved rounds.

- "ours": `CrossLayer.loss` → zero_grad → backward → project_decoder_grad_ → Adam → renorm (the trainer's sequence
  without the gradient clip): sparse encode (`sparse_ops.sparse_encode`) and, per source layer, one sparse decode
  through its decoders to every later layer.
- "dense": the reference from the same weights: z = x W_encᵀ + b_enc, relu, per-row top-k scattered into a dense
  [B, F] f, every (source, target) decoder as a dense matmul, squared error summed over layers, backward, Adam.
- "plt": L TopK transcoders (`SAE`, arch topk, d_in → d_out, F per layer: the CLT's total latents), each stepped as
  the trainer does.
Ratio = reference seconds / candidate seconds (> 1: the candidate is faster), the median over rounds of the paired
ratio; tokens/s = batch / median step seconds.

Usage: python -m bench.bench_crosslayer [--sizes demo pythia] [--batch-pythia 4096] [--rounds 3] [--threads N]
       [--out bench/results]
Sizes: demo = the demo model (3 layers, d=128), F=1024 per layer, batch 1024, k=32; pythia = Pythia-70m (6 layers,
d=512), F=4096 per layer, k=32, batch --batch-pythia (4096 in the issue; the dense reference needs ~3 GB there).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from saecache.train.crosslayer import CrossLayer, CrossLayerConfig
from saecache.train.optim import make_optimizer, project_decoder_grad_, renorm_decoder_
from saecache.train.sae import SAE, SAEConfig

SIZES = {"demo": dict(L=3, D=128, F=1024, B=1024, k=32), "pythia": dict(L=6, D=512, F=4096, B=4096, k=32)}


def _clt(L, D, F, k) -> CrossLayer:
    torch.manual_seed(0)
    return CrossLayer(CrossLayerConfig(kind="clt", hooks_in=[f"resid_mid.{i}" for i in range(L)],
                                       hooks_out=[f"mlp_out.{i}" for i in range(L)], d_in=D, n_features=F, k=k)).train()


def ours_step(m: CrossLayer, opt, xs, ts) -> None:
    out = m.loss(xs, ts)
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    m.project_decoder_grad_()
    opt.step()
    m.renorm_decoder_()


class DenseCLT(torch.nn.Module):
    """The reference: the same weights as `m`, the definition through dense autograd."""

    def __init__(self, m: CrossLayer):
        super().__init__()
        L, F, D = m.cfg.n_layers, m.cfg.n_features, m.cfg.d_out
        self.k, self.L = m.cfg.k, L
        self.W_enc = torch.nn.ParameterList([torch.nn.Parameter(getattr(m, f"W_enc_{i}").detach().clone())
                                             for i in range(L)])
        self.b_enc = torch.nn.ParameterList([torch.nn.Parameter(getattr(m, f"b_enc_{i}").detach().clone())
                                             for i in range(L)])
        self.W_dec = torch.nn.ParameterList([torch.nn.Parameter(getattr(m, f"W_dec_{i}").detach().view(F, L - i, D)
                                                                .clone()) for i in range(L)])
        self.b_dec = torch.nn.Parameter(m.b_dec_LD.detach().clone())

    def loss(self, xs, ts):
        fs = []
        for i in range(self.L):
            a = torch.relu(xs[i] @ self.W_enc[i].t() + self.b_enc[i])
            top = a.topk(self.k, dim=1)
            fs.append(torch.zeros_like(a).scatter(1, top.indices, top.values))
        loss = 0.0
        for l in range(self.L):
            y = self.b_dec[l] + sum(fs[i] @ self.W_dec[i][:, l - i] for i in range(l + 1))
            loss = loss + (y - ts[l]).pow(2).sum(1).mean()
        return loss


def dense_step(ref: DenseCLT, opt, xs, ts) -> None:
    loss = ref.loss(xs, ts)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def plt_step(saes, opts, xs, ts) -> None:
    for sae, opt, x, t in zip(saes, opts, xs, ts):
        out = sae.loss(x, t)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        project_decoder_grad_(sae)
        opt.step()
        renorm_decoder_(sae)


def measure(size: str, L, D, F, B, k, rounds: int) -> dict:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(B, D, generator=g) for _ in range(L)]
    ts = [torch.randn(B, D, generator=g) for _ in range(L)]
    m = _clt(L, D, F, k)
    ref = DenseCLT(m)
    torch.manual_seed(0)
    saes = [SAE(SAEConfig("topk", D, F, d_out=D, transcoder=True, k=k)).train() for _ in range(L)]
    steps = {"ours": (ours_step, (m, make_optimizer(m, 1e-4))),
             "dense": (dense_step, (ref, make_optimizer(ref, 1e-4))),
             "plt": (plt_step, (saes, [make_optimizer(s, 1e-4) for s in saes]))}
    for fn, args in steps.values():  # warm-up (allocations, workspace buffers)
        fn(*args, xs, ts)
    times = {n: [] for n in steps}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(steps)
        rng.shuffle(order)
        for n in order:
            fn, args = steps[n]
            t0 = time.perf_counter()
            fn(*args, xs, ts)
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    ratio = lambda n: statistics.median(d / c for d, c in zip(times["dense"], times[n]))  # noqa: E731
    return {"size": size, "layers": L, "d": D, "features_per_layer": F, "batch": B, "k": k, "rounds": rounds,
            "seconds": med, "tokens_per_s": {n: B / s for n, s in med.items()},
            "ours_vs_dense": ratio("ours"), "plt_vs_dense": ratio("plt"),
            "clt_vs_plt_tokens": statistics.median(p / c for p, c in zip(times["plt"], times["ours"]))}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Cross-layer transcoder training step (TopK)", "",
             f"CPU, {meta['threads']} torch threads, torch {meta['torch']}; median over rounds; ratio = dense "
             "reference seconds / candidate seconds (paired per round). PLT set = one TopK transcoder per layer with "
             "the CLT's features per layer (same total latents).", "",
             "| size | L | d | F/layer | batch | k | CLT step s | dense ref s | CLT vs dense | CLT tok/s | PLT tok/s | "
             "CLT/PLT tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, t = r["seconds"], r["tokens_per_s"]
        lines.append(f"| {r['size']} | {r['layers']} | {r['d']} | {r['features_per_layer']} | {r['batch']} | {r['k']} "
                     f"| {s['ours']:.3f} | {s['dense']:.3f} | {r['ours_vs_dense']:.2f}× | {t['ours']:.0f} | "
                     f"{t['plt']:.0f} | {r['clt_vs_plt_tokens']:.2f} |")
    lines += ["", "Target (issue 20): CLT TopK step ≥ 2× the dense reference step."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--batch-pythia", type=int, default=SIZES["pythia"]["B"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for size in a.sizes:
        kw = dict(SIZES[size])
        if size == "pythia":
            kw["B"] = a.batch_pythia
        rows.append(measure(size, rounds=a.rounds, **kw))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpus": os.cpu_count()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crosslayer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "crosslayer.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
