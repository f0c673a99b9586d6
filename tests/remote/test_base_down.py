"""Issue 10, item 8: a base that does not answer at mount does not stop a cache that holds
images. A fully local image is served right; a partial one serves its local chunks and EIO for
missing ones; once the base answers again (nginx started on the same port) missing chunks read
right within seconds and the stream completes. A base that changed meanwhile gets its missing
chunks refused as stale (ESTALE), never mixed."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from unittest import mock

import pytest

from tests.fuse.util import direct_read, image_status, live_status, wait_complete, wait_for
from tests.mounting import CorfsMount, make_image, run_corfs, sha256_file
from tests.servers import Nginx

KIB = 1 << 10
MIB = 1 << 20
CHUNK = 64 * KIB


class Site:
    """An nginx of our own (stopped and started again on the same port), full.raw and
    part.raw in it, and local cache, mnt, log dirs."""

    def __init__(self, tmp: Path) -> None:
        self.nginx = Nginx(root=tmp / "root", workdir=tmp / "work").start()
        self.full = make_image(self.nginx.root / "full.raw", MIB + 5, seed=51)
        self.part = make_image(self.nginx.root / "part.raw", 2 * MIB, seed=52)
        self.cache, self.mnt, self.logs = tmp / "cache", tmp / "mnt", tmp / "logs"
        self.mnt.mkdir()
        self.logs.mkdir()

    def mount(self, *options: object) -> CorfsMount:
        return CorfsMount(
            self.nginx.url, self.cache, self.mnt, "--chunk-size", "64K", "--io-timeout", "5",
            *options, log_dir=self.logs,
        )

    def restart_nginx(self) -> None:
        with mock.patch("tests.servers.free_port", return_value=self.nginx.port):
            self.nginx.start()


@pytest.fixture
def site(tmp_path: Path):
    s = Site(tmp_path)
    yield s
    s.nginx.stop()


def _fill_cache(site: Site) -> bytes:
    """full.raw all local, part.raw only its chunks 0 and 1; returns part.raw's bytes."""
    data = site.part.read_bytes()
    with site.mount("--no-stream") as m:
        assert sha256_file(m.mnt / "full.raw") == sha256_file(site.full)
        assert direct_read(m.mnt / "part.raw", 0, 2 * CHUNK) == data[: 2 * CHUNK]
        m.stop()
    return data


def _read_errno(path: Path, offset: int) -> int:
    try:
        direct_read(path, offset, 4096)
    except OSError as exc:
        return exc.errno
    return 0


def test_cache_is_served_while_the_base_is_down_and_the_stream_resumes(site: Site) -> None:
    data = _fill_cache(site)
    site.nginx.stop()
    missing = 20 * CHUNK
    with site.mount() as m:
        assert sorted(os.listdir(m.mnt)) == ["full.raw", "part.raw"]
        assert sha256_file(m.mnt / "full.raw") == sha256_file(site.full)
        assert direct_read(m.mnt / "part.raw", CHUNK, 4096) == data[CHUNK : CHUNK + 4096]
        assert _read_errno(m.mnt / "part.raw", missing) == errno.EIO
        status = live_status(m.mnt)
        part = image_status(status, "part.raw")
        assert "does not answer" in part["error"]
        # Not "streaming": nothing can fetch its missing chunks while the base is down.
        assert part["state"] == "offline" and part["eta_s"] is None and part["rate_bps"] == 0
        assert image_status(status, "full.raw")["error"] is None
        assert image_status(status, "full.raw")["state"] == "complete"
        table = run_corfs("status", m.mnt).stdout
        assert re.search(r"^part\.raw .* offline ", table, re.M), table
        site.restart_nginx()
        wait_for(lambda: _read_errno(m.mnt / "part.raw", missing) == 0, timeout=15,
                 what="the missing chunk to read once the base is back")
        assert direct_read(m.mnt / "part.raw", missing, 4096) == data[missing : missing + 4096]
        wait_complete(m.mnt, "part.raw", timeout=20)
        assert sha256_file(m.mnt / "part.raw") == sha256_file(site.part)
        assert image_status(live_status(m.mnt), "part.raw")["error"] is None
        m.stop()
    log = m.log_text()
    assert log.count("does not answer (") == 1, log  # the mount's warning (reads log apart)
    assert log.count("answers again") == 1, log


def test_a_base_that_goes_down_while_streaming_shows_offline_until_it_answers(
    site: Site,
) -> None:
    with site.mount("--bandwidth", "256K") as m:
        wait_for(lambda: image_status(live_status(m.mnt), "part.raw")["local_bytes"] > 0,
                 what="part.raw streaming")
        site.nginx.stop()
        part = wait_for(
            lambda: (s := image_status(live_status(m.mnt), "part.raw"))["state"] == "offline"
            and s,
            timeout=30, what="part.raw offline",
        )
        assert part["error"] and part["eta_s"] is None
        site.restart_nginx()
        wait_for(lambda: image_status(live_status(m.mnt), "part.raw")["state"] == "streaming",
                 timeout=60, what="part.raw streaming again")
        run_corfs("stream", "bandwidth", m.mnt, "0", check=True)  # the slow stream has done
        wait_complete(m.mnt, "part.raw", timeout=60)
        assert sha256_file(m.mnt / "part.raw") == sha256_file(site.part)
        m.stop()


def test_an_image_changed_while_the_base_was_down_is_stale_never_mixed(site: Site) -> None:
    data = _fill_cache(site)
    site.nginx.stop()
    mtime = site.part.stat().st_mtime
    make_image(site.part, 2 * MIB, seed=53)  # another version, same size
    os.utime(site.part, (mtime + 10, mtime + 10))  # nginx's ETag has whole seconds of mtime
    with site.mount() as m:
        site.restart_nginx()
        wait_for(lambda: "answers again" in m.log_text(), timeout=15, what="the base back")
        assert _read_errno(m.mnt / "part.raw", 20 * CHUNK) == errno.ESTALE
        assert direct_read(m.mnt / "part.raw", 0, 4096) == data[:4096]  # local: still served
        assert sha256_file(m.mnt / "full.raw") == sha256_file(site.full)
        m.stop()
    assert m.log_text().count("refusing the missing chunks of image part.raw") == 1


def test_base_down_with_a_fresh_cache_refuses_the_mount(site: Site) -> None:
    site.nginx.stop()
    with pytest.raises(AssertionError, match="connection refused"), site.mount():
        pass
    assert not site.cache.exists()
