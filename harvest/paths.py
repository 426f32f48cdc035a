"""Local paths. What a failed command created on local disk, and removing it: shared by the harvest (a new store it
began) and train (new run dirs), so that a failed command leaves nothing it created and touches nothing it did not.
And file names made from labels (a run's or a hook's), shared by evaluate's report and frontier."""

from __future__ import annotations

import os
import re
import shutil


def topmost_missing(path: str) -> str | None:
    """The highest ancestor of `path` (itself included) that does not exist yet, i.e. what creating `path` with its
    parents would make; None when `path` exists."""
    top, path = None, os.path.abspath(path)
    while not os.path.lexists(path):
        top, path = path, os.path.dirname(path)
    return top


def remove_path(p: str) -> None:
    """Remove a file, a link or a directory tree (a link to a directory is removed, not followed)."""
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        os.remove(p)


def safe_name(name: str) -> str:
    """A label (a run's, a hook's) as a file-name part: every character but letters, digits and `_.=+-` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)
