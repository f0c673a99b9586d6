"""Listing published images in a live mount: manifests are parsed off the trio thread, and the
digests they keep stay within --manifest-memory.

A forget command (what `corfs verify` sends) makes the daemon list its base again, to check
it could supply the chunks again: every manifest that appeared or changed since is parsed
then, while the mount serves.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

from corfs.control_client import send_command
from corfs.manifest import Manifest
from tests.fuse.test_published_mount import publish
from tests.mounting import CorfsDirs, make_image

KIB = 1 << 10


def _large_manifest(path: Path, chunks: int) -> None:
    """A valid manifest of `chunks` stored 4 KiB chunks (~34 bytes of JSON each); its chunk
    objects need not exist to be listed."""
    pool = os.urandom(16 * chunks)
    digests = tuple(pool[i * 16 : (i + 1) * 16] for i in range(chunks))
    name = path.name.removesuffix(".corfs.json")
    path.write_bytes(Manifest(name, chunks * 4 * KIB, 4 * KIB, digests).to_json())


def _forget_nothing(mnt: Path, image: str) -> float:
    """Seconds a forget of no chunk of `image` took: a listing of the base, in the daemon."""
    started = time.monotonic()
    send_command(os.fspath(mnt), {"op": "forget", "image": image, "chunks": []})
    return time.monotonic() - started


def test_a_large_manifest_is_parsed_while_reads_are_answered(tmp_dirs: CorfsDirs) -> None:
    raw = make_image(tmp_dirs.base / "raw.img", 256 * KIB, seed=3)
    want = raw.read_bytes()[:4 * KIB]
    with tmp_dirs.mount("--no-stream") as m:
        fd = os.open(m.mnt / "raw.img", os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4 * KIB)

        def read() -> float:
            """One O_DIRECT read of a local chunk (the daemon answers each): its seconds."""
            started = time.monotonic()
            assert os.preadv(fd, [buf], 0) == 4 * KIB
            return time.monotonic() - started

        try:
            read()  # now local
            assert bytes(buf) == want
            # 54 MB: parsing it takes well over a second on this machine.
            _large_manifest(tmp_dirs.base / "big.raw.corfs.json", 1_600_000)
            took: list[float] = []
            forget = threading.Thread(target=lambda: took.append(_forget_nothing(m.mnt, "raw.img")))
            forget.start()
            latencies = []
            while forget.is_alive():
                latencies.append(read())
            forget.join()
            assert bytes(buf) == want
        finally:
            os.close(fd)
        (listing,) = took
        assert listing > 0.8, f"the listing took {listing:.2f} s: too short to tell"
        # Inline, every read waited for the whole parse; now at most for json.loads (~1/8).
        assert max(latencies) < listing / 3, (max(latencies), listing, len(latencies))
        assert "big.raw" not in m.log_text()  # it parsed: nothing left out
        m.stop()


def _three_published_two_fit(tmp_path: Path) -> tuple[CorfsDirs, Path, list[Path]]:
    """a.raw, b.raw and c.raw published into BASE: 64 stored 4 KiB chunks each, 64 x 57 =
    3648 bytes of digests; `--manifest-memory 8K` holds two. (dirs, their sources, images)"""
    dirs = CorfsDirs.under(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    images = [make_image(src / f"{n}.raw", 256 * KIB, seed=i) for i, n in enumerate("abc")]
    publish(dirs.base, *images, chunk_size=4 * KIB)
    return dirs, src, images


def test_manifests_beyond_the_memory_bound_are_left_out_one_line_each(tmp_path: Path) -> None:
    dirs, src, images = _three_published_two_fit(tmp_path)
    with dirs.mount("--no-stream", "--manifest-memory", "8K") as m:
        assert sorted(os.listdir(m.mnt)) == ["a.raw", "b.raw"]  # by name
        named = [line for line in m.log_text().splitlines() if "'c.raw'" in line]
        assert len(named) == 1 and "leaving out" in named[0] and "--manifest-memory" in named[0]
        assert (m.mnt / "b.raw").read_bytes() == images[1].read_bytes()
        # A manifest that appears later (and sorts first) does not push out a served image:
        # listing again keeps a.raw and b.raw, and leaves the newcomer out.
        newcomer = make_image(src / "0.raw", 256 * KIB, seed=9)
        publish(dirs.base, newcomer, chunk_size=4 * KIB)
        _forget_nothing(m.mnt, "a.raw")  # refused if a.raw were not listed any more
        named = [line for line in m.log_text().splitlines() if "'0.raw'" in line]
        assert len(named) == 1 and "--manifest-memory" in named[0], m.log_text()
        m.stop()


def test_a_manifest_left_out_for_memory_is_not_read_again_while_it_is_unchanged(
    tmp_path: Path,
) -> None:
    """A manifest left out by --manifest-memory was read and parsed again at every listing
    (up to 64 MiB each time) to be left out again. Unchanged (same identity), its known cost
    decides: here its bytes are made garbage in place, size, mtime and inode kept, so a
    re-read would say it does not parse."""
    dirs, _, _ = _three_published_two_fit(tmp_path)
    with dirs.mount("--no-stream", "--manifest-memory", "8K") as m:
        assert sorted(os.listdir(m.mnt)) == ["a.raw", "b.raw"]
        manifest = dirs.base / "c.raw.corfs.json"
        st = manifest.stat()
        with open(manifest, "r+b") as f:
            f.write(b"x" * st.st_size)
        os.utime(manifest, ns=(st.st_atime_ns, st.st_mtime_ns))
        _forget_nothing(m.mnt, "a.raw")
        named = [line for line in m.log_text().splitlines() if "'c.raw'" in line]
        assert len(named) == 2, m.log_text()
        assert all("--manifest-memory" in line for line in named), named
        m.stop()
