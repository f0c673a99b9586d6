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
before serving (`settle_handoffs`; offline commands refuse the image meanwhile): undone (the
old state: DEST unlinked, the image's chunks marked dirty since a QEMU that was switched may
have written to the shared inode, a --virsh definition pointed back) only when DEST was never
linked or the QEMU answers with no node on DEST; otherwise, QEMU on DEST or not answering,
finished (the new state): DEST is never unlinked under a QEMU that may run on it. A failure
while the daemon lives follows the same rule: a rollback that cannot get QEMU off DEST
finishes the handoff instead, and one that did marks the chunks dirty and drops the
kernel's cached pages (QEMU may have written to the inode meanwhile). An unmount during a
handoff (the mount's nursery cancelled) settles it rather than cut it short: once QEMU runs on
DEST the handoff is recorded, before that it is undone, either step shielded
(`_unless_unmounting_stops_it`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import trio

from .cache_layout import data_path_in
from .durable import fsync_dir
from .errors import (
    CorfsError,
    HandoffUnconfirmed,
    HandoffUnderWay,
    NotLocalError,
    QmpError,
    UsageError,
)
from .image import Image
from .qemu_cmdline import Started, qemu_pid_for_socket, started_options
from .store import CacheStore, HandoffRecord

log = logging.getLogger(__name__)

# QEMU answers each monitor command within this (a reopen drains in-flight I/O first). QEMU
# serves one client per QMP socket: while another holds it, connecting waits this long too.
QMP_TIMEOUT = 30.0
SETTLE_TIMEOUT = 10.0  # asking a QEMU at mount whether a handoff cut short had switched it
FINISH_TIMEOUT = 15.0  # for a handoff's last step while the mount is being unmounted
# The crash tests (tests/handoff) kill -9 the daemon between two steps: set to a step's name,
# the daemon logs "handoff stalled at STEP" there and waits forever. Set to "switching", the
# switch's worker thread pauses SWITCH_PAUSE_S before it re-points QEMU (it cannot wait forever:
# an unmount waits for the switch).
STALL_ENV = "CORFS_TEST_HANDOFF_STALL_AT"
SWITCH_PAUSE_S = 3.0


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

    def connect(self, timeout: float | None = None):  # a qmp_switch.Monitor
        """A monitor whose every command answers within `timeout` seconds or fails (QmpError);
        None: the transport's own bound for a live switch (a reopen drains I/O first)."""
        if self.qmp is not None:
            from .qmp_switch import connect_socket

            return connect_socket(self.qmp, QMP_TIMEOUT if timeout is None else timeout)
        from .virsh import COMMAND_TIMEOUT, VirshMonitor

        assert self.virsh is not None  # Via holds one of the two
        return VirshMonitor(self.virsh, timeout=COMMAND_TIMEOUT if timeout is None else timeout)


def check_dest(
    data_path: str, dest: str, mountpoint: str | None = None, bases: Iterable[str] = ()
) -> None:
    """UsageError (one line, nothing changed) unless DEST can become the data file's name:
    an absolute path, not existing, beside CACHE (a hard link cannot cross file systems), not
    inside CACHE (the store owns its names), the mount (whose daemon this may be) or a local
    BASE directory among `bases` (check_dest_outside_base)."""
    if not os.path.isabs(dest):
        raise UsageError(f"DEST {dest} must be an absolute path")
    cache_dir = os.path.dirname(os.path.dirname(data_path))
    for inside in (cache_dir, mountpoint):  # abspath: MNT may be given relative (no lookup)
        if inside and os.path.normpath(dest).startswith(os.path.abspath(inside) + os.sep):
            raise UsageError(f"DEST {dest} must not be inside {inside}")
    if os.path.lexists(dest):
        raise UsageError(f"{dest} already exists; choose a new file name")
    dest_dir = os.path.dirname(os.path.abspath(dest))
    # Through a symlink DEST may still land in CACHE (e.g. data/OTHER, which a later mount
    # creates with O_TRUNC for a base image OTHER). The mount needs no such check: the
    # st_dev test below refuses it (and resolving it here could touch the mount).
    check_dest_outside_cache(dest, cache_dir)
    check_dest_outside_base(dest, bases)
    try:
        dest_dev = os.stat(dest_dir).st_dev
    except OSError as exc:
        raise UsageError(f"the directory of {dest}: {exc.strerror}") from None
    if dest_dev != os.stat(data_path).st_dev:
        raise UsageError(
            f"{dest} is on another file system than the cache {os.path.dirname(data_path)}: "
            "a live handoff renames the data file, it cannot copy it; choose DEST beside CACHE"
        )


def check_dest_outside_cache(dest: str, cache_dir: str) -> None:
    """UsageError if DEST would be a name in CACHE (symlinks resolved): the store owns its
    names (data/OTHER is the data file a later mount creates for a base image OTHER)."""
    real_cache = os.path.realpath(cache_dir)
    if _within(os.path.realpath(os.path.dirname(os.path.abspath(dest))), real_cache):
        raise UsageError(f"DEST {dest} must not be inside {cache_dir} (it is {real_cache})")


def check_dest_outside_base(dest: str, bases: Iterable[str]) -> None:
    """UsageError if DEST would be a new file in one of `bases` that is a local directory
    (symlinks resolved): BASE is read-only to corfs, and the next mount would list the file as
    a new base image. Remote bases (URLs) cannot be written here: nothing to check."""
    real_dest_dir = os.path.realpath(os.path.dirname(os.path.abspath(dest)))
    for base in bases:
        if "://" in base or not os.path.isabs(base):
            continue
        real_base = os.path.realpath(base)
        if _within(real_dest_dir, real_base):
            raise UsageError(
                f"DEST {dest} must not be inside the base directory {base}: corfs never "
                "writes to BASE (and a file there would be served as a new image)"
            )


def _within(real_dir: str, real_top: str) -> bool:
    """Whether `real_dir` is `real_top` or below it (both resolved already)."""
    return (real_dir + os.sep).startswith(real_top.rstrip(os.sep) + os.sep)


def claim_for_handoff(image: Image) -> None:
    """Make `image` a handoff's, with no await in between: control.py calls this as it
    accepts the request, before the handoff runs in the background, so that a forget
    (Image.forget_chunk) or a second handoff arriving meanwhile is refused (HandoffUnderWay,
    EBUSY) and never races the first steps. `hand_over` takes the claim over and ends it."""
    image.check_served()  # handed over already (ImageHandedOver)
    if image.stopping:
        raise UsageError(f"{image.name}: the mount is being unmounted")
    if image.handing_over:
        raise HandoffUnderWay(f"{image.name}: a live handoff of it is under way already")
    image.handing_over = True


async def hand_over(
    image: Image, store: CacheStore, qemu_path: str, dest: str, via: Via, *, base: str
) -> int:
    """Steps 1-6 of the module docstring for an image claimed by `claim_for_handoff`; returns
    how many QEMU nodes were switched. Any failure undoes what was done and raises (the image
    is served as before). `base`: the mount's BASE, which DEST must stay out of (as must the
    one the image was cached from). The claim ends with it, whatever happens."""
    assert image.handing_over, "claim_for_handoff first"
    try:
        await _stall_for_tests("accepted")
        return await _hand_over(image, store, qemu_path, dest, via, (base, image.record.base))
    finally:
        image.handing_over = False


async def _hand_over(
    image: Image, store: CacheStore, qemu_path: str, dest: str, via: Via, bases: tuple[str, ...]
) -> int:
    name = image.name
    unconfirmed = ""  # why QEMU's switch could not be confirmed (finished all the same)
    if not image.complete:
        raise NotLocalError(
            f"{name} is not fully local ({image.local_bytes / image.size:.1%}): "
            "wait for the stream (--wait)"
        )
    data_path = store.data_path(name)  # the held CACHE's: what is linked
    # Off the trio thread: a DEST on a hung file system must not stall the mount's I/O. By
    # the held CACHE's present name (the one the user gave may be gone or point elsewhere).
    named = data_path_in(os.path.realpath(store.root), name)
    await trio.to_thread.run_sync(check_dest, named, dest, os.path.dirname(qemu_path), bases)
    await store.commit()
    journal_via = json.dumps({**json.loads(via.to_json()), MARKS_SWITCH: True})
    record = HandoffRecord(name, image.size, dest, journal_via, qemu_path, False, time.time())
    await trio.to_thread.run_sync(store.begin_handoff, record)

    def written_outside() -> None:
        """QEMU may write to the shared inode: every chunk dirty, durably (the mount settling
        a handoff cut short reads this), and the kernel's pages of the image stale."""
        image.mark_written_outside()
        store.mark_dirty(name)

    attempt = _Attempt(lambda: trio.from_thread.run_sync(written_outside))
    try:
        await _stall_for_tests("journaled")
        await trio.to_thread.run_sync(_link, data_path, dest)
        try:
            await _stall_for_tests("linked")
            # No await between this check and the flag: a SIGTERM either sees the switch and
            # waits for it, or comes first and the handoff is undone (mount.py).
            if image.stopping:
                raise CorfsError(f"{name}: the mount is being unmounted; handoff undone")
            image.switching_qemu = True
            try:
                switched = await trio.to_thread.run_sync(
                    _switch_qemu, via, qemu_path, dest, store.data_fd(name), attempt
                )
            finally:
                image.switching_qemu = False
        except _StillOnDest as still:
            log.error("%s: finishing the handoff to %s instead", still, dest)
            switched = -1
            unconfirmed = str(still)
        except BaseException:
            try:
                if attempt.switch_started:  # QEMU may have written to the shared inode
                    # Again, now: pages read since the mark may be stale. Durably before DEST
                    # goes. Not in a thread: a cancelled rollback must still get here.
                    written_outside()
            finally:
                _unlink_our_link(data_path, dest)
            await _stall_for_tests("unlinked")
            raise
    except BaseException:
        with _unless_unmounting_stops_it(f"undoing the handoff of {name}"):
            await trio.to_thread.run_sync(store.end_handoff, name)
        raise
    # QEMU runs on DEST: from here the handoff is finished, whatever comes (an unmount too).
    try:
        await _stall_for_tests("switched")  # where the tests kill -9 the daemon or unmount
    finally:
        image.handed_over_to = dest  # not served from here on, even if the commit fails
        with _unless_unmounting_stops_it(f"recording the handoff of {name} to {dest}") as step:
            await store.drop_handed_over(name)  # the commit point
            log.info("handed %s over to %s: QEMU now uses %s (%s)", name, via.describe(), dest,
                     f"{switched} node(s)" if switched >= 0 else "after a failed rollback")
        if step.cancelled_caught:  # never a success the cache does not record
            raise CorfsError(
                f"the handoff of {name} to {dest} was cut short by the unmount: QEMU runs on "
                "DEST; the next mount of the cache settles it"
            )
    if unconfirmed:  # finished to keep DEST, but no QEMU said it runs on it: never a success
        raise HandoffUnconfirmed(
            f"QEMU's switch of {name} to {dest} could not be confirmed ({unconfirmed}): the "
            f"handoff was finished so that DEST stays (QEMU may run on it) and {name} is no "
            "longer served; check the VM"
        )
    return switched


@contextlib.contextmanager
def _unless_unmounting_stops_it(what: str) -> Iterator[trio.CancelScope]:
    """Run the last step of a handoff to its end even when the mount is being unmounted (its
    nursery cancelled), so that the unmount leaves the handoff settled, not cut short: the
    step is shielded. On a live mount it has no deadline: it waits for the store's lock as
    long as a commit holds it (a commit point given up would leave the journal unsettled).
    Once the unmount's cancel has come it gets FINISH_TIMEOUT to start and end; past that it
    is given up, logged (`cancelled_caught` on the scope yielded), and the journal row is
    left for the next mount to settle. A worker thread already running (a commit in a slow
    fdatasync) is waited for all the same: trio does not abandon it."""
    unmounting = trio.current_effective_deadline() == -math.inf  # the mount's cancel came
    if unmounting:
        log.warning("the mount is being unmounted: %s first", what)
    with trio.CancelScope(shield=True) as shield:
        if unmounting:
            shield.deadline = trio.current_time() + FINISH_TIMEOUT
        yield shield
    if shield.cancelled_caught:
        log.error("%s took over %g s: given up, the next mount settles it from the journal",
                  what, FINISH_TIMEOUT)


MARKS_SWITCH = "marks_switch"  # in a journal row's via: see _switch_may_have_begun


@dataclass
class _Attempt:
    """What a handoff got to, for its rollback. `mark_switch`: called (from the worker thread)
    just before QEMU is first asked to touch DEST; it marks every chunk dirty, durably, so a
    mount settling the handoff cut short can tell a switch that never began."""

    mark_switch: Callable[[], None]
    switch_started: bool = False


class _StillOnDest(CorfsError):
    """A step after the switch failed and QEMU could not be switched back: it runs on DEST,
    so the handoff is finished rather than DEST unlinked under it."""


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
    fsync_dir(os.path.dirname(dest))


def _switch_qemu(via: Via, qemu_path: str, dest: str, data_fd: int, attempt: _Attempt) -> int:
    """Worker thread: re-point every node of QEMU on `qemu_path` to `dest`, then sync what the
    reopen drained. With --virsh, the domain's persistent definition follows; if that fails,
    QEMU is switched back. _StillOnDest if it cannot be."""
    from .qmp_switch import end_header_job, plan_switch, rename_backing, switch

    started_of = _started_options_of(via)
    started = started_of(qemu_path)

    monitor = via.connect()
    try:
        end_header_job(monitor)
        plan = plan_switch(monitor, qemu_path, dest, started=started)
        if os.environ.get(STALL_ENV) == "switching":
            log.warning("handoff pausing at switching")
            time.sleep(SWITCH_PAUSE_S)
        attempt.mark_switch()
        attempt.switch_started = True
        try:
            switch(monitor, plan)  # all or nothing itself
        except BaseException:
            _fail_closed(monitor, via, dest)
            raise
        renamed: list[str] = []
        repointing = False
        try:
            rename_backing(  # qcow2 overlays' headers
                monitor, qemu_path, dest, renamed, started_of=started_of
            )
            os.fdatasync(data_fd)
            if via.virsh is not None:
                from .virsh import repoint_persistent_disk

                repointing = True
                repoint_persistent_disk(via.virsh, qemu_path, dest)
        except BaseException:
            try:
                # Back with QEMU's defaults for what QMP does not report: only a step after a
                # switch that worked gets here.
                switch(monitor, plan_switch(monitor, dest, qemu_path))
            except Exception as exc:
                log.error("switching QEMU back to %s failed: %s", qemu_path, exc)
            try:
                _fail_closed(monitor, via, dest)
            except _StillOnDest:
                # DEST stays under QEMU: overlays and the definition go on naming it (the
                # mount no longer serves the image, and a --forget-detached would boot a
                # fresh copy of the base). Undone before the switch back was, they did not.
                with contextlib.suppress(Exception):
                    rename_backing(monitor, qemu_path, dest, [], started_of=started_of)
                if repointing:
                    _settle_definition(via, qemu_path, dest)
                raise
            # QEMU is off DEST, which goes: what names it names the mount again.
            if repointing:  # libvirt may have taken it and virsh timed out
                _settle_definition(via, dest, qemu_path)
            try:
                rename_backing(monitor, dest, qemu_path, [], only=renamed, started_of=started_of)
            except Exception as exc:
                log.error("overlay(s) %s may still name %s, which goes, as their backing file: "
                          "%s", ", ".join(renamed), dest, exc)
            raise
        return len(plan.old_file_nodes)
    finally:
        with contextlib.suppress(Exception):
            monitor.close()


def _started_options_of(via: Via) -> Callable[[str], Started]:
    """The options the QEMU behind `via` was started with for a file (qemu_cmdline.py)."""
    pid = via.qemu_pid()
    return lambda path: started_options(pid, path)


def _fail_closed(monitor, via: Via, dest: str) -> None:
    """After a failed switch or rollback: if QEMU still has a node on DEST, DEST must stay.
    What failed may be the connection, not QEMU (hunt: one dropped before the reopen finished
    the handoff "unconfirmed", and the guest, never switched, got ESTALE from then on): QEMU
    is asked again on a new one, once the nodes the cut switch added and no one uses are
    deleted there."""
    from .qmp_switch import drop_unused_nodes_on, nodes_on

    try:
        left = nodes_on(monitor, dest)
    except CorfsError:
        try:
            fresh = via.connect(SETTLE_TIMEOUT)
            try:
                drop_unused_nodes_on(fresh, dest)
                left = nodes_on(fresh, dest)
            finally:
                with contextlib.suppress(Exception):
                    fresh.close()
        except CorfsError as exc:
            raise _StillOnDest(f"cannot tell whether QEMU still uses {dest} ({exc})") from None
    if left:
        raise _StillOnDest(f"QEMU still has node(s) {', '.join(left)} on {dest}")


def _unlink_our_link(data_path: str, dest: str) -> None:
    """Remove DEST only if it is still the data file's second name (never a file someone
    else put there meanwhile)."""
    if _is_our_link(data_path, dest):
        os.unlink(dest)
        fsync_dir(os.path.dirname(dest))


def unsettled(store: CacheStore, name: str) -> str | None:
    """Why an offline command must leave `name` alone: a handoff of it was cut short and only
    a mount settles it (it may have to ask the QEMU)."""
    for handoff in store.handoffs():
        if handoff.name == name and not handoff.done:
            return (f"a live handoff of {name} to {handoff.dest} was cut short: mount the "
                    "cache once to settle it")
    return None


def no_image_error(store: CacheStore, cache_dir: str, name: str) -> UsageError:
    """`name` is not among CACHE's images: say so, or to which file it was handed over live
    (`corfs status CACHE` lists it as detached: "has no image" sent admins looking for it)."""
    for handoff in store.handoffs():
        if handoff.name == name and handoff.done:
            return UsageError(
                f"{name} was handed over live to {handoff.dest}: its data is that file now "
                f"(corfs mount --forget-detached {name} serves it from the base again)"
            )
    return UsageError(f"{cache_dir} has no image {name!r}")


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
    """True if the handoff cut short is finished now, False if it was undone. Undone only
    when that QEMU answers and has no node on DEST, or DEST was never linked; a QEMU that does
    not answer may be running on DEST, so DEST stays and the handoff is finished."""
    via = Via.from_json(handoff.via)
    linked = _is_our_link(store.data_path(handoff.name), handoff.dest)
    answered = False
    on_dest: list[str] = []
    if linked:
        try:
            on_dest = _finish_qemu_side(via, handoff)
            answered = True
        except CorfsError as exc:
            log.warning("handoff of %s to %s was cut short and %s does not answer (%s)",
                        handoff.name, handoff.dest, via.describe(), exc)
    # A QEMU that does not answer may run on DEST, unless the switch never began: then it
    # never had DEST (hunt: finished anyway, a qcow2 overlay went on naming the mount, which
    # served the image no more, and the VM could not start).
    if linked and (on_dest or (not answered and _switch_may_have_begun(store, handoff))):
        _settle_definition(via, handoff.qemu_path, handoff.dest)
        store.drop_image(handoff.name, handed_over=True)
        log.warning("handoff of %s to %s was cut short %s: finished it (not served here any "
                    "more)", handoff.name, handoff.dest,
                    "after QEMU switched" if on_dest else "and QEMU's state is unknown")
        return True
    if linked:
        # It may name DEST already (re-pointed after QEMU switched, then QEMU switched back
        # when that failed); before DEST was linked it cannot, and libvirt is not asked.
        _settle_definition(via, handoff.dest, handoff.qemu_path)
        # QEMU may have had the shared inode open: see the module docstring
        store.mark_dirty(handoff.name)  # first: once DEST is gone, a crash would not tell
        _unlink_our_link(store.data_path(handoff.name), handoff.dest)
    store.end_handoff(handoff.name)
    log.warning("handoff of %s to %s was cut short before QEMU switched: undone, %s is "
                "served from the cache as before", handoff.name, handoff.dest, handoff.name)
    return False


def _switch_may_have_begun(store: CacheStore, handoff: HandoffRecord) -> bool:
    """False only when the journal row comes from a corfs that marks the switch (every chunk
    dirty, durably, before QEMU is first asked to touch DEST) and the mark is not there."""
    if not json.loads(handoff.via).get(MARKS_SWITCH):
        return True  # an older corfs's row: nothing tells
    record = store.record_of(handoff.name)
    if record is None:
        return True
    states, dirty = store.load_states(record)
    return dirty == len(states)


def _settle_definition(via: Via, old_path: str, new_path: str) -> None:
    """With --virsh, the domain's persistent definition names `new_path` where it names
    `old_path`. A libvirt that does not answer is said in the log (a restart of the domain
    would boot `old_path`), not fatal: the mount must come up."""
    if via.virsh is None:
        return
    from .virsh import repoint_persistent_disk

    try:
        repoint_persistent_disk(via.virsh, old_path, new_path, timeout=SETTLE_TIMEOUT)
    except QmpError as exc:
        log.warning("domain %s: its persistent definition could not be pointed at %s: %s",
                    via.virsh, new_path, exc)
    except CorfsError as exc:  # libvirt has no such domain any more
        log.warning("domain %s: its persistent definition not pointed at %s: %s",
                    via.virsh, new_path, exc)


def _finish_qemu_side(via: Via, handoff: HandoffRecord) -> list[str]:
    """The QEMU's nodes on DEST; if it has any, move what is left on the old path there too
    and name DEST in overlay headers. CorfsError if QEMU cannot be asked."""
    from .qmp_switch import finish_cut_mirrors, nodes_on, plan_switch, rename_backing, switch

    monitor = via.connect(SETTLE_TIMEOUT)
    try:
        finish_cut_mirrors(monitor)  # a node on DEST is then QEMU's, not a job's target
        on_dest = nodes_on(monitor, handoff.dest)
        if on_dest:
            with contextlib.suppress(CorfsError):  # nodes left on the dead mount, if any
                switch(monitor, plan_switch(monitor, handoff.qemu_path, handoff.dest))
            with contextlib.suppress(CorfsError):
                rename_backing(monitor, handoff.qemu_path, handoff.dest, [],
                               started_of=_started_options_of(via))
        return on_dest
    finally:
        with contextlib.suppress(Exception):
            monitor.close()


def _is_our_link(data_path: str, dest: str) -> bool:
    try:
        ours, there = os.stat(data_path), os.lstat(dest)
    except FileNotFoundError:
        return False
    return (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino)
