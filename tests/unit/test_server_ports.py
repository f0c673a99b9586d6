"""The test servers start on a port of their own: a port another process took between
free_port() and the server's bind is given up for another, and never talked to (CI failed a
moto test whose server answered as one with other users; a test talking to another worker's
server passes or fails on that server's state)."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.servers import PortTaken, start_on_a_free_port, stop_process


def _http_server(directory: Path, log: Path):
    def launch(port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(directory),
             str(port)],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )

    return launch


def test_a_port_taken_before_the_bind_is_given_up_for_another(tmp_path: Path) -> None:
    (tmp_path / "mine").write_text("this server")
    launch = _http_server(tmp_path, tmp_path / "server.log")
    tried: list[int] = []
    with socket.socket() as other:  # another worker's server, on the first port given
        def taken_first(port: int) -> subprocess.Popen[bytes]:
            if not tried:
                other.bind(("127.0.0.1", port))
                other.listen()
            tried.append(port)
            return launch(port)

        port, proc = start_on_a_free_port(taken_first, tmp_path / "server.log")
        try:
            assert len(tried) == 2 and port == tried[1]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/mine", timeout=10) as answer:
                assert answer.read() == b"this server"
        finally:
            stop_process(proc)


def test_a_port_always_taken_fails_after_three_tries(tmp_path: Path) -> None:
    launch = _http_server(tmp_path, tmp_path / "server.log")
    held: list[socket.socket] = []

    def always_taken(port: int) -> subprocess.Popen[bytes]:
        other = socket.socket()
        other.bind(("127.0.0.1", port))
        other.listen()
        held.append(other)
        return launch(port)

    try:
        with pytest.raises(PortTaken):
            _, proc = start_on_a_free_port(always_taken, tmp_path / "server.log")
            stop_process(proc)  # taken for started: not left running
        assert len(held) == 3
    finally:
        for other in held:
            other.close()
