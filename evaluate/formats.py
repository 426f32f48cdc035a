"""Other libraries' SAE formats: the library-neutral `DictWeights`, dictionary_learning import and export, and the
conversions to and from our `SAE` (SAELens reading and writing is in `saelens.py`).

Written by hand because neither library is a dependency (dictionary_learning pins nnsight<0.4; SAELens needs
TransformerLens) and both formats are small: a state dict plus a JSON config. Nothing is unpickled: foreign `.pt`
files go through `torch.load(weights_only=True)` and must hold a plain {name: tensor} state dict; we write safetensors.

Formats, as documented by their code (dictionary_learning `dictionary.py`, `trainers/{top_k,batch_top_k}.py`;
SAELens 6 `saes/*_sae.py`, `constants.py`, `SAE.save_model`). Checked by loading our exports with the libraries
themselves (dictionary_learning 0.1.0 `utils.load_dictionary`, sae-lens 6.54 `SAE.load_from_disk`): same outputs for
all five classes, and for matryoshka (dictionary_learning's `MatryoshkaBatchTopKSAE`, SAELens' `JumpReLUSAE`;
encode and reconstruction equal to ours, max difference 0.0). `pre` below is the encoder pre-activation.

| ours      | dictionary_learning class (ae.pt keys)                                                   | SAELens `architecture` (sae_weights.safetensors keys)        |
|-----------|------------------------------------------------------------------------------------------|--------------------------------------------------------------|
| relu      | AutoEncoder: encoder.weight [F,D], encoder.bias [F], decoder.weight [D,F], bias [D]       | standard: W_enc [D,F], b_enc [F], W_dec [F,D], b_dec [D]     |
| topk      | AutoEncoderTopK: encoder.weight, encoder.bias, decoder.weight, b_dec, k (int), threshold | topk: W_enc, b_enc, W_dec, b_dec; cfg `k`                    |
| batchtopk | BatchTopKSAE: same keys as AutoEncoderTopK; inference keeps f > threshold                | jumprelu with threshold [F] = the scalar (same inference map) |
| jumprelu  | JumpReluAutoEncoder: W_enc [D,F], b_enc, W_dec [F,D], b_dec, threshold [F]; no pre-bias   | jumprelu: W_enc, b_enc, W_dec, b_dec, threshold              |
| gated     | GatedAutoEncoder: encoder.weight [F,D] (no bias), r_mag, gate_bias, mag_bias, decoder.weight, decoder_bias | gated: W_enc, b_gate, r_mag, b_mag, W_dec, b_dec |
| matryoshka | MatryoshkaBatchTopKSAE: W_enc [D,F], b_enc, W_dec [F,D], b_dec, k, threshold, group_sizes [G] | jumprelu with threshold [F] = the scalar (SAELens saves its own Matryoshka SAEs so: nesting is training-only) |

The pre-bias: every class above except JumpReluAutoEncoder (and AutoEncoderNew) computes
`pre = (x - b_dec) @ W_enc + b_enc`; those two use `pre = x @ W_enc + b_enc`. When the source and target disagree the
encoder bias is rewritten so the map is unchanged: `b_enc' = b_enc + (a' - a) * b_dec @ W_enc` (a = 1 when b_dec is
subtracted). SAELens records its choice as `apply_b_dec_to_input`, so SAELens exports keep ours.

Transcoders go to SAELens 6's `transcoder` / `jumprelu_transcoder` (`transcoder_threshold_form`: the input centre
folded into b_enc) and to circuit-tracer (`circuit_tracer.py`). Refused, with a message: transcoders to
dictionary_learning (its classes reconstruct their own input: one width, one bias), TopK and gated transcoders
anywhere (no ReLU/JumpReLU form),
batchtopk without a recorded inference threshold, dictionary_learning classes not listed above.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import torch

from saecache.errors import RunDirError
from saecache.train.arch import Architecture, architecture, from_dl_class
from saecache.train.sae import SAE, SAEConfig

# dictionary_learning dict_class -> (expected ae.pt keys, trainer_class written on export). Which of our architectures
# a class is read as, and written from, is the architecture's `dl_classes`.
DL_CLASSES: dict[str, tuple[frozenset, str]] = {
    "AutoEncoder": (frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "bias"}), "StandardTrainer"),
    "AutoEncoderNew": (frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}),
                       "StandardTrainerAprilUpdate"),
    "AutoEncoderTopK": (frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"}),
                        "TopKTrainer"),
    "BatchTopKSAE": (frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"}),
                     "BatchTopKTrainer"),
    "JumpReluAutoEncoder": (frozenset({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}), "JumpReluTrainer"),
    "GatedAutoEncoder": (frozenset({"encoder.weight", "r_mag", "gate_bias", "mag_bias", "decoder.weight",
                                    "decoder_bias"}), "GatedSAETrainer"),
    "MatryoshkaBatchTopKSAE": (frozenset({"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"}),
                               "MatryoshkaBatchTopKTrainer"),
}
DL_NO_PRE_BIAS = {"JumpReluAutoEncoder", "AutoEncoderNew"}
DL_WEIGHTS_FILE, DL_CFG_FILE = "ae.pt", "config.json"


@dataclass
class DictWeights:
    """A dictionary in library-neutral form: pre = (x - a * b_dec_D) @ W_enc_DF + b_enc_F with a = pre_bias."""

    arch: Architecture
    """Our architecture (relu, topk, batchtopk, jumprelu, gated or matryoshka); its name is taken too, and looked up
    once, here."""
    W_enc_DF: torch.Tensor
    W_dec_FD: torch.Tensor
    b_dec_D: torch.Tensor
    b_enc_F: torch.Tensor
    """The encoder bias (gated: the gate bias b_gate)."""
    pre_bias: bool = True
    """Whether b_dec is subtracted from the input before the encoder."""
    k: int | None = None
    """Active features per row (topk, batchtopk, matryoshka)."""
    threshold: torch.Tensor | None = None
    """jumprelu: [F]; batchtopk / matryoshka / topk: a scalar inference threshold (negative = never set)."""
    group_sizes: list[int] | None = None
    """matryoshka: the nested groups' sizes (summing to F)."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """The architecture's `extra_F` (gated: r_mag_F, b_mag_F); a transcoder's input centre b_in_D."""
    meta: dict = field(default_factory=dict)
    """Provenance carried along: lm_name, layer, submodule_name, hook, io, ctx_len..."""
    transcoder: bool = False
    """Predicts another hook than its input (its input centre, if any, is extras["b_in_D"]); no export format has one."""

    def __post_init__(self):
        if isinstance(self.arch, str):
            self.arch = architecture(self.arch)

    @property
    def d_in(self) -> int:
        return self.W_enc_DF.shape[0]

    @property
    def width(self) -> int:
        return self.W_enc_DF.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec_FD.shape[1]

    def with_pre_bias(self, want: bool) -> DictWeights:
        """The same map rewritten for another pre-bias convention (see the module docstring)."""
        if want == self.pre_bias:
            return self
        sign = 1.0 if want else -1.0  # a' - a
        if self.d_in != self.d_out:
            raise RunDirError("cannot move the pre-bias of a transcoder (b_dec lives in the output space)")
        shift_F = sign * (self.b_dec_D.double() @ self.W_enc_DF.double())
        b_enc, extras = self.arch.move_pre_bias(self.b_enc_F, dict(self.extras), shift_F)
        return replace(self, b_enc_F=b_enc, extras=extras, pre_bias=want)


