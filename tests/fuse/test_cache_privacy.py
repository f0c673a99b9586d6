"""Issue 10, item 1: the cache is its owner's alone. With `--allow-other --mode 600` another
user cannot read MNT/disk.raw, so it must not read the same bytes in CACHE/data/ either, nor
the base's identity in state.db. The other user here is `nobody` (uid 65534), run through
`setpriv`; a world-readable file beside CACHE shows that nobody does reach that far. Nor may
nobody redirect a running mount (CACHE is reached through the directory it opened) or have it
write through a link of theirs (no file in CACHE is opened through another user's link)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corfs.cache_files import write_small_file
from corfs.store import CacheStore, ChunkState
from tests.mounting import CorfsMount, is_mounted, lazy_unmount, make_image, run_corfs, sha256_file

from .util import MIB, assert_one_line_error

NOBODY = 65534

# Run as nobody with the system Python (stdlib only): "ok" or the errno name per attempt.
_READER = """
import errno, json, os, sys
result = {}
for kind, path in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        if kind == "list":
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
        result[path] = "ok"
    except OSError as exc:
        result[path] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(result))
"""


def as_nobody(lists: list[Path], reads: list[Path]) -> dict[str, str]:
    """What user nobody gets from listing `lists` and reading `reads`: path -> "ok" / errno."""
    args = [arg for p in lists for arg in ("list", str(p))]
    args += [arg for p in reads for arg in ("read", str(p))]
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        + ["/usr/bin/python3", "-c", _READER, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp dirs are 0700: nobody would be kept
    out by them, not by corfs), with a world-readable control file in it."""
    root = Path(tempfile.mkdtemp(prefix="corfs-privacy-", dir="/tmp"))
    try:
        root.chmod(0o755)
        control = root / "control.txt"
        control.write_text("anyone may read this")
        control.chmod(0o644)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cache_entries(cache: Path) -> dict[str, int]:
    """relative path -> permission bits of CACHE and everything in it."""
    found = {".": stat.S_IMODE(cache.lstat().st_mode)}
    for top, dirs, files in os.walk(cache):
        for name in dirs + files:
            path = Path(top) / name
            found[str(path.relative_to(cache))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(cache: Path, shared: Path) -> None:
    entries = cache_entries(cache)
    loose = {path: f"{mode:04o}" for path, mode in entries.items() if mode & 0o077}
    assert not loose, f"open to other users: {loose}"
    data_files = sorted((cache / "data").iterdir())
    assert data_files
    got = as_nobody(
        [cache, cache / "data"], [cache / "state.db", *data_files, shared / "control.txt"]
    )
    assert got.pop(str(shared / "control.txt")) == "ok"  # nobody does get this far
    assert set(got.values()) == {"EACCES"}, got


def test_new_cache_is_private_to_its_owner(tmp_path: Path, shared_dir: Path) -> None:
    base, mnt, cache = tmp_path / "base", tmp_path / "mnt", shared_dir / "cache"
    base.mkdir()
    mnt.mkdir()
    make_image(base / "disk.raw", 2 * MIB, seed=3)
    opts = ("--allow-other", "--mode", "600", "--no-stream", "--record-trace")
    with CorfsMount(base, cache, mnt, *opts, log_dir=tmp_path) as m:
        assert sha256_file(m.mnt / "disk.raw") == sha256_file(base / "disk.raw")
        entries = cache_entries(cache)
        # every kind of file a live mount keeps in CACHE is there, and checked
        for name in ("corfs.lock", "state.db", "state.db-wal", "state.db-shm", "mountpoint"):
            assert name in entries, sorted(entries)
        assert_private(cache, shared_dir)
        m.stop()
    assert "trace.json" in cache_entries(cache)
    assert_private(cache, shared_dir)


def test_a_new_empty_cache_made_with_mkdir_is_made_private_without_a_warning(
    tmp_path: Path, shared_dir: Path
) -> None:
    """`mkdir CACHE` makes it 0755: the first mount makes it private, and says so without the
    warning an old cache gets (nobody could have opened a file in an empty directory; the
    warning came first on stderr at every first mount, walkthrough)."""
    base, mnt, cache = tmp_path / "base", tmp_path / "mnt", shared_dir / "cache"
    base.mkdir()
    mnt.mkdir()
    cache.mkdir(mode=0o755)
    cache.chmod(0o755)
    make_image(base / "disk.raw", 2 * MIB, seed=5)
    with CorfsMount(base, cache, mnt, "--no-stream", log_dir=tmp_path) as m:
        assert_private(cache, shared_dir)
        m.stop()
    assert "open to other users" not in m.log_text(), m.log_text()


def test_old_world_readable_cache_is_tightened_at_mount(
    tmp_path: Path, shared_dir: Path
) -> None:
    base, mnt, cache = tmp_path / "base", tmp_path / "mnt", shared_dir / "cache"
    base.mkdir()
    mnt.mkdir()
    make_image(base / "disk.raw", 2 * MIB, seed=4)
    with CorfsMount(base, cache, mnt, "--no-stream", log_dir=tmp_path) as m:
        (m.mnt / "disk.raw").read_bytes()
        m.stop()
    # What an older corfs (or a copy with a loose umask) left: dirs 0755, files 0644.
    for path in [cache, *cache.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    data_file = next((cache / "data").iterdir())
    assert as_nobody([cache], [data_file]) == {str(cache): "ok", str(data_file): "ok"}

    with CorfsMount(base, cache, mnt, "--no-stream", log_dir=tmp_path) as m:
        assert_private(cache, shared_dir)
        m.stop()
        tightened = [line for line in m.log_text().splitlines() if "private to its owner" in line]
    assert len(tightened) == 1, m.log_text()
    assert "state.db 0644->0600" in tightened[0] and "data/ 0755->0700" in tightened[0]
    assert sha256_file(base / "disk.raw") == sha256_file(data_file)  # nothing lost


def test_library_caller_with_a_loose_umask_still_gets_a_private_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old = os.umask(0)  # as loose as it gets: modes are the ones corfs asks for
    try:
        store = CacheStore.open(str(cache))
        try:
            store.create_image("disk.raw", 1 * MIB, 64 << 10, "id", "base")
            store.write_data("disk.raw", 0, b"guest bytes")
            store.record("disk.raw", 0, ChunkState.DIRTY)
            store.commit_sync()
            write_small_file(str(cache), "mountpoint", "/somewhere\n")
            entries = cache_entries(cache)
        finally:
            store.close()
    finally:
        os.umask(old)
    assert {"state.db-wal", "data/disk.raw", "corfs.lock", "mountpoint"} <= set(entries)
    loose = {path: f"{mode:04o}" for path, mode in entries.items() if mode & 0o077}
    assert not loose, f"open to other users: {loose}"


def test_a_cache_named_through_a_symlink_is_tightened_too(tmp_path: Path, shared_dir: Path) -> None:
    """CACHE given as a symbolic link to the user's directory (a cache kept on another disk):
    the directory it names must end up 0700 like any cache, not keep its 0755."""
    base, mnt, real = tmp_path / "base", tmp_path / "mnt", shared_dir / "real-cache"
    base.mkdir()
    mnt.mkdir()
    real.mkdir()
    real.chmod(0o755)
    (shared_dir / "cache").symlink_to(real)
    make_image(base / "disk.raw", 2 * MIB, seed=5)
    with CorfsMount(base, shared_dir / "cache", mnt, "--no-stream", log_dir=tmp_path) as m:
        (m.mnt / "disk.raw").read_bytes()
        assert_private(real, shared_dir)
        m.stop()


def as_nobody_run(*command: str) -> None:
    subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
        check=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    "planted", ["mountpoint.tmp", "corfs.lock", "data-dir", "state.db", "corfs.log"]
)
def test_what_another_user_planted_in_a_loose_cache_is_refused(
    tmp_path: Path, shared_dir: Path, planted: str
) -> None:
    """A cache left open to others (0777) in which user nobody planted a symbolic link to a
    file of the mounting user's, or a directory or database of its own. The symlink's target
    was truncated and overwritten with the mountpoint (mountpoint.tmp); nobody's data/ or
    state.db took the guest's bytes and chunk states, which nobody (their owner) could
    replace for the next mount. corfs.log: `--log-file CACHE/corfs.log` (a log may live in
    CACHE) is opened before CACHE is checked, and the refusal was appended to the user's file
    through the link. Refused in one line; the user's file is intact."""
    base, mnt, cache = tmp_path / "base", tmp_path / "mnt", shared_dir / "cache"
    base.mkdir()
    mnt.mkdir()
    make_image(base / "disk.raw", 2 * MIB, seed=6)
    cache.mkdir()
    cache.chmod(0o777)
    victim = shared_dir / "victim.txt"
    victim.write_text("the user's own file\n")
    if planted == "data-dir":
        as_nobody_run("mkdir", "-m", "700", str(cache / "data"))
    elif planted == "state.db":
        as_nobody_run("sh", "-c", f"umask 077; : > {cache / 'state.db'}")
    else:
        as_nobody_run("ln", "-s", str(victim), str(cache / planted))
    log = ("--log-file", cache / planted) if planted == "corfs.log" else ()
    try:
        result = run_corfs(
            "mount", base, cache, mnt, "--no-stream", "--daemon", *log, timeout=20
        )
    finally:
        lazy_unmount(mnt)
    assert_one_line_error(result, {
        "corfs.lock": "is a symbolic link", "corfs.log": "is a symbolic link of uid 65534's"
    }.get(planted, "belongs to uid 65534"))
    assert victim.read_text() == "the user's own file\n"
    assert not is_mounted(mnt)


@pytest.fixture
def sticky_dir() -> Iterator[Path]:
    """A directory like /tmp: everyone may create names in it (sticky: only their own may be
    removed). pytest's tmp dirs are 0700, which would keep nobody out by themselves."""
    root = Path(tempfile.mkdtemp(prefix="corfs-isolation-", dir="/tmp"))
    try:
        root.chmod(0o1777)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_cache_named_through_another_users_symlink_cannot_be_redirected(
    tmp_path: Path, sticky_dir: Path
) -> None:
    """CACHE named through a symbolic link that another user owns (planted in a shared
    directory before the user mounted; it names an empty directory of the user's, so every
    check at mount passes: the directory it names is the user's alone). The link stays its
    planter's: once the mount runs, nobody points it at a directory of theirs whose
    data/disk.raw is a symbolic link to a file of the mounting user's. The data file was
    opened at mount, but the descriptor for direct stores is opened later, by path
    (DataFile._way_of: os.open(self.path, O_WRONLY | O_DIRECT), no O_NOFOLLOW), through
    the re-pointed link: the first whole chunk fetched was written into the user's file.
    (A parent directory of CACHE that another user owns does the same: they rename CACHE
    away and put their own directory in its place.) The cache must not be reached again
    through a name another user controls once it was checked; nor is what the mount writes
    at its end (--record-trace's trace.json) written into nobody's directory."""
    base, mnt = tmp_path / "base", tmp_path / "mnt"
    base.mkdir()
    mnt.mkdir()
    make_image(base / "disk.raw", 2 * MIB, seed=11)
    real = sticky_dir / "users-empty-dir"  # the user's: root's, empty
    real.mkdir(mode=0o700)
    victim = sticky_dir / "victim.txt"  # a file of the mounting user's
    victim.write_text("the user's own file\n")
    victim.chmod(0o644)
    cache = sticky_dir / "cache"
    as_nobody_run("ln", "-s", str(real), str(cache))
    evil = sticky_dir / "nobodys"
    as_nobody_run("mkdir", "-p", "-m", "777", str(evil / "data"))
    as_nobody_run("ln", "-s", str(victim), str(evil / "data" / "disk.raw"))

    with CorfsMount(base, cache, mnt, "--no-stream", "--record-trace", log_dir=tmp_path) as m:
        # nobody re-points the link it owns (allowed in a sticky directory: it is its own)
        as_nobody_run("ln", "-sfn", str(evil), str(cache))
        with contextlib.suppress(OSError):  # refusing the read is fine, writing the file not
            (m.mnt / "disk.raw").read_bytes()
        m.stop()
    assert victim.read_bytes() == b"the user's own file\n", "the user's file was written"
    assert sorted(os.listdir(evil)) == ["data"], "the mount wrote into nobody's directory"
    assert (real / "trace.json").exists()


def test_a_log_file_through_the_users_own_link_is_followed(tmp_path: Path) -> None:
    """The user's own link (a log moved to another disk, /dev/stderr) is followed: what the
    mount says reaches the file it points to."""
    target = tmp_path / "elsewhere.log"
    link = tmp_path / "corfs.log"
    link.symlink_to(target)
    (tmp_path / "cache").mkdir(mode=0o700)
    (tmp_path / "mnt").mkdir()
    result = run_corfs(
        "mount", tmp_path / "no-such-base", tmp_path / "cache", tmp_path / "mnt", "--daemon",
        "--log-file", link, timeout=20,
    )
    assert result.returncode != 0
    assert "no-such-base" in target.read_text()
    assert link.is_symlink()
