"""The lean reader's stall deadline (http_wire._progressed): an exchange that keeps making
progress is never given up, one that stops is given up between stall and 1.125 x stall after
its last progress, and the deadline is not moved on every recv."""

import trio
import trio.testing

from corfs.base.http_wire import STALL_SLACK, _progressed

STALL = 8.0


def test_the_deadline_stays_a_stall_ahead_of_progress_and_moves_seldom() -> None:
    moves = 0

    async def main() -> None:
        nonlocal moves
        with trio.CancelScope(deadline=trio.current_time() + STALL * (1 + STALL_SLACK)) as scope:
            for _ in range(400):  # progress every 0.1 s for 40 s
                await trio.sleep(0.1)
                before = scope.deadline
                _progressed(scope, STALL)
                now = trio.current_time()
                assert now + STALL <= scope.deadline <= now + STALL * (1 + STALL_SLACK)
                moves += scope.deadline != before
        assert not scope.cancelled_caught

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert 0 < moves <= 40 / (STALL * STALL_SLACK) + 1  # once per stall/8, not per recv


def test_an_exchange_that_stops_is_given_up_within_the_slack() -> None:
    async def main() -> float:
        with trio.CancelScope(deadline=trio.current_time() + STALL * (1 + STALL_SLACK)) as scope:
            for _ in range(5):
                await trio.sleep(0.3)
                _progressed(scope, STALL)
            last = trio.current_time()
            await trio.sleep(100)  # no more progress
        assert scope.cancelled_caught
        return trio.current_time() - last

    waited = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert STALL <= waited <= STALL * (1 + STALL_SLACK)
