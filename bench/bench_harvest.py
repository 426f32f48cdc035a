"""Harvest benchmark (issue 3, acceptance 6) on a Pythia-70m-shaped random-init GPT-NeoX (hidden 512, 6 layers,
8 heads, intermediate 2048, vocab 50304, rotary_pct 0.25, parallel residual: compute-identical to the real model).

Reports, in one run:
- tokens/s of `saecache harvest` (the shard loop: forward with hooks, cast, permute, compress, write, checksum,
  publish) vs a bare forward truncated after the deepest hooked block, alternating the two to share machine noise;
- bytes per stored value for each dtype x codec, writing the same real activations through the store writer.

Usage: python -m bench.bench_harvest [--tokens 65536] [--out bench/results]
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

PYTHIA_70M = dict(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                  intermediate_size=2048, rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=2048,
                  tie_word_embeddings=False)
HOOK_LAYER = 3


def make_assets(root: Path) -> tuple[Path, Path]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from saecache.data.corpus import collect_sources, write_pile_jsonl_zst
    from saecache.data.tokenizer import load_pythia_tokenizer, neox_tokenizer_path, train_bpe

    corpus = root / "corpus.jsonl.zst"
    write_pile_jsonl_zst(corpus, collect_sources(max_bytes=8_000_000, include=("stdlib",)))
    tok = load_pythia_tokenizer() if neox_tokenizer_path() else train_bpe([corpus], 50000)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_70M)).eval()
    model_dir = root / "pythia-70m-shaped"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir, corpus


def bare_forward_seconds(model_dir: Path, contexts: np.ndarray, batch: int) -> float:
    """A bare forward through blocks 0..HOOK_LAYER (embedding + those blocks, nothing stored)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    model.gpt_neox.layers = model.gpt_neox.layers[:HOOK_LAYER + 1]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(contexts), batch):
            model.gpt_neox(input_ids=torch.from_numpy(contexts[b:b + batch].astype(np.int64)))
    return time.perf_counter() - t0


def harvest_seconds(model_dir: Path, corpus: Path, out: Path, tokens: int, batch: int) -> tuple[float, dict]:
    from saecache.harvest.config import HarvestConfig
    from saecache.harvest.run import run_harvest

    cfg = HarvestConfig(out=str(out), model=str(model_dir), dataset=str(corpus), hooks=(f"mlp_out.{HOOK_LAYER}",),
                        ctx_len=128, tokens=tokens, batch_size=batch, device="cpu")
    summary = run_harvest(cfg, progress=False)
    return summary["loop_seconds"], summary


def bytes_per_value(store_url: str, hook: str, root: Path) -> list[dict]:
    """Rewrite the harvested activations through the store writer for each dtype x codec."""
    from saecache.harvest.inspect import store_size
    from saecache.harvest.store import CODECS, Store
    from saecache.harvest.store.write import StoreWriter

    src = Store.open(store_url)
    x = src.read_acts_torch(hook, 0, src.geometry.n_rows).float()
    rows = []
    for dtype in ("float16", "bfloat16", "float32"):
        for codec in CODECS:
            header = json.loads(json.dumps(src.header))
            header["storage"]["dtype"], header["storage"]["codec"] = dtype, codec
            url = str(root / f"bpv-{dtype}-{codec}.zarr")
            w = StoreWriter(url, header)
            from saecache.harvest import quant
            from saecache.harvest.run import to_storage

            for s in range(w.geometry.n_shards):
                r0, r1 = w.geometry.shard_row_range(s)
                c0, c1 = w.geometry.shard_contexts(s)
                # unpermute: stored row j is unpermuted row perm[j]
                from saecache.harvest.store import shard_permutation

                perm = shard_permutation(header["seed"], s, r1 - r0)
                unperm = torch.empty_like(x[r0:r1])
                unperm[torch.from_numpy(perm)] = x[r0:r1]
                w.write_shard(s, {hook: quant.to_numpy(to_storage(unperm, dtype)[0], dtype)}, src.contexts(c0, c1))
            size = store_size(url)
            rows.append({"dtype": dtype, "codec": codec, "bytes_per_value": round(size["bytes_per_value"], 4),
                         "ratio_vs_raw": round(np.dtype(header["storage"]["dtype"] if dtype != "bfloat16" else
                                                        "uint16").itemsize / size["bytes_per_value"], 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, corpus = make_assets(root)
        from saecache.harvest.store import Store

        hv, bare, summary = [], [], None
        for i in range(args.repeats):
            secs, summary = harvest_seconds(model_dir, corpus, root / f"h{i}.zarr", args.tokens, args.batch)
            st = Store.open(str(root / f"h{i}.zarr"))
            n_rows = st.geometry.n_rows
            hv.append(n_rows / secs)
            contexts = st.contexts(0, st.geometry.n_contexts)
            bare.append(n_rows / bare_forward_seconds(model_dir, contexts, args.batch))
        result = {
            "model": "Pythia-70m-shaped random init (hidden 512, 6 layers, ffn 2048, vocab 50304)",
            "hook": f"mlp_out.{HOOK_LAYER}", "rows": n_rows, "ctx_len": 128, "batch_contexts": args.batch,
            "torch_threads": torch.get_num_threads(),
            "harvest_tokens_per_s": [round(v, 1) for v in hv],
            "bare_forward_tokens_per_s": [round(v, 1) for v in bare],
            "ratio_harvest_vs_bare": round(statistics.median(h / b for h, b in zip(hv, bare)), 3),
            "harvest_end_to_end_seconds": round(summary["seconds"], 2),
            "bytes_per_value": bytes_per_value(str(root / "h0.zarr"), f"mlp_out.{HOOK_LAYER}", root),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "harvest.json").write_text(json.dumps(result, indent=1))
    lines = ["# Harvest benchmark", "", f"{result['model']}, hook {result['hook']}, {result['rows']} rows, "
             f"ctx 128, batch {args.batch}, {result['torch_threads']} torch threads", "",
             f"- harvest tokens/s: {result['harvest_tokens_per_s']}",
             f"- bare truncated forward tokens/s: {result['bare_forward_tokens_per_s']}",
             f"- **ratio harvest / bare: {result['ratio_harvest_vs_bare']}** (target >= 0.95)", "",
             "| dtype | codec | bytes/value | compression ratio |", "|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['codec']} | {r['bytes_per_value']} | {r['ratio_vs_raw']} |"
              for r in result["bytes_per_value"]]
    (out / "harvest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
