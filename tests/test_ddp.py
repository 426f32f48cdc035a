"""Data-parallel training for real: `torchrun --nproc_per_node 2` with gloo on CPU gives (within float tolerance) the
weights of one process at the same global batch, with each rank reading only its own partitions; resuming it from a
checkpoint ends bit-identical to the uninterrupted two-rank run."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _store import tiny_store_in
from safetensors.torch import load_file

from saecache.train import rundir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("fmt", ["float16", "int8"])
def test_two_gloo_processes_match_one_process_and_resume_exactly(request, fmt, tmp_path):
    tiny_store = tiny_store_in(request, fmt)
    cfg = {"stores": [str(tiny_store)], "steps": 24, "batch_size": 256, "warmup_steps": 4, "checkpoint_every": 12,
           "resample_steps": 8, "resample_window": 2, "heldout_fraction": 0.05, "log_every": 4, "progress": False,
           "device": "cpu",
           "saes": [{"arch": "topk", "hook_in": "mlp_out.0", "width": 512, "k": 4, "resample": True},  # resamples ~200
                    {"arch": "relu", "hook_in": "mlp_out.1", "width": 128}]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    one = subprocess.run([sys.executable, "-m", "saecache", "train", "--config", tmp_path / "cfg.json",
                          "--out", tmp_path / "one"], env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "saecache", "train", "--config", tmp_path / "cfg.json", "--out", tmp_path / "two"],
                         env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert two.stdout.split() == [str(tmp_path / "two" / n) for n in ("topk-mlp_out.0-512-k4", "relu-mlp_out.1-128")]
    for name in ("topk-mlp_out.0-512-k4", "relu-mlp_out.1-128"):
        a, b = load_file(tmp_path / "one" / name / rundir.WEIGHTS_FILE), load_file(tmp_path / "two" / name /
                                                                                   rundir.WEIGHTS_FILE)
        assert a.keys() == b.keys()
        for k in a:
            if a[k].is_floating_point():
                torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=f"{name} {k}")
            else:
                assert torch.equal(a[k], b[k]), f"{name} {k}"
        # the two-rank run still trained (weights moved away from a fresh init) and recorded its world size
        cfg_two = rundir.read_cfg(tmp_path / "two" / name)
        assert cfg_two["world_size"] == 2 and cfg_two["complete"]
        m1 = [json.loads(x) for x in (tmp_path / "one" / name / rundir.METRICS_FILE).read_text().splitlines()]
        m2 = [json.loads(x) for x in (tmp_path / "two" / name / rundir.METRICS_FILE).read_text().splitlines()]
        assert [r["step"] for r in m1] == [r["step"] for r in m2] == [4, 8, 12, 16, 20, 24]
    # resuming the two-rank run from its step-12 checkpoint (as after a kill) ends bit-identical to the whole run
    names = ("topk-mlp_out.0-512-k4", "relu-mlp_out.1-128")
    whole = {n: (tmp_path / "two" / n / rundir.WEIGHTS_FILE).read_bytes() for n in names}
    metrics = {n: (tmp_path / "two" / n / rundir.METRICS_FILE).read_text() for n in names}
    for n in names:
        run = tmp_path / "two" / n
        shutil.rmtree(rundir.checkpoint_path(run, 24))
        (run / rundir.WEIGHTS_FILE).unlink()
        rundir.write_json_atomic(str(run / "cfg.json"), {**rundir.read_cfg(run), "complete": False})
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "saecache", "train", "--config", tmp_path / "cfg.json", "--out", tmp_path / "two"],
                           env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for n in names:
        assert (tmp_path / "two" / n / rundir.WEIGHTS_FILE).read_bytes() == whole[n]
        assert (tmp_path / "two" / n / rundir.METRICS_FILE).read_text() == metrics[n]
