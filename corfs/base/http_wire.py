"""The plain-HTTP data path and the checks every HTTP answer goes through.

`PlainReader` does ranged GETs for http:// bases on pooled keep-alive trio sockets, with
hand-parsed headers and `recv_into` a preallocated buffer: httpx costs a core at ~600 MB/s,
this a fifth of that per byte. It handles only the expected answer (206 with the exact
Content-Range and length, or an error status); anything else returns None and the caller redoes
the request through httpx. `Validator` and the status/Content-Range helpers are shared with the
httpx path in http.py, so both apply the same checks (see the invariants there).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import trio

from ..buffers import aligned_buffer
from ..errors import (
    BaseAccessDenied,
    BaseChanged,
    BaseError,
    BaseNotFound,
    BaseUnavailable,
    BaseUnreachable,
    TransientBaseError,
)
from . import describe_url
from .http_policy import AuthHeader, parse_byte_count

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+([0-9]+)-([0-9]+)/([0-9]+|\*)\s*$")
_DISCARD_BLOCK = 1 << 20

def status_error(status: int, what: str) -> BaseError:
    """The error for an unexpected HTTP status (never 200/206), carrying that status."""
    error = _status_error(status, what)
    error.http_status = status
    return error


def _status_error(status: int, what: str) -> BaseError:
    if status in (404, 410):
        return BaseNotFound(f"{what}: not found (HTTP {status})")
    if status in (401, 403, 407):
        return BaseAccessDenied(f"{what}: access denied (HTTP {status})")
    if status in (412, 416):
        return BaseChanged(f"{what}: changed on the server (HTTP {status})")
    if status >= 500 or status in (408, 425, 429):
        return TransientBaseError(f"{what}: server busy or failing (HTTP {status})")
    return BaseUnavailable(f"{what}: unexpected answer HTTP {status}")


def connect_error(exc: BaseException, what: str) -> BaseUnavailable:
    """One clear line for a failure to reach the server at all."""
    chain: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(chain) < 20:  # causes, contexts and (trio's) exception groups
        e = todo.pop()
        chain.append(e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        if e.__cause__ or e.__context__:
            todo.append(e.__cause__ or e.__context__)  # type: ignore[arg-type]
    if any(isinstance(c, socket.gaierror) for c in chain) or "name resolution" in str(exc).lower():
        return BaseUnreachable(f"{what}: cannot resolve host name")
    if any(isinstance(c, ConnectionRefusedError) for c in chain) or "refused" in str(exc):
        return BaseUnreachable(f"{what}: connection refused")
    if any(isinstance(c, ssl.SSLCertVerificationError) for c in chain) or (
        "CERTIFICATE_VERIFY_FAILED" in str(exc)
    ):
        return BaseUnavailable(
            f"{what}: TLS certificate verification failed (use --ca-file for a private CA)"
        )
    if isinstance(exc, httpx.TimeoutException):
        return BaseUnreachable(f"{what}: timed out connecting")
    return BaseUnreachable(f"{what}: cannot connect ({type(exc).__name__})")


def parse_content_range(value: str | None, what: str) -> tuple[int, int, int | None] | None:
    """(first, last, total or None) of a Content-Range; None when there is none or it has
    another shape, BaseProtocolError when a number is absurd (thousands of digits, beyond
    MAX_IMAGE_SIZE). A range that merely differs from the one asked for is the caller's to
    judge (a transient failure: the fetcher retries it)."""
    if value is None:
        return None
    m = _CONTENT_RANGE.match(value)
    if not m:
        return None
    first = parse_byte_count(m.group(1), what, "Content-Range")
    last = parse_byte_count(m.group(2), what, "Content-Range")
    total = None if m.group(3) == "*" else parse_byte_count(m.group(3), what, "Content-Range")
    return first, last, total


@dataclass(frozen=True)
class Validator:
    """What identifies one version of an image on the server."""

    size: int
    etag: str | None
    last_modified: str | None

    @property
    def identity(self) -> str:
        if self.etag:
            return f"size={self.size};etag={self.etag}"
        if self.last_modified:
            return f"size={self.size};last-modified={self.last_modified}"
        return f"size={self.size}"

    @property
    def strong_etag(self) -> str | None:
        return self.etag if self.etag and not self.etag.startswith("W/") else None

    def conditional_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.strong_etag:
            headers["If-Match"] = self.strong_etag
            headers["If-Range"] = self.strong_etag
        elif self.last_modified:
            headers["If-Range"] = self.last_modified
        return headers

    def check(self, headers: httpx.Headers | dict[str, str], what: str) -> None:
        """BaseChanged if an answer's validators say it is another version."""
        etag = headers.get("etag")
        if self.etag and etag and etag != self.etag:
            raise BaseChanged(f"{what}: changed on the server (ETag {etag} != {self.etag})")
        modified = headers.get("last-modified")
        if not self.etag and self.last_modified and modified and modified != self.last_modified:
            raise BaseChanged(f"{what}: changed on the server (Last-Modified moved)")


class PlainConn:
    def __init__(self, sock: trio.socket.SocketType, key: tuple[str, int]) -> None:
        self.sock = sock
        self.key = key

    def close(self) -> None:
        self.sock.close()


