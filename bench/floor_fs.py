"""The floor under corfs's cold random reads: a pyfuse3 + trio file system that does nothing but
fetch each read from the origin (no cache, no state, no read-ahead), as one raw image file.

bench/peers.py's random workload runs it beside corfs and nbdkit, so that one run shows how
much of a cold 4 KiB read's time is corfs's own and how much the design's (a Python FUSE daemon
on one trio loop):
- `floor` fetches with corfs's own lean HTTP reader (base/http_wire.py's PlainReader), awaited
  on the trio loop as corfs does: the fastest a trio-based daemon can answer a miss;
- `floor-blocking` fetches with a blocking socket inside the handler, the loop stopped while
  it waits: what the same process could do with no event loop at all (and no concurrency).

    python bench/floor_fs.py URL SIZE MOUNTPOINT [--blocking]

It imports corfs from the tree under test (CORFS_BENCH_TREE, bench/harness.py): its figure
moves with that tree's lean reader.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import stat
from urllib.parse import urlsplit

import pyfuse3
import trio

from corfs.base.http_wire import PlainReader, Validator

INODE = 2
NAME = b"disk.raw"


class BlockingRanges:
    """Ranged GETs on one keep-alive connection with blocking calls, reconnecting once."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.request = f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        self.sock: socket.socket | None = None

    def read(self, offset: int, length: int) -> bytes:
        for attempt in (1, 2):
            try:
                return self._exchange(offset, length)
            except OSError:
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _exchange(self, offset: int, length: int) -> bytes:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ask = f"{self.request}Range: bytes={offset}-{offset + length - 1}\r\n\r\n"
        self.sock.sendall(ask.encode("latin-1"))
        answer = bytearray()
        while (cut := answer.find(b"\r\n\r\n")) < 0:
            answer += self._recv()
        head = answer[:cut].decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
        if head[0].split(" ")[1] != "206" or int(fields.get("content-length", -1)) != length:
            raise OSError(errno.EIO, f"unexpected answer: {head[0]}")
        while len(answer) < cut + 4 + length:
            answer += self._recv()
        return bytes(answer[cut + 4 : cut + 4 + length])

    def _recv(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionResetError("closed by the server")
        return data


class FloorOperations(pyfuse3.Operations):
    def __init__(self, url: str, size: int, blocking: bool) -> None:
        super().__init__()
        self.url = url
        self.size = size
        self.blocking = BlockingRanges(url) if blocking else None
        self.lean = PlainReader(stall=30, auth=None)
        self.validator = Validator(size, None, None)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
        elif inode == INODE:
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_size = self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(INODE)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if inode != INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pyfuse3.FileInfo(fh=inode, direct_io=bool(flags & os.O_DIRECT))

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        if not size:
            return b""
        try:
            if self.blocking is not None:
                return self.blocking.read(offset, size)
            data = await self.lean.read_range(self.url, self.validator, offset, size)
        except Exception as exc:  # a failed fetch fails the read, not the benchmark's mount
            raise pyfuse3.FUSEError(errno.EIO) from exc
        if data is None:
            raise pyfuse3.FUSEError(errno.EIO)
        return bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("size", type=int)
    parser.add_argument("mountpoint")
    parser.add_argument("--blocking", action="store_true")
    args = parser.parse_args()
    options = set(pyfuse3.default_options) | {"fsname=corfs-floor"}
    pyfuse3.init(FloorOperations(args.url, args.size, args.blocking), args.mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
