"""bench/run.py knows every benchmark: each module of bench/ is listed as a benchmark or as a
helper, each benchmark has a main() for the runner to call, and `--list` shows them all."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from bench.run import BENCH_DIR, BENCHMARKS, HELPERS

REPO = Path(__file__).resolve().parents[2]


def test_every_module_of_bench_is_a_listed_benchmark_or_a_helper() -> None:
    modules = {p.stem for p in BENCH_DIR.glob("*.py")}
    assert modules - set(BENCHMARKS) - HELPERS == set(), "add it to bench/run.py's BENCHMARKS"
    assert set(BENCHMARKS) | HELPERS <= modules, "bench/run.py lists a module that is gone"
    assert not set(BENCHMARKS) & HELPERS


def test_every_benchmark_has_a_main() -> None:
    for name in BENCHMARKS:
        tree = ast.parse((BENCH_DIR / f"{name}.py").read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert "main" in functions, name


def test_list_shows_every_benchmark_and_unknown_names_are_one_line_errors() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--list"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert [line.split()[0] for line in listed] == list(BENCHMARKS)
    assert all(len(line.split()) > 3 for line in listed)  # each with its description

    unknown = subprocess.run(
        [sys.executable, "-m", "bench.run", "no_such_bench"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert unknown.returncode == 2
    assert "no benchmark named no_such_bench" in unknown.stderr
    assert "Traceback" not in unknown.stderr
