"""A fill in flight, the one fetch of some absent chunks of an image that every reader,
writer and stream worker needing one of them waits on (image.py), and what a pass of fills
left undone."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from .digest import Buffer
from .errors import CorfsError
from .request_gate import Ticket


@dataclass
class Fill:
    """A fill in flight: everyone who needs one of its chunks waits on `done`."""

    done: trio.Event = field(default_factory=trio.Event)
    error: CorfsError | None = None  # the whole fill failed (base down, cache full ...)
    chunk_errors: dict[int, CorfsError] = field(default_factory=dict)  # ... or these chunks
    for_readers: bool = False  # keep the stored bytes (fresh.py): client reads want them
    for_writers: bool = False  # a client write needs its chunks local: never dropped
    background: bool = False  # only the stream waits for it
    # The verified bytes of its chunks (None: zeros), for its waiters, set before `done`
    held: dict[int, Buffer | None] = field(default_factory=dict)
    room_wait: trio.CancelScope | None = None  # a stream fill waiting for write-behind room
    # Its requests' place in the fetcher's queue: urgent once a client waits (request_gate.py)
    ticket: Ticket = field(default_factory=Ticket)

    def error_of(self, index: int) -> CorfsError | None:
        return self.chunk_errors.get(index) or self.error

    def share(self, *, reading: bool, background: bool, writing: bool = False) -> None:
        """Another waiter joins: a client read wants the bytes kept, a client write wants them
        stored, and a client makes the fill a foreground one (which waits for no room, and
        whose requests not sent yet go before read-ahead's and the stream's). Call
        before the first await after starting or joining: the fill reads these flags once its
        fetch is done."""
        self.for_readers |= reading
        self.for_writers |= writing
        self.background &= background
        if not background:  # a client waits: its requests go before speculative ones
            self.ticket.urgent = True
        if not self.background and self.room_wait is not None:
            self.room_wait.cancel()


@dataclass(frozen=True)
class FillOutcome:
    """What one pass of fills left undone: chunk -> why it is still absent, and the failure of
    a whole fill among them if there was one (not attributable to one chunk)."""

    failed: dict[int, CorfsError]
    whole_fill_error: CorfsError | None
    held: dict[int, Buffer | None] = field(default_factory=dict)  # verified bytes of the others
