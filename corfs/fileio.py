"""Whole reads of a file range. Linux moves at most MAX_RW_COUNT (2 GiB - 4 KiB) bytes per
read or write call, so one `pread` of a larger chunk or run comes back short though the file
holds every byte; these go on until the range is read or the file ends.
"""

from __future__ import annotations

import os


def preadv_full(fd: int, buffer: memoryview, offset: int) -> int:
    """Read into all of `buffer` from `offset`: the bytes read, fewer only at end of file."""
    view = buffer.cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes from `offset`, fewer only at end of file."""
    pieces: list[bytes] = []
    done = 0
    while done < length:
        more = os.pread(fd, length - done, offset + done)
        if not more:
            break
        pieces.append(more)
        done += len(more)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)
