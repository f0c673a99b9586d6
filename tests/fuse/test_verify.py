"""`corfs verify CACHE [IMAGE]` (issue 5, point 5): re-read clean local chunks, check their
digests, mark bad ones absent so they are fetched again, and report (exit 1 if any was bad).

- unmounted cache: bytes damaged in CACHE/data/<name> are found, their rows are gone, and a
  later mount refetches them and serves the right bytes;
- mounted image, without stopping it: verify reaches the daemon through the control xattr
  ("forget"); the chunk is absent in status, and a read, even a buffered one whose pages the
  kernel had cached (keep_cache), refetches it.
- base image removed (issue 10, point 4): a bad chunk may be the only copy left; it is kept
  and reported bad, mounted or not, and verify exits non-zero.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.fuse.test_published_mount import object_path, published_image
from tests.fuse.util import (
    assert_one_line_error,
    direct_read,
    direct_write,
    drop_caches,
    image_status,
    live_status,
    wait_complete,
    wait_for,
    wait_stored,
)
from tests.mounting import (
    REPO_ROOT,
    CorfsDirs,
    corfs_command,
    corfs_env,
    make_image,
    run_corfs,
)

KIB = 1 << 10
CHUNK = 64 * KIB
COUNT = 16
ZERO = (2, 3)


def chunk_rows(cache: Path, name: str) -> dict[int, int]:
    db = sqlite3.connect(f"file:{cache / 'state.db'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT idx, state FROM chunks WHERE image = ?", (name,)))
    finally:
        db.close()


def damage(path: Path, offset: int, length: int = 16) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, length, offset)
        os.pwrite(fd, bytes(b ^ 0x5A for b in old), offset)
    finally:
        os.close(fd)


def cached_then_damaged(dirs: CorfsDirs, *, seed: int, at: int) -> None:
    """a.raw of 4 chunks read whole through a mount (all stored), then the mount stopped and
    its data file damaged at byte `at`."""
    size = 4 * CHUNK
    make_image(dirs.base / "a.raw", size, seed=seed, block_size=CHUNK)
    with dirs.mount("--no-stream", "--chunk-size", "64K") as m:
        (m.mnt / "a.raw").read_bytes()
        wait_stored(m.mnt, "a.raw", size)
        m.stop()
    damage(dirs.cache / "data" / "a.raw", at)


def publish_into(tmp_dirs) -> bytes:
    src = tmp_dirs.base.parent / "src"
    src.mkdir()
    image = make_image(src / "a.raw", COUNT * CHUNK, seed=7, zero_blocks=ZERO, block_size=CHUNK)
    result = run_corfs("publish", image, tmp_dirs.base, "--chunk-size", "64K", "--no-progress")
    assert result.returncode == 0, result.stderr
    return image.read_bytes()


def verify(*args: object) -> tuple[int, dict]:
    result = run_corfs("verify", *args, "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_verify_unmounted_cache_forgets_bad_chunks_and_a_mount_refetches(tmp_dirs) -> None:
    want = publish_into(tmp_dirs)
    with tmp_dirs.mount() as m:
        wait_complete(m.mnt, "a.raw")
        m.stop()
    data = tmp_dirs.cache / "data" / "a.raw"
    assert verify(tmp_dirs.cache) == (
        0,
        {
            "images": [
                {
                    "image": "a.raw", "checked": COUNT, "bad": 0, "bad_chunks": [], "kept": None,
                    "error": None,
                }
            ]
        },
    )
    damage(data, 7 * CHUNK + 100)
    damage(data, 3 * CHUNK + 9)  # a zero chunk (a hole) that now holds bytes

    text = run_corfs("verify", tmp_dirs.cache)
    assert text.returncode == 1
    assert (
        text.stdout.strip() == f"a.raw: {COUNT} local chunks checked, 2 bad, marked absent: [3, 7]"
    )
    rows = chunk_rows(tmp_dirs.cache, "a.raw")
    assert 3 not in rows and 7 not in rows and len(rows) == COUNT - 2
    assert verify(tmp_dirs.cache, "a.raw")[0] == 0  # the rest is good
    missing = run_corfs("verify", tmp_dirs.cache, "nope.raw")
    assert missing.returncode != 0 and "nope.raw" in missing.stderr

    with tmp_dirs.mount("--no-stream") as m:
        st = image_status(live_status(m.mnt), "a.raw")
        assert st["local_bytes"] == (COUNT - 2) * CHUNK
        drop_caches()
        assert (m.mnt / "a.raw").read_bytes() == want
        fetcher = live_status(m.mnt)["fetcher"]
        assert fetcher["bytes_fetched"] == CHUNK  # chunk 7 only: chunk 3 is zero, never fetched
        m.stop()
    assert data.read_bytes() == want
    assert verify(tmp_dirs.cache)[0] == 0


def test_verify_mounted_image_forgets_through_the_daemon_and_kernel_cache(tmp_dirs) -> None:
    want = publish_into(tmp_dirs)
    bad = 9
    with tmp_dirs.mount("--no-stream") as m:
        image = m.mnt / "a.raw"
        assert image.read_bytes() == want
        time.sleep(1.5)  # committed: verify checks committed chunks
        data = tmp_dirs.cache / "data" / "a.raw"
        damage(data, bad * CHUNK + 4 * KIB)
        # The cache cannot know yet: the daemon serves what its data file holds, and the
        # kernel keeps those (bad) pages for later buffered reads.
        drop_caches()
        with open(image, "rb") as f:
            f.seek(bad * CHUNK)
            served = f.read(CHUNK)
        assert served != want[bad * CHUNK : (bad + 1) * CHUNK]

        code, report = verify(tmp_dirs.cache)
        assert code == 1
        assert report["images"][0]["bad_chunks"] == [bad]
        st = live_status(m.mnt)
        assert image_status(st, "a.raw")["local_bytes"] == (COUNT - 1) * CHUNK
        assert st["fetcher"]["bytes_fetched"] == (COUNT - len(ZERO)) * CHUNK

        # Buffered, without dropping caches: the kernel must not serve its stale pages.
        with open(image, "rb") as f:
            f.seek(bad * CHUNK)
            assert f.read(CHUNK) == want[bad * CHUNK : (bad + 1) * CHUNK]
        assert direct_read(image, bad * CHUNK, CHUNK) == want[bad * CHUNK : (bad + 1) * CHUNK]
        st = wait_stored(m.mnt, "a.raw", COUNT * CHUNK)
        assert st["fetcher"]["bytes_fetched"] == (COUNT - len(ZERO) + 1) * CHUNK
        time.sleep(1.5)
        assert verify(tmp_dirs.cache, "a.raw")[0] == 0
        m.stop()


def test_verify_keeps_bad_chunks_whose_base_image_is_gone(tmp_dirs) -> None:
    size = 8 * CHUNK
    want = make_image(tmp_dirs.base / "b.raw", size, seed=11, block_size=CHUNK).read_bytes()
    data = tmp_dirs.cache / "data" / "b.raw"
    with tmp_dirs.mount("--chunk-size", "64K") as m:
        wait_complete(m.mnt, "b.raw")
        m.stop()
    (tmp_dirs.base / "b.raw").unlink()
    damage(data, 5 * CHUNK + 3)
    damaged = data.read_bytes()

    code, report = verify(tmp_dirs.cache)
    (image,) = report["images"]
    assert code == 1
    assert (image["bad"], image["bad_chunks"]) == (1, [5])
    assert "not in the base" in image["kept"]
    assert len(chunk_rows(tmp_dirs.cache, "b.raw")) == 8  # nothing forgotten
    text = run_corfs("verify", tmp_dirs.cache)
    assert text.returncode == 1 and "1 bad, kept (the base cannot supply them)" in text.stdout

    # Mounted, served from the cache alone: the daemon refuses the forget itself.
    with tmp_dirs.mount("--chunk-size", "64K", "--no-stream") as m:
        code, report = verify(tmp_dirs.cache)
        (image,) = report["images"]
        assert code == 1 and image["bad_chunks"] == [5]
        assert "cannot supply" in image["kept"]
        st = image_status(live_status(m.mnt), "b.raw")
        assert st["local_bytes"] == size
        m.stop()
    assert "not forgetting chunks of b.raw" in m.log_text()
    assert data.read_bytes() == damaged
    assert len(chunk_rows(tmp_dirs.cache, "b.raw")) == 8
    assert want != damaged


def test_verify_forgets_a_bad_chunk_while_the_dir_base_still_has_it(tmp_dirs) -> None:
    size = 8 * CHUNK
    want = make_image(tmp_dirs.base / "b.raw", size, seed=12, block_size=CHUNK).read_bytes()
    data = tmp_dirs.cache / "data" / "b.raw"
    with tmp_dirs.mount("--chunk-size", "64K") as m:
        wait_complete(m.mnt, "b.raw")
        time.sleep(1.5)  # committed: verify checks committed chunks
        damage(data, 2 * CHUNK + 3)
        code, report = verify(tmp_dirs.cache)
        assert code == 1 and report["images"][0]["bad_chunks"] == [2]
        assert report["images"][0]["kept"] is None
        assert (m.mnt / "b.raw").read_bytes() == want
        m.stop()
    damage(data, 6 * CHUNK + 3)
    code, report = verify(tmp_dirs.cache)
    assert code == 1 and report["images"][0]["kept"] is None
    assert 6 not in chunk_rows(tmp_dirs.cache, "b.raw")


# A verify whose scan is slow (a large image, a slow disk): a sitecustomize on its PYTHONPATH
# holds its read of chunk 0 until the test has written (and says when it holds it).
_SLOW_SCAN = """
import os, time
from corfs import scrub
_real = scrub.pread_full
def _slow(fd, length, offset):
    if offset == 0:
        open(os.environ["CORFS_TEST_SCANNING"], "w").close()
        while not os.path.exists(os.environ["CORFS_TEST_GO_ON"]):
            time.sleep(0.05)
    return _real(fd, length, offset)
