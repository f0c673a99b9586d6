"""The seed's test plan for image streaming, end to end with QEMU's own client: write and read
through the mount with qemu-io while streaming is paused, stream and watch the fill grow,
kill -9 and remount mid-way, finish, delete the base image, remount, and check that QEMU reads
exactly the expected image (base bytes where it did not write, its writes where it did)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.mounting import MIB, CorfsDirs, make_image, run_corfs, sha256_file

NAME = "disk.raw"
SIZE = 64 * MIB

# (qemu-io write command, offset, bytes it leaves there)
WRITES = [
    ("write -P 0xab 1M 64k", 1 * MIB, b"\xab" * (64 << 10)),  # part of one chunk
    ("write -P 0xcd 5000000 10000", 5_000_000, b"\xcd" * 10_000),  # unaligned
    ("write -P 0x5a 8372224 40960", 8_372_224, b"\x5a" * 40_960),  # across a chunk boundary
    ("write -P 0xef 20M 2M", 20 * MIB, b"\xef" * (2 * MIB)),  # whole chunks: no base read
    ("write -z 27M 128k", 27 * MIB, bytes(128 << 10)),  # zeroes over base data
]

pytestmark = pytest.mark.slow


def qemu_io(path: Path, *commands: str, read_only: bool = False) -> str:
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for command in commands:
        args += ["-c", command]
    result = subprocess.run(
        [*args, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "failed" not in output.lower(), output
    return output


def fill(mnt: Path) -> dict:
    """This image's entry of `corfs status MNT --json` (the CLI, as a person would use it)."""
    result = run_corfs("status", mnt, "--json")
    assert result.returncode == 0, result.stderr
    (image,) = [i for i in json.loads(result.stdout)["images"] if i["name"] == NAME]
    return image


def live_fill(mnt: Path) -> dict:
    """The same from the mount's status xattr: no CLI start-up, for timing-sensitive steps."""
    (image,) = json.loads(os.getxattr(mnt, "user.corfs.status"))["images"]
    return image


def wait_fill(mnt: Path, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while not predicate(image := fill(mnt)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {image}"
        time.sleep(0.1)
    return image


def test_seed_plan(tmp_dirs: CorfsDirs) -> None:
    assert shutil.which("qemu-io") and shutil.which("qemu-img"), "QEMU tools are missing"
    base = make_image(tmp_dirs.base / NAME, SIZE, seed=42, zero_blocks={12, 13})
    expected_path = tmp_dirs.logs / "expected.raw"  # built locally, never through corfs
    expected = bytearray(base.read_bytes())
    for _, offset, data in WRITES:
        expected[offset : offset + len(data)] = data
    expected_path.write_bytes(expected)

    # 1. Mount paused; QEMU writes and reads; nothing streams meanwhile.
    with tmp_dirs.mount("--stream-paused", "--bandwidth", "4M") as m:
        image = m.mnt / NAME
        qemu_io(image, *(command for command, _, _ in WRITES))
        qemu_io(
            image,
            "read -P 0xab 1M 64k",
            "read -P 0xcd 5000000 10000",
            "read -P 0x5a 8372224 40960",
            "read -P 0xef 20M 2M",
            "read -P 0 27M 128k",
            "read -P 0 12M 2M",  # holes of the base
            "read 60M 1M",
            read_only=True,
        )
        paused = fill(m.mnt)
        assert paused["state"] == "paused"
        assert paused["dirty_bytes"] > 0
        time.sleep(1.0)
        assert fill(m.mnt)["local_bytes"] == paused["local_bytes"]

        # 2. Stream and watch the fill grow; kill -9 mid-way.
        assert run_corfs("stream", "resume", m.mnt).returncode == 0
        first = wait_fill(m.mnt, lambda i: i["local_bytes"] > paused["local_bytes"], 10, "growth")
        wait_fill(m.mnt, lambda i: i["local_bytes"] > first["local_bytes"], 10, "more growth")
        # The kill's timing comes from the xattr, not the slower CLI: 16 s for the whole
        # image at 4 MB/s leaves a wide margin before it would be complete.
        deadline = time.monotonic() + 20
        while live_fill(m.mnt)["fill_ratio"] < 0.3:
            assert time.monotonic() < deadline, live_fill(m.mnt)
            time.sleep(0.05)
        time.sleep(1.1)  # let a commit of the chunk state happen
        assert live_fill(m.mnt)["state"] == "streaming"
        m.kill9()

    # 3. Remount: the stream resumes from where it was and completes.
    with tmp_dirs.mount("--bandwidth", "4M") as m:
        at_remount = fill(m.mnt)
        assert 0.2 <= at_remount["fill_ratio"] < 0.9, at_remount
        assert at_remount["state"] == "streaming"
        wait_fill(m.mnt, lambda i: i["local_bytes"] > at_remount["local_bytes"], 10, "resume")
        assert run_corfs("stream", "bandwidth", m.mnt, "0").returncode == 0
        done = wait_fill(m.mnt, lambda i: i["state"] == "complete", 30, "complete")
        assert done["fill_ratio"] == 1.0 and done["eta_s"] == 0.0
        m.stop()

    # 4. The base image goes; the cache alone serves exactly the expected image.
    base.unlink()
    with tmp_dirs.mount("--read-only") as m:
        image = m.mnt / NAME
        assert fill(m.mnt)["state"] == "complete"
        qemu_io(image, "read -P 0xef 20M 2M", "read -P 0xab 1M 64k", read_only=True)
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), str(expected_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert compare.returncode == 0, compare.stdout + compare.stderr
        assert sha256_file(image) == sha256_file(expected_path)
        m.stop()
    result = run_corfs("verify", tmp_dirs.cache)
    assert result.returncode == 0, result.stdout + result.stderr
