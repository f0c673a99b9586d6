"""S3 bases: `s3://bucket/prefix/` exposes the objects directly below the prefix (not deeper),
`s3://bucket/prefix/key.raw` exposes that one object.

boto3 is blocking, so every call runs in a worker thread under one CapacityLimiter sized like
the connection pool. Such a thread cannot be interrupted, and botocore's timeouts are per
socket operation (a body that trickles in never trips them), so calls are abandoned on
cancel: the fetcher's --io-timeout ends the wait at once and the thread's eventual result is
dropped. That is safe because the calls only read and share no state with the trio side; an
abandoned call keeps its limiter slot until its thread ends. Signing and credentials are
botocore's: env, shared config / profile, instance role; resolving them (building the client,
a refresh while signing) is bounded by --io-timeout the same way. Invariants:
- An image's identity is its ETag plus size, and every ranged GetObject carries IfMatch with
  that ETag and is checked (Content-Range, exact length, ETag): a changed object raises
  BaseChanged, never bytes of another version. An endpoint that sends no ETag (not S3 itself)
  leaves only the size: a warning says that changes cannot be detected, as for HTTP.
- botocore's own retries are off (the fetcher retries); connect/read timeouts derive from
  --io-timeout, so a silent endpoint becomes TransientBaseError.
- Messages name the bucket and key, never credentials. botocore's exceptions become the error
  tree in s3_errors.py, the one mapper (publishing to S3 uses it too).
- Sizes are checked (0..MAX_IMAGE_SIZE, else BaseProtocolError for that object), a GetObject
  body is read to at most its cap + 1 bytes within --io-timeout, any body botocore holds
  whole (a listing page, an error) to MAX_BUFFERED_BYTES, and a listing has a deadline
  (--io-timeout) and a cap on its entries: a hostile endpoint cannot make corfs buffer or
  wait without bound.
Ranged reads of image bytes go through s3_wire.py (botocore signs, the lean HTTP reader sends
and receives); an answer it does not expect is redone here through botocore.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from ..buffers import aligned_copy
from ..errors import (
    BaseChanged,
    BaseError,
    BaseNotFound,
    BaseProtocolError,
    BaseUnreachable,
    CorfsError,
    TransientBaseError,
    UsageError,
)
from ..s3_errors import refuse_blind_redirects, s3_error
from . import (
    MAX_IMAGE_SIZE,
    BaseOptions,
    describe_url,
    parse_s3_url,
    skip_bad_entry,
    valid_entry,
)
from .http import stall_timeout
from .http_policy import parse_byte_count
from .http_wire import parse_content_range, sendable
from .s3_wire import S3Wire

log = logging.getLogger(__name__)

MAX_LISTED_OBJECTS = 100_000  # below one prefix; ListObjects pages hold 1000 each
MAX_BUFFERED_BYTES = 16 << 20  # a ListObjectsV2 page (1000 keys) is ~300 KB, an error ~1 KB

def checked_size(value: object, what: str) -> int:
    """An object size from the endpoint, if it is a plausible one."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_IMAGE_SIZE:
        raise BaseProtocolError(f"{what}: size {str(value)[:24]!r} is not a plausible byte count")
    return value


@dataclass
class S3Image:
    name: str
    size: int
    identity: str
    key: str
    etag: str
    store: S3Base = field(repr=False)
    layout: None = None

    async def read(self, offset: int, length: int) -> memoryview:
        if length <= 0:
            return memoryview(b"")
        data = await self.store.wire.read(self.store.bucket, self, offset, length)
        if data is not None:
            return data
        return await self.store._run(self.store._read_sync, self, offset, length)


def _setup_error(exc: Exception, what: str) -> CorfsError:
    """The error for botocore refusing to make a client: missing credentials as s3_error says
    (access denied), the rest is the user's settings (--region '' or 'a/b': InvalidRegionError,
    ValueError), not a base that is down."""
    from botocore import exceptions as bx

    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return s3_error(exc, what)
    if isinstance(exc, (bx.BotoCoreError, ValueError)):
        return UsageError(f"{what}: cannot set up the S3 client ({type(exc).__name__}): check "
                          "--region, --endpoint-url, --profile and the AWS_* variables")
    raise exc


