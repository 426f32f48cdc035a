"""The fuzzed store reader (issue 23 item 9): property-based cases (hypothesis, derandomized) feed malformed shard
indexes, manifest entries, headers, arrays' `zarr.json` and final records to the reader of a small harvested store.
Every case must end in a `StoreError` or in rows equal to the pristine store's, never a crash, a hang, an allocation
beyond the store's size or wrong rows returned silently; `verify` must name a shard whose object changed
(`_fuzz.py` has the harness and the checks). The session prints the number of cases run ("fuzz: N cases").

Also: a byte flipped inside a shard's data (not its index) of a real store, and `saecache verify` in a subprocess
naming that shard.
"""

import copy
import json
import math
import os
import subprocess
import sys
import tracemalloc
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from _fuzz import Pristine, address_space, fix_index_crc, run_case
from _store import harvest_tiny

pytestmark = pytest.mark.slow


SCALE = float(os.environ.get("SAECACHE_FUZZ_SCALE", "1"))
"""Multiplies every test's number of cases (e.g. 10 for a deeper run by hand; CI runs 1)."""


TRIAGE = bool(os.environ.get("SAECACHE_FUZZ_TRIAGE"))
"""Set: every distinct failure reported at once, unshrunk (quicker to triage by hand)."""


def fuzz_settings(n: int):
    """`n` cases (times SCALE), the same ones on every run (no example database), a generous deadline (a hang
    detector, not a speed check: a case takes milliseconds; `_fuzz.HANG_S` is the backstop)."""
    return settings(max_examples=max(1, round(n * SCALE)), derandomize=True, database=None,
                    deadline=timedelta(seconds=10),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture],
                    **({"phases": [Phase.explicit, Phase.generate]} if TRIAGE else {}))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_model_dir, tiny_corpus) -> Pristine:
    """One hook, 40 contexts of 32 tokens: 3 shards of 4 inner chunks, the last one partial (2 chunks written, its
    index ends with 2 missing entries)."""
    url = tmp_path_factory.mktemp("fuzz") / "store.zarr"
    return Pristine.load(harvest_tiny(url, tiny_model_dir, tiny_corpus, hooks=("mlp_out.0",), tokens=40 * 32))


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_cases")


@pytest.fixture(scope="module", autouse=True)
def bounded(pristine):
    """The module's cases run with a bounded address space (`_fuzz.address_space`); the store is harvested before
    (its harvest's threads and model need more)."""
    with address_space():
        yield


@pytest.fixture
def traced():
    """Allocations traced for the test's cases (`_fuzz.Guard` bounds each case's peak)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    yield
    if started:
        tracemalloc.stop()


# --------------------------------------------------------------------------------------------- values and JSON


INTERESTING = [0, 1, -1, 2, 3, 7, 16, 31, 32, 33, 127, 128, 4096, 2**31 - 1, 2**31, 2**32 + 1, 2**53 + 1, 2**63,
               2**64 - 1, 2**64, -2**63, 10**30, 0.5, 1.0, 1e-300, -0.0, 1e308, math.nan, math.inf, -math.inf, "",
               "0", "32", "-1", "float16", "float32", "uint8", "int8", "<f2", "blosc", "zstd", "bytes", "crc32c",
               "sharding_indexed", "little", "big", "end", "start", "default", "v2", ".", "/", "mlp_out.0", "../x",
               None, True, False, [], {}, [0], [1, 2], [32, 64], [-1, 64], [0, 0], {"name": "bytes"}, {"a": 1}]

# drawn values are deep-copied before use: INTERESTING's [] and {} are shared objects
json_values = st.one_of(
    st.sampled_from(INTERESTING), st.integers(), st.floats(), st.text(max_size=6),
    st.lists(st.one_of(st.integers(-2, 2**20), st.sampled_from(INTERESTING)), max_size=3))


def paths(doc, prefix=()):
    """Every path into a JSON document (keys and list indices), parents before children."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, prefix + (i,))
    return out


def get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def numeric_edits(v):
    """Nearby values of a number: off by one, doubled, halved, negated, zero."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return []
    return [v + 1, v - 1, v * 2, v // 2 if isinstance(v, int) else v / 2, -v, 0, v + 2**32]


@st.composite
def json_mutation(draw, doc, focus=()):
    """`doc` (not changed) with 1-3 edits at its paths (those under `focus` when given): set to a nasty value, a
    number moved a little, a key deleted or added, a value copied from another path."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        every = paths(doc)
        inside = [p for p in every if p[:len(focus)] == focus and len(p) > len(focus)] or every
        path = draw(st.sampled_from(inside))
        op = draw(st.sampled_from(["set", "set", "nudge", "delete", "add", "copy"]))
        if not path:
            op = "add" if isinstance(doc, dict) else "set"
        if op == "add":
            parent = get(doc, path)
            if isinstance(parent, dict):
                parent[draw(st.sampled_from(["x", "shard", "rows", "d", "codecs", "configuration", "name"]))] = \
                    copy.deepcopy(draw(json_values))
            continue
        if not path:
            return copy.deepcopy(draw(json_values))
        parent, key = get(doc, path[:-1]), path[-1]
        if op == "delete":
            del parent[key]
        elif op == "nudge" and numeric_edits(parent[key]):
            parent[key] = draw(st.sampled_from(numeric_edits(parent[key])))
        elif op == "copy":
            parent[key] = copy.deepcopy(get(doc, draw(st.sampled_from(every))))
        else:
            parent[key] = copy.deepcopy(draw(json_values))
    return doc


