"""Issue 2, point 7: fully local means independent. A completely streamed image is served
after its base is deleted; `corfs detach` writes it out equal to the original and refuses an
image that is not fully local. Issue 10, item 5: detach never follows a link planted at its
temp name, and DEST is 0600. A DEST inside a local BASE directory is refused (BASE is
read-only to corfs)."""

from __future__ import annotations

import os
import random
import stat
import subprocess
from pathlib import Path

import pytest

from corfs.store import CacheStore, ChunkState
from tests.mounting import make_image, run_corfs, sha256_file

from .util import (
    MIB,
    assert_one_line_error,
    direct_read,
    image_status,
    snapshot,
    status,
    wait_complete,
    wait_for,
)


def test_streamed_image_survives_base_removal_and_detaches(tmp_dirs, tmp_path):
    orig = tmp_path / "original.raw"
    make_image(orig, 6 * MIB + 4321, seed=41, zero_blocks=(2,))
    os.link(orig, tmp_dirs.base / "disk.raw")  # the base copy; `orig` keeps the bytes
    make_image(tmp_dirs.base / "other.raw", 4 * MIB, seed=42)
    with tmp_dirs.mount("--chunk-size", "256k") as m:
        wait_complete(m.mnt, "disk.raw")
        wait_complete(m.mnt, "other.raw")
        st = image_status(status(m.mnt), "disk.raw")
        assert st["state"] == "complete" and st["fill_ratio"] == 1.0
        m.stop()

    os.unlink(tmp_dirs.base / "disk.raw")
    with tmp_dirs.mount("--no-stream") as m:
        assert sha256_file(m.mnt / "disk.raw") == sha256_file(orig)
        m.stop()
        assert "disk.raw" in m.log_text()  # "not in the base any more"

    dest = tmp_path / "detached.raw"
    with tmp_dirs.mount("--no-stream") as m:  # a live mount may hold uncommitted writes
        assert_one_line_error(run_corfs("detach", tmp_dirs.cache, "disk.raw", dest), "mounted")
        assert not dest.exists()
        m.stop()
    result = run_corfs("detach", tmp_dirs.cache, "disk.raw", dest)
    assert result.returncode == 0, result.stderr
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", dest, orig],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert sha256_file(dest) == sha256_file(orig)


def test_detach_refuses_image_not_fully_local(tmp_dirs, tmp_path):
    make_image(tmp_dirs.base / "disk.raw", 4 * MIB, seed=43)
    with tmp_dirs.mount("--no-stream") as m:
        # Two reads in one chunk make it local (one alone fetches a small range), no read-ahead
        direct_read(m.mnt / "disk.raw", 2 * MIB, 4096)
        direct_read(m.mnt / "disk.raw", 2 * MIB + 4096, 4096)
        wait_for(lambda: image_status(status(m.mnt), "disk.raw")["local_bytes"] > 0)
        assert image_status(status(m.mnt), "disk.raw")["local_bytes"] < 4 * MIB
        m.stop()
    dest = tmp_path / "detached.raw"
    result = run_corfs("detach", tmp_dirs.cache, "disk.raw", dest)
    assert_one_line_error(result, "disk.raw", "not fully local")
    assert not dest.exists()
    assert not list(tmp_path.glob("detached.raw*"))
    # and an image the cache does not have
    assert_one_line_error(run_corfs("detach", tmp_dirs.cache, "nope.raw", dest), "nope.raw")


