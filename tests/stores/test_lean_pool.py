"""The lean reader's idle pool after the server closed its idle keep-alive
connections (nginx does after keepalive_timeout): a healthy server must not fail a read."""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from corfs.base import BaseOptions
from corfs.base.http import open_http_base
from corfs.base.http_wire import PlainReader, Validator
from tests.hostile import serve
from tests.loopback import start_loopback_server

SIZE = 1 << 20


def _pattern(offset: int, length: int) -> bytes:
    return bytes((offset + i) % 251 for i in range(length))


class ClosesIdleServer:
    """Answers ranged GETs as keep-alive (no Connection: close) but closes each connection
    `idle` seconds after its answer, as a server's keepalive timeout does."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.connections = 0
        self.lock = threading.Lock()
        self.server = start_loopback_server(self._serve)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/disk.raw"

    def _serve(self, sock: socket.socket) -> None:
        with self.lock:
            self.connections += 1
        buf = b""
        try:
            while True:
                sock.settimeout(self.idle)
                try:
                    while b"\r\n\r\n" not in buf:
                        chunk = sock.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                except TimeoutError:
                    return  # idle too long: close, as nginx does
                head, _, buf = buf.partition(b"\r\n\r\n")
                headers = dict(
                    line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line
                )
                first, last = map(int, headers["Range"].removeprefix("bytes=").split("-"))
                body = _pattern(first, last - first + 1)
                sock.sendall(
                    (f"HTTP/1.1 206 Partial\r\nContent-Length: {len(body)}\r\n"
                     f"Content-Range: bytes {first}-{last}/{SIZE}\r\n\r\n").encode() + body
                )
        except OSError:
            return
        finally:
            sock.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_read_after_the_server_closed_its_idle_connections_succeeds() -> None:
    server = ClosesIdleServer(idle=0.3)
    reader = PlainReader(2.0, None)
    validator = Validator(SIZE, None, None)
    try:

        async def main() -> None:
            try:
                async with trio.open_nursery() as nursery:  # a burst: 4 pooled connections
                    for i in range(4):
                        nursery.start_soon(reader.read_range, server.url, validator, i * 4096, 16)
                assert len(reader.idle[("http", "127.0.0.1", server.server.server_address[1])]) == 4
                await trio.sleep(1.0)  # the server closes them all
                for offset in (0, 8192):  # a lone reader after the pause
                    data = await reader.read_range(server.url, validator, offset, 16)
                    assert data is not None and bytes(data) == _pattern(offset, 16)
            finally:
                reader.close_idle()

        start = time.monotonic()
        trio.run(main)
        assert time.monotonic() - start < 5
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("validators", "late"), [(False, False), (True, False), (True, True)],
    ids=["no-validators", "etags", "etags-copy-comes-late"],
)
def test_a_pooled_connection_holding_an_answer_nobody_asked_for_is_not_reused(
    hostile, validators: bool, late: bool
) -> None:
    """A server that sends one answer twice (a buggy server or proxy; the brief's
    "unsolicited extra response") leaves the copy unread on a keep-alive connection the lean
    reader pools: it reads exactly Content-Length bytes and never looks at what follows. The
    next read on that connection takes the copy as its own answer. Two images of one
    directory share the reader and its pool, and a read of b.raw at the offset a.raw was read
    at got a.raw's bytes (stored in b.raw's cache: seen through a mount), or, when the
    images have ETags, BaseChanged, which makes b.raw ESTALE for the mount's life. httpx
    drops a pooled connection that is readable while idle; the lean reader must not reuse
    one either (or must at least not take its bytes as the answer). `late`: the next read is
    sent at once, before the copy came (it passes the idle check): its ETag tells it is not
    b.raw's answer, and the read is asked again on a fresh connection (review finding). (With
    no validators and the same range, a copy that late cannot be told from the answer.)"""
    images = {"a.raw": os.urandom(SIZE), "b.raw": os.urandom(SIZE)}
    index = json.dumps({"images": [{"name": n} for n in images]}).encode()

    def route(method: str, path: str, headers: dict[str, str]):
        name = path.removeprefix("/d/")
        if name == "index.json":
            return 200, [("Content-Length", str(len(index)))], [index]
        if name not in images:
            return None
        tag = [("ETag", f'"{name}"')] if validators else []
        if method == "HEAD":
            return 200, [("Content-Length", str(SIZE)), *tag], []
        first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
        body = images[name][first : last + 1]
        head = [("Content-Range", f"bytes {first}-{last}/{SIZE}"),
                ("Content-Length", str(len(body))), *tag]

        def again() -> Iterator[bytes]:  # the whole answer once more, a moment later
            time.sleep(0.05)
            yield ("HTTP/1.1 206 X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head)
                   + "\r\n").encode() + body

        return 206, head, itertools.chain([body], again() if name == "a.raw" else [])

    server = serve(hostile, route)

    async def main() -> None:
        store = await open_http_base(server.url + "d/", BaseOptions(io_timeout=3.0))
        try:
            a, b = await store.list_images()
            assert bytes(await a.read(0, 65536)) == images["a.raw"][:65536]
            if not late:
                await trio.sleep(0.3)  # the copy is in; the connection sits in the pool
            got = bytes(await b.read(0, 65536))
            assert got != images["a.raw"][:65536], "a.raw's bytes served as b.raw's"
            assert got == images["b.raw"][:65536]
        finally:
            await store.aclose()

    trio.run(main)
