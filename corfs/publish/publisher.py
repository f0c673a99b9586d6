"""`corfs publish IMAGE... DEST`: write raw images in published form (see corfs/manifest.py).

Each image is cut into chunks; each chunk is hashed (xxh3-128 of its bytes); all-zero chunks
are only noted in the manifest; every other distinct chunk is stored once, zstd-compressed,
at chunks/<hex[:2]>/<hex>.zst. The manifest comes last, then index.json.

Invariants:
- Bad input is refused before anything is written: every image is opened and sized first, and
  one no mount could serve (over MAX_IMAGE_SIZE, or more chunks than a manifest can name even
  all zero) is refused. A manifest over MAX_MANIFEST_BYTES (mounts refuse it) is never written:
  the run stops as soon as the digests so far make it too large (their chunks stay stored).
- No half-written object is ever visible: a directory DEST gets each object under a temp name
  in DEST/.corfs-tmp (not an image, not a chunk) and renamed into place; S3 PUTs are whole.
- A manifest is visible only after every chunk it names is stored (and, for a directory,
  fsynced with the directory that names it): a reader never meets a manifest whose chunks are
  missing, not even after a power cut.
- Idempotent and resumable: an object that is there already is not written again, nor is a
  manifest or index whose bytes are unchanged. In a directory an existing chunk object is
  trusted only once it decompresses to bytes of its digest (a power cut can leave a renamed
  object short); a damaged one is written again. On S3 one that exists is whole (see
  destination.py).
- index.json only grows by this run's images, through `Destination.update`: a publish running
  into DEST at the same time loses no entry, and nothing lists DEST.
- Chunks run in a thread pool: xxhash and zstd release the GIL on large buffers, and pread and
  the S3 client block; results are gathered on the calling thread, which alone updates counts
  and the progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import zstandard

from ..base import MAX_IMAGE_SIZE
from ..base.published import decompress_chunk
from ..digest import chunk_digest, is_zero
from ..errors import BaseCorrupt, CorfsError, UsageError
from ..fileio import pread_full
from ..manifest import (
    INDEX_KEY,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    Manifest,
    check_image_name,
    chunk_key,
    chunk_line_bytes,
    manifest_key,
    manifest_size_problem,
    max_manifest_chunks,
    parse_index,
    render_index,
)
from ..sizes import format_size, parse_size
from .destination import DEFAULT_IO_TIMEOUT, S3_ATTEMPTS, Destination, open_destination

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_LEVEL = 3


# ---- publishing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishSummary:
    name: str
    manifest: str  # where the manifest is, for the user
    size: int
    chunk_size: int
    chunks_total: int
    chunks_zero: int
    chunks_unique: int  # distinct non-zero chunks of this image
    chunks_present: int  # of those, already stored (before this image) and not uploaded
    chunks_uploaded: int
    bytes_in: int  # image bytes read
    bytes_uploaded_raw: int  # uncompressed bytes of the uploaded chunks
    bytes_out: int  # compressed bytes of the uploaded chunks
    manifest_written: bool  # False when an identical manifest was there already
    seconds: float

    @property
    def compression_ratio(self) -> float:
        return self.bytes_uploaded_raw / self.bytes_out if self.bytes_out else 1.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else 0.0


def format_summary(s: PublishSummary) -> str:
    """One line for the user (the CLI prints it)."""
    return (
        f"{s.name}: {s.chunks_total} chunks ({s.chunks_zero} zero, {s.chunks_unique} unique, "
        f"{s.chunks_present} already present, {s.chunks_uploaded} uploaded), "
        f"{format_size(s.bytes_in)} in, {format_size(s.bytes_out)} out "
        f"(ratio {s.compression_ratio:.2f}), {s.seconds:.1f} s, {s.mb_per_second:.0f} MB/s"
        f"{'' if s.manifest_written else ', manifest unchanged'} -> {s.manifest}"
    )


@dataclass(frozen=True)
class _ChunkResult:
    index: int
    length: int
    digest: bytes | None  # None: all zero
    uploaded_raw: int  # 0 unless this task stored the object
    uploaded: int  # compressed bytes stored


class _Publisher:
    """Shared by all images of one run, so that a chunk is stored once across them."""

    def __init__(
        self,
        dest: Destination,
        *,
        chunk_size: int,
        level: int,
        pool: ThreadPoolExecutor,
        window: int,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.dest = dest
        self.chunk_size = chunk_size
        self.level = level
        self.pool = pool
        self.window = window
        self.on_bytes = on_bytes
        self._claimed: set[bytes] = set()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        # One per thread: a ZstdCompressor must not be used by two threads at once. The frame
        # records its content size, which the reader checks before decompressing.
        comp = getattr(self._local, "comp", None)
        if comp is None:
            comp = self._local.comp = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True
            )
        return comp

    def _chunk(self, fd: int, path: str, index: int, length: int) -> _ChunkResult:
        try:
            data = pread_full(fd, length, index * self.chunk_size)
        except OSError as exc:
            raise CorfsError(f"reading {path}: {exc.strerror}") from None
        if len(data) != length:
            raise CorfsError(f"{path} shrank while it was being published")
        if is_zero(data):
            return _ChunkResult(index, length, None, 0, 0)
        digest = chunk_digest(data)
        with self._lock:
            mine = digest not in self._claimed
            self._claimed.add(digest)
        if not mine:
            return _ChunkResult(index, length, digest, 0, 0)
        key = chunk_key(digest)
        if self.dest.holds(key, lambda packed: _is_chunk(packed, digest, length, key)):
            return _ChunkResult(index, length, digest, 0, 0)
        packed = self._compressor().compress(data)
        self.dest.put(key, packed)
        return _ChunkResult(index, length, digest, length, len(packed))

    def publish(self, path: str, name: str) -> PublishSummary:
        started = time.monotonic()
        fd = _open_image(path)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            count = -(-size // self.chunk_size)
            digests: list[bytes | None] = [None] * count
            uploaded = uploaded_raw = bytes_out = 0
            manifest_bytes = 0  # at least: a manifest too large stops the run before the rest
            pending: deque[Future[_ChunkResult]] = deque()

            def collect(future: Future[_ChunkResult]) -> None:
                nonlocal uploaded, uploaded_raw, bytes_out, manifest_bytes
                result = future.result()
                digests[result.index] = result.digest
                manifest_bytes += chunk_line_bytes(result.digest)
                if (problem := manifest_size_problem(manifest_bytes)) is not None:
                    raise _manifest_too_large(path, f"at least {problem}")
                if result.uploaded_raw:
                    uploaded += 1
                    uploaded_raw += result.uploaded_raw
                    bytes_out += result.uploaded
                if self.on_bytes:
                    self.on_bytes(result.length)

            try:
                for index in range(count):
                    length = min(self.chunk_size, size - index * self.chunk_size)
                    pending.append(self.pool.submit(self._chunk, fd, path, index, length))
                    while len(pending) >= self.window:
                        collect(pending.popleft())
                while pending:
                    collect(pending.popleft())
            finally:
                # On failure, drop what has not started and wait for what has: no thread may
                # still be writing after we return (nor use fd once it is closed).
                for future in pending:
                    future.cancel()
                for future in pending:
                    with contextlib.suppress(BaseException):
                        future.result()
        finally:
            os.close(fd)

        manifest = Manifest(
            name=name, size=size, chunk_size=self.chunk_size, digests=tuple(digests)
        )
        key, data = manifest_key(name), manifest.to_json()
        if (problem := manifest_size_problem(len(data))) is not None:  # mounts would refuse it
            raise _manifest_too_large(path, problem)
        written = self._write_manifest(key, data)
        self._add_to_index(key, len(data))  # after each image: a later failure keeps it listed
        unique = {d for d in digests if d is not None}
        return PublishSummary(
            name=name,
            manifest=f"{self.dest.description.rstrip('/')}/{manifest_key(name)}",
            size=size,
            chunk_size=self.chunk_size,
            chunks_total=count,
            chunks_zero=digests.count(None),
            chunks_unique=len(unique),
            chunks_present=len(unique) - uploaded,
            chunks_uploaded=uploaded,
            bytes_in=size,
            bytes_uploaded_raw=uploaded_raw,
            bytes_out=bytes_out,
            manifest_written=written,
            seconds=time.monotonic() - started,
        )

    def _write_manifest(self, key: str, data: bytes) -> bool:
        # Chunks durable before the manifest that names them, even an unchanged one: a damaged
        # chunk it names may just have been written again.
        self.dest.sync()
        if self.dest.get(key) == data:
            return False
        self.dest.put(key, data)
        self.dest.sync()
        return True

    def _add_to_index(self, key: str, size: int) -> None:
        """index.json lists manifest `key` of `size` bytes too, keeping every entry there:
        `update` lets no concurrent publish into DEST slip in between. Each run adds its own
        images, so nothing lists DEST (on S3 that would take the ListBucket permission)."""

        def with_entry(old: bytes | None) -> bytes | None:
            entries: dict[str, int | None] = {}
            if old is not None:
                try:
                    entries = parse_index(old)
                except BaseCorrupt as exc:
                    log.warning("rewriting %s/%s: %s", self.dest.description, INDEX_KEY, exc)
            entries[key] = size
            data = render_index(entries)
            return None if data == old else data

        self.dest.update(INDEX_KEY, with_entry)


def _is_chunk(packed: bytes, digest: bytes, length: int, key: str) -> bool:
    """Whether stored object `packed` holds the chunk of this digest and length (the reader's
    own check: base/published.py)."""
    try:
        return chunk_digest(decompress_chunk(packed, length, key)) == digest
    except BaseCorrupt:
        return False


@dataclass(frozen=True)
class _Source:
    path: str
    name: str
    size: int


def _manifest_too_large(path: str, size: str) -> CorfsError:
    return CorfsError(
        f"cannot publish {path}: its manifest would be {size}; use a larger --chunk-size"
    )


def _open_image(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot open image {path}: {exc.strerror}") from None


def _image_size(path: str) -> int:
    fd = _open_image(path)
    try:
        return os.lseek(fd, 0, os.SEEK_END)  # a block device's too (st_size is 0)
    finally:
        os.close(fd)


def _check_size(path: str, size: int, chunk_size: int) -> None:
    """UsageError for an image no mount could serve: it would be read for hours, then left out
    (and at small chunk sizes its list of digests alone could take gigabytes)."""
    if size > MAX_IMAGE_SIZE:
        raise UsageError(
            f"image {path} is {format_size(size)}: a base image may be "
            f"{format_size(MAX_IMAGE_SIZE)} at most"
        )
    chunks = -(-size // chunk_size)
    if chunks > max_manifest_chunks():
        raise UsageError(
            f"image {path} is {chunks} chunks of {format_size(chunk_size)}, more than a manifest "
            f"can name ({max_manifest_chunks()}): use a larger --chunk-size"
        )


def _check_sources(images: list[str], chunk_size: int) -> list[_Source]:
    """Each image, or UsageError for the first bad one: all are checked (opened too) before
    any is published."""
    if not images:
        raise UsageError("nothing to publish: name at least one image")
    sources: list[_Source] = []
    names: set[str] = set()
    for path in images:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise UsageError(f"image {path}: {exc.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UsageError(f"image {path} is not a regular file or block device")
        name = os.path.basename(os.path.normpath(path))
        why = check_image_name(name)
        if why:
            raise UsageError(f"cannot publish {path} as {name!r}: {why}")
        if name in names:
            raise UsageError(f"two images are named {name!r}: names must be distinct")
        names.add(name)
        size = _image_size(path)
        _check_size(path, size, chunk_size)
        sources.append(_Source(path, name, size))
    return sources


def _check_options(chunk_size: int, level: int, jobs: int) -> None:
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise UsageError(
            f"chunk size {chunk_size} must be a power of two from {format_size(MIN_CHUNK_SIZE)} "
            f"to {format_size(MAX_CHUNK_SIZE)}"
        )
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise UsageError(f"zstd level {level} is outside 1..{zstandard.MAX_COMPRESSION_LEVEL}")
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")


def publish_to(
    images: list[str],
    dest: Destination,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = DEFAULT_LEVEL,
    jobs: int = 1,
    on_bytes: Callable[[int], None] | None = None,
) -> list[PublishSummary]:
    """Publish `images` to an open destination (the seam tests use to inject faults)."""
    _check_options(chunk_size, level, jobs)
    sources = _check_sources(images, chunk_size)
    summaries = []
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="corfs-publish") as pool:
        publisher = _Publisher(
            dest,
            chunk_size=chunk_size,
            level=level,
            pool=pool,
            window=2 * jobs + 2,
            on_bytes=on_bytes,
        )
        for source in sources:
            summaries.append(publisher.publish(source.path, source.name))
    return summaries


def run_publish(
    images: list[str],
    dest: str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = DEFAULT_LEVEL,
    jobs: int | None = None,
    progress: bool = False,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    io_timeout: float = DEFAULT_IO_TIMEOUT,
) -> list[PublishSummary]:
    """`corfs publish`: bad input raises UsageError, failures CorfsError, one line each."""
    jobs = (os.cpu_count() or 1) if jobs is None else jobs  # 0 is refused, not "all"
    _check_options(chunk_size, level, jobs)
    if not io_timeout > 0:  # nan too
        raise UsageError(f"--io-timeout must be positive, not {io_timeout}")
    sources = _check_sources(images, chunk_size)
    destination = open_destination(
        dest, endpoint_url=endpoint_url, region=region, profile=profile, connections=2 * jobs,
        io_timeout=io_timeout,
    )
    if not progress:
        return publish_to(images, destination, chunk_size=chunk_size, level=level, jobs=jobs)

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    total = sum(source.size for source in sources)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(f"publishing to {destination.description}", total=total)
        return publish_to(
            images,
            destination,
            chunk_size=chunk_size,
            level=level,
            jobs=jobs,
            on_bytes=lambda n: bar.advance(task, n),
        )


# ---- CLI glue (the CLI owns printing and exit codes) ---------------------------------------


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="raw images to publish")
    parser.add_argument(
        "destination",
        metavar="DEST",
        help="a directory or s3://bucket/prefix (serve a directory over HTTP to use it as a base)",
    )
    parser.add_argument(
        "--chunk-size",
        type=_size_argument,
        default=DEFAULT_CHUNK_SIZE,
        help="chunk size, a power of two (default 1M)",
    )
    parser.add_argument(
        "--level",
        type=int,
        default=DEFAULT_LEVEL,
        help=f"zstd compression level (default {DEFAULT_LEVEL})",
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        help="chunks processed in parallel (default: number of CPUs)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint URL")
    parser.add_argument("--region", default=None, help="S3 region")
    parser.add_argument("--profile", default=None, help="AWS profile for S3")
    parser.add_argument(
        "--io-timeout",
        type=float,
        default=DEFAULT_IO_TIMEOUT,
        metavar="SECONDS",
        help="S3: a request that gets no connection or no answer bytes for this long is "
        f"retried, {S3_ATTEMPTS} attempts in all (default {DEFAULT_IO_TIMEOUT:g})",
    )


def publish_from_args(args: argparse.Namespace) -> list[PublishSummary]:
    """Run `corfs publish` from arguments added by add_publish_arguments."""
    import sys

    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    return run_publish(
        args.images,
        args.destination,
        chunk_size=args.chunk_size,
        level=args.level,
        jobs=args.jobs,
        progress=progress,
        endpoint_url=args.endpoint_url,
        region=args.region,
        profile=args.profile,
        io_timeout=args.io_timeout,
    )
