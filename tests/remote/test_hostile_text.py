"""Text a hostile base makes up reaches the admin escaped and bounded. An HTTP server chooses
the ETag of its answers, and a read whose ETag is not the listed one fails with an error that
quotes it: the mount logs that error and `corfs status` shows it. A terminal escape sequence
in it must not reach the admin's terminal raw, and a long one must not make the mount's
status too large for the kernel's 64 KiB xattr limit (`corfs status` then read nothing)."""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuse.util import direct_read
from tests.hostile import HostileServer, ranged_image
from tests.mounting import CorfsDirs, CorfsMount, run_corfs

SIZE = 1 << 20
ESCAPES = "\x1b]0;owned\x07\x1b[2J\rfake line"  # retitle, clear the screen, overwrite a line


def _etag_on_reads(etag: str) -> HostileServer:
    """/disk.raw, listed with ETag "e", whose ranged reads answer with ETag `etag`."""
    return HostileServer(ranged_image(bytes(SIZE), read_etag=etag)).start()


@contextlib.contextmanager
def _mount_with_a_failed_read(etag: str, tmp_path: Path) -> Iterator[CorfsMount]:
    """A mount of that server's disk.raw after one read of it failed (stopped cleanly)."""
    server = _etag_on_reads(etag)
    dirs = CorfsDirs.under(tmp_path)
    try:
        with CorfsMount(server.url + "disk.raw", dirs.cache, dirs.mnt, "--no-stream",
                        "--chunk-size", "64k", log_dir=dirs.logs) as m:
            with pytest.raises(OSError) as failed:
                direct_read(m.mnt / "disk.raw", 0, 4096)
            assert failed.value.errno == errno.ESTALE  # another version's answer: not served
            yield m
            m.stop()
    finally:
        server.stop()


def test_control_characters_a_server_sends_are_shown_escaped(tmp_path: Path) -> None:
    with _mount_with_a_failed_read(f'"{ESCAPES}"', tmp_path) as m:
        result = run_corfs("status", m.mnt)
        assert result.returncode == 0, result.stderr
    for shown in (result.stdout, m.log_text()):
        assert "owned" in shown, shown  # the error is there ...
        assert not any(c in shown for c in "\x1b\x07\r"), repr(shown)  # ... escaped


def test_a_long_error_text_leaves_the_status_readable(tmp_path: Path) -> None:
    # 20 000 control characters: 120 000 bytes of JSON as \u001b escapes, in one error.
    with _mount_with_a_failed_read('"' + "\x1b" * 20_000 + '"', tmp_path) as m:
        table = run_corfs("status", m.mnt)
        as_json = run_corfs("status", m.mnt, "--json")
    assert table.returncode == 0, table.stderr
    assert as_json.returncode == 0, as_json.stderr
    (image,) = json.loads(as_json.stdout)["images"]
    assert "changed on the server" in image["error"]
    assert len(image["error"]) <= 1024
    assert len(table.stdout) < 4096, len(table.stdout)
