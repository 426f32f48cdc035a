"""Bad input to `saecache train`: one line on stderr, a non-zero exit, no traceback, nothing already written
damaged (incomplete store, missing hook, width/k nonsense, dimension mismatch on resume, unknown architecture, newer
formats, resample=true without resample_steps, LR decay with a resampled SAE)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saecache.cli import main


def _run(capsys, *argv):
    capsys.readouterr()
    try:
        main(["train", *map(str, argv)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _tree(root):
    """{relative path: sha256} of every file under root (what "nothing damaged" compares)."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fails(capsys, *argv, match):
    code, out, err = _run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


def base(store, out, *more):
    return ["--store", store, "--out", out, "--hook", "mlp_out.0", "--arch", "topk", "--width", "64", "--k", "4",
            "--steps", "3",
            "--batch-size", "64", "--warmup", "1", "--no-progress", *more]


@pytest.fixture
def incomplete_store(tiny_store, tmp_path):
    st = tmp_path / "incomplete.zarr"
    shutil.copytree(tiny_store, st)
    manifests = sorted(st.glob("_manifest/shard-*/zarr.json"))  # format version 2: one group node per shard
    assert manifests
    manifests[3].unlink()
    return st


def test_incomplete_or_missing_store(capsys, tmp_path, incomplete_store):
    before = _tree(incomplete_store)
    line = _fails(capsys, *base(incomplete_store, tmp_path / "out"), match="incomplete")
    assert "15/16" in line
    assert _tree(incomplete_store) == before and not (tmp_path / "out").exists()
    _fails(capsys, *base(tmp_path / "nowhere.zarr", tmp_path / "out"), match="no store at")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,match", [
    (["--hook", "mlp_out.9"], "no hook 'mlp_out.9'; it has: mlp_in.0, mlp_out.0, mlp_out.1"),
    (["--width", "0"], "width must be a positive integer"),
    (["--width", "-8"], "width must be a positive integer"),
    (["--k", "0"], "--k must be an integer in [1, --width 64]"),
    (["--k", "65"], "--k must be an integer in [1, --width 64]"),
    (["--arch", "relu"], "k is only for topk/batchtopk"),
    (["--arch", "resnet"], "unknown SAE architecture 'resnet'; known: relu, topk, batchtopk, jumprelu, gated"),
    (["--penalty", "l7"], "penalty 'l7' not available for topk"),
    (["--sae-options", "{bad json"], "--sae-options is not valid JSON"),
    (["--sae-options", '{"bogus": 1}'], "unknown SAE option(s) bogus"),
    (["--heldout", "1.5"], "--heldout-fraction must be in [0, 1)"),
    (["--batch-size", "60"], "must be a multiple of --partitions"),
    (["--batch-size", "8192", "--heldout", "0.5"], "too few training rows"),
    (["--steps", "0"], "at least one step"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--seed", "-1"], "seed must be a non-negative integer"),
    (["--device", "cuda:99"], "device cuda:99 is not available"),
    (["--device", "gpu"], "unknown device 'gpu'"),
])
def test_bad_flags(capsys, tiny_store, tmp_path, args, match):
    argv = base(tiny_store, tmp_path / "out")
    for flag, value in zip(args[::2], args[1::2]):  # override the base flag (or add it)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    _fails(capsys, *argv, match=match)
    assert not (tmp_path / "out").exists() or not _tree(tmp_path / "out")


def test_missing_flags(capsys, tiny_store, tmp_path):
    _fails(capsys, "--out", tmp_path / "o", "--hook", "mlp_out.0", "--k", "4", "--steps", "2", match="missing --store")
    _fails(capsys, "--store", tiny_store, "--out", tmp_path / "o", "--hook", "mlp_out.0", "--k", "4",
           match="--tokens N or --steps N")
    _fails(capsys, "--store", tiny_store, "--out", tmp_path / "o", "--steps", "2", match="no SAE to train")


def _named_config(tmp_path, store, out, **spec):
    cfg = {"stores": [str(store)], "out": str(out), "steps": 3, "batch_size": 64, "warmup_steps": 1,
           "progress": False, "saes": [{"arch": "topk", "hook_in": "mlp_out.0", "width": 64, "k": 4, "name": "mine",
                                        **spec}]}
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_dimension_or_config_mismatch_on_resume_leaves_the_run_untouched(capsys, tiny_store, tmp_path):
    out = tmp_path / "runs"
    code, stdout, err = _run(capsys, "--config", _named_config(tmp_path, tiny_store, out))
    assert code == 0, err
    before = _tree(out)
    _fails(capsys, "--config", _named_config(tmp_path, tiny_store, out, width=128), match="differs in width")
    _fails(capsys, "--config", _named_config(tmp_path, tiny_store, out, hook_in="mlp_in.0", hook_out="mlp_out.1"),
           match="differs in transcoder")
    _fails(capsys, "--config", _named_config(tmp_path, tiny_store, out), "--steps", "5", match="differs in --steps")
    # a copy of the store elsewhere is the same data (same fingerprint): accepted; changed data is refused
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    code, stdout, err = _run(capsys, "--config", _named_config(tmp_path, copy, out))
    assert code == 0 and stdout.strip() == str(out / "mine"), err
    manifest = sorted(copy.glob("_manifest/shard-*/zarr.json"))[0]
    node = json.loads(manifest.read_text())
    entry = node["attributes"]["saecache"]
    entry["objects"] = {k: {**v, "crc32c": v["crc32c"] ^ 1} for k, v in entry["objects"].items()}
    manifest.write_text(json.dumps(node))
    _fails(capsys, "--config", _named_config(tmp_path, copy, out), match="the store changed")
    assert _tree(out) == before


