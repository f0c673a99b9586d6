"""HTTP(S) bases: one image file, or a directory listed by `index.json` or nginx's JSON
autoindex. Images are read with ranged GETs on pooled keep-alive connections.

Invariants:
- An image's identity is its size plus its ETag (or Last-Modified when there is no ETag),
  learned when the base is listed. Every ranged GET is conditional on that validator
  (If-Match for a strong ETag, If-Range always) and every answer is checked: status,
  Content-Range, exact body length, and the ETag / Last-Modified it carries (the date too
  when the answer has no ETag); a whole-image 200 must carry the listed ETag, or the listed
  date when there is no ETag (If-Range failing also gives a 200). A base that changed
  midway raises BaseChanged; bytes of another version are never returned.
- A server that ignores Range (200 with the whole body) still gives the right bytes: the
  prefix is read and discarded.
- The store never retries a failed request (the fetcher does), except one resend on a pooled
  keep-alive connection the server had already closed. Each request has a stall timeout, so a
  silent server becomes TransientBaseError.
- Credentials (the auth header, URL user info) never appear in messages or logs.
- Redirects, where the auth header goes and how much of a body is read are http_policy's
  rules, on every request (listing, HEAD, httpx and lean reads): no https -> http, the header
  only to its origin, capped bodies. A redirect target is not pinned for good: when it answers
  403/404/410 (an expired pre-signed URL), the image's listed URL is resolved again, once.
- Sizes from the server are parsed by http_policy.parse_byte_count: absurd or unparseable ones
  raise BaseProtocolError for that image. Probing an image's size never reads its body.

http:// and https:// ranged reads go through a lean reader (`PlainReader`: hand-parsed
headers, the body received straight into a preallocated buffer, TLS on the same ssl.SSLContext
as httpx) because httpx costs one core at ~600 MB/s over http and ~4x the CPU per byte over TLS;
anything it does not expect (non-206, chunked, redirects) is redone through httpx, which also
does listings and HEADs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpx
import trio

from ..buffers import aligned_buffer
from ..digest import Buffer
from ..errors import (
    BaseAccessDenied,
    BaseChanged,
    BaseCorrupt,
    BaseError,
    BaseNotFound,
    BaseProtocolError,
    BaseUnavailable,
    BaseUnreachable,
    RedirectTargetDown,
    TransientBaseError,
    UsageError,
)
from ..manifest import JSON_ERRORS, parse_index
from . import (
    BaseOptions,
    describe_url,
    image_name_problem,
    one_error_per_listing,
    skip_bad_entry,
    valid_entry,
)
from .http_policy import (
    AuthHeader,
    encoded,
    origin_of,
    parse_byte_count,
    read_body,
    send,
)
from .http_wire import (
    PlainReader,
    Validator,
    connect_error,
    httpx_errors,
    parse_content_range,
    status_error,
    tls_context,
    usable_validator,
)

log = logging.getLogger(__name__)

MAX_LISTING_BYTES = 16 << 20  # index.json or a JSON autoindex: ~150k entries


def stall_timeout(options: BaseOptions) -> float:
    """How long one request may go without progress: a share of --io-timeout, so the fetcher
    has room to retry within its budget."""
    return max(0.5, min(options.io_timeout / 3, 20.0))


def auth_header(options: BaseOptions, base_url: str) -> AuthHeader | None:
    """The header named by the env var in `options.auth_header_env`, for `base_url`'s origin."""
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
    # Not ASCII: httpx failed to encode it at the first request (a traceback).
    if "\r" in value or "\n" in value or not value.isascii():
        raise UsageError(
            f"environment variable {options.auth_header_env} holds a bad value (line breaks "
            "or characters that are not ASCII)"
        )
    return AuthHeader(name, value, origin_of(base_url))


@dataclass
class HttpImage:
    name: str
    size: int
    identity: str
    url: str  # as listed; redirects are followed from here
    validator: Validator
    reader: HttpReader = field(repr=False)
    target: str = ""  # where the last redirect from `url` led ("" = `url` itself)
    layout: None = None

    async def read(self, offset: int, length: int) -> Buffer:
        if length <= 0:
            return b""
        target = self.target or self.url
        try:
            data, self.target = await self.reader.read_range(
                target, self.validator, offset, length
            )
        except (BaseAccessDenied, BaseNotFound):
            if target == self.url:
                raise
            # A redirect target (a pre-signed URL, a mirror) may expire or move: resolve the
            # listed URL again, once; its answer is final.
            log.info("%s: redirect target failed, resolving the image URL again", self.name)
            data, self.target = await self.reader.read_range(
                self.url, self.validator, offset, length
            )
        return data


