"""A store's I/O, once: `Location` (a store root, local directory or fsspec URL, with the few object operations the
store needs), the one atomic write (`write_atomic`, `Location.put`), the one checksum (`checksum`, `check_object`) and
the one URL redaction (`redact_url`). Stores at fsspec URLs (s3://, gs://, hf://, memory://, …): filesystems open
with an install hint when the backend package is missing, and backend exceptions become one-line `StoreError`s.

fsspec and its backends (s3fs, gcsfs, huggingface_hub) do the transport. What they do not give is an error a user can
act on: botocore raises `NoCredentialsError`, aiohttp `ClientConnectorError`, s3fs maps `AccessDenied` to
`PermissionError` — each with a long traceback. `remote_errors` maps them to what to do. Credentials come from the
backend's usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, …) or from storage options;
they are never written anywhere by saecache: `redact_url` strips any user info and query string (which may carry a
token) before a URL is shown or recorded.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import crc32c
import fsspec
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
import zarr
from zarr.storage import WrapperStore

from saecache.errors import StoreError

# protocol -> (package fsspec needs, install hint)
BACKENDS = {
    "s3": ("s3fs", "pip install 'saecache[s3]'"),
    "s3a": ("s3fs", "pip install 'saecache[s3]'"),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "hf": ("huggingface_hub", "pip install huggingface_hub"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
}

_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                   "CredentialRetrievalError")
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError",
                "ConnectionRefusedError", "ConnectionResetError", "gaierror", "ReadTimeoutError")
_DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def redact_url(url: str) -> str:
    """The URL without user:password@ and without its query string or fragment (which may carry a token): what may
    be printed, logged or recorded in a store or a run dir. Local paths come back unchanged."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def open_filesystem(url: str, storage_options: dict | None = None, asynchronous: bool = False):
    """(fsspec filesystem, root path) for a URL; a missing backend package is a StoreError with the install hint."""
    opts = dict(storage_options or {})
    if asynchronous:
        opts["asynchronous"] = True
    try:
        fs, root = fsspec.core.url_to_fs(url, **opts)
    except ImportError as e:
        package, hint = BACKENDS.get(protocol(url), ("an fsspec backend", "pip install the fsspec backend"))
        raise StoreError(f"store {redact_url(url)} needs the {package} package, which is not installed: {hint}") from e
    except ValueError as e:  # unknown protocol
        raise StoreError(f"cannot open store {redact_url(url)}: {e}") from e
    return fs, root.rstrip("/")


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def describe_error(e: BaseException, url: str, action: str) -> str | None:
    """One line saying what went wrong with a remote store and what to do; None if `e` is not a storage problem."""
    url = redact_url(url)
    chain = _chain(e)
    names = {type(x).__name__ for x in chain}
    text = " ".join(str(x) for x in chain)
    if names & set(_NO_CREDENTIALS):
        return (f"no credentials for {url} while {action}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the "
                "backend's usual variables), or pass -S key=… -S secret=…; -S anon=true reads public buckets")
    if names & set(_UNREACHABLE) or any(isinstance(x, OSError) and x.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH,
                                                                                 errno.ENETUNREACH) for x in chain):
        return (f"cannot reach the storage endpoint of {url} while {action} ({_first_line(chain[-1])}); check "
                "AWS_ENDPOINT_URL or -S endpoint_url=…, and that the server is up")
    if any(isinstance(x, PermissionError) for x in chain) or any(d in text for d in _DENIED):
        return (f"permission denied while {action} {url}: the credentials in use may not do this "
                f"({_first_line(chain[0])})")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return f"bucket of {url} does not exist while {action}; create it first or fix the URL"
    return None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


@contextmanager
def remote_errors(url: str, action: str):
    """Re-raise storage failures of a remote store as one-line StoreErrors; anything else passes through."""
    try:
        yield
    except StoreError:
        raise
    except Exception as e:
        msg = describe_error(e, url, action)
        if msg is None:
            raise
        raise StoreError(msg) from e


def probe_writable(fs, root: str, url: str) -> None:
    """Write (and remove) one tiny object under `root` so that missing write permission fails before any work."""
    key = f"{root}/.saecache-probe-{uuid.uuid4().hex}"
    with remote_errors(url, "writing to"):
        fs.pipe_file(key, b"probe")
    try:
        fs.rm(key)
    except Exception:  # a store writable but not deletable is still usable; the probe object is harmless
        pass


