"""Text input for harvesting: documents from files, local or Hub datasets, and their packing into fixed contexts.

Sources (`TextSpec.source`):
- files: a path or glob (`**` allowed), or several separated by commas; globs expand sorted. `.jsonl` (Pile format:
  one JSON object per line with a text field), `.json` (JSON lines, or one array of objects), `.txt` (one document
  per file), each optionally compressed as `.zst` (needs `zstandard`) or `.gz`.
- a local directory: written by `Dataset.save_to_disk` (loaded with `datasets.load_from_disk`) or holding data files
  (`datasets.load_dataset(dir, streaming=True)`).
- anything else that looks like `name` or `owner/name`: a Hugging Face Hub dataset, streamed with `datasets`.

Local JSON-lines files are read here with `json` + `zstandard` rather than through `datasets.load_dataset("json")`:
that keeps errors exact (file and line, the fields a record does have), reads nothing past the point where the
caller stops, converts nothing to Arrow and writes no cache directory. The document stream is the same.

Packing policy (recorded in the store as `bos_policy`, see `packing_policy`): every non-empty document is tokenized
without special tokens and followed by the EOS token (when the tokenizer has one); the documents are concatenated
into one stream in order and cut into contexts of `ctx_len` tokens. With `bos=True` each context is `[BOS]` followed
by the next `ctx_len - 1` stream tokens (BOS = the tokenizer's BOS id, else its EOS id); with `bos=False` it is the
next `ctx_len` stream tokens. The final partial context is dropped. Documents therefore span context boundaries.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from saecache.errors import ConfigError, DataError

FILE_KINDS = (".jsonl", ".json", ".txt")
COMPRESSIONS = ("", ".zst", ".gz")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
MAX_RECORD_CHARS = 1 << 26
"""Longest record (document line, .txt file, JSON array file) read, in characters: a longer one is refused in one
line naming the file and line, in bounded memory, instead of being read whole (the Pile's longest documents are a
few MB)."""


@dataclass(frozen=True)
class TextSpec:
    """Where the documents come from."""

    source: str
    """Path(s)/glob(s) of .jsonl/.jsonl.zst/.json/.txt files (comma-separated), a local dataset dir, or a Hub name."""
    text_field: str = "text"
    """Field of each record holding the document text (ignored for .txt files)."""
    split: str = "train"
    """Dataset split (datasets sources only)."""
    name: str | None = None
    """Dataset config name (datasets sources only)."""
    revision: str | None = None
    """Hub dataset revision (Hub sources only); part of the fingerprint."""


# ---- resolving the source ----

def _kind(path: str) -> tuple[str, str] | None:
    """(base kind, compression) from the file name, or None when the extension is not supported."""
    for comp in COMPRESSIONS:
        for kind in FILE_KINDS:
            if path.endswith(kind + comp):
                return kind, comp
    return None


def resolve_source(spec: TextSpec) -> tuple[str, list[str]]:
    """What `spec.source` names: ("files", the matched files, sorted per glob) | ("disk", [a saved dataset's dir]) |
    ("dir", [a dataset directory]) | ("hub", [a Hub name]). DataError when nothing matches."""
    src = spec.source.strip()
    parts = [src] if os.path.exists(os.path.expanduser(src)) else [p.strip() for p in src.split(",") if p.strip()]
    if not parts:
        raise DataError("empty text source: give a file, a glob, a dataset directory or a Hub dataset name")
    if len(parts) == 1 and os.path.isdir(os.path.expanduser(parts[0])):
        d = os.path.expanduser(parts[0])
        is_saved = any(os.path.exists(os.path.join(d, f)) for f in ("state.json", "dataset_dict.json"))
        return ("disk" if is_saved else "dir"), [d]
    if len(parts) == 1 and not glob.has_magic(parts[0]) and not os.path.exists(parts[0]) \
            and _kind(parts[0]) is None and _HUB_NAME.fullmatch(parts[0]):
        return "hub", [parts[0]]
    files: list[str] = []
    for part in parts:
        part = os.path.expanduser(part)
        matched = sorted(glob.glob(part, recursive=True)) if glob.has_magic(part) else [part]
        matched = [f for f in matched if os.path.isfile(f)]
        if not matched:
            raise DataError(f"no files match {part!r}: check the path or glob (text source {spec.source!r})")
        files.extend(matched)
    bad = [f for f in files if _kind(f) is None]
    if bad:
        raise DataError(f"unsupported text file {bad[0]!r}: use .jsonl, .json or .txt, optionally .zst/.gz compressed")
    return "files", list(dict.fromkeys(files))


# ---- reading files ----

def _open_text(path: str, comp: str) -> io.TextIOBase:
    if comp == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path!r} is zstd-compressed but `zstandard` is not installed: pip install zstandard") \
                from None
        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8")
    if comp == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _text_of(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        raise DataError(f"{where}: no field {field!r} (fields present: {', '.join(map(str, record)) or 'none'}); "
                        f"pick one with --text-field")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} holds {type(text).__name__}, not text")
    return text


def _bounded(text: str, path: str, where: str) -> str:
    if len(text) > MAX_RECORD_CHARS:
        raise DataError(f"{path}{where}: a record longer than {MAX_RECORD_CHARS >> 20} Mi characters (a truncated "
                        "download, or a binary file the glob caught?); remove the file from --dataset or split the record")
    return text


def _lines(f, path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) with each line read in bounded memory: a longer line is a one-line DataError."""
    lineno = 0
    while line := f.readline(MAX_RECORD_CHARS + 1):
        lineno += 1
        if len(line) > MAX_RECORD_CHARS and not line.endswith("\n"):
            _bounded(line, path, f":{lineno}")
        yield lineno, line


def _iter_records(f, path: str, kind: str, field: str, after: int = -1) -> Iterator[tuple[int, str]]:
    """(record number, text) of one open file: line numbers for JSON lines, item numbers for a JSON array, 0 for a
    .txt file. Records numbered `after` or lower are skipped without being parsed."""
    if kind == ".txt":
        if after < 0:
            yield 0, _bounded(f.read(MAX_RECORD_CHARS + 1), path, "")
        return
    first = ""
    if kind == ".json":  # JSON lines, or one array of objects
        while (c := f.read(1)) and c.isspace():
            pass
        if c == "[":
            items = json.loads(c + _bounded(f.read(MAX_RECORD_CHARS + 1), path, " (one JSON array)"))
            for j, rec in enumerate(items):
                if j > after:
                    yield j, _text_of(rec, field, f"{path} item {j}")
            return
        first = c
    for lineno, line in _lines(f, path):
        if first:
            line, first = first + line, ""
        if lineno > after and line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one object per line") from None
            yield lineno, _text_of(rec, field, f"{path}:{lineno}")


def _iter_file(path: str, field: str, after: int = -1) -> Iterator[tuple[int, str]]:
    kind, comp = _kind(path)
    try:
        with _open_text(path, comp) as f:
            yield from _iter_records(f, path, kind, field, after)
    except (OSError, UnicodeDecodeError, EOFError, json.JSONDecodeError) as e:  # ZstdError: below
        raise DataError(f"cannot read {path!r} ({type(e).__name__}: {_first_line(e)}): check that it is a readable "
                        f"UTF-8 {kind}{comp} file") from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise DataError(f"cannot read {path!r}: corrupt zstd data ({_first_line(e)})") from None
        raise


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else ""


# ---- datasets sources ----

def _load_datasets(kind: str, target: str, spec: TextSpec):
    import datasets

    try:
        if kind == "disk":
            ds = datasets.load_from_disk(target)
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise DataError(f"dataset {target!r} has no split {spec.split!r} (splits: {', '.join(ds)})")
                ds = ds[spec.split]
            return ds
        return datasets.load_dataset(target, name=spec.name, split=spec.split, streaming=True,
                                     revision=spec.revision if kind == "hub" else None)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ValueError, ...)
        first = _first_line(e)
        where = "local dataset directory" if kind != "hub" else "dataset"
        hint = ("check the directory" if kind != "hub" else "it is not a local path, and the Hub is unreachable or "
                "has no such dataset/config/split; pass local files or connect to the Hub")
        raise DataError(f"cannot load {where} {target!r} (split {spec.split!r}): {type(e).__name__}: {first}; {hint}") \
            from None


def _iter_dataset(ds, spec: TextSpec, target: str, after: int = -1) -> Iterator[tuple[int, str]]:
    for j, rec in enumerate(ds):
        if j > after:
            yield j, _text_of(rec, spec.text_field, f"dataset {target!r} row {j}")


def source_names(spec: TextSpec) -> list[str]:
    """The source's parts as the fingerprint names them: matched files relative to their common directory, or the
    one dataset directory / Hub name."""
    kind, targets = resolve_source(spec)
    if kind != "files":
        return [os.path.basename(targets[0].rstrip("/")) if kind != "hub" else targets[0]]
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in targets])
    return [os.path.relpath(os.path.abspath(f), root) for f in targets]


