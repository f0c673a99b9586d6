"""A hostile HTTP base cannot make corfs buffer or wait without bound, nor crash it with absurd
numbers: every body is capped before it is buffered (listings, manifests, chunk objects), a
size probe never reads a body, and absurd sizes are BaseProtocolError (a BaseError), never
ValueError. The server counts what it really sent, so the tests see the client stop early."""

from __future__ import annotations

import time

import pytest
import trio
import xxhash

from corfs.base import BaseOptions, open_base
from corfs.base.http import MAX_LISTING_BYTES, open_http_base
from corfs.errors import (
    BaseChanged,
    BaseError,
    BaseProtocolError,
    BaseUnavailable,
    TransientBaseError,
)
from corfs.manifest import MAX_MANIFEST_BYTES, Manifest, chunk_key
from corfs.refetch import why_base_cannot_supply
from tests.hostile import MiB, Route, huge_body, serve, trickle

FAST = BaseOptions(io_timeout=3.0)
HUGE = 600 * MiB
SLACK = 8 * MiB  # socket buffers on both sides may hold some of what the server sent


def image_route(size_header: str, content_range: str | None = None) -> Route:
    """/disk.raw whose HEAD says Content-Length `size_header` and whose ranged GETs answer 206
    with `content_range` (one byte of body)."""

    def route(method: str, path: str, headers: dict[str, str]):
        if path != "/disk.raw":
            return None
        if method == "HEAD":
            return 200, [("Content-Length", size_header), ("ETag", '"e"')], []
        return 206, [("Content-Range", content_range or ""), ("Content-Length", "1"),
                     ("ETag", '"e"')], [b"x"]

    return route


@pytest.mark.parametrize("size", ["99999999999999999999", "9" * 5000, "12abc", "-5",
                                  str((1 << 50) + 1)])
def test_absurd_image_size_is_a_protocol_error(hostile, size: str) -> None:
    server = serve(hostile, image_route(size))

    async def main() -> None:
        with pytest.raises(BaseProtocolError) as info:
            await open_base(server.url + "disk.raw", FAST)
        assert "disk.raw" in str(info.value)
        assert "\n" not in str(info.value)

    trio.run(main)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])
@pytest.mark.parametrize("content_range", ["bytes 0-0/" + "9" * 5000, "bytes " + "1" * 5000 +
                                           "-0/1000", f"bytes 0-0/{(1 << 50) + 1}"])
def test_absurd_content_range_is_a_protocol_error(hostile, lean: bool, content_range: str) -> None:
    server = serve(hostile, image_route("1000", content_range))

    async def main() -> None:
        store = await open_http_base(server.url + "disk.raw", FAST)
        try:
            (image,) = await store.list_images()
            store.reader.use_plain = lean
            with pytest.raises(BaseProtocolError):
                await image.read(0, 1)
        finally:
            await store.aclose()

    trio.run(main)


def test_size_probe_never_downloads_the_image(hostile) -> None:
    """HEAD refused, and the one-byte GET answered with the whole (huge) image: the size
    comes from Content-Length and the body is left unread."""

    def route(method: str, path: str, headers: dict[str, str]):
        if path != "/disk.raw":
            return None
        if method == "HEAD":
            return 405, [("Content-Length", "0")], []
        return 200, [("Content-Length", str(HUGE)), ("ETag", '"e"')], huge_body(HUGE)

    server = serve(hostile, route)

    async def main() -> None:
        start = time.monotonic()
        store = await open_http_base(server.url + "disk.raw", FAST)
        try:
            (image,) = await store.list_images()
            assert image.size == HUGE
        finally:
            await store.aclose()
        assert time.monotonic() - start < 3
        await trio.sleep(0.2)
        assert server.body_bytes_sent < SLACK

    trio.run(main)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "close-delimited"])
def test_huge_listing_is_cut_off_at_its_cap(hostile, declared: bool) -> None:
    def route(method: str, path: str, headers: dict[str, str]):
        if path == "/index.json":
            length = [("Content-Length", str(HUGE))] if declared else []
            return 200, length, huge_body(HUGE)
        return None

    server = serve(hostile, route)

    async def main() -> None:
        with pytest.raises(BaseProtocolError) as info:
            await open_base(server.url, FAST)
        assert "cap" in str(info.value)
        await trio.sleep(0.2)
        assert server.body_bytes_sent < MAX_LISTING_BYTES + SLACK

    trio.run(main)


def test_trickling_listing_fails_within_io_timeout(hostile) -> None:
    """One byte every 0.3 s never trips the per-read stall timeout (1 s here); the listing's
    deadline (--io-timeout, 3 s) ends it."""
    body = b'{"images": []}' + b" " * 100

    def route(method: str, path: str, headers: dict[str, str]):
        if path == "/index.json":
            return 200, [("Content-Length", str(len(body)))], trickle(body, 0.3)
        return None

    server = serve(hostile, route)

    async def main() -> None:
        start = time.monotonic()
        with pytest.raises(BaseUnavailable) as info:
            await open_base(server.url, FAST)
        assert "within" in str(info.value)
        assert time.monotonic() - start < FAST.io_timeout + 2

    trio.run(main)


