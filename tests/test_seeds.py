"""`train --seeds N`: replicas of each SAE from one read of the data, differing only in their init seed; evaluate's
mean ± sd across seeds (on hand-made report rows)."""

import json
import math
from pathlib import Path

import pytest

from saecache.errors import ConfigError
from saecache.evaluate import report as R
from saecache.train import chunks, rundir
from saecache.train.config import TrainConfig
from saecache.train.loader import Loader
from saecache.train.trainer import run_training


def _cfg(store, out, **kw) -> TrainConfig:
    base = dict(stores=[str(store)], out=str(out), saes=[dict(arch="topk", hook_in="mlp_out.0", width=64, k=4),
                                                         dict(arch="relu", hook_in="mlp_out.1", width=48)],
                steps=6, batch_size=128, checkpoint_every=3, log_every=3, heldout_fraction=0.05, progress=False,
                reader_threads=0)  # reads on demand: no read-ahead whose extent depends on timing
    return TrainConfig(**{**base, **kw})


def _count_reads(monkeypatch) -> dict:
    """Counts loaders made, batches served and chunk reads (both the view and the copying paths of
    `chunks.ChunkReader`). Chunk reads include the next epoch's read-ahead, whose extent depends on timing, so
    tests compare loaders and batches exactly and only bound the chunk reads."""
    n = {"loaders": 0, "batches": 0, "chunks": 0}

    def counted(fn, key):
        def wrapper(*a, **kw):
            n[key] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(Loader, "__init__", counted(Loader.__init__, "loaders"))
    monkeypatch.setattr(Loader, "__next__", counted(Loader.__next__, "batches"))
    monkeypatch.setattr(chunks.ChunkReader, "views", counted(chunks.ChunkReader.views, "chunks"))
    monkeypatch.setattr(chunks.ChunkReader, "read", counted(chunks.ChunkReader.read, "chunks"))
    return n


