"""What a newcomer trips over (issue 22 §6), through the real CLI: a store too small to train from is refused at
harvest; too few held-out contexts for `--n-contexts` is said so in the report, with what to do instead; failed
commands leave nothing they created and touch nothing they did not; the README's first-store outputs are ignored."""

import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from saecache.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    """`saecache ARGV` in-process: (exit code, stderr lines)."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, [ln for ln in err.strip().splitlines() if ln.strip()]


def one_error_line(code, lines, *needles):
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def harvest_args(out, model_dir, corpus, *more):
    return ["harvest", "--quiet", "--out", out, "--model", model_dir, "--dataset", corpus, "--hooks", "mlp_out.0",
            "--ctx-len", "32", "--ctx-per-chunk", "4", "--chunks-per-shard", "2", "--device", "cpu", *more]


def train_args(store, out, *more):
    return ["train", "--store", store, "--out", out, "--hook", "mlp_out.0", "--arch", "topk", "--width", "64",
            "--k", "4", "--steps", "4", "--batch-size", "16", "--partitions", "1", "--warmup", "1", "--no-progress",
            *more]


def tree(root):
    """{relative path: sha256 or 'dir'} of everything under root."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------ a store too small to train from


def test_too_few_tokens_refused_at_harvest_with_the_flags_to_set(capsys, tmp_path, tiny_model_dir, tiny_corpus):
    """--tokens 50 with --ctx-len 128 is one context, which training would hold out: refused before anything is
    written, in flag names, with a --tokens that works; that --tokens harvests a store `train` trains from."""
    out = tmp_path / "s.zarr"
    line = one_error_line(*run_cli(capsys, *harvest_args(out, tiny_model_dir, tiny_corpus, "--tokens", "50",
                                                         "--ctx-len", "128")), "--tokens 50", "--heldout")
    assert not out.exists()
    fix = int(line.split("use --tokens ")[1].split()[0])
    assert fix == 256  # two contexts of 128: ceil(0.01 * 2) = 1 held out, 1 left to train on
    # the same at --ctx-len 32, where the tiny model runs: one token short of the fix is refused, the fix trains
    one_error_line(*run_cli(capsys, *harvest_args(out, tiny_model_dir, tiny_corpus, "--tokens", "32")), "--tokens 64")
    assert not out.exists()
    assert run_cli(capsys, *harvest_args(out, tiny_model_dir, tiny_corpus, "--tokens", "64")) == (0, [])
    runs = tmp_path / "runs"
    code, lines = run_cli(capsys, *train_args(out, runs))
    assert code == 0, lines
    assert (runs / "topk-mlp_out.0-64-k4" / "sae.safetensors").exists()


def test_minimum_contexts_follow_the_split_rule_and_trains_default():
    """`min_store_contexts` is the smallest store with a training context under split.py's held-out rule, and its
    default fraction is `saecache train --heldout`'s."""
    from saecache.harvest.config import TRAIN_HELDOUT_DEFAULT, min_store_contexts
    from saecache.harvest.split import heldout_cutoff
    from saecache.train.config import TrainConfig

    assert TrainConfig.__dataclass_fields__["heldout_fraction"].default == TRAIN_HELDOUT_DEFAULT

    class Geo:  # heldout_cutoff reads only store.geometry.n_contexts
        def __init__(self, n):
            self.geometry = type("G", (), {"n_contexts": n})()

    for frac in (0.0, 0.01, 0.1, 0.3, 0.5, 0.9):
        n = min_store_contexts(frac)
        assert heldout_cutoff(Geo(n), frac) >= 1  # a training context left
        assert n == 1 or heldout_cutoff(Geo(n - 1), frac) == 0  # and one context fewer leaves none


def test_text_too_short_for_two_contexts_refused_and_nothing_left(capsys, tmp_path, tiny_model_dir, tiny_corpus):
    """Text that packs into a single context (the --tokens asked for more): one line, and the store it began is
    gone."""
    from transformers import AutoTokenizer

    doc = "def f(x):\n    return x + 1\n"
    per_doc = len(AutoTokenizer.from_pretrained(str(tiny_model_dir))(doc)["input_ids"]) + 1  # + EOS
    n_docs = 31 // per_doc + 1  # one context's 31 stream tokens (BOS + 31), not two's 62
    assert 31 <= n_docs * per_doc < 62
    short = tmp_path / "short.jsonl.zst"
    short.write_bytes(zstandard.ZstdCompressor().compress((json.dumps({"text": doc}) + "\n").encode() * n_docs))
    out = tmp_path / "s.zarr"
    one_error_line(*run_cli(capsys, *harvest_args(out, tiny_model_dir, short, "--tokens", "512")), "only 1 context",
                   "--heldout")
    assert not out.exists()