def _shape_error(name: str, key: str, got, want) -> RunDirError:
    return RunDirError(f"{name}: tensor {key!r} has shape {tuple(got)}, expected {tuple(want)}")


# --------------------------------------------------------------------------------------- dictionary_learning import


def load_plain_state_dict(path: str) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)` of a file that must hold {name: tensor}; anything else -> one-line RunDirError."""
    if not os.path.exists(path):
        raise RunDirError(f"{path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for pickled classes, RuntimeError/EOFError for non-torch or torn files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RunDirError(f"{path} is not a plain state dict readable with weights_only=True "
                          f"({type(e).__name__}: {first}); save it with torch.save(model.state_dict(), path)") from None
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = type(obj).__name__ if not isinstance(obj, dict) else \
            "a dict with non-tensor values: " + ", ".join(sorted(k for k, v in obj.items()
                                                                 if not isinstance(v, torch.Tensor))[:6])
        raise RunDirError(f"{path} is not a plain state dict (found {what}); a training backup holds the weights "
                          f"under 'ae': save that dict alone with torch.save(backup['ae'], path)")
    return obj


def read_dictionary_learning(src: str) -> DictWeights:
    """A dictionary_learning save dir (`ae.pt` + `config.json`) -> DictWeights (raw-activation weights)."""
    cfg_path, pt_path = os.path.join(src, DL_CFG_FILE), os.path.join(src, DL_WEIGHTS_FILE)
    if not os.path.exists(cfg_path):
        raise RunDirError(f"{src}: {DL_CFG_FILE} is missing (dictionary_learning saves ae.pt with config.json beside it)")
    with open(cfg_path) as f:
        config = json.load(f)
    trainer, buffer = config.get("trainer", {}), config.get("buffer", {})
    cls = trainer.get("dict_class")
    arch = from_dl_class(cls) if cls in DL_CLASSES else None
    if arch is None:
        raise RunDirError(f"{cfg_path}: dict_class {cls!r} is not supported; supported: {', '.join(DL_CLASSES)}")
    keys = DL_CLASSES[cls][0]
    sd = load_plain_state_dict(pt_path)
    if set(sd) != keys:
        raise RunDirError(f"{pt_path} does not match {cls}: missing {sorted(keys - set(sd))}, "
                          f"unexpected {sorted(set(sd) - keys)}")
    f32 = {k: v.detach().to(torch.float32) for k, v in sd.items()}
    if cls in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        W_enc, W_dec, b_enc, b_dec = f32["W_enc"], f32["W_dec"], f32["b_enc"], f32["b_dec"]
    elif cls == "GatedAutoEncoder":
        W_enc, W_dec, b_enc, b_dec = f32["encoder.weight"].T, f32["decoder.weight"].T, f32["gate_bias"], \
            f32["decoder_bias"]
    else:
        W_enc, W_dec, b_enc = f32["encoder.weight"].T, f32["decoder.weight"].T, f32["encoder.bias"]
        b_dec = f32.get("b_dec", f32.get("bias", f32.get("decoder.bias")))
    D, F = W_enc.shape
    if cls == "GatedAutoEncoder":
        extras = {"r_mag_F": f32["r_mag"], "b_mag_F": f32["mag_bias"]}
    else:
        extras = {}
    for key, t, want in (("W_dec", W_dec, (F, D)), ("b_dec", b_dec, (D,)), ("b_enc", b_enc, (F,)),
                         *((k, t, (F,)) for k, t in extras.items())):
        if tuple(t.shape) != want:
            raise _shape_error(pt_path, key, t.shape, want)
    w = DictWeights(arch, W_enc.contiguous(), W_dec.contiguous(), b_dec.contiguous(), b_enc.contiguous(),
                    pre_bias=cls not in DL_NO_PRE_BIAS, extras=extras)
    if "group_sizes" in keys:
        w.group_sizes = [int(s) for s in sd["group_sizes"].tolist()]
        if sum(w.group_sizes) != F or min(w.group_sizes) < 1:
            raise RunDirError(f"{pt_path}: group_sizes {w.group_sizes} are not positive sizes summing to {F}")
    if "k" in keys:
        w.k = int(sd["k"].item())
        if not 1 <= w.k <= F:
            raise RunDirError(f"{pt_path}: k={w.k} outside [1, dict_size={F}]")
    if "threshold" in keys:  # per feature (jumprelu), else one scalar (kept for a topk, which infers without it)
        want = (F,) if arch.feature_threshold else ()
        w.threshold = f32["threshold"] if arch.feature_threshold else f32["threshold"].reshape(())
        if tuple(w.threshold.shape) != want:
            raise _shape_error(pt_path, "threshold", w.threshold.shape, want)
    for key, want in (("activation_dim", D), ("dict_size", F)):
        if key in trainer and trainer[key] != want:
            raise RunDirError(f"{cfg_path}: trainer.{key}={trainer[key]} but {DL_WEIGHTS_FILE} has {want}")
    w.meta = {"lm_name": trainer.get("lm_name"), "layer": trainer.get("layer"),
              "submodule_name": trainer.get("submodule_name"), "io": buffer.get("io"), "ctx_len": buffer.get("ctx_len"),
              "dict_class": cls, "trainer_class": trainer.get("trainer_class")}
    return w


# ------------------------------------------------------------------------------------------------------ exports


def _refuse_transcoder(w: DictWeights, target: str) -> None:
    if w.transcoder or w.d_in != w.d_out:
        raise RunDirError(f"cannot export a transcoder (d_in={w.d_in}, d_out={w.d_out}) to {target}: its SAE classes "
                          "reconstruct their own input (one width, one decoder bias)")


def transcoder_threshold_form(w: DictWeights, target: str) -> dict[str, torch.Tensor]:
    """A transcoder as {W_enc_DF, b_enc_F, W_dec_FD, b_dec_D} (+ threshold_F for a JumpReLU) with no input centring:
    the input centre is folded into the encoder bias, b_enc' = b_enc - b_in @ W_enc; batchtopk's (and matryoshka's)
    scalar inference threshold becomes a constant JumpReLU threshold. float32. Architectures without that form
    (`Architecture.threshold_form`) are refused."""
    if not w.arch.threshold_form:
        raise RunDirError(f"cannot export a {w.arch.name} transcoder to {target}: its transcoders encode with ReLU "
                          "or JumpReLU only; train relu, jumprelu or batchtopk (its inference threshold is a JumpReLU)")
    c = lambda t: t.detach().to(torch.float32).contiguous().cpu()  # noqa: E731
    b_enc = w.b_enc_F.double()
    if w.pre_bias:
        centre = w.extras.get("b_in_D", w.b_dec_D)
        if centre.shape[-1] != w.d_in:
            raise RunDirError(f"cannot export this transcoder to {target}: it centres its input but records no input "
                              f"centre of width {w.d_in} (b_in_D)")
        b_enc = b_enc - centre.double() @ w.W_enc_DF.double()
    out = {"W_enc_DF": c(w.W_enc_DF), "b_enc_F": c(b_enc), "W_dec_FD": c(w.W_dec_FD), "b_dec_D": c(w.b_dec_D)}
    threshold_F = w.arch.threshold_F(w.threshold, w.width, target)
    if threshold_F is not None:  # saecache's JumpReLU clamps its threshold at 0 too
        out["threshold_F"] = c(threshold_F.clamp_min(0))
    return out


def write_dictionary_learning(w: DictWeights, out: str, meta: dict | None = None) -> None:
    """Write `ae.pt` (a plain state dict, torch.save) and `config.json` as dictionary_learning saves them."""
    _refuse_transcoder(w, "dictionary_learning")
    if not w.arch.dl_classes:
        raise RunDirError(f"architecture {w.arch.name!r} has no dictionary_learning class")
    cls = w.arch.dl_classes[0]
    w = w.with_pre_bias(cls not in DL_NO_PRE_BIAS)
    c = lambda t: t.detach().to(torch.float32).contiguous().cpu()  # noqa: E731
    if cls == "JumpReluAutoEncoder":
        sd = {"W_enc": c(w.W_enc_DF), "b_enc": c(w.b_enc_F), "W_dec": c(w.W_dec_FD), "b_dec": c(w.b_dec_D),
              "threshold": c(w.threshold)}
    elif cls == "MatryoshkaBatchTopKSAE":
        sd = {"W_enc": c(w.W_enc_DF), "b_enc": c(w.b_enc_F), "W_dec": c(w.W_dec_FD), "b_dec": c(w.b_dec_D),
              "k": torch.tensor(int(w.k), dtype=torch.int32),
              "threshold": torch.tensor(w.arch.export_threshold(w.threshold, "dictionary_learning"),
                                        dtype=torch.float32),
              "group_sizes": torch.tensor(w.group_sizes, dtype=torch.int64)}
    elif cls == "GatedAutoEncoder":
        sd = {"encoder.weight": c(w.W_enc_DF.T), "decoder.weight": c(w.W_dec_FD.T), "decoder_bias": c(w.b_dec_D),
              "r_mag": c(w.extras["r_mag_F"]), "gate_bias": c(w.b_enc_F), "mag_bias": c(w.extras["b_mag_F"])}
    else:
        sd = {"encoder.weight": c(w.W_enc_DF.T), "encoder.bias": c(w.b_enc_F), "decoder.weight": c(w.W_dec_FD.T)}
        if cls == "AutoEncoder":
            sd["bias"] = c(w.b_dec_D)
        else:
            if w.arch.threshold:
                w.arch.export_threshold(w.threshold, "dictionary_learning")
            sd.update(b_dec=c(w.b_dec_D), k=torch.tensor(int(w.k), dtype=torch.int32),
                      threshold=(c(w.threshold).reshape(()) if w.threshold is not None
                                 else torch.tensor(-1.0, dtype=torch.float32)))
    m = {**w.meta, **(meta or {})}
    trainer = {"dict_class": cls, "trainer_class": DL_CLASSES[cls][1], "activation_dim": w.d_in,
               "dict_size": w.width, "lm_name": m.get("lm_name"), "layer": m.get("layer"),
               "submodule_name": m.get("submodule_name")}
    if w.k is not None:
        trainer["k"] = int(w.k)
    if w.group_sizes is not None:
        trainer.update(group_sizes=list(w.group_sizes), group_fractions=[s / w.width for s in w.group_sizes])
    buffer = {"d_submodule": w.d_in, "io": m.get("io") or "out", "ctx_len": m.get("ctx_len")}
    os.makedirs(out, exist_ok=True)
    torch.save(sd, os.path.join(out, DL_WEIGHTS_FILE))
    with open(os.path.join(out, DL_CFG_FILE), "w") as f:
        json.dump({"trainer": trainer, "buffer": buffer}, f, indent=1)


# ------------------------------------------------------------------------------------------- our SAE <-> neutral


def to_sae(w: DictWeights):
    """Our `SAE` computing the same map as `w` (the pre-bias convention is converted where the architectures differ)."""
    arch = w.arch
    w = w.with_pre_bias(arch.pre_bias)
    cfg = SAEConfig(arch=arch.name, d_in=w.d_in, width=w.width, d_out=w.d_out,
                    k=w.k if arch.needs_k else None, group_sizes=w.group_sizes)
    state = {k: v.clone() for k, v in SAE(cfg).state_dict().items()}  # buffers (dead counters...) at their defaults
    state.update(W_enc_DF=w.W_enc_DF, W_dec_FD=w.W_dec_FD, b_dec_D=w.b_dec_D, b_enc_F=w.b_enc_F)
    state.update({name: w.extras[name] for name in arch.extra_F})
    if arch.threshold_key is not None:
        state[arch.threshold_key] = w.threshold.reshape(state[arch.threshold_key].shape)
    if "tokens_since_fired_F" in state:
        state["tokens_since_fired_F"].zero_()
    return SAE.from_state(cfg, {k: v.detach().to(torch.float32) if v.is_floating_point() else v
                                for k, v in state.items()})


def from_sae(sae, meta: dict | None = None) -> DictWeights:
    """The neutral form of our `SAE` (raw-activation weights as saved in a run dir)."""
    c, arch = sae.cfg, sae.arch
    g = lambda name: getattr(sae, name).detach().to(torch.float32).cpu().clone()  # noqa: E731
    w = DictWeights(arch, g("W_enc_DF").contiguous(), g("W_dec_FD"), g("b_dec_D"), g("b_enc_F"),
                    pre_bias=arch.pre_bias, k=c.k, meta=dict(meta or {}), group_sizes=c.group_sizes,
                    extras={name: g(name) for name in arch.extra_F})
    w.transcoder = bool(c.transcoder)
    if w.transcoder:
        w.extras["b_in_D"] = g("b_in_D")
    if arch.threshold_key is not None:
        w.threshold = g(arch.threshold_key)
    elif (meta or {}).get("dl_threshold") is not None:
        w.threshold = torch.tensor(float(meta["dl_threshold"]))  # kept from an import, unused by inference
    return w
