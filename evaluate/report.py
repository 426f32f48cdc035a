"""The evaluation report: markdown tables in the seed's format (Layer | MSE Loss | L1 loss | L0 | % Alive |
% Loss Recovered, then FVE, cosine, KL... after them), one table per set of SAEs (hook kind, architecture, width; the
pruned re-measurements in their own tables) with one row per layer; the same rows as JSON and CSV; a log10
feature-frequency histogram PNG per SAE; the frequencies themselves (`.npy`); and `eval_config.json` (the EvalConfig
exactly as run).

matplotlib is imported lazily (Agg backend, no display needed) and only when histograms are asked for.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re

import numpy as np
import torch

from saecache import __version__
from saecache.errors import ConfigError
from saecache.evaluate.frontier import write_frontier
from saecache.evaluate.html_report import report_html
from saecache.harvest.paths import safe_name

# (column title, row key, formatter) of the markdown tables, in order
SEED_COLUMNS = ["Layer", "MSE Loss", "L1 loss", "L0", "% Alive", "% Loss Recovered"]
"""The seed's (dictionary_learning README) column titles, in its order; our extra columns follow them."""
COLUMNS = [
    ("Layer", "layer", str),
    ("MSE Loss", "mse", lambda v: f"{v:.4g}"),
    ("L1 loss", "l1", lambda v: f"{v:.4g}"),
    ("L0", "l0", lambda v: f"{v:.1f}"),
    ("% Alive", "frac_alive", lambda v: f"{100 * v:.1f}"),
    ("% Loss Recovered", "recovered_zero", lambda v: f"{100 * v:.1f}"),
    ("% Rec. (mean abl.)", "recovered_mean", lambda v: f"{100 * v:.1f}"),
    ("FVE", "fve", lambda v: f"{v:.3f}"),
    ("Cos", "cos", lambda v: f"{v:.3f}"),
    ("L2 ratio", "l2_ratio", lambda v: f"{v:.3f}"),
    ("Rel. bias", "rel_bias", lambda v: f"{v:.3f}"),
    ("CE clean", "ce_clean", lambda v: f"{v:.3f}"),
    ("CE spliced", "ce_spliced", lambda v: f"{v:.3f}"),
    ("CE zero", "ce_zero", lambda v: f"{v:.3f}"),
    ("KL", "kl", lambda v: f"{v:.4f}"),
]

DEFINITIONS = {
    "mse": "mean over held-out rows and activation dimensions of (x - x_hat)^2 (per element)",
    "l1": "mean over rows of the L1 norm of the feature vector",
    "l0": "mean over rows of the number of nonzero features",
    "frac_alive": "fraction of features nonzero on at least one of the n_rows held-out rows",
    "fve": "1 - sum_d Var(x - x_hat) / sum_d Var(x), variances over the held-out rows",
    "cos": "mean over rows of cos(x, x_hat)",
    "l2_ratio": "mean over rows of |x_hat| / |x|",
    "rel_bias": "mean |x_hat|^2 / mean <x, x_hat>",
    "recovered_zero": "(CE_zero - CE_spliced) / (CE_zero - CE_clean), output replaced by zeros as the baseline",
    "recovered_mean": "(CE_mean - CE_spliced) / (CE_mean - CE_clean), output replaced by the store's mean activation",
    "[lo, hi]": "after a % loss recovered: its 95 % percentile bootstrap interval, resampling the evaluated contexts "
                "(2000 resamples, seeded)",
    "kl": "mean KL(p_clean || p_spliced) per counted next-token prediction (nats)",
    "± sd": "for an SAE trained as several replicas (train --seeds N): mean over the replicas ± the sample standard "
            "deviation across their seeds (init only; same data); its interval is the mean of the replicas' bounds",
    "ce_*": "mean next-token cross-entropy (nats) over the predictions made at positions first_position..T-2 of "
            "n_contexts held-out contexts",
}


SEED_KEYS = tuple(key for _, key, _ in COLUMNS[1:]) + tuple(f"{k}_{e}" for k in ("recovered_zero", "recovered_mean")
                                                             for e in ("lo", "hi"))
"""Row figures summarised across the replicas of an SAE (`train --seeds N`): mean, and sd as `<key>_sd`."""


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); sd is nan for a single value."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd


