"""Shared helpers for tests that run corfs for real: mounts, CLI calls, sample images.

`CorfsMount` runs `python -m corfs mount BASE CACHE MNT ...` in a subprocess (foreground,
stderr to a log file) and waits for MNT to show up as a FUSE mount in /proc/self/mountinfo.
`wait_fuse_mounted` is that wait, the one the benchmarks use for every FUSE daemon too.

Invariant: leaving a `CorfsMount` block never leaves a mount or a daemon behind, whether the
test passed, failed or was interrupted: a lazy `fusermount3 -u -z` clears even a mount whose
daemon was killed, and the daemon is ended by its own PID (never by name).

Paths of mounts are resolved through their parent directory only: touching a FUSE mountpoint
whose daemon hangs would hang the test itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from corfs.mountinfo import read_mounts

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20

MOUNT_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
CLI_TIMEOUT = 60.0


class CorfsMountError(AssertionError):
    """A corfs mount did not come up or go down as expected (an AssertionError: tests fail)."""


# --- paths and mount table --------------------------------------------------------------


def mount_path(path: str | os.PathLike[str]) -> str:
    """Absolute, symlink-free form of `path` without stat-ing `path` itself.

    Only the parent is resolved, so a hung or dead FUSE mount at `path` is never touched
    (even an lstat of a live one is a FUSE request, whose attributes the kernel then keeps).
    """
    p = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(p)
    return os.path.join(os.path.realpath(parent), name) if name else p


def mount_table() -> list[tuple[str, str]]:
    """(mountpoint, fstype) for every mount in this process's namespace, in table order."""
    return [(entry.mountpoint, entry.fstype) for entry in read_mounts()]


def mount_fstype(path: str | os.PathLike[str]) -> str | None:
    """The fstype of the topmost mount at `path`, or None if nothing is mounted there."""
    target = mount_path(path)
    found = None
    for mountpoint, fstype in mount_table():
        if mountpoint == target:
            found = fstype  # later entries are mounted on top of earlier ones
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True if anything is mounted at `path` (including a dead FUSE mount)."""
    return mount_fstype(path) is not None


def is_fuse_mounted(path: str | os.PathLike[str]) -> bool:
    """True if a FUSE filesystem (`fuse` or `fuse.*`) is mounted at `path`."""
    fstype = mount_fstype(path)
    return fstype is not None and (fstype == "fuse" or fstype.startswith("fuse."))


def fuse_mounts_below(root: str | os.PathLike[str]) -> list[str]:
    """Mountpoints of FUSE mounts at or below `root`, deepest first (the order to unmount)."""
    top = mount_path(root)
    found = {
        mp
        for mp, fstype in mount_table()
        if (fstype == "fuse" or fstype.startswith("fuse."))
        and (mp == top or mp.startswith(top.rstrip("/") + "/"))
    }
    return sorted(found, key=lambda mp: mp.count("/"), reverse=True)


def wait_fuse_mounted(
    path: str | os.PathLike[str],
    proc: subprocess.Popen[bytes],
    timeout: float = MOUNT_TIMEOUT,
    *,
    launcher: bool = False,
    name: str = "the daemon",
) -> None:
    """Wait until a FUSE file system is mounted at `path` by `proc` (named `name` in errors).

    Raises CorfsMountError if `proc` exits first or `timeout` passes. With `launcher`, `proc`
    exits 0 once the mount is ready (`--daemon`): the wait is for that exit too.
    """
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if is_fuse_mounted(path) and (not launcher or rc is not None):
            break
        if rc is not None and not (launcher and rc == 0):
            raise CorfsMountError(f"{name} exited with code {rc} before {path} was mounted")
        if time.monotonic() > deadline:
            raise CorfsMountError(f"{path} was not mounted within {timeout:.0f} s")
        time.sleep(0.02)
    if launcher and rc != 0:
        raise CorfsMountError(f"{name} exited with code {rc}")


def lazy_unmount(path: str | os.PathLike[str]) -> bool:
    """`fusermount3 -u -z PATH` if something is mounted there; True if it is gone after."""
    if not is_mounted(path):
        return True
    subprocess.run(
        ["fusermount3", "-u", "-z", mount_path(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return not is_mounted(path)


# --- running the CLI ----------------------------------------------------------------------


def corfs_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a corfs subprocess: the repo importable without install."""
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old if old else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def corfs_command(*args: Any) -> list[str]:
    return [sys.executable, "-m", "corfs", *(os.fspath(a) for a in args)]


