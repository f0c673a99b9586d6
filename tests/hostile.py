"""A hostile HTTP/1.1 server for tests, threads on 127.0.0.1: each request is answered by a
route function, which may send absurd headers, huge bodies (generated, never allocated) or
trickle. It counts the body bytes it actually got into the socket, so a test can assert that a
client stopped reading early."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from tests.loopback import start_loopback_server

# A route: (method, path, request headers) -> (status, headers, body pieces), or None for 404.
Answer = tuple[int, list[tuple[str, str]], Iterable[bytes]]
Route = Callable[[str, str, dict[str, str]], Answer | None]

Headers = list[tuple[str, str]]

MiB = 1 << 20


def exact_range(data: bytes) -> tuple[Headers, bytes]:
    """A range answered as it should be: its bytes and their Content-Length."""
    return [("Content-Length", str(len(data)))], data


def ranged_image(
    data: bytes,
    shape: Callable[[bytes], tuple[Headers, bytes]] = exact_range,
    *,
    read_etag: str = '"e"',
) -> Route:
    """/disk.raw holding `data`: its HEAD tells the size with ETag "e"; a ranged GET is
    answered 206 with the range's Content-Range, ETag `read_etag`, and the headers and body
    `shape` makes of the range's bytes."""

    def route(method: str, path: str, headers: dict[str, str]) -> Answer | None:
        if path != "/disk.raw":
            return None
        if method == "HEAD":
            return 200, [("Content-Length", str(len(data))), ("ETag", '"e"')], []
        first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
        more, body = shape(data[first : last + 1])
        return 206, [
            ("Content-Range", f"bytes {first}-{last}/{len(data)}"), ("ETag", read_etag), *more
        ], [body]

    return route


def huge_body(total: int, piece: int = 64 << 10) -> Iterator[bytes]:
    """`total` bytes in pieces, one buffer reused: serving 600 MiB costs 64 KiB."""
    block = b"x" * piece
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        yield block if n == piece else block[:n]
        sent += n


def trickle(data: bytes, every: float) -> Iterator[bytes]:
    for i in range(len(data)):
        time.sleep(every)
        yield data[i : i + 1]


def request_heads(sock: socket.socket) -> Iterator[list[str]]:
    """The head lines of each request on `sock` (bodies are not read: GET and HEAD only),
    until the client closes."""
    buf = bytearray()
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
        cut = buf.index(b"\r\n\r\n")
        lines = bytes(buf[:cut]).decode("latin-1").split("\r\n")
        del buf[: cut + 4]
        yield lines


@dataclass
class HostileServer:
    route: Route
    port: int = 0
    body_bytes_sent: int = 0
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: socketserver.ThreadingTCPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> HostileServer:
        self._server = start_loopback_server(self._serve)
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _serve(self, sock: socket.socket) -> None:
        try:
            for lines in request_heads(sock):
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                with self._lock:
                    self.requests.append((method, path, headers))
                answer = self.route(method, path, headers)
                if answer is None:
                    answer = (404, [("Content-Length", "0")], [])
                status, rheaders, body = answer
                head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in rheaders)
                sock.sendall((head + "\r\n").encode("latin-1"))
                if method == "HEAD":
                    continue
                for piece in body:
                    sock.sendall(piece)
                    with self._lock:
                        self.body_bytes_sent += len(piece)
                if not any(k.lower() == "content-length" for k, _ in rheaders):
                    return  # a body delimited by the end of the connection
        except OSError:
            return
        finally:
            sock.close()


def serve(servers: list[HostileServer], route: Route) -> HostileServer:
    """A HostileServer answering with `route`, stopped with `servers` (the store tests'
    `hostile` fixture)."""
    server = HostileServer(route).start()
    servers.append(server)
    return server


# A ranged GET's first and last byte -> the raw answer, and whether the connection ends then
Answer = Callable[[int, int], tuple[bytes, bool]]


class RawAnswerServer:
    """/disk.raw of `size` bytes whose HEAD is plain (ETag "e") and whose ranged GETs are
    answered with the raw bytes `answer` makes, on a connection kept open afterwards
    (keep-alive) unless `answer` says to close it; then it lingers `linger` seconds first
    without reading another request (a server that closes in its own time)."""

    def __init__(self, answer: Answer, size: int, linger: float = 0.0) -> None:
        self.answer = answer
        self.size = size
        self.linger = linger
        self.connections = 0
        self._lock = threading.Lock()
        self.server = start_loopback_server(self._serve)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/disk.raw"

    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            self.connections += 1
        try:
            for lines in request_heads(sock):
                if lines[0].startswith("HEAD"):
                    sock.sendall(
                        f'HTTP/1.1 200 OK\r\nContent-Length: {self.size}\r\nETag: "e"\r\n\r\n'
                        .encode()
                    )
                    continue
                (wanted,) = [x for x in lines if x.lower().startswith("range:")]
                first, last = map(int, wanted.split("=", 1)[1].split("-"))
                raw, close = self.answer(first, last)
                sock.sendall(raw)
                if close:
                    time.sleep(self.linger)
                    return
        except OSError:
            return
        finally:
            sock.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
