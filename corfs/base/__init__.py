"""Where base images come from. Everything above this package sees only `BaseStore` and
`BaseImage`; it never knows whether bytes came from a directory, HTTP or S3.

Contract of every store (tests/stores runs one suite against each):
- `list_images()` returns the images of the base, each with a name (no '/'), its size and an
  `identity` string that changes whenever the image's content may have changed.
- `BaseImage.read(offset, length)` returns exactly `length` bytes at `offset` (the caller keeps
  the range inside the image) of *that identity*: if the image changed, it raises BaseChanged,
  never bytes of another version. Retryable failures raise TransientBaseError; the fetcher
  retries them, stores do not loop themselves.
- `read_object(key, max_bytes)` reads a whole small object below the base (not listed as an
  image), never more than `max_bytes` of it.
- BASE is read-only: no store writes to it, ever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..digest import Buffer
from ..errors import UsageError

DIGEST_SIZE = 16  # xxh3-128


@dataclass(frozen=True)
class ChunkLayout:
    """What a published image knows about its chunks: their size, and per chunk the xxh3-128
    digest of its bytes, or None for an all-zero chunk (never fetched)."""

    chunk_size: int
    digests: tuple[bytes | None, ...]


@dataclass(frozen=True)
class BaseOptions:
    io_timeout: float = 60.0
    ca_file: str | None = None
    auth_header_env: str | None = None  # name of an env var holding "Header: value"
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    max_connections: int = 8


class BaseImage(Protocol):
    name: str
    size: int
    identity: str
    layout: ChunkLayout | None

    async def read(self, offset: int, length: int) -> Buffer:
        """Exactly `length` bytes at `offset`; writable and page-aligned
        (buffers.aligned_buffer) where the base can, so the store can write them with
        O_DIRECT."""
        ...


class BaseStore(Protocol):
    description: str  # safe for logs: no credentials

    async def list_images(self) -> list[BaseImage]: ...

    async def read_object(self, key: str, max_bytes: int) -> bytes:
        """The whole object at `key`, a '/'-separated path relative to the base (published
        chunk objects live at chunks/xx/<hex>.zst). BaseNotFound if there is none;
        BaseProtocolError, having read no more than `max_bytes` + 1, if it is larger."""
        ...

    async def aclose(self) -> None: ...


def describe_url(url: str) -> str:
    """The URL without user info or query, fit for a log line."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


async def open_base(url: str, options: BaseOptions = BaseOptions()) -> BaseStore:
    """Open BASE by its URL or path; checks that it is reachable and raises a BaseError
    (or UsageError) with one clear line otherwise."""
    if url.startswith(("http://", "https://")):
        from .http import open_http_base

        store: BaseStore = await open_http_base(url, options)
    elif url.startswith("s3://"):
        from .s3 import open_s3_base

        store = await open_s3_base(url, options)
    elif "://" in url:
        raise UsageError(
            f"unsupported base {describe_url(url)!r}: use a directory, http(s):// or s3://"
        )
    else:
        from .dir import DirBase

        store = DirBase.open(url)
    from .published import with_published_images

    return await with_published_images(store)
