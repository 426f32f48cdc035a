"""The harness of the fuzzed store reader (tests/test_fuzz_store.py): a pristine store read once with plain zarr (the
oracle, independent of the code under test), per-case copies that share every unmutated file with it, the reader's
whole output through the public API, and the checks every case must pass.

A case copies the pristine store as hard links (no bytes copied) into a fresh directory, so no reader can see an
earlier case's file through a cached descriptor, then replaces the files it mutates. It must end in one of:
- `StoreError` from the reader (refused), or
- everything the reader returned equal to the pristine store's rows at the same row numbers, consistent with what the
  header declares (accepted).
Anything else fails the test: another exception type (a crash), rows that differ (wrong rows returned silently), a
hang (`signal.alarm` backstop) or a traced allocation beyond the bound (`tracemalloc`, see `Guard`). `saecache verify`
runs on the same copy and must return its problems or raise `StoreError`; when a shard object's bytes changed and
the manifest did not, it must name that shard.

No hypothesis import here: conftest.py reads `CASES` to print the case count at the end of the session.
"""

from __future__ import annotations

import faulthandler
import itertools
import json
import os
import resource
import shutil
import signal
import tracemalloc
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np
import zarr

from saecache.errors import StoreError
from saecache.harvest.inspect import verify_store
from saecache.harvest.store import Store

CASES: Counter = Counter()
"""Cases run in this session, per (test, "refused" or "accepted"): printed by conftest.py."""

TRIAGE_LOG = os.environ.get("SAECACHE_FUZZ_TRIAGE_LOG")
"""For triage by hand: a file where each failing case appends one line (exception and where it was raised) instead
of failing the test. Never set in CI."""

HANG_S = 30
"""Backstop for a hang: a case still running after this many seconds fails (a clean case takes milliseconds)."""

_SERIAL = itertools.count()


def summary() -> str:
    """One line: the cases run, per test, with how many the reader refused."""
    tests = sorted({t for t, _ in CASES})
    per = [f"{t} {sum(CASES[t, o] for o in ('refused', 'accepted'))} ({CASES[t, 'refused']} refused)" for t in tests]
    return f"fuzz: {sum(CASES.values())} cases: " + ", ".join(per)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a fuzz case ran for more than {HANG_S} s: the reader hangs")


@dataclass(repr=False)
class Pristine:
    """A harvested store and what plain zarr reads from it (the oracle)."""

    root: Path
    acts: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]
    contexts: np.ndarray
    bound: int
    """Most bytes a case may allocate (traced) while reading: the pristine store's total size on disk, decoded rows
    and contexts included, twice over, plus 4 MiB for the readers' own bookkeeping. A reader that trusts a declared
    size larger than the files allocates beyond it."""

    @classmethod
    def load(cls, root: Path) -> Pristine:
        g = zarr.open_group(str(root), mode="r")
        hooks = sorted(json.loads((root / "zarr.json").read_text())["attributes"]["saecache"]["hooks"])
        acts = {h: g[f"acts/{h}"][:] for h in hooks}
        rows = {k: g[f"rows/{k}"][:] for k in ("token", "context", "position")}
        contexts = g["contexts"][:]
        on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        decoded = sum(a.nbytes for a in acts.values()) + sum(a.nbytes for a in rows.values()) + contexts.nbytes
        return cls(root, acts, rows, contexts, 2 * (on_disk + decoded) + 4 * 2**20)

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def objects(self) -> list[str]:
        """Keys of every file of the store (sorted), relative to its root."""
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def copy(self, into: Path, replace: dict[str, bytes | None]) -> Path:
        """A copy of the store in a new directory under `into`: hard links to the pristine files, except `replace`
        (key -> new bytes, or None to delete the file)."""
        case = into / f"case-{next(_SERIAL)}"
        shutil.copytree(self.root, case, copy_function=os.link)
        for key, data in replace.items():
            (case / key).unlink()
            if data is not None:
                (case / key).write_bytes(data)
        return case


# ------------------------------------------------------------------------------------------ what a reader returns


def read_everything(url: str) -> list[tuple]:
    """Everything the reader gives through its public API, as (what, name, start, stop, array, declared) tuples: rows
    of every hook and of rows/* per published shard, contexts per shard, every inner chunk through the loader's chunk
    reader, each hook's statistics; `declared` is the (dtype, width) the header promises for the rows."""
    store = Store.open(url)
    g, out = store.geometry, []
    hooks = sorted(store.hooks)
    dtype = store.header["storage"]["dtype"]
    for s in store.complete_shards():
        r0, r1 = g.shard_row_range(s)
        for h in hooks:
            out.append(("acts", h, r0, r1, store.read_acts(h, r0, r1), (dtype, store.hooks[h]["d"])))
        for k, v in store.read_meta(r0, r1).items():
            out.append(("rows", k, r0, r1, v, None))
        c0, c1 = g.shard_contexts(s)
        out.append(("contexts", "", c0, c1, store.contexts(c0, c1), None))
    for h in hooks:
        reader = chunk_reader(store, h)
        for s in store.complete_shards():
            r0, r1 = g.shard_row_range(s)
            for inner in range(g.chunks_per_shard):
                a = r0 + inner * g.chunk_rows
                if a >= r1:
                    break
                b = min(a + g.chunk_rows, r1)
                out.append(("acts", h, a, b, reader.read_chunk(s, inner)[:b - a], (dtype, store.hooks[h]["d"])))
        st = store.stats(h)
        if np.shape(st["mean"]) != (store.hooks[h]["d"],):
            raise AssertionError(f"stats of {h}: mean of shape {np.shape(st['mean'])} for a hook of width "
                                 f"{store.hooks[h]['d']}")
    store.fingerprint()
    return out


