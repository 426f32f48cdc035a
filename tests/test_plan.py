"""The harvest plan (issue 11, defect 2): the text is read and tokenized once per store, not once per worker and
again on every resume; a rerun or resume reaches its first new shard without reading the text; a glob that also
matches a large file past the token budget costs no extra reading. Work is counted (tokenizer calls, files opened,
bytes read by the process), never timed."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from _store import harvest_tiny, tiny_harvest_config
from test_harvest import array_snapshot, assert_same

from saecache.errors import StoreError
from saecache.harvest.store import Store

SMALL = dict(ctx_per_chunk=1, chunks_per_shard=2, tokens=8192)  # 128 shards of 2 contexts of 32 tokens

COUNTING = """
import json, sys
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
counts = {"calls": 0, "docs": 0, "tokens": 0}
_call = PreTrainedTokenizerBase.__call__
def counting(self, text, *a, **k):
    out = _call(self, text, *a, **k)
    counts["calls"] += 1
    counts["docs"] += len(text) if isinstance(text, list) else 1
    ids = out["input_ids"]
    counts["tokens"] += sum(len(x) for x in ids) if isinstance(text, list) else len(ids)
    return out
PreTrainedTokenizerBase.__call__ = counting
"""


@pytest.fixture
def counts(monkeypatch):
    """Tokenizer work (calls, documents, tokens) and text files opened in this process, from now on."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    import saecache.harvest.text as text

    c = {"calls": 0, "docs": 0, "tokens": 0, "opened": 0}
    call, open_text = PreTrainedTokenizerBase.__call__, text._open_text

    def counting(self, batch, *a, **k):
        out = call(self, batch, *a, **k)
        c["calls"] += 1
        c["docs"] += len(batch) if isinstance(batch, list) else 1
        ids = out["input_ids"]
        c["tokens"] += sum(len(x) for x in ids) if isinstance(batch, list) else len(ids)
        return out

    def opening(*a, **k):
        c["opened"] += 1
        return open_text(*a, **k)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
    monkeypatch.setattr(text, "_open_text", opening)
    return c


def _reset(c):
    for k in c:
        c[k] = 0


