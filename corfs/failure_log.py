"""Logging a failure that repeats at every retry (a commit each second while the cache disk is
down, a stream backing off from a dead base) without flooding the log: the first failure, then
at most one reminder per `remind_every` seconds saying how many attempts failed since the last
line (at once for a kind of failure not seen since the last success), and one line when the
operation works again.

The caller retries as it likes; this only decides what reaches the log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

REMIND_EVERY = 60.0  # seconds between reminders while the failure lasts


class FailureLog:
    """The log lines of one repeatedly retried operation, named `what` ("committing chunk
    state"). Not thread-safe: call it from one thread (the trio thread)."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        level: int = logging.ERROR,
        remind_every: float = REMIND_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log, self._what, self._level = logger, what, level
        self._remind_every, self._clock = remind_every, clock
        self._failures = 0  # attempts failed since the last success
        self._unsaid = 0  # ... of which no log line told yet
        self._first_at = self._said_at = 0.0
        self._kinds: set[tuple[type, object]] = set()  # of the failures since the last success

    @property
    def failing(self) -> bool:
        return self._failures > 0

    def failed(self, error: object, note: str = "") -> None:
        """An attempt failed with `error`; `note` is said after it. A failure of another kind
        (exception type and errno: "database is locked", then "No space left") is said at once;
        the same kind with other details (a retry count in the text) waits for the reminder."""
        now = self._clock()
        self._failures += 1
        kind = (type(error), getattr(error, "errno", None))
        new_kind = kind not in self._kinds  # two kinds taking turns: said once each
        self._kinds.add(kind)
        if self._failures == 1:
            self._first_at = self._said_at = now
            self._log.log(self._level, "%s failed (will retry): %s%s", self._what, error, note)
            return
        self._unsaid += 1
        if new_kind:
            self._log.log(self._level, "%s fails differently now (will retry): %s%s",
                          self._what, error, note)
            self._said_at, self._unsaid = now, 0
        elif now - self._said_at >= self._remind_every:
            self._log.log(
                self._level,
                "%s still fails: %d more attempts failed in the last %.0f s (will retry): %s%s",
                self._what, self._unsaid, now - self._said_at, error, note,
            )
            self._said_at, self._unsaid = now, 0

    def succeeded(self) -> None:
        if not self._failures:
            return
        self._log.info(
            "%s works again, after %d failed attempts in %.0f s",
            self._what, self._failures, self._clock() - self._first_at,
        )
        self._failures = self._unsaid = 0
        self._kinds.clear()


class QuietRepeats(logging.Filter):
    """For a library's logger that says each failed retry with its traceback (botocore: every
    failed credential refresh, a dozen within one read's --io-timeout, the credential
    process's stderr in the traceback): the exception's first line instead of its traceback
    (corfs's own error names only its type), each such message at most once per `every`
    seconds."""

    def __init__(self, every: float = REMIND_EVERY, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._every, self._clock = every, clock
        self._said: dict[str, float] = {}
        self._lock = threading.Lock()  # the library logs from worker threads

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            cause = str(record.exc_info[1]).strip().splitlines()
            if cause:
                record.msg, record.args = f"{record.getMessage()}: {cause[0][:200]}", None
        record.exc_info, record.exc_text = None, None
        message, now = record.getMessage(), self._clock()
        with self._lock:
            said = self._said.get(message)
            if said is not None and now - said < self._every:
                return False
            if len(self._said) > 1000:  # messages naming changing things: keep it bounded
                self._said.clear()
            self._said[message] = now
        return True