class S3Base:
    def __init__(self, bucket: str, prefix: str, options: BaseOptions) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.is_dir = prefix == "" or prefix.endswith("/")
        self.description = f"s3://{bucket}/{prefix}"
        self.options = options
        self.listed_at_open: list[S3Image] | None = None  # list_images: given out once
        self._first_etags = threading.Lock()  # see _check_etag
        self.limiter = trio.CapacityLimiter(max(1, options.max_connections))
        # Calls outside the fetcher queue here before their --io-timeout starts (_run_within)
        self._queued = trio.Semaphore(max(1, options.max_connections))
        stall = stall_timeout(options)
        try:
            session = boto3.session.Session(profile_name=options.profile)
        except Exception as exc:  # botocore.exceptions.ProfileNotFound and friends
            raise s3_error(exc, self.description) from None
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=stall,
            read_timeout=stall,
            max_pool_connections=max(1, options.max_connections) + 2,
            tcp_keepalive=True,
        )
        try:
            self.client: Any = session.client(
                "s3",
                endpoint_url=options.endpoint_url,
                region_name=options.region,
                config=config,
                verify=options.ca_file if options.ca_file else None,
            )
            credentials = session.get_credentials()
        except Exception as exc:  # a traceback before: bad --region, half the credentials
            raise _setup_error(exc, self.description) from None
        refuse_blind_redirects(self.client)
        cap_buffered_answers(self.client)
        # The reads trust what botocore trusts: --ca-file, else AWS_CA_BUNDLE or the
        # profile's ca_bundle, else the system's CAs.
        ca_file = options.ca_file or session._session.get_config_variable("ca_bundle")
        self.wire = S3Wire(self.client, credentials, ca_file, stall, self.limiter)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self.limiter, abandon_on_cancel=True
        )

    async def _run_within(self, what: str, fn: Any, *args: Any) -> Any:
        """`_run` with a deadline of --io-timeout, for calls outside the fetcher (listing,
        HEAD, whole objects): botocore's timeouts are per socket read, so an endpoint that
        trickles would otherwise hold a listing, and the mount, without bound. The deadline
        starts once the call has its turn: a listing of many published images reads their
        manifests all at once, and those queued behind the others must not time out."""
        async with self._queued:
            with trio.move_on_after(self.options.io_timeout) as scope:
                return await self._run(fn, *args)
        assert scope.cancelled_caught
        raise TransientBaseError(
            f"{what}: answer not received within {self.options.io_timeout:g}s"
        )

    def _what(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _read_sync(self, image: S3Image, offset: int, length: int) -> memoryview:
        what = self._what(image.key)
        end = offset + length - 1
        try:
            conditions = {"IfMatch": image.etag} if image.etag else {}
            resp = self.client.get_object(
                Bucket=self.bucket, Key=image.key, Range=f"bytes={offset}-{end}", **conditions
            )
            body = resp["Body"]
            try:
                self._check_etag(image, resp.get("ETag"), what)
                got = parse_content_range(resp.get("ContentRange"), what)
                if got is None:
                    if offset != 0 or resp.get("ContentLength") != image.size:
                        raise TransientBaseError(f"{what}: answer without Content-Range")
                    got = (0, image.size - 1, image.size)
                if got[:2] != (offset, end):
                    raise TransientBaseError(f"{what}: wrong Content-Range for {offset}-{end}")
                if got[2] is not None and got[2] != image.size:
                    raise BaseChanged(f"{what}: size changed on the server")
                # Within --io-timeout, as read_object's: an abandoned read (the fetcher's
                # deadline) must not trickle on for hours holding a limiter slot.
                data = _read_within(body, length + 1, self.options.io_timeout, what)
            finally:
                body.close()
        except BaseError:
            raise
        except Exception as exc:
            raise s3_error(exc, what) from None
        if len(data) != length:
            raise TransientBaseError(f"{what}: body of {len(data)} bytes, expected {length}")
        # One memcpy (botocore gives bytes) buys a direct write past the page cache.
        return aligned_copy(data)

    def _check_etag(self, image: S3Image, etag: str | None, what: str) -> None:
        """BaseChanged if an answer's ETag is not the image's. An image listed without one
        takes the first an answer carries (a sendable one), so that a change within the mount
        is still told, and reads get If-Match (the lean reader's too) from then on."""
        if not etag:
            return
        with self._first_etags:  # reads run in threads: one first ETag, not one each
            if not image.etag and sendable(etag):
                image.etag = etag
        if image.etag and etag != image.etag:
            raise BaseChanged(f"{what}: changed on the server (ETag moved)")

    def _head_sync(self, key: str) -> tuple[object, str]:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise s3_error(exc, self._what(key)) from None
        # As a listing takes it: an endpoint may send no ETag (then the identity has none).
        return resp.get("ContentLength"), str(resp.get("ETag", ""))

    def _list_sync(self, prefix: str) -> list[tuple[str, object, str]]:
        """(key, size as sent, etag) of the objects directly below `prefix` (Delimiter '/')."""
        found: list[tuple[str, object, str]] = []
        what = f"s3://{self.bucket}/{prefix}"
        # As the caller's (_run_within): this thread goes on after the caller gave up, and an
        # endpoint whose continuation tokens loop (A, B, A, ...: botocore catches only one
        # repeated at once) kept it asking for good, one more thread at each reconnection.
        deadline = time.monotonic() + self.options.io_timeout
        tokens: set[str] = set()
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                for obj in page.get("Contents", ()):
                    found.append((str(obj["Key"]), obj.get("Size"), str(obj.get("ETag", ""))))
                if len(found) > MAX_LISTED_OBJECTS:
                    raise BaseProtocolError(f"{what}: more than {MAX_LISTED_OBJECTS} objects")
                token = page.get("NextContinuationToken")
                if page.get("IsTruncated") and token is not None:  # else the last page
                    if token in tokens:
                        raise BaseProtocolError(f"{what}: the listing's pages go round in a loop")
                    tokens.add(token)
                if time.monotonic() > deadline:
                    raise TransientBaseError(
                        f"{what}: listing not done within {self.options.io_timeout:g}s"
                    )
        except BaseError:
            raise
        except Exception as exc:
            raise s3_error(exc, what) from None
        return found

    def _image(self, key: str, sent_size: object, etag: str) -> S3Image:
        """BaseProtocolError (for this object only) if its size is absurd, or its ETag cannot
        go back in If-Match (S3's are quoted hex; an endpoint that lists another is broken)."""
        size = checked_size(sent_size, self._what(key))
        if etag and not sendable(etag):
            raise BaseProtocolError(f"{self._what(key)}: its ETag is not a header value")
        if not etag:  # S3 always sends one; an S3-compatible endpoint may not
            log.warning("%s has no ETag: changes cannot be detected", self._what(key))
        return S3Image(
            name=key.rsplit("/", 1)[-1],
            size=size,
            identity=f"size={size};etag={etag}",
            key=key,
            etag=etag,
            store=self,
        )

    async def list_images(self) -> list[S3Image]:
        """The images; the first call after open_s3_base gets the listing it took (a mount
        listed twice: one LIST more per 1000 objects, and its warnings twice)."""
        listed, self.listed_at_open = self.listed_at_open, None
        return listed if listed is not None else await self._list()

    async def _list(self) -> list[S3Image]:
        if not self.is_dir:
            size, etag = await self._run_within(
                self._what(self.prefix), self._head_sync, self.prefix
            )
            return [self._image(self.prefix, size, etag)]
        objects = await self._run_within(
            f"{self.description} (listing)", self._list_sync, self.prefix
        )
        images = []
        deeper = 0
        for key, size, etag in objects:
            name = key.removeprefix(self.prefix)
            if not key.startswith(self.prefix) or "/" in name:
                # Not directly below the prefix: an endpoint that ignores Delimiter listed
                # p/sub/disk.raw too, which then took the name disk.raw from p/disk.raw.
                deeper += 1
                continue
            if not name or not valid_entry(self.description, name):
                continue
            with skip_bad_entry(self.description, name):  # a size absent or absurd: this one
                images.append(self._image(key, size, etag))
        if deeper:
            log.warning(
                "%s: the endpoint listed %d objects that are not directly below the prefix "
                "(does it ignore Delimiter?): left out", self.description, deeper,
            )
        return sorted(images, key=lambda i: i.name)

    async def read_object(self, key: str, max_bytes: int) -> bytes:
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise BaseNotFound(f"{key} is outside the base")
        # The objects beside a single object live below its "directory": "" at the root
        # (rsplit of a key without '/' is the key itself: "disk.raw.corfs.json/...").
        base = self.prefix if self.is_dir else self.prefix.rpartition("/")[0] + "/"
        if base == "/":
            base = ""
        full = base + "/".join(parts)

        what = self._what(full)

        def get() -> bytes:
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=full)
                body = resp["Body"]
                try:
                    declared = resp.get("ContentLength")
                    if declared is not None and checked_size(declared, what) > max_bytes:
                        raise BaseProtocolError(f"{what}: {declared} bytes is over the cap")
                    data = _read_within(body, max_bytes + 1, self.options.io_timeout, what)
                finally:
                    body.close()
            except BaseError:
                raise
            except Exception as exc:
                raise s3_error(exc, what) from None
            if len(data) > max_bytes:
                raise BaseProtocolError(f"{what}: body runs past the {max_bytes} byte cap")
            if declared is not None and len(data) != declared:
                raise TransientBaseError(f"{what}: body ended early")
            return data

        return await self._run_within(what, get)

    async def aclose(self) -> None:
        self.wire.close()
        # Not under the limiter: abandoned calls may still hold its slots.
        await trio.to_thread.run_sync(
            self.client.close, abandon_on_cancel=True, limiter=trio.CapacityLimiter(1)
        )


