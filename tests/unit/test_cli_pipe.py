"""A reader that goes away before corfs writes (`corfs status | head -1`, a pager quit early):
corfs ended in a BrokenPipeError traceback. Now it exits quietly with 141 (128 + SIGPIPE), as
a Unix tool killed by SIGPIPE is seen by its shell."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from corfs.store import CacheStore
from tests.mounting import corfs_command, corfs_env


def _run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before corfs writes
    try:
        return subprocess.run(corfs_command(*args), stdout=write_end, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, env=corfs_env(), timeout=60)
    finally:
        os.close(write_end)


def test_status_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = CacheStore.open(str(cache))
    try:
        store.create_image("disk.raw", 1 << 20, 64 << 10, "id", "base")
    finally:
        store.close()
    result = _run_into_closed_pipe("status", str(cache))
    assert result.stderr == "" and result.returncode == 141, result.stderr


def test_an_error_still_reaches_stderr() -> None:
    """stdout gone does not hide an error said on stderr."""
    result = _run_into_closed_pipe("status", "/nonexistent/corfs-cache")
    assert result.returncode not in (0, 141) and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
