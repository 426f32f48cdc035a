"""The teammate path with the real library: dictionary_learning's `trainSAE` trains from `store.batches`, and its
`ae.pt` goes through `saecache import` and `saecache evaluate` (docs/api.md, "A teammate's trainer").

dictionary_learning's pins clash with ours (nnsight<0.4), so it runs in its own virtualenv (tests/_venvs.py: built
once under `.venvs/`, git-ignored, keyed by its requirements, and reused by later runs); saecache is installed into it editable
from this checkout (no dependencies: the venv already has what the API's store and loader need). The first build
downloads ~1 GB of packages (a few minutes); CI builds it once per run.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _venvs import peer_python
from test_api import docs_blocks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def dl_python() -> Path:
    """The interpreter of the dictionary_learning virtualenv, with this checkout's saecache installed."""
    python = peer_python("dictionary-learning")  # tests/_venvs.py: built once, kept under .venvs/
    venv = python.parent.parent
    where = subprocess.run([str(python), "-c", "import saecache, os; print(os.path.dirname(saecache.__file__))"],
                           capture_output=True, text=True, cwd=venv)  # not the repo: its ./saecache would import
    if where.returncode or Path(where.stdout.strip()) != REPO / "saecache":
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                        str(REPO)], check=True)
    return python


@pytest.mark.slow
def test_dictionary_learning_trains_from_store_batches(dl_python, tmp_path, tiny_store, tiny_model_dir):
    """The page's dictionary_learning block runs in the library's own venv; its ae.pt is imported and evaluated."""
    (train,) = docs_blocks("python dictionary_learning")
    (commands,) = docs_blocks("bash")[-1:]
    shutil.copytree(tiny_store, tmp_path / "mine.zarr")
    (tmp_path / "saecache-demo").mkdir()
    (tmp_path / "saecache-demo" / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    (tmp_path / "train_dl.py").write_text(train)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(dl_python), "train_dl.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = tmp_path / "dl" / "trainer_0"
    assert (saved / "ae.pt").exists() and json.loads((saved / "config.json").read_text())["trainer"]["k"] == 16

    for line in commands.strip().splitlines():  # the page's `saecache import` / `saecache evaluate`, as written
        argv = shlex.split(line)
        assert argv[0] == "saecache"
        done = subprocess.run([sys.executable, "-m", "saecache", *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "eval-dl" / "report.json").read_text())["rows"]
    assert row["run"] == "dl-topk" and row["width"] == 1024 and row["arch"] == "topk"
    assert row["fve"] > 0.5  # 200 steps of dictionary_learning's TopK trainer on the store's rows: it learned
    assert 0 < row["l0"] <= 16
