"""`corfs status` (and `corfs stream`) with no PATH ask every corfs mount of the machine. They
asked one after another, so each daemon that does not answer held the command for
ANSWER_TIMEOUT_S more (a host with N hung mounts waited N times that), and `status --watch`
stopped at the first such mount. Now every mount is asked at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corfs.control_client import ANSWER_TIMEOUT_S, corfs_mounts
from tests.mounting import (
    CLI_TIMEOUT,
    CorfsDirs,
    CorfsMount,
    corfs_command,
    corfs_env,
    make_image,
    run_corfs,
)

from .util import MIB, wait_for

pytestmark = pytest.mark.alone  # every mount of the machine is asked: none of another test's


@contextlib.contextmanager
def _stopped(mounts: list[CorfsMount]) -> Iterator[None]:
    """These mounts' daemons stopped (SIGSTOP): their mounts do not answer, as a hung loop."""
    pids = [m.pid for m in mounts]
    assert None not in pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # type: ignore[arg-type]
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)  # type: ignore[arg-type]


@contextlib.contextmanager
def _three_mounts(tmp_path: Path) -> Iterator[list[CorfsMount]]:
    """Three mounts of a 1 MiB image each: the first streamed to complete."""
    with contextlib.ExitStack() as stack:
        mounts = []
        for number, name in enumerate(("live", "hung-1", "hung-2")):
            dirs = CorfsDirs.under(tmp_path / name)
            make_image(dirs.base / "a.raw", MIB, seed=70 + number)
            options = () if name == "live" else ("--stream-paused",)
            mounts.append(stack.enter_context(dirs.mount(*options)))
        if set(corfs_mounts()) - {str(m.mnt) for m in mounts}:
            pytest.skip("other corfs mounts on this machine: every mount is theirs too")
        wait_for(lambda: _status_of(mounts[0])["images"][0]["state"] == "complete",
                 what="the live mount's image streamed")
        yield mounts
        for m in mounts:
            m.stop()


def _status_of(m: CorfsMount) -> dict:
    result = run_corfs("status", m.mnt, "--json", check=True)
    return json.loads(result.stdout)


def test_hung_daemons_cost_one_wait_and_hide_no_other_mount(tmp_path: Path) -> None:
    with _three_mounts(tmp_path) as mounts, _stopped(mounts[1:]):
        started = time.monotonic()
        result = run_corfs("status", "--json", timeout=4 * ANSWER_TIMEOUT_S)
        elapsed = time.monotonic() - started
    assert elapsed < 1.8 * ANSWER_TIMEOUT_S, f"{elapsed:.1f} s: asked one after another"
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    answered = json.loads(result.stdout)
    statuses = answered.get("mounts", [answered])
    ours = [s for s in statuses if s["mountpoint"] == str(mounts[0].mnt)]
    assert len(ours) == 1 and ours[0]["images"][0]["state"] == "complete", statuses
    for hung in mounts[1:]:
        said = [line for line in result.stderr.splitlines() if str(hung.mnt) in line]
        assert len(said) == 1 and "does not answer" in said[0], result.stderr


def test_watch_goes_on_past_a_mount_that_does_not_answer(tmp_path: Path) -> None:
    """`status --watch` of every mount: the stopped ones are said once each, the live one is
    watched to its end, and the exit code says some could not be read."""
    with _three_mounts(tmp_path) as mounts, _stopped(mounts[1:]):
        watch = run_corfs("status", "--watch", timeout=6 * ANSWER_TIMEOUT_S)
    assert watch.returncode not in (0, 130) and "Traceback" not in watch.stderr, watch.stderr
    for hung in mounts[1:]:
        said = [line for line in watch.stderr.splitlines() if str(hung.mnt) in line]
        assert len(said) == 1 and "does not answer" in said[0], watch.stderr


def test_failures_are_said_before_the_table_a_gone_reader_stops(tmp_path: Path) -> None:
    """`corfs status | head -1`: the reader of stdout gone, printing the table ends the
    command (141); a mount that could not be read was said after the table, so never. Here
    the reader is gone before the table is printed, stdout unbuffered (as corfs_env runs it;
    a table larger than stdout's buffer meets the reader's end as well). Other corfs mounts
    of the machine only add lines: this one's dead daemon must be said all the same."""
    live, dead = CorfsDirs.under(tmp_path / "live"), CorfsDirs.under(tmp_path / "dead")
    for seed, dirs in enumerate((live, dead)):
        make_image(dirs.base / "a.raw", MIB, seed=80 + seed)
    with live.mount("--no-stream") as shown, dead.mount("--no-stream") as gone:
        gone.kill9(unmount=False)  # its mount stays: ENOTCONN to every request
        reader, writer = os.pipe()
        os.close(reader)
        try:
            result = subprocess.run(
                corfs_command("status"), stdin=subprocess.DEVNULL, stdout=writer,
                stderr=subprocess.PIPE, text=True, timeout=CLI_TIMEOUT,
                env=corfs_env({"PYTHONUNBUFFERED": "1"}), check=False,
            )
        finally:
            os.close(writer)
        shown.stop()
    assert result.returncode == 128 + signal.SIGPIPE, result.stderr
    said = [line for line in result.stderr.splitlines() if str(gone.mnt) in line]
    assert len(said) == 1 and "the corfs daemon is gone" in said[0], result.stderr
