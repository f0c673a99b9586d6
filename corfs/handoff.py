"""Live handoff (`corfs detach MNT IMAGE DEST --qmp SOCKET | --virsh DOMAIN`): a fully local
image's data file becomes DEST (a hard link: no copy) and the running QEMU that has MNT/IMAGE
open is re-pointed at DEST (qmp_switch.py), so the guest's I/O leaves FUSE for good.

Runs in the daemon, which owns the image's writes and its state, as one control command.
Steps, each undone if a later one fails:
  1. checks: the image is complete, DEST does not exist, DEST's directory is on CACHE's file
     system (a hard link cannot cross it);
  2. every write so far is durable: a commit (data fdatasync, then the marks);
  3. journal: a handoffs row (not done), naming DEST and how to reach the QEMU;
  4. link(data file, DEST), its directory fsynced;
  5. QEMU switches every node on MNT/IMAGE to DEST (in a worker thread: the reopen drains
     QEMU's in-flight requests, which this daemon must go on serving meanwhile); the data file
     is fdatasynced again (writes drained by the reopen); with --virsh the domain's persistent
     definition is re-pointed too;
  6. commit point: one SQL transaction drops the image's rows and marks the handoff done;
     then the cache's name of the data file is unlinked (DEST keeps the inode), and the image
     is no longer served (absent from MNT; open handles get ESTALE naming DEST).
After it corfs never writes that file again, and no later mount serves IMAGE (a base image of
that name is left out, naming DEST) until `corfs mount --forget-detached IMAGE`.

Crash safety: a daemon killed between 3 and 6 leaves a journal row; the next mount settles it
before serving (`settle_handoffs`): if the QEMU answers and has a node on DEST, the handoff is
finished (the new state); otherwise it is undone (the old state: DEST unlinked if it is still
our link, and the image's chunks marked dirty, since a QEMU that was switched may have written
to the shared inode before it went away)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import trio

from .errors import CorfsError, NotLocalError, UsageError
from .image import Image
from .qemu_cmdline import qemu_pid_for_socket, started_options
from .store import CacheStore, HandoffRecord

log = logging.getLogger(__name__)

# QEMU answers each monitor command within this (a reopen drains in-flight I/O first). QEMU
# serves one client per QMP socket: while another holds it, connecting waits this long too.
QMP_TIMEOUT = 30.0
SETTLE_TIMEOUT = 10.0  # asking a QEMU at mount whether a handoff cut short had switched it
# The crash tests (tests/handoff) kill -9 the daemon between two steps: set to a step's name,
# the daemon logs "handoff stalled at STEP" there and waits forever.
STALL_ENV = "CORFS_TEST_HANDOFF_STALL_AT"


@dataclass(frozen=True)
class Via:
    """How to reach the QEMU that has the image open: its QMP socket, or a libvirt domain."""

    qmp: str | None = None
    virsh: str | None = None

    def __post_init__(self) -> None:
        if (self.qmp is None) == (self.virsh is None):
            raise UsageError("a live handoff needs exactly one of --qmp SOCKET or --virsh DOMAIN")

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_json(cls, text: str) -> Via:
        data = json.loads(text)
        return cls(qmp=data.get("qmp"), virsh=data.get("virsh"))

    def qemu_pid(self) -> int | None:
        """The QEMU process, to read the options it was started with (qemu_cmdline.py)."""
        if self.qmp is not None:
            return qemu_pid_for_socket(self.qmp)
        try:
            with open(f"/run/libvirt/qemu/{self.virsh}.pid") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def describe(self) -> str:
        return f"QMP socket {self.qmp}" if self.qmp else f"libvirt domain {self.virsh}"

    def connect(self, timeout: float = QMP_TIMEOUT):  # noqa: ANN201 - a qmp_switch.Monitor
        if self.qmp is not None:
            from .qmp_switch import connect_socket

            return connect_socket(self.qmp, timeout)
        from .virsh import VirshMonitor

        return VirshMonitor(self.virsh)


def check_dest(data_path: str, dest: str) -> None:
    """UsageError (one line, nothing changed) unless DEST can become the data file's name."""
    if os.path.lexists(dest):
        raise UsageError(f"{dest} already exists; choose a new file name")
    dest_dir = os.path.dirname(os.path.abspath(dest))
    try:
        dest_dev = os.stat(dest_dir).st_dev
    except OSError as exc:
        raise UsageError(f"the directory of {dest}: {exc.strerror}") from None
    if dest_dev != os.stat(data_path).st_dev:
        raise UsageError(
            f"{dest} is on another file system than the cache {os.path.dirname(data_path)}: "
            "a live handoff renames the data file, it cannot copy it; choose DEST beside CACHE"
        )


