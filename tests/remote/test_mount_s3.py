"""Issue 4, point 2 (and the S3 half of points 4 and 5): real mounts of s3://bucket/prefix/
on moto's S3 server. The same byte checks as for HTTP, streaming to complete, resume after
kill -9 without refetching; wrong credentials, a missing bucket or a closed endpoint fail the
mount in one line and leave CACHE alone; a GetObject whose body trickles in (defeating
botocore's per-socket timeouts) is abandoned at --io-timeout instead of hanging the read."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pytest

from tests.fuse.util import (
    assert_one_line_error,
    direct_read,
    snapshot,
    wait_complete,
)
from tests.mounting import CorfsMount, lazy_unmount, make_image, run_corfs, sha256_file
from tests.proxy import FaultProxy, _join_head
from tests.remote.resume import check_resume_after_kill9
from tests.servers import FAKE_AWS_ENV, TEST_BUCKET, Moto, free_port

KIB = 1 << 10
MIB = 1 << 20
SIZE = 4 * MIB + 3 * 4096
_serial = itertools.count()


class Bucket:
    """A fresh prefix in the moto bucket, local copies of what was uploaded, local dirs."""

    def __init__(self, moto: Moto, tmp: Path, endpoint: str | None = None) -> None:
        self.moto = moto
        self.endpoint = endpoint or moto.endpoint
        self.prefix = f"mnt{next(_serial)}-{os.getpid()}/"
        self.client = moto.client()
        self.tmp = tmp
        self.cache, self.mnt, self.logs = tmp / "cache", tmp / "mnt", tmp / "logs"
        self.mnt.mkdir()
        self.logs.mkdir()
        (tmp / "src").mkdir()

    @property
    def url(self) -> str:
        return f"s3://{TEST_BUCKET}/{self.prefix}"

    def put(self, key: str, size: int = SIZE, seed: int = 0, **kw: object) -> Path:
        local = make_image(self.tmp / "src" / key.replace("/", "_"), size, seed=seed, **kw)  # type: ignore[arg-type]
        self.client.put_object(Bucket=TEST_BUCKET, Key=self.prefix + key, Body=local.read_bytes())
        return local

    def mount(self, url: str | None = None, *options: object) -> CorfsMount:
        return CorfsMount(
            url or self.url,
            self.cache,
            self.mnt,
            "--endpoint-url",
            self.endpoint,
            "--chunk-size",
            "256K",
            *options,
            log_dir=self.logs,
        )


@pytest.fixture
def bucket(moto_server, tmp_path: Path) -> Bucket:
    return Bucket(moto_server, tmp_path)


def test_prefix_exposes_its_objects_bytes_qemu_and_stream(bucket: Bucket) -> None:
    a = bucket.put("a.raw", seed=21, zero_blocks=(1,))
    b = bucket.put("b.img", MIB + 7, seed=22)
    bucket.put("deeper/c.raw", MIB, seed=23)  # below a sub-prefix: not exposed
    with bucket.mount(None, "--stream-paused") as m:
        assert sorted(os.listdir(m.mnt)) == ["a.raw", "b.img"]
        data = a.read_bytes()
        for offset, length in ((0, 4096), (MIB - 3, 10), (SIZE - 4096, 4096)):
            assert direct_read(m.mnt / "a.raw", offset, length) == data[offset : offset + length]
        cmp = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", m.mnt / "a.raw", a],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        assert run_corfs("stream", "resume", m.mnt).returncode == 0
        wait_complete(m.mnt, "a.raw")
        wait_complete(m.mnt, "b.img")
        assert sha256_file(m.mnt / "a.raw") == sha256_file(a)
        assert sha256_file(m.mnt / "b.img") == sha256_file(b)
        m.stop()


def test_url_to_one_key_exposes_that_object(bucket: Bucket) -> None:
    one = bucket.put("one.raw", seed=24)
    bucket.put("other.raw", MIB, seed=25)
    with bucket.mount(bucket.url + "one.raw", "--no-stream") as m:
        assert os.listdir(m.mnt) == ["one.raw"]
        assert sha256_file(m.mnt / "one.raw") == sha256_file(one)
        m.stop()


def test_resume_after_kill9_fetches_no_chunk_twice(bucket: Bucket) -> None:
    size = 8 * MIB
    base = bucket.put("disk.raw", size, seed=26)
    check_resume_after_kill9(bucket.mount, size, base)


# ---- errors at mount time -----------------------------------------------------------------


def _assert_mount_fails(url: str, endpoint: str, tmp: Path, *words: str) -> None:
    mnt, fresh, used = tmp / "mnt-e", tmp / "new-cache", tmp / "used-cache"
    mnt.mkdir()
    used.mkdir(exist_ok=True)
    (used / "keep").write_text("untouched")
    before = snapshot(used)
    try:
        for cache in (fresh, used):
            result = run_corfs(
                "mount",
                url,
                cache,
                mnt,
                "--endpoint-url",
                endpoint,
                "--io-timeout",
                "5",
                timeout=30,
            )
            line = assert_one_line_error(result, *words)
            assert result.returncode == 5, line
            for secret in FAKE_AWS_ENV.values():
                if "testing" in secret:
                    assert secret not in result.stderr
    finally:
        lazy_unmount(mnt)
    assert not fresh.exists()
    assert snapshot(used) == before


def test_wrong_credentials_fail_the_mount_in_one_line(moto_with_auth, tmp_path: Path) -> None:
    _assert_mount_fails(
        f"s3://{TEST_BUCKET}/x/", moto_with_auth.endpoint, tmp_path, "access denied"
    )


def test_missing_bucket_fails_the_mount_in_one_line(moto_server, tmp_path: Path) -> None:
    _assert_mount_fails("s3://no-such-bucket/x/", moto_server.endpoint, tmp_path, "not found")


def test_closed_endpoint_fails_the_mount_in_one_line(moto_server, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    _assert_mount_fails(f"s3://{TEST_BUCKET}/x/", endpoint, tmp_path, "cannot connect")


# ---- a hung GetObject is abandoned at --io-timeout ----------------------------------------


class DripProxy(FaultProxy):
    """FaultProxy with one more fault, `drip`: the head at once, then the body one byte every
    0.2 s. Each recv gets data well within botocore's read timeout, so only --io-timeout can
    end the call."""

    def _answer(self, client, first, headers, body, fault):
        if fault != "drip":
            return super()._answer(client, first, headers, body, fault)
        hop = {"connection", "keep-alive", "proxy-connection"}
        fwd = [(k, v) for k, v in headers if k.lower() not in hop] + [("Connection", "close")]
        status, rheaders, rbody = self._upstream(_join_head(first, fwd) + body)
        rheaders = [(k, v) for k, v in rheaders if k.lower() not in hop]
        client.sendall(_join_head(status, rheaders))
        for byte in rbody:
            if self._stop.wait(0.2):
                break
            client.sendall(bytes([byte]))
        return False


def _timed_read(path: Path, offset: int, length: int, limit: float) -> tuple[float, int]:
    """(seconds, errno or 0) of an O_DIRECT read; fails the test if it is still blocked
    after `limit` (the thread is freed when the mount's cleanup ends the daemon)."""

    def read() -> tuple[float, int]:
        started = time.monotonic()
        try:
            direct_read(path, offset, length)
        except OSError as exc:
            return time.monotonic() - started, exc.errno
        return time.monotonic() - started, 0

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(read).result(timeout=limit)
    except FutureTimeout:
        raise AssertionError(f"read at {offset} still blocked after {limit:g} s") from None
    finally:
        pool.shutdown(wait=False)


def test_trickling_body_is_abandoned_at_io_timeout(moto_server, tmp_path: Path) -> None:
    proxy = DripProxy(upstream_port=moto_server.port).start()
    try:
        bucket = Bucket(moto_server, tmp_path, endpoint=proxy.url.rstrip("/"))
        base = bucket.put("disk.raw", 2 * MIB, seed=27)
        data = base.read_bytes()
        with bucket.mount(None, "--no-stream", "--io-timeout", "3") as m:
            path = m.mnt / "disk.raw"
            assert direct_read(path, 0, 4096) == data[:4096]
            proxy.inject("drip")
            took, err = _timed_read(path, MIB, 4096, limit=15.0)
            assert err == errno.EIO
            assert 2.0 < took < 6.0, took
            # The base answers again: the same chunk now reads right; local ones all along.
            assert direct_read(path, MIB, 4096) == data[MIB : MIB + 4096]
            assert direct_read(path, 0, 4096) == data[:4096]
            # A call still trickling in the daemon does not hold up the unmount.
            proxy.inject("drip")
            # chunk 7: the re-read above was sequential, so read-ahead took chunks 5 and 6
            assert _timed_read(path, 2 * MIB - 4096, 4096, limit=15.0)[1] == errno.EIO
            m.stop(timeout=10)
    finally:
        proxy.stop()


def test_daemon_finds_credentials_named_by_a_relative_path(bucket: Bucket) -> None:
    """AWS_SHARED_CREDENTIALS_FILE (like the other path variables botocore and OpenSSL read)
    relative to the directory `mount --daemon` was started in: the daemon works in "/", yet
    it still names the file it named there."""
    one = bucket.put("one.raw", MIB, seed=26)
    started_in = bucket.tmp / "work"
    started_in.mkdir()
    (started_in / "creds").write_text(
        "[default]\naws_access_key_id = from-file\naws_secret_access_key = from-file\n"
    )
    no_env_keys = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                   "AWS_SESSION_TOKEN")}
    with CorfsMount(
        bucket.url, bucket.cache, bucket.mnt, "--endpoint-url", bucket.endpoint,
        "--daemon", "--no-stream", log_dir=bucket.logs, cwd=started_in,
        env={**no_env_keys, "AWS_SHARED_CREDENTIALS_FILE": "creds"},
    ) as m:
        assert sha256_file(m.mnt / "one.raw") == sha256_file(one)
        m.stop()


