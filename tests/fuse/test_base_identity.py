"""Issue 2, point 6: base identity. An image that changed in BASE after it was cached is
refused on the next mount (a log line names it; the other images are still served), never
mixed; with --reset-stale its cache is discarded and the new bytes are served."""

from __future__ import annotations

import os

import pytest

from tests.mounting import make_image, sha256_file

from .util import MIB, direct_read, status

SIZE = 2 * MIB


def _change_bytes(path):
    make_image(path, SIZE, seed=99)  # rewritten with other bytes, same size


def _touch_only(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, new mtime


@pytest.mark.parametrize("change", [_change_bytes, _touch_only], ids=["new-bytes", "new-mtime"])
def test_changed_base_image_refused_then_reset(tmp_dirs, change):
    stale = make_image(tmp_dirs.base / "stale.raw", SIZE, seed=31)
    keep = make_image(tmp_dirs.base / "keep.raw", SIZE, seed=32)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        # some chunks of each image local, so a mix of old cache and new base would be
        # possible; scattered O_DIRECT reads, so that no read-ahead makes them all local
        for name in ("stale.raw", "keep.raw"):
            for chunk in (0, 5, 11, 20):
                direct_read(m.mnt / name, chunk * 64 * 1024, 4096)
        m.stop()
    cached = {i["name"]: i["local_bytes"] for i in status(tmp_dirs.cache)["images"]}
    assert 0 < cached["stale.raw"] < SIZE

    change(stale)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        assert sorted(os.listdir(m.mnt)) == ["keep.raw"]  # the changed image is not served
        assert sha256_file(m.mnt / "keep.raw") == sha256_file(keep)
        m.stop()
        refusals = [line for line in m.log_text().splitlines() if "stale.raw" in line]
        assert any("refusing" in line and "changed" in line for line in refusals), m.log_text()
        assert not any("keep.raw" in line for line in m.log_text().splitlines())
    # the refused image's cache is kept as it was (partly local), not thrown away or mixed
    st = status(tmp_dirs.cache)
    assert {i["name"]: i["local_bytes"] for i in st["images"]}["stale.raw"] == cached["stale.raw"]

    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k", "--reset-stale") as m:
        assert sorted(os.listdir(m.mnt)) == ["keep.raw", "stale.raw"]
        assert status(m.mnt)["images"][1]["local_bytes"] == 0  # cache discarded
        assert sha256_file(m.mnt / "stale.raw") == sha256_file(stale)  # the new bytes
        assert sha256_file(m.mnt / "keep.raw") == sha256_file(keep)
        m.stop()
        assert "stale.raw" in m.log_text()

    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:  # accepted from now on
        assert sorted(os.listdir(m.mnt)) == ["keep.raw", "stale.raw"]
        assert sha256_file(m.mnt / "stale.raw") == sha256_file(stale)
        m.stop()
