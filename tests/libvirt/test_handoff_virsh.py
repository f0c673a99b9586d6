"""Issue 11, point 6: `corfs detach MNT IMAGE DEST --virsh DOMAIN` through a real libvirtd: the
domain's QEMU (which libvirt starts with -blockdev and owns the monitor of) is switched to DEST
through `virsh qemu-monitor-command`, and its persistent definition names DEST, so a restart
boots DEST. libvirt runs QEMU in its own mount namespace (copied at `virsh start`, so corfs
mounts first): "out of the data path" is shown by QEMU's node list, not by an unmount. (Guest
writes across a switch are tests/handoff's and tests/vm's: HMP qemu-io cannot reach a disk
that libvirt attached to a device by node name.)"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from corfs.virsh import VirshMonitor
from tests.fuse.util import assert_one_line_error, image_status, live_status
from tests.handoff.overlays import backing_of, make_overlay
from tests.libvirt.libvirtd import Libvirt
from tests.libvirt.test_virsh import DefineDomain, domain_xml, unique_name
from tests.mounting import CorfsDirs, make_image, run_corfs

MIB = 1 << 20


def file_nodes(monitor: VirshMonitor) -> dict[str, str]:
    nodes = monitor.command("query-named-block-nodes", {"flat": True})
    return {n["node-name"]: n["file"] for n in nodes if n["drv"] == "file"}  # type: ignore[union-attr, index]


def test_virsh_handoff_switches_the_running_domain_and_its_definition(
    tmp_dirs: CorfsDirs, tmp_path: Path, libvirt: Libvirt, define_domain: DefineDomain
) -> None:
    base = make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=21)
    dest = tmp_path / "vm.raw"
    name = unique_name()
    with tmp_dirs.mount() as m:
        image = str(m.mnt / "disk.raw")
        define_domain(name, domain_xml(name, Path(image)))
        libvirt.virsh("start", "--domain", name)  # after the mount: its namespace has it
        monitor = VirshMonitor(name)
        result = run_corfs("detach", m.mnt, "disk.raw", dest, "--virsh", name, "--wait",
                           timeout=120)
        assert result.returncode == 0, result.stderr + m.log_tail()
        files = file_nodes(monitor)
        assert image not in files.values() and str(dest) in files.values(), files
        assert not [f for f in files.values() if f.startswith(str(m.mnt))]
        status = image_status(live_status(m.mnt), "disk.raw")
        assert status["state"] == "detached" and status["detached_to"] == str(dest)
        inactive = libvirt.virsh("dumpxml", "--inactive", "--domain", name)
        sources = [s.get("file") for s in ET.fromstring(inactive).iter("source") if s.get("file")]
        assert sources == [str(dest)]
        m.stop()
    libvirt.virsh("destroy", "--domain", name)
    libvirt.virsh("start", "--domain", name)  # boots DEST: the mount is gone
    monitor = VirshMonitor(name)
    assert list(file_nodes(monitor).values()) == [str(dest)]
    assert dest.read_bytes() == base.read_bytes()


def test_virsh_handoff_to_an_unknown_domain_changes_nothing(
    tmp_dirs: CorfsDirs, tmp_path: Path, libvirt: Libvirt
) -> None:
    make_image(tmp_dirs.base / "disk.raw", 2 * MIB, seed=22)
    dest = tmp_path / "vm.raw"
    with tmp_dirs.mount() as m:
        result = run_corfs("detach", m.mnt, "disk.raw", dest, "--virsh", unique_name(),
                           "--wait", timeout=120)
        assert_one_line_error(result, "domain")
        assert not dest.exists()
        assert image_status(live_status(m.mnt), "disk.raw")["state"] == "complete"
        m.stop()


def test_a_definition_libvirt_took_when_virsh_failed_is_pointed_back(
    tmp_dirs: CorfsDirs, tmp_path: Path, libvirt: Libvirt, define_domain: DefineDomain
) -> None:
    """`virsh define` applied the definition naming DEST and then failed (it stands in for a
    virsh that timed out after libvirt took it): the handoff is rolled back, QEMU switched
    back to the mount, and the definition names the mount's image again (it was left naming a
    DEST that the rollback unlinked: a restart of the domain would not boot)."""
    make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=23)
    dest = tmp_path / "vm.raw"
    name = unique_name()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    virsh = fake_bin / "virsh"
    virsh.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = define ] && { /usr/bin/virsh "$@"; '
        'echo "error: injected after define" >&2; exit 1; }; done\n'
        'exec /usr/bin/virsh "$@"\n'
    )
    virsh.chmod(0o755)
    with tmp_dirs.mount(env={"PATH": f"{fake_bin}:{os.environ['PATH']}"}) as m:
        image = str(m.mnt / "disk.raw")
        define_domain(name, domain_xml(name, Path(image)))
        libvirt.virsh("start", "--domain", name)
        result = run_corfs("detach", m.mnt, "disk.raw", dest, "--virsh", name, "--wait",
                           timeout=120)
        assert_one_line_error(result, "injected after define")
        assert list(file_nodes(VirshMonitor(name)).values()) == [image]
        inactive = libvirt.virsh("dumpxml", "--inactive", "--domain", name)
        sources = [s.get("file") for s in ET.fromstring(inactive).iter("source") if s.get("file")]
        assert sources == [image]
        assert not dest.exists()
        assert image_status(live_status(m.mnt), "disk.raw")["state"] == "complete"
        libvirt.virsh("destroy", "--domain", name)
        m.stop()


def test_a_handoff_that_cannot_switch_back_leaves_the_overlay_naming_dest(
    tmp_dirs: CorfsDirs, tmp_path: Path, libvirt: Libvirt, define_domain: DefineDomain
) -> None:
    """Review: a handoff failing after the switch (here `virsh define`, after libvirt took
    the definition) named the mount again in the overlays' headers and the definition *before*
    switching QEMU back; when that switch back failed too, the handoff was finished with QEMU
    on DEST while both named the mount, which no longer serves the image: the domain could not
    start again (and a --forget-detached would have booted a fresh copy of the base). Now the
    switch back comes first, and what names DEST goes on naming it while QEMU stays there."""
    make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=29)
    dest = tmp_path / "vm.raw"
    overlay = tmp_path / "overlay.qcow2"
    name = unique_name()
    defined = tmp_path / "defined"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    virsh = fake_bin / "virsh"
    virsh.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do\n'
        f'  [ "$a" = define ] && {{ /usr/bin/virsh "$@"; touch {defined}; '
        'echo "error: injected after define" >&2; exit 1; }\n'
        f'  case "$a" in *blockdev-reopen*) [ -e {defined} ] && '
        '{ echo "error: injected refusal of the reopen back" >&2; exit 1; };; esac\n'
        "done\n"
        'exec /usr/bin/virsh "$@"\n'
    )
    virsh.chmod(0o755)
    with tmp_dirs.mount(env={"PATH": f"{fake_bin}:{os.environ['PATH']}"}) as m:
        image = m.mnt / "disk.raw"
        make_overlay(image, overlay)
        define_domain(name, domain_xml(name, overlay, backing=image))
        libvirt.virsh("start", "--domain", name)
        result = run_corfs("detach", m.mnt, "disk.raw", dest, "--virsh", name, "--wait",
                           timeout=120)
        assert result.returncode != 0 and defined.exists(), result.stderr + m.log_tail()
        assert str(dest) in file_nodes(VirshMonitor(name)).values()  # QEMU stayed on DEST
        assert dest.exists()
        assert image_status(live_status(m.mnt), "disk.raw")["state"] == "detached"
        inactive = libvirt.virsh("dumpxml", "--inactive", "--domain", name)
        sources = [s.get("file") for s in ET.fromstring(inactive).iter("source") if s.get("file")]
        assert sources == [str(overlay), str(dest)], sources
        libvirt.virsh("destroy", "--domain", name)
        m.stop()
    assert backing_of(overlay) == (str(dest), "raw")
