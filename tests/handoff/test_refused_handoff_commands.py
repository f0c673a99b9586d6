"""A handoff command the daemon refuses for an image (malformed, or a second one) must leave
the status of a handoff of that image under way or done alone. Its reason went to the image's
`handoff_error` (hunt), and a detached image with a `handoff_error` means "QEMU's switch
could not be confirmed" (README): the CLI of the handoff that did succeed exited 1, and the
status of a confirmed handoff said it was not confirmed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from corfs.control_client import _wait_handoff, send_command
from corfs.errors import CorfsError
from corfs.handoff import STALL_ENV
from tests.fuse.util import image_status, live_status, wait_for
from tests.mounting import CorfsDirs, corfs_command, corfs_env, make_image, run_corfs

from .qemu import Qemu

MIB = 1 << 20


def _qemu_on_the_image(qemu: Qemu, image: Path) -> None:
    qemu.qmp("blockdev-add", driver="file", filename=str(image), **{"node-name": "f0"})
    qemu.qmp("blockdev-add", driver="raw", file="f0", **{"node-name": "d0"})
    qemu.qemu_io("d0", "write -P 0x5c 1M 64k")


def test_a_bad_handoff_command_during_a_handoff_does_not_fail_the_one_under_way(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    """Sequence: `corfs detach --qmp` runs (held while QEMU is being switched); meanwhile a
    malformed handoff command for the same image (neither qmp nor virsh) is refused. The first
    handoff then succeeds (QEMU on DEST, image detached): its CLI must say so and exit 0, and
    the status must carry no handoff_error."""
    make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=21)
    dest = tmp_path / "vm.raw"
    with Qemu(tmp_path) as qemu, tmp_dirs.mount(env={STALL_ENV: "switching"}) as m:
        wait_for(lambda: image_status(live_status(m.mnt), "disk.raw")["fill_ratio"] == 1.0,
                 30, "the stream to complete")
        _qemu_on_the_image(qemu, m.mnt / "disk.raw")
        cli = subprocess.Popen(
            corfs_command("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket),
            env=corfs_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            wait_for(lambda: "handoff pausing at switching" in m.log_text(), 30,
                     "the switch to begin")
            with pytest.raises(CorfsError):  # refused: no --qmp nor --virsh
                send_command(str(m.mnt), {"op": "handoff", "image": "disk.raw",
                                          "dest": str(tmp_path / "other.raw")})
            out, err = cli.communicate(timeout=90)
        finally:
            cli.kill()
            cli.wait(10)
        assert list(qemu.file_nodes().values()) == [str(dest)]  # the handoff did succeed
        status = image_status(live_status(m.mnt), "disk.raw")
        assert status["state"] == "detached" and status["detached_to"] == str(dest)
        assert cli.returncode == 0, (out, err)
        assert status["handoff_error"] is None, status
        m.stop()


def test_a_second_handoff_refused_after_the_first_leaves_its_success_alone(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    """Sequence: `corfs detach --qmp` succeeds; a second handoff of the image (a racing
    `corfs detach` to another DEST whose CLI checks passed before the first ended) reaches
    the daemon and is refused. The first CLI, if it polls the status after that (it polls
    every 0.1 s), must still see its success; the status of the confirmed handoff must not
    say it was unconfirmed."""
    make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=22)
    dest = tmp_path / "vm.raw"
    with Qemu(tmp_path) as qemu, tmp_dirs.mount() as m:
        wait_for(lambda: image_status(live_status(m.mnt), "disk.raw")["fill_ratio"] == 1.0,
                 30, "the stream to complete")
        _qemu_on_the_image(qemu, m.mnt / "disk.raw")
        result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket,
                           timeout=120)
        assert result.returncode == 0, result.stderr + m.log_tail()
        assert image_status(live_status(m.mnt), "disk.raw")["handoff_error"] is None
        with pytest.raises(CorfsError):
            send_command(str(m.mnt), {"op": "handoff", "image": "disk.raw",
                                      "dest": str(tmp_path / "other.raw"),
                                      "qmp": qemu.socket})
        assert not (tmp_path / "other.raw").exists()
        status = image_status(live_status(m.mnt), "disk.raw")
        assert status["state"] == "detached" and status["detached_to"] == str(dest)
        # The first CLI's next poll (control_client._wait_handoff) sees its handoff done.
        _wait_handoff(str(m.mnt), "disk.raw", str(dest))
        assert status["handoff_error"] is None, status
        m.stop()
