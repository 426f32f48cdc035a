"""Run-dir level import and export (`saecache import` / `saecache export`): `formats.py` and `saelens.py` convert
the weights, this module reads and writes the surrounding files (cfg.json of a run dir, provenance for the target's
config)."""

from __future__ import annotations

import dataclasses
import os
import re

from saecache import __version__
from saecache.errors import ConfigError, RunDirError, StoreError
from saecache.evaluate import formats as FM
from saecache.evaluate import saelens as SL
from saecache.evaluate.runner import load_run_checked
from saecache.harvest.store import Store
from saecache.train import rundir
from saecache.train.sae import save_sae

EXPORTERS = {"saelens": SL.write_saelens, "dictionary_learning": FM.write_dictionary_learning}
IMPORTERS = {"dictionary_learning": FM.read_dictionary_learning}
HELDOUT_ALL = {"fraction": 1.0, "rule": "imported: never trained on a saecache store, so every row is held out"}


def import_run(src: str, out: str, hook: str, hook_out: str | None = None, store_url: str | None = None,
               name: str | None = None, fmt: str = "dictionary_learning") -> str:
    """Convert a foreign dictionary into a run dir `out` (cfg.json + sae.safetensors) that evaluate/export accept."""
    if fmt not in IMPORTERS:
        raise ConfigError(f"unknown import format {fmt!r}; known: {', '.join(IMPORTERS)}")
    if os.path.exists(os.path.join(out, rundir.CFG_FILE)):
        raise RunDirError(f"{out} already holds a run (cfg.json exists); choose another --out")
    w = IMPORTERS[fmt](src)
    sae = FM.to_sae(w)
    hook_out = hook_out or hook
    record = {
        "format_version": rundir.FORMAT_VERSION, "package_version": __version__,
        "name": name or os.path.basename(os.path.normpath(out)), "complete": True,
        "sae": dataclasses.asdict(sae.cfg), "hooks": {"in": hook, "out": hook_out}, "stores": [],
        "heldout": HELDOUT_ALL, "imported_from": {"format": fmt, "source": os.path.basename(os.path.normpath(src)),
                                                  **{k: v for k, v in w.meta.items() if v is not None}},
    }
    if w.arch.threshold_key is None and w.threshold is not None:  # kept for the round trip; inference ignores it
        record["imported_from"]["dl_threshold"] = float(w.threshold)
    if store_url:
        store = Store.open(store_url)
        for h, d in ((hook, w.d_in), (hook_out, w.d_out)):
            if h not in store.hooks:
                raise RunDirError(f"store {store_url} has no hook {h!r}; it has: {', '.join(sorted(store.hooks))}")
            if store.hooks[h]["d"] != d:
                raise RunDirError(f"{src} has width {d} but hook {h!r} of {store_url} has width "
                                  f"{store.hooks[h]['d']}: wrong hook or model")
        record["stores"] = [{"url": rundir.redact_url(store.url), "fingerprint": store.fingerprint(),
                             "heldout_from_context": 0}]
        record["model"] = store.header["model"]
    os.makedirs(out, exist_ok=True)
    save_sae(sae, os.path.join(out, rundir.WEIGHTS_FILE))
    rundir.write_json_atomic(os.path.join(out, rundir.CFG_FILE), record)
    return out


def _provenance(cfg: dict) -> dict:
    """What the target formats record about the source: model name, hook, layer, context length, module path."""
    hooks = cfg.get("hooks") or {}
    meta = {k: v for k, v in (cfg.get("imported_from") or {}).items() if k in ("lm_name", "layer", "dl_threshold",
                                                                            "submodule_name", "ctx_len", "io")}
    meta["hook_name"] = hooks.get("in")
    m = re.search(r"(\d+)(?!.*\d)", hooks.get("in") or "")
    if m and meta.get("layer") is None:
        meta["layer"] = int(m.group(1))
    if (cfg.get("model") or {}).get("name"):
        meta["lm_name"] = cfg["model"]["name"]
    for s in cfg.get("stores") or []:
        try:
            st = Store.open(s["url"])
        except (StoreError, OSError):
            continue
        h = st.hooks.get(hooks.get("in"), {})
        meta.update(lm_name=st.header["model"].get("name"), ctx_len=st.header.get("ctx_len"),
                    dataset=(st.header.get("dataset") or {}).get("spec"), submodule_name=h.get("module"),
                    io={"output": "out", "input": "in"}.get(h.get("io"), meta.get("io")),
                    prepend_bos=bool((st.header.get("config") or {}).get("bos", True)))
        break
    return meta


def export_run(run_dir: str, to: str, out: str) -> str:
    """Write the run dir's SAE in another library's format into `out`; unrepresentable SAEs are refused."""
    if to not in EXPORTERS:
        raise ConfigError(f"unknown export format {to!r}; known: {', '.join(EXPORTERS)}")
    target_files = {"saelens": (SL.SAELENS_CFG_FILE, SL.SAELENS_WEIGHTS_FILE),
                    "dictionary_learning": (FM.DL_CFG_FILE, FM.DL_WEIGHTS_FILE)}[to]
    existing = [f for f in target_files if os.path.exists(os.path.join(out, f))]
    if existing:
        raise RunDirError(f"{out} already has {', '.join(existing)}; choose another --out")
    sae, cfg = load_run_checked(run_dir)
    meta = _provenance(cfg)
    EXPORTERS[to](FM.from_sae(sae, meta), out, meta)
    return out
