"""The chunks of an image whose latest fill (or store) failed and that are still absent, and
why: `corfs status` and the metrics show them until a fill of them succeeds.

A chunk that failed with a whole fill (the base did not answer, the cache disk was full)
belongs to that fill's group: once one chunk of the group becomes local, the others are
forgotten too. They were mostly read-ahead neighbours that no reader asks for again, and the
base evidently answers now (the stream fills them, or fails them anew).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class FailingChunks:
    """Chunk index -> (why, group); group 0: the chunk failed on its own."""

    def __init__(self, is_absent: Callable[[int], bool]) -> None:
        self._is_absent = is_absent
        self._failures: dict[int, tuple[str, int]] = {}
        self._groups = 0  # whole fills that failed so far: each one's group number

    def __len__(self) -> int:
        return len(self._failures)

    def __contains__(self, index: int) -> bool:
        return index in self._failures

    @property
    def latest(self) -> str | None:
        """Why the latest failure of a chunk still failing happened, or None."""
        if not self._failures:
            return None
        return next(reversed(self._failures.values()))[0]

    def indexes(self) -> list[int]:
        return sorted(self._failures)

    def record(self, indexes: Iterable[int], why: str, *, whole_fill: bool = False) -> None:
        """These chunks' fill (or store) failed: those still absent are failing. A chunk a
        client wrote whole meanwhile is local: not failing."""
        group = 0
        if whole_fill:
            self._groups += 1
            group = self._groups
        for index in indexes:
            if self._is_absent(index):
                self._failures.pop(index, None)  # to the end: `latest` is the last recorded
                self._failures[index] = (why, group)

    def healed(self, index: int) -> None:
        """Chunk `index` is local now, or on its way (queued to be stored): it is not failing,
        and neither are the others of a whole fill that failed with it."""
        failure = self._failures.pop(index, None)
        if failure is not None and failure[1]:
            group = failure[1]
            self._failures = {i: f for i, f in self._failures.items() if f[1] != group}
