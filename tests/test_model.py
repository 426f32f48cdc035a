"""Model loading: a local directory loads in eval mode with the asked dtype and a provenance dict; bad names and paths
give one-line ModelErrors (the Hub is offline in tests, see conftest)."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from saecache.errors import ConfigError, ModelError
from saecache.harvest.model import load_model, pick_device


def _save_tiny(path, eps=1e-5):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a tiny corpus for a tiny tokenizer " * 20], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>") \
        .save_pretrained(path)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=48, layer_norm_eps=eps)) \
        .save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny_model_a"))


def test_load_local_directory(tiny_dir):
    model, tok, info = load_model(str(tiny_dir), dtype="bfloat16", device="cpu")
    assert not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.eos_token == "<|endoftext|>"
    m = info["model"]
    assert m["name"] == str(tiny_dir) and m["revision"] is None and m["dtype"] == "bfloat16"
    assert m["architecture"] == "GPTNeoXForCausalLM" and m["max_positions"] == 48
    assert len(m["config_hash"]) == 64
    t = info["tokenizer"]
    assert t["vocab_size"] == len(tok) and t["bos_token_id"] == t["eos_token_id"] == tok.convert_tokens_to_ids(
        "<|endoftext|>")


def test_config_hash_tracks_the_config_not_where_or_how_it_was_loaded(tiny_dir, tmp_path):
    h1 = load_model(str(tiny_dir), device="cpu")[2]["model"]["config_hash"]
    h2 = load_model(str(tiny_dir), dtype="float16", device="cpu")[2]["model"]["config_hash"]
    same = _save_tiny(tmp_path / "same_model_elsewhere")
    h3 = load_model(str(same), device="cpu")[2]["model"]["config_hash"]
    other = _save_tiny(tmp_path / "other", eps=1e-6)
    h4 = load_model(str(other), device="cpu")[2]["model"]["config_hash"]
    assert h1 == h2 == h3 != h4


@pytest.mark.parametrize("name", ["does/not/exist", "./nowhere", "someone/no-such-model-xyz"])
def test_unknown_model_is_one_line_model_error(name):
    with pytest.raises(ModelError) as e:
        load_model(name, device="cpu")
    msg = str(e.value)
    assert name in msg and "\n" not in msg and "Traceback" not in msg


def test_directory_without_weights_and_file_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty"):
        load_model(str(tmp_path / "empty"), device="cpu")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a model directory"):
        load_model(str(tmp_path / "weights.bin"), device="cpu")


def test_bad_dtype_and_device(tiny_dir):
    with pytest.raises(ConfigError, match="float64"):
        load_model(str(tiny_dir), dtype="float64")
    with pytest.raises(ConfigError):
        pick_device("tpu:banana")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")


def _fake_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_auto_device_follows_the_launchers_local_rank(monkeypatch):
    """torchrun/SLURM workers on one host each take their own GPU (every one took cuda, i.e. device 0, before)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    _fake_gpus(monkeypatch, 4)
    assert pick_device("auto") == torch.device("cuda")  # no launcher: the current device
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("auto") == torch.device("cuda", 3)
    assert pick_device("cuda:1") == torch.device("cuda", 1)  # an explicit device wins
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert pick_device("auto") == torch.device("cuda", 3)  # torchrun's variable first
    monkeypatch.delenv("LOCAL_RANK")
    assert pick_device("auto") == torch.device("cuda", 1)
    _fake_gpus(monkeypatch, 1)  # each task sees only its own GPU (CUDA_VISIBLE_DEVICES per task)
    assert pick_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("SLURM_LOCALID", "x")
    with pytest.raises(ConfigError, match="SLURM_LOCALID"):
        pick_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
