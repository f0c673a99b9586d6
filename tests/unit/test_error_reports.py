"""How errors reach the user: the control file's errno, and one line from the CLI and the mount
daemon alike (errors.error_line)."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from pathlib import Path

from corfs.errors import ControlError, ForgetRefused
from tests.mounting import corfs_command, corfs_env


def test_a_refused_control_command_is_einval() -> None:
    assert ControlError("bad command").errno == errno.EINVAL
    assert ForgetRefused("kept").errno == errno.ESTALE  # a refusal with a reason of its own


def _mount(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "base").mkdir(exist_ok=True)
    mnt = tmp_path / "no\nsuch"  # fails in run_mount: after the fork with --daemon
    return subprocess.run(
        corfs_command("mount", tmp_path / "base", tmp_path / "cache", mnt, *extra),
        capture_output=True, text=True, env=corfs_env(), timeout=60,
    )


def test_the_daemon_reports_an_error_like_the_cli(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    foreground = _mount(tmp_path)
    daemon = _mount(tmp_path, "--daemon", "--log-file", str(log))
    assert foreground.returncode == daemon.returncode == 2
    assert foreground.stderr == daemon.stderr
    assert daemon.stderr.count("\n") == 1 and daemon.stderr.startswith("corfs: mountpoint ")
    assert daemon.stderr.strip() in log.read_text()


def test_a_bug_in_the_daemon_leaves_its_traceback_in_the_log(tmp_path: Path) -> None:
    """As the CLI shows a bug's traceback on stderr; the waiting command gets one line."""
    log = tmp_path / "daemon.log"
    (tmp_path / "base").mkdir()
    (tmp_path / "mnt").mkdir()
    script = textwrap.dedent(f"""
        import sys
        import corfs.mount

        def broken(config, on_ready=None):
            raise ZeroDivisionError("a bug")

        corfs.mount.run_mount = broken  # the daemon's report of a bug is under test
        from corfs.cli import main
        sys.exit(main(["mount", {str(tmp_path / "base")!r}, {str(tmp_path / "cache")!r},
                       {str(tmp_path / "mnt")!r}, "--daemon", "--log-file", {str(log)!r}]))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=corfs_env(),
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == "corfs: internal error: ZeroDivisionError\n"  # its text: the log's
    text = log.read_text()
    assert "Traceback" in text and "ZeroDivisionError: a bug" in text
