"""One name per concept, old names mapped once at the boundary: a run dir whose cfg.json says what 97d5ea9 wrote
(`total_tokens`, `resample_window` in steps, the SAE record's `architecture` / `n_features`) and a --config file in
the old names still load, resume bit-identically and evaluate; the old flags parse without being shown."""

import json
import os
import shutil

import pytest

from saecache.cli import main
from saecache.evaluate.config import EvalConfig
from saecache.train import rundir
from saecache.train.config import TrainConfig, upgrade_fields
from saecache.train.trainer import run_training

BATCH, STEPS = 128, 6
SAES = [{"arch": "relu", "hook_in": "mlp_out.0", "width": 64, "name": "relu"},
        {"arch": "topk", "hook_in": "mlp_out.0", "width": 64, "k": 4, "name": "topk"}]


def _settings(store, out, window: int | None) -> dict:
    """Today's names: the run length in `tokens`, the resampling window in rows (None: the default)."""
    return {"stores": [str(store)], "out": str(out), "tokens": STEPS * BATCH, "batch_size": BATCH,
            "checkpoint_every": 3, "resample_steps": 4, "dead_tokens_threshold": window and window * BATCH,
            "heldout_fraction": 0.1, "warmup_steps": 1, "progress": False, "device": "cpu", "saes": SAES}


def _as_97d5ea9_wrote_it(settings: dict, window: int | None) -> dict:
    """The same settings under the names 97d5ea9 used (it recorded an unset window as null)."""
    old = {k: v for k, v in settings.items() if k not in ("tokens", "dead_tokens_threshold", "saes")}
    saes = [{k: v for k, v in s.items() if k != "warmup_steps"} for s in settings["saes"]]  # a per-SAE field since
    return {**old, "saes": saes, "total_tokens": settings["tokens"], "resample_window": window}


def _cli(capsys, *args) -> tuple[int, str]:
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.err


def test_old_names_map_once_at_the_boundary():
    new = upgrade_fields({"total_tokens": 640, "resample_window": 3, "batch_size": 64, "exclude_bos": True})
    assert new == {"tokens": 640, "dead_tokens_threshold": 3 * 64, "batch_size": 64, "train_on_bos": False}
    assert upgrade_fields({"resample_window": 5})["dead_tokens_threshold"] == 5 * 4096  # the default batch
    # left unset, as 97d5ea9 recorded it: the rows a run resolves it to (half of resample_steps' rows, else 100 steps')
    assert upgrade_fields({"resample_window": None, "resample_steps": 10, "batch_size": 64}) == \
        {"dead_tokens_threshold": 5 * 64, "resample_steps": 10, "batch_size": 64}
    assert upgrade_fields({"resample_window": None})["dead_tokens_threshold"] == 100 * 4096
    assert upgrade_fields({"tokens": 7, "total_tokens": 9}) == {"tokens": 7}  # today's name wins
    # the default window is the same rows as before: half of resample_steps (else 100) steps of batch_size rows
    cfg = TrainConfig(stores=["s"], out="o", steps=10, batch_size=64, resample_steps=6, saes=[SAES[0]])
    assert cfg.dead_tokens_threshold == 3 * 64
    assert TrainConfig(stores=["s"], out="o", steps=10, batch_size=64, saes=[SAES[1]]).dead_tokens_threshold == 6400
    with pytest.raises(TypeError):  # Python callers use today's names; only files are mapped
        TrainConfig(stores=["s"], out="o", total_tokens=10, saes=[SAES[0]])


def _killed_at_step_3(run_dir, edit=lambda rec: None) -> None:
    """Make `run_dir` what a run killed after its step-3 checkpoint leaves: no later checkpoint, no weights, cfg.json
    incomplete; `edit(rec)` first makes that record what an older saecache wrote."""
    for step in rundir.list_checkpoints(str(run_dir)):
        if step > 3:
            shutil.rmtree(rundir.checkpoint_path(str(run_dir), step))
    os.remove(os.path.join(run_dir, rundir.WEIGHTS_FILE))
    rec = rundir.read_cfg(str(run_dir))
    edit(rec)
    rec.update(complete=False, steps_done=3, tokens_seen=3 * BATCH)
    rundir.write_json_atomic(os.path.join(run_dir, rundir.CFG_FILE), rec)


