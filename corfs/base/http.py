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

Plain http:// ranged reads go through a lean reader (`PlainReader`: hand-parsed headers,
`recv_into` a preallocated buffer) because httpx costs one core at ~600 MB/s; anything it does
not expect (non-206, chunked, redirects) is redone through httpx, which also does TLS and
listings.
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
    BaseChanged,
    BaseError,
    BaseNotFound,
    BaseUnavailable,
    BaseUnreachable,
    TransientBaseError,
    UsageError,
)
from . import BaseOptions, describe_url, skip_bad_entry, valid_entry
from .http_wire import PlainReader, Validator, connect_error, parse_content_range, status_error

log = logging.getLogger(__name__)



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


@dataclass
class HttpImage:
    name: str
    size: int
    identity: str
    url: str
    validator: Validator
    reader: HttpReader = field(repr=False)
    layout: None = None

    async def read(self, offset: int, length: int) -> Buffer:
        if length <= 0:
            return b""
        return await self.reader.read_range(self.url, self.validator, offset, length)


class HttpReader:
    """Ranged, validated reads over httpx, and the lean plain-http data path beside it."""

    def __init__(self, client: httpx.AsyncClient, options: BaseOptions) -> None:
        self.client = client
        self.stall = stall_timeout(options)
        self.slots = trio.Semaphore(max(1, options.max_connections))
        self.plain = PlainReader(self.stall, auth_header(options))
        self.use_plain = True  # tests turn it off to drive the httpx path
        self._warned_no_range = False

    async def read_range(
        self, url: str, validator: Validator, offset: int, length: int
    ) -> Buffer:
        async with self.slots:
            if self.use_plain and url.startswith("http://"):
                data = await self.plain.read_range(url, validator, offset, length)
                if data is not None:
                    return data
            return await self._read_httpx(url, validator, offset, length)

    async def _read_httpx(
        self, url: str, validator: Validator, offset: int, length: int
    ) -> memoryview:
        what = describe_url(url)
        end = offset + length - 1
        headers = {"Range": f"bytes={offset}-{end}", **validator.conditional_headers()}
        try:
            async with self.client.stream("GET", url, headers=headers) as resp:
                if resp.status_code == 206:
                    validator.check(resp.headers, what)
                    got = parse_content_range(resp.headers.get("content-range"))
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
                raise status_error(resp.status_code, what)
        except httpx.TimeoutException as exc:
            raise TransientBaseError(f"{what}: timed out ({type(exc).__name__})") from None
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise TransientBaseError(f"{what}: connection failed ({type(exc).__name__})") from None

    async def _collect(self, resp: httpx.Response, skip: int, length: int, what: str) -> memoryview:
        """Exactly `length` bytes after skipping `skip`; TransientBaseError if the body ends
        early. Stops reading (and drops the connection) once it has them."""
        out = view = aligned_buffer(length)
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
            raise connect_error(exc, what) from None
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
            raise connect_error(exc, what) from None
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
                got = parse_content_range(resp.headers.get("content-range"))
                size = got[2] if got else None
            elif resp.status_code == 416:
                size = 0  # an empty file: no byte 0 to ask for
            elif resp.status_code == 200:
                size = len(resp.content)
        if resp.status_code not in (200, 206, 416):
            raise status_error(resp.status_code, what)
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
            raise status_error(resp.status_code, f"{what}index.json")
        resp = await self._get(self.dir_url, what, headers={"Accept": "application/json"})
        if resp.status_code != 200:
            raise status_error(resp.status_code, what)
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
        names = [n for n in await self._list_names() if valid_entry(self.description, n)]
        images: dict[str, HttpImage] = {}
        limiter = trio.CapacityLimiter(max(1, self.options.max_connections))

        async def one(name: str) -> None:
            async with limiter:
                with skip_bad_entry(self.description, name):
                    image = await self._image(name, urljoin(self.dir_url, quote(name)))
                    if valid_entry(self.description, name, image.size):
                        images[name] = image

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
            raise status_error(resp.status_code, what)
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
        raise BaseUnreachable(str(exc)) from None
    except BaseException:
        await base.aclose()
        raise
    return base
