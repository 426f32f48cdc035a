"""Build a local corpus in The Pile's format from real text already on the machine.

The Pile ships as `*.jsonl.zst` files whose lines are `{"text": ..., "meta": {"pile_set_name": ...}}`. Offline we cannot
download it, so this recipe writes the same format from text every Python installation has (the standard library's
sources), plus the Python documentation and `/usr/share/doc` READMEs when installed. A larger corpus, for benches
that need tens of millions of unique tokens (bench/bench_long.py), adds the `sitepackages` source when asked: the
.py/.md/.rst/.txt files of the installed third-party packages (the interpreter's site-packages, some hundreds of MB
where torch and transformers are installed); the default sources, and so the demo's corpus, leave it out. The set
names are our own (`PythonStdlib`, `PythonDocs`, `UsrShareDoc`, `PythonSitePackages`); they do not pretend to be Pile
subsets. Everything is deterministic: the same machine (the same installed packages) and arguments give the same
bytes. Written by hand because it is only file walking + `zstandard`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import zstandard

from saecache.errors import ConfigError, DataError

SET_NAMES = {"stdlib": "PythonStdlib", "pydocs": "PythonDocs", "usrsharedoc": "UsrShareDoc",
             "sitepackages": "PythonSitePackages"}
"""Source key -> the `pile_set_name` written in each line's meta."""
DEFAULT_SOURCES = ("stdlib", "pydocs", "usrsharedoc")
"""The sources of the demo's corpus; `sitepackages` only when asked (`include`)."""

_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "lib-dynload", "test", "tests", "idlelib", "__pycache__"}
_SITE_SUFFIXES = {".py", ".md", ".rst", ".txt"}
_SKIP_SITE_DIRS = {"test", "tests", "testing", "__pycache__"}  # and every *.dist-info / *.egg-info (licence copies)
_MAX_DOC_BYTES = 1_000_000  # one huge generated file (e.g. pydoc topics) would otherwise dominate a small corpus
_ZSTD_LEVEL = 3

Doc = tuple[str, str, str]
"""(set_name, doc_id, text); doc_id is a path relative to its source root, stable across machines."""


def _read_text(path: Path) -> str | None:
    """The file's text, or None for unreadable, binary or non-UTF-8 files."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\x00" in raw or not raw.strip() or len(raw) > _MAX_DOC_BYTES:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _stdlib_files(packages: Sequence[str] | None) -> Iterator[tuple[Path, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    tops = [root / p for p in packages] if packages else [root]
    for top in tops:
        if top.is_file():
            yield root, top
            continue
        if not top.is_dir():
            raise DataError(f"standard-library package {top.name!r} not found under the stdlib directory")
        for path in sorted(top.rglob("*.py")):
            rel = path.relative_to(root)
            if _SKIP_STDLIB_DIRS.isdisjoint(rel.parts[:-1]):
                yield root, path


def _pydocs_files() -> Iterator[tuple[Path, Path]]:
    """reST sources of the Python docs (Debian's `pythonX.Y-doc` package)."""
    for doc_dir in sorted(Path("/usr/share/doc").glob("python3*-doc")):
        src = doc_dir / "html" / "_sources"
        if src.is_dir():
            for path in sorted(src.rglob("*.txt")):
                yield src, path
            return  # one Python version's docs is enough; several would mostly duplicate each other


def _usrsharedoc_files() -> Iterator[tuple[Path, Path]]:
    root = Path("/usr/share/doc")
    if not root.is_dir():
        return
    for path in sorted(root.glob("*/*")):
        name = path.name.upper()
        if path.is_file() and not path.is_symlink() and (name.startswith("README") or name.startswith("NEWS")):
            yield root, path


def _sitepackages_files() -> Iterator[tuple[Path, Path]]:
    """Text of the installed third-party packages: .py/.md/.rst/.txt under site-packages, without tests, caches and
    the packaging metadata (*.dist-info, *.egg-info: mostly copies of the same licences)."""
    paths = sysconfig.get_paths()
    for root in sorted({Path(paths["purelib"]), Path(paths["platlib"])}):
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            dirs = rel.parts[:-1]
            if (path.suffix in _SITE_SUFFIXES and _SKIP_SITE_DIRS.isdisjoint(dirs)
                    and not any(d.endswith((".dist-info", ".egg-info")) for d in dirs)
                    and path.is_file() and not path.is_symlink()):
                yield root, path


def collect_sources(
    max_bytes: int | None = None,
    include: Sequence[str] = DEFAULT_SOURCES,
    stdlib_packages: Sequence[str] | None = None,
) -> list[Doc]:
    """Documents from the chosen sources, sorted by (set_name, doc_id).

    `stdlib_packages` restricts the stdlib source to some packages (e.g. `("json", "email")`); default all, without
    tests and site-packages. With `max_bytes`, documents are picked in a deterministic pseudo-random order (a hash of
    the doc id) until the UTF-8 size budget is used, so a small budget still mixes all sources.
    """
    unknown = set(include) - set(SET_NAMES)
    if unknown:
        raise ConfigError(f"unknown corpus source(s) {sorted(unknown)}; choose from {sorted(SET_NAMES)}")
    walkers = {"stdlib": lambda: _stdlib_files(stdlib_packages), "pydocs": _pydocs_files,
               "usrsharedoc": _usrsharedoc_files, "sitepackages": _sitepackages_files}
    docs: list[Doc] = []
    for key in include:
        for root, path in walkers[key]():
            text = _read_text(path)
            if text is not None:
                docs.append((SET_NAMES[key], path.relative_to(root).as_posix(), text))
    docs.sort(key=lambda d: (d[0], d[1]))
    if not docs:
        raise DataError(f"no readable text found for sources {list(include)}")
    if max_bytes is not None:
        picked, used = [], 0
        for doc in sorted(docs, key=lambda d: _hash(f"pick:{d[0]}/{d[1]}")):
            size = len(doc[2].encode("utf-8"))
            if used + size > max_bytes and picked:
                continue
            picked.append(doc)
            used += size
            if used >= max_bytes:
                break
        docs = sorted(picked, key=lambda d: (d[0], d[1]))
    return docs


def _hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest()[:8], "big")


