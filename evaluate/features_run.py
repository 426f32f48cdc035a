"""`saecache features`: one run dir's SAE scanned over its store, and the chosen features' top contexts rendered.
The run dir and the store are opened and checked as `saecache evaluate` does (`runner`); the scan and the rendering
are `features.py`'s, which `evaluate` also uses for its feature pages."""

from __future__ import annotations

import os

from saecache.errors import ConfigError
from saecache.evaluate.config import FeaturesConfig
from saecache.evaluate.features import load_tokenizer, render, top_activations
from saecache.evaluate.runner import heldout_contexts_for, load_run_checked, open_store, recorded_name, run_hooks
from saecache.harvest.model import pick_device


def feature_contexts(cfg: FeaturesConfig) -> dict:
    """Scan the store and render: returns {"run", "n_rows", "features": {N: {frequency, count, contexts[...]}}}."""
    device = pick_device(cfg.device)
    store = open_store(cfg.store)
    sae, rcfg = load_run_checked(cfg.run_dir, device)
    heldout_contexts_for(cfg.run_dir, rcfg, sae, store)  # same model and hooks, or a one-line error
    bad = [f for f in cfg.features if f >= sae.cfg.width]
    if bad:
        raise ConfigError(f"feature(s) {bad} out of range: this SAE has {sae.cfg.width} features (0.."
                          f"{sae.cfg.width - 1})")
    hook = run_hooks(rcfg)[0]
    tok = load_tokenizer(cfg.tokenizer or recorded_name(store, store.header["tokenizer"]["name"]))
    found, n_rows = top_activations(sae, store, hook, cfg.features, cfg.top, cfg.max_rows, cfg.batch_size, device)
    run = rcfg.get("name") or os.path.basename(os.path.normpath(cfg.run_dir))
    return render(found, n_rows, store, tok, cfg.window, run, hook)
