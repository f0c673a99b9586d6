"""repoint_disk_sources: the XML edit behind `corfs detach --virsh` (no libvirt needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from corfs.virsh import repoint_disk_sources

DOMAIN = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>g</name>
  <metadata><app:info xmlns:app='http://example.org/app'>x</app:info></metadata>
  <devices>
    <disk type='file' device='disk'>
      <source file='/mnt/corfs/a.raw'><seclabel model='dac' relabel='no'/></source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/x.qcow2'/>
      <backingStore type='file'><format type='raw'/><source file='/mnt/corfs//./a.raw'/>
      </backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><source file='/mnt/corfs/a.raw.iso'/></disk>
    <filesystem><source dir='/mnt/corfs/a.raw'/></filesystem>
  </devices>
  <qemu:commandline><qemu:arg value='-s'/></qemu:commandline>
</domain>"""


def test_every_disk_and_backing_source_on_old_is_repointed():
    new_xml, changed = repoint_disk_sources(DOMAIN, "/mnt/corfs/a.raw", "/srv/a.raw")
    assert changed == 2
    root = ET.fromstring(new_xml)
    files = [s.get("file") for s in root.iter("source") if s.get("file")]
    assert files == ["/srv/a.raw", "/var/lib/x.qcow2", "/srv/a.raw", "/mnt/corfs/a.raw.iso"]
    assert root.find("./devices/filesystem/source").get("dir") == "/mnt/corfs/a.raw"
    assert root.find("./devices/disk/source/seclabel").get("relabel") == "no"


def test_namespace_prefixes_survive():
    new_xml, _ = repoint_disk_sources(DOMAIN, "/mnt/corfs/a.raw", "/srv/a.raw")
    assert "<qemu:commandline>" in new_xml and '<qemu:arg value="-s"' in new_xml
    assert "<app:info" in new_xml


def test_no_match_changes_nothing():
    new_xml, changed = repoint_disk_sources(DOMAIN, "/mnt/corfs/b.raw", "/srv/b.raw")
    assert changed == 0
    assert ET.tostring(ET.fromstring(new_xml)) == ET.tostring(ET.fromstring(DOMAIN))
