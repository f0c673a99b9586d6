"""The lean HTTP(S) data path and the checks every HTTP answer goes through.

`PlainReader` does ranged GETs for http:// and https:// bases (and the S3 store's signed
GetObjects, s3_wire.py) on pooled keep-alive connections, with hand-parsed headers and the body
received straight into a preallocated buffer: httpx costs a core at ~600 MB/s over plain http
and over TLS used ~3.3 CPU s/GB against this reader's ~0.75 (5x the speed). It handles only the
expected answer (206 with the exact Content-Range and length, or an error status); anything
else returns None and the caller redoes the request through httpx (or botocore).
`Validator` and the status/Content-Range helpers are shared with the httpx path in http.py, so
both apply the same checks (see the invariants there).

TLS: `tls_context` builds the one ssl.SSLContext of a base (system CAs plus --ca-file,
certificate and hostname verification on); httpx and the lean reader both use it, and the lean
reader sends the URL's host as SNI / the name to verify, as httpx does (lean_conn.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import socket
import ssl
from collections.abc import Iterator
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
    BaseProtocolError,
    BaseUnavailable,
    BaseUnreachable,
    TransientBaseError,
    UsageError,
)
from . import describe_url
from .http_policy import AuthHeader, parse_byte_count
from .lean_conn import Conn, ConnKey, connect

log = logging.getLogger(__name__)

# Range units are case-insensitive (RFC 9110 14.1): "Bytes 0-4095/8192" is a legal answer.
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+([0-9]+)-([0-9]+)/([0-9]+|\*)\s*$", re.IGNORECASE)
_STATUS = re.compile(r"[0-9]{3}")
_DECIMAL = re.compile(r"[0-9]{1,16}")
_BARE_LF = re.compile(rb"(?<!\r)\n")  # a line ended by LF alone: never in a CRLF head

def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The one TLS context of a base: the system's CAs plus `ca_file`, certificates and host
    names verified (httpx and the lean reader both use it)."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load CA file {ca_file}: {exc}") from None
    return context

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
    if any(m in str(c).lower() for c in chain for m in ("hostname mismatch", "address mismatch")):
        return BaseUnavailable(f"{what}: TLS certificate is not valid for this host name")
    if any(isinstance(c, ssl.SSLCertVerificationError) for c in chain) or (
        "CERTIFICATE_VERIFY_FAILED" in str(exc)
    ):
        return BaseUnavailable(
            f"{what}: TLS certificate verification failed (use --ca-file for a private CA)"
        )
    if isinstance(exc, httpx.TimeoutException):
        return BaseUnreachable(f"{what}: timed out connecting")
    return BaseUnreachable(f"{what}: cannot connect ({type(exc).__name__})")


@contextlib.contextmanager
def httpx_errors(what: str, *, opening: bool = False) -> Iterator[None]:
    """httpx's exceptions inside the block as the error tree: the one mapper for every httpx
    request of an HTTP base. A failure on the wire (timeout, reset, a body cut short) is
    TransientBaseError: the fetcher retries it within --io-timeout. With `opening` (sending a
    request and reading its head, for a listing, a probe or a small object) two answers say
    more: a server that cannot be reached says why (connect_error: BaseUnreachable or a bad
    certificate), and a head h11 refuses is BaseProtocolError of this answer, so a listing can
    leave the entry out."""
    try:
        yield
    except (httpx.HTTPError, httpx.StreamError) as exc:
        error = _httpx_error(exc, what, opening)
        if error is None:
            raise
        raise error from None


def _httpx_error(exc: Exception, what: str, opening: bool) -> BaseError | None:
    if opening and isinstance(
        exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)
    ):
        return connect_error(exc, what)
    if isinstance(exc, httpx.TimeoutException):
        return TransientBaseError(f"{what}: timed out ({type(exc).__name__})")
    if opening and isinstance(exc, httpx.RemoteProtocolError):
        if "disconnected" in str(exc):  # httpcore: closed before answering, worth a retry
            return TransientBaseError(f"{what}: connection closed before an answer")
        # A head h11 refuses (a Content-Length that is no number...): this answer, not the
        # connection, is bad.
        return BaseProtocolError(f"{what}: malformed answer ({str(exc)[:80]})")
    if isinstance(exc, (httpx.TransportError, httpx.StreamError)):
        return TransientBaseError(f"{what}: connection failed ({type(exc).__name__})")
    return None  # not an answer of the wire (too many redirects...): the caller's to handle


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


def sendable(value: str) -> bool:
    """Whether a value a server sent may go back to it as a header value: visible ASCII and
    spaces (httpx sends ASCII only; a CR or LF would end the header, or the request)."""
    return value.isascii() and value.isprintable()


def usable_validator(value: str | None, header: str, what: str) -> str | None:
    """An ETag or Last-Modified of an HTTP server's answer, or None (with a warning) for one
    that cannot go back in If-Match / If-Range (`sendable`). Not ASCII, it would not even read
    the same twice: httpx decodes a head as UTF-8 where it can, the lean reader as latin-1."""
    if value is None or sendable(value):
        return value
    log.warning("%s: its %s is not ASCII: ignored (changes are told by the other validator, "
                "if any)", what, header)
    return None


@dataclass(frozen=True)
class Validator:
    """What identifies one version of an image on the server. Its ETag and Last-Modified go
    back to the server as they came (`sendable`: `usable_validator` keeps out others)."""

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
        """BaseChanged if an answer's validators say it is another version: its ETag, or its
        Last-Modified when one side has no ETag (a weak ETag makes If-Range send the date,
        and an answer without an ETag has only the date to tell)."""
        etag = headers.get("etag")
        if self.etag and etag:
            if etag != self.etag:
                raise BaseChanged(f"{what}: changed on the server (ETag {etag} != {self.etag})")
            return
        modified = headers.get("last-modified")
        if self.last_modified and modified and modified != self.last_modified:
            raise BaseChanged(f"{what}: changed on the server (Last-Modified moved)")

    def proven_by(self, headers: httpx.Headers | dict[str, str]) -> bool:
        """Whether an answer carries this version's own validator (its ETag, else its
        Last-Modified): what a whole-image 200 must show, since If-Range failing (another
        version) also gives a 200. A version known by neither can prove nothing."""
        if self.etag:
            return headers.get("etag") == self.etag
        return bool(self.last_modified) and headers.get("last-modified") == self.last_modified


YIELD_BYTES = 1 << 20  # a body received this far without a wait yields to other tasks
IGNORED_RANGES = 3  # whole answers in a row before a server is taken to ignore Range


@dataclass
class LeanStatistics:
    """How many ranged reads the lean reader answered, and how many it handed back."""

    answered: int = 0
    handed_back: int = 0


class PlainReader:
    """HTTP/1.1 ranged GETs on pooled keep-alive connections (TCP, or TLS for https), body
    received straight into the result buffer. It handles only the expected case (206,
    Content-Length, matching Content-Range, same validator); for anything else it returns None
    and the caller redoes the request through httpx, which knows the rest of HTTP and maps
    errors (a redirect too: httpx follows it under http_policy's rules). Error answers that
    need no body are mapped here to save the round trip. The auth header goes only to its own
    origin (http_policy.AuthHeader)."""

    HEAD_LIMIT = 64 * 1024

    def __init__(
        self, stall: float, auth: AuthHeader | None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.stall = stall
        self.auth = auth
        self.tls = tls
        self.idle: dict[ConnKey, list[Conn]] = {}
        self.bypass: set[ConnKey] = set()  # servers that ignore Range: httpx only
        # Whole answers to ranged GETs by server since its last 206: IGNORED_RANGES in a row
        # make it one that ignores Range (one could be a proxy's glitch, and the bypass is
        # for the mount's life: every read through httpx, ~5x the CPU per byte)
        self._ignored_range: dict[ConnKey, int] = {}
        # The header lines of an image's reads but the Range, by URL and version (read_range)
        self._fixed_headers: dict[tuple[str, Validator], str] = {}
        self.stats = LeanStatistics()

    def close_idle(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()

    async def read_range(
        self, url: str, validator: Validator, offset: int, length: int
    ) -> memoryview | None:
        """The bytes of an HTTP(S) base image, or None: redo it through httpx."""
        target = _request_target(url)
        if target.has_userinfo:
            return None
        fixed = self._fixed_headers.get((url, validator))
        if fixed is None:  # once per image version (a dict per read was 4 % of a 4 KiB miss)
            headers = {
                "Accept-Encoding": "identity",
                "User-Agent": "corfs",
                **validator.conditional_headers(),
            }
            if self.auth:
                headers.update(self.auth.for_url(url))
            if len(self._fixed_headers) >= 1024:
                self._fixed_headers.clear()
            fixed = self._fixed_headers[(url, validator)] = _header_lines(headers)
        header_lines = f"Range: bytes={offset}-{offset + length - 1}\r\n{fixed}"
        return await self._get(target, header_lines, validator, offset, length, http_rules=True)

    async def get_range(
        self,
        url: str,
        headers: dict[str, str],
        validator: Validator,
        offset: int,
        length: int,
        *,
        http_rules: bool,
    ) -> memoryview | None:
        """GET `url` with `headers` (they hold the Range for offset/length) over a pooled
        connection, into a fresh aligned buffer; None for an answer to hand back to the full
        client. With `http_rules` every error status is mapped here (status_error) and a 200 of
        the same version marks the server as one that ignores Range; with S3's, only statuses
        whose meaning does not depend on the error body (404, 410, 412, 416, 429, 5xx) are
        mapped and a 200 for part of an object is a transient failure (s3.py's rule)."""
        return await self._get(
            _request_target(url), _header_lines(headers), validator, offset, length,
            http_rules=http_rules,
        )

    async def _get(
        self,
        target: _RequestTarget,
        header_lines: str,
        validator: Validator,
        offset: int,
        length: int,
        *,
        http_rules: bool,
    ) -> memoryview | None:
        """get_range to `target`, its headers as `header_lines` (each ending in CRLF)."""
        key = target.key
        if key in self.bypass or key[0] not in ("http", "https"):
            self.stats.handed_back += 1
            return None
        try:
            request = f"{target.request_line}\r\n{header_lines}\r\n".encode("latin-1")
        except UnicodeEncodeError:  # its text holds the request, credentials included
            raise BaseProtocolError(f"{target.what}: a request header is not latin-1") from None
        what = target.what

        for _attempt in range(2):
            conn = self._idle_connection(key)
            reused = conn is not None
            try:
                if conn is None:
                    conn = await connect(key, self.stall, self.tls)
            except ssl.SSLCertVerificationError as exc:
                raise connect_error(exc, what) from None
            except (OSError, trio.TooSlowError) as exc:
                raise TransientBaseError(f"{what}: cannot connect ({type(exc).__name__})") from None
            try:
                result = await self._exchange(
                    conn, request, validator, offset, length, what, http_rules
                )
            except (_StaleConnection, BaseChanged, TransientBaseError) as exc:
                conn.close()
                if reused:
                    # Asked again, once, on a fresh connection. Stale: the server closed an
                    # idle keep-alive connection, and the others idle for it are older (the
                    # pool is last in, first out), so closed too after an idle spell (a resend
                    # on the next stale one failed a lone reader's read after a pause). A
                    # failed check: perhaps not this request's answer, but one sent twice that
                    # came after _idle_connection looked (another range: the wrong
                    # Content-Range; another image: another ETag). A fresh connection tells.
                    for old in self.idle.pop(key, []):
                        old.close()
                    continue
                if isinstance(exc, _StaleConnection):
                    raise TransientBaseError(
                        f"{what}: connection closed before an answer"
                    ) from None
                raise
            except BaseException:
                conn.close()
                raise
            data, keep = result
            if keep and data is not None:
                self.idle.setdefault(key, []).append(conn)
            else:
                conn.close()
            if data is None:
                self.stats.handed_back += 1
                log.debug("%s: answer handed back to the full client", what)
            else:
                self.stats.answered += 1
            return data
        raise TransientBaseError(f"{what}: connection closed before an answer")

    def _idle_connection(self, key: ConnKey) -> Conn | None:
        """A pooled connection to `key` with nothing waiting to be read, the newest first.
        One with bytes waiting holds an answer nobody asked for (a server or proxy that sent
        one twice): read as the next request's answer, another range's or image's bytes were
        served (httpcore drops a connection readable while idle, too). One the server closed
        goes as well."""
        pool = self.idle.get(key)
        while pool:
            conn = pool.pop()
            if conn.quiet():
                return conn
            conn.close()
        return None

    async def _exchange(
        self,
        conn: Conn,
        request: bytes,
        validator: Validator,
        offset: int,
        length: int,
        what: str,
        http_rules: bool,
    ) -> tuple[memoryview | None, bool]:
        head = bytearray()
        patience = self.stall * (1 + STALL_SLACK)  # _progressed: no deadline move per recv
        with trio.CancelScope(deadline=trio.current_time() + patience) as scope:
            try:
                await conn.send_all(request)
                while True:
                    chunk = await conn.recv(self.HEAD_LIMIT)
                    if not chunk:
                        if not head:
                            raise _StaleConnection()
                        raise TransientBaseError(f"{what}: connection closed mid-answer")
                    head += chunk
                    _progressed(scope, self.stall)
                    cut = head.find(b"\r\n\r\n")
                    if cut >= 0:
                        break
                    if len(head) > self.HEAD_LIMIT or _BARE_LF.search(head):
                        # Too long, or a line ended by a bare LF (legal; its head may then end
                        # in LF LF or LF CRLF): a keep-alive answer would leave us waiting for
                        # a CRLF CRLF until the stall timeout, on every try.
                        return None, False
            except ConnectionResetError:
                if not head:
                    raise _StaleConnection() from None
                raise TransientBaseError(f"{what}: connection reset") from None
            except BrokenPipeError:
                raise _StaleConnection() from None
            except OSError as exc:
                raise TransientBaseError(f"{what}: connection failed ({_reason(exc)})") from None
            if head.count(b"\n", 0, cut) != head.count(b"\r\n", 0, cut):
                # A bare-LF line within a CRLF head: h11 takes it as a line of its own, and
                # _parse_head would glue it to the line before (a Transfer-Encoding unseen)
                return None, False
            status, headers, http10 = _parse_head(bytes(head[:cut]))
            if status is None:
                return None, False
            if status != 206:
                if status in (404, 410, 412, 416, 429) or status >= 500 or (
                    http_rules and status in (401, 403)
                ):
                    raise status_error(status, what)
                if status == 200 and not http_rules:
                    validator.check(headers, what)
                    if (offset, length) != (0, validator.size):
                        raise TransientBaseError(f"{what}: answer without Content-Range")
                elif status == 200:
                    validator.check(headers, what)  # If-Range failed: another version
                    if validator.proven_by(headers):  # same version, whole body
                        ignored = self._ignored_range.get(conn.key, 0) + 1
                        self._ignored_range[conn.key] = ignored
                        if ignored >= IGNORED_RANGES:
                            self.bypass.add(conn.key)
                return None, False
            validator.check(headers, what)
            self._ignored_range.pop(conn.key, None)  # it does answer ranges
            # S3 serves an object's stored bytes whatever Content-Encoding its metadata says.
            if "transfer-encoding" in headers or (http_rules and "content-encoding" in headers):
                return None, False
            got = parse_content_range(headers.get("content-range"), what)
            end = offset + length - 1
            if got is None or got[:2] != (offset, end):
                raise TransientBaseError(
                    f"{what}: answer has the wrong Content-Range for bytes {offset}-{end}"
                )
            if got[2] is not None and got[2] != validator.size:
                raise BaseChanged(f"{what}: size changed on the server")
            declared = headers.get("content-length")
            if declared != str(length):
                if declared is None or not _DECIMAL.fullmatch(declared):
                    # A body delimited by the end of the connection, a Content-Length sent
                    # twice ("4096, 4096"): legal, and httpx knows what they mean.
                    return None, False
                if int(declared) != length:
                    raise TransientBaseError(f"{what}: answer has the wrong Content-Length")
            out = view = aligned_buffer(length)
            body = head[cut + 4 :]
            have = len(body)
            if have > length:
                return None, False  # more than asked for: do not trust this connection
            view[:have] = body
            yielded = have
            try:
                while have < length:
                    n = await conn.recv_into(view[have:])
                    if n == 0:
                        raise TransientBaseError(
                            f"{what}: body ended early ({have} of {length} bytes)"
                        )
                    have += n
                    _progressed(scope, self.stall)
                    if have - yielded >= YIELD_BYTES:  # a body that keeps coming: let others in
                        yielded = have
                        await trio.lowlevel.checkpoint()
            except OSError as exc:
                raise TransientBaseError(f"{what}: connection failed ({_reason(exc)})") from None
            return out, _keeps_connection(http10, headers.get("connection", ""))
        raise TransientBaseError(f"{what}: no progress for {self.stall:g}s")


@dataclass(frozen=True)
class _RequestTarget:
    key: ConnKey
    request_line: str  # the request line and the Host header
    what: str  # describe_url(url): for log lines and errors
    has_userinfo: bool


@functools.lru_cache(maxsize=1024)
def _request_target(url: str) -> _RequestTarget:
    """What a request to `url` needs from it, parsed once per URL: an image's reads all go to
    the same URL, and parsing it (twice, with describe_url) cost ~10 % of a small read."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    default_port = 443 if scheme == "https" else 80
    key = (scheme, parts.hostname or "", parts.port or default_port)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # The Host httpx sends, and botocore signs (SigV4 covers it): the host name in lower case,
    # the port only if it is not the scheme's. The URL's own spelling (S3.Example.com:443)
    # broke every signature: each read was refused, then redone through botocore.
    host = f"[{key[1]}]" if ":" in key[1] else key[1]
    if parts.port is not None and parts.port != default_port:
        host += f":{parts.port}"
    return _RequestTarget(
        key,
        f"GET {path} HTTP/1.1\r\nHost: {host}",
        describe_url(url),
        bool(parts.username or parts.password),
    )


STALL_SLACK = 1 / 8  # an exchange that stops is given up 1 to 1.125 stall after its progress


def _progressed(scope: trio.CancelScope, stall: float) -> None:
    """An exchange made progress: its deadline stays at least `stall` seconds away. It moves
    only once it came closer than that, to (1 + STALL_SLACK) x stall: moving a trio deadline
    costs heap updates, and one per recv was 8 % of the event loop's time in a cold
    sequential read."""
    now = trio.current_time()
    if scope.deadline - now < stall:
        scope.deadline = now + stall * (1 + STALL_SLACK)


def _header_lines(headers: dict[str, str]) -> str:
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items())


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


class _StaleConnection(Exception):
    pass


def _keeps_connection(http10: bool, connection: str) -> bool:
    """Whether the server keeps the connection open after this answer (RFC 9112 9.3): not
    with a "close" option, and an HTTP/1.0 answer only with "keep-alive". A connection the
    server ends, pooled, took the next read: sent there, it waited for the stall timeout."""
    options = {option.strip().lower() for option in connection.split(",")}
    if "close" in options:
        return False
    return not http10 or "keep-alive" in options


def _parse_head(raw: bytes) -> tuple[int | None, dict[str, str], bool]:
    """(status, headers, whether the answer is HTTP/1.0); status None for no HTTP/1.x head."""
    lines = raw.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
        return None, {}, False
    if not _STATUS.fullmatch(status_line[1]):  # not isdigit(): it takes '²', int() does not
        return None, {}, False
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name = name.strip().lower()
        value = value.strip()
        # Repeated headers: keep them all visible so a double Content-Length is not trusted.
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return int(status_line[1]), headers, status_line[0] == "HTTP/1.0"