class ErrorTranslatingStore(WrapperStore):
    """A zarr store whose backend failures surface as one-line StoreErrors naming the URL and the key."""

    def __init__(self, store, url: str = ""):
        super().__init__(store)
        self._url = url

    def _with_store(self, store):
        return type(self)(store, self._url)

    async def get(self, key, prototype, byte_range=None):
        with remote_errors(self._url, f"reading {key} of"):
            return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges: Iterable):
        with remote_errors(self._url, "reading"):
            return await self._store.get_partial_values(prototype, key_ranges)

    async def exists(self, key):
        with remote_errors(self._url, f"looking up {key} in"):
            return await self._store.exists(key)

    async def set(self, key, value):
        with remote_errors(self._url, f"writing {key} to"):
            await self._store.set(key, value)

    async def delete(self, key):
        with remote_errors(self._url, f"deleting {key} from"):
            await self._store.delete(key)


# ------------------------------------------------------------------------------------- store roots (local or URL)


def checksum(data: bytes) -> dict:
    """An object's manifest checksum: {"nbytes", "crc32c"}."""
    return {"nbytes": len(data), "crc32c": crc32c.crc32c(data)}


def check_object(key: str, data: bytes | None, want: dict) -> str | None:
    """None when object `key` (None: missing) has the manifest checksum `want`, else what is wrong with it (one
    phrase, for `verify` and the one-line errors of the readers)."""
    if data is None:
        return f"object {key} is missing"
    got = checksum(data)
    if got != {"nbytes": want["nbytes"], "crc32c": want["crc32c"]}:
        return (f"object {key} is corrupt (crc32c {got['crc32c']} != {want['crc32c']}, {got['nbytes']} vs "
                f"{want['nbytes']} bytes)")
    return None


def write_atomic(path: str, parts: bytes | Iterable[bytes], fsync: bool = False) -> dict:
    """Write a local file from its bytes (or parts, each written as it comes) to a temporary name beside it, then
    rename: readers see the old file or the whole new one, never part of it; a failure leaves no temporary file.
    Returns the checksum of what was written (computed as it is written, never read back)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    crc, nbytes = 0, 0
    try:
        with open(tmp, "wb") as f:
            for p in [parts] if isinstance(parts, (bytes, bytearray, memoryview)) else parts:
                crc, nbytes = crc32c.crc32c(p, value=crc), nbytes + len(p)
                f.write(p)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"nbytes": nbytes, "crc32c": crc}


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class Location:
    """A store root: the zarr store object plus an fsspec filesystem for the non-zarr files.

    A writable remote location is probed with one tiny PUT when it is made, so missing write permission fails
    before any work; a read-only one never writes."""

    def __init__(self, url: str, storage_options: dict | None = None, read_only: bool = True):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.read_only = read_only
        if _is_local(url):
            self.local = True
            self.root = os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)
            self.fs = fsspec.filesystem("file")
        else:
            self.local = False
            self.fs, self.root = open_filesystem(url, self.storage_options)
            if not read_only:
                probe_writable(self.fs, self.root, url)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def zarr_store(self):
        """The zarr store of the root (plain zarr: the writer creates the arrays with it, and the compatibility tests
        read through it); remote backend errors become one-line StoreErrors."""
        if self.local:
            return zarr.storage.LocalStore(self.root, read_only=self.read_only)
        fs, root = open_filesystem(self.url, self.storage_options, asynchronous=True)  # zarr runs its own loop
        inner = zarr.storage.FsspecStore(fs if fs.async_impl else _async_wrap(fs), path=root, read_only=self.read_only)
        return ErrorTranslatingStore(inner, self.url)

    def get(self, key: str) -> bytes | None:
        try:
            with remote_errors(self.url, f"reading {key} of"):
                return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            return None

    def put(self, key: str, parts: bytes | Iterable[bytes], fsync: bool = False) -> dict:
        """Write object `key` atomically (locally `write_atomic`; elsewhere one PUT, atomic on object stores) from
        its bytes or parts; returns its manifest checksum."""
        if self.local:
            return write_atomic(self.path(key), parts, fsync)
        data = parts if isinstance(parts, bytes) else b"".join(parts)
        with remote_errors(self.url, f"writing {key} to"):
            self.fs.pipe_file(self.path(key), data)
        return checksum(data)

    def put_atomic(self, key: str, data: bytes) -> None:
        """A bookkeeping record or metadata object, flushed to disk before it is renamed into place."""
        self.put(key, data, fsync=True)

    def list(self, prefix: str) -> list[str]:
        """Names (not paths) of the files directly under `prefix`."""
        if not self.local:
            self.fs.invalidate_cache()
        try:
            with remote_errors(self.url, f"listing {prefix} of"):
                entries = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(e.rstrip("/")) for e in entries)

    def sizes(self) -> dict[str, int]:
        """Byte size of every object under the root, by key (one recursive listing)."""
        if not self.local:
            self.fs.invalidate_cache()
        try:
            with remote_errors(self.url, "listing"):
                found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        return {p[len(root):]: int(d.get("size") or 0) for p, d in found.items() if p.startswith(root)}


def _async_wrap(fs):
    return AsyncFileSystemWrapper(fs, asynchronous=True)
