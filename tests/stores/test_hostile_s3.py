"""A hostile S3 endpoint (tests/hostile.py speaking just enough S3) cannot make the S3
store buffer or wait without bound: a GetObject body is read to at most its cap + 1 bytes,
absurd sizes are BaseProtocolError, a trickling listing ends at --io-timeout."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from corfs.base import BaseOptions, open_base
from corfs.base.s3 import MAX_BUFFERED_BYTES, open_s3_base
from corfs.errors import BaseChanged, BaseProtocolError, BaseUnavailable
from corfs.fetcher import Fetcher, RetryPolicy
from tests.hostile import HostileServer, MiB, Route, huge_body, trickle
from tests.servers import FAKE_AWS_ENV

HUGE = 600 * MiB
SLACK = 8 * MiB
LISTING = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>
<Prefix>p/</Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter>
<IsTruncated>false</IsTruncated><Contents><Key>p/disk.raw</Key><Size>%s</Size>
<ETag>"e"</ETag></Contents></ListBucketResult>"""


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[HostileServer]]:
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    servers: list[HostileServer] = []
    yield servers
    for server in servers:
        server.stop()


def serve(servers: list[HostileServer], route: Route) -> BaseOptions:
    server = HostileServer(route).start()
    servers.append(server)
    return BaseOptions(io_timeout=3.0, endpoint_url=server.url.rstrip("/"), region="us-east-1")


def listing(size: bytes, chunk_body) -> Route:
    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" in path:
            doc = LISTING % size
            return 200, [("Content-Length", str(len(doc)))], [doc]
        return chunk_body()

    return route


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "close-delimited"])
def test_huge_object_body_is_read_to_its_cap_only(endpoint, declared: bool) -> None:
    length = [("Content-Length", str(HUGE))] if declared else []
    options = serve(endpoint, listing(b"1000", lambda: (200, length, huge_body(HUGE))))

    async def main() -> None:
        store = await open_s3_base("s3://b/p/", options)
        try:
            start = time.monotonic()
            with pytest.raises(BaseProtocolError) as info:
                await store.read_object("chunks/aa/x.zst", MiB)
            assert "s3://b/p/chunks/aa/x.zst" in str(info.value)
            assert time.monotonic() - start < 3
        finally:
            await store.aclose()
        await trio.sleep(0.2)
        assert endpoint[0].body_bytes_sent < MiB + SLACK

    trio.run(main)


def test_absurd_listed_size_leaves_out_only_that_object_naming_it(endpoint, caplog) -> None:
    options = serve(endpoint, listing(str(1 << 60).encode(), lambda: None))

    async def main() -> None:
        store = await open_base("s3://b/p/", options)  # as a mount does: one warning
        try:
            assert await store.list_images() == []
        finally:
            await store.aclose()

    trio.run(main)
    left_out = [r.getMessage() for r in caplog.records if "leaving out" in r.getMessage()]
    assert len(left_out) == 1 and "'disk.raw'" in left_out[0] and str(1 << 60) in left_out[0]


def test_trickling_listing_ends_at_io_timeout(endpoint) -> None:
    doc = LISTING % b"1000"

    def route(method: str, path: str, headers: dict[str, str]):
        return 200, [("Content-Length", str(len(doc)))], trickle(doc, 0.2)

    options = serve(endpoint, route)

    async def main() -> None:
        start = time.monotonic()
        with pytest.raises(BaseUnavailable) as info:
            await open_s3_base("s3://b/p/", options)
        assert "within" in str(info.value)
        assert time.monotonic() - start < options.io_timeout + 2

    trio.run(main)


def test_an_object_listed_without_a_size_leaves_out_only_itself(endpoint, caplog) -> None:
    doc = (
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>'
        b"<Prefix>p/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>"
        b"<Delimiter>/</Delimiter><IsTruncated>false</IsTruncated>"
        b'<Contents><Key>p/nosize.raw</Key><ETag>"e"</ETag></Contents>'
        b'<Contents><Key>p/good.raw</Key><Size>4096</Size><ETag>"f"</ETag></Contents>'
        b"</ListBucketResult>"
    )

    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" in path:
            return 200, [("Content-Length", str(len(doc)))], [doc]
        return None

    options = serve(endpoint, route)

    async def main() -> None:
        store = await open_base("s3://b/p/", options)
        try:
            assert [image.name for image in await store.list_images()] == ["good.raw"]
        finally:
            await store.aclose()

    trio.run(main)
    left_out = [r.getMessage() for r in caplog.records if "leaving out" in r.getMessage()]
    assert len(left_out) == 1 and "'nosize.raw'" in left_out[0]


