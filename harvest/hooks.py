"""Hook points: readable aliases per architecture family, activation capture in one forward pass, and output patching.

PyTorch forward (pre-)hooks do the work; this module adds what transformers does not have: a name -> module map per
architecture family (a registry keyed by `config.model_type`), the execution order of modules (measured once with a
2-token trace forward, so "stop after the deepest hook" is right even where registration order differs from call
order, as in Llama blocks), and an early stop that raises inside the deepest hook so later layers never run.

Aliases (`i` = block index, negative counts from the end; names are normalised to the positive index):

| alias          | module (GPT-NeoX / Llama / GPT-2)                              | io     | meaning                               |
|----------------|----------------------------------------------------------------|--------|---------------------------------------|
| `mlp_out.i`    | `gpt_neox.layers.i.mlp` / `model.layers.i.mlp` / `transformer.h.i.mlp` | output | what the MLP adds to the residual |
| `mlp_in.i`     | same MLP module                                                | input  | the MLP's input (after its layer norm)|
| `attn_out.i`   | `.attention` / `.self_attn` / `.attn`                          | output | first element of the attention output |
| `resid_pre.i`  | block `i`                                                      | input  | residual stream entering block `i`    |
| `resid_mid.i`  | the MLP's layer norm: `.post_attention_layernorm` / same / `.ln_2` | input | residual stream entering block `i`'s MLP branch, before its norm |
| `resid_post.i` | block `i`                                                      | output | residual stream leaving block `i`     |
| `embed`        | block 0                                                        | input  | = `resid_pre.0`                       |

`resid_mid.i` is what circuit-tracer's transcoders read (`hook_resid_mid`): in a sequential-residual block (Llama,
GPT-2, GPT-NeoX with `use_parallel_residual=False`) it is `resid_pre.i + attn_out.i`; in a parallel-residual GPT-NeoX
block (Pythia) attention and MLP both read the block's input, so there it equals `resid_pre.i` (both are the input of
the MLP's layer norm). Gemma2's pre-MLP norm is `pre_feedforward_layernorm`; OLMo2 has none (norms after the MLP), so
there `resid_mid.i` is the MLP's input, = `mlp_in.i`.

`embed` is defined as **the hidden state block 0 receives**: for GPT-NeoX and Llama that is the token embedding
(`embed_in` / `embed_tokens`, dropout is identity in eval); for GPT-2 it is `wte(ids) + wpe(positions)` — the token
plus learned position embedding — because that sum is what the residual stream starts from. It equals
`output_hidden_states=True` hidden_states[0] in every family. `resid_post.i` equals hidden_states[i+1], except that
transformers reports the LAST entry after the final layer norm; `resid_post.{L-1}` is before it.

Raw paths: `<dotted.module.path>:output` (first element if the output is a tuple) or `:input` (first positional
argument, or the `hidden_states` keyword if passed by keyword). `layers[3]` is accepted for `layers.3`.
A module called several times in one forward is captured at its first call.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from saecache.errors import ModelError


@dataclass(frozen=True)
class HookPoint:
    """One place to read activations from."""

    name: str
    """The user's spec normalised, e.g. "mlp_out.3" or "gpt_neox.layers.3.mlp:output"."""
    module: str
    """Dotted module path in the model, e.g. "gpt_neox.layers.3.mlp"."""
    io: str
    """"input" (first positional input of the module) or "output" (first element if a tuple)."""
    d: int
    """Width of the captured activation (last dimension)."""
    order: int
    """Execution order of this read in a forward pass (larger = later); the largest one is where the forward stops."""


@dataclass(frozen=True)
class Layout:
    """Where the pieces of a transformer family live, relative to the causal-LM model object."""

    blocks: str
    """Dotted path to the ModuleList of blocks."""
    attn: str
    """Attribute of a block holding the attention module."""
    mlp: str
    """Attribute of a block holding the MLP module."""
    ln_mlp: str = "post_attention_layernorm"
    """Attribute of a block holding the layer norm before the MLP (its input is `resid_mid`)."""


