"""What the cache database may say about each chunk of a served image if the daemon died now
(store.py keeps it; Image.write asks it).

A client write must never change the bytes of a chunk the database may call clean or zero
(equal to the base): after a kill -9 the page cache keeps the write while the row still says
clean, the next mount serves the written bytes as the base's, and `corfs verify` later puts the
base's back under a guest that had read them. So before such a write the chunk's dirty mark is
made durable (CacheStore.commit_dirty_marks). A clean or zero mark counts from the moment a
commit takes it (it may be durable any moment from then on), a dirty or absent one only once
its commit succeeded.
"""

from __future__ import annotations

from collections.abc import Iterable

from .store_rows import ChunkState

_EQUAL_TO_BASE = (ChunkState.CLEAN, ChunkState.ZERO)
Marks = dict[tuple[str, int], tuple[int, bytes | None]]  # (image, chunk) -> (state, digest)


class CrashView:
    """Per chunk of each tracked image, the state its row may have after a crash."""

    def __init__(self) -> None:
        self._states: dict[str, bytearray] = {}

    def track(self, name: str, committed: bytearray) -> None:
        """Follow `name` from its committed states (one byte per chunk) on."""
        self._states[name] = bytearray(committed)

    def forget(self, name: str) -> None:
        self._states.pop(name, None)

    def may_say_clean(self, name: str, index: int) -> bool:
        states = self._states.get(name)
        return states is not None and states[index] in _EQUAL_TO_BASE

    def says_dirty(self, name: str, index: int) -> bool:
        """Whether its dirty row is committed (a dirty mark counts once committed)."""
        states = self._states.get(name)
        return states is not None and states[index] == ChunkState.DIRTY

    def note(self, marks: Marks, kinds: tuple[ChunkState, ...]) -> None:
        """Marks of these `kinds` may now be (or now are) what the rows say."""
        for (name, index), (state, _) in marks.items():
            if state in kinds:
                self.set(name, [index], ChunkState(state))

    def set(self, name: str, indexes: Iterable[int], state: ChunkState) -> None:
        states = self._states.get(name)
        if states is None:
            return
        for index in indexes:
            if 0 <= index < len(states):
                states[index] = state

    def all_dirty(self, name: str) -> None:
        """Every clean or zero row of `name` was made dirty (CacheStore.mark_dirty)."""
        states = self._states.get(name)
        if states is not None:
            self.set(name, [i for i, s in enumerate(states) if s in _EQUAL_TO_BASE],
                     ChunkState.DIRTY)
