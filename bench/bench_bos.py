"""Are BOS rows norm outliers? (issue 12, defect 6.) Per hook of a store whose contexts start with BOS: the row norms
at position 0 against those at every other position — median ratio, and the share of BOS rows above the other rows'
99th percentile. This is the measurement behind training's `train_on_bos` default (off) (README, "Default training recipe").

    python -m bench.bench_bos STORE [STORE ...] [--max-rows 200000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def bos_norms(url: str, max_rows: int) -> dict:
    """{hook: figures} over the first `max_rows` stored rows of the store's complete shards."""
    from saecache.harvest.store import Store, to_torch

    st = Store.open(url)
    g = st.geometry
    norms = {h: ([], []) for h in st.hooks}
    seen = 0
    for s in st.complete_shards():
        r0, r1 = g.shard_row_range(s)
        r1 = min(r1, r0 + max_rows - seen)
        pos = st.read_meta(r0, r1)["position"]
        for h, (bos, rest) in norms.items():
            x = to_torch(st.read_acts(h, r0, r1), st.logical_dtype, st.hooks[h]["d"]).float()
            n = x.norm(dim=1).numpy()
            bos.append(n[pos == 0])
            rest.append(n[pos != 0])
        seen += r1 - r0
        if seen >= max_rows:
            break
    out = {}
    for h, (bos, rest) in norms.items():
        b, r = np.concatenate(bos), np.concatenate(rest)
        if not len(b):
            out[h] = {"bos_rows": 0}
            continue
        p99 = float(np.percentile(r, 99))
        out[h] = {"bos_rows": int(len(b)), "other_rows": int(len(r)),
                  "median_ratio": round(float(np.median(b) / np.median(r)), 3),
                  "mean_sq_share": round(float((b ** 2).sum() / ((b ** 2).sum() + (r ** 2).sum())), 4),
                  "row_share": round(len(b) / (len(b) + len(r)), 4),
                  "above_other_p99": round(float((b > p99).mean()), 3)}
    return {"store": url, "model": (st.header.get("model") or {}).get("name"), "hooks": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--max-rows", type=int, default=200_000)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    results = [bos_norms(u, args.max_rows) for u in args.stores]
    lines = ["# BOS row norms (bench/bench_bos.py)", "",
             "Position-0 (BOS) rows against all other positions of the same rows read: median norm ratio, BOS rows' "
             "share of the rows and of the summed squared norm (what a mean-squared-error loss weighs), and the share "
             "of BOS rows above the other rows' 99th percentile.", "",
             "| store | hook | BOS rows | median norm BOS / other | share of rows | share of Σ‖x‖² | BOS above other p99 |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for h, f in r["hooks"].items():
            if f["bos_rows"]:
                lines.append(f"| {Path(r['store']).parent.name} | {h} | {f['bos_rows']:,} | {f['median_ratio']} | "
                             f"{f['row_share']:.2%} | {f['mean_sq_share']:.2%} | {f['above_other_p99']:.1%} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bos.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "bos.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