REDIRECT = [("Location", "https://127.0.0.1:1/elsewhere"), ("Content-Length", "0")]


@pytest.mark.parametrize("status", [301, 307])
def test_an_endpoint_that_redirects_its_listing_fails_it_in_one_error(endpoint, status) -> None:
    """An http -> https redirect in front of an S3-compatible endpoint names no region:
    botocore's region redirector asked HeadBucket for one, got redirected again, and recursed
    (~80 requests, then a RecursionError: a traceback for `corfs mount`)."""
    options = serve(endpoint, lambda method, path, headers: (status, REDIRECT, []))

    async def main() -> None:
        with pytest.raises(BaseUnavailable, match=f"redirects \\(HTTP {status}\\)"):
            await open_s3_base("s3://b/p/", options)

    trio.run(main)
    assert len(endpoint[0].requests) <= 2  # the listing, no chase after a region


def test_an_object_read_that_is_redirected_fails_that_read_in_one_error(endpoint) -> None:
    options = serve(endpoint, listing(b"8192", lambda: (307, REDIRECT, [])))

    async def main() -> None:
        store = await open_s3_base("s3://b/p/", options)
        try:
            (image,) = await store.list_images()
            for lean in (True, False):  # the lean reader hands a 3xx to botocore
                if not lean:
                    store.wire.targets[image.key] = None
                with pytest.raises(BaseUnavailable, match="redirects"):
                    await image.read(0, 4096)
        finally:
            await store.aclose()

    trio.run(main)
    assert len(endpoint[0].requests) <= 6


def test_a_redirect_naming_the_buckets_region_is_still_followed(endpoint) -> None:
    """AWS's own answer to a client signing for the wrong region: botocore re-signs for the
    region named and asks again (the same endpoint here), once."""
    doc = LISTING % b"8192"

    def route(method: str, path: str, headers: dict[str, str]):
        if "eu-west-1" not in headers.get("authorization", ""):
            return 301, [("x-amz-bucket-region", "eu-west-1"), ("Content-Length", "0")], []
        return 200, [("Content-Length", str(len(doc)))], [doc]

    options = serve(endpoint, route)

    async def main() -> None:
        store = await open_s3_base("s3://b/p/", options)
        try:
            assert [image.name for image in await store.list_images()] == ["disk.raw"]
        finally:
            await store.aclose()

    trio.run(main)


def test_an_abandoned_read_through_botocore_frees_its_connection_slot(endpoint) -> None:
    """An endpoint that sends no ETags is read through botocore in worker threads, abandoned
    at --io-timeout. A body that trickles (a byte every 0.2 s) kept its thread reading, and
    its limiter slot held, for as long as it trickled (here 800 s): with one connection,
    every later read of the healed endpoint waited for that slot and failed."""
    doc = (LISTING % b"8192").replace(b'<ETag>"e"</ETag>', b"")
    data = bytes(range(256)) * 32
    healed = threading.Event()

    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" in path:
            return 200, [("Content-Length", str(len(doc)))], [doc]
        first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
        body = data[first : last + 1]
        head = [("Content-Range", f"bytes {first}-{last}/8192"), ("Content-Length", str(len(body)))]
        return 206, head, [body] if healed.is_set() else trickle(body, 0.2)

    options = dataclasses.replace(serve(endpoint, route), max_connections=1)
    fetcher = Fetcher(RetryPolicy(io_timeout=options.io_timeout))

    async def main() -> None:
        store = await open_s3_base("s3://b/p/", options)
        try:
            (image,) = await store.list_images()
            with pytest.raises(BaseUnavailable):
                await fetcher.read_with_retry(image, 0, 4096)
            healed.set()
            assert bytes(await fetcher.read_with_retry(image, 4096, 4096)) == data[4096:]
        finally:
            await store.aclose()

    trio.run(main)


