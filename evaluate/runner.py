"""`saecache evaluate` end to end: check each run dir against the store, stream the held-out rows through the SAE for
the reconstruction statistics and firing frequencies, optionally prune high-frequency features and measure again,
splice every SAE (and pruned SAE) of one hook into the model together for the loss figures, write a feature page per
SAE, then the report (`report.py`). Runs are processed one output hook at a time.

Which rows are "held out" is the run's `Split` (`saecache.harvest.split`, from its cfg.json): for a store of the
training data's contexts (the training store, or any store of the same dataset and tokenization), the held-out context
range the run recorded; for a store of another dataset with the same model and hooks, every row; a training-data store
without held-out contexts is refused. Loss figures use the first `n_contexts` of those contexts.

BOS follows the rule the run trained under: when it left the BOS rows out (`Split.drops_bos`), the statistics leave
them out too and the splice keeps the model's own activation at the BOS position (position 0 is then treated as a
store without it treats it: never replaced, its prediction not counted); `EvalConfig.splice_bos` gives the old figures.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from saecache.errors import ModelError, RunDirError, StoreError
from saecache.evaluate import metrics as M
from saecache.evaluate.config import EvalConfig
from saecache.evaluate.features import as_html, load_tokenizer, pick_features, render, top_activations
from saecache.evaluate.report import write_report
from saecache.evaluate.splice import splice_losses_many
from saecache.harvest.hooks import HookPoint, layer_of
from saecache.harvest.model import config_hash, load_model, local_dir, pick_device
from saecache.harvest.paths import safe_name
from saecache.harvest.split import Split, context_batches, has_bos_rows
from saecache.harvest.store import Store
from saecache.threads import stage_threads
from saecache.train.rundir import load_run

def open_store(url: str) -> Store:
    store = Store.open(url)
    store.require_complete()
    return store


def load_run_checked(run_dir: str, device="cpu"):
    """(sae, cfg) from a run dir; missing directory / files -> one-line RunDirError."""
    if not os.path.isdir(run_dir):
        raise RunDirError(f"run dir {run_dir} does not exist")
    sae, cfg = load_run(run_dir, device=device)
    sae.eval()
    return sae, cfg


def run_hooks(cfg: dict) -> tuple[str, str]:
    hooks = cfg.get("hooks") or {}
    if "in" not in hooks:
        raise RunDirError(f"cfg.json of run {cfg.get('name')!r} records no hooks (hooks.in / hooks.out)")
    if isinstance(hooks["in"], list):
        raise RunDirError(f"run {cfg.get('name')!r} is a {hooks.get('kind', 'cross-layer dictionary')} over several "
                          "hooks; evaluate it as a replacement model: saecache replacement RUN_DIR --store STORE")
    return hooks["in"], hooks.get("out") or hooks["in"]


def heldout_contexts_for(run_dir: str, cfg: dict, sae, store: Store) -> tuple[tuple[int, int], str, Split]:
    """Check the run matches the store (hooks, widths, model) and say which contexts of it are held out for it.

    Returns ((first context, end context), a sentence for the report, the run's `Split`). The split's identity
    decides: the recorded held-out range when the store holds the training data's contexts (whatever its fingerprint:
    a finished `--allow-incomplete` store, a `copy --hooks` subset), every context of another dataset's store; a
    training-data store without held-out contexts is refused, never widened."""
    h_in, h_out = run_hooks(cfg)
    for h in dict.fromkeys((h_in, h_out)):
        if h not in store.hooks:
            raise RunDirError(f"run {run_dir} uses hook {h!r} but store {store.url} has only "
                              f"{', '.join(sorted(store.hooks))}: they come from different hooks")
    for h, d in ((h_in, sae.cfg.d_in), (h_out, sae.cfg.d_out)):
        if store.hooks[h]["d"] != d:
            raise RunDirError(f"run {run_dir} expects width {d} at {h!r} but store {store.url} has "
                              f"{store.hooks[h]['d']}: different model or hook")
    header_model = store.header["model"]
    recorded = (cfg.get("model") or {}).get("config_hash")
    if recorded and recorded != header_model.get("config_hash"):
        raise RunDirError(f"run {run_dir} was made for model {cfg['model'].get('name')!r} (config hash "
                          f"{recorded[:12]}) but store {store.url} holds model {header_model.get('name')!r} "
                          f"({str(header_model.get('config_hash'))[:12]}): different models")
    n = store.geometry.n_contexts
    split = Split.from_cfg(cfg, store, run_dir)
    if split.imported:  # `saecache import`: never trained here
        return (0, n), "every row of the store (the run was never trained on it)", split
    rng = split.heldout_contexts(store)
    if rng is not None:
        c0, c1 = rng
        if c0 >= c1:
            raise RunDirError(f"store {store.url} holds the contexts run {run_dir} was trained on, but none of its "
                              f"held-out ones (held out: contexts >= {c0}; the store has {n}); evaluate on the "
                              "training store or on a store of another dataset")
        return (c0, c1), f"held-out contexts {c0}..{c1 - 1} of the training data (by the run's split record)", split
    for s in cfg.get("stores") or []:  # another dataset: its model and hooks must be the training store's
        try:
            trained = Store.open(s["url"])
        except (StoreError, OSError):
            continue
        if trained.header["model"].get("config_hash") != header_model.get("config_hash"):
            raise RunDirError(f"run {run_dir} was trained on a store of model {trained.header['model'].get('name')!r}"
                              f" but {store.url} holds model {header_model.get('name')!r}: different models")
        for h in dict.fromkeys((h_in, h_out)):
            a, b = trained.hooks.get(h, {}), store.hooks[h]
            if (a.get("module"), a.get("io")) != (b.get("module"), b.get("io")):
                raise RunDirError(f"hook {h!r} is {a.get('module')}:{a.get('io')} in the run's training store but "
                                  f"{b.get('module')}:{b.get('io')} in {store.url}: different hooks")
    return (0, n), "every row of a store of another dataset (none of it was trained on)", split


def hook_point(store: Store, name: str) -> HookPoint:
    h = store.hooks[name]
    return HookPoint(name=name, module=h["module"], io=h["io"], d=h["d"], order=0)


def bos_rule(split: Split, store: Store, cfg) -> str:
    """How evaluation treats the BOS position of `store` for a run of `split`: "clean" (the run left BOS rows out and
    `cfg.splice_bos` is off: position 0 keeps the model's activation, its rows and predictions are not counted),
    "replaced" (BOS rows stored and replaced like every position), "not stored" (position 0 is not in the store) or
    "no BOS" (contexts do not start with BOS: position 0 is an ordinary token)."""
    if store.geometry.first_position:
        return "not stored"
    if not has_bos_rows(store):
        return "no BOS"
    return "clean" if split.drops_bos(store) and not cfg.splice_bos else "replaced"


def splice_first_position(store: Store, bos: str) -> int:
    """First position replaced and counted in the splice: the store's, or 1 when the BOS position stays clean."""
    return max(store.geometry.first_position, 1 if bos == "clean" else 0)


@torch.no_grad()
def reconstruction_stats(sae, store: Store, h_in: str, h_out: str, contexts: tuple[int, int], cfg: EvalConfig,
                         device, keeps_F: list[torch.Tensor | None], drop_bos: bool = False
                         ) -> list[tuple[dict, torch.Tensor]]:
    """Statistics over the held-out rows (see metrics.py for each definition; BOS rows left out with `drop_bos`) and
    per-feature firing frequencies, for the SAE with each mask of `keeps_F` applied after encoding (None: the SAE
    itself), from one read of the rows and one encoding per batch."""
    accs = [M.ReconAccumulator(sae.cfg.width) for _ in keeps_F]
    keeps = [None if k is None else k.to(device=device, dtype=torch.float32) for k in keeps_F]
    for batch in context_batches(store, list(dict.fromkeys((h_in, h_out))), *contexts, batch_size=cfg.batch_size,
                                 max_rows=cfg.max_rows, drop_bos=drop_bos):
        x, y = batch[h_in].to(device), batch[h_out].to(device)
        f = sae.encode(x)
        for acc, keep in zip(accs, keeps):
            fk = f if keep is None else f * keep
            acc.update(y, sae.decode(fk, x), fk)
    return [(acc.result(), acc.frequencies()) for acc in accs]


def prune_masks(freq_F: torch.Tensor, thresholds) -> list[tuple[float, torch.Tensor]]:
    """(threshold, keep mask [F]) of the pruning curve, highest threshold first: the features firing more often
    than the threshold dropped. A threshold dropping no feature beyond the previous one's is left out (its SAE is
    the same), so every step drops more features and L0 falls."""
    out, dropped = [], 0
    for thr in sorted(set(thresholds), reverse=True):
        keep_F = (freq_F <= thr).cpu()
        n = int((~keep_F).sum())
        if n > dropped:
            out.append((thr, keep_F))
            dropped = n
    return out


def splice_contexts(store: Store, contexts: tuple[int, int], n: int) -> torch.Tensor:
    """The first `n` held-out contexts' token ids [C, T]."""
    c0 = contexts[0]
    c1 = min(contexts[1], c0 + n)
    return torch.from_numpy(np.asarray(store.contexts(c0, c1)).astype(np.int64))


def recorded_name(store: Store, name: str | None) -> str | None:
    """A model or tokenizer name from the store header, as a directory valid from here when it names a local one (a
    relative path typed elsewhere is looked up beside the store: `harvest.model.local_dir`)."""
    return local_dir(name, store.loc.root if store.loc.local else None) or name


def load_store_model(store: Store, cfg: EvalConfig):
    m = store.header["model"]
    name = cfg.model or recorded_name(store, m["name"])
    model, _, _ = load_model(name, revision=None if cfg.model else m.get("revision"), dtype=m.get("dtype", "float32"),
                             device=cfg.device)
    if config_hash(model.config) != m.get("config_hash"):
        raise ModelError(f"model {name!r} is not the one store {store.url} was harvested from (config hash differs: "
                         f"{config_hash(model.config)[:12]} vs {str(m.get('config_hash'))[:12]})")
    return model


def measure_run(run_dir: str, store: Store, cfg: EvalConfig, device) -> list[dict]:
    """The reconstruction statistics of one run, of its pruned version (`prune_above`) and of its pruning curve
    (`prune_curve`): one entry per variant with its row, label, firing frequencies [F], `report` (False for the
    curve's points, which go to frontier.json only), and what splicing needs (reconstruction fn, hooks, held-out
    fraction). The pruned variants are measured in one more read of the rows, after the frequencies are known. Loss
    figures are added by `splice_variants`."""
    sae, rcfg = load_run_checked(run_dir, device)
    h_in, h_out = run_hooks(rcfg)
    contexts, rows_note, split = heldout_contexts_for(run_dir, rcfg, sae, store)
    bos = bos_rule(split, store, cfg)
    if bos == "clean":
        rows_note += ", BOS rows left out as in training"
    name = rcfg.get("name") or os.path.basename(os.path.normpath(run_dir))
    base = {"run": name, "run_dir": run_dir, "arch": sae.cfg.arch, "hook_in": h_in, "hook_out": h_out,
            "layer": layer_of(h_out), "d_in": sae.cfg.d_in, "width": sae.cfg.width, "k": sae.cfg.k,
            "coeff": None if sae.cfg.k else sae.cfg.coeff,
            "rows": rows_note, "bos": bos, "replica_of": (rcfg.get("replica") or {}).get("of")}

    def variant(stats, freq, keep_F, label, report, **extra):
        row = {**base, **stats, "pruned": keep_F is not None,
               "n_pruned": 0 if keep_F is None else int((~keep_F).sum()), **extra}
        if keep_F is None:
            recon = sae.forward
        else:
            kf = keep_F.to(device=device, dtype=torch.float32)
            recon = lambda x: sae.decode(sae.encode(x) * kf, x)  # noqa: E731
        return {"row": row, "label": label, "freq": freq, "sae": sae, "contexts": contexts, "report": report,
                "reconstruct": lambda x: recon(x.to(device).float())}

    drop = bos == "clean"
    [(stats, freq)] = reconstruction_stats(sae, store, h_in, h_out, contexts, cfg, device, [None], drop)
    out = [variant(stats, freq, None, name, True)]
    pruned: list[tuple[torch.Tensor, str, bool, dict]] = []
    if cfg.prune_above is not None:
        pruned.append(((freq <= cfg.prune_above).cpu(), f"{name}-pruned", True, {"prune_above": cfg.prune_above}))
    for thr, keep_F in prune_masks(freq, cfg.prune_curve):
        pruned.append((keep_F, f"{name}-prune{thr:g}", False, {"prune_above": thr}))
    if pruned:
        measured = reconstruction_stats(sae, store, h_in, h_out, contexts, cfg, device, [p[0] for p in pruned], drop)
        for (keep_F, label, report, extra), (stats, freq_k) in zip(pruned, measured):
            out.append(variant(stats, freq_k, keep_F, label, report, **extra))
    return out


def splice_variants(variants: list[dict], store: Store, model, cfg: EvalConfig) -> None:
    """Add the loss figures to each variant's row; variants replacing the same hook on the same contexts share one
    clean / zero / mean forward per batch (`splice_losses_many`), when they also keep the same positions clean (the
    run's BOS rule: `bos_rule`)."""
    groups: dict[tuple, list[dict]] = {}
    for v in variants:
        first = splice_first_position(store, v["row"]["bos"])
        groups.setdefault((v["row"]["hook_out"], v["contexts"], first), []).append(v)
    for (h_out, contexts, first), vs in groups.items():
        ids = splice_contexts(store, contexts, cfg.n_contexts)
        mean_D = torch.as_tensor(store.stats(h_out)["mean"], dtype=torch.float32)
        recons = {i: (v["reconstruct"], hook_point(store, v["row"]["hook_in"]) if v["row"]["hook_in"] != h_out
                      else None) for i, v in enumerate(vs)}
        with _bar(cfg, f"evaluate {h_out}: splicing", int(ids.shape[0]), "ctx") as bar:
            res = splice_losses_many(model, ids, hook_point(store, h_out), recons, mean_D, first_position=first,
                                     batch_size=cfg.ctx_batch_size, on_batch=bar.update)
        for i, v in enumerate(vs):
            v["row"].update(res[i].as_dict())


def write_feature_page(sae, store: Store, hook: str, name: str, freq_F: torch.Tensor, cfg: EvalConfig, device,
                       tok) -> str:
    """features-<run>.html in cfg.out: `html_features` features along the frequency ranking, their top contexts."""
    feats = pick_features(freq_F, cfg.html_features)
    found, n_rows = top_activations(sae, store, hook, feats, cfg.html_top, cfg.html_max_rows, cfg.batch_size, device)
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, f"features-{safe_name(name)}.html")
    with open(path, "w") as f:
        f.write(as_html(render(found, n_rows, store, tok, 16, name, hook)))
    return path


