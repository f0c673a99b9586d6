"""Issue 14: every base request the fetcher makes is counted once in the mount's metrics, by
outcome (ok, retried, failed) and the HTTP status class of the answer, with its duration."""

from __future__ import annotations

import pytest

from corfs.base.memory import MemoryImage
from corfs.errors import BaseNotFound, BaseUnavailable, TransientBaseError
from corfs.fetcher import Fetcher, RetryPolicy
from corfs.metrics import Metrics
from tests.core.rig import CS, random_bytes, run_with_mock_clock
from tests.prometheus import samples, total, value

POLICY = RetryPolicy(io_timeout=10.0, first_backoff=0.1, max_backoff=2.0)


class Busy(TransientBaseError):
    http_status = 503


class Gone(BaseNotFound):
    http_status = 404


def _exposed(metrics: Metrics):
    from prometheus_client import generate_latest

    return samples(generate_latest(metrics.registry).decode())


def test_requests_counted_by_outcome_and_status_class() -> None:
    metrics = Metrics(base_speaks_http=True)
    source = MemoryImage("img", bytearray(random_bytes(4 * CS)))

    async def main() -> None:
        fetcher = Fetcher(POLICY, on_request=metrics.base_request)
        source.faults.fail_next, source.faults.fail_with = 2, Busy
        await fetcher.read_with_retry(source, 0, CS)
        source.faults.fail_next, source.faults.fail_with = 1, Gone
        with pytest.raises(BaseNotFound):
            await fetcher.read_with_retry(source, CS, CS)
        source.faults.fail_next, source.faults.fail_with = 1000, TransientBaseError
        with pytest.raises(BaseUnavailable):
            await fetcher.read_with_retry(source, CS, CS)
        found = _exposed(metrics)
        assert value(found, "corfs_base_requests_total", outcome="retried", status_class="5xx") == 2
        assert value(found, "corfs_base_requests_total", outcome="ok", status_class="2xx") == 1
        assert value(found, "corfs_base_requests_total", outcome="failed", status_class="4xx") == 1
        # A base that never answers right: retried without an HTTP status, then given up.
        assert value(found, "corfs_base_requests_total", outcome="failed", status_class="") == 1
        assert total(found, "corfs_base_requests_total") == fetcher.requests
        assert value(found, "corfs_base_request_duration_seconds_count") == fetcher.requests
        assert total(found, "corfs_base_requests_total", outcome="retried") == fetcher.retries

    run_with_mock_clock(main)