@st.composite
def raw_mutation(draw, data: bytes):
    """`data` truncated, extended, emptied or with bytes flipped."""
    op = draw(st.sampled_from(["flip", "flip", "truncate", "extend", "insert", "empty"]))
    b = bytearray(data)
    if op == "empty":
        return b""
    if op == "truncate":
        return bytes(b[:draw(st.integers(0, max(len(b) - 1, 0)))])
    if op == "extend":
        return bytes(b) + draw(st.binary(min_size=1, max_size=64))
    if op == "insert":
        at = draw(st.integers(0, len(b)))
        return bytes(b[:at]) + draw(st.binary(min_size=1, max_size=8)) + bytes(b[at:])
    for _ in range(draw(st.integers(1, 4))):
        b[draw(st.integers(0, len(b) - 1))] ^= draw(st.integers(1, 255))
    return bytes(b)


def encode(doc) -> bytes:
    return json.dumps(doc, indent=1).encode()


def json_files(pristine: Pristine, prefix: str) -> list[str]:
    return [k for k in pristine.objects() if k.startswith(prefix) and k.endswith("zarr.json")]


# ------------------------------------------------------------------------------------------ the metadata cases


@given(data=st.data())
@fuzz_settings(1500)
def test_fuzz_header(pristine, cases_dir, data):
    """The group's zarr.json (the header in attributes["saecache"]): wrong types, missing and extra keys, geometry
    that disagrees with the arrays (chunk_rows, shard_rows, d, n_contexts, ...)."""
    doc = json.loads(pristine.read("zarr.json"))
    focus = data.draw(st.sampled_from([("attributes", "saecache"), ("attributes", "saecache", "storage"),
                                       ("attributes", "saecache", "hooks"), ()]))
    run_case("header", pristine, cases_dir, {"zarr.json": encode(data.draw(json_mutation(doc, focus)))})


@given(data=st.data())
@fuzz_settings(2000)
def test_fuzz_array_metadata(pristine, cases_dir, data):
    """An array's zarr.json (acts/*, rows/*, contexts): shapes, chunk grids, codec chains the reader does not know,
    dtypes, fill values, index codecs."""
    key = data.draw(st.sampled_from([k for k in json_files(pristine, "") if k.startswith(("acts/", "rows/",
                                                                                           "contexts/"))]))
    doc = json.loads(pristine.read(key))
    focus = data.draw(st.sampled_from([(), ("codecs", 0, "configuration"), ("chunk_grid",), ("shape",)]))
    run_case("array zarr.json", pristine, cases_dir, {key: encode(data.draw(json_mutation(doc, focus)))})


@given(data=st.data())
@fuzz_settings(1500)
def test_fuzz_manifest(pristine, cases_dir, data):
    """A manifest entry: shard numbers, row and context ranges, object lists and checksums, stats; also deleted."""
    key = data.draw(st.sampled_from(json_files(pristine, "_manifest/shard-")))
    doc = json.loads(pristine.read(key))
    focus = data.draw(st.sampled_from([("attributes", "saecache"), ("attributes", "saecache", "objects"),
                                       ("attributes", "saecache", "stats")]))
    mutated = None if data.draw(st.integers(0, 30)) == 0 else encode(data.draw(json_mutation(doc, focus)))
    run_case("manifest", pristine, cases_dir, {key: mutated})


@given(data=st.data())
@fuzz_settings(500)
def test_fuzz_final_record(pristine, cases_dir, data):
    doc = json.loads(pristine.read("_final/zarr.json"))
    run_case("final record", pristine, cases_dir,
             {"_final/zarr.json": encode(data.draw(json_mutation(doc, ("attributes", "saecache"))))})


@given(data=st.data())
@fuzz_settings(1000)
def test_fuzz_json_bytes(pristine, cases_dir, data):
    """Any metadata file as bytes: not JSON, truncated, empty, flipped."""
    key = data.draw(st.sampled_from(json_files(pristine, "")))
    run_case("json bytes", pristine, cases_dir, {key: data.draw(raw_mutation(pristine.read(key)))})


# ---------------------------------------------------------------------------------------------- the shard cases


def shard_objects(pristine: Pristine) -> list[str]:
    """The sharded objects (acts/*, rows/*): each ends with its index."""
    return [k for k in pristine.objects() if k.startswith(("acts/", "rows/")) and "/c/" in k]


def n_inner(pristine: Pristine, key: str) -> int:
    meta = json.loads(pristine.read(key.split("/c/")[0] + "/zarr.json"))
    conf = meta["codecs"][0]["configuration"]
    return meta["chunk_grid"]["configuration"]["chunk_shape"][0] // conf["chunk_shape"][0]


