"""The Python API: open a store, read its batches, load a trained SAE, splice it into a model (docs/api.md).

A thin facade over the stage code, so a teammate's own trainer reads exactly what `saecache train` reads:

- `open_store` opens `harvest.store.Store` (local path or any fsspec URL such as ``s3://``) and wraps it;
- `ActivationStore.batches` serves the training loader's batches (`train.loader.Loader`: its deterministic shuffled
  order, canonical partitions, the rows of a `harvest.split.Split`) or the held-out rows as evaluate reads them
  (`Split.heldout_batches`);
- `load_sae` is the run-dir loader evaluate uses (`evaluate.runner.load_run_checked`);
- `splice` is evaluate's own splice (`evaluate.splice.spliced`), the one behind every % loss recovered.

Nothing here is imported by ``import saecache`` until first use (the package's ``__getattr__``), and every stage
module is imported inside the functions, so ``saecache --help`` stays light. Errors are the package's `SaecacheError`
subclasses with a one-line message.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from saecache.errors import ConfigError

SPLITS = ("train", "heldout", "all")
"""`batches(split=...)`: the training rows (held-out contexts removed), only the held-out rows, or every row."""
IDS = ("context", "position", "token")
"""Per-row ids that `batches` serves like a hook (int64 tensors): the row's context id, position in it, token id."""


def open_store(url: str, storage_options: dict | None = None) -> ActivationStore:
    """Open a store for reading: a local path or an fsspec URL (``s3://bucket/x.zarr``; `storage_options` go to
    fsspec, e.g. ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}``)."""
    from saecache.harvest.store import Store

    return ActivationStore(Store.open(str(url), storage_options))


