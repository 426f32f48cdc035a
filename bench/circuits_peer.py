"""The PLT-set peer of bench/bench_circuits.py: sparsify's transcoder (eai-sparsify 1.3, `SparseCoder` with
`transcode=True`), one per layer, trained with its own trainer's defaults on the rows saecache's seed-0 runs read, and
evaluated through saecache's replacement-model code.

Two halves:
- `worker()` runs in the peers' virtualenv (`<peers python> bench/circuits_peer.py`, its pins clash with ours; never
  imports saecache): one JSON request a line on stdin, answer on a stdout line starting with '@@'. It trains one
  transcoder as sparsify's `Trainer.fit` does at its defaults (SparseCoderConfig: k as asked, no skip connection;
  TrainConfig: optimizer signum = schedule-free SignSGD, lr 5e-3/sqrt(F/2^14), momentum 0.95, loss fvu, auxk_alpha 0,
  k_decay_steps 0): zero-initialised decoder, on the first step the encoder bias set to −mean(x)·W_encᵀ and b_dec to
  mean(y), no decoder normalisation (transcoders skip it), evaluated at the schedule-free averaged weights. Raw
  activations, no normalisation (sparsify has none). It saves the weights as safetensors.
- `sparsify_reports()` (main process) dumps the rows, asks the worker per layer, and evaluates the loaded set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def _train(req: dict) -> dict:
    import torch
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from safetensors.torch import save_file
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(req["seed"])
    d_in, d_out, width, k = req["d_in"], req["d_out"], req["width"], req["k"]
    xs = np.memmap(req["x"], dtype=np.float16, mode="r").reshape(-1, d_in)
    ys = np.memmap(req["y"], dtype=np.float16, mode="r").reshape(-1, d_out)
    off = np.load(req["offsets"])
    if d_in != d_out:
        raise ValueError("sparsify's SparseCoder decodes to its input width")
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=width, k=k, transcode=True), device="cpu",
                      dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (width / 2 ** 14) ** 0.5}]),
                              momentum=0.95)
    opt.train()
    for s in range(len(off) - 1):
        x = torch.from_numpy(xs[off[s]:off[s + 1]].astype(np.float32))
        y = torch.from_numpy(ys[off[s]:off[s + 1]].astype(np.float32))
        if s == 0:
            sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T
            sae.b_dec.data = y.mean(0)
        out = sae(x=x, y=y, dead_mask=None)
        out.fvu.backward()
        opt.step()
        opt.zero_grad()
    opt.eval()
    save_file({"W_enc": sae.encoder.weight.data.contiguous(), "b_enc": sae.encoder.bias.data.contiguous(),
               "W_dec": sae.W_dec.data.contiguous(), "b_dec": sae.b_dec.data.contiguous()}, req["result"])
    return {"steps": len(off) - 1}


def worker() -> None:
    import torch
    torch.set_num_threads(1)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req.get("op") == "versions":
                from importlib.metadata import version
                ans = {p: version(p) for p in ("torch", "eai-sparsify")}
            else:
                ans = _train(req)
        except Exception as e:  # report, keep serving
            ans = {"error": f"{type(e).__name__}: {e}"}
        print("@@" + json.dumps(ans), flush=True)


def _dump_rows(cfg, store: str, hooks: list[str], scratch: Path) -> None:
    """The batches saecache's loader serves the seed-0 runs of train_circuits (same seed, batch, held-out split),
    BOS rows left out as its trainer does, as raw fp16 per hook, with each step's row offsets."""
    import torch

    from saecache.data.demo import heldout_fraction
    from saecache.harvest.split import Split
    from saecache.train.loader import Loader, open_stores

    stores = open_stores([store], hooks)
    loader = Loader(stores, hooks, cfg.batch_size, cfg.seed, dtype=torch.float16,
                    split=Split.for_training(stores, heldout_fraction(cfg), train_on_bos=False))
    offsets = [0]
    files = {h: open(scratch / f"{h}.f16", "wb") for h in hooks}
    for _ in range(-(-cfg.train_tokens // cfg.batch_size)):
        b = next(loader)
        for h in hooks:
            files[h].write(b[h].numpy().tobytes())
        offsets.append(offsets[-1] + len(b[hooks[0]]))
    loader.close()
    for f in files.values():
        f.close()
    np.save(scratch / "offsets.npy", np.asarray(offsets, dtype=np.int64))


def _sparsify_set(weights: list[dict], hooks_in, hooks_out, layer_names, k: int):
    """A PLT set of sparsify transcoders as a saecache `Replacement`: its encode/decode on raw activations, TopK of
    ReLU(x W_encᵀ + b_enc), then f W_dec + b_dec."""
    import torch

    from saecache.evaluate.replacement import Replacement

    class SparsifySet(Replacement):
        def __init__(self):
            self.hooks_in, self.hooks_out, self.layer_names = hooks_in, hooks_out, layer_names
            self.widths = [w["W_enc"].shape[0] for w in weights]

        def encode(self, layer, x_ND):
            w = weights[layer]
            pre = torch.relu(x_ND.float() @ w["W_enc"].T + w["b_enc"])
            top = pre.topk(k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)

        def decode(self, layer, codes, xs):
            w = weights[layer]
            return codes[layer] @ w["W_dec"] + w["b_dec"]

    return SparsifySet()


def sparsify_reports(args, cfg, model_dir, store: str, layers: int, runs: dict, work: Path) -> tuple[dict, dict]:
    """({'sparsify PLT set k=..': [report]} for each k of the bench (seed 0: one read of the rows), the peer
    environment's versions)."""
    from safetensors.torch import load_file

    from saecache.data.circuits import circuit_hooks, plt_name
    from saecache.evaluate import runner as R
    from saecache.evaluate.replacement_run import load_replacement

    ins, outs = circuit_hooks(layers)
    scratch = work / "sparsify"
    scratch.mkdir(parents=True, exist_ok=True)
    _dump_rows(cfg, store, ins + outs, scratch)
    proc = subprocess.Popen([args.peers_python, str(Path(__file__))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)

    def ask(req: dict) -> dict:
        proc.stdin.write(json.dumps(req) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith("@@"):
                ans = json.loads(line[2:])
                if "error" in ans:
                    raise RuntimeError(f"sparsify peer: {ans['error']}")
                return ans
        raise RuntimeError("sparsify peer exited")

    versions = ask({"op": "versions"})
    st = R.open_store(store)
    d = st.hooks[ins[0]]["d"]
    out = {}
    for k in (args.k, args.k // 2):
        weights = []
        for i in range(layers):
            res = scratch / f"L{i}-k{k}.safetensors"
            ask({"x": str(scratch / f"{ins[i]}.f16"), "y": str(scratch / f"{outs[i]}.f16"),
                 "offsets": str(scratch / "offsets.npy"), "d_in": d, "d_out": st.hooks[outs[i]]["d"],
                 "width": args.width, "k": k, "seed": 0, "result": str(res)})
            weights.append(load_file(str(res)))
        rep = _sparsify_set(weights, [R.hook_point(st, h) for h in ins], [R.hook_point(st, h) for h in outs],
                           [str(i) for i in range(layers)], k)
        # the same held-out contexts as saecache's PLT set of this k
        suffix = "-seed0" if args.seeds > 1 else ""
        _, contexts = load_replacement([runs[plt_name(args.width, k, i) + suffix] for i in range(layers)], st, "cpu")
        out[f"sparsify PLT set k={k}"] = [_evaluate(cfg, model_dir, st, rep, contexts)]
    proc.stdin.close()
    proc.wait()
    return out, versions


def _evaluate(cfg, model_dir, store, rep, contexts) -> dict:
    """replacement_run.run_replacement's figures for a Replacement built here (both modes, no per-layer splice)."""
    import torch

    from saecache.evaluate import runner as R
    from saecache.evaluate.config import ReplacementConfig
    from saecache.evaluate.replacement import replacement_losses

    rcfg = ReplacementConfig(run_dirs=["sparsify"], store=store.url, n_contexts=cfg.eval_contexts,
                             model=str(model_dir), device="cpu")
    model = R.load_store_model(store, rcfg)
    ids = R.splice_contexts(store, contexts, rcfg.n_contexts)
    means = {l: torch.as_tensor(store.stats(h.name)["mean"], dtype=torch.float32) for l, h in enumerate(rep.hooks_out)}
    first = store.header["storage"]["first_position"]
    res = replacement_losses(model, ids, rep, list(range(len(rep))), means, first, rcfg.ctx_batch_size, rcfg.modes)
    modes = {m: {**r.losses.as_dict(), "layers": r.layers} for m, r in res.items()}
    return {"contexts": list(contexts), "modes": modes}


if __name__ == "__main__":
    worker()
