"""Issue 4 and 13 benchmark: corfs beside its peers (bench/peer_mounts.py: httpdirfs, rclone,
nbdkit, QEMU) in one run, over the same nginx on loopback, with the day's limits printed beside
every figure, medians of --runs (the systems interleaved round by round: A B, B A), and the
issue 13 targets as ratios.

Workloads (--workloads; page cache dropped before each run, every system with a fresh cache on
the cache device under test):
- seq: cold sequential 1 MiB reads of the --seq-mib image: corfs `--no-stream` and corfs's
  default mount (streaming on) against every peer; the best peer is the fastest of them;
- random: --random-reads cold 4 KiB reads, one at a time (QD1), at seeded offsets, O_DIRECT
  where the mount takes it: IOPS, p99, base bytes fetched per byte read (nginx's log), corfs
  `--no-stream` against nbdkit, and beside them the floors (bench/floor_fs.py: pyfuse3
  daemons that only fetch, one awaiting corfs's lean reader on trio, one a blocking socket)
  and `exchange`: the same reads as bare ranged GETs from the benchmark itself (no FUSE), the
  ceiling of any design that fetches a cold read when it is read;
- concurrent: 8 readers at once, each reading its own eighth of the image, one mount:
  aggregate MB/s against one reader (the seq figure), corfs `--no-stream` and the best peer;
- concurrent-random: 8 random readers at once (VMs booting together), each as the random
  workload's (QD1, 4 KiB, O_DIRECT, its own seed), --random-reads in all (so as many blocks
  are read twice by chance as in the random workload): aggregate IOPS against one reader (the
  random figure), corfs `--no-stream` and nbdkit;
- https: cold sequential over a TLS nginx (bench/tls.py): corfs https://, corfs s3:// over
  https, nbdkit over it, `curl -o /dev/null` over it;
- stream: full stream of the --stream-mib image: corfs (mount, status complete, fsync) against
  QEMU block-stream (job done, QEMU closed, fsync) and `curl -o FILE && sync` (FILE on the
  cache device).
corfs's peak RSS (VmHWM) is recorded in every corfs run.

CORFS_BENCH_TREE=DIR measures the corfs of another checkout (bench/harness.py).

Cache devices (--cache-device): `disk`, the machine's own disk that day, and `throttled`, a
loop device at --throttle-mib MiB/s for reads and writes (bench/cachedev.py says how: a cgroup
v1 blkio rule in the root group, so page-cache writeback is throttled too, not only O_DIRECT).
Limits printed per device: dd 1 MiB O_DIRECT write MB/s on it, `curl -o /dev/null`,
`curl -o FILE && sync` with FILE on it.

    python -m bench.peers [--cache-device disk|throttled|both] [--workloads seq,random,...]
        [--only corfs,corfs+stream,httpdirfs,rclone,nbdkit,qemu,floor,floor-blocking,exchange]
        [--runs 3]
        [--seq-mib 1024] [--stream-mib 1024] [--random-reads 2000] [--range-sizes 16K,64K]
        [--markdown FILE]

`--range-sizes`: the random workload also runs corfs with each of these `--random-range`
(how the default was chosen: ranges.py)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import mmap
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from corfs import control_client
from tests.mounting import lazy_unmount
from tests.servers import Nginx, stop_process

from .cachedev import DEFAULT_RATE, CacheDevice, throttled_device
from .floor_fs import BlockingRanges
from .harness import (
    MiB,
    corfs_argv,
    corfs_status,
    corfs_version,
    curl_mbps,
    disk_direct_mbps,
    drop_caches,
    fresh_dir,
    interleaved,
    machine,
    make_image,
    mounted,
    wait_complete,
    workdir,
)
from .peer_mounts import FLOORS, LABELS, MOUNTS, Target, qemu_overlay
from .tls import TlsSite, https_jobs, tls_site

EXCHANGE = "exchange"  # not a mount: the random workload's reads as bare ranged GETs
PEERS = [*MOUNTS, EXCHANGE]
WORKLOADS = ["seq", "random", "concurrent", "concurrent-random", "https", "stream"]
DEVICES = {"disk": ["disk"], "throttled": ["throttled"], "both": ["disk", "throttled"]}
RANDOM_SYSTEMS = ["corfs", "nbdkit"]  # the random-read target compares these
READERS = 8
RANDOM_SEED = 4  # the random workload's offsets (its concurrent readers: 100 + reader)
CORFS_STREAM = "corfs (resume → complete → fsync)"
QEMU_STREAM = "QEMU block-stream (→ closed → fsync)"
MAIN_KEY = {"random": "IOPS", "concurrent-random": "IOPS"}  # the figure of a workload (MB/s)
SETTLE_S = 2.0  # before each run: let the previous run's writeback reach the disk
Runs = list[dict]  # one dict of figures per run; "error" when it failed
Results = dict[str, dict[str, Runs]]  # workload -> system -> runs


def parse_names(text: str, allowed: list[str], what: str) -> list[str]:
    """A comma-separated subset of `allowed`, in the order given; ValueError names the
    unknown ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what}: {', '.join(unknown) or '(none given)'} "
                         f"(choose from {', '.join(allowed)})")
    return names


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


