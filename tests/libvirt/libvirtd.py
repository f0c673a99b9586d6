"""Debian's libvirtd and virtlogd, started by the tests as root without systemd.

How, and why this way (tried on Debian 12, libvirt 9.0):
- `libvirtd --config FILE` replaces only libvirtd.conf; the system daemon always reads
  /etc/libvirt/qemu.conf (there is no option or environment variable for it). Bind-mounting a
  private qemu.conf in a private mount namespace for libvirtd works for libvirt, but on a
  host whose mounts are private (no systemd making / shared, as here) that namespace never
  sees a FUSE mount made after libvirtd started, so a VM could not use one. So the settings
  QEMU-as-root needs are written to /etc/libvirt/qemu.conf for the session and the file's
  original bytes are put back at the end: `user`/`group` "+0" (the test's FUSE mounts are
  root's), `dynamic_ownership = 0` and `security_driver = "none"` (no chown/relabel of
  files on a FUSE mount or under pytest's tmp).
- libvirtd.conf is a private file (logs to our log file; the admin's listen/TLS settings do not
  matter), pid files are private; sockets are the system ones (/run/libvirt), since
  `qemu:///system` is what corfs's `--virsh` talks to.
- A libvirtd already answering at qemu:///system is not ours to reconfigure or stop: the
  session fails with that reason. Sessions on one machine take turns through a lock file.
- At the end every domain of our libvirtd is destroyed and undefined (all of them are the
  tests': it was not running before), then libvirtd and virtlogd are stopped by PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.servers import stop_process

URI = "qemu:///system"
LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LOCK_FILE = Path("/run/lock/corfs-tests-libvirtd.lock")
LOCK_TIMEOUT = 600.0
START_TIMEOUT = 90.0  # the first start probes QEMU's capabilities: ~8 s here, cached after

QEMU_SETTINGS = {
    "user": '"+0"',
    "group": '"+0"',
    "dynamic_ownership": "0",
    "security_driver": '"none"',
}


class LibvirtUnavailable(AssertionError):
    """libvirtd could not be run: the tests fail with the reason, never skip."""


@dataclass(frozen=True)
class Libvirt:
    uri: str
    log_dir: Path

    def virsh(
        self, *args: str, check: bool = True, timeout: float = 60.0, input_text: str | None = None
    ) -> str:
        """stdout of `virsh -c URI ARGS`; a failure raises with virsh's stderr."""
        done = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def domains(self, *, running_only: bool = False) -> list[str]:
        names = self.virsh("list", "--name", *(() if running_only else ("--all",)))
        return [name for name in names.splitlines() if name]

    def remove_domain(self, name: str) -> None:
        """Destroy (if running) and undefine `name`; quiet if it is already gone."""
        self.virsh("destroy", "--domain", name, check=False)
        self.virsh("undefine", "--domain", name, check=False)

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def qemu_conf_for_tests(original: str) -> str:
    """`original` with our settings: any active line setting one of them is commented out,
    and ours are appended in a marked block."""
    keys = "|".join(QEMU_SETTINGS)
    kept = [
        f"#corfs-tests# {line}" if re.match(rf"\s*({keys})\s*=", line) else line
        for line in original.splitlines()
    ]
    ours = [f"{key} = {value}" for key, value in QEMU_SETTINGS.items()]
    return "\n".join(
        [*kept, "# corfs tests (tests/libvirt/libvirtd.py), restored after", *ours, ""]
    )


@contextlib.contextmanager
def _session_lock() -> Iterator[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LibvirtUnavailable(
                        f"another test session held {LOCK_FILE} for {LOCK_TIMEOUT:g} s"
                    ) from None
                time.sleep(0.5)
        yield  # closing the file releases the lock


@contextlib.contextmanager
def _qemu_conf_set() -> Iterator[None]:
    original = QEMU_CONF.read_bytes()
    QEMU_CONF.write_text(qemu_conf_for_tests(original.decode()))
    try:
        yield
    finally:
        QEMU_CONF.write_bytes(original)


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise LibvirtUnavailable("the libvirt tests run libvirtd and need root")
    missing = [p for p in (LIBVIRTD, VIRTLOGD) if not os.access(p, os.X_OK)]
    missing += [t for t in ("virsh", "qemu-system-x86_64") if shutil.which(t) is None]
    if missing or not QEMU_CONF.exists():
        raise LibvirtUnavailable(
            f"missing {', '.join(missing) or QEMU_CONF}: run scripts/setup.sh "
            "(libvirt-daemon-system, libvirt-clients)"
        )


def _answers(libvirt: Libvirt) -> bool:
    return (
        subprocess.run(
            ["virsh", "-c", libvirt.uri, "version"], capture_output=True, timeout=30, check=False
        ).returncode
        == 0
    )


def _wait_ready(libvirt: Libvirt, daemons: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(libvirt):
        dead = [p.args[0] for p in daemons if p.poll() is not None]
        if dead:
            raise LibvirtUnavailable(f"{dead[0]} exited at start:\n{libvirt.log_tail()}")
        if time.monotonic() > deadline:
            raise LibvirtUnavailable(
                f"libvirtd did not answer in {START_TIMEOUT:g} s:\n{libvirt.log_tail()}"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def running_libvirt(work_dir: Path) -> Iterator[Libvirt]:
    """libvirtd + virtlogd for the tests, configured as the module docstring says, stopped
    with every domain removed at the end."""
    _check_prerequisites()
    libvirt = Libvirt(URI, work_dir)
    conf = work_dir / "libvirtd.conf"
    conf.write_text(f'log_outputs = "3:file:{work_dir / "libvirtd.log"}"\n')
    with _session_lock():
        if _answers(libvirt):
            raise LibvirtUnavailable(
                f"a libvirtd these tests did not start answers at {URI}: stop it first"
            )
        daemons: list[subprocess.Popen[bytes]] = []
        with _qemu_conf_set():
            try:
                for argv, log in (
                    ([VIRTLOGD, "--pid-file", str(work_dir / "virtlogd.pid")], "virtlogd"),
                    (
                        [LIBVIRTD, "--config", str(conf), "--pid-file", str(work_dir / "pid")],
                        "libvirtd-stderr",
                    ),
                ):
                    with open(work_dir / f"{log}.log", "ab") as out:
                        daemons.append(
                            subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
                        )
                _wait_ready(libvirt, daemons)
                yield libvirt
            finally:
                if daemons and daemons[-1].poll() is None and _answers(libvirt):
                    for name in libvirt.domains():
                        libvirt.remove_domain(name)
                for daemon in reversed(daemons):
                    stop_process(daemon)
