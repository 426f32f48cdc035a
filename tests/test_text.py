"""Text sources and packing: every file format reads back the documents written, packing is exact (decoded contexts
reproduce the documents joined by EOS), deterministic, stops early, and each bad input is a one-line DataError."""

import gzip
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from saecache.errors import ConfigError, DataError
from saecache.harvest.text import (
    TextSpec, chain_fingerprint, fingerprint, iter_documents, iter_records, pack_contexts, packing_policy,
    source_identity, source_names,
)

EOT = "<|endoftext|>"
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2  # code, with\ttabs\n",
    "",  # empty documents are skipped by the packer
    "Unicode: café, naïve, Straße, 日本語, emoji 🙂.",
    "Short.",
] + [f"Document {i}: " + "lorem ipsum dolor sit amet " * (i % 5 + 1) for i in range(40)]


def _tokenizer(with_specials: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DOCS * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT] if with_specials else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if with_specials:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": d, "meta": {"pile_set_name": "Test"}}) + "\n" for d in docs).encode()


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "jsonl.gz", "json-array", "json-lines"])
def test_record_files_read_back_exactly(tmp_path, fmt):
    data = _jsonl(DOCS)
    path = {
        "jsonl": lambda: _write(tmp_path / "c.jsonl", data),
        "jsonl.zst": lambda: _write(tmp_path / "c.jsonl.zst", zstandard.ZstdCompressor().compress(data)),
        "jsonl.gz": lambda: _write(tmp_path / "c.jsonl.gz", gzip.compress(data)),
        "json-array": lambda: _write(tmp_path / "c.json", json.dumps([{"text": d} for d in DOCS]).encode()),
        "json-lines": lambda: _write(tmp_path / "c.json", data),
    }[fmt]()
    assert list(iter_documents(TextSpec(str(path)))) == DOCS


def test_text_files_one_document_each_sorted_glob(tmp_path):
    for i, d in reversed(list(enumerate(DOCS[:6]))):  # created in reverse order; the glob sorts by name
        _write(tmp_path / "txt" / f"doc{i:03d}.txt", d.encode())
    assert list(iter_documents(TextSpec(str(tmp_path / "txt" / "*.txt")))) == DOCS[:6]


def test_globs_sorted_and_comma_lists_in_given_order(tmp_path):
    _write(tmp_path / "b.jsonl", _jsonl(["b1", "b2"]))
    _write(tmp_path / "a.jsonl", _jsonl(["a1"]))
    _write(tmp_path / "sub" / "c.jsonl", _jsonl(["c1"]))
    assert list(iter_documents(TextSpec(str(tmp_path / "*.jsonl")))) == ["a1", "b1", "b2"]
    assert list(iter_documents(TextSpec(str(tmp_path / "**" / "*.jsonl")))) == ["a1", "b1", "b2", "c1"]
    both = f"{tmp_path / 'b.jsonl'},{tmp_path / 'a.jsonl'}"
    assert list(iter_documents(TextSpec(both))) == ["b1", "b2", "a1"]


def test_custom_text_field(tmp_path):
    path = _write(tmp_path / "c.jsonl", "".join(json.dumps({"body": d, "id": i}) + "\n"
                                                 for i, d in enumerate(DOCS)).encode())
    assert list(iter_documents(TextSpec(str(path), text_field="body"))) == DOCS


