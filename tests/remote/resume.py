"""Checks shared by the HTTP and S3 mount tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.fuse.util import MIB, image_status, live_status, wait_complete, wait_for
from tests.mounting import run_corfs, sha256_file


def check_resume_after_kill9(mount: Callable, size: int, base: Path, *opts: str) -> None:
    """Stream part of disk.raw at 1M/s, kill -9 after a commit, remount paused, resume: the
    stream completes, fetching no more than was absent at remount (no chunk twice)."""
    with mount(None, *opts, "--bandwidth", "1M") as m:
        wait_for(
            lambda: image_status(live_status(m.mnt), "disk.raw")["local_bytes"] >= 2 * MIB,
            what="a quarter of the image streamed",
        )
        time.sleep(1.5)  # past a commit (every second): some chunks are durably local
        assert image_status(live_status(m.mnt), "disk.raw")["state"] == "streaming"
        m.kill9()
    with mount(None, *opts, "--stream-paused") as m:
        st = image_status(live_status(m.mnt), "disk.raw")
        assert 0 < st["local_bytes"] < size, st
        absent = size - st["local_bytes"]
        assert run_corfs("stream", "resume", m.mnt).returncode == 0
        wait_complete(m.mnt, "disk.raw")
        fetched = live_status(m.mnt)["fetcher"]["bytes_fetched"]
        assert 0 < fetched <= absent, (fetched, absent)
        assert sha256_file(m.mnt / "disk.raw") == sha256_file(base)
        m.stop()
