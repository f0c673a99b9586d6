"""Issue 10, item 7 (HTTP and S3 bases): one bad listed entry fails only itself. An image that
index.json lists but the server answers 404 for, one whose HEAD declares an absurd
Content-Length, an S3 key `prefix/..`: the mount comes up, serves the good image and leaves the
bad one out with one warning naming it."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from tests.fuse.util import assert_one_line_error
from tests.hostile import HostileServer
from tests.mounting import CorfsMount, is_mounted, lazy_unmount, make_image, run_corfs, sha256_file
from tests.proxy import FaultProxy
from tests.servers import TEST_BUCKET

MIB = 1 << 20
HUGE = "99999999999999999999"
_serial = itertools.count()


class HostileHeadProxy(FaultProxy):
    """Relays to nginx, but answers HEAD of huge.raw with Content-Length HUGE."""

    def _answer(self, client, first, headers, body, fault):
        if first.startswith("HEAD ") and first.split()[1].endswith("/huge.raw"):
            client.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {HUGE}\r\n\r\n".encode())
            return True
        return super()._answer(client, first, headers, body, fault)


def _warnings_naming(log: str, name: str) -> list[str]:
    return [line for line in log.splitlines() if f"leaving out image {name!r}" in line]


def test_http_listed_image_that_404s_or_declares_a_huge_size_is_left_out(
    nginx_server,
    tmp_path: Path,
) -> None:
    sub = f"bad{next(_serial)}-{os.getpid()}/"
    root = nginx_server.root / sub
    root.mkdir(parents=True)
    good = make_image(root / "good.raw", MIB, seed=31)
    make_image(root / "huge.raw", MIB, seed=32)
    # A stale index.json (as a publish to a shared directory can leave): gone.raw is listed,
    # and answers 404.
    names = ["good.raw", "gone.raw", "huge.raw"]
    (root / "index.json").write_text(json.dumps({"images": [{"name": n} for n in names]}))
    proxy = HostileHeadProxy(upstream_port=nginx_server.port).start()
    mnt, cache, logs = tmp_path / "mnt", tmp_path / "cache", tmp_path / "logs"
    mnt.mkdir()
    logs.mkdir()
    try:
        with CorfsMount(proxy.url + sub, cache, mnt, "--no-stream", log_dir=logs) as m:
            assert os.listdir(mnt) == ["good.raw"]
            assert sha256_file(mnt / "good.raw") == sha256_file(good)
            m.stop()
    finally:
        proxy.stop()
    log = m.log_text()
    assert len(_warnings_naming(log, "gone.raw")) == 1, log
    assert len(_warnings_naming(log, "huge.raw")) == 1, log
    assert "Traceback" not in log


def test_s3_key_dotdot_is_left_out(moto_server, tmp_path: Path) -> None:
    prefix = f"bad{next(_serial)}-{os.getpid()}/"
    client = moto_server.client()
    good = make_image(tmp_path / "good.raw", MIB, seed=33)
    client.put_object(Bucket=TEST_BUCKET, Key=prefix + "good.raw", Body=good.read_bytes())
    client.put_object(Bucket=TEST_BUCKET, Key=prefix + "..", Body=b"x" * 4096)
    listed = client.list_objects_v2(Bucket=TEST_BUCKET, Prefix=prefix)["Contents"]
    assert prefix + ".." in [o["Key"] for o in listed]  # the hostile key really is there
    mnt, cache, logs = tmp_path / "mnt", tmp_path / "cache", tmp_path / "logs"
    mnt.mkdir()
    logs.mkdir()
    url = f"s3://{TEST_BUCKET}/{prefix}"
    options = ("--endpoint-url", moto_server.endpoint, "--no-stream")
    with CorfsMount(url, cache, mnt, *options, log_dir=logs) as m:
        assert os.listdir(mnt) == ["good.raw"]
        assert sha256_file(mnt / "good.raw") == sha256_file(good)
        m.stop()
    log = m.log_text()
    assert len(_warnings_naming(log, "..")) == 1, log


def test_http_listing_a_name_that_is_not_utf8_leaves_out_that_name_only(
    nginx_server, tmp_path: Path
) -> None:
    """nginx's JSON autoindex writes file names as their bytes: one name in Latin-1 made the
    whole listing undecodable, and the mount failed ("the directory listing is not JSON")."""
    sub = f"bad{next(_serial)}-{os.getpid()}/"
    root = nginx_server.root / sub
    root.mkdir(parents=True)
    good = make_image(root / "good.raw", MIB, seed=34)
    latin1 = os.fsdecode(b"latin1-\xe9.raw")
    make_image(root / latin1, MIB, seed=35)
    mnt, cache, logs = tmp_path / "mnt", tmp_path / "cache", tmp_path / "logs"
    mnt.mkdir()
    logs.mkdir()
    with CorfsMount(nginx_server.url + sub, cache, mnt, "--no-stream", log_dir=logs) as m:
        assert os.listdir(mnt) == ["good.raw"]
        assert sha256_file(mnt / "good.raw") == sha256_file(good)
        m.stop()
    log = m.log_text()
    assert len(_warnings_naming(log, latin1)) == 1, log


@pytest.mark.parametrize(
    ("tail", "needle"),
    [
        ("a%2Fb.raw", "'a/b.raw'"),
        ("%2E%2E", "'..'"),
        ("x%1B.raw", "control characters"),
        ("%FF.raw", "not valid UTF-8"),
    ],
    ids=["slash", "dotdot", "control", "not-utf8"],
)
def test_a_url_to_one_file_named_no_image_name_is_refused_in_one_line(
    tmp_path: Path, tail: str, needle: str
) -> None:
    """%-decoded, the last segment of a URL to one image is that image's name. One that is no
    name (a '/', '..', a control character) was left out with a warning in the log, and the
    mount came up empty, exit 0; a byte that is not UTF-8 became U+FFFD."""

    def route(method: str, path: str, headers: dict[str, str]):
        return 200, [("Content-Length", "4096"), ("ETag", '"e"')], [bytes(4096)]

    server = HostileServer(route).start()
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    try:
        result = run_corfs("mount", server.url + tail, cache, mnt, "--daemon", timeout=30)
        assert result.returncode == 2 and not is_mounted(mnt), result.stderr
        assert_one_line_error(result, "names no image", needle)
    finally:
        lazy_unmount(mnt)
        server.stop()
