"""DEST/.corfs-tmp, where `corfs publish` into a directory writes its temp files, takes the lock
of index.json and removes the temp files of killed runs (older than an hour), must be the
publisher's own directory. DEST may be a directory others can write (a shared web root, a
directory under /tmp): one of them could put a link there to a directory of the user's, whose
files older than an hour the next publish removed, or a directory of theirs, where they could
swap a temp file before its rename."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.fuse.util import assert_one_line_error
from tests.mounting import make_image, run_corfs

KIB = 1 << 10
NOBODY = 65534
HOURS_AGO = time.time() - 3 * 3600


def _shared_dest(tmp_path: Path) -> Path:
    dest = tmp_path / "shared"
    dest.mkdir()
    dest.chmod(0o1777)  # as /tmp: anyone may add a name
    return dest


def test_a_link_in_place_of_the_temp_dir_is_refused_and_what_it_points_at_kept(
    tmp_path: Path,
) -> None:
    dest = _shared_dest(tmp_path)
    victim = tmp_path / "documents"
    victim.mkdir()
    old = victim / "thesis.tex"
    old.write_text("years of work")
    os.utime(old, (HOURS_AGO, HOURS_AGO))
    (dest / ".corfs-tmp").symlink_to(victim)
    os.lchown(dest / ".corfs-tmp", NOBODY, NOBODY)
    image = make_image(tmp_path / "a.raw", 64 * KIB, seed=1)

    result = run_corfs("publish", image, dest, "--chunk-size", "16K", "--no-progress")

    assert_one_line_error(result, ".corfs-tmp")
    assert result.returncode == 2
    assert old.read_text() == "years of work"
    assert sorted(os.listdir(victim)) == ["thesis.tex"]  # no temp file, lock or probe either
    assert not (dest / "chunks").exists()


@pytest.mark.parametrize(
    ("owner", "mode", "said"),
    [(NOBODY, 0o700, "another user"), (0, 0o777, "written by other users")],
    ids=["theirs", "open-to-all"],
)
def test_a_temp_dir_another_user_may_write_is_refused(
    tmp_path: Path, owner: int, mode: int, said: str
) -> None:
    """Theirs (root may write it, as the publisher: only the owner check refuses it), or the
    user's own but open to all."""
    dest = _shared_dest(tmp_path)
    theirs = dest / ".corfs-tmp"
    theirs.mkdir()
    os.chown(theirs, owner, owner)
    theirs.chmod(mode)
    image = make_image(tmp_path / "a.raw", 64 * KIB, seed=2)

    result = run_corfs("publish", image, dest, "--chunk-size", "16K", "--no-progress")

    assert_one_line_error(result, ".corfs-tmp", said)
    assert result.returncode == 2
    assert os.listdir(theirs) == []
    assert not (dest / "chunks").exists()


def test_the_users_own_temp_dir_is_used_and_stale_temp_files_removed(tmp_path: Path) -> None:
    """The rule above refuses nothing of a normal DEST: a second publish into it works and
    still removes what a killed run left."""
    dest = tmp_path / "dest"
    first = make_image(tmp_path / "a.raw", 64 * KIB, seed=3)
    assert run_corfs("publish", first, dest, "--chunk-size", "16K", "--no-progress").returncode == 0
    stale = dest / ".corfs-tmp" / ("0123" * 8 + ".tmp")  # a uuid4 hex, as a run names them
    stale.write_bytes(b"half an object")
    os.utime(stale, (HOURS_AGO, HOURS_AGO))
    second = make_image(tmp_path / "b.raw", 64 * KIB, seed=4)

    result = run_corfs("publish", second, dest, "--chunk-size", "16K", "--no-progress")

    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert sorted(os.listdir(dest / ".corfs-tmp")) == ["index.lock"]
    assert (dest / "b.raw.corfs.json").exists()


def test_only_temp_files_of_killed_runs_are_removed_from_the_temp_dir(tmp_path: Path) -> None:
    """Review: where DEST may be written by others but is not sticky, one could rename the
    user's temp dir away and a directory of the user's into its place: its files older than
    an hour went as stale temp files."""
    dest = tmp_path / "dest"
    dest.mkdir()
    docs = dest / ".corfs-tmp"  # the user's own directory, where the temp dir was
    docs.mkdir(mode=0o700)
    report = docs / "report.txt"
    report.write_text("quarterly")
    stale = docs / ("ab" * 16 + ".tmp")
    stale.write_bytes(b"half an object")
    for path in (report, stale):
        os.utime(path, (HOURS_AGO, HOURS_AGO))
    image = make_image(tmp_path / "a.raw", 64 * KIB, seed=5)

    result = run_corfs("publish", image, dest, "--chunk-size", "16K", "--no-progress")

    assert result.returncode == 0, result.stderr
    assert report.read_text() == "quarterly"
    assert not stale.exists()


def test_a_link_in_place_of_a_key_directory_is_refused_and_nothing_written_there(
    tmp_path: Path,
) -> None:
    """Review: DEST/chunks planted as a link took every object (and the mode of each new
    directory) wherever it pointed."""
    dest = _shared_dest(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (dest / "chunks").symlink_to(elsewhere)
    os.lchown(dest / "chunks", NOBODY, NOBODY)
    image = make_image(tmp_path / "a.raw", 64 * KIB, seed=6)

    result = run_corfs("publish", image, dest, "--chunk-size", "16K", "--no-progress")

    assert_one_line_error(result, "chunks", "is a link")
    assert result.returncode != 0
    assert os.listdir(elsewhere) == []
    assert not (dest / "a.raw.corfs.json").exists()


def test_objects_behind_a_link_are_not_taken_as_published(tmp_path: Path) -> None:
    """Review: a link at DEST/chunks to a directory already holding the image's objects
    made them count as there (read by path), so nothing was written and the refusal never
    came: the manifest named objects only the link's owner kept."""
    image = make_image(tmp_path / "a.raw", 64 * KIB, seed=7)
    theirs = tmp_path / "theirs"
    assert run_corfs("publish", image, theirs, "--chunk-size", "16K",
                     "--no-progress").returncode == 0
    dest = _shared_dest(tmp_path)
    (dest / "chunks").symlink_to(theirs / "chunks")
    os.lchown(dest / "chunks", NOBODY, NOBODY)

    result = run_corfs("publish", image, dest, "--chunk-size", "16K", "--no-progress")

    assert_one_line_error(result, "chunks", "is a link")
    assert not (dest / "a.raw.corfs.json").exists()
