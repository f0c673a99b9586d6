"""The kernel-facing adapter: a flat directory of images, one short method per FUSE operation.
CorfsError becomes FUSEError(errno) here and nowhere else; the mount root carries the control
xattrs (see control_client.py).

Invariants:
- Every FUSE handler runs inside `_translate_errors` (TranslatedOperations wraps each one a
  subclass defines): in pyfuse3 an exception other than FUSEError escaping a handler ends the
  session loop, and so the mount, for every VM on it.
- Control commands come only from the user who mounted (the daemon's uid) or root, whoever
  owns the root directory (`--owner`): status stays readable by anyone who can reach it."""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pyfuse3
import trio

from .control import Controller
from .control_client import CONTROL_XATTR, STATUS_XATTR
from .digest import Buffer
from .errors import ControlError, CorfsError, OutOfImageError
from .image import Image
from .metrics import Metrics

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
# Set in the handle (fh: the inode and this bit) of an open with O_DIRECT: see `write`. A later
# fcntl(F_SETFL) of O_DIRECT is not seen (the kernel does not tell), a rare way to open.
DIRECT_HANDLE = 1 << 48
T = TypeVar("T")
_XATTRS = (STATUS_XATTR.encode(), CONTROL_XATTR.encode())


def _translate_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """CorfsError -> its errno; any other exception is a bug: log it, answer EIO, keep serving.
    Each request is timed and counted in flight here too: the one place every handler passes."""
    op = method.__name__

    @functools.wraps(method)
    async def wrapper(self: TranslatedOperations, *args: object) -> T:
        started = self.metrics.fuse_request_started()
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except CorfsError as exc:
            log.warning("%s: %s", method.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("internal error in %s", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.metrics.fuse_request_ended(op, started)

    wrapper.translates_errors = True  # type: ignore[attr-defined]
    return wrapper


def fuse_handler_names() -> list[str]:
    """The request handlers pyfuse3.Operations declares (lookup, getattr, read, ...)."""
    return [
        name
        for name, value in vars(pyfuse3.Operations).items()
        if not name.startswith("_") and inspect.iscoroutinefunction(value)
    ]


class TranslatedOperations(pyfuse3.Operations):
    """Every handler a subclass defines is wrapped in `_translate_errors` when the class is
    made: a handler added later cannot forget it."""

    metrics: Metrics

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for name in fuse_handler_names():
            if name in vars(cls):
                setattr(cls, name, _translate_errors(vars(cls)[name]))


class CorfsOperations(TranslatedOperations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        images: Sequence[Image],
        controller: Controller,
        *,
        owner: tuple[int, int],
        mode: int,
        statfs_path: str,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self.metrics = metrics if metrics is not None else Metrics(base_speaks_http=False)
        self._by_inode = {ROOT_INODE + 1 + i: image for i, image in enumerate(images)}
        self._by_name = {os.fsencode(image.name): inode for inode, image in self._by_inode.items()}
        self._controller = controller
        self._uid, self._gid = owner
        self._mode = mode
        self._statfs_path = statfs_path
        self._mount_time_ns = time.time_ns()
        self._daemon_uid = os.getuid()  # with root, the only users who may send commands
        self.session_closed = False  # set by mount.py before pyfuse3.close()
        self._unlisted: set[int] = set()  # images handed over whose names the kernel dropped

    # ---- attributes ----------------------------------------------------------------------

    def _image(self, inode: int) -> Image:
        try:
            image = self._by_inode[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        image.check_served()  # handed over to QEMU: ESTALE, and a log line naming DEST
        return image

    def _listed(self, inode: int) -> bool:
        """Whether the root lists this image (one handed over to QEMU is absent)."""
        return self._by_inode[inode].handed_over_to is None

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_uid, attr.st_gid = self._uid, self._gid
        attr.st_blksize = 1 << 20
        attr.attr_timeout = attr.entry_timeout = 1.0
        if inode == ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.st_size = 0
            times = self._mount_time_ns
        else:
            image = self._image(inode)
            attr.st_mode = stat.S_IFREG | (self._mode & ~0o111 if image.read_only else self._mode)
            if image.read_only:
                attr.st_mode &= ~0o222
            attr.st_nlink = 1
            attr.st_size = image.size
            attr.st_blocks = image.local_bytes // 512
            times = image.mtime_ns
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = times
        return attr

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attributes(ROOT_INODE)
        inode = self._by_name.get(name)
        if inode is None or not self._listed(inode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):  # pyfuse3 signature
        current = self._attributes(inode)
        # Modes and owners are the mount's (--mode, --owner): a change would not be kept, so
        # it is refused, not answered with a success that changed nothing.
        if (
            (fields.update_mode and stat.S_IMODE(attr.st_mode) != stat.S_IMODE(current.st_mode))
            or (fields.update_uid and attr.st_uid != current.st_uid)
            or (fields.update_gid and attr.st_gid != current.st_gid)
        ):
            raise pyfuse3.FUSEError(errno.EPERM)
        if inode != ROOT_INODE:
            image = self._image(inode)
            if fields.update_size and attr.st_size != image.size:
                raise pyfuse3.FUSEError(errno.EPERM)  # an image's size is its base's
            if fields.update_mtime:
                image.mtime_ns = attr.st_mtime_ns
        return self._attributes(inode)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        vfs = os.statvfs(self._statfs_path)
        data = pyfuse3.StatvfsData()
        data.f_bsize, data.f_frsize = vfs.f_bsize, vfs.f_frsize
        data.f_blocks, data.f_bfree, data.f_bavail = vfs.f_blocks, vfs.f_bfree, vfs.f_bavail
        data.f_files, data.f_ffree, data.f_favail = len(self._by_inode) + 1, 0, 0
        data.f_namemax = 255
        return data

    # ---- directory -----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(self._by_name.items())
        for position, (name, inode) in enumerate(entries[start_id:], start=start_id):
            if not self._listed(inode):
                continue
            if not pyfuse3.readdir_reply(token, name, self._attributes(inode), position + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    # ---- names: the base's, none made, removed or renamed here ---------------------------
    # EPERM, not pyfuse3's default ENOSYS ("Function not implemented": a broken system).

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
        flags: int, ctx: pyfuse3.RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    # ---- files ---------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        image = self._image(inode)
        if image.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)
        # keep_cache: every change to an image goes through this mount, so the kernel's page
        # cache of it never goes stale.
        fh = inode | (DIRECT_HANDLE if flags & os.O_DIRECT else 0)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> Buffer:  # type: ignore[override]
        # pyfuse3 takes any contiguous buffer: a slice of a fill's buffer goes out uncopied.
        return await self._image(fh & ~DIRECT_HANDLE).read(off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        image = self._image(fh & ~DIRECT_HANDLE)
        written = await image.write(off, buf)
        # The kernel answers a short O_DIRECT write with EIO (async direct I/O counts it as
        # failed): across the end, a direct write is ENOSPC, as one wholly past it is.
        if written < len(buf) and fh & DIRECT_HANDLE:
            raise OutOfImageError(
                f"direct write across the end of {image.name} ({image.size} bytes): "
                f"{written} of its {len(buf)} bytes written, up to the end"
            )
        return written

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._image(fh & ~DIRECT_HANDLE).fsync()

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    # ---- control xattrs on the root ------------------------------------------------------

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(_XATTRS) if inode == ROOT_INODE else []

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = (
            self._controller.status_xattr(
                os.fsdecode(name), owner=ctx is None or ctx.uid in (0, self._daemon_uid)
            )
            if inode == ROOT_INODE
            else None
        )
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if inode != ROOT_INODE or name != CONTROL_XATTR.encode():
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        # Not the root dir's owner: --owner hands the images (and so the root) to the VM's
        # user, who must not pause, throttle or forget for everyone.
        if ctx.uid not in (0, self._daemon_uid):
            log.warning(
                "control command from uid %d refused: only uid %d or root",
                ctx.uid,
                self._daemon_uid,
            )
            raise pyfuse3.FUSEError(errno.EPERM)
        try:
            forgotten = await self._apply_command(value)
        except BaseException:
            await self._after_command()
            raise
        await self._after_command(forgotten)

    async def _apply_command(self, value: bytes) -> list[str]:
        try:
            return await self._controller.apply(value, after_handoff=self._after_command)
        except ControlError as exc:  # EINVAL; ESTALE for a forget the base cannot back
            log.warning("control command refused: %s", exc)
            raise pyfuse3.FUSEError(exc.errno) from None

    async def _after_command(self, forgotten: Sequence[str] = ()) -> None:
        """What the kernel must forget after a command (or a handoff it started): pages of
        chunks forgotten or written by QEMU directly, names of images handed over. Nothing
        once the session is closed (a handoff ending while the daemon stops): the kernel's
        caches went with the mount."""
        if self.session_closed:
            return
        await self.drop_stale_pages()
        for forgotten_name in forgotten:
            await self._drop_cached_pages(self._by_name[os.fsencode(forgotten_name)])
        for name, inode in self._by_name.items():
            if not self._listed(inode) and inode not in self._unlisted:
                self._unlisted.add(inode)  # handed over to QEMU: the kernel forgets its name
                pyfuse3.invalidate_entry_async(ROOT_INODE, name)
                # ... and its pages: QEMU writes DEST directly now, and a handle still open
                # would read the cached ones (keep_cache) rather than get ESTALE.
                await self._drop_cached_pages(inode)

    async def drop_stale_pages(self) -> None:
        """Images whose cached pages may be stale (a rolled-back handoff let QEMU write
        directly, a failed sync lost writes): their cached pages go. Never awaited inside a
        read or write request (the kernel may hold page locks until it is answered)."""
        if self.session_closed:  # the kernel's caches went with the mount
            return
        for inode, image in self._by_inode.items():
            if image.pages_stale:
                image.pages_stale = False
                await self._drop_cached_pages(inode)

    async def _drop_cached_pages(self, inode: int) -> None:
        """Chunks of this image were forgotten (a scrub found them bad): with keep_cache the
        kernel would go on serving the bad bytes from its page cache, so drop its pages. In a
        thread: the kernel may wait for a read of this inode in flight, which this (trio)
        thread must stay free to answer."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel has no pages of it
                log.warning("dropping cached pages of inode %d: %s", inode, exc)
