"""A read that reaches the daemon after a write to the same bytes is answered after that write
(writes_in_flight.py): the kernel keeps what the daemon answers (keep_cache), so an answer from
before the write stayed in its page cache after the write returned."""

from __future__ import annotations

import mmap
import os
import threading
import time

from tests.hostile import Answer, HostileServer
from tests.mounting import CorfsDirs, CorfsMount

from .util import MIB

IMAGE = bytes(range(256)) * (4 * MIB // 256)
FILL_DELAY = 1.5  # seconds the base takes to answer each chunk


def _slow_base(method: str, path: str, headers: dict[str, str]) -> Answer | None:
    if path != "/disk.raw":
        return None
    common = [("ETag", '"v1"'), ("Accept-Ranges", "bytes")]
    if method == "HEAD":
        return 200, [*common, ("Content-Length", str(len(IMAGE)))], []
    first, _, last = headers.get("range", "bytes=0-").removeprefix("bytes=").partition("-")
    body = IMAGE[int(first) : int(last or len(IMAGE) - 1) + 1]
    time.sleep(FILL_DELAY)
    return 206, [*common, ("Content-Length", str(len(body))),
                 ("Content-Range", f"bytes {first}-{int(first) + len(body) - 1}/{len(IMAGE)}")
                 ], [body]


def test_a_page_read_while_a_write_to_it_waits_shows_the_write_once_it_returned(
    tmp_dirs: CorfsDirs,
) -> None:
    """A 4 KiB write into a chunk not local waits in the daemon for its fill. A read of the
    page meanwhile makes FUSE check the image's attributes: its mtime changed (an earlier
    write), so the kernel drops the image's cached pages, the written one too (clean: FUSE
    writes through), and asks the daemon for it. That read was answered with the base's bytes
    as soon as the fill arrived, before the write landed, and the kernel kept them: once the
    write had returned, a mapping of the page still showed the old bytes."""
    server = HostileServer(_slow_base).start()
    try:
        with CorfsMount(
            server.url + "disk.raw", tmp_dirs.cache, tmp_dirs.mnt, "--no-stream",
            "--chunk-size", "1M", log_dir=tmp_dirs.logs,
        ) as m:
            path = m.mnt / "disk.raw"
            at = MIB + 64 * 1024  # in chunk 1, not local: the write below waits for its fill
            new = b"N" * 4096
            fd = os.open(path, os.O_RDWR)
            try:
                # The mapping's page faults below must not need the base: this process serves
                # it, and a fault holds the GIL. Chunks 0 and 2 are made local, bypassing the
                # page cache.
                direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
                with mmap.mmap(-1, MIB) as buf:
                    for chunk in (0, 2):
                        assert os.preadv(direct, [buf], chunk * MIB) == MIB
                os.close(direct)
                mapping = mmap.mmap(fd, len(IMAGE), prot=mmap.PROT_READ)
                os.pwrite(fd, b"W" * MIB, 3 * MIB)  # a write: the image's mtime changes
                writer = threading.Thread(target=os.pwrite, args=(fd, new, at))
                writer.start()
                time.sleep(FILL_DELAY / 3)  # the write waits for its fill in the daemon
                os.pread(fd, 4096, at)  # either bytes: the write has not returned yet
                writer.join(30)
                assert not writer.is_alive()
                assert mapping[at : at + 4096] == new
                mapping.close()
                assert os.pread(fd, 4096, at) == new
            finally:
                os.close(fd)
            m.stop()
    finally:
        server.stop()