def shard_of(key: str) -> int:
    return int(key.split("/c/")[1].split("/")[0])


@st.composite
def index_values(draw, table: np.ndarray, data_end: int, size: int):
    near = [int(v) for v in table.reshape(-1) if v != 2**64 - 1] + [data_end, size]
    return draw(st.one_of(
        st.sampled_from([0, 1, data_end - 1, data_end, data_end + 1, size - 1, size, size + 1, 2**31, 2**32,
                         2**40, 2**63, 2**64 - 2, 2**64 - 1]),
        st.builds(lambda v, d: max(0, min(2**64 - 1, v + d)), st.sampled_from(near), st.integers(-40, 40)),
        st.integers(0, 2**64 - 1)))


@given(data=st.data())
@fuzz_settings(2000)
def test_fuzz_shard_index(pristine, cases_dir, traced, data):
    """A shard's index with a valid crc32c: entries out of the file, overlapping, swapped, missing, huge nbytes."""
    key = data.draw(st.sampled_from(shard_objects(pristine)))
    raw, n = pristine.read(key), n_inner(pristine, key)
    data_end = len(raw) - 16 * n - 4
    table = np.frombuffer(raw[data_end:-4], dtype="<u8").reshape(n, 2).copy()
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["set", "set", "swap", "copy", "shift"]))
        i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
        if op == "set":
            table[i, data.draw(st.integers(0, 1))] = data.draw(index_values(table, data_end, len(raw)))
        elif op == "swap":
            table[[i, j]] = table[[j, i]]
        elif op == "copy":
            table[i] = table[j]
        else:  # one boundary moved: chunk i ends and chunk i+1 starts elsewhere
            d = data.draw(st.integers(-8, 8))
            if i + 1 < n and table[i + 1, 0] != 2**64 - 1:
                table[i, 1] = (int(table[i, 1]) + d) % 2**64
                table[i + 1] = (int(table[i + 1, 0]) + d) % 2**64, (int(table[i + 1, 1]) - d) % 2**64
    mutated = fix_index_crc(raw[:data_end] + table.tobytes() + raw[-4:], n)
    run_case("shard index", pristine, cases_dir, {key: mutated}, shard_of(key) if mutated != raw else None)


@given(data=st.data())
@fuzz_settings(1500)
def test_fuzz_shard_bytes(pristine, cases_dir, traced, data):
    """A shard object's tail (index + crc) flipped, the object truncated or extended: the index checksum, its
    size and the file's size must be checked before any chunk is read."""
    key = data.draw(st.sampled_from(shard_objects(pristine)))
    raw, n = pristine.read(key), n_inner(pristine, key)
    tail = 16 * n + 4
    op = data.draw(st.sampled_from(["flip", "flip", "truncate", "extend"]))
    b = bytearray(raw)
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            b[len(b) - 1 - data.draw(st.integers(0, tail + 8))] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        del b[len(b) - data.draw(st.integers(1, len(b))):]
    else:
        b += data.draw(st.binary(min_size=1, max_size=2 * tail))
    mutated = bytes(b)
    run_case("shard bytes", pristine, cases_dir, {key: mutated}, shard_of(key) if mutated != raw else None)


@given(data=st.data())
@fuzz_settings(1000)
def test_fuzz_shard_data(pristine, cases_dir, data):
    """Bytes flipped inside the inner chunks' data of a shard object or a contexts chunk (not an index): each chunk's
    crc32c (format version 3) must catch it before it is decoded."""
    key = data.draw(st.sampled_from(shard_objects(pristine) + [k for k in pristine.objects() if
                                                               k.startswith("contexts/c/")]))
    raw = bytearray(pristine.read(key))
    data_end = len(raw) - (16 * n_inner(pristine, key) + 4 if key.startswith(("acts/", "rows/")) else 0)
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, data_end - 1))] ^= data.draw(st.integers(1, 255))
    mutated = bytes(raw)
    changed = shard_of(key) if mutated != pristine.read(key) else None
    run_case("shard data", pristine, cases_dir, {key: mutated}, changed)


# ----------------------------------------------------------------------------------- a flipped byte, verified


def test_verify_names_shard_with_flipped_data_byte(pristine, tmp_path):
    """One byte inside shard 1's activation data (its first inner chunk, not the index) flipped in a copy of a
    harvested store: `saecache verify` exits non-zero and names shard 1 and that object, and no other shard."""
    key = "acts/mlp_out.0/c/1/0"
    raw = bytearray(pristine.read(key))
    raw[len(raw) // 4] ^= 0x10
    case = pristine.copy(tmp_path, {key: bytes(raw)})
    r = subprocess.run([sys.executable, "-m", "saecache", "verify", str(case)], capture_output=True, text=True,
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert f"shard 1: object {key} is corrupt" in out, out
    assert "shard 0:" not in out and "shard 2:" not in out, out
    assert "Traceback" not in out, out
