"""`corfs detach MNT IMAGE DEST --virsh DOMAIN` of a domain whose disk is a qcow2 overlay over
MNT/IMAGE, defined the way contrib/README.md ("qcow2 overlays work too") sets it up: the
domain's <disk> names the overlay, and its backing file is the overlay header's business (no
<backingStore> in the definition: libvirt reads the chain from the headers at start).

README ("Thick at full speed") says a qcow2 overlay's backing file is switched and its header
rewritten to name DEST, and with --virsh the persistent definition follows. Here the
definition has nothing naming MNT/IMAGE to rewrite, and the overlay's rewritten header alone
would make the next `virsh start` open DEST; yet repoint_persistent_disk refused ("the
persistent definition of domain ... has no disk on MNT/IMAGE") and the whole handoff was rolled
back: such a VM could never be taken off the mount. Real libvirtd, real corfs mount."""

from __future__ import annotations

from pathlib import Path

from corfs.virsh import VirshMonitor
from tests.handoff.overlays import backing_of, make_overlay
from tests.libvirt.libvirtd import Libvirt
from tests.libvirt.test_virsh import DefineDomain, disk_sources, domain_xml, unique_name
from tests.mounting import CorfsDirs, make_image, run_corfs

MIB = 1 << 20


def test_virsh_handoff_of_an_overlay_defined_without_its_backing_store(
    tmp_dirs: CorfsDirs, tmp_path: Path, libvirt: Libvirt, define_domain: DefineDomain
) -> None:
    make_image(tmp_dirs.base / "disk.raw", 8 * MIB, seed=37)
    dest = tmp_path / "vm.raw"
    overlay = tmp_path / "overlay.qcow2"
    name = unique_name()
    with tmp_dirs.mount() as m:
        image = m.mnt / "disk.raw"
        make_overlay(image, overlay)
        xml = domain_xml(name, overlay).replace("type='raw'", "type='qcow2'")
        define_domain(name, xml)
        assert disk_sources(libvirt.virsh("dumpxml", "--inactive", "--domain", name)) == [
            str(overlay)
        ]
        libvirt.virsh("start", "--domain", name)  # after the mount: its namespace has it
        result = run_corfs("detach", m.mnt, "disk.raw", dest, "--virsh", name, "--wait",
                           timeout=120)
        assert result.returncode == 0, result.stderr + m.log_tail()
        nodes = VirshMonitor(name).command("query-named-block-nodes", {"flat": True})
        files = {n["file"] for n in nodes if n["drv"] == "file"}
        assert str(image) not in files and str(dest) in files, files
        m.stop()
    libvirt.virsh("destroy", "--domain", name)
    assert backing_of(overlay) == (str(dest), "raw")
    libvirt.virsh("start", "--domain", name)  # boots over DEST: the mount is gone
    nodes = VirshMonitor(name).command("query-named-block-nodes", {"flat": True})
    assert str(dest) in {n["file"] for n in nodes if n["drv"] == "file"}