def test_newer_formats_are_refused(capsys, tiny_store, tmp_path):
    out = tmp_path / "runs"
    path = _named_config(tmp_path, tiny_store, out)
    cfg = json.loads(path.read_text())
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**cfg, "format_version": 2}))
    _fails(capsys, "--config", newer, match="newer than this saecache reads")
    newer.write_text(json.dumps({**cfg, "shiny_new_option": True}))
    _fails(capsys, "--config", newer, match="unknown training config field(s): shiny_new_option (written by a newer")
    newer.write_text(json.dumps({**cfg, "saes": [{**cfg["saes"][0], "shiny": 1}]}))
    _fails(capsys, "--config", newer, match="unknown SAE spec field(s) shiny")
    for bad, match in ((dict(steps="3"), "config field steps must be int or None, got '3'"),
                       (dict(normalize="yes"), "config field normalize must be bool"),
                       (dict(stores=[1]), "stores must be a list of store paths or URLs"),
                       (dict(saes=[{**cfg["saes"][0], "coeff": "x"}]), "SAE spec field coeff must be float or None"),
                       (dict(saes=[{**cfg["saes"][0], "options": {"auxk_alpha": "x"}}]),
                        "SAE option field auxk_alpha must be float")):
        newer.write_text(json.dumps({**cfg, **bad}))
        _fails(capsys, "--config", newer, match=match)
    newer.write_text("{not json")
    _fails(capsys, "--config", newer, match="cannot read --config")
    assert not out.exists()

    # a run dir written by a newer saecache (cfg.json format_version 2): refused, left as it was
    code, _, err = _run(capsys, "--config", path)
    assert code == 0, err
    cfg_json = out / "mine" / "cfg.json"
    rec = json.loads(cfg_json.read_text())
    cfg_json.write_text(json.dumps({**rec, "format_version": 2, "complete": False}))
    before = _tree(out)
    _fails(capsys, "--config", path, match="newer than this saecache reads")
    assert _tree(out) == before


def test_real_process_prints_one_line_and_exits_nonzero(tiny_store, tmp_path):
    r = subprocess.run([sys.executable, "-m", "saecache", "train", *map(str, base(tiny_store, tmp_path / "o")),
                        "--arch", "nope"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: unknown SAE architecture 'nope'"), r.stderr


def test_newer_checkpoint_format_is_refused(capsys, tiny_store, tmp_path):
    out = tmp_path / "runs"
    path = _named_config(tmp_path, tiny_store, out)
    code, _, err = _run(capsys, "--config", path)
    assert code == 0, err
    run = out / "mine"
    (run / "sae.safetensors").unlink()  # as if killed before the end
    rec = json.loads((run / "cfg.json").read_text())
    (run / "cfg.json").write_text(json.dumps({**rec, "complete": False}))
    state = run / "checkpoints" / "step-000000003" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "format_version": 2}))
    before = _tree(out)
    _fails(capsys, "--config", path, match="checkpoint")
    assert _tree(out) == before


