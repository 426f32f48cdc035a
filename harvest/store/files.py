"""Bounded use of local files by the shard readers: one process-wide pool of open descriptors, and memory maps that
keep no descriptor.

A store of the seed's size has ~73,000 shard files, and 1,024 open files is a common limit (`ulimit -n`). `FilePool`
keeps a least-recently-used set of descriptors, capped well under RLIMIT_NOFILE, and never closes one a reader thread
is using. CPython's ``mmap`` keeps a duplicate of the file's descriptor open for the map's life, so `map_file` maps
with libc's mmap through ctypes (``trackfd=False`` from Python 3.13): a map then costs address space, not a
descriptor, and lives exactly as long as the arrays viewing it.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import resource
import sys
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np

from saecache.errors import StoreError


def default_max_open() -> int:
    """Descriptors the pool may keep: an eighth of the soft RLIMIT_NOFILE, between 4 and 128 (leaves the rest of
    the limit to zarr, fsspec, torch, the shard cache and the user's own code)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 128 if soft == resource.RLIM_INFINITY else max(4, min(128, soft // 8))


_OPENS = itertools.count()  # numbers each opening: what a reader read through an older one may be stale


class FilePool:
    """Read-only descriptors of local files, at most ``max_open`` kept open, least recently used closed first.

    Descriptors are kept per owner (a reader), so a reader opened after a file was replaced or removed never reads
    through another reader's older descriptor. Thread-safe: `acquire` pins a descriptor while the caller reads; a
    pinned descriptor is never closed under it (when every kept descriptor is pinned, the pool briefly holds one per
    reading thread beyond the cap)."""

    def __init__(self, max_open: int | None = None):
        self.max_open = max_open or default_max_open()
        # re-entrant: a reader collected while this thread holds the lock (a cycle, freed by the GC at any
        # allocation) runs its finalizer's `drop` on this thread, which with a plain Lock deadlocked
        self._lock = threading.RLock()
        self._open: OrderedDict[tuple, list[int]] = OrderedDict()  # (owner, path) -> [fd, pins, open id]

    def __len__(self) -> int:
        return len(self._open)

    def acquire(self, path: str, owner: object = None) -> list[int]:
        """Pin an open descriptor of ``path`` (FileNotFoundError if there is no such file): ``entry[0]`` is the
        descriptor, ``entry[2]`` a number unique to this opening of the file; give ``entry`` back with `release`."""
        key = (owner, path)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                self._shrink(self.max_open - 1)
                entry = self._open[key] = [self._os_open(path), 0, next(_OPENS)]
            self._open.move_to_end(key)
            entry[1] += 1
            return entry

    def release(self, path: str, entry: list[int], owner: object = None) -> None:
        with self._lock:
            entry[1] -= 1
            if entry[1] == 0 and self._open.get((owner, path)) is not entry:  # dropped from the pool while pinned
                os.close(entry[0])
            elif len(self._open) > self.max_open:
                self._shrink(self.max_open)

    @contextmanager
    def fd(self, path: str, owner: object = None):
        """An open descriptor of ``path`` for the block's duration (FileNotFoundError if there is no such file)."""
        entry = self.acquire(path, owner)
        try:
            yield entry[0]
        finally:
            self.release(path, entry, owner)

    def _os_open(self, path: str) -> int:
        """os.open; at the process's limit (EMFILE), close every unpinned descriptor and try once more (lock held)."""
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as e:
            if e.errno != errno.EMFILE:
                raise
        self._shrink(0)
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as e:
            if e.errno != errno.EMFILE:
                raise
            raise StoreError(f"too many open files in this process (RLIMIT_NOFILE "
                             f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}) while opening {path}; raise "
                             "`ulimit -n`") from None

    def _shrink(self, keep: int, select=None) -> None:
        """Close least recently used descriptors until at most ``keep`` remain (lock held): unpinned ones, or every
        one ``select(key)`` picks (a pinned one is then closed by its last `release`)."""
        for key in list(self._open):
            if len(self._open) <= max(keep, 0):
                break
            entry = self._open.get(key)  # None: dropped meanwhile by a finalizer on this thread
            if entry is not None and (select(key) if select else entry[1] == 0):
                del self._open[key]
                if entry[1] == 0:
                    os.close(entry[0])

    def forget(self, path: str) -> None:
        """Stop using every descriptor of ``path`` (the file was removed or replaced)."""
        with self._lock:
            self._shrink(0, lambda key: key[1] == path)

    def drop(self, owner: object) -> None:
        """Close the descriptors of ``owner`` (a reader that is closed or gone)."""
        with self._lock:
            self._shrink(0, lambda key: key[0] == owner)

    def close(self) -> None:
        with self._lock:
            self._shrink(0)


_POOL: FilePool | None = None
_POOL_LOCK = threading.Lock()


def default_pool() -> FilePool:
    """The process-wide pool every shard reader shares (so the cap holds across arrays, hooks and stores)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = FilePool()
        return _POOL


def _libc_mmap():
    if sys.platform not in ("linux", "darwin"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc_mmap() if sys.version_info < (3, 13) else None


def map_file(fd: int, size: int) -> np.ndarray:
    """The first ``size`` bytes of an open file as a private (copy-on-write) mapping, ``uint8 [size]``, that keeps
    no file descriptor: it lives as long as the returned array or any view of it."""
    prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE
    if sys.version_info >= (3, 13):
        return np.frombuffer(mmap.mmap(fd, size, flags=flags, prot=prot, trackfd=False), dtype=np.uint8)
    if _LIBC is None:  # other platforms: CPython's mmap, which keeps a duplicate descriptor per map
        return np.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_COPY), dtype=np.uint8)
    addr = _LIBC.mmap(None, size, prot, flags, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    buf = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(buf, _LIBC.munmap, addr, size)  # unmapped when the last view of it is gone
    return np.frombuffer(buf, dtype=np.uint8)
