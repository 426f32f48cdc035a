"""Evaluate benchmark: `run_evaluation` on the offline demo's shape (a 4-layer, width-128 Pythia-architecture model,
ctx 128, mlp_out.0..3 harvested, 16 SAEs = 4 hooks x {ReLU, TopK-32} x widths {1024, 4096}, 96 spliced contexts,
~14k held-out rows per SAE as with the demo's 2 % of 700k tokens).

Reference measured in the same run: one bare forward of the full model (with logits) over the same 96 contexts. An
evaluation needs at least 2 forwards per SAE (clean and spliced; the zero/mean-ablated ones are shared per hook), so
`ratio_eval_vs_bare_forward / 16` says how many forward-equivalents each SAE costs in total (stats pass, splicing,
report). Reported for torch's default thread count and for `threads=1`.

Usage: python -m bench.bench_evaluate [--tokens 131072] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LAYERS, HIDDEN, CTX, N_CTX, WIDTHS, K = 4, 128, 128, 96, (1024, 4096), 32


def make_assets(root: Path) -> tuple[Path, Path]:
    from saecache.data.corpus import collect_sources, write_pile_jsonl_zst
    from saecache.data.tiny_model import init_model, tiny_neox_config
    from saecache.data.tokenizer import load_pythia_tokenizer, neox_tokenizer_path, train_bpe

    corpus = root / "corpus.jsonl.zst"
    write_pile_jsonl_zst(corpus, collect_sources(max_bytes=3_000_000, include=("stdlib",)))
    tok = load_pythia_tokenizer() if neox_tokenizer_path() else train_bpe([corpus], 8192)
    vocab = 50304 if len(tok) > 8192 else 8192
    model_dir = init_model(tiny_neox_config(vocab, hidden=HIDDEN, layers=LAYERS, intermediate=4 * HIDDEN), 0,
                           root / "model", tok)
    return model_dir, corpus


def make_runs(root: Path, store: str) -> list[str]:
    """16 random dictionaries in dictionary_learning's format, imported as run dirs."""
    from saecache.evaluate.convert import import_run

    g = torch.Generator().manual_seed(0)
    runs = []
    for layer in range(LAYERS):
        for width in WIDTHS:
            for cls in ("AutoEncoder", "AutoEncoderTopK"):
                src = root / f"dl-{layer}-{width}-{cls}"
                src.mkdir()
                enc = torch.randn(width, HIDDEN, generator=g) / HIDDEN ** 0.5
                sd = {"encoder.weight": enc, "encoder.bias": torch.zeros(width), "decoder.weight": enc.T.clone()}
                trainer = {"dict_class": cls, "activation_dim": HIDDEN, "dict_size": width}
                if cls == "AutoEncoder":
                    sd["bias"] = torch.zeros(HIDDEN)
                else:
                    sd.update(b_dec=torch.zeros(HIDDEN), k=torch.tensor(K, dtype=torch.int32), threshold=torch.tensor(-1.0))
                    trainer["k"] = K
                torch.save(sd, src / "ae.pt")
                (src / "config.json").write_text(json.dumps({"trainer": trainer}))
                runs.append(import_run(str(src), str(root / f"run-{layer}-{width}-{cls}"), f"mlp_out.{layer}",
                                       store_url=store))
    return runs


def bare_forward_seconds(model_dir: Path, ids: np.ndarray, batch: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(ids), batch):
            model(input_ids=torch.from_numpy(ids[b:b + batch].astype(np.int64)), use_cache=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--max-rows", type=int, default=14336)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default=None, help="Keep (and reuse) the model, store and runs here.")
    ap.add_argument("--threads", default="default,1", help="Thread counts to time, comma-separated.")
    args = ap.parse_args()
    from saecache.evaluate.config import EvalConfig
    from saecache.evaluate.runner import run_evaluation
    from saecache.harvest.config import HarvestConfig
    from saecache.harvest.run import run_harvest
    from saecache.harvest.store import Store

    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        root.mkdir(parents=True, exist_ok=True)
        store = str(root / "store.zarr")
        if not (root / "runs.json").exists():
            model_dir, corpus = make_assets(root)
            run_harvest(HarvestConfig(out=store, model=str(model_dir), dataset=str(corpus),
                                      hooks=tuple(f"mlp_out.{i}" for i in range(LAYERS)), ctx_len=CTX,
                                      tokens=args.tokens, device="cpu"), progress=False)
            (root / "runs.json").write_text(json.dumps(make_runs(root, store)))
        model_dir, runs = root / "model", json.loads((root / "runs.json").read_text())
        ids = np.asarray(Store.open(store).contexts(0, N_CTX))
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        result = {"model": f"random-init Pythia-architecture GPT-NeoX, {LAYERS} layers, hidden {HIDDEN}, vocab {vocab}",
                  "saes": len(runs), "n_contexts": N_CTX, "ctx_len": CTX, "widths": list(WIDTHS), "k": K,
                  "default_torch_threads": default_threads, "timings": []}
        for t in args.threads.split(","):  # each evaluation next to its reference under the same thread count
            threads = None if t == "default" else int(t)
            torch.set_num_threads(default_threads if threads is None else threads)
            bare = bare_forward_seconds(model_dir, ids, 8)
            torch.set_num_threads(default_threads)
            t0 = time.perf_counter()
            rows = run_evaluation(EvalConfig(run_dirs=runs, store=store, out=str(root / f"eval-{threads}"),
                                             n_contexts=N_CTX, max_rows=args.max_rows, device="cpu", threads=threads))
            secs = time.perf_counter() - t0
            result["rows_per_sae"] = rows[0]["n_rows"]
            result["timings"].append({"threads": threads or default_threads, "eval_seconds": round(secs, 2),
                                      "bare_forward_seconds": round(bare, 3),
                                      "ratio_eval_vs_bare_forward": round(secs / bare, 1),
                                      "forward_equivalents_per_sae": round(secs / bare / len(runs), 2)})
            write_results(result, Path(args.out))  # after each timing, so a partial run still leaves figures


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluate.json").write_text(json.dumps(result, indent=1))
    lines = ["# Evaluate benchmark", "", f"{result['model']}; {result['saes']} SAEs (4 hooks x ReLU/TopK-{K} x widths "
             f"{WIDTHS}), {N_CTX} spliced contexts of {CTX} tokens, {result['rows_per_sae']} rows per SAE for the "
             "statistics, histograms and feature pages on.", "",
             "| torch threads | run_evaluation s | one bare forward s (reference) | ratio | forward-equivalents per SAE |",
             "|---|---|---|---|---|"]
    lines += [f"| {t['threads']} | {t['eval_seconds']} | {t['bare_forward_seconds']} | {t['ratio_eval_vs_bare_forward']} "
              f"| {t['forward_equivalents_per_sae']} |" for t in result["timings"]]
    lines += ["", "Minimum possible: 7 forwards per hook per batch (clean, zero, mean + 4 SAEs) = 1.75 "
              "forward-equivalents per SAE; the rest is the softmax over the vocabulary, the statistics passes over the "
              "store, histograms and feature pages. The reference forward is timed once, right before its "
              "evaluation: on a machine shared with other jobs the load changes during a several-minute evaluation, "
              "so ratios are rough (compare the absolute seconds of the thread counts too)."]
    (out / "evaluate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
