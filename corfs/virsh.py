"""A libvirt domain's QEMU, reached through the `virsh` command (libvirt owns QEMU's monitor
socket, so corfs cannot open it itself), and the domain's persistent definition.

- `VirshMonitor(domain).command(name, arguments)` sends one QMP command with
  `virsh qemu-monitor-command` and returns QEMU's "return" value; a QMP "error" reply raises
  QmpError carrying QEMU's own message.
- `repoint_persistent_disk(domain, old, new)` rewrites every disk source (and backing-store
  source) naming `old` in the domain's persistent definition to `new` and redefines it, so the
  next start boots `new`; the running domain is not touched (that is the QMP switch's job).

Failures are one line each: libvirtd unreachable or a refused command is QmpError, an unknown
domain is UsageError (a bad --virsh argument). A virsh failure is classified by asking libvirt
again (is it reachable, does the domain exist), not by parsing virsh's English messages.

virsh runs with LC_ALL=C: `dominfo` is read as text.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import QmpError, UsageError
from .qmp_switch import same_path

log = logging.getLogger(__name__)

LIBVIRT_URI = "qemu:///system"
COMMAND_TIMEOUT = 60.0  # a blockdev-reopen drains the disk's in-flight I/O first
QUERY_TIMEOUT = 30.0


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    stdout: str
    error: str  # virsh's "error: ..." lines, joined into one


def _run_virsh(
    uri: str,
    args: Sequence[str],
    *,
    timeout: float,
    stdin: str | None = None,
    pass_fds: Sequence[int] = (),
) -> _Outcome:
    argv = ["virsh", "-q", "-c", uri, *args]
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            pass_fds=pass_fds,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
    except FileNotFoundError:
        raise QmpError("virsh not found: install libvirt-clients") from None
    except subprocess.TimeoutExpired:
        raise QmpError(f"virsh {args[0]} gave no answer within {timeout:g} s") from None
    lines = [line.removeprefix("error: ").strip() for line in done.stderr.splitlines()]
    return _Outcome(done.returncode == 0, done.stdout, "; ".join(line for line in lines if line))


def _check_reachable(uri: str, timeout: float) -> None:
    outcome = _run_virsh(uri, ["uri"], timeout=timeout)
    if not outcome.ok:
        raise QmpError(f"cannot reach libvirt at {uri} (is libvirtd running?): {outcome.error}")


def domain_exists(
    domain: str, *, uri: str = LIBVIRT_URI, timeout: float = QUERY_TIMEOUT
) -> bool:
    """Whether libvirt at `uri` knows `domain` (name, id or UUID); QmpError if libvirt cannot
    be reached, so that "no" always means no."""
    if _run_virsh(uri, ["domuuid", "--domain", domain], timeout=timeout).ok:
        return True
    _check_reachable(uri, timeout)
    return False


def _domain_call(
    domain: str,
    uri: str,
    args: Sequence[str],
    *,
    timeout: float,
    stdin: str | None = None,
    pass_fds: Sequence[int] = (),
) -> str:
    """stdout of a virsh command about `domain`; a failure becomes the one error that says
    why: libvirt down, no such domain, or what virsh said. Each virsh run (the classifying
    ones too) gets at most `timeout` seconds."""
    outcome = _run_virsh(uri, args, timeout=timeout, stdin=stdin, pass_fds=pass_fds)
    if outcome.ok:
        return outcome.stdout
    if not domain_exists(domain, uri=uri, timeout=min(timeout, QUERY_TIMEOUT)):
        raise UsageError(f"libvirt at {uri} has no domain {domain!r} (see: virsh list --all)")
    raise QmpError(f"virsh {args[0]} {domain}: {outcome.error}")


class VirshMonitor:
    """QEMU's QMP monitor of one libvirt domain, through `virsh qemu-monitor-command`.

    libvirt marks the domain "tainted: custom monitor control commands issued" (a note in
    its log and dominfo); that is the price of talking QMP behind its back."""

    def __init__(
        self, domain: str, *, uri: str = LIBVIRT_URI, timeout: float = COMMAND_TIMEOUT
    ) -> None:
        self.domain = domain
        self.uri = uri
        self.timeout = timeout

    def command(
        self, name: str, arguments: dict | None = None, *, pass_fds: Sequence[int] = ()
    ) -> Any:
        """QEMU's "return" for one QMP command. `pass_fds` go to QEMU along with it (e.g. for
        `add-fd`): QEMU under libvirt runs as its own user and may not open a file corfs
        can."""
        request: dict[str, object] = {"execute": name}
        if arguments is not None:
            request["arguments"] = arguments
        args = ["qemu-monitor-command", "--domain", self.domain]
        if pass_fds:
            args += ["--pass-fds", ",".join(str(fd) for fd in pass_fds)]
        log.debug("virsh %s: QMP %s", self.domain, name)
        stdout = _domain_call(
            self.domain,
            self.uri,
            [*args, "--cmd", json.dumps(request)],
            timeout=self.timeout,
            pass_fds=pass_fds,
        )
        try:
            reply = json.loads(stdout)
        except ValueError:
            raise QmpError(
                f"virsh qemu-monitor-command {self.domain}: not a QMP reply: {stdout[:200]!r}"
            ) from None
        if not isinstance(reply, dict):
            raise QmpError(f"virsh qemu-monitor-command {self.domain}: not a QMP reply: {reply!r}")
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc", error) if isinstance(error, dict) else error
            raise QmpError(f"QEMU of domain {self.domain} refused {name}: {desc}")
        if "return" not in reply:
            raise QmpError(f"QEMU of domain {self.domain} answered {name} without a return")
        return reply["return"]


def _is_persistent(domain: str, uri: str, timeout: float = QUERY_TIMEOUT) -> bool:
    info = _domain_call(domain, uri, ["dominfo", "--domain", domain], timeout=timeout)
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Persistent":
            return value.strip() == "yes"
    raise QmpError(f"virsh dominfo {domain} does not say whether it is persistent")


def _persistent_xml(domain: str, uri: str, timeout: float = QUERY_TIMEOUT) -> str:
    # --security-info: without it libvirt leaves out secrets (a VNC password...), and the
    # redefinition would drop them from the domain for good.
    return _domain_call(
        domain,
        uri,
        ["dumpxml", "--inactive", "--security-info", "--domain", domain],
        timeout=timeout,
    )


def _disk_file_sources(root: ET.Element) -> list[ET.Element]:
    """Every <source file=...> of a disk: its own and those of its <backingStore> chain."""
    return [
        source
        for disk in root.findall("./devices/disk")
        for source in disk.iter("source")
        if source.get("file") is not None
    ]


def persistent_disk_files(domain: str, *, uri: str = LIBVIRT_URI) -> list[str] | None:
    """The files the domain's persistent definition boots from (disks and backing stores),
    or None for a transient domain: what a caller checks before a live switch."""
    if not _is_persistent(domain, uri):
        return None
    root = ET.fromstring(_persistent_xml(domain, uri))
    return [source.get("file", "") for source in _disk_file_sources(root)]


def repoint_disk_sources(domain_xml: str, old_path: str, new_path: str) -> tuple[str, int]:
    """`domain_xml` with every disk source file `old_path` made `new_path`, and how many.
    Paths are compared normalised (`a//b/./c` is `a/b/c`); everything else is kept, including
    namespace prefixes (<qemu:commandline>, metadata)."""
    # ElementTree would rename prefixes to ns0, ns1... on output; its prefix map is
    # process-wide, which is harmless for the fixed URIs libvirt documents use.
    for _, (prefix, uri) in ET.iterparse(io.StringIO(domain_xml), events=("start-ns",)):
        if prefix and not re.fullmatch(r"ns\d+", prefix):
            ET.register_namespace(prefix, uri)
    root = ET.fromstring(domain_xml)
    changed = 0
    for source in _disk_file_sources(root):
        if same_path(source.get("file", ""), old_path):
            source.set("file", new_path)
            changed += 1
    return ET.tostring(root, encoding="unicode"), changed


def repoint_persistent_disk(
    domain: str,
    old_path: str,
    new_path: str,
    *,
    uri: str = LIBVIRT_URI,
    timeout: float = QUERY_TIMEOUT,
) -> None:
    """Make the domain's persistent definition name `new_path` wherever a disk (or a disk's
    backing store) names `old_path`, so its next start boots `new_path`. The running domain
    keeps its live definition. A transient domain has nothing to repoint: logged, skipped.
    A definition naming `old_path` nowhere needs nothing either: its disk is an overlay whose
    header names `old_path` (rewritten to `new_path` by the switch), the way contrib/README.md
    defines one (before, the handoff was refused and undone: such a VM never left the mount).
    Each virsh run gets at most `timeout` seconds (QmpError after)."""
    if not _is_persistent(domain, uri, timeout):
        log.info("domain %s is transient: no persistent definition to repoint", domain)
        return
    xml = _persistent_xml(domain, uri, timeout)
    new_xml, changed = repoint_disk_sources(xml, old_path, new_path)
    if not changed:
        log.info("domain %s: the persistent definition names %s nowhere (an overlay's backing "
                 "file, named by its header): left as it is", domain, old_path)
        return
    _domain_call(domain, uri, ["define", "--file", "/dev/stdin"], timeout=timeout, stdin=new_xml)
    log.info(
        "domain %s: persistent definition now boots %s (%d disk source(s) were %s)",
        domain,
        new_path,
        changed,
        old_path,
    )
