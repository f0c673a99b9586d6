"""The metrics endpoint is open to every local user, and each scrape took a full status on the
trio thread (isolation hunt): scrapes within SNAPSHOT_REUSE of a snapshot are answered from
it, and scrapes at once wait for one snapshot."""

from __future__ import annotations

import threading
import time

import trio

from corfs import metrics
from corfs.metrics import MountSnapshot, StatusCollector
from corfs.stats import MountStatus


def test_scrapes_within_a_second_share_one_snapshot(monkeypatch) -> None:
    monkeypatch.setattr(metrics, "SNAPSHOT_REUSE", 30.0)  # a slow machine: well within it
    taken = 0

    def snapshot() -> MountSnapshot:
        nonlocal taken
        taken += 1
        return MountSnapshot(MountStatus(True, "/mnt", "/cache", "memory://", 0), False)

    def scrape_many(collector: StatusCollector) -> None:
        threads = [
            threading.Thread(target=lambda: list(collector.collect())) for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for _ in range(50):
            assert list(collector.collect())  # figures, from the shared snapshot

    async def main() -> None:
        collector = StatusCollector(snapshot, trio.lowlevel.current_trio_token())
        await trio.to_thread.run_sync(scrape_many, collector)
        assert taken == 1
        monkeypatch.setattr(metrics, "SNAPSHOT_REUSE", 0.2)
        await trio.sleep(0.25)
        await trio.to_thread.run_sync(lambda: list(collector.collect()))
        assert taken == 2

    started = time.monotonic()
    trio.run(main)
    assert time.monotonic() - started < 10