# ---------------------------------------------------------------------------- too few held-out contexts, said so


def test_report_says_too_few_contexts_are_held_out_and_what_to_do(capsys, tiny_store, tmp_path, one_torch_thread):
    """The tiny store (256 contexts) holds out ceil(0.01 * 256) = 3: asking --n-contexts 64 uses 3, and the report
    says so and names --tokens and --heldout instead of suggesting --n-contexts."""
    from saecache.harvest.store import Store

    n_ctx = Store.open(str(tiny_store)).geometry.n_contexts
    held = math.ceil(0.01 * n_ctx)
    runs = tmp_path / "runs"
    assert run_cli(capsys, *train_args(tiny_store, runs))[0] == 0
    ev = tmp_path / "eval"
    code, lines = run_cli(capsys, "evaluate", *runs.iterdir(), "--store", tiny_store, "--out", ev, "--n-contexts", 64,
                          "--no-histograms", "--html-features", 0)
    assert code == 0, lines
    md = (ev / "report.md").read_text()
    assert f"Loss figures over {held} held-out contexts" in md
    assert f"--n-contexts 64 asked, but only {held} are held out" in md
    assert "harvest more --tokens, or train with a larger --heldout" in md


# ------------------------------------------------------------------------------------- failed commands: no debris


def test_unknown_hook_leaves_no_store_and_no_parents(capsys, tmp_path, tiny_model_dir, tiny_corpus):
    out = tmp_path / "new" / "deeper" / "s.zarr"
    one_error_line(*run_cli(capsys, *harvest_args(out, tiny_model_dir, tiny_corpus, "--hooks", "mlp_out.9")),
                   "mlp_out.9")
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"  # an empty --out the user made: kept, still empty
    empty.mkdir()
    one_error_line(*run_cli(capsys, *harvest_args(empty, tiny_model_dir, tiny_corpus, "--hooks", "mlp_out.9")))
    assert empty.is_dir() and not any(empty.iterdir())


def test_harvest_failing_after_it_began_removes_only_what_it_created(capsys, tmp_path, tiny_model_dir, tiny_corpus):
    """A failure once the store's files exist (the dataset has no such field: found when the plan reads it) leaves
    nothing under a new --out, and an existing empty --out empty."""
    for out in (tmp_path / "a" / "s.zarr", tmp_path / "b"):
        if out.name == "b":
            out.mkdir()
        one_error_line(*run_cli(capsys, *harvest_args(out, tiny_model_dir, tiny_corpus, "--text-field", "body")),
                       "body")
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "b").is_dir() and not any((tmp_path / "b").iterdir())


def test_failing_resume_of_an_existing_store_leaves_it_untouched(capsys, tmp_path, tiny_store, tiny_model_dir,
                                                                  tiny_corpus):
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    before = tree(store)
    one_error_line(*run_cli(capsys, *harvest_args(store, tiny_model_dir, tiny_corpus, "--hooks", "mlp_out.9")))
    one_error_line(*run_cli(capsys, *harvest_args(store, tiny_model_dir, tiny_corpus, "--text-field", "body")))
    assert tree(store) == before