def seed_summary(rows: list[dict]) -> list[dict]:
    """One row per set of replicas (rows sharing `replica_of` and `pruned`): each figure of SEED_KEYS as the mean
    over the replicas with its sd across seeds in `<key>_sd` (bootstrap bounds: the mean of the replicas' bounds,
    no sd), `n_seeds`, and `run` = the SAE's name. Rows of runs without replicas are not included."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("replica_of"):
            groups.setdefault((r["replica_of"], bool(r.get("pruned"))), []).append(r)
    out = []
    for (name, _), rs in groups.items():
        s = {k: v for k, v in rs[0].items() if k not in SEED_KEYS and not k.endswith("_sd")}
        s.update(run=name, run_dir=None, n_seeds=len(rs), replicas=[r["run"] for r in rs])
        for key in SEED_KEYS:
            vals = [r[key] for r in rs if not _missing(r.get(key))]
            if not vals:
                continue
            s[key], sd = mean_sd(vals)
            if not key.endswith(("_lo", "_hi")):
                s[f"{key}_sd"] = sd
        out.append(s)
    return out


def with_seed_summaries(rows: list[dict]) -> list[dict]:
    """The rows the tables show: each set of replicas replaced by its `seed_summary` row (mean ± sd)."""
    summaries = {(s["run"], bool(s.get("pruned"))): s for s in seed_summary(rows)}
    out, seen = [], set()
    for r in rows:
        key = (r.get("replica_of"), bool(r.get("pruned")))
        if not r.get("replica_of"):
            out.append(r)
        elif key not in seen:
            seen.add(key)
            out.append(summaries[key])
    return out


def _fmt(fn, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return fn(v)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _cell(row: dict, key: str, fn) -> str:
    """A table cell; across seeds "mean ± sd" (`<key>_sd`); a % loss recovered with its bootstrap interval (`<key>_lo`,
    `<key>_hi`) as "97.3 [96.1, 98.2]" (both: "97.3 ± 0.4 [96.1, 98.2]")."""
    text = _fmt(fn, row.get(key))
    if not (_missing(row.get(key)) or _missing(row.get(f"{key}_sd"))):
        text += f" ± {fn(row[f'{key}_sd'])}"
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if key in INTERVAL_KEYS and not (_missing(row.get(key)) or _missing(lo) or _missing(hi)):
        text += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return text


INTERVAL_KEYS = ("recovered_zero", "recovered_mean")
"""Figures shown with their 95 % bootstrap interval over contexts."""
MAX_HALF_WIDTH = 0.02
"""Intervals wider than ±2 points (half their width) are listed under the tables."""


def wide_intervals(rows: list[dict], limit: float = MAX_HALF_WIDTH) -> list[str]:
    """Runs (and which figure) whose % loss recovered interval is wider than ±`limit`."""
    out = []
    for r in rows:
        for key in INTERVAL_KEYS:
            lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
            if not (_missing(lo) or _missing(hi)) and (hi - lo) / 2 > limit:
                out.append(f"{r['run']}{' (pruned)' if r.get('pruned') else ''} {key} ±{100 * (hi - lo) / 2:.1f}")
    return out


def _group(row: dict) -> str:
    """Table group (one table per set of SAEs, like the seed's): hook kind (mlp_out, resid_post, ...; the whole hook
    name for raw paths), architecture, width and k."""
    hook = row["hook_out"] if row["hook_in"] == row["hook_out"] else f"{row['hook_in']} -> {row['hook_out']}"
    kind = re.sub(r"\.\d+(?=$| ->)", "", hook)
    k = f", k={row['k']}" if row.get("k") else ""
    return f"{kind}: {row['arch']}, {row['width']} features{k}"


def _layer_key(row: dict):
    return (0, int(row["layer"])) if str(row["layer"]).isdigit() else (1, str(row["layer"]))


def table_groups(rows: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The tables as (title, header cells, body rows of cells): one per set of SAEs (see `_group`; pruned
    re-measurements apart), one row per layer sorted by layer, the seed's columns first. A Run column is added when a
    layer appears twice in one table. Replicas of an SAE (`train --seeds N`) show as one row of mean ± sd across seeds
    (`with_seed_summaries`)."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in with_seed_summaries(rows):
        groups.setdefault((_group(r), r.get("pruned", False)), []).append(r)
    for (group, pruned), rs in groups.items():
        title = group + (f" — features firing more often than {rs[0]['prune_above']:g} dropped" if pruned else "")
        repeated = len({str(r["layer"]) for r in rs}) < len(rs)
        cols = ([("Run", "run", str)] if repeated else []) + COLUMNS
        if pruned:
            cols = cols + [("Pruned", "n_pruned", str)]
        body = [[_cell(r, key, fn) for _, key, fn in cols] for r in sorted(rs, key=lambda r: (_layer_key(r), r["run"]))]
        out.append((title, [c[0] for c in cols], body))
    return out


def tables(rows: list[dict]) -> str:
    """The markdown tables alone (`table_groups`), each under a `## ` heading."""
    lines: list[str] = []
    for title, head, body in table_groups(rows):
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        lines.append("")
    return "\n".join(lines)


def frontier_markdown(frontier: dict | None) -> list[str]:
    """report.md's frontier section: a picture per hook (`frontier.py`), the numbers in frontier.json."""
    pngs = [p for p in (frontier or {}).get("panels", []) if p.get("png")]
    if not pngs:
        return []
    lines = ["## Sparsity–fidelity frontier", "", "L0 (log) against % loss recovered and FVE, one line per "
             "architecture × width, and beside them each SAE's pruning curve (features above each frequency "
             "threshold dropped); the numbers are in frontier.json.", ""]
    return lines + [f"![frontier at {p['hook']}]({p['png']})" for p in pngs] + [""]


