"""corfs.virsh against a real libvirtd and QEMU (TCG): QMP through `virsh
qemu-monitor-command`, its errors, and the persistent definition repointed to a new disk.

The domains sit in SeaBIOS with an empty disk: nothing needs to boot for the monitor and the
definitions. The disks are plain files under tmp_path, not a FUSE mount: libvirt runs QEMU in
its own mount namespace, copied when the VM starts, so only a mount made before `virsh start`
would be visible to it; none is needed here."""

from __future__ import annotations

import logging
import os
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

from corfs.errors import QmpError, UsageError
from corfs.virsh import VirshMonitor, domain_exists, repoint_persistent_disk
from tests.libvirt.libvirtd import Libvirt

DefineDomain = Callable[..., str]


def domain_xml(name: str, disk: Path, backing: Path | None = None) -> str:
    """A 64 MiB TCG guest with one virtio disk on `disk` (raw; or qcow2 over `backing`)."""
    if backing is None:
        driver, chain = "raw", ""
    else:
        driver = "qcow2"
        chain = (
            "<backingStore type='file'><format type='raw'/>"
            f"<source file={quoteattr(str(backing))}/><backingStore/></backingStore>"
        )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{driver}' cache='none'/>
      <source file={quoteattr(str(disk))}/>
      {chain}
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def raw_file(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    return path


def unique_name() -> str:
    return f"corfs-test-{uuid.uuid4().hex[:8]}"


def disk_sources(xml: str) -> list[str]:
    return [s.get("file", "") for s in ET.fromstring(xml).iter("source") if s.get("file")]


@pytest.fixture
def running_domain(
    libvirt: Libvirt, define_domain: DefineDomain, tmp_path: Path
) -> tuple[str, Path]:
    """A started persistent domain whose disk is OLD (a raw file); (name, OLD)."""
    old = raw_file(tmp_path / "old.raw")
    name = unique_name()
    return define_domain(name, domain_xml(name, old)), old


def test_monitor_lists_the_disk_and_runs_hmp(running_domain: tuple[str, Path], libvirt: Libvirt):
    name, old = running_domain
    libvirt.virsh("start", "--domain", name)
    monitor = VirshMonitor(name)
    nodes = monitor.command("query-named-block-nodes", {"flat": True})
    assert isinstance(nodes, list)
    assert {node["file"] for node in nodes} == {str(old)}
    assert {node["drv"] for node in nodes} == {"raw", "file"}
    info = monitor.command("human-monitor-command", {"command-line": "info block"})
    assert isinstance(info, str) and str(old) in info
    assert monitor.command("query-status")["status"] == "running"  # type: ignore[index]


def test_qmp_error_carries_qemus_message(running_domain: tuple[str, Path], libvirt: Libvirt):
    name, _ = running_domain
    libvirt.virsh("start", "--domain", name)
    monitor = VirshMonitor(name)
    with pytest.raises(QmpError) as refused:
        monitor.command("blockdev-del", {"node-name": "no-such-node"})
    assert "Failed to find node with node-name='no-such-node'" in str(refused.value)
    assert name in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(QmpError, match="The command no-such-command has not been found"):
        monitor.command("no-such-command")


def test_unknown_domain_is_one_clear_line(libvirt: Libvirt):
    name = unique_name()
    assert not domain_exists(name)
    with pytest.raises(UsageError) as unknown:
        VirshMonitor(name).command("query-status")
    message = str(unknown.value)
    assert f"no domain {name!r}" in message and "\n" not in message
    with pytest.raises(UsageError, match="no domain"):
        repoint_persistent_disk(name, "/a", "/b")


def test_domain_not_running_is_not_unknown(running_domain: tuple[str, Path]):
    name, _ = running_domain  # defined, not started
    assert domain_exists(name)
    with pytest.raises(QmpError, match="not running") as stopped:
        VirshMonitor(name).command("query-status")
    assert not isinstance(stopped.value, UsageError)


def test_libvirtd_unreachable_is_one_clear_line(tmp_path: Path):
    uri = f"qemu:///system?socket={tmp_path}/no-libvirtd-here"
    with pytest.raises(QmpError, match="cannot reach libvirt") as down:
        VirshMonitor("any", uri=uri).command("query-status")
    assert "\n" not in str(down.value)
    with pytest.raises(QmpError, match="cannot reach libvirt"):
        domain_exists("any", uri=uri)


def test_repoint_changes_only_the_persistent_disk(
    running_domain: tuple[str, Path], libvirt: Libvirt, tmp_path: Path
):
    name, old = running_domain
    libvirt.virsh("start", "--domain", name)
    new = raw_file(tmp_path / "new.raw")
    before = libvirt.virsh("dumpxml", "--inactive", "--domain", name)
    live_before = libvirt.virsh("dumpxml", "--domain", name)

    repoint_persistent_disk(name, str(old), str(new))

    after = libvirt.virsh("dumpxml", "--inactive", "--domain", name)
    assert disk_sources(after) == [str(new)]
    assert after == before.replace(str(old), str(new))  # nothing else changed
    assert libvirt.virsh("dumpxml", "--domain", name) == live_before
    nodes = VirshMonitor(name).command("query-named-block-nodes", {"flat": True})
    assert {node["file"] for node in nodes} == {str(old)}  # type: ignore[union-attr]
    # a restart boots NEW
    libvirt.virsh("destroy", "--domain", name)
    libvirt.virsh("start", "--domain", name)
    nodes = VirshMonitor(name).command("query-named-block-nodes", {"flat": True})
    assert {node["file"] for node in nodes} == {str(new)}  # type: ignore[union-attr]


def test_repoint_follows_a_backing_store(
    libvirt: Libvirt, define_domain: DefineDomain, tmp_path: Path
):
    old = raw_file(tmp_path / "old.raw")
    new = raw_file(tmp_path / "new.raw")
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(old), "-F", "raw", str(overlay)],
        check=True,
    )
    name = unique_name()
    define_domain(name, domain_xml(name, overlay, backing=old))
    assert disk_sources(libvirt.virsh("dumpxml", "--inactive", "--domain", name)) == [
        str(overlay),
        str(old),
    ]
    repoint_persistent_disk(name, str(old), str(new))
    assert disk_sources(libvirt.virsh("dumpxml", "--inactive", "--domain", name)) == [
        str(overlay),
        str(new),
    ]