def chunk_reader(store: Store, hook: str):
    """The loader's inner-chunk reader of `acts/<hook>` (the hand-written shard reader)."""
    reader = store.chunk_reader(hook)
    if reader is None:
        raise AssertionError(f"a local store has no chunk reader for {hook}")
    return reader


def check_output(out: list[tuple], pristine: Pristine) -> None:
    """Every array returned equals the pristine rows at the same numbers and has the declared dtype and width."""
    for what, name, a, b, arr, declared in out:
        if what == "acts":
            want = pristine.acts.get(name)
        elif what == "rows":
            want = pristine.rows.get(name)
        else:
            want = pristine.contexts
        where = f"{what} {name} [{a}, {b})"
        if want is None or not 0 <= a <= b <= len(want):
            raise AssertionError(f"{where}: returned, but the pristine store has no such rows")
        want = want[a:b]
        if arr.shape != want.shape or arr.dtype != want.dtype or arr.tobytes() != want.tobytes():
            raise AssertionError(f"{where}: WRONG ROWS returned silently ({arr.dtype}{list(arr.shape)} vs pristine "
                                 f"{want.dtype}{list(want.shape)}, equal bytes: {arr.tobytes() == want.tobytes()})")
        if declared is not None and (arr.dtype != np.dtype(declared[0]) or arr.shape[1:] != (declared[1],)):
            raise AssertionError(f"{where}: rows of {arr.dtype}{list(arr.shape[1:])} but the header declares "
                                 f"{declared[0]} of width {declared[1]}")


# ------------------------------------------------------------------------------------------------- running a case


class Guard:
    """Per case: an alarm against hangs and, while tracemalloc traces (the shard tests), the allocation peak."""

    def __init__(self, bound: int):
        self.bound = bound

    def __enter__(self):
        self._old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(HANG_S)  # a clean failure; a hang the alarm cannot break (a deadlock) dumps every thread:
        faulthandler.dump_traceback_later(2 * HANG_S, exit=True)
        if tracemalloc.is_tracing():
            tracemalloc.reset_peak()
            self._base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc):
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self._old)
        if exc[0] is None and tracemalloc.is_tracing():
            peak = tracemalloc.get_traced_memory()[1] - self._base
            if peak > self.bound:
                raise AssertionError(f"a case allocated {peak} bytes, more than the bound {self.bound} (2x the whole "
                                     "store on disk and decoded): the reader trusts a declared size")
        return False


@contextmanager
def address_space(margin: int = 2**31):
    """At most `margin` more bytes of address space for the block (RLIMIT_AS; restored after): an allocation that
    trusts a huge declared size fails as MemoryError (a crash: not a StoreError) instead of taking the machine."""
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = used + margin
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_case(test: str, pristine: Pristine, tmp: Path, replace: dict[str, bytes | None],
             changed_shard: int | None = None) -> str:
    """Run the reader and `verify` on a copy of the store with `replace` applied; "refused" or "accepted" (see the
    module docstring for what fails). `changed_shard`: the shard whose object bytes `replace` changed (the manifest
    untouched), which `verify` must name."""
    case = pristine.copy(tmp, replace)
    try:
        if TRIAGE_LOG:
            outcome = _triage(pristine, case, changed_shard, replace)
        else:
            outcome = check_case(pristine, case, changed_shard)
    finally:
        shutil.rmtree(case)
    CASES[test, outcome] += 1
    return outcome


def check_case(pristine: Pristine, case: Path, changed_shard: int | None) -> str:
    with Guard(pristine.bound):
        try:
            out = read_everything(str(case))
        except StoreError:
            outcome = "refused"
        else:
            check_output(out, pristine)
            outcome = "accepted"
            del out
        try:
            problems = verify_store(str(case))
        except StoreError:
            problems = None
    if changed_shard is not None:
        if problems is None or not any(p.startswith(f"shard {changed_shard}:") for p in problems):
            raise AssertionError(f"verify did not name shard {changed_shard} whose object changed: {problems}")
    return outcome


def _triage(pristine: Pristine, case: Path, changed_shard: int | None, replace: dict) -> str:
    import traceback

    try:
        return check_case(pristine, case, changed_shard)
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/tests/" not in f.filename]
        at = ", ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:])
        with open(TRIAGE_LOG, "a") as f:
            f.write(f"{type(e).__name__}\t{str(e)[:150]!r}\t{at}\t{list(replace)}\n")
        return "triaged"


def fix_index_crc(shard: bytes, n_inner: int) -> bytes:
    """A shard object whose index crc32c is recomputed over its (mutated) table: what passes the index checksum."""
    table = shard[len(shard) - 4 - 16 * n_inner:-4]
    return shard[:-4] + crc32c.crc32c(table).to_bytes(4, "little")
