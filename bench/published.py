"""Published vs raw on a realistic image: `python -m bench.published [--rounds N]`.

The image is a Debian 12 root filesystem in a 2 GiB ext4 raw file (bench/rootfs.py). Both forms
are served by nginx on loopback (tests/servers.py's starter, plus an access log):

- raw: the plain file; corfs fetches every chunk, zeros included (it cannot know them);
- published: `corfs publish` output (zstd chunks, zero chunks only in the manifest).

For each: a fresh cache, page cache dropped, mount with streaming on, wait until status says
complete. Reported: bytes nginx sent (from its access log) and the fetcher's own counts,
streaming time from mount start to complete. Also publish throughput (MB/s of image read) with
--jobs 1 and --jobs 2. Goals: published fetches <= 40% of raw bytes, streams at least as fast.

Artefacts stay under /var/tmp/corfs-bench/published (never in the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    REPO,
    corfs_argv,
    corfs_status,
    drop_caches,
    fresh_dir,
    machine,
    mounted,
    wait_complete,
    workdir,
)
from bench.rootfs import build
from tests.servers import Nginx

MB = 1e6


@dataclass
class PublishRun:
    jobs: int
    seconds: float
    mb_s: float
    bytes_out: int
    summary: str


def publish(image: str, dest: str, jobs: int) -> PublishRun:
    fresh_dir(dest)
    drop_caches()
    start = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "corfs",
            "publish",
            image,
            dest,
            "--jobs",
            str(jobs),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    seconds = time.perf_counter() - start
    summary = out.stdout.strip()
    size = os.path.getsize(image)
    bytes_out = sum(f.stat().st_size for f in Path(dest, "chunks").rglob("*.zst"))
    return PublishRun(jobs, seconds, size / MB / seconds, bytes_out, summary)


@dataclass
class StreamRun:
    form: str
    seconds: float
    nginx_requests: int
    nginx_bytes: int
    fetched: int
    requests: int
    local_bytes: int
    cache_allocated: int


def stream(form: str, url: str, web: Nginx, prefix: str, root: str) -> StreamRun:
    cache = fresh_dir(os.path.join(root, f"cache-{form}"))
    mnt = os.path.join(root, f"mnt-{form}")
    os.makedirs(mnt, exist_ok=True)
    before = web.sent(prefix)
    drop_caches()
    start = time.perf_counter()
    with mounted(corfs_argv(url, cache, mnt), mnt, os.path.join(root, f"{form}.log")):
        wait_complete(mnt, timeout=1200)
        seconds = time.perf_counter() - start
        status = corfs_status(mnt)
    after = web.sent(prefix)
    (image,) = status["images"]
    allocated = sum(
        os.stat(p).st_blocks * 512 for p in Path(cache, "data").iterdir() if p.is_file()
    )
    return StreamRun(
        form,
        seconds,
        after[0] - before[0],
        after[1] - before[1],
        status["fetcher"]["bytes_fetched"],
        status["fetcher"]["requests"],
        image["local_bytes"],
        allocated,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="streaming runs of each form")
    args = parser.parse_args()

    root = workdir("published")
    rootfs = build()
    image = rootfs.path
    size = os.path.getsize(image)
    print(
        f"# {machine()}\n# image: {rootfs.note}, {size / MB:.0f} MB, "
        f"{os.stat(image).st_blocks * 512 / MB:.0f} MB allocated",
        flush=True,
    )

    runs = [publish(image, os.path.join(root, f"pub-j{jobs}"), jobs) for jobs in (1, 2, 1, 2)]
    for r in runs:
        print(
            f"publish --jobs {r.jobs}: {r.seconds:.1f} s, {r.mb_s:.0f} MB/s "
            f"({r.bytes_out / MB:.0f} MB of objects)",
            flush=True,
        )
    print(runs[-1].summary)

    www = fresh_dir(os.path.join(root, "www"))
    os.makedirs(os.path.join(www, "raw"))
    os.symlink(image, os.path.join(www, "raw", os.path.basename(image)))
    os.symlink(os.path.join(root, "pub-j2"), os.path.join(www, "pub"))
    web = Nginx(
        root=Path(www), workdir=Path(fresh_dir(os.path.join(root, "nginx"))), log_requests=True
    )
    web.start()
    results: list[StreamRun] = []
    try:
        for round_ in range(args.rounds):
            order = ["raw", "published"] if round_ % 2 == 0 else ["published", "raw"]
            for form in order:
                url, prefix = (
                    (f"{web.url}raw/", "/raw/") if form == "raw" else (f"{web.url}pub/", "/pub/")
                )
                r = stream(form, url, web, prefix, root)
                results.append(r)
                print(
                    f"stream {form:9}: {r.seconds:6.1f} s, nginx {r.nginx_requests} requests "
                    f"{r.nginx_bytes / MB:.0f} MB, fetcher {r.fetched / MB:.0f} MB in "
                    f"{r.requests} requests, cache holds {r.cache_allocated / MB:.0f} MB",
                    flush=True,
                )
    finally:
        web.stop()

    def best(form: str) -> StreamRun:
        return min((r for r in results if r.form == form), key=lambda r: r.seconds)

    raw, pub = best("raw"), best("published")
    ratio = pub.nginx_bytes / raw.nginx_bytes
    print(
        json.dumps(
            {
                "published_bytes_over_raw": round(ratio, 3),
                "stream_seconds": {
                    "raw": round(raw.seconds, 1),
                    "published": round(pub.seconds, 1),
                },
                "goal_bytes_le_40pct": ratio <= 0.40,
                "goal_stream_as_fast": pub.seconds <= raw.seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
