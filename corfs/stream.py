"""The background filler (image streaming, like QEMU's block-stream): copies every chunk that is
not yet local, until each image is fully local.

Order per image: the chunks the image's read-ahead policy hints after foreground misses first
(read_ahead.py: the one owner of read-ahead; hints are taken when a worker next picks, and a
sleeping worker has nothing a hint would add: it sleeps only when every absent chunk is being
filled or waits out a failure), then the recorded trace, then sequential.
Foreground first: stream fills never block a client (clients start their own fills at once
and share the stream's in-flight ones), and before each fill the worker waits for a short
lull in client I/O, so local reads keep their latency while the stream runs unlimited.
Failures retry by themselves and never stall the rest: a chunk that failed is deferred on its
own, with a delay that doubles per failure (CHUNK_FIRST_BACKOFF up to CHUNK_MAX_BACKOFF), and
the stream goes on with the chunks after it; when due it is retried alone (so a failure of a
whole run shows which of its chunks is at fault). A failure of a whole fill (base down, cache
full), or of each chunk of a run, also backs the image's stream off as a whole. Errors and
failing chunks show in status; an image nothing can fetch for (no source: the base was down at
mount or lost it; or its fills fail in the base as a whole) is "offline", never "streaming".
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from .config import StreamConfig
from .errors import BaseChanged, BaseCorrupt, BaseError, CacheError
from .failure_log import FailureLog
from .fill import FillOutcome
from .image import Image
from .stats import RateMeter

log = logging.getLogger(__name__)

LULL = 0.005  # seconds without client I/O before a stream fill starts
MAX_LULL_WAIT = 0.1  # ... but never wait longer than this
MAX_BACKOFF = 30.0  # of an image's stream after a whole fill failed
CHUNK_FIRST_BACKOFF = 2.0  # of one chunk that failed ...
CHUNK_MAX_BACKOFF = 300.0  # ... doubling per failure up to this


class BandwidthLimiter:
    """Paces byte counts to `rate` bytes/s (0 = unlimited); a rate change takes effect at once."""

    def __init__(self, rate: int = 0) -> None:
        self.rate = rate
        self._next = 0.0  # when the next acquire may go
        self._rate_changed = trio.Event()

    def set_rate(self, rate: int) -> None:
        self.rate = rate
        self._next = trio.current_time()
        # Wake the waiters: they must not sleep out a slot computed at the old rate.
        self._rate_changed.set()
        self._rate_changed = trio.Event()

    async def acquire(self, nbytes: int) -> None:
        while self.rate > 0:
            now = trio.current_time()
            if now >= self._next:
                self._next = now + nbytes / self.rate
                return
            changed = self._rate_changed
            with trio.move_on_at(self._next):
                await changed.wait()


@dataclass
class _Deferred:
    """A chunk whose fill failed: not before `retry_at`, and then alone."""

    failures: int
    retry_at: float


@dataclass
class _ImageStream:
    image: Image
    failure_log: FailureLog  # its whole fills failing: a line, a reminder a minute, the end
    paused: bool = False
    cursor: int = 0
    # Chunks to fill before anything else: runs dropped when a pause caught them (bounded).
    urgent: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=256))
    traced: collections.deque[int] = field(default_factory=collections.deque)
    deferred: dict[int, _Deferred] = field(default_factory=dict)  # chunks whose fill failed
    failures: int = 0
    retry_at: float = 0.0
    error: str | None = None
    fatal: bool = False
    base_failing: bool = False  # its latest fill failed as a whole in the base: backing off
    meter: RateMeter = field(default_factory=RateMeter)
    metered_streaming: bool = False  # its state at the meter's latest sample was streaming


@dataclass(frozen=True)
class ImageStreamStatistics:
    state: str
    rate_bps: float
    error: str | None
    paused: bool = False  # `corfs stream pause` is in effect, whatever the state shows


class StreamWorker:
    def __init__(
        self,
        images: Sequence[Image],
        config: StreamConfig,
        traces: dict[str, list[int]] | None = None,
    ) -> None:
        self.config = config
        self.enabled = config.enabled
        self.limiter = BandwidthLimiter(config.bandwidth)
        self._streams = {
            image.name: _ImageStream(
                image,
                FailureLog(
                    log, f"stream of {image.name}", level=logging.WARNING,
                    clock=trio.current_time,
                ),
                paused=config.start_paused,
            )
            for image in images
        }
        # One per sleeping worker: a wake-up wakes them all (one shared event, replaced by each
        # worker before it slept, woke only the last to sleep).
        self._wakeups: set[trio.Event] = set()
        self._rotation = 0
        for name, order in (traces or {}).items():
            if name in self._streams:
                self._streams[name].traced.extend(order)

    # ---- control -------------------------------------------------------------------------

    def _select(self, name: str | None) -> list[_ImageStream]:
        if name is None:
            return list(self._streams.values())
        if name not in self._streams:
            raise KeyError(name)
        return [self._streams[name]]

    def pause(self, name: str | None = None) -> None:
        for stream in self._select(name):
            stream.paused = True

    def resume(self, name: str | None = None) -> None:
        for stream in self._select(name):
            stream.paused = False
            stream.retry_at = 0.0
            for deferred in stream.deferred.values():
                deferred.retry_at = 0.0
        self._wake()

    def set_bandwidth(self, rate: int) -> None:
        self.limiter.set_rate(rate)
        self._wake()

    def _wake(self) -> None:
        for wakeup in self._wakeups:
            wakeup.set()

    async def _sleep_until_woken(self, timeout: float) -> None:
        wakeup = trio.Event()
        self._wakeups.add(wakeup)
        try:
            with trio.move_on_after(timeout):
                await wakeup.wait()
        finally:
            self._wakeups.discard(wakeup)

    # ---- status --------------------------------------------------------------------------

    def sample_rates(self) -> None:
        now = trio.current_time()
        for stream in self._streams.values():
            if stream.image.complete:
                # Its window would show the last bytes streamed for 10 s more; and should
                # the image miss chunks again (a verify's forget), they never counted.
                stream.meter.reset()
                continue
            streaming = self._state(stream) == "streaming"
            if streaming != stream.metered_streaming:
                # Resumed, or back from an outage: the rate (and the ETA from it) is the
                # stream's since then, not spread over the paused seconds still in the window
                # (an image 30 s from complete showed an ETA of 161 s after a resume); paused
                # or down: what reads fetch since then, not the stream's last 10 s.
                stream.meter.reset()
            stream.metered_streaming = streaming
            stream.meter.sample(now, stream.image.local_bytes)

    def statistics(self, name: str) -> ImageStreamStatistics:
        stream = self._streams[name]
        image = stream.image
        state = self._state(stream)
        error = stream.error or image.error  # control.py adds a fill's error, then the sync's
        if error is None and image.source is None and not image.complete:
            error = f"not fetching: {image.missing_source}"  # the base is down, or lost it
        # Complete: nothing is fetched any more, whatever the last sample (up to 1 s old) says.
        rate = 0.0 if image.complete else stream.meter.rate()
        return ImageStreamStatistics(state, rate, error, paused=stream.paused and self.enabled)

    def _state(self, stream: _ImageStream) -> str:
        image = stream.image
        # A failed sync of the cache ends streaming for good (no fill is stored any more),
        # paused or not, whether a worker has tried since or not
        unsyncable = image.store.sync_failure if not image.complete else None
        if stream.fatal or image.error or unsyncable:
            return "error"
        if image.complete:
            return "complete"
        if image.source is None:  # the base was down at mount, or does not have it any more
            return "offline"
        if not self.enabled:
            return "idle"
        if stream.paused:
            return "paused"
        if stream.base_failing:  # fetching nothing until the base answers (or has it) again
            return "offline"
        return "streaming"

    # ---- work ----------------------------------------------------------------------------

    def _next_run(self, stream: _ImageStream) -> range | None:
        image = stream.image
        count = image.geometry.chunk_count
        now = trio.current_time()
        while (index := self._next_hinted(stream)) is not None:
            if 0 <= index < count and self._wanted(stream, index, now):
                return self._run_from(stream, index)
        # Sequential from the cursor to the end, then the chunks before it (skipped earlier
        # because a client was filling them, or failed: the back of the queue).
        for begin, end in ((stream.cursor, count), (0, stream.cursor)):
            index = image.next_missing(begin)
            while index is not None and index < end:
                if self._wanted(stream, index, now):
                    run = self._run_from(stream, index)
                    stream.cursor = run.stop
                    return run
                index = image.next_missing(index + 1)
        return None

    @staticmethod
    def _next_hinted(stream: _ImageStream) -> int | None:
        """The next chunk to try before the sequential order, or None."""
        if stream.urgent:
            return stream.urgent.popleft()
        if (hint := stream.image.read_ahead.take_hint()) is not None:
            return hint
        return stream.traced.popleft() if stream.traced else None

    @staticmethod
    def _wanted(stream: _ImageStream, index: int, now: float) -> bool:
        """Whether the stream should fill chunk `index` now."""
        image = stream.image
        if image.is_local(index) or image.is_filling(index):
            return False
        deferred = stream.deferred.get(index)
        return deferred is None or deferred.retry_at <= now

    def _run_from(self, stream: _ImageStream, first: int) -> range:
        """The run to fill from `first`: a chunk that failed before goes alone, others take
        their absent neighbours up to run_chunks (never one that failed)."""
        if first in stream.deferred:
            return range(first, first + 1)
        image = stream.image
        stop = first + 1
        count = image.geometry.chunk_count
        while (
            stop < count
            and stop - first < self.config.run_chunks
            and not image.is_local(stop)
            and not image.is_filling(stop)
            and stop not in stream.deferred
        ):
            stop += 1
        return range(first, stop)

    @staticmethod
    def _defer(stream: _ImageStream, index: int, now: float) -> None:
        deferred = stream.deferred.get(index)
        failures = deferred.failures + 1 if deferred else 1
        delay = min(CHUNK_MAX_BACKOFF, CHUNK_FIRST_BACKOFF * 2.0 ** min(failures - 1, 16))
        stream.deferred[index] = _Deferred(failures, now + delay)

    def _pick(self) -> tuple[_ImageStream, range] | None:
        now = trio.current_time()
        streams = list(self._streams.values())
        for step in range(len(streams)):
            stream = streams[(self._rotation + step) % len(streams)]
            if stream.paused or stream.fatal or stream.retry_at > now or stream.image.complete:
                continue
            if stream.image.source is None:  # nothing to fetch from until mount.py attaches one
                continue
            run = self._next_run(stream)
            if run is not None:
                self._rotation = (self._rotation + step + 1) % len(streams)
                return stream, run
        return None

    async def _wait_for_lull(self) -> None:
        waited = 0.0
        while waited < MAX_LULL_WAIT:
            last = max((s.image.last_foreground for s in self._streams.values()), default=0.0)
            quiet = trio.current_time() - last
            if quiet >= LULL:
                return
            await trio.sleep(LULL - quiet)
            waited += LULL - quiet

    async def _worker(self) -> None:
        while True:
            picked = self._pick()
            if picked is None:
                await self._sleep_until_woken(1.0)
                continue
            stream, run = picked
            image = stream.image
            nbytes = sum(image.geometry.chunk_length(i) for i in run)
            await self.limiter.acquire(nbytes)
            await self._wait_for_lull()
            if stream.paused or stream.fatal:
                # Paused while this run waited for its turn (seconds at a low bandwidth): drop
                # it, to be picked first on resume, rather than fill after the pause.
                stream.urgent.appendleft(run.start)
                continue
            outcome = await image.fill_each(run)
            self._account(stream, run, outcome)

    def _account(self, stream: _ImageStream, run: range, outcome: FillOutcome) -> None:
        """After a stream fill of `run`: defer its chunks that failed, back the whole stream
        off if the whole fill failed, and go on as usual otherwise."""
        image = stream.image
        now = trio.current_time()
        for index in run:
            if index in outcome.failed:
                self._defer(stream, index, now)
            elif image.is_local(index):
                stream.deferred.pop(index, None)
        error = outcome.whole_fill_error
        if error is None and len(run) > 1 and len(outcome.failed) == len(run):
            # Each chunk of a run failed on its own (chunk objects gone, say): the base is
            # broken as a whole more likely than not, so do not sweep the image at full speed.
            error = next(iter(outcome.failed.values()))
        if isinstance(error, BaseChanged) or (
            isinstance(error, CacheError) and image.store.sync_failure is not None
        ):  # no more fills, or none stored any more (a failed sync of the cache): until restart
            stream.fatal = True
            stream.error = str(error)
        elif error is not None:
            # A base that serves bad bytes is not offline: it answers (`error` says what).
            stream.base_failing = isinstance(error, BaseError) and not isinstance(
                error, BaseCorrupt
            )
            stream.failures += 1
            backoff = min(MAX_BACKOFF, 2.0 ** min(stream.failures - 1, 16))
            stream.retry_at = now + backoff
            stream.error = str(error)
            stream.failure_log.failed(error, f" (next try in {backoff:.0f} s)")
        elif len(outcome.failed) < len(run):  # something filled: the base answers
            stream.failure_log.succeeded()
            if stream.failures:
                # What failed while it was down failed with it, not by itself: fetch it again
                # now and in runs, rather than chunk by chunk minutes later.
                stream.deferred.clear()
            stream.failures = 0
            stream.base_failing = False
            stream.error = None

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sample_forever)
            if self.enabled:
                for _ in range(max(1, self.config.workers)):
                    nursery.start_soon(self._worker)
            task_status.started()

    async def _sample_forever(self) -> None:
        while True:
            self.sample_rates()
            await trio.sleep(1.0)

    def worker_statistics(self) -> StreamWorkerStatistics:
        """What holds for every image (statistics(name) is one image's)."""
        return StreamWorkerStatistics(self.limiter.rate)


@dataclass(frozen=True)
class StreamWorkerStatistics:
    bandwidth_bps: int  # the limit, 0: none
