"""Getting verified chunk bytes out of a base image: retries with backoff and jitter bounded by
--io-timeout, digest checks for published images, zero chunks that are never fetched, and
chunks copied from the local cache when the same digest is already there (dedup).

Invariants:
- Only bytes that passed every check leave this module. A published chunk whose digest does not
  match is fetched once more, then it fails with BaseCorrupt (EIO); it is never returned.
- One bad chunk fails only itself. A published chunk is its own object, so what goes wrong with
  it (wrong digest, an object that is missing, denied or not a right-sized zstd frame) is that
  chunk's failure: a run read that fails so is split, each chunk is fetched alone once more,
  and the others of the run are returned. Failures of the base as a whole (no answer within
  io_timeout, the image changed) and every failure of a raw image (one object, no digests)
  are raised for the whole run.
- Every wait on the base is bounded: after io_timeout the caller gets BaseUnavailable (EIO).
- At most `slots` requests are in flight at once, a client's before speculative ones
  (request_gate.py); the wait for a slot counts toward io_timeout, a retry's backoff holds none.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .base import BaseImage
from .digest import Buffer, chunk_digest, is_zero, zero_digest
from .errors import (
    BaseAccessDenied,
    BaseCorrupt,
    BaseError,
    BaseNotFound,
    BaseUnavailable,
    CorfsError,
    TransientBaseError,
)
from .geometry import ChunkGeometry, contiguous_runs
from .request_gate import URGENT, RequestGate, Ticket

log = logging.getLogger(__name__)


FINAL_TRY_MARGIN = 0.05  # seconds left for a last try before io_timeout
# What a published chunk's own object can do wrong (see the invariants).
CHUNK_ERRORS = (BaseCorrupt, BaseNotFound, BaseAccessDenied)


@dataclass(frozen=True)
class RetryPolicy:
    io_timeout: float = 60.0
    first_backoff: float = 0.1
    max_backoff: float = 5.0


@dataclass(frozen=True)
class FetchedChunk:
    index: int
    data: Buffer | None  # None: all zeros (nothing to write)
    digest: bytes | None  # xxh3-128 of data; None for zeros


@dataclass(frozen=True)
class FetchedRun:
    """The outcome of fetching some chunks: the verified ones in index order, and why each other
    one failed on its own (failures of the whole fetch are raised instead)."""

    chunks: list[FetchedChunk]
    failed: dict[int, BaseError]


@dataclass(frozen=True)
class FetcherStatistics:
    requests: int
    bytes_fetched: int
    retries: int
    failures: int
    digest_mismatches: int
    dedup_hits: int


# Looks a digest and length up in the local cache: verified bytes of a chunk already local,
# or None.
LocalLookup = Callable[[bytes, int], Buffer | None]
# Told of every base request as it ends: seconds, outcome (ok | retried | failed), the error.
RequestObserver = Callable[[float, str, BaseException | None], None]


def _ignore_request(seconds: float, outcome: str, error: BaseException | None) -> None:
    pass


def _verified(chunk: FetchedChunk, expected: bytes | None, geometry: ChunkGeometry) -> bool:
    """Whether a fetched published chunk holds the bytes of digest `expected`. Zeros come back
    with no digest (they are stored as holes) though a manifest may name them by theirs."""
    if chunk.data is None:
        return expected is None or expected == zero_digest(geometry.chunk_length(chunk.index))
    return chunk.digest == expected


class Fetcher:
    def __init__(
        self,
        policy: RetryPolicy = RetryPolicy(),
        on_request: RequestObserver = _ignore_request,
        *,
        slots: int = 8,
    ) -> None:
        self.policy = policy
        self.gate = RequestGate(slots)  # the base's connections (--connections)
        self._on_request = on_request
        self.requests = 0
        self.bytes_fetched = 0
        self.retries = 0
        self.failures = 0
        self.digest_mismatches = 0
        self.dedup_hits = 0

    def statistics(self) -> FetcherStatistics:
        return FetcherStatistics(
            self.requests,
            self.bytes_fetched,
            self.retries,
            self.failures,
            self.digest_mismatches,
            self.dedup_hits,
        )

    async def read_with_retry(
        self, source: BaseImage, offset: int, length: int, ticket: Ticket = URGENT
    ) -> Buffer:
        """Exactly `length` bytes of `source` at `offset`, retrying transient failures with
        exponential backoff and jitter until io_timeout has passed since the first try.
        `ticket`: its place among the requests waiting for a slot (request_gate.py). The time
        spent queued for the first slot does not count: a read-ahead or stream request may wait
        long behind clients' requests without the base being slow (and a client joining it
        must not inherit a deadline its base never had the chance to meet)."""
        deadline = math.inf  # set when the base is first asked
        attempt = 0
        last_error = ""  # why the previous try failed: it names the base (URL, key)
        while True:
            self.requests += 1
            started = trio.current_time()
            try:
                # A bare scope, not trio.fail_at: that one is a generator-based context manager,
                # and this runs for every base request.
                with trio.CancelScope(deadline=deadline) as scope:
                    await self.gate.acquire(ticket)
                    try:
                        started = trio.current_time()  # the base's time, not the queue's
                        if deadline == math.inf:
                            deadline = scope.deadline = started + self.policy.io_timeout
                        data = await source.read(offset, length)
                    finally:
                        self.gate.release()
                if scope.cancelled_caught:
                    raise trio.TooSlowError
                if len(data) != length:
                    raise TransientBaseError(f"short answer: {len(data)} of {length} bytes")
                self.bytes_fetched += length
                self._on_request(trio.current_time() - started, "ok", None)
                return data
            except trio.TooSlowError:
                self.failures += 1
                self._on_request(trio.current_time() - started, "failed", None)
                raise BaseUnavailable(
                    f"{source.name}: no answer from the base within {self.policy.io_timeout:g} s"
                    + (f" ({attempt} tries, last: {last_error})" if last_error else "")
                ) from None
            except TransientBaseError as exc:
                attempt += 1
                last_error = str(exc)
                backoff = min(
                    self.policy.max_backoff, self.policy.first_backoff * 2 ** min(attempt - 1, 30)
                )
                backoff *= random.uniform(0.5, 1.0)
                # The last wait is cut short so that a last try still fits: the read gives up
                # at io_timeout, not a backoff earlier.
                remaining = deadline - trio.current_time() - FINAL_TRY_MARGIN
                backoff = min(backoff, remaining)
                if remaining < FINAL_TRY_MARGIN:
                    self.failures += 1
                    self._on_request(trio.current_time() - started, "failed", exc)
                    raise BaseUnavailable(
                        f"{source.name}: base failed for {self.policy.io_timeout:g} s "
                        f"({attempt} tries): {exc}"
                    ) from None
                self.retries += 1
                self._on_request(trio.current_time() - started, "retried", exc)
                # Counted (metrics: outcome "retried"), not said: a line per try flooded the
                # log through an outage; giving up is said by who asked.
                log.debug("%s: retrying in %.2f s: %s", source.name, backoff, exc)
                await trio.sleep(backoff)
            except CorfsError as exc:  # refused for good (gone, denied, changed): no retry
                self._on_request(trio.current_time() - started, "failed", exc)
                raise

    async def fetch_chunks(
        self,
        source: BaseImage,
        geometry: ChunkGeometry,
        indexes: range,
        local_lookup: LocalLookup | None = None,
        ticket: Ticket = URGENT,
    ) -> FetchedRun:
        """Verified contents of the contiguous chunks `indexes`: one base request for each run
        of chunks that are neither known zeros nor found locally by digest. A chunk that fails
        on its own is in `failed`; the others come back (module invariants). Every request
        waits for its slot with `ticket` (request_gate.py)."""
        layout = source.layout
        if layout is None:
            return FetchedRun(await self._fetch_raw(source, geometry, indexes, ticket), {})
        results: dict[int, FetchedChunk] = {}
        failed: dict[int, BaseError] = {}
        to_fetch: list[int] = []
        for index in indexes:
            expected = layout.digests[index]
            if expected is None:
                results[index] = FetchedChunk(index, None, None)
                continue
            local = local_lookup(expected, geometry.chunk_length(index)) if local_lookup else None
            if local is not None:
                self.dedup_hits += 1
                results[index] = FetchedChunk(index, local, expected)
            else:
                to_fetch.append(index)
        for run in contiguous_runs(to_fetch):
            await self._fetch_published_run(source, geometry, run, results, failed, ticket)
        return FetchedRun([results[i] for i in indexes if i in results], failed)

    async def _fetch_raw(
        self, source: BaseImage, geometry: ChunkGeometry, run: range, ticket: Ticket
    ) -> list[FetchedChunk]:
        start = geometry.chunk_start(run.start)
        end = geometry.chunk_start(run[-1]) + geometry.chunk_length(run[-1])
        data = await self.read_with_retry(source, start, end - start, ticket)
        view = memoryview(data)
        chunks = []
        for index in run:
            offset = geometry.chunk_start(index) - start
            piece = view[offset : offset + geometry.chunk_length(index)]
            digest = chunk_digest(piece)
            # The digest is needed anyway; only a chunk that matches the zero digest pays for
            # the exact (copying) zero test.
            if digest == zero_digest(len(piece)) and is_zero(piece):
                chunks.append(FetchedChunk(index, None, None))
            else:
                # A view, not a copy: pwrite and the digest take buffers as they are.
                chunks.append(FetchedChunk(index, piece, digest))
        return chunks

    async def _fetch_published_run(
        self,
        source: BaseImage,
        geometry: ChunkGeometry,
        run: range,
        results: dict[int, FetchedChunk],
        failed: dict[int, BaseError],
        ticket: Ticket,
    ) -> None:
        """Fetch `run` into `results`, each chunk that fails on its own into `failed`."""
        assert source.layout is not None
        digests = source.layout.digests
        try:
            chunks = await self._fetch_raw(source, geometry, run, ticket)
        except CHUNK_ERRORS as exc:
            # One chunk's object is bad (truncated, garbage, missing): which one, its own fetch
            # tells. A corrupt answer counts as a failed check: it gets its one more fetch.
            if isinstance(exc, BaseCorrupt):
                self.digest_mismatches += 1
            elif len(run) == 1:
                self.failures += 1
                failed[run.start] = exc
                return
            log.warning(
                "%s: %s; fetching chunks %d-%d one by one", source.name, exc, run.start, run[-1]
            )
            await self._fetch_each_alone(source, geometry, list(run), results, failed, ticket)
            return
        again = []
        for chunk in chunks:
            if _verified(chunk, digests[chunk.index], geometry):
                results[chunk.index] = chunk
            else:
                self.digest_mismatches += 1
                log.warning(
                    "%s: chunk %d failed its digest check, fetching it again",
                    source.name,
                    chunk.index,
                )
                again.append(chunk.index)
        await self._fetch_each_alone(source, geometry, again, results, failed, ticket)

    async def _fetch_each_alone(
        self,
        source: BaseImage,
        geometry: ChunkGeometry,
        indexes: list[int],
        results: dict[int, FetchedChunk],
        failed: dict[int, BaseError],
        ticket: Ticket,
    ) -> None:
        """One more fetch of each chunk of `indexes`, concurrently and each on its own: into
        `results` if it is right now, else into `failed`; a failure of the whole base is
        raised once they all ended."""
        whole_base: list[CorfsError] = []

        async def fetch_alone(index: int) -> None:
            try:
                results[index] = await self._fetch_second_time(
                    source, geometry, index, source.layout.digests[index],  # type: ignore[union-attr]
                    ticket,
                )
            except CHUNK_ERRORS as exc:
                self.failures += 1
                failed[index] = exc
            except CorfsError as exc:
                whole_base.append(exc)

        async with trio.open_nursery() as nursery:
            for index in indexes:
                nursery.start_soon(fetch_alone, index)
        if whole_base:
            raise whole_base[0]

    async def _fetch_second_time(
        self,
        source: BaseImage,
        geometry: ChunkGeometry,
        index: int,
        expected: bytes | None,
        ticket: Ticket,
    ) -> FetchedChunk:
        """The last try of a chunk whose first fetch failed: right, or that chunk's error."""
        try:
            (chunk,) = await self._fetch_raw(source, geometry, range(index, index + 1), ticket)
        except BaseCorrupt as exc:
            self.digest_mismatches += 1
            raise BaseCorrupt(
                f"{source.name}: chunk {index} failed its check twice: {exc}"
            ) from None
        if not _verified(chunk, expected, geometry):
            self.digest_mismatches += 1
            raise BaseCorrupt(f"{source.name}: chunk {index} failed its digest check twice")
        return chunk
