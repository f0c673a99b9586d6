"""Issue 4, point 1 (and the HTTP half of point 4): real mounts of http(s):// bases served by
nginx. A URL to one file exposes that image; a URL ending in '/' exposes the images of the
JSON autoindex or of an index.json. Copy-on-read, streaming, qemu-io writes, resume after
kill -9 without refetching, a base replaced while mounted (ESTALE/EIO, never mixed versions),
the auth header from an env var (never in argv nor the log), https with --ca-file, and the
one-line errors at mount time that leave CACHE alone."""

from __future__ import annotations

import errno
import itertools
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.fuse.util import (
    assert_one_line_error,
    direct_read,
    image_status,
    live_status,
    snapshot,
    wait_complete,
    wait_for,
)
from tests.mounting import (
    CorfsMount,
    lazy_unmount,
    make_image,
    run_corfs,
    sha256_file,
)
from tests.remote.resume import check_resume_after_kill9
from tests.servers import Nginx, free_port, make_tls

KIB = 1 << 10
MIB = 1 << 20
SIZE = 4 * MIB + 3 * 4096 + 5  # not a multiple of any chunk size
_serial = itertools.count()


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, check=False
    )


class Web:
    """A fresh directory `sub` below an nginx root, and local dirs for cache, mnt, logs."""

    def __init__(self, nginx: Nginx, tmp: Path, under: str = "") -> None:
        self.nginx = nginx
        self.sub = f"{under}m{next(_serial)}-{os.getpid()}/"
        self.root = nginx.root / self.sub
        self.root.mkdir(parents=True)
        self.tmp = tmp
        self.cache = tmp / "cache"
        self.mnt = tmp / "mnt"
        self.logs = tmp / "logs"
        self.mnt.mkdir()
        self.logs.mkdir()

    @property
    def url(self) -> str:
        return self.nginx.url + self.sub

    def image(self, name: str, size: int = SIZE, seed: int = 0, **kw: object) -> Path:
        return make_image(self.root / name, size, seed=seed, **kw)  # type: ignore[arg-type]

    def mount(self, url: str | None = None, *options: object, **kw: object) -> CorfsMount:
        kw.setdefault("log_dir", self.logs)
        return CorfsMount(url or self.url, self.cache, self.mnt, *options, **kw)  # type: ignore[arg-type]


@pytest.fixture
def web(nginx_server, tmp_path: Path) -> Web:
    return Web(nginx_server, tmp_path)


def _names(mnt: Path) -> list[str]:
    return sorted(os.listdir(mnt))


# ---- what a URL exposes -------------------------------------------------------------------


def test_url_to_one_file_exposes_that_image(web: Web) -> None:
    one = web.image("one.raw", seed=1)
    web.image("other.raw", MIB, seed=2)
    with web.mount(web.url + "one.raw", "--chunk-size", "64K", "--no-stream") as m:
        assert _names(m.mnt) == ["one.raw"]
        assert (m.mnt / "one.raw").stat().st_size == SIZE
        assert sha256_file(m.mnt / "one.raw") == sha256_file(one)
        m.stop()


def test_dir_url_exposes_the_autoindex_listing(web: Web) -> None:
    a = web.image("a.raw", seed=3, zero_blocks=(1, 2))
    b = web.image("b.img", 2 * MIB + 1, seed=4)
    with web.mount(None, "--chunk-size", "256K", "--no-stream") as m:
        assert _names(m.mnt) == ["a.raw", "b.img"]
        for local, name in ((a, "a.raw"), (b, "b.img")):
            assert sha256_file(m.mnt / name) == sha256_file(local)
        cmp = _run("qemu-img", "compare", "-f", "raw", "-F", "raw", m.mnt / "a.raw", a)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        m.stop()