BIG = 64 * MiB  # past MAX_BUFFERED_BYTES and the socket buffers' slack


@pytest.mark.parametrize(
    "what", ["listing", "listing-close-delimited", "read-error"],
)
def test_a_huge_listing_or_error_body_is_read_to_its_cap_only(endpoint, what: str) -> None:
    """botocore reads a listing page or an error body whole into memory, with no cap: a
    400 MiB listing page grew the process by 1.6 GB (4x)."""
    declared = [] if what == "listing-close-delimited" else [("Content-Length", str(BIG))]
    doc = (LISTING % b"8192").replace(b'<ETag>"e"</ETag>', b"")  # reads go through botocore

    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" in path and what != "read-error":
            return 200, declared, huge_body(BIG)
        if "list-type=2" in path:
            return 200, [("Content-Length", str(len(doc)))], [doc]
        return 403, declared, huge_body(BIG)

    options = serve(endpoint, route)

    async def main() -> None:
        with pytest.raises(BaseProtocolError, match="cap|past"):
            store = await open_s3_base("s3://b/p/", options)
            try:
                (image,) = await store.list_images()
                await image.read(0, 4096)
            finally:
                await store.aclose()

    trio.run(main)
    time.sleep(0.2)
    assert endpoint[0].body_bytes_sent < MAX_BUFFERED_BYTES + SLACK


def test_objects_listed_below_or_beside_the_prefix_are_left_out(endpoint, caplog) -> None:
    """An endpoint that ignores Delimiter lists deeper keys too: p/sub/disk.raw was served as
    disk.raw in place of p/disk.raw (the last of a name won), and q/x.raw beside it."""
    doc = LISTING.replace(
        b"</ListBucketResult>",
        b'<Contents><Key>p/sub/disk.raw</Key><Size>4096</Size><ETag>"f"</ETag></Contents>'
        b'<Contents><Key>q/x.raw</Key><Size>4096</Size><ETag>"g"</ETag></Contents>'
        b"</ListBucketResult>",
    ) % b"8192"

    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" in path:
            return 200, [("Content-Length", str(len(doc)))], [doc]
        return None

    options = serve(endpoint, route)

    async def main() -> None:
        store = await open_base("s3://b/p/", options)  # as a mount does
        try:
            (image,) = await store.list_images()
            assert (image.name, image.size, image.identity) == (
                "disk.raw", 8192, 'size=8192;etag="e"'
            )
        finally:
            await store.aclose()

    trio.run(main)
    assert any("2 objects that are not directly below" in r.getMessage() for r in caplog.records)


def test_a_single_object_larger_than_the_cap_opens(endpoint) -> None:
    """`s3://bucket/key` opens with a HEAD, whose Content-Length is the object's size, not a
    body to buffer: the answer-body cap must not refuse an image larger than itself."""
    payload = bytes(range(256)) * 16  # the object's first 4 KiB

    def route(method: str, path: str, headers: dict[str, str]):
        if method == "HEAD" and path.startswith("/b/p/disk.raw"):
            return 200, [("Content-Length", str(BIG)), ("ETag", '"e"')], []
        if method == "GET" and path.startswith("/b/p/disk.raw"):
            span = f"bytes 0-{len(payload) - 1}/{BIG}"
            return 206, [("Content-Length", str(len(payload))), ("Content-Range", span),
                         ("ETag", '"e"')], [payload]
        return None

    options = serve(endpoint, route)

    async def main() -> None:
        store = await open_s3_base("s3://b/p/disk.raw", options)
        try:
            (image,) = await store.list_images()
            assert image.size == BIG
            assert bytes(await image.read(0, len(payload))) == payload
        finally:
            await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("tokens", ["alternating", "endless"])
