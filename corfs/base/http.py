"""HTTP(S) bases: one image file, or a directory listed by `index.json` or nginx's JSON
autoindex. Images are read with ranged GETs on pooled keep-alive connections.

Invariants:
- An image's identity is its size plus its ETag (or Last-Modified when there is no ETag),
  learned when the base is listed. Every ranged GET is conditional on that validator
  (If-Match for a strong ETag, If-Range always) and every answer is checked: status,
  Content-Range, exact body length, and the ETag / Last-Modified it carries. A base that
  changed midway raises BaseChanged; bytes of another version are never returned.
- A server that ignores Range (200 with the whole body) still gives the right bytes: the
  prefix is read and discarded.
- The store never retries a failed request (the fetcher does), except one resend on a pooled
  keep-alive connection the server had already closed. Each request has a stall timeout, so a
  silent server becomes TransientBaseError.
- Credentials (the auth header, URL user info) never appear in messages or logs.

Plain http:// ranged reads go through a lean reader (`_PlainReader`: hand-parsed headers,
`recv_into` a preallocated buffer) because httpx costs one core at ~600 MB/s; anything it does
not expect (non-206, chunked, redirects) is redone through httpx, which also does TLS and
listings.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpx
import trio

from ..errors import (
    BaseAccessDenied,
    BaseChanged,
    BaseError,
    BaseNotFound,
    BaseUnavailable,
    TransientBaseError,
    UsageError,
)
from . import BaseOptions, describe_url

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_DISCARD_BLOCK = 1 << 20


def stall_timeout(options: BaseOptions) -> float:
    """How long one request may go without progress: a share of --io-timeout, so the fetcher
    has room to retry within its budget."""
    return max(0.5, min(options.io_timeout / 3, 20.0))


def auth_header(options: BaseOptions) -> tuple[str, str] | None:
    """The (name, value) of the header named by the env var in `options.auth_header_env`."""
    if not options.auth_header_env:
        return None
    raw = os.environ.get(options.auth_header_env)
    if raw is None:
        raise UsageError(f"environment variable {options.auth_header_env} is not set")
    name, sep, value = raw.partition(":")
    name = name.strip()
    if not sep or not name or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
        raise UsageError(
            f"environment variable {options.auth_header_env} must hold 'Header-Name: value'"
        )
    value = value.strip()
    if "\r" in value or "\n" in value:
        raise UsageError(f"environment variable {options.auth_header_env} holds a bad value")
    return name, value


def _status_error(status: int, what: str) -> BaseError:
    """The error for an unexpected HTTP status (never 200/206)."""
    if status in (404, 410):
        return BaseNotFound(f"{what}: not found (HTTP {status})")
    if status in (401, 403, 407):
        return BaseAccessDenied(f"{what}: access denied (HTTP {status})")
    if status in (412, 416):
        return BaseChanged(f"{what}: changed on the server (HTTP {status})")
    if status >= 500 or status in (408, 425, 429):
        return TransientBaseError(f"{what}: server busy or failing (HTTP {status})")
    return BaseUnavailable(f"{what}: unexpected answer HTTP {status}")


def _connect_error(exc: BaseException, what: str) -> BaseUnavailable:
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
        return BaseUnavailable(f"{what}: cannot resolve host name")
    if any(isinstance(c, ConnectionRefusedError) for c in chain) or "refused" in str(exc):
        return BaseUnavailable(f"{what}: connection refused")
    if any(isinstance(c, ssl.SSLCertVerificationError) for c in chain) or (
        "CERTIFICATE_VERIFY_FAILED" in str(exc)
    ):
        return BaseUnavailable(
            f"{what}: TLS certificate verification failed (use --ca-file for a private CA)"
        )
    if isinstance(exc, httpx.TimeoutException):
        return BaseUnavailable(f"{what}: timed out connecting")
    return BaseUnavailable(f"{what}: cannot connect ({type(exc).__name__})")


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    if value is None:
        return None
    m = _CONTENT_RANGE.match(value)
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


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


@dataclass
class HttpImage:
    name: str
    size: int
    identity: str
    url: str
    validator: Validator
    reader: HttpReader = field(repr=False)
    layout: None = None

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        if length <= 0:
            return b""
        return await self.reader.read_range(self.url, self.validator, offset, length)


class HttpReader:
    """Ranged, validated reads over httpx, and the lean plain-http data path beside it."""

    def __init__(self, client: httpx.AsyncClient, options: BaseOptions) -> None:
        self.client = client
        self.stall = stall_timeout(options)
        self.slots = trio.Semaphore(max(1, options.max_connections))
        self.plain = _PlainReader(self.stall, auth_header(options))
        self.use_plain = True  # tests turn it off to drive the httpx path
        self._warned_no_range = False

    async def read_range(
        self, url: str, validator: Validator, offset: int, length: int
    ) -> bytes | bytearray:
        async with self.slots:
            if self.use_plain and url.startswith("http://"):
                data = await self.plain.read_range(url, validator, offset, length)
                if data is not None:
                    return data
            return await self._read_httpx(url, validator, offset, length)

    async def _read_httpx(
        self, url: str, validator: Validator, offset: int, length: int
    ) -> bytearray:
        what = describe_url(url)
        end = offset + length - 1
        headers = {"Range": f"bytes={offset}-{end}", **validator.conditional_headers()}
        try:
            async with self.client.stream("GET", url, headers=headers) as resp:
                if resp.status_code == 206:
                    validator.check(resp.headers, what)
                    got = _parse_content_range(resp.headers.get("content-range"))
                    if got is None or got[:2] != (offset, end):
                        raise TransientBaseError(
                            f"{what}: answer has the wrong Content-Range for bytes {offset}-{end}"
                        )
                    if got[2] is not None and got[2] != validator.size:
                        raise BaseChanged(f"{what}: size changed on the server")
                    return await self._collect(resp, 0, length, what)
                if resp.status_code == 200:
                    validator.check(resp.headers, what)
                    if validator.etag and "etag" not in resp.headers:
                        # If-Range failed silently, or a proxy dropped it: no proof of version.
                        raise BaseChanged(f"{what}: full answer without the expected ETag")
                    declared = resp.headers.get("content-length")
                    if declared is not None and int(declared) != validator.size:
                        raise BaseChanged(f"{what}: size changed on the server")
                    if not self._warned_no_range:
                        self._warned_no_range = True
                        log.warning("%s ignores Range requests: reads will be slow", what)
                    return await self._collect(resp, offset, length, what)
                raise _status_error(resp.status_code, what)
        except httpx.TimeoutException as exc:
            raise TransientBaseError(f"{what}: timed out ({type(exc).__name__})") from None
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise TransientBaseError(f"{what}: connection failed ({type(exc).__name__})") from None

    async def _collect(self, resp: httpx.Response, skip: int, length: int, what: str) -> bytearray:
        """Exactly `length` bytes after skipping `skip`; TransientBaseError if the body ends
        early. Stops reading (and drops the connection) once it has them."""
        out = bytearray(length)
        view = memoryview(out)
        pos = -skip  # where the next piece starts, relative to the first wanted byte
        async for piece in resp.aiter_raw():
            start = max(0, -pos)
            if start < len(piece):
                dst = max(pos, 0)
                take = min(len(piece) - start, length - dst)
                view[dst : dst + take] = memoryview(piece)[start : start + take]
            pos += len(piece)
            if pos >= length:
                break
        if pos < length:
            raise TransientBaseError(f"{what}: body ended early ({max(pos, 0)} of {length} bytes)")
        return out


class _PlainConn:
    def __init__(self, sock: trio.socket.SocketType, key: tuple[str, int]) -> None:
        self.sock = sock
        self.key = key

    def close(self) -> None:
        self.sock.close()


class _PlainReader:
    """HTTP/1.1 ranged GETs on raw trio sockets, body received straight into the result
    buffer. It handles only the expected case (206, Content-Length, matching Content-Range,
    same validator); for anything else it returns None and the caller redoes the request
    through httpx, which knows the rest of HTTP and maps errors. Error answers that need no
    body are mapped here to save the round trip."""

    HEAD_LIMIT = 64 * 1024

    def __init__(self, stall: float, auth: tuple[str, str] | None) -> None:
        self.stall = stall
        self.auth = auth
        self.idle: dict[tuple[str, int], list[_PlainConn]] = {}
        self.bypass: set[tuple[str, int]] = set()  # servers that ignore Range: httpx only

    async def _connect(self, host: str, port: int) -> _PlainConn:
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
        return _PlainConn(sock, (host, port))

    async def read_range(
        self, url: str, validator: Validator, offset: int, length: int
    ) -> bytearray | None:
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
            lines.append(f"{self.auth[0]}: {self.auth[1]}")
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
        conn: _PlainConn,
        request: bytes,
        validator: Validator,
        offset: int,
        length: int,
        what: str,
    ) -> tuple[bytearray | None, bool]:
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
                    raise _status_error(status, what)
                if status == 200:
                    validator.check(headers, what)  # If-Range failed: another version
                    if validator.etag and headers.get("etag") == validator.etag:
                        self.bypass.add(conn.key)  # same version, whole body: ignores Range
                return None, False
            validator.check(headers, what)
            if "transfer-encoding" in headers or "content-encoding" in headers:
                return None, False
            got = _parse_content_range(headers.get("content-range"))
            end = offset + length - 1
            if got is None or got[:2] != (offset, end):
                raise TransientBaseError(
                    f"{what}: answer has the wrong Content-Range for bytes {offset}-{end}"
                )
            if got[2] is not None and got[2] != validator.size:
                raise BaseChanged(f"{what}: size changed on the server")
            if headers.get("content-length") != str(length):
                raise TransientBaseError(f"{what}: answer has the wrong Content-Length")
            out = bytearray(length)
            view = memoryview(out)
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


class HttpBase:
    """A base over HTTP(S): one image, or the images listed at a URL ending in '/'."""

    def __init__(self, url: str, client: httpx.AsyncClient, options: BaseOptions) -> None:
        self.url = url
        self.description = describe_url(url)
        self.client = client
        self.options = options
        self.reader = HttpReader(client, options)
        self.is_dir = urlsplit(url).path.endswith("/") or urlsplit(url).path == ""
        self.dir_url = url if self.is_dir else urljoin(url, ".")

    async def _get(self, url: str, what: str, **kwargs: object) -> httpx.Response:
        try:
            return await self.client.get(url, **kwargs)  # type: ignore[arg-type]
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as exc:
            raise _connect_error(exc, what) from None
        except httpx.TimeoutException as exc:
            raise TransientBaseError(f"{what}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise TransientBaseError(f"{what}: connection failed ({type(exc).__name__})") from None

    async def _validator(self, url: str) -> tuple[str, Validator]:
        """HEAD the image (falling back to a one-byte ranged GET) for its size and
        validator; returns the final URL after redirects."""
        what = describe_url(url)
        try:
            resp = await self.client.head(url)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _connect_error(exc, what) from None
        except httpx.TimeoutException as exc:
            raise TransientBaseError(f"{what}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise TransientBaseError(f"{what}: connection failed ({type(exc).__name__})") from None
        size: int | None = None
        if resp.status_code == 200 and "content-length" in resp.headers:
            size = int(resp.headers["content-length"])
        elif resp.status_code in (200, 405, 501):
            resp = await self._get(url, what, headers={"Range": "bytes=0-0"})
            if resp.status_code == 206:
                got = _parse_content_range(resp.headers.get("content-range"))
                size = got[2] if got else None
            elif resp.status_code == 416:
                size = 0  # an empty file: no byte 0 to ask for
            elif resp.status_code == 200:
                size = len(resp.content)
        if resp.status_code not in (200, 206, 416):
            raise _status_error(resp.status_code, what)
        if size is None:
            raise BaseUnavailable(f"{what}: server does not tell the size of the image")
        validator = Validator(
            size=size,
            etag=resp.headers.get("etag"),
            last_modified=resp.headers.get("last-modified"),
        )
        if not validator.etag and not validator.last_modified:
            log.warning("%s has no ETag or Last-Modified: changes cannot be detected", what)
        return str(resp.url), validator

    async def _image(self, name: str, url: str) -> HttpImage:
        final_url, validator = await self._validator(url)
        return HttpImage(
            name=name,
            size=validator.size,
            identity=validator.identity,
            url=final_url,
            validator=validator,
            reader=self.reader,
        )

    async def _list_names(self) -> list[str]:
        what = self.description
        resp = await self._get(urljoin(self.dir_url, "index.json"), what)
        if resp.status_code == 200:
            try:
                doc = json.loads(resp.content)
                return [str(entry["name"]) for entry in doc["images"]]
            except (ValueError, KeyError, TypeError):
                raise BaseError(f"{what}index.json is not a valid image index") from None
        if resp.status_code not in (403, 404, 410):
            raise _status_error(resp.status_code, f"{what}index.json")
        resp = await self._get(self.dir_url, what, headers={"Accept": "application/json"})
        if resp.status_code != 200:
            raise _status_error(resp.status_code, what)
        try:
            entries = json.loads(resp.content)
            return [str(e["name"]) for e in entries if e.get("type") == "file"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BaseError(
                f"{what}: no index.json and the directory listing is not JSON "
                "(nginx: autoindex_format json)"
            ) from None

    async def list_images(self) -> list[HttpImage]:
        if not self.is_dir:
            name = unquote(urlsplit(self.url).path.rsplit("/", 1)[-1])
            return [await self._image(name, self.url)]
        names = [n for n in await self._list_names() if n and "/" not in n and n not in (".", "..")]
        images: dict[str, HttpImage] = {}
        limiter = trio.CapacityLimiter(max(1, self.options.max_connections))

        async def one(name: str) -> None:
            async with limiter:
                images[name] = await self._image(name, urljoin(self.dir_url, quote(name)))

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)
        return [images[n] for n in sorted(images)]

    async def read_object(self, key: str) -> bytes:
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise BaseNotFound(f"{key} is outside the base")
        url = urljoin(self.dir_url, "/".join(quote(p) for p in parts))
        what = describe_url(url)
        async with self.reader.slots:
            resp = await self._get(url, what)
        if resp.status_code != 200:
            raise _status_error(resp.status_code, what)
        declared = resp.headers.get("content-length")
        if declared is not None and int(declared) != len(resp.content):
            raise TransientBaseError(f"{what}: body ended early")
        return resp.content

    async def aclose(self) -> None:
        for conns in self.reader.plain.idle.values():
            for conn in conns:
                conn.close()
        self.reader.plain.idle.clear()
        await self.client.aclose()


def make_client(options: BaseOptions) -> httpx.AsyncClient:
    verify = ssl.create_default_context()
    if options.ca_file:
        try:
            verify.load_verify_locations(cafile=options.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load CA file {options.ca_file}: {exc}") from None
    headers = {"Accept-Encoding": "identity", "User-Agent": "corfs"}
    auth = auth_header(options)
    if auth:
        headers[auth[0]] = auth[1]
    stall = stall_timeout(options)
    return httpx.AsyncClient(
        verify=verify,
        headers=headers,
        timeout=httpx.Timeout(stall, pool=None),
        limits=httpx.Limits(
            max_connections=options.max_connections + 2,
            max_keepalive_connections=options.max_connections + 2,
        ),
        follow_redirects=True,
        trust_env=False,
    )


async def open_http_base(url: str, options: BaseOptions) -> HttpBase:
    """Open and list the base once, so an unreachable or wrong URL fails here, in one line."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise UsageError(f"base URL {describe_url(url)!r} has no host")
    if parts.username or parts.password:
        raise UsageError(
            f"base URL {describe_url(url)!r} carries credentials: use --auth-header-env instead"
        )
    base = HttpBase(url, make_client(options), options)
    try:
        await base.list_images()
    except TransientBaseError as exc:
        await base.aclose()
        raise BaseUnavailable(str(exc)) from None
    except BaseException:
        await base.aclose()
        raise
    return base
