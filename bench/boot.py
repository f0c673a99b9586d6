"""Boot benchmark: time from QEMU's start to the guest's CORFS-MARKER line, booting the test VM
(tests/vm: busybox userland, Debian kernel, QEMU/TCG) from

    raw          the image as a local raw file (the baseline, measured in the same run)
    dir          corfs, cold cache, BASE a local directory
    dir+trace    the same, streaming the chunks of a boot trace recorded on an earlier boot first
    http         corfs, cold cache, BASE nginx on 127.0.0.1
    http+trace   the same with the trace
    dir-paused   corfs with --stream-paused: only what the boot itself reads is fetched
    http-paused  the same over HTTP
    http-25M     HTTP with the stream limited to 25 MB/s (a WAN-like link), so that it does not
                 fetch the whole image before the marker as it does at loopback speed
    http-25M+trace  the same, streaming the traced chunks first

and, for the corfs variants, the bytes fetched from BASE when the marker appears (status
`fetcher.bytes_fetched`, read from the console thread the moment the line arrives) as a
fraction of the image. With streaming on, that count includes the prefetch running beside the
boot; the paused variants give what the boot itself needs.

    python -m bench.boot [--runs 3] [--image-mib 1024] [--pad-mib 640] [--variants raw,http]

The image is the test VM's root filesystem plus `--pad-mib` of incompressible files in /pad
that the guest never reads (a real root disk holds much more than a boot touches), in an ext4
of `--image-mib`. It is built once and cached under /var/tmp/corfs-bench/boot. Runs are
interleaved (every variant once per round) so that the machine's load drifts evenly over all
variants; every figure is a median over the rounds, with each run's load average alongside.
The page cache is dropped before each boot.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import (
    MiB,
    corfs_argv,
    corfs_status,
    drop_caches,
    machine,
    mounted,
    workdir,
)
from tests.servers import Nginx
from tests.vm.build_image import VmArtifacts, build_rootfs, build_test_image
from tests.vm.vmboot import BootResult, boot

IMAGE = "disk.raw"
BOOT_TIMEOUT = 600.0
VARIANTS = (
    "raw", "dir", "dir+trace", "http", "http+trace", "dir-paused", "http-paused",
    "http-25M", "http-25M+trace",
)  # fmt: skip
DEFAULT_VARIANTS = VARIANTS[:7]
LIMITED_BANDWIDTH = "25M"


# --------------------------------------------------------------------------- the image


def _write_padding(pad: Path, total_mib: int, file_mib: int = 16) -> None:
    """Incompressible, pairwise different files the guest never opens."""
    pad.mkdir(parents=True, exist_ok=True)
    rng = random.Random(6)
    block = rng.randbytes(MiB)
    for n in range(0, total_mib, file_mib):
        with open(pad / f"pad{n // file_mib:03d}.bin", "wb") as f:
            for i in range(min(file_mib, total_mib - n)):
                f.write((n + i).to_bytes(8, "little") + block[8:])


def build_boot_image(artifacts: VmArtifacts, image_mib: int, pad_mib: int) -> Path:
    """The test VM's rootfs + padding in an ext4 of `image_mib` (cached by its inputs)."""
    key = hashlib.sha256(
        f"{artifacts.disk.parent.name} {image_mib} {pad_mib} 1".encode()
    ).hexdigest()[:12]
    dest = Path(workdir("boot")) / f"image-{key}"
    disk = dest / "base" / IMAGE
    if (dest / ".complete").exists():
        return disk
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "base").mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="root-", dir=dest) as tmp:
        root = Path(tmp)
        tree_sum = build_rootfs(root)
        if tree_sum != artifacts.tree_sum:
            raise RuntimeError("rootfs tree checksum differs from the test image's")
        _write_padding(root / "pad", pad_mib)
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "corfs-test",
                "-d",
                str(root),
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                str(disk),
                f"{image_mib}M",
            ],
            check=True,
            env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
        )
    (dest / ".complete").touch()
    return disk


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# --------------------------------------------------------------------------- one boot


@dataclass
class Run:
    variant: str
    marker_s: float
    total_s: float
    load: float  # 1-minute load average when the boot started
    fetched_at_marker: int | None = None
    local_at_marker: int | None = None
    fetched_total: int | None = None
    marker_line: str = ""


@dataclass
class Setup:
    artifacts: VmArtifacts
    base_disk: Path
    http_url: str
    work: Path
    trace: Path | None = None
    cache_mode: str = "writeback"  # QEMU's -drive cache=; "none" opens the image O_DIRECT
    log_dir: Path = field(default_factory=lambda: Path(workdir("boot")) / "logs")


def _loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _check(result: BootResult, artifacts: VmArtifacts) -> None:
    if result.tree_sum != artifacts.tree_sum or result.write != "ok":
        raise RuntimeError(f"guest saw wrong data: {result.marker_line}")
    if result.marker_seconds is None:
        raise RuntimeError("no marker time")


def boot_raw(setup: Setup) -> Run:
    disk = setup.work / "raw" / IMAGE
    disk.parent.mkdir(parents=True, exist_ok=True)
    disk.unlink(missing_ok=True)
    subprocess.run(
        ["cp", "--reflink=auto", "--sparse=always", str(setup.base_disk), str(disk)], check=True
    )
    drop_caches()
    load = _loadavg()
    result = boot(disk, artifacts=setup.artifacts, cache=setup.cache_mode, timeout=BOOT_TIMEOUT)
    _check(result, setup.artifacts)
    disk.unlink()
    return Run(
        "raw", result.marker_seconds or 0.0, result.seconds, load, marker_line=result.marker_line
    )