def test_expired_credentials_from_the_credential_source_fail_the_mount_cleanly(
    moto_server, tmp_path: Path
) -> None:
    """A credential_process that hands out credentials already expired (a stale credential
    cache, a clock set wrong): botocore raises a bare RuntimeError, which s3_errors re-raises
    as a bug: `corfs mount` ended with exit 1 and a Python traceback instead of exit 5 and a
    line about the credentials."""
    script = tmp_path / "credentials.py"
    script.write_text(
        "import datetime, json\n"
        "expires = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)\n"
        'print(json.dumps({"Version": 1, "AccessKeyId": "key-id", "SecretAccessKey": "s",\n'
        '                  "SessionToken": "t", "Expiration": expires.isoformat()}))\n'
    )
    config = tmp_path / "config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} {script}\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {"AWS_CONFIG_FILE": str(config), "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
           "AWS_SESSION_TOKEN": ""}
    try:
        result = run_corfs(
            "mount", f"s3://{TEST_BUCKET}/x/", tmp_path / "cache", mnt,
            "--endpoint-url", moto_server.endpoint, "--io-timeout", "5", timeout=30, env=env,
        )
    finally:
        lazy_unmount(mnt)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 5, result.stderr
    assert "credentials" in result.stderr.strip().splitlines()[-1], result.stderr


