"""CACHE's directories are made durable in their parents when created (cache_layout
.ensure_private_dir): the data file names were synced in CACHE/data, but CACHE/data itself
(and CACHE, and state.db's name) were not, so a power cut on a file system that does not
order directory operations (ext2) could take them away under chunks recorded local. The
real fsync runs; the spy records which directories it synced."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import pytest

from corfs import cache_layout, durable, store
from corfs.errors import UsageError
from corfs.store import CacheStore
from tests.mounting import REPO_ROOT


def test_a_new_cache_syncs_every_directory_it_adds_a_name_to(tmp_path, monkeypatch) -> None:
    synced: list[str] = []
    real = durable.fsync_dir

    def spy(path: str) -> None:
        synced.append(os.path.realpath(path))  # CACHE is synced through its held path
        real(path)

    monkeypatch.setattr(cache_layout, "fsync_dir", spy)
    monkeypatch.setattr(store, "fsync_dir", spy)
    cache = tmp_path / "a" / "b" / "cache"
    CacheStore.open(str(cache), lock=False, create=True).close()
    for name in (tmp_path, tmp_path / "a", tmp_path / "a" / "b", cache):
        assert str(name) in synced, (name, synced)  # a name was added to each
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cache / "data").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_cache_under_a_directory_it_cannot_read_is_still_made() -> None:
    """A parent the user may write and enter but not read (mode 0333): its name cannot be
    synced (opening it to fsync needs read), and the cache is made all the same, as before.
    The user is nobody (root reads everything), under a directory it may enter."""
    root = Path(tempfile.mkdtemp(prefix="corfs-durable-", dir="/tmp"))
    root.chmod(0o755)
    parent = root / "drop-box"
    parent.mkdir()
    parent.chmod(0o333)
    script = (
        "import sys\nfrom corfs.store import CacheStore\n"
        "CacheStore.open(sys.argv[1], lock=False, create=True).close()\nprint('made')"
    )
    try:
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "/usr/bin/python3", "-c", script, str(parent / "cache")],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), sysconfig.get_paths()["purelib"]])},
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert result.stdout.strip() == "made", result.stderr


@pytest.mark.parametrize("under", ["cache", "x/cache"])
def test_a_file_on_the_way_to_cache_is_not_a_directory(tmp_path, under) -> None:
    """Review finding: a regular file where CACHE needs a directory was said as "File exists"
    of a path that does not exist (the creation recursed into the file); as os.makedirs
    said: "Not a directory"."""
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="Not a directory"):
        CacheStore.open(str(tmp_path / "f" / under), lock=False, create=True)
