"""`python -m bench.gpu` (issue 11's GPU benchmark) runs end to end at a tiny size on CPU, so it is known to work the
day a CUDA machine is at hand: every part measured, both files written."""

import json

import pytest


@pytest.mark.slow
def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    from bench.gpu import main

    main(["--tiny", "--device", "cpu", "--rounds", "1", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["harvest"]["hooks"] == 6 and r["harvest"]["rows"] > 0 and r["harvest"]["ratio"] > 0
    assert r["loader"]["rows_per_s"] > 0
    assert r["train"]["topk_tokens_per_s"] > 0 and r["train"]["batchtopk_vs_dense"] > 0
    md = (tmp_path / "gpu.md").read_text()
    assert "batchtopk" in md and "bare forward" in md
