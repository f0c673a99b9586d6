"""What an HTTP answer must prove before its bytes are served (the version of the image it
holds, the range it is), and when the lean reader may keep its connection: real servers on
127.0.0.1 answering with raw bytes, both read paths (the lean reader, httpx)."""

from __future__ import annotations

import os

import pytest
import trio

from corfs.base import BaseOptions
from corfs.base.http import open_http_base
from corfs.errors import BaseChanged, BaseProtocolError, TransientBaseError
from tests.hostile import Answer, RawAnswerServer, Route, serve

FAST = BaseOptions(io_timeout=3.0)  # a stall timeout of 1 s
SIZE = 1 << 20
OLD = os.urandom(SIZE)  # the version listed
NEW = os.urandom(SIZE)  # the same image rewritten: same size, other bytes
LISTED_AT = "Mon, 30 Nov 2026 10:00:00 GMT"
CHANGED_AT = "Fri, 04 Dec 2026 04:00:00 GMT"

Headers = list[tuple[str, str]]


def _range_of(headers: dict[str, str]) -> tuple[int, int]:
    first, last = headers["range"].removeprefix("bytes=").split("-")
    return int(first), int(last)


def rewritten(listed: Headers, answer: str) -> Route:
    """/disk.raw listed (HEAD) with the `listed` validators, then rewritten with NEW bytes of
    the same size before its first read, by a server (or a proxy in front of it) that answers
    the read as `answer` says: "full" a 200 of the whole image with no validator at all,
    "range-without-etag" a 206 that carries the new Last-Modified but no ETag."""

    def route(method: str, path: str, headers: dict[str, str]):
        if path != "/disk.raw":
            return None
        if method == "HEAD":
            return 200, [("Content-Length", str(SIZE)), *listed], []
        if answer == "full":
            return 200, [("Content-Length", str(SIZE))], [NEW]
        first, last = _range_of(headers)
        return 206, [
            ("Content-Range", f"bytes {first}-{last}/{SIZE}"),
            ("Content-Length", str(last - first + 1)),
            ("Last-Modified", CHANGED_AT),
        ], [NEW[first : last + 1]]

    return route


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])
@pytest.mark.parametrize(
    "listed, answer",
    [
        ([("Last-Modified", LISTED_AT)], "full"),
        ([("ETag", 'W/"old"'), ("Last-Modified", LISTED_AT)], "range-without-etag"),
    ],
    ids=["last-modified-only/full-answer", "weak-etag/range-without-etag"],
)
def test_an_answer_that_does_not_prove_the_listed_version_is_base_changed(
    hostile, lean: bool, listed: Headers, answer: str
) -> None:
    """An image known by its Last-Modified (no ETag, or a weak one: If-Range then sends the
    date) must not be served from an answer that does not carry that date: a whole-image 200
    without it (If-Range failed, or a proxy dropped the header), or a 206 whose Last-Modified
    moved and that has no ETag to compare. Both served NEW's bytes under OLD's cache."""
    server = serve(hostile, rewritten(listed, answer))

    async def main() -> None:
        store = await open_http_base(server.url + "disk.raw", FAST)
        try:
            store.reader.use_plain = lean
            (image,) = await store.list_images()
            with pytest.raises(BaseChanged):
                got = bytes(await image.read(4096, 4096))
                assert got != NEW[4096:8192], "bytes of another version were served"
        finally:
            await store.aclose()

    trio.run(main)


def test_a_full_answer_with_the_listed_date_is_still_served(hostile) -> None:
    """The guard above must not refuse a server that ignores Range but proves the version."""

    def route(method: str, path: str, headers: dict[str, str]):
        if path != "/disk.raw":
            return None
        common = [("Content-Length", str(SIZE)), ("Last-Modified", LISTED_AT)]
        return 200, common, [] if method == "HEAD" else [OLD]

    server = serve(hostile, route)

    async def main() -> None:
        store = await open_http_base(server.url + "disk.raw", FAST)
        try:
            (image,) = await store.list_images()
            assert bytes(await image.read(4096, 4096)) == OLD[4096:8192]
        finally:
            await store.aclose()

    trio.run(main)


def whole_body_of_another_size(declared: bool) -> Route:
    """/disk.raw listed with ETag "e" and SIZE bytes; every GET is answered with a whole-image
    200 carrying ETag "e", chunked, whose body is four bytes more than the listed size (JUNK,
    then OLD) and, with `declared`, a Content-Length of the listed size as well (ignored by
    the framing: Transfer-Encoding overrides it)."""

    def route(method: str, path: str, headers: dict[str, str]):
        if path != "/disk.raw":
            return None
        if method == "HEAD":
            return 200, [("Content-Length", str(SIZE)), ("ETag", '"e"')], []
        body = b"JUNK" + OLD
        length = [("Content-Length", str(SIZE))] if declared else []
        return 200, [("ETag", '"e"'), ("Transfer-Encoding", "chunked"), *length], [
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        ]

    return route


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "chunked-and-length"])
def test_a_whole_answer_that_is_not_the_listed_size_is_never_served(
    hostile, declared: bool
) -> None:
    """A whole-image 200 of another size is another version (_read_httpx raises BaseChanged
    when its Content-Length says so), but a 200 framed by chunks is never measured: its bytes
    from `offset` were served whatever its length, here OLD shifted by four bytes."""
    server = serve(hostile, whole_body_of_another_size(declared))

    async def main() -> None:
        store = await open_http_base(server.url + "disk.raw", FAST)
        try:
            (image,) = await store.list_images()
            with pytest.raises((BaseChanged, TransientBaseError, BaseProtocolError)):
                got = bytes(await image.read(4096, 4096))
                assert got == OLD[4096:8192], f"wrong bytes served: {got[:8]!r}..."
        finally:
            await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("ignored", [1, 100], ids=["one-glitch", "always"])