def test_a_mount_lists_the_base_once(tmp_path: Path) -> None:
    """The listing that opening the base takes (to fail early, in one line) is the mount's:
    its index once and each image's HEAD once (before, the index was fetched twice, and
    before that every image was HEADed twice); a single-image base is HEADed once."""
    nginx = Nginx(root=tmp_path / "www", workdir=tmp_path / "nginx", log_requests=True).start()
    try:
        web = Web(nginx, tmp_path)
        for index, name in enumerate(("a.raw", "b.raw", "c.raw")):
            web.image(name, MIB, seed=40 + index)
        with web.mount(None, "--no-stream") as m:
            assert _names(m.mnt) == ["a.raw", "b.raw", "c.raw"]
            m.stop()
        heads = [uri for uri, _, _ in nginx.requests("/" + web.sub, method="HEAD")]
        assert sorted(heads) == ["/" + web.sub + n for n in ("a.raw", "b.raw", "c.raw")]
        listings = [uri for uri, _, _ in nginx.requests("/" + web.sub, method="GET")]
        assert sorted(listings) == ["/" + web.sub, "/" + web.sub + "index.json"]

        mark = nginx.access_log.stat().st_size
        one = CorfsMount(web.url + "b.raw", tmp_path / "cache-one", web.mnt, "--no-stream",
                         log_dir=web.logs)
        with one as m:
            assert _names(m.mnt) == ["b.raw"]
            m.stop()
        asked = [(uri, status) for uri, status, _ in nginx.requests(since=mark)]
        assert asked == [("/" + web.sub + "b.raw", 200)]  # one HEAD, nothing else
    finally:
        nginx.stop()


def test_dir_url_with_index_json_exposes_only_what_it_lists(web: Web) -> None:
    listed = web.image("listed.raw", seed=5)
    web.image("unlisted.raw", MIB, seed=6)
    (web.root / "index.json").write_text(json.dumps({"images": [{"name": "listed.raw"}]}))
    with web.mount(None, "--chunk-size", "64K", "--no-stream") as m:
        assert _names(m.mnt) == ["listed.raw"]
        assert sha256_file(m.mnt / "listed.raw") == sha256_file(listed)
        m.stop()


# ---- copy-on-read, streaming, writes ------------------------------------------------------


def test_copy_on_read_then_stream_to_complete(web: Web) -> None:
    base = web.image("disk.raw", seed=7, zero_blocks=(2,))
    with web.mount(None, "--chunk-size", "64K", "--stream-paused") as m:
        path = m.mnt / "disk.raw"
        data = base.read_bytes()
        for offset, length in ((0, 4096), (MIB - 7, 100), (SIZE - 9, 9)):
            assert direct_read(path, offset, length) == data[offset : offset + length]
        st = image_status(live_status(m.mnt), "disk.raw")
        assert 0 < st["local_bytes"] < SIZE
        assert run_corfs("stream", "resume", m.mnt).returncode == 0
        wait_complete(m.mnt, "disk.raw")
        assert sha256_file(path) == sha256_file(base)
        m.stop()
    # Offline, the cache alone holds the whole image.
    assert image_status(json.loads(run_corfs("status", web.cache, "--json").stdout), "disk.raw")[
        "fill_ratio"
    ] == pytest.approx(1.0)


def test_qemu_io_writes_and_reads(web: Web) -> None:
    web.image("disk.raw", 4 * MIB + 3 * 4096, seed=8)  # O_DIRECT wants a 4k-aligned size
    with web.mount(None, "--chunk-size", "64K", "--no-stream") as m:
        path = m.mnt / "disk.raw"
        commands = [
            "write -P 0xab 1M 64k",
            "write -P 0x5a 1000 5000",  # unaligned, inside chunk 0
            "write -P 0x33 131000 3000",  # across a chunk boundary
            "read -P 0xab 1M 64k",
            "read -P 0x5a 1000 5000",
            "read -P 0x33 131000 3000",
        ]
        args = ["qemu-io", "-f", "raw", "-n"]
        for c in commands:
            args += ["-c", c]
        result = _run(*args, path)
        out = result.stdout + result.stderr
        assert result.returncode == 0 and "fail" not in out.lower(), out
        m.stop()
    # After a remount the writes are there and the rest is still the base.
    expected = bytearray((web.root / "disk.raw").read_bytes())
    expected[MIB : MIB + 64 * KIB] = b"\xab" * (64 * KIB)
    expected[1000:6000] = b"\x5a" * 5000
    expected[131000:134000] = b"\x33" * 3000
    with web.mount(None, "--chunk-size", "64K", "--no-stream") as m:
        assert (m.mnt / "disk.raw").read_bytes() == bytes(expected)
        m.stop()


