"""`corfs status` is the CLI's quick path: its side of control imports none of the data path
(image, fetcher, stream, the store's data files, the bases) nor the event loop. Run in a fresh
interpreter, since this one has imported everything already."""

from __future__ import annotations

import subprocess
import sys

DATA_PATH = (
    "corfs.image",
    "corfs.fetcher",
    "corfs.stream",
    "corfs.fresh",
    "corfs.datafile",  # the data-file half of the store (issue 12, item 1)
    "corfs.handoff",
    "corfs.base.http",  # the bases themselves (corfs.base, their protocol and options, is light)
    "corfs.base.s3",
    "corfs.base.published",
    "corfs.publish",
    "corfs.control",  # the daemon's side
    "trio",
    "httpx",
    "pyfuse3",
)

CHECK = """
import sys
import {module}
loaded = sorted(name for name in {data_path!r} if name in sys.modules)
assert not loaded, loaded
"""


def _imports_no_data_path(code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_client_side_of_control_imports_no_data_path() -> None:
    _imports_no_data_path(CHECK.format(module="corfs.control_client", data_path=DATA_PATH))


def test_corfs_status_imports_no_data_path(tmp_path) -> None:
    """The CLI's status command, on a path that is no corfs cache and no mount (it fails after
    importing what status needs; then nothing of the data path is loaded)."""
    code = (
        "import sys\n"
        "from corfs import cli\n"
        f"assert cli.main(['status', {str(tmp_path)!r}, '--json']) != 0\n"
        f"loaded = sorted(name for name in {DATA_PATH!r} if name in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    _imports_no_data_path(code)
