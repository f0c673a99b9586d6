"""`corfs mount --daemon`: fork before trio and FUSE start, report readiness (or the one-line
error) to the waiting parent through a pipe, so the command returns once the mount is ready.

The daemon works in "/", not in the directory it was started from (which it would keep busy:
a file system that cannot be unmounted): every path of its config is made absolute before
the fork (also those that libraries read from the environment later: botocore's credential
and config files, OpenSSL's CA paths), and --log-file is opened by the caller."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import MutableMapping

from .cache_layout import PRIVATE_UMASK
from .config import MountConfig
from .errors import CorfsError, error_line, internal_error, leaf_error
from .mount import run_mount
from .printable import PrintableFormatter

# Paths read from the environment by botocore (credentials are re-read on refresh, a web
# identity token on every renewal) and OpenSSL, after the daemon has left the caller's directory.
PATH_VARIABLES = (
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_CA_BUNDLE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "SSL_CERT_FILE",
    "SSLKEYLOGFILE",
)
PATH_LIST_VARIABLES = ("SSL_CERT_DIR", "AWS_DATA_PATH")  # several, ":"-separated
STOP_CHILD_TIMEOUT = 30.0  # a daemon stopped while starting: how long its unmount may take


def run_mount_daemonized(config: MountConfig, log_fd: int | None) -> int:
    """`log_fd`: --log-file, opened by the caller (None: the daemon's output is discarded)."""
    config = config.with_absolute_paths()  # before the child leaves the caller's directory
    make_environment_paths_absolute(os.environ)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        try:
            with os.fdopen(read_end, "rb") as pipe:
                answer = pipe.read().decode(errors="replace")
        except BaseException:
            # Ctrl-C (or a signal) while the daemon starts: it must not come up later behind
            # the user's back (it left the terminal's session: the SIGINT reached us only).
            # SIGTERM stops it at any point of its start, unmounting if it got that far.
            _stop_child(pid)
            raise
        if answer.startswith("ok"):
            return 0
        code, _, line = answer.partition(" ")
        if not line:
            os.waitpid(pid, 0)
            line = error_line(CorfsError("the mount daemon died before it was ready"))
        print(line.strip(), file=sys.stderr)
        return int(code) if code.isdigit() else 1
    os.close(read_end)
    os._exit(_child(config, log_fd, write_end))


def _stop_child(pid: int, timeout: float = STOP_CHILD_TIMEOUT) -> None:
    """SIGTERM the daemon that is starting, and reap it if it ends within `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                time.sleep(0.05)
                continue
        return


def make_environment_paths_absolute(environ: MutableMapping[str, str]) -> None:
    """Each relative path among PATH_VARIABLES and PATH_LIST_VARIABLES made absolute, against
    the current directory ("~/..." is left to botocore)."""

    def absolute(path: str) -> str:
        return path if not path or path.startswith("~") else os.path.abspath(path)

    for name in PATH_VARIABLES:
        if value := environ.get(name):
            environ[name] = absolute(value)
    for name in PATH_LIST_VARIABLES:
        if value := environ.get(name):
            environ[name] = os.pathsep.join(map(absolute, value.split(os.pathsep)))


def _child(config: MountConfig, log_fd: int | None, ready_fd: int) -> int:
    os.setsid()
    os.chdir("/")
    os.umask(PRIVATE_UMASK)  # whatever the daemon creates (CACHE, its log) is its owner's alone
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    out = log_fd if log_fd is not None else devnull
    os.dup2(out, 1)
    os.dup2(out, 2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        PrintableFormatter("%(asctime)s corfs[%(process)d]: %(levelname)s %(message)s")
    )
    logging.getLogger().handlers[:] = [handler]

    reported = False

    def ready() -> None:
        nonlocal reported
        reported = True
        try:
            os.write(ready_fd, b"ok\n")
        except BrokenPipeError:  # killed while it waited: it reported a failure, not a mount
            raise CorfsError("the corfs mount command that started this daemon is gone: "
                             "not serving") from None
        finally:
            os.close(ready_fd)

    try:
        run_mount(config, ready)
        return 0
    except BaseException as exc:  # reported to the parent, then exit
        error = leaf_error(exc)
        if error is None:  # a bug: its traceback goes to the log, as the CLI's to stderr
            logging.getLogger(__name__).exception("internal error")
            error = internal_error(exc)
        line = error_line(error)
        logging.getLogger(__name__).error("%s", line)
        if not reported:  # else the log has it; ready_fd's number may be another file's now
            with contextlib.suppress(OSError):  # the command is gone
                os.write(ready_fd, f"{error.exit_code} {line}\n".encode())
        return error.exit_code
