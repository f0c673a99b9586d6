"""The one reader of /proc/self/mountinfo (proc(5)). The kernel escapes space, tab, newline and
backslash in paths as `\\ooo` octal; every other byte, UTF-8 or not, comes through raw. So the
table is read as bytes, split on single spaces, and each path field unescaped before it is
decoded with os.fsdecode (surrogateescape: a non-UTF-8 name round-trips to the same bytes).

A line: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    device: str  # "major:minor", as /sys/class/bdi/<device> names it
    root: str
    mountpoint: str
    options: frozenset[str]  # per-mount options (rw, nosuid, ...)
    fstype: str  # "fuse.corfs" for ours
    source: str
    super_options: frozenset[str]  # superblock options (user_id=, allow_other, ...)


def unescape(field: bytes) -> bytes:
    """Undo the kernel's `\\ooo` escapes of one field."""
    return _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)


def _text(field: bytes) -> str:
    return os.fsdecode(unescape(field))


def _options(field: bytes) -> frozenset[str]:
    return frozenset(_text(field).split(",")) if field else frozenset()


def parse_line(line: bytes) -> MountEntry | None:
    """One mountinfo line, or None for a line that does not have the documented shape."""
    fields = line.rstrip(b"\n").split(b" ")
    try:
        separator = fields.index(b"-", 6)  # the optional fields end with a lone "-"
        mount_id, parent_id = int(fields[0]), int(fields[1])
        fstype, source = fields[separator + 1], fields[separator + 2]
        super_options = fields[separator + 3] if len(fields) > separator + 3 else b""
    except (ValueError, IndexError):
        return None
    return MountEntry(
        mount_id=mount_id,
        parent_id=parent_id,
        device=fields[2].decode("ascii", "replace"),
        root=_text(fields[3]),
        mountpoint=_text(fields[4]),
        options=_options(fields[5]),
        fstype=_text(fstype),
        source=_text(source),
        super_options=_options(super_options),
    )


def parse(data: bytes) -> list[MountEntry]:
    """Every well-formed entry of a mountinfo table, in table order (later entries are
    mounted on top of earlier ones at the same mountpoint)."""
    return [entry for line in data.split(b"\n") if line and (entry := parse_line(line))]


def read_mounts(path: str = MOUNTINFO) -> list[MountEntry]:
    """This process's mount table; empty if it cannot be read (no /proc)."""
    try:
        with open(path, "rb") as f:
            return parse(f.read())
    except OSError:
        return []


def find_mount(mountpoint: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The topmost mount at `mountpoint` (an absolute path, compared as given), or None."""
    found = None
    for entry in read_mounts() if entries is None else entries:
        if entry.mountpoint == mountpoint:
            found = entry
    return found
