"""Cold reads through one mount (issue 13): random 4 KiB readers' base bytes per byte read,
and the aggregate of N concurrent cold sequential readers (one image each) against one.

    python -m bench.cold_readers random --reads 2000
    python -m bench.cold_readers many --readers 8 --mib 256

BASE is a directory (page cache dropped before each phase; for `many`, the base images are
then read once into it, so that the readers compete in corfs, not for the disk's seeks); the
base bytes counted are the mount's fetcher statistics. Single runs: figures to compare code
with, not claims.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import threading
import time

from .harness import (
    MiB,
    corfs_argv,
    corfs_status,
    drop_caches,
    fresh_dir,
    make_image,
    mounted,
    workdir,
)

BLOCK = 4096


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
    with open(path, "rb", buffering=0) as f:
        total = 0
        while chunk := f.read(MiB):
            total += len(chunk)
    out.append(total)


def many_readers(readers: int, mib: int) -> None:
    base = workdir(f"cold-readers/base{readers}")
    names = [f"img{i}.raw" for i in range(readers)]
    for i, name in enumerate(names):
        make_image(os.path.join(base, name), mib * MiB, seed=10 + i)
    results = {}
    for count in (1, readers):
        cache, mnt = fresh_dir(workdir("cold-readers/cache")), workdir("cold-readers/mnt")
        drop_caches()
        for name in names[:count]:  # BASE in the page cache: the readers compete in corfs only
            _sequential(os.path.join(base, name), [])
        with mounted(corfs_argv(base, cache, mnt, "--no-stream"), mnt):
            done: list[float] = []
            threads = [
                threading.Thread(target=_sequential, args=(os.path.join(mnt, n), done))
                for n in names[:count]
            ]
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
        results[count] = sum(done) / elapsed / 1e6
        print(f"{count} cold sequential reader(s): {results[count]:.0f} MB/s aggregate")
    print(f"{readers} readers / 1 reader: {results[readers] / results[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("random")
    r.add_argument("--reads", type=int, default=2000)
    r.add_argument("--mib", type=int, default=256)
    m = sub.add_parser("many")
    m.add_argument("--readers", type=int, default=8)
    m.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    if args.what == "random":
        random_reads(args.reads, args.mib * MiB)
    else:
        many_readers(args.readers, args.mib)


if __name__ == "__main__":
    main()