def iter_records(spec: TextSpec, after: tuple[int, int] | None = None) -> Iterator[tuple[tuple[int, int], str]]:
    """((part, record), text) for every document of `spec` in a deterministic order (files sorted, records in file
    order; `part` indexes `source_names(spec)`). `after`: resume after that position; files before it are not
    opened, records before it in its file are skipped unparsed. DataError when the source holds no documents."""
    kind, targets = resolve_source(spec)
    f0, r0 = after if after is not None else (0, -1)
    n = 0
    if kind == "files":
        parts = ((i, _iter_file(f, spec.text_field, r0 if i == f0 else -1)) for i, f in enumerate(targets) if i >= f0)
    else:
        parts = iter([(0, _iter_dataset(_load_datasets(kind, targets[0], spec), spec, targets[0], r0))])
    for i, records in parts:
        for r, text in records:
            n += 1
            yield (i, r), text
    if n == 0 and after is None:
        raise DataError(f"text source {spec.source!r} holds no documents")


def iter_documents(spec: TextSpec) -> Iterator[str]:
    """The documents of `spec` in a deterministic order (files sorted, records in file order)."""
    return (text for _, text in iter_records(spec))


def source_identity(spec: TextSpec) -> str:
    """The start of the dataset fingerprint: what names the source besides its bytes (Hub name, config, split and
    revision; split and config of a local dataset directory; nothing more for files)."""
    kind, targets = resolve_source(spec)
    ident = {"kind": kind}
    if kind == "hub":
        ident.update(hub=targets[0], name=spec.name, split=spec.split, revision=spec.revision)
    elif kind != "files":
        ident.update(split=spec.split, name=spec.name)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def chain_fingerprint(state: str, names: list[str], docs: Iterable[tuple[tuple[int, int], str]]) -> str:
    """Extend the fingerprint `state` (hex) by consumed documents, one sha256 link per document over the previous
    link, the document's source name, record number and UTF-8 text: the same value however the documents were
    batched, and a resumed harvest continues from a saved link."""
    for (part, rec), text in docs:
        data = text.encode("utf-8", "surrogatepass")
        h = hashlib.sha256(bytes.fromhex(state))
        h.update(f"{names[part]}\0{rec}\0{len(data)}\0".encode())
        h.update(data)
        state = h.hexdigest()
    return state


