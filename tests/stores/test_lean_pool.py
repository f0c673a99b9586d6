"""The lean reader's idle pool after the server closed its idle keep-alive
connections (nginx does after keepalive_timeout): a healthy server must not fail a read."""

from __future__ import annotations

import socket
import threading
import time

import trio

from corfs.base.http_wire import PlainReader, Validator
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
