"""Isolation of a cache from other local users, beyond what test_cache_privacy checks: the
cache's files must stay where the mount checked them for the whole mount, and no file in
CACHE is opened through a symbolic link (README, Security). The other user is `nobody`
(uid 65534), run through `setpriv`."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import CorfsMount, lazy_unmount, make_image, run_corfs

from .util import MIB

NOBODY = 65534


def as_nobody_run(*command: str) -> None:
    subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
        check=True,
        timeout=30,
    )


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
    through a name another user controls once it was checked."""
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

    with CorfsMount(base, cache, mnt, "--no-stream", log_dir=tmp_path) as m:
        # nobody re-points the link it owns (allowed in a sticky directory: it is its own)
        as_nobody_run("ln", "-sfn", str(evil), str(cache))
        with contextlib.suppress(OSError):  # refusing the read is fine, writing the file not
            (m.mnt / "disk.raw").read_bytes()
        m.stop()
    assert victim.read_bytes() == b"the user's own file\n", "the user's file was written"


def test_a_log_file_in_cache_is_not_opened_through_another_users_symlink(
    tmp_path: Path, sticky_dir: Path
) -> None:
    """`--log-file CACHE/corfs.log` (check_new_cache lets a log live in CACHE) in a cache left
    open to others (0777), where user nobody planted corfs.log as a symbolic link to a file of
    the mounting user's. The mount is refused, rightly; but the log was opened before CACHE
    was checked, through the link, and the refusal was appended to the user's file. README:
    no file in CACHE is opened through a symbolic link."""
    base, mnt, cache = tmp_path / "base", tmp_path / "mnt", sticky_dir / "cache"
    base.mkdir()
    mnt.mkdir()
    make_image(base / "disk.raw", 1 * MIB, seed=13)
    cache.mkdir()
    cache.chmod(0o777)
    victim = sticky_dir / "victim.txt"
    victim.write_text("the user's own file\n")
    as_nobody_run("ln", "-s", str(victim), str(cache / "corfs.log"))
    try:
        result = run_corfs(
            "mount", base, cache, mnt, "--no-stream", "--daemon",
            "--log-file", cache / "corfs.log", timeout=20,
        )
    finally:
        lazy_unmount(mnt)
    assert result.returncode != 0, result.stderr
    assert victim.read_text() == "the user's own file\n"


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
