"""bench/bench_quality.py (issue 12's quality table): the matched-L0 interpolation and the target lines on made-up
rows (bench/quality_report.py), and the whole benchmark end to end on the tiny store without the peers' environment."""

import json
import math

import numpy as np
import pytest


def _row(width, arch, cand, seed, fve, l0, dead=0.0, coeff=None, dead_train=None):
    r = {"width": width, "arch": arch, "candidate": cand, "seed": seed, "fve": fve, "l0": l0, "dead_pct": dead,
         "train_s": 1.0, **({"dead_train_pct": dead_train} if dead_train is not None else {})}
    return {**r, "coeff": coeff} if coeff is not None else r


def test_fve_at_l0_interpolates_in_log_l0():
    from bench.quality_report import fve_at_l0

    pts = [(64.0, 0.9), (16.0, 0.7), (32.0, 0.8)]
    assert fve_at_l0(pts, 32.0) == pytest.approx(0.8)
    assert fve_at_l0(pts, math.sqrt(16 * 32)) == pytest.approx(0.75)  # halfway in log L0
    assert fve_at_l0(pts, 8.0) is None and fve_at_l0(pts, 100.0) is None
    assert fve_at_l0([(0.0, 0.1), (10.0, 0.5), (20.0, 0.6)], 15.0) == pytest.approx(0.5 + 0.1 * math.log(1.5) /
                                                                                    math.log(2))


def test_matched_l0_crossing_and_no_crossing():
    from bench.quality_report import matched_l0

    rows = []
    for seed in (0, 1):
        d = 0.01 * seed
        rows += [_row(1024, "relu", "saecache", seed, f + d, l0, coeff=c)
                 for c, f, l0 in ((0.1, 0.9, 80.0), (0.2, 0.85, 40.0), (0.4, 0.8, 20.0))]
        rows += [_row(1024, "relu", "dl", seed, f + d, l0, coeff=c)
                 for c, f, l0 in ((0.3, 0.88, 60.0), (0.6, 0.8, 30.0), (1.2, 0.7, 10.0))]
    m = matched_l0(rows, 1024, 32.0)
    assert m["l0"] == 32.0 and m["note"] == "at the target L0"
    assert m["ranges"] == {"saecache": [20.0, 80.0], "dl": [10.0, 60.0]}
    want = 0.8 + 0.05 * math.log(32 / 20) / math.log(2)
    assert m["saecache"]["fve"] == pytest.approx(want + 0.005)  # the seed-mean curve
    assert m["saecache"]["fve_seeds"] == pytest.approx([want, want + 0.01])
    assert m["saecache"]["fve_sd"] == pytest.approx(0.01 / math.sqrt(2))
    m = matched_l0(rows, 1024, 100.0)  # outside both: the log-midpoint of the overlap [20, 60]
    assert m["l0"] == pytest.approx(math.sqrt(20 * 60)) and m["note"].startswith("log-midpoint")
    far = [r for r in rows if r["candidate"] == "saecache"] + \
        [{**r, "l0": r["l0"] / 10} for r in rows if r["candidate"] == "dl"]
    assert matched_l0(far, 1024, 32.0)["note"] == "no crossing"
    assert matched_l0([r for r in rows if r["candidate"] == "saecache"], 1024, 32.0)["note"] == "missing sweep"


def test_targets_and_markdown():
    from bench.quality_report import markdown, matched_l0, summarise, targets

    rows = [_row(1024, "topk", "saecache", s, 0.90 + 0.002 * s, 32, dead=1.0) for s in (0, 1)]
    rows += [_row(1024, "topk", "saecache-no-decay", s, 0.95, 32) for s in (0, 1)]  # an ablation is no peer
    rows += [_row(1024, "topk", "dl", s, 0.89, 32, dead=2.0) for s in (0, 1)]
    rows += [_row(1024, "topk", "saelens", s, 0.905, 32, dead=0.0) for s in (0, 1)]
    rows += [_row(1024, "batchtopk", "saecache", s, 0.91, 32, dead=3.0, dead_train=0.5 + s) for s in (0, 1)]
    rows += [_row(1024, "batchtopk", "dl", s, 0.90, 30, dead=2.0, dead_train=1.5) for s in (0, 1)]
    summary = summarise(rows)
    (top, btop) = targets(summary)
    assert top["best_peer"] == "saelens" and not top["fve_met"] and top["dead_met"]
    assert top["margin"] == pytest.approx(0.901 - 0.905) and top["fve_sd"] == pytest.approx(0.002 / math.sqrt(2))
    assert btop["best_peer"] == "dl" and btop["fve_met"] and not btop["dead_met"]
    assert top["dead_train_met"] is None  # (rows without the training-rows count)
    assert btop["dead_train_pct"] == pytest.approx(1.0) and btop["dead_train_met"]
    result = {"note": "demo", "store": "s", "hook": "mlp_out.1", "d": 128, "store_rows": 1000, "steps": 10,
              "batch": 8, "tokens": 80, "k": 32, "heldout_rows": 10, "loadavg_start": 0.5, "wall_s": 1, "cpu_s": 1,
              "summary": summary, "targets": [top, btop], "relu_coeffs": [0.1], "dl_l1": [0.3],
              "matched_l0": [matched_l0(rows, 1024, 32.0)]}
    md = markdown(result)
    assert "Store: demo." in md and "load average at start 0.5" in md
    assert "| 1024 | topk | saecache |  | 0.9010 ± 0.0014 | 0.9000, 0.9020 | 32.0 | 1.0 | – |" in md
    assert "best peer saelens 0.9050, margin -0.0040" in md and "**width 1024: target NOT met**" in md
    assert "dead 3.0 % vs dl 2.0 %: NOT met; dead on training rows 1.0 % vs dl 1.5 %: met" in md
    assert "missing sweep" in md
    assert "| 1024 | batchtopk | dl |  | 0.9000 ± 0.0000 | 0.9000, 0.9000 | 30.0 | 2.0 | 1.5 |" in md
    # a width is met only when FVE and both dead counts are: here only the training-rows count misses
    rows = [_row(2048, "topk", "saecache", s, 0.95, 32, dead=1.0, dead_train=0.2) for s in (0, 1)]
    rows += [_row(2048, "topk", "dl", s, 0.90, 32, dead=2.0, dead_train=0.1) for s in (0, 1)]
    summary = summarise(rows)
    md = markdown({**result, "summary": summary, "targets": targets(summary), "matched_l0": []})
    assert "dead 1.0 % vs dl 2.0 %: met; dead on training rows 0.2 % vs dl 0.1 %: NOT met" in md
    assert "**width 2048: target NOT met** (topk)" in md
    md = markdown({**result, "summary": summarise(rows[:2] + [{**r, "dead_train_pct": 0.3} for r in rows[2:]]),
                   "targets": targets(summarise(rows[:2] + [{**r, "dead_train_pct": 0.3} for r in rows[2:]])),
                   "matched_l0": []})
    assert "**width 2048: target met** (topk)" in md


