"""A directory base holding a file its user may not read (a non-root mount of a shared image
directory): the listing leaves it out with one warning naming it, and a read of one that
became unreadable since the listing is refused as BaseAccessDenied, a base error. The listing
showed it, and its reads raised PermissionError: an internal error (EIO, a traceback in the
log) at every fill of it. The other way round, an image its user may read through a
capability (CAP_DAC_READ_SEARCH) is listed: the listing asks access() as open() checks.

The store runs as user nobody: root reads everything. The system interpreter, with this
checkout and the venv's packages on its path: the venv's interpreter lives below /root
(0700), and CAP_DAC_READ_SEARCH (which tests/fuse/test_control.py lends nobody to reach it)
would read the file anyway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import REPO_ROOT

NOBODY = 65534

_AS_NOBODY = """
import json, logging, sys, trio
from corfs.base.dir import DirBase
from corfs.errors import CorfsError
logging.basicConfig(format="%(message)s")
async def main():
    images = await DirBase.open(sys.argv[1]).list_images()
    print(json.dumps([image.name for image in images]), flush=True)
    sys.stdin.readline()  # the test makes good.raw unreadable meanwhile
    (good,) = [image for image in images if image.name == "good.raw"]
    try:
        await good.read(0, 4096)
        print("read")
    except CorfsError as exc:
        print(type(exc).__name__)
trio.run(main)
"""


_WITH_CAPABILITY = """
import json, logging, sys, trio
from corfs.base.dir import DirBase
logging.basicConfig(format="%(message)s")
async def main():
    images = await DirBase.open(sys.argv[1]).list_images()
    print(json.dumps([image.name for image in images]))
    for image in images:
        print(len(await image.read(0, 4096)))
trio.run(main)
"""


def _as_nobody(script: str, base: Path, *setpriv: str) -> subprocess.Popen[str]:
    """`script` run by the system interpreter as user nobody (`setpriv` options added), with
    `base` as its argument and pipes for stdin, stdout and stderr."""
    path = os.pathsep.join([str(REPO_ROOT), sysconfig.get_paths()["purelib"]])
    return subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *setpriv,
         "/usr/bin/python3", "-c", script, str(base)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": path},
    )


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A base directory nobody may list, under a directory nobody may traverse."""
    root = Path(tempfile.mkdtemp(prefix="corfs-dir-perm-", dir="/tmp"))
    try:
        root.chmod(0o755)
        base = root / "base"
        base.mkdir(mode=0o755)
        yield base
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_an_image_its_user_cannot_read_is_left_out_or_refused(shared_base: Path) -> None:
    for name, mode in (("good.raw", 0o644), ("secret.raw", 0o600)):
        (shared_base / name).write_bytes(os.urandom(8192))
        (shared_base / name).chmod(mode)
    proc = _as_nobody(_AS_NOBODY, shared_base)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        listed = json.loads(proc.stdout.readline() or "null")
        (shared_base / "good.raw").chmod(0o600)  # unreadable since the listing
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert listed == ["good.raw"], err
    assert out.strip() == "BaseAccessDenied", err
    warnings = [line for line in err.splitlines() if "'secret.raw'" in line]
    assert len(warnings) == 1 and "permission denied" in warnings[0], err


def test_an_image_read_by_a_capability_is_listed(shared_base: Path) -> None:
    """A mount run as nobody with CAP_DAC_READ_SEARCH (systemd's AmbientCapabilities) opens a
    root-only image in a root-only BASE, and lists it: the checks ask access() with the
    effective ids, as open() checks. With the real ids, access() leaves every capability out
    for a user that is not root: the image was left out as "permission denied", and BASE
    itself refused as "not readable"."""
    (shared_base / "root-only.raw").write_bytes(os.urandom(8192))
    (shared_base / "root-only.raw").chmod(0o600)
    shared_base.chmod(0o700)
    proc = _as_nobody(
        _WITH_CAPABILITY, shared_base,
        "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
    )
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines() == ['["root-only.raw"]', "4096"], err
