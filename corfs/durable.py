"""Durable names: after a file is created, renamed or unlinked, its directory is synced too, or
a crash may forget the change (the cache's files, a detached image, a published one)."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make the names in directory `path` (created, renamed, unlinked) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
