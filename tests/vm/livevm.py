"""The test VM running in the background: QMP sockets, a console to read and to type into.

Unlike :func:`tests.vm.vmboot.boot` (one boot, wait for power-off), a :class:`LiveVm` returns
as soon as QEMU is up, so a test can act on the host while the guest works: wait for console
lines, send the guest a line on its serial console, ask QEMU over QMP. It has two QMP sockets,
since QEMU serves one client per socket: :attr:`LiveVm.qmp_socket` is left free for the
program under test (e.g. `corfs detach --qmp`), the other is the test's own. QEMU is killed by
its own PID when the ``with`` block ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.vm.build_image import VmArtifacts
from tests.vm.vmboot import (
    KILL_WAIT,
    BootError,
    BootResult,
    console_text,
    parse_result,
    qemu_command,
)

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


class LiveVm:
    def __init__(
        self, workdir: Path, disk_path: Path, artifacts: VmArtifacts, *, cache: str = "none",
        append: str = "",
    ) -> None:
        self.qmp_socket = workdir / "qmp.sock"  # for the program under test
        self._test_socket = workdir / "qmp-test.sock"
        self.args = [
            *qemu_command(disk_path, artifacts, cache=cache, append=append),
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-qmp", f"unix:{self._test_socket},server=on,wait=off",
            "-S",  # paused until our QMP session is up: see __enter__
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._chunks: list[bytes] = []
        self._grew = threading.Condition()
        self._reader: threading.Thread | None = None
        self._start = 0.0

    # -- lifecycle --

    def __enter__(self) -> LiveVm:
        log.info("livevm: %s", " ".join(self.args))
        self._start = time.monotonic()
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not (self.qmp_socket.exists() and self._test_socket.exists()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BootError("QEMU did not start", self.console())
                time.sleep(0.05)
            # QEMU 7.2 can send the RESUME of a starting guest ahead of the greeting to a
            # client that connects just then, which qemu.qmp refuses: start it after.
            self._qmp = QEMUMonitorProtocol(str(self._test_socket))
            self._qmp.connect()
            self.qmp("cont")
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._kill()

    def _kill(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # our own child, by PID
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(KILL_WAIT)
        if self._reader is not None:
            self._reader.join(5)

    def wait_exit(self, timeout: float) -> BootResult:
        """Wait for the guest to power off; its console parsed as a :class:`BootResult`."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BootError(f"VM did not power off within {timeout:.0f}s", self.console()) \
                from None
        if self._reader is not None:
            self._reader.join(5)
        return parse_result(self.console(), self.proc.returncode, time.monotonic() - self._start)

    # -- console --

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            with self._grew:
                self._chunks.append(line)
                self._grew.notify_all()
        with self._grew:
            self._grew.notify_all()

    def console(self) -> str:
        with self._grew:
            return console_text(self._chunks)

    def wait_for(self, pattern: re.Pattern[str], count: int, timeout: float) -> list[str]:
        """Block until the console holds ``count`` matches of ``pattern``; return them all."""
        deadline = time.monotonic() + timeout
        with self._grew:
            while True:
                found = pattern.findall(console_text(self._chunks))
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                assert self.proc is not None
                if left <= 0 or self.proc.poll() is not None:
                    raise BootError(
                        f"{len(found)} of {count} console lines matching {pattern.pattern!r} "
                        f"after {timeout:.0f}s (qemu exit status {self.proc.returncode})",
                        console_text(self._chunks),
                    )
                self._grew.wait(min(left, 1.0))

    def type_line(self, line: str) -> None:
        """Send ``line`` to the guest's serial console (QEMU's stdin is the serial's input)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    # -- QMP (the test's own socket) --

    def qmp(self, name: str, **arguments: object) -> object:
        assert self._qmp is not None
        reply = self._qmp.cmd_raw(name, arguments or None)
        if "error" in reply:
            raise AssertionError(f"QMP {name}: {reply['error']}")
        return reply["return"]

    def block_node_files(self) -> list[str]:
        """The file every block node QEMU has names (`query-named-block-nodes`)."""
        nodes = self.qmp("query-named-block-nodes", flat=True)
        assert isinstance(nodes, list)
        return [node["file"] for node in nodes]

    def open_files(self) -> list[str]:
        """What QEMU's fds point at (from /proc: what it really uses, not what it says)."""
        assert self.proc is not None
        fd_dir = f"/proc/{self.proc.pid}/fd"
        out = []
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                out.append(os.readlink(os.path.join(fd_dir, fd)))
        return out