def markdown(rows: list[dict], header: dict, frontier: dict | None = None) -> str:
    """report.md: provenance, the tables (`tables`), the frontier's pictures, and what every figure means (rows,
    contexts, BOS policy)."""
    lines = ["# saecache evaluation", "", f"Store: `{header['store']}` (model `{header['model']}`, fingerprint "
             f"`{header['fingerprint'][:16]}`).", "", tables(rows), *frontier_markdown(frontier)]
    lines += ["## Definitions", "", notes(rows, header), ""]
    lines += [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def notes(rows: list[dict], header: dict) -> str:
    """What the figures are over: rows, contexts, the BOS policy, and the intervals too wide to trust."""
    n = sorted({r["n_rows"] for r in rows})
    ctx = sorted({r.get("n_contexts") for r in rows if r.get("n_contexts") is not None})
    bos = (f"BOS/padding: contexts are fixed-length with no padding, as harvested "
           f"({header.get('bos_policy') or 'not recorded'}); " + bos_sentence(rows, header))
    loss = (f"Loss figures over {', '.join(map(str, ctx))} held-out contexts of the store's own token ids. {bos}" if ctx
            else "Loss figures not computed (no splicing).")
    wide, asked = wide_intervals(rows), header.get("n_contexts_asked")
    if wide and ctx and asked and min(ctx) < asked:  # every context there is was used: --n-contexts cannot help
        loss += (f" Intervals wider than ±{100 * MAX_HALF_WIDTH:g} points: {'; '.join(wide)}. Too few contexts to "
                 f"evaluate: --n-contexts {asked} asked, but only {min(ctx)} are held out (training holds out the last "
                 "ceil(--heldout x contexts) of the store's contexts, --heldout 0.01 by default); harvest more "
                 "--tokens, or train with a larger --heldout, to narrow them.")
    elif wide:
        loss += (f" Intervals wider than ±{100 * MAX_HALF_WIDTH:g} points: {'; '.join(wide)}; evaluate more contexts "
                 f"(--n-contexts{f', now {asked}' if asked else ''}) to narrow them.")
    elif ctx:
        loss += f" Every % loss recovered interval is within ±{100 * MAX_HALF_WIDTH:g} points."
    return (f"Statistics over {', '.join(map(str, n))} held-out rows (tokens) per SAE "
            f"({'; '.join(dict.fromkeys(r['rows'] for r in rows))}); "
            f"% Alive counts a feature alive when it fires on at least one of them. {loss}")


BOS_RULES = {
    "clean": "the BOS position (position 0) keeps the model's own activation in every variant (spliced, zero, mean), "
             "the prediction made there is not counted and the BOS rows are left out of the statistics, as the run "
             "never trained on them (evaluate --splice-bos replaces it too)",
    "replaced": "every position, BOS included, is replaced and every prediction counts",
    "no BOS": "contexts do not start with BOS: every position is replaced and every prediction counts",
}
"""What each `runner.bos_rule` means for the figures ("not stored": `bos_sentence` names the first stored position)."""


def bos_sentence(rows: list[dict], header: dict) -> str:
    """The BOS rule of the rows (`bos` of each row: `runner.bos_rule`), one clause per rule, naming the runs when
    they differ."""
    def clause(rule):
        if rule == "not stored" or (rule is None and header["first_position"]):
            return (f"positions before {header['first_position']} (not in the store) are never replaced and the "
                    "predictions made there not counted")
        return BOS_RULES[rule or "replaced"]

    rules = list(dict.fromkeys(r.get("bos") for r in rows)) or [None]
    if len(rules) == 1:
        return clause(rules[0]) + "."
    return "; ".join(f"for {', '.join(r['run'] for r in rows if r.get('bos') == rule)}: {clause(rule)}"
                     for rule in rules) + "."


def histogram_png(freq_F: torch.Tensor, path: str, title: str, bins: int = 50) -> None:
    """log10 firing frequency of every feature that fired; the never-firing count goes in the title."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("histograms need matplotlib (a dependency of saecache): pip install matplotlib, or pass "
                          "--no-histograms") from e
    f = freq_F.double().cpu().numpy()
    alive = f[f > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if alive.size:
        ax.hist(np.log10(alive), bins=bins, color="#3b6ea8")
    ax.set_xlabel("log10 feature firing frequency")
    ax.set_ylabel("features")
    ax.set_title(f"{title}\n{alive.size} of {f.size} features fired ({f.size - alive.size} never)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(cfg, store, rows: list[dict], freqs: dict[str, torch.Tensor],
                 curves: dict[str, list[dict]] | None = None) -> dict[str, str]:
    """Write every output into cfg.out; returns {kind: path}. `curves`: per run dir, its unpruned row and its
    pruning-curve rows (`runner.measure_run`), drawn with the frontier (`frontier.py`)."""
    os.makedirs(cfg.out, exist_ok=True)
    header = {"store": store.url, "model": store.header["model"].get("name"), "fingerprint": store.fingerprint(),
              "first_position": store.header["storage"]["first_position"], "bos_policy": store.header.get("bos_policy"),
              "package_version": __version__, "n_contexts_asked": getattr(cfg, "n_contexts", None)}
    paths = {"config": os.path.join(cfg.out, "eval_config.json"), "json": os.path.join(cfg.out, "report.json"),
             "csv": os.path.join(cfg.out, "report.csv"), "md": os.path.join(cfg.out, "report.md")}
    with open(paths["config"], "w") as f:
        json.dump({**cfg.to_dict(), "store": store.url}, f, indent=1, sort_keys=True)  # URL without credentials
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    with open(paths["json"], "w") as f:
        json.dump({**header, "definitions": DEFINITIONS, "rows": clean,
                   "seed_summary": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.items()}
                                    for s in seed_summary(rows)]}, f, indent=1)
    keys = list(dict.fromkeys(k for r in clean for k in r))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(clean)
    frontier = write_frontier(cfg.out, with_seed_summaries([r for r in rows if not r.get("pruned")]), curves,
                              getattr(cfg, "frontier", False))
    paths["frontier"] = os.path.join(cfg.out, "frontier.json")
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, header, frontier))
    hists = {}
    for label, freq in freqs.items():
        np.save(os.path.join(cfg.out, f"freq-{safe_name(label)}.npy"), freq.double().cpu().numpy(), allow_pickle=False)
        if cfg.histograms:
            p = os.path.join(cfg.out, f"hist-{safe_name(label)}.png")
            histogram_png(freq, p, label, cfg.hist_bins)
            paths[f"hist:{label}"] = hists[label] = p
    pages = [p for p in (os.path.join(cfg.out, f"features-{safe_name(r['run'])}.html") for r in rows
                         if not r.get("pruned")) if getattr(cfg, "html_features", 0) and os.path.isfile(p)]
    paths["html"] = os.path.join(cfg.out, "report.html")
    with open(paths["html"], "w") as f:
        f.write(report_html(header, table_groups(rows), DEFINITIONS, frontier, hists, pages, notes(rows, header),
                            cfg.out))
    return paths
