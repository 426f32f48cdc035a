"""Run every benchmark in `bench/` in turn (`make bench`); each writes its own figures to `bench/results/`."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    failed = []
    for name in names:
        print(f"== bench.{name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        sys.argv = [f"bench/{name}.py"]  # each benchmark on its own defaults
        try:
            module.main()
        except SystemExit as e:  # argparse-style mains
            if e.code not in (0, None):
                failed.append(name)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
