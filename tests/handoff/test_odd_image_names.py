"""Image names with odd characters across a live handoff. QEMU's -drive escapes a comma
in a value as ",,": an image whose name ends with a comma is `file=MNT/disk,,,discard=...`.
corfs reads the options QMP does not report (discard, aio, locking) from QEMU's command line
(qemu_cmdline.py); they must follow the handoff whatever the image's name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuse.util import image_status, live_status, wait_for
from tests.mounting import CorfsDirs, make_image, run_corfs

from .qemu import Qemu

MIB = 1 << 20


@pytest.mark.parametrize("name", ["disk.raw", "disk,", "a,b,"])
def test_discard_unmap_follows_the_handoff_whatever_the_image_name(
    tmp_dirs: CorfsDirs, tmp_path: Path, name: str
) -> None:
    """Sequence: QEMU opens MNT/NAME with `-drive file=...,discard=unmap,node-name=d0`; the
    image is handed over; a discard through the new nodes must punch a hole in DEST (it does
    for disk.raw). For a name ending with a comma the option is lost: QEMU's default
    (discard=ignore) applies to the new nodes."""
    make_image(tmp_dirs.base / name, 8 * MIB, seed=31)
    dest = tmp_path / "vm.raw"
    with tmp_dirs.mount() as m:
        wait_for(lambda: image_status(live_status(m.mnt), name)["fill_ratio"] == 1.0,
                 30, "the stream to complete")
        escaped = str(m.mnt / name).replace(",", ",,")
        with Qemu(tmp_path, "-drive", f"file={escaped},discard=unmap,if=none,id=drv0,"
                  "format=raw,node-name=d0") as qemu:
            assert list(qemu.file_nodes().values()) == [str(m.mnt / name)]
            result = run_corfs("detach", m.mnt, name, dest, "--qmp", qemu.socket,
                               timeout=120)
            assert result.returncode == 0, result.stderr + m.log_tail()
            assert list(qemu.file_nodes().values()) == [str(dest)]
            qemu.qemu_io("drv0", "discard 7M 1M")
            qemu.qemu_io("drv0", "flush")
            fd = os.open(dest, os.O_RDONLY)
            try:
                assert os.lseek(fd, 7 * MIB, os.SEEK_HOLE) == 7 * MIB, "discard ignored"
            finally:
                os.close(fd)
        m.stop()