def test_a_server_is_taken_to_ignore_range_only_once_it_does_so_again(
    hostile, ignored: int
) -> None:
    """One whole answer to a ranged GET (a proxy's glitch) sent every later read of the mount
    through httpx (~5x the CPU per byte): the lean reader hands a server over only after
    IGNORED_RANGES whole answers in a row. Every read's bytes are right either way."""
    answered_whole = 0

    def route(method: str, path: str, headers: dict[str, str]):
        nonlocal answered_whole
        if path != "/disk.raw":
            return None
        common = [("ETag", '"v1"')]
        if method == "HEAD":
            return 200, [*common, ("Content-Length", str(SIZE))], []
        if answered_whole < ignored:
            answered_whole += 1
            return 200, [*common, ("Content-Length", str(SIZE))], [OLD]
        first, last = _range_of(headers)
        return 206, [
            *common, ("Content-Range", f"bytes {first}-{last}/{SIZE}"),
            ("Content-Length", str(last - first + 1)),
        ], [OLD[first : last + 1]]

    server = serve(hostile, route)

    async def main() -> None:
        store = await open_http_base(server.url + "disk.raw", FAST)
        try:
            (image,) = await store.list_images()
            for number in range(8):
                offset = number * 8192
                assert bytes(await image.read(offset, 4096)) == OLD[offset : offset + 4096]
            handed_back = store.reader.plain.stats.handed_back
        finally:
            await store.aclose()
        # one glitch: that read alone went through httpx; a server that always ignores
        # Range: each read until the third whole answer, and every read after it
        assert handed_back == (1 if ignored == 1 else 8), handed_back

    trio.run(main)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])
def test_a_range_unit_in_another_case_is_accepted(hostile, lean: bool) -> None:
    """Range units are case-insensitive (RFC 9110 14.1): "Bytes 0-4095/..." is the range
    asked for. It was refused as a wrong Content-Range on every read, both paths."""

    def route(method: str, path: str, headers: dict[str, str]):
        if path != "/disk.raw":
            return None
        if method == "HEAD":
            return 200, [("Content-Length", str(SIZE)), ("ETag", '"e"')], []
        first, last = _range_of(headers)
        return 206, [
            ("Content-Range", f"Bytes {first}-{last}/{SIZE}"),
            ("Content-Length", str(last - first + 1)),
            ("ETag", '"e"'),
        ], [OLD[first : last + 1]]

    server = serve(hostile, route)

    async def main() -> None:
        store = await open_http_base(server.url + "disk.raw", FAST)
        try:
            store.reader.use_plain = lean
            (image,) = await store.list_images()
            with trio.fail_after(FAST.io_timeout):
                assert bytes(await image.read(4096, 4096)) == OLD[4096:8192]
        finally:
            await store.aclose()

    trio.run(main)


def one_answer(status_line: str, extra: list[str], keep: bool) -> Answer:
    """A 206 of OLD whose head starts with `status_line` and carries `extra` header lines,
    the connection then closed unless `keep`."""

    def answer(first: int, last: int) -> tuple[bytes, bool]:
        head = [
            status_line,
            f"Content-Range: bytes {first}-{last}/{SIZE}",
            f"Content-Length: {last - first + 1}",
            'ETag: "e"',
            *extra,
        ]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + OLD[first : last + 1], not keep

    return answer


@pytest.mark.parametrize(
    "status_line, extra, keep",
    [
        ("HTTP/1.0 206 Partial Content", [], False),
        ("HTTP/1.1 206 Partial Content", ["Connection: close"], False),
        ("HTTP/1.1 206 Partial Content", ["Connection: keep-alive, close"], False),
        ("HTTP/1.0 206 Partial Content", ["Connection: keep-alive"], True),
        ("HTTP/1.1 206 Partial Content", [], True),
    ],
    ids=["http1.0", "close", "close-in-a-list", "http1.0-keep-alive", "http1.1"],
)
def test_the_lean_reader_keeps_only_connections_the_server_keeps(
    status_line: str, extra: list[str], keep: bool
) -> None:
    """An answer that ends its connection (HTTP/1.0 without keep-alive, Connection: close)
    must not leave it in the pool: the next read was sent on it and waited for an answer that
    never came, until the stall timeout failed it (or, with a prompt close, cost a resend)."""
    server = RawAnswerServer(
        one_answer(status_line, extra, keep), SIZE, linger=4 * FAST.io_timeout
    )

    async def main() -> None:
        store = await open_http_base(server.url, FAST)
        try:
            (image,) = await store.list_images()
            for offset in (0, 4096, 8192):
                with trio.fail_after(FAST.io_timeout / 3):  # under one stall timeout
                    assert bytes(await image.read(offset, 4096)) == OLD[offset : offset + 4096]
            assert store.reader.plain.stats.answered == 3  # none handed to httpx
        finally:
            await store.aclose()

    try:
        trio.run(main)
        # The listing's HEAD (httpx) on one connection; the reads on one more if kept.
        assert server.connections == (2 if keep else 4)
    finally:
        server.stop()
