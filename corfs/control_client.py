"""The client side of run-time control: what `corfs status`, `corfs stream` and the helpers of
detach and verify use to reach a mount, or to read a cache that nothing has mounted.

Invariant: this module imports none of the data path (image, fetcher, stream, the data files,
the bases) nor trio: `corfs status` stays a quick read (tests/unit/test_control_client lists
the modules). It reads a cache through store.py, whose chunk-state side is light. The daemon's
side is control.py's `Controller`.

How a command reaches the daemon: through extended attributes on the mount's root directory.
`getxattr(MNT, "user.corfs.status")` returns the status JSON; `setxattr(MNT,
"user.corfs.control", '{"op": "pause", "image": null}')` runs a command. Why xattrs and not a
socket: they need no extra file or port, the kernel routes them to the right daemon for
whatever path the user names, and they are refused for paths that are not a corfs mount.

Paging: the kernel refuses an xattr value above 64 KiB (E2BIG), about 340 images of status.
So `user.corfs.status` holds the mount's summary and the images that fit in one page (the
daemon's STATUS_PAGE_BYTES), with `image_count` and `images_next`: the index of the first image
left out, or null; then `user.corfs.status.<N>` holds images from index N on, again with
`images_next`. The image list of a mount never changes, so the pages always join up.
`read_status` assembles them.

Bounded waits: every request to a mount here (the stat, listxattr and getxattr of its root)
gives up after ANSWER_TIMEOUT_S. A daemon that is stopped (SIGSTOP, a debugger) or whose
loop hangs leaves the request waiting in the kernel, where only a fatal signal reaches it:
`corfs status` waited for ever. The request runs in a daemon thread, left behind when the
command exits with its one line (the exit ends it). Every mount of the machine is asked at
once (`ask_every`): a host with several hung daemons waits ANSWER_TIMEOUT_S, not that times
their number.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from . import cache_files
from .cache_layout import is_cache_dir, recorded_mountpoint
from .chunk_table import ChunkTable
from .errors import ControlError, CorfsError, ForgetRefused, HandoffFailed, UsageError
from .mountinfo import read_mounts
from .stats import ImageStatus, MountStatus, detached_status, fill_ratio
from .store import CacheStore

STATUS_XATTR = "user.corfs.status"
CONTROL_XATTR = "user.corfs.control"
HANDOFF_POLL_S = 0.1
# How long a CLI whose mount is unmounted during a handoff waits for the daemon to settle it
# and let go of CACHE: above handoff.FINISH_TIMEOUT, the daemon's bound for that.
UNMOUNT_WAIT_S = 30.0
ANSWER_TIMEOUT_S = 10.0  # a live daemon answers a status in milliseconds

T = TypeVar("T")


def call_bounded(call: Callable[[], T], seconds: float = ANSWER_TIMEOUT_S) -> T:
    """call(), something a mount's daemon answers, in a daemon thread; TimeoutError if it has
    not returned within `seconds` (see the module docstring). What it raises is raised here."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # raised again in the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="corfs-mount-request", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def ask_every(paths: list[str], request: Callable[[str], T]) -> list[T | CorfsError]:
    """request(path) for every path at once, the answers in the order of `paths`: a path's
    CorfsError (a hung or dead daemon, another user's mount) in place of its answer, so that
    one mount that does not answer neither holds nor hides the others. Daemon threads, like
    call_bounded's: Ctrl-C ends the command at once, not after the last hung request."""
    answers: list = [None] * len(paths)

    def ask(position: int, path: str) -> None:
        try:
            answers[position] = request(path)
        except BaseException as exc:  # a CorfsError is its answer, anything else raised below
            answers[position] = exc

    threads = [threading.Thread(target=ask, args=(position, path), daemon=True,
                                name="corfs-ask-mount") for position, path in enumerate(paths)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for answer in answers:
        if isinstance(answer, BaseException) and not isinstance(answer, CorfsError):
            raise answer
    return answers


def _ask(path: str, request: Callable[[str], T]) -> T:
    """request(path) within ANSWER_TIMEOUT_S, else ControlError."""
    try:
        return call_bounded(lambda: request(path))
    except TimeoutError:
        raise ControlError(
            f"{path}: its corfs daemon does not answer within {ANSWER_TIMEOUT_S:g} s "
            "(stopped or hung)"
        ) from None


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
        raw = _ask(mountpoint, lambda path: os.getxattr(path, name))
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
        names = _ask(mountpoint, os.listxattr)
    except OSError as exc:
        raise _not_a_mount(mountpoint, exc) from None
    if CONTROL_XATTR not in names:
        raise ControlError(f"{mountpoint} is not a corfs mount")


def is_corfs_mount(path: str) -> bool:
    """Whether PATH is the root of a live corfs mount. Asked before looking into PATH for a
    cache's files: a mount's images may be named state.db, corfs.lock or mountpoint, and
    one named state.db had `corfs status MNT` open it as the cache's database."""
    try:
        return CONTROL_XATTR in _ask(path, os.listxattr)
    except OSError:
        return False


def send_command(mountpoint: str, command: dict) -> None:
    check_corfs_mount(mountpoint)  # never set our xattr on an ordinary directory
    try:
        os.setxattr(mountpoint, CONTROL_XATTR, json.dumps(command).encode())
        if command.get("op") == "handoff":
            _wait_handoff(mountpoint, command["image"], str(command["dest"]))
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
        if exc.errno == errno.EBUSY and command.get("image") is not None:
            raise ControlError(
                f"{mountpoint}: {command['image']!r} is being handed over to QEMU (corfs "
                "detach --qmp/--virsh): nothing can change it meanwhile"
            ) from None
        if command.get("op") == "handoff":  # the daemon's reason is in the image's status
            image = next((i for i in read_status(mountpoint)["images"]
                          if i["name"] == command["image"]), None)
            if image is None:
                raise ControlError(f"{mountpoint} has no image {command['image']!r}") from None
            if image.get("handing_over"):
                raise HandoffFailed(f"a live handoff of {command['image']} is under way "
                                    "already") from None
            if image["state"] == "detached":
                raise HandoffFailed(f"{command['image']} was handed over to "
                                    f"{image.get('detached_to')} already") from None
            raise HandoffFailed(image.get("handoff_error") or exc.strerror) from None
        if exc.errno == errno.EINVAL and command.get("image") is not None:
            raise ControlError(f"{mountpoint} has no image {command['image']!r}") from None
        raise ControlError(f"{mountpoint} refused the command: {exc.strerror}") from None


def _wait_handoff(mountpoint: str, name: str, dest: str) -> None:
    """Until the handoff the daemon accepted is over (it runs in the background there, see
    control.py); HandoffFailed with the daemon's reason if it was rolled back, or if the image
    went to another DEST (a handoff raced by another). If the mount ends meanwhile (unmounted:
    the daemon settles the handoff before it lets go of CACHE), its outcome is read there."""
    cache = read_status(mountpoint)["cache"]
    while True:
        try:
            images = read_status(mountpoint)["images"]
        except CorfsError:
            if not _wait_released(cache):
                raise HandoffFailed(
                    f"{mountpoint} was unmounted during the handoff of {name} and its daemon "
                    f"still holds {cache}: the outcome is not known yet (see `corfs status "
                    f"{cache}` once it ends)"
                ) from None
            _handoff_outcome_in_cache(mountpoint, cache, name, dest)
            return
        image = next((i for i in images if i["name"] == name), None)
        if image is None:
            raise ControlError(f"{mountpoint} has no image {name!r}")
        if not image.get("handing_over"):
            if image["state"] == "detached" and image.get("detached_to") == dest:
                if image.get("handoff_error"):  # finished, but QEMU's switch unconfirmed
                    raise HandoffFailed(image["handoff_error"])
                return
            if image["state"] == "detached":
                raise HandoffFailed(f"{name} was handed over to {image.get('detached_to')}")
            raise HandoffFailed(image.get("handoff_error") or "the handoff failed (see the "
                                "mount's log)")
        time.sleep(HANDOFF_POLL_S)


def _wait_released(cache_dir: str) -> bool:
    """Whether CACHE's mount ends (its lock freed) within UNMOUNT_WAIT_S."""
    deadline = time.monotonic() + UNMOUNT_WAIT_S
    while cache_files.is_locked(cache_dir):
        if time.monotonic() > deadline:
            return False
        time.sleep(HANDOFF_POLL_S)
    return True


def _handoff_outcome_in_cache(mountpoint: str, cache_dir: str, name: str, dest: str) -> None:
    """After the mount ended during a handoff: return if the cache records it done to DEST,
    else HandoffFailed saying what became of it."""
    store = CacheStore.open(cache_dir, lock=False, create=False)
    try:
        handoff = next((h for h in store.handoffs() if h.name == name), None)
    finally:
        store.close()
    ended = f"{mountpoint} was unmounted during the handoff of {name}"
    if handoff is None:
        raise HandoffFailed(f"{ended}: it was undone, {name} stays in the cache {cache_dir}")
    if not handoff.done:
        raise HandoffFailed(f"{ended}: it was cut short; mount {cache_dir} once to settle it")
    if handoff.dest != dest:
        raise HandoffFailed(f"{name} was handed over to {handoff.dest}")


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
            geometry = record.geometry
            states, dirty = store.load_states(record)
            local = ChunkTable(geometry, states).local_bytes
            ratio = fill_ratio(local, record.size)
            images.append(
                ImageStatus(
                    name=record.name,
                    size=record.size,
                    chunk_size=record.chunk_size,
                    local_bytes=local,
                    dirty_bytes=geometry.most_bytes_of(dirty),
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
        _ask(path, os.stat)  # not os.path.exists: it says False for a dead mount (ENOTCONN)
    except OSError as exc:
        raise _not_a_mount(path, exc) from None
    if is_corfs_mount(path):
        return read_status(path)
    if _ask(path, is_cache_dir):
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
    if not cache_files.is_locked(cache_dir):
        return None
    return recorded_mountpoint(cache_dir)


def corfs_mounts() -> list[str]:
    """Mountpoints of the corfs mounts this machine has (from /proc/self/mountinfo)."""
    return [entry.mountpoint for entry in read_mounts() if entry.fstype == "fuse.corfs"]
