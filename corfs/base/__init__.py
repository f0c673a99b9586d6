"""Where base images come from. Everything above this package sees only `BaseStore` and
`BaseImage`; it never knows whether bytes came from a directory, HTTP or S3.

Contract of every store (tests/stores runs one suite against each):
- `list_images()` returns the images of the base, each with a valid name and size
  (`entry_problem`: every store checks its entries with it) and an `identity` string that
  changes whenever the image's content may have changed. One bad entry (a bad name or size, a
  listed image that answers 404, a size that does not parse) is left out with one warning
  naming it (`valid_entry`, `skip_bad_entry`); the rest of the listing serves.
- `BaseImage.read(offset, length)` returns exactly `length` bytes at `offset` (the caller keeps
  the range inside the image) of *that identity*: if the image changed, it raises BaseChanged,
  never bytes of another version. Retryable failures raise TransientBaseError; the fetcher
  retries them, stores do not loop themselves.
- `read_object(key, max_bytes)` reads a whole small object below the base (not listed as an
  image), never more than `max_bytes` of it.
- BASE is read-only: no store writes to it, ever.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..digest import Buffer
from ..errors import (
    BaseError,
    BaseUnreachable,
    CorfsError,
    RedirectTargetDown,
    TransientBaseError,
    UsageError,
)

log = logging.getLogger(__name__)

MAX_NAME_BYTES = 255  # an image is a FUSE directory entry: NAME_MAX
# Chunk state costs a byte per chunk in memory: 64 MiB at 1 MiB chunks. Larger than any disk
# image we expect, small enough that a hostile size cannot exhaust memory or the cache's file
# system's file size limit (ext4: 16 TiB) aborts more than that one image.
MAX_IMAGE_SIZE = 64 << 40


def image_name_problem(name: str) -> str | None:
    """Why `name` cannot be an image name, or None if it can. An image name is a file name in
    MNT and a TEXT key in state.db: non-empty, not '.' or '..', no '/', valid UTF-8 (no
    surrogate escapes of undecodable bytes), at most MAX_NAME_BYTES bytes in UTF-8, and no
    control characters (C0, DEL, C1: they would garble terminals and log lines)."""
    if not name or name in (".", ".."):
        return "it is empty, '.' or '..'"
    if "/" in name or "\0" in name:
        return "it contains '/' or NUL"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if len(encoded) > MAX_NAME_BYTES:
        return f"it is {len(encoded)} bytes long (at most {MAX_NAME_BYTES})"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return "it contains control characters"
    return None


def entry_problem(name: str, size: int | None = None) -> str | None:
    """Why a listed entry cannot be an image (its name, or its size when known), or None."""
    problem = image_name_problem(name)
    if problem is None and size is not None and not 0 <= size <= MAX_IMAGE_SIZE:
        problem = f"its size {size} is outside 0..{MAX_IMAGE_SIZE}"
    return problem


def leave_out(base: str, name: str, why: object) -> None:
    """The one warning for an entry left out of a listing. %r escapes control characters
    and undecodable bytes, so the line stays one printable line."""
    log.warning("%s: leaving out image %r: %s", base, name, why)


def valid_entry(base: str, name: str, size: int | None = None) -> bool:
    """True if the entry can be an image; otherwise warns once naming it."""
    problem = entry_problem(name, size)
    if problem is not None:
        leave_out(base, name, problem)
    return problem is None


@contextlib.contextmanager
def skip_bad_entry(base: str, name: str) -> Iterator[None]:
    """Around the work of listing one entry: an error of that entry alone (404, 403, a size
    that does not parse) leaves it out with one warning. A base that does not answer at all
    (BaseUnreachable, TransientBaseError) fails the whole listing: leaving entries out then
    would make a flaky base look like one whose images are gone."""
    try:
        yield
    except RedirectTargetDown as exc:  # the base answers; the place it sends us does not
        leave_out(base, name, exc)
    except (BaseUnreachable, TransientBaseError):
        raise
    except BaseError as exc:
        leave_out(base, name, exc)


@contextlib.contextmanager
def one_error_per_listing() -> Iterator[None]:
    """Around a nursery of per-entry tasks: trio groups their errors, but every caller of a
    listing (mount, forget, verify, open_*_base) catches BaseError. A group of CorfsErrors
    becomes one of them, the most telling: one that is not transient if there is one (a
    base that refuses says more than one that did not answer in time)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if not leaves or not all(isinstance(e, CorfsError) for e in leaves):
            raise
        lasting = [e for e in leaves if not isinstance(e, (TransientBaseError, BaseUnreachable))]
        raise (lasting or leaves)[0] from None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@dataclass(frozen=True)
