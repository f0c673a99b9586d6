"""BandwidthLimiter pacing, under MockClock so that seconds pass instantly."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from corfs.stream import BandwidthLimiter


def run(main) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize(("count", "nbytes", "rate"), [(10, 1 << 20, 4 << 20), (50, 4096, 65536)])
def test_acquires_are_paced(count: int, nbytes: int, rate: int) -> None:
    async def main() -> None:
        limiter = BandwidthLimiter(rate)
        start = trio.current_time()
        for _ in range(count):
            await limiter.acquire(nbytes)
        elapsed = trio.current_time() - start
        # The first acquire goes at once; N acquires span (N-1) slots of nbytes/rate.
        assert elapsed == pytest.approx((count - 1) * nbytes / rate)

    run(main)


def test_concurrent_acquires_share_the_rate() -> None:
    async def main() -> None:
        limiter = BandwidthLimiter(1000)
        times: list[float] = []

        async def taker() -> None:
            for _ in range(5):
                await limiter.acquire(100)
                times.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(taker)
        times.sort()
        assert len(times) == 20
        assert times[-1] == pytest.approx(19 * 0.1)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert min(gaps) == pytest.approx(0.1)

    run(main)


def test_unlimited_never_waits() -> None:
    async def main() -> None:
        limiter = BandwidthLimiter(0)
        for _ in range(1000):
            await limiter.acquire(1 << 30)
        assert trio.current_time() == 0.0

    run(main)


def test_idle_time_is_not_saved_up_as_a_burst() -> None:
    async def main() -> None:
        limiter = BandwidthLimiter(1000)
        await limiter.acquire(1000)
        await trio.sleep(100)
        start = trio.current_time()
        for _ in range(3):
            await limiter.acquire(1000)
        assert trio.current_time() - start == pytest.approx(2.0)

    run(main)


def test_rate_change_takes_effect_for_waiting_acquirers() -> None:
    async def main() -> None:
        limiter = BandwidthLimiter(1000)
        await limiter.acquire(1_000_000)  # the next slot is 1000 s away
        done: list[float] = []

        async def waiter() -> None:
            await limiter.acquire(1000)
            done.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            nursery.start_soon(waiter)
            await trio.sleep(1.0)
            assert done == []
            limiter.set_rate(0)
        assert done == [1.0, 1.0]
        # Faster: the old, slower slot is forgotten at once.
        limiter.set_rate(10)
        await limiter.acquire(1_000_000)
        limiter.set_rate(1_000_000)
        start = trio.current_time()
        await limiter.acquire(1000)
        await limiter.acquire(1000)
        assert trio.current_time() - start == pytest.approx(0.001)

    run(main)
