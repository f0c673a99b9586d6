"""The HTTP store against a fault-injecting proxy in front of nginx, and its open errors, auth
header and TLS. Every fault gives the right error class, or (server ignoring Range) the right
bytes; wrong bytes are never returned."""

from __future__ import annotations

import gc
import os
import subprocess
import time

import pytest
import trio

from corfs.base import BaseOptions, http_wire, open_base
from corfs.base.http import HttpBase, open_http_base
from corfs.base.http_wire import LeanStatistics, PlainReader, Validator, tls_context
from corfs.errors import (
    BaseAccessDenied,
    BaseChanged,
    BaseError,
    BaseNotFound,
    BaseUnavailable,
    TransientBaseError,
    UsageError,
)
from tests.servers import Nginx, TlsFiles, free_port, make_tls

FAST = BaseOptions(io_timeout=3.0)  # stall timeout 1 s: tight, yet safe on a busy machine
MiB = 1 << 20
RANGES = [(0, 4096), (MiB - 7, MiB + 14), (3 * MiB, 333), (12345, 1)]


async def open_site(site, lean: bool) -> tuple[HttpBase, object]:
    store = await open_http_base(site.url, FAST)
    store.reader.use_plain = lean
    (image,) = await store.list_images()
    return store, image


async def check_reads(image, data: bytes) -> None:
    for offset, length in RANGES:
        assert bytes(await image.read(offset, length)) == data[offset : offset + length]


ERROR_FAULTS = [
    ("drop", TransientBaseError),
    ("reset", TransientBaseError),
    ("stall", TransientBaseError),
    ("stall_body", TransientBaseError),
    ("status:500", TransientBaseError),
    ("status:503", TransientBaseError),
    ("status:429", TransientBaseError),
    ("status:404", BaseNotFound),
    ("status:403", BaseAccessDenied),
    ("status:412", BaseChanged),
    ("truncate", TransientBaseError),
    ("wrong_range", TransientBaseError),
]


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])
@pytest.mark.parametrize(("fault", "error"), ERROR_FAULTS, ids=[f for f, _ in ERROR_FAULTS])
def test_fault_gives_error_then_recovers(site, lean: bool, fault: str, error: type) -> None:
    async def main() -> None:
        store, image = await open_site(site, lean)
        try:
            await check_reads(image, site.data)  # warm: pooled keep-alive connections exist
            site.proxy.inject(fault, fault)  # twice: a resend on a fresh connection fails too
            start = time.monotonic()
            with pytest.raises(error):
                await image.read(MiB, MiB)
            assert time.monotonic() - start < 6
            site.proxy.faults.clear()
            await check_reads(image, site.data)
        finally:
            await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])
def test_server_ignoring_range_gives_right_bytes(site, lean: bool) -> None:
    async def main() -> None:
        store, image = await open_site(site, lean)
        try:
            for offset, length in RANGES:
                site.proxy.inject("ignore_range", "ignore_range")
                assert (
                    bytes(await image.read(offset, length)) == site.data[offset : offset + length]
                )
            assert any(f == "ignore_range" for _, f in site.proxy.requests)
        finally:
            await store.aclose()

    trio.run(main)


def test_server_ignoring_range_after_change_is_base_changed(site) -> None:
    async def main() -> None:
        store, image = await open_site(site, lean=False)
        try:
            path = site.root / "disk.raw"
            path.write_bytes(bytes(len(site.data)))
            os.utime(path, (1_500_000_000, 1_500_000_000))
            site.proxy.inject("ignore_range")
            with pytest.raises(BaseChanged):
                await image.read(0, 4096)
        finally:
            await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])
def test_slow_answer_within_stall_timeout_is_fine(site, lean: bool) -> None:
    async def main() -> None:
        store, image = await open_site(site, lean)
        try:
            site.proxy.inject("delay:0.3")
            await check_reads(image, site.data)
        finally:
            await store.aclose()

    trio.run(main)


