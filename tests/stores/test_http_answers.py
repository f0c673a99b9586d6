"""Answers of an HTTP base that must never become image bytes, and waits at
listing time that must end within --io-timeout."""

from __future__ import annotations

import gzip
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import trio

from corfs.base import BaseOptions, open_base
from corfs.base.http import open_http_base
from corfs.errors import BaseProtocolError, BaseUnavailable, TransientBaseError
from tests.hostile import Answer, Headers, RawAnswerServer, Route, ranged_image, serve

FAST = BaseOptions(io_timeout=3.0)
SIZE = 1 << 20
DATA = os.urandom(SIZE)  # incompressible: gzip of a range is longer than the range


def gzipped(data: bytes) -> tuple[Headers, bytes]:
    """Gzipped on the fly, as a misconfigured proxy does whatever Accept-Encoding said."""
    body = gzip.compress(data)
    return [("Content-Length", str(len(body))), ("Content-Encoding", "gzip")], body


def longer(data: bytes) -> tuple[Headers, bytes]:
    """A body (and Content-Length) longer than the range: which bytes are the range's is
    anybody's guess."""
    body = b"JUNK" + data
    return [("Content-Length", str(len(body)))], body


def chunked_longer(data: bytes) -> tuple[Headers, bytes]:
    """The same in chunked encoding: no Content-Length to check, so the body itself must end
    with the range (the lean reader hands chunked answers to httpx)."""
    body = b"JUNK" + data
    return [("Transfer-Encoding", "chunked")], b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])
@pytest.mark.parametrize(
    "route, refusal, says",
    [
        (ranged_image(DATA, gzipped), BaseProtocolError, "compressed"),  # never the gzip bytes
        (ranged_image(DATA, longer), TransientBaseError, "Content-Length"),
        (ranged_image(DATA, chunked_longer), TransientBaseError, "past the range"),  # not JUNK...
    ],
    ids=["compressed", "longer", "chunked-longer"],
)
def test_an_answer_that_is_not_exactly_the_range_is_refused(
    hostile, lean: bool, route: Route, refusal: type[Exception], says: str
) -> None:
    server = serve(hostile, route)

    async def main() -> None:
        store = await open_http_base(server.url + "disk.raw", FAST)
        try:
            store.reader.use_plain = lean
            (image,) = await store.list_images()
            with pytest.raises(refusal, match=says):
                await image.read(4096, 4096)
        finally:
            await store.aclose()

    trio.run(main)


class TricklingHeadServer:
    """Answers every request with a head sent one byte every `every` seconds (never done
    within --io-timeout, yet never silent for a whole stall timeout)."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 4000 + b"\r\n\r\n"
        try:
            conn.recv(65536)
            for i in range(len(head)):
                if self.stopped.is_set():
                    return
                conn.sendall(head[i : i + 1])
                time.sleep(self.every)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()


def test_a_base_whose_answers_trickle_their_heads_fails_to_open_within_io_timeout() -> None:
    server = TricklingHeadServer(every=0.2)  # stall timeout is 1 s: never tripped
    try:

        async def main() -> None:
            start = time.monotonic()
            with trio.move_on_after(4 * FAST.io_timeout) as scope:
                with pytest.raises(BaseUnavailable, match="within"):
                    await open_base(f"http://127.0.0.1:{server.port}/disk.raw", FAST)
            assert not scope.cancelled_caught, "opening the base hung past --io-timeout"
            assert time.monotonic() - start < FAST.io_timeout + 2

        trio.run(main)
    finally:
        server.stop()


def raw_206(
    head_lines: Callable[[int, int], list[str]], eol: str = "\r\n", close: bool = False
) -> Answer:
    """A 206 with the range's bytes, its head made of `head_lines`, lines ended by `eol`."""

    def answer(first: int, last: int) -> tuple[bytes, bool]:
        head = eol.join(head_lines(first, last)) + eol + eol
        return head.encode("latin-1") + DATA[first : last + 1], close

    return answer


def usual(status: str = "HTTP/1.1 206 Partial Content", length: bool = True) -> Callable:
    def lines(first: int, last: int) -> list[str]:
        return [
            status,
            f"Content-Range: bytes {first}-{last}/{SIZE}",
            'ETag: "e"',
            *([f"Content-Length: {last - first + 1}"] if length else []),
        ]

    return lines


def twice_the_length(first: int, last: int) -> list[str]:
    return [*usual()(first, last), f"Content-Length: {last - first + 1}"]


def last_line_ends_in_a_bare_lf(first: int, last: int) -> tuple[bytes, bool]:
    """A 206 whose lines end in CRLF but the last header line, ended by a bare LF, then the
    blank line's CRLF: "...Content-Length: 4096\n\r\n". RFC 9112 2.2 lets a recipient take
    a lone LF as a line end and h11 does (its head ends at LF CRLF). The lean reader waits for
    CRLF CRLF, which never comes, or LF LF (its hand-back test), not there either: each read
    stalls for a whole stall timeout and fails, on every try, so every read of such a server
    is EIO while httpx reads it at once."""
    head = "\r\n".join(usual()(first, last)) + "\n\r\n"
    return head.encode("latin-1") + DATA[first : last + 1], False


