"""Peer trainers of bench/bench_quality.py, run as a worker in the peers' own Python environment (their pins clash with
ours): `<peers python> bench/quality_peers.py` reads one JSON request a line on stdin and answers on a stdout line that
starts with '@@' (the libraries print). It never imports saecache; bench_quality imports `evaluate` from here.

Every peer trains on the rows bench_quality dumped (raw fp16, the store's own values, no normalisation: none of the
peers normalises by default), step s on rows offsets[s]:offsets[s+1], in order, with its own trainer's defaults, except
that warm-ups (and dictionary_learning's batchtopk threshold start) are capped at a tenth of the run: their fixed
1000/2000 steps would not end inside a ~1000-step run.

- dl: dictionary_learning's TopKTrainer / BatchTopKTrainer (k as asked) and, for relu, StandardTrainer (ReLU + L1 on
  f with unit-norm decoder columns, lr 1e-3; `coeff` is its l1_penalty, in the raw activations' units; LR and sparsity
  warm-ups capped). Evaluated with its AutoEncoder's encode/decode (batchtopk: the learned inference threshold).
- sparsify-adam / sparsify-signum: sparsify's SparseCoder with its Trainer.fit update sequence (b_dec = first batch
  mean, unit-norm decoder, fvu loss, gradient projection): Adam 2e-4/sqrt(F/2^14) with linear warm-up then linear decay
  to 0, or its signum default (schedule-free SignSGD, evaluated at the averaged weights). TopK only.
- saelens: SAELens' own `SAETrainer.fit` on a data provider that yields the dumped batches, with the
  `SAETrainerConfig` / `TopKTrainingSAEConfig` / `BatchTopKTrainingSAEConfig` defaults (Adam 3e-4 betas 0.9/0.999,
  constant LR, no warm-up so nothing to cap, grad-norm clip 1, decoder init norm 0.1, activations rescaled by decoder
  norm, AuxK coefficient 1, batchtopk threshold EMA 0.01, no activation normalisation). The LLM runner adds only the
  language model and its activation store around this trainer, so this is its recipe on a fixed row stream. One
  default does not transfer: a latent counts as dead for AuxK after `dead_feature_window` = 1000 steps without firing,
  so in a run of ~1000 steps its AuxK never switches on (nor does dictionary_learning's, whose window is 10M tokens).
  Evaluated as SAELens would ship it: `save_inference_model` then `SAE.load_from_disk` (batchtopk becomes a JumpReLU
  SAE at the learned threshold).

Long runs (bench/bench_long.py, op "long"): dl and sparsify-signum train over the whole dump as one schedule, in
pieces that survive the process: each request trains from the last saved state up to a step, saving the trainer's
whole state (module, optimizer, scheduler, dead counters) every `save_every` steps as safetensors + JSON (never
pickle), then evaluates there. A resumed run replays exactly what an uninterrupted one would (no randomness after
the init; sparsify-signum is evaluated at its averaged weights on a copy, the training weights left as they are).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ARCHS = {"dl": ("topk", "batchtopk", "relu"), "sparsify-adam": ("topk",), "sparsify-signum": ("topk",),
         "saelens": ("topk", "batchtopk")}


class Rows:
    """The dumped training rows, served step by step."""

    def __init__(self, path: str, offsets: str, d: int):
        self.data = np.memmap(path, dtype=np.float16, mode="r").reshape(-1, d)
        self.off, self.d = np.load(offsets), d

    def __len__(self) -> int:
        return len(self.off) - 1

    def __call__(self, s: int) -> torch.Tensor:
        return torch.from_numpy(self.data[self.off[s]:self.off[s + 1]].astype(np.float32))


def _encode_decode(encode, decode):
    return lambda x: (lambda f: (decode(f), f))(encode(x))


def _dl(arch: str, width: int, k: int, seed: int, rows: Rows, coeff: float | None):
    steps = len(rows)
    kw = dict(steps=steps, activation_dim=rows.d, dict_size=width, layer=0, lm_name="bench", seed=seed, device="cpu",
              warmup_steps=min(1000, steps // 10))
    if arch == "relu":
        from dictionary_learning.trainers.standard import StandardTrainer
        tr = StandardTrainer(**kw, sparsity_warmup_steps=min(2000, steps // 10),
                             **({} if coeff is None else {"l1_penalty": coeff}))
    elif arch == "topk":
        from dictionary_learning.trainers.top_k import TopKTrainer
        tr = TopKTrainer(**kw, k=k)
    else:
        from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
        tr = BatchTopKTrainer(**kw, k=k, threshold_start_step=min(1000, steps // 10))
    for s in range(steps):
        tr.update(s, rows(s))
    ae = tr.ae.eval()
    return _encode_decode(ae.encode, ae.decode)


def sparsify_step(sae, x: torch.Tensor, opt) -> None:
    """One update as sparsify's Trainer.fit makes it (auxk off: no dead mask): unit-norm decoder, forward, FVU
    backward, remove the gradient's decoder-parallel part, optimizer step. bench_train times the same step."""
    sae.set_decoder_norm_to_unit_norm()
    out = sae(x=x, y=x, dead_mask=None)
    out.fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()


