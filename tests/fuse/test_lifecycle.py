"""Issue 2, point 10: life cycle. SIGINT, SIGTERM and SIGHUP end a mount cleanly (exit 0, unmounted,
chunk state committed); so does `fusermount3 -u MNT`; `--daemon` returns once the mount is
ready; `--allow-other` mounts with allow_other."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time

import pytest

from tests.hostile import Answer, HostileServer
from tests.mounting import (
    CorfsMount,
    _find_daemon_pid,
    _wait_pid_gone,
    corfs_command,
    corfs_env,
    is_fuse_mounted,
    is_mounted,
    lazy_unmount,
    make_image,
    run_corfs,
)

from .util import (
    KIB,
    MIB,
    direct_read,
    direct_write,
    image_status,
    live_status,
    mount_options,
    status,
    wait_for,
)

SIZE = 4 * MIB


@pytest.mark.parametrize(
    "sig",
    # SIGHUP: the terminal of a foreground mount went away (an ssh session dropped), as
    # libfuse's own handlers treat it; by default it killed the daemon and left a dead mount.
    [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_signal_ends_cleanly_with_state_committed(tmp_dirs, sig):
    make_image(tmp_dirs.base / "a.raw", SIZE, seed=81)
    with tmp_dirs.mount("--stream-paused", "--chunk-size", "64k") as m:
        for off in (0, MIB, 3 * MIB):
            direct_read(m.mnt / "a.raw", off, 4 * KIB)
        fd = os.open(m.mnt / "a.raw", os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xcd" * 4096, 2 * MIB)  # not fsynced: the clean stop commits it
        finally:
            os.close(fd)
        local = image_status(live_status(m.mnt), "a.raw")["local_bytes"]
        assert local == 4 * 64 * KIB
        m.stop(sig)  # asserts exit code 0 and MNT unmounted
        assert "Traceback" not in m.log_text()
    assert not is_mounted(tmp_dirs.mnt)
    st = image_status(status(tmp_dirs.cache), "a.raw")
    assert st["local_bytes"] == local
    assert st["dirty_bytes"] > 0
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        assert direct_read(m.mnt / "a.raw", 2 * MIB, 4096) == b"\xcd" * 4096
        m.stop()


def test_fusermount_unmount_ends_process(tmp_dirs):
    make_image(tmp_dirs.base / "a.raw", SIZE, seed=82)
    with tmp_dirs.mount("--stream-paused", "--chunk-size", "64k") as m:
        direct_read(m.mnt / "a.raw", MIB, 4 * KIB)
        result = subprocess.run(
            ["fusermount3", "-u", str(m.mnt)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        assert m.proc is not None
        assert m.proc.wait(20) == 0, m.log_tail()
        assert not is_mounted(m.mnt)
    assert image_status(status(tmp_dirs.cache), "a.raw")["local_bytes"] == 64 * KIB


def test_daemon_returns_once_mounted(tmp_dirs):
    make_image(tmp_dirs.base / "a.raw", SIZE, seed=83)
    want = (tmp_dirs.base / "a.raw").read_bytes()
    log_file = tmp_dirs.logs / "daemon.log"
    pid = None
    try:
        result = run_corfs(
            "mount",
            tmp_dirs.base,
            tmp_dirs.cache,
            tmp_dirs.mnt,
            "--daemon",
            "--no-stream",
            "--log-file",
            log_file,
            timeout=30,
        )
        mounted_at_return = is_fuse_mounted(tmp_dirs.mnt)  # right after the command returned
        pid = _find_daemon_pid(tmp_dirs.mnt)
        assert result.returncode == 0, result.stderr
        assert mounted_at_return
        assert pid is not None and pid != os.getpid()
        assert (tmp_dirs.mnt / "a.raw").read_bytes() == want
        os.kill(pid, signal.SIGTERM)
        assert _wait_pid_gone(pid, 20), "daemon still running after SIGTERM"
        assert not is_mounted(tmp_dirs.mnt)
        assert "Traceback" not in log_file.read_text()
    finally:
        lazy_unmount(tmp_dirs.mnt)
        pid = pid or _find_daemon_pid(tmp_dirs.mnt)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_pid_gone(pid, 10)
        lazy_unmount(tmp_dirs.mnt)


def test_daemon_stopped_by_fusermount(tmp_dirs):
    make_image(tmp_dirs.base / "a.raw", SIZE, seed=84)
    with tmp_dirs.mount("--daemon", "--no-stream") as m:
        assert is_fuse_mounted(m.mnt)
        pid = m.pid
        assert pid is not None
        assert len((m.mnt / "a.raw").read_bytes()) == SIZE
        subprocess.run(["fusermount3", "-u", str(m.mnt)], check=True, capture_output=True)
        assert _wait_pid_gone(pid, 20)
        assert not is_mounted(m.mnt)


def test_daemon_leaves_the_directory_it_was_started_in(tmp_dirs):
    """A daemon kept its starting directory busy as its cwd (say, a file system that then
    could not be unmounted). It works in "/"; relative BASE, CACHE, MNT, --log-file and --trace
    still name what they named where it was started."""
    make_image(tmp_dirs.base / "a.raw", SIZE, seed=86)
    want = (tmp_dirs.base / "a.raw").read_bytes()
    started_in = tmp_dirs.base.parent / "work"
    started_in.mkdir()
    trace = {"version": 1, "images": {"a.raw": {"chunk_size": 64 * KIB, "chunks": [5, 2]}}}
    (started_in / "boot.json").write_text(json.dumps(trace))
    with CorfsMount(
        tmp_dirs.base, tmp_dirs.cache, tmp_dirs.mnt,
        "--daemon", "--no-stream", "--chunk-size", "64k",
        "--log-file", "daemon.log", "--trace", "boot.json",
        cwd=started_in, log_dir=tmp_dirs.logs,
    ) as m:
        at = m.args.index("mount") + 1
        assert m.args[at : at + 3] == ["../base", "../cache", "../mnt"]
        assert m.pid is not None
        assert os.readlink(f"/proc/{m.pid}/cwd") == "/"
        assert (m.mnt / "a.raw").read_bytes() == want
        log_text = (started_in / "daemon.log").read_text()
        assert "a.raw: streaming 2 traced chunks first" in log_text, log_text
        m.stop()
    assert image_status(status(tmp_dirs.cache), "a.raw")["local_bytes"] == SIZE
    assert sorted(os.listdir(started_in)) == ["boot.json", "daemon.log"]


def test_allow_other(tmp_dirs):
    make_image(tmp_dirs.base / "a.raw", 1 * MIB, seed=85)
    with tmp_dirs.mount("--allow-other", "--no-stream") as m:
        _, super_options = mount_options(m.mnt)
        assert "allow_other" in super_options, super_options
        assert (m.mnt / "a.raw").stat().st_size == MIB
        m.stop()
    with tmp_dirs.mount("--no-stream") as m:  # and not without the option
        _, super_options = mount_options(m.mnt)
        assert "allow_other" not in super_options, super_options
        m.stop()


def test_a_signal_right_after_fusermount_still_ends_cleanly(tmp_dirs):
    """SIGTERM arriving while corfs closes down after `fusermount3 -u` (a service manager
    stopping a unit whose mount just went): exit 0, never a crash (terminate() on the closed
    session segfaulted) nor death by the signal (the handler was gone)."""
    make_image(tmp_dirs.base / "disk.raw", MIB, seed=5)
    for _ in range(3):
        with tmp_dirs.mount() as m:
            subprocess.run(["fusermount3", "-u", str(m.mnt)], check=True)
            m.stop()


def test_commits_failing_for_a_while_are_one_line_and_their_end_another(tmp_dirs):
    """Another connection holds the database's write lock, so each commit fails after its
    busy timeout (5 s) and is retried a second later: one line for the failure (not one per
    attempt), one when a commit succeeds again; the chunk state is committed then."""
    make_image(tmp_dirs.base / "a.raw", SIZE, seed=87)
    with tmp_dirs.mount("--stream-paused", "--chunk-size", "64k") as m:
        db = sqlite3.connect(tmp_dirs.cache / "state.db", isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        try:
            direct_write(m.mnt / "a.raw", MIB, b"\xcd" * (64 * KIB))  # pending: to commit
            time.sleep(14)  # two attempts fail, and the third waits for the lock
        finally:
            db.execute("ROLLBACK")
            db.close()
        failed = m.log_text().count("committing chunk state failed")
        assert failed == 1, m.log_tail()  # not one line per attempt
        wait_for(lambda: "works again" in m.log_text(), what="a commit to succeed")
        log = m.log_text()
        assert "still fails" not in log, log  # the first reminder comes after a minute
        again = re.search(r"works again, after (\d+) failed attempts", log)
        assert again is not None and int(again.group(1)) >= 2, log
        m.kill9()  # no final commit: what is recorded is what the retried commit made durable
    assert image_status(status(tmp_dirs.cache), "a.raw")["dirty_bytes"] == 64 * KIB


def test_a_stop_whose_final_commit_fails_says_so_and_exits_non_zero(tmp_dirs):
    """A clean stop commits what was not committed yet (above). When that commit fails (the
    cache disk full or failing; here another connection holds the database's write lock, so
    every commit fails after its busy timeout), the stop must not look clean: the chunk the
    client wrote whole comes back absent at the next mount, fetched from the base over it."""
    make_image(tmp_dirs.base / "a.raw", SIZE, seed=83)
    with tmp_dirs.mount("--stream-paused", "--chunk-size", "64k") as m:
        db = sqlite3.connect(tmp_dirs.cache / "state.db", isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        try:
            direct_write(m.mnt / "a.raw", MIB, b"\xcd" * (64 * KIB))  # not fsynced
            assert m.proc is not None
            m.proc.send_signal(signal.SIGTERM)
            code = m.proc.wait(60)
        finally:
            db.execute("ROLLBACK")
            db.close()
        assert not is_mounted(tmp_dirs.mnt)
        assert code != 0, m.log_tail()
        last = m.log_text().strip().splitlines()[-1]
        assert "not recorded" in last and "Traceback" not in m.log_text(), m.log_tail()


@pytest.mark.parametrize("end", ["ctrl-c", "sigkill"])
def test_a_daemon_whose_command_is_interrupted_while_it_starts_does_not_serve(tmp_dirs, end):
    """`corfs mount --daemon` waits for its daemon (which left the terminal's session) to be
    ready; Ctrl-C reached the waiting command only, which exited 130 while the daemon went on,
    mounted a few seconds later, failed to say so to the gone command (BrokenPipeError, an
    internal error and its traceback in the log) and unmounted. On Ctrl-C it is stopped at
    once now; a command killed outright leaves it to find out: one line in its log."""
    image = bytes(range(256)) * 256
    slow_first = threading.Event()

    def route(method: str, path: str, headers: dict[str, str]) -> Answer | None:
        if path != "/disk.raw":
            return None
        if not slow_first.is_set():  # the listing at mount: slower than the user's patience
            slow_first.set()
            time.sleep(3)
        common = [("ETag", '"v1"'), ("Accept-Ranges", "bytes")]
        if method == "HEAD":
            return 200, [*common, ("Content-Length", str(len(image)))], []
        first, _, last = headers.get("range", "bytes=0-").removeprefix("bytes=").partition("-")
        body = image[int(first) : int(last or len(image) - 1) + 1]
        return 206, [*common, ("Content-Length", str(len(body))),
                     ("Content-Range", f"bytes {first}-{int(first) + len(body) - 1}/{len(image)}")
                     ], [body]

    log_file = tmp_dirs.logs / "daemon.log"
    server = HostileServer(route).start()
    try:
        command = subprocess.Popen(
            corfs_command("mount", server.url + "disk.raw", tmp_dirs.cache, tmp_dirs.mnt,
                          "--daemon", "--no-stream", "--io-timeout", "20",
                          "--log-file", log_file),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=corfs_env(),
        )
        assert slow_first.wait(20), "the daemon never asked the base"
        if end == "ctrl-c":
            command.send_signal(signal.SIGINT)  # what the terminal sends to the foreground
            assert command.wait(40) == 130
        else:
            command.kill()
            command.wait(40)
        time.sleep(4)  # the base has answered by now: a daemon still running would be mounted
        assert not is_mounted(tmp_dirs.mnt)
        assert _find_daemon_pid(tmp_dirs.mnt) is None
        log = log_file.read_text()
        assert "internal error" not in log and "Traceback" not in log, log
        if end == "ctrl-c":
            assert "mounted" not in log, log
        else:
            assert "the corfs mount command that started this daemon is gone" in log, log
    finally:
        lazy_unmount(tmp_dirs.mnt)  # a daemon that came up ends with its mount
        server.stop()
