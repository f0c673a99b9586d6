"""FailureLog: a failure repeated at every retry is logged once, then reminded at most once a
minute with the count of attempts since the last line, and its end is one line."""

from __future__ import annotations

import errno
import logging

import pytest

from corfs.failure_log import FailureLog, QuietRepeats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_one_line_then_a_reminder_a_minute_then_one_line_when_it_works(caplog, clock) -> None:
    caplog.set_level(logging.INFO, logger="test.failure_log")
    failures = FailureLog(logging.getLogger("test.failure_log"), "committing", clock=clock)
    failures.succeeded()  # nothing failed: nothing to say
    for _ in range(150):  # an attempt a second for 150 s
        failures.failed(OSError("disk gone"))
        clock.now += 1.0
    assert failures.failing
    assert _lines(caplog) == [
        "committing failed (will retry): disk gone",
        "committing still fails: 60 more attempts failed in the last 60 s (will retry): "
        "disk gone",
        "committing still fails: 60 more attempts failed in the last 60 s (will retry): "
        "disk gone",
    ]
    assert [record.levelno for record in caplog.records] == [logging.ERROR] * 3
    caplog.clear()
    failures.succeeded()
    failures.succeeded()
    assert _lines(caplog) == ["committing works again, after 150 failed attempts in 150 s"]
    assert not failures.failing


def test_a_new_outage_starts_afresh(caplog, clock) -> None:
    caplog.set_level(logging.INFO, logger="test.failure_log")
    failures = FailureLog(
        logging.getLogger("test.failure_log"), "stream of a", level=logging.WARNING, clock=clock
    )
    failures.failed("refused")
    clock.now += 30
    failures.failed("refused")  # within the minute: not logged
    failures.succeeded()
    clock.now += 5
    failures.failed("timed out")  # a new outage: said at once
    assert _lines(caplog) == [
        "stream of a failed (will retry): refused",
        "stream of a works again, after 2 failed attempts in 30 s",
        "stream of a failed (will retry): timed out",
    ]
    assert caplog.records[0].levelno == logging.WARNING


def test_a_change_of_cause_is_said_at_once(caplog, clock) -> None:
    caplog.set_level(logging.INFO, logger="test.failure_log")
    failures = FailureLog(logging.getLogger("test.failure_log"), "committing", clock=clock)
    failures.failed(OSError(errno.EBUSY, "database is locked (1 try)"), " (next try in 1 s)")
    clock.now += 1
    # The same kind with other details, and another note: not a new cause.
    failures.failed(OSError(errno.EBUSY, "database is locked (2 tries)"), " (next try in 2 s)")
    clock.now += 1
    failures.failed(OSError(errno.ENOSPC, "No space left on device"))
    clock.now += 1
    failures.failed(OSError(errno.ENOSPC, "No space left on device"))
    clock.now += 1
    failures.failed(OSError(errno.EBUSY, "database is locked (3 tries)"))  # taking turns
    assert _lines(caplog) == [
        "committing failed (will retry): [Errno 16] database is locked (1 try) (next try in 1 s)",
        "committing fails differently now (will retry): [Errno 28] No space left on device",
    ]


def test_quiet_repeats_says_a_library_failure_once_a_while_with_its_cause_not_its_traceback(
    caplog,
) -> None:
    """botocore logs each failed credential refresh with a traceback (a dozen within one read):
    said once per `every` seconds, the exception's first line in place of its traceback."""
    now = [0.0]
    library = logging.getLogger("tests.quiet_repeats")
    library.addFilter(QuietRepeats(every=60, clock=lambda: now[0]))
    for _ in range(12):
        try:
            raise RuntimeError("the credential source is down\nits stderr, line two")
        except RuntimeError:
            library.warning("Refreshing temporary credentials failed.", exc_info=True)
    now[0] = 61.0
    library.warning("Refreshing temporary credentials failed.")
    said = [r.getMessage() for r in caplog.records if r.name == "tests.quiet_repeats"]
    assert said == [
        "Refreshing temporary credentials failed.: the credential source is down",
        "Refreshing temporary credentials failed.",
    ]
    assert "Traceback" not in caplog.text
