"""SocketMonitor.connect against sockets that are not QEMU's: each is one QmpError saying
what is there, within the timeout (the live-detach tests use real QEMU for the rest)."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from corfs.errors import QmpError
from corfs.qmp_switch import connect_socket
from tests.servers import qmp_speaker, unix_listener


def test_a_socket_that_says_nothing_is_given_up_at_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with unix_listener(path, None):
        started = time.monotonic()
        with pytest.raises(QmpError, match="no answer to the QMP greeting in 0.5 s"):
            connect_socket(str(path), 0.5)
        assert time.monotonic() - started < 3


@pytest.mark.parametrize("answer", [b"hello, I am not QEMU\r\n", b""])
def test_a_socket_that_answers_garbage_or_hangs_up_is_not_qmp(
    tmp_path: Path, answer: bytes
) -> None:
    path = tmp_path / "other.sock"
    with unix_listener(path, answer), pytest.raises(QmpError, match="not a QEMU QMP socket"):
        connect_socket(str(path), 10)


def test_no_socket_and_a_refused_one_say_so(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match="no QMP socket there"):
        connect_socket(str(tmp_path / "nothing.sock"), 1)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))  # bound, never listening: refused
    try:
        with pytest.raises(QmpError, match="connection refused"):
            connect_socket(str(tmp_path / "stale.sock"), 1)
    finally:
        stale.close()


def test_an_event_ahead_of_the_first_greeting_is_met_by_connecting_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What QEMU 7.2 sent a client that connected as the guest started (CI, 2026-12-04); met
    quietly (review: qemu.qmp's own error lines about the first try reached stderr)."""
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "qmp.sock"
    resume = b'{"timestamp": {"seconds": 1796409494, "microseconds": 83303}, "event": "RESUME"}\r\n'
    with qmp_speaker(path, resume) as received:
        monitor = connect_socket(str(path), 10)
        try:
            assert monitor.command("query-status") == {}
        finally:
            monitor.close()
    assert [command["execute"] for command in received] == [
        "qmp_capabilities", "query-status"
    ]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
