"""Which base request of a mount goes next: at most `slots` (--connections) in flight, and a
request a client waits for before any that only read-ahead or the stream wait for.

Many readers share one mount's connections. Each sequential reader keeps a read-ahead window of
requests queued; in arrival order, a reader's demand miss (or a booting VM's random read) would
wait behind every other reader's speculation. So each request carries a `Ticket`: urgent ones
go first, in arrival order, then the others, in arrival order. A ticket can turn urgent while
it waits (a client comes to wait for a read-ahead or stream fill that has not been sent yet:
`Fill.share`, fill.py); it is read whenever a slot frees. A request already sent is never
interrupted: urgency only orders the queue.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import trio


@dataclass
class Ticket:
    """One request's place in the queue: `urgent` once a client waits for it."""

    urgent: bool = False


URGENT = Ticket(urgent=True)  # a request made for a client that waits (never changes)


@dataclass(eq=False)
class _Waiter:
    ticket: Ticket
    handed: trio.Event = field(default_factory=trio.Event)


class RequestGate:
    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self._free = self.slots
        self._waiting: collections.deque[_Waiter] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def acquire(self, ticket: Ticket) -> None:
        """Take a slot (module docstring: the order); give it back with `release`. Not an
        async context manager: this is on every base request's path and one costs ~10 us."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._free:
            self._free -= 1
            return
        waiter = _Waiter(ticket)
        self._waiting.append(waiter)
        try:
            await waiter.handed.wait()
        except BaseException:
            if waiter.handed.is_set():  # handed the slot while being cancelled: pass it on
                self.release()
            else:
                self._waiting.remove(waiter)
            raise

    def release(self) -> None:
        """A slot frees: straight to the first urgent waiter, else to the first waiter."""
        if not self._waiting:
            self._free += 1
            return
        waiter = next((w for w in self._waiting if w.ticket.urgent), self._waiting[0])
        self._waiting.remove(waiter)
        waiter.handed.set()
