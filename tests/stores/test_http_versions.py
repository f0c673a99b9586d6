"""What an HTTP answer must prove before its bytes are served (the version of the image it
holds, the range it is), and when the lean reader may keep its connection: real servers on
127.0.0.1 answering with raw bytes, both read paths (the lean reader, httpx)."""

from __future__ import annotations

import os

import pytest
import trio

from corfs.base import BaseOptions
from corfs.base.http import open_http_base
from tests.hostile import serve

FAST = BaseOptions(io_timeout=3.0)  # a stall timeout of 1 s
SIZE = 1 << 20
OLD = os.urandom(SIZE)  # the version listed

Headers = list[tuple[str, str]]


def _range_of(headers: dict[str, str]) -> tuple[int, int]:
    first, last = headers["range"].removeprefix("bytes=").split("-")
    return int(first), int(last)


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