@pytest.mark.usefixtures("one_torch_thread")
def test_replicas_share_one_read_and_differ_only_by_init_seed(tiny_store, tmp_path, monkeypatch):
    reads = _count_reads(monkeypatch)
    single = run_training(_cfg(tiny_store, tmp_path / "one"))
    one = dict(reads)
    reads.update(loaders=0, batches=0, chunks=0)
    dirs = run_training(_cfg(tiny_store, tmp_path / "three", seeds=3))
    # one loader and the same 6 batches feed 3x the SAEs; 3 separate reads would be 3 loaders and ~3x the chunks
    assert reads["loaders"] == one["loaders"] == 1 and reads["batches"] == one["batches"] == 6
    assert 0 < reads["chunks"] < 2 * one["chunks"]
    assert [Path(d).name for d in dirs] == [f"{n}-seed{r}" for n in ("topk-mlp_out.0-64-k4", "relu-mlp_out.1-48")
                                            for r in range(3)]
    cfgs = [rundir.read_cfg(d) for d in dirs]
    weights = [(Path(d) / rundir.WEIGHTS_FILE).read_bytes() for d in dirs]
    for i in (0, 3):  # per SAE: same SAE config, spec (but its name), data order; distinct init seeds
        group = cfgs[i:i + 3]
        assert all(c["sae"] == group[0]["sae"] and c["train"] == group[0]["train"] for c in group)
        assert all({**c["spec"], "name": None} == {**group[0]["spec"], "name": None} for c in group)
        assert [c["replica"]["index"] for c in group] == [0, 1, 2]
        assert {c["replica"]["of"] for c in group} == {Path(single[i // 3]).name}
        assert len({c["replica"]["init_seed"] for c in group}) == 3
        assert len(set(weights[i:i + 3])) == 3
    # replica 0 is the SAE trained without replicas, bit for bit
    assert weights[0] == (Path(single[0]) / rundir.WEIGHTS_FILE).read_bytes()
    assert weights[3] == (Path(single[1]) / rundir.WEIGHTS_FILE).read_bytes()
    assert "replica" not in rundir.read_cfg(single[0])


def test_seeds_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="seeds must be a positive integer"):
        _cfg("s", tmp_path, seeds=0)
    with pytest.raises(ConfigError, match="seeds must be int"):
        _cfg("s", tmp_path, seeds=True)
    assert [n for _, n, _ in _cfg("s", tmp_path, seeds=2).replicas()] == [
        "topk-mlp_out.0-64-k4-seed0", "topk-mlp_out.0-64-k4-seed1", "relu-mlp_out.1-48-seed0", "relu-mlp_out.1-48-seed1"]


# ---- evaluate: mean ± sd across seeds, on hand-made rows ----

def _row(run, of, layer, mse, rec, lo, hi, pruned=False):
    return {"run": run, "run_dir": f"/r/{run}", "arch": "topk", "hook_in": f"mlp_out.{layer}",
            "hook_out": f"mlp_out.{layer}", "layer": str(layer), "width": 64, "k": 4, "rows": "held out",
            "n_rows": 100, "mse": mse, "l1": 1.0, "l0": 4.0, "frac_alive": 0.5, "recovered_zero": rec,
            "recovered_zero_lo": lo, "recovered_zero_hi": hi, "fve": None, "pruned": pruned, "replica_of": of}


def test_seed_summary_mean_and_sd_on_hand_made_numbers():
    rows = [_row("a-seed0", "a", 0, 0.10, 0.90, 0.88, 0.92), _row("a-seed1", "a", 0, 0.20, 0.94, 0.92, 0.96),
            _row("a-seed2", "a", 0, 0.30, 0.98, 0.96, 1.00), _row("b", None, 1, 0.5, 0.7, 0.6, 0.8)]
    (s,) = R.seed_summary(rows)
    assert s["run"] == "a" and s["n_seeds"] == 3 and s["replicas"] == ["a-seed0", "a-seed1", "a-seed2"]
    assert s["mse"] == pytest.approx(0.2) and s["mse_sd"] == pytest.approx(0.1)  # sd with n - 1: sqrt(0.02 / 2)
    assert s["recovered_zero"] == pytest.approx(0.94) and s["recovered_zero_sd"] == pytest.approx(0.04)
    assert s["l1_sd"] == 0.0 and "fve" not in s and "recovered_zero_lo_sd" not in s
    assert (s["recovered_zero_lo"], s["recovered_zero_hi"]) == (pytest.approx(0.92), pytest.approx(0.96))
    assert R.mean_sd([2.0])[0] == 2.0 and math.isnan(R.mean_sd([2.0])[1])
    md = R.tables(rows)
    assert "| 0 | 0.2 ± 0.1 | 1 ± 0 | 4.0 ± 0.0 | 50.0 ± 0.0 | 94.0 ± 4.0 [92.0, 96.0] |" in md
    assert "| 1 | 0.5 | 1 | 4.0 | 50.0 | 70.0 [60.0, 80.0] |" in md  # no replicas: as before
    assert "a-seed1" not in md


def test_seed_summary_keeps_pruned_apart_and_report_json_lists_it(tmp_path):
    rows = [_row("a-seed0", "a", 0, 0.1, 0.9, 0.8, 1.0), _row("a-seed1", "a", 0, 0.3, 0.9, 0.8, 1.0),
            {**_row("a-seed0", "a", 0, 1.0, 0.5, 0.4, 0.6, pruned=True), "prune_above": 0.1},
            {**_row("a-seed1", "a", 0, 3.0, 0.5, 0.4, 0.6, pruned=True), "prune_above": 0.1}]
    s = R.seed_summary(rows)
    assert [(x["pruned"], x["mse"]) for x in s] == [(False, pytest.approx(0.2)), (True, pytest.approx(2.0))]

    class Store:
        url, header = "s", {"model": {"name": "m"}, "storage": {"first_position": 0}}

        def fingerprint(self):
            return "f" * 16

    class Cfg:
        out, histograms = str(tmp_path), False

        def to_dict(self):
            return {}

    R.write_report(Cfg(), Store(), rows, {})
    rep = json.loads((tmp_path / "report.json").read_text())
    assert len(rep["rows"]) == 4 and [x["mse_sd"] for x in rep["seed_summary"]] == [pytest.approx(0.1 * 2 ** 0.5),
                                                                                   pytest.approx(2 ** 0.5)]
    assert "2 ± 1.414" in (tmp_path / "report.md").read_text()
