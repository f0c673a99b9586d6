"""corfs and its peers as mounts that expose one image as a file, for bench/peers.py and
bench/tls.py: httpdirfs, `rclone mount --vfs-cache-mode full`, nbdkit's curl plugin with its
cache filter read through nbdfuse, and QEMU's own copy-on-read (a qcow2 overlay with the HTTP
URL as backing, read through qemu-storage-daemon's FUSE export of a copy-on-read filter).

Each mount takes `root` (mountpoints, sockets, logs) and `cache_root` (each system's fresh
cache: the device under test), and always unmounts and stops what it started."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from corfs import control_client
from corfs.mountinfo import find_mount
from tests.servers import stop_process

from .harness import corfs_argv, corfs_status, fresh_dir, mounted


@dataclass(frozen=True)
class Target:
    """The image to mount: its URL (what the peers read), its size, the CA file for https,
    and for corfs the base to mount when it is not the URL (an s3:// bucket) and options."""

    url: str
    size: int
    ca: str | None = None
    corfs_base: str | None = None
    corfs_options: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[1]

    @property
    def directory(self) -> str:
        return self.url.rsplit("/", 1)[0] + "/"


@dataclass
class Mount:
    path: str  # the image as a file
    fetched_self: Callable[[], int] | None = None  # bytes fetched as the system reports them
    pid: int | None = None  # the daemon serving it, to kill if it stalls
    # called as the measured work starts: corfs's stream, mounted paused, starts there, so
    # it gets no head start while the bench settles and drops caches
    start: Callable[[], None] = lambda: None
    peak_rss: Callable[[], int] | None = None  # the daemon's VmHWM in bytes


def _wait_file(path: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


@contextlib.contextmanager
def mount_corfs(
    root: str, cache_root: str, target: Target, *, stream: bool = False
) -> Iterator[Mount]:
    cache = fresh_dir(os.path.join(cache_root, "cache-corfs"))
    mnt = os.path.join(root, "mnt-corfs")
    mode = "--stream-paused" if stream else "--no-stream"
    options = list(target.corfs_options) + (["--ca-file", target.ca] if target.ca else [])
    argv = corfs_argv(target.corfs_base or target.url, cache, mnt, mode, *options)
    with mounted(argv, mnt, os.path.join(root, "corfs.log")) as daemon:

        def fetched() -> int:
            return int(corfs_status(mnt)["fetcher"]["bytes_fetched"])

        def resume() -> None:
            control_client.send_command(mnt, {"op": "resume", "image": None})

        yield Mount(
            os.path.join(mnt, target.name),
            fetched,
            pid=daemon.proc.pid,
            start=resume if stream else lambda: None,
            peak_rss=daemon.peak_rss_bytes,
        )


@contextlib.contextmanager
def mount_floor(
    root: str, cache_root: str, target: Target, *, blocking: bool = False
) -> Iterator[Mount]:
    """bench/floor_fs.py: fetch-only pyfuse3 file systems, the floor under corfs's random reads
    (no cache: `cache_root` is unused)."""
    mnt = os.path.join(root, "mnt-floor")
    argv = [sys.executable, os.path.join(os.path.dirname(__file__), "floor_fs.py"), target.url,
            str(target.size), mnt] + (["--blocking"] if blocking else [])
    with mounted(argv, mnt, os.path.join(root, "floor.log")) as daemon:
        yield Mount(os.path.join(mnt, "disk.raw"), pid=daemon.proc.pid)


@contextlib.contextmanager
def mount_httpdirfs(root: str, cache_root: str, target: Target) -> Iterator[Mount]:
    cache = fresh_dir(os.path.join(cache_root, "cache-httpdirfs"))
    mnt = os.path.join(root, "mnt-httpdirfs")
    argv = ["httpdirfs", "-f", "--no-range-check", "--cache", "--cache-location", cache]
    argv += ["--cacert", target.ca] if target.ca else []
    with mounted([*argv, target.directory, mnt], mnt, os.path.join(root, "httpdirfs.log")) as d:
        path = os.path.join(mnt, target.name)
        _wait_file(path, d.proc)
        # httpdirfs 1.2.5 crashes when the last handle closes during a download: keep one.
        keep = os.open(path, os.O_RDONLY)
        try:
            yield Mount(path, pid=d.proc.pid)
        finally:
            os.close(keep)


@contextlib.contextmanager
def mount_rclone(root: str, cache_root: str, target: Target) -> Iterator[Mount]:
    cache = fresh_dir(os.path.join(cache_root, "cache-rclone"))
    mnt = os.path.join(root, "mnt-rclone")
    config = os.path.join(root, "rclone.conf")
    open(config, "w").close()
    argv = ["rclone", "mount", ":http:", mnt, "--http-url", target.directory]
    argv += ["--vfs-cache-mode", "full", "--cache-dir", cache, "--config", config]
    argv += ["--ca-cert", target.ca] if target.ca else []
    with mounted(argv, mnt, os.path.join(root, "rclone.log")) as daemon:
        path = os.path.join(mnt, target.name)
        _wait_file(path, daemon.proc)
        yield Mount(path, pid=daemon.proc.pid)


@contextlib.contextmanager
def mount_nbdkit(root: str, cache_root: str, target: Target) -> Iterator[Mount]:
    cache = fresh_dir(os.path.join(cache_root, "cache-nbdkit"))  # the cache filter's temp file
    mnt = os.path.join(root, "mnt-nbdkit")
    sock = os.path.join(root, "nbdkit.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    argv = ["nbdkit", "-f", "-U", sock, "--filter=cache", "curl", f"url={target.url}"]
    argv += [f"cainfo={target.ca}"] if target.ca else []
    log = open(os.path.join(root, "nbdkit.log"), "ab")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [*argv, "cache-on-read=true"], stdout=log, stderr=log, env=dict(os.environ, TMPDIR=cache)
    )
    try:
        _wait_file(sock, server)
        with mounted(["nbdfuse", mnt, "--unix", sock], mnt, os.path.join(root, "nbdfuse.log")):
            yield Mount(os.path.join(mnt, "nbd"), pid=server.pid)
    finally:
        stop_process(server, timeout=20)
        log.close()


@contextlib.contextmanager
def qemu_overlay(cache_root: str, target: Target) -> Iterator[str]:
    """A fresh qcow2 overlay whose backing file is the image's HTTP URL (raw)."""
    overlay = os.path.join(fresh_dir(os.path.join(cache_root, "cache-qemu")), "overlay.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", target.url, overlay,
         str(target.size)],
        check=True,
    )
    yield overlay


@contextlib.contextmanager
def mount_qemu(root: str, cache_root: str, target: Target) -> Iterator[Mount]:
    """QEMU's copy-on-read: a copy-on-read filter over the overlay, exported by
    qemu-storage-daemon as a FUSE file (read-only export; the filter writes the overlay)."""
    with qemu_overlay(cache_root, target) as overlay:
        export = os.path.join(root, "qemu-export.raw")
        open(export, "w").close()
        argv = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=qcow2,node-name=ov,file.driver=file,file.filename={overlay}",
            "--blockdev",
            "driver=copy-on-read,node-name=cor,file=ov",
            "--export",
            f"type=fuse,id=e,node-name=cor,mountpoint={export},writable=off",
        ]
        with mounted(argv, export, os.path.join(root, "qsd.log")) as daemon:
            # QEMU 7.2's curl driver stalled now and then under the kernel's concurrent
            # read-ahead requests (1 run in 3 here); with read-ahead off, 0 in 4.
            entry = find_mount(export)
            assert entry is not None, f"{export} is not mounted"
            with open(f"/sys/class/bdi/{entry.device}/read_ahead_kb", "w") as f:
                f.write("0\n")
            yield Mount(export, pid=daemon.proc.pid)