def fully_local_cache(cache: Path, name: str, data: bytes, chunk_size: int = 64 << 10) -> None:
    """A cache holding all of `name` (dirty chunks), as a finished mount leaves it."""
    store = CacheStore.open(str(cache))
    try:
        store.create_image(name, len(data), chunk_size, "identity", "base")
        store.write_data(name, 0, data)
        for index in range(-(-len(data) // chunk_size)):
            store.record(name, index, ChunkState.DIRTY)
        store.commit_sync()
    finally:
        store.close()


def test_detach_never_follows_a_link_planted_at_its_temp_name(tmp_path):
    data = random.Random(7).randbytes(3 * (64 << 10) + 5)
    fully_local_cache(tmp_path / "cache", "disk.raw", data)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not yours to write")
    dest = tmp_path / "out" / "detached.raw"
    dest.parent.mkdir()
    planted = Path(f"{dest}.corfs-tmp")
    planted.symlink_to(victim)

    result = run_corfs("detach", tmp_path / "cache", "disk.raw", dest)
    assert_one_line_error(result, f"{dest}.corfs-tmp", "in the way")
    assert victim.read_bytes() == b"not yours to write"
    assert planted.is_symlink()  # not ours: neither followed nor removed
    assert sorted(p.name for p in dest.parent.iterdir()) == [planted.name]

    planted.unlink()
    result = run_corfs("detach", tmp_path / "cache", "disk.raw", dest)
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == data
    # The guest's bytes stay the user's alone, as in the cache (see detach.py).
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_detach_refuses_a_chunk_whose_bytes_are_not_the_ones_recorded(tmp_dirs, tmp_path):
    """A clean chunk whose bytes in CACHE no longer match its digest (a damaged disk), or a
    data file cut short: detach wrote them out as the image, silently wrong (short reads as
    zeros). It must refuse in one line naming the chunk and what to do, writing no DEST."""
    chunk = 64 << 10
    orig = tmp_path / "original.raw"
    make_image(orig, 8 * chunk, seed=44, block_size=chunk)
    os.link(orig, tmp_dirs.base / "disk.raw")
    with tmp_dirs.mount("--chunk-size", "64k") as m:
        wait_complete(m.mnt, "disk.raw")
        m.stop()
    data = tmp_dirs.cache / "data" / "disk.raw"
    dest = tmp_path / "detached.raw"
    fd = os.open(data, os.O_RDWR)
    try:
        good = os.pread(fd, 1, 3 * chunk + 10)
        os.pwrite(fd, bytes([good[0] ^ 1]), 3 * chunk + 10)
        assert_one_line_error(run_corfs("detach", tmp_dirs.cache, "disk.raw", dest), "chunk 3")
        assert not dest.exists() and not list(tmp_path.glob("detached.raw*"))
        os.pwrite(fd, good, 3 * chunk + 10)
    finally:
        os.close(fd)
    os.truncate(data, 7 * chunk + 100)
    assert_one_line_error(run_corfs("detach", tmp_dirs.cache, "disk.raw", dest), "chunk 7")
    assert not dest.exists() and not list(tmp_path.glob("detached.raw*"))


@pytest.mark.parametrize(("inside", "said"), [("base", "base directory"),
                                              ("cache", "must not be inside")])
def test_detach_refuses_a_dest_inside_the_base_or_the_cache(tmp_dirs, tmp_path, inside, said):
    """BASE is never written to: a file detached into it would also be listed as a new base
    image by the next mount. CACHE's names are the store's (data/OTHER is the data file a
    later mount makes for a base image OTHER). Refused however DEST names them (through a
    symlink too, in a directory below), with one line, the directory left as it was."""
    make_image(tmp_dirs.base / "disk.raw", 2 * MIB, seed=43)
    with tmp_dirs.mount() as m:
        wait_complete(m.mnt, "disk.raw")
        m.stop()
    top = tmp_dirs.base if inside == "base" else tmp_dirs.cache
    alias = tmp_path / "alias"
    alias.symlink_to(top)
    (top / "sub").mkdir(exist_ok=True)
    before = snapshot(top)
    for dest in (top / "copy.raw", alias / "copy.raw", top / "sub" / "c.raw"):
        result = run_corfs("detach", tmp_dirs.cache, "disk.raw", dest)
        assert_one_line_error(result, said)
        assert snapshot(top) == before
