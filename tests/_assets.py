"""Session-scoped asset fixtures, built offline in seconds from the recipes in `saecache.data`.

- `tiny_corpus`: a Pile-format `.jsonl.zst` of the standard library's `json` and `email` packages (~0.4 MB).
- `tiny_corpus_split`: the same sources as `train.jsonl.zst` + `val.jsonl.zst` (dict from `build_pile_corpus`).
- `tiny_tokenizer_dir`: a 512-token NeoX-layout byte-level BPE trained on `tiny_corpus`.
- `tiny_model_dir`: a seeded random-init 2-layer, width-64 GPT-NeoX (Pythia architecture) with that tokenizer saved
  alongside, so `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` both work.
"""

from pathlib import Path

import pytest

TINY_STDLIB_PACKAGES = ("json", "email")
TINY_VOCAB = 512


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    from saecache.data.corpus import collect_sources, write_pile_jsonl_zst

    path = tmp_path_factory.mktemp("tiny_corpus") / "tiny.jsonl.zst"
    write_pile_jsonl_zst(path, collect_sources(include=("stdlib",), stdlib_packages=TINY_STDLIB_PACKAGES))
    return path


@pytest.fixture(scope="session")
def tiny_corpus_split(tmp_path_factory) -> dict:
    from saecache.data.corpus import build_pile_corpus

    return build_pile_corpus(tmp_path_factory.mktemp("tiny_corpus_split"), max_bytes=10**7, heldout_fraction=0.1,
                             include=("stdlib",), stdlib_packages=TINY_STDLIB_PACKAGES)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_corpus) -> Path:
    from saecache.data.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_bpe([tiny_corpus], TINY_VOCAB, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from transformers import AutoTokenizer

    from saecache.data.tiny_model import init_model, tiny_neox_config

    config = tiny_neox_config(TINY_VOCAB, hidden=64, layers=2, heads=2, intermediate=256, max_pos=128)
    return init_model(config, seed=0, out_dir=tmp_path_factory.mktemp("tiny_model"),
                      tokenizer=AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))
