"""The optional TensorBoard backend writes, per SAE, the same figures as its metrics.jsonl (read back with
TensorBoard's own event reader); rerunning a finished run adds nothing."""

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from saecache.train.config import TrainConfig
from saecache.train.trainer import run_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(store, out, steps):
    return TrainConfig(stores=[str(store)], out=str(out), steps=steps, batch_size=256, checkpoint_every=6,
                       warmup_steps=2, log_every=3, heldout_fraction=0.05, progress=False, log="tensorboard",
                       saes=[dict(arch="topk", hook_in="mlp_out.0", width=128, k=4),
                             dict(arch="relu", hook_in="mlp_out.1", width=96)])


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    got: dict[str, dict[int, float]] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):  # a resume adds a file
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            got.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return got


def test_tensorboard_scalars_equal_metrics_jsonl(tiny_store, tmp_path):
    dirs = [Path(d) for d in run_training(_cfg(tiny_store, tmp_path, 12))]
    run_training(_cfg(tiny_store, tmp_path, 12))  # finished: nothing rewritten
    for d in dirs:
        recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        tb = _scalars(d)
        assert [r["step"] for r in recs] == [3, 6, 9, 12]
        assert len(list((d / "tensorboard").glob("events.out.tfevents.*"))) == 1
        for name in ("loss", "l0", "fve", "dead_frac", "lr", "tokens"):
            assert sorted(tb[name]) == [3, 6, 9, 12], (d.name, name)
            for r in recs:
                assert tb[name][r["step"]] == pytest.approx(r[name], rel=1e-6, abs=1e-7), (d.name, name, r["step"])
