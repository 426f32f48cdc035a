"""The sparsity–fidelity frontier and the pruning curves (issue 22 §3), checked by the numbers behind the pictures
(frontier.json) on a real sweep evaluated by `saecache evaluate` (tests/_sweep.py):

- a point per SAE, in its hook's panel and its architecture × width line, at the L0, FVE and % loss recovered of its
  report row; the lines' points sorted by L0;
- each SAE's pruning curve: its unpruned figures first, then one point per threshold that drops more features, the
  L0 falling strictly as the threshold falls; which features each point drops, and its L0, recomputed here from the
  held-out rows read straight from the store; the curve's loss figures equal a `--prune-above` run's at that
  threshold;
- the pictures are PNGs shown in report.md; a bad --prune-curve is a one-line error (exit 2).
"""

import json
import math

import numpy as np
import pytest
import torch

from _sweep import HELDOUT, PRUNE_CURVE, sweep_eval, sweep_runs
from saecache.cli import main
from saecache.evaluate.runner import prune_masks


@pytest.fixture(scope="module")
def sweep(tiny_store, tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    out = sweep_eval(root, tiny_store)
    return {"out": out, "runs": sweep_runs(root, tiny_store), "report": json.loads((out / "report.json").read_text()),
            "frontier": json.loads((out / "frontier.json").read_text())}


def run_cli(args) -> int:
    """`saecache ARGS` in process; its exit code."""
    try:
        main(list(map(str, args)))
    except SystemExit as e:
        return e.code
    return 0


def panel(frontier, hook):
    return next(p for p in frontier["panels"] if p["hook"] == hook)


@pytest.mark.slow  # the sweep: ~25 s to train and evaluate once per session
def test_a_point_per_sae_at_its_report_row(sweep):
    rows, fr = sweep["report"]["rows"], sweep["frontier"]
    assert [p["hook"] for p in fr["panels"]] == ["mlp_out.0", "mlp_out.1"]
    assert all(not r["pruned"] for r in rows) and len(rows) == 7  # the curves' variants are not report rows
    p0 = panel(fr, "mlp_out.0")
    assert [(ln["arch"], ln["width"]) for ln in p0["lines"]] == [("relu", 64), ("topk", 32), ("topk", 64)]
    points = [(p["hook"], ln, q) for p in fr["panels"] for ln in p["lines"] for q in ln["points"]]
    assert sorted(q["run"] for _, _, q in points) == sorted(r["run"] for r in rows)  # one point per SAE
    by_run = {q["run"]: (hook, ln, q) for hook, ln, q in points}
    for r in rows:
        hook, ln, q = by_run[r["run"]]
        assert hook == r["hook_out"] and (ln["arch"], ln["width"]) == (r["arch"], r["width"])
        for key in ("l0", "fve", "recovered_zero", "recovered_zero_lo", "recovered_zero_hi"):
            assert q[key] == r[key], (r["run"], key)
        assert r["recovered_zero"] is not None and 0 < r["l0"]
    topk64 = next(ln for ln in p0["lines"] if ln["arch"] == "topk" and ln["width"] == 64)
    assert [q["run"] for q in topk64["points"]] == ["topk64-k2", "topk64-k4", "topk64-k8"]  # by L0, as k grows
    assert [q["k"] for q in topk64["points"]] == [2, 4, 8]
    relu = p0["lines"][0]["points"]
    assert [q["l0"] for q in relu] == sorted(q["l0"] for q in relu)
    assert relu[0]["coeff"] == 0.2 and relu[1]["coeff"] == 0.02  # the higher L1 coefficient is the sparser SAE


def heldout_x(store_path, hook):
    """Held-out rows read directly from the zarr arrays: every row whose context is in the last HELDOUT fraction,
    but the BOS rows (position 0), which the runs (train's default) never trained on and evaluate leaves out."""
    from saecache.harvest.store import Store

    st = Store.open(str(store_path))
    n_ctx = st.geometry.n_contexts
    held = np.asarray(st.array("rows/context")[:]) >= n_ctx - math.ceil(HELDOUT * n_ctx)
    rows = np.flatnonzero(held & (np.asarray(st.array("rows/position")[:]) != 0))
    return torch.from_numpy(np.asarray(st.array(f"acts/{hook}")[:])[rows].astype(np.float32))


@pytest.mark.slow  # the sweep: ~25 s to train and evaluate once per session
def test_pruning_curves_fall_monotonically_and_drop_the_frequent_features(sweep, tiny_store):
    from saecache.train.rundir import load_run

    fr, rows = sweep["frontier"], {r["run"]: r for r in sweep["report"]["rows"]}
    curves = {c["run"]: c for p in fr["panels"] for c in p["pruning"]}
    assert set(curves) == set(rows)
    x = heldout_x(tiny_store, "mlp_out.0")
    for run, c in curves.items():
        pts = c["points"]
        assert pts[0]["prune_above"] is None and pts[0]["n_pruned"] == 0
        assert pts[0]["l0"] == rows[run]["l0"] and pts[0]["recovered_zero"] == rows[run]["recovered_zero"]
        assert len(pts) >= 3, run  # the series drops features at several thresholds
        thr = [q["prune_above"] for q in pts[1:]]
        assert thr == sorted(thr, reverse=True) and set(thr) <= set(PRUNE_CURVE)
        l0 = [q["l0"] for q in pts]
        assert all(a > b for a, b in zip(l0, l0[1:])), (run, l0)  # falls strictly as the threshold falls
        n = [q["n_pruned"] for q in pts]
        assert all(a < b for a, b in zip(n, n[1:]))
        assert all(q["recovered_zero"] is not None for q in pts)
        if rows[run]["hook_out"] != "mlp_out.0":
            continue
        # independent: frequencies and pruned L0 from the store's held-out rows and the SAE's weights
        sae, _ = load_run(sweep["runs"][run])
        with torch.no_grad():
            f = sae.encode(x)
        freq = (f != 0).double().mean(0)
        for q in pts[1:]:
            keep = freq <= q["prune_above"]
            assert q["n_pruned"] == int((~keep).sum())
            assert q["l0"] == pytest.approx(float(((f * keep) != 0).sum(1).double().mean()), rel=1e-6)
        # thresholds left out drop no feature beyond the previous kept one's
        for t in PRUNE_CURVE:
            if t not in thr:
                higher = [q for q in pts[1:] if q["prune_above"] > t]
                assert int((freq > t).sum()) == (higher[-1]["n_pruned"] if higher else 0)


@pytest.mark.slow  # the sweep: ~25 s to train and evaluate once per session
def test_the_curve_equals_a_prune_above_run_at_the_same_threshold(sweep, tiny_store, tmp_path):
    c = next(c for p in sweep["frontier"]["panels"] for c in p["pruning"] if c["run"] == "topk64-k8")
    q = c["points"][2]
    out = tmp_path / "ev"
    assert run_cli(["evaluate", sweep["runs"]["topk64-k8"], "--store", tiny_store, "--out", out, "--n-contexts", 4,
                    "--threads", 1, "--html-features", 0, "--no-histograms", "--no-frontier", "--prune-curve", "",
                    "--prune-above", q["prune_above"]]) == 0
    pruned = next(r for r in json.loads((out / "report.json").read_text())["rows"] if r["pruned"])
    for key in ("l0", "fve", "mse", "n_pruned", "recovered_zero", "recovered_zero_lo", "recovered_zero_hi"):
        assert pruned[key] == pytest.approx(q[key], rel=1e-9), key
    fr = json.loads((out / "frontier.json").read_text())
    assert fr["panels"][0]["pruning"] == [] and fr["panels"][0]["png"] is None  # --prune-curve '' and --no-frontier
    assert not list(out.glob("frontier-*.png"))


@pytest.mark.slow  # the sweep: ~25 s to train and evaluate once per session
def test_pictures_are_written_and_shown_in_report_md(sweep):
    out, fr = sweep["out"], sweep["frontier"]
    md = (out / "report.md").read_text()
    for p in fr["panels"]:
        png = (out / p["png"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
        assert f"]({p['png']})" in md


def test_prune_masks_leave_out_thresholds_that_drop_nothing_more():
    freq = torch.tensor([0.5, 0.3, 0.3, 0.04, 0.0])
    got = [(t, k.tolist()) for t, k in prune_masks(freq, (0.01, 0.6, 0.4, 0.35, 0.1, 0.05))]
    assert got == [(0.4, [False, True, True, True, True]), (0.1, [False, False, False, True, True]),
                   (0.01, [False, False, False, False, True])]


@pytest.mark.parametrize("value", ["0.1,0", "2", "x"])
def test_bad_prune_curve_is_one_line(value, tiny_store, tmp_path, capsys):
    code = run_cli(["evaluate", tmp_path / "none", "--store", tiny_store, "--out", tmp_path / "ev", "--prune-curve",
                    value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--prune-curve" in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "ev").exists()
