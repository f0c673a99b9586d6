"""Issue 11's booted-guest proof: a guest doing checksummed I/O is handed over from the corfs
mount to DEST by `corfs detach --qmp --wait` without noticing, and boots again from DEST.

The test VM (see build_image) boots from ``MNT/disk.raw`` (cache=none: O_DIRECT through the
mount) with ``corfs.loop=``, so its init writes 256 KiB of fresh random data per round
(O_DIRECT + fsync), reads it back O_DIRECT and prints ``CORFS-LOOP i=N ok`` until told "stop"
on its serial console. `corfs detach` starts while the stream is still throttled, so it has to
wait for it while the guest writes through the mount; the guest then goes on through QEMU's
new node on DEST, and on after the mount is gone. The next boot, from DEST as a plain file,
re-checks every round's file (``CORFS-LOOPCHECK``) and the previous boot's marker file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.mounting import CorfsDirs, corfs_command, corfs_env, run_corfs
from tests.vm.build_image import VmArtifacts, copy_disk
from tests.vm.livevm import LiveVm
from tests.vm.vmboot import boot

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

IMAGE = "disk.raw"
LOOP_MAX = 2000  # a bound for a guest that never hears "stop"; the test stops it far earlier
LOOP_RE = re.compile(r"CORFS-LOOP i=(\d+) (\w+)")
LOOPCHECK_RE = re.compile(r"CORFS-LOOPCHECK files=(\d+) ok=(\d+)")
# What a guest shows when its disk fails it: block layer, buffer cache, ext4, journal.
GUEST_ERROR_RE = re.compile(
    r"I/O error|blk_update_request|EXT4-fs (?:error|warning)|Aborting journal|"
    r"Remounting filesystem read-only|Read-only file system|dd: .*"
)
BOOT_S = 120.0  # from QEMU's start to the first rounds, under TCG (a few seconds when idle)
ROUND_S = 60.0  # for a few more rounds (each is about a second)
DETACH_S = 180.0
CORFS_EXIT_S = 30.0


def image_status(mnt: Path) -> dict:
    result = run_corfs("status", mnt, "--json", check=True)
    return next(i for i in json.loads(result.stdout)["images"] if i["name"] == IMAGE)


def rounds(vm: LiveVm) -> int:
    return len(LOOP_RE.findall(vm.console()))


def more_rounds(vm: LiveVm, count: int) -> int:
    """Wait for ``count`` rounds beyond those on the console now; the new total."""
    return len(vm.wait_for(LOOP_RE, rounds(vm) + count, ROUND_S))


def test_a_booted_guest_does_checksummed_io_across_the_handoff_and_reboots_from_dest(
    tmp_path: Path, vm_artifacts: VmArtifacts
) -> None:
    dirs = CorfsDirs.under(tmp_path / "corfs")
    copy_disk(vm_artifacts.disk, dirs.base / IMAGE)
    dest = tmp_path / "corfs" / "vm.raw"  # CACHE's file system: the data file becomes DEST
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    mnt_prefix = f"{dirs.mnt}/"
    # A throttled stream: the guest boots and writes while most of the image is still remote.
    with dirs.mount("--bandwidth", "1M") as m, LiveVm(
        vm_dir, dirs.mnt / IMAGE, vm_artifacts, cache="none", append=f"corfs.loop={LOOP_MAX}"
    ) as vm:
        vm.wait_for(LOOP_RE, 3, BOOT_S)
        fill = image_status(dirs.mnt)["fill_ratio"]
        assert fill < 1.0, "the stream finished before the handoff began: nothing raced it"

        detach = subprocess.Popen(
            corfs_command("detach", dirs.mnt, IMAGE, dest, "--qmp", vm.qmp_socket, "--wait"),
            env=corfs_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            more_rounds(vm, 2)  # the guest writes through the mount while detach waits
            if detach.poll() is not None:
                pytest.fail(f"detach did not wait for the stream: {detach.communicate()}")
            run_corfs("stream", "bandwidth", dirs.mnt, "0", check=True)
            out, err = detach.communicate(timeout=DETACH_S)
        finally:
            if detach.poll() is None:
                detach.kill()  # our own child, by PID
                detach.wait(10)
        assert detach.returncode == 0, f"{err}\n{m.log_tail()}"
        assert str(dest) in out, out
        at_switch = rounds(vm)

        files = vm.block_node_files()
        assert str(dest) in files, files
        assert not [f for f in files if f.startswith(mnt_prefix)], files
        assert not [f for f in vm.open_files() if f.startswith(mnt_prefix)]
        assert image_status(dirs.mnt)["state"] == "detached"
        more_rounds(vm, 4)  # through QEMU's node on DEST, the mount still up

        unmounted = subprocess.run(
            ["fusermount3", "-u", str(dirs.mnt)], capture_output=True, text=True, timeout=30
        )
        assert unmounted.returncode == 0, f"QEMU still holds the mount: {unmounted.stderr}"
        # corfs ends by itself once its mount is gone (a SIGTERM now would race its exit).
        assert m.proc is not None and m.proc.wait(CORFS_EXIT_S) == 0, m.log_tail()
        m.stop()  # asserts the exit status and that nothing is mounted on MNT
        at_unmount = rounds(vm)
        more_rounds(vm, 3)  # no mount at all now
        log.info("fill %.3f at detach; rounds: %d at the switch, %d at the unmount, %d at the "
                 "stop", fill, at_switch, at_unmount, rounds(vm))

        vm.type_line("stop")
        first = vm.wait_exit(ROUND_S)

    console = first.console_text
    errors = GUEST_ERROR_RE.findall(console)
    assert not errors, f"the guest saw errors: {errors}\n{console[-3000:]}"
    verdicts = LOOP_RE.findall(console)
    assert [int(i) for i, _ in verdicts] == list(range(1, len(verdicts) + 1)), verdicts
    assert {v for _, v in verdicts} == {"ok"}, verdicts
    assert 3 <= at_switch < at_unmount < len(verdicts), (at_switch, at_unmount, len(verdicts))
    assert first.tree_sum == vm_artifacts.tree_sum, first.marker_line
    assert (first.boot_counter, first.prev_write, first.write) == (1, "none", "ok"), (
        first.marker_line
    )
    assert os.stat(dest).st_size == os.stat(vm_artifacts.disk).st_size

    # DEST is a plain disk image now: it boots without corfs, with everything written above.
    again = boot(dest, cache="none", artifacts=vm_artifacts)
    assert again.tree_sum == vm_artifacts.tree_sum, again.marker_line
    assert (again.boot_counter, again.prev_write, again.write) == (2, "ok", "ok"), (
        again.marker_line
    )
    assert not GUEST_ERROR_RE.findall(again.console_text), again.console_text[-3000:]
    check = LOOPCHECK_RE.search(again.console_text)
    assert check is not None, again.console_text[-3000:]
    assert check.groups() == (str(len(verdicts)), str(len(verdicts))), check.group(0)