def test_evaluate_counts_firing_and_l0():
    from bench.quality_peers import evaluate

    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    run = lambda t: (t * 2, (t > 4).float())  # noqa: E731
    res = evaluate(run, x, chunk=4)
    assert np.array_equal(res["x_hat"], x * 2)
    assert res["counts"].tolist() == [3, 4] and res["l0"].tolist() == [0, 0, 1, 2, 2, 2]


@pytest.mark.slow
def test_bench_quality_runs_tiny_without_peers(tiny_store, tmp_path, one_torch_thread, monkeypatch):
    from bench.bench_quality import main

    monkeypatch.delenv("SAECACHE_PEERS_PYTHON", raising=False)
    out = tmp_path / "out"
    result = main(["--store", str(tiny_store), "--hook", "mlp_out.1", "--peers", "--ablations", "saecache",
                   "--archs", "topk", "relu", "--widths", "64", "--seeds", "0", "--tokens", "1024", "--batch", "256",
                   "--k", "8", "--relu-coeffs", "0.05", "0.2", "--scratch", str(tmp_path / "scratch"),
                   "--out", str(out), "--note", "tiny store"])
    r = json.loads((out / "quality.json").read_text())
    assert r["steps"] == 4 and r["d"] == result["d"] and r["heldout_rows"] > 0
    cands = [(x["arch"], x["candidate"], x.get("coeff")) for x in r["rows"]]
    assert cands == [("topk", "saecache", None), ("relu", "saecache", 0.05), ("relu", "saecache", 0.2)]
    # dead counted on held-out rows and on a sample of the training rows (all of them here: 4 steps of 256)
    assert 0 < r["train_sample_rows"] <= 4 * 256 and all(0 <= x["dead_train_pct"] <= 100 for x in r["rows"])
    assert "dead % train" in (out / "quality.md").read_text()
    assert all(0 < x["l0"] <= 64 and -1 < x["fve"] <= 1 for x in r["rows"])
    assert r["rows"][0]["l0"] == 8.0
    assert r["matched_l0"][0]["note"] == "missing sweep"  # no dl sweep without the peers
    md = (out / "quality.md").read_text()
    assert "Store: tiny store." in md and "| 64 | relu | saecache | 0.2 |" in md


def test_results_from_logged_rows_of_several_runs(tiny_store, tmp_path, monkeypatch):
    """`--rows`: results built from the row lines earlier runs printed (runs stopped early or run in parallel),
    with other output in the logs ignored and the targets taken over all of them."""
    from bench.bench_quality import main

    monkeypatch.delenv("SAECACHE_PEERS_PYTHON", raising=False)
    row = lambda cand, seed, fve, dead: json.dumps({"width": 64, "seed": seed, "arch": "topk", "candidate": cand,  # noqa: E731
                                                    "fve": fve, "l0": 8.0, "dead_pct": dead, "train_s": 2.0})
    (tmp_path / "a.log").write_text("\n".join(["loading...", row("saecache", 0, 0.90, 1.0), row("dl", 0, 0.80, 2.0),
                                               "a peer's progress line"]) + "\n")
    (tmp_path / "b.log").write_text("\n".join([row("saecache", 1, 0.92, 1.0), row("dl", 1, 0.82, 0.5)]) + "\n")
    out = tmp_path / "out"
    main(["--store", str(tiny_store), "--hook", "mlp_out.1", "--rows", str(tmp_path / "a.log"),
          str(tmp_path / "b.log"), "--tokens", "1024", "--batch", "256", "--scratch", str(tmp_path / "s"),
          "--out", str(out)])
    r = json.loads((out / "quality.json").read_text())
    assert len(r["rows"]) == 4 and r["from_logs"] == [str(tmp_path / "a.log"), str(tmp_path / "b.log")]
    (t,) = r["targets"]
    assert t["fve"] == pytest.approx(0.91) and t["peer_fve"] == pytest.approx(0.81) and t["fve_met"]
    assert t["dead_pct"] == pytest.approx(1.0) and t["dl_dead_pct"] == pytest.approx(1.25) and t["dead_met"]
    md = (out / "quality.md").read_text()
    assert "Rows gathered from the logs of 2 runs" in md and "`a.log`, `b.log`" in md
