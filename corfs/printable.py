"""Text from elsewhere (a base's answers, QEMU, paths) as a terminal or a log may show it. A
hostile HTTP server picks the ETag that a "changed on the server" error quotes: a terminal
escape sequence in it reached the admin's terminal raw through `corfs status` and the mount's
log (retitle, clear the screen, a carriage return to overwrite a line)."""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL, C1: what a terminal may act on


def printable(text: str) -> str:
    """`text` with control characters escaped as repr() escapes them (ESC as `\\x1b`), and
    bytes that are not UTF-8 (surrogateescape'd by os.fsdecode) as U+FFFD."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate no file name makes ("\ud800" is valid JSON)
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class PrintableFormatter(logging.Formatter):
    """A log record's line with its message printable: one line per record (a traceback
    after it keeps its own lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return printable(super().formatMessage(record))
