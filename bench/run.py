"""`make bench`: run benchmarks one after the other (each prints its own ratios).

    python -m bench.run --list       every benchmark of bench/, and which ones `make bench` runs
    python -m bench.run [NAME...]    run these (none: the `make bench` ones)
    python -m bench.run --all        run every benchmark

BENCHMARKS names every benchmark module of bench/ and HELPERS every other module:
tests/unit/test_bench_run.py fails on a module in neither, so a new benchmark cannot go unlisted.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
import textwrap
from pathlib import Path

# name -> whether `make bench` runs it. The others take long or measure one component; they
# are run on demand (by name or --all).
BENCHMARKS: dict[str, bool] = {
    "reads": True,
    "stream": True,
    "chunk_size": True,
    "published": True,
    "boot": True,
    "peers": True,
    "flush_latency": False,
    "handoff": False,
    "http_reader": False,
    "tls": True,
    "fleet": False,
    "cold_readers": False,
}
# Modules of bench/ that are not benchmarks: shared code, the FUSE floor reads.py mounts,
# the image builder published.py uses, the peers' mounts and the throttled cache device
# peers.py uses, and this runner.
HELPERS = {
    "__init__", "cachedev", "floor_fs", "harness", "passthrough", "peer_mounts", "rootfs", "run"
}

BENCH_DIR = Path(__file__).resolve().parent


def summary(name: str, width: int = 80) -> str:
    """The start of the benchmark's module docstring (read without importing the module)."""
    doc = ast.get_docstring(ast.parse((BENCH_DIR / f"{name}.py").read_text())) or ""
    return textwrap.shorten(doc.split("\n\n")[0], width, placeholder=" ...")


def listing() -> str:
    width = max(map(len, BENCHMARKS))
    return "\n".join(
        f"{name:{width}}  {'make bench' if default else 'on demand '}  {summary(name)}"
        for name, default in BENCHMARKS.items()
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list every benchmark and exit")
    parser.add_argument("--all", action="store_true", help="run every benchmark")
    args = parser.parse_args(argv)
    if args.list:
        print(listing())
        return
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)} (see --list)")
    if args.all:
        names = list(BENCHMARKS)
    else:
        names = args.names or [n for n, default in BENCHMARKS.items() if default]
    for name in names:
        print(f"== bench.{name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        sys.argv = [f"bench.{name}"]  # each benchmark with its default arguments
        module.main()


if __name__ == "__main__":
    main()