class PlainReader:
    """HTTP/1.1 ranged GETs on raw trio sockets, body received straight into the result
    buffer. It handles only the expected case (206, Content-Length, matching Content-Range,
    same validator); for anything else it returns None and the caller redoes the request
    through httpx, which knows the rest of HTTP and maps errors (a redirect too: httpx follows
    it under http_policy's rules). Error answers that need no body are mapped here to save the
    round trip. The auth header goes only to its own origin (http_policy.AuthHeader)."""

    HEAD_LIMIT = 64 * 1024

    def __init__(self, stall: float, auth: AuthHeader | None) -> None:
        self.stall = stall
        self.auth = auth
        self.idle: dict[tuple[str, int], list[PlainConn]] = {}
        self.bypass: set[tuple[str, int]] = set()  # servers that ignore Range: httpx only

    async def _connect(self, host: str, port: int) -> PlainConn:
        sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET)
        sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        try:
            with trio.fail_after(self.stall):
                addr = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
                family, _, _, _, sockaddr = addr[0]
                if family != sock.family:
                    sock.close()
                    sock = trio.socket.socket(family)
                    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                await sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
        return PlainConn(sock, (host, port))

    async def read_range(
        self, url: str, validator: Validator, offset: int, length: int
    ) -> memoryview | None:
        parts = urlsplit(url)
        if parts.username or parts.password:
            return None
        host = parts.hostname or ""
        port = parts.port or 80
        key = (host, port)
        if key in self.bypass:
            return None
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        end = offset + length - 1
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {parts.netloc}",
            f"Range: bytes={offset}-{end}",
            "Accept-Encoding: identity",
            "User-Agent: corfs",
        ]
        lines += [f"{k}: {v}" for k, v in validator.conditional_headers().items()]
        if self.auth:
            lines += [f"{k}: {v}" for k, v in self.auth.for_url(url).items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        what = describe_url(url)

        for _attempt in range(2):
            pool = self.idle.setdefault(key, [])
            conn = pool.pop() if pool else None
            reused = conn is not None
            try:
                if conn is None:
                    conn = await self._connect(host, port)
            except (OSError, trio.TooSlowError) as exc:
                raise TransientBaseError(f"{what}: cannot connect ({type(exc).__name__})") from None
            try:
                result = await self._exchange(conn, request, validator, offset, length, what)
            except _StaleConnection:
                conn.close()
                if reused:
                    continue  # the server closed an idle keep-alive connection: resend once
                raise TransientBaseError(f"{what}: connection closed before an answer") from None
            except BaseException:
                conn.close()
                raise
            data, keep = result
            if keep and data is not None:
                self.idle.setdefault(key, []).append(conn)
            else:
                conn.close()
            return data
        raise TransientBaseError(f"{what}: connection closed before an answer")

    async def _exchange(
        self,
        conn: PlainConn,
        request: bytes,
        validator: Validator,
        offset: int,
        length: int,
        what: str,
    ) -> tuple[memoryview | None, bool]:
        sock = conn.sock
        head = bytearray()
        with trio.CancelScope(deadline=trio.current_time() + self.stall) as scope:
            try:
                await sock.send(request)
                while True:
                    chunk = await sock.recv(self.HEAD_LIMIT)
                    if not chunk:
                        if not head:
                            raise _StaleConnection()
                        raise TransientBaseError(f"{what}: connection closed mid-answer")
                    head += chunk
                    scope.deadline = trio.current_time() + self.stall
                    cut = head.find(b"\r\n\r\n")
                    if cut >= 0:
                        break
                    if len(head) > self.HEAD_LIMIT:
                        return None, False
            except ConnectionResetError:
                if not head:
                    raise _StaleConnection() from None
                raise TransientBaseError(f"{what}: connection reset") from None
            except BrokenPipeError:
                raise _StaleConnection() from None
            except OSError as exc:
                raise TransientBaseError(f"{what}: connection failed ({exc.strerror})") from None
            status, headers = _parse_head(bytes(head[:cut]))
            if status is None:
                return None, False
            if status != 206:
                if status in (401, 403, 404, 410, 412, 416, 429) or status >= 500:
                    raise status_error(status, what)
                if status == 200:
                    validator.check(headers, what)  # If-Range failed: another version
                    if validator.etag and headers.get("etag") == validator.etag:
                        self.bypass.add(conn.key)  # same version, whole body: ignores Range
                return None, False
            validator.check(headers, what)
            if "transfer-encoding" in headers or "content-encoding" in headers:
                return None, False
            got = parse_content_range(headers.get("content-range"), what)
            end = offset + length - 1
            if got is None or got[:2] != (offset, end):
                raise TransientBaseError(
                    f"{what}: answer has the wrong Content-Range for bytes {offset}-{end}"
                )
            if got[2] is not None and got[2] != validator.size:
                raise BaseChanged(f"{what}: size changed on the server")
            if headers.get("content-length") != str(length):
                raise TransientBaseError(f"{what}: answer has the wrong Content-Length")
            out = view = aligned_buffer(length)
            body = head[cut + 4 :]
            have = len(body)
            if have > length:
                return None, False  # more than asked for: do not trust this connection
            view[:have] = body
            try:
                while have < length:
                    n = await sock.recv_into(view[have:])
                    if n == 0:
                        raise TransientBaseError(
                            f"{what}: body ended early ({have} of {length} bytes)"
                        )
                    have += n
                    scope.deadline = trio.current_time() + self.stall
            except OSError as exc:
                raise TransientBaseError(f"{what}: connection failed ({exc.strerror})") from None
            keep = headers.get("connection", "").lower() != "close"
            return out, keep
        raise TransientBaseError(f"{what}: no progress for {self.stall:g}s")


class _StaleConnection(Exception):
    pass


def _parse_head(raw: bytes) -> tuple[int | None, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
        return None, {}
    if not status_line[1].isdigit():
        return None, {}
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name = name.strip().lower()
        value = value.strip()
        # Repeated headers: keep them all visible so a double Content-Length is not trusted.
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return int(status_line[1]), headers
