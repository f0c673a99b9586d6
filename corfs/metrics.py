"""Prometheus metrics of one mount (`corfs mount --metrics [HOST:]PORT`), with prometheus-client
in a registry of the mount's own (never the process-global default one).

Two kinds of figures:
- Events counted where they happen (base requests by outcome, request and sync durations,
  bytes written to the cache, FUSE requests): prometheus-client's Counter, Histogram and Gauge,
  updated through the small callbacks `Metrics` hands to the fetcher, the store and fuse_ops.
  They are thread-safe (the store calls from worker threads).
- Figures of the mount's state (per image: size, local and dirty bytes, state, fill errors;
  stream rate, pause, bandwidth limit; bytes fetched, digest mismatches; a failed data sync):
  `StatusCollector` reads them at scrape time from `Controller.status()`, the very snapshot
  `corfs status --json` serialises, so both agree at the same moment.

Invariant: the scrape runs in the HTTP server's thread, but the status snapshot is taken on
the trio thread (`trio_token.run_sync_soon`): trio-owned state is never read from another
thread half-changed. A loop that does not answer within SNAPSHOT_TIMEOUT (hung) gives a scrape
without the status figures, the event figures (FUSE requests in flight) still served; the scrape
itself never hangs and the loop is never blocked by the server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import UsageError
from .stats import MountStatus

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 5.0  # seconds a scrape waits for the trio loop to take the status snapshot
# Scrapes within this many seconds of a snapshot are answered from it: the endpoint is open to
# every local user, and each snapshot is a full status built on the trio thread (every VM's
# I/O waits); a loop of scrapes, or many at once, take one a second.
SNAPSHOT_REUSE = 1.0
IMAGE_STATES = ("streaming", "paused", "complete", "idle", "error", "offline", "detached")
_BASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_FUSE_BUCKETS = (0.0001, 0.00025, 0.0005, *_BASE_BUCKETS)
_SYNC_BUCKETS = _BASE_BUCKETS


def parse_listen_address(text: str) -> tuple[str, int]:
    """`PORT`, `HOST:PORT` or `[IPv6]:PORT` -> (host, port); a port alone listens on loopback
    only (metrics name the images: not for every network by default). UsageError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.removeprefix("[").removesuffix("]")
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise UsageError(f"--metrics {text!r}: give PORT or HOST:PORT (a port 1-65535)")
    return host, int(port)


def status_class(error: BaseException | None) -> str:
    """The HTTP status class of a base request's answer ("2xx", "5xx" ...), or "" if there was
    no HTTP answer (a directory base, a timeout, a reset connection)."""
    status = getattr(error, "http_status", None)
    return f"{status // 100}xx" if status else ""