def _before_per_sae_warmup(rec: dict) -> None:
    """The record as a saecache from before SAESpec.warmup_steps wrote it: the one resolved warm-up in "train"."""
    rec["train"]["warmup_steps"] = rec["spec"].pop("warmup_steps")
    for spec in rec["train"]["saes"]:
        del spec["warmup_steps"]


@pytest.mark.parametrize("window", [None, 3])  # steps, as 97d5ea9's resample_window; None: its default
def test_run_dir_and_config_in_the_old_names_resume_bit_identically_and_evaluate(capsys, tiny_store, tmp_path,
                                                                                 monkeypatch, window):
    ref = run_training(TrainConfig(**_settings(tiny_store, tmp_path / "ref", window)))
    old_out = tmp_path / "old"
    run_training(TrainConfig(**_settings(tiny_store, old_out, window)))
    # make each run dir what 97d5ea9 leaves when killed after the step-3 checkpoint: cfg.json in the old names,
    # incomplete, no weights, no later checkpoint
    def as_97d5ea9_wrote_it(rec):
        rec["train"] = _as_97d5ea9_wrote_it(rec["train"], window)
        rec["sae"]["architecture"], rec["sae"]["n_features"] = rec["sae"].pop("arch"), rec["sae"].pop("width")
        del rec["spec"]["warmup_steps"]

    for name in ("relu", "topk"):
        _killed_at_step_3(old_out / name, as_97d5ea9_wrote_it)
    config = tmp_path / "old.json"  # a --config file in the old names resumes them
    config.write_text(json.dumps(_as_97d5ea9_wrote_it(_settings(tiny_store, old_out, window), window)))
    loaded, load = [], rundir.load_checkpoint
    monkeypatch.setattr(rundir, "load_checkpoint", lambda d, step: loaded.append(step) or load(d, step))
    code, err = _cli(capsys, "train", "--config", config)
    assert code == 0, err
    assert loaded == [3, 3]  # resumed from the old run's checkpoint, not retrained
    for d in ref:
        name = os.path.basename(d)
        assert (old_out / name / rundir.WEIGHTS_FILE).read_bytes() == open(os.path.join(d, rundir.WEIGHTS_FILE),
                                                                            "rb").read(), name
        assert rundir.read_cfg(str(old_out / name))["complete"]
    # the resumed run dirs evaluate (statistics on the held-out rows) and export
    ev = tmp_path / "eval"
    code, err = _cli(capsys, "evaluate", old_out / "relu", old_out / "topk", "--store", tiny_store, "--out", ev,
                     "--no-splice", "--no-histograms", "--no-frontier", "--html-features", 0)
    assert code == 0, err
    rows = json.loads((ev / "report.json").read_text())["rows"]
    assert {r["run"] for r in rows} >= {"relu", "topk"} and all(r["n_rows"] > 0 for r in rows)
    code, err = _cli(capsys, "export", old_out / "topk", "--to", "saelens", "--out", tmp_path / "sl")
    assert code == 0, err
    assert json.loads((tmp_path / "sl" / "cfg.json").read_text())["architecture"] == "topk"


def test_max_rows_none_is_explicit(capsys, tmp_path):
    """`--max-rows none` reads every row; 0 is not another spelling of it but refused in one line."""
    assert EvalConfig(run_dirs=["r"], store="s", max_rows=None).max_rows is None
    code, err = _cli(capsys, "evaluate", tmp_path, "--store", tmp_path, "--max-rows", 0)
    assert code != 0 and err.count("\n") == 1 and "--max-rows must be a positive integer or none" in err
    code, err = _cli(capsys, "features", tmp_path, "--store", tmp_path, "--feature", 1, "--max-rows", 0)
    assert code != 0 and err.count("\n") == 1 and "--max-rows must be a positive integer or none" in err


