"""Stores at fsspec URLs (s3://, gs://, hf://, memory://, …): opening filesystems with an install hint when the
backend package is missing, turning backend exceptions into one-line `StoreError`s, and a zarr store wrapper that
does the same for zarr's own reads and writes.

fsspec and its backends (s3fs, gcsfs, huggingface_hub) do the transport. What they do not give is an error a user can
act on: botocore raises `NoCredentialsError`, aiohttp `ClientConnectorError`, s3fs maps `AccessDenied` to
`PermissionError` — each with a long traceback. `remote_errors` maps them to what to do. Credentials come from the
backend's usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, …) or from storage options;
they are never written anywhere by saecache: `safe_url` strips any user info before a URL is recorded.
"""

from __future__ import annotations

import errno
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

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

_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "CredentialRetrievalError")
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError",
                "ConnectionRefusedError", "ConnectionResetError", "gaierror", "ReadTimeoutError")
_DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def safe_url(url: str) -> str:
    """The URL without any user:password@ part: what may be printed, logged or recorded in a run dir."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def open_filesystem(url: str, storage_options: dict | None = None, asynchronous: bool = False):
    """(fsspec filesystem, root path) for a URL; a missing backend package becomes a StoreError with the install hint."""
    import fsspec

    opts = dict(storage_options or {})
    if asynchronous:
        opts["asynchronous"] = True
    try:
        fs, root = fsspec.core.url_to_fs(url, **opts)
    except ImportError as e:
        package, hint = BACKENDS.get(protocol(url), ("an fsspec backend", "pip install the fsspec backend"))
        raise StoreError(f"store {safe_url(url)} needs the {package} package, which is not installed: {hint}") from e
    except ValueError as e:  # unknown protocol
        raise StoreError(f"cannot open store {safe_url(url)}: {e}") from e
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
    url = safe_url(url)
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
