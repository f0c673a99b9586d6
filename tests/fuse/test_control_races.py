"""Control operations against a live mount (hunt: control racing with I/O): what a command
the daemon accepts may not break afterwards."""

from __future__ import annotations

import urllib.request

import pytest

from corfs.control import MAX_BANDWIDTH
from corfs.control_client import send_command
from corfs.errors import ControlError
from tests.mounting import CorfsDirs, make_image
from tests.servers import free_port

from .util import MIB


def test_a_bandwidth_the_daemon_accepts_never_breaks_its_metrics(tmp_dirs: CorfsDirs) -> None:
    """A rate is an int of any size in the command's JSON (the CLI's parse_size goes through a
    float, the xattr does not). control.py took any int >= 0; the metrics exposition then
    converts it to a float: OverflowError, HTTP 500 and a traceback for every scrape, until the
    rate was set again. Now a rate beyond MAX_BANDWIDTH is refused (EINVAL), and the largest
    accepted one is scraped."""
    make_image(tmp_dirs.base / "a.raw", 1 * MIB, seed=3)
    port = free_port()
    with tmp_dirs.mount("--metrics", str(port), "--chunk-size", "64K") as m:
        with pytest.raises(ControlError):
            send_command(str(m.mnt), {"op": "bandwidth", "rate": 10**400})
        send_command(str(m.mnt), {"op": "bandwidth", "rate": MAX_BANDWIDTH})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            body = answer.read().decode()
        assert f"corfs_stream_bandwidth_limit_bytes_per_second {float(MAX_BANDWIDTH)}" in body
        m.stop()
