"""The lean reader connects as httpx does: to every address of the base's host name in turn
(trio's happy eyeballs), not only the first. A name whose first address the server does not
listen on (localhost as ::1 first, a server bound to IPv4 only) opened through httpx and then
failed every read with EIO. The name here resolves, through trio's resolver hook, to ::1
(where nothing listens: refused at once) and then 127.0.0.1."""

from __future__ import annotations

import socket
from typing import Any

import trio

from corfs.base import BaseOptions
from corfs.base.http import open_http_base
from tests.hostile import HostileServer

SIZE = 1 << 20
DATA = bytes(i % 251 for i in range(SIZE))
NAME = "dual-stack.corfs.test"


class DualStackName(trio.abc.HostnameResolver):
    """NAME is ::1 first, then 127.0.0.1; any other name resolves as usual."""

    async def getaddrinfo(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
        flags: int = 0,
    ) -> Any:
        if host in (NAME, NAME.encode()):
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            ]
        return await trio.to_thread.run_sync(
            socket.getaddrinfo, host, port, family, type, proto, flags
        )

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        return await trio.to_thread.run_sync(socket.getnameinfo, sockaddr, flags)


def _image(method: str, path: str, headers: dict[str, str]):
    if path != "/disk.raw":
        return None
    if method == "HEAD":
        return 200, [("Content-Length", str(SIZE)), ("ETag", '"e"')], []
    first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
    return 206, [("Content-Length", str(last - first + 1)), ("ETag", '"e"'),
                 ("Content-Range", f"bytes {first}-{last}/{SIZE}")], [DATA[first : last + 1]]


def test_reads_reach_a_server_on_the_second_address_of_its_name() -> None:
    server = HostileServer(_image).start()

    async def main() -> None:
        trio.socket.set_custom_hostname_resolver(DualStackName())
        store = await open_http_base(f"http://{NAME}:{server.port}/disk.raw",
                                     BaseOptions(io_timeout=3.0))
        try:
            (image,) = await store.list_images()
            for offset in (0, 4096, SIZE - 100):
                assert bytes(await image.read(offset, 100)) == DATA[offset : offset + 100]
            assert store.reader.plain.stats.answered == 3  # by the lean reader itself
        finally:
            await store.aclose()

    try:
        trio.run(main)
    finally:
        server.stop()
