"""fuse_ops driven directly (no kernel) on real Images: an unexpected exception in any FUSE
handler must become FUSEError(EIO), never escape (in pyfuse3 that ends the session loop, and
so the mount, for every VM on it)."""

from __future__ import annotations

import errno
import os

import pyfuse3
import pytest

from corfs.config import StreamConfig
from corfs.control import Controller
from corfs.control_client import STATUS_XATTR
from corfs.fuse_ops import ROOT_INODE, CorfsOperations, fuse_handler_names
from corfs.stream import StreamWorker
from tests.core.rig import CS, random_bytes, run_with_mock_clock


def _operations(rig) -> CorfsOperations:
    images = list(rig.images.values())
    controller = Controller(
        images,
        StreamWorker(images, StreamConfig(enabled=False)),
        store=rig.store,
        base="memory://",
        mountpoint="/nowhere",
        current_base=lambda: rig.base,
    )
    return CorfsOperations(
        images, controller, owner=(0, 0), mode=0o644, statfs_path=str(rig.cache_dir)
    )


def test_every_handler_the_class_defines_is_translated() -> None:
    defined = [name for name in fuse_handler_names() if name in vars(CorfsOperations)]
    assert {"lookup", "getattr", "readdir", "open", "opendir", "read", "getxattr"} <= set(
        defined
    )
    for name in defined:
        assert getattr(getattr(CorfsOperations, name), "translates_errors", False), name


def test_a_handler_added_by_a_subclass_is_translated_too() -> None:
    class More(CorfsOperations):
        async def access(self, inode, mode, ctx):
            raise KeyError("a bug")

    assert More.access.translates_errors  # type: ignore[attr-defined]


def test_a_bug_inside_a_handler_becomes_eio_and_the_next_request_is_served(
    rig_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random_bytes(2 * CS)

    async def main() -> None:
        async with rig_factory({"a.raw": data}) as rig:
            ops = _operations(rig)
            inode = (await ops.lookup(ROOT_INODE, b"a.raw", None)).st_ino
            fh = (await ops.open(inode, os.O_RDONLY, None)).fh
            assert await ops.read(fh, 0, 10) == data[:10]

            def broken(self, inode):
                raise RuntimeError("injected bug in _attributes")

            monkeypatch.setattr(CorfsOperations, "_attributes", broken)
            calls = {
                "lookup": ops.lookup(ROOT_INODE, b"a.raw", None),
                "getattr": ops.getattr(inode, None),
                "readdir": ops.readdir(ROOT_INODE, 0, None),
            }
            for name, call in calls.items():
                with pytest.raises(pyfuse3.FUSEError) as caught:
                    await call
                assert caught.value.errno == errno.EIO, name
            monkeypatch.undo()

            # Expected errors keep their errno; the operations object still serves.
            with pytest.raises(pyfuse3.FUSEError) as caught:
                await ops.lookup(ROOT_INODE, b"nope", None)
            assert caught.value.errno == errno.ENOENT
            assert (await ops.getattr(inode, None)).st_size == len(data)
            assert await ops.read(fh, CS, 10) == data[CS : CS + 10]
            assert await ops.getxattr(ROOT_INODE, STATUS_XATTR.encode(), None)

    run_with_mock_clock(main)


def test_a_failing_read_of_the_cache_is_a_cache_error_not_a_bug(rig_factory, caplog) -> None:
    """The cache disk failing under a reader (pread of the data file: EIO) is EIO with a line
    naming the image, not an "internal error" with a traceback (the log's word for a bug).
    The failure here: the data file's descriptor made a directory's (pread: EISDIR)."""
    data = random_bytes(2 * CS)

    async def main() -> None:
        async with rig_factory({"a.raw": data}) as rig:
            ops = _operations(rig)
            image = rig.image("a.raw")
            inode = (await ops.lookup(ROOT_INODE, b"a.raw", None)).st_ino
            fh = (await ops.open(inode, os.O_RDONLY, None)).fh
            await ops.write(fh, 0, data[:CS])  # chunk 0 local, written by a client
            directory = os.open(rig.cache_dir, os.O_RDONLY | os.O_DIRECTORY)
            saved = os.dup(image.data.fd)
            try:
                os.dup2(directory, image.data.fd)
                with pytest.raises(pyfuse3.FUSEError) as caught:
                    await ops.read(fh, 0, 10)
            finally:
                os.dup2(saved, image.data.fd)
                os.close(saved)
                os.close(directory)
            assert caught.value.errno == errno.EIO
            assert "internal error" not in caplog.text
            assert "reading the data file of a.raw" in caplog.text
            assert await ops.read(fh, 0, 10) == data[:10]

    run_with_mock_clock(main)