def test_a_failing_credential_source_is_told_in_the_log_without_tracebacks(
    bucket: Bucket,
) -> None:
    """Credentials near their expiry (a role session's end: every signature refreshes them)
    whose credential_process starts failing: each try of a read (a dozen within a 3 s
    --io-timeout) made botocore log 'Refreshing temporary credentials failed' with a whole
    traceback and the process's stderr (cli.py lets botocore's warnings through), where
    corfs's own retries are counted, not said."""
    base = bucket.put("disk.raw", 4 * MIB, seed=28)
    data = base.read_bytes()
    failing = bucket.tmp / "failing"
    script = bucket.tmp / "credentials.py"
    script.write_text(
        "import datetime, json, os, sys\n"
        f"if os.path.exists({str(failing)!r}):\n"
        "    sys.exit('the credential source is down')\n"
        "expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)\n"
        'print(json.dumps({"Version": 1, "AccessKeyId": "key-id", "SecretAccessKey": "s",\n'
        '                  "SessionToken": "t", "Expiration": expires.isoformat()}))\n'
    )
    config = bucket.tmp / "config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} {script}\n")
    env = {"AWS_CONFIG_FILE": str(config), "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
           "AWS_SESSION_TOKEN": ""}
    with CorfsMount(
        bucket.url, bucket.cache, bucket.mnt, "--endpoint-url", bucket.endpoint,
        "--chunk-size", "64K", "--no-stream", "--io-timeout", "3", log_dir=bucket.logs, env=env,
    ) as m:
        path = m.mnt / "disk.raw"
        assert direct_read(path, 0, 4096) == data[:4096]
        failing.touch()
        with pytest.raises(OSError) as info:
            direct_read(path, 3 * MIB, 4096)
        assert info.value.errno == errno.EIO
        failing.unlink()
        assert direct_read(path, 3 * MIB, 4096) == data[3 * MIB : 3 * MIB + 4096]
        m.stop()
        log = m.log_text()
    assert "Traceback" not in log, log
    assert log.count("the credential source is down") <= 1, log
