"""A qcow2 overlay over MNT/IMAGE keeps opening after a live handoff: README ("Thick at full
speed") says its header is rewritten to name DEST, so that a restart of the VM opens DEST
rather than the mount. The header must keep naming the backing file's format (raw): a header
that says DEST is qcow2 makes every later open of the overlay fail ("Could not open backing
file: Image is not in qcow2 format"), so the VM cannot be started again, and it would read a
guest-written raw disk as qcow2 metadata. Real corfs mount, real QEMU (-machine none)."""

from __future__ import annotations

from pathlib import Path

from tests.mounting import CorfsDirs, make_image, run_corfs

from .overlays import assert_reads, backing_of, make_overlay
from .qemu import Qemu

MIB = 1 << 20


def test_an_overlay_still_opens_after_its_backing_file_is_handed_over(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=7)
    dest = tmp_path / "vm.raw"
    overlay = tmp_path / "overlay.qcow2"
    with tmp_dirs.mount() as m:
        image = m.mnt / "disk.raw"
        make_overlay(image, overlay)
        # As README's "Running VMs on corfs" runs a guest: a -drive with a node name.
        with Qemu(tmp_path, "-drive",
                  f"file={overlay},format=qcow2,if=none,id=d0,node-name=ov") as qemu:
            qemu.qemu_io("d0", "write -P 0x22 0 64k")
            result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket,
                               "--wait", timeout=120)
            assert result.returncode == 0, result.stderr + m.log_tail()
            qemu.qemu_io("d0", "flush")
        # QEMU is gone: what a restart of the VM reads from the overlay's header.
        assert backing_of(overlay) == (str(dest), "raw")
        assert_reads(overlay, "read -P 0x22 0 64k")


def test_a_header_job_left_over_in_qemu_does_not_stop_the_next_handoff(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    """Review: the header is written by a job of a fixed id, dismissed by corfs; one left in
    QEMU (a daemon killed between the job's start and its dismissal) made every later header
    write, and so every handoff of an overlay, fail with "Job ID already in use". Worse, QEMU
    7.2 drops a connection asked query-named-block-nodes while a concluded stream job is not
    dismissed: the handoff failed at its first question. It is dismissed first thing."""
    make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=8)
    dest = tmp_path / "vm.raw"
    overlay = tmp_path / "overlay.qcow2"
    with tmp_dirs.mount() as m:
        image = m.mnt / "disk.raw"
        make_overlay(image, overlay)
        with Qemu(tmp_path, "-drive",
                  f"file={overlay},format=qcow2,if=none,id=d0,node-name=ov") as qemu:
            nodes = qemu.qmp("query-named-block-nodes", flat=True)
            (backing,) = [n["node-name"] for n in nodes  # type: ignore[union-attr]
                          if n["drv"] == "raw" and n["file"] == str(image)]
            qemu.qmp("block-stream", **{"job-id": "corfs-backing", "device": "ov",
                                        "base-node": backing, "auto-dismiss": False})
            result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket,
                               "--wait", timeout=120)
            assert result.returncode == 0, result.stderr + m.log_tail()
            assert qemu.qmp("query-jobs") == []
        assert backing_of(overlay) == (str(dest), "raw")
