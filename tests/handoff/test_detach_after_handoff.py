"""`corfs detach CACHE IMAGE DEST` (the offline copy) of an image that a live handoff gave to
QEMU: `corfs status CACHE` lists the image as `detached` with its `detached_to`, so the copy
must say that (it was handed over, to which file), not that CACHE has no such image, which
sends an admin looking for a lost image. Real corfs mount, real QEMU (-machine none)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fuse.util import assert_one_line_error, image_status
from tests.mounting import CorfsDirs, make_image, run_corfs

from .qemu import Qemu

MIB = 1 << 20


def test_copying_out_a_handed_over_image_names_its_handoff(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=5)
    dest = tmp_path / "vm.raw"
    with tmp_dirs.mount() as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=d0,format=raw,node-name=n0"
    ) as qemu:
        result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket, "--wait",
                           timeout=120)
        assert result.returncode == 0, result.stderr + m.log_tail()
        m.stop()
    status = run_corfs("status", tmp_dirs.cache, "--json", check=True)
    assert image_status(json.loads(status.stdout), "disk.raw")["detached_to"] == str(dest)
    copy = run_corfs("detach", tmp_dirs.cache, "disk.raw", tmp_path / "copy.raw")
    line = assert_one_line_error(copy, str(dest))
    assert "has no image" not in line, line
    assert not (tmp_path / "copy.raw").exists()
    verify = run_corfs("verify", tmp_dirs.cache, "disk.raw")  # the same for a check of it
    assert "has no image" not in assert_one_line_error(verify, str(dest))
