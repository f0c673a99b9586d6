"""A fault-injecting HTTP/1.1 proxy for tests: threads on 127.0.0.1 in front of nginx (or moto).
Each client request is forwarded on a fresh upstream connection and the answer relayed on
the client's keep-alive connection, unless a queued fault says otherwise.

Faults apply, in order, to the next requests that match (by default only GETs with a Range
header, so listings and HEADs pass through):
    drop          close the connection without answering
    reset         close with RST (SO_LINGER 0)
    stall         never answer (until the proxy stops)
    stall_body    send the head and half the body, then go silent
    status:N      answer N with an empty body (500, 503, 429 ...)
    truncate      send the head unchanged and half the body, then close
    wrong_range   shift the Content-Range by one byte (body unchanged)
    ignore_range  strip Range / If-Range / If-Match: upstream answers 200 with the whole body
    delay:S       wait S seconds, then relay normally
    close_after   relay normally, then close the connection (a keep-alive the server ended)
    missing_is_403  relay, but a 404 becomes a 403 AccessDenied: what S3 answers for a key
                  that is not there to a client without the ListBucket permission

`match` (a predicate on the request line, e.g. 'PUT /bucket/key HTTP/1.1') picks the requests
faults apply to instead (any method).
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.loopback import start_loopback_server


def _read_head(sock: socket.socket, buf: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    cut = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:cut])
    del buf[:cut]
    return head


def _split_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers.append((k.strip(), v.strip()))
    return lines[0], headers


def _join_head(first: str, headers: list[tuple[str, str]]) -> bytes:
    return ("\r\n".join([first, *(f"{k}: {v}" for k, v in headers)]) + "\r\n\r\n").encode("latin-1")


@dataclass
class FaultProxy:
    upstream_port: int
    only_ranged: bool = True
    port: int = 0
    faults: list[str] = field(default_factory=list)
    match: Callable[[str], bool] | None = None
    requests: list[tuple[str, str]] = field(default_factory=list)  # (request line, fault)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: socketserver.ThreadingTCPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def inject(self, *faults: str) -> None:
        with self._lock:
            self.faults.extend(faults)

    def _next_fault(self, first: str, headers: list[tuple[str, str]]) -> str:
        ranged = any(k.lower() == "range" for k, _ in headers)
        with self._lock:
            fault = ""
            if self.match is not None:
                eligible = self.match(first)
            else:
                eligible = first.startswith("GET ") and (ranged or not self.only_ranged)
            if self.faults and eligible:
                fault = self.faults.pop(0)
            self.requests.append((first, fault))
        return fault

    def start(self) -> FaultProxy:
        self._server = start_loopback_server(self._serve)
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _upstream(self, request: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        with socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
            up.sendall(request)
            data = bytearray()
            while chunk := up.recv(1 << 20):
                data += chunk
        buf = bytearray(data)
        head = _read_head_from(buf)
        first, headers = _split_head(head)
        return first, headers, bytes(buf)

    def _serve(self, client: socket.socket) -> None:
        buf = bytearray()
        try:
            while not self._stop.is_set():
                head = _read_head(client, buf)
                if head is None:
                    return
                first, headers = _split_head(head)
                length = int(next((v for k, v in headers if k.lower() == "content-length"), 0))
                if any(k.lower() == "expect" and v.lower() == "100-continue" for k, v in headers):
                    # As an HTTP/1.1 server does (botocore asks it of every PutObject): the
                    # client waited a second for it before it sent the body.
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                while len(buf) < length:
                    buf += client.recv(65536)
                body, buf[:] = bytes(buf[:length]), buf[length:]
                fault = self._next_fault(first, headers)
                if not self._answer(client, first, headers, body, fault):
                    return
        except OSError:
            return
        finally:
            client.close()

    def _answer(
        self,
        client: socket.socket,
        first: str,
        headers: list[tuple[str, str]],
        body: bytes,
        fault: str,
    ) -> bool:
        """Relay one request with its fault; False when the connection must end."""
        if fault == "drop":
            return False
        if fault == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if fault == "stall":
            self._stop.wait()
            return False
        if fault.startswith("status:"):
            code = int(fault.split(":")[1])
            extra = "Retry-After: 1\r\n" if code in (429, 503) else ""
            client.sendall(f"HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\n{extra}\r\n".encode())
            return True
        if fault.startswith("delay:"):
            time.sleep(float(fault.split(":")[1]))
        drop = {"connection", "keep-alive", "proxy-connection", "expect"}  # body in hand
        if fault == "ignore_range":
            drop |= {"range", "if-range", "if-match"}
        fwd = [(k, v) for k, v in headers if k.lower() not in drop] + [("Connection", "close")]
        status, rheaders, rbody = self._upstream(_join_head(first, fwd) + body)
        rheaders = [(k, v) for k, v in rheaders if k.lower() not in ("connection", "keep-alive")]
        if fault == "missing_is_403" and status.split()[1] == "404":
            status, rbody = "HTTP/1.1 403 Forbidden", b"" if first.startswith("HEAD ") else (
                b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                b"<Message>Access Denied</Message></Error>"
            )
            rheaders = [(k, v) for k, v in rheaders if k.lower() != "content-length"]
            rheaders.append(("Content-Length", str(len(rbody))))
        if fault == "wrong_range":
            rheaders = [
                (k, _shift_range(v) if k.lower() == "content-range" else v) for k, v in rheaders
            ]
        if fault in ("truncate", "stall_body"):
            client.sendall(_join_head(status, rheaders) + rbody[: len(rbody) // 2])
            if fault == "stall_body":
                self._stop.wait()
            return False
        client.sendall(_join_head(status, rheaders) + rbody)
        return fault != "close_after"


def _read_head_from(buf: bytearray) -> bytes:
    cut = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:cut])
    del buf[:cut]
    return head


def _shift_range(value: str) -> str:
    unit, _, rest = value.partition(" ")
    span, _, total = rest.partition("/")
    a, _, b = span.partition("-")
    return f"{unit} {int(a) + 1}-{int(b) + 1}/{total}"
