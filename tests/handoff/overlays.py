"""qcow2 overlays for the handoff tests: made with qemu-img, their headers read back as a
restarted VM reads them, and their bytes checked through qemu-io (QEMU gone)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def make_overlay(
    backing: Path | str, overlay: Path, backing_format: str = "raw", cwd: Path | None = None
) -> None:
    """`overlay` (qcow2) over `backing`, named in its header as given (relative: from `cwd`)."""
    made = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format,
                           "-b", str(backing), str(overlay)],
                          capture_output=True, text=True, cwd=cwd)
    assert made.returncode == 0, made.stderr


def backing_of(overlay: Path) -> tuple[str | None, str | None]:
    """The backing file its header names (resolved as QEMU does) and that file's format."""
    info = subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                          capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    header = json.loads(info.stdout)
    return header.get("full-backing-filename"), header.get("backing-filename-format")


def assert_reads(image: Path, *reads: str) -> None:
    """qemu-io opens `image` (qcow2, with its backing chain) and every `read -P ...` passes."""
    args = ["qemu-io", "-f", "qcow2"]
    for read in reads:
        args += ["-c", read]
    opened = subprocess.run([*args, str(image)], capture_output=True, text=True)
    assert opened.returncode == 0 and "fail" not in opened.stdout, opened.stdout + opened.stderr
