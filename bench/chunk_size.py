"""Choosing the default chunk size: for each candidate, cold sequential 1 MiB reads through the
mount (a local-dir base, --no-stream), the read amplification of 500 random 4 KiB reads
(bytes fetched / bytes read), and the time to stream the whole image.

    python -m bench.chunk_size [--size-mib 512] [--sizes 64k,256k,1M,4M]"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import time

from .harness import (
    MiB,
    corfs_argv,
    corfs_status,
    drop_caches,
    machine,
    make_image,
    mounted,
    read_sequential,
    wait_complete,
    workdir,
)


def measure(base: str, root: str, chunk: str, size: int) -> dict:
    cache = os.path.join(root, "cache")
    mnt = os.path.join(root, "mnt")
    figures = {}
    shutil.rmtree(cache, ignore_errors=True)
    drop_caches()
    with mounted(corfs_argv(base, cache, mnt, "--no-stream", "--chunk-size", chunk), mnt):
        figures["cold seq MB/s"] = read_sequential(os.path.join(mnt, "disk.raw"))
    shutil.rmtree(cache, ignore_errors=True)
    with mounted(corfs_argv(base, cache, mnt, "--no-stream", "--chunk-size", chunk), mnt):
        rng = random.Random(3)
        fd = os.open(os.path.join(mnt, "disk.raw"), os.O_RDONLY | os.O_DIRECT)
        aligned = mmap.mmap(-1, 4096)
        reads = 500
        start = time.perf_counter()
        for _ in range(reads):
            os.preadv(fd, [aligned], rng.randrange(size // 4096) * 4096)
        figures["random 4k reads/s (cold)"] = reads / (time.perf_counter() - start)
        os.close(fd)
        fetched = corfs_status(mnt)["fetcher"]["bytes_fetched"]
        figures["random 4k amplification"] = fetched / (reads * 4096)
    shutil.rmtree(cache, ignore_errors=True)
    drop_caches()
    with mounted(corfs_argv(base, cache, mnt, "--chunk-size", chunk), mnt):
        start = time.perf_counter()
        wait_complete(mnt)
        figures["stream whole image s"] = time.perf_counter() - start
    shutil.rmtree(cache, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--sizes", default="64k,256k,1M,4M")
    args = parser.parse_args()
    root = workdir("chunk")
    base = workdir("chunk/base")
    size = args.size_mib * MiB
    make_image(os.path.join(base, "disk.raw"), size)
    print(f"machine: {machine()}\nimage: {args.size_mib} MiB, local-dir base")
    print(f"{'chunk':>6} {'cold seq MB/s':>14} {'rand 4k/s':>10} {'amplif.':>8} {'stream s':>9}")
    for chunk in args.sizes.split(","):
        f = measure(base, root, chunk, size)
        print(
            f"{chunk:>6} {f['cold seq MB/s']:14.0f} {f['random 4k reads/s (cold)']:10.0f} "
            f"{f['random 4k amplification']:8.1f} {f['stream whole image s']:9.2f}"
        )


if __name__ == "__main__":
    main()
