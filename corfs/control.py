"""Run-time control and status of a mount.

How a command reaches the daemon: through extended attributes on the mount's root directory.
`getxattr(MNT, "user.corfs.status")` returns the status JSON; `setxattr(MNT,
"user.corfs.control", '{"op": "pause", "image": null}')` runs a command. Why xattrs and not a
socket: they need no extra file or port, the kernel routes them to the right daemon for
whatever path the user names, and they are refused for paths that are not a corfs mount.
The server side is `Controller`; the client side is `read_status`/`send_command`, plus
`offline_status` that reads a cache's database when nothing is mounted on it.

Paging: the kernel refuses an xattr value above 64 KiB (E2BIG), about 340 images of status.
So `user.corfs.status` holds the mount's summary and the images that fit in STATUS_PAGE_BYTES,
with `image_count` and `images_next`: the index of the first image left out, or null; then
`user.corfs.status.<N>` holds images from index N on, again with `images_next`. The image
list of a mount never changes, so the pages always join up. `read_status` assembles them.
Every page (the first included) stays under STATUS_PAGE_BYTES.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict

from .base import BaseStore
from .errors import ControlError, CorfsError, ForgetRefused, HandoffFailed, UsageError
from .handoff import Via, hand_over
from .image import Image
from .mountinfo import read_mounts
from .refetch import why_base_cannot_supply
from .stats import (
    MAX_LISTED_CHUNKS,
    ImageStatus,
    MountStatus,
    detached_status,
    eta_seconds,
    fill_ratio,
)
from .store import CacheStore, ChunkState, HandoffRecord
from .stream import StreamWorker

STATUS_XATTR = "user.corfs.status"
CONTROL_XATTR = "user.corfs.control"
MOUNTPOINT_FILE = "mountpoint"
STATUS_PAGE_BYTES = 60 << 10  # under the kernel's XATTR_SIZE_MAX (64 KiB), with room to spare


class Controller:
    def __init__(
        self,
        images: Sequence[Image],
        stream: StreamWorker,
        *,
        cache: str,
        base: str,
        mountpoint: str,
        fetcher_statistics: Callable[[], object] | None = None,
        write_behind_statistics: Callable[[], object] | None = None,
        current_base: Callable[[], BaseStore | None] = lambda: None,
        handed_over_before: Sequence[HandoffRecord] = (),
    ) -> None:
        self._images = {image.name: image for image in images}
        self._handed_over_before = list(handed_over_before)  # by earlier mounts: not served
        self._handoff_errors: dict[str, str] = {}
        self._stream = stream
        self._cache, self._base, self._mountpoint = cache, base, mountpoint
        self._fetcher_statistics = fetcher_statistics
        self._write_behind_statistics = write_behind_statistics
        # Asked before a forget: can the base supply the chunk again? (A callable: a base that
        # was down at mount comes up later.)
        self._current_base = current_base

    def status(self) -> MountStatus:
        images = [detached_status(h.name, h.size, h.dest) for h in self._handed_over_before]
        for image in self._images.values():
            if image.handed_over_to is not None:
                images.append(detached_status(image.name, image.size, image.handed_over_to))
                continue
            stream = self._stream.statistics(image.name)
            dirty = image.dirty_chunks * image.geometry.chunk_size
            remaining = image.size - image.local_bytes
            rate = stream.rate_bps
            images.append(
                ImageStatus(
                    name=image.name,
                    size=image.size,
                    chunk_size=image.geometry.chunk_size,
                    local_bytes=image.local_bytes,
                    dirty_bytes=min(dirty, image.size),
                    fill_ratio=fill_ratio(image.local_bytes, image.size),
                    state=stream.state,
                    rate_bps=rate,
                    eta_s=eta_seconds(remaining, rate)
                    if stream.state == "streaming"
                    else (0.0 if stream.state == "complete" else None),
                    error=stream.error or image.fill_error or image.store.sync_failure,
                    failing_chunks=len(failing := image.failing_chunks),
                    failing_chunk_indexes=tuple(failing[:MAX_LISTED_CHUNKS]),
                    handoff_error=self._handoff_errors.get(image.name),
                )
            )
        images.sort(key=lambda status: status.name)
        fetcher = self._fetcher_statistics() if self._fetcher_statistics else None
        behind = self._write_behind_statistics() if self._write_behind_statistics else None
        return MountStatus(
            mounted=True,
            mountpoint=self._mountpoint,
            cache=self._cache,
            base=self._base,
            bandwidth_bps=self._stream.limiter.rate,
            images=images,
            fetcher=asdict(fetcher) if fetcher is not None else None,  # type: ignore[call-overload]
            write_behind=asdict(behind) if behind is not None else None,  # type: ignore[call-overload]
        )

    def status_xattr(self, name: str) -> bytes | None:
        """The value of status xattr `name`: the first page (STATUS_XATTR) or the page of
        images from index N on (STATUS_XATTR.N); None if `name` is no status xattr."""
        if name == STATUS_XATTR:
            summary = self.status().to_dict()
            images = summary.pop("images")
            summary["image_count"] = len(images)
            return _status_page(summary, images, 0)
        prefix, _, start = name.rpartition(".")
        if prefix != STATUS_XATTR or not start.isdigit():
            return None
        images = self.status().to_dict()["images"]
        return _status_page({}, images, min(int(start), len(images)))

    async def apply(self, raw: bytes) -> list[str]:
        """Run one command: {"op": "pause"|"resume", "image": NAME|null},
        {"op": "forget", "image": NAME, "chunks": [INDEX, ...]} or
        {"op": "bandwidth", "rate": BYTES_PER_SECOND}. Returns the names of the images whose
        chunks were forgotten (their pages in the kernel's cache must be dropped)."""
        forgotten: list[str] = []
        try:
            command = json.loads(raw)
            op = command["op"]
            image = command.get("image")
            if op == "pause":
                self._stream.pause(image)
            elif op == "resume":
                self._stream.resume(image)
            elif op == "forget":
                target = self._images[image]
                indexes = [int(index) for index in command["chunks"]]
                if any(not 0 <= i < target.geometry.chunk_count for i in indexes):
                    raise ValueError(f"chunk index out of range for {image}")
                await self._check_refetchable(target)
                if any([target.forget_chunk(index) for index in indexes]):
                    forgotten.append(target.name)
            elif op == "handoff":
                await self._hand_over(self._images[image], command)
            elif op == "bandwidth":
                rate = int(command["rate"])
                if rate < 0:
                    raise ValueError("negative rate")
                self._stream.set_bandwidth(rate)
            else:
                raise ValueError(f"unknown op {op!r}")
        except KeyError as exc:
            raise ControlError(f"no image or field {exc} in command") from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise ControlError(f"bad control command: {exc}") from None
        return forgotten

    async def _hand_over(self, image: Image, command: dict) -> None:
        """{"op": "handoff", "image": NAME, "dest": PATH, "qmp": SOCKET | "virsh": DOMAIN,
        }: handoff.py. Its error stays in the image's status
        (`handoff_error`) for the CLI, which gets only an errno through setxattr."""
        qemu_path = os.path.join(self._mountpoint, image.name)
        try:
            via = Via(qmp=command.get("qmp"), virsh=command.get("virsh"))
            await hand_over(image, image.store, qemu_path, str(command["dest"]), via)
        except CorfsError as exc:
            self._handoff_errors[image.name] = str(exc)  # fuse_ops logs it
            raise
        self._handoff_errors.pop(image.name, None)

    async def _check_refetchable(self, image: Image) -> None:
        """ForgetRefused unless the base can supply `image`'s chunks again now."""
        why = image.error
        if why is None:
            source = self._current_base() if image.source is not None else None
            why = await why_base_cannot_supply(
                source, image.name, image.record.identity, image.record.size
            )
        if why is not None:
            raise ForgetRefused(f"not forgetting chunks of {image.name}: {why}")


def _status_page(head: dict, images: list[dict], start: int) -> bytes:
    """`head` plus images[start:] as far as they fit in STATUS_PAGE_BYTES (at least one, so
    a reader always gets on), with `images_next`."""
    page = dict(head, images=[], images_next=None)
    used = len(json.dumps(page)) + 16  # room for the index in images_next
    for index in range(start, len(images)):
        text = json.dumps(images[index])  # ASCII (ensure_ascii): characters are bytes
        if page["images"] and used + len(text) + 2 > STATUS_PAGE_BYTES:
            page["images_next"] = index
            break
        page["images"].append(images[index])
        used += len(text) + 2
    return json.dumps(page).encode()


# ---- client side -------------------------------------------------------------------------


def read_status(mountpoint: str) -> dict:
    """The live status of the corfs mount at `mountpoint`, all its pages joined; ControlError
    if it is none or cannot be read."""
    status = _read_json(mountpoint, STATUS_XATTR)
    images = status["images"]
    next_index = status.pop("images_next", None)
    while next_index is not None:
        page = _read_json(mountpoint, f"{STATUS_XATTR}.{next_index}")
        if not page["images"]:
            break
        images.extend(page["images"])
        next_index = page["images_next"]
    if len(images) != status.pop("image_count", len(images)):
        raise ControlError(f"{mountpoint}: the status pages do not join up")
    return status


def _read_json(mountpoint: str, name: str) -> dict:
    try:
        raw = os.getxattr(mountpoint, name)
    except OSError as exc:
        raise _not_a_mount(mountpoint, exc) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise ControlError(f"{mountpoint}: unreadable status ({name})") from None


def check_corfs_mount(mountpoint: str) -> None:
    """ControlError (or UsageError) unless `mountpoint` is a live corfs mount. Cheap: it
    asks for the names of the root's xattrs, not for the status."""
    try:
        names = os.listxattr(mountpoint)
    except OSError as exc:
        raise _not_a_mount(mountpoint, exc) from None
    if CONTROL_XATTR not in names:
        raise ControlError(f"{mountpoint} is not a corfs mount")


def send_command(mountpoint: str, command: dict) -> None:
    check_corfs_mount(mountpoint)  # never set our xattr on an ordinary directory
    try:
        os.setxattr(mountpoint, CONTROL_XATTR, json.dumps(command).encode())
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise ControlError(
                f"only the user who mounted {mountpoint} or root may control it"
            ) from None
        if exc.errno == errno.ESTALE and command.get("op") == "forget":
            raise ForgetRefused(
                f"{mountpoint} kept the chunks of {command['image']!r}: its base cannot "
                "supply them again (gone or changed; the mount's log says which)"
            ) from None
        if command.get("op") == "handoff":  # the daemon's reason is in the image's status
            image = next((i for i in read_status(mountpoint)["images"]
                          if i["name"] == command["image"]), None)
            if image is None:
                raise ControlError(f"{mountpoint} has no image {command['image']!r}") from None
            raise HandoffFailed(image.get("handoff_error") or exc.strerror) from None
        if exc.errno == errno.EINVAL and command.get("image") is not None:
            raise ControlError(f"{mountpoint} has no image {command['image']!r}") from None
        raise ControlError(f"{mountpoint} refused the command: {exc.strerror}") from None


def _not_a_mount(path: str, exc: OSError) -> CorfsError:
    if exc.errno == errno.ENOTCONN:
        return ControlError(
            f"{path}: the corfs daemon is gone (ENOTCONN); clear it with: fusermount3 -u -z {path}"
        )
    if exc.errno == errno.ENOENT:
        return UsageError(f"{path} does not exist")
    if exc.errno in (errno.ENODATA, errno.ENOTSUP):
        return ControlError(f"{path} is not a corfs mount")
    return ControlError(f"{path}: cannot read its corfs status: {exc.strerror}")


def offline_status(cache_dir: str) -> MountStatus:
    """Status from CACHE's database alone (nothing mounted, or a mount we cannot reach)."""
    store = CacheStore.open(cache_dir, lock=False, create=False)
    try:
        images = []
        for record in store.records():
            states, dirty = store.load_states(record)
            local = sum(
                min(record.chunk_size, record.size - i * record.chunk_size)
                for i, state in enumerate(states)
                if state != ChunkState.ABSENT
            )
            ratio = fill_ratio(local, record.size)
            images.append(
                ImageStatus(
                    name=record.name,
                    size=record.size,
                    chunk_size=record.chunk_size,
                    local_bytes=local,
                    dirty_bytes=min(dirty * record.chunk_size, record.size),
                    fill_ratio=ratio,
                    state="complete" if ratio >= 1.0 else "offline",
                    rate_bps=0.0,
                    eta_s=0.0 if ratio >= 1.0 else None,
                    error=None,
                )
            )
        images += [
            detached_status(h.name, h.size, h.dest) for h in store.handoffs() if h.done
        ]
        images.sort(key=lambda status: status.name)
        return MountStatus(
            mounted=False,
            mountpoint=None,
            cache=os.path.abspath(cache_dir),
            base=records[0].base if (records := store.records()) else None,
            bandwidth_bps=0,
            images=images,
        )
    finally:
        store.close()


def status_of_path(path: str) -> dict:
    """Status for PATH, a mountpoint or a cache dir, mounted or not."""
    try:
        os.stat(path)  # not os.path.exists: it says False for a dead mount (ENOTCONN)
    except OSError as exc:
        raise _not_a_mount(path, exc) from None
    if os.path.exists(os.path.join(path, "state.db")):
        if mountpoint := mountpoint_of_cache(path):
            try:
                return read_status(mountpoint)
            except CorfsError as exc:
                # Its database lags the live state: never pass it off as the status.
                raise ControlError(
                    f"{path} is in use by the mount on {mountpoint}, whose status "
                    f"cannot be read: {exc}"
                ) from None
        return offline_status(path).to_dict()
    return read_status(path)


def mountpoint_of_cache(cache_dir: str) -> str | None:
    """Where CACHE is mounted, or None if it is not (its lock is free)."""
    if not CacheStore.is_locked(cache_dir):
        return None
    return (_read_text(os.path.join(cache_dir, MOUNTPOINT_FILE)) or "").strip() or None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def corfs_mounts() -> list[str]:
    """Mountpoints of the corfs mounts this machine has (from /proc/self/mountinfo)."""
    return [entry.mountpoint for entry in read_mounts() if entry.fstype == "fuse.corfs"]
