"""A real VM boots from a corfs mount: while streaming, after streaming, and with BASE gone.

The test image (see build_image) sits in BASE as ``disk.raw``; QEMU/TCG opens
``MNT/disk.raw`` read-write. Each boot prints ``CORFS-MARKER boot=N ... prev=ok`` where N is a
counter kept in the image and ``prev=ok`` means the file the previous boot wrote reads back
intact: so the guest's writes survive QEMU exiting, corfs restarting and BASE being deleted.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import CorfsDirs, run_corfs
from tests.vm.build_image import VmArtifacts, copy_disk
from tests.vm.vmboot import BootResult, boot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

IMAGE = "disk.raw"
COMPLETE_TIMEOUT = 300.0


def image_status(mnt: Path) -> dict[str, Any]:
    """The first image's entry in `corfs status MNT --json`."""
    result = run_corfs("status", mnt, "--json")
    assert result.returncode == 0, f"corfs status failed: {result.stderr}"
    images = json.loads(result.stdout)["images"]
    assert images, f"corfs status lists no image: {result.stdout}"
    return images[0]


def is_complete(status: dict[str, Any]) -> bool:
    return status.get("state") == "complete" or float(status.get("fill_ratio", 0.0)) >= 1.0


def wait_complete(mnt: Path, timeout: float = COMPLETE_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status = image_status(mnt)
    while not is_complete(status):
        assert time.monotonic() < deadline, f"image not complete after {timeout:.0f}s: {status}"
        time.sleep(0.5)
        status = image_status(mnt)
    return status


def assert_boot(result: BootResult, artifacts: VmArtifacts, counter: int, prev: str = "ok"):
    assert result.tree_sum == artifacts.tree_sum, result.marker_line
    assert (result.boot_counter, result.prev_write, result.write) == (counter, prev, "ok"), (
        result.marker_line
    )


@pytest.fixture
def dirs(tmp_path: Path, vm_artifacts: VmArtifacts) -> CorfsDirs:
    dirs = CorfsDirs.under(tmp_path)
    copy_disk(vm_artifacts.disk, dirs.base / IMAGE)
    return dirs


def test_boot_while_streaming_then_without_base(dirs: CorfsDirs, vm_artifacts: VmArtifacts):
    disk = dirs.mnt / IMAGE
    # A slow stream, so that the first boots really race it; lifted once they are done.
    with dirs.mount("--bandwidth", "4M") as m:
        assert not is_complete(image_status(dirs.mnt))

        assert_boot(boot(disk, artifacts=vm_artifacts), vm_artifacts, 1, prev="none")
        assert_boot(boot(disk, artifacts=vm_artifacts), vm_artifacts, 2)

        lifted = run_corfs("stream", "bandwidth", dirs.mnt, "0")
        assert lifted.returncode == 0, lifted.stderr
        wait_complete(dirs.mnt)
        m.stop()

    # The cache now holds the whole image: BASE is no longer needed.
    (dirs.base / IMAGE).unlink()
    with dirs.mount() as m:  # boot 3 reads back boot 2's write: kept across the restart
        assert_boot(boot(disk, artifacts=vm_artifacts), vm_artifacts, 3)
        assert is_complete(image_status(dirs.mnt))
        m.stop()


def test_boot_with_cache_none(dirs: CorfsDirs, vm_artifacts: VmArtifacts):
    """cache=none: QEMU opens the image O_DIRECT through the mount."""
    disk = dirs.mnt / IMAGE
    with dirs.mount() as m:
        assert_boot(boot(disk, cache="none", artifacts=vm_artifacts), vm_artifacts, 1, "none")
        assert_boot(boot(disk, cache="none", artifacts=vm_artifacts), vm_artifacts, 2)
        m.stop()


def test_boot_through_qcow2_overlay(tmp_path: Path, dirs: CorfsDirs, vm_artifacts: VmArtifacts):
    """A qcow2 overlay outside MNT backed by MNT/disk.raw: reads go through corfs, writes not."""
    disk = dirs.mnt / IMAGE
    overlay = tmp_path / "overlay.qcow2"
    with dirs.mount() as m:
        # One boot on the raw image first, so the overlay starts from a written-to base.
        assert_boot(boot(disk, artifacts=vm_artifacts), vm_artifacts, 1, prev="none")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "raw",
             str(overlay)],
            check=True,
        )
        assert_boot(boot(overlay, fmt="qcow2", artifacts=vm_artifacts), vm_artifacts, 2)
        # The overlay's writes stayed in the overlay: the raw image still says boot 1.
        assert_boot(boot(disk, artifacts=vm_artifacts), vm_artifacts, 2)
        m.stop()
