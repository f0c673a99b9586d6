"""Issue 2, point 8: `corfs status` of a mount and of a cache, as a table and as JSON, while
mounted and after unmount."""

from __future__ import annotations

import json

from tests.mounting import make_image, run_corfs

from .util import KIB, MIB, direct_read

SIZES = {"a.raw": 4 * MIB, "b.raw": 3 * MIB + 17}


def _check_schema(st: dict, *, mounted: bool, local: dict[str, int]) -> None:
    assert st["schema_version"] == 1
    assert st["mounted"] is mounted
    assert isinstance(st["cache"], str) and isinstance(st["images"], list)
    assert sorted(i["name"] for i in st["images"]) == sorted(SIZES)
    for image in st["images"]:
        assert isinstance(image["name"], str)
        assert image["size"] == SIZES[image["name"]]
        assert isinstance(image["local_bytes"], int)
        assert image["local_bytes"] == local[image["name"]]
        assert 0.0 <= image["fill_ratio"] <= 1.0
        assert abs(image["fill_ratio"] - image["local_bytes"] / image["size"]) < 1e-9
        assert isinstance(image["state"], str) and image["state"]


def _status(path, *extra):
    result = run_corfs("status", path, *extra)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_status_of_mount_and_cache(tmp_dirs):
    for seed, (name, size) in enumerate(SIZES.items()):
        make_image(tmp_dirs.base / name, size, seed=50 + seed)
    local = {"a.raw": 2 * 64 * KIB, "b.raw": 0}
    with tmp_dirs.mount("--stream-paused", "--chunk-size", "64k") as m:
        direct_read(m.mnt / "a.raw", 0, 4 * KIB)
        direct_read(m.mnt / "a.raw", MIB, 4 * KIB)
        for path in (m.mnt, tmp_dirs.cache):  # the cache of a live mount asks the mount
            st = json.loads(_status(path, "--json"))
            _check_schema(st, mounted=True, local=local)
            assert st["mountpoint"] == str(m.mnt)
            assert {i["state"] for i in st["images"]} == {"paused"}
            assert st["fetcher"]["bytes_fetched"] == 2 * 64 * KIB
            table = _status(path)
            assert str(m.mnt) in table
            assert "IMAGE" in table and "FILL" in table and "STATE" in table
            rows = {line.split()[0]: line for line in table.splitlines()[2:]}
            assert set(rows) == set(SIZES)
            assert "paused" in rows["a.raw"] and "3.1%" in rows["a.raw"]
            assert "0.0%" in rows["b.raw"]
        m.stop()

    st = json.loads(_status(tmp_dirs.cache, "--json"))
    _check_schema(st, mounted=False, local=local)
    table = _status(tmp_dirs.cache)
    assert "not mounted" in table and "a.raw" in table and "b.raw" in table


def test_status_complete(tmp_dirs):
    for seed, (name, size) in enumerate(SIZES.items()):
        make_image(tmp_dirs.base / name, size, seed=60 + seed)
    with tmp_dirs.mount("--no-stream") as m:
        for name in SIZES:
            (m.mnt / name).read_bytes()
        st = json.loads(_status(m.mnt, "--json"))
        _check_schema(st, mounted=True, local=SIZES)
        assert {i["state"] for i in st["images"]} == {"complete"}
        assert {i["fill_ratio"] for i in st["images"]} == {1.0}
        m.stop()
    st = json.loads(_status(tmp_dirs.cache, "--json"))
    _check_schema(st, mounted=False, local=SIZES)
    assert {i["state"] for i in st["images"]} == {"complete"}
