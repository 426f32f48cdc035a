"""The sparsity–fidelity frontier: how SAEs are compared in papers and in SAEBench, L0 on a log axis against fidelity,
drawn from the report rows of a sweep, and beside it the pruning curve of each SAE.

One panel per hook (an SAE's output hook; `in -> out` for a transcoder), one line per architecture × width whose
points are the SAEs of that architecture and width (different k or sparsity coefficients), sorted by L0:

- L0 against % loss recovered (zero ablation, with its 95 % bootstrap interval over contexts);
- L0 against FVE;
- the pruning curves: each SAE measured again with the features firing more often than each threshold of
  `EvalConfig.prune_curve` dropped (`runner.prune_masks`), an L0 and a % loss recovered per threshold, drawn dashed
  over the frontier's points. At an equal L0 this answers the seed's question: pruning the frequent features of a
  wide dictionary, or a sparser dictionary (a higher L1 coefficient, a lower k), which recovers more loss?

`frontier.json` holds the numbers behind every picture (`frontier_data`); the PNGs (`frontier-<hook>.png`) are drawn
from those numbers alone. Replicas of an SAE (`train --seeds N`) are one point at their mean, and their first
replica's pruning curve. matplotlib is imported lazily (Agg backend).
"""

from __future__ import annotations

import json
import math
import os

from saecache.errors import ConfigError
from saecache.harvest.hooks import layer_of
from saecache.harvest.paths import safe_name

POINT_KEYS = ("run", "arch", "width", "k", "coeff", "l0", "fve", "mse", "recovered_zero",
              "recovered_zero_lo", "recovered_zero_hi", "recovered_mean", "n_pruned", "prune_above")
"""Figures kept per point (None where a row lacks one, e.g. no splicing)."""


def panel_of(row: dict) -> str:
    """The panel an SAE is drawn in: its output hook, `in -> out` for a transcoder."""
    return row["hook_out"] if row["hook_in"] == row["hook_out"] else f"{row['hook_in']} -> {row['hook_out']}"


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def point(row: dict) -> dict:
    """A row's figures as a picture point (the same numbers as the report row)."""
    return {k: _num(row.get(k)) for k in POINT_KEYS}


def _hook_order(hook: str):
    layer = layer_of(hook.split(" -> ")[-1])
    return (0, int(layer), hook) if layer.isdigit() else (1, 0, hook)


def frontier_data(rows: list[dict], curves: dict[str, list[dict]] | None = None) -> dict:
    """The numbers behind the pictures. `rows`: the points, as the report's tables show them (its rows with each
    set of replicas summarized, `report.with_seed_summaries`, and no pruned re-measurement); `curves`: per run dir,
    its unpruned row followed by its pruning-curve rows (highest threshold first).

    Returns {"panels": [{"hook", "lines": [{"arch", "width", "points": [point, ...] sorted by L0}],
    "pruning": [{"run", "arch", "width", "points": [unpruned point, then one per threshold]}]}]}."""
    panels: dict[str, dict] = {}
    for r in rows:
        p = panels.setdefault(panel_of(r), {"hook": panel_of(r), "lines": {}, "pruning": []})
        line = p["lines"].setdefault((r["arch"], r["width"]), {
            "arch": r["arch"], "width": r["width"], "points": []})
        line["points"].append(point(r))
    seen_sets = set()
    for curve in (curves or {}).values():
        if len(curve) < 2:
            continue
        base = curve[0]
        if base.get("replica_of"):  # one curve per set of replicas: the first one's
            if base["replica_of"] in seen_sets:
                continue
            seen_sets.add(base["replica_of"])
        p = panels.setdefault(panel_of(base), {"hook": panel_of(base), "lines": {}, "pruning": []})
        p["pruning"].append({"run": base.get("replica_of") or base["run"], "arch": base["arch"],
                             "width": base["width"], "points": [point(r) for r in curve]})
    out = []
    for hook in sorted(panels, key=_hook_order):
        p = panels[hook]
        lines = sorted(p["lines"].values(), key=lambda ln: (ln["arch"], ln["width"]))
        for ln in lines:
            ln["points"].sort(key=lambda q: (q["l0"] is None, q["l0"] or 0.0))
        out.append({"hook": hook, "lines": lines, "pruning": p["pruning"]})
    return {"panels": out}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("the frontier pictures need matplotlib (a dependency of saecache): pip install matplotlib, "
                          "or pass --no-frontier") from e
    return plt