def run_corfs(
    *args: Any,
    timeout: float = CLI_TIMEOUT,
    check: bool = False,
    env: dict[str, str] | None = None,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m corfs ARGS...` to completion; stdout and stderr captured as text.

    `env` adds to the environment (it does not replace it); other keywords go to
    `subprocess.run` (e.g. `input=`, `cwd=`).
    """
    kw.setdefault("stdin", None if "input" in kw else subprocess.DEVNULL)
    return subprocess.run(
        corfs_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        env=corfs_env(env),
        **kw,
    )


# --- a running mount --------------------------------------------------------------------


class CorfsMount:
    """`python -m corfs mount BASE CACHE MNT OPTIONS...` for the length of a `with` block.

        with CorfsMount(base, cache, mnt, "--chunk-size", "64K") as m:
            data = (m.mnt / "disk.raw").read_bytes()
            m.stop()  # optional: asserts a clean exit (code 0) and that MNT is unmounted

    Options are passed through as given. With `--daemon` the launcher must exit 0 once the
    mount is ready; the daemon is then found by its command line so it can be killed. With
    `cwd`, corfs runs in that directory and is told BASE, CACHE and MNT relative to it.
    """

    def __init__(
        self,
        base: str | os.PathLike[str],
        cache: str | os.PathLike[str],
        mnt: str | os.PathLike[str],
        *options: Any,
        timeout: float = MOUNT_TIMEOUT,
        log_dir: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.cwd = None if cwd is None else os.path.abspath(cwd)
        # BASE may be a URL (http://, s3://): pass it through untouched.
        self.base = os.fspath(base)
        self.cache = Path(cache)
        self.named = Path(mount_path(mnt))  # what corfs is told: a symlink stays one
        # Where the mount table will show it: a symlink MNT (to the directory) is followed
        # now, before anything is mounted there (mount_path never touches MNT itself).
        self.mnt = Path(os.path.realpath(self.named)) if os.path.islink(self.named) else self.named
        self.options = [os.fspath(o) for o in options]
        self.timeout = timeout
        self.env = env
        self.daemon = "--daemon" in self.options
        self._own_log_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="corfs-log-") if log_dir is None else log_dir)
        self.log_path = self.log_dir / f"corfs-mount-{os.getpid()}-{id(self):x}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._daemon_pid: int | None = None

    def _spelled(self, path: str | os.PathLike[str]) -> str:
        """`path` as corfs is told it: relative to `cwd` if corfs runs in one."""
        return os.fspath(path) if self.cwd is None else os.path.relpath(path, self.cwd)

    @property
    def args(self) -> list[str]:
        base = self.base if "://" in self.base else self._spelled(self.base)
        return corfs_command(
            "mount", base, self._spelled(self.cache), self._spelled(self.named), *self.options
        )

    @property
    def pid(self) -> int | None:
        """PID of the process serving the mount (the daemon's, with `--daemon`)."""
        if self.daemon:
            return self._daemon_pid
        return self.proc.pid if self.proc is not None else None

    # -- lifecycle --

    def __enter__(self) -> CorfsMount:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.cleanup(keep_log=exc_type is not None)

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("CorfsMount already started")
        if is_mounted(self.mnt):
            raise CorfsMountError(f"{self.mnt} is already a mountpoint before corfs started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in cleanup)
        try:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                env=corfs_env(self.env),
                cwd=self.cwd,
                # own session: a ^C on pytest reaches only pytest, which then cleans up here
                start_new_session=True,
            )
            self._wait_mounted()
        except BaseException:
            self.cleanup(keep_log=True)
            raise

    def _wait_mounted(self) -> None:
        assert self.proc is not None
        name = "corfs mount --daemon" if self.daemon else "corfs mount"
        try:
            wait_fuse_mounted(self.mnt, self.proc, self.timeout, launcher=self.daemon, name=name)
        except CorfsMountError as e:
            self._fail(str(e))
        if self.daemon:
            self._daemon_pid = _find_daemon_pid(self.mnt, self._spelled(self.named))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """End corfs with `sig`; assert it exits 0 within `timeout` and MNT is unmounted."""
        if self.daemon:
            pid = self._daemon_pid
            if pid is None:
                self._fail("cannot stop: the --daemon process was not found")
            os.kill(pid, sig)
            if not _wait_pid_gone(pid, timeout):
                self._fail(f"corfs daemon {pid} still running {timeout:.0f} s after signal {sig}")
        else:
            assert self.proc is not None, "CorfsMount was not started"
            self.proc.send_signal(sig)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._fail(f"corfs still running {timeout:.0f} s after signal {sig}")
            if rc != 0:
                self._fail(f"corfs exited with code {rc} after signal {sig}, expected 0")
        if is_mounted(self.mnt):
            self._fail(f"corfs exited but {self.mnt} is still mounted")

    def kill9(self, unmount: bool = True) -> None:
        """SIGKILL the daemon and reap it; then `fusermount3 -u -z MNT` unless told not to.

        With `unmount=False` the dead mount stays (every access: ENOTCONN) for the test
        to look at; `cleanup` still clears it.
        """
        pid = self.pid
        if pid is None:
            self._fail("cannot kill -9: no corfs process known")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if self.daemon:
            _wait_pid_gone(pid, STOP_TIMEOUT)
        else:
            assert self.proc is not None
            self.proc.wait(STOP_TIMEOUT)
        if unmount and not lazy_unmount(self.mnt):
            self._fail(f"fusermount3 -u -z did not clear {self.mnt}")

    def cleanup(self, keep_log: bool = False) -> None:
        """Leave nothing behind: no mount at MNT, no corfs process. Safe to call twice."""
        try:
            lazy_unmount(self.mnt)
            self._end_process()
            lazy_unmount(self.mnt)  # in case the process had not finished mounting before
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._own_log_dir and not keep_log:
                shutil.rmtree(self.log_dir, ignore_errors=True)

    def _end_process(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _terminate(self.proc.pid, lambda t: _popen_gone(self.proc, t))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT)
        if self.daemon:
            pid = self._daemon_pid or _find_daemon_pid(self.mnt, self._spelled(self.named))
            if pid is not None and _pid_alive(pid):
                _terminate(pid, lambda t: _wait_pid_gone(pid, t))

    # -- logs --

    def log_text(self) -> str:
        """Everything corfs wrote to stdout and stderr so far."""
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _fail(self, message: str) -> Any:
        raise CorfsMountError(
            f"{message}\n  command: {' '.join(self.args)}\n  log: {self.log_path}\n"
            f"--- last lines of the corfs log ---\n{self.log_tail()}"
        )


def _terminate(pid: int, gone: Any, grace: float = 5.0) -> None:
    """SIGTERM (waking the process if stopped), then SIGKILL if still alive after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    if not gone(grace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        gone(STOP_TIMEOUT)


def _popen_gone(proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    if proc is None:
        return True
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _find_daemon_pid(mnt: str | os.PathLike[str], spelled: str | None = None) -> int | None:
    """PID of a `... -m corfs mount ... MNT` process other than ourselves, if any; `spelled`:
    MNT as its command line names it, if not by its absolute path."""
    target = os.fsencode(spelled or mount_path(mnt))
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"corfs" in argv and b"mount" in argv and target in argv and _pid_alive(int(entry)):
            return int(entry)
    return None


# --- data ---------------------------------------------------------------------------------


def make_image(
    path: str | os.PathLike[str],
    size: int,
    seed: int = 0,
    *,
    zero_blocks: Iterable[int] = (),
    block_size: int = MIB,
) -> Path:
    """Write `size` bytes of deterministic pseudo-random data to `path`, fast (~350 MB/s).

    The same (size, seed) always gives the same bytes. Blocks listed in `zero_blocks`
    (indices of `block_size` blocks) are left as holes, reading as zeros; the other blocks
    hold the same bytes as without `zero_blocks`.
    """
    path = Path(path)
    zeros = set(zero_blocks)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for index, offset in enumerate(range(0, size, block_size)):
            block = rng.randbytes(min(block_size, size - offset))
            if index not in zeros:
                f.seek(offset)
                f.write(block)
    return path


def sha256_file(path: str | os.PathLike[str], block_size: int = 4 * MIB) -> str:
    """Hex sha256 of a file's content, read in large blocks."""
    h = hashlib.sha256()
    buf = bytearray(block_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# --- directories --------------------------------------------------------------------------


@dataclass(frozen=True)
class CorfsDirs:
    """The directories a mount needs, under one test's tmp_path; `logs` keeps corfs logs."""

    base: Path
    cache: Path
    mnt: Path
    logs: Path

    @classmethod
    def under(cls, root: Path) -> CorfsDirs:
        dirs = cls(root / "base", root / "cache", root / "mnt", root / "logs")
        for d in (dirs.base, dirs.cache, dirs.mnt, dirs.logs):
            d.mkdir(parents=True, exist_ok=True)
        return dirs

    def mount(self, *options: Any, **kw: Any) -> CorfsMount:
        """A `CorfsMount` of BASE on MNT with CACHE (not started: use it in `with`)."""
        kw.setdefault("log_dir", self.logs)
        return CorfsMount(self.base, self.cache, self.mnt, *options, **kw)