@pytest.mark.slow
def test_four_concurrent_workers_tokenize_the_text_once(tmp_path, tiny_model_dir, tiny_corpus):
    def launch(out, worker=None):
        cfg = tiny_harvest_config(out, tiny_model_dir, tiny_corpus, worker=worker, **SMALL)
        kw = {k: getattr(cfg, k) for k in ("out", "model", "dataset", "ctx_len", "tokens", "batch_size",
                                            "ctx_per_chunk", "chunks_per_shard", "device", "worker")}
        kw["hooks"] = list(cfg.hooks)
        script = COUNTING + ("from saecache.harvest.config import HarvestConfig\n"
                             "from saecache.harvest.run import run_harvest\n"
                             "kw = json.loads(sys.argv[1]); kw['hooks'] = tuple(kw['hooks'])\n"
                             "run_harvest(HarvestConfig(**kw), progress=False)\n"
                             "print(json.dumps(counts))\n")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        return subprocess.Popen([sys.executable, "-c", script, json.dumps(kw)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def result(p):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    alone = result(launch(tmp_path / "one.zarr"))
    assert alone["tokens"] > 0  # the counter sees the packer's calls
    four = [launch(tmp_path / "four.zarr", f"{i}/4") for i in range(4)]
    each = [result(p) for p in four]
    shard_tokens = SMALL["ctx_per_chunk"] * SMALL["chunks_per_shard"] * 32
    assert sum(c["tokens"] for c in each) <= alone["tokens"] + shard_tokens, each
    assert Store.open(str(tmp_path / "four.zarr")).is_complete
    assert_same(array_snapshot(tmp_path / "one.zarr"), array_snapshot(tmp_path / "four.zarr"))
    assert Store.open(str(tmp_path / "one.zarr")).fingerprint() == Store.open(str(tmp_path / "four.zarr")).fingerprint()


def test_rerun_and_resume_read_no_text(tmp_path, tiny_model_dir, tiny_corpus, counts, monkeypatch):
    from saecache.harvest.store.write import StoreWriter

    ref = harvest_tiny(tmp_path / "ref.zarr", tiny_model_dir, tiny_corpus, **SMALL)
    assert counts["tokens"] > 0 and counts["opened"] > 0
    _reset(counts)
    harvest_tiny(ref, tiny_model_dir, tiny_corpus, **SMALL)  # rerun of a complete store
    assert counts == {"calls": 0, "docs": 0, "tokens": 0, "opened": 0}

    # a harvest stopped after 90% of its shards (Ctrl-C), then resumed
    write, written = StoreWriter.write_permuted_shard, []

    def stop_at_90_percent(self, s, *a, **k):
        if len(written) == 115:
            raise KeyboardInterrupt
        written.append(s)
        return write(self, s, *a, **k)

    monkeypatch.setattr(StoreWriter, "write_permuted_shard", stop_at_90_percent)
    out = tmp_path / "resumed.zarr"
    with pytest.raises(KeyboardInterrupt):
        harvest_tiny(out, tiny_model_dir, tiny_corpus, encode_workers=0, **SMALL)
    monkeypatch.setattr(StoreWriter, "write_permuted_shard", write)
    assert len(Store.open(str(out)).complete_shards()) == 115
    _reset(counts)
    harvest_tiny(out, tiny_model_dir, tiny_corpus, **SMALL)
    assert counts == {"calls": 0, "docs": 0, "tokens": 0, "opened": 0}
    assert_same(array_snapshot(ref), array_snapshot(out))


def test_a_stopped_planner_is_resumed_from_its_checkpoint(tmp_path, tiny_model_dir, tiny_corpus, counts,
                                                          monkeypatch):
    from transformers import AutoTokenizer

    import saecache.harvest.plan as plan
    from saecache.harvest.store.io import Location
    from saecache.harvest.text import TextSpec

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    spec = TextSpec(str(tiny_corpus))
    key = plan.plan_key(spec, {"name": "tiny"}, 32, True, 3000, 64)  # ~47 shards over most of the tiny corpus
    monkeypatch.setattr(plan, "BATCH_DOCS", 1)  # a checkpoint after every document
    ref = plan.Plan(Location(str(tmp_path / "ref"), read_only=False), key)
    want = ref.ensure(spec, tok)
    one_pass = dict(counts)
    put = plan.Plan._put_contexts

    def stop_at_30(self, s, contexts):
        if s == 30:
            raise KeyboardInterrupt
        return put(self, s, contexts)

    monkeypatch.setattr(plan.Plan, "_put_contexts", stop_at_30)
    loc = Location(str(tmp_path / "resumed"), read_only=False)
    _reset(counts)
    with pytest.raises(KeyboardInterrupt):
        plan.Plan(loc, key).ensure(spec, tok)
    first = dict(counts)
    assert (tmp_path / "resumed" / "_plan" / "state.json").exists() and plan.Plan(loc, key).finished() is None
    monkeypatch.setattr(plan.Plan, "_put_contexts", put)
    _reset(counts)
    got = plan.Plan(loc, key).ensure(spec, tok)
    # the second planner started at its predecessor's last checkpoint: together they read the text about once
    assert 1 < first["docs"] and 0 < counts["docs"] < one_pass["docs"] and counts["opened"] == 1
    assert first["docs"] + counts["docs"] <= one_pass["docs"] + 1  # at most the one document in progress twice
    assert got == want and want["n_contexts"] == 3000
    n_shards = -(-3000 // 64)
    for s in range(n_shards):
        assert (ref.read(s) == plan.Plan(loc, key).read(s)).all()
    assert len(ref.read(n_shards - 1)) == 3000 - 64 * (n_shards - 1)
    other = dict(key, ctx_len=16)
    with pytest.raises(StoreError, match="different configuration .*--ctx-len"):
        plan.Plan(loc, other).ensure(spec, tok)


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_a_glob_matching_a_large_file_past_the_budget_costs_nothing_more(tmp_path, tiny_model_dir, tiny_corpus):
    """The old fingerprint hashed every matched file whole (a glob over 450 GB of Pile for 3 GB consumed)."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_corpus, data / "a.jsonl.zst")
    small = str(data / "a*.jsonl*")
    harvest_tiny(tmp_path / "warm.zarr", tiny_model_dir, small, tokens=2048)  # imports and caches out of the count
    r0 = _bytes_read()
    harvest_tiny(tmp_path / "small.zarr", tiny_model_dir, small, tokens=2048)
    cost_small = _bytes_read() - r0
    with open(data / "b-large.jsonl", "w") as f:  # 48 MB of valid records after the ones consumed
        line = json.dumps({"text": "unrelated text " * 1000}) + "\n"
        for _ in range(48_000_000 // len(line)):
            f.write(line)
    r0 = _bytes_read()
    harvest_tiny(tmp_path / "both.zarr", tiny_model_dir, str(data / "*.jsonl*"), tokens=2048)
    cost_both = _bytes_read() - r0
    assert cost_both <= 1.5 * cost_small, (cost_small, cost_both)
    assert Store.open(str(tmp_path / "both.zarr")).header["dataset"]["fingerprint"] == \
        Store.open(str(tmp_path / "small.zarr")).header["dataset"]["fingerprint"]  # same documents consumed