class ActivationStore:
    """A store, read-only. Attributes describe it; `batches` reads it. `.store` is the underlying
    `saecache.harvest.store.Store` (the full reader API of harvest/SPEC.md)."""

    def __init__(self, store):
        self.store = store

    def __repr__(self) -> str:
        return f"ActivationStore({self.url!r}, hooks={self.hooks}, rows={self.rows})"

    # -- what it holds
    @property
    def url(self) -> str:
        """Where the store is (credentials removed)."""
        return self.store.url

    @property
    def hooks(self) -> dict[str, int]:
        """Hook name -> activation width D, e.g. ``{"mlp_out.1": 128}``."""
        return {h: int(v["d"]) for h, v in self.store.hooks.items()}

    @property
    def rows(self) -> int:
        """Rows per hook (one per stored token position) when the store is complete."""
        return self.store.geometry.n_rows

    @property
    def n_contexts(self) -> int:
        """Contexts (fixed-length token windows); context ids are 0 .. n_contexts - 1."""
        return self.store.geometry.n_contexts

    @property
    def ctx_len(self) -> int:
        """Tokens per context."""
        return self.store.geometry.ctx_len

    @property
    def dtype(self) -> str:
        """Storage format of the activations (float16, float32, bfloat16 or a quantized format, SPEC.md)."""
        return self.store.logical_dtype

    @property
    def complete(self) -> bool:
        """Every shard written (a store still being harvested is not; `batches` needs a complete store)."""
        return self.store.is_complete

    @property
    def stats(self) -> dict[str, dict]:
        """Per hook: ``{"mean": [D] float64 array, "mean_sq_norm": float, "count": int, "nonfinite": int}`` from the
        store's statistics (what training normalises with)."""
        return {h: self.store.stats(h) for h in self.store.hooks}

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the activations come from: model, tokenizer, dataset, hook modules, seed, versions (the header)."""
        h = self.store.header
        keys = ("model", "tokenizer", "dataset", "ctx_len", "seed", "format_version", "package_version", "config")
        return {"hooks": {n: {k: v for k, v in d.items() if k in ("module", "io", "d")} for n, d in h["hooks"].items()},
                **{k: h[k] for k in keys if k in h}}

    def heldout_contexts(self, heldout_fraction: float | None = None) -> range:
        """Context ids held out from training at this fraction (default: `saecache train`'s)."""
        from saecache.harvest.split import Split

        return range(Split(_fraction(heldout_fraction)).cutoff(self.store), self.n_contexts)

    def tokens(self, c0: int, c1: int):
        """Token ids of contexts ``[c0, c1)`` as an int64 tensor ``[C, T]`` (what the model read)."""
        import torch

        return torch.from_numpy(np.asarray(self.store.contexts(c0, c1)).astype(np.int64))

    # -- reading
    def batches(self, hooks: str | Sequence[str], batch_size: int = 4096, seed: int = 0, split: str = "train",
                device: str = "cpu", *, steps: int | None = None, normalize: bool = False,
                heldout_fraction: float | None = None, dtype=None, partitions: int | None = None,
                train_on_bos: bool = True) -> Iterator:
        """Batches of rows: for one hook name a ``[B, D]`` tensor per batch; for a list of names a tuple of tensors
        in that order, row-aligned (row i of each is the same token). Names in `IDS` ("context", "position",
        "token") give that id of each row as int64 ``[B]``.

        - ``split="train"``: `saecache train`'s loader, same order for the same (seed, store, batch_size,
          partitions): shuffled, held-out contexts never served. `steps` batches (default: one epoch, no row
          twice; more runs on into the next epochs as training does).
        - ``split="heldout"``: exactly the held-out rows, each once, in storage order (rows are shuffled within
          their shard at harvest), as evaluate reads them; batches hold up to `batch_size` rows (at most `steps`
          batches); `seed` unused.
        - ``split="all"``: the train loader's order over every row (nothing held out).

        Values are the store's, as float32 (`dtype` to change); ``normalize=True`` divides each hook by the square
        root of its mean squared norm from the store's statistics, as `saecache train` does. BOS rows are served
        when the store holds them; ``train_on_bos=False`` leaves them out as `saecache train` does by default (the
        loader's row selection: batches stay `batch_size` rows; held out: as evaluate reads such a run's rows).
        `heldout_fraction` defaults to
        `saecache train`'s (0.01); `partitions` (default: train's 8) is part of the order, as in train. On CUDA,
        batches are pinned and copied non-blocking. Arguments are checked at the call."""
        import torch

        names = [hooks] if isinstance(hooks, str) else list(hooks)
        single = isinstance(hooks, str)
        if not names:
            raise ConfigError("batches: name at least one hook")
        if split not in SPLITS:
            raise ConfigError(f"batches: split {split!r} is not one of {', '.join(SPLITS)}")
        for h in names:
            if h not in IDS:
                self.store.require_hook(h)
        if len(set(names)) != len(names):
            raise ConfigError(f"batches: a hook is named twice in {names}")
        self.store.require_complete()
        if batch_size < 1:
            raise ConfigError(f"batches: batch_size {batch_size} must be >= 1")
        if steps is not None and steps < 0:
            raise ConfigError(f"batches: steps {steps} must be >= 0 (or None for one epoch)")
        fraction = _fraction(heldout_fraction)
        dtype = torch.float32 if dtype is None else dtype
        scale = {h: _scale(self.store, h) if normalize and h not in IDS else 1.0 for h in names}
        from saecache.harvest.split import Split

        rows = Split(fraction if split != "all" else 0.0, train_on_bos=bool(train_on_bos))
        if split == "heldout":
            if rows.cutoff(self.store) >= self.n_contexts:
                raise ConfigError("batches: heldout_fraction 0 holds nothing out; use split='all' for every row")
            gen = itertools.islice(self._heldout(names, batch_size, rows, dtype, device), steps)
        else:
            gen = self._loader(names, batch_size, seed, rows, dtype, device, steps, partitions)
        # checked above, read from here on: bad arguments fail at the call, not at the first batch
        return (_pick(batch, names, scale, single) for batch in gen)

    def _loader(self, names, batch_size, seed, split, dtype, device, steps, partitions):
        """The train loader, built now (it checks the batch size against the rows), read by the generator."""
        from saecache.train.config import TrainConfig
        from saecache.train.loader import Loader

        defaults = TrainConfig.__dataclass_fields__
        partitions = partitions or defaults["partitions"].default
        if batch_size % partitions:  # the loader's own message names train's flags
            raise ConfigError(f"batches: batch_size {batch_size} must be a multiple of partitions {partitions}")
        loader = Loader([self.store], names, batch_size, seed, split=split,
                        partitions=partitions, shuffle_chunks=defaults["shuffle_chunks"].default,
                        shuffle_run=defaults["shuffle_run"].default, dtype=dtype, device=device)
        return self._serve(loader, steps)

    @staticmethod
    def _serve(loader, steps):
        try:
            n = loader.batches_per_epoch(0) if steps is None else int(steps)
            for _ in range(n):
                yield next(loader)
        finally:
            loader.close()

    def _heldout(self, names, batch_size, split, dtype, device):
        import torch

        hooks = [h for h in names if h not in IDS]
        cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        for b in split.heldout_batches(self.store, hooks, batch_size, dtype):
            for h in names:
                t = b[h]
                if cuda:  # as the train loader does: pinned host memory, asynchronous copy
                    t = t.pin_memory().to(device, non_blocking=True)
                elif torch.device(device).type != "cpu":
                    t = t.to(device)
                b[h] = t
            yield b


def _pick(batch: dict, names: list[str], scale: dict[str, float], single: bool):
    out = tuple(batch[h] / scale[h] if scale[h] != 1.0 else batch[h] for h in names)
    return out[0] if single else out


def _fraction(heldout_fraction: float | None) -> float:
    from saecache.train.config import TrainConfig

    f = TrainConfig.__dataclass_fields__["heldout_fraction"].default if heldout_fraction is None else heldout_fraction
    if not 0 <= f < 1:
        raise ConfigError(f"heldout_fraction {f} must be in [0, 1)")
    return float(f)


def _scale(store, hook: str) -> float:
    """`saecache train`'s input scale: sqrt of the hook's mean squared norm (train.sae.normalisation_scale)."""
    from saecache.train.sae import normalisation_scale

    return normalisation_scale(store.stats(hook)["mean_sq_norm"])


def load_sae(run_dir: str, device: str = "cpu"):
    """The SAE of a run dir (`saecache train` or `saecache import`) as an ``nn.Module`` in eval mode: ``encode(x_BD)
    -> f_BF``, ``decode(f_BF) -> x_hat_BD``, ``forward(x_BD) -> x_hat_BD``, on raw (unnormalised) activations.
    Extra attributes: ``hook_in``, ``hook_out`` (hook names; they differ for a transcoder) and ``run_cfg`` (cfg.json)."""
    from saecache.evaluate.runner import load_run_checked, run_hooks

    sae, cfg = load_run_checked(str(run_dir), device)
    sae.hook_in, sae.hook_out = run_hooks(cfg)
    sae.run_cfg = cfg
    return sae


@contextlib.contextmanager
def splice(model, hook: str, sae, *, hook_in: str | None = None, first_position: int = 0):
    """Within the block, every forward of the Hugging Face `model` runs with the activation at `hook` (a hook name
    such as ``"mlp_out.1"`` or a raw ``module.path:output``) replaced by ``sae(x)``: evaluate's splice. `sae` is any
    callable ``[N, D_in] -> [N, D_out]`` (an SAE from `load_sae`, or your own). A transcoder reads its input at
    `hook_in` (default: ``sae.hook_in`` when it differs from `hook`). Positions before `first_position` keep the
    model's own activation (1 for SAEs trained on a store without the BOS position)."""
    from saecache.evaluate.splice import spliced
    from saecache.harvest.hooks import resolve_hooks

    if hook_in is None and getattr(sae, "hook_in", hook) != hook and getattr(sae, "hook_out", hook) == hook:
        hook_in = sae.hook_in
    points = resolve_hooks(model, [hook] if hook_in in (None, hook) else [hook, hook_in])
    with spliced(model, points[0], sae, points[1] if len(points) > 1 else None, first_position):
        yield