def _sparsify(name: str, width: int, k: int, rows: Rows):
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig
    steps = len(rows)
    sae = SparseCoder(rows.d, SparseCoderConfig(num_latents=width, k=k), device="cpu", dtype=torch.float32)
    if name == "sparsify-adam":
        from transformers import get_linear_schedule_with_warmup
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (width / 2 ** 14) ** 0.5)
        sched = get_linear_schedule_with_warmup(opt, min(1000, steps // 10), steps)
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
        sparsify_step(sae, x, opt)
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


def _saelens(arch: str, width: int, k: int, rows: Rows, batch: int, scratch: str):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAE
    from sae_lens.training.sae_trainer import SAETrainer
    if arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE as Sae, TopKTrainingSAEConfig as Cfg
    else:
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE as Sae, BatchTopKTrainingSAEConfig as Cfg
    sae = Sae(Cfg(d_in=rows.d, d_sae=width, k=k, device="cpu"))
    cfg = SAETrainerConfig(total_training_samples=int(rows.off[-1]), train_batch_size_samples=batch, device="cpu",
                           lr_end=SAETrainerConfig.lr / 10)  # the runner config's post-init default (unused: constant)
    SAETrainer(cfg, sae, (rows(s) for s in range(len(rows)))).fit()  # stops after the last dumped row
    path = Path(tempfile.mkdtemp(prefix="saelens-", dir=scratch))
    sae.save_inference_model(path)
    inf = SAE.load_from_disk(path, device="cpu").eval()
    return _encode_decode(inf.encode, inf.decode)


# ------------------------------------------------------------------------------------------------------- long runs
def _encode_tree(obj, tensors: dict, path: str):
    """A JSON-able copy of a state dict tree; tensors go into `tensors` under their path, dicts with non-string keys
    (an optimizer's parameter indices) keep their keys' types."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode_tree(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _encode_tree(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def _decode_tree(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _decode_tree(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode_tree(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_tree(v, tensors) for v in obj]
    return obj


def save_state(state_dir: str, step: int, state: dict) -> None:
    """Write `state` (a tree of dicts, lists, tensors, numbers) as step-<step>/{state.safetensors, state.json} under
    `state_dir` (a temp dir renamed into place), then remove the older steps."""
    from safetensors.torch import save_file
    root = Path(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    tensors: dict = {}
    tree = _encode_tree(state, tensors, "s")
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "tree": tree}))
    tmp.rename(root / f"step-{step:09d}")
    for old in sorted(root.glob("step-*"))[:-1]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def load_state(state_dir: str) -> tuple[int, dict | None]:
    """(step, state) of the newest saved state under `state_dir`; (0, None) when there is none."""
    from safetensors.torch import load_file
    steps = sorted(Path(state_dir).glob("step-*")) if Path(state_dir).is_dir() else []
    if not steps:
        return 0, None
    meta = json.loads((steps[-1] / "state.json").read_text())
    return meta["step"], _decode_tree(meta["tree"], load_file(str(steps[-1] / "state.safetensors")))


class LongDL:
    """dictionary_learning's TopKTrainer / BatchTopKTrainer over the whole dump (warm-ups as in `_dl`)."""

    def __init__(self, arch: str, width: int, k: int, seed: int, rows: Rows):
        steps = len(rows)
        kw = dict(steps=steps, activation_dim=rows.d, dict_size=width, layer=0, lm_name="bench", seed=seed,
                  device="cpu", warmup_steps=min(1000, steps // 10), k=k)
        if arch == "topk":
            from dictionary_learning.trainers.top_k import TopKTrainer
            self.tr = TopKTrainer(**kw)
        else:
            from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
            self.tr = BatchTopKTrainer(**kw, threshold_start_step=min(1000, steps // 10))

    def step(self, s: int, x: torch.Tensor) -> None:
        self.tr.update(s, x)

    def state(self) -> dict:
        tr = self.tr
        return {"ae": tr.ae.state_dict(), "optimizer": tr.optimizer.state_dict(),
                "scheduler": tr.scheduler.state_dict(), "num_tokens_since_fired": tr.num_tokens_since_fired}

    def load(self, st: dict) -> None:
        tr = self.tr
        tr.ae.load_state_dict(st["ae"])
        tr.optimizer.load_state_dict(st["optimizer"])
        tr.scheduler.load_state_dict(st["scheduler"])
        tr.num_tokens_since_fired = st["num_tokens_since_fired"].clone()

    def runner(self):
        ae = self.tr.ae
        return _encode_decode(ae.encode, ae.decode)

    def dl_state(self) -> tuple[str, dict]:
        """(dict_class, state dict) as dictionary_learning saves this SAE."""
        return type(self.tr.ae).__name__, self.tr.ae.state_dict()


class LongSignum:
    """sparsify's SparseCoder with its default optimizer (schedule-free SignSGD, as in `_sparsify`)."""

    def __init__(self, width: int, k: int, rows: Rows):
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD
        self.width = width
        self.sae = SparseCoder(rows.d, SparseCoderConfig(num_latents=width, k=k), device="cpu", dtype=torch.float32)
        self.opt = ScheduleFreeWrapper(SignSGD([{"params": self.sae.parameters(),
                                                 "lr": 5e-3 / (width / 2 ** 14) ** 0.5}]), momentum=0.95)
        self.opt.train()

    def step(self, s: int, x: torch.Tensor) -> None:
        if s == 0:
            self.sae.b_dec.data = x.mean(0)
        sparsify_step(self.sae, x, self.opt)

    def state(self) -> dict:
        return {"sae": self.sae.state_dict(), "optimizer": self.opt.state_dict()}

    def load(self, st: dict) -> None:
        self.sae.load_state_dict(st["sae"])
        self.opt.load_state_dict(st["optimizer"])
        self.opt.train_mode = True  # the saved weights are the train-mode (y) point already

    def averaged(self):
        """A copy of the SAE at the averaged weights (what `opt.eval()` makes); the training weights stay."""
        import copy
        sae = copy.deepcopy(self.sae)
        with torch.no_grad():
            for p, q in zip(self.sae.parameters(), sae.parameters()):
                z = self.opt.state[p].get("z")
                if z is not None:
                    q.lerp_(end=z, weight=1 - 1 / self.opt.momentum)
        sae.set_decoder_norm_to_unit_norm()
        return sae

    def dl_state(self) -> tuple[str, dict]:
        """The averaged SAE as dictionary_learning's AutoEncoderTopK (the same map: topk of relu(W (x - b_dec) + b),
        decoded as f W_dec + b_dec), so saecache's `import` reads it."""
        sae = self.averaged()
        return "AutoEncoderTopK", {"encoder.weight": sae.encoder.weight.detach(),
                                   "encoder.bias": sae.encoder.bias.detach(),
                                   "decoder.weight": sae.W_dec.detach().T.contiguous(), "b_dec": sae.b_dec.detach(),
                                   "k": torch.tensor(sae.cfg.k, dtype=torch.int32), "threshold": torch.tensor(-1.0)}

    def runner(self):
        """The SAE at the averaged weights, as x -> (x_hat, f)."""
        sae = self.averaged()

        def run(x):
            out = sae(x=x, y=x, dead_mask=None)
            f = torch.zeros(x.shape[0], self.width).scatter_(1, out.latent_indices, out.latent_acts)
            return out.sae_out, f
        return run


LONG = {"dl": ("topk", "batchtopk"), "sparsify-signum": ("topk",)}
_live: dict = {}  # state_dir -> (trainer, next step): a worker continues a run without reloading it


def _long_trainer(req: dict, rows: Rows):
    """The live run of `req["state_dir"]`, or one built and restored from its saved state; returns (run, step)."""
    key = req["state_dir"]
    if key in _live:
        return _live.pop(key)
    torch.manual_seed(req["seed"])
    run = LongDL(req["arch"], req["width"], req["k"], req["seed"], rows) if req["name"] == "dl" else \
        LongSignum(req["width"], req["k"], rows)
    step, st = load_state(key)
    if st is not None:
        run.load(st)
    return run, step


def long_export(req: dict) -> dict:
    """Write the long run's SAE at its saved state as a dictionary_learning save dir (ae.pt, a plain state dict, and
    config.json) at `req["out"]`, for saecache's `import`."""
    rows = Rows(req["data"], req["offsets"], req["d"])
    run, step = _long_trainer(req, rows)
    _live[req["state_dir"]] = (run, step)
    cls, sd = run.dl_state()
    out = Path(req["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, out / "ae.pt")
    trainer = {"dict_class": cls, "activation_dim": req["d"], "dict_size": req["width"], "k": req["k"],
               "lm_name": "bench", "layer": 0, "steps_done": step}
    (out / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"io": "out"}}, indent=1))
    return {"step": step}


def long_run(req: dict) -> dict:
    """Train one long run from its last saved state up to step `until` (saving every `save_every` steps), then
    evaluate there: reconstruction of the held-out rows and firing counts over training rows `window`."""
    name, arch = req["name"], req["arch"]
    if arch not in LONG.get(name, ()):
        raise KeyError(f"{name} has no long {arch}")
    rows = Rows(req["data"], req["offsets"], req["d"])
    key = req["state_dir"]
    run, step = _long_trainer(req, rows)
    t0 = time.perf_counter()
    for s in range(step, req["until"]):
        run.step(s, rows(s))
        if (s + 1) % req["save_every"] == 0 or s + 1 == req["until"]:
            save_state(key, s + 1, run.state())
    step = max(step, req["until"])
    _live[key] = (run, step)
    seconds = time.perf_counter() - t0
    model = run.runner()
    res = evaluate(model, np.load(req["heldout"], mmap_mode="r"))
    lo, hi = req["window"]
    res["train_counts"] = evaluate(model, rows.data[lo:hi], counts_only=True)["counts"]
    np.savez(req["result"], **res)
    return {"seconds": seconds, "step": step}


def train(name: str, arch: str, width: int, k: int, seed: int, rows: Rows, batch: int, coeff: float | None,
          scratch: str):
    """Train one peer SAE; returns a function x → (x_hat, f)."""
    if arch not in ARCHS.get(name, ()):
        raise KeyError(f"{name} has no {arch}")
    torch.manual_seed(seed)
    if name == "dl":
        return _dl(arch, width, k, seed, rows, coeff)
    if name == "saelens":
        return _saelens(arch, width, k, rows, batch, scratch)
    return _sparsify(name, width, k, rows)


def evaluate(run, heldout: np.ndarray, chunk: int = 2048, counts_only: bool = False) -> dict:
    """Reconstruction, per-row L0 and per-feature firing counts over the held-out rows (the main process computes
    the metrics); `counts_only`: the firing counts alone (over the training-rows sample)."""
    xs, counts, l0 = [], None, []
    with torch.no_grad():
        for i in range(0, len(heldout), chunk):
            x_hat, f = run(torch.from_numpy(np.asarray(heldout[i:i + chunk], dtype=np.float32)))
            c = (f != 0).sum(0).numpy()
            counts = c if counts is None else counts + c
            if not counts_only:
                xs.append(x_hat.float().numpy())
                l0.append((f != 0).sum(1).numpy())
    if counts_only:
        return {"counts": counts}
    return {"x_hat": np.concatenate(xs), "counts": counts, "l0": np.concatenate(l0)}


def worker() -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req.get("op") == "versions":
                from importlib.metadata import PackageNotFoundError, version
                ans = {}
                for p in ("torch", "dictionary-learning", "sae-lens", "eai-sparsify"):
                    try:
                        ans[p] = version(p)
                    except PackageNotFoundError:  # a peer environment with only some of the peers
                        pass
            elif req.get("op") == "long":
                ans = long_run(req)
            elif req.get("op") == "long_export":
                ans = long_export(req)
            else:
                rows = Rows(req["data"], req["offsets"], req["d"])
                t0 = time.perf_counter()
                run = train(req["name"], req["arch"], req["width"], req["k"], req["seed"], rows, req["batch"],
                            req.get("coeff"), os.path.dirname(req["result"]))
                seconds = time.perf_counter() - t0
                res = evaluate(run, np.load(req["heldout"]))
                if req.get("train_sample"):  # firing counts over training rows every trainer saw
                    res["train_counts"] = evaluate(run, np.load(req["train_sample"], mmap_mode="r"),
                                                   counts_only=True)["counts"]
                np.savez(req["result"], **res)
                ans = {"seconds": seconds}
        except Exception as e:  # report, keep serving
            ans = {"error": f"{type(e).__name__}: {e}"}
        print("@@" + json.dumps(ans), flush=True)


if __name__ == "__main__":
    worker()
