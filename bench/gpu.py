"""The benchmark to run the day a GPU is at hand (issue 11): one command, no network, about 5 minutes on a CUDA host.

    python -m bench.gpu [--device cuda] [--out bench/results]      # full size (Pythia-70m shape)
    python -m bench.gpu --tiny --device cpu --out OUTDIR            # the test suite's smoke run

Measures, each against a reference run in the same process in alternating rounds:
1. harvest of a Pythia-70m-shaped random-init GPT-NeoX with all 6 `mlp_out` hooks (forward with hooks, cast on the
   device, pinned copy, encode + write on the pipeline) vs a bare forward through the same 6 blocks;
2. loader rows/s of the harvested store into pinned batches copied to the device (non-blocking);
3. training tokens/s of TopK and BatchTopK 512 -> 32768 (k=32, batch 4096) vs the bare dense step on the device.
Writes `gpu.json` and `gpu.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FULL = dict(model=dict(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                       intermediate_size=2048), tokens=2_000_000, corpus_bytes=20_000_000, vocab=50000,
            width=32768, batch=4096, k=32, steps=20, ctx_batch=128)
TINY = dict(model=dict(vocab_size=512, hidden_size=64, num_hidden_layers=6, num_attention_heads=2,
                       intermediate_size=256), tokens=4096, corpus_bytes=300_000, vocab=512,
            width=1024, batch=256, k=32, steps=2, ctx_batch=16)
COMMON = dict(rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=2048, tie_word_embeddings=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_assets(root: Path, size: dict) -> tuple[Path, Path]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from saecache.data.corpus import collect_sources, write_pile_jsonl_zst
    from saecache.data.tokenizer import train_bpe

    corpus = root / "corpus.jsonl.zst"
    write_pile_jsonl_zst(corpus, collect_sources(max_bytes=size["corpus_bytes"], include=("stdlib",)))
    tok = train_bpe([corpus], size["vocab"], root / "tok")
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**size["model"], **COMMON)).eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir, corpus


def bare_forward_seconds(model_dir: Path, contexts: np.ndarray, batch: int, device: torch.device) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval().to(device)
    with torch.inference_mode():
        model.gpt_neox(input_ids=torch.from_numpy(contexts[:batch].astype(np.int64)).to(device))  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for b in range(0, len(contexts), batch):
            model.gpt_neox(input_ids=torch.from_numpy(contexts[b:b + batch].astype(np.int64)).to(device))
        sync(device)
    return time.perf_counter() - t0


def bench_harvest(root: Path, size: dict, device: torch.device, rounds: int) -> tuple[dict, str]:
    from saecache.harvest.config import HarvestConfig
    from saecache.harvest.run import run_harvest
    from saecache.harvest.store import Store

    model_dir, corpus = make_assets(root, size)
    layers = size["model"]["num_hidden_layers"]
    hooks = tuple(f"mlp_out.{i}" for i in range(layers))
    hv, bare, url = [], [], None
    for r in range(rounds):
        url = str(root / f"h{r}.zarr")
        cfg = HarvestConfig(out=url, model=str(model_dir), dataset=str(corpus), hooks=hooks, ctx_len=128,
                            tokens=size["tokens"], batch_size=size["ctx_batch"], device=str(device))
        s = run_harvest(cfg, progress=False)
        st = Store.open(url)
        hv.append(st.geometry.n_rows / s["loop_seconds"])
        bare.append(st.geometry.n_rows / bare_forward_seconds(model_dir, st.contexts(0, st.geometry.n_contexts),
                                                              size["ctx_batch"], device))
    return {"hooks": len(hooks), "rows": st.geometry.n_rows, "encode_workers": s["encode_workers"],
            "harvest_tokens_per_s": [round(v) for v in hv], "bare_forward_tokens_per_s": [round(v) for v in bare],
            "ratio": round(statistics.median(h / b for h, b in zip(hv, bare)), 3),
            "bytes_per_value": round(s["bytes_per_value"], 3)}, url


def bench_loader(url: str, batch: int, device: torch.device) -> dict:
    from saecache.train.loader import Loader, open_stores

    hook = "mlp_out.0"
    loader = Loader(open_stores([url], [hook]), [hook], batch, seed=0, dtype=torch.float32)
    n = max(1, loader.batches_per_epoch(0))
    pin = device.type == "cuda"
    next(loader)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(loader)[hook]
        b = (b.pin_memory() if pin else b).to(device, non_blocking=pin)
    sync(device)
    dt = time.perf_counter() - t0
    loader.close()
    return {"batch": batch, "batches": n, "rows_per_s": round(n * batch / dt), "pinned": pin}


def bench_train(size: dict, device: torch.device, rounds: int) -> dict:
    from bench.bench_train import ours_step_factory

    D, F, B = 512, size["width"], size["batch"]
    x = (torch.randn(B, D, generator=torch.Generator().manual_seed(0)) / D ** 0.5).to(device)

    def dense():
        W_enc = torch.nn.Parameter(torch.randn(D, F, device=device) / D ** 0.5)
        W_dec = torch.nn.Parameter(torch.randn(F, D, device=device) / F ** 0.5)
        b_enc, b_dec = torch.nn.Parameter(torch.zeros(F, device=device)), torch.nn.Parameter(torch.zeros(D, device=device))
        opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4)

        def step():
            loss = (torch.addmm(b_dec, torch.addmm(b_enc, x, W_enc).relu(), W_dec) - x).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def ours(arch):  # the step bench_train times on CPU, the trainer's gradient clip included
        step = ours_step_factory(arch, F, device, size["k"])
        return lambda: step(x)

    steps = {"dense": dense(), "topk": ours("topk"), "batchtopk": ours("batchtopk")}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(size["steps"]):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / size["steps"])
    res = {"d": D, "width": F, "k": size["k"], "batch": B}
    for name, t in times.items():
        res[f"{name}_tokens_per_s"] = round(B / statistics.median(t))
    for name in ("topk", "batchtopk"):
        res[f"{name}_vs_dense"] = round(statistics.median(d / t for d, t in zip(times["dense"], times[name])), 3)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run of every part (the test suite's)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    size, device = (TINY if args.tiny else FULL), torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"device": str(device), "device_name": name, "host_cores": os.cpu_count(), "size": "tiny" if args.tiny
              else "pythia-70m shape", "torch": torch.__version__}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result["harvest"], url = bench_harvest(Path(tmp), size, device, args.rounds)
        result["loader"] = bench_loader(url, size["batch"], device)
    result["train"] = bench_train(size, device, args.rounds)
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=1))
    h, lo, tr = result["harvest"], result["loader"], result["train"]
    lines = [f"# GPU benchmark ({result['size']}, {result['device_name']}, {result['host_cores']} host cores, "
             f"{result['seconds']} s)", "", "| measure | value | reference | ratio |", "|---|---|---|---|",
             f"| harvest, {h['hooks']} mlp_out hooks, tokens/s | {statistics.median(h['harvest_tokens_per_s']):,.0f} | "
             f"bare forward {statistics.median(h['bare_forward_tokens_per_s']):,.0f} | {h['ratio']} |",
             f"| loader rows/s into {'pinned ' if lo['pinned'] else ''}{result['device']} batches of {lo['batch']} | "
             f"{lo['rows_per_s']:,} | | |"]
    for arch in ("topk", "batchtopk"):
        lines.append(f"| {arch} {tr['d']}->{tr['width']} k={tr['k']} batch {tr['batch']}, tokens/s | "
                     f"{tr[f'{arch}_tokens_per_s']:,} | dense step {tr['dense_tokens_per_s']:,} | {tr[f'{arch}_vs_dense']} |")
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
