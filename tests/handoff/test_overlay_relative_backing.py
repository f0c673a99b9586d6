"""A qcow2 overlay whose header names MNT/IMAGE by a relative path (`qemu-img create -F raw
-b mnt/disk.raw overlay.qcow2` run beside MNT: QEMU resolves it against the overlay's
directory) must be rewritten to name DEST by a live handoff, like one with an absolute name
(README, "Thick at full speed": "A qcow2 overlay's header is rewritten to name DEST").

rename_backing compared the header's backing file name as written ("mnt/disk.raw") with the
absolute MNT/IMAGE and found no overlay to rewrite: the handoff succeeded, QEMU ran on DEST,
but the header still named the mount, where the image is no longer served (absent from MNT
after the handoff, and gone with the mount). The VM could not be started again: QEMU said
"Could not open backing file: Could not open '.../mnt/disk.raw': No such file or directory".
Real corfs mount, real QEMU (-machine none)."""

from __future__ import annotations

from pathlib import Path

from tests.mounting import CorfsDirs, make_image, run_corfs

from .overlays import assert_reads, backing_of, make_overlay
from .qemu import Qemu

MIB = 1 << 20


def test_an_overlay_naming_the_image_relatively_still_opens_after_the_handoff(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=17)
    dest = tmp_path / "vm.raw"
    overlay = tmp_path / "overlay.qcow2"
    assert tmp_dirs.mnt == tmp_path / "mnt"  # the relative name below is MNT/disk.raw
    with tmp_dirs.mount() as m:
        make_overlay("mnt/disk.raw", overlay, cwd=tmp_path)
        command_line = ["-drive", f"file={overlay},format=qcow2,if=none,id=d0,node-name=ov"]
        with Qemu(tmp_path, *command_line) as qemu:
            assert str(m.mnt / "disk.raw") in qemu.file_nodes().values()
            qemu.qemu_io("d0", "write -P 0x31 0 64k")
            result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket,
                               "--wait", timeout=120)
            assert result.returncode == 0, result.stderr + m.log_tail()
            assert str(m.mnt / "disk.raw") not in qemu.file_nodes().values()
            qemu.qemu_io("d0", "write -P 0x32 1m 64k")
            qemu.qemu_io("d0", "flush")
        # QEMU is gone; the VM is started again from the same command line (the overlay's).
        assert backing_of(overlay) == (str(dest), "raw")
        assert_reads(overlay, "read -P 0x31 0 64k", "read -P 0x32 1m 64k")