def random_offsets(size: int, count: int, seed: int) -> list[int]:
    """The workload's `count` 4 KiB-aligned offsets below `size`, the same for every system."""
    rng = random.Random(seed)
    return [rng.randrange(size // 4096) * 4096 for _ in range(count)]


def timed_reads(offsets: list[int], read: Callable[[int], object],
                progress: list[int]) -> dict:
    """`read(offset)` for each offset in turn: their summed seconds, p50 and p99 in ms."""
    latencies = []
    for offset in offsets:
        t0 = time.perf_counter()
        read(offset)
        latencies.append(time.perf_counter() - t0)
        progress[0] += 1
    latencies.sort()
    return {
        "seconds": sum(latencies),
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


def random_reads(path: str, count: int, progress: list[int], seed: int = RANDOM_SEED) -> dict:
    """`count` 4 KiB reads at random 4 KiB-aligned offsets, O_DIRECT when the mount allows."""
    offsets = random_offsets(os.stat(path).st_size, count, seed)
    buf = mmap.mmap(-1, 4096)
    direct = True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        direct = False
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)

    def read(offset: int) -> None:
        nonlocal fd, direct
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
        assert n == 4096, n

    try:
        figures = timed_reads(offsets, read, progress)
    finally:
        os.close(fd)
    return {**figures, "direct": direct}


def exchange_reads(site: Site, count: int) -> dict:
    """The random workload's reads as bare ranged GETs from this process (a blocking socket,
    no FUSE, no daemon), origin page cache dropped: the ceiling of any file system that
    fetches each cold read from this origin when it is read."""
    ranges = BlockingRanges(site.target.url)
    offsets = random_offsets(site.size, count, RANDOM_SEED)
    drop_caches()
    mark = site.nginx.log_mark()
    try:
        figures = timed_reads(offsets, lambda offset: ranges.read(offset, 4096), [0])
    finally:
        ranges.close()
    figures["IOPS"] = count / figures.pop("seconds")
    figures["fetched / read"] = site.fetched(mark) / (count * 4096)
    return figures


def clear_device(cache_root: str) -> None:
    """Remove every system's cache (cache-NAME) and curl's copy from the cache device."""
    for entry in os.scandir(cache_root):
        if entry.name.startswith("cache-") and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.name.startswith("curl"):
            os.remove(entry.path)


def guarded(work: Callable[[], dict], cache_root: str) -> dict:
    """One run's figures, or {"error": ...}: a failing or stalling system is reported. The
    caches of earlier runs are removed first, so each run has the device's room."""
    clear_device(cache_root)
    try:
        return work()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


@dataclass
class Site:
    """Where a device's runs happen: mountpoints and logs under `root`, caches under
    `cache_root` (the device under test), the image served by `nginx` at `uri`."""

    root: str
    cache_root: str
    nginx: Nginx
    uri: str
    size: int

    @property
    def target(self) -> Target:
        return Target(self.nginx.url + self.uri.lstrip("/"), self.size)

    def fetched(self, mark: int) -> int:
        time.sleep(0.3)  # a request logs when it ends; closed connections end just after
        return self.nginx.sent(self.uri, since=mark, method="GET")[1]


def mount_run(site: Site, name: str, work: Callable[[str, list[int], Callable[[], None]], dict],
              read_bytes: int, target: Target | None = None) -> dict:
    """One cold run of `work(path, progress, begin)` on a fresh mount of system `name` (of
    `target`, by default the site's), with base bytes fetched per byte read from nginx's log
    and corfs's peak RSS."""
    drop_caches()
    mark = site.nginx.log_mark()
    with MOUNTS[name](site.root, site.cache_root, target or site.target) as m:
        drop_caches()
        figures = watched(lambda p: work(m.path, p, m.start), m.pid)
        if m.peak_rss:
            figures["VmHWM MiB"] = m.peak_rss() / MiB
    figures["fetched / read"] = site.fetched(mark) / read_bytes
    return figures


def all_at_once(reader: Callable[[int], None], begin: Callable[[], None] = lambda: None) -> float:
    """Seconds for READERS threads running `reader(index)` at once (`begin` called just before
    they start); the first reader's error is raised."""
    errors: list[BaseException] = []

    def guarded_reader(index: int) -> None:
        try:
            reader(index)
        except BaseException as e:  # raised in the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=guarded_reader, args=(i,)) for i in range(READERS)]
    start = time.perf_counter()
    begin()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def concurrent_read(path: str, progress: list[int], begin: Callable[[], None]) -> dict:
    """Aggregate MB/s of READERS threads each reading its own 1/READERS of `path` in 1 MiB
    requests, all at once (one open file each)."""
    share = os.stat(path).st_size // READERS

    def reader(index: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(index * share, (index + 1) * share, MiB):
                os.pread(fd, min(MiB, (index + 1) * share - offset), offset)
                progress[0] += 1
        finally:
            os.close(fd)

    return {"MB/s": share * READERS / all_at_once(reader, begin) / 1e6}


def concurrent_random_reads(path: str, count: int, progress: list[int]) -> dict:
    """Aggregate IOPS of READERS threads each making `count` random_reads (its own seed) at
    once, and the highest of their p99 latencies."""
    results: list[dict] = []

    def reader(index: int) -> None:
        results.append(random_reads(path, count, progress, seed=100 + index))

    seconds = all_at_once(reader)
    return {"IOPS": count * READERS / seconds, "p99_ms": max(r["p99_ms"] for r in results)}


def stream_corfs(root: str, cache_root: str, target: Target) -> dict:
    """Mounted with the stream paused, timed from resuming it to status complete and an
    fsync of the image (complete means recorded in memory; the final commit is part of it)."""
    cache = fresh_dir(os.path.join(cache_root, "cache-corfs"))
    mnt = os.path.join(root, "mnt-corfs")
    drop_caches()
    argv = corfs_argv(target.url, cache, mnt, "--stream-paused")
    with mounted(argv, mnt, os.path.join(root, "corfs-stream.log")) as daemon:
        drop_caches()
        start = time.perf_counter()
        control_client.send_command(mnt, {"op": "resume", "image": None})
        wait_complete(mnt, timeout=600)
        fd = os.open(os.path.join(mnt, target.name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        seconds = time.perf_counter() - start
        fetched = int(corfs_status(mnt)["fetcher"]["bytes_fetched"])
        return {"MB/s": target.size / seconds / 1e6, "fetched / read": fetched / target.size,
                "VmHWM MiB": daemon.peak_rss_bytes() / MiB}


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


def stream_qemu(root: str, cache_root: str, target: Target) -> dict:
    """block-stream into a qcow2 overlay backed by the URL, in qemu-system-x86_64 (no guest);
    the time includes QEMU closing the overlay and an fsync of it."""
    with qemu_overlay(cache_root, target) as overlay:
        qmp_path = os.path.join(root, "qmp.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qmp_path)
        log = open(os.path.join(root, "qemu.log"), "ab")  # noqa: SIM115 - closed below
        drop_caches()
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
        return {"MB/s": target.size / seconds / 1e6}


# ---- a device's runs ---------------------------------------------------------------------


def median_of(runs: Runs, key: str) -> float | None:
    """The median of `key` over the runs that have it (failed runs do not)."""
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def best_peer(results: Results) -> str | None:
    """The peer (not corfs, not a floor) with the highest median cold sequential MB/s."""
    peers = {n: median_of(r, "MB/s") for n, r in results.get("seq", {}).items()}
    ranked = [
        (v, n) for n, v in peers.items()
        if v is not None and not n.startswith("corfs") and n not in FLOORS
    ]
    return max(ranked)[1] if ranked else None


def run_device(args: argparse.Namespace, device: CacheDevice, site: Site,
               tls: TlsSite | None, log: Callable[[str], None]) -> tuple[dict, Results]:
    """The day's limits on this device, then each workload with its systems interleaved."""
    runs, size = args.runs, site.size
    curl_file = os.path.join(device.path, "curl.out")
    limits = {
        "disk O_DIRECT write MB/s": [disk_direct_mbps(device.path)["write_mbps"]
                                     for _ in range(runs)],
        "curl -o /dev/null MB/s": [curl_mbps(site.target.url, size) for _ in range(runs)],
        "curl -o FILE && sync MB/s": [curl_mbps(site.target.url, size, curl_file)
                                      for _ in range(runs)],
    }
    log(f"[{device.name}] limits: {json.dumps(limits)}")
    results: Results = {}
    systems = args.only

    def seq(name: str) -> Callable[[], dict]:
        return lambda: guarded(lambda: mount_run(site, name, sequential_read, size), device.path)

    def rand(name: str, target: Target | None = None) -> Callable[[], dict]:
        def work(path: str, progress: list[int], _begin: Callable[[], None]) -> dict:
            figures = random_reads(path, args.random_reads, progress)
            figures["IOPS"] = args.random_reads / figures.pop("seconds")
            return figures

        return lambda: guarded(
            lambda: mount_run(site, name, work, args.random_reads * 4096, target), device.path
        )

    def random_jobs() -> dict[str, Callable[[], dict]]:
        # beside them, the floors: what a fetch-only pyfuse3 daemon gets (bench/floor_fs.py)
        jobs = {n: rand(n) for n in [*RANDOM_SYSTEMS, *FLOORS] if n in systems and n in MOUNTS}
        if EXCHANGE in systems:  # and under them all, the exchange alone
            jobs[EXCHANGE] = lambda: guarded(
                lambda: exchange_reads(site, args.random_reads), device.path)
        for size in args.range_sizes:  # corfs with other --random-range sizes beside
            options = ("--random-range", size)
            jobs[f"corfs --random-range {size}"] = rand(
                "corfs", dataclasses.replace(site.target, corfs_options=options))
        return jobs

    def conc(name: str) -> Callable[[], dict]:
        return lambda: guarded(lambda: mount_run(site, name, concurrent_read, size), device.path)

    def conc_rand(name: str) -> Callable[[], dict]:
        count = max(1, args.random_reads // READERS)  # per reader: as many reads in all

        def work(path: str, progress: list[int], _begin: Callable[[], None]) -> dict:
            return concurrent_random_reads(path, count, progress)

        return lambda: guarded(
            lambda: mount_run(site, name, work, count * READERS * 4096), device.path
        )

    jobs_of: dict[str, Callable[[], dict[str, Callable[[], dict]]]] = {
        "seq": lambda: {n: seq(n) for n in systems if n not in FLOORS},
        "random": random_jobs,
        "concurrent": lambda: {
            n: conc(n) for n in dict.fromkeys(["corfs", best_peer(results) or "nbdkit"])
            if n in systems
        },
        "concurrent-random": lambda: {n: conc_rand(n) for n in RANDOM_SYSTEMS if n in systems},
        "https": lambda: (
            {n: (lambda j=j: guarded(j, device.path)) for n, j in
             https_jobs(tls, site.root, device.path, size).items()} if tls else {}
        ),
        "stream": lambda: stream_jobs(site, device, systems, args.stream_mib * MiB),
    }
    for workload in args.workloads:
        jobs = jobs_of[workload]()
        results[workload] = interleaved(runs, jobs, SETTLE_S)
        for name, figures in results[workload].items():
            log(f"[{device.name}] {workload} {name}: {json.dumps(figures, default=str)}")
    return limits, results


def stream_jobs(site: Site, device: CacheDevice, systems: list[str],
                size: int) -> dict[str, Callable[[], dict]]:
    target = Target(site.nginx.url + "stream/disk.raw", size)
    out = os.path.join(device.path, "curl-copy.raw")
    jobs: dict[str, Callable[[], dict]] = {
        "curl -o FILE && sync": lambda: guarded(
            lambda: {"MB/s": curl_mbps(target.url, size, out)}, device.path
        )
    }
    if "corfs" in systems:
        jobs[CORFS_STREAM] = lambda: guarded(
            lambda: stream_corfs(site.root, device.path, target), device.path
        )
    if "qemu" in systems:
        jobs[QEMU_STREAM] = lambda: guarded(
            lambda: stream_qemu(site.root, device.path, target), device.path
        )
    return jobs


# ---- the targets and the report -------------------------------------------------------------


@dataclass
class Row:
    target: str
    corfs: float | None
    against: str
    other: float | None
    goal: float | None  # the ratio corfs / other must reach (at least, or at most); None: shown
    at_most: bool = False
    unit: str = "MB/s"

    @property
    def ratio(self) -> float | None:
        if self.corfs is None or not self.other:
            return None
        return self.corfs / self.other

    @property
    def met(self) -> bool | None:
        r = self.ratio
        if r is None or self.goal is None:
            return None
        return r <= self.goal if self.at_most else r >= self.goal


def target_rows(results: Results) -> list[Row]:
    """Issue 13's targets from one device's results (only those whose figures ran)."""
    rows: list[Row] = []

    def fig(workload: str, system: str, key: str = "MB/s") -> float | None:
        return median_of(results.get(workload, {}).get(system, []), key)

    peer = best_peer(results)
    if peer:
        for name, what in (("corfs", "--no-stream"), ("corfs+stream", "default mount")):
            if name in results["seq"]:
                rows.append(Row(f"cold sequential, {what}", fig("seq", name), f"best peer "
                                f"({peer})", fig("seq", peer), 1.5))
    if "nbdkit" in results.get("random", {}):
        rows += [
            Row("cold random 4 KiB QD1 IOPS", fig("random", "corfs", "IOPS"), "nbdkit",
                fig("random", "nbdkit", "IOPS"), 1.5, unit="IOPS"),
            Row("cold random p99", fig("random", "corfs", "p99_ms"), "nbdkit",
                fig("random", "nbdkit", "p99_ms"), 1.0, at_most=True, unit="ms"),
            Row("cold random base bytes / byte read", fig("random", "corfs", "fetched / read"),
                "16 (nbdkit: {})".format(_fmt(fig("random", "nbdkit", "fetched / read"))),
                16.0, 1.0, at_most=True, unit="×"),
        ]
    # What the design allows: corfs against fetch-only pyfuse3 daemons (bench/floor_fs.py),
    # and what any fetch-on-read design allows: the exchange alone against nbdkit.
    for floor in FLOORS:
        if floor in results.get("random", {}):
            rows.append(Row("cold random 4 KiB QD1 IOPS", fig("random", "corfs", "IOPS"),
                            LABELS[floor], fig("random", floor, "IOPS"), None, unit="IOPS"))
    if {EXCHANGE, "nbdkit"} <= set(results.get("random", {})):
        rows.append(Row("cold random 4 KiB QD1 IOPS, the exchange alone",
                        fig("random", EXCHANGE, "IOPS"), "nbdkit",
                        fig("random", "nbdkit", "IOPS"), None, unit="IOPS"))
    if "https" in results:
        curl = fig("https", "curl -o /dev/null")
        rows += [
            Row("HTTPS cold sequential", fig("https", "corfs https://"),
                "curl -o /dev/null (TLS)", curl, 0.8),
            Row("HTTPS cold sequential", fig("https", "corfs https://"), "nbdkit over it",
                fig("https", "nbdkit curl (cache filter)"), 2.0),
            Row("S3 over HTTPS cold sequential", fig("https", "corfs s3:// over https"),
                "curl -o /dev/null (TLS)", curl, 0.8),
        ]
    if "stream" in results:
        rows += [
            Row("full stream", fig("stream", CORFS_STREAM), "curl -o FILE && sync",
                fig("stream", "curl -o FILE && sync"), 0.9),
            Row("full stream", fig("stream", CORFS_STREAM), "QEMU block-stream",
                fig("stream", QEMU_STREAM), 1.2),
        ]
    # Many VMs booting from one mount must get more than one, not less: goal 1 for corfs.
    for workload, single, what, unit in (
        ("concurrent", "seq", "sequential", "MB/s"),
        ("concurrent-random", "random", "random 4 KiB QD1", "IOPS"),
    ):
        key = MAIN_KEY.get(workload, "MB/s")
        systems = results.get(workload, {})
        for name in systems:
            rows.append(Row(f"{READERS} concurrent cold {what} readers, {name}",
                            fig(workload, name, key), f"one reader ({name})",
                            fig(single, name, key), 1.0 if name == "corfs" else None,
                            unit=unit))
        others = [n for n in systems if n != "corfs"]
        if "corfs" in systems and others:
            rows.append(Row(f"{READERS} concurrent cold {what} readers",
                            fig(workload, "corfs", key), f"{others[0]}, {READERS} readers",
                            fig(workload, others[0], key), None, unit=unit))
    return rows


def peak_rss(results: Results) -> dict[str, float]:
    """corfs's highest VmHWM (MiB) in each workload."""
    out = {}
    for workload, systems in results.items():
        values = [r["VmHWM MiB"] for runs in systems.values() for r in runs if "VmHWM MiB" in r]
        if values:
            out[workload] = max(values)
    return out


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return f"{text} {unit}".strip()


def _runs_text(runs: Runs, key: str) -> str:
    return " ".join(_fmt(r[key]) if key in r else "failed" for r in runs)



def device_markdown(device: CacheDevice, limits: dict, results: Results, runs: int) -> list[str]:
    lim = {k: _fmt(statistics.median(v)) for k, v in limits.items()}
    lines = [
        f"### Cache on {device.describe()}",
        "",
        f"Limits that day (medians of {runs}): 1 MiB O_DIRECT write on the cache device "
        f"**{lim['disk O_DIRECT write MB/s']} MB/s**; `curl -o /dev/null` "
        f"**{lim['curl -o /dev/null MB/s']} MB/s**; `curl -o FILE && sync` (FILE on the cache "
        f"device) **{lim['curl -o FILE && sync MB/s']} MB/s**.",
        "",
        "| target | corfs | against | other | ratio | goal | met |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for row in target_rows(results):
        goal = "—" if row.goal is None else f"{'≤' if row.at_most else '≥'} {row.goal:g}"
        met = {True: "yes", False: "**no**", None: "—"}[row.met]
        ratio = "—" if row.ratio is None else f"{row.ratio:.2f}×"
        lines.append(f"| {row.target} | {_fmt(row.corfs, row.unit)} | {row.against} "
                     f"| {_fmt(row.other, row.unit)} | {ratio} | {goal} | {met} |")
    rss = peak_rss(results)
    if rss:
        lines += ["", "corfs daemon peak RSS (VmHWM, highest run): " + ", ".join(
            f"{w} {v:.0f} MiB" for w, v in rss.items()) + " (goal ≤ 150 MiB + write-behind budget)"]
    lines += ["", "| workload | system | median | runs | p99 ms | fetched / read |",
              "| --- | --- | ---: | --- | ---: | ---: |"]
    for workload, systems in results.items():
        key = MAIN_KEY.get(workload, "MB/s")
        for name, rs in systems.items():
            errors = sorted({r["error"] for r in rs if "error" in r})
            lines.append(
                f"| {workload} | {LABELS.get(name, name)} | {_fmt(median_of(rs, key), key)} "
                f"| {_runs_text(rs, key)} | {_fmt(median_of(rs, 'p99_ms'))} "
                f"| {_fmt(median_of(rs, 'fetched / read'))} |"
            )
            lines += [f"|  | ↳ failed: {e} | | | | |" for e in errors]
    if device.rate is not None:
        lines += ["", "The throttle applies to every bio to the loop device (root blkio group, "
                  "cgroup v1): O_DIRECT writes, page-cache writeback and reads alike."]
    return lines + [""]


def markdown(meta: dict, devices: list[tuple[CacheDevice, dict, Results]]) -> str:
    lines = [
        f"## Run of {meta['date']}",
        "",
        f"- machine: {meta['machine']}",
        f"- corfs: {meta['corfs']}",
        f"- load average (1, 5, 15 min) at start {meta['load start']}, at end {meta['load end']}",
        f"- `{meta['command']}`; {meta['minutes']:.0f} minutes",
        f"- images: random bytes, {meta['seq MiB']} MiB for reads, {meta['stream MiB']} MiB for "
        f"streaming; nginx on 127.0.0.1; page cache dropped before each run; fresh caches; "
        f"medians of {meta['runs']} runs, systems interleaved round by round",
        "",
    ]
    for device, limits, results in devices:
        lines += device_markdown(device, limits, results, meta["runs"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.peers")
    parser.add_argument("--cache-device", choices=sorted(DEVICES), default="both")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--only", default=",".join(PEERS), help="systems (corfs and peers)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seq-mib", type=int, default=1024)
    parser.add_argument("--stream-mib", type=int, default=1024)
    parser.add_argument("--random-reads", type=int, default=2000)
    parser.add_argument("--range-sizes", default="",
                        help="random workload: also corfs with these --random-range, e.g. 16K,64K")
    parser.add_argument("--throttle-mib", type=int, default=DEFAULT_RATE >> 20)
    parser.add_argument("--markdown", help="also write the report here")
    args = parser.parse_args()
    try:
        args.workloads = parse_names(args.workloads, WORKLOADS, "workload")
        args.only = parse_names(args.only, PEERS, "system")
        args.range_sizes = [s for s in args.range_sizes.split(",") if s]
    except ValueError as e:
        parser.error(str(e))
    # Interrupted (SIGINT even when started in the background, where it is ignored, or
    # SIGTERM): unwind, so every mount, the loop device and its throttle rules are undone.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench.peers: terminated"))
    started = time.monotonic()
    root = workdir("peers")
    www = workdir("peers/www")
    for sub in ("seq", "stream"):
        os.makedirs(os.path.join(www, sub), exist_ok=True)
    make_image(os.path.join(www, "seq/disk.raw"), args.seq_mib * MiB, seed=11)
    make_image(os.path.join(www, "stream/disk.raw"), args.stream_mib * MiB, seed=12)
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "corfs": corfs_version(),
        "load start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "seq MiB": args.seq_mib,
        "stream MiB": args.stream_mib,
        "runs": args.runs,
        "command": "python -m bench.peers " + " ".join(sys.argv[1:]),
    }

    def log(text: str) -> None:
        print(text, flush=True)

    log(f"machine: {meta['machine']}\ncorfs: {meta['corfs']}\nload: {meta['load start']}")
    # HTML listings: httpdirfs and rclone read those, not JSON.
    nginx = Nginx(Path(www), Path(fresh_dir(os.path.join(root, "nginx"))), autoindex="html",
                  log_requests=True).start()
    done: list[tuple[CacheDevice, dict, Results]] = []
    try:
        with contextlib.ExitStack() as stack:
            tls = None
            if "https" in args.workloads:
                tls = stack.enter_context(
                    tls_site(Path(workdir("peers/tls")), args.seq_mib * MiB))
            for name in DEVICES[args.cache_device]:
                with contextlib.ExitStack() as dev_stack:
                    if name == "disk":
                        device = CacheDevice("disk", fresh_dir(os.path.join(root, "cache")))
                    else:
                        # room for the largest cache (one at a time: see guarded) and more
                        room = (max(args.seq_mib, args.stream_mib) * 3 + 512) * MiB
                        device = dev_stack.enter_context(
                            throttled_device(root, room, args.throttle_mib * MiB))
                    log(f"cache device: {device.describe()}")
                    site = Site(root, device.path, nginx, "/seq/disk.raw", args.seq_mib * MiB)
                    limits, results = run_device(args, device, site, tls, log)
                    done.append((device, limits, results))
                    clear_device(device.path)
    finally:
        nginx.stop()
        for name in PEERS:
            with contextlib.suppress(OSError):
                lazy_unmount(os.path.join(root, f"mnt-{name}"))
    meta["load end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["minutes"] = (time.monotonic() - started) / 60
    report = markdown(meta, done)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
