"""Shared pieces of the benchmarks: work dirs outside the repo, mounting a FUSE daemon in a
subprocess and always unmounting it, dropping the page cache, fio runs, and the CPU time and
RSS of a daemon. Benchmarks print ratios against a baseline measured in the same run."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from corfs.control_client import read_status
from tests.mounting import CorfsMountError, lazy_unmount, wait_fuse_mounted
from tests.servers import stop_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tree whose corfs the mounts run (PYTHONPATH and cwd of `python -m corfs`): this one,
# or another checkout's, to measure its corfs with this bench.
CORFS_TREE = os.environ.get("CORFS_BENCH_TREE", REPO)
WORK = os.environ.get("CORFS_BENCH_DIR", "/var/tmp/corfs-bench")
MiB = 1 << 20
T = TypeVar("T")


def workdir(name: str) -> str:
    path = os.path.join(WORK, name)
    os.makedirs(path, exist_ok=True)
    return path


def fresh_dir(path: str) -> str:
    """An empty directory at `path` (whatever was there is removed)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def make_image(path: str, size: int, *, zero_fraction: float = 0.0, seed: int = 1) -> str:
    """A deterministic image; reused when it already has the right size."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    rng = random.Random(seed)
    block = rng.randbytes(MiB)
    with open(path, "wb") as f:
        for offset in range(0, size, MiB):
            length = min(MiB, size - offset)
            if rng.random() < zero_fraction:
                f.seek(offset + length)
                continue
            # Vary each block cheaply so no two chunks are equal (no accidental dedup).
            f.write(offset.to_bytes(8, "little") + block[8:length])
        f.truncate(size)
    return path


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def settle_disk(seconds: float = 5.0) -> None:
    """Let the disk finish what earlier work wrote. On this VM the host still writes back a
    phase's writes after the guest saw them complete: a read of 1 GiB right after corfs filled
    1 GiB ran at 439-1241 MB/s, the same read 3 s later at 1152-1482 (old and new code alike)."""
    os.sync()
    time.sleep(seconds)


@dataclass
class Daemon:
    proc: subprocess.Popen
    mountpoint: str

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def rss_bytes(self) -> int:
        return status_bytes(self.proc.pid, "VmRSS")

    def peak_rss_bytes(self) -> int:
        return status_bytes(self.proc.pid, "VmHWM")


def status_bytes(pid: int, field: str) -> int:
    """A size field of /proc/PID/status (VmRSS, VmHWM: the peak RSS) in bytes; 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def mounted(argv: list[str], mountpoint: str, log_path: str | None = None) -> Iterator[Daemon]:
    """Run a FUSE daemon in the foreground; yield once mounted; always unmount and reap it.
    The mountpoint is made a directory unless it exists (qemu-storage-daemon mounts on a file)."""
    if not os.path.exists(mountpoint):
        os.makedirs(mountpoint)
    log = open(log_path or os.devnull, "ab")  # noqa: SIM115 - closed in the finally below
    env = dict(os.environ, PYTHONPATH=CORFS_TREE)
    if CORFS_TREE != REPO:
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the other checkout as it is
    proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=CORFS_TREE)
    try:
        try:
            wait_fuse_mounted(mountpoint, proc, 30, name=argv[0])
        except CorfsMountError as e:
            raise RuntimeError(f"{argv[:4]}: {e} (see {log_path})") from None
        time.sleep(0.2)  # let the daemon finish its start-up (corfs raises the read-ahead)
        yield Daemon(proc, mountpoint)
    finally:
        stop_process(proc, timeout=30)
        lazy_unmount(mountpoint)
        log.close()


def corfs_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "corfs", "mount", *args]


def corfs_status(mountpoint: str) -> dict:
    return read_status(mountpoint)


