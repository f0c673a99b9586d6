"""QEMU 7.2 aborts (qemu_mutex_unlock_impl: Operation not permitted), killing the VM, when a
drive on an I/O thread (-object iothread, virtio-blk-pci,iothread=...) has its file node
replaced by blockdev-reopen: with plain files too, no corfs (configurations hunt). corfs
refuses such a handoff before it touches QEMU, in one line; the VM runs on, on the mount. A
-drive without a node name is switched by a mirror instead, which QEMU carries out on the
I/O thread: handed over. Real corfs mount, real QEMU (q35, TCG)."""

from __future__ import annotations

from pathlib import Path

from tests.fuse.util import assert_one_line_error, image_status, live_status
from tests.mounting import CorfsDirs, make_image, run_corfs

from .qemu import Qemu

MIB = 1 << 20


def _on_an_iothread(drive: str) -> tuple[str, ...]:
    return ("-machine", "q35", "-object", "iothread,id=io0", "-drive", drive,
            "-device", "virtio-blk-pci,drive=d0,iothread=io0")


def test_a_named_drive_on_an_iothread_is_not_reopened(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=41)
    dest = tmp_path / "vm.raw"
    with tmp_dirs.mount() as m:
        image = m.mnt / "disk.raw"
        drive = f"file={image},format=raw,if=none,id=d0,node-name=n0,cache=none"
        with Qemu(tmp_path, *_on_an_iothread(drive)) as qemu:
            qemu.qemu_io("d0", "write -P 0x51 0 64k")
            result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket,
                               "--wait", timeout=120)
            assert_one_line_error(result, "I/O thread")
            assert not dest.exists()
            assert qemu.qmp("query-status")["status"] == "running"  # type: ignore[index]
            assert list(qemu.file_nodes().values()) == [str(image)]
            qemu.qemu_io("d0", "write -P 0x52 64k 64k")
            qemu.qemu_io("d0", "read -P 0x51 0 64k")
            assert image_status(live_status(m.mnt), "disk.raw")["state"] == "complete"
        m.stop()


def test_a_drive_without_a_node_name_on_an_iothread_is_handed_over(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=43)
    dest = tmp_path / "vm.raw"
    with tmp_dirs.mount() as m:
        image = m.mnt / "disk.raw"
        with Qemu(tmp_path, *_on_an_iothread(f"file={image},format=raw,if=none,id=d0")) as qemu:
            qemu.qemu_io("d0", "write -P 0x53 0 64k")
            result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket,
                               "--wait", timeout=120)
            assert result.returncode == 0, result.stderr + m.log_tail()
            assert list(qemu.file_nodes().values()) == [str(dest)]
            qemu.qemu_io("d0", "read -P 0x53 0 64k")
        m.stop()
