"""Credentials that botocore refreshes on a read's path (a credential_process, here a real one
that can be made slow) must not hold a read past --io-timeout: the lean S3 path signs in a
worker thread, which the read's deadline must be able to leave."""

from __future__ import annotations

import contextlib
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from corfs.base import BaseImage, BaseOptions
from corfs.base.s3 import S3Base, open_s3_base
from corfs.errors import BaseError, BaseUnreachable
from tests.servers import TEST_BUCKET, Moto

IO_TIMEOUT = 2.0
SIZE = 1 << 16

# Prints credentials that expire in 5 minutes (inside botocore's mandatory refresh window, so
# every signature refreshes them, as it does near a role session's end); while the file named
# by its argument exists, it hangs first (a credential endpoint that stopped answering).
CREDENTIAL_PROCESS = textwrap.dedent(
    """
    import datetime, json, os, sys, time
    if len(sys.argv) > 2:  # count the starts
        with open(sys.argv[2], "a") as started:
            started.write("started\\n")
    deadline = time.monotonic() + 30
    while os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
    print(json.dumps({"Version": 1, "AccessKeyId": "slow-key-id", "SecretAccessKey": "s",
                      "SessionToken": "t", "Expiration": expires.isoformat()}))
    """
)


def _object_and_process(
    moto_server: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str,
    script_text: str, flag: Path,
) -> tuple[bytes, BaseOptions]:
    """(the bytes of `key`, put in the test bucket; the options to read it), the environment's
    credentials coming from a credential_process running `script_text` with `flag` as its
    argument."""
    data = bytes(range(256)) * (SIZE // 256)
    moto_server.client().put_object(Bucket=TEST_BUCKET, Key=key, Body=data)
    script = tmp_path / "credentials.py"
    script.write_text(script_text)
    config = tmp_path / "config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} {script} {flag}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    return data, BaseOptions(io_timeout=IO_TIMEOUT, endpoint_url=moto_server.endpoint,
                             region="us-east-1")


@contextlib.asynccontextmanager
async def _opened(
    key: str, options: BaseOptions, data: bytes, first_read: bool
) -> AsyncIterator[tuple[S3Base, BaseImage]]:
    """The store of `key` and its image, read once already unless this is to be its
    `first_read`; closed at the end."""
    store = await open_s3_base(f"s3://{TEST_BUCKET}/{key}", options)
    try:
        (image,) = await store.list_images()
        if not first_read:
            assert bytes(await image.read(0, 4096)) == data[:4096]
        yield store, image
    finally:
        await store.aclose()


@pytest.mark.parametrize("first_read", [True, False], ids=["first-read", "later-read"])
def test_a_credential_refresh_that_hangs_does_not_hold_a_read_past_io_timeout(
    moto_server: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_read: bool
) -> None:
    """The first read of an object runs botocore's GetObject up to its signature (_capture);
    later ones sign in a thread when the credentials are near expiry. Neither thread could be
    left at the read's deadline: the read waited for the credential process (30 s here)."""
    key = f"creds-{first_read}/disk.raw"
    hang = tmp_path / "hang"
    data, options = _object_and_process(moto_server, tmp_path, monkeypatch, key,
                                        CREDENTIAL_PROCESS, hang)

    async def main() -> None:
        async with _opened(key, options, data, first_read) as (store, image):
            if not first_read:
                assert store.wire.reader.stats.answered == 1  # the lean path, signed by us
            try:
                hang.touch()
                start = time.monotonic()
                with trio.move_on_after(IO_TIMEOUT):  # the fetcher's deadline, as it sets it
                    await image.read(4096, 4096)
                took = time.monotonic() - start
                assert took < IO_TIMEOUT + 1, f"the read took {took:.1f} s past its deadline"
                # The abandoned thread runs on: not with a token of trio's default limiter,
                # which the cache's commits share (enough such threads and fsync would wait
                # for ever).
                assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
            finally:
                hang.unlink(missing_ok=True)

    trio.run(main)


def test_opening_with_a_credential_source_that_hangs_fails_within_io_timeout(
    moto_server: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore runs a credential_process when the store builds its client: a process that
    hangs held `corfs mount` (and a mount's reconnection to its base) until it ended."""
    script = tmp_path / "credentials.py"
    script.write_text(CREDENTIAL_PROCESS)
    hang = tmp_path / "hang"
    hang.touch()
    starts = tmp_path / "starts"
    config = tmp_path / "config"
    config.write_text(
        f"[default]\ncredential_process = {sys.executable} {script} {hang} {starts}\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    options = BaseOptions(io_timeout=IO_TIMEOUT, endpoint_url=moto_server.endpoint,
                          region="us-east-1")

    async def main() -> None:
        start = time.monotonic()
        try:
            with pytest.raises(BaseUnreachable, match="within"):
                await open_s3_base(f"s3://{TEST_BUCKET}/any/", options)
            assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
            took = time.monotonic() - start
            assert took < IO_TIMEOUT + 1, f"opening took {took:.1f} s"
            # Tried again (a mount's reconnection): it waits for the open still hanging,
            # rather than add a thread and a credential process each time.
            with pytest.raises(BaseUnreachable, match="within"):
                await open_s3_base(f"s3://{TEST_BUCKET}/any/", options)
            assert starts.read_text().count("started") == 1
        finally:
            hang.unlink(missing_ok=True)

    trio.run(main)


# Credentials that expire in 5 minutes (every signature refreshes them), or, while the file
# named by its argument exists, credentials that expired a minute ago: a credential cache
# that hands out stale ones, a clock set wrong.
EXPIRED_PROCESS = textwrap.dedent(
    """
    import datetime, json, os, sys
    minutes = -1 if os.path.exists(sys.argv[1]) else 5
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=minutes)
    print(json.dumps({"Version": 1, "AccessKeyId": "key-id", "SecretAccessKey": "s",
                      "SessionToken": "t", "Expiration": expires.isoformat()}))
    """
)


@pytest.mark.parametrize("first_read", [True, False], ids=["first-read", "later-read"])
def test_a_credential_source_that_gives_expired_credentials_is_a_base_error(
    moto_server: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_read: bool
) -> None:
    """botocore raises a bare RuntimeError ("the refreshed credentials are still expired")
    when a refresh brings expired credentials. s3_errors re-raises what it does not know as
    a bug: the read failed as an internal error (a traceback in the mount's log) instead of
    a base error of the credentials, as a refresh that fails is."""
    key = f"expired-{first_read}/disk.raw"
    expired = tmp_path / "expired"
    data, options = _object_and_process(moto_server, tmp_path, monkeypatch, key,
                                        EXPIRED_PROCESS, expired)

    async def main() -> None:
        async with _opened(key, options, data, first_read) as (_, image):
            expired.touch()
            with pytest.raises(BaseError):
                await image.read(4096, 4096)
            expired.unlink()
            assert bytes(await image.read(4096, 4096)) == data[4096:8192]

    trio.run(main)
