"""Published images whose manifest lies or was written otherwise than by corfs publish,
through real mounts: whatever a manifest claims, no byte is served that does not hash to its
chunk's digest at its chunk's length, no other chunk of the cache is touched by it, and bytes
that do match are served."""

from __future__ import annotations

import json
import os
import time

import pytest
import zstandard

from corfs.digest import chunk_digest
from tests.fuse.test_published_mount import manifest_chunks, object_path, publish
from tests.fuse.util import direct_read, wait_stored
from tests.mounting import make_image

KIB = 1 << 10
CHUNK = 64 * KIB


def test_dedup_never_copies_a_chunk_of_another_length(tmp_dirs) -> None:
    """b.raw (4 KiB chunks) names, for its chunk 0, the digest of a.raw's 64 KiB chunk 0,
    which is local: dedup must not copy those 64 KiB over b's chunk 0 and the 15 chunks after
    it (there a client's write), nor serve any of them as b's chunk 0."""
    src = tmp_dirs.base.parent / "src"
    src.mkdir()
    a = make_image(src / "a.raw", 128 * KIB, seed=71)
    b = make_image(src / "b.raw", 64 * KIB, seed=72)
    publish(tmp_dirs.base, a, chunk_size=64 * KIB)
    publish(tmp_dirs.base, b, chunk_size=4 * KIB)
    manifest_path = tmp_dirs.base / "b.raw.corfs.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["chunks"][0] = manifest_chunks(tmp_dirs.base, "a.raw")[0]
    manifest_path.write_text(json.dumps(manifest))

    written = os.urandom(4 * KIB)
    with tmp_dirs.mount("--no-stream") as m:
        assert (m.mnt / "a.raw").read_bytes() == a.read_bytes()
        wait_stored(m.mnt, "a.raw", 128 * KIB)
        fd = os.open(m.mnt / "b.raw", os.O_WRONLY)
        try:
            assert os.pwrite(fd, written, 4 * KIB) == 4 * KIB  # chunk 1, whole: no fill
            os.fsync(fd)
        finally:
            os.close(fd)
        with pytest.raises(OSError) as info:
            direct_read(m.mnt / "b.raw", 0, 4 * KIB)
        assert info.value.errno == 5
        assert direct_read(m.mnt / "b.raw", 4 * KIB, 4 * KIB) == written
        assert direct_read(m.mnt / "b.raw", 8 * KIB, 4 * KIB) == b.read_bytes()[8 * KIB : 12 * KIB]
        m.stop()
    data_file = tmp_dirs.cache / "data" / "b.raw"
    assert data_file.stat().st_size == 64 * KIB
    with open(data_file, "rb") as f:
        f.seek(4 * KIB)
        assert f.read(4 * KIB) == written


def test_a_zero_chunk_named_by_its_digest_is_served(tmp_dirs) -> None:
    """The format lets a manifest name an all-zero chunk by its digest (with its object) as
    well as by "zero" (another publisher's, or a hand-made manifest): its zeros are right."""
    src = tmp_dirs.base.parent / "src"
    src.mkdir()
    a = make_image(src / "a.raw", 4 * CHUNK, seed=73, zero_blocks=(1,), block_size=CHUNK)
    publish(tmp_dirs.base, a, chunk_size=CHUNK)
    zeros = bytes(CHUNK)
    digest = chunk_digest(zeros).hex()
    obj = tmp_dirs.base / "chunks" / digest[:2] / f"{digest}.zst"
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(zstandard.ZstdCompressor(write_content_size=True).compress(zeros))
    manifest_path = tmp_dirs.base / "a.raw.corfs.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["chunks"][1] == "zero"
    manifest["chunks"][1] = digest
    manifest_path.write_text(json.dumps(manifest))
    with tmp_dirs.mount("--no-stream") as m:
        assert direct_read(m.mnt / "a.raw", CHUNK, CHUNK) == zeros
        assert (m.mnt / "a.raw").read_bytes() == a.read_bytes()
        m.stop()


def test_a_fifo_in_place_of_a_chunk_object_fails_only_its_chunk(tmp_dirs) -> None:
    """A directory base whose chunk object is a FIFO (no writer: open() blocks for ever): that
    chunk is EIO at once, and its reads do not use up the base's reader threads for good (8),
    after which every other chunk of the mount waited for --io-timeout and failed."""
    src = tmp_dirs.base.parent / "src"
    src.mkdir()
    a = make_image(src / "a.raw", 4 * CHUNK, seed=74, block_size=CHUNK)
    publish(tmp_dirs.base, a, chunk_size=CHUNK)
    obj = object_path(tmp_dirs.base, manifest_chunks(tmp_dirs.base, "a.raw")[1])
    obj.unlink()
    os.mkfifo(obj)
    with tmp_dirs.mount("--no-stream", "--io-timeout", "1") as m:
        for _ in range(10):
            started = time.monotonic()
            with pytest.raises(OSError) as info:
                direct_read(m.mnt / "a.raw", CHUNK, 4 * KIB)
            assert info.value.errno == 5
            waited = time.monotonic() - started
        want = a.read_bytes()[2 * CHUNK : 3 * CHUNK]
        assert direct_read(m.mnt / "a.raw", 2 * CHUNK, CHUNK) == want
        assert waited < 0.5, "a FIFO was waited on"
        assert "not a regular file" in m.log_text()
        m.stop()


def test_a_deeply_nested_manifest_is_left_out_not_the_mount(tmp_dirs) -> None:
    """json.loads raises RecursionError (not ValueError) for nesting this deep: a manifest of
    200 KB of '[' failed the whole mount with a traceback."""
    src = tmp_dirs.base.parent / "src"
    src.mkdir()
    a = make_image(src / "a.raw", 2 * CHUNK, seed=75, block_size=CHUNK)
    publish(tmp_dirs.base, a, chunk_size=CHUNK)
    (tmp_dirs.base / "nested.raw.corfs.json").write_text("[" * 200_000)
    with tmp_dirs.mount("--no-stream") as m:
        assert os.listdir(m.mnt) == ["a.raw"]
        assert (m.mnt / "a.raw").read_bytes() == a.read_bytes()
        log = m.log_text()
        assert "nested.raw" in log and "Traceback" not in log
        m.stop()
