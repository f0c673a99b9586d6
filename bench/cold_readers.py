"""Cold reads through one mount (issue 13): random 4 KiB readers' base bytes per byte read,
and the aggregate of N concurrent cold sequential readers (one image each) against one.

    python -m bench.cold_readers random --reads 2000
    python -m bench.cold_readers many --readers 8 --mib 128 [--base nginx|dir]
                                      [--modes no-stream,default] [--runs 3]
                                      [--corfs-option=--read-memory=64M ...]

`random`: BASE is a directory, page cache dropped; the base bytes counted are the mount's
fetcher statistics (a single run: a figure to compare code with).

`many`: 1 and then N readers, each reading its own image front to back in 1 MiB reads, all at
once, through a fresh mount of a base holding just those images (a loopback nginx, or the
directory), `--no-stream` and/or the default mount (its stream resumed as the readers start:
`--stream-paused`, then `resume`); medians of `--runs`. Before each run the
page cache is dropped and the base images are read back into it, so that the readers compete
in corfs, not for the disk's seeks. `--probe` adds, beside the readers, one more client doing
random 4 KiB O_DIRECT reads of another cold image (a VM booting among them): its latency.
Each figure comes with the daemon's peak RSS (VmHWM) and the base bytes it fetched per byte
read (1.00: nothing fetched twice).
`--limit-rate 12m` paces each nginx connection (a base far away: there, requests queue).
Printed beside: the cache disk's O_DIRECT speeds and, for
nginx, the aggregate of 1 and N `curl -o /dev/null` at once (the day's limits).
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import random
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from corfs import control_client
from tests.servers import Nginx

from .harness import (
    MiB,
    corfs_argv,
    corfs_status,
    disk_direct_mbps,
    drop_caches,
    fresh_dir,
    machine,
    make_image,
    mounted,
    workdir,
)

BLOCK = 4096
PROBE = "probe.raw"  # the image random reads probe beside the readers (--probe)


def _direct_read(path: str, offset: int, length: int, buf: mmap.mmap) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [memoryview(buf)[:length]], offset)
    finally:
        os.close(fd)


def random_reads(reads: int, size: int) -> None:
    base = workdir("cold-readers/base1")
    make_image(os.path.join(base, "disk.raw"), size, seed=7)
    cache, mnt = fresh_dir(workdir("cold-readers/cache")), workdir("cold-readers/mnt")
    drop_caches()
    with mounted(corfs_argv(base, cache, mnt, "--no-stream"), mnt):
        rng = random.Random(1)
        buf = mmap.mmap(-1, BLOCK)
        path = os.path.join(mnt, "disk.raw")
        start = time.monotonic()
        for _ in range(reads):
            _direct_read(path, rng.randrange(size // BLOCK) * BLOCK, BLOCK, buf)
        elapsed = time.monotonic() - start
        fetched = corfs_status(mnt)["fetcher"]["bytes_fetched"]
    print(
        f"random 4 KiB, --no-stream: {reads / elapsed:.0f} IOPS, "
        f"base bytes per byte read {fetched / (reads * BLOCK):.2f}"
    )


def _sequential(path: str, out: list[float]) -> None:
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(MiB)
    try:
        total = 0
        while got := os.readv(fd, [buf]):
            total += got
    finally:
        os.close(fd)
    out.append(total)


def _base_tree(
    root: str, names: list[str], counts: tuple[int, ...], dirs: tuple[int, ...] = ()
) -> None:
    """root/nN/ holds the first N images (hard links), so that a mount of nN sees, and its
    stream fills, only the images its N readers read (`dirs`: other nN to put them in)."""
    for count, number in zip(counts, dirs or counts, strict=True):
        sub = os.path.join(root, f"n{number}")
        os.makedirs(sub, exist_ok=True)
        for name in names[:count]:
            link = os.path.join(sub, name)
            if not os.path.exists(link):
                os.link(os.path.join(root, name), link)


class _Probe(threading.Thread):
    """A booting VM beside the readers: random 4 KiB O_DIRECT reads of its own cold image, one
    at a time, until stopped; their latencies in seconds."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__()
        self.path, self.size = path, size
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(3)
        buf = mmap.mmap(-1, BLOCK)
        while not self.stop.is_set():
            start = time.monotonic()
            _direct_read(self.path, rng.randrange(self.size // BLOCK) * BLOCK, BLOCK, buf)
            self.latencies.append(time.monotonic() - start)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _warm(paths: list[str]) -> None:
    for path in paths:
        _sequential(path, [])


def _curl_mbps(urls: list[str]) -> float:
    """Aggregate MB/s of one `curl -o /dev/null` per URL, all at once."""
    start = time.monotonic()
    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", u],
                              stdout=subprocess.PIPE) for u in urls]
    total = sum(int(p.communicate()[0] or 0) for p in procs)
    if any(p.returncode for p in procs):
        raise RuntimeError("curl failed")
    return total / (time.monotonic() - start) / 1e6


@contextlib.contextmanager
def _served(kind: str, root: str, limit_rate: str = "") -> Iterator[Callable[[str], str]]:
    """BASE for a subdirectory of `root`: the directory itself, or its URL on a loopback
    nginx (the one tests and bench/peers.py use), each connection paced to `limit_rate`
    (nginx's limit_rate, e.g. "12m": a base far away) if given."""
    if kind == "dir":
        yield lambda sub: os.path.join(root, sub)
        return
    pace = f"limit_rate {limit_rate};" if limit_rate else ""
    nginx = Nginx(Path(root), Path(fresh_dir(workdir("cold-readers/nginx"))), locations=pace)
    nginx.start()
    try:
        yield lambda sub: f"{nginx.url}{sub}/"
    finally:
        nginx.stop()


