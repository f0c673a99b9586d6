"""Statistics snapshots: frozen dataclasses that `corfs status --json` serialises, and the rate
meter behind each image's current rate and ETA."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

STATUS_SCHEMA_VERSION = 1
MAX_LISTED_CHUNKS = 32  # chunk indexes listed in a status (a dead base can fail thousands)
# Characters of an error shown in a status. An error may quote a base's answer (an ETag of
# 60 KiB, a long S3 code): unbounded, one image's status outgrew the 64 KiB a status xattr
# page can hold, and `corfs status` of the whole mount failed (E2BIG).
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class ImageStatus:
    name: str
    size: int
    chunk_size: int
    local_bytes: int
    dirty_bytes: int
    fill_ratio: float
    state: str  # streaming | paused | complete | idle | error | offline | detached
    rate_bps: float
    eta_s: float | None
    error: str | None  # the latest failure still standing (a failing chunk's, the stream's ...)
    failing_chunks: int = 0  # chunks whose latest fill failed, still not local
    fill_errors: int = 0  # fills of it that failed since the mount began
    failing_chunk_indexes: tuple[int, ...] = ()  # the first MAX_LISTED_CHUNKS of them
    detached_to: str | None = None  # handed over to QEMU live: its data file is this now
    handoff_error: str | None = None  # why the latest live handoff failed (rolled back, or
    # finished unconfirmed: errors.HandoffUnconfirmed)
    handing_over: bool = False  # a live handoff of it is under way
    stream_paused: bool = False  # `corfs stream pause` holds (offline too; a --no-stream
    # mount streams nothing: never paused)


def detached_status(name: str, size: int, dest: str) -> ImageStatus:
    """An image handed over to QEMU live: no longer served, its data lives on as `dest`."""
    return ImageStatus(
        name=name, size=size, chunk_size=0, local_bytes=size, dirty_bytes=0, fill_ratio=1.0,
        state="detached", rate_bps=0.0, eta_s=0.0, error=None, detached_to=dest,
    )


@dataclass(frozen=True)
class MountStatus:
    mounted: bool
    mountpoint: str | None
    cache: str
    base: str | None
    bandwidth_bps: int
    images: list[ImageStatus] = field(default_factory=list)
    fetcher: dict | None = None
    write_behind: dict | None = None  # write_behind.WriteBehindStatistics
    schema_version: int = STATUS_SCHEMA_VERSION

    def to_dict(self) -> dict:
        # Shallow: the fields are plain values, tuples and dicts of numbers. asdict's deep copy
        # was three quarters of the time of a status of 10 000 images.
        return {**vars(self), "images": [dict(vars(image)) for image in self.images]}


def bounded_error(text: str | None) -> str | None:
    """An error as a status shows it: at most MAX_ERROR_CHARS characters."""
    if text is None or len(text) <= MAX_ERROR_CHARS:
        return text
    return text[: MAX_ERROR_CHARS - 3] + "..."


def fill_ratio(local_bytes: int, size: int) -> float:
    return 1.0 if size == 0 else min(1.0, local_bytes / size)


class RateMeter:
    """Bytes per second over the last `window` seconds, from (time, total) samples."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def sample(self, now: float, total: int) -> None:
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def reset(self) -> None:
        """Forget the samples: nothing measured before counts towards a later rate."""
        self._samples.clear()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return max(0.0, (b1 - b0) / (t1 - t0)) if t1 > t0 else 0.0


def eta_seconds(remaining: int, rate: float) -> float | None:
    if remaining <= 0:
        return 0.0
    return remaining / rate if rate > 0 else None


@dataclass(frozen=True)
class ImageStatistics:
    """An image's own counters (Image.statistics); control.py makes its ImageStatus."""

    name: str
    size: int
    chunk_size: int
    chunk_count: int
    local_chunks: int
    dirty_chunks: int
    local_bytes: int
    fills: int
    fill_errors: int
    failing_chunks: int
    error: str | None
    fill_error: str | None = None  # why the latest failed fill of a chunk still absent failed
    failing_chunk_indexes: tuple[int, ...] = ()  # those chunks, in order
    handed_over_to: str | None = None  # the data file's name after a live handoff
