"""The QMP connection drops in the middle of QEMU's switch while QEMU itself lives on (a
relay between corfs and QEMU's socket closes it just before corfs's blockdev-reopen: QEMU has
a new node on DEST but was never re-pointed). corfs asked QEMU on that connection only, could
not tell, and finished the handoff "unconfirmed" (hunt): the image was no longer served, and
QEMU, still on MNT/IMAGE, got ESTALE for every I/O of the guest's disk. It asks again on a new
connection now, after deleting the nodes the cut switch added: the handoff fails, undone."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.fuse.util import image_status, live_status, wait_for
from tests.mounting import CorfsDirs, corfs_command, corfs_env, make_image

from .qemu import Qemu
from .test_kill_mid_switch import relay

MIB = 1 << 20


def test_a_qmp_connection_dropped_before_the_reopen_leaves_qemu_on_a_served_image(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=61)
    dest = tmp_path / "vm.raw"
    relay_path = str(tmp_path / "relay.sock")
    with Qemu(tmp_path) as qemu, relay(relay_path, qemu.socket, '"blockdev-add"') as r, \
            tmp_dirs.mount() as m:
        image = m.mnt / "disk.raw"
        wait_for(lambda: image_status(live_status(m.mnt), "disk.raw")["fill_ratio"] == 1.0,
                 30, "the stream to complete")
        qemu.qmp("blockdev-add", driver="file", filename=str(image), **{"node-name": "f0"})
        qemu.qmp("blockdev-add", driver="raw", file="f0", **{"node-name": "d0"})
        qemu.qemu_io("d0", "write -P 0x5c 1M 64k")
        cli = subprocess.run(
            corfs_command("detach", m.mnt, "disk.raw", dest, "--qmp", relay_path),
            env=corfs_env(), capture_output=True, text=True, timeout=120,
        )
        assert r.held.is_set()  # the connection was dropped mid-switch
        assert cli.returncode != 0  # whatever it says, no success
        nodes = qemu.qmp("query-named-block-nodes", flat=True)
        d0 = next(n for n in nodes if n["node-name"] == "d0")
        assert d0["image"]["filename"] == str(image)  # QEMU's disk never left the mount
        # ... so the mount must still serve it: the guest's I/O goes on.
        # (qemu-io's HMP output goes to QEMU's stdout: its log)
        qemu.hmp('qemu-io d0 "write -P 0x6d 2M 64k"')
        status = image_status(live_status(m.mnt), "disk.raw")
        said = wait_for(lambda: [line for line in qemu.log.read_text().splitlines()
                                 if "2097152" in line or "failed" in line], 10, "qemu-io")
        assert said == ["wrote 65536/65536 bytes at offset 2097152"], (said, status, cli.stderr)
        m.stop()