def test_a_run_dir_from_before_the_optimizer_field_resumes_with_adam(tiny_store, tmp_path):
    """cfg.json's sae record gained `optimizer` when the TopK family's default became lazy-adam: a run dir without it
    trained with Adam, and resumed with the command that started it, it goes on with Adam (bit-identical to an
    uninterrupted Adam run), not with today's default."""
    def settings(out, **options):
        spec = {**SAES[1], **({"options": options} if options else {})}
        return TrainConfig(**{**_settings(tiny_store, out, None), "saes": [spec]})

    adam = run_training(settings(tmp_path / "adam", optimizer="adam"))[0]
    lazy = run_training(settings(tmp_path / "lazy"))[0]
    weights = lambda d: open(os.path.join(d, rundir.WEIGHTS_FILE), "rb").read()  # noqa: E731
    assert weights(adam) != weights(lazy)  # the two optimizers part within these 6 steps
    d = run_training(settings(tmp_path / "old", optimizer="adam"))[0]
    def before_the_field(rec):  # killed after the step-3 checkpoint, by a saecache without the field
        del rec["sae"]["optimizer"]
        rec["spec"]["options"].pop("optimizer")
        rec["train"]["saes"][0]["options"].pop("optimizer")

    _killed_at_step_3(d, before_the_field)
    assert run_training(settings(tmp_path / "old"))[0] == d
    assert weights(d) == weights(adam)


def test_a_run_dir_from_before_the_per_sae_warmup_resumes_bit_identically(tiny_store, tmp_path):
    """cfg.json recorded one resolved LR warm-up for the whole run before each SAE got its own (the TopK family's
    default cap moved to 100 steps): such a run dir, resumed with the command that started it, compares equal to
    today's record and goes on bit-identically."""
    def settings(out):
        return TrainConfig(**{**_settings(tiny_store, out, None), "warmup_steps": None, "steps": 30, "tokens": None,
                              "checkpoint_every": 3, "saes": SAES[:1]})

    ref = run_training(settings(tmp_path / "ref"))[0]
    assert rundir.read_cfg(ref)["spec"]["warmup_steps"] == 3  # relu: a tenth of the 30 steps
    d = run_training(settings(tmp_path / "old"))[0]
    assert rundir.read_cfg(d)["train"]["warmup_steps"] is None  # today: unset at the run level, resolved per SAE
    _killed_at_step_3(d, _before_per_sae_warmup)
    assert run_training(settings(tmp_path / "old"))[0] == d
    assert open(os.path.join(d, rundir.WEIGHTS_FILE), "rb").read() == \
        open(os.path.join(ref, rundir.WEIGHTS_FILE), "rb").read()


def test_a_topk_run_dir_started_at_an_earlier_default_rate_is_refused_in_one_line_naming_it(capsys, tiny_store,
                                                                                            tmp_path):
    """A run dir started when the TopK family's default rate was 4x Gao et al.'s records that rate; resumed with the
    same command under today's default it is refused in one line that names the field, the started value and
    today's, and resumes when that value is given."""
    old_rate = 4 * 2e-4 / (64 / 2 ** 14) ** 0.5
    settings = {**_settings(tiny_store, tmp_path / "runs", None), "saes": [SAES[1]]}
    d = run_training(TrainConfig(**{**settings, "saes": [{**SAES[1], "lr": old_rate}]}))[0]
    _killed_at_step_3(d)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(settings))
    code, err = _cli(capsys, "train", "--config", config)
    assert code != 0 and err.count("\n") == 1 and "Traceback" not in err
    assert f"topk's lr {old_rate!r} (now {1.5 * old_rate!r})" in err and "give the started value" in err
    assert not os.path.exists(os.path.join(d, rundir.WEIGHTS_FILE))  # nothing trained, the checkpoint kept
    assert rundir.list_checkpoints(d) == [3]
    code, err = _cli(capsys, "train", "--config", config, "--lr", old_rate)
    assert code == 0, err
    assert rundir.read_cfg(d)["complete"]
