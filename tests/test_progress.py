"""Progress with an ETA for the long phases: each phase of the evaluation (statistics, splicing, feature pages) and
the demo model's preparation (its BPE tokenizer, tokenizing the corpus, training) shows a tqdm line with a
remaining-time field on stderr, printed before the phase ends; `progress=False` (`--no-progress`, the demo's
`--quiet`) prints none. Before this, the evaluation printed nothing until its report (4.7 minutes in the tiny demo).
"""

import re
import shutil

import pytest

from saecache.evaluate.config import EvalConfig
from saecache.evaluate.runner import run_evaluation
from saecache.train.config import TrainConfig
from saecache.train.trainer import run_training

ETA = r"\[\d+:\d\d<\d+:\d\d"  # tqdm's [elapsed<remaining: a remaining time was computed
PHASES = ("statistics", "splicing", "feature pages")


def phase_lines(err: str, desc: str) -> list[str]:
    """The progress lines of one bar (tqdm redraws with carriage returns)."""
    return [line for line in re.split(r"[\r\n]", err) if desc in line]


@pytest.fixture(scope="module")
def run_dir(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("progress_runs")
    cfg = TrainConfig(stores=[str(tiny_store)], out=str(out), saes=[{"arch": "topk", "hook_in": "mlp_out.0",
                                                                    "width": 128, "k": 4}],
                      batch_size=256, tokens=256 * 4, warmup_steps=1, checkpoint_every=4, device="cpu",
                      progress=False)
    return run_training(cfg)[0]


def evaluate(run_dir, store, out, progress):
    return run_evaluation(EvalConfig(run_dirs=[run_dir], store=str(store), out=str(out), n_contexts=6,
                                     ctx_batch_size=2, device="cpu", histograms=False, frontier=False,
                                     html_features=2, html_max_rows=512, progress=progress))


def test_evaluation_shows_every_phase_with_an_eta(run_dir, tiny_store, tmp_path, capfd):
    evaluate(run_dir, tiny_store, tmp_path / "eval", True)
    err = capfd.readouterr().err
    for phase in PHASES:
        lines = phase_lines(err, f"evaluate mlp_out.0: {phase}")
        assert lines, f"no progress line for {phase}:\n{err[-2000:]}"
        assert re.search(r"\b0%", lines[0]), lines[0]  # printed as the phase starts, not only when it ends
        assert any(re.search(ETA, line) for line in lines), lines


def test_evaluation_without_progress_is_silent(run_dir, tiny_store, tmp_path, capfd):
    evaluate(run_dir, tiny_store, tmp_path / "eval", False)
    err = capfd.readouterr().err
    assert not any(phase_lines(err, f"evaluate mlp_out.0: {p}") for p in PHASES), err[-2000:]


def test_demo_model_preparation_shows_an_eta(tiny_model_dir, tiny_corpus_split, tmp_path, capfd):
    from transformers import AutoTokenizer

    from saecache.data.tiny_model import train_model

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    train_model(model_dir, tok, tiny_corpus_split["train"], tiny_corpus_split["val"], seconds=0, ctx_len=32,
                batch=4, steps=3, progress=True)
    err = capfd.readouterr().err
    for desc in ("tokenize train.jsonl.zst", "tokenize val.jsonl.zst", "train tiny model"):
        lines = phase_lines(err, desc)
        assert any(re.search(ETA, line) for line in lines), f"{desc}: {lines or err[-2000:]}"


def test_demo_tokenizer_training_shows_an_eta(tiny_corpus, capfd):
    from saecache.data.tokenizer import train_bpe

    train_bpe([tiny_corpus], 300, progress=True)
    lines = phase_lines(capfd.readouterr().err, "train BPE tokenizer")
    assert any(re.search(ETA, line) for line in lines), lines


def test_harvest_shows_planning_and_harvesting_with_an_eta(tiny_model_dir, tiny_corpus, tmp_path, capfd):
    from saecache.harvest.run import run_harvest
    from _store import tiny_harvest_config

    run_harvest(tiny_harvest_config(tmp_path / "store.zarr", tiny_model_dir, tiny_corpus, tokens=2048), progress=True)
    err = capfd.readouterr().err
    for desc in ("plan: tokenize into contexts", "harvest 0/1"):
        lines = phase_lines(err, desc)
        assert any(re.search(ETA, line) for line in lines), f"{desc}: {lines or err[-2000:]}"