def cap_buffered_answers(client: Any) -> None:
    """Make `client` (botocore's) read each answer body it holds whole (a listing page, an
    error) to at most MAX_BUFFERED_BYTES. botocore has no such cap: a hostile endpoint's
    400 MiB listing page grew the process by 1.6 GB, and an abandoned call reads on. Its
    HTTP session is not public API: if it is not where it was, reads stay uncapped."""
    endpoint: Any = getattr(client, "_endpoint", None)
    inner = getattr(endpoint, "http_session", None)
    if inner is None or not hasattr(inner, "send"):
        log.debug("botocore's HTTP session not found: its answer bodies are not capped")
        return
    endpoint.http_session = _CappedSession(inner)


class _CappedSession:
    """botocore's HTTP session, reading the bodies botocore would buffer itself (all but a
    GetObject's successful one, which stays a stream) to MAX_BUFFERED_BYTES."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def send(self, request: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        if request.method == "HEAD":  # no body: its Content-Length is the object's size
            return self.inner.send(request)
        streamed = request.stream_output
        request.stream_output = True  # the session leaves the body unread: read it here
        try:
            response = self.inner.send(request)
        finally:
            request.stream_output = streamed
        if streamed and response.status_code < 300:
            return response
        body = _read_capped(response.raw, response.headers, describe_url(request.url))
        return AWSResponse(response.url, response.status_code, response.headers, _Read(body))


class _Read:
    """A body read already, as AWSResponse.content reads a raw one (stream())."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, *_: Any, **__: Any) -> Any:
        yield self.data


