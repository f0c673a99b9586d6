"""Throughput of the HTTP store's two data paths (lean raw-socket reader vs httpx) against a
local nginx: sequential ranged reads of one file, N in flight.

    .venv/bin/python -m bench.http_reader [--size-mib 1024] [--range-kib 1024 4096] [--jobs 1 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import trio

from corfs.base import BaseOptions
from corfs.base.http import open_http_base
from tests.servers import Nginx


async def measure(url: str, lean: bool, range_size: int, jobs: int) -> tuple[float, float]:
    """(MB/s wall clock, MB per CPU-second of this process): the second is the client's own
    cost and holds up better on a busy machine."""
    store = await open_http_base(url, BaseOptions(max_connections=max(jobs, 1)))
    store.reader.use_plain = lean
    (image,) = [i for i in await store.list_images() if i.name == "big.raw"]
    offsets = list(range(0, image.size - range_size + 1, range_size))
    send, recv = trio.open_memory_channel[int](len(offsets))
    for off in offsets:
        send.send_nowait(off)
    send.close()

    async def worker() -> None:
        async for off in recv:
            data = await image.read(off, range_size)
            assert len(data) == range_size

    start = time.perf_counter()
    cpu = time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(jobs):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    await store.aclose()
    total = len(offsets) * range_size / 1e6
    return total / elapsed, total / cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--range-kib", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corfs-bench-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        with open(root / "big.raw", "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(args.size_mib):
                f.write(block)
        nginx = Nginx(root=root, workdir=Path(tmp) / "work").start()
        try:
            trio.run(measure, nginx.url, True, 1 << 20, 1)  # warm the page cache
            for range_kib in args.range_kib:
                for jobs in args.jobs:
                    for lean in (True, False):
                        mbs, per_cpu = trio.run(measure, nginx.url, lean, range_kib * 1024, jobs)
                        name = "lean " if lean else "httpx"
                        print(
                            f"{name} range {range_kib:5d} KiB jobs {jobs}: {mbs:6.0f} MB/s, "
                            f"{per_cpu:6.0f} MB per CPU-second"
                        )
        finally:
            nginx.stop()


if __name__ == "__main__":
    main()
