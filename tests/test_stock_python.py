"""The Makefile on a stock Linux Python (issue 22 §1): with no virtualenv or conda env active it makes ./.venv with
`$(PY) -m venv` and every target runs `.venv/bin/python`; with one active it uses that one (`$(PY)`) as before.
Asserted on the real `make` (its print-python target and dry runs), with the environment set and unset. The install
itself (Debian's /usr/bin/python3 into .venv) runs in CI (.ci/run)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make(*args, **env_changes) -> str:
    """stdout of `make -s ARGS` in the repo, with VIRTUAL_ENV / CONDA_PREFIX unset unless given."""
    if shutil.which("make") is None:
        pytest.fail("GNU make is needed: the README's two commands are make targets")
    # MAKEFLAGS & co.: a suite run by `make test PY=...` must not pass its command-line variables on to this make
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PY", "VENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    env.update(env_changes)
    p = subprocess.run(["make", "-s", "-C", str(REPO), *args], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_no_active_env_uses_a_venv_in_the_repo():
    assert make("print-python").strip() == ".venv/bin/python"
    assert make("print-python", "PY=/usr/bin/python3").strip() == ".venv/bin/python"


@pytest.mark.parametrize("var", ["VIRTUAL_ENV", "CONDA_PREFIX"])
def test_an_active_env_is_used_as_it_is(var, tmp_path):
    assert make("print-python", **{var: str(tmp_path)}).strip() == "python3"
    assert make("print-python", "PY=/opt/py/bin/python3", **{var: str(tmp_path)}).strip() == "/opt/py/bin/python3"


def test_dry_run_makes_the_venv_with_py_only_when_none_is_active(tmp_path):
    if (REPO / ".venv" / "bin" / "python").exists():  # a checkout where `make` already made it: dry-run elsewhere
        work = tmp_path / "repo"
        work.mkdir()
        shutil.copy(REPO / "Makefile", work / "Makefile")
        run = lambda *a, **e: make("-C", str(work), *a, **e)  # noqa: E731  (a later -C wins)
    else:
        run = make
    plan = run("-n", "install", "PY=/usr/bin/python3").splitlines()
    assert plan[0].startswith("/usr/bin/python3 -m venv .venv ")
    assert all(".venv/bin/python " in ln for ln in plan[1:] if "pip install" in ln)
    active = run("-n", "install", VIRTUAL_ENV=str(tmp_path))
    assert "-m venv" not in active and ".venv" not in active
    assert "python3 -m pip install -q -e \".[dev]\"" in active


def test_torch_is_installed_only_when_missing_in_the_chosen_interpreter():
    torch_lines = [ln for ln in make("-n", "install").splitlines() if "torch" in ln]
    assert torch_lines == ['.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q '
                           'torch==2.13.0']


def test_demo_and_test_run_from_the_venv_and_demo_says_how_to_use_it():
    demo = make("-n", "demo").splitlines()
    run = next(ln for ln in demo if "-m saecache demo" in ln)
    assert run.startswith(f'PATH="{REPO}/.venv/bin:$PATH" .venv/bin/python -m saecache demo')
    hint = demo[demo.index(run) + 1:]
    assert len(hint) == 1 and ".venv/bin/saecache --help" in hint[0] and ". .venv/bin/activate" in hint[0]
    test = make("-n", "test").splitlines()
    assert test[-1] == f'PATH="{REPO}/.venv/bin:$PATH" .venv/bin/python -m pytest -q'
    active = make("-n", "demo", VIRTUAL_ENV="/somewhere").splitlines()
    assert active[-1] == "python3 -m saecache demo"  # an active env: nothing to explain


def test_a_python_without_venv_support_leaves_no_half_made_venv(tmp_path):
    """Debian's python3 without the python3-venv package: `-m venv` makes part of the directory and fails. make
    stops with one line naming the package to install, and removes the half-made .venv (a rerun would take it for
    a working one)."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nmkdir -p .venv/bin && touch .venv/bin/python3 && echo 'ensurepip is not available' >&2"
                    " && exit 1\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    p = subprocess.run(["make", "-s", "-C", str(tmp_path), "install", f"PY={fake}"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "apt-get install python3-venv" in errors[0], p.stderr
    assert not (tmp_path / ".venv").exists()
