"""The house's figures (issue 23, acceptance 1): how a source tree's modules depend on each other, measured before and
after. `python -m bench.house [--tree DIR] [--before REV|DIR] [--out bench/results/house]` writes house.json (every
figure and list, per tree) and house.md (the figures side by side: before -> after).

Per tree:
- the import graph between the modules of harvest/, train/ and evaluate/: module-level and in-function edges, and every
  edge against the direction evaluate -> train -> harvest;
- the files that know a store key name (`_manifest`, `_final`, `_claims`, `_plan`, `acts/`, `rows/`, `contexts`,
  `zarr.json`, `c/` chunk keys) or the codec chain (the zarr codec classes, numcodecs' Blosc/Zstd, the codec names
  `bytes`, `blosc`, `bitshuffle`, `crc32c`, `sharding_indexed`), found in string constants and names, not comments;
- private names imported across modules (`from m import _x`, or `m._x` on an imported module);
- imports inside functions, by file, classified: optional dependency (inside `try: ... except ImportError`), lazy CLI
  (a command module, the package's lazy `__getattr__` and saecache/api.py behind it, or a heavy library: torch,
  transformers, matplotlib..., or a module of the tree that loads one the importing module does not), other;
- the `duplicates` command's pairs (on PATH), in production code vs tests/bench.
Everything is read with `ast`; the tree is never imported.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "97d5ea9"  # main's start commit on the day of issue 23
STAGES = ("harvest", "train", "evaluate")  # the direction: a stage imports only stages after it
PRODUCTION = ("saecache", "harvest", "train", "evaluate", "data")
# libraries slow enough to import (a second or more, or pulling torch) that a command loads them when it starts
HEAVY = {"torch", "transformers", "matplotlib", "datasets", "safetensors", "tokenizers", "zarr", "fsspec", "s3fs"}
KEY_RE = re.compile(r"(^|/)_(manifest|final|claims|plan)(/|\.|$)|(^|/)(acts|rows|contexts)/|zarr\.json|(^|/)c/")
CODEC_NAMES = {"BloscCodec", "ShardingCodec", "ZstdCodec", "BytesCodec", "Crc32cCodec", "ShardingCodecIndexLocation"}
CODEC_STRINGS = {"bytes", "blosc", "bitshuffle", "crc32c", "sharding_indexed"}
AMBIGUOUS = {"bytes", "crc32c", "contexts"}  # also plain dict keys: counted only where they name a codec or array


def python_files(tree: Path, tops: tuple[str, ...]) -> dict[str, Path]:
    """'harvest/run.py' -> path, for the .py files under the given top folders (links not followed)."""
    out = {}
    for top in tops:
        for root, dirs, files in os.walk(tree / top):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not (Path(root) / d).is_symlink())
            if Path(root).is_relative_to(tree / "data" / "cache"):
                continue
            out.update({(Path(root) / f).relative_to(tree).as_posix(): Path(root) / f for f in files
                        if f.endswith(".py")})
    return dict(sorted(out.items()))


def module_name(rel: str) -> str:
    """'harvest/store/__init__.py' -> 'saecache.harvest.store'; 'saecache/cli.py' -> 'saecache.cli'."""
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts if parts[0] in ("saecache", "bench", "tests") else ["saecache", *parts])


class Imports(ast.NodeVisitor):
    """Every import of one file: (target module, imported names, in a function?, in `try/except ImportError`?,
    enclosing function's name), and the names bound to imported modules."""

    def __init__(self, package: str):
        self.package, self.found, self.funcs, self.guarded = package, [], [], 0

    def visit_FunctionDef(self, node):
        self.funcs.append(node.name)
        self.generic_visit(node)
        self.funcs.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Try(self, node):
        catches = {n.id for h in node.handlers for n in ast.walk(h.type or ast.Name("BaseException"))
                   if isinstance(n, ast.Name)}
        guard = bool(catches & {"ImportError", "ModuleNotFoundError"})
        self.guarded += guard
        for stmt in node.body:
            self.visit(stmt)
        self.guarded -= guard
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(part)

    def _add(self, node, module: str, names: list[tuple[str, str]], binds: dict[str, str]):
        self.found.append({"module": module, "names": names, "line": node.lineno, "in_function": bool(self.funcs),
                           "function": self.funcs[0] if self.funcs else None, "optional": self.guarded > 0,
                           "binds": binds})

    def visit_Import(self, node):
        for a in node.names:  # `import a.b as x` binds x to a.b; `import a.b` binds a
            top = a.name.split(".")[0]
            self._add(node, a.name, [], {a.asname: a.name} if a.asname else {top: top})

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:
            pkg = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join([*pkg, *([base] if base else [])])
        names = [(a.name, a.asname or a.name) for a in node.names]
        self._add(node, base, names, {alias: f"{base}.{name}" for name, alias in names})


def read_imports(tree: Path, files: dict[str, Path]) -> dict[str, list[dict]]:
    out = {}
    for rel, path in files.items():
        mod = module_name(rel)
        v = Imports(mod if rel.endswith("__init__.py") else mod.rpartition(".")[0])
        v.visit(ast.parse(path.read_text(), rel))
        out[rel] = v.found
    return out


def targets(imp: dict, modules: set[str]) -> list[str]:
    """The tree's modules one import statement reaches: `from pkg import mod` reaches pkg.mod when that is a module."""
    hit = [f"{imp['module']}.{name}" for name, _ in imp["names"] if f"{imp['module']}.{name}" in modules]
    if (len(hit) < len(imp["names"]) or not imp["names"]) and imp["module"] in modules:
        hit.append(imp["module"])
    return sorted(set(hit))


def stage(module: str) -> str | None:
    part = module.split(".")[1] if module.count(".") else ""
    return part if part in STAGES else None


def import_graph(imports: dict[str, list[dict]]) -> dict:
    nodes = {module_name(rel): rel for rel in imports if stage(module_name(rel))}
    edges = {"module_level": set(), "in_function": set()}
    for rel, found in imports.items():
        src = module_name(rel)
        if src not in nodes:
            continue
        for imp in found:
            for dst in targets(imp, set(nodes)):
                if dst != src:
                    edges["in_function" if imp["in_function"] else "module_level"].add((src, dst))
    against = sorted(e for kind in edges.values() for e in kind
                     if STAGES.index(stage(e[0])) < STAGES.index(stage(e[1])))

    def fmt(es) -> list[str]:
        return [f"{a.removeprefix('saecache.')} -> {b.removeprefix('saecache.')}" for a, b in sorted(es)]

    return {"nodes": len(nodes), "module_level_edges": len(edges["module_level"]),
            "in_function_edges": len(edges["in_function"]),
            "cross_stage_edges": sum(stage(a) != stage(b) for kind in edges.values() for a, b in kind),
            "against_direction": fmt(against), "edges": {k: fmt(v) for k, v in edges.items()}}


def knows_store_format(path: Path) -> tuple[bool, bool]:
    """(knows a store key name, knows the codec chain), from string constants and names. Words that are also
    ordinary dict keys count only where they are used as a store's: `"contexts"` as a call's argument or a constant's
    value (an array's name), `"bytes"` and `"crc32c"` as a codec's `"name"` or in a comparison."""
    keys = codec = False
    tree = ast.parse(path.read_text())
    array_name, codec_name = set(), set()  # ids of the constants that stand where an array's or a codec's name does
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            array_name.update(id(a) for a in node.args)
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
            array_name.add(id(node.value))
        elif isinstance(node, ast.Compare):
            codec_name.update(id(n) for n in (node.left, *node.comparators))
            codec_name.update(id(e) for n in node.comparators if isinstance(n, (ast.Tuple, ast.Set, ast.List))
                              for e in n.elts)
        elif isinstance(node, ast.Dict):
            codec_name.update(id(v) for k, v in zip(node.keys, node.values)
                              if isinstance(k, ast.Constant) and k.value == "name")
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            keys |= (id(node) in array_name) if v == "contexts" else (bool(KEY_RE.search(v)) and " " not in v)
            codec |= v in CODEC_STRINGS and (v not in AMBIGUOUS or id(node) in codec_name)
        elif isinstance(node, (ast.Name, ast.Attribute, ast.alias)):
            name = {ast.Name: "id", ast.Attribute: "attr", ast.alias: "name"}[type(node)]
            name = getattr(node, name)
            codec |= name.rpartition(".")[2] in CODEC_NAMES or (
                isinstance(node, ast.Attribute) and name in ("Blosc", "Zstd") and
                isinstance(node.value, ast.Name) and node.value.id == "numcodecs")
    return keys, codec


def private_imports(tree: Path, imports: dict[str, list[dict]], files: dict[str, Path]) -> list[str]:
    modules = {module_name(rel) for rel in files}
    out = []
    for rel, found in imports.items():
        own = module_name(rel)
        bound = {}  # local name -> the tree's module it stands for
        for imp in found:
            for name, _ in imp["names"]:
                private = name.startswith("_") and not name.startswith("__")
                if private and imp["module"] != own and f"{imp['module']}.{name}" not in modules:
                    out.append(f"{rel}:{imp['line']}: {imp['module'].removeprefix('saecache.')}.{name}")
            bound.update({alias: mod for alias, mod in imp["binds"].items() if mod in modules and mod != own})
        for node in ast.walk(ast.parse(files[rel].read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                out.append(f"{rel}:{node.lineno}: {bound[node.value.id].removeprefix('saecache.')}.{node.attr}")
    return sorted(set(out))


def heavy_closure(imports: dict[str, list[dict]]) -> dict[str, set[str]]:
    """Per module of the tree: the heavy libraries (`HEAVY`) that importing it loads, through its module-level imports
    and those of the modules (and their packages' __init__) they import, transitively."""
    by_module = {module_name(rel): [i for i in found if not i["in_function"]] for rel, found in imports.items()}

    def reached(imp: dict) -> list[str]:
        names = [imp["module"], *(f"{imp['module']}.{n}" for n, _ in imp["names"])]
        out = []
        for name in names:  # a module, its parent packages (their __init__ runs first)
            parts = name.split(".")
            out += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return out

    memo: dict[str, set[str]] = {}

    def heavy(module: str, seen: frozenset = frozenset()) -> set[str]:
        if module in memo:
            return memo[module]
        if module not in by_module:
            return {module.split(".")[0]} & HEAVY
        out: set[str] = set()
        for imp in by_module[module]:
            for m in reached(imp):
                if m not in seen and m != module:
                    out |= heavy(m, seen | {module})
        memo[module] = out
        return out

    return {m: heavy(m) for m in by_module}


def function_imports(imports: dict[str, list[dict]]) -> dict:
    """In-function imports, classified: optional (guarded by `except ImportError`); lazy CLI / heavy (in a command
    module, saecache's lazy `__getattr__` and the API it leads to, saecache/api.py, whose names `import saecache` gives
    without loading a stage; or an import that loads a heavy library the importing module does not load otherwise:
    a light config module keeping `--help` fast); other."""
    by_file, kinds = {}, {"optional": 0, "lazy-cli": 0, "other": 0}
    closure = heavy_closure(imports)
    for rel, found in imports.items():
        cli = rel.endswith(("cli.py", "__main__.py")) or rel == "saecache/api.py"
        own = closure.get(module_name(rel), set())
        for imp in (i for i in found if i["in_function"]):
            top = imp["module"].split(".")[0]
            loads = set().union(*(closure.get(m, {m.split(".")[0]} & HEAVY)
                                  for m in [imp["module"], *(f"{imp['module']}.{n}" for n, _ in imp["names"])]))
            kind = ("optional" if imp["optional"] else
                    "lazy-cli" if cli or top in HEAVY or loads - own or (rel == "saecache/__init__.py" and imp[
                        "function"] == "__getattr__") else "other")
            kinds[kind] += 1
            by_file.setdefault(rel, []).append(f"{imp['line']} {kind}: {imp['module']}")
    return {"count": sum(kinds.values()), "by_kind": kinds, "by_file": by_file}


def duplicates(tree: Path) -> dict:
    exe = shutil.which("duplicates")
    if exe is None:
        return {"error": "the `duplicates` command is not on PATH"}
    p = subprocess.run([exe, "--repo", str(tree), "--most", "200", "--seconds", "120"], capture_output=True,
                       text=True, timeout=300)
    rows = [ln for ln in p.stdout.splitlines() if re.match(r"D\d+ ", ln)]
    prod = [r for r in rows if all(side.split(":")[0].split("/")[0] in PRODUCTION
                                   for side in r.split(" ", 1)[1].split(" ~ "))]
    return {"summary": p.stdout.splitlines()[0] if p.stdout else p.stderr.strip(), "pairs": len(rows),
            "production_pairs": len(prod), "production": prod, "tests_bench": [r for r in rows if r not in prod]}


def measure(tree: Path) -> dict:
    files = python_files(tree, PRODUCTION)
    imports = read_imports(tree, files)
    fmt = {rel: knows_store_format(p) for rel, p in files.items()}
    others = python_files(tree, ("tests", "bench"))
    return {
        "import_graph": import_graph(imports),
        "store_format_files": {"count": sum(k or c for k, c in fmt.values()),
                               "key_names": [r for r, (k, _) in fmt.items() if k],
                               "codec_chain": [r for r, (_, c) in fmt.items() if c]},
        "private_imports": {"production": private_imports(tree, imports, files),
                            "tests_bench": private_imports(tree, read_imports(tree, others), others)},
        "function_imports": function_imports(imports),
        "duplicates": duplicates(tree),
    }


def checkout(rev_or_dir: str, into: Path) -> Path:
    """A directory as it is, or a git revision of this repository extracted (tracked files only) into `into`."""
    if Path(rev_or_dir).is_dir():
        return Path(rev_or_dir)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev_or_dir], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"error: {rev_or_dir!r} is neither a directory nor a revision of {REPO.name}: "
                 f"{archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def figures(m: dict) -> dict[str, int]:
    g, fi = m["import_graph"], m["function_imports"]
    return {
        "modules in harvest/, train/, evaluate/": g["nodes"],
        "import edges, module level": g["module_level_edges"],
        "import edges, in functions": g["in_function_edges"],
        "edges across stages": g["cross_stage_edges"],
        "edges against evaluate -> train -> harvest": len(g["against_direction"]),
        "files that know a store key name or the codec chain": m["store_format_files"]["count"],
        "... a store key name": len(m["store_format_files"]["key_names"]),
        "... the codec chain": len(m["store_format_files"]["codec_chain"]),
        "private names imported across modules (production)": len(m["private_imports"]["production"]),
        "private names imported across modules (tests, bench)": len(m["private_imports"]["tests_bench"]),
        "imports inside functions": fi["count"],
        "... optional dependency": fi["by_kind"]["optional"],
        "... lazy CLI / heavy library": fi["by_kind"]["lazy-cli"],
        "... other": fi["by_kind"]["other"],
        "`duplicates` pairs": m["duplicates"].get("pairs", -1),
        "... in production code": m["duplicates"].get("production_pairs", -1),
    }


def markdown(before: dict, after: dict, names: tuple[str, str]) -> str:
    fb, fa = figures(before), figures(after)
    lines = ["# The house's figures (issue 23, acceptance 1)", "",
             (f"Written by `python -m bench.house`: before = {names[0]}, after = {names[1]}. Production code is "
              "saecache/, harvest/, train/, evaluate/ and data/; every figure is read with `ast` (bench/house.py)."),
             "",
             "| figure | before | after |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {fb[k]} | {fa[k]} |" for k in fb]
    lines += ["", "How counted: an edge is a pair of modules (one however many statements import it); an import inside "
              "a function is one imported module (`import a, b` two, `from m import x, y` one), optional when inside "
              "`try: ... except ImportError`, lazy CLI when in a command module (cli.py, *_cli.py, __main__.py), in "
              "saecache's lazy `__getattr__` and saecache/api.py, or of a library slow to import ("
              + ", ".join(sorted(HEAVY)) + ") or of a module that loads one its importer does not load (a light config "
              "module); a file knows a key name or the codec chain when a string constant or a name in its code (not a comment) "
              "is one."]

    def section(title: str, get, note: str = "") -> None:
        b, a = get(before), get(after)
        lines.extend(["", f"## {title}", *([note] if note else []), ""])
        gone, new, kept = sorted(set(b) - set(a)), sorted(set(a) - set(b)), sorted(set(a) & set(b))
        lines.extend([f"- {x}" for x in kept] + [f"- {x} (new)" for x in new] + [f"- ~~{x}~~ (gone)" for x in gone]
                     or ["- none"])

    section("Edges against evaluate -> train -> harvest", lambda m: m["import_graph"]["against_direction"])
    section("Files that know a store key name", lambda m: m["store_format_files"]["key_names"])
    section("Files that know the codec chain", lambda m: m["store_format_files"]["codec_chain"])
    section("Private names imported across modules", lambda m: [
        x.split(": ", 1)[0].rsplit(":", 1)[0] + ": " + x.split(": ", 1)[1] for x in m["private_imports"]["production"]],
        "Production code (file: the private name); the line numbers are in house.json.")
    section("Imports inside functions that are neither optional nor lazy CLI", lambda m: [
        f"{rel}: {e.split(': ', 1)[1]}" for rel, es in m["function_imports"]["by_file"].items() for e in es
        if " other: " in e], "By file: the module imported; the line numbers are in house.json.")
    section("`duplicates` pairs in production code", lambda m: [
        r.split(" ", 1)[1] for r in m["duplicates"].get("production", [])],
        "Rows as `duplicates` prints them (line ranges move between trees: a pair that moved shows as gone + new).")
    lines.extend(["", "## Module-level import edges between stages (after)", ""])
    lines.extend(f"- {e}" for e in after["import_graph"]["edges"]["module_level"]
                 if e.split(".")[0] != e.split(" -> ")[1].split(".")[0])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.house", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=str(REPO), help="the source tree measured as 'after' (default: this repository)")
    ap.add_argument("--before", default=BEFORE, help=f"a directory or a git revision of this repository measured as "
                                                     f"'before' (default: {BEFORE}, main's start on issue 23's day)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "house"),
                    help="output path without suffix: writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    tree = Path(args.tree)
    if not (tree / "harvest").is_dir():
        sys.exit(f"error: {tree} has no harvest/ folder: pass --tree the root of a saecache checkout")
    with tempfile.TemporaryDirectory() as tmp:
        before = measure(checkout(args.before, Path(tmp)))
        after = measure(tree)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = (args.before if not Path(args.before).is_dir() else Path(args.before).name,
             "the working tree" if tree.resolve() == REPO else tree.name)
    out.with_suffix(".json").write_text(json.dumps({"before": {"tree": names[0], **before},
                                                    "after": {"tree": names[1], **after}}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(before, after, names))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    for k, v in figures(before).items():
        print(f"{k}: {v} -> {figures(after)[k]}")


if __name__ == "__main__":
    main()