async def hand_over(
    image: Image, store: CacheStore, qemu_path: str, dest: str, via: Via
) -> int:
    """Steps 1-6 of the module docstring; returns how many QEMU nodes were switched. Any
    failure undoes what was done and raises (the image is served as before)."""
    name = image.name
    if image.handed_over_to is not None:
        raise UsageError(f"{name} was handed over to {image.handed_over_to} already")
    if not image.complete:
        raise NotLocalError(
            f"{name} is not fully local ({image.local_bytes / image.size:.1%}): "
            "wait for the stream (--wait)"
        )
    data_path = store.data_path(name)
    dest = os.path.abspath(dest)
    check_dest(data_path, dest)
    await store.commit()
    store.begin_handoff(
        HandoffRecord(name, image.size, dest, via.to_json(), qemu_path, False, time.time())
    )
    try:
        await _stall_for_tests("journaled")
        await trio.to_thread.run_sync(_link, data_path, dest)
        try:
            await _stall_for_tests("linked")
            switched = await trio.to_thread.run_sync(
                _switch_qemu, via, qemu_path, dest, store.data_fd(name)
            )
            await _stall_for_tests("switched")
        except BaseException:
            _unlink_our_link(data_path, dest)
            raise
    except BaseException:
        store.end_handoff(name)
        raise
    store.drop_image(name, handed_over=True)  # the commit point
    image.handed_over_to = dest
    log.info("handed %s over to %s: %d QEMU node(s) now use %s", name, via.describe(),
             switched, dest)
    return switched


async def _stall_for_tests(step: str) -> None:
    if os.environ.get(STALL_ENV) == step:
        log.warning("handoff stalled at %s", step)
        await trio.sleep_forever()


def _link(data_path: str, dest: str) -> None:
    try:
        os.link(data_path, dest)
    except FileExistsError:
        raise UsageError(f"{dest} already exists; choose a new file name") from None
    except OSError as exc:
        raise UsageError(f"cannot create {dest}: {exc.strerror}") from None
    _fsync_dir(os.path.dirname(dest))


def _switch_qemu(via: Via, qemu_path: str, dest: str, data_fd: int) -> int:
    """Worker thread: re-point every node of QEMU on `qemu_path` to `dest`, then sync what the
    reopen drained. With --virsh, the domain's persistent definition follows; if that fails,
    QEMU is switched back."""
    from .qmp_switch import plan_switch, rename_backing, switch

    started = started_options(via.qemu_pid(), qemu_path)
    monitor = via.connect()
    try:
        plan = plan_switch(monitor, qemu_path, dest, started=started)
        switch(monitor, plan)
        renamed: list[str] = []
        try:
            renamed = rename_backing(monitor, qemu_path, dest)  # qcow2 overlays' headers
            os.fdatasync(data_fd)
            if via.virsh is not None:
                from .virsh import repoint_persistent_disk

                repoint_persistent_disk(via.virsh, qemu_path, dest)
        except BaseException:
            if renamed:
                rename_backing(monitor, dest, qemu_path)
            # Back with QEMU's defaults for what QMP does not report: only a definition that
            # cannot be rewritten gets here, after a switch that worked.
            switch(monitor, plan_switch(monitor, dest, qemu_path))
            raise
        return len(plan.old_file_nodes)
    finally:
        with contextlib.suppress(Exception):
            monitor.close()


def _unlink_our_link(data_path: str, dest: str) -> None:
    """Remove DEST only if it is still the data file's second name (never a file someone
    else put there meanwhile)."""
    try:
        ours = os.stat(data_path)
        there = os.lstat(dest)
    except FileNotFoundError:
        return
    if (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino):
        os.unlink(dest)
        _fsync_dir(os.path.dirname(dest))


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle_handoffs(store: CacheStore) -> dict[str, str]:
    """At mount, before serving: finish or undo handoffs a killed daemon left under way, and
    drop the data file names of done ones. Returns {image: DEST} of every image handed over,
    which the mount must not serve."""
    handed_over: dict[str, str] = {}
    for handoff in store.handoffs():
        if not handoff.done and not _settle(store, handoff):
            continue  # undone: the image is served as before
        store.remove_data_file(handoff.name)  # if a kill came between commit and unlink
        handed_over[handoff.name] = handoff.dest
    return handed_over


def _settle(store: CacheStore, handoff: HandoffRecord) -> bool:
    """True if the handoff cut short is finished now, False if it was undone."""
    via = Via.from_json(handoff.via)
    try:
        from .qmp_switch import nodes_on, plan_switch, switch

        monitor = via.connect(SETTLE_TIMEOUT)
        try:
            on_dest = nodes_on(monitor, handoff.dest)
            if on_dest:
                with contextlib.suppress(CorfsError):  # nodes left on the dead mount, if any
                    switch(monitor, plan_switch(monitor, handoff.qemu_path, handoff.dest))
        finally:
            with contextlib.suppress(Exception):
                monitor.close()
    except CorfsError as exc:
        log.warning("handoff of %s to %s was cut short and %s does not answer (%s): undoing it",
                    handoff.name, handoff.dest, via.describe(), exc)
        on_dest = []
    if on_dest:
        if via.virsh is not None:
            from .virsh import repoint_persistent_disk

            with contextlib.suppress(CorfsError):
                repoint_persistent_disk(via.virsh, handoff.qemu_path, handoff.dest)
        store.drop_image(handoff.name, handed_over=True)
        log.warning("handoff of %s was cut short after QEMU switched to %s: finished it",
                    handoff.name, handoff.dest)
        return True
    _unlink_our_link(store.data_path(handoff.name), handoff.dest)
    store.mark_dirty(handoff.name)  # QEMU may have written to the shared inode: see module doc
    store.end_handoff(handoff.name)
    log.warning("handoff of %s to %s was cut short before QEMU switched: undone, %s is "
                "served from the cache as before", handoff.name, handoff.dest, handoff.name)
    return False