def many_readers(
    readers: int, mib: int, kind: str, modes: list[str], runs: int, probe: bool,
    limit_rate: str = "", options: tuple[str, ...] = (),
) -> None:
    root = workdir(f"cold-readers/base{readers}x{mib}")
    names = [f"img{i}.raw" for i in range(readers)]
    for i, name in enumerate([*names, PROBE]):
        path = os.path.join(root, name)
        if not os.path.exists(path) or os.path.getsize(path) != mib * MiB:
            make_image(path, mib * MiB, seed=10 + i)
    counts = (1, readers)
    _base_tree(root, names, counts)
    if probe:
        _base_tree(root, [PROBE], (1,) * len(counts), counts)
    for count in counts:
        if not probe:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(root, f"n{count}", PROBE))
    cache, mnt = workdir("cold-readers/cache"), workdir("cold-readers/mnt")
    log = os.path.join(workdir("cold-readers"), "corfs.log")
    print(f"machine: {machine()}; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    disk = disk_direct_mbps(fresh_dir(cache))
    print(f"cache disk O_DIRECT 1 MiB: write {disk['write_mbps']:.0f} MB/s, "
          f"read {disk['read_mbps']:.0f} MB/s")
    if limit_rate:
        print(f"nginx paces each connection to {limit_rate}B/s (corfs: 8 connections)")
    with _served(kind, root, limit_rate) as base_of:
        if kind == "nginx":
            for count in counts:
                drop_caches()
                _warm([os.path.join(root, n) for n in names[:count]])
                urls = [base_of(f"n{count}") + n for n in names[:count]]
                print(f"limit: {count} x curl -o /dev/null at once: {_curl_mbps(urls):.0f} MB/s")
        for mode in modes:
            # The default mount's stream starts with the readers (not before: a head start would
            # fill a small image before its one reader begins).
            flags = ["--no-stream"] if mode == "no-stream" else ["--stream-paused"]
            results: dict[int, float] = {}
            for count in counts:
                figures, cpu, waits, rss, fetched = [], [], [], [], []
                for _ in range(runs):
                    fresh_dir(cache)
                    drop_caches()  # then BASE's images into it: readers compete in corfs
                    _warm([os.path.join(root, n) for n in [*names[:count], *[PROBE][:probe]]])
                    argv = corfs_argv(base_of(f"n{count}"), cache, mnt, *flags, *options)
                    with mounted(argv, mnt, log) as d:
                        done: list[float] = []
                        threads = [
                            threading.Thread(target=_sequential, args=(os.path.join(mnt, n), done))
                            for n in names[:count]
                        ]
                        prober = _Probe(os.path.join(mnt, PROBE), mib * MiB) if probe else None
                        cpu0, start = d.cpu_seconds(), time.monotonic()
                        if mode != "no-stream":
                            control_client.send_command(mnt, {"op": "resume", "image": None})
                        for t in [*threads, *([prober] if prober else [])]:
                            t.start()
                        for t in threads:
                            t.join()
                        elapsed = time.monotonic() - start
                        if prober is not None:
                            prober.stop.set()
                            prober.join()
                            waits.append(prober)
                        cpu.append((d.cpu_seconds() - cpu0) / (sum(done) / 1e9))
                        rss.append(d.peak_rss_bytes() / MiB)
                        fetched.append(corfs_status(mnt)["fetcher"]["bytes_fetched"] / sum(done))
                    figures.append(sum(done) / elapsed / 1e6)
                results[count] = statistics.median(figures)
                print(
                    f"{kind} base, {mode}: {count} cold sequential reader(s): "
                    f"{results[count]:.0f} MB/s aggregate (median of "
                    f"{' '.join(f'{f:.0f}' for f in figures)}), daemon CPU "
                    f"{statistics.median(cpu):.2f} s/GB, peak RSS {statistics.median(rss):.0f} MiB "
                    f"(of {' '.join(f'{r:.0f}' for r in rss)}), base bytes per byte read "
                    f"{statistics.median(fetched):.2f}",
                    flush=True,
                )
                if waits:
                    print(
                        f"  beside them, random 4 KiB reads of another cold image: "
                        f"p50 {statistics.median(w.percentile(0.5) for w in waits) * 1e3:.1f} ms, "
                        f"p99 {statistics.median(w.percentile(0.99) for w in waits) * 1e3:.1f} ms "
                        f"({statistics.median(len(w.latencies) for w in waits):.0f} reads)",
                        flush=True,
                    )
            print(f"{kind} base, {mode}: {readers} readers / 1 reader: "
                  f"{results[readers] / results[1]:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("random")
    r.add_argument("--reads", type=int, default=2000)
    r.add_argument("--mib", type=int, default=256)
    m = sub.add_parser("many")
    m.add_argument("--readers", type=int, default=8)
    m.add_argument("--mib", type=int, default=256)
    m.add_argument("--base", choices=("dir", "nginx"), default="nginx")
    m.add_argument("--modes", default="no-stream,default", help="no-stream and/or default")
    m.add_argument("--runs", type=int, default=3)
    m.add_argument("--probe", action="store_true", help="random 4 KiB reads beside the readers")
    m.add_argument("--limit-rate", default="", help="nginx limit_rate per connection, e.g. 12m")
    m.add_argument("--corfs-option", action="append", default=[], metavar="OPTION",
                   help="passed to corfs mount, e.g. --corfs-option=--read-memory=64M")
    args = parser.parse_args()
    if args.what == "random":
        random_reads(args.reads, args.mib * MiB)
    else:
        many_readers(
            args.readers, args.mib, args.base, args.modes.split(","), args.runs, args.probe,
            args.limit_rate, tuple(args.corfs_option),
        )


if __name__ == "__main__":
    main()