def published_route(manifest: bytes, manifest_body, chunk_body) -> Route:
    """A published base: index.json listing disk.raw.corfs.json (listed and HEAD-sized as the
    real manifest), whose GET answers `manifest_body()`, and every chunk object
    `chunk_body()`."""

    def route(method: str, path: str, headers: dict[str, str]):
        if path == "/index.json":
            doc = b'{"images": [{"name": "disk.raw.corfs.json", "size": %d}]}' % len(manifest)
            return 200, [("Content-Length", str(len(doc)))], [doc]
        if path == "/disk.raw.corfs.json":
            if method == "HEAD":
                return 200, [("Content-Length", str(len(manifest))), ("ETag", '"m"')], []
            return manifest_body()
        if path.startswith("/chunks/"):
            return chunk_body()
        return None

    return route


def one_chunk_manifest() -> Manifest:
    digest = xxhash.xxh3_128_digest(b"\1" * MiB)
    return Manifest(name="disk.raw", size=MiB, chunk_size=MiB, digests=(digest,))


def test_huge_chunk_object_is_cut_off_at_the_compressed_bound(hostile) -> None:
    manifest = one_chunk_manifest()
    data = manifest.to_json()
    server = serve(hostile, published_route(
        data,
        lambda: (200, [("Content-Length", str(len(data)))], [data]),
        lambda: (200, [], huge_body(HUGE)),  # no Content-Length: only the cap stops it
    ))

    async def main() -> None:
        store = await open_base(server.url, FAST)
        try:
            (image,) = await store.list_images()
            start = time.monotonic()
            with pytest.raises(BaseError) as info:
                await image.read(0, MiB)
            assert isinstance(info.value, BaseProtocolError)
            assert chunk_key(manifest.digests[0]) in str(info.value)
            assert time.monotonic() - start < FAST.io_timeout
        finally:
            await store.aclose()
        await trio.sleep(0.2)
        assert server.body_bytes_sent < 2 * MiB + SLACK

    trio.run(main)


def test_manifest_larger_than_listed_is_capped_on_bytes_received(hostile) -> None:
    """Listed and HEAD-sized small, served huge: the image is left out after at most
    MAX_MANIFEST_BYTES, and the base still opens."""
    data = one_chunk_manifest().to_json()
    server = serve(hostile, published_route(
        data,
        lambda: (200, [], huge_body(HUGE)),
        lambda: None,
    ))

    async def main() -> None:
        store = await open_base(server.url, FAST)
        try:
            assert await store.list_images() == []
        finally:
            await store.aclose()
        await trio.sleep(0.2)
        assert server.body_bytes_sent < MAX_MANIFEST_BYTES + SLACK

    trio.run(main)


def test_a_listing_whose_entries_fail_raises_one_base_error_not_a_group(hostile) -> None:
    """Per-entry requests run in a nursery; what they raise reaches callers as one BaseError
    (forget's refetch check, verify and open catch BaseError: a group got past all three)."""
    heads = {"fail": False}

    def route(method: str, path: str, headers: dict[str, str]):
        if path == "/index.json":
            body = b'{"images": [{"name": "a.raw", "size": 10}, {"name": "b.raw", "size": 10}]}'
            return 200, [("Content-Length", str(len(body)))], [body]
        if path in ("/a.raw", "/b.raw") and method == "HEAD":
            if heads["fail"]:
                return 503, [("Content-Length", "0")], []
            return 200, [("Content-Length", "10"), ("ETag", '"e"')], []
        return None

    server = serve(hostile, route)

    async def main() -> None:
        store = await open_http_base(server.url, BaseOptions(io_timeout=1.0))
        try:
            assert [i.name for i in await store.list_images()] == ["a.raw", "b.raw"]
            heads["fail"] = True
            with pytest.raises(TransientBaseError):
                await store.list_images()
            why = await why_base_cannot_supply(store, "a.raw", "size=10;etag=\"e\"", 10)
            assert why is not None and "cannot be listed" in why
        finally:
            await store.aclose()

    trio.run(main)


def plain_file_route(content: bytearray) -> Route:
    """/disk.raw served from `content` as it is at each request, with real ranges and neither
    ETag nor Last-Modified: the size is the only thing that can tell versions apart."""

    def route(method: str, path: str, headers: dict[str, str]):
        if path != "/disk.raw":
            return None
        data = bytes(content)
        if method == "HEAD":
            return 200, [("Content-Length", str(len(data)))], []
        first, _, last = headers["range"].removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last), len(data) - 1)
        piece = data[start : end + 1]
        return 206, [("Content-Range", f"bytes {start}-{end}/{len(data)}"),
                     ("Content-Length", str(len(piece)))], [piece]

    return route


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])
def test_a_growing_file_without_validators_is_base_changed(hostile, lean: bool) -> None:
    content = bytearray(b"a" * 8192)
    server = serve(hostile, plain_file_route(content))

    async def main() -> None:
        store = await open_http_base(server.url + "disk.raw", FAST)
        try:
            (image,) = await store.list_images()
            store.reader.use_plain = lean
            assert bytes(await image.read(4096, 4096)) == b"a" * 4096
            content[4096:] = b"b" * 8192  # rewritten and grown: same range, other bytes
            with pytest.raises(BaseChanged):
                await image.read(4096, 4096)
        finally:
            await store.aclose()

    trio.run(main)
