"""Cold sequential reads over TLS: corfs over https:// and over s3:// (HTTPS endpoint) beside
`curl -o /dev/null` over the same TLS nginx, and nbdkit's curl plugin when it is installed.

    python -m bench.tls [--size-mib N] [--runs N]

One nginx (tests/servers.Nginx) with a throwaway CA serves the image at /img/disk.raw and, for
S3, at /bench-bucket/img/disk.raw (the same file, so the same ETag) with a stub
ListObjectsV2 answer for the bucket: it stands in for an S3 endpoint (it does not check
signatures; tests/remote/test_s3_lean.py checks them against moto). corfs mounts with a fresh
cache and `--no-stream`, so the figure is the read path alone; the page cache is dropped before
every run, and the jobs are interleaved round by round. Prints medians of --runs and the ratio
to curl, with the day's limits beside (curl to /dev/null, curl to a file + sync, the cache
disk's O_DIRECT write speed)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.servers import FAKE_AWS_ENV, Nginx, make_tls

from .harness import (
    MiB,
    corfs_argv,
    disk_direct_mbps,
    drop_caches,
    fresh_dir,
    machine,
    make_image,
    mounted,
    read_sequential,
    settle_disk,
    workdir,
)

BUCKET = "bench-bucket"
PREFIX = "img/"


def nginx_etag(path: Path) -> str:
    """The ETag nginx gives a static file: hex mtime, hex size."""
    st = path.stat()
    return f'"{int(st.st_mtime):x}-{st.st_size:x}"'


def s3_listing(key: str, size: int, etag: str) -> str:
    """nginx directives answering ListObjectsV2 for the bucket with one object."""
    doc = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Name>{BUCKET}</Name><Prefix>{PREFIX}</Prefix><KeyCount>1</KeyCount>"
        "<MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter><IsTruncated>false</IsTruncated>"
        f"<Contents><Key>{key}</Key><Size>{size}</Size><ETag>{etag}</ETag></Contents>"
        "</ListBucketResult>"
    )
    return f"location = /{BUCKET} {{ default_type application/xml; return 200 '{doc}'; }}"


Results = dict[str, tuple[float, list[float]]]


def medians(runs: int, jobs: dict[str, Callable[[], float]]) -> Results:
    """Median MB/s of each job over `runs` rounds, the jobs interleaved (one of each per round,
    the order rotating) so a slow minute of the shared machine or its disk hits all of them;
    the disk settles before each run (a run's cache writes, or curl's file, still being
    written back slow the next one)."""
    figures: dict[str, list[float]] = {name: [] for name in jobs}
    names = list(jobs)
    for round_ in range(runs):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            settle_disk()
            figures[name].append(jobs[name]())
    return {name: (statistics.median(f), f) for name, f in figures.items()}


def curl_mbps(url: str, ca: Path, size: int, out: str) -> float:
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["curl", "-sf", "--cacert", str(ca), "-o", out, url], check=True)
    if out != "/dev/null":
        subprocess.run(["sync", out], check=True)
    return size / (time.perf_counter() - start) / 1e6


@contextlib.contextmanager
def corfs_mount(root: Path, base: str, *options: str) -> Iterator[str]:
    cache = fresh_dir(str(root / "cache-corfs"))
    mnt = str(root / "mnt-corfs")
    argv = corfs_argv(base, cache, mnt, "--no-stream", *options)
    with mounted(argv, mnt, str(root / "corfs.log")):
        yield mnt


def corfs_mbps(root: Path, base: str, *options: str) -> float:
    with corfs_mount(root, base, *options) as mnt:
        drop_caches()
        return read_sequential(os.path.join(mnt, "disk.raw"))


def nbdkit_available() -> bool:
    if not shutil.which("nbdkit") or not shutil.which("nbdfuse"):
        return False
    probe = subprocess.run(["nbdkit", "--dump-plugin", "curl"], capture_output=True, check=False)
    return probe.returncode == 0


def nbdkit_mbps(root: Path, url: str, ca: Path) -> float:
    cache = fresh_dir(str(root / "cache-nbdkit"))
    mnt = str(root / "mnt-nbdkit")
    sock = str(root / "nbdkit.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    with open(root / "nbdkit.log", "ab") as log:
        server = subprocess.Popen(
            ["nbdkit", "-f", "-U", sock, "--filter=cache", "curl", f"url={url}",
             f"cainfo={ca}", "cache-on-read=true"],
            stdout=log, stderr=log, env=dict(os.environ, TMPDIR=cache),
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nbdkit did not start (see nbdkit.log)")
                time.sleep(0.05)
            with mounted(["nbdfuse", mnt, "--unix", sock], mnt, str(root / "nbdfuse.log")):
                drop_caches()
                return read_sequential(os.path.join(mnt, "nbd"))
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.tls")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(workdir("tls"))
    size = args.size_mib * MiB
    www = root / "www"
    image = Path(make_image(str(root / "disk.raw"), size))
    for where in (www / "img", www / BUCKET / "img"):
        where.mkdir(parents=True, exist_ok=True)
        link = where / "disk.raw"
        if not link.exists():
            os.link(image, link)
    tls = make_tls(root / "pki")
    listing = s3_listing(PREFIX + "disk.raw", size, nginx_etag(image))
    nginx = Nginx(root=www, workdir=root / "nginx", tls=tls, locations=listing).start()
    os.environ.update(FAKE_AWS_ENV)  # nginx ignores the signature; botocore needs credentials
    try:
        url = nginx.url + "img/disk.raw"
        ca = ["--ca-file", str(tls.ca_cert)]
        s3 = [*ca, "--endpoint-url", nginx.url.rstrip("/"), "--region", "us-east-1"]
        out = str(root / "curl.out")
        jobs: dict[str, Callable[[], float]] = {
            "curl -o /dev/null": lambda: curl_mbps(url, tls.ca_cert, size, "/dev/null"),
            "curl -o FILE && sync": lambda: curl_mbps(url, tls.ca_cert, size, out),
            "corfs https://": lambda: corfs_mbps(root, nginx.url + "img/", *ca),
            "corfs s3:// over https": lambda: corfs_mbps(root, f"s3://{BUCKET}/{PREFIX}", *s3),
        }
        if nbdkit_available():
            jobs["nbdkit curl (cache filter)"] = lambda: nbdkit_mbps(root, url, tls.ca_cert)
        results = medians(args.runs, jobs)
        with contextlib.suppress(FileNotFoundError):
            os.remove(out)
        disk = disk_direct_mbps(str(root))
    finally:
        nginx.stop()
    curl = results["curl -o /dev/null"][0]
    print(f"# bench.tls: cold sequential over TLS, {args.size_mib} MiB, medians of {args.runs}")
    print(f"machine: {machine()}")
    print(f"cache disk O_DIRECT write: {disk['write_mbps']:.0f} MB/s")
    print("| reader | MB/s (median) | runs | × curl -o /dev/null |")
    print("| --- | --- | --- | --- |")
    for name, (median, figures) in results.items():
        runs = " ".join(f"{f:.0f}" for f in figures)
        print(f"| {name} | {median:.0f} | {runs} | {median / curl:.2f}× |")
    if not nbdkit_available():
        print("nbdkit (curl plugin) or nbdfuse not installed: no nbdkit figure")


if __name__ == "__main__":
    main()
