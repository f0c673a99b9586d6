"""Published images through real mounts (issue 5, points 1-4 and 6):

1. verified: a corrupt, truncated or swapped chunk object gives EIO, never wrong bytes; its
   bytes never reach CACHE, no chunk row is written, status shows the error; once the object
   is fixed the next read succeeds.
2. zeros: all-zero chunks are never requested from the base (nginx access log) nor stored
   (sparse data file).
3. dedup: a chunk is stored once in DEST and fetched at most once per host: image B takes the
   chunks image A already has locally.
4. `corfs publish` prints one summary line per image; a re-run uploads nothing.
6. a base dir with a good published image, a bad manifest and a raw image: the bad one is left
   out with one log line naming it, the others are served.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from tests.fuse.util import (
    direct_read,
    drop_caches,
    image_status,
    live_status,
    snapshot,
    wait_complete,
    wait_for,
)
from tests.mounting import CorfsDirs, CorfsMount, make_image, run_corfs, sha256_file
from tests.servers import Nginx

KIB = 1 << 10
CHUNK = 64 * KIB


# ---- helpers -------------------------------------------------------------------------------


def publish(dest: Path, *images: Path, chunk_size: int = CHUNK) -> list[str]:
    """`corfs publish IMAGES... DEST`, asserted to succeed: its summary lines."""
    result = run_corfs(
        "publish", *images, dest, "--chunk-size", str(chunk_size), "--jobs", "2", "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def manifest_chunks(dest: Path, name: str) -> list[str]:
    """Per chunk: its hex digest or "zero"."""
    return json.loads((dest / f"{name}.corfs.json").read_text())["chunks"]


def object_path(dest: Path, digest: str) -> Path:
    return dest / "chunks" / digest[:2] / f"{digest}.zst"


def chunk_rows(cache: Path, name: str) -> dict[int, tuple[int, bytes | None]]:
    """Committed chunk rows of `name` in CACHE/state.db (read beside a live daemon: WAL)."""
    db = sqlite3.connect(f"file:{cache / 'state.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT idx, state, digest FROM chunks WHERE image = ?", (name,))
        return {idx: (state, digest) for idx, state, digest in rows}
    finally:
        db.close()


def published_objects(dest: Path) -> dict[str, tuple]:
    """snapshot() of DEST without its temp dir (whose mtime a run's writability probe bumps)."""
    return {k: v for k, v in snapshot(dest).items() if "/.corfs-tmp" not in k}


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def web(tmp_path: Path):
    server = Nginx(root=tmp_path / "www", workdir=tmp_path / "nginx", log_requests=True).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Published:
    dirs: CorfsDirs
    src: Path  # the raw image
    want: bytes
    digests: list[str]


def published_image(
    tmp_dirs: CorfsDirs, size: int = 16 * CHUNK, zero: tuple[int, ...] = (2, 3)
) -> Published:
    """a.raw published into tmp_dirs.base (the mount's BASE), raw source outside it."""
    src_dir = tmp_dirs.base.parent / "src"
    src_dir.mkdir(exist_ok=True)
    src = make_image(src_dir / "a.raw", size, seed=11, zero_blocks=zero, block_size=CHUNK)
    publish(tmp_dirs.base, src)
    return Published(tmp_dirs, src, src.read_bytes(), manifest_chunks(tmp_dirs.base, "a.raw"))


# ---- 1. verified ---------------------------------------------------------------------------

BAD = 5  # the chunk whose object is damaged


def _flip(p: Published, path: Path) -> None:
    """A valid zstd frame of the right size holding one wrong byte."""
    data = bytearray(p.want[BAD * CHUNK : (BAD + 1) * CHUNK])
    data[1234] ^= 0x01
    path.write_bytes(zstandard.ZstdCompressor(write_content_size=True).compress(bytes(data)))


def _truncate(p: Published, path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _swap(p: Published, path: Path) -> None:
    """Another chunk's (valid, right-sized) object in its place."""
    path.write_bytes(object_path(p.dirs.base, p.digests[BAD + 1]).read_bytes())


@pytest.mark.parametrize("damage", [_flip, _truncate, _swap], ids=["flip", "truncate", "swap"])
def test_damaged_chunk_object_is_eio_never_stored_and_fixing_it_heals(tmp_dirs, damage) -> None:
    p = published_image(tmp_dirs)
    obj = object_path(tmp_dirs.base, p.digests[BAD])
    good = obj.read_bytes()
    damage(p, obj)
    data_file = tmp_dirs.cache / "data" / "a.raw"
    with tmp_dirs.mount("--no-stream") as m:
        image = m.mnt / "a.raw"
        # Through the page cache and with O_DIRECT: EIO both ways, never the damaged bytes.
        with pytest.raises(OSError) as info, open(image, "rb") as f:
            f.seek(BAD * CHUNK)
            f.read(CHUNK)
        assert info.value.errno == 5
        with pytest.raises(OSError) as info:
            direct_read(image, BAD * CHUNK + 4 * KIB, 4 * KIB)
        assert info.value.errno == 5
        # The chunks around it are fine.
        assert (
            direct_read(image, (BAD - 1) * CHUNK, CHUNK) == p.want[(BAD - 1) * CHUNK : BAD * CHUNK]
        )

        st = live_status(m.mnt)
        assert st["fetcher"]["digest_mismatches"] >= 4  # two reads, two fetches each
        assert st["fetcher"]["failures"] >= 2
        error = image_status(st, "a.raw")["error"]
        assert error and f"chunk {BAD}" in error, error
        assert "failed its" in m.log_text()

        time.sleep(1.5)  # a commit interval: whatever was recorded is in the database now
        rows = chunk_rows(tmp_dirs.cache, "a.raw")
        assert BAD - 1 in rows and BAD not in rows
        with open(data_file, "rb") as f:
            f.seek(BAD * CHUNK)
            assert f.read(CHUNK) == bytes(CHUNK)  # nothing of the bad object was written

        obj.write_bytes(good)
        assert direct_read(image, BAD * CHUNK, CHUNK) == p.want[BAD * CHUNK : (BAD + 1) * CHUNK]
        assert image_status(live_status(m.mnt), "a.raw")["error"] is None
        wait_for(lambda: BAD in chunk_rows(tmp_dirs.cache, "a.raw"), 5, "chunk row committed")
        drop_caches()
        assert image.read_bytes() == p.want
        m.stop()
    with open(data_file, "rb") as f:
        assert f.read() == p.want


# ---- 2. zeros ------------------------------------------------------------------------------


def test_zero_chunks_are_never_fetched_nor_stored(tmp_path: Path, web: Nginx) -> None:
    zero = tuple(range(4, 40)) + (60, 61)
    src = make_image(tmp_path / "a.raw", 64 * CHUNK, seed=21, zero_blocks=zero, block_size=CHUNK)
    dest = web.root / "pub"
    (summary,) = publish(dest, src)
    assert f"({len(zero)} zero, {64 - len(zero)} unique" in summary
    nonzero = 64 - len(zero)
    dirs = CorfsDirs.under(tmp_path / "m")
    cache = dirs.cache
    # Streaming on: it walks every chunk, zero or not.
    with CorfsMount(f"{web.url}pub/", cache, dirs.mnt, log_dir=dirs.logs) as m:
        final = wait_complete(m.mnt, "a.raw")
        assert final["local_bytes"] == 64 * CHUNK
        assert sha256_file(m.mnt / "a.raw") == sha256_file(src)
        fetcher = live_status(m.mnt)["fetcher"]
        assert fetcher["bytes_fetched"] == nonzero * CHUNK
        m.stop()
    chunk_gets = web.requests("/pub/chunks/")
    assert len(chunk_gets) == nonzero, chunk_gets
    assert len({uri for uri, _, _ in chunk_gets}) == nonzero
    data_file = cache / "data" / "a.raw"
    assert allocated(data_file) <= nonzero * CHUNK + 64 * KIB
    rows = chunk_rows(cache, "a.raw")
    assert len(rows) == 64 and all(rows[i][1] is None for i in zero)


# ---- 3. dedup ------------------------------------------------------------------------------


def _two_images(tmp_path: Path) -> tuple[Path, Path, set[int]]:
    """a.raw and b.raw of 32 chunks each; b differs from a in chunks 3, 17 and 30."""
    src = tmp_path / "src"
    src.mkdir()
    a = make_image(src / "a.raw", 32 * CHUNK, seed=31, block_size=CHUNK)
    b = src / "b.raw"
    data = bytearray(a.read_bytes())
    differ = {3, 17, 30}
    for i in differ:
        data[i * CHUNK : i * CHUNK + 16] = os.urandom(16)
    b.write_bytes(data)
    return a, b, differ


@pytest.mark.parametrize("wait_commit", [True, False], ids=["committed", "uncommitted"])
def test_identical_chunks_stored_once_and_fetched_once_per_host(
    tmp_path: Path, web: Nginx, wait_commit: bool
) -> None:
    a, b, differ = _two_images(tmp_path)
    dest = web.root / "pub"
    line_a, line_b = publish(dest, a, b)
    assert "32 unique, 0 already present, 32 uploaded" in line_a
    assert f"32 unique, {32 - len(differ)} already present, {len(differ)} uploaded" in line_b
    objects = list((dest / "chunks").rglob("*.zst"))
    assert len(objects) == 32 + len(differ)

    dirs = CorfsDirs.under(tmp_path / "m")
    with CorfsMount(f"{web.url}pub/", dirs.cache, dirs.mnt, "--no-stream", log_dir=dirs.logs) as m:
        assert (m.mnt / "a.raw").read_bytes() == a.read_bytes()
        after_a = len(web.requests("/pub/chunks/"))
        assert live_status(m.mnt)["fetcher"]["bytes_fetched"] == 32 * CHUNK
        if wait_commit:
            time.sleep(1.5)  # past the commit interval
        assert (m.mnt / "b.raw").read_bytes() == b.read_bytes()
        fetcher = live_status(m.mnt)["fetcher"]
        assert fetcher["dedup_hits"] == 32 - len(differ)
        assert fetcher["bytes_fetched"] == (32 + len(differ)) * CHUNK
        b_gets = web.requests("/pub/chunks/")[after_a:]
        manifest_b = manifest_chunks(dest, "b.raw")
        assert sorted(uri.rsplit("/", 1)[1][:32] for uri, _, _ in b_gets) == sorted(
            manifest_b[i] for i in differ
        )
        m.stop()
    # Every chunk object was requested once on this host, across both images.
    uris = [uri for uri, _, _ in web.requests("/pub/chunks/")]
    assert len(uris) == len(set(uris)) == 32 + len(differ)


# ---- 4. publish CLI ------------------------------------------------------------------------

SUMMARY = re.compile(
    r"^(?P<name>\S+): (?P<total>\d+) chunks \((?P<zero>\d+) zero, (?P<unique>\d+) unique, "
    r"(?P<present>\d+) already present, (?P<uploaded>\d+) uploaded\), .* MB/s"
    r"(?P<unchanged>, manifest unchanged)? -> (?P<manifest>\S+)$"
)


def test_publish_cli_prints_summary_and_rerun_uploads_nothing(tmp_path: Path) -> None:
    a, b, differ = _two_images(tmp_path)
    dest = tmp_path / "dest"
    lines = publish(dest, a, b)
    assert len(lines) == 2
    first = [SUMMARY.match(line) for line in lines]
    assert all(first), lines
    assert [m["name"] for m in first] == ["a.raw", "b.raw"]
    assert int(first[1]["uploaded"]) == len(differ)
    assert first[0]["manifest"] == f"{dest}/a.raw.corfs.json"
    assert not first[0]["unchanged"]
    before = published_objects(dest)

    again = [SUMMARY.match(line) for line in publish(dest, a, b)]
    assert all(again)
    for m in again:
        assert m["uploaded"] == "0" and m["present"] == m["unique"] and m["unchanged"], m[0]
    assert published_objects(dest) == before  # nothing written, not even the index


# ---- 6. a bad manifest beside good images --------------------------------------------------


def test_bad_manifest_is_left_out_with_one_line_others_served(tmp_dirs) -> None:
    p = published_image(tmp_dirs, size=8 * CHUNK, zero=())
    raw = make_image(tmp_dirs.base / "raw.img", 5 * CHUNK + 123, seed=41)
    bad = tmp_dirs.base / "bad.raw.corfs.json"
    manifest = json.loads((tmp_dirs.base / "a.raw.corfs.json").read_text())
    manifest["name"] = "bad.raw"
    manifest["chunks"] = manifest["chunks"][:-1]  # one chunk short of its size
    bad.write_text(json.dumps(manifest))
    with tmp_dirs.mount("--no-stream") as m:
        assert sorted(os.listdir(m.mnt)) == ["a.raw", "raw.img"]
        named = [line for line in m.log_text().splitlines() if "bad.raw" in line]
        assert len(named) == 1, m.log_text()
        assert "leaving out" in named[0]
        assert (m.mnt / "a.raw").read_bytes() == p.want
        assert (m.mnt / "raw.img").read_bytes() == raw.read_bytes()
        m.stop()
