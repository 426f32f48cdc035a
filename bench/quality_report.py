"""The summary, targets and markdown of bench/bench_quality.py's results: per-candidate means and seed spreads, issue
12's targets (saecache's default FVE >= the best peer's, both dead counts <= dictionary_learning's), ReLU+L1 compared
at a matched L0, and the results files. Pure functions of the result rows, so `--rows` rebuilds them from logs."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """Mean (and seed-to-seed sd of FVE) per (width, arch, candidate, coeff), in first-seen order."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["width"], r["arch"], r["candidate"], r.get("coeff")), []).append(r)
    def mean(rs, key):  # (rows from logs before a metric existed lack it)
        xs = [r[key] for r in rs if r.get(key) is not None]
        return sum(xs) / len(xs) if xs else None

    return [{"width": w, "arch": a, "candidate": c, "coeff": coeff, "n": len(rs), "fve": mean(rs, "fve"),
             "fve_sd": _sd([r["fve"] for r in rs]), "fve_seeds": [r["fve"] for r in rs], "l0": mean(rs, "l0"),
             "dead_pct": mean(rs, "dead_pct"), "dead_train_pct": mean(rs, "dead_train_pct"),
             "train_s": mean(rs, "train_s")}
            for (w, a, c, coeff), rs in groups.items()]


def targets(summary: list[dict]) -> list[dict]:
    """Issue 12's target per (width, TopK-family arch): saecache default FVE ≥ best peer's, dead % ≤ dl's."""
    out = []
    for s in summary:
        if s["candidate"] != "saecache" or s["arch"] == "relu":
            continue
        peers = [p for p in summary if (p["width"], p["arch"]) == (s["width"], s["arch"])
                 and not p["candidate"].startswith("saecache")]
        if not peers:
            continue
        best = max(peers, key=lambda p: p["fve"])
        dl = next((p for p in peers if p["candidate"] == "dl"), None)
        out.append({"width": s["width"], "arch": s["arch"], "fve": s["fve"], "fve_sd": s["fve_sd"],
                    "best_peer": best["candidate"], "peer_fve": best["fve"], "peer_sd": best["fve_sd"],
                    "margin": s["fve"] - best["fve"], "fve_met": s["fve"] >= best["fve"], "dead_pct": s["dead_pct"],
                    "dl_dead_pct": dl["dead_pct"] if dl else None,
                    "dead_met": dl["dead_pct"] >= s["dead_pct"] if dl else None,
                    "dead_train_pct": s["dead_train_pct"], "dl_dead_train_pct": dl and dl["dead_train_pct"],
                    "dead_train_met": (dl["dead_train_pct"] >= s["dead_train_pct"]
                                       if dl and None not in (dl["dead_train_pct"], s["dead_train_pct"]) else None)})
    return out


def fve_at_l0(points: list[tuple[float, float]], l0: float) -> float | None:
    """FVE at `l0` by linear interpolation of FVE against log L0 between the bracketing (L0, FVE) points; None when
    `l0` lies outside their range (points with L0 = 0 have no log and are left out)."""
    pts = sorted(p for p in points if p[0] > 0)
    for (a, fa), (b, fb) in zip(pts, pts[1:]):
        if a <= l0 <= b:
            return fa if b == a else fa + (fb - fa) * (math.log(l0) - math.log(a)) / (math.log(b) - math.log(a))
    return pts[0][1] if len(pts) == 1 and pts[0][0] == l0 else None


def matched_l0(rows: list[dict], width: int, target: float, libs=("saecache", "dl")) -> dict:
    """The relu sweeps of `libs` at one width compared at one L0: `target` if both L0 ranges (of the seed-mean curves)
    hold it, else the log-midpoint of their overlap; "no crossing" when they do not overlap."""
    relu = [r for r in rows if r["arch"] == "relu" and r["width"] == width]
    curves = {lib: [(s["l0"], s["fve"]) for s in summarise([r for r in relu if r["candidate"] == lib])]
              for lib in libs}
    res = {"width": width, "ranges": {lib: [min(c)[0], max(c)[0]] if c else None for lib, c in curves.items()}}
    if not all(curves.values()):
        return {**res, "l0": None, "note": "missing sweep"}
    lo, hi = max(r[0] for r in res["ranges"].values()), min(r[1] for r in res["ranges"].values())
    if lo > hi or lo <= 0:
        return {**res, "l0": None, "note": "no crossing"}
    l0 = target if lo <= target <= hi else math.sqrt(lo * hi)
    res.update(l0=l0, note="at the target L0" if l0 == target else "log-midpoint of the L0 overlap")
    for lib, curve in curves.items():
        per_seed = []
        for seed in sorted({r["seed"] for r in relu if r["candidate"] == lib}):
            v = fve_at_l0([(r["l0"], r["fve"]) for r in relu if r["candidate"] == lib and r["seed"] == seed], l0)
            if v is not None:
                per_seed.append(v)
        res[lib] = {"fve": fve_at_l0(curve, l0), "fve_sd": _sd(per_seed), "fve_seeds": per_seed}
    return res


def _pm(mean: float, sd: float, n: int) -> str:
    return f"{mean:.4f} ± {sd:.4f}" if n > 1 else f"{mean:.4f}"


