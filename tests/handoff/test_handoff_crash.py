"""Issue 11, point 5: `kill -9` of the daemon at any step of a live handoff leaves the old
state or the new one, never both or neither. The daemon is stopped at a step (handoff.STALL_ENV)
and killed there; the next mount settles the handoff before serving: before QEMU switched, the
old state (DEST gone, the image served, QEMU still on MNT/IMAGE); after, the new one (QEMU on
DEST, the image not served, recorded detached). Also: an unmount mid-handoff settles it itself,
the handoff owns its image from the moment it is accepted, and a libvirt that does not answer
holds the settling mount no longer than SETTLE_TIMEOUT per question."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corfs.control_client import CONTROL_XATTR
from corfs.handoff import SETTLE_TIMEOUT, STALL_ENV, unsettled
from corfs.store import CacheStore
from tests.fuse.util import assert_one_line_error, image_status, live_status, wait_for
from tests.mounting import (
    CorfsDirs,
    CorfsMount,
    corfs_command,
    corfs_env,
    is_fuse_mounted,
    make_image,
    run_corfs,
)

from .qemu import Qemu

MIB = 1 << 20


@pytest.mark.parametrize(
    ("step", "qemu_answers", "new_state"),
    [
        ("journaled", True, False),
        ("linked", True, False),  # QEMU says it has no node on DEST: undone
        # QEMU cannot say, but the switch never began (no mark): QEMU never had DEST, undone
        ("linked", False, False),
        ("switched", True, True),
        ("switched", False, True),  # QEMU cannot say, the switch began: DEST stays, finished
    ],
)
def test_kill9_during_a_handoff_leaves_the_old_state_or_the_new(
    tmp_dirs: CorfsDirs, tmp_path: Path, step: str, qemu_answers: bool, new_state: bool
) -> None:
    base = make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=7)
    dest = tmp_path / "vm.raw"
    image = tmp_dirs.mnt / "disk.raw"
    with Qemu(tmp_path) as qemu:
        with tmp_dirs.mount(env={STALL_ENV: step}) as m:
            cli = _qemu_writes_then_detach(m, qemu, dest)
            try:
                wait_for(lambda: f"handoff stalled at {step}" in m.log_text(), 30,
                         f"the daemon to stall at {step}")
                m.kill9()  # also lazily unmounts the dead mount
            finally:
                cli.kill()
                cli.wait(10)
        on_dest = [f for f in qemu.file_nodes().values() if f == str(dest)]
        assert bool(on_dest) == (step == "switched")
        # Until a mount settles it, offline commands leave the image alone.
        refused = run_corfs("detach", tmp_dirs.cache, "disk.raw", tmp_path / "copy.raw")
        assert refused.returncode != 0 and "cut short" in refused.stderr
        if not qemu_answers:
            os.rename(qemu.socket, qemu.socket + ".gone")  # corfs cannot reach it
        with tmp_dirs.mount() as m:
            listed = "disk.raw" in os.listdir(m.mnt)
            status = image_status(live_status(m.mnt), "disk.raw")
            if new_state:
                assert not listed and status["state"] == "detached"
                assert status["detached_to"] == str(dest)
                assert not (tmp_dirs.cache / "data" / "disk.raw").exists()
            if step == "switched":
                assert str(image) not in qemu.file_nodes().values()
                qemu.qemu_io("d0", "write -P 0x6d 2M 64k")  # QEMU runs on DEST
                qemu.qemu_io("d0", "flush")
                want = bytearray(base.read_bytes())
                want[MIB : MIB + 65536] = b"\x5c" * 65536
                want[2 * MIB : 2 * MIB + 65536] = b"\x6d" * 65536
                assert dest.read_bytes() == bytes(want)
            elif new_state:  # finished without QEMU's word: DEST holds everything written
                want = bytearray(base.read_bytes())
                want[MIB : MIB + 65536] = b"\x5c" * 65536
                assert dest.read_bytes() == bytes(want)
            else:
                assert listed and status["state"] == "complete"
                assert not dest.exists()
                # DEST existed: no chunk may be taken for the base's any more; else only the
                # chunk written through the mount is dirty.
                assert status["dirty_bytes"] == (4 * MIB if step == "linked" else MIB)
                want = bytearray(base.read_bytes())
                want[MIB : MIB + 65536] = b"\x5c" * 65536
                assert image.read_bytes() == bytes(want)  # the write through the old mount
            m.stop()


def test_kill9_in_a_rollback_after_the_switch_began_keeps_the_chunks_dirty() -> None:
    """A handoff rolled back once QEMU's switch had begun (here: QEMU, another user, cannot
    open DEST) marks every chunk dirty: QEMU may have written to the shared inode. A kill -9
    once DEST is unlinked again must not lose that: the next mount cannot tell any more that
    DEST ever existed, and clean marks would let verify or a refetch put base bytes over
    QEMU's."""
    root = Path(tempfile.mkdtemp(prefix="corfs-handoff-", dir="/tmp"))  # others may traverse
    try:
        root.chmod(0o755)
        dirs = CorfsDirs.under(root)
        make_image(dirs.base / "disk.raw", 4 * MIB, seed=8)
        dest = root / "vm.raw"
        image = dirs.mnt / "disk.raw"
        with dirs.mount("--allow-other", "--mode", "666", env={STALL_ENV: "unlinked"}) as m, \
                Qemu(root, "-drive", f"file={image},if=none,id=drv0,format=raw",
                     as_nobody=True) as qemu:
            wait_for(lambda: image_status(live_status(m.mnt), "disk.raw")["fill_ratio"] == 1.0,
                     30, "the stream to complete")
            qemu.qemu_io("drv0", "write -P 0x5c 1M 64k")
            cli = subprocess.Popen(
                corfs_command("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket),
                env=corfs_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            try:
                wait_for(lambda: "handoff stalled at unlinked" in m.log_text(), 30,
                         "the daemon to stall at unlinked")
                m.kill9()
            finally:
                cli.kill()
                cli.wait(10)
        assert not dest.exists()
        with dirs.mount() as m:
            status = image_status(live_status(m.mnt), "disk.raw")
            assert status["state"] == "complete"
            assert status["dirty_bytes"] == 4 * MIB
            m.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _unmount_beside_a_poll(mnt: Path) -> None:
    """`fusermount3 -u MNT` while the waiting CLI polls the mount's status (a getxattr on MNT
    every 0.1 s): one that is in flight makes the unmount EBUSY, as it would for a user;
    on a loaded machine the polls are slow and one is often in flight. Asked again."""
    for _ in range(50):
        result = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
        if result.returncode == 0:
            return
        assert "busy" in result.stderr, result.stderr
        time.sleep(0.1)
    raise AssertionError(f"{mnt} stayed busy: {result.stderr}")


@pytest.mark.parametrize(
    ("step", "unmount"),
    [("linked", "SIGTERM"), ("switched", "SIGTERM"), ("switched", "fusermount3 -u")],
)
def test_an_unmount_during_a_handoff_settles_it(
    tmp_dirs: CorfsDirs, tmp_path: Path, step: str, unmount: str
) -> None:
    """A mount unmounted while a handoff runs (held at STEP) settles it on the way out rather
    than leave it cut short for the next mount: undone before QEMU switched; once QEMU runs
    on DEST, finished (recorded detached; an undo there would unlink DEST under QEMU). The
    CLI waiting for the handoff says which, the log says why."""
    base = make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=12)
    dest = tmp_path / "vm.raw"
    with Qemu(tmp_path) as qemu:
        with tmp_dirs.mount(env={STALL_ENV: step}) as m:
            cli = _qemu_writes_then_detach(m, qemu, dest, text=True)
            try:
                wait_for(lambda: f"handoff stalled at {step}" in m.log_text(), 30,
                         f"the daemon to stall at {step}")
                if unmount == "SIGTERM":
                    m.stop()
                else:  # QEMU holds nothing on the mount any more: a plain unmount works
                    _unmount_beside_a_poll(m.mnt)
                    assert m.proc is not None and m.proc.wait(30) == 0, m.log_tail()
                out, err = cli.communicate(timeout=60)
            finally:
                cli.kill()
                cli.wait(10)
        log_text = m.log_text()
        store = CacheStore.open(str(tmp_dirs.cache), lock=False, create=False)
        try:
            assert unsettled(store, "disk.raw") is None  # nothing left for the next mount
        finally:
            store.close()
        status = image_status(json.loads(run_corfs("status", tmp_dirs.cache, "--json",
                                                   check=True).stdout), "disk.raw")
        if step == "switched":
            assert "the mount is being unmounted: recording the handoff" in log_text
            assert cli.returncode == 0 and "handed over" in out, err
            assert status["state"] == "detached" and status["detached_to"] == str(dest)
            assert not (tmp_dirs.cache / "data" / "disk.raw").exists()
            _assert_qemu_runs_on(qemu, dest, base)
        else:
            assert "the mount is being unmounted: undoing the handoff" in log_text
            assert cli.returncode != 0 and len(err.strip().splitlines()) == 1, err
            assert "unmounted during the handoff" in err and "undone" in err
            assert status["state"] == "complete" and not dest.exists()
        with tmp_dirs.mount() as m:
            assert ("disk.raw" in os.listdir(m.mnt)) == (step == "linked")
            m.stop()
        assert "cut short" not in m.log_text()


def test_a_sigterm_during_the_qemu_switch_waits_for_it(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    """SIGTERM while QEMU is being re-pointed (its reopen drains I/O through the mount): the
    daemon unmounts only once the switch is over (a second SIGTERM is answered, not obeyed),
    so the handoff ends as if nothing came: the CLI says handed over, QEMU writes to DEST,
    nothing is left for the next mount."""
    base = make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=13)
    dest = tmp_path / "vm.raw"
    with Qemu(tmp_path) as qemu:
        with tmp_dirs.mount(env={STALL_ENV: "switching"}) as m:
            cli = _qemu_writes_then_detach(m, qemu, dest, text=True)
            try:
                wait_for(lambda: "handoff pausing at switching" in m.log_text(), 30,
                         "the switch to begin")
                assert m.proc is not None
                m.proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                m.proc.send_signal(signal.SIGTERM)  # an impatient second one: answered
                # The switch pauses SWITCH_PAUSE_S: the mount stays until it is over (it was
                # unmounted at once, under QEMU's reopen).
                time.sleep(1.0)  # a daemon that does not wait has unmounted by now
                mounted_during_switch = is_fuse_mounted(m.mnt)
                switch_over = "QEMU now uses" in m.log_text()
                m.stop()  # the daemon is ending: this waits for it
                out, err = cli.communicate(timeout=60)
            finally:
                cli.kill()
                cli.wait(10)
        assert not switch_over, "the switch ended before the daemon saw the signal: no test"
        assert mounted_during_switch, "unmounted while QEMU was being re-pointed"
        assert "waiting for QEMU's switch of disk.raw" in m.log_text()
        assert "SIGTERM received again: still waiting for QEMU's switch of disk.raw" in (
            m.log_text()
        )
        assert cli.returncode == 0 and "handed over" in out, err
        _assert_qemu_runs_on(qemu, dest, base)
    store = CacheStore.open(str(tmp_dirs.cache), lock=False, create=False)
    try:
        assert unsettled(store, "disk.raw") is None
    finally:
        store.close()


def _virsh_handoff_killed_at(tmp_dirs: CorfsDirs, dest: Path, step: str, seed: int) -> None:
    """A --virsh handoff of a complete disk.raw to `dest`, the daemon killed at `step`."""
    make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=seed)
    with tmp_dirs.mount(env={STALL_ENV: step}) as m:
        wait_for(lambda: image_status(live_status(m.mnt), "disk.raw")["fill_ratio"] == 1.0,
                 30, "the stream to complete")
        command = {"op": "handoff", "image": "disk.raw", "dest": str(dest), "virsh": "vm1"}
        os.setxattr(m.mnt, CONTROL_XATTR, json.dumps(command).encode())  # no virsh call yet
        wait_for(lambda: f"handoff stalled at {step}" in m.log_text(), 30,
                 f"the daemon to stall at {step}")
        m.kill9()