def _bar(cfg: EvalConfig, desc: str, total: int, unit: str, items=None):
    """A tqdm bar on stderr for one phase, with its ETA (`cfg.progress`); iterates `items` when given."""
    return tqdm(items, total=total, desc=desc, unit=unit, disable=not cfg.progress, file=sys.stderr,
                dynamic_ncols=True)


def run_evaluation(cfg: EvalConfig) -> list[dict]:
    """Evaluate every run dir of `cfg` and write the report into `cfg.out`; returns the report rows, in run-dir order
    (each run's pruned row right after it). Row keys: run, run_dir, arch, hook_in, hook_out, layer, d_in,
    width, k, coeff (the sparsity coefficient of a non-TopK SAE), rows (which rows are held out), bos (how the
    BOS position is treated: `bos_rule`), n_rows, mse,
    l1, l0, frac_alive, fve, cos, l2_ratio, rel_bias, pruned, n_pruned (+ prune_above), and with splicing ce_clean,
    ce_spliced, ce_zero, ce_mean, recovered_zero, recovered_mean (each with its 95 % bootstrap interval over contexts:
    *_lo, *_hi), kl, n_predictions, n_contexts. `report.tables(rows)` renders the seed-style markdown tables. The
    pruning curves' rows (same keys, `pruned` and `prune_above` set) are not returned: they go to frontier.json with
    the frontier (`frontier.py`).

    Runs are taken one output hook at a time, so only the SAEs of one hook are in memory together."""
    device = pick_device(cfg.device)
    store = open_store(cfg.store)
    by_hook: dict[str, list[str]] = {}
    for run_dir in cfg.run_dirs:  # fail fast, before loading the model, on any mismatch
        sae, rcfg = load_run_checked(run_dir)
        heldout_contexts_for(run_dir, rcfg, sae, store)
        by_hook.setdefault(run_hooks(rcfg)[1], []).append(run_dir)
    tok = load_tokenizer(cfg.tokenizer or recorded_name(store, store.header["tokenizer"]["name"]), cfg.model) \
        if cfg.html_features else None
    done: dict[str, list[dict]] = {}
    with stage_threads(cfg.threads):
        model = load_store_model(store, cfg) if cfg.splice else None
        for h_out, run_dirs in by_hook.items():
            variants = {run_dir: measure_run(run_dir, store, cfg, device)
                        for run_dir in _bar(cfg, f"evaluate {h_out}: statistics", len(run_dirs), "SAE", run_dirs)}
            if model is not None:
                splice_variants([v for vs in variants.values() for v in vs], store, model, cfg)
            for run_dir, vs in (_bar(cfg, f"evaluate {h_out}: feature pages", len(variants), "SAE", variants.items())
                                if tok is not None else variants.items()):
                if tok is not None:
                    write_feature_page(vs[0]["sae"], store, vs[0]["row"]["hook_in"], vs[0]["label"], vs[0]["freq"],
                                       cfg, device, tok)
                done[run_dir] = [{"row": v["row"], "label": v["label"], "freq": v["freq"], "report": v["report"]}
                                 for v in vs]
            del variants
        ordered = [v for run_dir in dict.fromkeys(cfg.run_dirs) for v in done[run_dir]]
        rows = [v["row"] for v in ordered if v["report"]]
        curves = {run_dir: [v["row"] for v in done[run_dir] if not v["row"]["pruned"] or not v["report"]]
                  for run_dir in dict.fromkeys(cfg.run_dirs)}
        write_report(cfg, store, rows, {v["label"]: v["freq"] for v in ordered if v["report"]}, curves)
    return rows
