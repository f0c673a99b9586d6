"""Latency of a guest-style flush (4 KiB pwrite + fdatasync through the mount) while the
background stream fills the cache at full speed, against the same with the stream paused.

A VM's `sync` reaches corfs as fsync, which makes the chunk store durable: fdatasync of the
image's data file, then the state commit. Everything the stream wrote since the last commit is
in that data file too, so a flush can end up waiting for hundreds of MiB of streamed writeback
(a "flush storm"); this measures how long.

    python -m bench.flush_latency [--size-mib 2048] [--seconds 8] [--rounds 2] [--base dir|http]

Flushes are timed until the stream completes (or --seconds pass); pick --size-mib so that the
stream takes longer than --seconds. Prints p50 / p90 / max in ms per mode and the ratio
streaming / paused (medians over rounds).
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.harness import (
    MiB,
    corfs_argv,
    corfs_status,
    drop_caches,
    machine,
    make_image,
    mounted,
    workdir,
)

IMAGE = "img.raw"
HOT_MIB = 4  # the client writes into the first HOT_MIB, made local before timing


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _complete(mnt: Path) -> bool:
    return corfs_status(str(mnt))["images"][0]["state"] == "complete"


def measure(base: str, work: Path, mode: str, seconds: float, gap: float) -> dict:
    cache, mnt = work / "cache", work / "mnt"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    options = ["--stream-paused"] if mode == "paused" else []
    drop_caches()
    latencies: list[float] = []
    read_latencies: list[float] = []  # a 4 KiB O_DIRECT read of a local chunk: the loop's own lag
    with mounted(
        corfs_argv(base, str(cache), str(mnt), *options), str(mnt), str(work / f"{mode}.log")
    ):
        fd = os.open(mnt / IMAGE, os.O_RDWR)
        direct = os.open(mnt / IMAGE, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        try:
            for off in range(0, HOT_MIB * MiB, MiB):
                os.pread(fd, MiB, off)  # fill the chunks the writes will land in
            rng = random.Random(3)
            block = os.urandom(4096)
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                # Only flushes that raced the stream count: stop once the image is complete.
                if len(latencies) % 8 == 7 and _complete(mnt):
                    break
                os.pwrite(fd, block, rng.randrange(0, HOT_MIB * MiB // 4096) * 4096)
                t0 = time.perf_counter()
                os.fdatasync(fd)
                latencies.append(time.perf_counter() - t0)
                time.sleep(gap / 2)
                t0 = time.perf_counter()
                os.preadv(direct, [buf], rng.randrange(0, HOT_MIB * MiB // 4096) * 4096)
                read_latencies.append(time.perf_counter() - t0)
                time.sleep(gap / 2)
            elapsed = time.monotonic() - start
        finally:
            os.close(fd)
            os.close(direct)
        local = corfs_status(str(mnt))["images"][0]["local_bytes"]
    return {
        "n": len(latencies),
        "p50": _percentile(latencies, 0.5) * 1e3,
        "p90": _percentile(latencies, 0.9) * 1e3,
        "max": max(latencies) * 1e3,
        "read_p50": _percentile(read_latencies, 0.5) * 1e3,
        "read_p90": _percentile(read_latencies, 0.9) * 1e3,
        "streamed_mib": local / MiB,
        "seconds": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flush_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size-mib", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--gap", type=float, default=0.05, help="pause between flushes (s)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base", choices=("dir", "http"), default="dir")
    args = parser.parse_args(argv)

    work = Path(workdir("flush"))
    base_dir = work / "base"
    base_dir.mkdir(exist_ok=True)
    make_image(str(base_dir / IMAGE), args.size_mib * MiB)
    nginx = None
    base = str(base_dir)
    if args.base == "http":
        from tests.servers import Nginx

        nginx = Nginx(root=base_dir, workdir=work / "nginx").start()
        base = nginx.url
    results: dict[str, list[dict]] = {"stream": [], "paused": []}
    try:
        for _ in range(args.rounds):
            for mode in results:
                r = measure(base, work, mode, args.seconds, args.gap)
                results[mode].append(r)
                print(
                    f"{mode}: {r['n']} flushes p50 {r['p50']:.1f} ms p90 {r['p90']:.1f} ms "
                    f"max {r['max']:.0f} ms; direct 4K read p50 {r['read_p50']:.1f} p90 "
                    f"{r['read_p90']:.1f} ms; {r['streamed_mib']:.0f} MiB local after "
                    f"{r['seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if nginx is not None:
            nginx.stop()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; {machine()}; load {os.getloadavg()[0]:.1f}")
    print(
        f"{args.size_mib} MiB image, {args.base} base, 4 KiB pwrite + fdatasync every "
        f"{args.gap * 1e3:.0f} ms for {args.seconds:g} s; medians of {args.rounds} rounds"
    )
    med = {
        m: {
            k: statistics.median(r[k] for r in rs)
            for k in ("p50", "p90", "max", "read_p50", "read_p90")
        }
        for m, rs in results.items()
    }
    for mode, m in med.items():
        print(
            f"  {mode:7s} flush p50 {m['p50']:7.1f} ms  p90 {m['p90']:7.1f} ms  max "
            f"{m['max']:6.0f} ms | 4K direct read p50 {m['read_p50']:6.1f} ms  p90 "
            f"{m['read_p90']:6.1f} ms"
        )
    for k in ("p50", "p90"):
        print(f"  stream / paused {k}: {med['stream'][k] / med['paused'][k]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