MountFn = Callable[[str, str, Target], contextlib.AbstractContextManager[Mount]]
MOUNTS: dict[str, MountFn] = {
    "corfs": mount_corfs,
    # corfs's default (background streaming on): sequential reads only, a random-read
    # amplification would count the stream.
    "corfs+stream": functools.partial(mount_corfs, stream=True),
    "httpdirfs": mount_httpdirfs,
    "rclone": mount_rclone,
    "nbdkit": mount_nbdkit,
    "qemu": mount_qemu,
    "floor": mount_floor,
    "floor-blocking": functools.partial(mount_floor, blocking=True),
}
FLOORS = ["floor", "floor-blocking", "exchange"]  # not peers: the random workload's baselines only
LABELS = {
    "corfs": "corfs (--no-stream)",
    "corfs+stream": "corfs (default: streaming on)",
    "httpdirfs": "httpdirfs --cache",
    "rclone": "rclone mount --vfs-cache-mode full",
    "nbdkit": "nbdkit curl + cache filter, nbdfuse",
    "qemu": "QEMU copy-on-read (qsd FUSE export)",
    "floor": "floor: pyfuse3 + trio, fetch only (corfs's lean reader)",
    "floor-blocking": "floor: pyfuse3, fetch only, blocking socket",
    "exchange": "floor: the ranged GET alone, no FUSE (blocking socket)",
}
