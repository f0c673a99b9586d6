"""A FIFO's writer as a witness: whether something opened the FIFO for reading (a daemon that
followed a link to it, say)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def fifo_opened(fifo: Path) -> Iterator[threading.Event]:
    """A writer waits in open() on `fifo` until something opens it for reading; the event
    yielded is set then. On leaving, the writer is let go (we open it ourselves)."""
    opened = threading.Event()

    def writer() -> None:
        os.close(os.open(fifo, os.O_WRONLY))
        opened.set()

    threading.Thread(target=writer, daemon=True).start()
    try:
        yield opened
    finally:
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        opened.wait(5)
        os.close(reader)
