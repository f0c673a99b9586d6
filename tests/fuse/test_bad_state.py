"""A cache whose state database holds rows no corfs wrote (a damaged disk, a hand edit): every
command that reads it (mount, status, verify) ends with one clear line on stderr naming the
cache and a non-zero exit, never a traceback, and the rows and data stay as they were."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.mounting import make_image, run_corfs

from .util import MIB, assert_one_line_error, direct_read, snapshot

KIB = 1 << 10


def _execute(cache: Path, sql: str) -> None:
    db = sqlite3.connect(cache / "state.db", isolation_level=None)
    try:
        db.execute(sql)
    finally:
        db.close()


def _rows(cache: Path) -> list[tuple]:
    db = sqlite3.connect(f"file:{cache / 'state.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT * FROM chunks ORDER BY image, idx").fetchall() + db.execute(
            "SELECT name, size, chunk_size FROM images ORDER BY name"
        ).fetchall()
    finally:
        db.close()


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE images SET chunk_size = 3000 WHERE name = 'a.raw'",
        "UPDATE images SET chunk_size = 0 WHERE name = 'a.raw'",
        "UPDATE images SET size = -5 WHERE name = 'a.raw'",
        "UPDATE images SET chunk_size = 'big' WHERE name = 'a.raw'",
        "UPDATE chunks SET state = 9 WHERE image = 'a.raw' AND idx = 1",
    ],
)
def test_a_damaged_state_row_is_one_line_for_every_command(tmp_dirs, damage):
    make_image(tmp_dirs.base / "a.raw", MIB, seed=3)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        direct_read(m.mnt / "a.raw", 0, 128 * KIB)
        m.stop()
    _execute(tmp_dirs.cache, damage)
    rows, data = _rows(tmp_dirs.cache), snapshot(tmp_dirs.cache / "data", tmp_dirs.base)
    for args in (
        ("status", tmp_dirs.cache),
        ("verify", tmp_dirs.cache),
        ("mount", tmp_dirs.base, tmp_dirs.cache, tmp_dirs.mnt, "--no-stream"),
    ):
        result = run_corfs(*args, timeout=30)
        assert_one_line_error(result, str(tmp_dirs.cache))
    assert _rows(tmp_dirs.cache) == rows
    assert snapshot(tmp_dirs.cache / "data", tmp_dirs.base) == data
