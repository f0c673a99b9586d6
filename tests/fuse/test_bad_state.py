"""A cache whose state database holds rows no corfs wrote (a damaged disk, a hand edit): every
command that reads it (mount, status, verify) ends with one clear line on stderr naming the
cache and a non-zero exit, never a traceback, and the rows and data stay as they were."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from tests.mounting import make_image, run_corfs

from .util import MIB, assert_one_line_error, direct_read, direct_write, snapshot, wait_stored

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


def test_a_data_file_cut_short_is_never_served_short(tmp_dirs):
    """A data file shorter than its image (a damaged file system, a careless copy): a read of
    chunks recorded local past its end came back short (the kernel then took the image for
    shorter). Clean and zero chunks past the end are fetched again; an image with a dirty
    chunk there (bytes nobody can bring back) is left out, its cache kept as it was."""
    chunk = 64 * KIB
    size = 8 * chunk
    want = make_image(
        tmp_dirs.base / "z.raw", size, seed=4, zero_blocks=(6, 7), block_size=chunk
    ).read_bytes()
    make_image(tmp_dirs.base / "d.raw", size, seed=5, block_size=chunk)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        assert (m.mnt / "z.raw").read_bytes() == want
        direct_write(m.mnt / "d.raw", 7 * chunk, b"d" * chunk, fsync=True)
        wait_stored(m.mnt, "z.raw", size)
        m.stop()
    os.truncate(tmp_dirs.cache / "data" / "z.raw", 5 * chunk + 100)
    os.truncate(tmp_dirs.cache / "data" / "d.raw", 6 * chunk)
    rows = _rows(tmp_dirs.cache)
    kept = snapshot(tmp_dirs.cache / "data" / "d.raw")
    with tmp_dirs.mount("--no-stream") as m:
        assert sorted(os.listdir(m.mnt)) == ["z.raw"]
        assert (m.mnt / "z.raw").read_bytes() == want
        assert direct_read(m.mnt / "z.raw", 6 * chunk, 2 * chunk) == bytes(2 * chunk)
        m.stop()
        assert "d.raw" in m.log_text()
    assert snapshot(tmp_dirs.cache / "data" / "d.raw") == kept
    assert [row for row in _rows(tmp_dirs.cache) if row[0] == "d.raw"] == [
        row for row in rows if row[0] == "d.raw"
    ]


def test_a_damaged_trace_in_the_cache_does_not_stop_the_mount(tmp_dirs):
    """CACHE/trace.json (the order a --record-trace mount saw, streamed first by the next) is
    a hint the cache keeps for itself: cut short (a crash while it was written), it must not
    keep the cache from being mounted; the stream goes in plain order, and the log says why."""
    want = make_image(tmp_dirs.base / "a.raw", MIB, seed=6).read_bytes()
    with tmp_dirs.mount("--no-stream", "--record-trace") as m:
        direct_read(m.mnt / "a.raw", 0, 4 * KIB)
        m.stop()
    trace = tmp_dirs.cache / "trace.json"
    trace.write_text(trace.read_text()[:20])
    with tmp_dirs.mount() as m:
        assert (m.mnt / "a.raw").read_bytes() == want
        m.stop()
        assert "trace.json" in m.log_text()