@contextlib.contextmanager
def corfs_mount(setup: Setup, base: str, options: list[str], log_name: str) -> Iterator[Path]:
    cache = setup.work / "cache"
    mnt = setup.work / "mnt"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    setup.log_dir.mkdir(parents=True, exist_ok=True)
    argv = corfs_argv(base, str(cache), str(mnt), *options)
    with mounted(argv, str(mnt), str(setup.log_dir / f"{log_name}.log")):
        yield mnt


def boot_corfs(setup: Setup, variant: str) -> Run:
    base = setup.http_url if variant.startswith("http") else str(setup.base_disk.parent)
    options: list[str] = []
    if variant.endswith("+trace"):
        assert setup.trace is not None
        options += ["--trace", str(setup.trace)]
    if variant.endswith("-paused"):
        options.append("--stream-paused")
    if f"-{LIMITED_BANDWIDTH}" in variant:
        options += ["--bandwidth", LIMITED_BANDWIDTH]
    drop_caches()
    at_marker: dict = {}
    with corfs_mount(setup, base, options, variant) as mnt:

        def sample() -> None:
            status = corfs_status(str(mnt))
            at_marker["fetched"] = status["fetcher"]["bytes_fetched"]
            at_marker["local"] = status["images"][0]["local_bytes"]

        load = _loadavg()
        result = boot(
            mnt / IMAGE,
            artifacts=setup.artifacts,
            cache=setup.cache_mode,
            timeout=BOOT_TIMEOUT,
            on_marker=sample,
        )
        _check(result, setup.artifacts)
        fetched_total = corfs_status(str(mnt))["fetcher"]["bytes_fetched"]
    return Run(
        variant,
        result.marker_seconds or 0.0,
        result.seconds,
        load,
        fetched_at_marker=at_marker.get("fetched"),
        local_at_marker=at_marker.get("local"),
        fetched_total=fetched_total,
        marker_line=result.marker_line,
    )


def record_trace(setup: Setup) -> Path:
    """One cold boot over the dir base with --record-trace; the trace is kept for the run."""
    with corfs_mount(setup, str(setup.base_disk.parent), ["--record-trace"], "record"):
        boot(
            setup.work / "mnt" / IMAGE,
            artifacts=setup.artifacts,
            cache=setup.cache_mode,
            timeout=BOOT_TIMEOUT,
        )
    trace = setup.work / "boot-trace.json"
    shutil.copy(setup.work / "cache" / "trace.json", trace)
    return trace


# --------------------------------------------------------------------------- report


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(runs: list[Run], image_size: int, allocated: int, args: argparse.Namespace) -> str:
    by: dict[str, list[Run]] = {}
    for run in runs:
        by.setdefault(run.variant, []).append(run)
    raw = _median([r.marker_s for r in by.get("raw", [])])
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine()}",
        f"image: {image_size / MiB:.0f} MiB ext4 ({allocated / MiB:.0f} MiB allocated, "
        f"{args.pad_mib} MiB of it padding the guest does not read); QEMU cache={args.cache}; "
        f"{args.runs} runs per "
        "variant, interleaved; medians",
        "",
        "| variant | marker s (runs) | × raw | fetched at marker | % of image | fetched by "
        "power-off | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant in VARIANTS:
        rs = by.get(variant)
        if not rs:
            continue
        marker = _median([r.marker_s for r in rs])
        each = ", ".join(f"{r.marker_s:.1f}" for r in rs)
        ratio = marker / raw if raw == raw and raw > 0 else float("nan")
        if rs[0].fetched_at_marker is None:
            fetched = pct = total = "–"
        else:
            f_med = _median([r.fetched_at_marker or 0 for r in rs])
            fetched = f"{f_med / MiB:.1f} MiB"
            pct = f"{100 * f_med / image_size:.1f} %"
            total = f"{_median([r.fetched_total or 0 for r in rs]) / MiB:.0f} MiB"
        loads = ", ".join(f"{r.load:.1f}" for r in rs)
        lines.append(
            f"| {variant} | {marker:.2f} ({each}) | {ratio:.2f} | {fetched} | {pct} | {total} "
            f"| {loads} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.boot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image-mib", type=int, default=1024)
    parser.add_argument("--pad-mib", type=int, default=640)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument("--cache", default="writeback", help="QEMU drive cache mode")
    parser.add_argument("--json", type=Path, help="also write every run here")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")

    artifacts = build_test_image()
    base_disk = build_boot_image(artifacts, args.image_mib, args.pad_mib)
    image_size = os.path.getsize(base_disk)
    work = Path(workdir("boot")) / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    nginx = Nginx(root=base_disk.parent, workdir=work / "nginx")
    runs: list[Run] = []
    try:
        nginx.start()
        setup = Setup(artifacts, base_disk, nginx.url, work, cache_mode=args.cache)
        if any(v.endswith("+trace") for v in variants):
            setup.trace = record_trace(setup)
            traced = json.loads(setup.trace.read_text())["images"][IMAGE]["chunks"]
            print(f"boot trace: {len(traced)} chunks", file=sys.stderr)
        for round_no in range(args.runs):
            for variant in variants:
                run = boot_raw(setup) if variant == "raw" else boot_corfs(setup, variant)
                runs.append(run)
                fetched = (
                    ""
                    if run.fetched_at_marker is None
                    else f" fetched@marker {run.fetched_at_marker / MiB:.1f} MiB"
                )
                print(
                    f"round {round_no + 1} {variant}: marker {run.marker_s:.2f}s "
                    f"(exit {run.total_s:.1f}s){fetched} load {run.load:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        nginx.stop()
        if args.json:
            args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    print(report(runs, image_size, allocated_bytes(base_disk), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
