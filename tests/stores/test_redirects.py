"""Redirects under corfs's rules, against real nginx servers: https -> http is refused before
any request reaches the plain server; the auth header follows a redirect only within its
origin (the receiving servers log the Authorization header they saw); the hop count is
bounded; and an expired redirect target (a pre-signed URL) is resolved again from the image's
URL instead of failing for good."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from corfs.base import BaseOptions, open_base
from corfs.base.http import open_http_base
from corfs.base.http_policy import MAX_REDIRECTS
from corfs.errors import BaseUnavailable
from tests.hostile import HostileServer
from tests.servers import Nginx, TlsFiles, free_port, make_tls

TOKEN = "Bearer x"
DATA = os.urandom(300_000)


@dataclass
class Servers:
    tls: TlsFiles
    plain: Nginx  # http, logs Authorization
    tls_other: Nginx  # https on another port: another origin, logs Authorization
    tls_front: Nginx  # https, redirects
    plain_front: Nginx  # http, redirects

    def options(self) -> BaseOptions:
        return BaseOptions(io_timeout=3.0, ca_file=str(self.tls.ca_cert),
                           auth_header_env="CORFS_TEST_REDIRECT_AUTH")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    base = tmp_path_factory.mktemp("redirects")
    tls = make_tls(base / "pki")
    started: list[Nginx] = []

    def start(server: Nginx, root: Path) -> Nginx:
        (root / "auth").mkdir(parents=True, exist_ok=True)
        (root / "disk.raw").write_bytes(DATA)
        (root / "auth" / "disk.raw").write_bytes(DATA)
        started.append(server.start())
        return server

    try:
        plain = start(Nginx(root=base / "p", workdir=base / "pw", log_requests=True), base / "p")
        other = start(
            Nginx(root=base / "o", workdir=base / "ow", tls=tls, log_requests=True), base / "o"
        )
        redirects = f"""
    location = /down/disk.raw {{ return 302 http://127.0.0.1:{plain.port}/disk.raw; }}
    location = /cross/disk.raw {{ return 302 https://127.0.0.1:{other.port}/disk.raw; }}
    location = /same/disk.raw {{ return 302 /auth/disk.raw; }}
    location = /loop/disk.raw {{ return 302 /loop/disk.raw; }}
    location = /plaincross/disk.raw {{ return 302 http://127.0.0.1:{plain.port}/disk.raw; }}
    location = /mixed/mirrored.raw {{ return 302 http://127.0.0.1:{free_port()}/disk.raw; }}
"""
        mixed = base / "g" / "mixed"  # a dir base: good.raw here, mirrored.raw on a dead mirror
        mixed.mkdir(parents=True)
        (mixed / "good.raw").write_bytes(DATA)
        (mixed / "index.json").write_text(
            '{"images": [{"name": "good.raw"}, {"name": "mirrored.raw"}]}'
        )
        front = start(Nginx(root=base / "f", workdir=base / "fw", tls=tls, locations=redirects),
                      base / "f")
        pfront = start(Nginx(root=base / "g", workdir=base / "gw", locations=redirects),
                       base / "g")
        yield Servers(tls, plain, other, front, pfront)
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORFS_TEST_REDIRECT_AUTH", f"Authorization: {TOKEN}")


def test_https_to_http_is_refused_and_the_plain_server_sees_nothing(servers, token) -> None:
    before = len(servers.plain.authorizations())

    async def main() -> None:
        with pytest.raises(BaseUnavailable) as info:
            await open_base(servers.tls_front.url + "down/disk.raw", servers.options())
        assert "https to plain http" in str(info.value)

    trio.run(main)
    assert servers.plain.authorizations()[before:] == []


def test_same_origin_redirect_keeps_the_header(servers, token) -> None:
    async def main() -> None:
        store = await open_http_base(servers.tls_front.url + "same/disk.raw", servers.options())
        try:
            (image,) = await store.list_images()
            assert bytes(await image.read(1000, 5000)) == DATA[1000:6000]
            assert store.reader.plain.stats.answered == 1  # over TLS by the lean reader
        finally:
            await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("front", ["tls_front", "plain_front"])
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])
def test_cross_origin_redirect_works_without_the_header(servers, token, front: str,
                                                        lean: bool) -> None:
    """https -> https (another port) and http -> http: the target gets no Authorization, on
    the HEAD, the listing and every ranged read (lean reader included)."""
    target = servers.tls_other if front == "tls_front" else servers.plain
    path = "cross/disk.raw" if front == "tls_front" else "plaincross/disk.raw"
    before = len(target.authorizations())

    async def main() -> None:
        store = await open_http_base(getattr(servers, front).url + path, servers.options())
        store.reader.use_plain = lean
        try:
            (image,) = await store.list_images()
            for offset in (0, 100_000, 299_000):
                assert bytes(await image.read(offset, 1000)) == DATA[offset : offset + 1000]
            assert store.reader.plain.stats.answered == (3 if lean else 0)
        finally:
            await store.aclose()

    trio.run(main)
    seen = target.authorizations_since(before, 4)
    assert len(seen) >= 4  # HEAD and three reads reached the target
    assert all(TOKEN not in value for value in seen)


def test_redirect_loop_is_bounded(servers, token) -> None:
    async def main() -> None:
        with pytest.raises(BaseUnavailable) as info:
            await open_base(servers.tls_front.url + "loop/disk.raw", servers.options())
        assert f"more than {MAX_REDIRECTS} redirects" in str(info.value)

    trio.run(main)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])
def test_expired_redirect_target_is_resolved_again(servers, lean: bool) -> None:
    """A redirector points at /gone-if-missing/<generation>/disk.raw on nginx; the generation
    moves on (the old URL answers 403, like an expired pre-signed URL) and reads go on."""
    root = servers.plain.root / "gone-if-missing"
    gen = {"name": f"g1-{lean}"}
    (root / gen["name"]).mkdir(parents=True)
    (root / gen["name"] / "disk.raw").write_bytes(DATA)

    def route(method: str, path: str, headers: dict[str, str]):
        location = f"{servers.plain.url}gone-if-missing/{gen['name']}/disk.raw"
        return 302, [("Location", location), ("Content-Length", "0")], []

    redirector = HostileServer(route).start()

    async def main() -> None:
        store = await open_http_base(redirector.url + "disk.raw", BaseOptions(io_timeout=3.0))
        store.reader.use_plain = lean
        try:
            (image,) = await store.list_images()
            assert bytes(await image.read(0, 1000)) == DATA[:1000]
            asked = len(redirector.requests)
            new = f"g2-{lean}"
            (root / gen["name"]).rename(root / new)  # rename keeps mtime: same ETag
            gen["name"] = new
            assert bytes(await image.read(5000, 1000)) == DATA[5000:6000]
            asked_again = len(redirector.requests)
            assert asked_again > asked  # resolved again (the lean reader hands a 302 to httpx)
            assert bytes(await image.read(9000, 1000)) == DATA[9000:10000]
            assert len(redirector.requests) == asked_again  # the new target is used directly
        finally:
            await store.aclose()

    try:
        trio.run(main)
    finally:
        redirector.stop()


def test_an_image_redirected_to_a_mirror_that_does_not_answer_is_left_out_alone(
    servers, token, caplog: pytest.LogCaptureFixture
) -> None:
    """One bad image fails only itself: the base answers, one image's redirect target (a
    mirror at another origin) does not. Before, that failed the whole listing as a base that
    does not answer (a mount then served none of the base's images, and kept retrying)."""

    async def main() -> None:
        store = await open_base(servers.plain_front.url + "mixed/", servers.options())
        try:
            (image,) = await store.list_images()
            assert image.name == "good.raw"
            assert bytes(await image.read(0, 1000)) == DATA[:1000]
        finally:
            await store.aclose()

    trio.run(main)
    left_out = [r.getMessage() for r in caplog.records if "leaving out" in r.getMessage()]
    assert len(left_out) == 1 and "'mirrored.raw'" in left_out[0], left_out
    assert "redirected to" in left_out[0] and "connection refused" in left_out[0]


BAD_PORT = "http://127.0.0.1:99999/disk.raw"  # parses as a URL; its port does not


def test_a_redirect_to_a_port_beyond_65535_fails_only_its_image(token) -> None:
    """urlsplit parses such a Location; its .port raises ValueError, which escaped the store
    (describe_url, origin_of): a dir base listing one such image failed the whole mount with
    a traceback, and a read redirected so (with an auth header) was an internal error."""
    redirect_reads = {"on": False}

    def route(method: str, path: str, headers: dict[str, str]):
        if path == "/index.json":
            doc = b'{"images": [{"name": "bad.raw"}, {"name": "good.raw"}]}'
            return 200, [("Content-Length", str(len(doc)))], [doc]
        if path == "/bad.raw" or (redirect_reads["on"] and method == "GET"):
            return 302, [("Location", BAD_PORT), ("Content-Length", "0")], []
        if path != "/good.raw":
            return None
        if method == "HEAD":
            return 200, [("Content-Length", str(len(DATA))), ("ETag", '"e"')], []
        first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
        return 206, [("Content-Range", f"bytes {first}-{last}/{len(DATA)}"), ("ETag", '"e"'),
                     ("Content-Length", str(last - first + 1))], [DATA[first : last + 1]]

    server = HostileServer(route).start()
    options = BaseOptions(io_timeout=3.0, auth_header_env="CORFS_TEST_REDIRECT_AUTH")

    async def main() -> None:
        store = await open_base(server.url, options)
        try:
            (image,) = await store.list_images()
            assert image.name == "good.raw"
            assert bytes(await image.read(0, 1000)) == DATA[:1000]
            redirect_reads["on"] = True
            with pytest.raises(BaseUnavailable, match="bad port"):
                await image.read(4096, 1000)
        finally:
            await store.aclose()

    try:
        trio.run(main)
    finally:
        server.stop()
