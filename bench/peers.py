"""Issue 4 benchmark: corfs side by side with its peers, in one run, over the same nginx on
loopback: httpdirfs, `rclone mount --vfs-cache-mode full`, nbdkit's curl plugin with its cache
filter read through nbdfuse, and QEMU's own copy-on-read (a qcow2 overlay with the HTTP URL as
backing: reads through qemu-storage-daemon's FUSE export of a copy-on-read filter, streaming
with `block-stream` over QMP in qemu-system-x86_64).

Workloads (page cache dropped before each, fresh caches):
- cold sequential 1 MiB reads of a 1 GiB image through each mount, and `curl -o /dev/null`;
- cold random 4 KiB O_DIRECT reads (2000 at seeded offsets): base bytes fetched / bytes read;
- full streaming of a 2 GiB image: corfs (mount, status complete, fsync) vs QEMU block-stream
  (job done, QEMU closed the overlay, fsync) vs `curl -o FILE && sync`.

Base bytes fetched are counted in nginx's own access log ($body_bytes_sent of GETs of the
image); for corfs also its status `fetcher.bytes_fetched`.

    python -m bench.peers [--seq-mib 1024] [--stream-mib 2048] [--random-reads 2000]
                          [--only corfs,httpdirfs,...] [--markdown FILE]"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import mmap
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from corfs import control_client
from corfs.mountinfo import find_mount
from tests.mounting import lazy_unmount
from tests.servers import Nginx, stop_process

from .harness import (
    MiB,
    corfs_argv,
    corfs_status,
    drop_caches,
    fresh_dir,
    machine,
    make_image,
    mounted,
    wait_complete,
    workdir,
)

PEERS = ["corfs", "corfs+stream", "httpdirfs", "rclone", "nbdkit", "qemu"]


def fetched_since(nginx: Nginx, mark: int, uri: str) -> tuple[int, int]:
    """(body bytes sent, requests) for GETs of `uri` that nginx logged after `mark`."""
    time.sleep(0.3)  # a request logs when it ends; closed connections end just after
    requests, sent = nginx.sent(uri, since=mark, method="GET")
    return sent, requests


# ---- each system as a mount that yields the image's path ---------------------------------


@dataclass
class Mount:
    path: str  # the image as a file
    fetched_self: Callable[[], int] | None = None  # bytes fetched as the system reports them
    pid: int | None = None  # the daemon serving it, to kill if it stalls
    # called as the measured work starts: corfs's stream, mounted paused, starts there, so
    # it gets no head start while the bench settles and drops caches
    start: Callable[[], None] = lambda: None


def _wait_file(path: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


@contextlib.contextmanager
def mount_corfs(root: str, nginx: Nginx, uri: str, *, stream: bool = False) -> Iterator[Mount]:
    cache = fresh_dir(os.path.join(root, "cache-corfs"))
    mnt = os.path.join(root, "mnt-corfs")
    mode = "--stream-paused" if stream else "--no-stream"
    argv = corfs_argv(nginx.url + uri.lstrip("/"), cache, mnt, mode)
    with mounted(argv, mnt, os.path.join(root, "corfs.log")):
        name = os.path.basename(uri)

        def fetched() -> int:
            return int(corfs_status(mnt)["fetcher"]["bytes_fetched"])

        def resume() -> None:
            control_client.send_command(mnt, {"op": "resume", "image": None})

        yield Mount(os.path.join(mnt, name), fetched, start=resume if stream else lambda: None)


@contextlib.contextmanager
def mount_httpdirfs(root: str, nginx: Nginx, uri: str) -> Iterator[Mount]:
    cache = fresh_dir(os.path.join(root, "cache-httpdirfs"))
    mnt = os.path.join(root, "mnt-httpdirfs")
    directory = os.path.dirname(uri).strip("/") + "/"
    argv = [
        "httpdirfs",
        "-f",
        "--no-range-check",
        "--cache",
        "--cache-location",
        cache,
        nginx.url + directory,
        mnt,
    ]
    with mounted(argv, mnt, os.path.join(root, "httpdirfs.log")) as daemon:
        path = os.path.join(mnt, os.path.basename(uri))
        _wait_file(path, daemon.proc)
        # httpdirfs 1.2.5 crashes when the last handle closes during a download: keep one.
        keep = os.open(path, os.O_RDONLY)
        try:
            yield Mount(path)
        finally:
            os.close(keep)


@contextlib.contextmanager
def mount_rclone(root: str, nginx: Nginx, uri: str) -> Iterator[Mount]:
    cache = fresh_dir(os.path.join(root, "cache-rclone"))
    mnt = os.path.join(root, "mnt-rclone")
    config = os.path.join(root, "rclone.conf")
    open(config, "w").close()
    directory = os.path.dirname(uri).strip("/") + "/"
    argv = [
        "rclone",
        "mount",
        ":http:",
        mnt,
        "--http-url",
        nginx.url + directory,
        "--vfs-cache-mode",
        "full",
        "--cache-dir",
        cache,
        "--config",
        config,
    ]
    with mounted(argv, mnt, os.path.join(root, "rclone.log")) as daemon:
        path = os.path.join(mnt, os.path.basename(uri))
        _wait_file(path, daemon.proc)
        yield Mount(path)


@contextlib.contextmanager
def mount_nbdkit(root: str, nginx: Nginx, uri: str) -> Iterator[Mount]:
    cache = fresh_dir(os.path.join(root, "cache-nbdkit"))  # the cache filter's temp file
    mnt = os.path.join(root, "mnt-nbdkit")
    sock = os.path.join(root, "nbdkit.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    log = open(os.path.join(root, "nbdkit.log"), "ab")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            "nbdkit",
            "-f",
            "-U",
            sock,
            "--filter=cache",
            "curl",
            f"url={nginx.url + uri.lstrip('/')}",
            "cache-on-read=true",
        ],
        stdout=log,
        stderr=log,
        env=dict(os.environ, TMPDIR=cache),
    )
    try:
        _wait_file(sock, server)
        with mounted(["nbdfuse", mnt, "--unix", sock], mnt, os.path.join(root, "nbdfuse.log")):
            yield Mount(os.path.join(mnt, "nbd"))
    finally:
        stop_process(server, timeout=20)
        log.close()


@contextlib.contextmanager
def qemu_overlay(root: str, nginx: Nginx, uri: str, size: int) -> Iterator[str]:
    """A fresh qcow2 overlay whose backing file is the image's HTTP URL (raw)."""
    overlay = os.path.join(fresh_dir(os.path.join(root, "cache-qemu")), "overlay.qcow2")
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            nginx.url + uri.lstrip("/"),
            overlay,
            str(size),
        ],
        check=True,
    )
    yield overlay


