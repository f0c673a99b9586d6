"""What corfs lets an HTTP(S) server do to it: the redirects it follows, where the auth header
goes, and how much of a body it reads.

Invariants:
- Redirects are followed here, by hand (httpx's own following is off): at most MAX_REDIRECTS
  hops, only to http(s), never from https to http (a TLS downgrade is refused with an error
  naming it), never to a URL carrying user info or a port beyond 65535.
- The auth header (--auth-header-env) is sent only to the origin (scheme, host, port) of the
  base URL it was given for; a hop to another origin goes without it (curl's rule). Every
  request of the HTTP store, httpx or the lean reader, asks `AuthHeader.for_url` for it.
- A whole body (listing, index, manifest, chunk object) is read only up to its cap: a declared
  Content-Length above the cap is refused before reading, a body that runs past it is cut off
  there, and the whole read has a deadline, so a trickling server cannot hold it forever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from ..errors import BaseProtocolError, BaseUnavailable, TransientBaseError
from . import MAX_IMAGE_SIZE, describe_url

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_BYTE_COUNT = re.compile(r"[0-9]{1,16}")  # no 4000-digit int before the MAX_IMAGE_SIZE check

Origin = tuple[str, str, int]


def origin_of(url: str) -> Origin:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def parse_byte_count(value: str, what: str, field: str) -> int:
    """A size header's value as an int; BaseProtocolError when it is no plain decimal number
    or is beyond MAX_IMAGE_SIZE (never a ValueError, never a 4000-digit int)."""
    text = value.strip()
    if not _BYTE_COUNT.fullmatch(text) or int(text) > MAX_IMAGE_SIZE:
        raise BaseProtocolError(f"{what}: {field} {text[:24]!r} is not a plausible byte count")
    return int(text)


@dataclass(frozen=True)
class AuthHeader:
    """The --auth-header-env header, bound to the origin of the base URL it was given for."""

    name: str
    value: str
    origin: Origin

    def for_url(self, url: str) -> dict[str, str]:
        return {self.name: self.value} if origin_of(url) == self.origin else {}


def auth_for(auth: AuthHeader | None, url: str) -> dict[str, str]:
    return auth.for_url(url) if auth else {}


def redirect_target(url: str, location: str | None, status: int) -> str:
    """Where a redirect answer to `url` points, if corfs may follow it."""
    what = describe_url(url)
    if not location:
        raise BaseUnavailable(f"{what}: redirect (HTTP {status}) without a Location")
    target = urljoin(url, location.strip())
    parts = urlsplit(target)
    try:
        _ = parts.port  # a ValueError for a port beyond 65535: here, not in describe_url later
    except ValueError:
        raise BaseUnavailable(f"{what}: refusing a redirect to a URL with a bad port") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise BaseUnavailable(f"{what}: refusing a redirect to {describe_url(target)!r}")
    if urlsplit(url).scheme.lower() == "https" and scheme == "http":
        raise BaseUnavailable(
            f"{what}: refusing a redirect from https to plain http ({describe_url(target)}): "
            "it would drop TLS"
        )
    if parts.username or parts.password:
        raise BaseUnavailable(f"{what}: refusing a redirect to a URL with credentials")
    return target


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    auth: AuthHeader | None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """The streamed answer to `method url` after following redirects under the rules above;
    the caller closes it. httpx errors pass through for the caller to map."""
    for _hop in range(MAX_REDIRECTS + 1):
        sent = {**(headers or {}), **auth_for(auth, url)}
        request = client.build_request(method, url, headers=sent)
        resp = await client.send(request, stream=True)
        if resp.status_code not in REDIRECT_STATUSES:
            return resp
        location = resp.headers.get("location")
        await resp.aclose()
        url = redirect_target(url, location, resp.status_code)
    raise BaseUnavailable(f"{describe_url(url)}: more than {MAX_REDIRECTS} redirects")


def encoded(headers: httpx.Headers) -> bool:
    """Whether an answer's body is in a Content-Encoding: corfs asks for identity, and takes
    nothing else (decoding would let a small body expand without bound, and raw bytes are not
    the image's)."""
    return headers.get("content-encoding", "identity").strip().lower() != "identity"


async def read_body(resp: httpx.Response, max_bytes: int, deadline: float, what: str) -> bytes:
    """The whole body of a streamed answer, at most `max_bytes` (else BaseProtocolError after
    reading no more than that), within `deadline` seconds (else TransientBaseError)."""
    declared_text = resp.headers.get("content-length")
    declared = None
    if declared_text is not None:
        declared = parse_byte_count(declared_text, what, "Content-Length")
        if declared > max_bytes:
            raise BaseProtocolError(f"{what}: body of {declared} bytes is over the {max_bytes} cap")
    if encoded(resp.headers):
        # We asked for identity; decoding would let a small body expand without bound.
        raise BaseProtocolError(f"{what}: compressed answer to a request for identity encoding")
    pieces: list[bytes] = []
    got = 0
    with trio.move_on_after(deadline) as scope:
        async for piece in resp.aiter_raw():
            got += len(piece)
            if got > max_bytes:
                raise BaseProtocolError(f"{what}: body runs past the {max_bytes} byte cap")
            pieces.append(piece)
    if scope.cancelled_caught:
        raise TransientBaseError(f"{what}: body not received within {deadline:g}s")
    if declared is not None and got != declared:
        raise TransientBaseError(f"{what}: body ended early ({got} of {declared} bytes)")
    return b"".join(pieces)