_LLAMA_LIKE = Layout(blocks="model.layers", attn="self_attn", mlp="mlp")
LAYOUTS: dict[str, Layout] = {
    "gpt_neox": Layout(blocks="gpt_neox.layers", attn="attention", mlp="mlp"),
    "gpt2": Layout(blocks="transformer.h", attn="attn", mlp="mlp", ln_mlp="ln_2"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": Layout(blocks="model.layers", attn="self_attn", mlp="mlp", ln_mlp="pre_feedforward_layernorm"),
    "olmo": _LLAMA_LIKE,
    "olmo2": Layout(blocks="model.layers", attn="self_attn", mlp="mlp", ln_mlp="mlp"),
}
"""model_type -> layout. A model whose type is not listed gets the first layout whose modules all exist in it."""

# alias kind -> (module path relative to the model, io), given the layout and a block index
ALIAS_KINDS: dict[str, Callable[[Layout, int], tuple[str, str]]] = {
    "mlp_out": lambda lay, i: (f"{lay.blocks}.{i}.{lay.mlp}", "output"),
    "mlp_in": lambda lay, i: (f"{lay.blocks}.{i}.{lay.mlp}", "input"),
    "attn_out": lambda lay, i: (f"{lay.blocks}.{i}.{lay.attn}", "output"),
    "resid_pre": lambda lay, i: (f"{lay.blocks}.{i}", "input"),
    "resid_mid": lambda lay, i: (f"{lay.blocks}.{i}.{lay.ln_mlp}", "input"),
    "resid_post": lambda lay, i: (f"{lay.blocks}.{i}", "output"),
}
BLOCK0_ALIASES: dict[str, Callable[[Layout], tuple[str, str]]] = {"embed": lambda lay: (f"{lay.blocks}.0", "input")}


def layer_of(hook: str) -> str:
    """The layer a hook name points at: its last number (`mlp_out.3` -> "3"), or the name itself when it has none."""
    m = re.search(r"(\d+)(?!.*\d)", hook)
    return m.group(1) if m else hook


class _StopForward(Exception):
    """Raised inside the deepest hook to end the forward pass early; never escapes ActivationCapture."""


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at dotted `path`; ModelError when there is none."""
    try:
        if not path:
            raise AttributeError(path)
        return model.get_submodule(path)
    except AttributeError:
        top = ", ".join(name for name, _ in model.named_children())
        raise ModelError(f"{type(model).__name__} has no module {path!r} (top-level modules: {top}); "
                         f"list them with model.named_modules()") from None


def _layout(model: torch.nn.Module) -> Layout | None:
    lay = LAYOUTS.get(getattr(getattr(model, "config", None), "model_type", None))
    candidates = [lay] if lay else list(dict.fromkeys(LAYOUTS.values()))
    for cand in candidates:
        try:
            blocks = model.get_submodule(cand.blocks)
            if len(blocks) and all(hasattr(blocks[0], a) for a in (cand.attn, cand.mlp)):
                return cand
        except (AttributeError, TypeError):
            continue
    return None


def _n_blocks(model: torch.nn.Module, lay: Layout) -> int:
    return len(model.get_submodule(lay.blocks))


def list_aliases(model: torch.nn.Module) -> list[str]:
    """Every alias valid for this model (empty when its family is unknown: raw paths still work)."""
    lay = _layout(model)
    if lay is None:
        return []
    n = _n_blocks(model, lay)
    return list(BLOCK0_ALIASES) + [f"{kind}.{i}" for kind in ALIAS_KINDS for i in range(n)]


def _valid_summary(model: torch.nn.Module) -> str:
    lay = _layout(model)
    raw = "or a raw module path with :input/:output"
    if lay is None:
        return f"no aliases for model type {getattr(model.config, 'model_type', '?')!r}; use a raw module path " \
               f"with :input/:output, e.g. <path.to.block.mlp>:output"
    last = _n_blocks(model, lay) - 1
    kinds = ", ".join(f"{k}.0..{last}" for k in ALIAS_KINDS)
    return f"valid: {', '.join(BLOCK0_ALIASES)}, {kinds}, {raw} (e.g. {lay.blocks}.0.{lay.mlp}:output)"


def _parse(model: torch.nn.Module, spec: str) -> tuple[str, str, str]:
    """spec -> (normalised name, module path, io)."""
    spec = spec.strip()
    if ":" in spec:
        path, io = spec.rsplit(":", 1)
        path = re.sub(r"\[(\d+)\]", r".\1", path.strip())
        if io not in ("input", "output"):
            raise ModelError(f"hook {spec!r}: the part after ':' must be 'input' or 'output'")
        get_module(model, path)
        return f"{path}:{io}", path, io
    lay = _layout(model)
    if lay is not None and spec in BLOCK0_ALIASES:
        return (spec, *BLOCK0_ALIASES[spec](lay))
    m = re.fullmatch(r"([a-z_]+)\.(-?\d+)", spec)
    if lay is not None and m and m.group(1) in ALIAS_KINDS:
        n, i = _n_blocks(model, lay), int(m.group(2))
        if -n <= i < n:
            i %= n
            return (f"{m.group(1)}.{i}", *ALIAS_KINDS[m.group(1)](lay, i))
    raise ModelError(f"unknown hook {spec!r}; {_valid_summary(model)}")


# ---- execution order, measured once per model with a tiny forward ----

_TRACES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _first_tensor(x) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "to_tuple"):
        return _first_tensor(x.to_tuple())
    return None


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    hs = kwargs.get("hidden_states")
    return hs if isinstance(hs, torch.Tensor) else None


def _trace(model: torch.nn.Module) -> dict[tuple[str, str], tuple[int, int | None]]:
    """(module path, io) -> (event index, width) for every module call in a 2-token forward pass."""
    if model in _TRACES:
        return _TRACES[model]
    events: dict[tuple[str, str], tuple[int, int | None]] = {}

    def width(t):
        return int(t.shape[-1]) if t is not None and t.dim() >= 1 else None

    def pre(path):
        def hook(mod, args, kwargs):
            events.setdefault((path, "input"), (len(events), width(_input_tensor(args, kwargs))))
        return hook

    def post(path):
        def hook(mod, args, output):
            events.setdefault((path, "output"), (len(events), width(_first_tensor(output))))
        return hook

    handles = []
    try:
        for path, mod in model.named_modules():
            if path:
                handles.append(mod.register_forward_pre_hook(pre(path), with_kwargs=True))
                handles.append(mod.register_forward_hook(post(path)))
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    _TRACES[model] = events
    return events


def resolve_hooks(model: torch.nn.Module, specs: Sequence[str]) -> list[HookPoint]:
    """Turn user specs (aliases or raw paths) into HookPoints; unknown spec -> ModelError listing the valid ones."""
    if not specs:
        raise ModelError(f"no hook points given; {_valid_summary(model)}")
    parsed = [_parse(model, s) for s in specs]
    names = [p[0] for p in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ModelError(f"hook point(s) given more than once: {', '.join(dupes)}")
    events = _trace(model)
    out = []
    for name, path, io in parsed:
        if (path, io) not in events:
            raise ModelError(f"hook {name!r}: module {path!r} is not called in a forward pass of this model")
        order, d = events[(path, io)]
        if d is None:
            raise ModelError(f"hook {name!r}: the module's {io} is not a tensor; pick another module or io")
        out.append(HookPoint(name=name, module=path, io=io, d=d, order=order))
    return out


class ActivationCapture:
    """Context manager that registers hooks and runs forwards returning {hook.name: acts_BTD}.

    With `stop_early` the forward ends inside the deepest hook (largest `order`), so later modules never run.
    Captured tensors are detached copies (later in-place ops in the model cannot alter them).
    """

    def __init__(self, model: torch.nn.Module, hooks: Sequence[HookPoint], stop_early: bool = True):
        if not hooks:
            raise ModelError("ActivationCapture needs at least one hook point")
        self.model, self.hooks, self.stop_early = model, list(hooks), stop_early
        self._deepest = max(self.hooks, key=lambda h: h.order)
        self._handles: list = []
        self._acts: dict[str, torch.Tensor] = {}

    def _make(self, hooks_here: list[HookPoint], io: str):
        stop = self.stop_early and any(h is self._deepest for h in hooks_here)

        def grab(t: torch.Tensor | None):
            for h in hooks_here:
                if h.name not in self._acts:
                    assert t is not None, f"hook {h.name}: no tensor at the module's {io}"
                    self._acts[h.name] = t.detach().clone()
            if stop:
                raise _StopForward

        if io == "input":
            return lambda mod, args, kwargs: grab(_input_tensor(args, kwargs))
        return lambda mod, args, output: grab(_first_tensor(output))

    def __enter__(self) -> "ActivationCapture":
        assert not self._handles, "ActivationCapture is not re-entrant"
        groups: dict[tuple[str, str], list[HookPoint]] = {}
        for h in self.hooks:
            groups.setdefault((h.module, h.io), []).append(h)
        for (path, io), hs in groups.items():
            mod = get_module(self.model, path)
            if io == "input":
                self._handles.append(mod.register_forward_pre_hook(self._make(hs, io), with_kwargs=True))
            else:
                self._handles.append(mod.register_forward_hook(self._make(hs, io)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __call__(self, ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One forward over `ids_BT` [B, T]; returns {hook.name: acts [B, T, D]}."""
        with contextlib.ExitStack() as stack:
            if not self._handles:
                stack.enter_context(self)
            self._acts = {}
            try:
                with torch.no_grad():
                    self.model(input_ids=ids_BT, attention_mask=attention_mask_BT, use_cache=False)
            except _StopForward:
                pass
            acts, self._acts = self._acts, {}
        missing = [h.name for h in self.hooks if h.name not in acts]
        assert not missing, f"hooks not reached in the forward pass: {missing}"
        return acts


@contextlib.contextmanager
def patch_output(model: torch.nn.Module, hook: HookPoint,
                 fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, replace the hooked tensor by `fn(tensor_BTD)`: the module's output (first element if a
    tuple) for io="output", its first positional input (or `hidden_states` keyword) for io="input"."""
    mod = get_module(model, hook.module)
    if hook.io == "output":
        def on_output(m, args, output):
            if isinstance(output, torch.Tensor):
                return fn(output)
            if isinstance(output, (tuple, list)):
                return type(output)([fn(output[0]), *output[1:]])
            raise ModelError(f"cannot patch {hook.name!r}: output of type {type(output).__name__}")
        handle = mod.register_forward_hook(on_output)
    else:
        def on_input(m, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        handle = mod.register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
