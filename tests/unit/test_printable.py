"""printable(): what a terminal is shown of text from elsewhere (a base's names, a server's
ETag in an error, QEMU's words)."""

from __future__ import annotations

from corfs.printable import printable


def test_control_characters_are_escaped_and_the_rest_kept() -> None:
    assert printable("disk\x1b[2J\r.raw\t") == "disk\\x1b[2J\\r.raw\\t"
    assert printable("ünïcode.raw") == "ünïcode.raw"


def test_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    assert printable("a\udcffb") == "a\ufffdb"  # os.fsdecode of b"a\xffb"


def test_a_lone_surrogate_is_shown_not_raised() -> None:
    """"\\ud800" is valid JSON (an index.json, a status): it raised UnicodeEncodeError, which
    the CLI turned into a traceback (found in review)."""
    assert "\ufffd" in printable("a\ud800b")