@pytest.mark.parametrize(
    "answer",
    [
        raw_206(usual(length=False), close=True),  # no Content-Length: ends with the connection
        raw_206(twice_the_length),  # the same Content-Length twice: RFC 9110 lets it be
        raw_206(usual(), eol="\n"),  # lines ended by a bare LF, which h11 takes
        last_line_ends_in_a_bare_lf,  # "...\n\r\n": h11 ends the head there too
    ],
    ids=["no-length", "length-twice", "bare-lf", "bare-lf-then-crlf"],
)
def test_a_legal_answer_the_lean_reader_does_not_expect_is_served_through_httpx(
    answer: Answer,
) -> None:
    """The lean reader's contract: what it does not expect, it hands to httpx (which reads
    HTTP whole); a refusal of its own failed every read of such a server with EIO."""
    server = RawAnswerServer(answer, SIZE)

    async def main() -> None:
        store = await open_http_base(server.url, FAST)
        try:
            (image,) = await store.list_images()
            with trio.fail_after(FAST.io_timeout):
                assert bytes(await image.read(4096, 4096)) == DATA[4096:8192]
        finally:
            await store.aclose()

    try:
        trio.run(main)
    finally:
        server.stop()


def test_a_status_of_digits_int_cannot_read_is_a_base_error() -> None:
    """'²' is a digit to str.isdigit (latin-1 0xB2), not to int(): the lean reader raised a
    ValueError, an internal error (a traceback in the log, and no retry) for every read."""
    server = RawAnswerServer(raw_206(usual(status="HTTP/1.1 \xb206 Partial")), SIZE)

    async def main() -> None:
        store = await open_http_base(server.url, FAST)
        try:
            (image,) = await store.list_images()
            with pytest.raises(TransientBaseError):
                await image.read(4096, 4096)
        finally:
            await store.aclose()

    try:
        trio.run(main)
    finally:
        server.stop()


def chunked_with_the_ranges_length(data: bytes) -> tuple[Headers, bytes]:
    """Chunked AND a Content-Length of the range: Content-Range and Content-Length say it is
    the range, the framing that counts (Transfer-Encoding overrides Content-Length, RFC 9112
    6.3; h11 reads the chunks) carries four more bytes before it."""
    body = b"JUNK" + data
    return [("Transfer-Encoding", "chunked"), ("Content-Length", str(len(data)))], (
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )


def chunked_behind_a_bare_lf(data: bytes) -> tuple[Headers, bytes]:
    """As chunked_with_the_ranges_length, its Transfer-Encoding on a line after one ended by
    a bare LF (a CGI script's): h11 takes that as a line of its own; a reader that splits the
    head on CRLF alone glues it into the line before and never sees it (review finding)."""
    (encoding, length), body = chunked_with_the_ranges_length(data)
    return [length, ("X-Cgi", f"1\n{encoding[0]}: {encoding[1]}")], body


def pausing_after(route: Route, sent: int, pause: float = 0.3) -> Route:
    """`route`'s answers, their bodies pausing after `sent` bytes."""

    def paused(method: str, path: str, headers: dict[str, str]) -> Answer | None:
        answer = route(method, path, headers)
        if answer is None or method == "HEAD":
            return answer
        status, more, pieces = answer
        body = b"".join(pieces)

        def slowly() -> Iterator[bytes]:
            yield body[:sent]
            time.sleep(pause)
            yield body[sent:]

        return status, more, slowly()

    return paused


@pytest.mark.parametrize("shape", [chunked_with_the_ranges_length, chunked_behind_a_bare_lf],
                         ids=["chunked", "chunked-behind-a-bare-lf"])
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])
def test_a_chunked_answer_that_also_declares_the_ranges_length_is_refused(
    hostile, lean: bool, shape
) -> None:
    """RFC 9112 6.3: a message with both Transfer-Encoding and Content-Length "ought to be
    handled as an error". The lean reader hands it to httpx, and _read_httpx checks the
    Content-Length (ignored by the framing) and then takes the first `length` decoded bytes
    without checking that the body ends there (`whole` only when there is no Content-Length):
    JUNK plus the range's first 4092 bytes were served as the range (through a mount too).
    The body pauses after its first 4096 bytes: a reader that took the Content-Length for the
    framing has its "range" then, and nothing after it to tell it otherwise (mutants: without
    the pause, the rest sometimes came in the same recv and gave it away)."""
    server = serve(hostile, pausing_after(ranged_image(DATA, shape), 4096))

    async def main() -> None:
        store = await open_http_base(server.url + "disk.raw", FAST)
        try:
            store.reader.use_plain = lean
            (image,) = await store.list_images()
            with pytest.raises((TransientBaseError, BaseProtocolError)):
                got = bytes(await image.read(4096, 4096))
                assert got == DATA[4096:8192], f"wrong bytes served: {got[:8]!r}..."
        finally:
            await store.aclose()

    trio.run(main)
