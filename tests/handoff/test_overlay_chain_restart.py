"""A read-only qcow2 overlay over MNT/IMAGE must name DEST after a live handoff too, or the VM
cannot be started again. The commonest read-only overlay is the middle of a chain (an external
snapshot: base raw on MNT <- snap1.qcow2 <- top.qcow2): QEMU opens every backing node
read-only, and it is snap1's header that names MNT/IMAGE. A `-drive ...,readonly=on` over an
overlay is another.

rename_backing skipped an overlay whose node was read-only ("its header still names ... (a
restart would open that)", a log warning only), yet `corfs detach` exited 0: after it the header
named the mount, where the image is no longer served, and every later open of the chain failed
("Could not open backing file: Could not open '.../mnt/disk.raw': No such file or
directory"): `qemu-img check`, `qemu-io`, and a VM started again from the same command line
(libvirt too: it reads the chain from the headers at start). README ("Thick at full speed"):
"A qcow2 overlay's header is rewritten to name DEST"; a restart boots DEST.
Real corfs mount, real QEMU (-machine none)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.mounting import CorfsDirs, make_image, run_corfs

from .overlays import assert_reads, backing_of, make_overlay
from .qemu import Qemu

MIB = 1 << 20


def test_the_middle_of_an_overlay_chain_names_dest_after_the_handoff(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=23)
    dest = tmp_path / "vm.raw"
    snap1, top = tmp_path / "snap1.qcow2", tmp_path / "top.qcow2"
    with tmp_dirs.mount() as m:
        image = m.mnt / "disk.raw"
        make_overlay(image, snap1, "raw")
        make_overlay(snap1, top, "qcow2")
        # The chain written out node by node, as libvirt starts it (every node named).
        with Qemu(
            tmp_path,
            "-blockdev", f"driver=file,filename={image},node-name=base-f,read-only=on",
            "-blockdev", "driver=raw,file=base-f,node-name=base,read-only=on",
            "-blockdev", f"driver=file,filename={snap1},node-name=snap1-f,read-only=on",
            "-blockdev", "driver=qcow2,file=snap1-f,backing=base,node-name=snap1,read-only=on",
            "-blockdev", f"driver=file,filename={top},node-name=top-f",
            "-blockdev", "driver=qcow2,file=top-f,backing=snap1,node-name=top",
        ) as qemu:
            qemu.qemu_io("top", "write -P 0x41 0 64k")
            result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket,
                               "--wait", timeout=120)
            assert result.returncode == 0, result.stderr + m.log_tail()
            assert str(image) not in qemu.file_nodes().values()
            # snap1's file node was reopened read-write for its header, then as it was.
            nodes = {n["node-name"]: n for n in qemu.qmp("query-named-block-nodes", flat=True)}
            assert nodes["snap1-f"]["ro"] and nodes["snap1"]["ro"]
            qemu.qemu_io("top", "write -P 0x42 1m 64k")
            qemu.qemu_io("top", "flush")
        # QEMU is gone: what opening the chain again (a restart) finds in the headers.
        assert backing_of(top) == (str(snap1), "qcow2")
        assert backing_of(snap1) == (str(dest), "raw")
        checked = subprocess.run(["qemu-img", "check", top], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert_reads(top, "read -P 0x41 0 64k", "read -P 0x42 1m 64k")


def test_a_read_only_drive_on_an_overlay_still_opens_after_the_handoff(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=29)
    dest = tmp_path / "vm.raw"
    overlay = tmp_path / "overlay.qcow2"
    with tmp_dirs.mount() as m:
        image = m.mnt / "disk.raw"
        make_overlay(image, overlay, "raw")
        written = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x43 0 64k",
                                  overlay], capture_output=True, text=True)
        assert written.returncode == 0 and "fail" not in written.stdout, written.stderr
        with Qemu(tmp_path, "-drive", f"file={overlay},format=qcow2,if=none,id=d0,"
                  "node-name=ov,readonly=on") as qemu:
            qemu.qemu_io("d0", "read -P 0x43 0 64k")
            result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket,
                               "--wait", timeout=120)
            assert result.returncode == 0, result.stderr + m.log_tail()
            assert str(image) not in qemu.file_nodes().values()
            qemu.qemu_io("d0", "read -P 0x43 0 64k")
        # Started again from the same command line: QEMU opens the overlay's backing file.
        assert backing_of(overlay) == (str(dest), "raw")
        assert_reads(overlay, "read -P 0x43 0 64k")
