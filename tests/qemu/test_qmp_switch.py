"""Issue 11, points 3 and 5, QEMU side: corfs.qmp_switch re-points a running QEMU (7.2,
`-machine none`, block nodes without devices) from OLD to NEW over QMP, keeps the options
QEMU reports, and undoes everything when a step fails.

OLD and NEW are two files (a copy made just before the switch), not two hard links: QEMU's
image locks are OFD locks on the inode, and in production OLD (the FUSE file) and NEW (the
cache's data file) are different inodes too. NEW gets a marker only it holds, so a read of
the marker through QEMU proves QEMU reads NEW; a write after the switch must land in NEW only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corfs.errors import NoNodesOnPath, QmpError, SwitchFailed
from corfs.qmp_switch import (
    Monitor,
    SocketMonitor,
    connect_socket,
    nodes_on,
    plan_switch,
    switch,
)
from tests.handoff.qemu import new_log_text

MIB = 1024 * 1024
SIZE = 4 * MIB
MARK_OFFSET = 2 * MIB  # NEW alone holds 0x4e here
MARK = b"\x4e" * 65536


_STDOUT_OF: weakref.WeakKeyDictionary[Monitor, Path] = weakref.WeakKeyDictionary()


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    monitor: SocketMonitor


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # unix socket paths must stay under 108 bytes; pytest's tmp_path may not
    path = Path(tempfile.mkdtemp(prefix="qmp", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qemu(sock_dir: Path) -> Iterator[Callable[..., Qemu]]:
    started: list[Qemu] = []

    def start(*args: str) -> Qemu:
        sock = sock_dir / f"q{len(started)}.sock"
        cmd = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]
        cmd += ["-qmp", f"unix:{sock},server=on,wait=off", *args]
        log = sock_dir / f"q{len(started)}.out"  # qemu-io's output (see qemu_io)
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"QEMU did not start: {proc.communicate()[1].decode()}")
            time.sleep(0.02)
        try:
            while True:  # QEMU binds its socket before it listens: refused in between
                try:
                    monitor = connect_socket(str(sock), timeout=10)
                    break
                except QmpError as exc:
                    if "refused" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        except BaseException:
            proc.kill()  # not in `started` yet: nothing else would stop it
            proc.wait()
            raise
        q = Qemu(proc, monitor)
        _STDOUT_OF[monitor] = log
        started.append(q)
        return q

    try:
        yield start
    finally:
        for q in started:
            with contextlib.suppress(QmpError):
                q.monitor.close()
            q.proc.kill()
            q.proc.wait()


def qemu_io(monitor: Monitor, target: str, command: str) -> None:
    """HMP answers "" and QEMU prints qemu-io's output on its stdout (hunt: a failed write
    or a `read -P` that found other bytes passed here): read there."""
    log = _STDOUT_OF[monitor]
    start = log.stat().st_size
    out = monitor.command(
        "human-monitor-command", {"command-line": f'qemu-io {target} "{command}"'}
    )
    assert isinstance(out, str)
    out += new_log_text(log, start)
    assert "fail" not in out.lower() and "error" not in out.lower() and "only" not in out, out


def node_infos(monitor: Monitor, path: str) -> list[tuple]:
    """What must survive the switch, per node on `path` (file and format nodes)."""
    infos = monitor.command("query-named-block-nodes", {"flat": True})
    return sorted(
        (i["drv"], i["ro"], i["cache"]["direct"], i["cache"]["no-flush"], i["detect_zeroes"])
        for i in infos  # type: ignore[union-attr]
        if i["file"] == path
    )


def named_infos(monitor: Monitor) -> dict[str, tuple]:
    infos = monitor.command("query-named-block-nodes", {"flat": True})
    return {
        i["node-name"]: (i["drv"], i["ro"], i["cache"], i["detect_zeroes"])
        for i in infos  # type: ignore[union-attr]
        if not i["node-name"].startswith("#")
    }


def open_files(proc: subprocess.Popen[bytes]) -> set[str]:
    fds = Path(f"/proc/{proc.pid}/fd")
    links = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            links.add(os.readlink(fd))
    return links


def make_files(tmp_path: Path) -> tuple[str, str]:
    old = tmp_path / "old.raw"
    old.write_bytes(os.urandom(SIZE))
    return str(old), str(tmp_path / "new.raw")


def copy_with_mark(old: str, new: str) -> None:
    shutil.copyfile(old, new)
    with open(new, "r+b") as f:
        f.seek(MARK_OFFSET)
        f.write(MARK)


CASES = {
    # name: (args with OLD/OV, qemu-io target, writable)
    "drive-cache-none": (["-drive", "file=OLD,format=raw,cache=none,if=none,id=d0"], "d0", True),
    "drive-writeback": (
        ["-drive", "file=OLD,format=raw,cache=writeback,if=none,id=d0,detect-zeroes=on"],
        "d0",
        True,
    ),
    "drive-read-only": (["-drive", "file=OLD,format=raw,if=none,id=d0,readonly=on"], "d0", False),
    "blockdev": (
        [
            "-blockdev",
            "driver=file,node-name=f0,filename=OLD,cache.direct=on,discard=unmap",
            "-blockdev",
            "driver=raw,node-name=r0,file=f0,cache.direct=on,discard=unmap,detect-zeroes=unmap",
        ],
        "r0",
        True,
    ),
    "blockdev-read-only": (
        [
            "-blockdev",
            "driver=file,node-name=f0,filename=OLD,read-only=on",
            "-blockdev",
            "driver=raw,node-name=r0,file=f0,read-only=on,cache.no-flush=on",
        ],
        "r0",
        False,
    ),
    "qcow2-blockdev": (
        [
            "-blockdev",
            "driver=file,node-name=f0,filename=OLD,read-only=on",
            "-blockdev",
            "driver=raw,node-name=b0,file=f0,read-only=on",
            "-blockdev",
            "driver=file,node-name=of,filename=OV",
            "-blockdev",
            "driver=qcow2,node-name=ov,file=of,backing=b0",
        ],
        "ov",
        True,
    ),
    "qcow2-drive-named": (
        ["-drive", "file=OV,format=qcow2,if=none,id=d0,node-name=ov,cache=none"],
        "d0",
        True,
    ),
    "several": (
        [
            "-blockdev",
            "driver=file,node-name=f0,filename=OLD",
            "-blockdev",
            "driver=raw,node-name=r0,file=f0",
            "-blockdev",
            "driver=raw,node-name=r1,file=f0,detect-zeroes=on",
            "-drive",
            "file=OLD,format=raw,cache=none,if=none,id=d0,node-name=n0",
            "-drive",
            "file=OLD,format=raw,if=none,id=d1,readonly=on,node-name=n1",
            "-blockdev",
            "driver=file,node-name=f1,filename=OLD,read-only=on",
            "-blockdev",
            "driver=raw,node-name=r2,file=f1,read-only=on",
        ],
        "r0",
        True,
    ),
}


def start_case(qemu: Callable[..., Qemu], tmp_path: Path, name: str) -> tuple[Qemu, str, str]:
    old, new = make_files(tmp_path)
    overlay = str(tmp_path / "ov.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", old, "-F", "raw", overlay], check=True
    )
    args = [a.replace("OLD", old).replace("OV", overlay) for a in CASES[name][0]]
    return qemu(*args), old, new


@pytest.mark.parametrize("case", list(CASES))
def test_switch_moves_every_node_and_keeps_options(qemu, tmp_path, case):
    q, old, new = start_case(qemu, tmp_path, case)
    _, target, writable = CASES[case]
    mon = q.monitor
    if writable:
        qemu_io(mon, target, "write -P 0xab 0 64k")
    infos_before = node_infos(mon, old)
    named_before = named_infos(mon)
    assert nodes_on(mon, old)
    copy_with_mark(old, new)

    switch(mon, plan_switch(mon, old, new))

    assert nodes_on(mon, old) == []
    assert node_infos(mon, new) == infos_before
    assert old not in open_files(q.proc) and new in open_files(q.proc)
    for name, info in named_infos(mon).items():  # kept nodes kept their options
        if name in named_before and not name.startswith("corfs"):
            assert info == named_before[name], name
    qemu_io(mon, target, f"read -P 0x4e {MARK_OFFSET} 64k")  # reads come from NEW
    if writable:
        qemu_io(mon, target, "read -P 0xab 0 64k")
        qemu_io(mon, target, "write -P 0xcd 1M 64k")
        qemu_io(mon, target, "read -P 0xcd 1M 64k")
        qemu_io(mon, target, "flush")
        if "qcow2" not in case:  # the overlay takes the writes
            assert Path(new).read_bytes()[MIB : MIB + 65536] == b"\xcd" * 65536
            assert Path(old).read_bytes()[MIB : MIB + 65536] != b"\xcd" * 65536


class FailingMonitor:
    """The real monitor, but the n-th `name` command fails as QEMU would refuse it."""

    def __init__(self, monitor: Monitor, name: str, n: int) -> None:
        self.monitor, self.name, self.left = monitor, name, n

    def command(self, name: str, arguments: dict | None = None) -> object:
        if name == self.name:
            self.left -= 1
            if self.left == 0:
                raise QmpError(f"injected refusal of {name}")
        return self.monitor.command(name, arguments)


def assert_back_on_old(q: Qemu, old: str, new: str, before: list, named_before: dict) -> None:
    mon = q.monitor
    assert node_infos(mon, old) == before
    assert node_infos(mon, new) == []
    assert new not in open_files(q.proc)
    after = named_infos(mon)
    assert {k: v for k, v in after.items() if not k.startswith("corfs")} == named_before


@pytest.mark.parametrize(
    "case, command, n",
    [
        ("several", "blockdev-reopen", 2),  # the first reopen is undone
        ("several", "blockdev-reopen", 4),
        ("several", "blockdev-del", 2),  # the first deleted node comes back
        ("drive-cache-none", "blockdev-mirror", 1),
        ("drive-cache-none", "block-job-complete", 1),  # the mirror is cancelled
        ("blockdev", "blockdev-del", 1),  # the last step: the reopen is undone
        ("qcow2-drive-named", "blockdev-reopen", 1),
    ],
)
def test_failed_step_rolls_back(qemu, tmp_path, case, command, n):
    q, old, new = start_case(qemu, tmp_path, case)
    before, named_before = node_infos(q.monitor, old), named_infos(q.monitor)
    copy_with_mark(old, new)
    plan = plan_switch(q.monitor, old, new)
    with pytest.raises(SwitchFailed, match=f"injected refusal of {command}"):
        switch(FailingMonitor(q.monitor, command, n), plan)
    assert_back_on_old(q, old, new, before, named_before)
    qemu_io(q.monitor, CASES[case][1], "write -P 0x11 3M 64k")  # still works, on OLD
    qemu_io(q.monitor, CASES[case][1], "flush")
    if "qcow2" not in case:
        assert Path(old).read_bytes()[3 * MIB : 3 * MIB + 65536] == b"\x11" * 65536


def test_new_missing_is_refused_and_nothing_changes(qemu, tmp_path):
    q, old, new = start_case(qemu, tmp_path, "several")
    before, named_before = node_infos(q.monitor, old), named_infos(q.monitor)
    with pytest.raises(SwitchFailed, match="No such file"):
        switch(q.monitor, plan_switch(q.monitor, old, new))  # NEW was never made
    assert_back_on_old(q, old, new, before, named_before)


def test_unnamed_drive_beside_other_nodes_is_refused(qemu, tmp_path):
    q, old, new = start_case(qemu, tmp_path, "blockdev-read-only")
    q.monitor.command(
        "human-monitor-command",
        {"command-line": f"drive_add 0 file={old},if=none,id=d9,format=raw,readonly=on"},
    )
    with pytest.raises(NoNodesOnPath, match="node-name=NAME"):
        plan_switch(q.monitor, old, new)


def test_no_node_on_old(qemu, tmp_path):
    q, old, new = start_case(qemu, tmp_path, "drive-cache-none")
    with pytest.raises(NoNodesOnPath, match="no block node on"):
        plan_switch(q.monitor, str(tmp_path / "other.raw"), new)


def test_auto_named_overlay_is_refused_with_the_way_out(qemu, tmp_path):
    q, old, new = start_case(qemu, tmp_path, "drive-cache-none")
    overlay = str(tmp_path / "ov2.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", old, "-F", "raw", overlay], check=True
    )
    with pytest.raises(NoNodesOnPath, match="node-name"):
        q.monitor.command(
            "human-monitor-command", {"command-line": f"drive_add 0 file={overlay},if=none,id=d9"}
        )
        plan_switch(q.monitor, old, new)


def test_no_socket(sock_dir):
    with pytest.raises(QmpError, match="no QMP socket there"):
        connect_socket(str(sock_dir / "absent.sock"), timeout=2)


def test_socket_nobody_listens(sock_dir):
    path = sock_dir / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody accepts
    with pytest.raises(QmpError, match="refused"):
        connect_socket(str(path), timeout=2)


@pytest.mark.parametrize("reply", [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"", None])
def test_socket_not_qmp(sock_dir, reply):
    path = sock_dir / "other.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            if reply is not None:
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_WR)
            time.sleep(3)  # reply None: say nothing at all

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(QmpError, match="not a QEMU QMP socket|no answer"):
            connect_socket(str(path), timeout=1)
    finally:
        server.close()
