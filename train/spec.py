"""`SAESpec`: one SAE of a training run's sweep, as a --config file's `saes` entry or the SAE flags give it.

Its own fields are checked here; its defaults (k, name, lr, warmup_steps, resample, decay_start and the options a run
resolves) are its architecture's, filled in by `SAESpec.resolved` through `Architecture.resolve` when a `TrainConfig`
takes it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from saecache.errors import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9_.=+-]+$")
_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_types(values: dict, cls, what: str) -> None:
    """One-line error for a JSON value of the wrong type in a scalar field of dataclass `cls` (int, float, bool, str,
    optionally `| None`), so a config typo never surfaces later as a traceback."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in values.items():
        parts = [t.strip() for t in str(types.get(name, "")).split("|")]
        if not parts or any(t not in _SCALARS and t != "None" for t in parts):
            continue  # not a plain scalar field: checked elsewhere
        if value is None and "None" in parts:
            continue
        ok = any(isinstance(value, _SCALARS[t]) and not (t != "bool" and isinstance(value, bool))
                 for t in parts if t in _SCALARS)
        if not ok:
            raise ConfigError(f"{what} field {name} must be {' or '.join(parts)}, got {value!r}")


def _is_cross_layer(arch: str) -> bool:
    from saecache.train.crosslayer import is_cross_layer  # torch: imported on use, so `train --help` stays light

    return is_cross_layer(arch)


