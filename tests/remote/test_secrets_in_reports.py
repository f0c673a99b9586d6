"""Credentials never reach the mount's log or `corfs status`, whatever the base answers.

The lean reader (http_wire.PlainReader._get) builds each ranged GET as one text (request line,
Host, Range, the validator's If-Match / If-Range, the --auth-header-env header, or for S3 the
SigV4 headers with X-Amz-Security-Token) and encodes it as latin-1. An ETag the base chose that
was not latin-1 (an HTTP server sending the UTF-8 bytes of a '€', which httpx decodes as such;
an S3 endpoint listing it in its XML) made that encode fail with a UnicodeEncodeError whose
repr holds the whole request text, credentials included; image.py turned any unexpected
exception into "internal error filling ...: {exc!r}", which the stream's failure log wrote
and `corfs status` showed as the image's error (readable by anyone who can reach the mount).
Now such a validator is never sent: an HTTP server's is ignored with a warning (the image is
served), an S3 object listed with one is left out alone; and an internal error says its type
only (errors.internal_error)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.fuse.util import direct_read
from tests.hostile import HostileServer
from tests.mounting import CorfsDirs, CorfsMount, run_corfs
from tests.servers import FAKE_AWS_ENV

SIZE = 1 << 20
SECRET = "corfs-test-SECRET-1234"
ETAG_UTF8 = '"\xe2\x82\xac1"'  # the UTF-8 bytes of "€1", as an HTTP server sends them


def _http_route(etag: str):
    data = bytes(SIZE)

    def route(method: str, path: str, headers: dict[str, str]):
        if path != "/disk.raw":
            return None
        if method == "HEAD":
            return 200, [("Content-Length", str(SIZE)), ("ETag", etag)], []
        first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
        body = data[first : last + 1]
        return 206, [
            ("Content-Range", f"bytes {first}-{last}/{SIZE}"),
            ("ETag", etag),
            ("Content-Length", str(len(body))),
        ], [body]

    return route


def _s3_route():
    listing = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>'
        "<Prefix>p/</Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter>"
        f"<IsTruncated>false</IsTruncated><Contents><Key>p/disk.raw</Key><Size>{SIZE}</Size>"
        '<ETag>"\u20ac1"</ETag></Contents></ListBucketResult>'
    ).encode()

    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" in path:
            return 200, [("Content-Length", str(len(listing)))], [listing]
        return 503, [("Content-Length", "0")], []

    return route


def _mount_reports(base: str, tmp_path: Path, *options: str,
                   env: dict[str, str]) -> tuple[list[dict], str, str]:
    """(the images of `corfs status --json`, that text, the mount's log) once every byte of
    what it serves was read, through the FUSE mount."""
    dirs = CorfsDirs.under(tmp_path)
    with CorfsMount(base, dirs.cache, dirs.mnt, "--chunk-size", "64k", "--io-timeout", "5",
                    *options, log_dir=dirs.logs, env={**os.environ, **env}) as m:
        for name in os.listdir(m.mnt):
            assert direct_read(m.mnt / name, 0, SIZE) == bytes(SIZE)
        status = run_corfs("status", m.mnt, "--json")
        assert status.returncode == 0, status.stderr
        m.stop()
        return json.loads(status.stdout)["images"], status.stdout, m.log_text()


def test_auth_header_is_not_in_status_or_log_after_a_non_latin1_etag(tmp_path: Path) -> None:
    server = HostileServer(_http_route(ETAG_UTF8)).start()
    try:
        images, status, log = _mount_reports(
            server.url + "disk.raw", tmp_path, "--auth-header-env", "CORFS_TEST_AUTH",
            env={"CORFS_TEST_AUTH": f"Authorization: Bearer {SECRET}"},
        )
    finally:
        server.stop()
    assert [(i["name"], i["error"]) for i in images] == [("disk.raw", None)], status
    assert "its ETag is not ASCII: ignored" in log, log
    assert SECRET not in status, status
    assert SECRET not in log, log


def test_s3_session_token_is_not_in_status_or_log_after_a_non_latin1_etag(
    tmp_path: Path,
) -> None:
    server = HostileServer(_s3_route()).start()
    try:
        images, status, log = _mount_reports(
            "s3://b/p/", tmp_path, "--endpoint-url", server.url.rstrip("/"),
            "--region", "us-east-1",
            env={**FAKE_AWS_ENV, "AWS_SESSION_TOKEN": SECRET},
        )
    finally:
        server.stop()
    assert images == [], status  # left out alone, said once
    assert "disk.raw: its ETag is not a header value" in log, log
    assert SECRET not in status, status
    assert SECRET not in log, log
