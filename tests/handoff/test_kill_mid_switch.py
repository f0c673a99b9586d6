"""kill -9 of the daemon in the middle of QEMU's switch (between two QMP commands of
it), then the next mount settles the handoff. corfs talks to QEMU through a relay on a unix
socket of the test's (it forwards QMP lines both ways); the relay holds corfs's command that
follows a chosen one and tells the test, which kills the daemon there. The settle at the next
mount must leave QEMU either wholly on DEST (finished) or wholly on MNT/IMAGE (undone); never
recorded finished with QEMU's disk still on the dead mount."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuse.util import image_status, live_status, wait_for
from tests.mounting import CorfsDirs, corfs_command, corfs_env, make_image

from .qemu import Qemu

MIB = 1 << 20


class Relay:
    """A unix socket at `path` relaying QMP to QEMU's socket `target`. Once a client has sent
    a line containing `after`, its next line is held (never forwarded) and `held` is set."""

    def __init__(self, path: str, target: str, after: str) -> None:
        self.path, self.target, self.after = path, target, after
        self.held = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(4)
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._armed = True

    def start(self) -> None:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            for args in ((upstream, client, False), (client, upstream, True)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        seen = False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not from_client:
                    dst.sendall(data)
                    continue
                # qemu.qmp sends each command in one piece (no newline after it), and
                # waits for the answer before the next one
                if seen and self._armed:
                    self._armed = False
                    self.held.set()
                    return  # held: never forwarded
                if self.after.encode() in data:
                    seen = True
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()


@contextlib.contextmanager
def relay(path: str, target: str, after: str) -> Iterator[Relay]:
    r = Relay(path, target, after)
    r.start()
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize(
    ("how", "after"),
    [
        ("drive", '"blockdev-mirror"'),  # the mirror job runs: killed before it is completed
        ("blockdev", '"blockdev-add"'),  # a node on DEST added, QEMU not yet re-pointed
        ("blockdev", '"blockdev-reopen"'),  # re-pointed, the old node not yet deleted
    ],
)
def test_kill9_between_two_qmp_commands_of_the_switch(
    tmp_dirs: CorfsDirs, tmp_path: Path, how: str, after: str
) -> None:
    base = make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=41)
    dest = tmp_path / "vm.raw"
    image = tmp_dirs.mnt / "disk.raw"
    relay_path = str(tmp_path / "relay.sock")
    with Qemu(tmp_path) as qemu, relay(relay_path, qemu.socket, after) as r:
        with tmp_dirs.mount() as m:
            wait_for(lambda: image_status(live_status(m.mnt), "disk.raw")["fill_ratio"] == 1.0,
                     30, "the stream to complete")
            if how == "drive":
                out = qemu.hmp(f"drive_add 0 if=none,id=drv0,format=raw,file={image}")
                assert "OK" in out, out
                dev = "drv0"
            else:
                qemu.qmp("blockdev-add", driver="file", filename=str(image),
                         **{"node-name": "f0"})
                qemu.qmp("blockdev-add", driver="raw", file="f0", **{"node-name": "d0"})
                dev = "d0"
            qemu.qemu_io(dev, "write -P 0x5c 1M 64k")
            qemu.qemu_io(dev, "flush")
            cli = subprocess.Popen(
                corfs_command("detach", m.mnt, "disk.raw", dest, "--qmp", relay_path),
                env=corfs_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            try:
                assert r.held.wait(60), m.log_tail()
                m.kill9()
            finally:
                cli.kill()
                cli.wait(10)
        with tmp_dirs.mount() as m:
            status = image_status(live_status(m.mnt), "disk.raw")
            nodes = qemu.file_nodes()
            jobs = qemu.qmp("query-block-jobs")
            listed = "disk.raw" in os.listdir(m.mnt)
            log = m.log_text()
            m.stop()
        if status["state"] == "detached":  # finished: QEMU wholly on DEST
            assert not listed
            assert str(image) not in nodes.values(), (nodes, jobs, log)
            assert str(dest) in nodes.values(), (nodes, log)
            assert not jobs, (jobs, log)
            qemu.qemu_io(dev, "write -P 0x6d 2M 64k")
            qemu.qemu_io(dev, "flush")
            want = bytearray(base.read_bytes())
            want[MIB : MIB + 65536] = b"\x5c" * 65536
            want[2 * MIB : 2 * MIB + 65536] = b"\x6d" * 65536
            assert dest.read_bytes() == bytes(want)
        else:  # undone: QEMU not on DEST, DEST gone
            assert str(dest) not in nodes.values(), (nodes, log)
            assert not dest.exists()