def _read_capped(raw: Any, headers: Any, what: str) -> bytes:
    declared = headers.get("content-length")
    pieces: list[bytes] = []
    got = 0
    try:
        if declared is not None and (
            parse_byte_count(declared, what, "Content-Length") > MAX_BUFFERED_BYTES
        ):
            raise BaseProtocolError(f"{what}: answer of {declared} bytes is over the cap")
        for piece in raw.stream(1 << 16):
            got += len(piece)
            if got > MAX_BUFFERED_BYTES:
                raise BaseProtocolError(f"{what}: answer runs past {MAX_BUFFERED_BYTES} bytes")
            pieces.append(piece)
    except BaseError:
        raw.close()  # never reuse a connection left mid-body
        raise
    except Exception as exc:  # urllib3's, as botocore's session would have mapped them
        raw.close()
        raise TransientBaseError(f"{what}: answer cut short ({type(exc).__name__})") from None
    return b"".join(pieces)


def _read_within(body: Any, limit: int, seconds: float, what: str) -> bytes:
    """At most `limit` bytes of a GetObject body, in --io-timeout: the thread of a call that
    was abandoned at its deadline (_run_within) ends too, instead of reading a trickling body
    for hours with a connection slot held. Each read returns what has arrived (read1)."""
    raw: Any = getattr(body, "_raw_stream", body)  # botocore's StreamingBody: urllib3 below
    read = raw.read1 if hasattr(raw, "read1") else body.read
    deadline = time.monotonic() + seconds
    pieces: list[bytes] = []
    got = 0
    while got < limit:
        piece = read(min(limit - got, 1 << 20))
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
        if time.monotonic() > deadline:
            raise TransientBaseError(f"{what}: body not received within {seconds:g}s")
    return b"".join(pieces)


