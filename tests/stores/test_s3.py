"""The S3 store against moto: pagination, open errors, credentials, and faults injected by
the proxy in front of moto."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from corfs.base import BaseOptions
from corfs.base.s3 import open_s3_base
from corfs.errors import (
    BaseAccessDenied,
    BaseChanged,
    BaseNotFound,
    BaseUnavailable,
    TransientBaseError,
    UsageError,
)
from corfs.s3_errors import s3_error
from tests.proxy import FaultProxy
from tests.servers import FAKE_AWS_ENV, TEST_BUCKET, free_port

MiB = 1 << 20


def options(endpoint: str, **kw: object) -> BaseOptions:
    return BaseOptions(io_timeout=3.0, endpoint_url=endpoint, region="us-east-1", **kw)  # type: ignore[arg-type]


def test_listing_paginates_and_keeps_to_direct_children(moto_server) -> None:
    client = moto_server.client()
    prefix = f"many-{os.getpid()}/"

    def put(i: int) -> None:
        client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}img{i:05d}.raw", Body=b"%d" % i)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(1105)))
    client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}chunks/aa/x.zst", Body=b"deep")
    client.put_object(Bucket=TEST_BUCKET, Key=prefix, Body=b"")  # a "directory marker"

    async def main() -> None:
        store = await open_s3_base(f"s3://{TEST_BUCKET}/{prefix}", options(moto_server.endpoint))
        try:
            images = await store.list_images()
            assert len(images) == 1105
            assert images[0].name == "img00000.raw" and images[-1].name == "img01104.raw"
            assert bytes(await images[1104].read(0, 4)) == b"1104"
            assert await store.read_object("chunks/aa/x.zst", 100) == b"deep"
        finally:
            await store.aclose()
        # Without the trailing slash the prefix is still taken as a directory.
        store = await open_s3_base(
            f"s3://{TEST_BUCKET}/{prefix[:-1]}", options(moto_server.endpoint)
        )
        try:
            assert len(await store.list_images()) == 1105
        finally:
            await store.aclose()

    trio.run(main)


def test_open_errors(moto_server) -> None:
    ep = moto_server.endpoint

    async def main() -> None:
        with pytest.raises(BaseNotFound):
            await open_s3_base("s3://no-such-bucket-corfs/", options(ep))
        with pytest.raises(BaseNotFound):
            await open_s3_base(f"s3://{TEST_BUCKET}/nothing/here.raw", options(ep))
        with pytest.raises(BaseUnavailable) as info:
            await open_s3_base(f"s3://{TEST_BUCKET}/", options(f"http://127.0.0.1:{free_port()}"))
        assert "\n" not in str(info.value)
        with pytest.raises(UsageError):
            await open_s3_base("s3:///x", options(ep))
        with pytest.raises(UsageError):
            await open_s3_base(f"s3://{TEST_BUCKET}/", options(ep, profile="no-such-profile"))

    trio.run(main)


def test_wrong_credentials_are_access_denied_without_echo(moto_with_auth) -> None:
    async def main() -> None:
        with pytest.raises(BaseAccessDenied) as info:
            await open_s3_base(f"s3://{TEST_BUCKET}/", options(moto_with_auth.endpoint))
        message = str(info.value)
        for secret in FAKE_AWS_ENV.values():
            if "testing" in secret:
                assert secret not in message

    trio.run(main)


def test_missing_credentials_are_access_denied(moto_server, monkeypatch) -> None:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k)

    async def main() -> None:
        with pytest.raises(BaseAccessDenied) as info:
            await open_s3_base(f"s3://{TEST_BUCKET}/", options(moto_server.endpoint))
        assert "credentials" in str(info.value)

    trio.run(main)


@pytest.fixture
def s3_site(moto_server):
    proxy = FaultProxy(upstream_port=moto_server.port).start()
    prefix = f"faults-{time.monotonic_ns()}/"
    data = os.urandom(2 * MiB + 77)
    moto_server.client().put_object(Bucket=TEST_BUCKET, Key=prefix + "disk.raw", Body=data)
    yield proxy, prefix, data
    proxy.stop()


FAULTS = [
    ("drop", TransientBaseError),
    ("reset", TransientBaseError),
    ("stall", TransientBaseError),
    ("stall_body", TransientBaseError),
    ("status:500", TransientBaseError),
    ("status:503", TransientBaseError),
    ("truncate", TransientBaseError),
    ("wrong_range", TransientBaseError),
    ("status:412", BaseChanged),
]


@pytest.mark.parametrize(("fault", "error"), FAULTS, ids=[f for f, _ in FAULTS])
def test_fault_gives_error_then_recovers(s3_site, fault: str, error: type) -> None:
    proxy, prefix, data = s3_site

    async def main() -> None:
        store = await open_s3_base(f"s3://{TEST_BUCKET}/{prefix}", options(proxy.url.rstrip("/")))
        try:
            (image,) = await store.list_images()
            assert bytes(await image.read(MiB, 100)) == data[MiB : MiB + 100]
            # Twice: the lean reader resends once on a fresh connection when a pooled one dies.
            proxy.inject(fault, fault)
            start = time.monotonic()
            with pytest.raises(error):
                await image.read(10, MiB)
            assert time.monotonic() - start < 6
            proxy.faults.clear()
            assert bytes(await image.read(10, MiB)) == data[10 : MiB + 10]
            assert store.wire.reader.stats.answered == 2  # the lean reader, not botocore
        finally:
            await store.aclose()

    trio.run(main)


def test_server_ignoring_range_never_gives_wrong_bytes(s3_site) -> None:
    proxy, prefix, data = s3_site

    async def main() -> None:
        store = await open_s3_base(f"s3://{TEST_BUCKET}/{prefix}", options(proxy.url.rstrip("/")))
        try:
            (image,) = await store.list_images()
            proxy.inject("ignore_range")
            with pytest.raises(TransientBaseError):
                await image.read(10, 100)
            proxy.inject("ignore_range")
            assert bytes(await image.read(0, len(data))) == data  # the whole object: no range
        finally:
            await store.aclose()

    trio.run(main)


def _err(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (_err("NoSuchKey", 404), BaseNotFound),
        (_err("NoSuchBucket", 404), BaseNotFound),
        (_err("AccessDenied", 403), BaseAccessDenied),
        (_err("InvalidAccessKeyId", 403), BaseAccessDenied),
        (_err("SignatureDoesNotMatch", 403), BaseAccessDenied),
        (_err("SlowDown", 503), TransientBaseError),
        (_err("InternalError", 500), TransientBaseError),
        (_err("Throttling", 400), TransientBaseError),
        (_err("PreconditionFailed", 412), BaseChanged),
        (EndpointConnectionError(endpoint_url="http://x"), TransientBaseError),
        (ReadTimeoutError(endpoint_url="http://x"), TransientBaseError),
        (ConnectionResetError(), TransientBaseError),
    ],
)
def test_error_mapping(exc: Exception, error: type) -> None:
    assert type(s3_error(exc, "s3://b/k")) is error


def test_open_and_the_first_listing_make_one_list_request(moto_server) -> None:
    """open_s3_base lists (a wrong bucket or credentials fail there, in one line) and that
    listing is the store's first list_images: a mount made two LISTs (one per 1000 objects
    each) before. Later listings ask S3 again."""
    client = moto_server.client()
    prefix = f"once-{os.getpid()}/"
    client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}a.raw", Body=b"a" * 512)
    lists: list[str] = []

    async def main() -> None:
        store = await open_s3_base(f"s3://{TEST_BUCKET}/{prefix}", options(moto_server.endpoint))
        try:
            store.client.meta.events.register(
                "before-call.s3.*", lambda model, **_: lists.append(model.name)
            )
            assert [i.name for i in await store.list_images()] == ["a.raw"]
            assert lists == []  # the open's listing
            client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}b.raw", Body=b"b" * 512)
            assert [i.name for i in await store.list_images()] == ["a.raw", "b.raw"]
            assert lists == ["ListObjectsV2"]
        finally:
            await store.aclose()

    trio.run(main)
