"""`corfs status` / `corfs stream` of every mount and `status --watch` ask mounts through
control_client.ask_every, here with stand-in requests (no mounts: the FUSE tests in
tests/fuse/test_every_mount.py need a machine with no other corfs mounts)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from corfs import control_client, status_view
from corfs.errors import ControlError


def test_answers_come_in_order_with_each_failure_in_its_place() -> None:
    def request(path: str) -> str:
        if path == "/b":
            raise ControlError("/b: its corfs daemon does not answer")
        time.sleep(0.1 if path == "/a" else 0)  # finished last, listed first
        return path.upper()

    answers = control_client.ask_every(["/a", "/b", "/c"], request)
    assert answers[0] == "/A" and answers[2] == "/C"
    assert isinstance(answers[1], ControlError)


def test_every_path_is_asked_at_once() -> None:
    def request(path: str) -> str:
        time.sleep(0.5)
        return path

    started = time.monotonic()
    control_client.ask_every([f"/m{n}" for n in range(40)], request)
    assert time.monotonic() - started < 2.0


def test_a_bug_in_a_request_is_raised_not_taken_for_an_answer() -> None:
    def request(path: str) -> str:
        raise KeyError(path)

    with pytest.raises(KeyError):
        control_client.ask_every(["/a"], request)


def test_ctrl_c_ends_the_command_at_once() -> None:
    """A thread pool's workers were waited for at exit: Ctrl-C with a hung mount left the
    command up until every request had timed out (found in review)."""
    script = textwrap.dedent("""
        import os, signal, threading, time
        from corfs import control_client as cc
        def hung(path):  # a mount whose daemon is stopped
            return cc.call_bounded(lambda: time.sleep(1000), 3.0)
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            cc.ask_every(["/a", "/b"], hung)
        except KeyboardInterrupt:
            pass
    """)
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert time.monotonic() - started < 2.0


def test_watch_says_a_failing_mount_once_and_asks_it_no_more(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It asked a hung mount again every second (10 s each, a thread left behind each time,
    the other mounts' bars stalled), and raised the same error again at the end (review)."""
    asked = {"/live": 0, "/hung": 0}
    lock = threading.Lock()

    def status_of_path(path: str) -> dict:
        with lock:
            asked[path] += 1
        if path == "/hung":
            raise ControlError("/hung: its corfs daemon does not answer within 10 s")
        state = "complete" if asked[path] >= 3 else "streaming"
        image = {"name": "a.raw", "size": 10, "local_bytes": 10 if state == "complete" else 5,
                 "state": state, "rate_bps": 0.0, "eta_s": None}
        return {"mounted": True, "images": [image]}

    monkeypatch.setattr(control_client, "status_of_path", status_of_path)
    code = status_view.watch_status(["/live", "/hung"], interval=0.01)
    assert code == ControlError.exit_code
    assert asked == {"/live": 3, "/hung": 1}
    said = [line for line in capsys.readouterr().err.splitlines() if "does not answer" in line]
    assert len(said) == 1, said


def test_watch_keeps_apart_images_whose_path_and_name_join_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its bars were keyed "PATH:NAME": image "c" of /a:b and image "b:c" of /a shared one."""
    from rich.progress import Progress

    def status_of_path(path: str) -> dict:
        name = "c" if path == "/a:b" else "b:c"
        image = {"name": name, "size": 1, "local_bytes": 1, "state": "complete",
                 "rate_bps": 0.0, "eta_s": 0.0}
        return {"mounted": True, "images": [image]}

    added: list[str] = []
    real_add_task = Progress.add_task

    def add_task(self: Progress, description: str, *args: object, **kwargs: object) -> object:
        added.append(description)
        return real_add_task(self, description, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(control_client, "status_of_path", status_of_path)
    monkeypatch.setattr(Progress, "add_task", add_task)
    assert status_view.watch_status(["/a:b", "/a"], interval=0.01) == 0
    assert sorted(added) == ["b:c", "c"]