@pytest.fixture
def corrupt_store(tiny_store, tmp_path):
    """The tiny store with every shard index of mlp_out.0 failing its crc32c (found only when a batch is read)."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(tiny_store, bad)
    for shard in (bad / "acts" / "mlp_out.0" / "c").iterdir():
        f = shard / "0"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    return bad


def test_train_meeting_a_corrupt_index_leaves_no_run_dir(capsys, tmp_path, corrupt_store):
    runs = tmp_path / "new" / "runs"
    one_error_line(*run_cli(capsys, *train_args(corrupt_store, runs)), "corrupt shard index")
    assert not (tmp_path / "new").exists()
    other = tmp_path / "runs"  # an --out that holds other things: they stay, the new run dir goes
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    one_error_line(*run_cli(capsys, *train_args(corrupt_store, other)), "corrupt shard index")
    assert tree(other) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_failing_train_leaves_an_existing_run_dir_untouched(capsys, tmp_path, tiny_store, corrupt_store):
    """A run dir with a checkpoint (a resumable run) met by a failing rerun: every file as it was. A run dir the
    user made, holding only their file, keeps it and gets nothing added."""
    from saecache.train import rundir

    runs = tmp_path / "runs"
    assert run_cli(capsys, *train_args(tiny_store, runs, "--checkpoint-every", "2", "--log-every", "1"))[0] == 0
    run = runs / "topk-mlp_out.0-64-k4"
    # as if stopped after its checkpoint at step 2 of 4: a rerun resumes there (and reads the store)
    (run / "sae.safetensors").unlink()
    shutil.rmtree(rundir.checkpoint_path(str(run), 4))
    rundir.truncate_metrics(str(run), 2)
    assert rundir.list_checkpoints(str(run)) == [2]
    before = tree(runs)
    one_error_line(*run_cli(capsys, *train_args(corrupt_store, runs, "--checkpoint-every", "2", "--log-every", "1")),
                   "corrupt shard index")
    assert tree(runs) == before
    mine = tmp_path / "mine" / "topk-mlp_out.0-64-k4"
    mine.mkdir(parents=True)
    (mine / "README").write_text("x")
    one_error_line(*run_cli(capsys, *train_args(corrupt_store, mine.parent)), "corrupt shard index")
    assert tree(mine.parent) == {"topk-mlp_out.0-64-k4": "dir",
                                 "topk-mlp_out.0-64-k4/README": hashlib.sha256(b"x").hexdigest()}


# -------------------------------------------------------------------------------------------- the first store


def test_first_store_outputs_and_the_venv_are_git_ignored(tmp_path):
    """The README's first store writes mine.zarr, runs/ and eval/ at the top of a clone; the Makefile makes .venv."""
    if shutil.which("git") is None:
        pytest.fail("git is needed to check .gitignore")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    paths = ["mine.zarr/zarr.json", "runs/topk-mlp_out.1-4096-k32/cfg.json", "eval/report.md", ".venv/bin/python"]
    p = subprocess.run(["git", "-C", str(tmp_path), "check-ignore", "--no-index", *paths], capture_output=True,
                       text=True)
    assert sorted(p.stdout.split()) == sorted(paths), p.stdout + p.stderr
    kept = ["harvest/run.py", "tests/test_newcomer.py", "docs/runs/x.md"]  # only the root folders are ignored
    p = subprocess.run(["git", "-C", str(tmp_path), "check-ignore", "--no-index", *kept], capture_output=True,
                       text=True)
    assert p.stdout.split() == []


HELD = """
import importlib
import sys
from saecache.cli import main

def hold(where):  # module:function waits, after its first call, until the test closes stdin
    module, name = where.split(":")
    run = importlib.import_module(module)
    real = getattr(run, name)
    def held(*a, **kw):
        out = real(*a, **kw)
        if not getattr(held, "done", False):
            held.done = True
            print("held", flush=True)
            sys.stdin.read()
        return out
    setattr(run, name, held)

hold(sys.argv[1])
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_a_failing_second_harvest_of_a_new_store_leaves_the_first_ones_work(tmp_path, tiny_model_dir, tiny_corpus):
    """Two harvests of one new --out at once. The second has seen no store (it waits after loading the model); the
    first creates the store, claims the worker slot and waits inside its first shard; then the second goes on, finds
    the slot taken and fails, and must not remove the store the first is writing (which then completes)."""
    import os
    import sys

    from saecache.harvest.store import Store

    out = tmp_path / "s.zarr"
    args = [str(a) for a in harvest_args(out, tiny_model_dir, tiny_corpus, "--tokens", "512")]

    def start(name):
        p = subprocess.Popen([sys.executable, "-c", HELD, name, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.stdout.readline().strip() == "held", p.stderr.read()
        return p

    second = start("saecache.harvest.model:load_model")
    assert not out.exists()
    first = start("saecache.harvest.run:harvest_shard")
    try:
        assert any((out / "_claims").glob("worker-*"))
        second.stdin.close()
        assert second.wait(timeout=300) == 2
        err = [ln for ln in second.stderr.read().splitlines() if ln.strip()]
        one_error_line(2, err[-1:], "already running")
        assert (out / "zarr.json").exists()
        first.stdin.close()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill(), second.kill()
    st = Store.open(str(out))
    assert st.complete_shards() == list(range(st.geometry.n_shards))