scrub.pread_full = _slow
"""


def test_verify_of_a_mounted_cache_does_not_call_a_chunk_written_meanwhile_bad(
    tmp_dirs, tmp_path: Path
) -> None:
    """A guest writes a clean chunk while verify scans (its states were read before): the new
    bytes differ from the recorded digest, but the chunk is dirty now, not bad. Verify must
    not report it bad nor exit 1 (the daemon rightly keeps it: "marked absent" was a lie)."""
    size = 8 * CHUNK
    want = make_image(tmp_dirs.base / "b.raw", size, seed=13, block_size=CHUNK).read_bytes()
    written = b"w" * (4 * KIB)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SLOW_SCAN)
    scanning, go_on = tmp_path / "scanning", tmp_path / "go-on"
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64K") as m:
        image = m.mnt / "b.raw"
        assert image.read_bytes() == want
        wait_stored(m.mnt, "b.raw", size)
        fd = os.open(image, os.O_RDONLY)
        try:
            os.fsync(fd)  # committed: every chunk is clean in the database
        finally:
            os.close(fd)
        assert set(chunk_rows(tmp_dirs.cache, "b.raw").values()) == {1}
        env = {"PYTHONPATH": f"{hook}:{REPO_ROOT}", "CORFS_TEST_SCANNING": str(scanning),
               "CORFS_TEST_GO_ON": str(go_on)}
        proc = subprocess.Popen(
            corfs_command("verify", tmp_dirs.cache, "--json"), env=corfs_env(env),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            wait_for(scanning.exists, what="verify to scan")  # its states say all clean
            direct_write(image, 5 * CHUNK, written)
        finally:
            go_on.touch()
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        report = json.loads(out)["images"][0]
        assert (proc.returncode, report["bad_chunks"]) == (0, []), report
        assert direct_read(image, 5 * CHUNK, len(written)) == written
        m.stop()


def test_verify_takes_a_chunk_its_disk_cannot_read_for_bad(tmp_path: Path) -> None:
    """A chunk of the data file whose read fails (EIO: a bad sector) is the very thing verify
    looks for: reported bad and forgotten (a refill rewrites it), the other chunks checked;
    never a traceback. The failing disk: a file of another corfs mount bound over the data
    file (not a symbolic link: none is followed in CACHE), a published copy of the same bytes
    whose chunk object BAD is gone (reading it: EIO)."""
    bad = 5
    disk = CorfsDirs.under(tmp_path / "disk")
    p = published_image(disk, size=8 * CHUNK, zero=())
    object_path(disk.base, p.digests[bad]).unlink()
    dirs = CorfsDirs.under(tmp_path / "cached")
    shutil.copy(p.src, dirs.base / "a.raw")
    with dirs.mount("--no-stream", "--chunk-size", "64K") as m:
        assert (m.mnt / "a.raw").read_bytes() == p.want
        wait_stored(m.mnt, "a.raw", 8 * CHUNK)
        m.stop()
    assert len(chunk_rows(dirs.cache, "a.raw")) == 8
    with disk.mount("--no-stream") as failing:
        data = dirs.cache / "data" / "a.raw"
        subprocess.run(["mount", "--bind", failing.mnt / "a.raw", data], check=True)
        try:
            code, report = verify(dirs.cache)
        finally:
            subprocess.run(["umount", data], check=True)
        assert code == 1
        (image,) = report["images"]
        assert (image["checked"], image["bad_chunks"], image["kept"]) == (8, [bad], None)
        assert sorted(chunk_rows(dirs.cache, "a.raw")) == [0, 1, 2, 3, 4, 6, 7]
        failing.stop()


def test_verify_takes_zero_chunks_cut_off_the_data_file_for_bad(tmp_dirs) -> None:
    """A data file cut short (a damaged file system, a careless copy): its zero chunks past
    the end read back as nothing at all, which is not CHUNK zero bytes."""
    size = 8 * CHUNK
    make_image(tmp_dirs.base / "z.raw", size, seed=14, zero_blocks=(6, 7), block_size=CHUNK)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64K") as m:
        (m.mnt / "z.raw").read_bytes()
        wait_stored(m.mnt, "z.raw", size)
        m.stop()
    assert chunk_rows(tmp_dirs.cache, "z.raw")[7] == 2  # zero
    os.truncate(tmp_dirs.cache / "data" / "z.raw", 6 * CHUNK)
    code, report = verify(tmp_dirs.cache)
    assert (code, report["images"][0]["bad_chunks"]) == (1, [6, 7])
    assert sorted(chunk_rows(tmp_dirs.cache, "z.raw")) == [0, 1, 2, 3, 4, 5]


def test_an_image_whose_data_file_is_gone_fails_only_itself(tmp_dirs) -> None:
    """verify of a whole cache: one image it cannot check (its data file removed) is reported
    as such, and the others are still checked (and their bad chunks found)."""
    size = 4 * CHUNK
    for seed, name in enumerate(("a.raw", "b.raw")):
        make_image(tmp_dirs.base / name, size, seed=20 + seed, block_size=CHUNK)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64K") as m:
        for name in ("a.raw", "b.raw"):
            (m.mnt / name).read_bytes()
            wait_stored(m.mnt, name, size)
        m.stop()
    (tmp_dirs.cache / "data" / "a.raw").unlink()
    damage(tmp_dirs.cache / "data" / "b.raw", 2 * CHUNK + 9)
    result = run_corfs("verify", tmp_dirs.cache, "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    reports = {r["image"]: r for r in json.loads(result.stdout)["images"]}
    assert "missing" in reports["a.raw"]["error"] and reports["a.raw"]["checked"] == 0
    assert (reports["b.raw"]["bad_chunks"], reports["b.raw"]["error"]) == ([2], None)
    text = run_corfs("verify", tmp_dirs.cache)
    assert text.returncode == 1 and "a.raw: not checked:" in text.stdout, text


def test_verify_while_another_command_holds_the_cache_says_so(tmp_dirs) -> None:
    """The cache's lock held by a corfs process that is no mount (another verify, a detach):
    verify took it for a mount and sent its forgets to "" (\"corfs:  does not exist\")."""
    cached_then_damaged(tmp_dirs, seed=22, at=CHUNK + 5)
    rows = chunk_rows(tmp_dirs.cache, "a.raw")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom corfs.store import CacheStore\n"
         "CacheStore.open(sys.argv[1], create=False)\nprint('locked', flush=True)\n"
         "time.sleep(60)", str(tmp_dirs.cache)],
        env=corfs_env(), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        result = run_corfs("verify", tmp_dirs.cache)
    finally:
        holder.kill()
        holder.wait()
    assert_one_line_error(result, "in use by another corfs command")
    assert chunk_rows(tmp_dirs.cache, "a.raw") == rows


def test_verify_escapes_the_reasons_it_prints(tmp_path: Path) -> None:
    """Why verify kept bad chunks quotes the base's path (here: it cannot be opened), and a
    path may hold control characters: its ESC [31m is printed escaped, not sent to the
    terminal."""
    dirs = CorfsDirs.under(tmp_path / "evil\x1b[31m")
    cached_then_damaged(dirs, seed=30, at=CHUNK + 9)
    dirs.base.rename(tmp_path / "moved")
    text = run_corfs("verify", dirs.cache)
    assert text.returncode == 1 and "Traceback" not in text.stderr, text
    assert "\x1b" not in text.stdout + text.stderr, text
    assert "evil\\x1b[31m/base cannot be opened" in text.stdout, text
