"""Session-wide offline fixtures. Asset fixtures (corpus, tokenizer, tiny model) live in `_assets.py`; store fixtures
(a harvested tiny store) in `_store.py`. Nothing here touches the network."""

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# before any test imports torch, so its OpenMP threads wait passively (saecache/threads.py)
import saecache  # noqa: E402,F401

from _assets import *  # noqa: E402,F401,F403
from _store import *  # noqa: E402,F401,F403


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for in-process training of tiny SAEs (faster on a shared 2-core machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_terminal_summary(terminalreporter):
    """The fuzzed store reader's case count (tests/test_fuzz_store.py), when it ran: CI's log shows how many."""
    fuzz = sys.modules.get("_fuzz")
    if fuzz is not None and fuzz.CASES:
        terminalreporter.write_line(fuzz.summary())
