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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.servers import FAKE_AWS_ENV, Nginx, make_tls

from .harness import (
    MiB,
    curl_mbps,
    disk_direct_mbps,
    drop_caches,
    interleaved,
    machine,
    make_image,
    read_sequential,
    workdir,
)
from .peer_mounts import MountFn, Target, mount_corfs, mount_nbdkit

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


@dataclass
class TlsSite:
    """The TLS nginx serving one image over https:// and as an S3 object."""

    nginx: Nginx
    ca: Path
    image: Target  # https:// URL of the image, for corfs and the peers
    s3: Target  # the same image as s3://BUCKET/img/ through the same nginx, for corfs

    def curl(self, size: int, out: str = "/dev/null") -> float:
        return curl_mbps(self.image.url, size, out, "--cacert", str(self.ca))


@contextlib.contextmanager
def tls_site(root: Path, size: int) -> Iterator[TlsSite]:
    """nginx with a throwaway CA serving a `size` image of random bytes; stopped on leaving.
    Sets botocore's fake credentials in os.environ (nginx ignores the signature)."""
    www = root / "www"
    image = Path(make_image(str(root / "disk.raw"), size))
    for where in (www / "img", www / BUCKET / "img"):
        where.mkdir(parents=True, exist_ok=True)
        link = where / "disk.raw"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()  # a link to an earlier image of another size
        os.link(image, link)
    tls = make_tls(root / "pki")
    listing = s3_listing(PREFIX + "disk.raw", size, nginx_etag(image))
    nginx = Nginx(root=www, workdir=root / "nginx", tls=tls, locations=listing,
                  log_requests=True).start()
    os.environ.update(FAKE_AWS_ENV)
    try:
        ca = str(tls.ca_cert)
        s3_options = ("--endpoint-url", nginx.url.rstrip("/"), "--region", "us-east-1")
        yield TlsSite(
            nginx,
            tls.ca_cert,
            Target(nginx.url + "img/disk.raw", size, ca),
            Target(nginx.url + "img/disk.raw", size, ca, f"s3://{BUCKET}/{PREFIX}", s3_options),
        )
    finally:
        nginx.stop()


def cold_read_mbps(root: str, cache_root: str, mount: MountFn, target: Target) -> dict:
    """MB/s of reading the image front to back through a fresh mount, page cache dropped;
    with the daemon's peak RSS when the mount reports it."""
    with mount(root, cache_root, target) as m:
        drop_caches()
        figures = {"MB/s": read_sequential(m.path)}
        if m.peak_rss:
            figures["VmHWM MiB"] = m.peak_rss() / MiB
    return figures


def https_jobs(site: TlsSite, root: str, cache_root: str, size: int) -> dict[str, Callable]:
    """The TLS cold sequential jobs, each returning a dict with "MB/s"."""
    jobs: dict[str, Callable[[], dict]] = {
        "curl -o /dev/null": lambda: {"MB/s": site.curl(size)},
        "corfs https://": lambda: cold_read_mbps(root, cache_root, mount_corfs, site.image),
        "corfs s3:// over https": lambda: cold_read_mbps(root, cache_root, mount_corfs, site.s3),
    }
    if nbdkit_available():
        jobs["nbdkit curl (cache filter)"] = lambda: cold_read_mbps(
            root, cache_root, mount_nbdkit, site.image
        )
    return jobs


def nbdkit_available() -> bool:
    if not shutil.which("nbdkit") or not shutil.which("nbdfuse"):
        return False
    probe = subprocess.run(["nbdkit", "--dump-plugin", "curl"], capture_output=True, check=False)
    return probe.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.tls")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(workdir("tls"))
    size = args.size_mib * MiB
    with tls_site(root, size) as site:
        jobs = https_jobs(site, str(root), str(root), size)
        jobs["curl -o FILE && sync"] = lambda: {"MB/s": site.curl(size, str(root / "curl.out"))}
        runs = interleaved(args.runs, jobs)
        disk = disk_direct_mbps(str(root))
    results = {name: [r["MB/s"] for r in rs] for name, rs in runs.items()}
    curl = statistics.median(results["curl -o /dev/null"])
    print(f"# bench.tls: cold sequential over TLS, {args.size_mib} MiB, medians of {args.runs}")
    print(f"machine: {machine()}")
    print(f"cache disk O_DIRECT write: {disk['write_mbps']:.0f} MB/s")
    print("| reader | MB/s (median) | runs | × curl -o /dev/null |")
    print("| --- | --- | --- | --- |")
    for name, figures in results.items():
        median = statistics.median(figures)
        runs_text = " ".join(f"{f:.0f}" for f in figures)
        print(f"| {name} | {median:.0f} | {runs_text} | {median / curl:.2f}× |")
    if not nbdkit_available():
        print("nbdkit (curl plugin) or nbdfuse not installed: no nbdkit figure")


if __name__ == "__main__":
    main()
