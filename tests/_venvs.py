"""Virtualenvs for the real consumers whose pins clash with ours (dictionary_learning, circuit-tracer): one builder,
used by the tests' session fixtures and by `.ci/run`, which starts `python tests/_venvs.py` in the background at the
top of a CI run so the builds overlap the installs and the fast tests.

Each venv lives under `.venvs/` (git-ignored), named by its requirements' hash, is built beside its final place and
moved there once complete (an interrupted build is never mistaken for a finished one), and is reused by later runs.
torch goes in first and alone: the CPU wheel on this kind of machine's disk, so no requirement pulls a CUDA build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"
VENVS = {
    # zarr, numcodecs, crc32c: what saecache's store reader needs beyond the library's own dependencies.
    # torchvision goes: nnsight requires it, and PyPI's build fails to load beside the CPU torch ("operator
    # torchvision::nms does not exist"), which breaks transformers' imports; dictionary_learning never uses it.
    "dictionary-learning": {"requirements": [TORCH, "dictionary-learning==0.1.0", "zarr>=3.1,<4", "numcodecs>=0.13",
                                             "crc32c>=2.4"], "uninstall": ["torchvision"]},
    # circuit-tracer 0.5.0 asks only nnsight>=0.6.0 and imports `nnsight.intervention.tracing.tracer.Barrier`,
    # which nnsight 0.7 moved (0.8.1, what pip picks, fails to import).
    "circuit-tracer": {"requirements": [TORCH, "circuit-tracer==0.5.0", "nnsight==0.6.3"], "uninstall": []},
}
RECORD = "saecache-venv.json"
"""Written last into a venv: its requirements and build time."""


def venv_dir(name: str) -> Path:
    spec = VENVS[name]
    key = hashlib.sha256(json.dumps([sys.version_info[:2], spec]).encode()).hexdigest()[:12]
    return REPO / ".venvs" / f"{name}-{key}"


def peer_python(name: str) -> Path:
    """The python of the `name` venv, built now when missing (or interrupted), else reused."""
    venv = venv_dir(name)
    venv.parent.mkdir(exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build in progress elsewhere (CI's background one) is waited for
        if not (venv / RECORD).is_file():
            _build(name, venv)
    return venv / "bin" / "python"


def _build(name: str, venv: Path) -> None:
    t0 = time.perf_counter()
    tmp = venv.with_name(venv.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
    pip = [str(tmp / "bin" / "python"), "-m", "pip"]
    reqs = VENVS[name]["requirements"]
    subprocess.run([*pip, "install", "-q", TORCH], check=True)
    subprocess.run([*pip, "install", "-q", *reqs], check=True)
    if VENVS[name]["uninstall"]:
        subprocess.run([*pip, "uninstall", "-q", "-y", *VENVS[name]["uninstall"]], check=True)
    seconds = round(time.perf_counter() - t0)
    (tmp / RECORD).write_text(json.dumps({**VENVS[name], "seconds": seconds}) + "\n")
    shutil.rmtree(venv, ignore_errors=True)
    os.replace(tmp, venv)  # bin/'s #! lines keep the build path: everything runs `python -m`
    print(f"built {venv.name} in {seconds} s", file=sys.stderr)


if __name__ == "__main__":  # build every venv (in parallel), as .ci/run does in the background
    with ThreadPoolExecutor(len(VENVS)) as pool:
        for _ in pool.map(peer_python, VENVS):
            pass