class HttpReader:
    """Ranged, validated reads over httpx, and the lean plain-http data path beside it."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        options: BaseOptions,
        auth: AuthHeader | None,
        tls: ssl.SSLContext,
    ) -> None:
        self.client = client
        self.auth = auth
        self.stall = stall_timeout(options)
        self.slots = trio.Semaphore(max(1, options.max_connections))
        self.plain = PlainReader(self.stall, auth, tls)
        self.use_plain = True  # tests turn it off to drive the httpx path
        self._warned_no_range = False

    async def read_range(
        self, url: str, validator: Validator, offset: int, length: int
    ) -> tuple[Buffer, str]:
        """The bytes, and the URL that gave them (where redirects from `url` led)."""
        try:
            self.slots.acquire_nowait()  # no scheduler round trip when a slot is free
        except trio.WouldBlock:
            await self.slots.acquire()
        try:
            if self.use_plain and url.startswith(("http://", "https://")):
                data = await self.plain.read_range(url, validator, offset, length)
                if data is not None:
                    return data, url
            return await self._read_httpx(url, validator, offset, length)
        finally:
            self.slots.release()

    async def _read_httpx(
        self, url: str, validator: Validator, offset: int, length: int
    ) -> tuple[memoryview, str]:
        what = describe_url(url)
        end = offset + length - 1
        headers = {"Range": f"bytes={offset}-{end}", **validator.conditional_headers()}
        with httpx_errors(what):
            resp = await send(self.client, "GET", url, self.auth, headers)
            try:
                final = str(resp.url)
                if resp.status_code in (200, 206) and encoded(resp.headers):
                    # We asked for identity: the body is not the image's bytes (aiter_raw
                    # gives them still encoded), whatever its Content-Range says.
                    raise BaseProtocolError(
                        f"{what}: compressed answer to a request for identity encoding"
                    )
                if resp.status_code == 206:
                    validator.check(resp.headers, what)
                    got = parse_content_range(resp.headers.get("content-range"), what)
                    if got is None or got[:2] != (offset, end):
                        raise TransientBaseError(
                            f"{what}: answer has the wrong Content-Range for bytes {offset}-{end}"
                        )
                    if got[2] is not None and got[2] != validator.size:
                        raise BaseChanged(f"{what}: size changed on the server")
                    declared = _declared_length(resp.headers, what)
                    if declared is not None and declared != length:
                        # As the lean reader: a body that is not exactly the range is no
                        # proof of which of its bytes are the range's.
                        raise TransientBaseError(f"{what}: answer has the wrong Content-Length")
                    # Framed otherwise (chunks), the body must end with the range.
                    body = await self._collect(resp, 0, length, what, whole=declared is None)
                    return body, final
                if resp.status_code == 200:
                    validator.check(resp.headers, what)
                    if (validator.etag or validator.last_modified) and not validator.proven_by(
                        resp.headers
                    ):
                        # If-Range failed silently, or a proxy dropped the header: no proof
                        # that these are the listed version's bytes.
                        raise BaseChanged(f"{what}: full answer without the listed validator")
                    declared = _declared_length(resp.headers, what)
                    if declared is None:
                        # Chunks, or to the connection's end: nothing says this body is the
                        # listed size before it ends, and the range is placed by it.
                        raise BaseProtocolError(f"{what}: whole answer of no declared length")
                    if declared != validator.size:
                        raise BaseChanged(f"{what}: size changed on the server")
                    if not self._warned_no_range:
                        self._warned_no_range = True
                        log.warning("%s ignores Range requests: reads will be slow", what)
                    return await self._collect(resp, offset, length, what), final
                raise status_error(resp.status_code, what)
            finally:
                await resp.aclose()

    async def _collect(
        self, resp: httpx.Response, skip: int, length: int, what: str, *, whole: bool = False
    ) -> memoryview:
        """Exactly `length` bytes after skipping `skip`; TransientBaseError if the body ends
        early, or with `whole` if it goes on after them (an answer without Content-Length).
        Stops reading (and drops the connection) once it has them."""
        out = view = aligned_buffer(length)
        pos = -skip  # where the next piece starts, relative to the first wanted byte
        pieces = resp.aiter_raw()
        async for piece in pieces:
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
        if whole and (pos > length or len(await anext(pieces, b""))):
            raise TransientBaseError(f"{what}: answer runs past the range")
        return out


def _declared_length(headers: httpx.Headers, what: str) -> int | None:
    """The body's length as its Content-Length declares it, or None when the body is framed
    otherwise: no Content-Length, or a Transfer-Encoding, which overrides it (RFC 9112 6.3:
    h11 reads the chunks, whatever length was declared beside them)."""
    value = headers.get("content-length")
    if value is None or "transfer-encoding" in headers:
        return None
    return parse_byte_count(value, what, "Content-Length")


def _listing_text(body: bytes) -> str:
    """A listing as text. nginx's JSON autoindex writes file names as their bytes: one name
    that is not UTF-8 made the whole listing undecodable and the mount failed. Undecodable
    bytes become surrogate escapes, which `valid_entry` refuses for that name alone."""
    return body.decode("utf-8-sig", "surrogateescape")


def _raise_if_redirect_target(exc: httpx.TransportError, url: str, what: str) -> None:
    """RedirectTargetDown if `exc` is a redirect's target, at another origin than `url`,
    not answering (a bad certificate there stays what it is: no retry helps)."""
    try:
        target = str(exc.request.url)
    except RuntimeError:  # no request attached: not ours to tell
        return
    if origin_of(target) == origin_of(url):
        return
    error = connect_error(exc, describe_url(target))
    if isinstance(error, BaseUnreachable):
        raise RedirectTargetDown(f"{what}: redirected to {error}") from None
    raise error from None


class HttpBase:
    """A base over HTTP(S): one image, or the images listed at a URL ending in '/'."""

    def __init__(
        self, url: str, client: httpx.AsyncClient, options: BaseOptions, tls: ssl.SSLContext
    ) -> None:
        self.url = url
        self.description = describe_url(url)
        self.client = client
        self.options = options
        self.auth = auth_header(options, url)
        self.reader = HttpReader(client, options, self.auth, tls)
        self.is_dir = urlsplit(url).path.endswith("/") or urlsplit(url).path == ""
        self.dir_url = url if self.is_dir else urljoin(url, ".")
        self.listed_at_open: list[HttpImage] | None = None  # list_images: given out once

    def _single_name(self) -> str:
        """The image name of a URL to one file: its last path segment, %-decoded. UsageError
        if that is no image name (a%2Fb.raw, %2E%2E, x%0A.raw): the mount came up empty,
        exit 0, the one image left out with a warning in its log."""
        name = unquote(urlsplit(self.url).path.rsplit("/", 1)[-1], errors="surrogateescape")
        if (problem := image_name_problem(name)) is not None:
            raise UsageError(f"base URL {self.description!r} names no image: {name!r}: {problem}")
        return name

    async def _request(
        self, method: str, url: str, what: str, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """The streamed answer (the caller closes it), redirects followed by http_policy.
        Its head must arrive within --io-timeout: httpx's timeouts are per socket read, so a
        server that trickles a head (a byte a second) would hold a listing, and the mount,
        forever. The data path is bounded by the fetcher's deadline instead."""
        with trio.move_on_after(self.options.io_timeout) as scope:
            with httpx_errors(what, opening=True):
                try:
                    return await send(self.client, method, url, self.auth, headers)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    _raise_if_redirect_target(exc, url, what)
                    raise
        assert scope.cancelled_caught
        raise TransientBaseError(f"{what}: no answer within {self.options.io_timeout:g}s")

    async def _fetch(
        self, url: str, what: str, max_bytes: int, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """(status, body) of a GET; the body (at most `max_bytes`, within --io-timeout) only
        for a 200 answer."""
        resp = await self._request("GET", url, what, headers)
        try:
            if resp.status_code != 200:
                return resp.status_code, b""
            with httpx_errors(what):
                return 200, await read_body(resp, max_bytes, self.options.io_timeout, what)
        finally:
            await resp.aclose()

    async def _head_only(
        self, method: str, url: str, what: str, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """The answer's status and headers only: its body is never read (a server that
        ignores Range would send a whole image)."""
        resp = await self._request(method, url, what, headers)
        await resp.aclose()
        return resp

    async def _validator(self, url: str) -> tuple[str, Validator]:
        """HEAD the image (falling back to a one-byte ranged GET) for its size and
        validator; returns the final URL after redirects."""
        what = describe_url(url)
        resp = await self._head_only("HEAD", url, what)
        size: int | None = None
        if resp.status_code == 200 and "content-length" in resp.headers:
            size = parse_byte_count(resp.headers["content-length"], what, "Content-Length")
        elif resp.status_code in (200, 405, 501):
            resp = await self._head_only("GET", url, what, {"Range": "bytes=0-0"})
            if resp.status_code == 206:
                got = parse_content_range(resp.headers.get("content-range"), what)
                size = got[2] if got else None
            elif resp.status_code == 416:
                size = 0  # an empty file: no byte 0 to ask for
            elif resp.status_code == 200 and "content-length" in resp.headers:
                size = parse_byte_count(resp.headers["content-length"], what, "Content-Length")
        if resp.status_code not in (200, 206, 416):
            raise status_error(resp.status_code, what)
        if size is None:
            raise BaseUnavailable(f"{what}: server does not tell the size of the image")
        validator = Validator(
            size=size,
            etag=usable_validator(resp.headers.get("etag"), "ETag", what),
            last_modified=usable_validator(
                resp.headers.get("last-modified"), "Last-Modified", what
            ),
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
            url=url,
            validator=validator,
            target=final_url,
            reader=self.reader,
        )

    async def _list_names(self) -> list[str]:
        what = self.description
        status, body = await self._fetch(urljoin(self.dir_url, "index.json"), what,
                                         MAX_LISTING_BYTES)
        if status == 200:
            try:
                return list(parse_index(_listing_text(body)))
            except BaseCorrupt as exc:
                raise BaseError(f"{what}index.json is not a valid image index ({exc})") from None
        if status not in (403, 404, 410):
            raise status_error(status, f"{what}index.json")
        status, body = await self._fetch(
            self.dir_url, what, MAX_LISTING_BYTES, {"Accept": "application/json"}
        )
        if status != 200:
            raise status_error(status, what)
        try:
            entries = json.loads(_listing_text(body))
            return [str(e["name"]) for e in entries if e.get("type") == "file"]
        except (*JSON_ERRORS, KeyError, TypeError, AttributeError):
            raise BaseError(
                f"{what}: no index.json and the directory listing is not JSON "
                "(nginx: autoindex_format json)"
            ) from None

    async def list_images(self) -> list[HttpImage]:
        """The images; the first call after open_http_base gets the listing it took (a mount
        listed twice: its index, or a single image's HEAD, twice)."""
        listed, self.listed_at_open = self.listed_at_open, None
        return listed if listed is not None else await self._list()

    async def _list(self) -> list[HttpImage]:
        if not self.is_dir:
            return [await self._image(self._single_name(), self.url)]
        names = [n for n in await self._list_names() if valid_entry(self.description, n)]
        images: dict[str, HttpImage] = {}
        limiter = trio.CapacityLimiter(max(1, self.options.max_connections))

        async def one(name: str) -> None:
            async with limiter:
                with skip_bad_entry(self.description, name):
                    image = await self._image(name, urljoin(self.dir_url, quote(name)))
                    if valid_entry(self.description, name, image.size):
                        images[name] = image

        with one_error_per_listing():
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(one, name)
        return [images[n] for n in sorted(images)]

    async def read_object(self, key: str, max_bytes: int) -> bytes:
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise BaseNotFound(f"{key} is outside the base")
        url = urljoin(self.dir_url, "/".join(quote(p) for p in parts))
        what = describe_url(url)
        async with self.reader.slots:
            status, body = await self._fetch(url, what, max_bytes)
        if status != 200:
            raise status_error(status, what)
        return body

    async def aclose(self) -> None:
        self.reader.plain.close_idle()
        await self.client.aclose()


def make_client(options: BaseOptions, verify: ssl.SSLContext) -> httpx.AsyncClient:
    # No auth header here: http_policy adds it per request, only for its origin.
    headers = {"Accept-Encoding": "identity", "User-Agent": "corfs"}
    stall = stall_timeout(options)
    return httpx.AsyncClient(
        verify=verify,
        headers=headers,
        timeout=httpx.Timeout(stall, pool=None),
        limits=httpx.Limits(
            max_connections=options.max_connections + 2,
            max_keepalive_connections=options.max_connections + 2,
        ),
        follow_redirects=False,  # http_policy.send follows them, under its rules
        trust_env=False,
    )


async def open_http_base(url: str, options: BaseOptions) -> HttpBase:
    """Open and list the base (a single image: its HEAD), so an unreachable or wrong URL
    fails here, in one line. That listing is the base's first list_images."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise UsageError(f"base URL {describe_url(url)!r} has no host")
    if parts.username or parts.password:
        raise UsageError(
            f"base URL {describe_url(url)!r} carries credentials: use --auth-header-env instead"
        )
    tls = tls_context(options.ca_file)
    client = make_client(options, tls)
    try:
        base = HttpBase(url, client, options, tls)
    except BaseException:
        await client.aclose()
        raise
    try:
        base.listed_at_open = await base._list()
    except TransientBaseError as exc:
        await base.aclose()
        raise BaseUnreachable(str(exc)) from None
    except BaseException:
        await base.aclose()
        raise
    return base
