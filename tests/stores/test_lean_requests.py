"""What the lean reader sends (base/http_wire.PlainReader.read_range): each read its own Range,
the image version's validators and the auth header on every request, built once per URL and
version; a new version gets its own validators; the auth header goes to its origin only."""

from __future__ import annotations

import socket

import trio

from corfs.base.http_policy import AuthHeader, origin_of
from corfs.base.http_wire import PlainReader, Validator
from tests.loopback import start_loopback_server

SIZE = 1 << 20


def _recording_server(heads: list[dict[str, str]]):
    """Answers every ranged GET with a 206 of bytes `offset % 251`, recording its headers."""

    def serve(conn: socket.socket) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            head, data = data.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            fields = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
            heads.append({"request": lines[0], **fields})
            first, last = map(int, fields["range"].removeprefix("bytes=").split("-"))
            body = bytes((first + i) % 251 for i in range(last - first + 1))
            conn.sendall(
                f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
                f"Content-Range: bytes {first}-{last}/{SIZE}\r\n\r\n".encode() + body
            )

    return start_loopback_server(serve)


def test_each_read_sends_its_range_the_versions_validators_and_auth_to_its_origin() -> None:
    heads: list[dict[str, str]] = []
    first, second = _recording_server(heads), _recording_server(heads)
    try:
        url = f"http://127.0.0.1:{first.server_address[1]}/disk.raw"
        other = f"http://127.0.0.1:{second.server_address[1]}/disk.raw"
        auth = AuthHeader("Authorization", "Bearer s3cret", origin_of(url))
        reader = PlainReader(5.0, auth)
        old, new = Validator(SIZE, '"v1"', None), Validator(SIZE, '"v2"', None)

        async def main() -> list[bytes]:
            try:
                reads = [(url, old, 4096), (url, old, 8192), (url, new, 0), (other, old, 100)]
                got = []
                for where, validator, offset in reads:
                    data = await reader.read_range(where, validator, offset, 16)
                    assert data is not None
                    got.append(bytes(data))
                return got
            finally:
                reader.close_idle()

        got = trio.run(main)
    finally:
        for server in (first, second):
            server.shutdown()
            server.server_close()
    assert got == [bytes((o + i) % 251 for i in range(16)) for o in (4096, 8192, 0, 100)]
    assert [h["range"] for h in heads] == [
        "bytes=4096-4111", "bytes=8192-8207", "bytes=0-15", "bytes=100-115"
    ]
    assert all(h["request"] == "GET /disk.raw HTTP/1.1" for h in heads)
    assert [h.get("if-match") for h in heads] == ['"v1"', '"v1"', '"v2"', '"v1"']
    assert [h.get("authorization") for h in heads] == ["Bearer s3cret"] * 3 + [None]
    assert all(h["host"].startswith("127.0.0.1:") for h in heads)