def test_local_datasets_directories(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(str(tmp_path / "saved"))
    assert list(iter_documents(TextSpec(str(tmp_path / "saved")))) == DOCS
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": DOCS[:3]})}) \
        .save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents(TextSpec(str(tmp_path / "dd"), split="validation"))) == DOCS[:3]
    with pytest.raises(DataError, match="no split 'train'"):
        list(iter_documents(TextSpec(str(tmp_path / "dd"))))
    _write(tmp_path / "raw" / "train.jsonl", _jsonl(DOCS))  # a folder of data files, read by datasets' builders
    assert list(iter_documents(TextSpec(str(tmp_path / "raw")))) == DOCS


def _stream_text(docs) -> str:
    return "".join(d + EOT for d in docs if d)


@pytest.mark.parametrize("bos", [True, False])
def test_packing_is_exact(tok, bos):
    T = 16
    C = pack_contexts(iter(DOCS), tok, T, bos=bos)
    assert C.dtype == np.int32 and C.ndim == 2 and C.shape[1] == T and C.shape[0] > 10
    eot = tok.convert_tokens_to_ids(EOT)
    body = C[:, 1:] if bos else C
    if bos:
        assert (C[:, 0] == eot).all()
    decoded = tok.decode(body.ravel().tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    full = _stream_text(DOCS)
    assert full.startswith(decoded)
    # only the final partial context is dropped: what is left is shorter than one context
    rest_ids = tok(full[len(decoded):], add_special_tokens=False)["input_ids"]
    assert 0 < len(rest_ids) < body.shape[1]
    # contexts break documents anywhere: at least one context starts mid-document (not right after an EOS)
    assert any(body[r, 0] != eot and body[r - 1, -1] != eot for r in range(1, len(body)))


def test_packing_deterministic_and_max_contexts_stops_reading(tok):
    a = pack_contexts(iter(DOCS), tok, 12)
    b = pack_contexts(iter(DOCS), tok, 12, batch_docs=3)
    assert np.array_equal(a, b)  # the batch size does not change the result

    consumed = []

    def endless():
        i = 0
        while i < 10_000:  # bounded so a packer that ignores max_contexts fails instead of hanging
            consumed.append(i)
            yield DOCS[i % len(DOCS)]
            i += 1

    c = pack_contexts(endless(), tok, 12, max_contexts=5, batch_docs=4)
    assert c.shape == (5, 12) and np.array_equal(c, a[:5])
    assert len(consumed) <= 12  # stopped after a few small batches of an endless corpus


def test_packing_without_bos_token_falls_back_and_policy_string(tok):
    policy = packing_policy(tok, True)
    eot = tok.convert_tokens_to_ids(EOT)
    assert f"EOS id {eot}" in policy and f"BOS id {eot}" in policy and "dropped" in policy
    assert "no BOS" in packing_policy(tok, False)
    bare = _tokenizer(with_specials=False)
    with pytest.raises(ConfigError, match="neither a BOS nor an EOS"):
        pack_contexts(iter(DOCS), bare, 8, bos=True)
    C = pack_contexts(iter(DOCS), bare, 8, bos=False)  # no separator at all then
    decoded = bare.decode(C.ravel().tolist(), clean_up_tokenization_spaces=False)
    assert len(decoded) > 100 and "".join(DOCS).startswith(decoded)


def test_fingerprint_covers_the_consumed_documents(tmp_path):
    d1 = _write(tmp_path / "one" / "c.jsonl", _jsonl(DOCS))
    d2 = _write(tmp_path / "two" / "c.jsonl", _jsonl(DOCS))  # same file somewhere else: same data
    fp = fingerprint(TextSpec(str(d1)))
    assert len(fp) == 64 and fp == fingerprint(TextSpec(str(d2))) == fingerprint(TextSpec(str(d1)))
    edited = _jsonl(DOCS).replace(b"quick", b"QUICK")  # same size, other content
    _write(d2, edited)
    assert fingerprint(TextSpec(str(d2))) != fp
    os.rename(d1, tmp_path / "one" / "renamed.jsonl")
    assert fingerprint(TextSpec(str(tmp_path / "one" / "renamed.jsonl"))) != fp
    # only what is consumed counts: the first 3 documents of a file whose later ones differ
    spec_a = TextSpec(str(_write(tmp_path / "a" / "c.jsonl", _jsonl(DOCS))))
    spec_b = TextSpec(str(_write(tmp_path / "b" / "c.jsonl", _jsonl(DOCS[:3] + ["other"] * 5))))
    first3 = lambda spec: list(itertools.islice(iter_records(spec), 3))  # noqa: E731
    assert fingerprint(spec_a, first3(spec_a)) == fingerprint(spec_b, first3(spec_b)) != fingerprint(spec_a)
    assert fingerprint(spec_a, first3(spec_a)[:2]) != fingerprint(spec_a, first3(spec_a))
    # the chain is per document: extending a saved state gives the value of one pass
    docs = list(iter_records(spec_a))
    mid = chain_fingerprint(source_identity(spec_a), source_names(spec_a), docs[:7])
    assert chain_fingerprint(mid, source_names(spec_a), docs[7:]) == fingerprint(spec_a)
    hub = source_identity(TextSpec("someone/corpus"))  # a Hub source is named by name, split and revision too
    assert hub != source_identity(TextSpec("someone/corpus", split="validation")) \
        != source_identity(TextSpec("someone/corpus", revision="abc"))


def test_records_resume_after_a_position(tmp_path):
    _write(tmp_path / "d" / "a.jsonl", _jsonl(DOCS[:10]))
    _write(tmp_path / "d" / "b.jsonl", _jsonl(DOCS[10:]))
    spec = TextSpec(str(tmp_path / "d" / "*.jsonl"))
    records = list(iter_records(spec))
    assert [t for _, t in records] == DOCS and source_names(spec) == ["a.jsonl", "b.jsonl"]
    for k in (0, 4, 9, 10, 30):
        assert list(iter_records(spec, after=records[k][0])) == records[k + 1:]


def test_a_multi_gigabyte_line_is_refused_in_bounded_memory(tmp_path):
    """A record far longer than any document (a truncated download, a binary file caught by a glob) is one
    DataError naming file and line, read in bounded memory: here a 320 MB line under a 300 MB address-space margin
    (the old reader took the line whole and died of MemoryError, or of the OOM killer on a multi-GB line)."""
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(_jsonl(DOCS[:3]))
        f.write(b'{"text": "')
        block = b"x" * (1 << 20)
        for _ in range(320):
            f.write(block)
        f.write(b'"}\n')
        f.write(_jsonl(DOCS[3:5]))
    script = f"""
import resource, sys
from saecache.harvest.text import TextSpec, iter_documents
from saecache.errors import DataError
vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (300 << 20), vm + (300 << 20)))
try:
    n = sum(1 for _ in iter_documents(TextSpec({str(path)!r})))
except DataError as e:
    print('DataError:', e)
    sys.exit(3)
except MemoryError:
    print('MemoryError')
    sys.exit(4)
print('read', n)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 3, p.stdout + p.stderr
    msg = p.stdout.strip()
    assert "\n" not in msg and f"{path}:4" in msg and "longer than" in msg


# ---- errors: one line each ----

def _data_error(spec: TextSpec, match: str) -> str:
    with pytest.raises(DataError, match=match) as e:
        list(iter_documents(spec))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_no_files_match(tmp_path):
    _data_error(TextSpec(str(tmp_path / "nothing" / "*.jsonl.zst")), "no files match")
    _data_error(TextSpec(str(tmp_path / "missing.jsonl")), "no files match")


def test_missing_text_field_names_the_fields(tmp_path):
    path = _write(tmp_path / "c.jsonl.zst", zstandard.ZstdCompressor().compress(_jsonl(DOCS)))
    msg = _data_error(TextSpec(str(path), text_field="content"), "no field 'content'")
    assert "text" in msg and "meta" in msg and "c.jsonl.zst:1" in msg


def test_unreadable_files(tmp_path):
    _data_error(TextSpec(str(_write(tmp_path / "bad.jsonl.zst", os.urandom(300)))), "bad.jsonl.zst")
    _data_error(TextSpec(str(_write(tmp_path / "bad.txt", b"\xff\xfe\x00broken utf8 \xc3"))), "UTF-8")
    _data_error(TextSpec(str(_write(tmp_path / "bad.jsonl", _jsonl(DOCS[:2]) + b"{not json\n"))), "bad.jsonl:3")
    _data_error(TextSpec(str(_write(tmp_path / "c.csv", b"text\nhello\n"))), "unsupported")
    _data_error(TextSpec(str(_write(tmp_path / "list.jsonl", b'["not", "an object"]\n'))), "JSON object")


def test_empty_dataset_and_too_few_tokens(tmp_path, tok):
    _data_error(TextSpec(str(_write(tmp_path / "empty.jsonl", b""))), "no documents")
    _data_error(TextSpec(str(_write(tmp_path / "blank.jsonl.zst", zstandard.ZstdCompressor().compress(b"\n\n")))),
                "no documents")
    with pytest.raises(DataError, match="fewer than one context") as e:
        pack_contexts(iter(["tiny"]), tok, 64)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="fewer than one context"):
        pack_contexts(iter(["", ""]), tok, 4)


def test_zst_without_zstandard_gives_install_hint(tmp_path, monkeypatch):
    path = _write(tmp_path / "c.jsonl.zst", zstandard.ZstdCompressor().compress(_jsonl(DOCS)))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` raise ImportError
    _data_error(TextSpec(str(path)), "pip install zstandard")


def test_hub_name_offline_is_a_data_error():
    msg = _data_error(TextSpec("someone/no-such-corpus-xyz"), "someone/no-such-corpus-xyz")
    assert "Hub" in msg
