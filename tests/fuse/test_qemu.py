"""Issue 2, point 9: QEMU as a client. qemu-img info/compare on MNT, qemu-io writes and reads
of patterns (aligned and unaligned), through the page cache and with O_DIRECT (-n, -t none)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.mounting import make_image, sha256_file

from .util import MIB, drop_caches

SIZE = 8 * MIB + 3 * 4096  # not a multiple of the 1 MiB chunk


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, check=False
    )


def _qemu_io(path, cache_opts, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw", *cache_opts]
    for command in commands:
        args += ["-c", command]
    result = _run(*args, path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def test_qemu_img_info_and_compare(tmp_dirs):
    base = make_image(tmp_dirs.base / "disk.raw", SIZE, seed=71, zero_blocks=(1, 4))
    with tmp_dirs.mount("--stream-paused") as m:
        info = _run("qemu-img", "info", "--output=json", "-f", "raw", m.mnt / "disk.raw")
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["virtual-size"] == SIZE
        assert json.loads(info.stdout)["format"] == "raw"
        cmp = _run("qemu-img", "compare", "-f", "raw", "-F", "raw", m.mnt / "disk.raw", base)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        assert "identical" in cmp.stdout.lower()
        m.stop()


@pytest.mark.parametrize(
    "cache_opts",
    [[], ["-n"], ["-t", "none"], ["-t", "writethrough"]],
    ids=["page-cache", "nocache", "cache-none", "writethrough"],
)
def test_qemu_io_patterns(tmp_dirs, cache_opts):
    base = make_image(tmp_dirs.base / "disk.raw", SIZE, seed=72)
    base_sha = sha256_file(base)
    path_writes = [
        ("write -P 0xab 1M 64k", "read -P 0xab 1M 64k"),
        ("write -P 0x5a 1000 5000", "read -P 0x5a 1000 5000"),  # unaligned, inside chunk 0
        ("write -P 0x33 2097000 3000", "read -P 0x33 2097000 3000"),  # across a chunk boundary
        ("write -P 0x77 8M 12k", "read -P 0x77 8M 12k"),  # the short last chunk, to EOF
    ]
    with tmp_dirs.mount("--no-stream") as m:
        image = m.mnt / "disk.raw"
        for write, read in path_writes:
            _qemu_io(image, cache_opts, write, read)
        # untouched neighbours still hold base bytes
        orig = base.read_bytes()
        with open(image, "rb") as f:
            got = f.read()
        assert got[:1000] == orig[:1000]
        assert got[6000 : 1 * MIB] == orig[6000 : 1 * MIB]
        assert got[1 * MIB + 64 * 1024 : 2097000] == orig[1 * MIB + 64 * 1024 : 2097000]
        m.stop()
    drop_caches()
    with tmp_dirs.mount("--no-stream") as m:  # after a remount, in a new process
        image = m.mnt / "disk.raw"
        for _, read in path_writes:
            _qemu_io(image, ["-n"], read)
            _qemu_io(image, [], read)
        cmp = _run("qemu-img", "compare", "-f", "raw", "-F", "raw", image, base)
        assert cmp.returncode == 1, cmp.stdout + cmp.stderr  # differ, as written
        m.stop()
    assert sha256_file(base) == base_sha


def test_qemu_io_detects_a_wrong_pattern(tmp_dirs):
    """The checker itself: a read with the wrong pattern is caught."""
    make_image(tmp_dirs.base / "disk.raw", SIZE, seed=73)
    with tmp_dirs.mount("--no-stream") as m:
        _qemu_io(m.mnt / "disk.raw", ["-n"], "write -P 0xab 1M 64k")
        with pytest.raises(AssertionError):
            _qemu_io(m.mnt / "disk.raw", ["-n"], "read -P 0xac 1M 64k")
        m.stop()
