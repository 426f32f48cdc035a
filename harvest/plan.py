"""The harvest plan: every context of a run, packed once from the text and kept in the store under `_plan/`, so a
worker reads only its own shards' contexts and a resume or rerun never reads the dataset again.

Packing is a stream (a shard's contexts depend on every document before them), so one process packs: the first worker
that finds no finished plan and no live planner. It writes shard `s`'s contexts as `_plan/contexts-<s>.bin` (int32,
zstd) as soon as they are known and checkpoints (`_plan/state.json` + the unconsumed stream tokens) after every
tokenizer batch that completed a shard, so a killed planner's successor resumes from the last checkpoint, reading the
text from the next unconsumed record on. It stops reading at the document that completes the last context and
fingerprints exactly the documents it consumed (`text.chain_fingerprint`). `_plan/plan.json`, written last, gives
`n_contexts` and the fingerprint, the two header fields that depend on the text. Other workers wait for it.

Everything here is a pure function of the plan key (text source, tokenizer, packing, sizes): concurrent planners write
identical bytes, so a race costs time, never correctness.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable

import numpy as np
import zstandard
from tqdm import tqdm

from saecache.errors import DataError, StoreError
from saecache.harvest.config import differing_flags
from saecache.harvest.store import (PLAN_DIR, PLAN_FILE, PLAN_NODE, PLANNER_FILE, STATE_FILE, Location, diff_keys,
                                    meta_key, process_is_live)
from saecache.harvest.text import (
    TextSpec, chain_fingerprint, iter_records, resolve_source, source_identity, source_names, special_ids,
)

BATCH_DOCS = 256  # documents per tokenizer call
CHARS_PER_TOKEN_CAP = 8  # a batch stops at 8 characters per token still wanted (text rarely has more than ~5)
SETTLE_SECONDS = 0.2  # a new planner re-reads its record after this long before it starts
PLAN_LEASE_SECONDS = 600  # a planner on another host counts as live this long after its last checkpoint


def plan_key(spec: TextSpec, tokenizer_info: dict, ctx_len: int, bos: bool, n_contexts: int,
             ctx_per_shard: int) -> dict:
    """Everything the plan's bytes depend on, except paths as typed (the text's files are checked by name and size
    when the source is given another way, see `Plan._same_source`)."""
    tok = {k: v for k, v in tokenizer_info.items() if k != "name"}
    return {"dataset": {"text_field": spec.text_field, "split": spec.split, "name": spec.name,
                        "revision": spec.revision},
            "tokenizer": tok, "ctx_len": ctx_len, "bos": bos, "n_contexts_wanted": n_contexts,
            "ctx_per_shard": ctx_per_shard}


def _files(spec: TextSpec) -> list[list]:
    """[name, size] of each file of a file source (names as the fingerprint gives them), else []."""
    kind, targets = resolve_source(spec)
    if kind != "files":
        return [[spec.source, None]]
    return [[n, os.path.getsize(f)] for n, f in zip(source_names(spec), targets)]


class Plan:
    """The `_plan/` area of one store: read shard contexts, or build the plan (once, resumably)."""

    def __init__(self, loc: Location, key: dict, spec: TextSpec | None = None):
        self.loc = loc
        self.spec = spec
        self.key = key
        self.ctx_len = key["ctx_len"]
        self.per_shard = key["ctx_per_shard"]
        self.want = key["n_contexts_wanted"]
        self.id = uuid.uuid4().hex

    # -- reading
    def _json(self, name: str) -> dict | None:
        raw = self.loc.get(name)
        if raw is None:
            return None
        rec = json.loads(raw)
        diff = diff_keys(rec.get("key", {}), self.key) or self._same_source(rec)
        if diff:
            raise StoreError(f"store {self.loc.url} was planned with a different configuration (differs in: "
                             f"{', '.join(differing_flags(diff)[:8])}); rerun with the original settings or write to a "
                             "new --out")
        return rec

    def _same_source(self, rec: dict) -> list[str]:
        """[] when the text source is the one the plan was made from: the same source as typed, or (typed another
        way, e.g. an absolute path from elsewhere) files of the same names and sizes up to the last one it read."""
        if self.spec is None or rec.get("source") == self.spec.source:
            return []
        upto = (rec["after"][0] + 1) if rec.get("after") else len(rec.get("files", []))
        return [] if _files(self.spec)[:upto] == rec.get("files", [])[:upto] else ["dataset files"]

    def finished(self) -> dict | None:
        """The plan record ({"n_contexts", "fingerprint", ...}) once the plan is complete, else None."""
        return self._json(PLAN_FILE)

    def read(self, s: int) -> np.ndarray:
        """Shard `s`'s contexts, int32 [n, ctx_len]."""
        raw = self.loc.get(f"{PLAN_DIR}/contexts-{s:06d}.bin")
        if raw is None:
            raise StoreError(f"the plan of {self.loc.url} lacks shard {s}'s contexts although it is complete; the "
                             f"store's _plan was damaged: harvest to a new --out")
        return np.frombuffer(zstandard.ZstdDecompressor().decompress(raw), dtype=np.int32).reshape(-1, self.ctx_len)

    # -- building
    def ensure(self, spec: TextSpec, tokenizer, log: Callable[[str], None] = lambda m: None,
               poll_seconds: float = 0.5, progress: bool = False) -> dict:
        """The finished plan: read it, wait for the live planner, or build it (resuming a dead planner's work).
        `progress`: a bar with its ETA on stderr while building."""
        self.spec = spec
        waited = False
        while (done := self.finished()) is None:
            raw = self.loc.get(PLANNER_FILE)
            other = json.loads(raw) if raw else None
            if other and other["id"] != self.id and _is_live(other):
                if not waited:
                    log(f"waiting for the plan (contexts packed by {other['host']} pid {other['pid']})")
                    waited = True
                time.sleep(poll_seconds)
                continue
            self._heartbeat()
            time.sleep(SETTLE_SECONDS)  # two workers that both found no planner: the later record wins, the other waits
            raw = self.loc.get(PLANNER_FILE)
            if raw and json.loads(raw)["id"] != self.id:
                continue
            try:
                done = self._build(spec, tokenizer, progress)
            finally:
                try:
                    self.loc.fs.rm(self.loc.path(PLANNER_FILE))
                except FileNotFoundError:
                    pass
        return done

    def _heartbeat(self) -> None:
        if self.loc.get(meta_key(PLAN_DIR)) is None:
            self.loc.put_atomic(meta_key(PLAN_DIR), json.dumps(PLAN_NODE, indent=2).encode())
        rec = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        self.loc.put_atomic(PLANNER_FILE, json.dumps(rec).encode())

    def _put_contexts(self, s: int, contexts_CT: np.ndarray) -> None:
        data = zstandard.ZstdCompressor(level=3).compress(np.ascontiguousarray(contexts_CT, dtype=np.int32).tobytes())
        self.loc.put_atomic(f"{PLAN_DIR}/contexts-{s:06d}.bin", data)

    def _build(self, spec: TextSpec, tokenizer, progress: bool = False) -> dict:
        start, eos = special_ids(tokenizer, self.key["bos"])
        body = self.ctx_len - (1 if self.key["bos"] else 0)
        names = source_names(spec)
        state = self._json(STATE_FILE)
        if state is None:
            k, after, fp, n_docs, n_tok = 0, None, source_identity(spec), 0, 0
            stream = np.zeros(0, dtype=np.int32)
        else:  # resume a planner that stopped: its shards are written, its unconsumed tokens saved
            k, fp, n_docs, n_tok = state["shards"], state["fingerprint"], state["documents"], state["tokens"]
            after = tuple(state["after"]) if state["after"] is not None else None
            raw = self.loc.get(f"{PLAN_DIR}/{state['tail']}")
            if raw is None:
                raise StoreError(f"the plan checkpoint of {self.loc.url} names {state['tail']}, which is missing; "
                                 "harvest to a new --out")
            stream = np.frombuffer(raw, dtype=np.int32).copy()

        def cut(n_ctx: int) -> np.ndarray:
            nonlocal stream
            block = stream[: n_ctx * body].reshape(n_ctx, body)
            stream = stream[n_ctx * body:]
            if start is not None:
                block = np.concatenate([np.full((n_ctx, 1), start, dtype=np.int32), block], axis=1)
            return block

        tail = [eos] if eos is not None else []
        records = iter_records(spec, after) if k * self.per_shard < self.want else iter(())
        bar = tqdm(total=self.want, initial=min(self.want, k * self.per_shard), desc="plan: tokenize into contexts",
                   unit="ctx", disable=not progress, smoothing=0.1)
        while k * self.per_shard < self.want:
            need = (self.want - k * self.per_shard) * body - len(stream)  # stream tokens still wanted
            if not (batch := _take(records, BATCH_DOCS, CHARS_PER_TOKEN_CAP * need)):
                break
            texts = [t for _, t in batch if t]
            ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                            verbose=False)["input_ids"] if texts else []
            lengths = iter([len(x) + len(tail) for x in ids])
            used, got = len(batch), 0
            for j, (_, text) in enumerate(batch):  # stop at the document that completes the last context
                got += next(lengths) if text else 0
                if got >= need:
                    used = j + 1
                    break
            n_used = sum(1 for _, t in batch[:used] if t)
            count = sum(len(x) + len(tail) for x in ids[:n_used])
            flat = np.fromiter(itertools.chain.from_iterable(x + tail for x in ids[:n_used]), dtype=np.int32,
                               count=count)
            stream = np.concatenate([stream, flat])
            fp = chain_fingerprint(fp, names, batch[:used])
            n_docs, n_tok, after = n_docs + used, n_tok + count, batch[used - 1][0]
            k0 = k
            while k * self.per_shard < self.want:
                n_ctx = min(self.per_shard, self.want - k * self.per_shard)
                if len(stream) < n_ctx * body:
                    break
                self._put_contexts(k, cut(n_ctx))
                k += 1
            if k > k0 and k * self.per_shard < self.want:
                self._checkpoint(k, after, fp, n_docs, n_tok, stream)
            bar.update(min(self.want, k * self.per_shard + len(stream) // body) - bar.n)
        bar.close()
        n_contexts = min(self.want, k * self.per_shard)
        if k * self.per_shard < self.want and len(stream) >= body:  # the text ran out: a last, partial shard
            n_last = len(stream) // body
            self._put_contexts(k, cut(n_last))
            n_contexts += n_last
        if n_contexts == 0:
            raise DataError(f"dataset {spec.source} yields no complete context of {self.ctx_len} tokens ({n_tok} "
                            "tokens in all); use more text or a smaller --ctx-len")
        done = {"key": self.key, "n_contexts": n_contexts, "fingerprint": fp, "documents": n_docs, "tokens": n_tok,
                "source": spec.source, "files": _files(spec), "after": list(after) if after else None,
                "last_document": [names[after[0]], after[1]] if after else None}
        self.loc.put_atomic(PLAN_FILE, json.dumps(done, sort_keys=True, indent=1).encode())
        return done

    def _checkpoint(self, k: int, after, fp: str, n_docs: int, n_tok: int, stream: np.ndarray) -> None:
        tail = f"tail-{k:06d}.bin"
        self.loc.put_atomic(f"{PLAN_DIR}/{tail}", stream.astype(np.int32).tobytes())
        old = self.loc.get(STATE_FILE)
        state = {"key": self.key, "shards": k, "after": list(after) if after else None, "fingerprint": fp,
                 "source": self.spec.source if self.spec else None, "files": _files(self.spec) if self.spec else [],
                 "documents": n_docs, "tokens": n_tok, "tail": tail}
        self.loc.put_atomic(STATE_FILE, json.dumps(state, sort_keys=True, indent=1).encode())
        if old is not None and (prev := json.loads(old).get("tail")) not in (None, tail):
            try:
                self.loc.fs.rm(self.loc.path(f"{PLAN_DIR}/{prev}"))
            except FileNotFoundError:
                pass
        self._heartbeat()


def _take(records, max_docs: int, max_chars: int) -> list:
    """The next batch: up to `max_docs` records, fewer once they hold `max_chars` characters (at least one record),
    so the reading stops near the document that completes the last context instead of a whole batch past it."""
    batch, chars = [], 0
    for rec in records:
        batch.append(rec)
        chars += len(rec[1])
        if len(batch) >= max_docs or chars >= max_chars:
            break
    return batch


def _is_live(rec: dict) -> bool:
    """A planner record's process is running (same host: by pid) or checkpointed recently (another host); this
    process's own record is from a planner that stopped."""
    own = rec["host"] == socket.gethostname() and rec["pid"] == os.getpid()
    return not own and process_is_live(rec, PLAN_LEASE_SECONDS)