def test_keepalive_closed_by_server_is_resent_once(site) -> None:
    async def main() -> None:
        store, image = await open_site(site, lean=True)
        try:
            for _ in range(5):
                site.proxy.inject("close_after")
                await check_reads(image, site.data)
        finally:
            await store.aclose()

    trio.run(main)


# ---- errors when opening ----


@pytest.mark.parametrize(
    ("url", "error", "words"),
    [
        ("http://no-such-host.invalid/", BaseUnavailable, "resolve"),
        ("http://no-such-host.invalid/disk.raw", BaseUnavailable, "resolve"),
        ("http://127.0.0.1:{closed}/", BaseUnavailable, "refused"),
        ("http://127.0.0.1:{closed}/disk.raw", BaseUnavailable, "refused"),
        ("{nginx}no-such-dir/", BaseNotFound, "not found"),
        ("{nginx}no-such-image.raw", BaseNotFound, "not found"),
        ("{nginx}denied/", BaseAccessDenied, "denied"),
        ("{nginx}denied/disk.raw", BaseAccessDenied, "denied"),
        ("ftp://127.0.0.1/", UsageError, "unsupported"),
    ],
)
def test_open_errors(nginx_server, url: str, error: type, words: str) -> None:
    (nginx_server.root / "denied").mkdir(exist_ok=True)
    (nginx_server.root / "denied" / "disk.raw").write_bytes(b"secret")
    url = url.format(closed=free_port(), nginx=nginx_server.url)

    async def main() -> None:
        with pytest.raises(error) as info:
            await open_base(url, FAST)
        message = str(info.value)
        assert words in message
        assert "\n" not in message
        if error is not UsageError:
            assert url.split("://")[1].split("/")[0] in message  # names the server

    trio.run(main)


def test_credentials_in_url_are_refused_without_echo(nginx_server) -> None:
    url = nginx_server.url.replace("http://", "http://user:hunter2@")

    async def main() -> None:
        with pytest.raises(UsageError) as info:
            await open_base(url, FAST)
        assert "hunter2" not in str(info.value)

    trio.run(main)


def test_auth_header_from_env(nginx_server, monkeypatch) -> None:
    (nginx_server.root / "auth").mkdir(exist_ok=True)
    data = os.urandom(300_000)
    (nginx_server.root / "auth" / "disk.raw").write_bytes(data)
    url = nginx_server.url + "auth/"

    async def main() -> None:
        with pytest.raises(BaseAccessDenied) as info:
            await open_base(url, FAST)
        monkeypatch.setenv("CORFS_TEST_AUTH", "Authorization: Bearer wrong-token-1234")
        options = BaseOptions(io_timeout=3.0, auth_header_env="CORFS_TEST_AUTH")
        with pytest.raises(BaseAccessDenied) as info:
            await open_base(url, options)
        assert "wrong-token-1234" not in str(info.value)
        monkeypatch.setenv("CORFS_TEST_AUTH", "Authorization: Bearer x")
        store = await open_http_base(url, options)
        try:
            (image,) = await store.list_images()
            for lean in (True, False):
                store.reader.use_plain = lean
                assert bytes(await image.read(1000, 200_000)) == data[1000:201_000]
            assert await store.read_object("disk.raw", len(data)) == data
        finally:
            await store.aclose()
        monkeypatch.setenv("CORFS_TEST_AUTH", "no colon here")
        with pytest.raises(UsageError) as info:
            await open_base(url, options)
        assert "no colon" not in str(info.value)
        monkeypatch.delenv("CORFS_TEST_AUTH")
        with pytest.raises(UsageError):
            await open_base(url, options)

    trio.run(main)


