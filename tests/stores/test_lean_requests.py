"""What the lean reader sends (base/http_wire.PlainReader.read_range): each read its own Range,
the image version's validators and the auth header on every request, built once per URL and
version; a new version gets its own validators; the auth header goes to its origin only."""

from __future__ import annotations

import trio

from corfs.base.http_policy import AuthHeader, origin_of
from corfs.base.http_wire import PlainReader, Validator
from tests.hostile import HostileServer

SIZE = 1 << 20


def _pattern(offset: int, length: int) -> bytes:
    return bytes((offset + i) % 251 for i in range(length))


def _ranges(method: str, path: str, headers: dict[str, str]):
    """Every ranged GET of /disk.raw: a 206 of `_pattern` bytes."""
    first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
    body = _pattern(first, last - first + 1)
    return 206, [("Content-Length", str(len(body))),
                 ("Content-Range", f"bytes {first}-{last}/{SIZE}")], [body]


def test_each_read_sends_its_range_the_versions_validators_and_auth_to_its_origin() -> None:
    first, second = HostileServer(_ranges).start(), HostileServer(_ranges).start()
    try:
        url, other = first.url + "disk.raw", second.url + "disk.raw"
        reader = PlainReader(5.0, AuthHeader("Authorization", "Bearer s3cret", origin_of(url)))
        old, new = Validator(SIZE, '"v1"', None), Validator(SIZE, '"v2"', None)
        reads = [(url, old, 4096), (url, old, 8192), (url, new, 0), (other, old, 100)]

        async def main() -> list[bytes]:
            try:
                got = []
                for where, validator, offset in reads:
                    data = await reader.read_range(where, validator, offset, 16)
                    assert data is not None
                    got.append(bytes(data))
                return got
            finally:
                reader.close_idle()

        assert trio.run(main) == [_pattern(offset, 16) for _, _, offset in reads]
    finally:
        first.stop()
        second.stop()
    sent = first.requests + second.requests
    assert [(method, path) for method, path, _ in sent] == [("GET", "/disk.raw")] * 4
    heads = [headers for _, _, headers in sent]
    assert [h["range"] for h in heads] == [
        "bytes=4096-4111", "bytes=8192-8207", "bytes=0-15", "bytes=100-115"
    ]
    assert [h.get("if-match") for h in heads] == ['"v1"', '"v1"', '"v2"', '"v1"']
    assert [h.get("authorization") for h in heads] == ["Bearer s3cret"] * 3 + [None]
    assert all(h["host"].startswith("127.0.0.1:") for h in heads)
