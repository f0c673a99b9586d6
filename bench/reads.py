"""Issue 2 benchmark: sequential 1 MiB reads through the mount cold (every chunk from a local
BASE), warm (every chunk local, page cache dropped) and hot (page cache warm), and 4 KiB random
O_DIRECT reads, beside the raw file and a minimal pyfuse3 passthrough of the same file; plus the
daemon's RSS for a 10 GiB image, empty and fully local. Prints ratios.

    python -m bench.reads [--size-mib 1024] [--chunk-size 1M]"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from .harness import (
    MiB,
    corfs_argv,
    drop_caches,
    fio_randread,
    fresh_dir,
    machine,
    make_image,
    mounted,
    read_sequential,
    settle_disk,
    wait_complete,
    workdir,
)


def run(size_mib: int, chunk_size: str, passes: int) -> dict:
    root = workdir("reads")
    base = workdir("reads/base")
    image = make_image(os.path.join(base, "disk.raw"), size_mib * MiB)
    results: dict[str, list[float]] = {}

    def note(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    for _ in range(passes):
        drop_caches()
        note("raw cold MB/s", read_sequential(image))
        note("raw hot MB/s", read_sequential(image))

        mnt = os.path.join(root, "mnt-pt")
        with mounted([sys.executable, "-m", "bench.passthrough", image, mnt], mnt):
            path = os.path.join(mnt, "disk.raw")
            # The baseline for both cold and warm: every byte read from disk through Python
            # FUSE, the page cache dropped (a passthrough has no copy-on-read).
            drop_caches()
            note("passthrough MB/s", read_sequential(path))
            note("passthrough hot MB/s", read_sequential(path))

        cache = fresh_dir(os.path.join(root, "cache"))
        mnt = os.path.join(root, "mnt")
        argv = corfs_argv(base, cache, mnt, "--no-stream", "--chunk-size", chunk_size)
        with mounted(argv, mnt, os.path.join(root, "corfs.log")) as daemon:
            path = os.path.join(mnt, "disk.raw")
            drop_caches()
            cpu0 = daemon.cpu_seconds()
            note("corfs cold MB/s", read_sequential(path))
            note("corfs cold CPU s/GiB", (daemon.cpu_seconds() - cpu0) / (size_mib / 1024))
        # Warm: every chunk local, all page caches dropped, a fresh daemon, the disk done with
        # the cold phase's writes (as the passthrough found it).
        settle_disk()
        with mounted(argv, mnt, os.path.join(root, "corfs.log")) as daemon:
            path = os.path.join(mnt, "disk.raw")
            drop_caches()
            note("corfs warm MB/s", read_sequential(path))
            note("corfs hot MB/s", read_sequential(path))
            rr = fio_randread(path, seconds=6)
            note("corfs randread 4k IOPS", rr["iops"])
            note("corfs randread 4k p99 us", rr["p99_us"])
        mnt = os.path.join(root, "mnt-pt")
        with mounted([sys.executable, "-m", "bench.passthrough", image, mnt], mnt):
            rr = fio_randread(os.path.join(mnt, "disk.raw"), seconds=6)
            note("passthrough randread 4k IOPS", rr["iops"])
            note("passthrough randread 4k p99 us", rr["p99_us"])
        rr = fio_randread(image, seconds=6)
        note("raw randread 4k IOPS", rr["iops"])

    results["rss"] = [float(x) for x in _rss_10g(root)]
    return results


def _rss_10g(root: str) -> tuple[int, int]:
    """RSS of the daemon serving a 10 GiB (sparse) image: empty cache, then fully local."""
    base = fresh_dir(os.path.join(root, "base10g"))
    with open(os.path.join(base, "big.raw"), "wb") as f:
        f.truncate(10 << 30)
        f.seek(5 << 30)
        f.write(os.urandom(64 * MiB))  # some real data in the middle
    cache = fresh_dir(os.path.join(root, "cache10g"))
    mnt = os.path.join(root, "mnt10g")
    with mounted(corfs_argv(base, cache, mnt), mnt) as daemon:
        empty = daemon.rss_bytes()
        wait_complete(mnt, timeout=900)
        full = daemon.rss_bytes()
    shutil.rmtree(cache, ignore_errors=True)
    return empty, full


def report(results: dict, size_mib: int, chunk_size: str) -> str:
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items() if k != "rss"}
    lines = [f"machine: {machine()}", f"image: {size_mib} MiB, chunk size {chunk_size}"]
    for key, value in med.items():
        lines.append(f"  {key:<34} {value:10.1f}")

    def ratio(a: str, b: str) -> str:
        return f"{med[a] / med[b]:.2f}"

    lines += [
        f"  warm / passthrough                 {ratio('corfs warm MB/s', 'passthrough MB/s')}"
        "  (target >= 0.80)",
        f"  cold / passthrough                 {ratio('corfs cold MB/s', 'passthrough MB/s')}"
        "  (target >= 0.50)",
        f"  hot GB/s                           {med['corfs hot MB/s'] / 1000:.2f}  (target >= 5)",
        f"  randread IOPS / passthrough        "
        f"{ratio('corfs randread 4k IOPS', 'passthrough randread 4k IOPS')}",
        f"  RSS 10 GiB image empty / full MiB  {results['rss'][0] / MiB:.0f} / "
        f"{results['rss'][1] / MiB:.0f}  (target < 150)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk-size", default="1M")
    parser.add_argument("--passes", type=int, default=1)
    args = parser.parse_args()
    print(report(run(args.size_mib, args.chunk_size, args.passes), args.size_mib, args.chunk_size))


if __name__ == "__main__":
    main()
