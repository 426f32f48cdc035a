"""The README's demo table is the demo's own output: rendered from report.json, checked against the snapshot of the run
the README shows, and a README whose figures differ is caught."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from saecache.data.demo_table import BEGIN, END, load, readme_block, readme_table

REPO = Path(__file__).resolve().parent.parent


def _row(layer, arch, width, rec, lo, hi, l0=32.0, k=None):
    return {"layer": str(layer), "arch": arch, "width": width, "k": k, "l0": l0, "pruned": False,
            "ce_clean": 2.5, "ce_zero": 3.0 + layer, "recovered_zero": rec, "recovered_zero_lo": lo,
            "recovered_zero_hi": hi, "n_contexts": 64}


REPORT = {"rows": [_row(0, "relu", 512, 0.9751, 0.9742, 0.9768, l0=51.2),
                   _row(0, "topk", 512, 0.9812, 0.9801, 0.9825, k=32),
                   _row(1, "relu", 512, 0.8704, 0.8611, 0.8803, l0=60.6),
                   _row(1, "topk", 512, 0.8917, 0.8800, 0.9021, k=32),
                   {**_row(1, "topk", 512, 0.5, 0.4, 0.6, k=32), "pruned": True}]}
SUMMARY = {"val_loss": 4.1612, "unigram_xent": 6.7101}


def test_the_table_has_a_line_per_layer_and_a_column_per_set_with_intervals_and_relu_l0():
    block = readme_table(REPORT, SUMMARY)
    lines = block.splitlines()
    assert lines[0] == BEGIN and lines[-1] == END
    assert "64 held-out contexts" in block and "4.16 nats against 6.71" in block
    assert "| layer | CE clean | CE with the MLP zeroed (Δ) | % loss recovered, ReLU+L1 512 (L0) | TopK 512 (k=32) |" \
        in lines
    assert "| 0 | 2.500 | 3.000 (+0.5) | 97.5 [97.4, 97.7] (51) | 98.1 [98.0, 98.2] |" in lines
    assert "| 1 | 2.500 | 4.000 (+1.5) | 87.0 [86.1, 88.0] (61) | 89.2 [88.0, 90.2] |" in lines
    assert "50.0" not in block  # the pruned variant is not a column


def test_the_readme_table_is_the_snapshot_of_the_demo_run_it_shows():
    snap = REPO / "docs" / "demo"
    report, summary = load(snap)  # the snapshot's rows predate the arch / width keys: read as `saecache` reads them
    assert readme_block((REPO / "README.md").read_text()) == readme_table(report, summary)


def test_check_fails_on_a_readme_whose_figures_differ_and_write_repairs_it(tmp_path):
    demo = tmp_path / "demo"
    (demo / "eval").mkdir(parents=True)
    (demo / "eval" / "report.json").write_text(json.dumps(REPORT))
    (demo / "demo_summary.json").write_text(json.dumps(SUMMARY))
    good = readme_table(REPORT, SUMMARY)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n" + good.replace("98.1 [98.0, 98.2]", "98.5 [98.4, 98.6]") + "\n\nafter\n")
    cmd = [sys.executable, "-m", "saecache.data.demo_table", "--demo-dir", str(demo)]
    bad = subprocess.run(cmd + ["--check", str(readme)], capture_output=True, text=True)
    assert bad.returncode == 1 and "differs" in bad.stderr and "98.1 [98.0, 98.2]" in bad.stderr
    subprocess.run(cmd + ["--write", str(readme)], check=True, capture_output=True)
    assert readme.read_text() == "# x\n\n" + good + "\n\nafter\n"
    ok = subprocess.run(cmd + ["--check", str(readme)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_a_readme_without_markers_or_a_missing_demo_is_one_line(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no table here\n")
    r = subprocess.run([sys.executable, "-m", "saecache.data.demo_table", "--demo-dir", str(tmp_path / "nope"),
                        "--check", str(readme)], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "run `saecache demo` first" in r.stderr
    with pytest.raises(Exception, match="markers"):
        readme_block("no table here\n")
