"""Boot the test VM (see build_image) once under QEMU/TCG and parse its marker line.

One boot runs the guest workload (tree checksum, check of the previous boot's write, a new
write + sync + read-back, boot counter + 1) and powers off. The caller gets a
:class:`BootResult`; QEMU is killed by its own PID if the marker or the power-off does not
come within ``timeout`` seconds, and :class:`BootError` carries the console text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.vm.build_image import VmArtifacts, build_test_image

log = logging.getLogger(__name__)

MARKER_RE = re.compile(
    r"CORFS-MARKER boot=(?P<boot>\d+) sum=(?P<sum>[0-9a-f]{64}) "
    r"prev=(?P<prev>\w+) write=(?P<write>\w+)"
)
KILL_WAIT = 30.0
FAIL_RE = re.compile(r"CORFS-INITRAMFS-FAIL .*|Kernel panic.*")


@dataclasses.dataclass(frozen=True)
class BootResult:
    marker_line: str
    boot_counter: int
    tree_sum: str
    prev_write: str  # ok | none | missing | bad: the previous boot's file, read back
    write: str  # ok | bad: this boot's file, read back after sync + drop_caches
    seconds: float
    console_text: str
    marker_seconds: float | None = None  # from QEMU's start to the marker line on the console


class BootError(AssertionError):
    def __init__(self, message: str, console_text: str) -> None:
        tail = "\n".join(console_text.splitlines()[-40:])
        super().__init__(f"{message}\n--- console (last 40 lines) ---\n{tail}")
        self.console_text = console_text


def qemu_command(
    disk_path: Path,
    artifacts: VmArtifacts,
    *,
    cache: str = "writeback",
    fmt: str = "raw",
    memory_mib: int = 512,
    append: str = "",
) -> list[str]:
    """``append``: more kernel command-line words (e.g. the guest's ``corfs.loop=N``)."""
    drive = f"file={disk_path},format={fmt},if=virtio,cache={cache}"
    # fmt: off
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-m", str(memory_mib),
        "-nodefaults",
        "-display", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(artifacts.kernel),
        "-initrd", str(artifacts.initrd),
        "-append", f"{artifacts.append_line()} {append}".rstrip(),
        "-drive", drive,
    ]
    # fmt: on


def boot(
    disk_path: Path | str,
    *,
    cache: str = "writeback",
    fmt: str = "raw",
    timeout: float = 180.0,
    artifacts: VmArtifacts | None = None,
    on_marker: Callable[[], None] | None = None,
) -> BootResult:
    """Boot ``disk_path`` once; return after QEMU exits (the guest powers itself off).

    ``on_marker`` runs on the console reader thread the moment the marker line arrives, while
    the guest still runs (e.g. to sample the host side's state at that instant).
    """
    artifacts = artifacts or build_test_image()
    cmd = qemu_command(Path(disk_path), artifacts, cache=cache, fmt=fmt)
    log.info("boot: %s", " ".join(cmd))
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    chunks: list[bytes] = []
    marker_at: list[float] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            chunks.append(line)
            if not marker_at and b"CORFS-MARKER" in line:
                marker_at.append(time.monotonic() - start)
                if on_marker is not None:
                    try:
                        on_marker()
                    except Exception:  # a failing probe must not stop the console reader
                        log.exception("boot: on_marker failed")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by PID
        # A read stuck in a hung FUSE daemon still yields to SIGKILL; bound the wait anyway.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(KILL_WAIT)
        reader.join(5)
        text = console_text(chunks)
        raise BootError(f"VM did not power off within {timeout:.0f}s", text) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(KILL_WAIT)
    reader.join(5)
    seconds = time.monotonic() - start
    return parse_result(
        console_text(chunks), proc.returncode, seconds, marker_at[0] if marker_at else None
    )


def parse_result(
    text: str, returncode: int | None, seconds: float, marker_seconds: float | None = None
) -> BootResult:
    """The :class:`BootResult` of a finished boot's console ``text``; BootError if no marker."""
    match = MARKER_RE.search(text)
    if match is None:
        failure = FAIL_RE.search(text)
        why = failure.group(0) if failure else f"qemu exit status {returncode}"
        raise BootError(f"no CORFS-MARKER line ({why})", text)
    log.info("boot: %s in %.1fs", match.group(0), seconds)
    return BootResult(
        marker_line=match.group(0),
        boot_counter=int(match.group("boot")),
        tree_sum=match.group("sum"),
        prev_write=match.group("prev"),
        write=match.group("write"),
        seconds=seconds,
        console_text=text,
        marker_seconds=marker_seconds,
    )


def console_text(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