def fingerprint(spec: TextSpec, docs: Iterable[tuple[tuple[int, int], str]] | None = None) -> str:
    """The dataset fingerprint of the documents `docs` (default: every document of `spec`) as a harvest records it:
    `source_identity` extended by `chain_fingerprint`. A harvest passes exactly the documents it consumed."""
    items = iter_records(spec) if docs is None else docs
    return chain_fingerprint(source_identity(spec), source_names(spec), items)


# ---- packing ----

def special_ids(tokenizer, bos: bool) -> tuple[int | None, int | None]:
    """(the id that starts each context, None without BOS; the id that ends each document, None when the tokenizer
    has no EOS). A tokenizer without a BOS token starts contexts with its EOS."""
    eos = tokenizer.eos_token_id
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if bos and start is None:
        raise ConfigError("bos=True but the tokenizer has neither a BOS nor an EOS token: pack without BOS")
    return (start if bos else None), eos


def packing_policy(tokenizer, bos: bool) -> str:
    """The packing policy as one line, with the actual ids: the store header's `bos_policy`."""
    start, eos = special_ids(tokenizer, bos)
    sep = f"followed by EOS id {eos}" if eos is not None else "with no separator (tokenizer has no EOS)"
    head = f"[BOS id {start}] + ctx_len-1 stream tokens" if bos else "ctx_len stream tokens (no BOS)"
    return (f"non-empty documents tokenized without special tokens, each {sep}, concatenated in order; "
            f"contexts = {head}; final partial context dropped")


def iter_contexts(docs: Iterable[str], tokenizer, ctx_len: int, bos: bool = True,
                  batch_docs: int = 256) -> Iterator[np.ndarray]:
    """Yield blocks of packed contexts, int32 [c, ctx_len] (c >= 1), following the packing policy; reads `docs`
    lazily, `batch_docs` documents per fast-tokenizer call. DataError if the text holds less than one context."""
    start, eos = special_ids(tokenizer, bos)
    body = ctx_len - (1 if bos else 0)
    if body < 1:
        raise ConfigError(f"ctx_len {ctx_len} is too small: need at least {2 if bos else 1}")
    carry = np.zeros(0, dtype=np.int32)
    n_tokens, n_contexts = 0, 0
    it = iter(docs)
    while raw := list(itertools.islice(it, batch_docs)):
        batch = [d for d in raw if d]
        if not batch:
            continue
        ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        tail = [eos] if eos is not None else []
        count = sum(len(x) for x in ids) + len(tail) * len(ids)
        flat = np.fromiter(itertools.chain.from_iterable(x + tail for x in ids), dtype=np.int32, count=count)
        stream = np.concatenate([carry, flat])
        n_tokens += count
        n = len(stream) // body
        if n:
            block = stream[: n * body].reshape(n, body)
            if bos:
                block = np.concatenate([np.full((n, 1), start, dtype=np.int32), block], axis=1)
            n_contexts += n
            yield block
        carry = stream[n * body:]
    if n_contexts == 0:
        raise DataError(f"the text holds {n_tokens} tokens, fewer than one context of {ctx_len} "
                        f"({body} text tokens{' + BOS' if bos else ''}): give more text or a smaller --ctx-len")


def pack_contexts(docs: Iterable[str], tokenizer, ctx_len: int, bos: bool = True, max_contexts: int | None = None,
                  batch_docs: int = 256) -> np.ndarray:
    """All packed contexts, int32 [C, ctx_len]; stops reading `docs` once `max_contexts` are made."""
    if max_contexts is not None and max_contexts < 1:
        raise ConfigError(f"max_contexts must be >= 1, got {max_contexts}")
    blocks, have = [], 0
    for block in iter_contexts(docs, tokenizer, ctx_len, bos=bos, batch_docs=batch_docs):
        blocks.append(block)
        have += len(block)
        if max_contexts is not None and have >= max_contexts:
            break
    return np.ascontiguousarray(np.concatenate(blocks)[:max_contexts])