@contextlib.contextmanager
def mount_qemu(root: str, nginx: Nginx, uri: str) -> Iterator[Mount]:
    """QEMU's copy-on-read: a copy-on-read filter over the overlay, exported by
    qemu-storage-daemon as a FUSE file (read-only export; the filter writes the overlay)."""
    size = os.path.getsize(os.path.join(nginx.root, uri.lstrip("/")))
    with qemu_overlay(root, nginx, uri, size) as overlay:
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


MOUNTS = {
    "corfs": mount_corfs,
    # corfs's default (background streaming on): sequential reads only, a random-read
    # amplification would count the stream.
    "corfs+stream": functools.partial(mount_corfs, stream=True),
    "httpdirfs": mount_httpdirfs,
    "rclone": mount_rclone,
    "nbdkit": mount_nbdkit,
    "qemu": mount_qemu,
}
LABELS = {
    "corfs": "corfs (--no-stream)",
    "corfs+stream": "corfs (default: streaming on)",
    "httpdirfs": "httpdirfs --cache",
    "rclone": "rclone mount --vfs-cache-mode full",
    "nbdkit": "nbdkit curl + cache filter, nbdfuse",
    "qemu": "QEMU copy-on-read (qsd FUSE export)",
}


# ---- workloads ----------------------------------------------------------------------------


class Stalled(Exception):
    pass


STALL_SECONDS = 30.0