def _xy(points: list[dict], y: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """The points with a positive L0 (log axis) and a value for `y`."""
    pts = [q for q in points if (q["l0"] or 0) > 0 and q[y] is not None]
    return [q["l0"] for q in pts], [scale * q[y] for q in pts]


def _line_label(line: dict) -> str:
    return f"{line['arch']} {line['width']}"


def _point_note(q: dict) -> str:
    return f"k={q['k']}" if q.get("k") else (f"λ={q['coeff']:g}" if q.get("coeff") is not None else "")


def _log_ticks(ax) -> None:
    """Plain numbers on the log L0 axis at 1-2-5 steps (decades over more than two), no minor labels (they overlap
    over a short range)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = ax.get_xlim()
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if hi > 100 * lo else (1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _fit_points(ax, panel: dict, y: str, scale: float, with_curves: bool) -> None:
    """y-limits from the points themselves, so that a wide interval (few contexts) does not flatten them."""
    ys = [v for ln in panel["lines"] for v in _xy(ln["points"], y, scale)[1]]
    if with_curves:
        ys += [v for c in panel["pruning"] for v in _xy(c["points"], y, scale)[1]]
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max(2.0, 0.08 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)


def frontier_png(panel: dict, path: str) -> None:
    """Three plots side by side for one hook: L0 (log) against % loss recovered, against FVE, and the pruning
    curves (dashed) over the frontier's points."""
    plt = _plt()
    keys = sorted({(ln["arch"], ln["width"]) for ln in panel["lines"]}
                  | {(c["arch"], c["width"]) for c in panel["pruning"]})
    colour = {key: plt.get_cmap("tab10")(i % 10) for i, key in enumerate(keys)}
    marker = dict(zip(sorted({a for a, _ in keys}), "osD^vPX*<>ph"))  # one marker per architecture in the panel
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    titles = ("% loss recovered", "FVE (fraction of variance explained)", "pruning curves (dashed) and SAEs")
    for ax, (y, scale), title in zip(axes, (("recovered_zero", 100), ("fve", 1), ("recovered_zero", 100)), titles):
        drawn = False
        for ln in panel["lines"]:
            key = (ln["arch"], ln["width"])
            xs, ys = _xy(ln["points"], y, scale)
            if not xs:
                continue
            drawn = True
            faded = ax is axes[2]
            ax.plot(xs, ys, "-", marker=marker.get(ln["arch"], "o"), color=colour[key],
                    alpha=0.45 if faded else 1.0, label=None if faded else _line_label(ln), ms=6)
            if y == "recovered_zero" and not faded:
                for q in ln["points"]:
                    if q["l0"] and q["recovered_zero_lo"] is not None and q["recovered_zero_hi"] is not None:
                        ax.plot([q["l0"]] * 2, [100 * q["recovered_zero_lo"], 100 * q["recovered_zero_hi"]],
                                "-", color=colour[key], lw=1)
            if len(ln["points"]) > 1:
                for q, xv, yv in zip([q for q in ln["points"] if (q["l0"] or 0) > 0 and q[y] is not None], xs, ys):
                    ax.annotate(_point_note(q), (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if ax is axes[2]:
            for c in panel["pruning"]:
                key = (c["arch"], c["width"])
                xs, ys = _xy(c["points"], y, scale)
                if xs:
                    drawn = True
                    ax.plot(xs, ys, "--", marker=".", color=colour[key], label=f"{c['run']} pruned")
        ax.set_xscale("log")
        _log_ticks(ax)
        if y == "recovered_zero":
            _fit_points(ax, panel, y, scale, with_curves=ax is axes[2])
        ax.set_xlabel("L0 (active features per token, log scale)")
        ax.set_ylabel(title if ax is not axes[2] else "% loss recovered")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no figures (no splicing?)", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"sparsity–fidelity frontier at {panel['hook']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def png_name(hook: str) -> str:
    return f"frontier-{safe_name(hook.replace(' -> ', '-to-'))}.png"


def write_frontier(out: str, rows: list[dict], curves: dict[str, list[dict]] | None, draw: bool) -> dict:
    """frontier.json in `out` (and, with `draw`, one frontier-<hook>.png per panel, named in the panel's `png`) from
    the points' `rows` and the pruning `curves` (as `frontier_data` takes them); returns the data written."""
    data = frontier_data(rows, curves)
    for panel in data["panels"]:
        panel["png"] = None
        if draw:
            panel["png"] = png_name(panel["hook"])
            frontier_png(panel, os.path.join(out, panel["png"]))
    with open(os.path.join(out, "frontier.json"), "w") as f:
        json.dump(data, f, indent=1)
    return data
