"""How torch's CPU threads wait: the fix for runs many times slower than their fair share on a shared machine.

torch's CPU wheels run intra-op parallel regions on GNU OpenMP (libgomp). By default a libgomp thread that reaches
the end of a region spins (busy-waits) before it sleeps, and so does the thread that waits for it. When other
processes keep the cores busy, a region's threads are not all on a core at once: one spins through its time slice
waiting for a partner the scheduler has parked behind another process, and every one of the thousands of small
regions a training step runs pays for it. Measured on 2 cores shared with other jobs (`bench/bench_shared_cpu.py`,
`bench/results/shared_cpu.md`, medians of 2 rounds): 6 steps of 4 SAEs took 29 s with torch's defaults and 3.2 s
with the passive policy, and beside two more busy processes 46 s and 4.8 s; the evaluation 85 s and 13 s, then
171 s and 19 s; the demo model's training steps 38 s and 5.6 s, then 71 s and 7.9 s.

`OMP_WAIT_POLICY=PASSIVE` makes waiting threads sleep at once, so the cores go to threads that have work. libgomp
reads it only when it loads, i.e. on `import torch`, so `prepare()` runs from `saecache/__init__.py`, before any
stage imports torch, and only sets it when the user has not. `torch` imported first (a user's own script) leaves
the spinning in place: then `stage_threads` falls back to one intra-op thread while the machine is busy.

`SAECACHE_THREADS` chooses the policy: `auto` (the default, above), `torch` (torch's own defaults, untouched: the
old behaviour, kept for the bench), or a positive integer (that many intra-op threads, waiting passively).
"""

from __future__ import annotations

import contextlib
import os
import sys

ENV = "SAECACHE_THREADS"
"""Environment variable choosing the policy: auto | torch | <n>."""

_state = {"passive": None}  # whether libgomp loaded with the passive policy; None until prepare() ran


def policy() -> str | int:
    """The chosen policy: "auto", "torch", or a thread count. A malformed value reads as "auto" (it is only a
    performance setting: the run must not fail over it)."""
    raw = os.environ.get(ENV, "auto").strip().lower()
    if raw == "torch":
        return "torch"
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return "auto"


def prepare() -> None:
    """Set `OMP_WAIT_POLICY=PASSIVE` unless the user chose a wait policy or the `torch` policy; effective only when
    torch is not loaded yet. Records whether torch's OpenMP runs with the passive policy."""
    if _state["passive"] is not None:
        return
    loaded = "torch" in sys.modules
    if policy() != "torch" and not loaded:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # after torch loaded, the environment says what libgomp read only if nobody changed it since: the best we know
    _state["passive"] = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def passive() -> bool:
    """Whether torch's OpenMP threads wait passively (see the module docstring)."""
    prepare()
    return bool(_state["passive"])


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy(cores: int | None = None) -> bool:
    """Whether the machine looks busy with other work: the 1-minute load average reaches the cores we may use.
    A coarse signal (it lags by about a minute and counts our own threads), used only when spinning threads cannot
    be avoided."""
    try:
        return os.getloadavg()[0] >= (cores or available_cores())
    except OSError:
        return False


def intra_op_threads(current: int) -> int:
    """torch intra-op threads a stage should run with, given torch's `current` setting."""
    p = policy()
    if p == "torch":
        return current
    if isinstance(p, int):
        return p
    cap = min(current, available_cores())
    if not passive() and busy():
        return 1  # spinning partners on busy cores cost far more than the second thread gains
    return max(1, cap)


@contextlib.contextmanager
def stage_threads(n: int | None = None):
    """Run a stage with `n` torch intra-op threads, or with `intra_op_threads` when None; restores torch's setting
    afterwards."""
    import torch

    prev = torch.get_num_threads()
    want = n if n is not None else intra_op_threads(prev)
    if want != prev:
        torch.set_num_threads(want)
    try:
        yield want
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)