def test_resume_after_kill9_fetches_no_chunk_twice(web: Web) -> None:
    size = 8 * MIB
    base = web.image("disk.raw", size, seed=9)
    check_resume_after_kill9(web.mount, size, base, "--chunk-size", "256K")


# ---- a base that changes while mounted ----------------------------------------------------


def test_base_replaced_midway_gives_estale_never_mixed_bytes(web: Web) -> None:
    base = web.image("disk.raw", seed=10)
    old = base.read_bytes()
    chunk = 64 * KIB
    with web.mount(None, "--chunk-size", "64K", "--stream-paused") as m:
        path = m.mnt / "disk.raw"
        assert direct_read(path, 0, 2 * chunk) == old[: 2 * chunk]
        # Replace the file on the server: same size, other bytes, other mtime (nginx's ETag).
        new = web.root / "disk.raw.new"
        make_image(new, SIZE, seed=11)
        later = time.time() + 100
        os.utime(new, (later, later))
        os.replace(new, base)
        last = SIZE - 4096
        for _ in range(2):  # and stays so: no retry turns into bytes of the new version
            with pytest.raises(OSError) as info:
                direct_read(path, last, 4096)
            assert info.value.errno in (errno.ESTALE, errno.EIO), info.value
        st = wait_for(
            lambda: (s := image_status(live_status(m.mnt), "disk.raw"))["state"] == "error" and s,
            what="state error",
        )
        assert st["error"]
        # Local chunks still read right (the old version).
        assert direct_read(path, 0, 2 * chunk) == old[: 2 * chunk]
        assert direct_read(path, 100, 1000) == old[100:1100]
        m.stop()
    # The next mount refuses the stale cache instead of mixing versions: no image exposed.
    with web.mount(None, "--chunk-size", "64K", "--no-stream") as m:
        assert _names(m.mnt) == []
        assert "changed" in m.log_text()
        m.stop()


# ---- auth header, TLS ---------------------------------------------------------------------


def test_auth_header_from_env_not_in_argv_nor_log(nginx_server, tmp_path: Path) -> None:
    web = Web(nginx_server, tmp_path, under="auth/")
    base = web.image("disk.raw", 2 * MIB, seed=12)
    # Without the header nginx answers 403: a one-line error, and no cache made.
    refused = run_corfs("mount", web.url, web.cache, web.mnt, timeout=30)
    lazy_unmount(web.mnt)
    assert_one_line_error(refused, "denied")
    assert not web.cache.exists()
    env = {"CORFS_TEST_AUTH": "Authorization: Bearer x"}
    with web.mount(
        None, "--auth-header-env", "CORFS_TEST_AUTH", "--chunk-size", "64K", "-v", env=env
    ) as m:
        assert sha256_file(m.mnt / "disk.raw") == sha256_file(base)
        ps = _run("ps", "-ww", "-o", "args=", "-p", m.pid)
        assert "corfs" in ps.stdout and "CORFS_TEST_AUTH" in ps.stdout
        assert "Bearer" not in ps.stdout
        cmdline = Path(f"/proc/{m.pid}/cmdline").read_bytes()
        assert b"Bearer" not in cmdline
        wait_complete(m.mnt, "disk.raw")
        m.stop()
        assert "Bearer" not in m.log_text()


