"""The thread policy (`saecache/threads.py`): torch's OpenMP threads wait passively once saecache is imported first.

What libgomp actually read is checked in fresh processes through its own report (`OMP_DISPLAY_ENV=VERBOSE` prints the
settings it loaded with, GOMP_SPINCOUNT among them: how long a waiting thread spins before it sleeps). On the old
code a stage's import left torch's threads spinning (GOMP_SPINCOUNT 300000), which is what made a loaded 2-core
machine many times slower than its fair share (bench/results/shared_cpu.md).
"""

import os
import re
import subprocess
import sys

import pytest

from saecache import threads


def gomp_settings(code: str, **env) -> dict:
    """libgomp's own report of its settings in a fresh interpreter running `code`."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", threads.ENV)}
    r = subprocess.run([sys.executable, "-c", code], env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(re.findall(r"^\s*(\w+) = '([^']*)'", r.stderr, re.M))


def test_importing_a_stage_makes_torch_threads_wait_passively():
    """Every stage module is imported as saecache.<stage>.<module>, so saecache/__init__ runs before its torch."""
    got = gomp_settings("import saecache.train.trainer")
    assert got["GOMP_SPINCOUNT"] == "0"  # threads sleep at once instead of spinning through other processes' cores


def test_torch_policy_leaves_torch_defaults():
    """SAECACHE_THREADS=torch is the old behaviour (the bench's reference): libgomp's spinning default stays."""
    got = gomp_settings("import saecache.train.trainer", SAECACHE_THREADS="torch")
    assert got["GOMP_SPINCOUNT"] not in ("", "0")


def test_a_users_own_wait_policy_wins():
    got = gomp_settings("import os, saecache; print(os.environ['OMP_WAIT_POLICY']); import torch",
                        OMP_WAIT_POLICY="ACTIVE")
    assert got["OMP_WAIT_POLICY"] == "ACTIVE"


def test_torch_loaded_first_is_reported_not_passive():
    """Too late to change libgomp: `passive()` says so, and the stage policy falls back (next test)."""
    r = subprocess.run([sys.executable, "-c", "import torch, saecache.threads as t; print(t.passive())"],
                       env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"},
                       capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "False", r.stderr[-2000:]


@pytest.mark.parametrize("value, expected", [("torch", "torch"), ("3", 3), ("auto", "auto"), ("", "auto"),
                                             ("lots", "auto"), ("0", "auto"), (" Torch ", "torch")])
def test_policy_from_environment(monkeypatch, value, expected):
    monkeypatch.setenv(threads.ENV, value)
    assert threads.policy() == expected


def test_stage_threads_sets_and_restores(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv(threads.ENV, "1")
    with threads.stage_threads() as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with threads.stage_threads(1):  # an explicit count (EvalConfig.threads, train_model(threads=...)) wins
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_spinning_threads_on_a_busy_machine_fall_back_to_one(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setitem(threads._state, "passive", False)
    monkeypatch.setattr(threads, "busy", lambda cores=None: True)
    assert threads.intra_op_threads(2) == 1
    monkeypatch.setattr(threads, "busy", lambda cores=None: False)
    assert threads.intra_op_threads(2) == min(2, threads.available_cores())
    monkeypatch.setitem(threads._state, "passive", True)
    monkeypatch.setattr(threads, "busy", lambda cores=None: True)
    assert threads.intra_op_threads(2) == min(2, threads.available_cores())  # passive waiting: keep the cores