_OPENING: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("s3_opening")


def _opening_limiter() -> trio.CapacityLimiter:
    """One open at a time per trio run: an open abandoned on a credential source that hangs
    keeps its thread (and the process it waits for); the next one (a mount's reconnection,
    each minute) then waits for it, within its --io-timeout, instead of adding another."""
    try:
        return _OPENING.get()
    except LookupError:
        limiter = trio.CapacityLimiter(1)
        _OPENING.set(limiter)
        return limiter


async def open_s3_base(url: str, options: BaseOptions) -> S3Base:
    """Open and list, so a wrong bucket, key or credentials fail here, in one line. That
    listing is the store's first list_images."""
    bucket, prefix = parse_s3_url(url)
    await trio.to_thread.run_sync(importlib.import_module, "boto3")  # not timed: local work
    store: S3Base | None = None
    with trio.move_on_after(options.io_timeout):
        # botocore resolves the credentials here (a credential_process, an instance role, a
        # container endpoint): one that hangs held the mount, or its reconnection, until it
        # ended. The abandoned thread's client is never used.
        store = await trio.to_thread.run_sync(  # its own limiter: see S3Wire._signing
            S3Base, bucket, prefix, options, abandon_on_cancel=True, limiter=_opening_limiter(),
        )
    if store is None:
        raise BaseUnreachable(
            f"s3://{bucket}/{prefix}: no credentials within {options.io_timeout:g}s"
        )
    try:
        store.listed_at_open = await store._list()
    except BaseNotFound:
        if store.is_dir:
            await store.aclose()
            raise
        # s3://bucket/dir without the slash: accept it when it names a non-empty "directory".
        store.prefix += "/"
        store.is_dir = True
        store.description = f"s3://{bucket}/{store.prefix}"
        try:
            store.listed_at_open = await store._list()
            if not store.listed_at_open:
                raise BaseNotFound(f"s3://{bucket}/{prefix}: not found") from None
        except BaseException:
            await store.aclose()
            raise
    except TransientBaseError as exc:
        await store.aclose()
        raise BaseUnreachable(str(exc)) from None
    except BaseException:
        await store.aclose()
        raise
    return store