class Metrics:
    """Every metric of one mount in its own registry, and the callbacks that update them."""

    def __init__(self, base_speaks_http: bool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._ok_class = "2xx" if base_speaks_http else ""
        self._base_requests = Counter(
            "corfs_base_requests",
            "Requests to the base by outcome (ok, retried: failed and tried again, failed: "
            "given up) and HTTP status class of the answer ('' if none)",
            ["outcome", "status_class"],
            registry=self.registry,
        )
        self._base_ok = self._base_requests.labels("ok", self._ok_class)  # the hot path
        self._base_duration = Histogram(
            "corfs_base_request_duration_seconds",
            "Duration of each request to the base, whatever its outcome",
            buckets=_BASE_BUCKETS,
            registry=self.registry,
        )
        self._cache_written = Counter(
            "corfs_cache_written_bytes",
            "Bytes written to the cache's data files (fills and client writes)",
            registry=self.registry,
        )
        self._sync_duration = Histogram(
            "corfs_cache_sync_duration_seconds",
            "Duration of each commit of the cache: fdatasync of the data files, then the state",
            buckets=_SYNC_BUCKETS,
            registry=self.registry,
        )
        self._fuse_duration = Histogram(
            "corfs_fuse_request_duration_seconds",
            "Duration of FUSE requests by operation, errors included",
            ["op"],
            buckets=_FUSE_BUCKETS,
            registry=self.registry,
        )
        self._fuse_in_flight = Gauge(
            "corfs_fuse_requests_in_flight",
            "FUSE requests being served now (stuck above 0: something hangs)",
            registry=self.registry,
        )
        self._fuse_by_op: dict[str, Histogram] = {}  # label lookups cached: the hot path

    def base_request(self, seconds: float, outcome: str, error: BaseException | None) -> None:
        """One request to the base ended: `outcome` is ok, retried or failed."""
        if error is None and outcome == "ok":
            self._base_ok.inc()
        else:
            klass = self._ok_class if error is None else status_class(error)
            self._base_requests.labels(outcome, klass).inc()
        self._base_duration.observe(seconds)

    def cache_written(self, nbytes: int) -> None:
        self._cache_written.inc(nbytes)

    def cache_synced(self, seconds: float) -> None:
        self._sync_duration.observe(seconds)

    def fuse_request_started(self) -> float:
        self._fuse_in_flight.inc()
        return time.perf_counter()

    def fuse_request_ended(self, op: str, started: float) -> None:
        self._fuse_in_flight.dec()
        histogram = self._fuse_by_op.get(op)
        if histogram is None:
            histogram = self._fuse_by_op[op] = self._fuse_duration.labels(op)
        histogram.observe(time.perf_counter() - started)

    def read_status_from(self, snapshot: Callable[[], MountSnapshot]) -> None:
        """Serve the status figures from `snapshot`, called on the current trio thread."""
        self.registry.register(StatusCollector(snapshot, trio.lowlevel.current_trio_token()))


@dataclass(frozen=True)
class MountSnapshot:
    status: MountStatus
    data_sync_failed: bool


class StatusCollector(Collector):
    """The mount's state at scrape time (module docstring: taken on the trio thread)."""

    def __init__(
        self, snapshot: Callable[[], MountSnapshot], trio_token: trio.lowlevel.TrioToken
    ) -> None:
        self._snapshot = snapshot
        self._token = trio_token
        self._recent: tuple[float, MountSnapshot] | None = None  # (time.monotonic(), it)
        self._taking = threading.Lock()  # scrapes at once wait for one snapshot

    def describe(self) -> list[Metric]:
        return []  # unknown before the first snapshot; registering must not take one

    def collect(self) -> Iterator[Metric]:
        with self._taking:
            if self._recent is not None and time.monotonic() - self._recent[0] < SNAPSHOT_REUSE:
                snapshot: MountSnapshot | None = self._recent[1]
            else:
                snapshot = self._take_snapshot()
                if snapshot is not None:
                    self._recent = (time.monotonic(), snapshot)
        if snapshot is not None:
            yield from status_metrics(snapshot)

    def _take_snapshot(self) -> MountSnapshot | None:
        taken = threading.Event()
        result: list[MountSnapshot] = []

        def take() -> None:
            # Runs on the trio thread: an exception here would end the whole mount (trio
            # aborts its run on an error in run_sync_soon), so a bug costs one scrape only.
            try:
                result.append(self._snapshot())
            except Exception:
                log.exception("metrics: taking the status failed")
            finally:
                taken.set()

        try:
            self._token.run_sync_soon(take)
        except trio.RunFinishedError:
            return None  # unmounting
        if not taken.wait(SNAPSHOT_TIMEOUT):
            log.warning("metrics: no status within %g s (is the mount hung?)", SNAPSHOT_TIMEOUT)
            return None
        return result[0] if result else None


def status_metrics(snapshot: MountSnapshot) -> list[Metric]:
    """The Prometheus families of one status snapshot."""
    status = snapshot.status
    families = {
        name: GaugeMetricFamily(name, doc, labels=["image"])
        for name, doc in (
            ("corfs_image_size_bytes", "Size of the image"),
            ("corfs_image_local_bytes", "Bytes of the image held in the cache"),
            ("corfs_image_dirty_bytes", "Bytes of the chunks written through the mount"),
            ("corfs_image_failing_chunks", "Chunks whose latest fill failed, still not local"),
            ("corfs_stream_rate_bytes_per_second", "Fill rate of the image (last 10 s)"),
            ("corfs_stream_paused", "1 while streaming of the image is paused (offline too)"),
        )
    }
    fill_errors = CounterMetricFamily(
        "corfs_image_fill_errors", "Fills of the image that failed", labels=["image"]
    )
    state = GaugeMetricFamily(
        "corfs_image_state", "1 for the state the image is in, 0 for the others",
        labels=["image", "state"],
    )
    for image in status.images:
        for name, value in (
            ("corfs_image_size_bytes", image.size),
            ("corfs_image_local_bytes", image.local_bytes),
            ("corfs_image_dirty_bytes", image.dirty_bytes),
            ("corfs_image_failing_chunks", image.failing_chunks),
            ("corfs_stream_rate_bytes_per_second", image.rate_bps),
            ("corfs_stream_paused", int(image.stream_paused)),
        ):
            families[name].add_metric([image.name], value)
        fill_errors.add_metric([image.name], image.fill_errors)
        for each in IMAGE_STATES:
            state.add_metric([image.name, each], int(image.state == each))
    fetcher = status.fetcher or {}
    return [
        *families.values(),
        fill_errors,
        state,
        GaugeMetricFamily(
            "corfs_stream_bandwidth_limit_bytes_per_second",
            "Bandwidth limit of the stream (0: unlimited)",
            value=status.bandwidth_bps,
        ),
        CounterMetricFamily(
            "corfs_base_fetched_bytes", "Bytes fetched from the base",
            value=fetcher.get("bytes_fetched", 0),
        ),
        CounterMetricFamily(
            "corfs_digest_mismatches",
            "Chunks fetched from a published base that failed their digest check",
            value=fetcher.get("digest_mismatches", 0),
        ),
        GaugeMetricFamily(
            "corfs_cache_data_sync_failed",
            "1 once a data sync of the cache failed: nothing more is recorded local (remount)",
            value=int(snapshot.data_sync_failed),
        ),
    ]


def serve_metrics(address: tuple[str, int], registry: CollectorRegistry) -> Callable[[], None]:
    """Serve `registry` at http://HOST:PORT/metrics from a thread of its own (never on the
    trio loop); returns the function that stops it. UsageError if it cannot listen."""
    host, port = address
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise UsageError(f"--metrics {host}:{port}: cannot listen: {exc.strerror}") from None
    log.info("serving metrics at http://%s:%d/metrics", host, port)

    def stop(server: WSGIServer = server) -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return stop
