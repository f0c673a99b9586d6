"""corfs/mountinfo.py: the one parser of /proc/self/mountinfo, on lines as the kernel writes
them (octal escapes for space, tab, newline and backslash; every other byte raw)."""

from __future__ import annotations

import os

from corfs import mountinfo

CORFS_LINE = (
    rb"812 29 0:52 / /tmp/mnt\040with\040space\040" + "é".encode() + rb" rw,nosuid,nodev,"
    rb"relatime shared:420 - fuse.corfs corfs rw,user_id=0,group_id=0,allow_other"
)


def test_a_corfs_line_with_a_space_and_utf8_in_the_mountpoint() -> None:
    (entry,) = mountinfo.parse(CORFS_LINE + b"\n")
    assert entry.mount_id == 812 and entry.parent_id == 29
    assert entry.device == "0:52"
    assert entry.root == "/"
    assert entry.mountpoint == "/tmp/mnt with space é"
    assert entry.options == {"rw", "nosuid", "nodev", "relatime"}
    assert (entry.fstype, entry.source) == ("fuse.corfs", "corfs")
    assert "allow_other" in entry.super_options


def test_tabs_newlines_backslashes_and_non_utf8_bytes_round_trip() -> None:
    raw = b"/m/a\tb\nc\\d \xff\xfe"
    escaped = (
        raw.replace(b"\\", rb"\134")
        .replace(b" ", rb"\040")
        .replace(b"\t", rb"\011")
        .replace(b"\n", rb"\012")
    )
    line = b"30 1 8:1 / " + escaped + b" rw - ext4 /dev/sda1 rw"
    other = b"31 1 0:5 /sub /plain rw,nosuid - tmpfs tmpfs rw,size=10k"
    entries = mountinfo.parse(line + b"\n" + other + b"\n")
    assert [e.mountpoint for e in entries] == [os.fsdecode(raw), "/plain"]
    assert os.fsencode(entries[0].mountpoint) == raw  # surrogateescape: the same bytes back
    assert entries[1].root == "/sub" and entries[1].fstype == "tmpfs"


def test_optional_fields_of_any_number_and_a_missing_super_options_field() -> None:
    line = b"40 1 0:60 / /a rw shared:1 master:2 propagate_from:3 - fuse.corfs corfs"
    (entry,) = mountinfo.parse(line)
    assert entry.fstype == "fuse.corfs" and entry.super_options == frozenset()


def test_a_source_or_fstype_that_is_a_lone_dash_does_not_confuse_the_separator() -> None:
    line = b"41 1 0:61 / /b rw - fuse.x - rw"
    (entry,) = mountinfo.parse(line)
    assert (entry.fstype, entry.source) == ("fuse.x", "-")


def test_malformed_lines_are_skipped() -> None:
    assert mountinfo.parse(b"garbage\n\n1 2 3\nx y 0:1 / /c rw - t s o\n") == []


def test_find_mount_takes_the_topmost_of_stacked_mounts() -> None:
    entries = mountinfo.parse(
        b"50 1 0:70 / /stack rw - tmpfs a rw\n51 50 0:71 / /stack rw - fuse.corfs corfs rw\n"
    )
    found = mountinfo.find_mount("/stack", entries)
    assert found is not None and found.device == "0:71"
    assert mountinfo.find_mount("/nope", entries) is None


def test_this_process_mount_table_parses() -> None:
    entries = mountinfo.read_mounts()
    assert any(e.mountpoint == "/" for e in entries)
