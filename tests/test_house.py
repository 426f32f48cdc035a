"""bench/house.py (issue 23's before -> after figures) on a small hand-written tree whose every import, key name and
private name is known: each figure counts what the tree holds, no more."""

import json

from bench import house

FILES = {
    "harvest/__init__.py": "",
    "harvest/a.py": (
        "import json\n"
        "from saecache.train import b\n"                 # against the direction: harvest -> train
        "from saecache.harvest.c import _hidden\n"       # a private name across modules
        "KEY = '_manifest'\n"                            # a store key name
        "note = {'bytes': 3, 'contexts': []}\n"          # plain dict keys: not the store's
        "def f():\n"
        "    from saecache.harvest import c\n"           # in a function, neither optional nor lazy CLI
        "    try:\n"
        "        import wandb\n"                         # optional dependency
        "    except ImportError:\n"
        "        pass\n"
        "    import torch\n"                             # heavy library
        "    return json, b, c, _hidden, wandb, torch\n"
    ),
    "harvest/c.py": "from zarr.codecs import BloscCodec\n_hidden = 1\n",
    "train/__init__.py": "",
    "train/b.py": "import saecache.harvest.c as cc\nx = cc._hidden\nchain = [{'name': 'bytes'}]\n",
    "train/cli.py": "def cmd():\n    from saecache.train import b\n    return b\n",
    "evaluate/__init__.py": "",
    "saecache/__init__.py": "",
}


def make_tree(root):
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_each_figure_counts_what_the_tree_holds(tmp_path):
    m = house.measure(make_tree(tmp_path))
    g = m["import_graph"]
    assert g["nodes"] == 7  # three packages and four modules
    assert set(g["edges"]["module_level"]) == {"harvest.a -> train.b", "harvest.a -> harvest.c",
                                               "train.b -> harvest.c"}
    assert set(g["edges"]["in_function"]) == {"harvest.a -> harvest.c", "train.cli -> train.b"}
    assert g["against_direction"] == ["harvest.a -> train.b"]
    assert m["store_format_files"] == {"count": 3, "key_names": ["harvest/a.py"],
                                       "codec_chain": ["harvest/c.py", "train/b.py"]}
    assert m["private_imports"]["production"] == ["harvest/a.py:3: harvest.c._hidden",
                                                  "train/b.py:2: harvest.c._hidden"]
    fi = m["function_imports"]
    assert fi["by_kind"] == {"optional": 1, "lazy-cli": 2, "other": 1} and fi["count"] == 4
    assert fi["by_file"]["harvest/a.py"] == ["7 other: saecache.harvest", "9 optional: wandb", "12 lazy-cli: torch"]


def test_the_report_sets_before_and_after_side_by_side(tmp_path):
    before, after = make_tree(tmp_path / "before"), make_tree(tmp_path / "after")
    (after / "harvest" / "a.py").write_text("from saecache.harvest import c\n")  # the private import and the rest go
    house.main(["--tree", str(after), "--before", str(before), "--out", str(tmp_path / "out" / "house")])
    data = json.loads((tmp_path / "out" / "house.json").read_text())
    assert len(data["before"]["private_imports"]["production"]) == 2
    assert len(data["after"]["private_imports"]["production"]) == 1
    md = (tmp_path / "out" / "house.md").read_text()
    assert "| private names imported across modules (production) | 2 | 1 |" in md
    assert "| edges against evaluate -> train -> harvest | 1 | 0 |" in md
    assert "- ~~harvest/a.py: harvest.c._hidden~~ (gone)" in md
