"""The training run end to end on the tiny store: determinism across reader threads, kill -9 at random moments then
rerun → bit-identical weights, divergence keeps the last good checkpoint, cfg.json provenance, metrics.jsonl,
normalisation folded back at save, and a sweep from a config file (each member = the same SAE trained alone)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import saecache
from saecache.cli import main
from saecache.harvest.split import heldout_cutoff
from saecache.harvest.store import Store
from saecache.train import rundir
from saecache.train.config import TrainConfig
from saecache.train.loader import Loader, open_stores
from saecache.train.sae import SAE, SAEConfig
from saecache.train.trainer import run_training

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saecache", "train", *map(str, args)], env=ENV,
                          capture_output=True, text=True, **kw)


def popen(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "saecache", "train", *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def small_cfg(store, out, **kw) -> TrainConfig:
    base = dict(stores=[str(store)], out=str(out), saes=[dict(arch="topk", hook_in="mlp_out.0", width=512, k=4),
                                                         dict(arch="relu", hook_in="mlp_out.1", width=96)],
                steps=40, batch_size=256, checkpoint_every=10, warmup_steps=5, resample_steps=10,
                dead_tokens_threshold=3 * 256, log_every=5, heldout_fraction=0.05, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir) -> bytes:
    return (Path(run_dir) / rundir.WEIGHTS_FILE).read_bytes()


def test_same_weights_with_any_reader_thread_count_and_different_with_another_seed(tiny_store, tmp_path):
    dirs = {t: run_training(small_cfg(tiny_store, tmp_path / f"t{t}", reader_threads=t)) for t in (0, 3)}
    for a, b in zip(dirs[0], dirs[3]):
        assert weights(a) == weights(b)
    other = run_training(small_cfg(tiny_store, tmp_path / "seed1", seed=1))
    assert all(weights(a) != weights(b) for a, b in zip(dirs[0], other))


def _files(run_root):
    return sorted(str(p.relative_to(run_root)) for p in Path(run_root).rglob("*") if p.is_file())


def test_kill_9_at_random_moments_then_rerun_is_bit_identical(tiny_store, tmp_path):
    ref_root, root = tmp_path / "ref", tmp_path / "killed"
    cfg = {"stores": [str(tiny_store)], "out": str(root), "steps": 120, "batch_size": 256, "checkpoint_every": 7,
           "warmup_steps": 5, "resample_steps": 10, "dead_tokens_threshold": 4 * 256, "log_every": 5, "heldout_fraction": 0.05,
           "progress": False,
           "saes": [{"arch": "topk", "hook_in": "mlp_out.0", "width": 512, "k": 4},
                    {"arch": "relu", "hook_in": "mlp_out.1", "width": 128}]}
    (tmp_path / "sweep.json").write_text(json.dumps(cfg))
    ref = cli("--config", tmp_path / "sweep.json", "--out", ref_root)  # uninterrupted
    assert ref.returncode == 0, ref.stderr
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    kills, resumed_from = 0, []
    names = ["topk-mlp_out.0-512-k4", "relu-mlp_out.1-128"]

    def run_until(goal_step: int, deadline_s: float) -> None:
        """Start the sweep; SIGKILL it a random few ms after every SAE has a checkpoint >= goal_step or once
        deadline_s has passed, whichever comes first (unless it finished by itself)."""
        nonlocal kills
        p, t0 = popen("--config", tmp_path / "sweep.json"), time.monotonic()
        while p.poll() is None:
            done = [rundir.list_checkpoints(root / n) for n in names]
            if all(d and d[-1] >= goal_step for d in done) or time.monotonic() - t0 > deadline_s:
                time.sleep(rng.uniform(0, 0.05))  # anywhere inside the next step(s), checkpoint writes included
                break
            time.sleep(0.002)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            resumed_from.append(min((rundir.list_checkpoints(root / n) or [0])[-1] for n in names))
        p.stderr.close()

    run_until(14, rng.uniform(0.2, 3.0))  # a random wall-clock moment, maybe still at startup
    for target in sorted(rng.sample(range(1, 14), 3)):  # then soon after checkpoint number `target` appears
        have = [rundir.list_checkpoints(root / n) for n in names]
        run_until(max(7 * target, min(d[-1] if d else 0 for d in have) + 7), 1e9)  # >= 1 new checkpoint per run
    assert kills >= 3, f"random seed {seed}: the runs finished before they could be killed"
    final = cli("--config", tmp_path / "sweep.json")
    assert final.returncode == 0, final.stderr
    for n in names:
        assert weights(root / n) == weights(ref_root / n), f"{n} differs after kills (random seed {seed})"
        assert (root / n / rundir.METRICS_FILE).read_text() == (ref_root / n / rundir.METRICS_FILE).read_text()
        assert not [f for f in _files(root / n) if ".tmp" in f]
    assert len(set(resumed_from)) >= 3  # the kills landed at different points of the run


def test_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_store, tmp_path, capsys):
    args = ["--store", tiny_store, "--out", tmp_path, "--hook", "mlp_out.0", "--arch", "relu", "--width", "64",
            "--steps", "50", "--batch-size", "128", "--checkpoint-every", "1", "--warmup", "3", "--lr", "1e15",
            "--no-progress"]
    r = cli(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and "kept the last good checkpoint" in lines[0], r.stderr
    run = tmp_path / "relu-mlp_out.0-64"
    steps = rundir.list_checkpoints(run)
    assert steps and f"step {steps[-1]}" in lines[0]
    model, extra, state = rundir.load_checkpoint(run, steps[-1])
    assert all(torch.isfinite(t).all() for t in model.values()) and state["step"] == steps[-1]
    assert not (run / rundir.WEIGHTS_FILE).exists() and not rundir.read_cfg(run)["complete"]
    # rerunning (in-process this time) resumes from that checkpoint and diverges the same way, again keeping it
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["train", *map(str, args)])
    assert exit_.value.code != 0 and capsys.readouterr().err == r.stderr
    assert rundir.list_checkpoints(run)[-1] == steps[-1]


def test_cfg_json_provenance_metrics_and_folded_normalisation(tiny_store, tmp_path):
    cfg = small_cfg(tiny_store, tmp_path, steps=23, log_every=4, checkpoint_every=23, keep_checkpoints=1)
    topk_dir, relu_dir = run_training(cfg)
    rec = rundir.read_cfg(topk_dir)
    st = Store.open(str(tiny_store))
    assert rec["complete"] and rec["package_version"] == saecache.__version__ and rec["seed"] == 0
    assert rec["stores"][0]["fingerprint"] == st.fingerprint()
    assert rec["hooks"] == {"in": "mlp_out.0", "out": "mlp_out.0"}
    assert rec["tokens_seen"] == 23 * 256 and rec["steps_done"] == 23
    # the split, recorded once: its rule's fraction and BOS choice, and per store the held-out context range
    assert rec["split"]["heldout_fraction"] == 0.05 and rec["split"]["train_on_bos"] is False
    assert rec["split"]["stores"][0]["heldout_contexts"] == [heldout_cutoff(st, 0.05), st.geometry.n_contexts]
    assert heldout_cutoff(st, 0.05) < st.geometry.n_contexts
    assert "heldout" not in rec and set(rec["stores"][0]) == {"url", "fingerprint"}
    assert TrainConfig.from_dict(rec["train"]).to_dict() == cfg.to_dict()  # everything needed to rerun it
    assert SAEConfig.from_dict(rec["sae"]).width == 512
    # which SAEs were resampled, resolved from the architecture defaults: relu yes, topk (AuxK) no
    assert rec["spec"]["resample"] is False and rundir.read_cfg(relu_dir)["spec"]["resample"] is True
    assert [s["resample"] for s in rec["train"]["saes"]] == [False, True]
    # the LR decay, resolved per SAE: topk over the last half of the 23 steps, relu (it resamples) none
    assert [s["decay_start"] for s in rec["train"]["saes"]] == [11, 23] and rec["train"]["decay_start"] is None
    # AuxK's dead threshold: a hundredth of the run's rows
    assert rec["sae"]["dead_tokens_threshold"] == 23 * 256 // 100

    lines = [json.loads(x) for x in (Path(topk_dir) / rundir.METRICS_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 8, 12, 16, 20, 23]
    for x in lines:
        assert x["tokens"] == x["step"] * 256 and 0 < x["l0"] <= 4 and 0 <= x["dead_frac"] <= 1
        assert x["fve"] is not None and x["fve"] < 1 and x["loss"] > 0
        # warm-up over 5 steps, never re-warmed; topk decays linearly to 0 over the last half (steps 11..22, 0-based)
        s = x["step"]  # the logged rate is the one step s - 1 used
        assert x["lr"] == pytest.approx(rec["spec"]["lr"] * min(1, s / 5) * min(1, (24 - s) / 12))

    # the saved SAE takes raw activations: it equals the normalised-space SAE of the last checkpoint, rescaled
    loaded, _ = rundir.load_run(topk_dir)
    trained = SAE(loaded.cfg)
    trained.load_state_dict(rundir.load_checkpoint(topk_dir, 23)[0])
    scale = rec["normalization"]["in_scale"]
    assert scale == pytest.approx(st.stats("mlp_out.0")["mean_sq_norm"] ** 0.5)
    x_BD = next(Loader(open_stores([str(tiny_store)], ["mlp_out.0"]), ["mlp_out.0"], 256))["mlp_out.0"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_BD), trained(x_BD / scale) * scale, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(loaded(x_BD), trained(x_BD))


def test_sweep_from_config_file_matches_each_sae_trained_alone(tiny_store, tmp_path):
    saes = [{"arch": "topk", "hook_in": "mlp_out.0", "width": 64, "k": 4},
            {"arch": "jumprelu", "hook_in": "mlp_out.1", "width": 64},
            {"arch": "batchtopk", "hook_in": "mlp_in.0", "hook_out": "mlp_out.0", "width": 64, "k": 4,
             "name": "transcoder"}]
    common = {"stores": [str(tiny_store)], "steps": 15, "batch_size": 128, "warmup_steps": 2, "progress": False,
              "checkpoint_every": 100}
    (tmp_path / "sweep.json").write_text(json.dumps({**common, "out": "ignored", "saes": saes}))
    r = cli("--config", tmp_path / "sweep.json", "--out", tmp_path / "sweep")
    assert r.returncode == 0, r.stderr
    dirs = r.stdout.split()
    assert [Path(d).name for d in dirs] == ["topk-mlp_out.0-64-k4", "jumprelu-mlp_out.1-64", "transcoder"]
    sae, rec = rundir.load_run(dirs[2])
    assert sae.cfg.transcoder and rec["hooks"] == {"in": "mlp_in.0", "out": "mlp_out.0"}
    # a 15-step batchtopk run starts its threshold at step 1 (a tenth of the run), so it is saved with one
    assert sae.cfg.threshold_start_step == 1 and float(sae.threshold) > 0
    (tmp_path / "alone.json").write_text(json.dumps({**common, "out": str(tmp_path / "alone"), "saes": [saes[1]]}))
    alone = cli("--config", tmp_path / "alone.json")  # (a process too: same code and thread settings)
    assert alone.returncode == 0, alone.stderr
    assert weights(alone.stdout.strip()) == weights(dirs[1])


def test_progress_bar_shows_tokens_per_second_l0_fve_and_dead(tiny_store, tmp_path, capsys):
    run_training(small_cfg(tiny_store, tmp_path, steps=6, log_every=3, progress=True))
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "6/6" in last and all(f"{k}=" in last for k in ("tok/s", "L0", "FVE", "dead")), last


def test_rerun_cleans_what_a_kill_left_half_written(tiny_store, tmp_path):
    cfg = small_cfg(tiny_store, tmp_path, steps=4, checkpoint_every=2)
    first = run_training(cfg)
    ref = {d: weights(d) for d in first}
    run = Path(first[0])
    (run / rundir.WEIGHTS_FILE).unlink()
    (run / "cfg.json.tmp-99999").write_text("{half")
    (run / ".tmp-sae.safetensors").write_bytes(b"half")
    (run / "checkpoints" / ".tmp-000000004-99999").mkdir()
    (run / "checkpoints" / ".tmp-000000004-99999" / "model.safetensors").write_bytes(b"half")
    assert run_training(cfg) == first
    assert weights(run) == ref[first[0]] and not [f for f in _files(run) if ".tmp" in f]


def test_defaults_scale_with_the_run_and_width_and_cfg_records_them(tmp_path):
    """Left unset, the LR follows the architecture family (TopK: 6 × Gao et al.'s 2e-4 / sqrt(F / 2^14)), the
    warm-ups and the batchtopk threshold start scale with the run length (a 300-step run used to sit in a 1000-step
    warm-up and save its batchtopk SAE without a threshold), the LR warm-up up to the architecture's cap (the TopK
    family 100 steps, the others 1000); explicit values win, a spec's over the run's; the resolved values are what
    the config holds."""
    from saecache.errors import ConfigError
    from saecache.train.optim import default_lr

    saes = [{"arch": "batchtopk", "hook_in": "h", "width": 1024, "k": 32},
            {"arch": "topk", "hook_in": "h", "width": 4096, "k": 32}, {"arch": "relu", "hook_in": "h", "width": 4096}]
    cfg = TrainConfig(stores=["s"], out=str(tmp_path), steps=300, saes=saes)
    assert (cfg.warmup_steps, cfg.sparsity_warmup_steps) == (None, 15) and [s.warmup_steps for s in cfg.saes] == \
        [30, 30, 30]
    assert [s.lr for s in cfg.saes] == pytest.approx([6 * 2e-4 * 4, 6 * 2e-4 * 2, 1e-3])
    assert default_lr("gated", 4096) == pytest.approx(3e-4) and default_lr("jumprelu", 4096) == pytest.approx(3e-4)
    assert cfg.saes[0].options["threshold_start_step"] == 30 and "threshold_start_step" not in cfg.saes[1].options
    assert cfg.saes[0].options["threshold_beta"] == pytest.approx(1 - 1 / 27)  # EMA over a tenth of the 270 steps
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()
    long = TrainConfig(stores=["s"], out=str(tmp_path), steps=100_000, saes=saes)
    assert (long.sparsity_warmup_steps, long.saes[0].options["threshold_start_step"]) == (2000, 1000) and \
        long.saes[0].options["threshold_beta"] == pytest.approx(0.999)
    assert [s.warmup_steps for s in long.saes] == [100, 100, 1000]
    assert default_lr("topk", 2 ** 14, 32) == pytest.approx(1.2e-3)
    # the cross-layer TopK dictionaries keep the rate and warm-up their bench measured (4x, at most 1000 steps)
    clt = TrainConfig(stores=["s"], out=str(tmp_path), steps=100_000, saes=[
        {"arch": "clt", "hooks_in": ["a.0", "a.1"], "hooks_out": ["b.0", "b.1"], "width": 4096, "k": 32},
        {"arch": "matryoshka", "hook_in": "h", "width": 4096, "k": 32}])
    assert [s.lr for s in clt.saes] == pytest.approx([4 * 2e-4 * 2, 6 * 2e-4 * 2])
    assert [s.warmup_steps for s in clt.saes] == [1000, 100]
    mine = TrainConfig(stores=["s"], out=str(tmp_path), steps=300, lr=1e-3, warmup_steps=7, sparsity_warmup_steps=0,
                       saes=[{**saes[0], "options": {"threshold_start_step": 100}}, {**saes[1], "lr": 5e-5},
                             {**saes[2], "warmup_steps": 0}])
    assert (mine.warmup_steps, mine.sparsity_warmup_steps) == (7, 0)
    assert [s.warmup_steps for s in mine.saes] == [7, 7, 0]
    assert [s.lr for s in mine.saes] == [1e-3, 5e-5, 1e-3] and mine.saes[0].options["threshold_start_step"] == 100
    with pytest.raises(ConfigError, match="threshold_start_step 300 is not below the run's 300 steps"):
        TrainConfig(stores=["s"], out=str(tmp_path), steps=300, saes=[{**saes[0], "options": {"threshold_start_step": 300}}])


def test_lr_decay_and_auxk_dead_threshold_defaults_are_resolved_per_sae(tmp_path):
    """The TopK family decays its LR over the last half of the run and calls a latent dead (for AuxK) after a
    hundredth of the run's rows without firing (at most 10M); relu does not decay, nor does any SAE that resamples;
    the run's decay_start applies to every SAE, a spec's wins over it; decay beside resampling is refused."""
    from saecache.errors import ConfigError

    saes = [{"arch": "batchtopk", "hook_in": "h", "width": 1024, "k": 32},
            {"arch": "topk", "hook_in": "h", "width": 4096, "k": 32}, {"arch": "relu", "hook_in": "h", "width": 4096}]
    cfg = TrainConfig(stores=["s"], out=str(tmp_path), steps=301, batch_size=512, saes=saes)
    assert [s.decay_start for s in cfg.saes] == [151, 151, 301] and cfg.decay_start is None  # 301 - round(150.5)
    assert [s.options.get("dead_tokens_threshold") for s in cfg.saes] == [301 * 512 // 100] * 2 + [None]
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()
    long = TrainConfig(stores=["s"], out=str(tmp_path), steps=10 ** 6, batch_size=4096, saes=saes[1:2])
    assert long.saes[0].options["dead_tokens_threshold"] == 10_000_000 and long.saes[0].decay_start == 500_000
    run_wide = TrainConfig(stores=["s"], out=str(tmp_path), steps=300, decay_start=200,
                           saes=[saes[0], {**saes[1], "decay_start": 300, "options": {"dead_tokens_threshold": 7}},
                                 saes[2]])
    assert [s.decay_start for s in run_wide.saes] == [200, 300, 200]
    assert run_wide.saes[1].options["dead_tokens_threshold"] == 7
    resampling = TrainConfig(stores=["s"], out=str(tmp_path), steps=300, resample_steps=50, saes=saes)
    assert [s.decay_start for s in resampling.saes] == [150, 150, 300] and resampling.saes[2].resample
    with pytest.raises(ConfigError, match="SAE relu-h-4096 resamples .* so it cannot decay from step 100"):
        TrainConfig(stores=["s"], out=str(tmp_path), steps=300, resample_steps=50,
                    saes=[{**saes[2], "decay_start": 100}])
    with pytest.raises(ConfigError, match=r"decay_start must be in \[0, 300\]"):
        TrainConfig(stores=["s"], out=str(tmp_path), steps=300, saes=[{**saes[1], "decay_start": 301}])


def test_bos_rows_are_left_out_of_training_by_default(tiny_store, tmp_path, monkeypatch):
    """tiny_store keeps position 0 (its contexts start with BOS): by default no SAE step sees a BOS row, every batch
    still holds batch_size rows (the loader's row selection leaves BOS rows out, nothing is dropped after reading),
    and cfg.json says so; train_on_bos=True trains on every row, BOS rows included."""
    from saecache.train import trainer

    class WithPositions(Loader):  # the trainer's own loader, also serving each row's position to the spy
        def __init__(self, stores, hooks, *a, **kw):
            super().__init__(stores, [*hooks, "position"], *a, **kw)

    seen, real = [], trainer.train_step

    def spy(m, batch, *a, **kw):
        seen.append((batch["position"], batch[m.spec.hook_in].shape[0]))
        return real(m, batch, *a, **kw)

    monkeypatch.setattr(trainer, "train_step", spy)
    monkeypatch.setattr(trainer, "Loader", WithPositions)
    (run,) = run_training(small_cfg(tiny_store, tmp_path / "a", steps=3, saes=[dict(arch="topk", hook_in="mlp_out.0",
                                                                                     width=64, k=4)]))
    assert len(seen) == 3
    assert all(bool((p != 0).all()) and n == len(p) == 256 for p, n in seen)
    assert rundir.read_cfg(run)["train"]["train_on_bos"] is False
    assert rundir.read_cfg(run)["split"]["train_on_bos"] is False
    seen.clear()
    run_training(small_cfg(tiny_store, tmp_path / "b", steps=3, train_on_bos=True,
                           saes=[dict(arch="topk", hook_in="mlp_out.0", width=64, k=4)]))
    assert [n for _, n in seen] == [256] * 3
    assert any(bool((p == 0).any()) for p, _ in seen)  # BOS rows trained on (1 in 32 rows: some in 768)


def test_a_run_dir_from_before_the_split_record_resumes_and_evaluates(tiny_store, tmp_path, capsys):
    """A cfg.json written before the one "split" record (top-level "heldout", per store "heldout_from_context" and
    "split") on a store with BOS rows: the run resumes with one warning (the old trainer dropped BOS rows from each
    batch after reading it: the same rows, another order from here), completes, and its split maps to today's."""
    import shutil

    from saecache.harvest.split import RULE, Split

    cfg = small_cfg(tiny_store, tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=2,
                    saes=[dict(arch="topk", hook_in="mlp_out.0", width=64, k=4)])
    (run,) = run_training(cfg)
    rec = rundir.read_cfg(run)
    split = rec.pop("split")
    c0 = split["stores"][0]["heldout_contexts"][0]
    rec["heldout"] = {"fraction": split["heldout_fraction"], "rule": RULE}
    rec["stores"][0].update({"heldout_from_context": c0, "split": split["stores"][0]})
    rundir.write_json_atomic(os.path.join(run, rundir.CFG_FILE), {**rec, "complete": False})
    os.remove(os.path.join(run, rundir.WEIGHTS_FILE))
    shutil.rmtree(rundir.checkpoint_path(run, 4))
    capsys.readouterr()
    assert run_training(cfg) == [run]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "started by an older saecache" in err and "\n" == err[-1]
    done = rundir.read_cfg(run)
    assert done["complete"] and done["split"] == split and "heldout" not in done
    assert Split.from_cfg(rec, Store.open(str(tiny_store))) == Split.from_cfg(done, Store.open(str(tiny_store)))
