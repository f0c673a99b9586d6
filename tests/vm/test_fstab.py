"""contrib/ on a real host: an fstab line of type fuse.corfs mounted by mount(8) through
contrib/mount.fuse.corfs, and the systemd unit's syntax checked by `systemd-analyze verify`.

mount(8) looks for helpers only in /sbin (libmount's search path, PATH is not used): the helper
is installed as /sbin/mount.fuse.corfs for this module and removed afterwards (only if this
module put it there; an existing different helper is left alone and the tests skip). Without
it libmount would fall back to mount.fuse3, which runs `corfs BASE MNT -o ...`: not corfs's
command line. corfs itself is a wrapper script in a temp dir, given to the helper by
CORFS_BIN, that runs this checkout's `python -m corfs`.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corfs.mountinfo import find_mount
from tests.mounting import (
    REPO_ROOT,
    CorfsDirs,
    _find_daemon_pid,
    _pid_alive,
    _terminate,
    _wait_pid_gone,
    is_fuse_mounted,
    is_mounted,
    lazy_unmount,
    make_image,
    mount_fstype,
    run_corfs,
    sha256_file,
)

pytestmark = pytest.mark.timeout(120)

CONTRIB = REPO_ROOT / "contrib"
HELPER = CONTRIB / "mount.fuse.corfs"
SYSTEM_HELPER = Path("/sbin/mount.fuse.corfs")
UNIT = CONTRIB / "corfs@.service"
IMAGE = "disk.raw"
MIB = 1 << 20


@pytest.fixture(scope="module")
def installed_helper() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("installing /sbin/mount.fuse.corfs and mounting from fstab need root")
    if SYSTEM_HELPER.exists() or SYSTEM_HELPER.is_symlink():
        if not filecmp.cmp(SYSTEM_HELPER, HELPER, shallow=False):
            pytest.skip(f"{SYSTEM_HELPER} exists and is not contrib's: not replacing it")
        yield SYSTEM_HELPER  # already installed by someone else: use it, leave it
        return
    tmp = SYSTEM_HELPER.with_name(f".{SYSTEM_HELPER.name}.{os.getpid()}")
    shutil.copyfile(HELPER, tmp)
    tmp.chmod(0o755)
    tmp.rename(SYSTEM_HELPER)
    try:
        yield SYSTEM_HELPER
    finally:
        SYSTEM_HELPER.unlink(missing_ok=True)


@pytest.fixture
def corfs_bin(tmp_path: Path) -> Path:
    """An executable `corfs` running this checkout with this interpreter."""
    path = tmp_path / "bin" / "corfs"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nPYTHONPATH={REPO_ROOT} exec {sys.executable} -m corfs "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[CorfsDirs]:
    dirs = CorfsDirs.under(tmp_path / "corfs")
    make_image(dirs.base / IMAGE, 8 * MIB, seed=11, zero_blocks=[3])
    yield dirs
    # Whatever happened: no mount and no daemon left behind (the daemon by its own PID).
    pid = _find_daemon_pid(dirs.mnt)
    lazy_unmount(dirs.mnt)
    if pid is not None and _pid_alive(pid):
        _terminate(pid, lambda t: _wait_pid_gone(pid, t))


def mount_from_fstab(
    fstab: Path, mnt: Path, corfs_bin: Path, *flags: str
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CORFS_BIN=str(corfs_bin))
    return subprocess.run(
        ["mount", *flags, "--fstab", str(fstab), str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def write_fstab(tmp_path: Path, dirs: CorfsDirs, options: str) -> Path:
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# corfs test fstab\n{dirs.base}  {dirs.mnt}  fuse.corfs  {options}  0 0\n")
    return fstab


def test_fstab_line_mounts_reads_and_unmounts(
    installed_helper: Path, corfs_bin: Path, dirs: CorfsDirs, tmp_path: Path
):
    options = f"cache={dirs.cache},allow_other,chunk_size=64K,nofail,_netdev,x-systemd.after=x"
    fstab = write_fstab(tmp_path, dirs, options)

    result = mount_from_fstab(fstab, dirs.mnt, corfs_bin)
    assert result.returncode == 0, f"mount failed: {result.stdout}{result.stderr}"
    assert is_fuse_mounted(dirs.mnt)
    assert mount_fstype(dirs.mnt) == "fuse.corfs"
    pid = _find_daemon_pid(dirs.mnt)
    assert pid is not None, "no corfs daemon serving the fstab mount"

    # The image is there and reads back byte for byte (holes included).
    assert os.listdir(dirs.mnt) == [IMAGE]
    assert sha256_file(dirs.mnt / IMAGE) == sha256_file(dirs.base / IMAGE)
    # Options reached corfs: chunk_size=64K -> --chunk-size 64K, allow_other -> allow_other.
    status = run_corfs("status", dirs.mnt, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["images"][0]["chunk_size"] == 64 * 1024
    entry = find_mount(str(dirs.mnt))
    assert entry is not None and "allow_other" in entry.super_options

    result = subprocess.run(["umount", str(dirs.mnt)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(dirs.mnt)
    assert _wait_pid_gone(pid, 20), f"corfs daemon {pid} still running after umount"
    # The cache kept what was read: a second mount from the same line serves it again.
    assert (dirs.cache / "state.db").exists()
    result = mount_from_fstab(fstab, dirs.mnt, corfs_bin)
    assert result.returncode == 0, result.stderr
    pid = _find_daemon_pid(dirs.mnt)
    assert sha256_file(dirs.mnt / IMAGE) == sha256_file(dirs.base / IMAGE)
    result = subprocess.run(
        ["fusermount3", "-u", str(dirs.mnt)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert pid is not None and _wait_pid_gone(pid, 20)


def test_fstab_fake_mount_prints_the_command(
    installed_helper: Path, corfs_bin: Path, dirs: CorfsDirs, tmp_path: Path
):
    fstab = write_fstab(tmp_path, dirs, f"cache={dirs.cache},ro,no_stream,bandwidth=5M")
    result = mount_from_fstab(fstab, dirs.mnt, corfs_bin, "-f", "-v")
    assert result.returncode == 0, result.stderr
    assert not is_mounted(dirs.mnt)
    expected = (
        f"{corfs_bin} mount {dirs.base} {dirs.cache} {dirs.mnt} --daemon --read-only "
        "--no-stream --bandwidth 5M"
    )
    assert expected in result.stdout + result.stderr


def test_fstab_line_without_cache_is_refused(
    installed_helper: Path, corfs_bin: Path, dirs: CorfsDirs, tmp_path: Path
):
    fstab = write_fstab(tmp_path, dirs, "allow_other")
    result = mount_from_fstab(fstab, dirs.mnt, corfs_bin)
    assert result.returncode != 0
    assert "cache=DIR is required" in result.stderr
    assert not is_mounted(dirs.mnt)
    assert _find_daemon_pid(dirs.mnt) is None


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path, corfs_bin: Path):
    """`systemd-analyze verify` of the template and of an instance: no error, no warning.

    It checks that ExecStart= exists, so /usr/local/bin/corfs (not installed here) becomes the
    wrapper; the rest of the unit is verified as shipped.
    """
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/corfs " in text
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / UNIT.name).write_text(text.replace("/usr/local/bin/corfs", str(corfs_bin)))
    (unit_dir / "corfs@images.service").symlink_to(UNIT.name)
    for name in (UNIT.name, "corfs@images.service"):
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(unit_dir / name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == "", result.stderr