def watched(work: Callable[[list[int]], dict], pid: int | None) -> dict:
    """Run `work(progress)` in a thread; when progress[0] stays put for STALL_SECONDS, kill the
    daemon `pid` (its mount then fails the blocked read) and raise Stalled."""
    import threading

    progress = [0]
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = work(progress)
        except BaseException as e:  # handed to the caller
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    last, since = -1, time.monotonic()
    while thread.is_alive():
        thread.join(0.5)
        if progress[0] != last:
            last, since = progress[0], time.monotonic()
        elif time.monotonic() - since > STALL_SECONDS and pid is not None:
            os.kill(pid, signal.SIGKILL)
            thread.join(30)
            raise Stalled(f"no progress for {STALL_SECONDS:.0f} s after {last} steps")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def sequential_read(path: str, progress: list[int], begin: Callable[[], None]) -> dict:
    """MB/s of reading `path` front to back in 1 MiB requests (as harness.read_sequential);
    the clock starts before `begin()`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        begin()
        total = 0
        while chunk := os.read(fd, MiB):
            total += len(chunk)
            progress[0] += 1
        return {"MB/s": total / (time.perf_counter() - start) / 1e6}
    finally:
        os.close(fd)


def random_reads(path: str, count: int, progress: list[int], seed: int = 4) -> dict:
    """`count` 4 KiB reads at random 4 KiB-aligned offsets, O_DIRECT when the mount allows."""
    size = os.stat(path).st_size
    rng = random.Random(seed)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
    buf = mmap.mmap(-1, 4096)
    direct = True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        direct = False
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        latencies = []
        for offset in offsets:
            t0 = time.perf_counter()
            try:
                n = os.preadv(fd, [buf], offset)
            except OSError:
                if not direct:
                    raise
                # Some FUSE mounts accept O_DIRECT at open and refuse it at read.
                os.close(fd)
                direct = False
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                n = os.preadv(fd, [buf], offset)
            latencies.append(time.perf_counter() - t0)
            progress[0] += 1
            assert n == 4096, n
    finally:
        os.close(fd)
    latencies.sort()
    return {
        "seconds": sum(latencies),
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "direct": direct,
    }


def run_mount_workloads(name: str, root: str, nginx: Nginx, uri: str, reads: int) -> dict:
    """Cold sequential then cold random reads, each on a fresh mount and cache. A mount that
    stalls is killed and the measurement retried (up to 3 attempts), and counted."""
    result: dict = {}
    size = os.path.getsize(os.path.join(nginx.root, uri.lstrip("/")))
    for key, work in (
        ("seq", sequential_read),
        ("rand", lambda path, progress, _begin: random_reads(path, reads, progress)),
    ):
        if key == "rand" and name == "corfs+stream":
            continue
        for attempt in range(1, 4):
            try:
                drop_caches()
                mark = nginx.log_mark()
                with MOUNTS[name](root, nginx, uri) as m:
                    drop_caches()
                    figures = watched(lambda p, m=m, work=work: work(m.path, p, m.start), m.pid)
                    if m.fetched_self:
                        figures["fetched (self)"] = m.fetched_self()
                fetched, requests = fetched_since(nginx, mark, uri)
                figures.update(fetched=fetched, requests=requests)
                figures["amplification"] = fetched / (size if key == "seq" else reads * 4096)
                if "fetched (self)" in figures:
                    figures["amplification (self)"] = figures["fetched (self)"] / (
                        size if key == "seq" else reads * 4096
                    )
                if key == "rand":
                    figures["IOPS"] = reads / figures["seconds"]
                figures["attempts"] = attempt
                result.update({f"{key} {k}": v for k, v in figures.items()})
                result.pop(f"{key} error", None)
                break
            except Stalled as e:
                result[f"{key} stalls"] = result.get(f"{key} stalls", []) + [str(e)]
                result[f"{key} error"] = f"stalled {attempt}× ({e})"
            except Exception as e:  # a failing peer is reported, not fatal
                result[f"{key} error"] = f"{type(e).__name__}: {e}"
                break
    return result


def curl_seconds(url: str, out: str, sync: bool) -> float:
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["curl", "-sf", "-o", out, url], check=True)
    if sync:
        subprocess.run(["sync", out], check=True)
    return time.perf_counter() - start


# ---- streaming -----------------------------------------------------------------------------


class Qmp:
    def __init__(self, path: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP closed")
        return json.loads(line)

    def execute(self, command: str, **arguments: object) -> object:
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            elif "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def stream_corfs(root: str, nginx: Nginx, uri: str, size: int) -> dict:
    cache = fresh_dir(os.path.join(root, "cache-corfs"))
    mnt = os.path.join(root, "mnt-corfs")
    drop_caches()
    mark = nginx.log_mark()
    argv = corfs_argv(nginx.url + uri.lstrip("/"), cache, mnt)
    with mounted(argv, mnt, os.path.join(root, "corfs-stream.log")):
        start = time.perf_counter()
        wait_complete(mnt, timeout=1800)
        # Complete means recorded in memory; the final commit is part of the job.
        fd = os.open(os.path.join(mnt, os.path.basename(uri)), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        seconds = time.perf_counter() - start
        fetched_self = int(corfs_status(mnt)["fetcher"]["bytes_fetched"])
    fetched, requests = fetched_since(nginx, mark, uri)
    return {
        "seconds": seconds,
        "fetched": fetched,
        "requests": requests,
        "fetched (self)": fetched_self,
    }


def stream_qemu(root: str, nginx: Nginx, uri: str, size: int) -> dict:
    """block-stream into a qcow2 overlay backed by the URL, in qemu-system-x86_64 (no guest);
    the time includes QEMU closing the overlay and an fsync of it."""
    with qemu_overlay(root, nginx, uri, size) as overlay:
        qmp_path = os.path.join(root, "qmp.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qmp_path)
        log = open(os.path.join(root, "qemu.log"), "ab")  # noqa: SIM115 - closed below
        drop_caches()
        mark = nginx.log_mark()
        proc = subprocess.Popen(
            [
                "qemu-system-x86_64",
                "-nodefaults",
                "-display",
                "none",
                "-machine",
                "none",
                "-qmp",
                f"unix:{qmp_path},server=on,wait=off",
                "-blockdev",
                f"driver=qcow2,node-name=top,file.driver=file,file.filename={overlay}",
            ],
            stdout=log,
            stderr=log,
        )
        try:
            qmp = Qmp(qmp_path)
            start = time.perf_counter()
            qmp.execute("block-stream", **{"job-id": "stream", "device": "top"})
            while qmp.execute("query-block-jobs"):
                time.sleep(0.1)
            errors = [e for e in qmp.events if e.get("data", {}).get("error")]
            if errors:
                raise RuntimeError(f"block-stream failed: {errors[0]}")
            qmp.execute("quit")
            qmp.close()
            proc.wait(60)
            fd = os.open(overlay, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            seconds = time.perf_counter() - start
        finally:
            stop_process(proc, timeout=20)
            log.close()
        fetched, requests = fetched_since(nginx, mark, uri)
        return {
            "seconds": seconds,
            "fetched": fetched,
            "requests": requests,
            "overlay bytes on disk": os.stat(overlay).st_blocks * 512,
        }


# ---- report ---------------------------------------------------------------------------------


def fmt(value: object, digits: int = 1) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def stall_notes(mounts: dict, key: str) -> list[str]:
    notes = [
        f"- {LABELS[name]}: stalled and was killed after {STALL_SECONDS:.0f} s without progress: "
        + "; ".join(r[f"{key} stalls"])
        for name, r in mounts.items()
        if r.get(f"{key} stalls")
    ]
    return ["", *notes] if notes else []


def markdown(meta: dict, curl: dict, mounts: dict, stream: dict, reads: int) -> str:
    lines = [
        f"## Run of {meta['date']}",
        "",
        f"- machine: {meta['machine']}",
        f"- load average (1, 5, 15 min) at start {meta['load start']}, at end {meta['load end']}",
        f"- images: random bytes (no zeros), {meta['seq MiB']} MiB for reads, "
        f"{meta['stream MiB']} MiB for streaming; nginx on 127.0.0.1, page cache dropped "
        "before each measurement, each system with a fresh cache",
        "",
        "### Cold sequential 1 MiB reads",
        "",
        "| system | MB/s | / curl | base bytes / image size | requests |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| `curl -o /dev/null` | {fmt(curl['seq MB/s'])} | 1.00 | 1.00 | 1 |",
    ]
    best_peer = max(
        (r.get("seq MB/s", 0.0) for n, r in mounts.items() if not n.startswith("corfs")),
        default=0.0,
    )
    for name, r in mounts.items():
        if "seq error" in r:
            lines.append(f"| {LABELS[name]} | failed: {r['seq error']} | | | |")
            continue
        lines.append(
            f"| {LABELS[name]} | {fmt(r['seq MB/s'])} | {r['seq MB/s'] / curl['seq MB/s']:.2f} "
            f"| {r['seq amplification']:.2f} | {r['seq requests']} |"
        )
    lines += stall_notes(mounts, "seq")
    for name in ("corfs", "corfs+stream"):
        if "seq MB/s" in mounts.get(name, {}) and best_peer:
            ratio = mounts[name]["seq MB/s"] / best_peer
            lines += ["", f"{LABELS[name]} / best peer: **{ratio:.2f}×** (goal ≥ 1.5×)"]
    lines += [
        "",
        f"### Cold random 4 KiB reads ({reads} at seeded random offsets, one at a time)",
        "",
        "| system | O_DIRECT | read amplification (nginx log) | requests | IOPS | p50 ms "
        "| p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in mounts.items():
        if name == "corfs+stream":
            continue
        if "rand error" in r:
            lines.append(f"| {LABELS[name]} | failed: {r['rand error']} | | | | | |")
            continue
        amp = f"{r['rand amplification']:.1f}"
        if "rand amplification (self)" in r:
            amp += f" (status: {r['rand amplification (self)']:.1f})"
        lines.append(
            f"| {LABELS[name]} | {'yes' if r['rand direct'] else 'no (refused)'} | {amp} "
            f"| {r['rand requests']} | {r['rand IOPS']:.0f} | {r['rand p50_ms']:.2f} "
            f"| {r['rand p99_ms']:.2f} |"
        )
    lines += stall_notes(mounts, "rand")
    size = meta["stream MiB"] * MiB
    lines += [
        "",
        f"### Full streaming of the {meta['stream MiB']} MiB image",
        "",
        "| system | seconds | MB/s | base bytes / image size | requests |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| `curl -o FILE && sync` | {curl['stream s']:.2f} | {size / curl['stream s'] / 1e6:.0f}"
        " | 1.00 | 1 |",
    ]
    for name, r in stream.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | |")
            continue
        amp = f"{r['fetched'] / size:.2f}"
        if "fetched (self)" in r:
            amp += f" (status: {r['fetched (self)'] / size:.2f})"
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {size / r['seconds'] / 1e6:.0f} | {amp} "
            f"| {r['requests']} |"
        )
    c = stream.get("corfs (mount → complete → fsync)", {})
    q = stream.get("QEMU block-stream (→ closed → fsync)", {})
    if "seconds" in c:
        lines.append("")
        if "seconds" in q:
            lines.append(
                f"corfs / QEMU speed: **{q['seconds'] / c['seconds']:.2f}×** (goal ≥ 1.2×)  "
            )
        lines.append(
            f"corfs / curl+sync speed: **{curl['stream s'] / c['seconds']:.2f}×** (goal ≥ 0.9×)"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-mib", type=int, default=1024)
    parser.add_argument("--stream-mib", type=int, default=2048)
    parser.add_argument("--random-reads", type=int, default=2000)
    parser.add_argument("--only", default=",".join(PEERS))
    parser.add_argument("--markdown", help="also write the report here")
    args = parser.parse_args()
    only = [n for n in args.only.split(",") if n]
    root = workdir("peers")
    www = workdir("peers/www")
    os.makedirs(os.path.join(www, "seq"), exist_ok=True)
    os.makedirs(os.path.join(www, "stream"), exist_ok=True)
    seq_uri, stream_uri = "/seq/disk.raw", "/stream/disk.raw"
    make_image(os.path.join(www, seq_uri[1:]), args.seq_mib * MiB, seed=11)
    make_image(os.path.join(www, stream_uri[1:]), args.stream_mib * MiB, seed=12)
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "seq MiB": args.seq_mib,
        "stream MiB": args.stream_mib,
    }
    print(f"machine: {meta['machine']}\nload: {meta['load start']}", flush=True)
    # HTML listings: httpdirfs and rclone read those, not JSON.
    nginx = Nginx(
        Path(www), Path(fresh_dir(os.path.join(root, "nginx"))), autoindex="html", log_requests=True
    ).start()
    try:
        curl: dict = {}
        seq_size = args.seq_mib * MiB
        seq_seconds = curl_seconds(nginx.url + seq_uri[1:], "/dev/null", False)
        curl["seq MB/s"] = seq_size / seq_seconds / 1e6
        print(f"curl -o /dev/null: {curl['seq MB/s']:.0f} MB/s", flush=True)
        mounts = {}
        for name in only:
            mounts[name] = run_mount_workloads(name, root, nginx, seq_uri, args.random_reads)
            print(f"{name}: {json.dumps(mounts[name], default=str)}", flush=True)
        out = os.path.join(root, "curl-copy.raw")
        curl["stream s"] = curl_seconds(nginx.url + stream_uri[1:], out, True)
        os.unlink(out)
        print(f"curl -o FILE && sync: {curl['stream s']:.2f} s", flush=True)
        stream: dict = {}
        size = args.stream_mib * MiB
        for label, fn, name in (
            ("corfs (mount → complete → fsync)", stream_corfs, "corfs"),
            ("QEMU block-stream (→ closed → fsync)", stream_qemu, "qemu"),
        ):
            if name not in only:
                continue
            try:
                stream[label] = fn(root, nginx, stream_uri, size)
            except Exception as e:
                stream[label] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{label}: {json.dumps(stream[label])}", flush=True)
            shutil.rmtree(os.path.join(root, f"cache-{name}"), ignore_errors=True)
    finally:
        nginx.stop()
        for name in PEERS:
            with contextlib.suppress(OSError):
                lazy_unmount(os.path.join(root, f"mnt-{name}"))
    meta["load end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report = markdown(meta, curl, mounts, stream, args.random_reads)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