def _path_with_virsh(tmp_path: Path, script: str) -> dict[str, str]:
    """The environment of a mount whose `virsh` is `script` (a stand-in for libvirt)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    virsh = fake_bin / "virsh"
    virsh.write_text(script)
    virsh.chmod(0o755)
    return {"PATH": f"{fake_bin}:{os.environ['PATH']}"}


def test_a_libvirt_that_does_not_answer_holds_the_settling_mount_only_its_timeout(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    """A --virsh handoff cut short once DEST was linked: the next mount asks the domain's
    QEMU through `virsh` whether it runs on DEST. A libvirt that does not answer (a `virsh`
    that sleeps: it stands in for the external command) holds the mount SETTLE_TIMEOUT per
    question, not virsh's minute-long defaults. With no answer and no mark that the switch
    began (it was cut short before), QEMU never had DEST: DEST goes, the handoff is undone."""
    dest = tmp_path / "vm.raw"
    _virsh_handoff_killed_at(tmp_dirs, dest, "linked", seed=10)
    # longer than virsh.py's own timeouts
    env = _path_with_virsh(tmp_path, "#!/bin/sh\nexec sleep 90\n")
    started = time.monotonic()
    with tmp_dirs.mount(env=env, timeout=4 * SETTLE_TIMEOUT) as m:
        took = time.monotonic() - started
        status = image_status(live_status(m.mnt), "disk.raw")
        assert status["state"] == "complete", status
        m.stop()
    # Two questions (the QEMU's nodes, the domain's definition), each cut at SETTLE_TIMEOUT.
    assert took < 2 * SETTLE_TIMEOUT + 10, took
    log_text = m.log_text()
    assert f"gave no answer within {SETTLE_TIMEOUT:g} s" in log_text
    assert f"persistent definition could not be pointed at {tmp_dirs.mnt / 'disk.raw'}" in (
        log_text)
    assert not dest.exists()


def test_a_virsh_handoff_cut_short_before_dest_was_linked_asks_libvirt_nothing(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    """Killed before DEST was linked, a --virsh handoff is undone at the next mount without a
    question to libvirt: QEMU cannot run on a DEST that never existed, and the domain's
    definition is re-pointed only after QEMU switched. (The mount asked virsh to re-point it
    back anyway, a libvirt that does not answer holding the mount SETTLE_TIMEOUT.)"""
    dest = tmp_path / "vm.raw"
    _virsh_handoff_killed_at(tmp_dirs, dest, "journaled", seed=12)
    calls = tmp_path / "virsh-calls"
    env = _path_with_virsh(tmp_path, f'#!/bin/sh\necho "$@" >> {calls}\nexec sleep 90\n')
    started = time.monotonic()
    with tmp_dirs.mount(env=env, timeout=4 * SETTLE_TIMEOUT) as m:
        took = time.monotonic() - started
        status = image_status(live_status(m.mnt), "disk.raw")
        assert status["state"] == "complete", status
        m.stop()
    assert not calls.exists(), calls.read_text()
    assert took < SETTLE_TIMEOUT, took
    assert "was cut short before QEMU switched: undone" in m.log_text()
    assert not dest.exists()


def test_a_handoff_claims_its_image_when_it_is_accepted(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    """The daemon answers a handoff's setxattr at once and runs it in the background: from
    that answer on, the image is the handoff's. A forget (a scrub's) or a second handoff
    coming before the background task begins is refused with EBUSY; a forget let in there
    would make the image incomplete under the handoff (or a refill race its link)."""
    make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=11)
    with tmp_dirs.mount(env={STALL_ENV: "accepted"}) as m:
        wait_for(lambda: image_status(live_status(m.mnt), "disk.raw")["fill_ratio"] == 1.0,
                 30, "the stream to complete")
        command = {"op": "handoff", "image": "disk.raw", "dest": str(tmp_path / "vm.raw"),
                   "qmp": str(tmp_path / "qmp.sock")}
        os.setxattr(m.mnt, CONTROL_XATTR, json.dumps(command).encode())
        wait_for(lambda: "handoff stalled at accepted" in m.log_text(), 30,
                 "the background task to stall before its first step")
        for other in ({"op": "forget", "image": "disk.raw", "chunks": [0]},
                      dict(command, dest=str(tmp_path / "other.raw"))):
            with pytest.raises(OSError) as refused:
                os.setxattr(m.mnt, CONTROL_XATTR, json.dumps(other).encode())
            assert refused.value.errno == errno.EBUSY, other["op"]
        status = image_status(live_status(m.mnt), "disk.raw")
        assert status["fill_ratio"] == 1.0 and status["handing_over"] is True
        m.stop()  # the handoff, cancelled before its first step, leaves nothing to settle
    assert "was cut short" not in m.log_text()
    with tmp_dirs.mount() as m:
        assert image_status(live_status(m.mnt), "disk.raw")["state"] == "complete"
        m.stop()
    assert "was cut short" not in m.log_text()


def test_the_mount_and_its_control_do_not_wait_for_a_handoff(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    """A handoff can take minutes (QMP timeouts, a drain). While a setxattr is unanswered
    the kernel holds the mount's root directory locked: `ls MNT`, lookups of names (a VM
    opening another image) and every other control command would wait for the handoff.
    Here it is stalled for good; they must still answer."""
    with _handoff_stalled_at_journaled(tmp_dirs, tmp_path) as m:
        others: list[subprocess.Popen[bytes]] = []
        try:
            others = [subprocess.Popen(["ls", m.mnt], stdout=subprocess.DEVNULL),
                      subprocess.Popen(corfs_command("stream", "pause", m.mnt),
                                       env=corfs_env(), stderr=subprocess.DEVNULL)]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(p.poll() is None for p in others):
                time.sleep(0.1)
            answered = [p.poll() for p in others]
            if answered == [0, 0]:  # the CLI waits, and so can status say so
                assert image_status(live_status(m.mnt), "disk.raw")["handing_over"] is True
        finally:
            m.kill9()  # also ends what still waits on the mount
            for p in others:
                p.kill()
                p.wait(10)
        assert answered == [0, 0], "ls MNT / corfs stream pause waited for the handoff"


def test_verify_during_a_handoff_says_so(tmp_dirs: CorfsDirs, tmp_path: Path) -> None:
    """A scrub of a mounted cache that finds a bad chunk while the image is being handed over
    is refused (no refill into the file QEMU is taking over) with a line that says why, not
    "MNT has no image"."""
    with _handoff_stalled_at_journaled(tmp_dirs, tmp_path) as m:  # marks committed first
        try:
            fd = os.open(tmp_dirs.cache / "data" / "disk.raw", os.O_RDWR)
            try:
                os.pwrite(fd, bytes(b ^ 0x5A for b in os.pread(fd, 16, 0)), 0)
            finally:
                os.close(fd)
            line = assert_one_line_error(run_corfs("verify", tmp_dirs.cache, "disk.raw"),
                                         "handoff")
            assert "has no image" not in line
        finally:
            m.kill9()


@contextlib.contextmanager
def _handoff_stalled_at_journaled(tmp_dirs: CorfsDirs, tmp_path: Path) -> Iterator[CorfsMount]:
    """A mount of a complete disk.raw whose `corfs detach --qmp` (no QEMU there) the daemon
    holds at its first step, journaled; the CLI is stopped on the way out."""
    make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=9)
    with tmp_dirs.mount(env={STALL_ENV: "journaled"}) as m:
        wait_for(lambda: image_status(live_status(m.mnt), "disk.raw")["fill_ratio"] == 1.0,
                 30, "the stream to complete")
        cli = subprocess.Popen(
            corfs_command("detach", m.mnt, "disk.raw", tmp_path / "vm.raw", "--qmp",
                          tmp_path / "qmp.sock"),
            env=corfs_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            wait_for(lambda: "handoff stalled at journaled" in m.log_text(), 30,
                     "the daemon to stall at journaled")
            yield m
        finally:
            cli.kill()
            cli.wait(10)


def _qemu_writes_then_detach(
    m: CorfsMount, qemu: Qemu, dest: Path, text: bool = False
) -> subprocess.Popen:
    """Once disk.raw is complete, QEMU opens it through the mount (nodes f0, d0) and writes
    to it; then a `corfs detach` to DEST over QMP starts (its CLI process returned)."""
    wait_for(lambda: image_status(live_status(m.mnt), "disk.raw")["fill_ratio"] == 1.0,
             30, "the stream to complete")
    image = m.mnt / "disk.raw"
    qemu.qmp("blockdev-add", driver="file", filename=str(image), **{"node-name": "f0"})
    qemu.qmp("blockdev-add", driver="raw", file="f0", **{"node-name": "d0"})
    qemu.qemu_io("d0", "write -P 0x5c 1M 64k")
    return subprocess.Popen(
        corfs_command("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket),
        env=corfs_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text,
    )


def _assert_qemu_runs_on(qemu: Qemu, dest: Path, base: Path) -> None:
    """QEMU's only file node is DEST, and DEST holds the base with the write made before the
    handoff (_qemu_writes_then_detach) and one made now."""
    assert list(qemu.file_nodes().values()) == [str(dest)]
    qemu.qemu_io("d0", "write -P 0x6d 2M 64k")
    qemu.qemu_io("d0", "flush")
    want = bytearray(base.read_bytes())
    want[MIB : MIB + 65536] = b"\x5c" * 65536
    want[2 * MIB : 2 * MIB + 65536] = b"\x6d" * 65536
    assert dest.read_bytes() == bytes(want)


def test_a_qemu_that_dies_during_the_switch_is_not_reported_as_handed_over(
    tmp_dirs: CorfsDirs, tmp_path: Path
) -> None:
    """QEMU dies (its QMP socket with it) while it is being re-pointed: corfs cannot tell
    whether it had switched, so it keeps DEST and finishes the handoff (DEST is never removed
    under a QEMU that may use it). But nothing confirmed the switch: `corfs detach` must not
    say "handed over" and exit 0 as if it had, and the status must say so, not just
    "detached"."""
    base = make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=17)
    dest = tmp_path / "vm.raw"
    with Qemu(tmp_path) as qemu, tmp_dirs.mount(env={STALL_ENV: "switching"}) as m:
        cli = _qemu_writes_then_detach(m, qemu, dest, text=True)
        try:
            wait_for(lambda: "handoff pausing at switching" in m.log_text(), 30,
                     "the switch to begin")
            assert qemu.proc is not None
            qemu.proc.kill()  # QEMU crashes mid-handoff
            qemu.proc.wait(10)
            out, err = cli.communicate(timeout=60)
        finally:
            cli.kill()
            cli.wait(10)
        status = image_status(live_status(m.mnt), "disk.raw")
        # The data is kept: DEST is the whole image (the write made before included).
        want = bytearray(base.read_bytes())
        want[MIB : MIB + 65536] = b"\x5c" * 65536
        assert dest.read_bytes() == bytes(want)
        assert status["state"] == "detached" and status["detached_to"] == str(dest)
        assert_one_line_error(
            subprocess.CompletedProcess(cli.args, cli.returncode, out, err),
            "could not be confirmed", str(dest),
        )
        assert "could not be confirmed" in (status["handoff_error"] or ""), status
        m.stop()
