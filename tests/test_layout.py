"""The package layout (issue 23 item 8): saecache/harvest, saecache/train, saecache/evaluate and saecache/data are
symlinks to the top-level stage folders, so `saecache.harvest...` are ordinary files for Python, setuptools and static
tools. Asserted on the real tools: basedpyright (pyright's engine, as VS Code's Pylance) over the tree, `python -m
saecache` from the repository root and from elsewhere, and the file list of a wheel built from the tree."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("harvest", "train", "evaluate", "data")


def pyright(*args: str, cwd: Path) -> dict:
    """basedpyright's JSON report (dev extra); its exit code is non-zero whenever it reports an error."""
    p = subprocess.run([sys.executable, "-m", "basedpyright", "--outputjson", "--pythonpath", sys.executable, *args],
                       cwd=cwd, capture_output=True, text=True, timeout=600)
    if not p.stdout.lstrip().startswith("{"):
        pytest.fail(f"basedpyright did not run (pip install -e '.[dev]' installs it): {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout)


def unresolved(report: dict) -> list[str]:
    return [f"{d['file']}:{d['range']['start']['line'] + 1}: {d['message']}" for d in report["generalDiagnostics"]
            if d.get("rule") == "reportMissingImports"]


def test_the_stage_folders_are_linked_into_the_package():
    for stage in STAGES:
        link = REPO / "saecache" / stage
        assert link.is_symlink() and link.resolve() == (REPO / stage).resolve(), link


@pytest.mark.slow
def test_pyright_resolves_every_import_of_the_package():
    """pyproject's [tool.pyright]: the five folders, only reportMissingImports. Every module is analysed (not a
    vacuous pass) and no import is unresolved; before this layout, 210 `saecache.*` imports were."""
    report = pyright(cwd=REPO)
    assert unresolved(report) == []
    modules = [p for stage in ("saecache", *STAGES) for p in (REPO / stage).rglob("*.py")
               if "__pycache__" not in p.parts and not p.is_relative_to(REPO / "data" / "cache")
               and not any(p.is_relative_to(REPO / "saecache" / s) for s in STAGES)]
    assert report["summary"]["filesAnalyzed"] >= len(modules) > 50


def test_pyright_follows_the_links_from_outside_the_repository(tmp_path):
    """The check can fail: a module that does not exist is reported, while one behind a link resolves."""
    (tmp_path / "probe.py").write_text("import saecache.harvest.cli\nimport saecache.train.no_such_module\n")
    (tmp_path / "pyrightconfig.json").write_text(json.dumps({
        "extraPaths": [str(REPO)], "typeCheckingMode": "off", "reportMissingImports": "error"}))
    missing = unresolved(pyright(cwd=tmp_path))
    assert len(missing) == 1 and "saecache.train.no_such_module" in missing[0], missing


@pytest.mark.parametrize("where", ["repo", "tests", "elsewhere"])
def test_python_m_saecache_runs_from_any_directory(where, tmp_path):
    cwd = {"repo": REPO, "tests": REPO / "tests", "elsewhere": tmp_path}[where]
    p = subprocess.run([sys.executable, "-m", "saecache", "--help"], cwd=cwd, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert all(f"\n  {cmd} " in p.stdout for cmd in ("harvest", "train", "evaluate", "demo")), p.stdout
    # a stage's module imports, and its file is one of the repository's (through the link or the folder)
    probe = "import saecache.harvest.cli as m, saecache.train.cli, saecache.evaluate.cli; print(m.__file__)"
    p = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()).resolve() == (REPO / "harvest" / "cli.py").resolve()


def test_the_wheel_holds_every_stage_module_under_saecache(tmp_path):
    """A plain `pip install .` installs the wheel: setuptools follows the links, so each stage's modules (subpackages
    included) and SPEC.md lie under saecache/, and no stage folder lands at the top level of site-packages."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "saecache", src / "saecache", ignore=shutil.ignore_patterns(*STAGES, "__pycache__"))
    for stage in STAGES:  # data/cache: the demo's downloads and builds, not the package's
        shutil.copytree(REPO / stage, src / stage, ignore=shutil.ignore_patterns("__pycache__", "cache"))
        (src / "saecache" / stage).symlink_to(Path("..") / stage)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (wheel,) = (tmp_path / "dist").glob("saecache-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"saecache/{p.relative_to(src).as_posix()}" for stage in STAGES for p in (src / stage).rglob("*.py")}
    expected |= {"saecache/harvest/SPEC.md", "saecache/cli.py", "saecache/__main__.py"}
    assert expected - names == set()
    assert {n.split("/")[0] for n in names} == {"saecache", wheel.name.split("-py")[0] + ".dist-info"}