@dataclass
class SAESpec:
    """One SAE of the sweep."""

    arch: str = "topk"
    """SAE architecture: relu, topk, batchtopk, jumprelu, gated, matryoshka or skip-transcoder; or a dictionary over
    several hooks (given `hooks_in`): clt, clt-batchtopk, clt-jumprelu (cross-layer transcoders), crosscoder,
    crosscoder-batchtopk, crosscoder-jumprelu (acausal crosscoders)."""
    width: int = 4096
    """Number of dictionary features F."""
    hook_in: str = ""
    """Store hook the SAE encodes (e.g. `mlp_out.0`)."""
    hook_out: str | None = None
    """Store hook the SAE reconstructs; unset: the hook it encodes (an SAE). A different hook makes a transcoder."""
    hooks_in: list[str] | None = None
    """Cross-layer dictionaries (clt*, crosscoder*) only, instead of --hook: the store hooks read, one per layer in
    layer order (e.g. `--hooks-in resid_mid.0 --hooks-in resid_mid.1`)."""
    hooks_out: list[str] | None = None
    """clt* only: the store hooks reconstructed, one per layer (e.g. `--hooks-out mlp_out.0 --hooks-out
    mlp_out.1`); unset: the hooks read (a crosscoder reconstructs what it reads)."""
    k: int | None = None
    """Active features per row of topk/batchtopk/matryoshka SAEs; unset: 32 (at most the width), as the peers.
    Only for those architectures."""
    penalty: str | None = None
    """Sparsity penalty: `l1` or `entropy` for relu/gated, `l0` for jumprelu; unset: the architecture's default."""
    coeff: float | None = None
    """Sparsity coefficient λ of the penalty; unset: the architecture's default (for E‖x‖² = 1 inputs)."""
    lr: float | None = None
    """Learning rate of this SAE; unset: the run's --lr, or when that is unset too its architecture family's
    default. The defaults: 1.2e-3 / sqrt(F / 2^14) for the TopK family (its cross-layer dictionaries: 8e-4 / sqrt(F /
    2^14)), 1e-3 for relu, 3e-4 for gated and jumprelu. Resolved before training, and cfg.json records the
    resolved value."""
    decay_start: int | None = None
    """Step from which this SAE's LR decays linearly to 0 at the last step; unset: the run's --decay-start, or
    when that is unset too the architecture's default. The run's step count means no decay. By default the TopK
    family decays over the last half of the run; relu/gated/jumprelu and every SAE that resamples do not.
    Resolved before training, and cfg.json records the resolved value."""
    warmup_steps: int | None = None
    """Steps of linear LR warm-up from 0 of this SAE; unset: the run's --warmup-steps, or when that is unset too the
    architecture's default: a tenth of the run, at most 1000 steps (the TopK family: at most 100). The warm-up
    restarts after every resample. Resolved before training, and cfg.json records the resolved value."""
    resample: bool | None = None
    """Resample this SAE's dead latents every --resample-steps (its LR then re-warms after each resample); unset:
    the architecture's default. On for relu/gated/jumprelu, off for topk/batchtopk/matryoshka (AuxK handles their
    dead latents). Resolved before training (off when the run has no --resample-steps), and cfg.json records the
    resolved value."""
    name: str | None = None
    """Directory name under --out; unset: derived from arch, hook and width (e.g. `topk-mlp_out.0-1024-k16`)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra SAE settings as a JSON object, passed through unchanged (e.g. `{"auxk_alpha": 0.03, "target_l0":
    30}`). They are fields of the `sae` record of cfg.json."""

    def __post_init__(self):
        """Checks of the spec's own fields; its defaults (k, name, lr, ...) are its architecture's, filled in by
        `resolved` when a TrainConfig takes it."""
        check_types(dataclasses.asdict(self), SAESpec, "SAE spec")
        if self.hooks_in is not None or self.hooks_out is not None or _is_cross_layer(self.arch):
            self._check_cross_layer_hooks(_is_cross_layer(self.arch))
        elif not self.hook_in:
            raise ConfigError("every SAE needs --hook (the store hook it reads; `hook_in` in a --config), e.g. "
                              "--hook mlp_out.0")
        if not isinstance(self.width, int) or self.width < 1:
            raise ConfigError(f"--width must be a positive integer, got {self.width!r}")
        if self.k is not None and not (isinstance(self.k, int) and 1 <= self.k <= self.width):
            raise ConfigError(f"--k must be an integer in [1, --width {self.width}], got {self.k!r}")
        if self.coeff is not None and not self.coeff >= 0:
            raise ConfigError(f"--coeff must be >= 0, got {self.coeff}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"an SAE's lr must be > 0, got {self.lr}")
        if self.decay_start is not None and self.decay_start < 0:
            raise ConfigError(f"an SAE's decay_start must be >= 0, got {self.decay_start}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"an SAE's warmup_steps must be >= 0, got {self.warmup_steps}")
        self._check_options()
        if self.name is not None and not _NAME_RE.match(self.name):
            raise ConfigError(f"SAE name {self.name!r} may only use letters, digits and _.=+-")

    def resolved(self, run) -> SAESpec:
        """This spec with its architecture's defaults for `run` (an `arch.RunDefaults`) filled in: k, name, lr,
        warmup_steps, resample, decay_start, and the options a run resolves (`arch.RUN_OPTIONS`).
        `Architecture.resolve` holds every rule; cfg.json records the result."""
        from saecache.train.arch import RUN_OPTIONS, architecture  # torch: imported on use (`train --help`)

        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "options"}
        c = architecture(self.arch).resolve({**self.options, **fields}, run)
        if not _NAME_RE.match(c["name"]):
            raise ConfigError(f"SAE name {c['name']!r} may only use letters, digits and _.=+-")
        resolved = ("k", "name", "lr", "warmup_steps", "resample", "decay_start")
        return dataclasses.replace(self, **{k: c[k] for k in resolved},
                                   options={**self.options, **{k: c[k] for k in RUN_OPTIONS if k in c}})

    @property
    def target_hook(self) -> str:
        return self.hook_out or self.hook_in

    @property
    def inputs(self) -> list[str]:
        """The store hooks this dictionary encodes: hooks_in, or [hook_in]."""
        return list(self.hooks_in) if self.hooks_in else [self.hook_in]

    @property
    def targets(self) -> list[str]:
        """The store hooks it reconstructs: hooks_out (else hooks_in), or [the target hook]."""
        if self.hooks_in:
            return list(self.hooks_out or self.hooks_in)
        return [self.target_hook]

    def _check_cross_layer_hooks(self, cross: bool) -> None:
        """hooks_in/hooks_out belong to the cross-layer architectures, which take no hook_in/hook_out."""
        if not cross:
            raise ConfigError(f"hooks_in/hooks_out are for the cross-layer architectures (clt, crosscoder, ...), not "
                              f"{self.arch}; give it hook_in (--hook)")
        if self.hook_in or self.hook_out:
            raise ConfigError(f"{self.arch} reads hooks_in (one hook per layer), not hook_in/hook_out; e.g. "
                              '"hooks_in": ["resid_mid.0", "resid_mid.1"], "hooks_out": ["mlp_out.0", "mlp_out.1"]')
        for name in ("hooks_in", "hooks_out"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, list) and v and all(isinstance(h, str) and h for h in v)):
                raise ConfigError(f"{name} must be a non-empty list of store hook names, got {v!r}")
        if self.hooks_in is None:
            raise ConfigError(f"{self.arch} needs hooks_in: the store hooks it reads, one per layer, e.g. "
                              '"hooks_in": ["resid_mid.0", "resid_mid.1"]')

    def _check_options(self) -> None:
        """Refuse options that are not settings of this spec's module (or of the wrong type) now, before any store is
        opened; their values are checked with the rest when the module is built."""
        from saecache.train.crosslayer import CrossLayerConfig  # torch: imported on use (`train --help`)
        from saecache.train.sae import SAEConfig  # torch: imported on use (`train --help`)

        if not isinstance(self.options, dict):
            raise ConfigError(f"--sae-options must be a JSON object of SAE settings, got {self.options!r}")
        cross = _is_cross_layer(self.arch)
        cls = CrossLayerConfig if cross else SAEConfig
        check_types(self.options, cls, "SAE option")
        fixed = {"kind", "activation", "hooks_in", "hooks_out", "d_in", "d_out", "n_features", "n_layers", "k",
                 "coeff"} if cross else {"arch", "d_in", "width", "d_out", "transcoder", "k", "penalty", "coeff"}
        known = {f.name for f in dataclasses.fields(cls)} - fixed
        bad = sorted(set(self.options) - known)
        if bad:
            what = f"{self.arch} option(s)" if cross else "SAE option(s)"
            raise ConfigError(f"unknown {what} {', '.join(bad)}; known: {', '.join(sorted(known))}")

    def cross_layer_config(self, d_in: int, d_out: int):
        """The `CrossLayerConfig` of a cross-layer spec, for hooks of widths d_in and d_out."""
        from saecache.train.arch import architecture  # torch: imported on use (`train --help`)
        from saecache.train.crosslayer import CrossLayerConfig  # torch: imported on use (`train --help`)

        arch = architecture(self.arch)
        fields = {"kind": arch.kind, "activation": arch.activation, "hooks_in": self.inputs, "hooks_out": self.targets,
                  "d_in": d_in, "d_out": d_out, "n_features": self.width, "k": self.k,
                  **({"coeff": self.coeff} if self.coeff is not None else {}), **self.options}
        try:
            return CrossLayerConfig(**fields)
        except TypeError as e:  # e.g. a string where a number belongs
            raise ConfigError(f"bad SAE options {self.options}: {e}") from None
