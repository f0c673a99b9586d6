"""Command line: argument parsing, the only place that prints for the user and picks exit codes.
Every CorfsError ends as one line on stderr and its exit code; no traceback for bad input."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import control_client
from .base import DEFAULT_MANIFEST_MEMORY
from .cache_layout import PRIVATE_UMASK, TRACE_FILE
from .config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_RANDOM_RANGE,
    DEFAULT_READ_MEMORY,
    DEFAULT_WRITE_BEHIND,
    MountConfig,
    StreamConfig,
)
from .errors import CorfsError, UsageError, error_line, leaf_error
from .failure_log import QuietRepeats
from .printable import PrintableFormatter
from .sizes import parse_size

log = logging.getLogger("corfs")

MAX_ID = (1 << 32) - 1  # uid_t and gid_t; (uid_t)-1 means "no change", never an owner


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _owner(text: str) -> tuple[int, int]:
    try:
        uid, _, gid = text.partition(":")
        return int(uid), int(gid or uid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not UID:GID: {text!r}") from None


def _mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None


def _add_mount(sub: _WithCommon) -> None:
    p = sub.add_parser("mount", help="mount BASE's images in MNT, cached in CACHE")
    p.add_argument(
        "base", metavar="BASE",
        help="/dir, http(s)://host/path[/] or s3://bucket/prefix/; '-' with --base-env",
    )
    p.add_argument("cache", metavar="CACHE", help="local directory for the chunk store")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE, help="default 1M")
    p.add_argument("--read-only", action="store_true", help="refuse writes (EROFS)")
    p.add_argument(
        "--reset-stale",
        action="store_true",
        help="discard the cache of an image that changed in BASE instead of refusing it",
    )
    p.add_argument(
        "--forget-detached",
        metavar="IMAGE",
        action="append",
        default=[],
        help="serve IMAGE from BASE again although it was handed over to QEMU (detach --qmp)",
    )
    p.add_argument("--allow-other", action="store_true", help="let other users (libvirt's QEMU) in")
    p.add_argument("--owner", type=_owner, help="UID:GID of the exposed images")
    p.add_argument("--mode", type=_mode, default=0o644, help="octal mode of the images (644)")
    p.add_argument("--no-stream", action="store_true", help="copy-on-read only, no background fill")
    p.add_argument("--stream-paused", action="store_true", help="start with streaming paused")
    p.add_argument(
        "--bandwidth", type=_size, default=0, help="stream rate limit, e.g. 50M (0: none)"
    )
    p.add_argument("--trace", metavar="FILE", help="stream the chunks of this boot trace first")
    p.add_argument(
        "--record-trace",
        action="store_true",
        help=f"record the order of first reads into CACHE/{TRACE_FILE}",
    )
    p.add_argument(
        "--io-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up on the base after this long (EIO), default 60",
    )
    p.add_argument("--ca-file", help="extra CA certificates for https bases")
    p.add_argument(
        "--base-env",
        metavar="VAR",
        help="read BASE from environment variable VAR, BASE given as '-' (a signed URL "
        "stays out of ps)",
    )
    p.add_argument(
        "--auth-header-env",
        metavar="VAR",
        help="environment variable holding an HTTP header 'Name: value' to send",
    )
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph RGW)")
    p.add_argument("--region", help="S3 region")
    p.add_argument("--profile", help="AWS profile for S3 credentials")
    p.add_argument("--connections", type=int, default=8, help="concurrent base requests (8)")
    p.add_argument(
        "--manifest-memory",
        type=_size,
        default=DEFAULT_MANIFEST_MEMORY,
        metavar="SIZE",
        help="memory for the chunk digests of published images (default 512M; ~57 bytes a "
        "chunk): images beyond it are left out, each with a log line",
    )
    p.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (a port alone: 127.0.0.1)",
    )
    p.add_argument(
        "--write-behind",
        type=_size,
        default=DEFAULT_WRITE_BEHIND,
        metavar="SIZE",
        help="memory for fetched bytes waiting to be stored in CACHE, e.g. 1G (default 256M)",
    )
    p.add_argument(
        "--read-memory",
        type=_size,
        default=DEFAULT_READ_MEMORY,
        metavar="SIZE",
        help="memory for fetched bytes kept for client reads (read ahead of sequential readers, "
        "blocks of random ones), all images together (default 128M; see README)",
    )
    p.add_argument(
        "--random-range",
        type=_size,
        default=DEFAULT_RANDOM_RANGE,
        metavar="SIZE",
        help="bytes fetched around a small random read that misses (default 4k; larger for a "
        "base with a long round trip; as large as the chunks: whole chunks. See README)",
    )
    p.add_argument("--daemon", action="store_true", help="go to the background once mounted")
    p.add_argument("--log-file", help="log here instead of stderr")


def _add_status(sub: _WithCommon) -> None:
    p = sub.add_parser("status", help="fill ratio, rate and ETA of each image")
    p.add_argument(
        "path", metavar="PATH", nargs="?", help="a mountpoint or a cache dir (default: all mounts)"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true", help="live progress bars until complete")


def _add_stream(sub: _WithCommon) -> None:
    p = sub.add_parser("stream", help="pause, resume or limit the background stream")
    ops = p.add_subparsers(dest="op", required=True)
    for op in ("pause", "resume"):
        q = ops.add_parser(op)
        q.add_argument("mountpoint", metavar="MNT", nargs="?")
        q.add_argument("image", metavar="IMAGE", nargs="?")
    q = ops.add_parser("bandwidth")
    q.add_argument("mountpoint", metavar="MNT")
    q.add_argument("rate", metavar="RATE", type=_size, help="e.g. 50M; 0 = unlimited")


class _ArgumentsWhenParsed(argparse.ArgumentParser):
    """A subcommand parser that may get its arguments only when it parses (when its command
    was chosen): `add_arguments` of a command whose module is heavy (publish's loads trio and
    zstd) must not slow down the others (`corfs status`: tests/unit/test_control_client)."""

    def __init__(
        self,
        *args: Any,
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        if self._add_arguments is not None:
            add, self._add_arguments = self._add_arguments, None
            add(self)
        return super().parse_known_args(*args, **kwargs)


class _WithCommon:
    """Adds the common options to every subcommand parser."""

    def __init__(self, sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
        self._sub, self._common = sub, common

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        return self._sub.add_parser(name, parents=[self._common], **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corfs", description="copy-on-read FUSE for VM images")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_ArgumentsWhenParsed
    )
    # -v also after the subcommand (corfs mount ... -v); SUPPRESS keeps the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    sub = _WithCommon(commands, common)
    _add_mount(sub)
    _add_status(sub)
    _add_stream(sub)
    p = sub.add_parser(
        "detach",
        help="a fully local image as a standalone raw file: copied out of an unmounted cache, "
        "or handed over live to the QEMU using it (--qmp/--virsh)",
    )
    p.add_argument("cache", metavar="PATH", help="CACHE, or a mountpoint for a live handoff")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("dest", metavar="DEST", help="new file; live: on CACHE's file system")
    live = p.add_mutually_exclusive_group()
    live.add_argument("--qmp", metavar="SOCKET", help="the QMP socket of the QEMU using IMAGE")
    live.add_argument("--virsh", metavar="DOMAIN", help="the libvirt domain using IMAGE")
    p.add_argument("--wait", action="store_true", help="wait until IMAGE is fully local")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds --wait waits at most (600)")
    p = sub.add_parser("verify", help="check local chunks against their digests")
    p.add_argument("cache", metavar="CACHE")
    p.add_argument("image", metavar="IMAGE", nargs="?")
    p.add_argument("--json", action="store_true")
    sub.add_parser(
        "publish",
        help="write images in chunked, zstd, content-addressed form",
        add_arguments=_add_publish_arguments,
    )
    return parser


def _add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    from .publish import add_publish_arguments  # heavy: see _ArgumentsWhenParsed

    add_publish_arguments(parser)


def open_log_file(path: str) -> int:
    """The descriptor of --log-file, opened for appending; UsageError (one line) if it cannot
    be, rather than a traceback. Through a symbolic link only if it is the user's or root's
    (/dev/stderr, a log moved to another disk): the log is opened before CACHE is checked, and
    a log in CACHE is allowed, where another user may have planted a link to a file of the
    user's (in a cache left open to them). The kernel's protected_symlinks, for sticky
    directories only, does the same."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    try:
        try:
            return os.open(path, flags | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
        link = os.lstat(path)
        if link.st_uid not in (os.geteuid(), 0):
            raise UsageError(
                f"--log-file {path} is a symbolic link of uid {link.st_uid}'s: name the file "
                "it points to"
            )
        fd = os.open(path, flags, 0o600)
        again = os.lstat(path)
        if (again.st_dev, again.st_ino) != (link.st_dev, link.st_ino):  # replaced meanwhile
            os.close(fd)
            raise UsageError(f"--log-file {path} changed while it was opened")
        return fd
    except OSError as exc:
        raise UsageError(f"--log-file {path}: {exc.strerror}") from None


def _setup_logging(verbose: bool, log_file: str | None = None) -> None:
    handler = (
        logging.StreamHandler(os.fdopen(open_log_file(log_file), "a", encoding="utf-8"))
        if log_file
        else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(PrintableFormatter("corfs: %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for refreshing in ("botocore.credentials", "botocore.tokens"):  # tokens: SSO's
        logging.getLogger(refreshing).addFilter(QuietRepeats())


def _mount_config(args: argparse.Namespace) -> MountConfig:
    from .base import BaseOptions
    from .manifest import MAX_CHUNK_SIZE

    # Bounded as a manifest's chunks are: one foreground fill holds up to MAX_FOREGROUND_RUN
    # chunks in memory (a mistyped --chunk-size 4G asked for 32 GiB at the first miss).
    if not 4096 <= args.chunk_size <= MAX_CHUNK_SIZE or args.chunk_size & (args.chunk_size - 1):
        raise UsageError(
            f"--chunk-size must be a power of two from 4k to {MAX_CHUNK_SIZE >> 20}M, "
            f"not {args.chunk_size}"
        )
    if args.manifest_memory <= 0:  # 0 would leave out every published image, not lift the cap
        raise UsageError(f"--manifest-memory must be above 0, not {args.manifest_memory}")
    if args.random_range < 4096 or args.random_range & (args.random_range - 1):
        raise UsageError(
            f"--random-range must be a power of two of at least 4k, not {args.random_range}"
        )
    if not args.io_timeout > 0:  # nan too: trio refuses a NaN deadline at every base read
        raise UsageError(f"--io-timeout must be positive, not {args.io_timeout}")
    # Checked here, not when serving: a mode or id the kernel's attributes cannot hold failed
    # every lookup of a mount that had come up (EIO); file type bits made images non-files.
    if not 0 <= args.mode <= 0o7777:
        raise UsageError(f"--mode must be a permission mode from 0 to 7777, not {args.mode:o}")
    # Below 1 the HTTP client's pool got no connection at all (--connections -2): every
    # request of a live server ended as "no answer within --io-timeout", the base blamed.
    if args.connections < 1:
        raise UsageError(f"--connections must be at least 1, not {args.connections}")
    if args.owner is not None and not all(0 <= i < MAX_ID for i in args.owner):
        raise UsageError(f"--owner ids must be from 0 to {MAX_ID - 1}, not {args.owner}")
    base = _base_of(args)
    _check_base_url(base)
    if args.ca_file is not None:
        _check_ca_file(args.ca_file)
    if args.endpoint_url is not None:
        _check_endpoint_url(args.endpoint_url)
    from .metrics import parse_listen_address

    return MountConfig(
        base_url=base,
        cache_dir=args.cache,
        mountpoint=args.mountpoint,
        chunk_size=args.chunk_size,
        read_only=args.read_only,
        reset_stale=args.reset_stale,
        forget_detached=tuple(args.forget_detached),
        allow_other=args.allow_other,
        owner=args.owner,
        mode=args.mode,
        metrics=parse_listen_address(args.metrics) if args.metrics else None,
        base=BaseOptions(
            io_timeout=args.io_timeout,
            ca_file=args.ca_file,
            auth_header_env=args.auth_header_env,
            endpoint_url=args.endpoint_url,
            region=args.region,
            profile=args.profile,
            max_connections=args.connections,
            manifest_memory=args.manifest_memory,
        ),
        write_behind=args.write_behind,
        random_range=args.random_range,
        read_memory=args.read_memory,
        stream=StreamConfig(
            enabled=not args.no_stream,
            start_paused=args.stream_paused,
            bandwidth=args.bandwidth,
            trace_file=args.trace,
            record_trace=args.record_trace,
        ),
    ).with_absolute_paths()


def _check_ca_file(path: str) -> None:
    """A FIFO or a device as --ca-file held the mount for ever in the CA's read. A shell's
    `<(...)` is a pipe too, refused with them: an S3 base reads the file twice."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UsageError(f"--ca-file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"--ca-file {path} is not a regular file")


def _base_of(args: argparse.Namespace) -> str:
    """BASE as given, or with --base-env read from that variable: a URL whose query string
    signs it (a presigned URL) on the command line is in every local user's `ps`."""
    if args.base_env is None:
        if args.base == "-":
            raise UsageError("BASE '-' means --base-env VAR names where BASE is")
        return str(args.base)
    if args.base != "-":
        raise UsageError("with --base-env, give BASE as '-'")
    # Out of the environment once read: a credential_process botocore starts inherits it
    value = os.environ.pop(args.base_env, "").strip()
    if not value:
        raise UsageError(f"--base-env: environment variable {args.base_env} is not set or empty")
    return value


def _check_base_url(url: str) -> None:
    """UsageError for a BASE URL that does not parse (an unclosed IPv6 bracket, a port out of
    range: a ValueError and a traceback deep in the base), or an s3:// URL with user info in
    it (its error line showed it whole, secret included). URLs are never quoted whole here:
    they may carry credentials."""
    from .base import parse_s3_url

    if "://" not in url:
        return
    if url.startswith("s3://"):
        parse_s3_url(url)  # a bucket name first: no user info
        return
    _check_authority(url, "BASE")


_PASSWORD_HINT = "a password holding '/', '?' or '#' must be %-encoded, an '@' in a path %40"


def _check_authority(url: str, role: str) -> None:
    """UsageError, quoting nothing of it, if URL's host part does not parse, or its path holds
    an '@' while the host part has none. A password holding '/' ends the host part early: what
    precedes it reads as a port (ValueError quoting it), or, all digits, as a valid one, the
    rest of the password then in the path, sent to the wrong host and shown in every line
    naming the base. (The query may hold an '@': presigned URLs.)"""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError:  # its text quotes the "port": a password's start
        raise UsageError(
            f"{role} is not a valid URL: its host or port does not parse ({_PASSWORD_HINT})"
        ) from None
    if "@" in parts.path and "@" not in parts.netloc:
        raise UsageError(f"{role} has an '@' after its host part ({_PASSWORD_HINT})")


def _check_endpoint_url(url: str) -> None:
    """UsageError unless --endpoint-url is an http(s) URL with a host and no user info:
    botocore raised ValueError for others (a traceback quoting the value)."""
    from urllib.parse import urlsplit

    _check_authority(url, "--endpoint-url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("--endpoint-url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise UsageError("--endpoint-url carries credentials: S3 takes them from the "
                         "environment or --profile")


def _cmd_mount(args: argparse.Namespace) -> int:
    from .daemon import run_mount_daemonized
    from .mount import run_mount

    config = _mount_config(args)
    if args.daemon:
        # Opened before the fork: a path that cannot be opened is one line here, not a
        # traceback in a child that has no log yet.
        return run_mount_daemonized(config, open_log_file(args.log_file) if args.log_file else None)
    run_mount(config)
    return 0


def _cmd_stream(args: argparse.Namespace) -> int:
    if args.op == "bandwidth":
        control_client.send_command(args.mountpoint, {"op": "bandwidth", "rate": args.rate})
        return 0
    if args.mountpoint:
        control_client.send_command(args.mountpoint, {"op": args.op, "image": args.image})
        return 0
    mounts = control_client.corfs_mounts()
    if not mounts:
        raise UsageError("no corfs mount is running")
    command = {"op": args.op, "image": args.image}
    # One that refuses (another user's) or does not answer leaves the others done.
    answers = control_client.ask_every(
        mounts, lambda mountpoint: control_client.send_command(mountpoint, command)
    )
    return _say_failures(answers)


def _cmd_status(args: argparse.Namespace) -> int:
    from .status_view import print_status, watch_status

    paths = [args.path] if args.path else control_client.corfs_mounts()
    if not paths:
        raise UsageError("no corfs mount is running; name a cache dir to see its state")
    if args.watch:
        return watch_status(paths)
    if args.path:
        print_status([control_client.status_of_path(args.path)], as_json=args.json)
        return 0
    # Every mount of the machine: one that cannot be read (a dead daemon, another user's
    # mount) is one line on stderr, the others are still shown.
    answers = control_client.ask_every(paths, control_client.status_of_path)
    code = _say_failures(answers)  # first: a reader of stdout that goes away loses no error
    print_status([a for a in answers if not isinstance(a, CorfsError)], as_json=args.json)
    return code


def _say_failures(answers: list) -> int:
    """One line on stderr per failed answer of `ask_every`; the exit code of the last one
    (0 if none failed)."""
    code = 0
    for answer in answers:
        if isinstance(answer, CorfsError):
            print(error_line(answer), file=sys.stderr)
            code = answer.exit_code
    return code


def _cmd_verify(args: argparse.Namespace) -> int:
    from . import scrub

    reports = scrub.verify_cache(args.cache, args.image)
    scrub.print_reports(reports, as_json=args.json)
    return 0 if all(r.bad == 0 and r.error is None for r in reports) else 1


def _cmd_detach(args: argparse.Namespace) -> int:
    from .detach_cli import run_detach
    from .handoff import Via

    if not args.timeout >= 0:  # nan: `now > deadline` never held, --wait waited for ever
        raise UsageError(f"--timeout must be a number of seconds, not {args.timeout}")
    # The daemon resolves the socket in its own working directory, not the caller's.
    qmp = os.path.abspath(args.qmp) if args.qmp else None
    via = Via(qmp=qmp, virsh=args.virsh) if qmp or args.virsh else None
    print(run_detach(args.cache, args.image, args.dest, via, wait=args.wait,
                     timeout=args.timeout))
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from . import publish

    if args.endpoint_url is not None:
        _check_endpoint_url(args.endpoint_url)
    for summary in publish.publish_from_args(args):
        print(publish.format_summary(summary))
    return 0


COMMANDS = {
    "mount": _cmd_mount,
    "status": _cmd_status,
    "stream": _cmd_stream,
    "verify": _cmd_verify,
    "detach": _cmd_detach,
    "publish": _cmd_publish,
}


def _stdout_unread() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll says POLLERR for such a pipe)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no stdout at all
        return False


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)  # CACHE, logs, a detached image: the user's alone (cache_layout.py)
    args = build_parser().parse_args(argv)
    try:
        _setup_logging(
            args.verbose,
            getattr(args, "log_file", None) if not getattr(args, "daemon", False) else None,
        )
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if not _stdout_unread():
            raise
        # `corfs status | head -1`: the reader is gone, as for any Unix tool. Nothing more
        # can be said there, and Python's flush of stdout at exit would fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except BaseException as exc:  # the one place errors become exit codes
        error = leaf_error(exc)
        if error is None:
            raise
        print(error_line(error), file=sys.stderr)
        return error.exit_code