def test_missing_metrics_backend_fails_before_writing(capsys, tiny_store, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    _fails(capsys, *base(tiny_store, tmp_path / "out"), "--log", "tensorboard", match="pip install tensorboard")
    assert not (tmp_path / "out").exists()


def test_store_with_a_missing_shard_file_is_refused_not_read_as_zeros(capsys, tiny_store, tmp_path):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(tiny_store, damaged)
    (damaged / "acts" / "mlp_out.0" / "c" / "5" / "0").unlink()  # listed in the manifest, gone from disk
    before = _tree(damaged)
    _fails(capsys, *base(damaged, tmp_path / "out"), match="acts/mlp_out.0/c/5/0 of complete shard 5 is missing")
    assert _tree(damaged) == before and not (tmp_path / "out").exists()


def _relu(store, out, *more):
    argv = base(store, out, *more)
    argv[argv.index("topk")] = "relu"
    i = argv.index("--k")
    return argv[:i] + argv[i + 2:]


def test_resample_flag_errors_and_the_decay_rule(capsys, tiny_store, tmp_path):
    out = tmp_path / "out"
    _fails(capsys, *base(tiny_store, out, "--resample"),
           match="SAE topk-mlp_out.0-64-k4 is to be resampled (--resample) but the run has no --resample-steps")
    decaying = ("--resample-steps", "2", "--decay-start", "1")
    _fails(capsys, *_relu(tiny_store, out, *decaying),  # relu resamples by default
           match="--decay-start cannot be combined with resampling (the LR re-warms after each resample); "
                 "resampled SAE(s): relu-mlp_out.0-64; pass --no-resample or drop --decay-start")
    _fails(capsys, "--config", _named_config(tmp_path, tiny_store, out, resample="yes"),
           match="SAE spec field resample must be bool or None, got 'yes'")
    _fails(capsys, "--config", _named_config(tmp_path, tiny_store, out), "--no-resample",
           match="--resample/--no-resample applies to SAEs given with --hook")
    assert not out.exists()
    # decay next to resample_steps is fine when no SAE resamples; cfg.json records the resolved flag
    for argv, name, resampled in ((_relu(tiny_store, out, *decaying, "--no-resample"), "relu-mlp_out.0-64", False),
                                  (base(tiny_store, out, *decaying), "topk-mlp_out.0-64-k4", False),
                                  (base(tiny_store, tmp_path / "o2", "--resample-steps", "2", "--resample"),
                                   "topk-mlp_out.0-64-k4", True)):
        code, stdout, err = _run(capsys, *argv)
        assert code == 0 and Path(stdout.strip()).name == name, err
        assert json.loads((Path(stdout.strip()) / "cfg.json").read_text())["spec"]["resample"] is resampled


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_run_dir_from_before_per_sae_resampling_and_runs_is_refused(capsys, tiny_store, tmp_path, arch):
    """A cfg.json as the previous saecache wrote it (no `resample`, no `shuffle_run`): its data order and resampling
    rules differ from this version's, so resuming could not match its uninterrupted run; it is refused in one line
    and the directory is left as it was."""
    argv = (_relu if arch == "relu" else base)(tiny_store, tmp_path / "out", "--resample-steps", "2",
                                               "--checkpoint-every", "2")
    argv[argv.index("--steps") + 1] = "4"
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    run = Path(stdout.strip())
    rec = json.loads((run / "cfg.json").read_text())
    for spec in (rec["spec"], *rec["train"]["saes"]):
        assert spec.pop("resample") is (arch == "relu")
    del rec["train"]["shuffle_run"]
    (run / "cfg.json").write_text(json.dumps({**rec, "complete": False}))  # as if killed after step 2 long ago
    (run / "sae.safetensors").unlink()
    shutil.rmtree(run / "checkpoints" / "step-000000004")
    before = _tree(tmp_path / "out")
    _fails(capsys, *argv, match="was started with a different config (differs in --shuffle-run; saes: "
           f"{run.name}'s resample None (now {arch == 'relu'})")
    assert _tree(tmp_path / "out") == before


# ---- the first hour (issue 14): defaults that let `saecache train --store S --steps N` just work

@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_model_dir, tiny_corpus):
    """One hook, 1024 rows in two inner chunks of 512: fewer chunks than the 8 default partitions."""
    from _store import harvest_tiny

    return harvest_tiny(tmp_path_factory.mktemp("small") / "store.zarr", tiny_model_dir, tiny_corpus,
                        hooks=("mlp_out.0",), tokens=1024, ctx_per_chunk=16, chunks_per_shard=4)


def test_topk_without_k_uses_the_default_k(capsys, tiny_store, tmp_path):
    argv = base(tiny_store, tmp_path / "out")
    i = argv.index("--k")
    code, out, err = _run(capsys, *argv[:i], *argv[i + 2:])
    assert code == 0, err
    run = Path(out.strip())
    assert run.name == "topk-mlp_out.0-64-k32"
    assert json.loads((run / "cfg.json").read_text())["train"]["saes"][0]["k"] == 32


def test_the_store_s_only_hook_is_the_default(capsys, small_store, tiny_store, tmp_path):
    code, out, err = _run(capsys, "--store", small_store, "--out", tmp_path / "out", "--steps", "2",
                          "--batch-size", "64", "--width", "64", "--no-progress")
    assert code == 0, err
    assert Path(out.strip()).name == "topk-mlp_out.0-64-k32"
    _fails(capsys, "--store", tiny_store, "--out", tmp_path / "o2", "--steps", "2", "--width", "64",
           match="no SAE to train: store " + str(tiny_store) + " has hooks mlp_in.0, mlp_out.0, mlp_out.1; pass --hook")
    assert not (tmp_path / "o2").exists()


def test_a_store_with_fewer_chunks_than_partitions_still_trains(capsys, small_store, tmp_path):
    """1024 rows in 2 inner chunks and 8 partitions: each partition gets pieces of the chunks instead of nothing."""
    code, out, err = _run(capsys, *base(small_store, tmp_path / "out", "--batch-size", "256", "--steps", "6"))
    assert code == 0, err
    metrics = [json.loads(x) for x in (Path(out.strip()) / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in metrics if "step" in m) >= 5


def test_too_few_rows_names_a_batch_size_that_works(capsys, small_store, tmp_path):
    line = _fails(capsys, *base(small_store, tmp_path / "out", "--batch-size", "2048"), match="too few training rows")
    fits = int(re.search(r"use --batch-size (\d+) or less", line).group(1))
    assert 0 < fits <= 1024 and fits % 8 == 0
    code, out, err = _run(capsys, *base(small_store, tmp_path / "out", "--batch-size", str(fits)))
    assert code == 0, err
