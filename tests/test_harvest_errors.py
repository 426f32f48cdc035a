"""Bad input to `saecache harvest` / `info` / `verify`: one line on stderr, exit code 2 (verify: 1 on problems),
no traceback, and nothing already written damaged."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import zstandard
from _store import tiny_harvest_config

from saecache.cli import main
from saecache.harvest.inspect import verify_store
from saecache.harvest.store import Store


def run_main(capsys, args):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    return e.value.code, err


def base_args(out, model_dir, corpus, **kw):
    args = {"--out": str(out), "--model": str(model_dir), "--dataset": str(corpus), "--hooks": "mlp_out.0",
            "--ctx-len": "32", "--tokens": "512", "--ctx-per-chunk": "4", "--chunks-per-shard": "2",
            "--device": "cpu"}
    args.update(kw)
    return ["harvest", "--quiet"] + [x for kv in args.items() for x in kv]


def assert_one_line(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_model_path(capsys, tmp_path, tiny_corpus):
    code, err = run_main(capsys, base_args(tmp_path / "s", tmp_path / "no-such-model", tiny_corpus))
    assert_one_line(code, err, "no-such-model")


def test_unknown_hook_lists_valid_ones(capsys, tmp_path, tiny_model_dir, tiny_corpus):
    code, err = run_main(capsys, base_args(tmp_path / "s", tiny_model_dir, tiny_corpus, **{"--hooks": "mlp_out.9"}))
    assert_one_line(code, err, "mlp_out.9", "mlp_out.0..1", "resid_post")


def test_missing_text_field(capsys, tmp_path, tiny_model_dir, tiny_corpus):
    code, err = run_main(capsys, base_args(tmp_path / "s", tiny_model_dir, tiny_corpus, **{"--text-field": "body"}))
    assert_one_line(code, err, "body")


def test_empty_dataset(capsys, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl.zst"
    empty.write_bytes(zstandard.ZstdCompressor().compress(b""))
    code, err = run_main(capsys, base_args(tmp_path / "s", tiny_model_dir, empty))
    assert_one_line(code, err)
    assert not (tmp_path / "s" / "zarr.json").exists()


def test_ctx_len_above_model_maximum(capsys, tmp_path, tiny_model_dir, tiny_corpus):
    code, err = run_main(capsys, base_args(tmp_path / "s", tiny_model_dir, tiny_corpus, **{"--ctx-len": "4096"}))
    assert_one_line(code, err, "4096", "maximum")


def test_unwritable_output(capsys, tmp_path, tiny_model_dir, tiny_corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = run_main(capsys, base_args(blocker / "store", tiny_model_dir, tiny_corpus))
    assert_one_line(code, err, "a-file")
    code, err = run_main(capsys, base_args(blocker, tiny_model_dir, tiny_corpus))
    assert_one_line(code, err, "not a directory")
    assert blocker.read_text() == "x"


def test_different_config_refused_store_untouched(capsys, tmp_path, tiny_model_dir, tiny_corpus):
    out = tmp_path / "s"
    assert main(base_args(out, tiny_model_dir, tiny_corpus)) is None
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "_claims" not in p.parts}
    code, err = run_main(capsys, base_args(out, tiny_model_dir, tiny_corpus, **{"--seed": "7"}))
    assert_one_line(code, err, "different configuration", "seed")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "_claims" not in p.parts}
    assert before == after


def test_nonfinite_activations_policy(capsys, tmp_path, tiny_model_dir, tiny_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bad_dir = tmp_path / "bad-model"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        model.gpt_neox.layers[0].mlp.dense_4h_to_h.bias[3] = float("inf")
    model.save_pretrained(bad_dir)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(bad_dir)
    code, err = run_main(capsys, base_args(tmp_path / "s", bad_dir, tiny_corpus))
    assert_one_line(code, err, "NaN/Inf", "--nonfinite count")
    assert not (tmp_path / "s").exists()  # nothing published, and the store it began is removed (issue 22 §6)
    out2 = tmp_path / "s2"
    assert main(base_args(out2, bad_dir, tiny_corpus, **{"--nonfinite": "count"})) is None
    st = Store.open(str(out2)).stats("mlp_out.0")
    assert st["nonfinite"] == st["count"]  # one inf per row, counted


def test_info_and_verify_on_missing_store(capsys, tmp_path):
    code, err = run_main(capsys, ["info", str(tmp_path / "nothing")])
    assert_one_line(code, err, "no store")
    code, err = run_main(capsys, ["verify", str(tmp_path / "nothing")])
    assert_one_line(code, err, "no store")


def _disk_full_cmd(out, model_dir, corpus):
    """A harvest whose store lives on a 700 KiB tmpfs in a private mount namespace: real ENOSPC once the plan
    (79 one-page context files) and a few shards are written."""
    args = " ".join(f"'{a}'" for a in base_args(out, model_dir, corpus, **{"--tokens": "20000", "--dtype": "float32",
                                                                              "--codec": "none"}))
    py = f"{sys.executable} -c 'from saecache.cli import main; main()' {args}"
    return ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=700k tmpfs '{out.parent}' && {py}; "
            f"rc=$?; cp -r '{out}' '{out.parent.parent}/copy' 2>/dev/null; exit $rc"]


def test_disk_full_one_line_and_published_shards_intact(tmp_path, tiny_model_dir, tiny_corpus):
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for the disk-full test")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "s"
    p = subprocess.run(_disk_full_cmd(out, tiny_model_dir, tiny_corpus), capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "No space left" in lines[0]
    copy = tmp_path / "copy"
    st = Store.open(str(copy))
    assert 0 < len(st.complete_shards()) < st.geometry.n_shards
    problems = verify_store(str(copy))
    assert all("missing (no manifest" in pr for pr in problems)  # published shards all verify
    json.loads((copy / "zarr.json").read_text())


def test_same_model_and_text_under_other_paths_is_the_same_store(capsys, tmp_path, tiny_model_dir, tiny_corpus,
                                                                  monkeypatch):
    """A local model is known by its config hash and local text by its fingerprint, not by the path as typed: a store
    harvested with paths relative to one directory is resumed with absolute paths from another (a no-op on a complete
    store, the typed paths kept as provenance), while a model with another config is still refused."""
    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "assets" / "model")
    shutil.copy(tiny_corpus, work / "assets" / tiny_corpus.name)
    monkeypatch.chdir(work)
    assert main(base_args("store.zarr", "assets/model", f"assets/{tiny_corpus.name}")) is None
    files = lambda: {p: p.read_bytes() for p in (work / "store.zarr").rglob("*")  # noqa: E731
                     if p.is_file() and "_claims" not in p.parts}
    before = files()
    monkeypatch.chdir(tmp_path)
    assert main(base_args(work / "store.zarr", work / "assets" / "model", work / "assets" / tiny_corpus.name)) is None
    assert files() == before
    header = Store.open(str(work / "store.zarr")).header
    assert header["model"]["name"] == "assets/model" and header["dataset"]["spec"] == f"assets/{tiny_corpus.name}"

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "layer_norm_eps": 1e-6}))
    code, err = run_main(capsys, base_args(work / "store.zarr", other, work / "assets" / tiny_corpus.name))
    assert_one_line(code, err, "different configuration", "--model (its config)")
    assert files() == before
