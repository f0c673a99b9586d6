"""The floor for Python FUSE: a minimal pyfuse3 file system exposing one file, one `pread` per
read request, with keep_cache like corfs. Run: python -m bench.passthrough FILE MNT"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

INODE = pyfuse3.ROOT_INODE + 1


class Passthrough(pyfuse3.Operations):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.name = os.fsencode(os.path.basename(path))
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = (
            (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o444)
        )
        attr.st_size = 0 if inode == pyfuse3.ROOT_INODE else self.size
        attr.attr_timeout = attr.entry_timeout = 1.0
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(INODE)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attr(INODE), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)


def main() -> None:
    path, mountpoint = sys.argv[1], sys.argv[2]
    options = set(pyfuse3.default_options)
    options.add("fsname=passthrough")
    pyfuse3.init(Passthrough(path), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
