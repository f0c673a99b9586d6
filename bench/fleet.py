"""Issue 14 benchmark, fleet scale: how long a base of 1000 images takes to mount (a directory,
and nginx: one listing plus a HEAD per image, concurrent and bounded by --connections) and
`corfs status MNT --json` to answer; a 1 TiB sparse image served at any offset with the
daemon's peak RSS (VmHWM); S3 GET requests per GiB streamed and per GiB read by a cold
sequential reader against moto's server, counted by the mount's own metrics
(corfs_base_requests_total) and by moto's request log.

    python -m bench.fleet [--runs 3] [--s3-mib 256]

Prints medians of `--runs` runs (each run listed) against the issue's limits: mount < 10 s,
status < 1 s, RSS < 400 MiB, <= 256 GETs per GiB streamed."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .harness import MiB, corfs_argv, fresh_dir, machine, mounted, wait_complete, workdir

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.prometheus import samples, total  # noqa: E402
from tests.servers import FAKE_AWS_ENV, Moto, Nginx, free_port  # noqa: E402

GiB = 1 << 30
TiB = 1 << 40
IMAGES = 1000


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def make_fleet(base: str) -> None:
    os.makedirs(base, exist_ok=True)
    for i in range(IMAGES):
        path = os.path.join(base, f"img-{i:04d}.raw")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.truncate(MiB)


def time_mount(base_url: str, work: str, *extra: str) -> tuple[float, float]:
    """(seconds from start to mounted, seconds `corfs status MNT --json` took)."""
    cache, mnt = fresh_dir(f"{work}/cache"), fresh_dir(f"{work}/mnt")
    start = time.monotonic()
    argv = corfs_argv(base_url, cache, mnt, "--stream-paused", "--chunk-size", "64k", *extra)
    with mounted(argv, mnt, f"{work}/mount.log"):
        mount_s = time.monotonic() - start - 0.2  # mounted() waits 0.2 s after the mount
        status_s = []
        for _ in range(2):  # the first pays for cold imports
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "corfs", "status", mnt, "--json"],
                           check=True, capture_output=True, env=dict(os.environ))
            status_s.append(time.monotonic() - t0)
    return mount_s, status_s[-1]


def bench_fleet(runs: int) -> None:
    work = workdir("fleet")
    base = f"{work}/base"
    make_fleet(base)
    dir_runs = [time_mount(base, work) for _ in range(runs)]
    nginx = Nginx(root=Path(base), workdir=Path(work) / "nginx").start()
    try:
        http_runs = [time_mount(nginx.url, work) for _ in range(runs)]
    finally:
        nginx.stop()
    for what, found in (("dir", dir_runs), ("http", http_runs)):
        mounts, statuses = [m for m, _ in found], [s for _, s in found]
        print(f"{IMAGES} images, {what} base: mount {statistics.median(mounts):.2f} s "
              f"(runs {', '.join(f'{m:.2f}' for m in mounts)}; limit 10), "
              f"status --json {statistics.median(statuses):.3f} s "
              f"(runs {', '.join(f'{s:.3f}' for s in statuses)}; limit 1)")


def bench_tib(runs: int) -> None:
    work = workdir("tib")
    base = fresh_dir(f"{work}/base")
    path = f"{base}/huge.raw"
    offsets = (0, TiB // 2 - 2048, TiB - 4096)
    with open(path, "wb") as f:
        f.truncate(TiB)
        for offset in offsets:
            f.seek(offset)
            f.write(offset.to_bytes(8, "little") * 512)
    peaks, mounts = [], []
    for _ in range(runs):
        cache, mnt = fresh_dir(f"{work}/cache"), fresh_dir(f"{work}/mnt")
        start = time.monotonic()
        with mounted(corfs_argv(base, cache, mnt), mnt, f"{work}/mount.log") as daemon:
            mounts.append(time.monotonic() - start - 0.2)
            with open(f"{mnt}/huge.raw", "rb") as f:
                for offset in offsets:
                    f.seek(offset)
                    assert f.read(4096) == offset.to_bytes(8, "little") * 512
            time.sleep(10)  # streaming the zeros meanwhile
            peaks.append(peak_rss(daemon.proc.pid) / MiB)
    print(f"1 TiB sparse image: mount {statistics.median(mounts):.2f} s, reads at 0, middle, "
          f"end right; daemon peak RSS {statistics.median(peaks):.0f} MiB after 10 s of "
          f"streaming (runs {', '.join(f'{p:.0f}' for p in peaks)}; limit 400)")


def _base_requests(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return total(samples(resp.read().decode()), "corfs_base_requests_total")


def _moto_gets(log: Path, key: str) -> int:
    return len(re.findall(rf"GET /\S*{re.escape(key)}\S* HTTP", log.read_text()))


def bench_s3(runs: int, size: int) -> None:
    work = Path(workdir("s3"))
    os.environ.update(FAKE_AWS_ENV)
    moto = Moto(workdir=work / "moto").start()
    try:
        client = moto.client()
        client.create_bucket(Bucket="fleet")
        client.put_object(Bucket="fleet", Key="img.raw", Body=os.urandom(size))
        url = "s3://fleet/"
        per_gib: dict[str, list[float]] = {"stream": [], "cold sequential read": []}
        for _ in range(runs):
            for form in per_gib:
                cache, mnt = fresh_dir(f"{work}/cache"), fresh_dir(f"{work}/mnt")
                port = free_port()
                extra = ["--no-stream"] if form != "stream" else []
                argv = corfs_argv(url, cache, mnt, "--endpoint-url", moto.endpoint,
                                  "--metrics", str(port), *extra)
                gets_before = _moto_gets(work / "moto" / "moto.log", "img.raw")
                with mounted(argv, mnt, f"{work}/mount.log"):
                    if form == "stream":
                        wait_complete(mnt)
                    else:
                        with open(f"{mnt}/img.raw", "rb") as f:
                            while f.read(MiB):
                                pass
                    requests = _base_requests(port)
                gets = _moto_gets(work / "moto" / "moto.log", "img.raw") - gets_before
                print(f"  {form}: {requests:.0f} base requests, {gets} GETs in moto's log")
                per_gib[form].append(requests * GiB / size)
        for form, found in per_gib.items():
            print(f"S3 (moto), {size // MiB} MiB image, {form}: "
                  f"{statistics.median(found):.0f} GET/GiB "
                  f"(runs {', '.join(f'{g:.0f}' for g in found)}; goal <= 256 for streaming)")
    finally:
        moto.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--s3-mib", type=int, default=256)
    parser.add_argument("--only", choices=("fleet", "tib", "s3"))
    args = parser.parse_args()
    print(machine())
    if args.only in (None, "fleet"):
        bench_fleet(args.runs)
    if args.only in (None, "tib"):
        bench_tib(args.runs)
    if args.only in (None, "s3"):
        bench_s3(args.runs, args.s3_mib * MiB)


if __name__ == "__main__":
    main()
