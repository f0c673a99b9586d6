"""A QEMU with a QMP socket for the handoff tests: `-machine none` (no guest: block nodes and
`qemu-io` through the human monitor are all the tests need), started with the -drive/-blockdev
arguments under test and always killed at the end."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.servers import settle_log

START_TIMEOUT_S = 20.0


NOBODY = 65534


def new_log_text(log: Path, start: int) -> str:
    """What `log` got past `start`, once it stopped growing."""
    settle_log(log)
    with open(log, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


class Qemu:
    def __init__(self, workdir: Path, *args: str, as_nobody: bool = False) -> None:
        if as_nobody:  # as libvirt's QEMU user would: it can create its sockets here only
            workdir = workdir / "qemu-nobody"
            workdir.mkdir(mode=0o777, exist_ok=True)
            workdir.chmod(0o777)
        self.socket = str(workdir / "qmp.sock")  # for corfs
        self._test_socket = str(workdir / "qmp-test.sock")  # QEMU serves one client per socket
        self.log = workdir / "qemu.log"
        self.args = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                     "-qmp", f"unix:{self.socket},server=on,wait=off",
                     "-qmp", f"unix:{self._test_socket},server=on,wait=off",
                     "-S", *args]  # paused until our QMP session is up: see __enter__
        if as_nobody:
            self.args = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                         *self.args]
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None

    def __enter__(self) -> Qemu:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (os.path.exists(self.socket) and os.path.exists(self._test_socket)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"QEMU did not start: {self.log.read_text()}")
            time.sleep(0.05)
        # QEMU 7.2 can send its RESUME at start ahead of the greeting to a client that
        # connects just then, which qemu.qmp refuses: resume after connecting.
        self._qmp = QEMUMonitorProtocol(self._test_socket)
        self._qmp.connect()
        self.qmp("cont")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._qmp is not None:
            self._qmp.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def qmp(self, name: str, **arguments: object) -> object:
        reply = self._qmp.cmd_raw(name, arguments or None)  # type: ignore[union-attr]
        if "error" in reply:
            raise AssertionError(f"QMP {name}: {reply['error']}")
        return reply["return"]

    def hmp(self, command: str) -> str:
        out = self.qmp("human-monitor-command", **{"command-line": command})
        assert isinstance(out, str)
        return out

    def qemu_io(self, device: str, command: str) -> str:
        """Its output, which HMP does not return (hunt: "" for every command, so a failed
        write or a `read -P` that found other bytes passed): QEMU prints it on its stdout,
        our log. AssertionError where it says the command failed."""
        start = self.log.stat().st_size
        out = self.hmp(f'qemu-io {device} "{command}"')
        printed = new_log_text(self.log, start)
        said = (out + printed).lower()
        assert "error" not in said and "fail" not in said, out + printed
        return out + printed

    def file_nodes(self) -> dict[str, str]:
        """{node name: filename} of every `file` node."""
        nodes = self.qmp("query-named-block-nodes", flat=True)
        return {n["node-name"]: n["file"] for n in nodes if n["drv"] == "file"}  # type: ignore[index, union-attr]

    def open_files(self) -> list[str]:
        """The files QEMU holds open (from /proc: what it really uses, not what it says)."""
        assert self.proc is not None
        fd_dir = f"/proc/{self.proc.pid}/fd"
        out = []
        for fd in os.listdir(fd_dir):
            try:
                out.append(os.readlink(os.path.join(fd_dir, fd)))
            except OSError:
                continue
        return out


def dump(value: object) -> str:
    return json.dumps(value, indent=1)
