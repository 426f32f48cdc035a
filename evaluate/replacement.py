"""Replacement-model evaluation: every layer's MLP output replaced at once by what a per-layer transcoder (PLT) set
predicts, the "replacement model" of circuit tracing (Anthropic 2025, "Circuit Tracing").

Two input modes, both reported (`ReplacementConfig.inputs`):
- `clean`: each transcoder reads the clean model's activation at its input hook (one clean forward records every
  input; a second forward runs with every MLP output replaced by those predictions). Its per-layer errors are the
  "error nodes" of the local replacement model an attribution graph is built on.
- `replaced`: each transcoder reads the replaced model's own activation, computed layer by layer in one forward
  (a hook at layer l's input encodes what the replaced run has there; the hook at layer l's output replaces it).
  Errors compound through depth: the figure of a replacement model run on its own.

Reported, over the same held-out contexts `saecache evaluate` uses (`runner.heldout_contexts_for`, intersected over
the runs): CE loss, % loss recovered against zero- and mean-ablating every replaced MLP at once, KL to the clean
model's next-token distribution (`splice.SpliceLosses`, with bootstrap intervals over contexts); per layer FVE, L0
and the relative error norm ‖y − ŷ‖/‖y‖ (`metrics.ReconAccumulator`, y the MLP's output in that mode's run); and each
layer spliced alone, as `saecache evaluate` does (in both modes alike: the layers before it are clean).

`Replacement` is the interface: per layer an input hook, an output hook, `encode(l, x)` and `decode(l, codes, xs)`
reading the codes of `sources(l)`: for a PLT set the layer itself; a cross-layer transcoder's layer l reads every
source l' <= l. Positions before `first_position` are never replaced and never counted (`splice`): the store's
first position, or 1 when the runs left BOS rows out of training (`replacement_run`, the rule `saecache evaluate`
follows).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from saecache.errors import RunDirError
from saecache.evaluate import metrics as M
from saecache.evaluate.config import MODES
from saecache.evaluate.runner import load_run_checked
from saecache.evaluate.splice import SpliceLosses, ce_per_context, model_logits, replace_from
from saecache.harvest.hooks import HookPoint, patch_output
from saecache.train.crosslayer import CrossLayerConfig, load_crosslayer
from saecache.train.rundir import WEIGHTS_FILE, read_cfg


class Replacement:
    """Predictors of several layers' MLP outputs. Layers are indexed 0..n-1 in model order (`layer_names` gives each
    one's block index); a subclass sets `hooks_in`, `hooks_out`, `widths` and implements `encode` / `decode`."""

    hooks_in: list[HookPoint]
    hooks_out: list[HookPoint]
    widths: list[int]
    layer_names: list[str]

    def __len__(self) -> int:
        return len(self.hooks_out)

    def sources(self, layer: int) -> list[int]:
        """Layers whose codes (and inputs) `decode(layer, ...)` reads."""
        return [layer]

    def encode(self, layer: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Dense codes f_NF of layer `layer`'s features from its input activations."""
        raise NotImplementedError

    def decode(self, layer: int, codes: dict[int, torch.Tensor], xs: dict[int, torch.Tensor]) -> torch.Tensor:
        """ŷ_ND of layer `layer`'s output from the codes (and inputs, for a skip term) of `sources(layer)`."""
        raise NotImplementedError


class TranscoderSet(Replacement):
    """A PLT set: one saecache transcoder (a run dir's SAE with hook_in != hook_out) per replaced layer."""

    def __init__(self, saes: list, hooks_in: list[HookPoint], hooks_out: list[HookPoint], layer_names: list[str]):
        self.saes, self.hooks_in, self.hooks_out, self.layer_names = saes, hooks_in, hooks_out, layer_names
        self.widths = [s.cfg.width for s in saes]

    def encode(self, layer, x_ND):
        sae = self.saes[layer]
        return sae.encode(x_ND.to(sae.W_dec_FD.device, torch.float32))

    def decode(self, layer, codes, xs):
        sae = self.saes[layer]
        x = xs[layer].to(sae.W_dec_FD.device, torch.float32) if hasattr(sae, "W_skip_DD") else None
        return sae.decode(codes[layer], x)


class CrossLayerReplacement(Replacement):
    """A cross-layer transcoder (`saecache.train.crosslayer.CrossLayer`, kind clt): source l reads layer l's input and
    writes every layer l' >= l, so layer l's prediction reads the codes of every source <= l."""

    def __init__(self, clt, hooks_in: list[HookPoint], hooks_out: list[HookPoint], layer_names: list[str]):
        self.clt, self.hooks_in, self.hooks_out, self.layer_names = clt, hooks_in, hooks_out, layer_names
        self.widths = [clt.cfg.n_features] * clt.cfg.n_layers

    def sources(self, layer):
        return list(range(layer + 1))

    def encode(self, layer, x_ND):
        m = self.clt
        code = m.act.encode(m, layer, x_ND.to(m.b_dec_LD.device, torch.float32))
        return code.f_BF if code.f_BF is not None else code.sparse.dense(m.cfg.n_features)

    def decode(self, layer, codes, xs):
        m = self.clt
        cfg = m.cfg
        y = m.b_dec_LD[layer].expand(codes[layer].shape[0], -1)
        for s in self.sources(layer):
            W_FD = getattr(m, f"W_dec_{s}").view(cfg.n_features, cfg.n_layers - s, cfg.d_out)[:, layer - s]
            y = y + codes[s] @ W_FD
        return y


def read_run(run_dir: str, device="cpu"):
    """(module, cfg.json) of a run dir: an `SAE`, or a `CrossLayer` when cfg.json's "sae" is a cross-layer config
    (it has a `kind`). Missing directory or files -> one-line RunDirError."""
    if os.path.isdir(run_dir) and "kind" in (read_cfg(run_dir).get("sae") or {}):
        cfg = read_cfg(run_dir)
        path = os.path.join(run_dir, WEIGHTS_FILE)
        if not os.path.exists(path):
            raise RunDirError(f"{run_dir} has no {WEIGHTS_FILE}: training did not finish")
        return load_crosslayer(CrossLayerConfig.from_dict(cfg["sae"]), path, device).eval(), cfg
    return load_run_checked(run_dir, device)


@dataclass
class ModeResult:
    """What one input mode gives: the whole replacement's loss figures and each layer's reconstruction statistics."""

    losses: SpliceLosses
    """CE of the replaced model ("spliced"), with every replaced MLP zero- and mean-ablated at once as baselines."""
    layers: list[dict]
    """Per layer: `metrics.ReconAccumulator.result()` (fve, l0, rel_error, ...) of y against ŷ in this mode's run."""


def _flat(t_BTD: torch.Tensor, first_position: int) -> torch.Tensor:
    """Rows of the counted positions, [B * (T - first_position), D]."""
    return t_BTD[:, first_position:].reshape(-1, t_BTD.shape[-1])


def _recording(model, hooks: dict[int, HookPoint], seen: dict[int, torch.Tensor]) -> contextlib.ExitStack:
    """Identity patches recording the tensor at each hook (a module called twice in one forward: its first call)."""
    stack = contextlib.ExitStack()
    for l, h in hooks.items():
        def record(t, l=l):
            seen.setdefault(l, t)
            return t
        stack.enter_context(patch_output(model, h, record))
    return stack


def _replacing(model, hooks: dict[int, HookPoint], new: Callable[[int, torch.Tensor], torch.Tensor],
               first_position: int) -> contextlib.ExitStack:
    """Patches replacing each hook's tensor t by new(layer, t) at positions >= first_position."""
    stack = contextlib.ExitStack()
    for l, h in hooks.items():
        stack.enter_context(patch_output(model, h, replace_from(first_position, lambda t, l=l: new(l, t))))
    return stack


def _encode_all(rep: Replacement, xs_BTD: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    return {l: rep.encode(l, x.reshape(-1, x.shape[-1])) for l, x in xs_BTD.items()}


def _predict(rep: Replacement, layer: int, codes: dict, xs_BTD: dict, shape) -> torch.Tensor:
    flat_x = {l: xs_BTD[l].reshape(-1, xs_BTD[l].shape[-1]) for l in rep.sources(layer)}
    return rep.decode(layer, codes, flat_x).reshape(*shape[:-1], -1)


@torch.no_grad()
def replacement_losses(model: torch.nn.Module, ids_CT: torch.Tensor, rep: Replacement, layers: list[int],
                       means: dict[int, torch.Tensor], first_position: int = 0, batch_size: int = 8,
                       modes: tuple[str, ...] = MODES) -> dict[str, ModeResult]:
    """Replace the MLP outputs of `layers` (indices into `rep`) at once, in each of `modes`, over contexts `ids_CT`.

    Per batch of contexts: one clean forward (recording every input the predictions read and the clean outputs),
    one forward with every layer of `layers` zero-ablated and one mean-ablated (`means[l]`: the store's mean of
    layer l's output), and one forward per mode. `layers` = [l] is "splice layer l alone"."""
    device = next(model.parameters()).device
    need_in = sorted({s for l in layers for s in rep.sources(l)})
    outs = {l: rep.hooks_out[l] for l in layers}
    base: dict[str, list[float]] = {"clean": [], "zero": [], "mean": []}
    per_mode = {m: {"ce": [], "kl": 0.0, "acc": {l: M.ReconAccumulator(rep.widths[l]) for l in layers}}
                for m in modes}
    count = 0
    for c0 in range(0, ids_CT.shape[0], batch_size):
        ids = ids_CT[c0:c0 + batch_size].to(device=device, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        mask[:, first_position:] = True

        # clean run, recording the inputs the predictions read and the outputs they replace
        xs: dict[int, torch.Tensor] = {}
        ys: dict[int, torch.Tensor] = {}
        with _recording(model, {l: rep.hooks_in[l] for l in need_in}, xs), _recording(model, outs, ys):
            clean = model_logits(model, ids)
        base["clean"] += ce_per_context(clean, ids, mask)
        ref = M.CleanReference(clean, ids, mask)
        del clean
        count += ref.count
        with _replacing(model, outs, lambda l, t: torch.zeros_like(t), first_position):
            base["zero"] += ce_per_context(model_logits(model, ids), ids, mask)
        with _replacing(model, outs, lambda l, t: means[l].to(t.device, t.dtype).expand_as(t), first_position):
            base["mean"] += ce_per_context(model_logits(model, ids), ids, mask)

        for mode in modes:
            st = per_mode[mode]
            if mode == "clean":  # predictions from the clean inputs, fixed before the replaced forward
                codes = _encode_all(rep, xs)
                preds = {l: _predict(rep, l, codes, xs, ys[l].shape) for l in layers}
                for l in layers:
                    st["acc"][l].update(_flat(ys[l], first_position), _flat(preds[l], first_position),
                                        _flat(codes[l].reshape(*ys[l].shape[:-1], -1), first_position))
                with _replacing(model, outs, lambda l, t: preds[l], first_position):
                    logits = model_logits(model, ids)
            else:  # layer by layer: each input read in the replaced run itself, encoded when the run reaches it
                seen: dict[int, torch.Tensor] = {}
                codes = {}

                def replace(l, t):
                    for s in rep.sources(l):
                        if s not in codes:
                            codes[s] = rep.encode(s, seen[s].reshape(-1, seen[s].shape[-1]))
                    pred = _predict(rep, l, codes, seen, t.shape)
                    st["acc"][l].update(_flat(t, first_position), _flat(pred, first_position),
                                        _flat(codes[l].reshape(*t.shape[:-1], -1), first_position))
                    return pred

                with _recording(model, {l: rep.hooks_in[l] for l in need_in}, seen), \
                        _replacing(model, outs, replace, first_position):
                    logits = model_logits(model, ids)
            st["ce"] += ce_per_context(logits, ids, mask)
            st["kl"] += ref.compare(logits)[1]
            del logits

    n = max(count, 1)
    mean_of = {k: sum(v) / n for k, v in base.items()}
    out = {}
    for mode, st in per_mode.items():
        losses = SpliceLosses(clean=mean_of["clean"], spliced=sum(st["ce"]) / n, zero=mean_of["zero"],
                              mean=mean_of["mean"], kl=st["kl"] / n, n_predictions=count,
                              n_contexts=int(ids_CT.shape[0]), per_context={**base, "spliced": st["ce"]})
        out[mode] = ModeResult(losses, [st["acc"][l].result() for l in layers])
    return out