def markdown(result: dict) -> str:
    vers = ", ".join(f"{k} {v}" for k, v in (result.get("peer_versions") or {}).items())
    lines = ["# Quality at matched tokens (bench/bench_quality.py)", "",
             f"Store: {result['note'] or result['store']}.", "",
             f"Hook {result['hook']} (d={result['d']}) of a {result['store_rows']:,}-row store; {result['steps']} "
             f"steps of {result['batch']} rows ({result['tokens']:,} tokens, BOS rows left out) per SAE, "
             f"k={result['k']}; held-out FVE (centred, saecache's one definition), L0 and dead % (never fires) over "
             f"{result['heldout_rows']:,} held-out rows (BOS left out); mean ± seed-to-seed sd. 1 torch thread per "
             "trainer" + (f", load average at start {result['loadavg_start']:.1f}" if result.get("from_logs") is None
                          else "") + "; train seconds are wall time on a shared "
             + (f"machine (not comparable). Whole run {result['wall_s']:,} s wall, {result['cpu_s']:,} CPU-s."
                if result.get("from_logs") is None else
                f"machine (not comparable). Rows gathered from the logs of {len(result['from_logs'])} runs of this "
                f"bench on this store ({result['wall_s']:,.0f} s of training in all): "
                + ", ".join(f"`{Path(p).name}`" for p in result["from_logs"]) + "."), ""]
    n_train = result.get("train_sample_rows")
    lines += [f"dead % train: latents that never fire on {f'{n_train:,}' if n_train else 'a sample of the'} "
              "training rows every trainer trained on (the last ones of the seed-0 order): the dead of sparsify and "
              "Gao et al. (silent over a stretch of training), where the held-out count (5-6k rows) also takes in "
              "live latents rarer than one row in several thousand. – where a row's log predates the count.", ""]
    if vers:
        lines += [f"Peers: {vers}.", ""]
    lines += ["| width | arch | candidate | coeff | FVE | FVE per seed | L0 | dead % | dead % train | train s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        coeff = "" if s["coeff"] is None else f"{s['coeff']:g}"
        dead_train = "–" if s.get("dead_train_pct") is None else f"{s['dead_train_pct']:.1f}"
        lines.append(f"| {s['width']} | {s['arch']} | {s['candidate']} | {coeff} | "
                     f"{_pm(s['fve'], s['fve_sd'], s['n'])} | {', '.join(f'{v:.4f}' for v in s['fve_seeds'])} | "
                     f"{s['l0']:.1f} | {s['dead_pct']:.1f} | {dead_train} | {s['train_s']:.0f} |")
    if result["targets"]:
        lines += ["", "Target (issue 12): saecache's default FVE ≥ the best peer's, dead % ≤ dictionary_learning's "
                  "(dl).", ""]
        for w in sorted({t["width"] for t in result["targets"]}):
            ts = [t for t in result["targets"] if t["width"] == w]
            for t in ts:
                dead = ("no dl run" if t["dl_dead_pct"] is None else f"dead {t['dead_pct']:.1f} % vs dl "
                        f"{t['dl_dead_pct']:.1f} %: {'met' if t['dead_met'] else 'NOT met'}")
                if t.get("dead_train_met") is not None:
                    dead += (f"; dead on training rows {t['dead_train_pct']:.1f} % vs dl {t['dl_dead_train_pct']:.1f} "
                             f"%: {'met' if t['dead_train_met'] else 'NOT met'}")
                lines.append(f"- width {w} {t['arch']}: saecache {t['fve']:.4f} vs best peer {t['best_peer']} "
                             f"{t['peer_fve']:.4f}, margin {t['margin']:+.4f} (seed sd {t['fve_sd']:.4f} / "
                             f"{t['peer_sd']:.4f}): FVE {'met' if t['fve_met'] else 'NOT met'}; {dead}")
            ok = all(t["fve_met"] and t["dead_met"] is not False and t.get("dead_train_met") is not False for t in ts)
            lines.append(f"- **width {w}: target {'met' if ok else 'NOT met'}** ({', '.join(t['arch'] for t in ts)})")
    if result["matched_l0"]:
        lines += ["", "ReLU+L1 at matched L0 (FVE interpolated linearly in log L0 between the bracketing coefficients "
                  f"of each sweep; saecache coeff {result['relu_coeffs']}, dl l1_penalty {result['dl_l1']}):", "",
                  "| width | L0 | saecache FVE | dl FVE | saecache − dl | saecache L0 range | dl L0 range | note |",
                  "|---|---|---|---|---|---|---|---|"]
        rng = lambda r: f"{r[0]:.1f}–{r[1]:.1f}" if r else "–"  # noqa: E731
        for m in result["matched_l0"]:
            cells = [_pm(m[lib]["fve"], m[lib]["fve_sd"], len(m[lib]["fve_seeds"])) if lib in m else "–"
                     for lib in ("saecache", "dl")]
            diff = f"{m['saecache']['fve'] - m['dl']['fve']:+.4f}" if "dl" in m else "–"
            l0 = f"{m['l0']:.1f}" if m["l0"] else "–"
            lines.append(f"| {m['width']} | {l0} | {cells[0]} | {cells[1]} | {diff} | {rng(m['ranges']['saecache'])} "
                         f"| {rng(m['ranges']['dl'])} | {m['note']} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out / "quality.md").write_text(md)
    print(md)