def test_a_base_signed_in_its_query_string_stays_out_of_ps_with_base_env(
    nginx_server, tmp_path: Path
) -> None:
    """A presigned URL's query string is a credential: on the command line every local user
    reads it in `ps`. With --base-env it is read from the environment instead."""
    web = Web(nginx_server, tmp_path, under="signed/")
    base = web.image("disk.raw", 2 * MIB, seed=14)
    signed = web.url + "disk.raw?X-Signature=s3cr3t-in-query"  # nginx serves it as the file
    env = {"CORFS_TEST_BASE": signed}
    with web.mount("-", "--base-env", "CORFS_TEST_BASE", "--daemon", env=env) as m:
        assert sha256_file(m.mnt / "disk.raw") == sha256_file(base)
        for pid in {m.pid, os.getpid()}:
            assert b"s3cr3t" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        ps = _run("ps", "-ww", "-e", "-o", "args=")
        assert "CORFS_TEST_BASE" in ps.stdout and "s3cr3t" not in ps.stdout
        status = run_corfs("status", m.mnt, "--json", check=True).stdout
        assert "disk.raw" in status and "s3cr3t" not in status
        m.stop()
        assert "s3cr3t" not in m.log_text()
    for args, extra_env, words in [
        (("-", "--base-env", "CORFS_TEST_UNSET"), {}, ("CORFS_TEST_UNSET", "not set")),
        ((signed, "--base-env", "CORFS_TEST_BASE"), env, ("'-'",)),
        (("-",), {}, ("--base-env",)),
    ]:
        result = run_corfs(
            "mount", args[0], web.cache, web.mnt, *args[1:], env=extra_env, timeout=30
        )
        lazy_unmount(web.mnt)
        line = assert_one_line_error(result, *words)
        assert "s3cr3t" not in line
        assert result.returncode == 2


@pytest.fixture(scope="module")
def tls_nginx(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls-mount")
    tls = make_tls(base / "pki")
    server = Nginx(root=base / "root", workdir=base / "work", tls=tls).start()
    yield server
    server.stop()


def test_https_with_ca_file(tls_nginx, tmp_path: Path) -> None:
    web = Web(tls_nginx, tmp_path)
    base = web.image("disk.raw", 2 * MIB, seed=13)
    assert web.url.startswith("https://")
    # The private CA is not trusted by default: one line, no cache.
    refused = run_corfs("mount", web.url, web.cache, web.mnt, timeout=30)
    lazy_unmount(web.mnt)
    assert_one_line_error(refused, "certificate", "--ca-file")
    assert not web.cache.exists()
    with web.mount(None, "--ca-file", tls_nginx.tls.ca_cert, "--chunk-size", "64K") as m:
        assert sha256_file(m.mnt / "disk.raw") == sha256_file(base)
        wait_complete(m.mnt, "disk.raw")
        m.stop()


# ---- errors at mount time -----------------------------------------------------------------


@pytest.fixture(scope="module")
def used_cache(nginx_server, tmp_path_factory) -> Path:
    """A cache that has served a mount (partly filled), to prove failed mounts leave it be."""
    web = Web(nginx_server, tmp_path_factory.mktemp("used-cache"))
    web.image("disk.raw", MIB, seed=14)
    with web.mount(None, "--chunk-size", "64K", "--no-stream") as m:
        direct_read(m.mnt / "disk.raw", 0, 4096)
        m.stop()
    return web.cache


MOUNT_ERRORS = [
    ("{nginx}no-such-dir/", "not found"),
    ("{nginx}no-such-image.raw", "not found"),
    ("{nginx}denied/", "denied"),
    ("http://no-such-host.invalid/", "resolve"),
    ("http://127.0.0.1:{closed}/", "refused"),
]


@pytest.mark.parametrize(("url", "words"), MOUNT_ERRORS, ids=[w for _, w in MOUNT_ERRORS])
def test_mount_error_is_one_line_and_leaves_cache_alone(
    nginx_server,
    used_cache: Path,
    tmp_path: Path,
    url: str,
    words: str,
) -> None:
    url = url.format(nginx=nginx_server.url, closed=free_port())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fresh = tmp_path / "new-cache"
    before = snapshot(used_cache)
    # A base that does not answer (DNS, refused) with a cache that holds images serves the
    # cache instead (tests/remote/test_base_down.py); with a fresh cache it refuses.
    unreachable = words in ("resolve", "refused")
    try:
        for cache in (fresh,) if unreachable else (fresh, used_cache):
            started = time.monotonic()
            result = run_corfs("mount", url, cache, mnt, "--io-timeout", "5", timeout=30)
            assert time.monotonic() - started < 15
            line = assert_one_line_error(result, words)
            assert result.returncode == 5, line
            assert line.startswith("corfs: ")
    finally:
        lazy_unmount(mnt)
    assert not fresh.exists()
    assert snapshot(used_cache) == before