def write_pile_jsonl_zst(path: Path, docs: Iterable[Doc]) -> int:
    """Write docs as Pile-format lines into one zstd file (written to a temp name, then renamed). Returns text bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines, n_bytes = [], 0
    for set_name, _doc_id, text in docs:
        lines.append(json.dumps({"text": text, "meta": {"pile_set_name": set_name}}, ensure_ascii=False))
        n_bytes += len(text.encode("utf-8"))
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(payload))
    tmp.replace(path)
    return n_bytes


def read_pile_jsonl_zst(path: Path) -> Iterator[dict]:
    """Yield the JSON objects of a Pile-format `.jsonl.zst` (or plain `.jsonl`) file."""
    path = Path(path)
    with open(path, "rb") as raw:
        binary = zstandard.ZstdDecompressor().stream_reader(raw) if path.suffix == ".zst" else raw
        for line in io.TextIOWrapper(binary, encoding="utf-8"):
            if line.strip():
                yield json.loads(line)


def is_heldout(set_name: str, doc_id: str, fraction: float, seed: int) -> bool:
    """Whether a document belongs to the held-out split: a pure function of its id, so splits never overlap."""
    return _hash(f"{seed}:{set_name}/{doc_id}") < fraction * 2**64


def build_pile_corpus(
    out_dir: Path,
    max_bytes: int,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    include: Sequence[str] = DEFAULT_SOURCES,
    stdlib_packages: Sequence[str] | None = None,
) -> dict:
    """Write `train.jsonl.zst` and `val.jsonl.zst` under `out_dir`.

    Documents go to val by a hash of (seed, doc id), so the split is deterministic and disjoint. Inside each file the
    order is a seeded hash order, so sources are interleaved (a model trained on a prefix still sees every source).
    Returns {"train": path, "val": path, "docs": n, "bytes": n, "train_docs": n, "val_docs": n, "sets": {name: n}}.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    docs = collect_sources(max_bytes=max_bytes, include=include, stdlib_packages=stdlib_packages)
    order = sorted(docs, key=lambda d: _hash(f"order:{seed}:{d[0]}/{d[1]}"))
    val = [d for d in order if is_heldout(d[0], d[1], heldout_fraction, seed)]
    train = [d for d in order if not is_heldout(d[0], d[1], heldout_fraction, seed)]
    if not val or not train:
        raise DataError(f"{len(docs)} documents are too few for a held-out fraction of {heldout_fraction}")
    out_dir = Path(out_dir)
    n_bytes = write_pile_jsonl_zst(out_dir / "train.jsonl.zst", train)
    n_bytes += write_pile_jsonl_zst(out_dir / "val.jsonl.zst", val)
    sets: dict[str, int] = {}
    for d in docs:
        sets[d[0]] = sets.get(d[0], 0) + 1
    return {"train": out_dir / "train.jsonl.zst", "val": out_dir / "val.jsonl.zst", "docs": len(docs),
            "bytes": n_bytes, "train_docs": len(train), "val_docs": len(val), "sets": sets}
