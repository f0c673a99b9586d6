"""The daemon's side of run-time control: `Controller` serves a mount's status and runs the
commands sent to it (pause, resume, bandwidth, forget, handoff). The transport (extended
attributes on the mount's root) and the paging of the status are described in
control_client.py, the side the CLI uses.

The status is each component's `statistics()` (image, stream, store, fetcher) serialised; the
Controller reaches into no component's fields. Every status page (the first included) stays
under STATUS_PAGE_BYTES.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

import trio

from .base import BaseStore
from .control_client import STATUS_XATTR
from .errors import ControlError, CorfsError, ForgetRefused, HandoffUnderWay, internal_error
from .geometry import ChunkGeometry
from .handoff import Via, claim_for_handoff, hand_over
from .image import Image
from .refetch import why_base_cannot_supply
from .stats import (
    MAX_LISTED_CHUNKS,
    ImageStatistics,
    ImageStatus,
    MountStatus,
    bounded_error,
    detached_status,
    eta_seconds,
    fill_ratio,
)
from .store import CacheStore, HandoffRecord
from .stream import ImageStreamStatistics, StreamWorker

if TYPE_CHECKING:
    from .fetcher import Fetcher
    from .write_behind import WriteBehind

log = logging.getLogger(__name__)

STATUS_PAGE_BYTES = 60 << 10  # under the kernel's XATTR_SIZE_MAX (64 KiB), with room to spare
# A reading's later pages come from its first page's snapshot for this long at most (a reader
# asks its pages at once; the client gives each ask 10 s): a page asked later, or by a reader
# that never asked the first, gets a fresh status, and the snapshot is not kept for good.
PAGED_FOR = 30.0
# Other users' status readings (--allow-other lets any user read it) share one snapshot for
# this long: a loop of reads by another user built a full status on the trio thread each time
# (twice per first page: CPython asks with a small buffer first), every VM's I/O waiting.
SHARED_STATUS_FOR = 1.0
# A stream rate beyond any disk, and within a float (the metrics and the limiter compute with
# one: 10**400 bytes per second made every scrape fail with OverflowError).
MAX_BANDWIDTH = 1 << 60


class Controller:
    def __init__(
        self,
        images: Sequence[Image],
        stream: StreamWorker,
        *,
        store: CacheStore,
        base: str,
        mountpoint: str,
        fetcher: Fetcher | None = None,
        write_behind: WriteBehind | None = None,
        current_base: Callable[[], BaseStore | None] = lambda: None,
        handed_over_before: Sequence[HandoffRecord] = (),
        background: trio.Nursery | None = None,
    ) -> None:
        self._images = {image.name: image for image in images}
        self._handed_over_before = list(handed_over_before)  # by earlier mounts: not served
        self._handoff_errors: dict[str, str] = {}
        # Handoffs run here, not in the setxattr that asks for them (see _start_handoff);
        # without it (tests driving the Controller alone) they run in the command.
        self._background = background
        self._handing_over: set[str] = set()  # accepted, not finished: status says so
        self._stream = stream
        self._store = store
        self._fetcher = fetcher
        self._write_behind = write_behind
        self._base, self._mountpoint = base, mountpoint
        self._paged: list[dict] | None = None  # the images of the latest status read by pages
        self._paged_at = 0.0  # when (trio.current_time)
        self._shared: tuple[dict, list[dict]] | None = None  # other users' (SHARED_STATUS_FOR)
        self._shared_at = 0.0
        # Asked before a forget: can the base supply the chunk again? (A callable: a base that
        # was down at mount comes up later.)
        self._current_base = current_base

    def status(self) -> MountStatus:
        images = [detached_status(h.name, h.size, h.dest) for h in self._handed_over_before]
        sync_failure = self._store.statistics().sync_failure
        for image in self._images.values():
            stats = image.statistics()
            if stats.handed_over_to is not None:
                detached = detached_status(stats.name, stats.size, stats.handed_over_to)
                images.append(dataclasses.replace(
                    detached, handing_over=stats.name in self._handing_over,
                    fill_errors=stats.fill_errors,  # a counter: never back to 0 while mounted
                    # one finished unconfirmed (handoff.HandoffUnconfirmed) says why
                    handoff_error=bounded_error(self._handoff_errors.get(stats.name)),
                ))
                continue
            stream = self._stream.statistics(stats.name)
            images.append(self._image_status(stats, stream, sync_failure))
        images.sort(key=lambda status: status.name)
        fetcher = self._fetcher.statistics() if self._fetcher is not None else None
        behind = self._write_behind.statistics() if self._write_behind is not None else None
        return MountStatus(
            mounted=True,
            mountpoint=self._mountpoint,
            cache=self._store.cache_dir,
            base=self._base,
            bandwidth_bps=self._stream.worker_statistics().bandwidth_bps,
            images=images,
            fetcher=asdict(fetcher) if fetcher is not None else None,
            write_behind=asdict(behind) if behind is not None else None,
        )

    def _image_status(
        self, image: ImageStatistics, stream: ImageStreamStatistics, sync_failure: str | None
    ) -> ImageStatus:
        remaining = image.size - image.local_bytes
        dirty = ChunkGeometry(image.size, image.chunk_size).most_bytes_of(image.dirty_chunks)
        if stream.state == "streaming":
            eta = eta_seconds(remaining, stream.rate_bps)
        else:
            eta = 0.0 if stream.state == "complete" else None
        return ImageStatus(
            name=image.name,
            size=image.size,
            chunk_size=image.chunk_size,
            local_bytes=image.local_bytes,
            dirty_bytes=dirty,
            fill_ratio=fill_ratio(image.local_bytes, image.size),
            state=stream.state,
            rate_bps=stream.rate_bps,
            eta_s=eta,
            error=bounded_error(stream.error or image.fill_error or sync_failure),
            failing_chunks=image.failing_chunks,
            fill_errors=image.fill_errors,
            failing_chunk_indexes=image.failing_chunk_indexes[:MAX_LISTED_CHUNKS],
            handoff_error=bounded_error(self._handoff_errors.get(image.name)),
            handing_over=image.name in self._handing_over,
            stream_paused=stream.paused,
        )

    def status_xattr(self, name: str, *, owner: bool = True) -> bytes | None:
        """The value of status xattr `name`: the first page (STATUS_XATTR) or the page of
        images from index N on (STATUS_XATTR.N); None if `name` is no status xattr.
        The later pages of a reading come from the images its first page was taken with
        (`_paged`, kept until the next reading's first page or PAGED_FOR: a page is asked
        twice when the reader's first buffer is too small, the last one too): a status per
        page made reading 10 000 images' status quadratic, over a minute of the event loop
        (every VM's I/O) blocked half a second per page. Not the mount's `owner` (nor root):
        pages of one snapshot shared for SHARED_STATUS_FOR."""
        if name == STATUS_XATTR:
            start = 0
        else:
            prefix, _, digits = name.rpartition(".")
            # ASCII digits only: str.isdigit() passes '²', which int() refuses (EIO, traceback)
            if prefix != STATUS_XATTR or not (digits.isascii() and digits.isdigit()):
                return None
            start = int(digits)
        now = trio.current_time()
        if not owner:
            if self._shared is None or now - self._shared_at > SHARED_STATUS_FOR:
                self._shared, self._shared_at = self._status_snapshot(), now
            summary, images = self._shared
        elif name == STATUS_XATTR:
            summary, images = self._status_snapshot()
            self._paged, self._paged_at = images, now
        else:
            if now - self._paged_at > PAGED_FOR:
                self._paged = None
            summary = {}
            images = self._paged if self._paged is not None else self._status_snapshot()[1]
        head = dict(summary, image_count=len(images)) if name == STATUS_XATTR else {}
        return _status_page(head, images, min(start, len(images)))[0]

    def _status_snapshot(self) -> tuple[dict, list[dict]]:
        """(the mount's status without its images, the images), as status_xattr pages them."""
        summary = self.status().to_dict()
        return summary, summary.pop("images")

    async def apply(
        self, raw: bytes, after_handoff: Callable[[], Awaitable[None]] | None = None
    ) -> list[str]:
        """Run one command: {"op": "pause"|"resume", "image": NAME|null},
        {"op": "forget", "image": NAME, "chunks": [INDEX, ...]},
        {"op": "bandwidth", "rate": BYTES_PER_SECOND} or a handoff (_start_handoff, which
        awaits `after_handoff` once it is over). Returns the names of the images whose
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
                await self._start_handoff(self._images[image], command, after_handoff)
            elif op == "bandwidth":
                rate = int(command["rate"])
                if not 0 <= rate <= MAX_BANDWIDTH:  # JSON's ints are unbounded; a float is not
                    raise ValueError(f"rate not within 0..{MAX_BANDWIDTH} bytes per second")
                self._stream.set_bandwidth(rate)
            else:
                raise ValueError(f"unknown op {op!r}")
        except KeyError as exc:
            raise ControlError(f"no image or field {exc} in command") from None
        # OverflowError: int() of an infinite number; RecursionError: json.loads of JSON
        # nested too deep. Bad commands both, not internal errors.
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
            raise ControlError(f"bad control command: {exc}") from None
        return forgotten

    async def _start_handoff(
        self, image: Image, command: dict, after: Callable[[], Awaitable[None]] | None
    ) -> None:
        """{"op": "handoff", "image": NAME, "dest": PATH, "qmp": SOCKET | "virsh": DOMAIN}:
        handoff.py, in the background. It can take minutes (QMP timeouts, a drain), and
        while the setxattr carrying the command is unanswered the kernel holds the mount's
        root directory locked: lookups, readdir and every other command would wait. The CLI
        follows it in the status (`handing_over`, then `detached` or `handoff_error`)."""
        name = image.name
        try:
            via = Via(qmp=command.get("qmp"), virsh=command.get("virsh"))
            dest = str(command["dest"])
            if name in self._handing_over:  # its end is still being tidied up (`after`)
                raise HandoffUnderWay(f"{name}: a live handoff of it is under way already")
            # Now, not in the background task: nothing may come between (a forget...).
            claim_for_handoff(image)
        except HandoffUnderWay:
            raise  # the handoff under way keeps its own status
        except CorfsError as exc:
            # The CLI reads the reason in the status (a setxattr returns an errno only); not
            # where a handoff is under way or done: that one's status is its own (hunt: a
            # malformed or second command made a confirmed handoff read as unconfirmed).
            if name not in self._handing_over and image.handed_over_to is None:
                self._handoff_errors[name] = str(exc)  # fuse_ops logs it
            raise
        self._handoff_errors.pop(name, None)
        self._handing_over.add(name)
        if self._background is None:
            await self._hand_over(image, dest, via, after)
        else:
            self._background.start_soon(self._hand_over, image, dest, via, after)

    async def _hand_over(
        self, image: Image, dest: str, via: Via, after: Callable[[], Awaitable[None]] | None
    ) -> None:
        qemu_path = os.path.join(self._mountpoint, image.name)
        try:
            await hand_over(image, image.store, qemu_path, dest, via, base=self._base)
        except CorfsError as exc:
            self._handoff_errors[image.name] = str(exc)
            log.warning("handoff of %s to %s failed: %s", image.name, dest, exc)
        except Exception as exc:  # a bug: said in the status and the log, the mount goes on
            self._handoff_errors[image.name] = str(internal_error(exc))
            log.exception("handoff of %s to %s", image.name, dest)
        finally:
            try:
                # Before the CLI, which waits for the end, is told; not once the mount is
                # being unmounted (its cancel): the kernel's caches of it go with it.
                if after is not None and trio.current_effective_deadline() != -math.inf:
                    await after()
            finally:
                self._handing_over.discard(image.name)
        if self._background is None and image.name in self._handoff_errors:
            raise ControlError(self._handoff_errors[image.name])

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


def _status_page(head: dict, images: list[dict], start: int) -> tuple[bytes, int | None]:
    """`head` plus images[start:] as far as they fit in STATUS_PAGE_BYTES (at least one, so
    a reader always gets on), with `images_next`; and that index."""
    page = dict(head, images=[], images_next=None)
    used = len(json.dumps(page)) + 16  # room for the index in images_next
    for index in range(start, len(images)):
        text = json.dumps(images[index])  # ASCII (ensure_ascii): characters are bytes
        if page["images"] and used + len(text) + 2 > STATUS_PAGE_BYTES:
            page["images_next"] = index
            break
        page["images"].append(images[index])
        used += len(text) + 2
    return json.dumps(page).encode(), page["images_next"]