class ChunkLayout:
    """What a published image knows about its chunks: their size, and per chunk the xxh3-128
    digest of its bytes, or None for an all-zero chunk (never fetched)."""

    chunk_size: int
    digests: tuple[bytes | None, ...]


# Memory the digests of one listing's published images may take (manifest_loading.py measures
# what each costs: 57 bytes a stored chunk). 512 MiB is ~9.4 M stored chunks: 9 TiB of
# non-zero data at 1 MiB chunks, or 5 manifests of the largest kind (64 MiB, 1.7 M chunks).
DEFAULT_MANIFEST_MEMORY = 512 << 20


@dataclass(frozen=True)
class BaseOptions:
    io_timeout: float = 60.0
    ca_file: str | None = None
    auth_header_env: str | None = None  # name of an env var holding "Header: value"
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    max_connections: int = 8
    manifest_memory: int = DEFAULT_MANIFEST_MEMORY


class BaseImage(Protocol):
    name: str
    size: int
    identity: str

    @property
    def layout(self) -> ChunkLayout | None:
        """Published images' chunk digests; None for raw images (read-only: raw stores declare
        it `None`)."""
        ...

    async def read(self, offset: int, length: int) -> Buffer:
        """Exactly `length` bytes at `offset`; writable and page-aligned
        (buffers.aligned_buffer) where the base can, so the store can write them with
        O_DIRECT."""
        ...


class BaseStore(Protocol):
    description: str  # safe for logs: no credentials

    async def list_images(self) -> Sequence[BaseImage]:
        """The images of the base now; for a remote base, the first call after open_base
        returns the listing opening it took (callers list right after opening)."""
        ...

    async def read_object(self, key: str, max_bytes: int) -> bytes:
        """The whole object at `key`, a '/'-separated path relative to the base (published
        chunk objects live at chunks/xx/<hex>.zst). BaseNotFound if there is none;
        BaseProtocolError, having read no more than `max_bytes` + 1, if it is larger."""
        ...

    async def aclose(self) -> None: ...


def describe_url(url: str) -> str:
    """The URL without user info or query, fit for a log line. One that does not parse (a
    password holding '/', '?' or '#' ends the authority early: its start reads as a port) is
    shown as its scheme alone: what follows may be a secret."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return f"{url.partition('://')[0]}://..."
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# What an s3:// URL's first part may be: S3's bucket names, loosely (older buckets and
# S3-compatible stores allow capitals and '_'). Never ':' or '@': user info typed into the
# URL (s3://KEY:SECRET@bucket/, where SECRET may hold '/') is refused, not quoted.
_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def parse_s3_url(url: str, role: str = "base URL") -> tuple[str, str]:
    """(bucket, prefix) of s3://BUCKET/PREFIX; UsageError, quoting none of the URL, if it
    does not start with a bucket name."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not _BUCKET_NAME.fullmatch(bucket):
        if not bucket:
            why = "has no bucket (s3://bucket/prefix)"
        elif "@" in url:
            why = "carries credentials: S3 takes them from the environment or --profile"
        else:
            why = "does not start with a bucket name (s3://bucket/prefix)"
        raise UsageError(f"{role} s3://... {why}")
    return bucket, prefix


async def open_base(url: str, options: BaseOptions = BaseOptions()) -> BaseStore:
    """Open BASE by its URL or path; checks that it is reachable (a remote base is listed:
    the store's first list_images returns that listing) and raises a BaseError (or
    UsageError) with one clear line otherwise."""
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

    return await with_published_images(store, options.manifest_memory)