@pytest.fixture(scope="module")
def tls_nginx(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls")
    tls = make_tls(base / "pki")
    server = Nginx(root=base / "root", workdir=base / "work", tls=tls).start()
    (server.root / "disk.raw").write_bytes(b"0123456789" * 100_000)
    yield server
    server.stop()


def test_tls_verified_by_default_and_ca_file_accepted(tls_nginx) -> None:
    async def main() -> None:
        with pytest.raises(BaseUnavailable) as info:
            await open_base(tls_nginx.url, FAST)
        assert "certificate" in str(info.value)
        options = BaseOptions(io_timeout=3.0, ca_file=str(tls_nginx.tls.ca_cert))
        store = await open_base(tls_nginx.url, options)
        try:
            (image,) = await store.list_images()
            assert image.size == 1_000_000
            assert bytes(await image.read(999_990, 10)) == b"0123456789"
            data = b"0123456789" * 100_000
            assert bytes(await image.read(3, 700_000)) == data[3:700_003]
            # Both reads over TLS by the lean reader, on one pooled connection.
            assert image.reader.plain.stats == LeanStatistics(answered=2, handed_back=0)
            assert [len(c) for c in image.reader.plain.idle.values()] == [1]
        finally:
            await store.aclose()
        with pytest.raises(UsageError):
            await open_base(tls_nginx.url, BaseOptions(ca_file="/nonexistent/ca.pem"))

    trio.run(main)


def test_a_tls_connection_is_reused_read_after_read(tls_nginx, monkeypatch) -> None:
    """A pooled connection is checked for bytes nobody asked for before it is reused
    (test_lean_pool.py); over TLS the server's own records (TLS 1.3 session tickets) may
    still arrive after an answer, and must not make every read a new handshake."""
    made = 0
    real = http_wire.connect

    async def counted(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        nonlocal made
        made += 1
        return await real(*args, **kw)

    monkeypatch.setattr(http_wire, "connect", counted)
    data = b"0123456789" * 100_000

    async def main() -> None:
        options = BaseOptions(io_timeout=3.0, ca_file=str(tls_nginx.tls.ca_cert))
        store = await open_base(tls_nginx.url, options)
        try:
            (image,) = await store.list_images()
            for offset in range(0, 20 * 4096, 4096):
                assert bytes(await image.read(offset, 4096)) == data[offset : offset + 4096]
                await trio.sleep(0.02)  # room for anything the server sends after
            assert image.reader.plain.stats.answered == 20
        finally:
            await store.aclose()

    trio.run(main)
    assert made == 1


def _lean_read(url: str, ca_file: str | None) -> bytes:
    reader = PlainReader(1.0, None, tls_context(ca_file))

    async def main() -> bytes:
        try:
            data = await reader.read_range(url, Validator(1_000_000, None, None), 0, 10)
            assert data is not None
            return bytes(data)
        finally:
            reader.close_idle()

    return trio.run(main)


def test_lean_tls_verifies_the_certificate_and_the_host_name(tls_nginx, tmp_path) -> None:
    """The lean reader alone (no httpx listing before it): an unknown CA and a certificate for
    another name are refused in one clear line; with --ca-file's CA the bytes come."""
    url = tls_nginx.url + "disk.raw"
    assert _lean_read(url, str(tls_nginx.tls.ca_cert)) == b"0123456789"
    gc.collect()
    descriptors = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(BaseUnavailable) as info:
            _lean_read(url, None)
        assert "certificate verification failed" in str(info.value)
        assert "\n" not in str(info.value)
    # A failed handshake closes its connection at once (its socket's duplicate too).
    assert len(os.listdir("/proc/self/fd")) == descriptors
    pki = tls_nginx.tls.ca_cert.parent
    other = TlsFiles(tls_nginx.tls.ca_cert, tmp_path / "other.pem", tmp_path / "other.key")
    for args in (
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=elsewhere.example",
         "-keyout", str(other.key), "-out", str(tmp_path / "other.csr")],
        ["x509", "-req", "-in", str(tmp_path / "other.csr"), "-CA", str(pki / "ca.pem"),
         "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "2",
         "-extfile", str(tmp_path / "ext.cnf"), "-out", str(other.cert)],
    ):
        (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:elsewhere.example\n")
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    server = Nginx(root=tls_nginx.root, workdir=tmp_path / "work", tls=other).start()
    try:
        with pytest.raises(BaseUnavailable) as info:
            _lean_read(server.url + "disk.raw", str(tls_nginx.tls.ca_cert))
        assert "not valid for this host name" in str(info.value)
        options = BaseOptions(io_timeout=3.0, ca_file=str(tls_nginx.tls.ca_cert))
        with pytest.raises(BaseUnavailable) as info:  # httpx, listing: the same line
            trio.run(open_base, server.url, options)
        assert "not valid for this host name" in str(info.value)
    finally:
        server.stop()


def test_lean_tls_resends_once_on_a_connection_the_server_closed(tls_nginx, tmp_path) -> None:
    """nginx closes an idle TLS keep-alive connection after 1 s: the next read finds the pooled
    connection dead and is resent on a fresh one, still by the lean reader."""
    server = Nginx(root=tls_nginx.root, workdir=tmp_path / "work", tls=tls_nginx.tls,
                   locations="keepalive_timeout 1s;").start()
    options = BaseOptions(io_timeout=3.0, ca_file=str(tls_nginx.tls.ca_cert))

    async def main() -> None:
        store = await open_http_base(server.url + "disk.raw", options)
        try:
            (image,) = await store.list_images()
            assert bytes(await image.read(10, 10)) == b"0123456789"
            await trio.sleep(1.5)
            assert bytes(await image.read(20, 10)) == b"0123456789"
            assert store.reader.plain.stats == LeanStatistics(answered=2, handed_back=0)
        finally:
            await store.aclose()

    try:
        trio.run(main)
    finally:
        server.stop()


def test_index_json_preferred_over_autoindex(nginx_server) -> None:
    d = nginx_server.root / "indexed"
    d.mkdir(exist_ok=True)
    (d / "a.raw").write_bytes(b"a" * 10)
    (d / "hidden.raw").write_bytes(b"h")
    (d / "index.json").write_text('{"images": [{"name": "a.raw", "size": 10}]}')

    async def main() -> None:
        store = await open_base(nginx_server.url + "indexed/", FAST)
        try:
            assert [(i.name, i.size) for i in await store.list_images()] == [("a.raw", 10)]
        finally:
            await store.aclose()

    trio.run(main)


def test_an_index_entry_that_names_nothing_costs_only_itself(nginx_server) -> None:
    """index.json is written by hand and by other tools too: one entry with no name, or that
    is no object, made the whole index "not a valid image index" and the base served nothing.
    Now the image entries are served, as publish (corfs.manifest.parse_index) reads them."""
    d = nginx_server.root / "oddindex"
    d.mkdir(exist_ok=True)
    (d / "a.raw").write_bytes(b"a" * 10)
    (d / "b.raw").write_bytes(b"b" * 20)
    (d / "index.json").write_text(
        '{"images": [{"size": 3}, "c.raw", {"name": "a.raw", "size": null}, {"name": 5},'
        ' {"name": "b.raw", "size": "20"}]}'
    )

    async def main() -> None:
        store = await open_base(nginx_server.url + "oddindex/", FAST)
        try:
            listed = [(i.name, i.size) for i in await store.list_images()]
            assert listed == [("a.raw", 10), ("b.raw", 20)]
        finally:
            await store.aclose()

    trio.run(main)


def test_listing_that_is_not_json_is_a_clear_error(nginx_server) -> None:
    d = nginx_server.root / "htmlindex"
    d.mkdir(exist_ok=True)
    (d / "index.html").write_text("<html>hello</html>")

    async def main() -> None:
        with pytest.raises(Exception) as info:
            await open_base(nginx_server.url + "htmlindex/", FAST)
        assert "JSON" in str(info.value)

    trio.run(main)


def test_listing_nested_too_deep_is_a_clear_error(nginx_server) -> None:
    """Deep nesting makes json.loads raise RecursionError, not ValueError: a BaseError with
    one line, not a traceback (an index.json of '[' ..., or an autoindex answering so)."""
    d = nginx_server.root / "nestedindex"
    d.mkdir(exist_ok=True)
    (d / "index.json").write_text("[" * 200_000)

    async def main() -> None:
        with pytest.raises(BaseError) as info:
            await open_base(nginx_server.url + "nestedindex/", FAST)
        assert "index.json" in str(info.value)

    trio.run(main)
