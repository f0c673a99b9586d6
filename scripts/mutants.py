#!/usr/bin/env python3
"""Run a hand-written list of mutations against the suite and report the survivors.

Each mutant in scripts/mutants.toml is one small, realistic breakage of the code (a line
deleted, a check inverted, an order swapped) and the tests that must catch it. For each, the
tracked files are copied to a scratch directory, the breakage is applied there (the work tree is
never touched), and the named tests run. A mutant whose tests all pass *survived*: the suite
cannot tell the broken code from the right one, and that is a gap to close with a test.

    scripts/mutants.py                 every mutant
    scripts/mutants.py NAME...         only these (names from the TOML file)
    scripts/mutants.py --list          names and what each is meant to catch

Exit status: 0 when every mutant was killed, 1 when one survived or was only caught by a test
hanging until its timeout, 2 when a mutant no longer applies (a `find` text is not in the file
exactly once: update the list with the code).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIST = REPO / "scripts" / "mutants.toml"
TIMEOUT_S = 900  # the whole run of one mutant
TEST_TIMEOUT_S = 120  # one test: a breakage that makes a test hang shows as "hung"


@dataclass(frozen=True)
class Mutant:
    """One breakage: in `file`, each `find` (exactly once) becomes its `replace`. `find` and
    `replace` are strings, or lists of strings for a breakage that edits several places (an
    order swapped: a line taken out here, put back there)."""

    name: str
    file: str
    find: str | list[str]
    replace: str | list[str]
    tests: list[str]
    catches: str

    def edits(self) -> list[tuple[str, str]]:
        finds = [self.find] if isinstance(self.find, str) else self.find
        replaces = [self.replace] if isinstance(self.replace, str) else self.replace
        if len(finds) != len(replaces):
            raise LookupError(f"{self.name}: {len(finds)} finds but {len(replaces)} replaces")
        return list(zip(finds, replaces, strict=True))


def load(path: Path) -> list[Mutant]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return [Mutant(**entry) for entry in data["mutant"]]


def copy_tree(dest: Path) -> None:
    """The tracked files of the work tree as they are now (committed or not)."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / os.fsdecode(name)
        if src.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def apply(mutant: Mutant, tree: Path) -> None:
    path = tree / mutant.file
    text = path.read_text()
    for find, replace in mutant.edits():
        count = text.count(find)
        if count != 1:
            raise LookupError(f"{mutant.name}: a `find` occurs {count} times in {mutant.file}")
        text = text.replace(find, replace)
    path.write_text(text)


def run_tests(mutant: Mutant, tree: Path) -> tuple[str, float, str]:
    """(verdict, seconds, last lines of pytest's output). A run that only ends by a timeout
    (pytest-timeout's, or ours) is "hung": the breakage shows, but as a hang, not a failure
    that names it, and that is a gap too."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               f"--timeout={TEST_TIMEOUT_S}"]
    start = time.monotonic()
    try:
        done = subprocess.run(
            [*command, *mutant.tests],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return "HUNG", time.monotonic() - start, f"no result after {TIMEOUT_S} s"
    output = done.stdout + done.stderr
    tail = "\n".join(output.strip().splitlines()[-3:])
    if done.returncode == 0:
        verdict = "SURVIVED"
    elif "from pytest-timeout" in output or "+ Timeout +" in output:
        verdict = "HUNG"
    else:
        verdict = "killed"
    return verdict, time.monotonic() - start, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--file", type=Path, default=LIST, help="the mutant list (TOML)")
    args = parser.parse_args(argv)
    mutants = load(args.file)
    if args.names:
        unknown = set(args.names) - {m.name for m in mutants}
        if unknown:
            print(f"mutants: no mutant named {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.name in args.names]
    if args.list:
        for m in mutants:
            print(f"{m.name:32} {m.file}: {m.catches}")
        return 0
    # Without a mutant the same tests must pass, or every "killed" below would mean nothing.
    with tempfile.TemporaryDirectory(prefix="corfs-mutant-") as scratch:
        copy_tree(Path(scratch))
        union = sorted({test for m in mutants for test in m.tests})
        baseline = Mutant("baseline", "", [], [], union, "")
        verdict, seconds, tail = run_tests(baseline, Path(scratch))
    if verdict != "SURVIVED":  # i.e. the unmutated tests did not all pass
        print(f"mutants: the tests fail without any mutant ({seconds:.0f} s):\n{tail}",
              file=sys.stderr)
        return 2
    print(f"baseline  the tests pass unmutated ({seconds:.0f} s)", flush=True)
    survivors, stale, hung = [], [], []
    for mutant in mutants:
        with tempfile.TemporaryDirectory(prefix="corfs-mutant-") as scratch:
            tree = Path(scratch)
            copy_tree(tree)
            try:
                apply(mutant, tree)
            except LookupError as exc:
                print(f"STALE     {exc}", flush=True)
                stale.append(mutant.name)
                continue
            verdict, seconds, tail = run_tests(mutant, tree)
        print(f"{verdict:9} {mutant.name} ({seconds:.0f} s): {mutant.catches}", flush=True)
        if verdict != "killed":
            (survivors if verdict == "SURVIVED" else hung).append(mutant.name)
            print("          " + tail.replace("\n", "\n          "), flush=True)
    total = len(mutants)
    killed = total - len(survivors) - len(hung) - len(stale)
    print(f"{killed} killed, {len(survivors)} survived, {len(hung)} hung, {len(stale)} stale, "
          f"of {total}")
    if stale:
        return 2
    return 1 if survivors or hung else 0


if __name__ == "__main__":
    sys.exit(main())
