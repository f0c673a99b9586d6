"""`corfs publish` refuses what it cannot publish before it writes anything: an image it may
not open, one no mount could serve (too large for a base image, or so many chunks that its
manifest would pass what a mount reads), a name whose manifest cannot be a file name, an
empty DEST, -j 0. One line on stderr, exit 2, nothing in DEST; and a manifest over the limit
is never written."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import corfs.manifest
from corfs.errors import BaseCorrupt, CorfsError
from corfs.manifest import parse_manifest
from corfs.publish import DirDestination, publish_to
from tests.fuse.util import assert_one_line_error
from tests.mounting import make_image, run_corfs

KIB = 1 << 10
GIB = 1 << 30
TIB = 1 << 40
# A regular file that even root may not open for reading (a write-only sysctl): like an image
# its user may not read.
UNREADABLE = Path("/proc/sys/vm/compact_memory")


def _refused_before_any_work(result, dest: Path, *needles: str) -> str:
    line = assert_one_line_error(result, *needles)
    assert result.returncode == 2, result.stderr
    assert not (dest / "chunks").exists(), "chunks were published before the refusal"
    assert not dest.exists() or not list(dest.glob("*.corfs.json"))
    return line


@pytest.mark.parametrize("progress", ["--progress", "--no-progress"])
def test_an_image_that_cannot_be_opened_is_refused_before_any_is_published(
    tmp_path: Path, progress: str
) -> None:
    """--progress opened every image for its size with no error handling: a traceback. And
    without it the images before the unreadable one were published, their summaries never
    printed, before the one line and exit 2."""
    assert UNREADABLE.is_file()
    with pytest.raises(PermissionError):
        UNREADABLE.open("rb")
    good = make_image(tmp_path / "good.raw", 256 * KIB, seed=1)
    dest = tmp_path / "dest"
    result = run_corfs("publish", good, UNREADABLE, dest, "--chunk-size", "64K", "-j", "1",
                       progress)
    _refused_before_any_work(result, dest, str(UNREADABLE), "Permission denied")


@pytest.mark.parametrize(
    ("size", "chunk_size", "needle"),
    [
        (64 * GIB, "4K", "--chunk-size"),  # 16 M chunks: a manifest of 160 MiB even all zero
        (65 * TIB, "64M", "64.0 TiB"),  # larger than any base image a mount serves
    ],
    ids=["chunks", "size"],
)
def test_an_image_no_mount_could_serve_is_refused_before_any_work(
    tmp_path: Path, size: int, chunk_size: str, needle: str
) -> None:
    """A sparse image publish would read for minutes to hours, then write a manifest (or an
    image size) every mount leaves out; at 4K chunks of a 1 TiB image its list of digests
    alone took 2 GiB."""
    # tmpfs: sparse files of any size (ext4 stops at 16 TiB).
    where = Path("/dev/shm") if size > 16 * TIB else tmp_path
    image = where / f"corfs-test-{os.getpid()}-sparse.raw"
    dest = tmp_path / "dest"
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        started = time.monotonic()
        result = run_corfs("publish", image, dest, "--chunk-size", chunk_size, "-j", "1",
                           "--no-progress", timeout=20)
        assert time.monotonic() - started < 10
    finally:
        image.unlink()
    _refused_before_any_work(result, dest, image.name, needle)


def test_a_name_whose_manifest_cannot_be_a_file_name_is_refused_before_any_work(
    tmp_path: Path,
) -> None:
    """A 250-byte name is a valid image name, but its manifest's (261 bytes) is no file name:
    every chunk was written, then the manifest failed with ENAMETOOLONG."""
    src = tmp_path / "src"
    src.mkdir()
    image = make_image(src / ("n" * 250), 256 * KIB, seed=2)
    dest = tmp_path / "dest"
    result = run_corfs("publish", image, dest, "--chunk-size", "64K", "--no-progress")
    _refused_before_any_work(result, dest, "255")


def test_a_manifest_larger_than_a_mount_reads_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real limit (64 MiB) takes ~1.8 M stored chunks, 7 GiB of data at 4K chunks: the
    limit is lowered here so that 600 chunks pass it. Publish wrote such a manifest and
    exited 0; every mount then left the image out."""
    monkeypatch.setattr(corfs.manifest, "MAX_MANIFEST_BYTES", 16 * KIB)
    image = make_image(tmp_path / "a.raw", 600 * 4 * KIB, seed=3)
    dest = tmp_path / "dest"
    with pytest.raises(CorfsError, match="--chunk-size"):
        publish_to([str(image)], DirDestination.open(str(dest)), chunk_size=4 * KIB)
    manifest = dest / "a.raw.corfs.json"
    if manifest.exists():  # what the mount would have met
        with pytest.raises(BaseCorrupt, match="more than the 16384"):
            parse_manifest(manifest.read_bytes(), "a.raw")
    assert not manifest.exists()
    # It stopped once the digests so far made the manifest too large (~440 chunks of 600),
    # not after reading and storing every chunk (review finding).
    stored = sum(len(files) for _, _, files in os.walk(dest / "chunks"))
    assert stored < 500, stored

    (summary,) = publish_to([str(image)], DirDestination.open(str(dest)), chunk_size=64 * KIB)
    assert parse_manifest(manifest.read_bytes(), "a.raw").size == summary.size


def test_an_empty_destination_is_refused_not_the_current_directory(tmp_path: Path) -> None:
    """`corfs publish disk.raw "$DEST"` with DEST unset published into the current directory:
    its chunks, manifest, index and temp dir among the user's files."""
    image = make_image(tmp_path / "a.raw", 256 * KIB, seed=4)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_corfs("publish", image, "", "--chunk-size", "64K", "--no-progress", cwd=cwd)
    assert_one_line_error(result, "empty")
    assert result.returncode == 2
    assert os.listdir(cwd) == []


def test_jobs_zero_is_refused_not_taken_for_every_cpu(tmp_path: Path) -> None:
    """`-j 0` passed for "not given" (`jobs or cpu_count`): its one line was never said."""
    image = make_image(tmp_path / "a.raw", 64 * KIB, seed=5)
    dest = tmp_path / "dest"
    result = run_corfs("publish", image, dest, "-j", "0", "--no-progress")
    assert_one_line_error(result, "--jobs")
    assert result.returncode == 2
    assert not dest.exists()