def wait_complete(mountpoint: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(i["state"] == "complete" for i in corfs_status(mountpoint)["images"]):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{mountpoint} did not complete in {timeout} s")


def read_sequential(path: str, block: int = MiB) -> float:
    """MB/s of reading `path` front to back in `block` requests."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        total = 0
        while chunk := os.read(fd, block):
            total += len(chunk)
        return total / (time.perf_counter() - start) / 1e6
    finally:
        os.close(fd)


def fio(path: str, rw: str, bs: str, *, iodepth: int = 1, seconds: float = 8,
        size: int | None = None, ioengine: str = "libaio", ramp_s: float = 0) -> dict:
    """One O_DIRECT fio job on `path` (time-based): IOPS, MB/s and p99 completion latency (us)
    of its reads or writes, whichever `rw` does."""
    argv = [
        "fio",
        "--name=job",
        f"--filename={path}",
        f"--rw={rw}",
        f"--bs={bs}",
        "--direct=1",
        f"--ioengine={ioengine}",
        f"--iodepth={iodepth}",
        "--numjobs=1",
        f"--runtime={round(seconds * 1000)}ms",
        f"--ramp_time={round(ramp_s * 1000)}ms",
        "--time_based",
        "--output-format=json",
    ]
    if "write" not in rw:
        argv.append("--readonly")
    if size:
        argv.append(f"--size={size}")
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    side = out["jobs"][0]["write" if "write" in rw else "read"]
    p99 = side["clat_ns"]["percentile"]["99.000000"] / 1000
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6, "p99_us": p99}


def fio_randread(path: str, seconds: int = 8, size: int | None = None) -> dict:
    """4 KiB O_DIRECT random reads, one at a time: IOPS and p99 latency in microseconds."""
    result = fio(path, "randread", "4k", seconds=seconds, size=size, ioengine="psync")
    return {"iops": result["iops"], "p99_us": result["p99_us"]}


def disk_direct_mbps(directory: str, size: int = 512 * MiB) -> dict:
    """The day's disk limits under `directory`: MB/s of `dd` writing then reading `size` in
    1 MiB O_DIRECT blocks (the file is removed afterwards)."""
    path = os.path.join(directory, ".disk-probe")
    count = str(size // MiB)
    try:
        start = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}",
                        "oflag=direct", "conv=fsync", "status=none"], check=True)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct",
                        "status=none"], check=True)
        read_s = time.perf_counter() - start
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return {"write_mbps": size / write_s / 1e6, "read_mbps": size / read_s / 1e6}


def curl_mbps(url: str, size: int, out: str = "/dev/null", *options: str) -> float:
    """MB/s of `curl -o out` fetching `size` bytes from a cold page cache; to a file the time
    includes `sync` of it (the bytes on disk, as a cache's would have to be)."""
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["curl", "-sf", *options, "-o", out, url], check=True)
    if out != "/dev/null":
        subprocess.run(["sync", out], check=True)
    mbps = size / (time.perf_counter() - start) / 1e6
    if out != "/dev/null":
        os.remove(out)
    return mbps


def interleaved(
    runs: int, jobs: dict[str, Callable[[], T]], settle_s: float = 5.0
) -> dict[str, list[T]]:
    """Each job's results over `runs` rounds, the jobs interleaved (one of each per round, the
    order rotating: A B, B A) so a slow minute of the shared machine or its disk hits all of
    them; the disk settles before each run (a run's cache writes, or curl's file, still being
    written back slow the next one)."""
    results: dict[str, list[T]] = {name: [] for name in jobs}
    names = list(jobs)
    for round_ in range(runs):
        shift = round_ % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            settle_disk(settle_s)
            results[name].append(jobs[name]())
    return results


def corfs_version() -> str:
    """Which corfs the mounts run: its tree and commit (with "+changes" when it has any)."""
    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", CORFS_TREE, *args], capture_output=True, text=True)
        return run.stdout.strip()

    dirty = "+changes" if git("status", "--porcelain", "--", "corfs") else ""
    return f"{CORFS_TREE} at {git('rev-parse', '--short', 'HEAD') or '?'}{dirty}"


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{platform.node()}, {os.cpu_count()} cores, {cpu}, kernel {platform.release()}"
