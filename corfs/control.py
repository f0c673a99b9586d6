"""Run-time control and status of a mount.

How a command reaches the daemon: through extended attributes on the mount's root directory.
`getxattr(MNT, "user.corfs.status")` returns the status JSON; `setxattr(MNT,
"user.corfs.control", '{"op": "pause", "image": null}')` runs a command. Why xattrs and not a
socket: they need no extra file or port, the kernel routes them to the right daemon for
whatever path the user names, and they are refused for paths that are not a corfs mount.
The server side is `Controller`; the client side is `read_status`/`send_command`, plus
`offline_status` that reads a cache's database when nothing is mounted on it.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict

from .errors import ControlError, CorfsError, UsageError
from .image import Image
from .stats import MAX_LISTED_CHUNKS, ImageStatus, MountStatus, eta_seconds, fill_ratio
from .store import CacheStore, ChunkState
from .stream import StreamWorker

STATUS_XATTR = "user.corfs.status"
CONTROL_XATTR = "user.corfs.control"
MOUNTPOINT_FILE = "mountpoint"


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
    ) -> None:
        self._images = {image.name: image for image in images}
        self._stream = stream
        self._cache, self._base, self._mountpoint = cache, base, mountpoint
        self._fetcher_statistics = fetcher_statistics

    def status(self) -> MountStatus:
        images = []
        for image in self._images.values():
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
                )
            )
        fetcher = self._fetcher_statistics() if self._fetcher_statistics else None
        return MountStatus(
            mounted=True,
            mountpoint=self._mountpoint,
            cache=self._cache,
            base=self._base,
            bandwidth_bps=self._stream.limiter.rate,
            images=images,
            fetcher=asdict(fetcher) if fetcher is not None else None,  # type: ignore[call-overload]
        )

    def status_json(self) -> str:
        return json.dumps(self.status().to_dict())

    def apply(self, raw: bytes) -> list[str]:
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
                if any([target.forget_chunk(index) for index in indexes]):
                    forgotten.append(target.name)
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


# ---- client side -------------------------------------------------------------------------


def read_status(mountpoint: str) -> dict:
    """The live status of the corfs mount at `mountpoint`; ControlError if it is none."""
    try:
        raw = os.getxattr(mountpoint, STATUS_XATTR)
    except OSError as exc:
        raise _not_a_mount(mountpoint, exc) from None
    return json.loads(raw)


def send_command(mountpoint: str, command: dict) -> None:
    read_status(mountpoint)  # a clear error for a path that is not a corfs mount
    try:
        os.setxattr(mountpoint, CONTROL_XATTR, json.dumps(command).encode())
    except OSError as exc:
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
    return ControlError(f"{path} is not a corfs mount")


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
        return MountStatus(
            mounted=False,
            mountpoint=None,
            cache=os.path.abspath(cache_dir),
            base=images and store.records()[0].base or None,
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
        if CacheStore.is_locked(path):
            mountpoint = (_read_text(os.path.join(path, MOUNTPOINT_FILE)) or "").strip()
            if mountpoint:
                try:
                    return read_status(mountpoint)
                except CorfsError:
                    pass
        return offline_status(path).to_dict()
    return read_status(path)


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def corfs_mounts() -> list[str]:
    """Mountpoints of the corfs mounts this machine has (from /proc/self/mountinfo)."""
    mounts = []
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if " - " not in line:
            continue
        fstype = line.split(" - ", 1)[1].split()[0]
        if fstype == "fuse.corfs":
            mounts.append(_unescape(fields[4]))
    return mounts


def _unescape(field: str) -> str:
    return bytes(field, "ascii").decode("unicode_escape").encode("latin-1").decode()
