"""FailingChunks: which absent chunks are failing, why, and when they stop."""

from __future__ import annotations

from corfs.failing import FailingChunks


def test_only_chunks_still_absent_are_failing_and_the_latest_reason_shows() -> None:
    absent = {1, 2, 3, 7}
    failing = FailingChunks(lambda i: i in absent)
    failing.record([1, 4], "404")  # chunk 4 was written whole meanwhile: local, not failing
    failing.record([7], "cache full")
    assert failing.indexes() == [1, 7] and len(failing) == 2
    assert failing.latest == "cache full"
    failing.healed(7)
    assert failing.latest == "404" and 7 not in failing
    failing.healed(1)
    assert failing.latest is None and failing.indexes() == []


def test_a_chunk_of_a_whole_failed_fill_heals_the_rest_of_that_fill_only() -> None:
    failing = FailingChunks(lambda i: True)
    failing.record(range(0, 4), "base down", whole_fill=True)
    failing.record(range(8, 10), "base down", whole_fill=True)
    failing.record([20], "digest")  # on its own
    failing.healed(2)
    assert failing.indexes() == [8, 9, 20]
    failing.healed(20)  # alone: heals nothing else
    assert failing.indexes() == [8, 9]
    failing.healed(5)  # never failing: nothing happens
    assert failing.indexes() == [8, 9]


def test_a_chunk_failing_again_makes_its_reason_the_latest() -> None:
    failing = FailingChunks(lambda i: True)
    failing.record([1], "first")
    failing.record([2], "second")
    failing.record([1], "third")  # chunk 1 again: its new reason is the latest
    assert failing.latest == "third"
