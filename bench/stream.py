"""Issue 3 benchmark: streaming a whole image from a local-dir base against `cp` + sync of the
same file on the same disk; the daemon's CPU per GiB streamed; 4 KiB random reads of local
chunks with the stream paused vs running unlimited (p99); the rate held by --bandwidth over
10 s windows; and the time until a boot trace's chunks are local, with and without --trace.

    python -m bench.stream [--size-mib 2048]"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import time

from .harness import (
    MiB,
    corfs_argv,
    corfs_status,
    drop_caches,
    fio_randread,
    fresh_dir,
    machine,
    make_image,
    mounted,
    wait_complete,
    workdir,
)


def _control(mnt: str, op: str, **fields: object) -> None:
    os.setxattr(mnt, "user.corfs.control", json.dumps({"op": op, **fields}).encode())


def stream_vs_cp(root: str, base: str, image: str, size: int) -> dict:
    copy = os.path.join(root, "copy.raw")
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["cp", image, copy], check=True)
    subprocess.run(["sync", copy], check=True)
    cp_seconds = time.perf_counter() - start
    os.unlink(copy)

    cache = fresh_dir(os.path.join(root, "cache"))
    mnt = os.path.join(root, "mnt")
    drop_caches()
    with mounted(corfs_argv(base, cache, mnt), mnt, os.path.join(root, "corfs.log")) as daemon:
        start = time.perf_counter()
        cpu0 = daemon.cpu_seconds()
        wait_complete(mnt, timeout=1800)
        _control(mnt, "pause")
        # Complete means recorded durable in memory; count the final commit too.
        os.fsync(os.open(os.path.join(mnt, "disk.raw"), os.O_RDONLY))
        stream_seconds = time.perf_counter() - start
        cpu = daemon.cpu_seconds() - cpu0
    return {
        "cp+sync s": cp_seconds,
        "stream s": stream_seconds,
        "stream / cp speed": cp_seconds / stream_seconds,
        "CPU s per GiB": cpu / (size / (1 << 30)),
    }


def latency_under_stream(root: str, base: str, size: int) -> dict:
    """p99 of 4 KiB O_DIRECT reads over the local first quarter, stream paused vs running."""
    cache = fresh_dir(os.path.join(root, "cache"))
    mnt = os.path.join(root, "mnt")
    local = size // 4
    with mounted(corfs_argv(base, cache, mnt, "--stream-paused"), mnt) as _:
        path = os.path.join(mnt, "disk.raw")
        with open(path, "rb") as f:
            while f.tell() < local and f.read(MiB):
                pass
        paused = fio_randread(path, seconds=8, size=local)
        _control(mnt, "resume")
        time.sleep(0.5)
        running = fio_randread(path, seconds=8, size=local)
        still_streaming = corfs_status(mnt)["images"][0]["state"] == "streaming"
    return {
        "p99 paused us": paused["p99_us"],
        "p99 streaming us": running["p99_us"],
        "p99 ratio": running["p99_us"] / paused["p99_us"],
        "IOPS paused": paused["iops"],
        "IOPS streaming": running["iops"],
        "stream still running at end": still_streaming,
    }


def bandwidth_windows(root: str, base: str, rate: int, seconds: int = 30) -> dict:
    cache = fresh_dir(os.path.join(root, "cache"))
    mnt = os.path.join(root, "mnt")
    with mounted(corfs_argv(base, cache, mnt, "--bandwidth", str(rate)), mnt):
        time.sleep(1.0)
        samples = []
        for _ in range(seconds + 1):
            samples.append((time.monotonic(), corfs_status(mnt)["images"][0]["local_bytes"]))
            time.sleep(1.0)
    rates = []
    for i in range(0, len(samples) - 10, 10):
        (t0, b0), (t1, b1) = samples[i], samples[i + 10]
        rates.append((b1 - b0) / (t1 - t0))
    worst = max(abs(r / rate - 1) for r in rates)
    return {
        "limit B/s": rate,
        "10 s window rates B/s": [round(r) for r in rates],
        "worst deviation": worst,
    }


def trace_benefit(root: str, base: str, size: int) -> dict:
    """Record a scattered 'boot' (64 chunks read in a random order), then time until those
    chunks are local in a fresh cache, streaming with and without the trace."""
    chunk = MiB
    rng = random.Random(7)
    boot = rng.sample(range(size // chunk), 64)
    cache = fresh_dir(os.path.join(root, "cache-rec"))
    mnt = os.path.join(root, "mnt")
    with mounted(corfs_argv(base, cache, mnt, "--stream-paused", "--record-trace"), mnt):
        fd = os.open(os.path.join(mnt, "disk.raw"), os.O_RDONLY)
        for index in boot:
            os.pread(fd, 4096, index * chunk)
        os.close(fd)
    trace = os.path.join(cache, "trace.json")
    figures = {}
    for label, extra in (("without trace", []), ("with trace", ["--trace", trace])):
        cache = fresh_dir(os.path.join(root, "cache-replay"))
        drop_caches()
        with mounted(corfs_argv(base, cache, mnt, *extra), mnt):
            start = time.perf_counter()
            db = os.path.join(cache, "state.db")
            while True:
                import sqlite3

                with sqlite3.connect(db) as conn:
                    rows = conn.execute("SELECT idx FROM chunks WHERE image='disk.raw'").fetchall()
                if set(boot) <= {r[0] for r in rows}:
                    break
                time.sleep(0.05)
            figures[f"traced chunks local, {label} s"] = time.perf_counter() - start
    figures["speed-up"] = (
        figures["traced chunks local, without trace s"]
        / figures["traced chunks local, with trace s"]
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--bandwidth", type=int, default=50 * MiB)
    args = parser.parse_args()
    size = args.size_mib * MiB
    root = workdir("stream")
    base = workdir("stream/base")
    image = make_image(os.path.join(base, "disk.raw"), size)
    print(f"machine: {machine()}\nimage: {args.size_mib} MiB, chunk size 1M")
    for name, figures in (
        ("stream vs cp", stream_vs_cp(root, base, image, size)),
        ("local reads while streaming", latency_under_stream(root, base, size)),
        ("bandwidth limit", bandwidth_windows(root, base, args.bandwidth)),
        ("trace-guided order", trace_benefit(root, base, size)),
    ):
        print(f"{name}:")
        for key, value in figures.items():
            print(
                f"  {key:<36} {value:.2f}" if isinstance(value, float) else f"  {key:<36} {value}"
            )


if __name__ == "__main__":
    main()