def test_repoint_without_that_disk_changes_nothing(
    running_domain: tuple[str, Path], libvirt, caplog
):
    """A definition naming the old path nowhere (its disk an overlay whose header names it,
    test_handoff_virsh_overlay.py) is left as it is, and said so."""
    name, old = running_domain
    before = libvirt.virsh("dumpxml", "--inactive", "--domain", name)
    caplog.set_level(logging.INFO, logger="corfs.virsh")
    repoint_persistent_disk(name, f"{old}.other", "/new")
    assert f"names {old}.other nowhere" in caplog.text
    assert libvirt.virsh("dumpxml", "--inactive", "--domain", name) == before


def test_repoint_of_a_transient_domain_is_skipped(
    libvirt: Libvirt, define_domain: DefineDomain, tmp_path: Path, caplog
):
    old = raw_file(tmp_path / "old.raw")
    name = unique_name()
    define_domain(name, domain_xml(name, old), transient=True)
    caplog.set_level(logging.INFO, logger="corfs.virsh")
    repoint_persistent_disk(name, str(old), str(tmp_path / "new.raw"))
    assert f"domain {name} is transient" in caplog.text
    assert disk_sources(libvirt.virsh("dumpxml", "--domain", name)) == [str(old)]


def test_repoint_keeps_secrets_and_qemu_namespace(
    libvirt: Libvirt, define_domain: DefineDomain, tmp_path: Path
):
    """A plain `dumpxml` leaves out the VNC password: redefining from it would drop it."""
    old = raw_file(tmp_path / "old.raw")
    name = unique_name()
    xml = domain_xml(name, old).replace(
        "<domain type='qemu'>",
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
    )
    xml = xml.replace(
        "</devices>",
        "<graphics type='vnc' port='-1' passwd='s3cretvn'/></devices>"
        "<qemu:commandline><qemu:env name='CORFS_TEST' value='1'/></qemu:commandline>",
    )
    define_domain(name, xml)
    new = tmp_path / "new.raw"
    secret_xml = ("dumpxml", "--inactive", "--security-info", "--domain", name)
    before = libvirt.virsh(*secret_xml)
    assert "s3cretvn" in before and "<qemu:env name='CORFS_TEST'" in before

    repoint_persistent_disk(name, str(old), str(new))

    assert libvirt.virsh(*secret_xml) == before.replace(str(old), str(new))


def test_a_file_descriptor_reaches_qemu(
    running_domain: tuple[str, Path], libvirt: Libvirt, tmp_path: Path
):
    """corfs opens NEW itself and hands QEMU the descriptor (add-fd), as libvirt's QEMU may
    run as a user that could not open NEW."""
    name, _ = running_domain
    libvirt.virsh("start", "--domain", name)
    new = raw_file(tmp_path / "new.raw")
    monitor = VirshMonitor(name)
    fd = os.open(new, os.O_RDWR)
    try:
        added = monitor.command("add-fd", {"fdset-id": 7}, pass_fds=[fd])
    finally:
        os.close(fd)
    assert added["fdset-id"] == 7  # type: ignore[index]
    monitor.command(
        "blockdev-add", {"driver": "file", "node-name": "via-fd", "filename": "/dev/fdset/7"}
    )
    nodes = monitor.command("query-named-block-nodes", {"flat": True})
    assert {n["node-name"]: n["file"] for n in nodes}["via-fd"] == "/dev/fdset/7"  # type: ignore