def test_a_listing_whose_continuation_tokens_loop_stops_asking_at_io_timeout(
    endpoint, tokens: str
) -> None:
    """An endpoint whose pages are empty and truncated, their continuation tokens taking
    turns (A, B, A, B...): botocore's paginator only refuses a token repeated at once, so
    `_list_sync` paged on forever. _run_within abandons the listing at --io-timeout, but its
    thread kept listing for good, a request after another; a mount whose base was down at
    mount left one more such thread at each reconnection try. A token seen before ends the
    listing at once; tokens ever new (1, 2, 3...) end it at --io-timeout, thread included."""
    seen = iter(range(1, 1 << 30))

    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" not in path:
            return None
        if tokens == "alternating":
            token = "B" if "continuation-token=A" in path else "A"
        else:
            token = str(next(seen))
        doc = LISTING.replace(b"<IsTruncated>false", b"<IsTruncated>true").replace(
            b'<Contents><Key>p/disk.raw</Key><Size>%s</Size>\n<ETag>"e"</ETag></Contents>',
            f"<NextContinuationToken>{token}</NextContinuationToken>".encode(),
        )
        return 200, [("Content-Length", str(len(doc)))], [doc]

    options = serve(endpoint, route)

    async def main() -> None:
        start = time.monotonic()
        error, words = (
            (BaseProtocolError, "loop") if tokens == "alternating" else (BaseUnavailable, "within")
        )
        with pytest.raises(error, match=words):
            await open_s3_base("s3://b/p/", options)
        assert time.monotonic() - start < options.io_timeout + 2

    trio.run(main)
    assert len(endpoint[0].requests) >= 3  # it did page
    time.sleep(0.5)  # a request still in flight at the deadline may end
    asked = len(endpoint[0].requests)
    time.sleep(2)
    later = len(endpoint[0].requests)
    assert later == asked, f"the abandoned listing still pages: {later - asked} requests more"


def test_a_last_page_that_echoes_the_token_it_was_asked_with_ends_the_listing(endpoint) -> None:
    """A complete listing whose last page (IsTruncated false) names the token it was asked
    with as its NextContinuationToken (an S3-compatible endpoint's echo): botocore stops at
    IsTruncated, and so must the loop check (review finding)."""
    second = (LISTING % b"4096").replace(b"p/disk.raw", b"p/two.raw").replace(
        b"</Contents>", b"</Contents><NextContinuationToken>A</NextContinuationToken>"
    )

    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" not in path:
            return None
        if "continuation-token=A" in path:
            return 200, [("Content-Length", str(len(second)))], [second]
        first = (LISTING % b"4096").replace(b"<IsTruncated>false", b"<IsTruncated>true").replace(
            b"</Contents>", b"</Contents><NextContinuationToken>A</NextContinuationToken>"
        )
        return 200, [("Content-Length", str(len(first)))], [first]

    options = serve(endpoint, route)

    async def main() -> None:
        store = await open_s3_base("s3://b/p/", options)
        try:
            assert sorted(i.name for i in await store.list_images()) == ["disk.raw", "two.raw"]
        finally:
            await store.aclose()

    trio.run(main)


def test_an_object_listed_without_an_etag_is_read_when_its_gets_carry_one(endpoint) -> None:
    """An endpoint that lists no ETag leaves the image only its size (a warning says changes
    cannot be detected); a GET that does carry an ETag is no evidence of a change. The read
    through botocore (no ETag: not the lean reader) compared the answer's ETag with the empty
    one listed and raised BaseChanged: every missing chunk ESTALE, the image marked changed,
    although the HTTP store's Validator.check compares ETags only when both sides have one.
    The first ETag an answer carries is the image's from then on: a change within the mount
    is still told (review finding)."""
    doc = (LISTING % b"8192").replace(b'<ETag>"e"</ETag>', b"")
    data = bytes(range(256)) * 32
    etag = ['"e"']

    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" in path:
            return 200, [("Content-Length", str(len(doc)))], [doc]
        first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
        body = data[first : last + 1]
        return 206, [("Content-Range", f"bytes {first}-{last}/8192"), ("ETag", etag[0]),
                     ("Content-Length", str(len(body)))], [body]

    options = serve(endpoint, route)

    async def main() -> None:
        store = await open_s3_base("s3://b/p/", options)
        try:
            (image,) = await store.list_images()
            assert image.identity == "size=8192;etag="
            assert bytes(await image.read(4096, 4096)) == data[4096:]
            etag[0] = '"f"'  # replaced on the server, the same size
            with pytest.raises(BaseChanged):
                await image.read(0, 4096)
        finally:
            await store.aclose()

    trio.run(main)
