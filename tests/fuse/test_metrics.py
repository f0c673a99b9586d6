"""Issue 14: `corfs mount --metrics`: Prometheus text that promtool accepts, figures that agree
with `corfs status --json`, a real Prometheus scraping a live mount, and the contrib alert
rules checked by promtool and against the metrics a mount really serves."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from tests.mounting import REPO_ROOT, CorfsDirs, CorfsMount, is_mounted, make_image, run_corfs
from tests.prometheus import PrometheusServer, promtool, samples, scrape, total, value
from tests.servers import Nginx, free_port

from .util import MIB, assert_one_line_error, live_status, wait_for

RULES = REPO_ROOT / "contrib" / "corfs-alerts.yml"
SIZES = {"a.raw": 4 * MIB, "b.raw": 3 * MIB + 17}


def _mount_with_metrics(dirs: CorfsDirs, *options: str):
    for seed, (name, size) in enumerate(SIZES.items()):
        make_image(dirs.base / name, size, seed=70 + seed)
    port = free_port()
    return port, dirs.mount("--metrics", str(port), "--chunk-size", "64k", *options)


def _touch_images(mnt: Path) -> None:
    """Some local, some dirty bytes: figures that are not all zero."""
    with open(mnt / "a.raw", "r+b") as f:
        f.read(MIB)
        f.seek(2 * MIB)
        f.write(b"x" * 100_000)
        f.flush()
    (mnt / "b.raw").open("rb").read(200_000)


def _still(status: dict) -> dict:
    """A status without the figures that move with time alone (rate, ETA)."""
    images = [{k: v for k, v in i.items() if k not in ("rate_bps", "eta_s")}
              for i in status["images"]]
    return {**status, "images": images}


def _quiet_status(mnt: Path, timeout: float = 20.0) -> dict:
    """The status once it stopped changing (the fills the reads started have ended)."""
    deadline = time.monotonic() + timeout
    before = _still(live_status(mnt))
    while True:
        time.sleep(0.3)
        status = live_status(mnt)
        if _still(status) == before:
            return status
        assert time.monotonic() < deadline, "the mount never went quiet"
        before = _still(status)


def test_metrics_pass_promtool_and_agree_with_status(tmp_dirs):
    port, mount = _mount_with_metrics(tmp_dirs, "--stream-paused", "--bandwidth", "7M")
    with mount as m:
        _touch_images(m.mnt)
        # Quiet (streaming paused, read-ahead done): status and scrape see the same moment.
        st = _quiet_status(m.mnt)
        wait_for(lambda: samples(scrape(port))[("corfs_cache_sync_duration_seconds_count", ())])
        text = scrape(port)
        assert _still(live_status(m.mnt)) == _still(st)  # nothing moved in between
        check = promtool("check", "metrics", stdin=text)
        assert check.returncode == 0, check.stdout + check.stderr
        found = samples(text)
        assert {i["name"] for i in st["images"]} == set(SIZES)
        for image in st["images"]:
            name = image["name"]
            assert value(found, "corfs_image_size_bytes", image=name) == image["size"]
            assert value(found, "corfs_image_local_bytes", image=name) == image["local_bytes"]
            assert value(found, "corfs_image_dirty_bytes", image=name) == image["dirty_bytes"]
            assert value(found, "corfs_image_fill_errors_total", image=name) == 0
            assert value(found, "corfs_image_state", image=name, state="paused") == 1
            assert total(found, "corfs_image_state", image=name) == 1
            assert value(found, "corfs_stream_paused", image=name) == 1
        assert value(found, "corfs_image_local_bytes", image="a.raw") >= MIB
        assert value(found, "corfs_image_dirty_bytes", image="a.raw") > 0
        assert value(found, "corfs_stream_bandwidth_limit_bytes_per_second") == st[
            "bandwidth_bps"
        ] == 7 * MIB
        fetcher = st["fetcher"]
        assert value(found, "corfs_base_fetched_bytes_total") == fetcher["bytes_fetched"] > 0
        assert value(found, "corfs_digest_mismatches_total") == fetcher["digest_mismatches"]
        # Every base request counted once, by outcome; a directory base has no HTTP status.
        assert total(found, "corfs_base_requests_total") == fetcher["requests"]
        assert value(found, "corfs_base_requests_total", outcome="ok", status_class="") == (
            fetcher["requests"]
        )
        assert value(found, "corfs_base_request_duration_seconds_count") == fetcher["requests"]
        assert value(found, "corfs_cache_written_bytes_total") >= fetcher["bytes_fetched"]
        assert value(found, "corfs_cache_sync_duration_seconds_count") >= 1
        assert value(found, "corfs_cache_data_sync_failed") == 0
        assert value(found, "corfs_fuse_request_duration_seconds_count", op="read") >= 1
        assert value(found, "corfs_fuse_request_duration_seconds_count", op="write") >= 1
        assert value(found, "corfs_fuse_requests_in_flight") == 0
        m.stop()


def test_base_requests_by_http_status_class(tmp_path):
    """An HTTP base: fills are counted ok/2xx; an image gone from the server fails with 4xx."""
    dirs = CorfsDirs.under(tmp_path)
    nginx = Nginx(root=tmp_path / "root", workdir=tmp_path / "nginx")
    nginx.root.mkdir()
    make_image(nginx.root / "a.raw", 4 * MIB, seed=3)
    nginx.start()
    try:
        port = free_port()
        with CorfsMount(nginx.url, dirs.cache, dirs.mnt, "--metrics", f"127.0.0.1:{port}",
                        "--no-stream", "--chunk-size", "64k", log_dir=dirs.logs) as m:
            assert len((m.mnt / "a.raw").open("rb").read(MIB)) == MIB
            (nginx.root / "a.raw").unlink()
            with pytest.raises(OSError), open(m.mnt / "a.raw", "rb") as f:
                f.seek(3 * MIB)
                f.read(4096)
            found = samples(scrape(port))
            assert value(found, "corfs_base_requests_total", outcome="ok", status_class="2xx") >= 1
            assert value(
                found, "corfs_base_requests_total", outcome="failed", status_class="4xx"
            ) >= 1
            m.stop()
    finally:
        nginx.stop()


def test_prometheus_scrapes_a_live_mount(tmp_dirs, tmp_path):
    port, mount = _mount_with_metrics(tmp_dirs, "--stream-paused")
    with mount as m:
        _touch_images(m.mnt)
        local = {i["name"]: i["local_bytes"] for i in _quiet_status(m.mnt)["images"]}
        server = PrometheusServer(tmp_path / "prometheus", [f"127.0.0.1:{port}"]).start()
        try:
            result = server.wait_query("corfs_image_local_bytes")
            assert {r["metric"]["image"]: float(r["value"][1]) for r in result} == local
            assert all(r["metric"]["job"] == "corfs" for r in result)
        finally:
            server.stop()
        m.stop()


def test_alert_rules_pass_promtool_and_name_metrics_a_mount_serves(tmp_dirs):
    check = promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    named = set(re.findall(r"\bcorfs_[a-z_]+", RULES.read_text()))
    assert len(named) >= 4
    port, mount = _mount_with_metrics(tmp_dirs, "--stream-paused")
    with mount as m:
        (m.mnt / "a.raw").open("rb").read(100_000)  # a base request: its counter exists
        served = {name for name, _ in samples(scrape(port))}
        m.stop()
    assert named <= served, f"rules name metrics no mount serves: {named - served}"


def test_bad_metrics_address_is_one_line(tmp_dirs):
    make_image(tmp_dirs.base / "a.raw", MIB)
    for bad in ("nope", "host:0", "127.0.0.1:70000", ":"):
        result = run_corfs("mount", tmp_dirs.base, tmp_dirs.cache, tmp_dirs.mnt, "--metrics", bad)
        assert_one_line_error(result, "--metrics")
        assert result.returncode == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for extra in ((), ("--daemon",)):
            result = run_corfs("mount", tmp_dirs.base, tmp_dirs.cache, tmp_dirs.mnt,
                               "--metrics", str(port), *extra)
            assert_one_line_error(result, "--metrics", "in use")
            assert not is_mounted(tmp_dirs.mnt)
