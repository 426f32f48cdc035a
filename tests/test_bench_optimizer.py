"""bench/bench_optimizer.py end to end at a tiny size: both optimizers run, the results files are written with a row
per size (no timing thresholds: the figures are the bench's, not the test's)."""

import json


def test_bench_optimizer_writes_a_row_per_size(tmp_path, monkeypatch):
    from bench import bench_optimizer as bo

    monkeypatch.setattr(bo, "SIZES", ((8, 64, 32), (16, 128, 64)))
    bo.main(["--repeats", "2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "optimizer.json").read_text())["rows"]
    assert [(r["d"], r["width"], r["batch"]) for r in rows] == [(8, 64, 32), (16, 128, 64)]
    assert all(r["step_s_adam"] > 0 and r["step_s_lazy"] > 0 and r["opt_s_lazy"] > 0 for r in rows)
    assert all(abs(r["step_ratio"] - r["step_s_lazy"] / r["step_s_adam"]) < 1e-12 for r in rows)
    assert (tmp_path / "optimizer.md").read_text().count("\n| 8 | 64 | 32 |") == 1
