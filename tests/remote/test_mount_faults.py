"""Issue 4, point 3: failures of an HTTP base seen through a real mount, with the fault proxy
between corfs and nginx. Faults that stop after a few tries are retried and the reads get the
right bytes; a base that stays down (500 forever, or silent) turns a read into EIO after about
--io-timeout, with one log line naming the URL and no credentials, while local chunks keep
being served; once the base heals the stream completes by itself. Wrong Content-Range and
truncated bodies never yield a wrong byte."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from corfs.base import describe_url
from tests.fuse.util import direct_read, image_status, live_status, wait_complete
from tests.mounting import CorfsMount, run_corfs, sha256_file
from tests.proxy import FaultProxy

KIB = 1 << 10
MIB = 1 << 20
CHUNK = 64 * KIB
TOKEN_ENV = {"CORFS_TEST_AUTH": "Authorization: Bearer x"}
_serial = itertools.count()


class ProxiedSite:
    """disk.raw in a fresh directory on nginx (below /auth/ with `auth`), reached through a
    fault proxy; local cache, mnt and log dirs."""

    def __init__(self, nginx, tmp: Path, *, auth: bool = False, size: int = 3 * MIB + 333):
        self.sub = f"{'auth/' if auth else ''}f{next(_serial)}-{os.getpid()}/"
        root = nginx.root / self.sub
        root.mkdir(parents=True)
        self.data = random.Random(self.sub).randbytes(size)
        (root / "disk.raw").write_bytes(self.data)
        self.proxy = FaultProxy(upstream_port=nginx.port).start()
        self.auth = auth
        self.cache, self.mnt, self.logs = tmp / "cache", tmp / "mnt", tmp / "logs"
        self.mnt.mkdir()
        self.logs.mkdir()

    @property
    def url(self) -> str:
        return self.proxy.url + self.sub

    def mount(self, *options: object) -> CorfsMount:
        auth = ("--auth-header-env", "CORFS_TEST_AUTH") if self.auth else ()
        return CorfsMount(
            self.url,
            self.cache,
            self.mnt,
            "--chunk-size",
            "64K",
            *auth,
            *options,
            log_dir=self.logs,
            env=TOKEN_ENV if self.auth else None,
        )

    def fail_forever(self, fault: str) -> None:
        self.proxy.inject(*[fault] * 100_000)

    def heal(self) -> None:
        with self.proxy._lock:
            self.proxy.faults.clear()

    def pending_faults(self) -> int:
        with self.proxy._lock:
            return len(self.proxy.faults)


@pytest.fixture
def proxied(nginx_server, tmp_path: Path):
    site = ProxiedSite(nginx_server, tmp_path)
    yield site
    site.proxy.stop()


@pytest.fixture
def proxied_auth(nginx_server, tmp_path: Path):
    site = ProxiedSite(nginx_server, tmp_path, auth=True)
    yield site
    site.proxy.stop()


READS = [(0, 4096), (CHUNK - 10, 20), (MIB + 5, 3 * CHUNK), (3 * MIB, 333)]

TRANSIENT = ["status:500", "status:503", "status:429", "drop", "reset", "truncate", "wrong_range"]


@pytest.mark.parametrize("fault", TRANSIENT)
def test_faults_that_stop_are_retried_and_reads_are_right(proxied: ProxiedSite, fault: str) -> None:
    with proxied.mount("--no-stream", "--io-timeout", "20") as m:
        path = m.mnt / "disk.raw"
        for offset, length in READS:
            proxied.proxy.inject(fault, fault)
            assert direct_read(path, offset, length) == proxied.data[offset : offset + length]
        assert proxied.pending_faults() == 0
        fetcher = live_status(m.mnt)["fetcher"]
        assert fetcher["retries"] >= len(READS)  # drop/reset: one resend is the store's own
        assert fetcher["failures"] == 0
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(proxied.data).digest()
        m.stop()


@pytest.mark.parametrize("fault", ["stall", "stall_body"])
def test_a_stall_that_stops_is_retried(proxied: ProxiedSite, fault: str) -> None:
    # --io-timeout 6: each request may be silent for 2 s before it is given up and retried.
    with proxied.mount("--no-stream", "--io-timeout", "6") as m:
        proxied.proxy.inject(fault)
        started = time.monotonic()
        assert direct_read(m.mnt / "disk.raw", MIB, CHUNK) == proxied.data[MIB : MIB + CHUNK]
        assert time.monotonic() - started < 5.5
        m.stop()


def test_wrong_range_and_truncation_never_give_a_wrong_byte(proxied: ProxiedSite) -> None:
    faults = ["wrong_range", "truncate", "ignore_range", "close_after"] * 4
    proxied.proxy.inject(*faults)
    with proxied.mount("--io-timeout", "30") as m:
        wait_complete(m.mnt, "disk.raw", timeout=60)
        assert proxied.pending_faults() == 0
        assert sha256_file(m.mnt / "disk.raw") == hashlib.sha256(proxied.data).hexdigest()
        m.stop()


@pytest.mark.parametrize("down", ["status:500", "stall"])
def test_base_down_gives_eio_in_bounded_time_then_stream_recovers(
    proxied_auth: ProxiedSite, down: str
) -> None:
    site = proxied_auth
    data = site.data
    with site.mount("--io-timeout", "3", "--stream-paused") as m:
        path = m.mnt / "disk.raw"
        local = [(0, 2 * CHUNK), (MIB, CHUNK)]
        for offset, length in local:
            assert direct_read(path, offset, length) == data[offset : offset + length]
        site.fail_forever(down)
        assert run_corfs("stream", "resume", m.mnt).returncode == 0  # the stream fails too

        def missing_read() -> tuple[float, int]:
            started = time.monotonic()
            try:
                direct_read(path, 3 * MIB, 333)
            except OSError as exc:
                return time.monotonic() - started, exc.errno
            return time.monotonic() - started, 0

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(missing_read)
            # Meanwhile local chunks are served at once.
            while not pending.done():
                for offset, length in local:
                    t0 = time.monotonic()
                    assert direct_read(path, offset, length) == data[offset : offset + length]
                    assert time.monotonic() - t0 < 0.5
                time.sleep(0.05)
            took, err = pending.result()
        assert err == errno.EIO
        assert 2.0 < took < 8.0, took
        st = image_status(live_status(m.mnt), "disk.raw")
        assert st["error"] and st["state"] != "complete"

        url = describe_url(site.url + "disk.raw")
        log = m.log_text()
        assert "Bearer" not in log
        # The failed read (of chunk 48: 3 MiB / 64 KiB) is said once, by its request.
        failed = [line for line in log.splitlines() if "WARNING read: disk.raw: " in line]
        assert len(failed) == 1, log
        assert url in failed[0], failed[0]

        site.heal()
        wait_complete(m.mnt, "disk.raw", timeout=60)
        assert sha256_file(path) == hashlib.sha256(data).hexdigest()
        m.stop()
