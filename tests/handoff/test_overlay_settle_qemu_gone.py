"""A handoff of an image under a qcow2 overlay, its daemon killed before QEMU switched, then
the VM shut down (its disk's mount died under it) before the cache is mounted again: the next
mount finds the QMP socket refusing connections and, by its rule "QEMU not answering:
finished", keeps DEST and stops serving the image. But QEMU never switched, so no overlay
header was ever rewritten: the overlay still names MNT/IMAGE as its backing file, which the
settling mount no longer serves (it logs "not serving image disk.raw: it was handed over").
The VM cannot be started again from its overlay ("Could not open backing file: Could not
open '.../mnt/disk.raw': No such file or directory"), nor can `qemu-img check` or `qemu-io`
open it, although `corfs status` says the image was handed over to DEST as if all was done.
README ("Thick at full speed"): every overlay's header names DEST after a handoff, and a
settled handoff is the old state or the new one; here it is neither (data in DEST, overlay
naming the mount). Whichever way it is settled, the overlay's header must name a file that
exists and holds the guest's bytes: DEST if finished, MNT/IMAGE (served) if undone.
Real corfs mount, real QEMU (-machine none)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from corfs.handoff import STALL_ENV
from tests.fuse.util import image_status, live_status, wait_for
from tests.mounting import CorfsDirs, corfs_command, corfs_env, make_image

from .overlays import assert_reads, backing_of, make_overlay
from .qemu import Qemu

MIB = 1 << 20


def test_an_overlay_opens_after_a_handoff_cut_short_is_settled_with_qemu_gone(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    base = make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=41)
    dest = tmp_path / "vm.raw"
    overlay = tmp_path / "overlay.qcow2"
    image = tmp_dirs.mnt / "disk.raw"
    with tmp_dirs.mount(env={STALL_ENV: "linked"}) as m:
        wait_for(lambda: image_status(live_status(m.mnt), "disk.raw")["fill_ratio"] == 1.0,
                 30, "the stream to complete")
        make_overlay(image, overlay)
        with Qemu(tmp_path, "-drive",
                  f"file={overlay},format=qcow2,if=none,id=d0,node-name=ov") as qemu:
            qemu.qemu_io("d0", "write -P 0x41 0 64k")
            qemu.qemu_io("d0", "flush")
            cli = subprocess.Popen(
                corfs_command("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket),
                env=corfs_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            try:
                wait_for(lambda: "handoff stalled at linked" in m.log_text(), 30,
                         "the daemon to stall at linked")
                m.kill9()  # also lazily unmounts the dead mount
            finally:
                cli.kill()
                cli.wait(10)
        # QEMU is gone (the VM shut down); its QMP socket file stays, refusing connections.
    with tmp_dirs.mount() as m:
        status = image_status(live_status(m.mnt), "disk.raw")
        named, fmt = backing_of(overlay)
        assert fmt == "raw"
        if status["state"] == "detached":
            assert status["detached_to"] == str(dest)
            assert named == str(dest), (
                f"handoff settled as finished (image not served), yet the overlay's header "
                f"names {named}; exists: {os.path.exists(named or '')}\n{m.log_tail()}"
            )
        else:
            assert status["state"] == "complete" and not dest.exists()
            assert named == str(image)
        checked = subprocess.run(["qemu-img", "check", overlay], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert_reads(overlay, "read -P 0x41 0 64k")
        # Every byte the guest sees: its write over the base.
        flat = tmp_path / "flat.raw"
        converted = subprocess.run(["qemu-img", "convert", "-O", "raw", overlay, flat],
                                   capture_output=True, text=True)
        assert converted.returncode == 0, converted.stderr
        want = bytearray(base.read_bytes())
        want[:65536] = b"\x41" * 65536
        assert flat.read_bytes() == bytes(want)
        m.stop()
